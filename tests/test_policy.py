"""The scaling policy, one rule at a time (pure function: plain data in, plain data out)."""

from __future__ import annotations

from typing import Any

import pytest

from gpuscale.controller import policy as P
from gpuscale.controller.policy import BudgetView, PoolObservation, PoolState, decide, idle_timeout
from gpuscale.controller.pools import PoolRules


def rules(**kw: Any) -> PoolRules:
    base: dict[str, Any] = {
        "name": "visual",
        "task_types": ["visual_analysis", "slide_feedback"],
        "min_replicas": 0,
        "max_replicas": 6,
        "scale_up_threshold": 2,
        "scale_up_delay_s": 60,
        "scale_down_delay_s": 120,
        "startup_timeout_s": 300,
        "tasks_per_replica": 2,
        "cold_start_s": 120,
        "drain_target_s": 600,
        "default_task_duration_s": 200,
    }
    base.update(kw)
    return PoolRules(**base)


def obs(
    queued: int | dict[str, int] | None = 0,
    running: int | None = 0,
    replicas: int | None = 0,
    **kw: Any,
) -> PoolObservation:
    q = {"normal": queued} if isinstance(queued, int) else queued
    return PoolObservation(queued=q, running=running, provider_replicas=replicas, **kw)


def run(r: PoolRules, observations: list[tuple[float, PoolObservation]], state: PoolState | None = None):
    state = state or PoolState()
    out = []
    for now, o in observations:
        d = decide(r, o, state, now)
        state = d.state
        out.append(d)
    return out


def test_scale_from_zero_at_once_for_certain_work() -> None:
    d = decide(rules(), obs(queued=1), PoolState(), 0.0)
    assert (d.desired, d.reason) == (1, P.SCALE_FROM_ZERO)
    assert d.direction == 1


def test_sized_by_work_not_counts() -> None:
    r = rules()
    # Four 200 s batches: one replica = 120 s start + 800 s; two save 400 s > a cold start.
    d = decide(r, obs(queued=4, queued_work_s=800), PoolState(), 0.0)
    assert d.desired == 2
    # Four 10 s tasks: a second replica would save nothing worth a cold start.
    r4 = r.model_copy(update={"tasks_per_replica": 4})
    d = decide(r4, obs(queued=4, queued_work_s=40), PoolState(), 0.0)
    assert d.desired == 1
    # A mountain of work goes to max_replicas and no further.
    d = decide(r, obs(queued=60, queued_work_s=60 * 200), PoolState(), 0.0)
    assert d.desired == 6


def test_drain_time_counts_indivisible_tasks() -> None:
    # 4 equal tasks: 3 replicas are no faster than 2 (someone still runs two).
    assert P.drain_time(800, 4, 3, 3, 120) == P.drain_time(800, 4, 2, 2, 120) == 400
    assert P.drain_time(800, 4, 4, 2, 120) == 200 + 120
    assert P.drain_time(0, 0, 0, 0, 120) == 0


def test_scale_up_waits_for_the_delay_on_a_running_pool() -> None:
    r = rules()
    busy = {"running": 4, "busy_replicas": 2, "running_work_s": 600}
    out = run(
        r,
        [
            (0.0, obs(queued=6, replicas=2, queued_work_s=1200, **busy)),
            (30.0, obs(queued=6, replicas=2, queued_work_s=1200, **busy)),
            (60.0, obs(queued=6, replicas=2, queued_work_s=1200, **busy)),
        ],
    )
    assert [d.reason for d in out] == [P.SCALE_UP_PENDING, P.SCALE_UP_PENDING, P.QUEUE_ABOVE_THRESHOLD]
    assert out[0].desired == out[1].desired == 2
    assert out[2].desired > 2


def test_condition_must_hold_continuously() -> None:
    r = rules()
    busy = {"running": 4, "busy_replicas": 2, "running_work_s": 600}
    out = run(
        r,
        [
            (0.0, obs(queued=6, replicas=2, queued_work_s=1200, **busy)),
            (40.0, obs(queued=0, replicas=2, **busy)),  # backlog cleared: the clock restarts
            (50.0, obs(queued=6, replicas=2, queued_work_s=1200, **busy)),
            (100.0, obs(queued=6, replicas=2, queued_work_s=1200, **busy)),
            (110.0, obs(queued=6, replicas=2, queued_work_s=1200, **busy)),
        ],
    )
    assert [d.desired > 2 for d in out] == [False, False, False, False, True]


def test_a_running_need_correction_breaks_the_up_condition() -> None:
    """The clock does not survive a tick decided by another rule: a backlog that cleared while
    the running-need floor restored a lost replica, then came back, waits the whole delay again."""
    r = rules()
    busy = {"running": 4, "busy_replicas": 2, "running_work_s": 600}
    out = run(
        r,
        [
            (0.0, obs(queued=6, replicas=2, queued_work_s=1200, **busy)),
            (30.0, obs(queued=0, replicas=1, **busy)),  # a replica vanished; backlog cleared
            (40.0, obs(queued=6, replicas=2, queued_work_s=1200, **busy)),
            (60.0, obs(queued=6, replicas=2, queued_work_s=1200, **busy)),
            (100.0, obs(queued=6, replicas=2, queued_work_s=1200, **busy)),
        ],
    )
    assert [d.reason for d in out] == [
        P.SCALE_UP_PENDING,
        P.RUNNING_NEED,
        P.SCALE_UP_PENDING,
        P.SCALE_UP_PENDING,
        P.QUEUE_ABOVE_THRESHOLD,
    ]
    assert [d.desired for d in out][:4] == [2, 2, 2, 2] and out[4].desired > 2


def test_critical_scales_at_once() -> None:
    r = rules()
    busy = {"running": 4, "busy_replicas": 2, "running_work_s": 600}
    d = decide(r, obs(queued={"critical": 1}, replicas=2, queued_work_s=200, **busy), PoolState(), 0.0)
    assert (d.desired, d.reason) == (3, P.CRITICAL_TASK)
    # The replica it asked for is starting: no runaway on the next tick.
    d2 = decide(
        r,
        obs(queued={"critical": 1}, replicas=3, queued_work_s=200, starting=[("r3", 0.0)], **busy),
        d.state,
        10.0,
    )
    assert d2.desired == 3
    # critical_immediate off: it waits like everything else.
    crit = obs(queued={"critical": 1}, replicas=2, queued_work_s=200, **busy)
    d3 = decide(r, crit, PoolState(), 0.0, critical_immediate=False)
    assert d3.desired == 2


def test_idle_replicas_stop_one_by_one_after_the_delay() -> None:
    r = rules()
    idle = {"busy_replicas": 0, "idle_replicas": 2}
    out = run(
        r,
        [
            (0.0, obs(replicas=2, **idle)),
            (60.0, obs(replicas=2, **idle)),
            (119.0, obs(replicas=2, **idle)),
            (120.0, obs(replicas=2, **idle)),
        ],
    )
    assert [d.desired for d in out] == [2, 2, 2, 0]
    assert out[0].reason == P.SCALE_DOWN_PENDING
    assert out[-1].reason == P.IDLE_TIMEOUT
    # A replica that went idle later stops later: each has its own clock.
    out = run(
        r,
        [
            (0.0, obs(replicas=2, running=1, busy_replicas=1, running_work_s=100)),
            (60.0, obs(replicas=2, busy_replicas=0)),
            (120.0, obs(replicas=2, busy_replicas=0)),
            (180.0, obs(replicas=1, busy_replicas=0)),
        ],
    )
    assert [d.desired for d in out] == [2, 2, 1, 0]


def test_a_new_replica_is_kept_a_tick_beyond_its_cold_start() -> None:
    """A replica registers and claims a moment after its cold start ends: the hold after a
    scale-up lasts one tick longer, so it is not stopped as surplus the instant it is ready."""
    r = rules(scale_down_delay_s=0, scale_up_delay_s=0)
    up = decide(r, obs(queued=1), PoolState(), 0.0, tick_s=10)
    assert up.desired == 1
    gone = obs(replicas=1, busy_replicas=0, idle_replicas=1)  # the work went elsewhere
    at_ready = decide(r, gone, up.state, 120.0, tick_s=10)
    assert at_ready.desired == 1, at_ready
    assert decide(r, gone, at_ready.state, 130.0, tick_s=10).desired == 0


def test_random_victims_idle_replicas_wait_while_a_stop_would_likely_hit_work() -> None:
    # The provider picks the replica to stop (DataCrunch): 3 idle, 1 busy with 150 s of its 200 s
    # task left.  Stopping now hits the busy one with chance 1/4 and loses 50 s of work plus a
    # cold start for its deck (1/4 × 170 s ≈ 42 s) — less than the 150 s the idle ones would
    # wait: they stop.  With 20 s left, waiting is cheaper: they wait for it.
    r = rules(scale_down_delay_s=0, tasks_per_replica=1, scale_down_victims="any")
    busy = {"running": 1, "busy_replicas": 1, "idle_replicas": 3}
    d = decide(r, obs(replicas=4, running_work_s=150, **busy), PoolState(), 0.0)
    assert (d.desired, d.reason) == (1, P.IDLE_TIMEOUT)
    d = decide(r, obs(replicas=4, running_work_s=20, **busy), PoolState(), 0.0)
    assert (d.desired, d.reason) == (4, P.SCALE_DOWN_PENDING)
    assert "provider picks" in d.detail
    # The idle replicas' clocks keep running: once the busy one is done they all stop at once.
    d = decide(r, obs(replicas=4, busy_replicas=0, idle_replicas=4), d.state, 20.0)
    assert (d.desired, d.reason) == (0, P.IDLE_TIMEOUT)
    # A provider that stops idle replicas first needs no wait.
    d = decide(
        rules(scale_down_delay_s=0, tasks_per_replica=1),
        obs(replicas=4, running_work_s=20, **busy),
        PoolState(),
        0.0,
    )
    assert (d.desired, d.reason) == (1, P.IDLE_TIMEOUT)


def test_never_below_running_need() -> None:
    r = rules(scale_down_delay_s=0)
    busy = {"running": 3, "busy_replicas": 3, "running_work_s": 30}
    out = run(r, [(t, obs(replicas=4, **busy)) for t in (0.0, 500.0, 1000.0)])
    assert all(d.desired >= 3 for d in out)
    assert out[-1].desired == 3


def test_min_replicas_kept_and_max_enforced() -> None:
    d = decide(rules(min_replicas=1), obs(), PoolState(), 0.0)
    assert (d.desired, d.reason) == (1, P.MIN_REPLICAS)
    out = run(rules(min_replicas=1), [(t, obs(replicas=1)) for t in (0.0, 1000.0)])
    assert [d.desired for d in out] == [1, 1]
    d = decide(rules(max_replicas=2), obs(replicas=5), PoolState(), 0.0)
    assert (d.desired, d.reason) == (2, P.MAX_REPLICAS)


@pytest.mark.parametrize(
    "missing", [{"queued": None}, {"running": None}, {"replicas": None}, {"queued": None, "replicas": None}]
)
def test_unknown_holds(missing: dict[str, Any]) -> None:
    r = rules(scale_down_delay_s=0)
    state = PoolState(desired=3, surplus_since=(0.0, 0.0))
    args: dict[str, Any] = {"queued": 0, "running": 0, "replicas": 3}
    args.update(missing)
    d = decide(r, obs(**args), state, 10_000.0)
    assert d.reason == P.HOLD_UNKNOWN
    assert d.desired == 3
    assert d.state.surplus_since == ()  # idle clocks restart once data is back
    # Critical work with an unknown provider still holds: no blind scaling either way.
    d = decide(r, obs(queued={"critical": 5}, replicas=None), state, 0.0)
    assert d.desired == 3


def test_prewarm_by_dependency() -> None:
    r = rules(name="text", task_types=[], tasks_per_replica=4, default_task_duration_s=40)
    far = obs(blocked_on_running=5, blocked_work_s=200, upstream_eta_s=400)
    near = obs(blocked_on_running=5, blocked_work_s=200, upstream_eta_s=125)
    assert decide(r, far, PoolState(), 0.0).desired == 0
    d = decide(r, near, PoolState(), 0.0)
    assert (d.desired, d.reason) == (1, P.PREWARM_DEPENDENCY)
    # Unknown ETA: the upstream is running, assume it may finish any time.
    assert decide(r, obs(blocked_on_running=1, blocked_work_s=40), PoolState(), 0.0).desired == 1
    # The switch.
    assert decide(r.model_copy(update={"prewarm": False}), near, PoolState(), 0.0).desired == 0


def test_imminent_work_keeps_an_idle_replica() -> None:
    r = rules(name="text", task_types=[], tasks_per_replica=4, scale_down_delay_s=0)
    soon = obs(replicas=1, busy_replicas=0, blocked_on_running=2, blocked_work_s=80, upstream_eta_s=60)
    later = obs(replicas=1, busy_replicas=0, blocked_on_running=2, blocked_work_s=80, upstream_eta_s=900)
    assert [d.desired for d in run(r, [(0.0, soon), (10.0, soon)])] == [1, 1]
    out = run(r, [(0.0, later), (10.0, later)])
    assert out[-1].desired == 0


def test_startup_timeout_replaces_then_backs_off() -> None:
    r = rules(startup_backoff_s=60, max_startup_backoff_s=600)

    def starting(*reps: tuple[str, float], replicas: int | None = None) -> PoolObservation:
        n = len(reps) if replicas is None else replicas
        return obs(queued=4, replicas=n, registered=0, queued_work_s=800, starting=list(reps))

    d = decide(r, starting(("r1", 0.0), ("r2", 0.0)), PoolState(), 299.0)
    assert d.replace == () and d.reason != P.STARTUP_TIMEOUT
    # First failure: stop both, start two new ones at once.
    d = decide(r, starting(("r1", 0.0), ("r2", 0.0)), d.state, 300.0)
    assert d.reason == P.STARTUP_TIMEOUT and d.replace == ("r1", "r2") and d.desired == 2
    assert d.state.startup_failures == 1 and d.state.replaced_total == 2
    # Ticks go by while r3, r4 start (and never register): no more starts meanwhile.
    for t in range(310, 600, 10):
        d = decide(r, starting(("r3", 300.0), ("r4", 300.0)), d.state, float(t))
        assert d.reason != P.STARTUP_TIMEOUT and d.desired == 2
    # Second failure: stop them, no replacement for 60 s (desired drops), scale-ups held.
    d = decide(r, starting(("r3", 300.0), ("r4", 300.0)), d.state, 600.0)
    assert d.reason == P.STARTUP_TIMEOUT and d.replace == ("r3", "r4") and d.desired == 0
    assert "next try in 60s" in d.detail
    for t in (610.0, 650.0):
        d = decide(r, starting(), d.state, t)
        assert (d.reason, d.desired) == (P.STARTUP_BACKOFF, 0)
    # Backoff over: one probe, not the two the work asks for.
    d = decide(r, starting(), d.state, 660.0)
    assert (d.reason, d.desired) == (P.SCALE_FROM_ZERO, 1)
    for t in (670.0, 800.0):  # past scale_up_delay too: still one at a time
        d = decide(r, starting(("r5", 660.0)), d.state, t)
        assert d.desired == 1
    assert d.reason == P.STARTUP_BACKOFF
    # The probe fails: twice the backoff.
    d = decide(r, starting(("r5", 660.0)), d.state, 960.0)
    assert d.reason == P.STARTUP_TIMEOUT and d.desired == 0 and "next try in 120s" in d.detail
    assert decide(r, starting(), d.state, 1079.0).desired == 0
    d = decide(r, starting(), d.state, 1080.0)
    assert d.desired == 1
    # The next probe comes up (one more replica registered): failures reset, the work gets its 2.
    d = decide(r, starting(("r6", 1080.0)), d.state, 1090.0)
    up = obs(queued=3, replicas=1, registered=1, running=1, busy_replicas=1, queued_work_s=600)
    d = decide(r, up, d.state, 1200.0)
    assert d.state.startup_failures == 0
    assert d.desired == 2  # the up-condition has held since the probe was asked for


def test_budget_caps_non_critical_scale_ups() -> None:
    r = rules()
    over = BudgetView(monthly_budget_usd=100, projected_usd=130)
    under = BudgetView(monthly_budget_usd=100, projected_usd=50)
    work = obs(queued=8, queued_work_s=1600)
    assert decide(r, work, PoolState(), 0.0, budget=under).desired > 1
    d = decide(r, work, PoolState(), 0.0, budget=over)
    assert (d.desired, d.reason) == (1, P.BUDGET_CAP)  # work still finishes, one replica
    assert "budget" in d.detail
    crit = obs(queued={"critical": 8}, queued_work_s=1600)
    assert decide(r, crit, PoolState(), 0.0, budget=over).reason == P.CRITICAL_TASK


def test_max_step_up() -> None:
    d = decide(rules(max_step_up=1), obs(queued=20, queued_work_s=4000), PoolState(), 0.0)
    assert d.desired == 1


def test_count_sizing_is_the_seeds_rule() -> None:
    r = rules(sizing="count", scale_up_delay_s=120, scale_down_delay_s=600, tasks_per_replica=1)
    out = run(r, [(0.0, obs(queued=2)), (60.0, obs(queued=2)), (120.0, obs(queued=2))])
    assert [d.desired for d in out] == [0, 0, 2]
    # Below the threshold: nothing (except at zero, after the delay, so a lone task is served).
    out = run(r, [(0.0, obs(queued=1, replicas=1, running=1, busy_replicas=1))] * 1)
    assert out[0].desired == 1
    # Whole pool down after the queue has been empty for the delay.
    out = run(r, [(0.0, obs(replicas=2)), (599.0, obs(replicas=2)), (600.0, obs(replicas=2))])
    assert [d.desired for d in out] == [2, 2, 0]


def test_auto_idle_timeout_learns_from_gaps() -> None:
    r = rules(scale_down_delay_s="auto", cold_start_s=120)
    assert idle_timeout(r, PoolState()) == 120  # break-even until it has seen a few gaps
    # Work came back within 30 s or not for long: keep replicas 30 s.
    assert idle_timeout(r, PoolState(idle_gaps=(20.0, 25.0, 30.0, 28.0, 240.0, 240.0))) == 30.0
    # Work always came back within 30 s: any timeout from 30 s to 120 s costs the same; the longer
    # one spares the work cold starts.
    assert idle_timeout(r, PoolState(idle_gaps=(20.0, 25.0, 30.0, 28.0))) == 120.0
    # Work never came back within a cold start: stop after one tick.
    assert idle_timeout(r, PoolState(idle_gaps=(240.0,) * 5), tick_s=10) == 10.0
    assert idle_timeout(rules(scale_down_delay_s=77), PoolState(idle_gaps=(240.0,) * 5)) == 77


def test_auto_records_gaps() -> None:
    r = rules(scale_down_delay_s="auto", cold_start_s=120)
    busy = obs(replicas=1, running=1, busy_replicas=1, running_work_s=100)
    idle = obs(replicas=1)
    out = run(r, [(0.0, busy), (10.0, idle), (40.0, busy), (50.0, idle), (300.0, idle)])
    assert out[2].state.idle_gaps == (30.0,)
    assert out[-1].state.idle_gaps == (30.0, 240.0)  # the long one counted once it passed 120 s


def test_same_inputs_same_output() -> None:
    r = rules()
    o = obs(queued={"normal": 3, "high": 1}, replicas=1, running=2, busy_replicas=1, queued_work_s=800)
    assert decide(r, o, PoolState(), 5.0) == decide(r, o, PoolState(), 5.0)


def test_state_round_trips_through_json() -> None:
    import json
    import math

    state = PoolState(
        desired=2,
        up_since=5.0,
        surplus_since=(1.0, 2.0),
        last_registered=1,
        gap_start=(None, math.inf, 7.0),
        idle_gaps=(3.0, 240.0),
    )
    assert PoolState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    assert PoolState.from_dict({"desired": 1, "unknown_key": 3}) == PoolState(desired=1)


def test_duration_estimator_learns() -> None:
    est = P.DurationEstimator([rules(task_durations_s={"visual_analysis": 100})], alpha=0.5)
    assert est.expected("visual_analysis") == 100
    assert est.expected("slide_feedback") == 200  # the pool's default
    est.observe("visual_analysis", 200)
    assert est.expected("visual_analysis") == 150
    est.observe("visual_analysis", float("nan"))
    assert est.expected("visual_analysis") == 150
    assert est.expected("unknown") == 60.0


def test_stage_deadline_sizes_for_the_oldest_decks_time_left() -> None:
    """Deadline sizing: the pool's part of a deck should be done ``stage_deadline`` after it was
    submitted; replicas are worth their cold start while that is not met."""
    r = rules(tasks_per_replica=1, max_replicas=8)
    four = obs(queued=4, queued_work_s=4 * 200, deck_age_s=0.0)
    # 7 minutes for a 4-batch deck: one replica per batch (120 s start + 200 s).
    dl = r.model_copy(update={"stage_deadline_s": 420.0})
    assert decide(dl, four, PoolState(), 0.0).desired == 4
    # 12 minutes: two replicas do it (120 s + 2 × 200 s), no more.
    loose = r.model_copy(update={"stage_deadline_s": 720.0})
    assert decide(loose, four, PoolState(), 0.0).desired == 2
    # The same work for a deck already 6 minutes old: back to one per batch.
    late = obs(queued=4, queued_work_s=800, deck_age_s=360.0)
    assert decide(loose, late, PoolState(), 0.0).desired == 4
    # Never more replicas than tasks, never above max_replicas.
    assert decide(dl, obs(queued=2, queued_work_s=400, deck_age_s=9999.0), PoolState(), 0.0).desired == 2
    many = obs(queued=40, queued_work_s=40 * 200, deck_age_s=0.0)
    assert decide(dl, many, PoolState(), 0.0).desired == 8


def test_stage_deadline_prewarms_for_a_chain_of_stages() -> None:
    """Work about to arrive is sized against what is left of the deadline once it arrives, with
    no cold start to charge (the replicas start while the upstream work runs)."""
    r = rules(tasks_per_replica=1, max_replicas=8, stage_deadline_s=600.0, prewarm=True)
    soon = obs(blocked_on_running=6, blocked_work_s=600.0, upstream_eta_s=100.0, deck_age_s=200.0)
    d = decide(r, soon, PoolState(), 0.0)
    # 300 s left once it arrives, and replicas started now can work 20 s after that (their cold
    # start overlaps the upstream work): two would take 300 + 20 s, three take 200 + 20 s.
    assert (d.desired, d.reason) == (3, P.PREWARM_DEPENDENCY)
    # 100 s older: 200 s left: one replica per task (100 + 20 s).
    older = obs(blocked_on_running=6, blocked_work_s=600.0, upstream_eta_s=100.0, deck_age_s=300.0)
    assert decide(r, older, PoolState(), 0.0).desired == 6
    # A replica that would be ready only after the work is done is not started.
    busy = obs(1, 2, 2, queued_work_s=60, running_work_s=60, busy_replicas=2, registered=2, deck_age_s=560.0)
    assert decide(r, busy, PoolState(), 0.0).desired == 2
    # Not yet due (further away than a cold start): nothing starts.
    later = obs(blocked_on_running=6, blocked_work_s=600.0, upstream_eta_s=400.0, deck_age_s=200.0)
    assert decide(r, later, PoolState(), 0.0).desired == 0
