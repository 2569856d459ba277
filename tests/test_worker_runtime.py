"""The worker runtime in-process, on a real PostgreSQL: claims, outcomes, time limits, drain.

Handlers are small async functions injected for each test (the runtime takes a handler map), so
every failure mode — raising, hanging, returning garbage — is a real handler the real runtime
runs; the database side is the real queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from typing import Any

import asyncpg
import httpx
import pytest

from gpuscale.dev.standin import OllamaStandin
from gpuscale.queue import NewTask, Queue, tasktypes
from gpuscale.worker.errors import InvalidAnswer, OllamaError, TaskError
from gpuscale.worker.handlers import TaskContext
from gpuscale.worker.handlers.noop import noop
from gpuscale.worker.ollama_client import ModelNotFound
from gpuscale.worker.runtime import Worker
from gpuscale.worker.settings import WorkerSettings


def _settings(**kw: Any) -> WorkerSettings:
    base: dict[str, Any] = {
        "heartbeat_interval_s": 0.2,
        "poll_interval_s": 0.2,
        "drain_grace_s": 5.0,
        "lease_seconds": 30.0,
        "worker_host": "127.0.0.1",
        "worker_port": 0,
        "concurrency": 2,
        "container_id": "test-container",
    }
    base.update(kw)
    return WorkerSettings(**base)


async def _wait_for(predicate: Any, timeout_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        if await predicate():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def _statuses(db: asyncpg.Pool, ids: list[int]) -> dict[int, str]:
    rows = await db.fetch("SELECT id, status::text FROM processing_queue WHERE id = ANY($1::bigint[])", ids)
    return {r["id"]: r["status"] for r in rows}


async def _all_final(db: asyncpg.Pool, ids: list[int]) -> bool:
    return all(s in ("done", "failed", "dead") for s in (await _statuses(db, ids)).values())


class Running:
    """Run a Worker in the background for the duration of a test."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.task: asyncio.Task[int] | None = None

    async def __aenter__(self) -> Worker:
        self.task = asyncio.create_task(self.worker.run())
        await _wait_for(lambda: _true(self.worker.status.ready or self.task is None or self.task.done()))
        assert self.task is not None and not self.task.done(), "worker stopped during start"
        return self.worker

    async def stop(self) -> int:
        assert self.task is not None
        self.worker.request_stop()
        return await asyncio.wait_for(self.task, 30)

    async def __aexit__(self, *exc: object) -> None:
        if self.task is not None and not self.task.done():
            await self.stop()


async def _true(value: bool) -> bool:
    return value


async def test_noop_tasks_are_claimed_and_done(db: asyncpg.Pool, dsn: str) -> None:
    queue = Queue(db)
    ids = await queue.enqueue_many([NewTask("noop", {"sleep_s": 0.05}) for _ in range(6)])
    worker = Worker("bench", dsn=dsn, settings=_settings())
    async with Running(worker) as w:
        servers = await queue.list_servers("bench")
        assert [s.id for s in servers] == [w.server_id]
        assert servers[0].status == "active"
        assert servers[0].container_id == "test-container"
        assert servers[0].capabilities["task_types"] == ["noop"]
        assert servers[0].capabilities["http_port"] == w.http_port
        await _wait_for(lambda: _all_final(db, ids))
        rows = await db.fetch("SELECT status::text, result, progress FROM processing_queue ORDER BY id")
        assert {r["status"] for r in rows} == {"done"}
        assert all(r["result"]["server_id"] == w.server_id for r in rows)
        assert all(r["progress"] == 100 for r in rows)
        # Metrics are served over HTTP on the port it chose.
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{w.http_port}/metrics")).text
        assert 'gpuscale_worker_tasks_total{outcome="done",pool="bench",task_type="noop"}' in text
        assert "gpuscale_worker_queue_wait_seconds_count" in text
    assert await queue.list_servers("bench") == []  # deregistered on the way out


async def test_notify_wakes_the_worker_before_the_poll_interval(db: asyncpg.Pool, dsn: str) -> None:
    queue = Queue(db)
    # A long poll interval: only LISTEN/NOTIFY can get the task picked up within the wait below.
    worker = Worker("bench", dsn=dsn, settings=_settings(poll_interval_s=60))
    async with Running(worker):
        await asyncio.sleep(0.3)  # the worker is now waiting on its (long) poll
        [tid] = await queue.enqueue_many([NewTask("noop", {})])
        await _wait_for(lambda: _all_final(db, [tid]), timeout_s=10)


async def test_failures_fail_only_their_task(
    db: asyncpg.Pool, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Raising, hanging past the time limit and returning garbage each fail one task; others pass."""
    monkeypatch.setitem(
        tasktypes._REGISTRY, "noop", dataclasses.replace(tasktypes.get("noop"), timeout_s=0.5)
    )

    async def handler(ctx: TaskContext) -> dict[str, Any]:
        mode = ctx.payload["sleep_s"]
        if mode == 1:
            raise RuntimeError("boom")
        if mode == 2:
            await asyncio.sleep(3600)  # hangs: the 0.5 s limit ends it
        if mode == 3:
            return "not a dict"  # type: ignore[return-value]
        if mode == 4:
            return {"slept_s": float("nan"), "server_id": "x"}  # not valid JSON
        if mode == 5:
            return {"unexpected": True}  # a dict, but not a NoopResult
        if mode == 6:
            raise TaskError("permanent problem", retryable=False)
        return await noop(ctx)

    queue = Queue(db)
    ids = await queue.enqueue_many(
        [NewTask("noop", {"sleep_s": m}, max_attempts=1) for m in (1, 2, 3, 4, 5, 6, 0)]
    )
    worker = Worker("bench", dsn=dsn, settings=_settings(concurrency=3), handlers={"noop": handler})
    async with Running(worker):
        await _wait_for(lambda: _all_final(db, ids))
    rows = {r["id"]: r for r in await db.fetch("SELECT id, status::text, error FROM processing_queue")}
    crash, hang, notdict, nan, wrong, perm, ok = (rows[i] for i in ids)
    assert crash["status"] == "dead" and "handler crashed: RuntimeError: boom" in crash["error"]
    assert hang["status"] == "dead" and "timed out after 0.5s" in hang["error"]
    assert notdict["status"] == "failed" and "not a JSON object" in notdict["error"]
    assert nan["status"] == "failed" and "not valid JSON" in nan["error"]
    assert wrong["status"] == "failed" and "does not match NoopResult" in wrong["error"]
    assert perm["status"] == "failed" and perm["error"] == "permanent problem"
    assert ok["status"] == "done" and ok["error"] is None


async def test_retryable_failure_is_retried(db: asyncpg.Pool, dsn: str) -> None:
    queue = Queue(db)
    [tid] = await queue.enqueue_many([NewTask("noop", {"fail": True}, max_attempts=2)])
    worker = Worker("bench", dsn=dsn, settings=_settings(retry_base_s=0.05, retry_max_s=0.1))
    async with Running(worker):
        await _wait_for(lambda: _all_final(db, [tid]), timeout_s=30)
    row = await db.fetchrow("SELECT status::text, attempts, error FROM processing_queue WHERE id = $1", tid)
    assert row["status"] == "dead"
    assert row["attempts"] == 2
    assert "asked to fail" in row["error"]


async def test_drain_finishes_short_tasks_and_releases_long_ones(db: asyncpg.Pool, dsn: str) -> None:
    queue = Queue(db)
    short, long_ = await queue.enqueue_many(
        [NewTask("noop", {"sleep_s": 0.5}), NewTask("noop", {"sleep_s": 600})]
    )
    worker = Worker("bench", dsn=dsn, settings=_settings(drain_grace_s=1.5))
    runner = Running(worker)
    await runner.__aenter__()

    async def both_running() -> bool:
        return set((await _statuses(db, [short, long_])).values()) == {"running"}

    await _wait_for(both_running)
    code = await runner.stop()
    assert code == 0
    rows = {r["id"]: r for r in await db.fetch("SELECT id, status::text, attempts FROM processing_queue")}
    assert rows[short]["status"] == "done"
    # Handed back without spending the attempt, ready for another worker.
    assert rows[long_]["status"] == "queued" and rows[long_]["attempts"] == 0
    assert await queue.list_servers(include_dead=True) == []


async def test_heartbeat_extends_leases(db: asyncpg.Pool, dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    queue = Queue(db)
    [tid] = await queue.enqueue_many([NewTask("noop", {"sleep_s": 600})])
    worker = Worker("bench", dsn=dsn, settings=_settings(lease_seconds=2.0, heartbeat_interval_s=0.3))
    async with Running(worker) as w:
        beats: list[str] = []
        real_beat, real_renew = w.queue.server_heartbeat, w.queue.renew_leases

        async def beat(*a: Any, **kw: Any) -> bool:
            beats.append("beat")
            return await real_beat(*a, **kw)

        async def renew(*a: Any, **kw: Any) -> set[int]:
            beats.append("renew")
            return await real_renew(*a, **kw)

        monkeypatch.setattr(w.queue, "server_heartbeat", beat)
        monkeypatch.setattr(w.queue, "renew_leases", renew)
        await _wait_for(lambda: _true_status(db, tid, "running"))
        await asyncio.sleep(3.0)  # longer than the lease: only heartbeats keep it
        assert await queue.reap_expired() == 0
        assert (await _statuses(db, [tid]))[tid] == "running"
    # A lease is renewed only once it is due (half of it left), not on every beat.
    assert 0 < beats.count("renew") < beats.count("beat")


async def _true_status(db: asyncpg.Pool, tid: int, status: str) -> bool:
    return (await _statuses(db, [tid]))[tid] == status


async def test_declared_dead_worker_drops_its_tasks_and_registers_again(db: asyncpg.Pool, dsn: str) -> None:
    queue = Queue(db)
    [tid] = await queue.enqueue_many([NewTask("noop", {"sleep_s": 600})])
    worker = Worker("bench", dsn=dsn, settings=_settings(heartbeat_interval_s=0.2))
    async with Running(worker) as w:
        await _wait_for(lambda: _true_status(db, tid, "running"))
        await db.execute("UPDATE processing_servers SET last_heartbeat = now() - interval '1 hour'")
        assert await queue.reap_dead_servers(60) == [w.server_id]
        # The task went back to the queue; the worker notices at its next heartbeat, stops its
        # copy, registers again and (being free) claims the task anew.
        await _wait_for(lambda: _servers_active(queue))

        async def reclaimed() -> bool:
            row = await db.fetchrow("SELECT status::text, attempts FROM processing_queue WHERE id = $1", tid)
            return row["status"] == "running" and row["attempts"] == 2

        await _wait_for(reclaimed)


async def _servers_active(queue: Queue) -> bool:
    return [s.status for s in await queue.list_servers()] == ["active"]


async def test_declared_dead_worker_hands_back_tasks_without_spending_an_attempt(
    db: asyncpg.Pool, dsn: str
) -> None:
    """Declared dead while its tasks still say running under its lease: the worker releases them,
    so a task on its last attempt is queued again (not reaped to dead) and finished later."""
    calls = 0

    async def handler(ctx: TaskContext) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(600)  # the first run hangs until the worker drops it
        return await noop(ctx)

    queue = Queue(db)
    [tid] = await queue.enqueue_many([NewTask("noop", {}, max_attempts=1)])
    worker = Worker(
        "bench",
        dsn=dsn,
        settings=_settings(lease_seconds=1.0, heartbeat_interval_s=0.2),
        handlers={"noop": handler},
    )
    async with Running(worker):
        await _wait_for(lambda: _true_status(db, tid, "running"))
        # Declared dead without the controller requeueing its tasks: the row still says running.
        await db.execute("UPDATE processing_servers SET status = 'dead'")

        async def finished() -> bool:
            await queue.reap_expired()  # what the controller does meanwhile: a held lease runs out
            return await _all_final(db, [tid])

        await _wait_for(finished)
    row = await db.fetchrow("SELECT status::text, attempts, error FROM processing_queue WHERE id = $1", tid)
    assert (row["status"], row["attempts"], row["error"]) == ("done", 1, None)
    assert calls == 2


async def test_claim_loop_survives_an_unexpected_error(
    db: asyncpg.Pool, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim that raises something unforeseen (asyncpg's pool has raised InternalClientError
    from its own state machine during a database restart) does not end the worker: it claims
    again and does the work."""
    worker = Worker("bench", dsn=dsn, settings=_settings())
    async with Running(worker) as w:
        real = w.queue.claim
        raised: list[str] = []

        async def flaky(*args: Any, **kw: Any) -> Any:
            if not raised:
                raised.append("once")
                raise RuntimeError("cannot switch to state 15; another operation (2) is in progress")
            return await real(*args, **kw)

        monkeypatch.setattr(w.queue, "claim", flaky)
        [tid] = await w.queue.enqueue_many([NewTask("noop", {})])
        await _wait_for(lambda: _true_status(db, tid, "done"))
        assert raised == ["once"]


async def test_shutdown_never_leaves_a_handler_on_a_torn_down_queue(
    db: asyncpg.Pool, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However the worker comes to shut down (here: the drain itself fails), a handler still
    running is cancelled and its task handed back before the queue goes away: its progress
    reports never meet a torn-down queue ("worker not started")."""
    started = asyncio.Event()
    problems: list[BaseException] = []

    async def handler(ctx: TaskContext) -> dict[str, Any]:
        started.set()
        try:
            while True:
                await ctx.progress(50.0, "working")
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # e.g. AssertionError("worker not started")
            problems.append(exc)
            raise

    [tid] = await Queue(db).enqueue_many([NewTask("noop", {})])
    worker = Worker("bench", dsn=dsn, settings=_settings(), handlers={"noop": handler})

    async def broken_drain() -> None:
        raise RuntimeError("an unforeseen failure on the way out")

    monkeypatch.setattr(worker, "_drain", broken_drain)
    runner = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 15)
    worker.request_stop()
    with pytest.raises(RuntimeError, match="unforeseen"):
        await asyncio.wait_for(runner, 30)
    assert problems == []
    row = await db.fetchrow("SELECT status::text, attempts FROM processing_queue WHERE id = $1", tid)
    assert (row["status"], row["attempts"]) == ("queued", 0)  # handed back, no attempt spent


async def test_heartbeat_survives_an_unexpected_error(
    db: asyncpg.Pool, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = Worker("bench", dsn=dsn, settings=_settings(heartbeat_interval_s=0.1))
    async with Running(worker) as w:
        real = w.queue.server_heartbeat
        beats: list[str] = []

        async def flaky(server_id: str, **kw: Any) -> bool:
            if not beats:
                beats.append("raised")
                raise RuntimeError("unexpected")
            beats.append("ok")
            return await real(server_id, **kw)

        monkeypatch.setattr(w.queue, "server_heartbeat", flaky)
        await _wait_for(lambda: _true(beats.count("ok") >= 3))
        assert beats[0] == "raised"


async def test_listen_reconnects_while_heartbeats_go_on(
    db: asyncpg.Pool, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LISTEN connection drops, and the first attempt to listen again fails on a connection
    closed between connect and LISTEN (InterfaceError): the listener tries again and listens,
    and heartbeats go on meanwhile."""
    from gpuscale.db.connector import Listener

    real_subscribe = Listener._subscribe
    attempts: list[str] = []

    async def flaky_subscribe(self: Listener) -> Any:
        if not attempts:
            attempts.append("failed")
            conn = await real_subscribe(self)
            await conn.close()
            await conn.execute("LISTEN gpuscale_work")  # raises InterfaceError: connection is closed
        attempts.append("ok")
        return await real_subscribe(self)

    worker = Worker("bench", dsn=dsn, settings=_settings(heartbeat_interval_s=0.1, poll_interval_s=60))
    async with Running(worker) as w:
        real_beat = w.queue.server_heartbeat
        beats = 0

        async def counting(server_id: str, **kw: Any) -> bool:
            nonlocal beats
            beats += 1
            return await real_beat(server_id, **kw)

        monkeypatch.setattr(w.queue, "server_heartbeat", counting)
        listener = w._listener
        assert listener is not None
        await asyncio.wait_for(listener.listening.wait(), 10)
        monkeypatch.setattr(Listener, "_subscribe", flaky_subscribe)
        listener.drop()  # as an outage would

        async def relistening() -> bool:
            return attempts == ["failed", "ok"] and listener.connects == 2 and listener.listening.is_set()

        await _wait_for(relistening)
        seen = beats
        await _wait_for(lambda: _true(beats >= seen + 3))
        # And it hears notifications again: new work wakes the worker before its poll interval.
        [tid] = await w.queue.enqueue_many([NewTask("noop", {})])
        await _wait_for(lambda: _true_status(db, tid, "done"))


async def test_missing_schema_exits_1(empty_dsn: str) -> None:
    worker = Worker("bench", dsn=empty_dsn, settings=_settings())
    assert await worker.run() == 1


async def test_busy_port_and_unreachable_database_exit_1(dsn: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        worker = Worker("bench", dsn=dsn, settings=_settings(worker_port=busy.getsockname()[1]))
        assert await worker.run() == 1
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        worker = Worker("bench", dsn=f"postgresql://x@127.0.0.1:{closed}/x", settings=_settings())
        assert await worker.run() == 1


async def test_text_worker_waits_for_ollama_and_pulls_a_missing_model(db: asyncpg.Pool, dsn: str) -> None:
    """Not ready while Ollama is down; once it is up, the missing model is pulled and warmed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = _settings(ollama_host=f"http://127.0.0.1:{port}", text_model="phi4:latest", ollama_timeout_s=5)
    worker = Worker("text", dsn=dsn, settings=settings)
    task = asyncio.create_task(worker.run())
    try:
        await _wait_for(lambda: _true(worker.http_port is not None))
        url = f"http://127.0.0.1:{worker.http_port}/api/health"
        async with httpx.AsyncClient() as client:

            async def health() -> dict[str, Any]:
                r = await client.get(url)
                return {"code": r.status_code, **r.json()}

            await _wait_for(lambda: _has(health, "status", "ollama_unreachable"))
            [server] = await Queue(db).list_servers("text")
            assert server.status == "starting" and server.models == ["phi4:latest"]
            with OllamaStandin(port=port, models=[]) as standin:
                await _wait_for(lambda: _has(health, "status", "ready"))
                body = await health()
                assert body["code"] == 200 and body["model_loaded"] is True
                assert "phi4:latest" in standin.installed and standin.calls["/api/pull"] == 1
                [server] = await Queue(db).list_servers("text")
                assert server.status == "active"
                worker.request_stop()
                assert await asyncio.wait_for(task, 30) == 0
    finally:
        if not task.done():
            worker.request_stop()
            await asyncio.wait_for(task, 30)


async def _has(fetch: Any, key: str, value: Any) -> bool:
    try:
        return (await fetch()).get(key) == value
    except httpx.HTTPError:
        return False


class _NoModelOllama:
    """An Ollama whose model is missing and whose pulls always fail (no registry reachable)."""

    def __init__(self) -> None:
        self.warms = 0
        self.pulls = 0

    async def warm(self, model: str) -> None:
        self.warms += 1
        if self.warms > 200:
            # Without back-off the loop would spin here forever; stop it so the test fails.
            raise AssertionError("the warm-up loop spins without waiting")
        await asyncio.sleep(0)
        raise ModelNotFound(f"warm {model}: model not found on Ollama")

    async def pull(self, model: str) -> str:
        self.pulls += 1
        await asyncio.sleep(0)
        raise OllamaError(f"pull {model}: Ollama answered 500: registry unreachable")

    async def close(self) -> None:
        return None


async def test_missing_model_whose_pull_fails_gives_up_at_the_deadline(dsn: str) -> None:
    fake = _NoModelOllama()
    settings = _settings(text_model="phi4:latest", warm_timeout_s=0.6)
    worker = Worker("text", dsn=dsn, settings=settings, ollama=fake)  # type: ignore[arg-type]
    assert await asyncio.wait_for(worker.run(), 30) == 1
    # Back-off (0.25 s, 0.5 s, ...) bounds the attempts: a handful, not thousands.
    assert 1 <= fake.warms <= 5 and 1 <= fake.pulls <= 5
    assert "pulling it failed" in worker.status.detail and "registry unreachable" in worker.status.detail


async def test_invalid_model_answer_keeps_the_raw_text_in_the_error(db: asyncpg.Pool, dsn: str) -> None:
    raw = '{"slept_s": "a lot", ' + "x" * 20_000

    async def handler(ctx: TaskContext) -> dict[str, Any]:
        raise InvalidAnswer("model answer is not JSON (Expecting value at char 0)", raw=raw)

    queue = Queue(db)
    [tid] = await queue.enqueue_many([NewTask("noop", {}, max_attempts=1)])
    worker = Worker("bench", dsn=dsn, settings=_settings(), handlers={"noop": handler})
    async with Running(worker):
        await _wait_for(lambda: _all_final(db, [tid]))
    row = await db.fetchrow("SELECT status::text, error FROM processing_queue WHERE id = $1", tid)
    assert row["status"] == "dead"  # retryable: the attempts ran out
    message, _, kept = row["error"].partition("\nraw answer: ")
    assert message == "model answer is not JSON (Expecting value at char 0)"
    assert kept == raw[:12_000]
