"""The server registry: registration, heartbeats, status, and reaping servers that went silent."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from gpuscale.queue import NewTask, Queue, QueueError, ServerInfo


def info(server_id: str, pool: str = "bench", **kw: object) -> ServerInfo:
    return ServerInfo(id=server_id, pool=pool, **kw)  # type: ignore[arg-type]


async def test_register_heartbeat_list(db: asyncpg.Pool) -> None:
    q = Queue(db)
    await q.register_server(
        info(
            "v1",
            "visual",
            container_id="c-1",
            capabilities={"gpu": "A100"},
            max_concurrent_tasks=2,
            models=["m"],
        )
    )
    await q.register_server(info("t1", "text", status="active", version="0.1"))
    (v1,) = await q.list_servers("visual")
    assert v1.status == "starting" and v1.capabilities == {"gpu": "A100"} and v1.models == ["m"]
    assert v1.max_concurrent_tasks == 2 and v1.container_id == "c-1" and v1.last_heartbeat is not None
    row = await db.fetchrow("SELECT server_type FROM processing_servers WHERE id = 'v1'")
    assert row is not None and row["server_type"] == "visual_container"  # the seeds' column

    assert await q.server_heartbeat("v1", current_load=1, status="active")
    assert not await q.server_heartbeat("nobody", current_load=0)
    (v1,) = await q.list_servers("visual")
    assert v1.status == "active" and v1.current_load == 1
    assert {s.id for s in await q.list_servers()} == {"v1", "t1"}

    # re-registering refreshes the row rather than duplicating it
    await q.register_server(info("v1", "visual", status="active", models=["m", "n"]))
    (v1,) = await q.list_servers("visual")
    assert v1.models == ["m", "n"]

    await q.set_server_status("v1", "draining")
    assert (await q.list_servers("visual"))[0].status == "draining"
    with pytest.raises(QueueError):
        await q.set_server_status("v1", "sleeping")
    with pytest.raises(QueueError):
        await q.register_server(info("x", status="dead"))


async def test_deregister_hands_back_held_tasks(db: asyncpg.Pool) -> None:
    q = Queue(db)
    await q.register_server(info("w"))
    tid = await q.enqueue(NewTask("noop", {}, max_attempts=1))
    await q.claim("bench", "w", 1)
    await q.deregister_server("w")
    assert await q.list_servers(include_dead=True) == []
    row = await q.get_task(tid)
    assert row is not None and row["status"] == "queued" and row["attempts"] == 0


async def test_silent_server_is_reaped_and_its_tasks_requeued(db: asyncpg.Pool) -> None:
    q = Queue(db)
    await q.register_server(info("alive", status="active"))
    await q.register_server(info("silent", status="active"))
    a, b = await q.enqueue_many([NewTask("noop", {}), NewTask("noop", {}, max_attempts=1)])
    dependent = await q.enqueue(NewTask("noop", {}, depends_on=[b]))
    claimed = await q.claim("bench", "silent", 2, lease_s=3600)
    assert {c.id for c in claimed} == {a, b}
    await asyncio.sleep(0.3)
    assert await q.server_heartbeat("alive", current_load=0)
    assert await q.reap_dead_servers(0.2) == ["silent"]
    assert await q.reap_dead_servers(0.2) == []
    assert [s.id for s in await q.list_servers()] == ["alive"]
    (dead_server,) = [s for s in await q.list_servers(include_dead=True) if s.id == "silent"]
    assert dead_server.status == "dead"
    # a dead server's heartbeat is refused: it must register again
    assert not await q.server_heartbeat("silent", current_load=0)

    ra, rb, rd = await q.get_task(a), await q.get_task(b), await q.get_task(dependent)
    assert ra is not None and rb is not None and rd is not None
    assert ra["status"] == "queued" and "server silent stopped heartbeating" in ra["error"]
    assert rb["status"] == "dead"  # its only attempt was spent on the server that died
    assert rd["status"] == "failed" and f"dependency {b}" in rd["error"]
    (again,) = await q.claim("bench", "alive", 5)
    assert again.id == a and again.attempts == 2

    assert await q.purge_dead_servers(older_than_s=3600) == 0
    assert await q.purge_dead_servers(older_than_s=0) == 1
    assert [s.id for s in await q.list_servers(include_dead=True)] == ["alive"]
