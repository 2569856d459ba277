"""The scaling policy: a pure function from (pool rules, observation, memory, time) to a decision.

No I/O and no clock reads: ``now`` is passed in and the pool's memory between ticks
(:class:`PoolState`) goes in and comes back out as plain data.  The controller stores the state
and acts on the decision; the simulator calls the very same :func:`decide` with a virtual clock.

How it decides, per pool (``sizing: work``, the default):

* **Work, not counts.**  The queued and running work is estimated in GPU-seconds (expected
  durations per task type, refined by the caller from observed durations).  Replicas are added
  one step at a time while the backlog would not clear within ``drain_target`` *and* the next
  step saves more time than the cold start it costs; tasks are indivisible, so a step that does
  not shorten the busiest replica's share saves nothing.
* **Deadlines (``stage_deadline``).**  A pool may say by when, after a deck's upload, its part of
  the deck should be done.  The drain target is then what is left of that for the oldest deck
  with work in the pool (queued, running or about to arrive), and replicas are added while it is
  not met and the step makes the work finish sooner (a cold start is worth a deck's deadline,
  a replica that would be ready only after the others are done is not); the queue-threshold
  count rule does not apply.  Work about to arrive is sized from when it will arrive, with only
  the part of the cold start the upstream work does not cover, and pre-warm starts exactly one
  cold start ahead (not a tick early: an idle replica waiting for work costs).
* **Delays.**  The up-condition (more replicas wanted than exist) must hold for
  ``scale_up_delay``, except: a ``critical`` task (when ``critical_immediate``), certain work
  queued while the pool is at zero (nothing can serve it; waiting only adds latency), and
  dependency pre-warm.
* **Pre-warm by dependency.**  Tasks blocked only on upstream work that is already running are
  work about to arrive; when the upstream ETA is within the cold start, replicas start now so
  their cold start overlaps the upstream work.  A per-pool switch (``prewarm``).
* **Down, one replica at a time.**  Each replica above what the work needs (and never below the
  replicas that hold running tasks, nor ``min_replicas``) is stopped once it has been surplus for
  ``scale_down_delay`` (``auto``: its cold start, the ski-rental break-even).  When the provider
  picks which replica a lower count stops (``scale_down_victims: any``, as DataCrunch does), a
  stop may hit a busy replica and lose its work: idle replicas then wait for the busy ones while
  that is the cheaper of the two on average (see :func:`_worth_a_random_stop`).
* **Unknown is not zero.**  A missing observation (database or provider error) holds the current
  count and never scales down.
* **Startup timeout.**  A replica not registered within ``startup_timeout`` has failed: its id
  is in ``replace`` (the caller stops it, then brings the count to ``desired``).  The first
  failure is replaced at once; repeated failures back off exponentially (no new replicas
  meanwhile), then probe with one replica at a time until one registers.
* **Budget.**  When projected monthly spend exceeds the budget, non-critical scale-ups are capped
  (a pool at zero with queued work still gets one replica, so work finishes, slowly).
* **No flapping.**  An up needs the condition for ``scale_up_delay`` (or new certain work); a down
  needs the surplus for ``scale_down_delay`` and comes no sooner than ``max(scale_up_delay,
  cold_start)`` after an up; the two conditions exclude each other, so a decision never reverses
  the previous one within the delays.

``sizing: count`` is the seeds' rule, kept as a baseline: tasks waiting ≥ threshold for the delay
→ ``ceil(tasks / tasks_per_replica)``; the queue empty for ``scale_down_delay`` → back to the
running need (zero when idle).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Final

from gpuscale.controller.pools import PoolRules

PRIORITIES: Final = ("normal", "high", "critical")

# Machine-readable reasons (metrics label values; keep them stable).
QUEUE_ABOVE_THRESHOLD: Final = "queue_above_threshold"
SCALE_FROM_ZERO: Final = "scale_from_zero"
CRITICAL_TASK: Final = "critical_task"
PREWARM_DEPENDENCY: Final = "prewarm_dependency"
IDLE_TIMEOUT: Final = "idle_timeout"
STARTUP_TIMEOUT: Final = "startup_timeout"
STARTUP_BACKOFF: Final = "startup_backoff"
BUDGET_CAP: Final = "budget_cap"
HOLD_UNKNOWN: Final = "hold_unknown"
MIN_REPLICAS: Final = "min_replicas"
MAX_REPLICAS: Final = "max_replicas"
RUNNING_NEED: Final = "running_need"
SCALE_UP_PENDING: Final = "scale_up_pending"
SCALE_DOWN_PENDING: Final = "scale_down_pending"
HOLD: Final = "hold"

REASONS: Final = (
    QUEUE_ABOVE_THRESHOLD,
    SCALE_FROM_ZERO,
    CRITICAL_TASK,
    PREWARM_DEPENDENCY,
    IDLE_TIMEOUT,
    STARTUP_TIMEOUT,
    STARTUP_BACKOFF,
    BUDGET_CAP,
    HOLD_UNKNOWN,
    MIN_REPLICAS,
    MAX_REPLICAS,
    RUNNING_NEED,
    SCALE_UP_PENDING,
    SCALE_DOWN_PENDING,
    HOLD,
)


@dataclass(frozen=True)
class PoolObservation:
    """What the controller saw of one pool this tick.  ``None`` means unknown (an error), not 0."""

    # Claimable tasks by priority ('normal', 'high', 'critical').
    queued: Mapping[str, int] | None
    running: int | None
    # Replicas the provider reports for the pool's deployment (running + starting).
    provider_replicas: int | None
    # Replicas registered and heartbeating.
    registered: int | None = None
    # (replica id, requested at epoch s) of replicas requested but not registered yet.
    starting: Sequence[tuple[str, float]] = ()
    # Registered replicas holding no task / holding at least one task.
    idle_replicas: int | None = None
    busy_replicas: int | None = None
    # Estimated GPU-seconds of queued work, and remaining work of running tasks (None: estimate
    # from counts with the pool's default task duration).
    queued_work_s: float | None = None
    running_work_s: float | None = None
    # Blocked tasks of this pool whose unfinished dependencies are all running/queued elsewhere,
    # their estimated work, and the estimated seconds until those dependencies finish.
    blocked_on_running: int | None = 0
    blocked_work_s: float | None = None
    upstream_eta_s: float | None = None
    oldest_queued_age_s: float | None = None
    # Age of the oldest deck (task graph) with work queued, running or about to arrive in this
    # pool: how much of its deadline is spent (``stage_deadline`` sizing).
    deck_age_s: float | None = None

    @property
    def queued_total(self) -> int | None:
        if self.queued is None:
            return None
        return sum(max(0, int(v)) for v in self.queued.values())

    @property
    def queued_critical(self) -> int:
        return 0 if self.queued is None else max(0, int(self.queued.get("critical", 0)))

    @property
    def unknown(self) -> bool:
        return self.queued is None or self.running is None or self.provider_replicas is None


@dataclass(frozen=True)
class PoolState:
    """The pool's memory between ticks; :func:`decide` returns it updated for the caller to keep."""

    desired: int | None = None  # last decided count (None: no decision yet)
    up_since: float | None = None  # since when the up-condition has held without a break
    surplus_since: tuple[float, ...] = ()  # per surplus replica, since when it has been surplus
    queue_empty_since: float | None = None  # count sizing: since when nothing was queued
    last_change_at: float | None = None
    last_direction: int = 0  # +1 up, -1 down, 0 none yet
    startup_failures: int = 0  # consecutive startup timeouts (reset by a successful start)
    backoff_until: float | None = None  # no new replicas before this (after repeated failures)
    replaced_total: int = 0
    last_registered: int | None = None  # registered replicas seen last tick
    # scale_down_delay: auto — per replica level, since when the work has not needed it (inf: gap
    # already recorded as long), and the recent idle gaps seen (seconds; "long" = 2 × cold start).
    gap_start: tuple[float | None, ...] = ()
    idle_gaps: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form, for the controller to persist between runs (``inf`` becomes -1)."""
        out = asdict(self)
        out["gap_start"] = [(-1.0 if v is not None and math.isinf(v) else v) for v in self.gap_start]
        for key in ("surplus_since", "idle_gaps"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PoolState:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing ones take defaults."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in known}
        for key in ("surplus_since", "idle_gaps"):
            if key in kw:
                kw[key] = tuple(kw[key])
        if "gap_start" in kw:
            kw["gap_start"] = tuple(math.inf if v == -1.0 else v for v in kw["gap_start"])
        return cls(**kw)


@dataclass(frozen=True)
class BudgetView:
    """Monthly budget and the caller's projection (spend so far + current run rate to month end)."""

    monthly_budget_usd: float
    projected_usd: float

    @property
    def over(self) -> bool:
        return self.projected_usd > self.monthly_budget_usd


@dataclass(frozen=True)
class Decision:
    desired: int
    current: int
    reason: str
    detail: str
    state: PoolState
    # Replicas that failed to start: stop these, then bring the count to ``desired``.
    replace: tuple[str, ...] = ()
    # What the work alone asks for (before delays, budget, step limits), for metrics and status.
    target: int = 0
    extra: Mapping[str, float] = field(default_factory=dict)

    @property
    def direction(self) -> int:
        return (self.desired > self.current) - (self.desired < self.current)


class DurationEstimator:
    """Expected solo duration (GPU-seconds alone on a replica) per task type: the pools file's
    value at first, then an exponentially weighted mean of observed durations.

    Not part of :func:`decide` (which sees only the resulting work estimates); the controller and
    the simulator keep one and feed it finished tasks."""

    def __init__(self, pools: Iterable[PoolRules], alpha: float = 0.2, fallback_s: float = 60.0) -> None:
        self._alpha = alpha
        self._fallback = fallback_s
        self._mean: dict[str, float] = {}
        for rules in pools:
            for t in rules.task_types:
                self._mean[t] = rules.duration_for(t)

    def expected(self, task_type: str) -> float:
        return self._mean.get(task_type, self._fallback)

    def observe(self, task_type: str, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            return
        old = self._mean.get(task_type)
        self._mean[task_type] = seconds if old is None else old + self._alpha * (seconds - old)

    def snapshot(self) -> dict[str, float]:
        return dict(self._mean)

    def restore(self, learned: Mapping[str, Any]) -> None:
        """Take over values a previous :meth:`snapshot` saved (bad entries are skipped)."""
        for task_type, value in learned.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                if math.isfinite(value) and value >= 0:
                    self._mean[str(task_type)] = float(value)


# ---------------------------------------------------------------------------------------------
# Work sizing


def drain_time(work_s: float, tasks: int, n: int, ready: int, cold_start_s: float) -> float:
    """Seconds to clear ``work_s`` GPU-seconds in ``tasks`` indivisible tasks on ``n`` replicas,
    ``ready`` of them up now and the rest after ``cold_start_s``.

    Tasks are indivisible, so the busiest replica carries ``ceil(tasks / n)`` of them; the
    estimate charges the cold start to every plan that needs a new replica (conservative: the
    ready ones do work meanwhile, so it leans towards fewer starts, i.e. lower cost)."""
    if tasks <= 0 or work_s <= 0:
        return 0.0
    if n <= 0:
        return math.inf
    share = work_s * math.ceil(tasks / n) / tasks
    return share + (cold_start_s if n > ready else 0.0)


def work_replicas(
    rules: PoolRules,
    work_s: float,
    tasks: int,
    ready: int,
    *,
    start: int = 0,
    cap: int | None = None,
    drain_target_s: float | None = None,
    marginal: bool = True,
    cold_s: float | None = None,
) -> int:
    """Replicas the work needs: grow while the backlog would not clear within ``drain_target``
    (``drain_target_s`` when given) and — with ``marginal`` — the next useful step saves more time
    than the cold starts it costs.  Without ``marginal`` (deadline sizing) any step that makes the
    work finish sooner counts: a deck's deadline is worth the cold starts, but a replica that
    would be ready only after the others are done is not.  ``cold_s``: seconds until a replica
    started now can work (default: the cold start)."""
    cap = rules.max_replicas if cap is None else cap
    target = rules.drain_target_s if drain_target_s is None else drain_target_s
    if tasks <= 0 or work_s <= 0:
        return min(start, cap)
    c = rules.cold_start_s if cold_s is None else max(0.0, cold_s)
    n = max(1, start)
    limit = min(cap, tasks)  # more replicas than tasks cannot help
    while n < limit:
        now_t = drain_time(work_s, tasks, n, ready, c)
        if now_t <= target:
            break
        # Next n that actually shortens the busiest replica's share (tasks are indivisible).
        share = math.ceil(tasks / n)
        nxt = n + 1
        while nxt < limit and math.ceil(tasks / nxt) >= share:
            nxt += 1
        if math.ceil(tasks / nxt) >= share:
            break
        saved = now_t - drain_time(work_s, tasks, nxt, ready, c)
        new_starts = max(0, nxt - max(n, ready))
        if saved <= (c * max(1, new_starts) if marginal else 0.0):
            break
        n = nxt
    return min(n, cap)


def _clamp(n: int, rules: PoolRules) -> int:
    return max(rules.min_replicas, min(rules.max_replicas, n))


def _surplus_timers(prev: tuple[float, ...], surplus: int, now: float) -> tuple[float, ...]:
    """Per-level timers: level i (0-based) has been surplus since ``timers[i]``."""
    if surplus <= 0:
        return ()
    kept = prev[:surplus]
    return kept + (now,) * (surplus - len(kept))


_MAX_GAPS = 64
_MIN_GAPS = 3


def _track_gaps(
    state: PoolState, need: int, current: int, now: float, cold_start_s: float
) -> tuple[tuple[float | None, ...], tuple[float, ...]]:
    """Record idle gaps per replica level: level L is idle while the work needs fewer than L
    replicas.  A gap ends when the work needs the level again, or counts as long once it passed
    the cold start (beyond that, every idle timeout up to the cold start costs the same)."""
    starts: list[float | None] = list(state.gap_start)
    starts += [None] * (max(current, need) - len(starts))
    gaps = list(state.idle_gaps)
    for i, start in enumerate(starts):
        level = i + 1
        if need >= level:
            if start is not None and math.isfinite(start):
                gaps.append(now - start)
            starts[i] = None
        elif start is None:
            if level <= current:
                starts[i] = now
        elif math.isfinite(start) and now - start > cold_start_s:
            gaps.append(2 * cold_start_s)
            starts[i] = math.inf
    while starts and starts[-1] is None:
        starts.pop()
    return tuple(starts), tuple(gaps[-_MAX_GAPS:])


def _worth_a_random_stop(rules: PoolRules, obs: PoolObservation, busy: int) -> bool:
    """With a provider that picks the replica to stop (``scale_down_victims: any``): is lowering
    the count now cheaper, on average, than keeping the idle replicas until the busy ones finish?

    Each replica stopped is a busy one with probability ``busy / up`` (``up``: registered and
    serving, starting ones are cancelled first); a busy one loses the work done so far on its
    task, and its deck waits about a cold start more.  Keeping it costs the busy replicas'
    mean remaining work.  Elapsed work is estimated as the pool's typical task minus that."""
    starting = len(obs.starting)
    up = max(1, (obs.provider_replicas or 0) - starting)
    if obs.running_work_s is not None:
        remaining = obs.running_work_s / busy
    else:
        remaining = rules.default_task_duration_s / 2
    elapsed = max(0.0, rules.default_task_duration_s - remaining)
    return busy / up * (elapsed + rules.cold_start_s) < remaining


def _min_hold(rules: PoolRules, tick_s: float) -> float:
    """After a scale-up, no scale-down for this long: the new replicas get to start and serve.

    One tick beyond the cold start: a replica registers and claims a moment after its cold
    start ends, so a hold that ends with the cold start stopped it as surplus just as it was
    about to take its task (the replay caught it: the next tick started another, a whole cold
    start later)."""
    return max(rules.scale_up_delay_s, rules.cold_start_s + tick_s)


def idle_timeout(rules: PoolRules, state: PoolState, tick_s: float = 10.0) -> float:
    """The idle timeout in force: ``scale_down_delay``, or for ``auto`` the ski-rental choice.

    Keeping an idle replica costs its price per second; stopping it costs a cold start when work
    comes back.  Until a few idle gaps have been seen, wait one cold start (the break-even: never
    more than twice the best idle cost).  Then pick the timeout T that would have cost least over
    the recent gaps g: ``g`` when ``g <= T`` (kept, then used), else ``T + cold_start``."""
    if not rules.scale_down_auto:
        return rules.idle_timeout_s
    c = rules.cold_start_s
    gaps = state.idle_gaps
    if len(gaps) < _MIN_GAPS:
        return c
    candidates = sorted({tick_s, c, *(g for g in gaps if tick_s < g < c)})

    def cost(t: float) -> float:
        return sum(g if g <= t else t + c for g in gaps)

    # Ties go to the longer timeout: same cost, fewer cold starts for the work.
    return min(candidates, key=lambda t: (cost(t), -t))


# ---------------------------------------------------------------------------------------------
# The decision


def decide(
    rules: PoolRules,
    obs: PoolObservation,
    state: PoolState,
    now: float,
    *,
    budget: BudgetView | None = None,
    critical_immediate: bool = True,
    tick_s: float = 10.0,
) -> Decision:
    """Decide the pool's replica count.  Pure: the same arguments always give the same decision.

    ``tick_s`` is the caller's reconcile interval; pre-warm starts one tick early so that a
    replica is ready when the upstream work finishes rather than up to a tick later."""
    # --- unknown is not zero ------------------------------------------------------------------
    if obs.unknown:
        if obs.provider_replicas is not None:
            held = obs.provider_replicas
        elif state.desired is not None:
            held = state.desired
        else:
            held = rules.min_replicas
        # Hold what runs now.  Not the last decision when it differs: that would apply a change
        # (say a scale-up whose provider call failed) on data we do not have.
        held = _clamp(held, rules)
        missing = [
            name
            for name, value in (
                ("queue", obs.queued),
                ("running", obs.running),
                ("provider replicas", obs.provider_replicas),
            )
            if value is None
        ]
        new_state = replace(state, desired=held, up_since=None, surplus_since=(), queue_empty_since=None)
        return Decision(
            desired=held,
            current=obs.provider_replicas if obs.provider_replicas is not None else held,
            reason=HOLD_UNKNOWN,
            detail=f"holding {held}: {', '.join(missing)} unknown",
            state=new_state,
            target=held,
        )

    assert obs.queued is not None and obs.running is not None and obs.provider_replicas is not None
    current = max(0, obs.provider_replicas)
    queued = obs.queued_total or 0
    critical = obs.queued_critical
    running = max(0, obs.running)
    tpr = rules.tasks_per_replica
    starting_ids = tuple(rid for rid, _ in obs.starting)
    ready = max(0, current - len(starting_ids))

    # --- startup timeouts, with backoff -------------------------------------------------------
    overdue = tuple(rid for rid, t0 in obs.starting if now - t0 >= rules.startup_timeout_s)
    failures = state.startup_failures
    # More replicas registered than last tick: starts work again, forget past failures.
    if (
        obs.registered is not None
        and state.last_registered is not None
        and obs.registered > state.last_registered
    ):
        failures = 0
    replace_ids: tuple[str, ...] = ()
    replaced_total = state.replaced_total
    backoff_until = state.backoff_until
    if overdue:
        # Failed: stop them.  The first failure is replaced at once; after that, the next try
        # waits startup_backoff × 2^(n-2) (up to max_startup_backoff), then probes with one.
        replace_ids = overdue
        failures += 1
        replaced_total += len(overdue)
        delay = 0.0
        if failures > 1:
            delay = min(rules.startup_backoff_s * 2 ** (failures - 2), rules.max_startup_backoff_s)
        backoff_until = now + delay if delay > 0 else None
    if backoff_until is not None and now >= backoff_until:
        backoff_until = None
    in_backoff = backoff_until is not None

    # --- running need: never below the replicas holding running tasks -------------------------
    busy = obs.busy_replicas if obs.busy_replicas is not None else 0
    floor_running = min(max(busy, math.ceil(running / tpr)), rules.max_replicas)

    # --- what the work asks for ---------------------------------------------------------------
    blocked = max(0, obs.blocked_on_running or 0) if rules.prewarm else 0
    blocked_work = 0.0
    if blocked:
        blocked_work = (
            obs.blocked_work_s if obs.blocked_work_s is not None else blocked * rules.default_task_duration_s
        )
    eta = obs.upstream_eta_s
    if rules.sizing == "count":
        need = math.ceil((queued + running) / tpr)
        up_wanted = queued >= rules.scale_up_threshold or critical > 0 or (current == 0 and queued > 0)
        target = _clamp(max(need if up_wanted else 0, floor_running), rules)
        prewarm_target = 0
    else:
        q_work = (
            obs.queued_work_s if obs.queued_work_s is not None else queued * rules.default_task_duration_s
        )
        r_work = (
            obs.running_work_s
            if obs.running_work_s is not None
            else running * rules.default_task_duration_s / 2
        )
        tasks = queued + running
        # Deadline sizing (``stage_deadline``): the pool's share of the oldest deck's time left
        # is the drain target, and replicas are worth their cold start while it is not met.
        deadline = rules.stage_deadline_s is not None
        drain: float | None = None
        if rules.stage_deadline_s is not None:
            drain = max(1.0, rules.stage_deadline_s - (obs.deck_age_s or 0.0))
        n = work_replicas(rules, q_work + r_work, tasks, ready, drain_target_s=drain, marginal=not deadline)
        # Tasks waiting for a slot count once they reach the threshold (or nothing serves them);
        # with deadline sizing the deadline alone says how many replicas the work is worth.
        if not deadline and (queued >= rules.scale_up_threshold or current == 0):
            n = max(n, math.ceil(tasks / tpr))
        if queued > 0:
            n = max(n, 1)
        if critical and critical_immediate and not deadline:
            # Critical tasks claim first: they need a slot on a replica that exists or is starting.
            # (With a deadline they claim first too; the deadline says how many replicas.)
            n = max(n, math.ceil((running + critical) / tpr))
        target = _clamp(max(n, floor_running), rules)
        prewarm_target = 0
        lead = rules.cold_start_s + (0.0 if rules.stage_deadline_s is not None else tick_s)
        if blocked and (eta is None or eta <= lead):
            if drain is None:
                prewarm_target = _clamp(
                    work_replicas(rules, q_work + r_work + blocked_work, tasks + blocked, ready), rules
                )
            else:
                # Counted from when the upstream work is done: what is left of the deadline then,
                # and the part of a cold start that the upstream work does not cover.
                lead_s = eta or 0.0
                prewarm_target = _clamp(
                    work_replicas(
                        rules,
                        q_work + r_work + blocked_work,
                        tasks + blocked,
                        ready,
                        drain_target_s=max(1.0, drain - lead_s),
                        marginal=False,
                        cold_s=rules.cold_start_s - lead_s,
                    ),
                    rules,
                )

    # Work due within a cold start keeps the replicas pre-warm would start for it: idling until
    # it arrives costs less than stopping now and starting again (and cannot flap with pre-warm).
    keep = max(target, prewarm_target)

    gap_start, idle_gaps = state.gap_start, state.idle_gaps
    if rules.sizing == "work" and rules.scale_down_auto:
        gap_start, idle_gaps = _track_gaps(state, max(keep, floor_running), current, now, rules.cold_start_s)
    # The up-condition's timer survives only the ticks that wait on it (scale_up_pending, and the
    # backoff and budget holds that keep it explicitly).  Every other outcome breaks it: the
    # running-need, min/max and startup-timeout corrections below change or re-check the count, so
    # a later queue scale-up must wait the whole delay again from the new count, not inherit a
    # timer started before the break.
    new = replace(
        state,
        up_since=None,
        gap_start=gap_start,
        idle_gaps=idle_gaps,
        startup_failures=failures,
        backoff_until=backoff_until,
        replaced_total=replaced_total,
        last_registered=obs.registered if obs.registered is not None else state.last_registered,
    )
    extra = {"queued": float(queued), "running": float(running), "floor_running": float(floor_running)}

    def done(desired: int, reason: str, detail: str, **changes: object) -> Decision:
        desired = _clamp(desired, rules)
        st = replace(new, desired=desired, **changes)  # type: ignore[arg-type]
        if desired != current:
            st = replace(st, last_change_at=now, last_direction=1 if desired > current else -1)
        return Decision(desired, current, reason, detail, st, replace_ids, target, extra)

    # Outside [min, max] (rules changed): move into range at once.
    # Tasks running on more replicas than the provider reports: never below them either.
    lowest = _clamp(max(rules.min_replicas, floor_running), rules)
    if current < lowest:
        if floor_running > rules.min_replicas:
            return done(lowest, RUNNING_NEED, f"{running} running tasks need {floor_running} replica(s)")
        return done(lowest, MIN_REPLICAS, f"below min_replicas {rules.min_replicas}")
    if current > rules.max_replicas:
        return done(rules.max_replicas, MAX_REPLICAS, f"above max_replicas {rules.max_replicas}")

    if replace_ids:
        if backoff_until is not None:
            keep_n = _clamp(max(current - len(replace_ids), floor_running), rules)
            detail = (
                f"{len(replace_ids)} replica(s) not registered within {rules.startup_timeout_s:.0f}s "
                f"(failure #{failures} in a row): stopping them, next try in {backoff_until - now:.0f}s"
            )
        else:
            keep_n = current
            detail = (
                f"{len(replace_ids)} replica(s) not registered in {rules.startup_timeout_s:.0f}s: replacing"
            )
        return done(keep_n, STARTUP_TIMEOUT, detail, surplus_since=())

    # --- scale up -----------------------------------------------------------------------------
    up_target = max(target, prewarm_target)
    if up_target > current:
        reason: str | None = None
        proposed = target
        up_since = state.up_since
        if target > current:
            up_since = now if up_since is None else up_since
        else:
            up_since = None
        if critical and critical_immediate and target > current:
            reason = CRITICAL_TASK
        elif current == 0 and queued > 0 and rules.sizing == "work":
            reason = SCALE_FROM_ZERO
        elif target > current and up_since is not None and now - up_since >= rules.scale_up_delay_s:
            reason = QUEUE_ABOVE_THRESHOLD
        if prewarm_target > current and (reason is None or prewarm_target > proposed):
            if reason is None:
                reason, proposed = PREWARM_DEPENDENCY, prewarm_target
            else:
                proposed = prewarm_target
        if reason is not None and failures > 0:
            # Starts have been failing: no new replica during the backoff, then one probe at a
            # time until one registers (a broken image must not burn a whole pool's worth).
            if in_backoff or obs.starting:
                wait = (
                    f"{backoff_until - now:.0f}s of backoff left" if backoff_until else "a probe is starting"
                )
                return done(
                    current,
                    STARTUP_BACKOFF,
                    f"{failures} failed start(s) in a row; {wait}",
                    up_since=up_since,
                    surplus_since=(),
                )
            proposed = current + 1
        if reason is not None:
            proposed = max(proposed, current + 1)
            if rules.max_step_up is not None and reason != CRITICAL_TASK:
                proposed = min(proposed, current + rules.max_step_up)
            detail = (
                f"{current} → {proposed}: {queued} queued ({critical} critical), {running} running, "
                f"{blocked} about to arrive"
            )
            if budget is not None and budget.over and reason != CRITICAL_TASK:
                cap = max(current, 1 if (current == 0 and queued > 0) else current)
                if proposed > cap:
                    return done(
                        cap,
                        BUDGET_CAP,
                        f"projected spend ${budget.projected_usd:.2f} exceeds the monthly budget "
                        f"${budget.monthly_budget_usd:.2f}: capped at {cap} (work asks for {proposed})",
                        up_since=up_since,
                        surplus_since=(),
                    )
            return done(proposed, reason, detail, up_since=None, surplus_since=(), queue_empty_since=None)
        waited = 0.0 if up_since is None else now - up_since
        return done(
            current,
            SCALE_UP_PENDING,
            f"work asks for {target}, condition held {waited:.0f}s of {rules.scale_up_delay_s:.0f}s",
            up_since=up_since,
            surplus_since=(),
        )

    # --- scale down ---------------------------------------------------------------------------
    if rules.sizing == "count":
        empty_since = state.queue_empty_since
        if queued == 0:
            empty_since = now if empty_since is None else empty_since
        else:
            empty_since = None
        floor = _clamp(max(floor_running, target), rules)
        if floor < current and empty_since is not None and now - empty_since >= rules.idle_timeout_s:
            return done(
                floor,
                IDLE_TIMEOUT,
                f"queue empty for {now - empty_since:.0f}s: {current} → {floor}",
                up_since=None,
                queue_empty_since=empty_since,
            )
        if floor < current and empty_since is not None:
            left = rules.idle_timeout_s - (now - empty_since)
            return done(
                current,
                SCALE_DOWN_PENDING,
                f"queue empty; {current - floor} replica(s) stop in {left:.0f}s",
                up_since=None,
                queue_empty_since=empty_since,
            )
        return done(current, HOLD, "no change", up_since=None, queue_empty_since=empty_since)

    floor = _clamp(max(keep, floor_running), rules)
    surplus = current - floor
    timers = _surplus_timers(state.surplus_since, surplus, now)
    timeout = idle_timeout(rules, new, tick_s)
    expired = sum(1 for t in timers if now - t >= timeout)
    # A replica just asked for gets to start before it can be given back: no reversal of a
    # scale-up within _min_hold (no flapping, even with a short learned idle timeout).
    if expired and state.last_direction > 0 and state.last_change_at is not None:
        if now - state.last_change_at < _min_hold(rules, tick_s):
            expired = 0
    if (
        expired
        and rules.scale_down_victims == "any"
        and busy > 0
        and not _worth_a_random_stop(rules, obs, busy)
    ):
        n_up = max(1, current - len(starting_ids))
        return done(
            current,
            SCALE_DOWN_PENDING,
            f"{expired} idle replica(s) wait for the {busy} busy of {n_up}: the provider picks which stops",
            up_since=None,
            surplus_since=timers,
        )
    if expired:
        desired = current - expired
        remaining = timers[expired:]
        reason = IDLE_TIMEOUT
        return done(
            desired,
            reason,
            f"{expired} replica(s) idle for {timeout:.0f}s: {current} → {desired}",
            up_since=None,
            surplus_since=remaining,
        )
    if timers:
        return done(
            current,
            SCALE_DOWN_PENDING,
            f"{surplus} surplus replica(s), first stops in {timeout - (now - timers[0]):.0f}s",
            up_since=None,
            surplus_since=timers,
        )
    return done(current, HOLD, "no change", up_since=None, surplus_since=())
