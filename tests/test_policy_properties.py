"""Property tests (hypothesis) for the policy's invariants:

* the result is always within ``[min_replicas, max_replicas]``;
* never below what running tasks need;
* never a scale-down on unknown data;
* never a scale-up before ``scale_up_delay`` unless there is a critical task, certain work at
  zero, or dependency pre-warm — and a delayed scale-up follows ``scale_up_delay`` of the
  up-condition held without a break: ``scale_up_pending``, or a ``startup_backoff`` hold while the
  work asked for more (the start was due, failed starts held it back); any other decision breaks it;
* the same inputs give the same output;
* closed loop with unchanging work: the count moves one way only (no flapping).
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gpuscale.controller import policy as P
from gpuscale.controller.policy import BudgetView, PoolObservation, PoolState, decide
from gpuscale.controller.pools import PoolRules

SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def rules_st(draw: st.DrawFn) -> PoolRules:
    lo = draw(st.integers(0, 3))
    hi = draw(st.integers(lo, 8))
    return PoolRules(
        name="visual",
        task_types=["visual_analysis", "slide_feedback"],
        min_replicas=lo,
        max_replicas=hi,
        scale_up_threshold=draw(st.integers(1, 5)),
        scale_up_delay_s=draw(st.sampled_from([0.0, 30.0, 120.0])),
        scale_down_delay_s=draw(st.sampled_from([0.0, 60.0, 600.0, "auto"])),
        startup_timeout_s=draw(st.sampled_from([60.0, 300.0])),
        tasks_per_replica=draw(st.integers(1, 4)),
        cold_start_s=draw(st.sampled_from([0.0, 5.0, 120.0])),
        drain_target_s=draw(st.sampled_from([60.0, 600.0])),
        prewarm=draw(st.booleans()),
        sizing=draw(st.sampled_from(["work", "count"])),
        max_step_up=draw(st.sampled_from([None, 1, 2])),
        default_task_duration_s=draw(st.sampled_from([10.0, 60.0, 200.0])),
    )


def maybe(strategy: st.SearchStrategy[Any], none_prob: bool = True) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy) if none_prob else strategy


@st.composite
def obs_st(draw: st.DrawFn, known: bool | None = None, replicas: int | None = None) -> PoolObservation:
    allow_none = known is not True
    queued = draw(
        maybe(
            st.fixed_dictionaries(
                {"normal": st.integers(0, 40), "high": st.integers(0, 5), "critical": st.integers(0, 2)}
            ),
            allow_none,
        )
    )
    running = draw(maybe(st.integers(0, 20), allow_none))
    provider = replicas if replicas is not None else draw(maybe(st.integers(0, 8), allow_none))
    if known is False and queued is not None and running is not None and provider is not None:
        queued = None
    n_start = draw(st.integers(0, provider or 0))
    starting = [(f"r{i}", draw(st.floats(0, 2000))) for i in range(n_start)]
    busy = draw(st.integers(0, max(0, (provider or 0) - n_start)))
    return PoolObservation(
        queued=queued,
        running=running,
        provider_replicas=provider,
        registered=None if provider is None else provider - n_start,
        starting=starting,
        busy_replicas=busy if running else 0,
        queued_work_s=draw(maybe(st.floats(0, 20_000))),
        running_work_s=draw(maybe(st.floats(0, 5_000))),
        blocked_on_running=draw(st.integers(0, 10)),
        blocked_work_s=draw(maybe(st.floats(0, 2_000))),
        upstream_eta_s=draw(maybe(st.floats(0, 1_000))),
    )


@st.composite
def state_st(draw: st.DrawFn) -> PoolState:
    now = 2000.0
    return PoolState(
        desired=draw(st.one_of(st.none(), st.integers(0, 8))),
        up_since=draw(st.one_of(st.none(), st.floats(0, now))),
        surplus_since=tuple(sorted(draw(st.lists(st.floats(0, now), max_size=4)))),
        queue_empty_since=draw(st.one_of(st.none(), st.floats(0, now))),
        startup_failures=draw(st.integers(0, 4)),
        idle_gaps=tuple(draw(st.lists(st.floats(0, 300), max_size=10))),
    )


budget_st = st.one_of(
    st.none(), st.builds(BudgetView, monthly_budget_usd=st.just(100.0), projected_usd=st.floats(0, 200))
)


def running_need(rules: PoolRules, o: PoolObservation) -> int:
    assert o.running is not None
    return min(max(o.busy_replicas or 0, math.ceil(o.running / rules.tasks_per_replica)), rules.max_replicas)


@SETTINGS
@given(rules_st(), obs_st(), state_st(), budget_st, st.booleans())
def test_within_bounds_and_deterministic(
    rules: PoolRules, o: PoolObservation, state: PoolState, budget: BudgetView | None, crit: bool
) -> None:
    d = decide(rules, o, state, 2000.0, budget=budget, critical_immediate=crit)
    assert rules.min_replicas <= d.desired <= rules.max_replicas
    assert d.reason in P.REASONS
    assert d.state.desired == d.desired
    assert d == decide(rules, o, state, 2000.0, budget=budget, critical_immediate=crit)


@SETTINGS
@given(rules_st(), obs_st(known=True), state_st(), budget_st)
def test_never_below_running_need(
    rules: PoolRules, o: PoolObservation, state: PoolState, budget: BudgetView | None
) -> None:
    d = decide(rules, o, state, 2000.0, budget=budget)
    assert d.desired >= running_need(rules, o)


@SETTINGS
@given(rules_st(), obs_st(known=False), state_st())
def test_never_down_on_unknown(rules: PoolRules, o: PoolObservation, state: PoolState) -> None:
    d = decide(rules, o, state, 2000.0)
    assert d.reason == P.HOLD_UNKNOWN
    if o.provider_replicas is not None:
        # Exactly what runs (within the rules' bounds): no change is applied on missing data.
        assert d.desired == max(rules.min_replicas, min(o.provider_replicas, rules.max_replicas))
    elif state.desired is not None:
        assert d.desired >= min(state.desired, rules.max_replicas)


IMMEDIATE = {P.CRITICAL_TASK, P.SCALE_FROM_ZERO, P.PREWARM_DEPENDENCY, P.MIN_REPLICAS}


@SETTINGS
@given(rules_st(), st.lists(st.tuples(st.floats(1, 90), obs_st(known=True)), min_size=1, max_size=12))
def test_no_scale_up_before_the_delay(rules: PoolRules, steps: list[tuple[float, PoolObservation]]) -> None:
    state = PoolState()
    now = 1000.0
    # (now, reason, whether the work asked for more replicas than existed)
    history: list[tuple[float, str, bool]] = []
    for dt, o in steps:
        now += dt
        d = decide(rules, o, state, now)
        state = d.state
        if d.desired > d.current:
            if d.reason == P.CRITICAL_TASK:
                assert o.queued_critical > 0
            elif d.reason == P.SCALE_FROM_ZERO:
                assert d.current == 0 and (o.queued_total or 0) > 0
            elif d.reason == P.PREWARM_DEPENDENCY:
                assert (o.blocked_on_running or 0) > 0 and rules.prewarm
            elif d.reason == P.MIN_REPLICAS:
                assert d.current < rules.min_replicas
            elif d.reason == P.RUNNING_NEED:
                assert d.current < running_need(rules, o)
            elif d.reason == P.BUDGET_CAP:
                assert d.current == 0 and d.desired == 1
            else:
                assert d.reason == P.QUEUE_ABOVE_THRESHOLD
                # The condition held without a break for the whole delay: ticks waiting on it, or
                # held back by startup backoff while the work still asked for more.
                start = now
                for t, reason, wanted_more in reversed(history):
                    held = reason == P.SCALE_UP_PENDING or (reason == P.STARTUP_BACKOFF and wanted_more)
                    if not held:
                        break
                    start = t
                assert now - start >= rules.scale_up_delay_s
        history.append((now, d.reason, d.target > d.current))


@SETTINGS
@given(rules_st(), obs_st(known=True, replicas=0), st.integers(0, 8), budget_st)
def test_closed_loop_does_not_flap(
    rules: PoolRules, o: PoolObservation, start: int, budget: BudgetView | None
) -> None:
    """The work does not change; the pool gets what it asks for each tick: it moves one way."""
    current = min(start, rules.max_replicas)
    state = PoolState()
    directions: list[int] = []
    now = 0.0
    for _ in range(40):
        obs = PoolObservation(
            queued=o.queued,
            running=o.running,
            provider_replicas=current,
            registered=current,
            busy_replicas=min(o.busy_replicas or 0, current),
            queued_work_s=o.queued_work_s,
            running_work_s=o.running_work_s,
            blocked_on_running=o.blocked_on_running,
            blocked_work_s=o.blocked_work_s,
            upstream_eta_s=o.upstream_eta_s,
        )
        d = decide(rules, obs, state, now, budget=budget)
        state = d.state
        if d.desired != current:
            directions.append(1 if d.desired > current else -1)
        current = d.desired
        now += 30.0
    assert len(set(directions)) <= 1, directions
