"""Placement over fallback deployments (pure): home, cool-offs, moving back, preemption."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from gpuscale.controller.placement import (
    PREEMPTED,
    QUOTA_REACHED,
    STARTUP_TIMEOUT,
    DeploymentObs,
    PlacementState,
    ReplicaObs,
    cooloff_s,
    place,
)
from gpuscale.controller.pools import PoolRules, parse_pools

SPOT, ONDEMAND, A100 = "v-spot", "v-h100", "v-a100"


def rules(**kw: object) -> PoolRules:
    body = {
        "deployments": [
            {"name": SPOT, "spot": True, "price_per_hour": 0.87},
            {"name": ONDEMAND, "price_per_hour": 1.75},
            {"name": A100, "price_per_hour": 1.29},
        ],
        "startup_timeout": "300s",
        "fallback_cooloff": "300s",
        "max_fallback_cooloff": "1200s",
        **kw,
    }
    return parse_pools({"visual_container_scaling": body}).pools["visual"]


def rep(
    rid: str, *, busy: bool = False, registered: bool = True, at: float = 0.0, status: str = "running"
) -> ReplicaObs:
    return ReplicaObs(rid, at, status, registered=registered, busy=busy)


def dep(
    name: str, *replicas: ReplicaObs, target: int | None = None, status: str = "healthy"
) -> DeploymentObs:
    return DeploymentObs(name, len(replicas) if target is None else target, status, tuple(replicas))


def empty(*names: str) -> dict[str, DeploymentObs | None]:
    return {n: dep(n) for n in names}


def test_the_old_single_deployment_form_is_one_option() -> None:
    r = parse_pools({"visual_container_scaling": {"deployment": "gpuscale-visual", "price_per_hour": 0.5}})
    opts = r.pools["visual"].options
    assert [(o.name, o.price_per_hour, o.spot) for o in opts] == [("gpuscale-visual", 0.5, False)]
    p = place(r.pools["visual"], {"gpuscale-visual": dep("gpuscale-visual")}, 3, PlacementState(), 100.0)
    assert p.targets == {"gpuscale-visual": 3} and p.home == "gpuscale-visual"


def test_replicas_go_to_the_preferred_deployment() -> None:
    p = place(rules(), empty(SPOT, ONDEMAND, A100), 2, PlacementState(), 100.0)
    assert p.targets == {SPOT: 2, ONDEMAND: 0, A100: 0}
    assert p.home == SPOT and p.why[SPOT] == "preferred" and p.failures == ()


def test_quota_reached_moves_the_share_to_the_next_one_and_the_cooloff_grows() -> None:
    r = rules()
    obs = {**empty(ONDEMAND, A100), SPOT: dep(SPOT, target=2, status="quota_reached")}
    p = place(r, obs, 2, PlacementState(), 1000.0)
    assert p.failures == ((SPOT, QUOTA_REACHED),)
    assert p.targets == {SPOT: 0, ONDEMAND: 2, A100: 0} and p.home == ONDEMAND
    assert "cooling off 300s after quota_reached" in p.why[SPOT] and SPOT in p.why[ONDEMAND]
    # Still quota_reached while cooling off: not a new failure.
    p2 = place(r, {**obs, SPOT: dep(SPOT, target=0, status="quota_reached")}, 2, p.state, 1100.0)
    assert p2.failures == () and p2.state.get(SPOT).failures == 1
    # Cool-off over: the spot deployment is home again; it fails again -> twice as long.
    p3 = place(r, empty(SPOT, ONDEMAND, A100), 2, p2.state, 1301.0)
    assert p3.home == SPOT
    p4 = place(
        r, {**empty(ONDEMAND, A100), SPOT: dep(SPOT, target=2, status="quota_reached")}, 2, p3.state, 1310.0
    )
    assert p4.state.get(SPOT).failures == 2 and p4.state.get(SPOT).cool_until == 1310.0 + 600.0
    assert [cooloff_s(r, n) for n in (1, 2, 3, 4, 5)] == [300, 600, 1200, 1200, 1200]


def test_a_long_quiet_spell_forgets_the_failures() -> None:
    r = rules()
    p = place(
        r,
        {**empty(ONDEMAND, A100), SPOT: dep(SPOT, target=1, status="quota_reached")},
        1,
        PlacementState(),
        0.0,
    )
    later = place(r, empty(SPOT, ONDEMAND, A100), 1, p.state, 5000.0)
    assert later.state.get(SPOT).failures == 0


def test_a_failure_right_after_the_longest_cooloff_keeps_it_longest() -> None:
    # The quiet spell counts from the end of the cool-off, not from the failure: a cool-off at
    # the maximum (1200 s here) is not itself a quiet spell that starts the cool-offs afresh.
    r = rules()
    sold_out = {**empty(ONDEMAND, A100), SPOT: dep(SPOT, target=1, status="quota_reached")}
    state, now = PlacementState(), 0.0
    for n, cool in ((1, 300), (2, 600), (3, 1200), (4, 1200)):
        p = place(r, sold_out, 1, state, now)
        assert p.state.get(SPOT).failures == n and p.state.get(SPOT).cool_until == now + cool
        state, now = p.state, now + cool + 1


def test_startup_timeout_cools_the_deployment_off() -> None:
    r = rules()
    obs = {**empty(ONDEMAND, A100), SPOT: dep(SPOT, rep("s1", registered=False, at=0.0, status="starting"))}
    assert place(r, obs, 1, PlacementState(), 299.0).failures == ()
    p = place(r, obs, 1, PlacementState(), 300.0, replace_ids=("s1",))
    assert p.failures == ((SPOT, STARTUP_TIMEOUT),)
    assert p.targets == {SPOT: 0, ONDEMAND: 1, A100: 0}


def test_recovery_moves_back_without_cutting_running_tasks() -> None:
    r = rules()
    cooled = place(
        r,
        {**empty(ONDEMAND, A100), SPOT: dep(SPOT, target=3, status="quota_reached")},
        3,
        PlacementState(),
        0.0,
    )
    # On the fallback: 2 busy, 1 idle.  The spot cool-off ends.
    fb = dep(ONDEMAND, rep("o1", busy=True), rep("o2", busy=True), rep("o3"))
    p = place(r, {SPOT: dep(SPOT), ONDEMAND: fb, A100: dep(A100)}, 3, cooled.state, 301.0)
    assert p.home == SPOT
    assert p.targets == {SPOT: 1, ONDEMAND: 2, A100: 0}  # the idle one goes first
    assert p.why[ONDEMAND] == "busy replicas finish first"
    assert "probing after quota_reached" in p.why[SPOT]
    # One busy replica finished.  The spot probe has not registered yet: the fallback keeps the
    # now idle replica (a spot deployment still short of capacity costs no dip).
    fb2 = dep(ONDEMAND, rep("o1", busy=True), rep("o2"), target=2)
    spot = dep(SPOT, rep("s1", registered=False, at=301.0, status="starting"))
    p2 = place(r, {SPOT: spot, ONDEMAND: fb2, A100: dep(A100)}, 3, p.state, 310.0)
    assert p2.targets == {SPOT: 1, ONDEMAND: 2, A100: 0}
    assert p2.why[ONDEMAND] == f"keeps 2 while {SPOT} probes"
    assert p2.vanished == {}  # o3 was removed by the controller, not preempted
    # The probe registered: spot works again and takes the idle replica's share.
    spot3 = dep(SPOT, rep("s1", at=301.0))
    p3 = place(r, {SPOT: spot3, ONDEMAND: fb2, A100: dep(A100)}, 3, p2.state, 320.0)
    assert p3.targets == {SPOT: 2, ONDEMAND: 1, A100: 0} and p3.why[SPOT] == "preferred"


def test_under_a_steady_backlog_a_busy_fallback_replica_makes_room_for_the_probe() -> None:
    # Issue 13's flaky end-to-end test: every fallback replica is busy at every tick (each claims
    # its next task the moment it finishes one), so no idle one ever frees a place.  Without
    # room, the recovered spot deployment got no probe until the backlog was over.
    r = rules()
    cooled = place(
        r,
        {**empty(ONDEMAND, A100), SPOT: dep(SPOT, target=2, status="quota_reached")},
        2,
        PlacementState(),
        0.0,
    )
    fb = dep(ONDEMAND, rep("o1", busy=True), rep("o2", busy=True))
    still = place(r, {SPOT: dep(SPOT), ONDEMAND: fb, A100: dep(A100)}, 2, cooled.state, 299.0)
    assert still.targets == {SPOT: 0, ONDEMAND: 2, A100: 0}  # cooling off: nothing moves
    p = place(r, {SPOT: dep(SPOT), ONDEMAND: fb, A100: dep(A100)}, 2, cooled.state, 301.0)
    assert p.targets == {SPOT: 1, ONDEMAND: 1, A100: 0}  # the probe, in a busy replica's place
    assert p.why[ONDEMAND] == f"one busy replica makes room for {SPOT}"
    # The probe starts; the other fallback replica still runs a task: it is not cut.
    spot = dep(SPOT, rep("s1", registered=False, at=301.0, status="starting"))
    fb1 = dep(ONDEMAND, rep("o2", busy=True))
    p2 = place(r, {SPOT: spot, ONDEMAND: fb1, A100: dep(A100)}, 2, p.state, 305.0)
    assert p2.targets == {SPOT: 1, ONDEMAND: 1, A100: 0}
    assert p2.vanished == {}  # o1 was removed by the controller, not preempted
    # Registered, not yet busy: it stays (home's count is not its busy replicas).
    p3 = place(r, {SPOT: dep(SPOT, rep("s1", at=301.0)), ONDEMAND: fb1, A100: dep(A100)}, 2, p2.state, 310.0)
    assert p3.targets == {SPOT: 1, ONDEMAND: 1, A100: 0} and p3.why[SPOT] == "preferred"
    # Fewer wanted than the busy fallback replicas: nothing busy is cut to make room.
    p4 = place(r, {SPOT: dep(SPOT), ONDEMAND: fb, A100: dep(A100)}, 1, cooled.state, 301.0)
    assert p4.targets[ONDEMAND] == 2
    # After the probe: one wanted, the spot replica idle, the fallback's busy: the idle one goes
    # (only a probe takes a busy replica's place; nothing flaps back and forth).
    p5 = place(r, {SPOT: dep(SPOT, rep("s1", at=301.0)), ONDEMAND: fb1, A100: dep(A100)}, 1, p3.state, 320.0)
    assert p5.targets == {SPOT: 0, ONDEMAND: 1, A100: 0}
    p6 = place(r, {SPOT: dep(SPOT), ONDEMAND: fb1, A100: dep(A100)}, 1, p5.state, 321.0)
    assert p6.targets == {SPOT: 0, ONDEMAND: 1, A100: 0}


def test_a_cooling_preferred_deployment_keeps_its_working_replicas() -> None:
    r = rules()
    spot = dep(SPOT, rep("s1", busy=True), rep("s2"), target=3, status="quota_reached")
    p = place(r, {SPOT: spot, ONDEMAND: dep(ONDEMAND), A100: dep(A100)}, 3, PlacementState(), 0.0)
    assert p.targets == {SPOT: 2, ONDEMAND: 1, A100: 0}
    # Fewer wanted: the idle spot replica goes before anything busy is touched.
    p2 = place(
        r,
        {
            SPOT: dep(SPOT, rep("s1", busy=True), rep("s2")),
            ONDEMAND: dep(ONDEMAND, rep("o1", busy=True)),
            A100: dep(A100),
        },
        2,
        p.state,
        10.0,
    )
    assert p2.targets == {SPOT: 1, ONDEMAND: 1, A100: 0}


def test_vanished_spot_replicas_are_preemptions_and_repeated_ones_fall_back() -> None:
    r = rules(preemption_limit=2, preemption_window="1h")
    s0 = place(
        r,
        {SPOT: dep(SPOT, rep("a"), rep("b"), rep("c")), ONDEMAND: dep(ONDEMAND), A100: dep(A100)},
        3,
        PlacementState(),
        0.0,
    )
    # "a" is gone, the cloud starts a replacement: one preemption, no failure yet.
    s1 = place(
        r,
        {
            SPOT: dep(SPOT, rep("b"), rep("c"), rep("d", registered=False, at=60, status="starting")),
            ONDEMAND: dep(ONDEMAND),
            A100: dep(A100),
        },
        3,
        s0.state,
        60.0,
    )
    assert s1.vanished == {SPOT: ("a",)} and s1.failures == () and s1.home == SPOT
    # "b" goes too, within the hour: the second one makes it a failure.
    s2 = place(
        r,
        {
            SPOT: dep(SPOT, rep("c"), rep("d"), rep("e", registered=False, at=120, status="starting")),
            ONDEMAND: dep(ONDEMAND),
            A100: dep(A100),
        },
        3,
        s1.state,
        120.0,
    )
    assert s2.vanished == {SPOT: ("b",)} and s2.failures == ((SPOT, PREEMPTED),)
    assert s2.home == ONDEMAND and s2.targets == {SPOT: 2, ONDEMAND: 1, A100: 0}
    assert s2.state.get(SPOT).preempted_total == 2


def test_a_scale_down_is_not_a_preemption() -> None:
    r = rules()
    s0 = place(
        r,
        {SPOT: dep(SPOT, rep("a"), rep("b"), rep("c")), ONDEMAND: dep(ONDEMAND), A100: dep(A100)},
        1,
        PlacementState(),
        0.0,
    )
    assert s0.targets[SPOT] == 1
    # The provider has not acted yet, then removes two (one seen stopping first).
    s1 = place(
        r,
        {
            SPOT: dep(SPOT, rep("a"), rep("b"), rep("c", status="stopping"), target=1),
            ONDEMAND: dep(ONDEMAND),
            A100: dep(A100),
        },
        1,
        s0.state,
        10.0,
    )
    s2 = place(
        r, {SPOT: dep(SPOT, rep("a"), target=1), ONDEMAND: dep(ONDEMAND), A100: dep(A100)}, 1, s1.state, 20.0
    )
    assert s1.vanished == {} and s2.vanished == {}
    s3 = place(r, {SPOT: dep(SPOT, target=1), ONDEMAND: dep(ONDEMAND), A100: dep(A100)}, 1, s2.state, 30.0)
    assert s3.vanished == {SPOT: ("a",)}


def test_every_deployment_cooling_off_picks_the_one_that_ends_first() -> None:
    r = rules()
    state = PlacementState()
    quota = {n: dep(n, target=1, status="quota_reached") for n in (SPOT, ONDEMAND, A100)}
    p = place(r, quota, 1, state, 0.0)
    assert {f[0] for f in p.failures} == {SPOT, ONDEMAND, A100}
    assert p.home == SPOT and "every deployment is cooling off" in p.why[SPOT]


def test_an_unobserved_deployment_is_left_alone() -> None:
    p = place(rules(), {SPOT: None, ONDEMAND: dep(ONDEMAND), A100: dep(A100)}, 2, PlacementState(), 0.0)
    assert p.targets == {ONDEMAND: 2, A100: 0} and p.home == ONDEMAND


def test_state_survives_json_for_a_new_leader() -> None:
    r = rules()
    p = place(
        r,
        {**empty(ONDEMAND, A100), SPOT: dep(SPOT, target=1, status="quota_reached")},
        1,
        PlacementState(),
        5.0,
    )
    again = PlacementState.from_dict(json.loads(json.dumps(p.state.to_dict())))
    assert again == p.state
    assert place(r, empty(SPOT, ONDEMAND, A100), 1, again, 10.0).home == ONDEMAND


# ------------------------------------------------------------------ properties

_NAMES = (SPOT, ONDEMAND, A100)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, DeploymentObs | None], int, PlacementState, float]:
    obs: dict[str, DeploymentObs | None] = {}
    n = 0
    for name in _NAMES:
        if draw(st.booleans()) and draw(st.booleans()) and draw(st.booleans()):
            obs[name] = None
            continue
        reps = []
        for _ in range(draw(st.integers(0, 4))):
            n += 1
            registered = draw(st.booleans())
            status = draw(st.sampled_from(["running", "starting", "stopping", "failed"]))
            reps.append(
                rep(
                    f"r{n}",
                    busy=registered and draw(st.booleans()),
                    registered=registered,
                    at=draw(st.floats(0, 1000)),
                    status=status,
                )
            )
        live = sum(1 for x in reps if x.status != "stopping")
        target = draw(st.integers(0, live + 2))
        obs[name] = dep(
            name, *reps, target=target, status=draw(st.sampled_from(["healthy", "quota_reached"]))
        )
    cool = {
        name: {
            "failures": 1,
            "cool_until": draw(st.floats(0, 2000)),
            "last_failure": "quota_reached",
            "probing": draw(st.booleans()),
        }
        for name in _NAMES
        if draw(st.booleans())
    }
    busy = sum(min(o.target, o.busy) for o in obs.values() if o is not None)
    desired = draw(st.integers(busy, busy + 6))  # decide never goes below the busy replicas
    return obs, desired, PlacementState.from_dict(cool), draw(st.floats(0, 2000))


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_placement_properties(
    case: tuple[dict[str, DeploymentObs | None], int, PlacementState, float],
) -> None:
    obs, desired, state, now = case
    r = rules()
    p = place(r, obs, desired, state, now)
    assert p == place(r, obs, desired, state, now)  # pure
    known = [n for n in _NAMES if obs[n] is not None]
    assert set(p.targets) == set(known)
    if not known:
        return
    # Never below what runs tasks: busy replicas are never cut, but for one of a less preferred
    # deployment that makes room for home's probe when busy ones fill the count.
    cut = {}
    for name in known:
        o = obs[name]
        assert o is not None
        cut[name] = max(0, min(o.target, o.busy) - p.targets[name])
    if sum(cut.values()):
        assert sum(cut.values()) == 1 and p.targets[p.home] == 1, (cut, p)
        assert p.state.get(p.home).probing and not p.state.get(p.home).cooling(now)
        (name,) = [n for n, c in cut.items() if c]
        assert known.index(name) > known.index(p.home), (cut, p)
    # The pool gets exactly what the policy asked for (never less, no extra).
    assert sum(p.targets.values()) == desired
    # New replicas only go home; home is not cooling off unless every observed one is.
    coolers = {n for n in known if p.state.get(n).cooling(now)}
    assert p.home in known
    if coolers != set(known):
        assert p.home not in coolers
        assert all(n in coolers for n in known[: known.index(p.home)])
    for name in known:
        o = obs[name]
        assert o is not None
        if name != p.home:
            assert p.targets[name] <= max(0, o.target), (name, p)


def test_pools_file_deployments_are_checked() -> None:
    import pytest

    from gpuscale.controller.pools import PoolsFileError

    def bad(body: dict[str, object], message: str) -> None:
        with pytest.raises(PoolsFileError, match=message):
            parse_pools({"visual_container_scaling": body})

    two = [{"name": "a"}, {"name": "b"}]
    bad({"deployment": "x", "deployments": two}, "either deployment or deployments")
    bad({"deployments": [{"name": "a"}, {"name": "a"}]}, "lists a deployment twice")
    bad({"deployments": [{"name": "a", "spot": "maybe"}]}, r"deployments\.0\.spot")
    bad({"deployments": [{"name": "a", "price_per_hour": -1}]}, r"deployments\.0\.price_per_hour")
    bad({"deployments": two, "fallback_cooloff": "1h", "max_fallback_cooloff": "5m"}, "max_fallback_cooloff")
    ok = parse_pools({"visual_container_scaling": {"deployments": two, "price_per_hour": 2.0}}).pools[
        "visual"
    ]
    assert ok.deployment == "a" and [o.price_per_hour for o in ok.options] == [2.0, 2.0]
    assert ok.option("b") is not None and ok.option("c") is None
