"""Leases: a heartbeat keeps alive only the tasks the worker still works on."""

from __future__ import annotations

import asyncio

import asyncpg

from gpuscale.queue import NewTask, Queue


async def test_heartbeat_only_extends_leases_of_tasks_still_held(db: asyncpg.Pool) -> None:
    """A worker that gave up on a task (its outcome could not be written, say during a database
    restart) must let that task's lease run out, so the reaper hands it to another worker."""
    q = Queue(db)
    a = await q.enqueue(NewTask("noop", {}))
    b = await q.enqueue(NewTask("noop", {}))
    assert len(await q.claim("bench", "w1", 2, lease_s=0.5)) == 2
    await q.extend_leases("w1", lease_s=3600, task_ids=[a])
    await asyncio.sleep(0.8)
    assert await q.reap_expired() == 1
    assert (await q.get_task(a))["status"] == "running"  # type: ignore[index]
    assert (await q.get_task(b))["status"] == "queued"  # type: ignore[index]
    # Without a list, every task the server holds is extended (the old behaviour, still valid).
    assert await q.extend_leases("w1", lease_s=3600) == 1


async def test_heartbeat_renews_only_leases_near_their_end(db: asyncpg.Pool) -> None:
    """Heartbeats rewrite a task row only when its lease has less than ``ending_within_s`` left:
    a fleet's heartbeats then cost a row write every few beats per task, not every beat."""
    q = Queue(db)
    fresh = await q.enqueue(NewTask("noop", {}))
    assert len(await q.claim("bench", "w1", 1, lease_s=60)) == 1
    near = await q.enqueue(NewTask("noop", {}))
    assert len(await q.claim("bench", "w1", 1, lease_s=5)) == 1
    assert await q.extend_leases("w1", lease_s=60, task_ids=[fresh, near], ending_within_s=30) == 1
    rows = await db.fetch(
        "SELECT id, extract(epoch FROM lease_expires_at - now()) AS left_s FROM processing_queue"
        " WHERE id = ANY($1::bigint[])",
        [fresh, near],
    )
    left = {r["id"]: r["left_s"] for r in rows}
    assert left[near] > 50  # renewed to a full lease
    assert left[fresh] > 50  # untouched: it still had most of its lease
