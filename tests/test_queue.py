"""The task queue against a real PostgreSQL: claims, leases, dependencies, retries, bad input."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from gpuscale.db import Connector, Listener
from gpuscale.queue import (
    NOTIFY_CHANNEL,
    InvalidTask,
    NewTask,
    Priority,
    Queue,
    QueueError,
    TaskStatus,
)

DOC = {"document": "/decks/a.pdf"}


def noop(**kw: object) -> NewTask:
    return NewTask("noop", {}, **kw)  # type: ignore[arg-type]


async def count_rows(db: asyncpg.Pool) -> tuple[int, int]:
    tasks = await db.fetchval("SELECT count(*) FROM processing_queue")
    deps = await db.fetchval("SELECT count(*) FROM processing_task_deps")
    return tasks, deps


@contextlib.asynccontextmanager
async def _listening(dsn: str, callback: Callable[[str], None]) -> AsyncIterator[Listener]:
    """LISTEN gpuscale_work through the seam's listener, subscribed when the block starts."""
    listener = Connector(dsn).listener(NOTIFY_CHANNEL, callback)
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.listening.wait(), 10)
        yield listener
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_enqueue_claim_complete_roundtrip(db: asyncpg.Pool) -> None:
    q = Queue(db)
    tid = await q.enqueue(NewTask("startup_name_extraction", DOC, document_id="deck-1"))
    task = await q.get_task(tid)
    assert task is not None
    assert task["status"] == "queued" and task["pool"] == "text" and task["document_id"] == "deck-1"
    assert task["payload"] == DOC and task["attempts"] == 0 and task["max_attempts"] == 3

    claimed = await q.claim("text", "srv-1", 5)
    assert [c.id for c in claimed] == [tid]
    c = claimed[0]
    assert (
        c.attempts == 1 and c.payload == DOC and c.priority is Priority.normal and c.document_id == "deck-1"
    )
    assert c.queue_wait_s is not None and 0 <= c.queue_wait_s < 60
    assert await q.claim("text", "srv-2", 5) == []

    assert await q.progress(tid, "srv-1", 40, "page 2/5")
    assert not await q.progress(tid, "srv-2", 50)
    task = await q.get_task(tid)
    assert task is not None and task["progress"] == 40 and task["progress_message"] == "page 2/5"

    assert not await q.complete(tid, "srv-2", {"x": 1})  # not the holder
    assert await q.complete(tid, "srv-1", {"name": "Acme"})
    assert not await q.complete(tid, "srv-1", {"name": "again"})  # never twice
    task = await q.get_task(tid)
    assert task is not None
    assert task["status"] == "done" and task["result"] == {"name": "Acme"} and task["progress"] == 100
    assert task["started_at"] is not None and task["finished_at"] is not None


async def test_claim_order_priority_then_age(db: asyncpg.Pool) -> None:
    q = Queue(db)
    ids = await q.enqueue_many(
        [
            noop(priority="normal"),
            noop(priority="high"),
            noop(priority="critical"),
            noop(priority="normal"),
            noop(priority="critical"),
        ]
    )
    got = []
    for _ in range(5):
        (c,) = await q.claim("bench", "s", 1)
        got.append(c.id)
    assert got == [ids[2], ids[4], ids[1], ids[0], ids[3]]


async def test_bad_input_refused_and_nothing_written(db: asyncpg.Pool) -> None:
    q = Queue(db, max_payload_bytes=1024)
    good = NewTask("startup_name_extraction", DOC)
    bad_cases = [
        (NewTask("no_such_type", {}), "unknown task type"),
        (NewTask("startup_name_extraction", {}), "document"),
        (NewTask("startup_name_extraction", {"document": "x", "extra": 1}), "extra"),
        (NewTask("visual_analysis", {"document": "x", "first_page": 3, "last_page": 1}), "last_page"),
        (NewTask("startup_name_extraction", {"document": "x" * 2000}), "over the limit"),
        (NewTask("startup_name_extraction", DOC, priority="urgent"), "priority"),
        (NewTask("startup_name_extraction", DOC, max_attempts=0), "max_attempts"),
        (NewTask("startup_name_extraction", DOC, depends_on=[999_999]), "not found"),
    ]
    for bad, words in bad_cases:
        with pytest.raises(InvalidTask, match=words):
            await q.enqueue_many([good, bad])  # the good one is not written either
    assert await count_rows(db) == (0, 0)
    assert await q.stats() == {}


async def test_cannot_depend_on_failed_task(db: asyncpg.Pool) -> None:
    q = Queue(db)
    dep = await q.enqueue(noop())
    await q.claim("bench", "s", 1)
    assert await q.fail(dep, "s", "boom", retryable=False) is TaskStatus.failed
    with pytest.raises(InvalidTask, match="never be done"):
        await q.enqueue(noop(depends_on=[dep]))
    assert (await count_rows(db))[0] == 1


async def test_concurrent_claimers_never_share_a_task(db: asyncpg.Pool) -> None:
    q = Queue(db)
    n_tasks = 3000
    ids = await q.enqueue_many([noop() for _ in range(n_tasks)])
    seen: list[int] = []

    async def consumer(k: int) -> None:
        while True:
            got = await q.claim("bench", f"c{k}", 7)
            if not got:
                return
            seen.extend(t.id for t in got)
            done = await q.complete_many(f"c{k}", [(t.id, {}) for t in got])
            assert sorted(done) == sorted(t.id for t in got)

    await asyncio.gather(*(consumer(k) for k in range(8)))
    dupes = [i for i, n in collections.Counter(seen).items() if n > 1]
    assert dupes == []
    assert sorted(seen) == sorted(ids)
    stats = (await q.stats())["bench"]
    assert stats.done == n_tasks and stats.queued_total == 0 and stats.running == 0


async def test_dependencies_unblock_exactly_once(db: asyncpg.Pool, dsn: str) -> None:
    q = Queue(db)
    parents = await q.enqueue_many([noop() for _ in range(20)])
    child = await q.enqueue(noop(depends_on=parents))
    grandchild = await q.enqueue(noop(depends_on=[child, parents[0]]))
    assert (await q.get_task(child))["status"] == "blocked"  # type: ignore[index]
    stats = (await q.stats())["bench"]
    assert stats.blocked == 2 and stats.blocked_on_running == 1

    notified: list[str] = []
    arrived = asyncio.Event()

    def on_notify(pool: str) -> None:
        notified.append(pool)
        arrived.set()

    async with _listening(dsn, on_notify):
        claimed = await q.claim("bench", "s", 100)
        assert sorted(c.id for c in claimed) == parents
        # complete all parents concurrently, one per transaction, from several connections
        await asyncio.gather(*(q.complete(p, "s", {"p": p}) for p in parents))
        await asyncio.wait_for(arrived.wait(), 10)  # the unblocked child's notification
    child_row = await q.get_task(child)
    assert child_row is not None and child_row["status"] == "queued" and child_row["pending_deps"] == 0
    assert notified.count("bench") >= 1
    c2 = await q.claim("bench", "s", 100)
    assert [c.id for c in c2] == [child]  # exactly one copy, grandchild still blocked
    assert (await q.get_task(grandchild))["status"] == "blocked"  # type: ignore[index]
    deps = await q.dependency_results(child)
    assert [d["id"] for d in deps] == parents and deps[3]["result"] == {"p": parents[3]}
    assert await q.complete(child, "s", {})
    (g,) = await q.claim("bench", "s", 100)
    assert g.id == grandchild and g.depends_on == sorted([child, parents[0]])


async def test_only_a_watched_task_notifies_its_finish(db: asyncpg.Pool, dsn: str) -> None:
    """Every NOTIFY serialises its commit with all others: a finish notifies only when watched."""
    q = Queue(db)
    quiet, watched = await q.enqueue_many([NewTask("noop", {}), NewTask("noop", {})])
    row = await q.watch_task(watched)
    assert row is not None and row["status"] == "queued"
    got: list[str] = []
    arrived = asyncio.Event()
    listener = Connector(dsn).listener("gpuscale_finished", lambda p: (got.append(p), arrived.set()))
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.listening.wait(), 10)
        assert sorted(t.id for t in await q.claim("bench", "s", 2)) == [quiet, watched]
        assert await q.complete(quiet, "s", {}) and await q.complete(watched, "s", {})
        await asyncio.wait_for(arrived.wait(), 10)  # notifications arrive in commit order
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert got == [str(watched)]
    done = await q.watch_task(watched)  # finished: nothing to watch, the row as it is
    assert done is not None and done["status"] == "done"


async def test_failed_dependency_fails_dependents_transitively(db: asyncpg.Pool) -> None:
    q = Queue(db)
    a = await q.enqueue(NewTask("visual_analysis", {"document": "/d.pdf", "first_page": 1, "last_page": 8}))
    b = await q.enqueue(NewTask("healthcare_classification", {"document": "/d.pdf"}, depends_on=[a]))
    c = await q.enqueue(NewTask("template_analysis", {"document": "/d.pdf"}, depends_on=[b]))
    (t,) = await q.claim("visual", "s", 1)
    assert await q.fail(t.id, "s", "PDF unreadable", retryable=False) is TaskStatus.failed
    rb, rc = await q.get_task(b), await q.get_task(c)
    assert rb is not None and rc is not None
    assert (
        rb["status"] == "failed" and f"dependency {a} (visual_analysis) failed: PDF unreadable" in rb["error"]
    )
    assert rc["status"] == "failed" and f"dependency {b} (healthcare_classification) failed" in rc["error"]


async def test_cancel_fails_dependents(db: asyncpg.Pool) -> None:
    q = Queue(db)
    a = await q.enqueue(noop())
    b = await q.enqueue(noop(depends_on=[a]))
    assert await q.cancel(a)
    assert not await q.cancel(a)
    rb = await q.get_task(b)
    assert rb is not None and rb["status"] == "failed" and "cancelled" in rb["error"]


async def test_crashed_consumer_task_comes_back_after_lease(db: asyncpg.Pool) -> None:
    q = Queue(db)
    tid = await q.enqueue(noop())
    await q.claim("bench", "crashed", 1, lease_s=0.3)
    assert await q.reap_expired() == 0  # lease still valid
    assert await q.claim("bench", "other", 1) == []
    await asyncio.sleep(0.4)
    assert await q.reap_expired() == 1
    row = await q.get_task(tid)
    assert row is not None and row["status"] == "queued" and "lease expired (held by crashed)" in row["error"]
    (t2,) = await q.claim("bench", "other", 1)
    assert t2.id == tid and t2.attempts == 2
    assert not await q.complete(tid, "crashed", {"late": True})  # the crashed one lost it
    assert await q.complete(tid, "other", {"ok": True})
    row = await q.get_task(tid)
    assert row is not None and row["status"] == "done" and row["result"] == {"ok": True}


async def test_extend_leases_keeps_tasks(db: asyncpg.Pool) -> None:
    q = Queue(db)
    await q.enqueue_many([noop(), noop()])
    await q.claim("bench", "s", 2, lease_s=0.3)
    await asyncio.sleep(0.2)
    assert await q.extend_leases("s", lease_s=30) == 2
    await asyncio.sleep(0.2)
    assert await q.reap_expired() == 0


async def test_retries_back_off_then_dead(db: asyncpg.Pool) -> None:
    q = Queue(db, retry_base_s=0.2, retry_max_s=5)
    tid = await q.enqueue(noop(max_attempts=3))
    dependent = await q.enqueue(noop(depends_on=[tid]))
    for attempt in (1, 2):
        (t,) = await q.claim("bench", "s", 1)
        assert t.attempts == attempt
        assert await q.fail(tid, "s", f"boom {attempt}") is TaskStatus.queued
        row = await q.get_task(tid)
        assert row is not None and row["not_before"] is not None
        # backed off: not claimable at once, and counted as waiting, not queued
        assert await q.claim("bench", "s", 1) == []
        s = (await q.stats())["bench"]
        assert s.waiting_backoff == 1 and s.queued_total == 0
        assert await q.depth("bench", 100) == 0
        await asyncio.sleep(0.2 * 2 ** (attempt - 1) * 1.5 + 0.05)
        assert await q.depth("bench", 100) == 1
    (t,) = await q.claim("bench", "s", 1)
    assert t.attempts == 3
    assert await q.fail(tid, "s", "boom 3") is TaskStatus.dead
    row = await q.get_task(tid)
    assert row is not None and row["status"] == "dead" and row["error"] == "boom 3"
    dep = await q.get_task(dependent)
    assert dep is not None and dep["status"] == "failed" and "dead: boom 3" in dep["error"]
    s = (await q.stats())["bench"]
    assert s.dead == 1 and s.failed == 1 and s.waiting_backoff == 0


async def test_release_does_not_spend_an_attempt(db: asyncpg.Pool) -> None:
    q = Queue(db)
    tid = await q.enqueue(noop(max_attempts=1))
    (t,) = await q.claim("bench", "s", 1)
    assert await q.release(tid, "s")
    assert not await q.release(tid, "s")
    (t,) = await q.claim("bench", "s2", 1)
    assert t.attempts == 1


async def test_stats_and_depth(db: asyncpg.Pool) -> None:
    q = Queue(db)
    await q.enqueue_many([noop(priority="high") for _ in range(3)] + [noop() for _ in range(4)])
    await q.enqueue(NewTask("startup_name_extraction", DOC, priority="critical"))
    await q.claim("bench", "s", 2)
    stats = await q.stats()
    b = stats["bench"]
    assert b.queued == {Priority.normal: 4, Priority.high: 1, Priority.critical: 0}
    assert b.running == 2 and b.oldest_queued_age_s is not None and b.oldest_queued_age_s >= 0
    assert stats["text"].queued[Priority.critical] == 1
    assert await q.depth("bench", 100) == 5
    assert await q.depth("bench", 3) == 3
    assert await q.depth("nothing", 3) == 0
    # counters stay exact after compaction
    await q.compact_counts()
    assert (await q.stats())["bench"].queued == b.queued


async def test_notify_on_enqueue(db: asyncpg.Pool, dsn: str) -> None:
    q = Queue(db)
    got: list[str] = []
    async with _listening(dsn, got.append):
        await q.enqueue(NewTask("startup_name_extraction", DOC))
        for _ in range(50):
            if got:
                break
            await asyncio.sleep(0.02)
    assert got == ["text"]
    assert NOTIFY_CHANNEL == "gpuscale_work"


async def test_purge_done_keeps_inputs_of_unfinished_tasks(db: asyncpg.Pool) -> None:
    q = Queue(db)
    a, b = await q.enqueue_many([noop(), noop()])
    child = await q.enqueue(noop(depends_on=[a]))
    await q.claim("bench", "s", 2)
    await q.complete_many("s", [(a, {}), (b, {})])
    assert await q.purge_done(older_than_s=3600) == 0  # too recent
    assert await q.purge_done(older_than_s=0) == 1  # b; a is still the input of a queued task
    assert await q.get_task(b) is None and await q.get_task(a) is not None
    (c,) = await q.claim("bench", "s", 1)
    assert c.id == child
    assert await q.complete(child, "s", {})
    assert await q.purge_done(older_than_s=0, batch=1) == 1
    assert await q.purge_done(older_than_s=0) == 1
    assert "bench" not in await q.stats()  # counters follow deletes


async def test_enqueue_dependent_while_dependency_completes(db: asyncpg.Pool) -> None:
    """The dependency finishing while a dependent is being enqueued never strands the dependent."""
    q = Queue(db)
    for _ in range(40):
        parent = await q.enqueue(noop())
        await q.claim("bench", "s", 1)
        child, completed = await asyncio.gather(
            q.enqueue(noop(depends_on=[parent])), q.complete(parent, "s", {})
        )
        assert completed
        row = await q.get_task(child)
        assert row is not None and row["status"] == "queued" and row["pending_deps"] == 0, row
        (c,) = await q.claim("bench", "s", 5)
        assert c.id == child
        await q.complete(child, "s", {})


async def test_concurrent_completions_sharing_dependents(db: asyncpg.Pool) -> None:
    """Like a deck's page batches finishing at once: no deadlock, every dependent released once."""
    q = Queue(db)
    for _ in range(3):
        parents = await q.enqueue_many([noop() for _ in range(8)])
        children = await q.enqueue_many([noop(depends_on=parents) for _ in range(40)])
        await q.claim("bench", "s", 8)
        done = await asyncio.gather(*(q.complete(p, "s", {}) for p in parents))
        assert all(done)
        got = await q.claim("bench", "s", 100)
        assert sorted(c.id for c in got) == children
        await q.complete_many("s", [(c.id, {}) for c in got])


async def test_counters_match_a_full_count_after_a_mixed_workload(db: asyncpg.Pool) -> None:
    q = Queue(db, retry_base_s=30)
    ids = await q.enqueue_many([noop(priority=p) for p in ("normal", "high", "critical") * 20])
    await q.enqueue_many([noop(depends_on=ids[:3]) for _ in range(5)])
    deck = await q.enqueue(NewTask("slide_feedback", {"document": "/d.pdf"}, depends_on=[ids[10]]))
    got = await q.claim("bench", "a", 30, lease_s=0.01)
    await q.complete_many("a", [(t.id, {}) for t in got[:10]])
    for t in got[10:15]:
        await q.fail(t.id, "a", "x")  # backoff
    for t in got[15:18]:
        await q.fail(t.id, "a", "x", retryable=False)
    await q.release(got[18].id, "a")
    await q.cancel(ids[-1])
    await q.cancel(deck)
    await asyncio.sleep(0.05)
    await q.reap_expired()
    await q.purge_done(older_than_s=0, batch=4)

    rows = await db.fetch(
        "SELECT pool, status::text AS status, count(*) AS n FROM processing_queue GROUP BY 1, 2"
    )
    truth = {(r["pool"], r["status"]): r["n"] for r in rows}
    stats = await q.stats()
    for pool, s in stats.items():
        assert s.queued_total + s.waiting_backoff == truth.get((pool, "queued"), 0)
        for status in ("blocked", "running", "done", "failed", "dead", "cancelled"):
            assert getattr(s, status) == truth.get((pool, status), 0), (pool, status)
    assert stats["bench"].waiting_backoff == 5
    assert stats["bench"].queued_total == await q.depth_by_scan("bench") == await q.depth("bench", 10_000)

    await db.execute("TRUNCATE processing_queue CASCADE")
    assert await q.stats() == {}


async def test_graph_cycles_and_bad_local_refs_refused(db: asyncpg.Pool) -> None:
    q = Queue(db)
    with pytest.raises(InvalidTask, match="cycle"):
        await q.enqueue_graph([noop(), noop(), noop()], [[2], [0], [1]])
    with pytest.raises(InvalidTask, match="out of range"):
        await q.enqueue_graph([noop(), noop()], [[], [5]])
    with pytest.raises(InvalidTask, match="JSON object"):
        await q.enqueue(NewTask("noop", ["not", "a", "dict"]))  # type: ignore[arg-type]
    assert await count_rows(db) == (0, 0)
    a, b, c = await q.enqueue_graph([noop(), noop(), noop()], [[2], [], [1]])  # forward refs are fine
    assert [(await q.get_task(i))["status"] for i in (a, b, c)] == ["blocked", "queued", "blocked"]  # type: ignore[index]


async def test_unserializable_result_refused_and_long_errors_cut(db: asyncpg.Pool) -> None:
    q = Queue(db)
    tid = await q.enqueue(noop())
    await q.claim("bench", "s", 1)
    with pytest.raises(QueueError, match="not JSON-serializable"):
        await q.complete(tid, "s", {"score": float("nan")})
    assert (await q.get_task(tid))["status"] == "running"  # type: ignore[index]
    assert await q.fail(tid, "s", "x" * 100_000, retryable=False) is TaskStatus.failed
    row = await q.get_task(tid)
    assert row is not None and 1000 < len(row["error"]) < 100_000


async def test_claim_order_puts_the_older_deck_and_its_critical_path_first(db: asyncpg.Pool) -> None:
    """Priority, then the deck submitted first, then the longest chain of dependents after the
    task (healthcare_classification before the other extractions), then first come."""
    q = Queue(db)
    doc = {"document": "/d.pdf"}
    names = ["company_offering_extraction", "startup_name_extraction", "healthcare_classification"]

    async def deck() -> list[int]:
        tasks = [NewTask(n, doc) for n in names]
        tasks += [NewTask("template_analysis", doc), NewTask("specialized_science", doc)]
        return await q.enqueue_graph(tasks, [[], [], [], [2], [3]])

    first = await deck()
    second = await deck()
    heights = await db.fetch("SELECT id, height FROM processing_queue ORDER BY id")
    assert [r["height"] for r in heights[:5]] == [0, 0, 2, 1, 0]
    urgent = await q.enqueue(NewTask("deck_date_extraction", doc, priority="high"))
    claimed = [t.id for t in await q.claim("text", "w", 7)]
    assert claimed == [urgent, first[2], first[0], first[1], second[2], second[0], second[1]]
