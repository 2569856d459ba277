"""The PgBouncer harness: a real pgbouncer in transaction mode in front of the test server, and the
queue working through it with prepared statements off (what a transaction pooler requires)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import asyncpg
import pytest

from gpuscale.db import Connector
from gpuscale.db.pgbouncer import PgBouncer
from gpuscale.queue import NewTask, Queue


async def test_transaction_mode_shares_server_connections(pooled_dsn: str) -> None:
    # In session mode every client keeps its own server connection; in transaction mode clients
    # that never overlap run on the same one.
    clients = [await asyncpg.connect(pooled_dsn, statement_cache_size=0) for _ in range(3)]
    try:
        pids = set()
        for c in clients:
            async with c.transaction():
                pids.add(await c.fetchval("SELECT pg_backend_pid()"))
        assert len(pids) == 1
    finally:
        for c in clients:
            await c.close()


async def test_queue_round_trip_through_the_pooler(pooled_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    describes: list[str] = []
    real = asyncpg.Connection._get_statement

    async def counted(self: asyncpg.Connection, query: str, *a: Any, **kw: Any) -> Any:
        describes.append(query)
        return await real(self, query, *a, **kw)

    # Each Parse/Describe round trip goes through here (asyncpg's own calls included).
    monkeypatch.setattr(asyncpg.Connection, "_get_statement", counted)
    db = await Connector(pooled_dsn, min_connections=2, max_connections=2, statement_cache_size=0).open()
    try:
        q = Queue(db)
        ids = await q.enqueue_many([NewTask("noop", {}, priority="critical") for _ in range(5)])
        got = await q.claim("bench", "s1", 10)
        assert sorted(t.id for t in got) == sorted(ids)
        assert sorted(await q.complete_many("s1", [(t.id, {}) for t in got])) == sorted(ids)
        assert (await q.stats())["bench"].done == 5
        # Later executions of a statement are one round trip: described once per connection
        # (at most two connections here), then only Parse/Bind/Execute, wherever they land.
        described = len(describes)
        await asyncio.gather(*(q.claim("bench", "s1", 1) for _ in range(10)))
        assert len(describes) - described <= 2
    finally:
        await db.close()


def test_stop_frees_the_port(pg_server: str) -> None:
    bouncer = PgBouncer(pg_server, pool_size=1).start()
    port = bouncer.port
    assert bouncer.running
    bouncer.stop()
    assert not bouncer.running

    with socket.socket() as s:  # nothing listens there any more
        assert s.connect_ex(("127.0.0.1", port or 0)) != 0
