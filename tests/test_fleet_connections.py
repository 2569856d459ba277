"""Connection footprint and PgBouncer (issue 14): a worker holds at most two connections whatever
its slots (one without LISTEN), the controller at most four; behind a real PgBouncer in
transaction mode, with LISTEN on a direct URL and prepared statements off, workers, migrations
and the queue work as they do directly."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from gpuscale.db import Connector
from gpuscale.db.migrate import load_migrations, migrate
from gpuscale.queue import NewTask, Queue
from gpuscale.worker.handlers.noop import noop
from gpuscale.worker.runtime import Worker
from gpuscale.worker.settings import WorkerSettings

_NOT_DONE = "SELECT count(*) FROM processing_queue WHERE id = ANY($1::bigint[]) AND status <> 'done'"


def _dbname(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


def _settings(**kw: Any) -> WorkerSettings:
    base: dict[str, Any] = {
        "heartbeat_interval_s": 0.2,
        "drain_grace_s": 5.0,
        "worker_port": 0,
        "concurrency": 8,
        "container_id": "c1",
    }
    base.update(kw)
    return WorkerSettings(**base)


async def _backends(admin: asyncpg.Connection, database: str) -> int:
    """Client sessions on ``database`` other than ``admin`` itself."""
    return int(
        await admin.fetchval(
            """SELECT count(*) FROM pg_stat_activity
                WHERE datname = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid()""",
            database,
        )
    )


async def _run_until_done(
    worker: Worker, queue: Queue, ids: list[int], admin: asyncpg.Connection, db: str
) -> int:
    """Run ``worker`` until every task in ``ids`` is done; returns the most sessions seen."""
    run = asyncio.create_task(worker.run())
    peak = 0
    try:
        for _ in range(600):
            peak = max(peak, await _backends(admin, db))
            left = await admin.fetchval(_NOT_DONE, ids)
            if left == 0:
                break
            assert not run.done(), "worker stopped"
            await asyncio.sleep(0.05)
        assert left == 0, f"{left} task(s) not done"
    finally:
        worker.request_stop()
        assert await asyncio.wait_for(run, 30) == 0
    return peak


async def test_worker_holds_two_connections_whatever_its_slots(dsn: str) -> None:
    name = _dbname(dsn)
    admin = await asyncpg.connect(dsn)
    try:
        async with Connector(dsn, max_connections=2) as db:
            queue = Queue(db)
            ids = await queue.enqueue_many([NewTask("noop", {"sleep_s": 0.3}) for _ in range(24)])
            worker = Worker("bench", dsn=dsn, settings=_settings(), handlers={"noop": noop}, http=False)
            peak = await _run_until_done(worker, queue, ids, admin, name) - 1  # less the enqueuer's
        assert 1 <= peak <= 2, peak
    finally:
        await admin.close()


async def test_a_polling_worker_holds_one_connection(dsn: str) -> None:
    name = _dbname(dsn)
    admin = await asyncpg.connect(dsn)
    try:
        async with Connector(dsn, max_connections=1) as db:
            queue = Queue(db)
            ids = await queue.enqueue_many([NewTask("noop", {"sleep_s": 0.2}) for _ in range(16)])
            settings = _settings(database_listen=False, poll_interval_s=0.1)
            worker = Worker("bench", dsn=dsn, settings=settings, handlers={"noop": noop}, http=False)
            peak = await _run_until_done(worker, queue, ids, admin, name) - 1
        assert peak == 1, peak
    finally:
        await admin.close()


async def test_worker_through_pgbouncer_is_woken_by_listen_on_the_direct_url(
    dsn: str, pooled_dsn: str
) -> None:
    admin = await asyncpg.connect(dsn)
    try:
        # A poll interval far beyond the test: only the LISTEN on the direct URL can wake it.
        settings = _settings(poll_interval_s=120.0, database_listen_url=dsn, database_statement_cache_size=0)
        worker = Worker("bench", dsn=pooled_dsn, settings=settings, handlers={"noop": noop}, http=False)
        run = asyncio.create_task(worker.run())
        try:
            for _ in range(300):
                if (
                    worker.status.ready
                    and worker._listener is not None
                    and worker._listener.listening.is_set()
                ):
                    break
                await asyncio.sleep(0.05)
            assert worker.status.ready
            async with Connector(pooled_dsn, max_connections=1, statement_cache_size=0) as db:
                queue = Queue(db)
                ids = await queue.enqueue_many([NewTask("noop", {}) for _ in range(20)])
                for _ in range(200):
                    left = await admin.fetchval(_NOT_DONE, ids)
                    if left == 0:
                        break
                    await asyncio.sleep(0.05)
                assert left == 0
        finally:
            worker.request_stop()
            assert await asyncio.wait_for(run, 30) == 0
        # Deregistered, nothing held, no advisory lock left on any server session.
        assert await admin.fetchval("SELECT count(*) FROM processing_servers") == 0
        assert await admin.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
    finally:
        await admin.close()


async def test_migrations_through_pgbouncer_run_once_and_leave_no_lock(
    empty_dsn: str, pgbouncer: Any
) -> None:
    pooled = pgbouncer.dsn(_dbname(empty_dsn))
    conns = [await asyncpg.connect(pooled, statement_cache_size=0) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        # Every migration applied exactly once over the three runs (they may share the work).
        applied = sorted(m.version for r in results for m in r)
        assert applied == [m.version for m in load_migrations()]
        assert await migrate(conns[0]) == []
    finally:
        for c in conns:
            await c.close()
    admin = await asyncpg.connect(empty_dsn)
    try:
        assert await admin.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
    finally:
        await admin.close()
