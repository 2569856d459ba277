"""One observation: what was read of the queue, the registry and the provider → the policy's input.

Pure (no I/O, no clock).  The controller (:func:`gpuscale.controller.reconcile.build_observation`)
and the simulator (:mod:`gpuscale.controller.simulate.engine`) both build their
:class:`~gpuscale.controller.policy.PoolObservation` here, so the policy decides on the same
inputs in production as in a replay: per-type work estimates from the learned durations, the
remaining work of running tasks from their progress, the tasks about to arrive (blocked only on
queued or running work) and when they will, and the monthly budget projection.

What a reader supplies:

* :class:`WorkRead` — per pool, claimable tasks by priority and by task type (cheap: counters),
  the running tasks with how long they have run and the progress their worker reported, and the
  blocked tasks whose unfinished dependencies are all queued or running (with those dependencies);
* :class:`Fleet` — per pool, the provider's replicas, the registered workers, and which of them
  hold tasks;
* a :class:`~gpuscale.controller.policy.DurationEstimator` (expected seconds per task type).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from gpuscale.controller.policy import BudgetView, PoolObservation
from gpuscale.controller.pools import PoolRules

DAY_S = 86400.0
MONTH_S = 30 * DAY_S
# A running task past its expected duration still has some work left; never estimate it as done.
_RUNNING_FLOOR = 0.1
_UPSTREAM_FLOOR = 0.05


@dataclass(frozen=True)
class RunningTask:
    """A task a worker holds: ``elapsed_s`` since it was claimed, ``progress`` in [0, 1] as its
    worker last reported it (``None``: nothing reported yet)."""

    pool: str
    task_type: str
    elapsed_s: float
    progress: float | None = None
    server: str | None = None


@dataclass(frozen=True)
class Upstream:
    """An unfinished dependency of a blocked task: ``status`` is ``queued`` or ``running``."""

    pool: str
    task_type: str
    status: str
    elapsed_s: float = 0.0
    progress: float | None = None
    server: str | None = None


@dataclass(frozen=True)
class BlockedTask:
    """A blocked task whose unfinished dependencies are all queued or running (about to arrive)."""

    pool: str
    task_type: str
    deps: tuple[Upstream, ...]


@dataclass(frozen=True)
class PoolQueue:
    """One pool's claimable tasks: by priority (``normal``, ``high``, ``critical``) and by type."""

    queued: Mapping[str, int]
    queued_by_type: Mapping[str, int]
    oldest_queued_age_s: float | None = None


@dataclass(frozen=True)
class WorkRead:
    """What was read of the queue this tick (all pools)."""

    pools: Mapping[str, PoolQueue]
    running: Sequence[RunningTask] = ()
    blocked: Sequence[BlockedTask] = ()

    def server_load(self) -> dict[str, int]:
        load: dict[str, int] = {}
        for t in self.running:
            if t.server is not None:
                load[t.server] = load.get(t.server, 0) + 1
        return load


@dataclass(frozen=True)
class Fleet:
    """One pool's replicas: ``None`` where unknown (the provider or the registry failed)."""

    provider_replicas: int | None
    registered: int | None
    starting: tuple[tuple[str, float], ...] = ()
    idle: int | None = None
    busy: int | None = None
    # Servers told to stop (draining): what they still run finishes there or comes back to the
    # queue; it needs no replica of the pool's count.
    draining: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Context:
    """What observing one pool needs of the others: all pools' rules, their registered workers
    (is any ready to claim?) and the expected duration per task type."""

    rules: Mapping[str, PoolRules]
    expected: Callable[[str], float]
    registered: Mapping[str, int] = field(default_factory=dict)


def remaining_s(
    expected: float, elapsed_s: float, progress: float | None, floor: float = _RUNNING_FLOOR
) -> float:
    """Seconds of work left in a running task: from its reported progress when there is some,
    else from how long it has run; at least ``floor`` × expected (it has not finished yet)."""
    if progress is not None and progress > 0:
        left = expected * (1.0 - min(1.0, progress))
    else:
        left = expected - max(0.0, elapsed_s)
    return max(left, floor * expected)


def upstream_eta(blocked: Sequence[BlockedTask], ctx: Context, load: Mapping[str, int]) -> float | None:
    """Seconds until the first of ``blocked`` becomes claimable: for each task, the latest of its
    dependencies (a running one: its remaining work, longer when its replica holds more tasks
    than its model serves at once; a queued one: its expected duration, plus a cold start when
    its pool has no replica ready); the soonest over the tasks.  ``None`` when none."""
    eta: float | None = None
    for task in blocked:
        worst = 0.0
        for dep in task.deps:
            expected = ctx.expected(dep.task_type)
            dep_rules = ctx.rules.get(dep.pool)
            if dep.status == "running":
                left = remaining_s(expected, dep.elapsed_s, dep.progress, _UPSTREAM_FLOOR)
                parallel = dep_rules.parallel if dep_rules is not None else 1
                held = load.get(dep.server, 1) if dep.server is not None else 1
                worst = max(worst, left * max(1.0, held / parallel))
            else:
                cold = 0.0
                if ctx.registered.get(dep.pool, 0) <= 0 and dep_rules is not None:
                    cold = dep_rules.cold_start_s
                worst = max(worst, expected + cold)
        eta = worst if eta is None else min(eta, worst)
    return eta


def observe_pool(name: str, work: WorkRead | None, fleet: Fleet, ctx: Context) -> PoolObservation:
    """The policy's input for pool ``name``.  ``work`` is ``None`` when the queue could not be
    read: the counts are then unknown (the policy holds), never zero."""
    if work is None:
        return PoolObservation(
            queued=None,
            running=None,
            provider_replicas=fleet.provider_replicas,
            registered=fleet.registered,
            starting=fleet.starting,
            idle_replicas=fleet.idle,
            busy_replicas=fleet.busy,
            blocked_on_running=None,
        )
    est = ctx.expected
    pq = work.pools.get(name) or PoolQueue({}, {})
    queued = {p: max(0, int(pq.queued.get(p, 0))) for p in ("normal", "high", "critical")}
    queued_work = sum(max(0, n) * est(t) for t, n in pq.queued_by_type.items())
    running = [t for t in work.running if t.pool == name and t.server not in fleet.draining]
    running_work = sum(remaining_s(est(t.task_type), t.elapsed_s, t.progress) for t in running)
    blocked = [b for b in work.blocked if b.pool == name]
    blocked_work = sum(est(b.task_type) for b in blocked)
    eta = upstream_eta(blocked, ctx, work.server_load()) if blocked else None
    return PoolObservation(
        queued=queued,
        # Without the server list the controller cannot tell busy replicas from idle ones: it
        # must not scale down on that, so the running work counts as unknown (the policy holds).
        running=len(running) if fleet.registered is not None else None,
        provider_replicas=fleet.provider_replicas,
        registered=fleet.registered,
        starting=fleet.starting,
        idle_replicas=fleet.idle,
        busy_replicas=fleet.busy,
        queued_work_s=queued_work,
        running_work_s=running_work,
        blocked_on_running=len(blocked),
        blocked_work_s=blocked_work,
        upstream_eta_s=eta,
        oldest_queued_age_s=pq.oldest_queued_age_s,
    )


def project_spend(spent_usd: float, elapsed_s: float, period_s: float = MONTH_S) -> float:
    """Spend projected to the end of the budget period: the pace so far carried over what is
    left of it.  Not the current run rate (a busy hour's rate extrapolated over the month would
    cap every burst); the first day counts as a whole day so one early burst does not look like
    a month of them."""
    elapsed = max(0.0, elapsed_s)
    left = max(0.0, period_s - elapsed)
    return spent_usd + spent_usd / max(elapsed, DAY_S) * left


def budget_view(
    budget_usd: float | None, spent_usd: float | None, elapsed_s: float, period_s: float = MONTH_S
) -> BudgetView | None:
    """The policy's budget input, or ``None`` when there is no budget (or the spend is unknown)."""
    if budget_usd is None or spent_usd is None:
        return None
    return BudgetView(
        monthly_budget_usd=budget_usd, projected_usd=project_spend(spent_usd, elapsed_s, period_s)
    )
