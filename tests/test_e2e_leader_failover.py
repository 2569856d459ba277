"""End to end: kill -9 the leader controller mid-run while a standby runs; the standby takes over.

Two ``gpuscale controller`` processes share the database; one holds the leader lease.  While a few
hundred tasks run, the test samples both controllers' ``gpuscale_leader`` gauge and then SIGKILLs
the leader.  The standby must take over within seconds and the run must finish (every task
``done`` exactly once, the pool back to zero).  "Never both act" is checked two ways: no sample
ever shows both controllers as leader, and in the decision timeline (``scaling_events``, which
records the controller that acted) the new leader's first decision comes after the old leader's
last one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import asyncpg
import pytest
from e2e_stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

TASKS = 240


async def _leader_flags(stack: Stack, names: list[str]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name in names:
        samples = await stack.metric(name, "gpuscale_leader")
        out[name] = samples[0][1] if samples else None
    return out


async def test_leader_killed_standby_takes_over_never_both(dsn: str, tmp_path: Path) -> None:
    stack = Stack(dsn, tmp_path, controllers=2)
    names = ["controller-1", "controller-2"]
    both_leaders: list[dict[str, float | None]] = []
    started = time.monotonic()
    takeover_s = None
    try:
        await stack.start()
        roles = {n: await stack.role(n) for n in names}
        for _ in range(40):  # the lock is taken at the first tick
            if "leader" in roles.values():
                break
            await asyncio.sleep(0.25)
            roles = {n: await stack.role(n) for n in names}
        assert sorted(roles.values()) == ["leader", "standby"], roles
        leader = next(n for n, r in roles.items() if r == "leader")
        standby = next(n for n in names if n != leader)
        leader_id = (await stack.http.get(stack.controller_urls[leader] + "/readyz")).json()["controller_id"]
        standby_id = (await stack.http.get(stack.controller_urls[standby] + "/readyz")).json()[
            "controller_id"
        ]

        ids = await stack.enqueue_noop(TASKS, low=0.3, high=1.5)
        killed_at = None
        for _ in range(800):
            left = await stack.unfinished(ids)
            if left == 0:
                break
            stack.check_alive()
            flags = await _leader_flags(stack, names)
            if sum(1 for v in flags.values() if v == 1) > 1:
                both_leaders.append(flags)
            if killed_at is None and len(await stack.replicas()) >= 2 and left < TASKS * 0.8:
                stack.expected_dead.add(leader)
                os.kill(stack.controllers[leader].pid, signal.SIGKILL)
                killed_at = time.monotonic()
            if killed_at is not None and takeover_s is None and await stack.role(standby) == "leader":
                takeover_s = time.monotonic() - killed_at
            await asyncio.sleep(0.25)
        work_s = time.monotonic() - started
        assert killed_at is not None, "the run ended before the leader could be killed"
        replicas_left = await stack.wait_replicas_zero(timeout_s=60)
        outcome = await stack.outcome(ids)
        conn = await asyncpg.connect(dsn)
        try:
            events = await conn.fetch("SELECT controller_id, at FROM scaling_events ORDER BY at, id")
        finally:
            await conn.close()
        api = await stack.api_texts()
    finally:
        leftovers = await stack.stop()

    old = [e["at"] for e in events if e["controller_id"] == leader_id]
    new = [e["at"] for e in events if e["controller_id"] == standby_id]
    print(
        f"{TASKS} tasks in {work_s:.1f}s; standby took over {takeover_s and round(takeover_s, 1)}s after the "
        f"kill; decisions: {len(old)} by the old leader, {len(new)} by the new one"
    )
    assert takeover_s is not None, "the standby never became leader"
    assert both_leaders == [], f"two leaders at once: {both_leaders}"
    assert old and new, "both controllers should have decided something (before and after the kill)"
    assert max(old) < min(new), "the new leader decided before the old leader's last decision"
    assert {e["controller_id"] for e in events} <= {leader_id, standby_id}
    assert outcome.statuses == {"done": TASKS}
    assert sorted(outcome.entered_done) == sorted(ids) and outcome.touched_after_done == []
    assert replicas_left == [] and leftovers == []
    assert stack.leaked(stack.log_texts() + api) == []
