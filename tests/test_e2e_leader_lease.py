"""End to end: the leader lease against a frozen leader and a leader cut off from its database.

Real ``gpuscale controller`` processes share the test's PostgreSQL, with a short lease
(e2e_stack.LEASE_ENV: 3 s lease, 2 s renew deadline, 0.5 s retry period).

* SIGSTOP the leader (the emulator's DataCrunch API is the provider): the standby leads within
  the lease duration (plus one retry period); after SIGCONT the old leader makes no provider call
  (its fence's last-call timestamp stays before the freeze) and records no decision.  Several
  freezes in one run, alternating leaders; the takeover times are printed.
* The ``local`` provider (replicas are the controller's own worker processes): the issue's
  "terminate the leader's lock session" no longer changes the leader; cutting the leader off from
  the database (its role may not log in, its sessions are terminated) makes it stop acting and
  stop its replicas within the renew deadline, before the standby takes over; the pool never runs
  more than ``max_replicas`` local replicas for longer than one reconcile interval, every task is
  done once, and no replica is left at the end.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from e2e_stack import LEASE_DURATION_S, RENEW_DEADLINE_S, RETRY_PERIOD_S, Stack

from gpuscale.dev.stack import RUN_MARKER

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

NAMES = ["controller-1", "controller-2"]
# Bound on a takeover after a freeze: the lease ends at most its duration after the last renewal
# (which came before the freeze), and the standby tries every retry period × [1, 1.2).
TAKEOVER_BOUND_S = LEASE_DURATION_S + RETRY_PERIOD_S * 1.2 + 0.5  # + sampling


async def _roles(stack: Stack) -> dict[str, str | None]:
    return {n: await stack.role(n) for n in NAMES}


async def _wait_one_leader(stack: Stack, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        roles = await _roles(stack)
        leaders = [n for n, r in roles.items() if r == "leader"]
        if len(leaders) == 1 and all(r is not None for r in roles.values()):
            return leaders[0]
        assert len(leaders) <= 1, f"two leaders at once: {roles}"
        await asyncio.sleep(0.1)
    raise AssertionError(f"no single leader within {timeout_s}s: {await _roles(stack)}")


async def _one_value(stack: Stack, name: str, metric: str) -> float | None:
    samples = await stack.metric(name, metric)
    return samples[0][1] if samples else None


async def _controller_id(stack: Stack, name: str) -> str:
    return str((await stack.http.get(stack.controller_urls[name] + "/readyz")).json()["controller_id"])


# --------------------------------------------------------------------------- SIGSTOP


async def test_frozen_leader_is_replaced_and_wakes_up_fenced(dsn: str, tmp_path: Path) -> None:
    stack = Stack(dsn, tmp_path, controllers=2)
    takeovers: list[float] = []
    both: list[dict[str, Any]] = []
    try:
        await stack.start()
        ids = await stack.enqueue_noop(400, low=0.5, high=1.5)
        for cycle in range(3):
            leader = await _wait_one_leader(stack)
            standby = next(n for n in NAMES if n != leader)
            leader_id = await _controller_id(stack, leader)
            # It has made provider calls (it observes every tick) before it is frozen.
            for _ in range(100):
                if (
                    await _one_value(stack, leader, "gpuscale_provider_last_call_timestamp_seconds") or 0
                ) > 0:
                    break
                await asyncio.sleep(0.1)
            pid = stack.controllers[leader].pid
            os.kill(pid, signal.SIGSTOP)
            frozen_at, frozen_wall = time.monotonic(), time.time()
            try:
                took: float | None = None
                while time.monotonic() - frozen_at < TAKEOVER_BOUND_S + 5:
                    if await stack.role(standby) == "leader":
                        took = time.monotonic() - frozen_at
                        break
                    await asyncio.sleep(0.05)
                assert took is not None, f"cycle {cycle}: the standby did not take over"
                takeovers.append(took)
                # Let the new leader act for a while, then wake the old one up.
                await asyncio.sleep(2.0)
            finally:
                os.kill(pid, signal.SIGCONT)
            woke_wall = time.time()
            # From its first answer on, it is a standby; for several reconcile intervals it makes
            # no provider call and records no decision, while the new leader goes on.
            for _ in range(40):
                roles = await _roles(stack)
                if sum(r == "leader" for r in roles.values()) > 1:
                    both.append(roles)
                await asyncio.sleep(0.1)
            assert await stack.role(leader) == "standby"
            last_call = await _one_value(stack, leader, "gpuscale_provider_last_call_timestamp_seconds")
            assert last_call is not None and last_call < frozen_wall, (
                f"cycle {cycle}: the woken leader called the provider {last_call - frozen_wall:.2f}s "
                "after it was frozen"
            )
            conn = await asyncpg.connect(dsn)
            try:
                late = await conn.fetch(
                    "SELECT pool, reason, outcome, at FROM scaling_events"
                    " WHERE controller_id = $1 AND at > to_timestamp($2)",
                    leader_id,
                    woke_wall,
                )
            finally:
                await conn.close()
            assert late == [], f"cycle {cycle}: the woken leader recorded {[dict(r) for r in late]}"
            stack.check_alive()
        while await stack.unfinished(ids):
            stack.check_alive()
            await asyncio.sleep(0.5)
        outcome = await stack.outcome(ids)
    finally:
        leftovers = await stack.stop()
    print(
        f"takeover after SIGSTOP (lease {LEASE_DURATION_S}s, renew deadline {RENEW_DEADLINE_S}s, "
        f"retry {RETRY_PERIOD_S}s): {', '.join(f'{t:.2f}' for t in takeovers)} s; "
        f"median {statistics.median(takeovers):.2f} s"
    )
    assert both == [], f"two leaders at once: {both}"
    assert all(t <= TAKEOVER_BOUND_S for t in takeovers), takeovers
    assert outcome.statuses == {"done": len(ids)}
    assert sorted(outcome.entered_done) == sorted(ids) and outcome.touched_after_done == []
    assert leftovers == []


# --------------------------------------------------------------------------- the local provider

LOCAL_POOLS = """
bench_scaling:
  min_replicas: 0
  max_replicas: 3
  scale_up_threshold: 1
  scale_up_delay: 0s
  scale_down_delay: 3s
  startup_timeout: 30s
  tasks_per_replica: 4
  deployment: e2e-bench
  cold_start: 2s
  default_task_duration: 0.5s
  drain_target: 3s
visual_container_scaling:
  min_replicas: 0
  max_replicas: 1
  deployment: e2e-visual
text_container_scaling:
  min_replicas: 0
  max_replicas: 1
  deployment: e2e-text
reconcile_interval: 1s
"""
MAX_REPLICAS = 3
INTERVAL_S = 1.0


def local_replicas(run_id: str) -> set[int]:
    """Pids of the live local replicas (worker processes with a container id) of this run."""
    marker = f"{RUN_MARKER}={run_id}".encode()
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue  # gone, or a zombie
        if marker in env and any(item.startswith(b"GPUSCALE_CONTAINER_ID=") for item in env):
            found.add(int(entry))
    return found


class Sampler:
    """Counts local replicas every 50 ms; remembers the longest stretch above the maximum."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.peak = 0
        self.over_since: float | None = None
        self.longest_over_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            n = len(await asyncio.to_thread(local_replicas, self.run_id))
            now = time.monotonic()
            self.peak = max(self.peak, n)
            if n > MAX_REPLICAS:
                self.over_since = self.over_since or now
                self.longest_over_s = max(self.longest_over_s, now - self.over_since)
            else:
                self.over_since = None
            await asyncio.sleep(0.05)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def _as_role(dsn: str, role: str, password: str) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{role}:{password}@{host}", parts.path, parts.query, parts.fragment))


async def _admin(dsn: str, sql: str, *args: object) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def test_local_replicas_follow_the_lease(dsn: str, tmp_path: Path) -> None:
    stack = Stack(dsn, tmp_path, pools_yaml=LOCAL_POOLS, controllers=0)
    sampler = Sampler(stack.run_id)
    roles = {name: f"e2e_ctl_{i + 1}" for i, name in enumerate(NAMES)}
    password = "e2e-ctl-password-31c9"
    try:
        await stack.start()
        for role in roles.values():
            await _admin(dsn, f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'")
        for name in NAMES:
            # Each controller (and the replicas it starts) connects as a role of its own, so the
            # test can cut one of them off from the database.
            await stack.start_controller(
                name,
                env={
                    "GPUSCALE_PROVIDER": "local",
                    "GPUSCALE_DATABASE_URL": _as_role(stack.dsn, roles[name], password),
                    "GPUSCALE_LOCAL_STOP_GRACE_S": "1",
                    "GPUSCALE_LOCAL_LOG_DIR": str(tmp_path / "logs" / "replicas"),
                },
            )
        for name in NAMES:
            await stack.wait_controller(name)
        sampler.start()
        leader = await _wait_one_leader(stack)
        standby = next(n for n in NAMES if n != leader)
        ids = await stack.enqueue_noop(300, low=0.3, high=1.0)
        for _ in range(200):
            if len(local_replicas(stack.run_id)) >= 2:
                break
            await asyncio.sleep(0.1)
        assert local_replicas(stack.run_id), "the leader started no replica"

        # 1. The attack: terminate the leader's database sessions.  With a lease that is
        #    a reconnect, not a lost leadership.
        await _admin(
            dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", roles[leader]
        )
        for _ in range(int(3 * LEASE_DURATION_S / 0.1)):
            assert await stack.role(standby) == "standby", "a session kill handed the lease over"
            await asyncio.sleep(0.1)
        assert await stack.role(leader) == "leader"

        # 2. Cut the leader off (no login, sessions ended): it stops acting and stops its
        #    replicas within its renew deadline; the standby takes over once the lease expires.
        cut_at = time.monotonic()
        await _admin(dsn, f"ALTER ROLE {roles[leader]} NOLOGIN")
        await _admin(
            dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", roles[leader]
        )
        stepped_down = took = None
        while time.monotonic() - cut_at < 30:
            if stepped_down is None and await stack.role(leader) == "standby":
                stepped_down = time.monotonic() - cut_at
            if await stack.role(standby) == "leader":
                took = time.monotonic() - cut_at
                break
            await asyncio.sleep(0.05)
        assert stepped_down is not None and took is not None, (stepped_down, took)
        assert stepped_down <= RENEW_DEADLINE_S + RETRY_PERIOD_S + 0.5
        assert took >= stepped_down
        await _admin(dsn, f"ALTER ROLE {roles[leader]} LOGIN")

        while await stack.unfinished(ids):
            stack.check_alive()
            await asyncio.sleep(0.5)
        # The work is done: the pool scales to zero (scale_down_delay 3 s).
        for _ in range(300):
            if not local_replicas(stack.run_id):
                break
            await asyncio.sleep(0.1)
        left = local_replicas(stack.run_id)
        outcome = await stack.outcome(ids)
    finally:
        await sampler.stop()
        leftovers = await stack.stop()
    print(
        f"local replicas: peak {sampler.peak} (max_replicas {MAX_REPLICAS}), longest above the maximum "
        f"{sampler.longest_over_s:.2f}s; old leader stopped acting {stepped_down:.2f}s after the cut, "
        f"standby led after {took:.2f}s"
    )
    assert sampler.longest_over_s <= INTERVAL_S, f"{sampler.longest_over_s:.2f}s above max_replicas"
    assert left == set(), f"replicas left after the work was done: {left}"
    assert outcome.statuses == {"done": len(ids)}
    assert sorted(outcome.entered_done) == sorted(ids) and outcome.touched_after_done == []
    assert leftovers == []
