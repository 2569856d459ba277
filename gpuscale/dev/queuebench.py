"""Queue benchmark: enqueue N no-op tasks in batches, drain them with C concurrent consumers
through the real claim/complete path (leases included), then time depth reads.

Not a test: it prints numbers.  The ``bench`` pool (task type ``noop``) is scratch space: it is
emptied before and after a run.  With ``depth_rows`` it also fills the pool with that many queued
rows and times the depth read, the stats read and, for comparison, a plain ``count(*)``.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from gpuscale.db import Connector
from gpuscale.queue import NewTask, Queue

BENCH_POOL = "bench"


@dataclass
class BenchResult:
    tasks: int
    concurrency: int
    claim_batch: int
    enqueue_per_s: float
    drain_per_s: float
    depth_read_ms: float  # median, after the drain
    stats_read_ms: float  # median, after the drain
    duplicates: int
    depth_rows: int | None = None
    depth_read_ms_at_rows: float | None = None
    stats_read_ms_at_rows: float | None = None
    count_scan_ms_at_rows: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


async def _median_ms(fn: Any, reads: int) -> float:
    await fn()  # warm: plan cache, buffers
    samples = []
    for _ in range(reads):
        t0 = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(samples), 3)


async def _enqueue(queue: Queue, n: int, batch: int, parallel: int) -> float:
    sizes = [min(batch, n - i) for i in range(0, n, batch)]
    todo = asyncio.Queue[int]()
    for s in sizes:
        todo.put_nowait(s)

    async def enqueuer() -> None:
        while not todo.empty():
            size = todo.get_nowait()
            await queue.enqueue_many([NewTask("noop", {}) for _ in range(size)])

    t0 = time.perf_counter()
    await asyncio.gather(*(enqueuer() for _ in range(parallel)))
    return time.perf_counter() - t0


async def run_queue_bench(
    db: Connector,
    *,
    tasks: int,
    concurrency: int,
    claim_batch: int = 100,
    enqueue_batch: int = 1000,
    depth_reads: int = 25,
    depth_rows: int | None = None,
) -> BenchResult:
    queue = Queue(db)
    await _reset(queue)

    enqueue_s = await _enqueue(queue, tasks, enqueue_batch, 1)

    seen: list[int] = []

    async def consumer(k: int) -> None:
        server = f"bench-{k}"
        while True:
            got = await queue.claim(BENCH_POOL, server, claim_batch)
            if not got:
                return
            seen.extend(t.id for t in got)
            await queue.complete_many(server, [(t.id, {}) for t in got])

    t0 = time.perf_counter()
    await asyncio.gather(*(consumer(k) for k in range(concurrency)))
    drain_s = time.perf_counter() - t0

    duplicates = len(seen) - len(set(seen))
    stats = (await queue.stats()).get(BENCH_POOL)
    if stats is None or stats.done != tasks or duplicates:
        raise RuntimeError(
            f"bench drain is wrong: done={stats and stats.done} of {tasks}, duplicates={duplicates}"
        )

    result = BenchResult(
        tasks=tasks,
        concurrency=concurrency,
        claim_batch=claim_batch,
        enqueue_per_s=round(tasks / enqueue_s, 1),
        drain_per_s=round(tasks / drain_s, 1),
        depth_read_ms=await _median_ms(lambda: queue.depth(BENCH_POOL, 10_000), depth_reads),
        stats_read_ms=await _median_ms(queue.stats, depth_reads),
        duplicates=duplicates,
    )

    if depth_rows:
        await _reset(queue)
        await _enqueue(queue, depth_rows, 10_000, max(1, min(concurrency, 4)))
        result.depth_rows = depth_rows
        result.depth_read_ms_at_rows = await _median_ms(lambda: queue.depth(BENCH_POOL, 10_000), depth_reads)
        result.stats_read_ms_at_rows = await _median_ms(queue.stats, depth_reads)
        result.count_scan_ms_at_rows = await _median_ms(lambda: queue.depth_by_scan(BENCH_POOL), 5)

    await _reset(queue)
    return result


async def _reset(queue: Queue) -> None:
    """Empty the scratch pool and vacuum, so every run starts from the same clean state."""
    await queue.purge_pool(BENCH_POOL)
    await queue.vacuum()
