"""The ``noop`` task type (pool ``bench``): sleeps, optionally fails.  No Ollama needed.

It lets benchmarks, tests and the end-to-end demo run real worker processes, with real claims,
leases, progress, drains and retries, on a machine without a GPU.
"""

from __future__ import annotations

import asyncio
from typing import Any

from gpuscale.queue.results import NoopResult
from gpuscale.queue.tasktypes import NoopPayload
from gpuscale.worker.errors import TaskError
from gpuscale.worker.handlers.base import TaskContext, parse_payload


async def noop(ctx: TaskContext) -> dict[str, Any]:
    payload = parse_payload(ctx, NoopPayload)
    # Sleep in a few steps so progress moves and a drain sees a task that is visibly running.
    steps = max(1, min(10, int(payload.sleep_s)))
    for i in range(steps):
        await asyncio.sleep(payload.sleep_s / steps)
        await ctx.progress(100.0 * (i + 1) / steps, f"slept {payload.sleep_s * (i + 1) / steps:.1f}s")
    if payload.fail:
        raise TaskError("noop task asked to fail (payload fail=true)", retryable=True)
    return NoopResult(slept_s=payload.sleep_s, server_id=ctx.server_id).model_dump(mode="json")
