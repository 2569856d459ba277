"""End to end: the provider API misbehaves during a run, and the run still finishes.

After the deployments exist, the emulator is told to answer 20 % of API calls with 429 (with
``Retry-After``), 15 % with 500, every answer 0.3 s late, and to issue tokens that expire after
3 s.  The controller must keep going: every task ends ``done`` exactly once, the pool returns to
zero — and once it has replicas, it never drops to zero while work is waiting (an error is not a
reason to scale down; unknown is not zero).  The controller's own metrics must show it met the
faults.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from e2e_stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

TASKS = 200
FAULTS = "throttle=0.2,retry_after=1,error=0.15,slow=0.3,token_ttl=3,seed=5"


async def test_429_500_slow_and_expiring_tokens_run_still_finishes(dsn: str, tmp_path: Path) -> None:
    stack = Stack(dsn, tmp_path)
    started = time.monotonic()
    samples = 0
    dropped_while_waiting: list[tuple[float, int]] = []
    try:
        await stack.start()
        resp = await stack.http.post(f"{stack.emulator}/_emulator/faults", json={"spec": FAULTS})
        assert resp.status_code == 200, resp.text
        ids = await stack.enqueue_noop(TASKS, low=0.3, high=1.5)
        had_replicas = False
        for _ in range(800):
            if await stack.unfinished(ids) == 0:
                break
            stack.check_alive()
            replicas = len(await stack.replicas())
            waiting = await stack.claimable()
            samples += 1
            had_replicas = had_replicas or replicas > 0
            if had_replicas and replicas == 0 and waiting > 0:
                dropped_while_waiting.append((round(time.monotonic() - started, 1), waiting))
            await asyncio.sleep(0.25)
        work_s = time.monotonic() - started
        replicas_left = await stack.wait_replicas_zero(timeout_s=90)
        outcome = await stack.outcome(ids)
        requests = await stack.metric("controller-1", "gpuscale_provider_requests_total")
        api = await stack.api_texts()
    finally:
        leftovers = await stack.stop()

    by_status: dict[str, float] = {}
    for labels, value in requests:
        by_status[labels.get("status", "?")] = by_status.get(labels.get("status", "?"), 0) + value
    print(f"{TASKS} tasks in {work_s:.1f}s, {samples} samples; provider calls by status {by_status}")
    assert outcome.statuses == {"done": TASKS}
    assert sorted(outcome.entered_done) == sorted(ids) and outcome.touched_after_done == []
    assert dropped_while_waiting == [], f"replicas dropped to 0 while work waited: {dropped_while_waiting}"
    # The controller really met the faults (counted by the status it got back).
    assert by_status.get("429", 0) > 0 and by_status.get("500", 0) > 0, by_status
    assert replicas_left == [] and leftovers == []
    assert stack.leaked(stack.log_texts() + api) == []
