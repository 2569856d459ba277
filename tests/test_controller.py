"""The controller against a real PostgreSQL and the DataCrunch emulator (replicas are processes).

The clock of the reconciler is injected where a test must step past a delay; everything else is
real: the queue, the leader lease, the DataCrunch client speaking HTTP to the emulator.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from gpuscale.common.settings import Settings
from gpuscale.controller.app import ControllerApp
from gpuscale.controller.deployspec import load_all
from gpuscale.controller.pools import PoolRules, PoolsConfig
from gpuscale.controller.providers.datacrunch import DataCrunchClient, DataCrunchProvider, RetryPolicy
from gpuscale.controller.store import ControllerStore
from gpuscale.dev.emulator.app import EmulatorConfig
from gpuscale.dev.emulator.server import Emulator
from gpuscale.queue import NewTask, Priority, Queue, ServerInfo
from gpuscale.queue.tasktypes import types_for_pool

ROOT = Path(__file__).resolve().parents[1]
# Replicas that start and wait: these tests are about the controller, not the worker.
SLEEPER = f"{sys.executable} -c 'import time; time.sleep(600)'"


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    emu = Emulator(EmulatorConfig(cold_start_s=0.05, grace_s=1.0, default_command=SLEEPER, tick_s=0.02))
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


def pools_config(**overrides: object) -> PoolsConfig:
    base: dict[str, object] = {
        "min_replicas": 0,
        "max_replicas": 3,
        "scale_up_threshold": 2,
        "scale_up_delay": 30,
        "scale_down_delay": 60,
        "startup_timeout": 300,
        "cold_start": 5,
        "default_task_duration": 60,
    }
    base.update(overrides)
    return PoolsConfig(
        pools={
            name: PoolRules(
                name=name,
                deployment=f"gpuscale-{name}",
                task_types=types_for_pool(name),
                **base,  # type: ignore[arg-type]
            )
            for name in ("visual", "text")
        },
        reconcile_interval=1,
    )


def _client(emu: Emulator) -> DataCrunchClient:
    return DataCrunchClient(
        emu.base_url,
        emu.client_id,
        emu.client_secret,
        retry=RetryPolicy(attempts=2, initial_s=0.01, max_s=0.05),
    )


async def _create_deployments(emu: Emulator) -> None:
    client = _client(emu)
    try:
        for name in ("visual", "text"):
            for spec in load_all(ROOT / "deploy" / "datacrunch" / f"{name}.yaml"):
                await client.create_deployment(spec)
    finally:
        await client.aclose()


async def expire_lease(app: ControllerApp) -> None:
    """The leader's term runs out by the database's clock, as when its process froze or died."""
    conn = await asyncpg.connect(app.dsn)
    try:
        await conn.execute("UPDATE controller_lease SET renewed_at = renewed_at - interval '1 day'")
    finally:
        await conn.close()


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def deployments(emulator: Emulator) -> Emulator:
    await _create_deployments(emulator)
    return emulator


def _settings(emu: Emulator, **extra: object) -> Settings:
    return Settings(
        provider="datacrunch",
        datacrunch_base_url=emu.base_url,  # type: ignore[call-arg]
        datacrunch_client_id=emu.client_id,  # type: ignore[call-arg]
        datacrunch_client_secret=emu.client_secret,  # type: ignore[call-arg]
        datacrunch_retry_attempts=2,
        datacrunch_backoff_initial_s=0.01,
        datacrunch_backoff_max_s=0.05,
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture
async def make_app(dsn: str, deployments: Emulator) -> AsyncIterator[object]:
    apps: list[ControllerApp] = []

    async def make(
        config: PoolsConfig | None = None, *, dry_run: bool = False, **extra: object
    ) -> ControllerApp:
        app = ControllerApp(
            _settings(deployments, **extra), config or pools_config(), dsn, dry_run=dry_run, http=False
        )
        await app.setup()
        apps.append(app)
        return app

    yield make
    for app in apps:
        await app.teardown()


async def _target(emu: Emulator, deployment: str) -> int:
    client = _client(emu)
    try:
        return (await DataCrunchProvider(client).observe(deployment)).target
    finally:
        await client.aclose()


async def _enqueue(
    queue: Queue, n: int, task_type: str = "visual_analysis", priority: Priority = Priority.normal
) -> None:
    payload = {"document": "/tmp/deck.pdf", "first_page": 1, "last_page": 8}
    if task_type != "visual_analysis":
        payload = {"document": "/tmp/deck.pdf"}
    await queue.enqueue_many([NewTask(task_type, payload, priority=priority) for _ in range(n)])


async def test_scales_from_zero_on_queued_work(make_app, deployments: Emulator) -> None:  # type: ignore[no-untyped-def]
    app = await make_app()
    await app.tick()  # a fresh deployment (0..3) gets pinned to what the controller decides: 0
    assert await _target(deployments, "gpuscale-visual") == 0
    await _enqueue(app.queue, 5)
    assert await app.tick()
    assert await _target(deployments, "gpuscale-visual") >= 1
    assert await _target(deployments, "gpuscale-text") == 0
    events = await app.store.events("visual")
    assert events and events[0]["to_replicas"] >= 1 and events[0]["outcome"] == "applied"


async def test_a_reconcile_reads_the_provider_again_after_another_changed_it(  # type: ignore[no-untyped-def]
    make_app, deployments: Emulator
) -> None:
    """A tick and a fast reconcile observe side by side and act one at a time: the second must
    not decide on the replica count read before the first changed it (seen in a replay: a
    replica stopped for being idle, and two started again 0.1 s later on the old count)."""
    app = await make_app()
    await app.tick()  # fresh deployments get pinned to 0
    await _enqueue(app.queue, 5)
    r = app.reconciler
    first = await r.observe()
    second = await r.observe()  # newer than the first, so it is not skipped as stale...
    read_at = time.monotonic()
    second.providers.update(await r._observe_providers(["visual"]))  # ...but read before it acts
    second.providers_at = read_at
    await r.reconcile_pool("visual", first, None)
    scaled = await _target(deployments, "gpuscale-visual")
    assert scaled >= 1
    await r.reconcile_pool("visual", second, None)
    assert r.provider_counts["visual"] == scaled  # read again, not the 0 read before the scale-up
    events = await app.store.events("visual")
    # Without the second read it decided 0 → N again on the old count, and recorded it.
    assert [e["reason"] for e in events].count("scale_from_zero") == 1, events[:3]


async def test_scale_up_beyond_one_waits_for_the_delay(make_app, deployments: Emulator) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    app = await make_app(pools_config(cold_start=1, default_task_duration=600, drain_target=60))
    app.reconciler.clock = clock
    await _enqueue(app.queue, 1)
    await app.tick()
    assert await _target(deployments, "gpuscale-visual") == 1
    await _enqueue(app.queue, 8)
    clock.now += 1
    await app.tick()
    assert await _target(deployments, "gpuscale-visual") == 1, "scaled up before scale_up_delay"
    assert app.reconciler.views["visual"].last_decision["reason"] == "scale_up_pending"
    clock.now += 31
    await app.tick()
    assert await _target(deployments, "gpuscale-visual") > 1


async def _leading_and_listening(app: ControllerApp, pool: str) -> None:
    """Until ``app`` leads, has reconciled ``pool`` once, and its LISTEN connection is up."""
    for _ in range(200):
        if app.is_leader and app.reconciler.views[pool].at is not None:
            break
        await asyncio.sleep(0.05)
    assert app.is_leader
    await asyncio.wait_for(app.listening.wait(), 10)


async def test_critical_task_reaches_the_provider_before_any_tick(dsn: str, deployments: Emulator) -> None:
    # Ticks an hour apart: after the first one, only the LISTEN/NOTIFY fast path can scale the
    # pool within the test's (generous) wait.  How fast it is is measured by `gpuscale bench
    # fleet` (critical → provider), not here.
    app = ControllerApp(_settings(deployments, reconcile_interval_s=3600), pools_config(), dsn, http=False)
    runner = asyncio.create_task(app.run())
    try:
        await _leading_and_listening(app, "text")
        await _leading_and_listening(app, "visual")
        visual_seen = app.reconciler.views["visual"].at
        await _enqueue(app.queue, 1, "startup_name_extraction", Priority.critical)
        deadline = time.monotonic() + 30
        store = ControllerStore(app.db)
        while not (ups := [e for e in await store.events("text") if e["to_replicas"] == 1]):
            assert time.monotonic() < deadline, "a critical task did not scale its pool before the next tick"
            await asyncio.sleep(0.05)
        assert await _target(deployments, "gpuscale-text") == 1
        # The recorded scale-up, not the pool's latest decision: a later fast reconcile (the new
        # replica starting) may already have decided "hold".
        assert [e["reason"] for e in ups] == ["critical_task"]
        # Only the notified pool was reconciled: the fast path observes no other.
        assert app.reconciler.views["visual"].at == visual_seen
    finally:
        app.request_stop()
        await asyncio.wait_for(runner, 30)


async def test_the_fast_path_skips_pools_new_work_cannot_change(make_app, deployments: Emulator) -> None:  # type: ignore[no-untyped-def]
    app = await make_app()
    rec = app.reconciler
    await app.tick()  # both pools at zero: new work there scales from zero
    assert await rec.fast_worthy(["visual", "text"]) == ["text", "visual"]
    await app.raw_provider.set_replicas("gpuscale-visual", 3)  # its max
    await app.raw_provider.set_replicas("gpuscale-text", 1)
    await _enqueue(app.queue, 6, "startup_name_extraction")
    await app.tick()
    assert rec.at_max("visual") and rec.states["text"].up_since is not None  # text: timing an up
    assert await rec.fast_worthy(["visual", "text"]) == [], "new normal work changes nothing now"
    await _enqueue(app.queue, 1, "startup_name_extraction", Priority.critical)
    assert await rec.fast_worthy(["visual", "text"]) == ["text"], "a critical task scales at once"


async def test_the_server_list_is_read_again_only_when_the_registry_changes(db: asyncpg.Pool) -> None:
    queue, store = Queue(db), ControllerStore(db)
    await queue.register_server(ServerInfo(id="s1", pool="visual", container_id="c1", status="starting"))
    paused, v1, servers = await store.registry_if_changed(None)
    assert paused == set() and [(s.id, s.status) for s in servers or ()] == [("s1", "starting")]
    assert (await store.registry_if_changed(v1))[2] is None, "nothing changed: no list"
    assert await queue.server_heartbeat("s1", current_load=1)
    assert (await store.registry_if_changed(v1))[2] is None, "a heartbeat is not a change"
    await store.set_paused("text", True, "test")
    paused, v, unchanged = await store.registry_if_changed(v1)
    assert paused == {"text"} and v == v1 and unchanged is None
    await queue.server_heartbeat("s1", current_load=0, status="active")  # registered and ready
    _, v2, servers = await store.registry_if_changed(v1)
    assert v2 != v1 and [(s.id, s.status) for s in servers or ()] == [("s1", "active")]
    await queue.register_server(ServerInfo(id="s2", pool="text", status="active"))
    _, v3, servers = await store.registry_if_changed(v2)
    assert v3 != v2 and sorted(s.id for s in servers or ()) == ["s1", "s2"]
    await queue.set_server_status("s1", "dead")
    await queue.deregister_server("s2")
    _, v4, servers = await store.registry_if_changed(v3)
    assert v4 != v3 and servers == [], "dead and removed servers leave the list"


async def test_scales_down_after_idle(make_app, deployments: Emulator) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    app = await make_app()
    app.reconciler.clock = clock
    await app.raw_provider.set_replicas("gpuscale-visual", 2)
    await app.tick()
    assert await _target(deployments, "gpuscale-visual") == 2, "scaled down at once"
    clock.now += 30
    await app.tick()
    assert await _target(deployments, "gpuscale-visual") == 2, "scaled down before scale_down_delay"
    clock.now += 31
    await app.tick()
    assert await _target(deployments, "gpuscale-visual") == 0
    reasons = {e["reason"] for e in await app.store.events("visual")}
    assert "idle_timeout" in reasons


async def test_holds_on_provider_errors(make_app, deployments: Emulator) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    app = await make_app()
    app.reconciler.clock = clock
    await app.raw_provider.set_replicas("gpuscale-visual", 2)
    await app.tick()
    deployments.set_faults(error=1.0)
    try:
        clock.now += 3600
        await app.tick()
        view = app.reconciler.views["visual"]
        assert view.last_decision["reason"] == "hold_unknown"
        assert view.errors and any("provider" in e for e in view.errors)
    finally:
        deployments.clear_faults()
    assert await _target(deployments, "gpuscale-visual") == 2


async def test_holds_on_database_errors(make_app, deployments: Emulator, pg_server: str) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    app = await make_app()
    app.reconciler.clock = clock
    await app.raw_provider.set_replicas("gpuscale-visual", 2)
    await app.tick()
    # The queue becomes unreadable (a real error from the real server: its database is gone).
    broken = await asyncpg.create_pool(pg_server, min_size=1, max_size=1)
    assert broken is not None
    await broken.close()
    app.reconciler.queue = Queue(broken)
    clock.now += 3600
    decisions = await app.reconciler.reconcile_all()
    assert decisions["visual"].reason == "hold_unknown"
    assert decisions["visual"].desired == 2
    assert await _target(deployments, "gpuscale-visual") == 2


async def test_dead_workers_tasks_are_requeued(make_app, db: asyncpg.Pool) -> None:  # type: ignore[no-untyped-def]
    app = await make_app(heartbeat_timeout_s=1.0)
    await _enqueue(app.queue, 2)
    await app.queue.register_server(
        ServerInfo(id="w-dead", pool="visual", status="active", max_concurrent_tasks=2)
    )
    claimed = await app.queue.claim("visual", "w-dead", 2, lease_s=3600)
    assert len(claimed) == 2
    await db.execute(
        "UPDATE processing_servers SET last_heartbeat = now() - interval '1 minute' WHERE id = 'w-dead'"
    )
    await app.reap()
    statuses = {t.id: (await app.queue.get_task(t.id))["status"] for t in claimed}  # type: ignore[index]
    assert set(statuses.values()) == {"queued"}
    servers = await app.queue.list_servers(include_dead=True)
    assert [s.status for s in servers if s.id == "w-dead"] == ["dead"]
    again = await app.queue.claim("visual", "w-next", 5)
    assert sorted(t.id for t in again) == sorted(statuses)


async def test_dry_run_changes_nothing(make_app, deployments: Emulator) -> None:  # type: ignore[no-untyped-def]
    app = await make_app(dry_run=True)
    await _enqueue(app.queue, 5)
    await app.tick()
    assert await _target(deployments, "gpuscale-visual") == 0
    events = await app.store.events("visual")
    assert events and events[0]["outcome"] == "dry_run" and events[0]["to_replicas"] >= 1


async def test_paused_pool_holds(make_app, deployments: Emulator) -> None:  # type: ignore[no-untyped-def]
    app = await make_app()
    await ControllerStore(app.db).set_paused("visual", True, "test")
    await _enqueue(app.queue, 5)
    await app.tick()
    assert await _target(deployments, "gpuscale-visual") == 0
    assert app.reconciler.views["visual"].paused
    await ControllerStore(app.db).set_paused("visual", False, "test")
    await app.tick()
    assert await _target(deployments, "gpuscale-visual") >= 1


async def test_only_the_leader_acts_and_a_standby_takes_over(make_app, deployments: Emulator) -> None:  # type: ignore[no-untyped-def]
    first = await make_app()
    second = await make_app()
    assert await first.tick()
    assert not await second.tick(), "two leaders at once"
    assert first.is_leader and not second.is_leader
    lease = (await second.pools_view())["lease"]
    assert lease["holder"] == first.controller_id and lease["generation"] == 1 and not lease["expired"]
    # The leader's session dies: with a lease, that alone changes nothing (it reconnects).
    assert first.leader._conn is not None
    first.leader._conn.terminate()
    assert await first.tick() and not await second.tick()
    # Its term runs out (as when the process is frozen or killed): the standby takes over.
    await expire_lease(first)
    assert await second.tick()
    assert second.is_leader
    assert not await first.tick(), "the old leader acted while the standby leads"
    assert not first.is_leader


async def test_replica_that_never_registers_is_replaced(make_app, deployments: Emulator) -> None:  # type: ignore[no-untyped-def]
    from gpuscale.controller import metrics as m

    deployments.set_faults(unhealthy="gpuscale-visual")  # replicas stay 'starting' forever
    clock = Clock()
    app = await make_app(pools_config(startup_timeout=10, startup_backoff=30))
    app.reconciler.clock = clock
    await _enqueue(app.queue, 1)
    await app.tick()
    assert await _target(deployments, "gpuscale-visual") == 1
    first = {r.id for r in (await app.raw_provider.observe("gpuscale-visual")).replicas}
    assert len(first) == 1
    before = m.REPLACEMENTS.labels("visual")._value.get()
    clock.now += 11
    await app.tick()
    assert app.reconciler.views["visual"].last_decision["reason"] == "startup_timeout"
    assert m.REPLACEMENTS.labels("visual")._value.get() == before + 1
    now_ids = {r.id for r in (await app.raw_provider.observe("gpuscale-visual")).replicas}
    assert not (first & now_ids), "the replica that never registered is still there"
    reasons = [e["reason"] for e in await app.store.events("visual")]
    assert "startup_timeout" in reasons


async def test_budget_caps_non_critical_scale_ups(make_app, deployments: Emulator) -> None:  # type: ignore[no-untyped-def]
    import datetime as dt

    config = pools_config(cold_start=1, default_task_duration=600, drain_target=60)
    config = config.model_copy(update={"monthly_budget_usd": 1.0})
    clock = Clock()
    app = await make_app(config)
    app.reconciler.clock = clock
    await app.store.add_spend("visual", 50.0, 3600.0, dt.datetime.now(dt.UTC))  # far over pace
    await _enqueue(app.queue, 8)
    await app.tick()
    # A pool at zero with queued work still gets one replica, so work finishes, slowly.
    assert await _target(deployments, "gpuscale-visual") == 1
    clock.now += 31  # past scale_up_delay (30 s), well within startup_timeout
    await app.tick()
    assert await _target(deployments, "gpuscale-visual") == 1
    decision = app.reconciler.views["visual"].last_decision
    assert decision["reason"] == "budget_cap", decision
    # A critical task is not capped.
    await _enqueue(app.queue, 3, priority=Priority.critical)
    clock.now += 1
    await app.tick()
    assert await _target(deployments, "gpuscale-visual") > 1


async def test_leader_exports_fleet_task_timings(make_app, deployments: Emulator) -> None:  # type: ignore[no-untyped-def]
    from gpuscale.controller import metrics as m

    app = await make_app()
    await app.tick()  # becomes leader; timings count from here
    hist = m.TASK_DURATION_SECONDS.labels("visual", "visual_analysis")
    failures = m.TASK_FAILURES.labels("visual", "visual_analysis")
    count_before = sum(b.get() for b in hist._buckets)
    fail_before = failures._value.get()
    await _enqueue(app.queue, 2)
    claimed = await app.queue.claim("visual", "w1", 2)
    await asyncio.sleep(0.05)
    assert await app.queue.complete(claimed[0].id, "w1", {"ok": True})
    await app.queue.fail(claimed[1].id, "w1", "broken", retryable=False)
    await app.tick()
    assert sum(b.get() for b in hist._buckets) == count_before + 2
    assert failures._value.get() == fail_before + 1
    await app.tick()  # nothing new: nothing counted twice
    assert sum(b.get() for b in hist._buckets) == count_before + 2


def test_upstream_eta_uses_per_type_durations_and_progress() -> None:
    from gpuscale.controller.observe import BlockedTask, Context, Upstream, upstream_eta
    from gpuscale.controller.policy import DurationEstimator

    config = pools_config(default_task_duration=60)
    visual = config.pools["visual"].model_copy(
        update={"task_durations_s": {"visual_analysis": 10.0, "slide_feedback": 4.0}}
    )
    pools = {**config.pools, "visual": visual}
    ctx = Context(rules=pools, expected=DurationEstimator(pools.values()).expected, registered={"visual": 1})
    # A text task waits on two visual batches: one 60% done, one just claimed.
    task = BlockedTask(
        "text",
        "startup_name_extraction",
        (
            Upstream("visual", "visual_analysis", "running", 6.0, 0.6, "v1"),
            Upstream("visual", "visual_analysis", "running", 1.0, None, "v2"),
        ),
    )
    assert upstream_eta([task], ctx, {"v1": 1, "v2": 1}) == pytest.approx(9.0)
    # Two tasks on one replica whose model serves one at a time: the second waits for the first.
    assert upstream_eta([task], ctx, {"v1": 1, "v2": 2}) == pytest.approx(18.0)
    # A queued dependency with no replica ready pays the cold start too.
    queued = BlockedTask("text", "startup_name_extraction", (Upstream("visual", "slide_feedback", "queued"),))
    cold = Context(rules=pools, expected=ctx.expected, registered={})
    assert upstream_eta([queued], cold, {}) == pytest.approx(4.0 + visual.cold_start_s)
    assert upstream_eta([], ctx, {}) is None


def test_observation_follows_chains_of_stages_and_counts_what_freed_replicas_cannot_take() -> None:
    """template_analysis waits for a running healthcare_classification, the three specialized
    analyses for the template: all about to arrive, their ETAs down the chain; the replica that
    finishes each stage takes one task of the next, so only the tasks beyond those need more."""
    from gpuscale.controller.observe import (
        BlockedTask,
        Context,
        Fleet,
        PoolQueue,
        RunningTask,
        Upstream,
        WorkRead,
        chain_etas,
        observe_pool,
    )
    from gpuscale.controller.policy import DurationEstimator

    config = pools_config(default_task_duration=60)
    text = config.pools["text"].model_copy(
        update={"task_durations_s": {"template_analysis": 50.0, "specialized_science": 100.0}}
    )
    pools = {**config.pools, "text": text}
    ctx = Context(rules=pools, expected=DurationEstimator(pools.values()).expected, registered={"text": 1})
    running = RunningTask("text", "healthcare_classification", 20.0, 0.5, "t1", deck_age_s=400.0)
    template = BlockedTask(
        "text",
        "template_analysis",
        (Upstream("text", "healthcare_classification", "running", 20.0, 0.5, "t1", id=1),),
        id=2,
        deck_age_s=400.0,
    )
    specs = [
        BlockedTask(
            "text", "specialized_science", (Upstream("text", "template_analysis", "blocked", id=2),), id=k
        )
        for k in (3, 4, 5)
    ]
    orphan = BlockedTask("text", "deck_date_extraction", (Upstream("visual", "x", "blocked", id=99),), id=6)
    work = WorkRead(
        pools={"text": PoolQueue({}, {}, oldest_deck_age_s=None)},
        running=[running],
        blocked=[template, *specs, orphan],
    )
    etas = chain_etas(work.blocked, ctx, work.server_load())
    # healthcare: 60 s expected, half done → 30 s; the template then runs 50 s.
    assert etas[:4] == [pytest.approx(30.0)] + [pytest.approx(80.0)] * 3
    assert etas[4] is None  # waits on something that is not under way
    fleet = Fleet(provider_replicas=1, registered=1, idle=0, busy=1)
    o = observe_pool("text", work, fleet, ctx)
    # Four tasks about to arrive, two feeders (healthcare, template) free their replicas: 2 more.
    assert o.blocked_on_running == 2
    assert o.blocked_work_s == pytest.approx((50.0 + 3 * 100.0) / 4 * 2)
    assert o.upstream_eta_s == pytest.approx(30.0)
    assert o.deck_age_s == pytest.approx(400.0)


async def test_sigterm_lets_the_provider_call_in_progress_finish(dsn: str, deployments: Emulator) -> None:
    app = ControllerApp(_settings(deployments, reconcile_interval_s=60), pools_config(), dsn, http=False)
    runner = asyncio.create_task(app.run())
    try:
        await _leading_and_listening(app, "visual")
        deployments.set_faults(slow=0.7)  # every API answer takes 0.7 s
        await _enqueue(app.queue, 3)  # the fast path starts a reconcile of 'visual'
        await asyncio.sleep(1.0)  # ... which is now inside its (slow) provider calls
        app.request_stop()
        await asyncio.wait_for(runner, 60)
    finally:
        deployments.clear_faults()
        if not runner.done():
            app.request_stop()
            await asyncio.wait_for(runner, 60)
    assert await _target(deployments, "gpuscale-visual") >= 1, "the scale-up was cut off by the shutdown"


def test_unknown_server_list_holds_instead_of_scaling_down() -> None:
    from gpuscale.controller.observe import Context, PoolQueue, RunningTask, WorkRead
    from gpuscale.controller.policy import PoolState, decide
    from gpuscale.controller.providers.base import ProviderState, Replica
    from gpuscale.controller.reconcile import build_observation

    config = pools_config()
    rules = config.pools["visual"]
    work = WorkRead(
        pools={"visual": PoolQueue({}, {})},
        running=[RunningTask("visual", "visual_analysis", 5.0, None, f"s{i}") for i in range(3)],
    )
    provider = ProviderState(replicas=[Replica(f"r{i}", "running", 0.0) for i in range(3)], target=3)
    ctx = Context(rules=config.pools, expected=lambda _t: 60.0)
    obs, _ = build_observation(rules, work, None, provider, ctx)
    decision = decide(rules, obs, PoolState(), 10_000.0)
    assert decision.reason == "hold_unknown" and decision.desired == 3


async def test_text_pool_is_prewarmed_while_its_visual_inputs_run(make_app, deployments: Emulator) -> None:  # type: ignore[no-untyped-def]
    app = await make_app(pools_config(cold_start=120, default_task_duration=60))
    batch = await app.queue.enqueue(
        NewTask("visual_analysis", {"document": "/tmp/deck.pdf", "first_page": 1, "last_page": 8})
    )
    await app.queue.enqueue(
        NewTask("startup_name_extraction", {"document": "/tmp/deck.pdf"}, depends_on=[batch])
    )
    await app.queue.register_server(
        ServerInfo(id="v1", pool="visual", status="active", max_concurrent_tasks=1)
    )
    assert [t.id for t in await app.queue.claim("visual", "v1", 1)] == [batch]
    await app.tick()
    # The extraction cannot run yet, but its input is running and will be done in about 30 s,
    # within the text pool's 120 s cold start: start a text replica now.
    assert await _target(deployments, "gpuscale-text") == 1
    assert app.reconciler.views["text"].last_decision["reason"] == "prewarm_dependency"


async def test_busy_replicas_come_from_held_tasks_not_the_last_heartbeat(make_app) -> None:  # type: ignore[no-untyped-def]
    app = await make_app()
    for sid in ("a", "b"):
        await app.queue.register_server(
            ServerInfo(
                id=sid, pool="visual", container_id=f"r-{sid}", status="active", max_concurrent_tasks=2
            )
        )
    await _enqueue(app.queue, 1)
    assert len(await app.queue.claim("visual", "a", 1)) == 1  # its heartbeat still says load 0
    observed = await app.reconciler.observe()
    assert observed.servers is not None
    assert {s.id: s.current_load for s in observed.servers} == {"a": 1, "b": 0}


async def test_a_new_leader_takes_over_the_policy_memory(make_app, deployments: Emulator) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    first = await make_app()
    first.reconciler.clock = clock
    await first.raw_provider.set_replicas("gpuscale-visual", 2)
    await first.tick()  # visual: 2 idle replicas, the idle timers start now
    clock.now += 45
    await first.tick()
    assert await _target(deployments, "gpuscale-visual") == 2
    await expire_lease(first)
    second = await make_app()
    second.reconciler.clock = clock
    clock.now += 20  # 65 s idle in all: past the 60 s delay only if the timers were carried over
    assert await second.tick()
    assert second.is_leader
    assert await _target(deployments, "gpuscale-visual") < 2, "the new leader restarted the idle timers"


async def test_work_detail_reads_queued_types_running_progress_and_blocked(
    make_app, db: asyncpg.Pool
) -> None:  # type: ignore[no-untyped-def]
    app = await make_app()
    q = app.queue
    await _enqueue(q, 3)
    await _enqueue(q, 2, task_type="slide_feedback")
    batch = await q.enqueue(
        NewTask("visual_analysis", {"document": "/d.pdf", "first_page": 1, "last_page": 8})
    )
    later = await q.enqueue(NewTask("startup_name_extraction", {"document": "/d.pdf"}, depends_on=[batch]))
    await q.enqueue(NewTask("template_analysis", {"document": "/d.pdf"}, depends_on=[later]))
    await q.register_server(ServerInfo(id="v1", pool="visual", status="active", max_concurrent_tasks=1))
    [claimed] = await q.claim("visual", "v1", 1)
    assert await q.progress(claimed.id, "v1", 40.0, "4 of 10 pages")
    # Claim order is by id: v2 takes two visual batches and a slide_feedback task, which fails and
    # waits out its retry backoff (queued, not claimable, so not counted).
    await q.register_server(ServerInfo(id="v2", pool="visual", status="active", max_concurrent_tasks=3))
    held = await q.claim("visual", "v2", 3)
    assert [t.task_type for t in held] == ["visual_analysis", "visual_analysis", "slide_feedback"]
    await q.fail(held[2].id, "v2", "flaky", retryable=True)
    detail = await q.work_detail()
    queued = {k: v for k, v in detail.queued_by_type.items() if v}
    assert queued == {("visual", "slide_feedback"): 1, ("visual", "visual_analysis"): 1}
    # The counters agree with a scan of the table.
    rows = await db.fetch(
        """SELECT pool, task_type, count(*) AS n FROM processing_queue
            WHERE status = 'queued' AND (not_before IS NULL OR not_before <= now()) GROUP BY 1, 2"""
    )
    assert queued == {(r["pool"], r["task_type"]): r["n"] for r in rows}
    assert sorted((r.server, r.task_type) for r in detail.running) == [
        ("v1", "visual_analysis"),
        ("v2", "visual_analysis"),
        ("v2", "visual_analysis"),
    ]
    assert next(r for r in detail.running if r.server == "v1").progress == pytest.approx(0.4)
    # The extraction waits on a queued batch; the template on the blocked extraction, named by id
    # so the observation can follow the chain to its ETA.
    assert [(b.task_type, [(d.status, d.id) for d in b.deps]) for b in detail.blocked] == [
        ("startup_name_extraction", [("queued", batch)]),
        ("template_analysis", [("blocked", later)]),
    ]
    assert all(b.deck_age_s is not None and b.deck_age_s >= 0 for b in detail.blocked)
    assert detail.oldest_deck_age_s.keys() == {"visual"}
    assert all(r.deck_age_s is not None for r in detail.running)


async def test_learned_durations_are_exported_and_kept_by_a_new_leader(make_app, db: asyncpg.Pool) -> None:  # type: ignore[no-untyped-def]
    from gpuscale.controller import metrics as m

    first = await make_app()
    await first.tick()  # leader; timings count from here
    gauge = m.TASK_EXPECTED_SECONDS.labels("visual", "slide_feedback")
    before = gauge._value.get()
    await _enqueue(first.queue, 1, task_type="slide_feedback")
    await first.queue.register_server(ServerInfo(id="w1", pool="visual", status="active"))
    [task] = await first.queue.claim("visual", "w1", 1)
    await db.execute(
        "UPDATE processing_queue SET started_at = now() - interval '500 seconds' WHERE id = $1", task.id
    )
    assert await first.queue.complete(task.id, "w1", {"ok": True})
    await first.tick()  # learns 500 s, exports it
    await first.tick()  # saves it with the pool state
    learned = first.reconciler.estimator.expected("slide_feedback")
    assert learned > before + 50
    assert gauge._value.get() == pytest.approx(learned)
    await expire_lease(first)
    second = await make_app()
    assert second.reconciler.estimator.expected("slide_feedback") == pytest.approx(before)
    assert await second.tick()
    assert second.reconciler.estimator.expected("slide_feedback") == pytest.approx(learned)


def test_tasks_on_a_draining_replica_need_no_replica() -> None:
    from gpuscale.controller.observe import Context, Fleet, PoolQueue, RunningTask, WorkRead, observe_pool
    from gpuscale.controller.policy import PoolState, decide

    config = pools_config()
    work = WorkRead(
        pools={"visual": PoolQueue({}, {})},
        running=[
            RunningTask("visual", "visual_analysis", 5.0, 0.5, "kept"),
            RunningTask("visual", "visual_analysis", 5.0, 0.5, "told-to-stop"),
        ],
    )
    ctx = Context(rules=config.pools, expected=lambda _t: 60.0)
    fleet = Fleet(provider_replicas=1, registered=1, idle=0, busy=1, draining=frozenset({"told-to-stop"}))
    obs = observe_pool("visual", work, fleet, ctx)
    # The stopped replica's task finishes there or comes back to the queue: no replica for it.
    assert obs.running == 1 and obs.running_work_s == pytest.approx(30.0)
    # With an idle replica, that replica is kept for the task coming back: no second busy replica
    # is stopped while the first one drains (the provider picks which replica goes).
    idle = Fleet(provider_replicas=2, registered=2, idle=1, busy=1, draining=frozenset({"told-to-stop"}))
    kept = observe_pool("visual", work, idle, ctx)
    assert kept.running == 2 and kept.running_work_s == pytest.approx(60.0)
    eager = pools_config(scale_down_delay=0).pools["visual"]
    assert decide(eager, kept, PoolState(), 100.0).desired == 2
    assert (
        decide(
            eager,
            observe_pool("visual", WorkRead({"visual": PoolQueue({}, {})}), idle, ctx),
            PoolState(),
            100.0,
        ).desired
        == 1
    )


def test_an_idle_replica_with_claimable_work_is_busy_claiming() -> None:
    """A worker that has just registered takes a moment to claim: while its pool has claimable
    tasks it is not surplus (the simulator's replicas claim in the same instant)."""
    from gpuscale.controller.observe import Context, Fleet, PoolQueue, RunningTask, WorkRead, observe_pool
    from gpuscale.controller.policy import PoolState, decide

    eager = pools_config(scale_down_delay=0)
    ctx = Context(rules=eager.pools, expected=lambda _t: 60.0)
    running = [RunningTask("visual", "visual_analysis", 5.0, 0.5, "a")]
    fleet = Fleet(provider_replicas=3, registered=3, idle=2, busy=1)
    queued = WorkRead({"visual": PoolQueue({"normal": 1}, {"visual_analysis": 1})}, running=running)
    obs = observe_pool("visual", queued, fleet, ctx)
    assert (obs.idle_replicas, obs.busy_replicas) == (1, 2)
    assert decide(eager.pools["visual"], obs, PoolState(), 100.0).desired == 2
    empty = observe_pool("visual", WorkRead({"visual": PoolQueue({}, {})}, running=running), fleet, ctx)
    assert (empty.idle_replicas, empty.busy_replicas) == (2, 1)
    assert decide(eager.pools["visual"], empty, PoolState(), 100.0).desired == 1


def test_a_pool_state_is_written_again_on_a_change_or_a_learned_duration_moved_5_percent() -> None:
    from dataclasses import replace

    from gpuscale.controller.placement import PlacementState
    from gpuscale.controller.policy import PoolState
    from gpuscale.controller.reconcile import _state_moved

    state, placement = PoolState(), PlacementState()
    saved = (state, placement, {"visual_analysis": 100.0})
    assert _state_moved(None, saved)
    assert not _state_moved(saved, (state, placement, {"visual_analysis": 104.0}))
    assert _state_moved(saved, (state, placement, {"visual_analysis": 106.0}))
    assert _state_moved(saved, (replace(state, desired=2), placement, {"visual_analysis": 100.0}))
    assert _state_moved(saved, (state, placement, {"visual_analysis": 100.0, "slide_feedback": 30.0}))
