"""Retention deletes old ``done`` tasks only; dead letters stay for ops to look into."""

from __future__ import annotations

import asyncpg

from gpuscale.queue import NewTask, Queue


async def test_retention_keeps_dead_and_failed_tasks(db: asyncpg.Pool) -> None:
    q = Queue(db)
    done = await q.enqueue(NewTask("noop", {}))
    dead = await q.enqueue(NewTask("noop", {}, max_attempts=1))
    failed = await q.enqueue(NewTask("noop", {}))
    claimed = {t.id for t in await q.claim("bench", "w", 3)}
    assert claimed == {done, dead, failed}
    assert await q.complete(done, "w", {"ok": True})
    assert await q.fail(dead, "w", "boom", retryable=True) == "dead"
    assert await q.fail(failed, "w", "bad input", retryable=False) == "failed"
    assert await q.purge_done(older_than_s=0) == 1
    assert await q.get_task(done) is None
    assert (await q.get_task(dead))["status"] == "dead"  # type: ignore[index]
    assert (await q.get_task(failed))["status"] == "failed"  # type: ignore[index]
