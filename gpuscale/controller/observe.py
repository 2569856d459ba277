"""One observation: what was read of the queue, the registry and the provider → the policy's input.

Pure (no I/O, no clock).  The controller (:func:`gpuscale.controller.reconcile.build_observation`)
and the simulator (:mod:`gpuscale.controller.simulate.engine`) both build their
:class:`~gpuscale.controller.policy.PoolObservation` here, so the policy decides on the same
inputs in production as in a replay: per-type work estimates from the learned durations, the
remaining work of running tasks from their progress, the tasks about to arrive (blocked on
queued or running work, directly or down a chain of stages) and when they will, the age of the
oldest deck with work in the pool (for ``stage_deadline`` sizing), and the monthly budget
projection.

What a reader supplies:

* :class:`WorkRead` — per pool, claimable tasks by priority and by task type (cheap: counters),
  the running tasks with how long they have run and the progress their worker reported, and the
  blocked tasks with their unfinished dependencies (a blocked one named by id); each with the
  age of its deck;
* :class:`Fleet` — per pool, the provider's replicas, the registered workers, and which of them
  hold tasks;
* a :class:`~gpuscale.controller.policy.DurationEstimator` (expected seconds per task type).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

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
    deck_age_s: float | None = None  # since its deck (task graph) was submitted


class Running(Protocol):
    """What the observation reads of a running task: a :class:`RunningTask`, or a row the
    controller read from the queue as it is (no copy per running task and tick)."""

    @property
    def pool(self) -> str: ...
    @property
    def task_type(self) -> str: ...
    @property
    def elapsed_s(self) -> float: ...
    @property
    def progress(self) -> float | None: ...
    @property
    def server(self) -> str | None: ...
    @property
    def deck_age_s(self) -> float | None: ...


@dataclass(frozen=True)
class Upstream:
    """An unfinished dependency of a blocked task: ``status`` is ``queued``, ``running`` or
    ``blocked`` (then ``id`` names it among the blocked tasks read, for the chain's ETA)."""

    pool: str
    task_type: str
    status: str
    elapsed_s: float = 0.0
    progress: float | None = None
    server: str | None = None
    id: int | str | None = None


@dataclass(frozen=True)
class BlockedTask:
    """A blocked task and its unfinished dependencies.  About to arrive when every dependency is
    queued, running, or itself a blocked task about to arrive (a chain of stages under way)."""

    pool: str
    task_type: str
    deps: tuple[Upstream, ...]
    id: int | str | None = None
    deck_age_s: float | None = None


@dataclass(frozen=True)
class PoolQueue:
    """One pool's claimable tasks: by priority (``normal``, ``high``, ``critical``) and by type."""

    queued: Mapping[str, int]
    queued_by_type: Mapping[str, int]
    oldest_queued_age_s: float | None = None
    oldest_deck_age_s: float | None = None  # the oldest deck with a claimable task here


@dataclass(frozen=True)
class WorkRead:
    """What was read of the queue this tick (all pools)."""

    pools: Mapping[str, PoolQueue]
    running: Sequence[Running] = ()
    blocked: Sequence[BlockedTask] = ()
    # chain_etas of ``blocked``, worked out once for all the pools observed on this read.
    _etas: list[list[float | None]] = field(default_factory=list, compare=False, repr=False)
    # ``running`` by pool, built on first use: each pool's observation looks at its own tasks
    # instead of every running task of the fleet (pools × running tasks per tick otherwise).
    _by_pool: dict[str, list[Running]] = field(default_factory=dict, compare=False, repr=False)

    def blocked_etas(self, ctx: Context) -> list[float | None]:
        if not self._etas:
            self._etas.append(chain_etas(self.blocked, ctx, self.server_load()))
        return self._etas[0]

    def running_of(self, pool: str) -> Sequence[Running]:
        if not self._by_pool and self.running:
            for t in self.running:
                self._by_pool.setdefault(t.pool, []).append(t)
        return self._by_pool.get(pool, ())

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
    # Servers told to stop (draining): what they still run finishes there within the drain grace
    # or comes back to the queue (see observe_pool: it keeps an idle replica, never starts one).
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


def chain_etas(blocked: Sequence[BlockedTask], ctx: Context, load: Mapping[str, int]) -> list[float | None]:
    """Per blocked task, seconds until it becomes claimable, or ``None`` when something upstream
    cannot start yet.  A dependency that is running: its remaining work, longer when its replica
    holds more tasks than its model serves at once; queued: its expected duration, plus a cold
    start when its pool has no replica ready; blocked: its own ETA plus its expected duration
    (``template_analysis`` waiting for a running ``healthcare_classification``)."""
    by_id = {b.id: i for i, b in enumerate(blocked) if b.id is not None}
    memo: dict[int, float | None] = {}
    visiting: set[int] = set()

    def eta_of(i: int) -> float | None:
        if i in memo:
            return memo[i]
        if i in visiting:  # a cycle cannot happen in a queue; never loop on bad input
            return None
        visiting.add(i)
        worst: float | None = 0.0
        for dep in blocked[i].deps:
            expected = ctx.expected(dep.task_type)
            dep_rules = ctx.rules.get(dep.pool)
            if dep.status == "running":
                left = remaining_s(expected, dep.elapsed_s, dep.progress, _UPSTREAM_FLOOR)
                parallel = dep_rules.parallel if dep_rules is not None else 1
                held = load.get(dep.server, 1) if dep.server is not None else 1
                t: float | None = left * max(1.0, held / parallel)
            elif dep.status == "queued":
                cold = 0.0
                if ctx.registered.get(dep.pool, 0) <= 0 and dep_rules is not None:
                    cold = dep_rules.cold_start_s
                t = expected + cold
            else:
                j = by_id.get(dep.id) if dep.id is not None else None
                up = eta_of(j) if j is not None else None
                t = None if up is None else up + expected
            if t is None:
                worst = None
                break
            worst = t if worst is None else max(worst, t)
        visiting.discard(i)
        memo[i] = worst
        return worst

    return [eta_of(i) for i in range(len(blocked))]


def upstream_eta(blocked: Sequence[BlockedTask], ctx: Context, load: Mapping[str, int]) -> float | None:
    """Seconds until the first of ``blocked`` becomes claimable (see :func:`chain_etas`); ``None``
    when none is about to arrive."""
    etas = [e for e in chain_etas(blocked, ctx, load) if e is not None]
    return min(etas) if etas else None


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
    running = [t for t in work.running_of(name) if t.server not in fleet.draining]
    running_work = sum(remaining_s(est(t.task_type), t.elapsed_s, t.progress) for t in running)
    # A draining server's tasks come back to the queue unless they finish within its grace: an
    # idle replica is kept for each (counted as running), so a scale-down that stopped a busy
    # replica (the provider picks which) is not followed, tick after tick, by stopping the next
    # busy one while the idle replica that will take the handed-back task still looks idle.  They
    # never count beyond the idle replicas: a task finishing on a draining replica starts nothing.
    returning = [t for t in work.running_of(name) if t.server in fleet.draining]
    if returning and fleet.idle:
        kept = returning[: fleet.idle]
        running = running + kept
        running_work += sum(remaining_s(est(t.task_type), t.elapsed_s, t.progress) for t in kept)
    # An idle worker while its pool has claimable tasks is about to claim them (a replica that
    # has just registered takes a moment to): it is busy, not surplus.  Stopping it for being idle
    # would stop a replica the queue needs, or, with a provider that picks the replica (the
    # emulator, DataCrunch), a busy one.  The simulator's replicas claim in the same instant.
    idle, busy = fleet.idle, fleet.busy
    claimable = sum(queued.values())
    if idle and busy is not None and claimable:
        rules = ctx.rules.get(name)
        claiming = min(idle, math.ceil(claimable / (rules.tasks_per_replica if rules is not None else 1)))
        idle, busy = idle - claiming, busy + claiming
    etas = work.blocked_etas(ctx) if work.blocked else []
    # About to arrive: blocked tasks of this pool whose chain upstream is under way.  Those that
    # wait only for this pool's own work are taken by the replicas that work frees
    # (slide_feedback after the page batches, template_analysis after healthcare): only the
    # ones beyond those replicas need more (two of the three specialized analyses).
    blocked_n = 0
    blocked_work = 0.0
    eta: float | None = None
    same_n = 0
    same_work = 0.0
    feeders: set[int | str] = set()
    deck_age = pq.oldest_deck_age_s
    for b, e in zip(work.blocked, etas, strict=True):
        if b.pool != name or e is None:
            continue
        eta = e if eta is None else min(eta, e)
        if b.deck_age_s is not None:
            deck_age = b.deck_age_s if deck_age is None else max(deck_age, b.deck_age_s)
        ids = [d.id for d in b.deps if d.id is not None]
        if b.deps and len(ids) == len(b.deps) and all(d.pool == name for d in b.deps):
            same_n += 1
            same_work += est(b.task_type)
            feeders.update(ids)
        else:
            blocked_n += 1
            blocked_work += est(b.task_type)
    extra = max(0, same_n - len(feeders))
    if extra:
        blocked_n += extra
        blocked_work += same_work * extra / same_n
    for t in running:
        if t.deck_age_s is not None:
            deck_age = t.deck_age_s if deck_age is None else max(deck_age, t.deck_age_s)
    return PoolObservation(
        queued=queued,
        # Without the server list the controller cannot tell busy replicas from idle ones: it
        # must not scale down on that, so the running work counts as unknown (the policy holds).
        running=len(running) if fleet.registered is not None else None,
        provider_replicas=fleet.provider_replicas,
        registered=fleet.registered,
        starting=fleet.starting,
        idle_replicas=idle,
        busy_replicas=busy,
        queued_work_s=queued_work,
        running_work_s=running_work,
        blocked_on_running=blocked_n,
        blocked_work_s=blocked_work,
        upstream_eta_s=eta,
        oldest_queued_age_s=pq.oldest_queued_age_s,
        deck_age_s=deck_age,
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
