"""Fallback deployments and spot on the emulator: quota_reached, preemption, prices.

The controller (a real :class:`ControllerApp` on the test's PostgreSQL) drives the DataCrunch
emulator with the shipped visual deployments (spot H100, on-demand H100, on-demand A100).  The
replicas are sleepers; the tests register their workers in the real registry themselves, so they
decide which replica is busy.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from gpuscale.common.settings import Settings
from gpuscale.controller.app import ControllerApp
from gpuscale.controller.deployspec import load_all
from gpuscale.controller.pools import PoolsConfig, parse_pools
from gpuscale.controller.prices import ContainerPrice, deployment_price, parse_container_types, price_for
from gpuscale.controller.providers.datacrunch import DataCrunchClient, RetryPolicy
from gpuscale.dev.emulator import Emulator, EmulatorConfig
from gpuscale.dev.emulator.faults import FaultSpecError, parse_faults
from gpuscale.queue import NewTask, Queue, ServerInfo

ROOT = Path(__file__).resolve().parents[1]
SLEEPER = f"{sys.executable} -c 'import time; time.sleep(600)'"
SPOT, ONDEMAND, A100 = "gpuscale-visual-spot", "gpuscale-visual", "gpuscale-visual-a100"


# ------------------------------------------------------------------ fault grammar


def test_fault_grammar_quota_per_deployment_and_preemption() -> None:
    f = parse_faults("quota=gpuscale-visual-spot|gpuscale-text-spot,preempt=0.5")
    assert f.quota is None and f.quota_deployments == ["gpuscale-visual-spot", "gpuscale-text-spot"]
    assert f.is_sold_out("gpuscale-text-spot") and not f.is_sold_out("gpuscale-visual")
    assert f.preempt_rate == 0.5 and f.preempt_next == 0
    assert parse_faults("quota=2").quota == 2 and parse_faults("quota=2").quota_deployments == []
    assert parse_faults("preempt=next:3").preempt_next == 3
    assert parse_faults("preempt=after:2.5").preempt_after == 2.5
    for bad in ("preempt=soon:1", "preempt=-1", "preempt=next:x", "preempt"):
        with pytest.raises(FaultSpecError):
            parse_faults(bad)
    f.update({"quota": None, "preempt": "off"})
    assert f.quota_deployments == [] and f.preempt_rate == 0.0
    f.update({"spec": "quota=x,preempt=next:1"})
    assert f.quota_deployments == ["x"] and f.preempt_next == 1


# ------------------------------------------------------------------ prices


def test_prices_match_a_deployment_by_compute_type_and_spot() -> None:
    types = parse_container_types(
        [
            {
                "model": "H100",
                "name": "H100 SXM5 80GB",
                "serverless_price": "1.75",
                "serverless_spot_price": "0.87",
                "gpu": {"number_of_gpus": 1},
                "currency": "usd",
            },
            {"model": "A100", "serverless_price": "1.29", "serverless_spot_price": "0.65"},
            {"model": "B200", "serverless_price": "n/a", "serverless_spot_price": "1"},  # unreadable: skipped
            "junk",
        ]
    )
    assert [t.model for t in types] == ["H100", "A100"]
    assert price_for(types, "H100", 1, spot=False) == 1.75
    assert price_for(types, "h100", 2, spot=True) == pytest.approx(1.74)
    assert price_for(types, "L40S", 1, spot=False) is None
    assert deployment_price(types, {"compute": {"name": "A100", "size": 1}, "is_spot": True}) == 0.65
    assert price_for([ContainerPrice("H100", "x", 7.0, 3.5, gpus=2)], "H100", 1, spot=False) == 3.5


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    emu = Emulator(EmulatorConfig(cold_start_s=0.05, grace_s=1.0, default_command=SLEEPER, tick_s=0.02))
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


def _cli(emu: Emulator, *args: str, creds: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATACRUNCH_")}
    if creds:
        env.update(
            DATACRUNCH_BASE_URL=emu.base_url,
            DATACRUNCH_CLIENT_ID=emu.client_id,
            DATACRUNCH_CLIENT_SECRET=emu.client_secret,
        )
    return subprocess.run(
        [sys.executable, "-m", "gpuscale.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_deploy_prices_lists_on_demand_and_spot(emulator: Emulator) -> None:
    as_json = _cli(emulator, "deploy", "prices", "--json")
    assert as_json.returncode == 0, as_json.stderr
    rows = {r["model"]: r for r in json.loads(as_json.stdout)}
    assert rows["H100"]["on_demand_per_hour"] == 1.75 and rows["H100"]["spot_per_hour"] == 0.87
    assert rows["H100"]["spot_saving"] == pytest.approx(0.503, abs=0.001)
    table = _cli(emulator, "deploy", "prices")
    assert table.returncode == 0 and "H100" in table.stdout and "0.87" in table.stdout
    assert "spot" in table.stdout
    assert emulator.client_secret not in table.stdout + table.stderr
    bad = _cli(emulator, "deploy", "prices", "--currency", "btc")
    assert bad.returncode == 2 and "--currency" in bad.stderr
    none = _cli(emulator, "deploy", "prices", creds=False)
    assert none.returncode == 2 and "DATACRUNCH_CLIENT_ID" in none.stderr


# ------------------------------------------------------------------ the controller on the emulator


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def fallback_pools() -> PoolsConfig:
    common = {
        "min_replicas": 0,
        "max_replicas": 3,
        "scale_up_delay": 0,
        "scale_down_delay": 600,
        "startup_timeout": 3600,
        "cold_start": 5,
        "default_task_duration": 600,
        "drain_target": 60,
        "tasks_per_replica": 1,
    }
    return parse_pools(
        {
            "visual_container_scaling": {
                **common,
                "deployments": [
                    {"name": SPOT, "spot": True, "price_per_hour": 0.87},
                    {"name": ONDEMAND, "price_per_hour": 1.75},
                    {"name": A100, "price_per_hour": 1.29},
                ],
                "fallback_cooloff": "60s",
                "max_fallback_cooloff": "10m",
                "preemption_limit": 2,
            },
            "text_container_scaling": {**common, "deployment": "gpuscale-text"},
            "reconcile_interval": 1,
        }
    )


@pytest.fixture
async def deployed(emulator: Emulator) -> Emulator:
    client = DataCrunchClient(
        emulator.base_url,
        emulator.client_id,
        emulator.client_secret,
        retry=RetryPolicy(attempts=2, initial_s=0.01),
    )
    try:
        for name in ("visual", "text"):
            for spec in load_all(ROOT / "deploy" / "datacrunch" / f"{name}.yaml"):
                await client.create_deployment(spec)
    finally:
        await client.aclose()
    return emulator


@pytest.fixture
async def make_app(dsn: str, deployed: Emulator) -> AsyncIterator[Any]:
    apps: list[ControllerApp] = []

    async def make() -> ControllerApp:
        settings = Settings(
            provider="datacrunch",
            datacrunch_base_url=deployed.base_url,  # type: ignore[call-arg]
            datacrunch_client_id=deployed.client_id,  # type: ignore[call-arg]
            datacrunch_client_secret=deployed.client_secret,  # type: ignore[call-arg]
            datacrunch_retry_attempts=2,
            datacrunch_backoff_initial_s=0.01,
        )
        app = ControllerApp(settings, fallback_pools(), dsn, http=False)
        await app.setup()
        apps.append(app)
        return app

    yield make
    for app in apps:
        await app.teardown()


def targets(emu: Emulator) -> dict[str, int]:
    deps = emu.snapshot()["deployments"]
    return {n: deps[n]["scaling"]["min_replica_count"] for n in (SPOT, ONDEMAND, A100)}


async def until(what: str, check: Any, timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def replica_ids(emu: Emulator, deployment: str) -> list[str]:
    return [
        r["id"] for r in emu.snapshot()["deployments"][deployment]["replicas"] if r["status"] == "running"
    ]


async def register(queue: Queue, emu: Emulator, deployment: str) -> list[str]:
    """Register a worker for each running replica of ``deployment`` (server id = replica id)."""
    ids = await until(f"{deployment} replicas", lambda: replica_ids(emu, deployment))
    for rid in ids:
        await queue.register_server(ServerInfo(id=rid, pool="visual", container_id=rid, status="active"))
    return list(ids)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_quota_reached_falls_back_and_replicas_move_back(make_app: Any, deployed: Emulator) -> None:
    clock = Clock()
    app = await make_app()
    app.reconciler.clock = clock
    failures_before = metric(
        "gpuscale_deployment_failures_total", pool="visual", deployment=SPOT, kind="quota_reached"
    )
    deployed.set_faults(quota=SPOT)  # spot H100s are sold out
    await app.queue.enqueue_many(
        [NewTask("visual_analysis", {"document": "d.pdf", "first_page": 1, "last_page": 8}) for _ in range(2)]
    )
    await app.tick()
    assert targets(deployed)[SPOT] == 2  # the preferred deployment is asked first
    await until(
        "quota_reached", lambda: deployed.snapshot()["deployments"][SPOT]["status"] == "quota_reached"
    )
    clock.now += 1
    await app.tick()
    assert targets(deployed) == {SPOT: 0, ONDEMAND: 2, A100: 0}
    view = app.reconciler.views["visual"]
    assert view.home == ONDEMAND
    spot_view = next(d for d in view.deployments if d["name"] == SPOT)
    assert (
        spot_view["cooling_until"] == pytest.approx(clock.now + 60)
        and spot_view["last_failure"] == "quota_reached"
    )
    assert "cooling off 60s after quota_reached" in spot_view["why"]
    events = await app.store.events("visual")
    assert any(
        f"{SPOT} failed (quota_reached)" in e["detail"] and f"{ONDEMAND} 2" in e["detail"] for e in events
    )
    assert metric(
        "gpuscale_deployment_failures_total", pool="visual", deployment=SPOT, kind="quota_reached"
    ) == (failures_before + 1)
    assert metric("gpuscale_deployment_home", pool="visual", deployment=ONDEMAND) == 1

    # A new leader takes over the cool-off with the pool state.
    other = await make_app()
    await other.reconciler.load_states()
    assert other.reconciler.placements["visual"].get(SPOT).cooling(clock.now)

    # Both fallback replicas register; one is busy.
    busy, _idle = await register(app.queue, deployed, ONDEMAND)
    (claimed,) = await app.queue.claim("visual", busy, 1)
    deployed.set_faults(quota=None)  # capacity is back
    clock.now += 61
    await app.tick()
    # Home again; the fallback's idle replica goes first, the busy one stays.
    assert app.reconciler.views["visual"].home == SPOT
    assert targets(deployed) == {SPOT: 1, ONDEMAND: 1, A100: 0}
    assert await app.queue.complete(claimed.id, busy, {"ok": True})
    clock.now += 1
    await app.tick()
    # Spot is probed with one replica; until it registers the fallback keeps its (idle) replica.
    assert targets(deployed) == {SPOT: 1, ONDEMAND: 1, A100: 0}
    await register(app.queue, deployed, SPOT)
    clock.now += 1
    await app.tick()
    assert targets(deployed) == {SPOT: 2, ONDEMAND: 0, A100: 0}


async def test_a_preempted_spot_replica_hands_its_task_back_without_an_attempt(
    make_app: Any, deployed: Emulator
) -> None:
    clock = Clock()
    app = await make_app()
    app.reconciler.clock = clock
    (task_id,) = await app.queue.enqueue_many(
        [NewTask("visual_analysis", {"document": "d.pdf", "first_page": 1, "last_page": 8})]
    )
    await app.tick()
    assert targets(deployed)[SPOT] == 1
    (rid,) = await register(app.queue, deployed, SPOT)
    (claimed,) = await app.queue.claim("visual", rid, 1)
    assert claimed.id == task_id
    clock.now += 1
    await app.tick()  # seen running and busy
    before = metric("gpuscale_replica_preemptions_total", pool="visual", deployment=SPOT)
    deployed.set_faults(preempt="next:1")
    await until("preemption", lambda: rid in deployed.snapshot()["preempted"])
    clock.now += 1
    await app.tick()
    task = await app.queue.get_task(task_id)
    assert task is not None and task["status"] == "queued" and task["attempts"] == 0
    servers = {s.id: s.status for s in await app.queue.list_servers(include_dead=True)}
    assert servers[rid] == "dead"
    assert metric("gpuscale_replica_preemptions_total", pool="visual", deployment=SPOT) == before + 1
    # One preemption is no failure; the second within the window falls back.
    assert app.reconciler.views["visual"].home == SPOT
    (rid2,) = await register(app.queue, deployed, SPOT)
    clock.now += 1
    await app.tick()
    deployed.set_faults(preempt="next:1")
    await until("second preemption", lambda: rid2 in deployed.snapshot()["preempted"])
    clock.now += 1
    await app.tick()
    assert app.reconciler.views["visual"].home == ONDEMAND
    assert targets(deployed)[ONDEMAND] == 1


async def test_cost_uses_the_api_prices_per_deployment(make_app: Any, deployed: Emulator) -> None:
    app = await make_app()
    assert await app.leader.ensure()
    await app.refresh_prices(force=True)
    assert app.price_of("visual", SPOT) == (0.87, "api")
    assert app.price_of("visual", A100) == (1.29, "api")
    app.reconciler.deployment_counts["visual"] = {SPOT: 2, A100: 1}
    app._last_cost = time.time() - 3600  # an hour since the last accounting
    spot0 = metric("gpuscale_deployment_spend_usd_total", pool="visual", deployment=SPOT)
    pool0 = metric("gpuscale_spend_usd_total", pool="visual")
    await app.account_cost()
    spent = metric("gpuscale_deployment_spend_usd_total", pool="visual", deployment=SPOT) - spot0
    assert spent == pytest.approx(2 * 0.87, rel=0.01)
    assert metric("gpuscale_spend_usd_total", pool="visual") - pool0 == pytest.approx(
        2 * 0.87 + 1.29, rel=0.01
    )
    assert (
        metric("gpuscale_deployment_price_usd_per_hour", pool="visual", deployment=A100, source="api") == 1.29
    )
    deployed.set_faults(error=1.0)  # the API cannot be read: the pools file's prices
    try:
        await app.refresh_prices(force=True)
    finally:
        deployed.clear_faults()
    assert app.price_of("visual", ONDEMAND) == (1.75, "pools_file")


def test_status_shows_where_replicas_run_and_why() -> None:
    from rich.console import Console

    from gpuscale.cli.queue import render_status

    deployments = [
        {
            "name": SPOT,
            "spot": True,
            "price_per_hour": 0.87,
            "replicas": 0,
            "registered": 0,
            "busy": 0,
            "cooling_until": time.time() + 120,
            "why": "cooling off 120s after quota_reached (failure #1)",
        },
        {
            "name": ONDEMAND,
            "spot": False,
            "price_per_hour": 1.75,
            "replicas": 2,
            "registered": 2,
            "busy": 1,
            "cooling_until": None,
            "why": f"fallback: {SPOT} cooling off",
        },
    ]
    data = {"pools": {"visual": {"queued": 3, "deployments": deployments, "home": ONDEMAND}}, "servers": []}
    console = Console(width=200, record=True)
    render_status(data, console)
    text = console.export_text()
    assert "Deployments" in text and "spot" in text and "on demand" in text
    assert "cooling 1" in text and "home" in text and "quota_reached" in text
    assert "[{" not in text  # the list is a table of its own, not a column
