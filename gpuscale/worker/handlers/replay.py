"""Replay handlers (``GPUSCALE_WORKER_REPLAY=true``): load tests with real workers, no model.

``gpuscale replay`` enqueues a trace's tasks with their real types (so routing, claims, leases,
dependencies and the controller see production's shapes) and names, as each task's document,
``replay:<seconds>``: the service time the task should take.  A worker in replay mode runs every
one of its pool's types with :func:`make`'s handler, which sleeps that long and reports progress
as it goes.  Requests are served as Ollama serves them: at most ``OLLAMA_NUM_PARALLEL`` at once,
the others wait in a first-come queue (asyncio's semaphore is fair), so a worker that holds more
tasks than its model serves at once behaves as it does in production.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from gpuscale.worker.errors import TaskError
from gpuscale.worker.handlers.base import Handler, TaskContext

PREFIX = "replay:"
# Progress is reported this often (seconds) so the controller sees running work move.
_PROGRESS_EVERY_S = 1.0


def replay_document(seconds: float) -> str:
    """The document a replayed task names: how long it takes."""
    return f"{PREFIX}{seconds:.3f}"


def seconds_of(payload: Mapping[str, Any]) -> float:
    doc = str(payload.get("document", ""))
    if not doc.startswith(PREFIX):
        raise TaskError(f"replay worker: document {doc[:80]!r} is not replay:<seconds>", retryable=False)
    try:
        value = float(doc[len(PREFIX) :])
    except ValueError:
        raise TaskError(f"replay worker: bad seconds in {doc[:80]!r}", retryable=False) from None
    if not 0 <= value <= 24 * 3600:
        raise TaskError(f"replay worker: seconds out of range in {doc[:80]!r}", retryable=False)
    return value


def make(parallel: int) -> Handler:
    """A handler that serves at most ``parallel`` replayed tasks at once, first come first."""
    gate = asyncio.Semaphore(max(1, parallel))

    async def handler(ctx: TaskContext) -> dict[str, Any]:
        seconds = seconds_of(ctx.payload)
        async with gate:
            started = time.monotonic()
            end = started + seconds
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    break
                await asyncio.sleep(min(left, _PROGRESS_EVERY_S))
                done = min(1.0, (time.monotonic() - started) / seconds) if seconds > 0 else 1.0
                await ctx.progress(100.0 * done, "replaying")
        return {"replayed_s": seconds, "server_id": ctx.server_id}

    return handler


def handlers_for(real: Mapping[str, Handler], parallel: int) -> dict[str, Handler]:
    """The same task types as ``real``, every one replayed; one gate per worker process."""
    handler = make(parallel)
    return dict.fromkeys(real, handler)
