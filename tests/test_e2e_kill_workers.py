"""End to end: kill -9 random workers while a few hundred tasks run; nothing is lost or done twice.

Real pieces only (see tests/e2e_stack.py): the test's PostgreSQL, the DataCrunch emulator whose
replicas are real ``gpuscale worker --pool bench`` processes, and ``gpuscale controller`` with the
``datacrunch`` provider pointed at the emulator.  The test enqueues no-op tasks and SIGKILLs a
random running replica about every second while they run (the emulator replaces crashed
replicas, as the cloud restarts a container), then checks:

- every task ends ``done`` (attempts are generous on purpose: a task may be caught in several
  kills);
- none is completed twice: the audit trigger shows each task entering ``done`` exactly once and
  never being updated after;
- the pool returns to 0 replicas, nothing is left running, and no secret shows in any log, metric
  or API answer.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path

import pytest
from e2e_stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

TASKS = 300


async def test_kill_9_random_workers_nothing_lost_nothing_twice(dsn: str, tmp_path: Path) -> None:
    stack = Stack(dsn, tmp_path)
    kills: list[str] = []
    rnd = random.Random(11)
    started = time.monotonic()
    leftovers: list[int] = []
    try:
        await stack.start()
        ids = await stack.enqueue_noop(TASKS)
        for _ in range(200):
            left = await stack.unfinished(ids)
            if left == 0:
                break
            stack.check_alive()
            running = [r for r in await stack.replicas() if r["status"] == "running" and r["pid"]]
            if running and left > 20 and len(kills) < 12:
                victim = rnd.choice(running)
                try:
                    os.kill(int(victim["pid"]), signal.SIGKILL)
                    kills.append(victim["id"])
                except ProcessLookupError:
                    pass
            await asyncio.sleep(1.0)
        work_s = time.monotonic() - started
        replicas_left = await stack.wait_replicas_zero()
        outcome = await stack.outcome(ids)
        api = await stack.api_texts()
    finally:
        leftovers = await stack.stop()

    print(
        f"{TASKS} tasks, {len(kills)} workers killed, statuses {outcome.statuses}, "
        f"{outcome.attempts} attempts, "
        f"work {work_s:.1f}s, total {time.monotonic() - started:.1f}s"
    )
    assert len(kills) >= 3, "the chaos did not get to kill workers; the test proved nothing"
    assert outcome.statuses == {"done": TASKS}
    assert outcome.attempts > TASKS, "no task was interrupted by a kill"
    assert sorted(outcome.entered_done) == sorted(ids), "a task entered 'done' more than once (or never)"
    assert outcome.touched_after_done == [], "a done task was updated again"
    assert replicas_left == [], f"replicas still running after the work: {replicas_left}"
    assert leftovers == [], f"processes left running after the stop: {leftovers}"
    assert stack.leaked([stack.dsn]) == ["database password"]  # the processes really carry it
    assert stack.leaked(stack.log_texts() + api) == []
