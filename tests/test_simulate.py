"""The replay simulator: exact small cases, the committed traces against the shipped pools file,
the trace format and generator, and the CLI."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpuscale.controller.pools import PoolsConfig, PoolsFileError, load_pools, parse_pools
from gpuscale.controller.simulate import TraceError, TraceTask, read_trace, simulate, write_trace
from gpuscale.controller.simulate.generate import generate
from gpuscale.controller.simulate.report import summary

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
SHIPPED = ROOT / "deploy/datacrunch/pools.yaml"
H = "arrival_s,task_id,task_type,service_s,priority,depends_on\n"
JSON_KEYS = {
    "cost_usd",
    "oracle_cost_usd",
    "always_on_cost_usd",
    "wait_p50_s",
    "wait_p95_s",
    "wait_max_s",
    "graph_p50_s",
    "graph_p95_s",
    "tasks",
    "decks",
    "scale_events",
    "pools",
}


def small_pools(**text: object) -> PoolsConfig:
    common = {
        "min_replicas": 0,
        "max_replicas": 1,
        "scale_up_delay": 0,
        "scale_down_delay": 50,
        "cold_start": 100,
        "price_per_hour": 3.6,  # 0.001 $ per second: costs read as seconds
    }
    return parse_pools(
        {
            "visual_container_scaling": {**common, "tasks_per_replica": 2, "default_task_duration": 150},
            "text_container_scaling": {**common, "tasks_per_replica": 1, "default_task_duration": 30, **text},
        }
    )


def test_ollama_serving_cold_start_and_billing() -> None:
    trace = [
        TraceTask(0.0, "a", "visual_analysis", 100.0),
        TraceTask(0.0, "b", "visual_analysis", 200.0),
    ]
    result = simulate(trace, small_pools(), tick_s=10)
    # One replica from zero at t=0, ready at 100; it holds both tasks but its model serves one
    # request at a time (parallel 1): a runs 100-200, b waits in Ollama's queue and runs 200-400;
    # the replica stops 50 s later.
    data = summary(result)
    assert data["tasks"] == 2 and data["unfinished"] == 0 and data["decks"] == 2
    assert data["wait_p50_s"] == data["wait_max_s"] == 100.0
    assert sorted(result.graph_times) == [200.0, 400.0]
    assert result.pools["visual"].replica_seconds == pytest.approx(450.0)
    assert data["cost_usd"] == pytest.approx(0.45)
    assert data["oracle_cost_usd"] == pytest.approx(0.3)
    assert data["scale_events"] == {"idle_timeout": 1, "scale_from_zero": 1}
    # Always-on: max replicas for the whole day, from t = 0.
    assert data["always_on_cost_usd"] == pytest.approx(2 * 86400 * 0.001)


def test_batching_curve_serves_requests_together() -> None:
    trace = [
        TraceTask(0.0, "a", "visual_analysis", 100.0),
        TraceTask(0.0, "b", "visual_analysis", 200.0),
    ]
    visual = {"tasks_per_replica": 2, "parallel": 2, "batching": [1.0, 1.5]}
    config = small_pools()
    rules = config.pools["visual"].model_copy(update=visual)
    config = config.model_copy(update={"pools": {**config.pools, "visual": rules}})
    result = simulate(trace, config, tick_s=10)
    # Served together from t=100, each at 1.5 / 2 of its solo speed: a ends at 100 + 100 / 0.75;
    # b has 100 s of work left then and runs alone at full speed.
    assert sorted(result.graph_times) == pytest.approx([100 + 100 / 0.75, 200 + 100 / 0.75])


def test_parallel_sets_the_worker_slots_and_batching_is_checked() -> None:
    pools = parse_pools({"visual_container_scaling": {"parallel": 3}, "text_container_scaling": {}})
    assert pools.pools["visual"].tasks_per_replica == 3
    assert pools.pools["text"].tasks_per_replica == 1 and pools.pools["text"].parallel == 1
    with pytest.raises(PoolsFileError, match="batching"):
        parse_pools({"visual_container_scaling": {"parallel": 2, "batching": [1.0]}})


def test_prewarm_overlaps_the_cold_start_with_upstream_work() -> None:
    trace = [
        TraceTask(0.0, "v", "visual_analysis", 300.0),
        TraceTask(0.0, "t", "deck_date_extraction", 30.0, depends_on=("v",)),
    ]
    config = small_pools()
    warm = simulate(trace, config, policy="gpuscale", tick_s=10)
    cold = simulate(trace, config, policy="no-prewarm", tick_s=10)
    # Without pre-warm the text replica starts when v finishes (t=400): 100 s cold start + 30 s.
    assert cold.graph_times == [pytest.approx(530.0)]
    # With pre-warm it is requested ~a cold start before v's estimated end and is ready in time.
    assert warm.graph_times[0] <= 440.0
    assert warm.pools["text"].scale_events == {"idle_timeout": 1, "prewarm_dependency": 1}
    # The text task waits for nothing with pre-warm, a whole cold start without.
    assert min(warm.waits) <= 10.0
    assert cold.waits == [100.0, 100.0]


def test_priority_order_and_critical() -> None:
    config = small_pools(max_replicas=2)
    trace = [TraceTask(0.0, f"n{i}", "deck_date_extraction", 50.0) for i in range(4)]
    trace.append(TraceTask(60.0, "c", "deck_date_extraction", 50.0, priority="critical"))
    result = simulate(trace, config, tick_s=10)
    assert result.unfinished == 0
    assert result.pools["text"].scale_events.get("scale_from_zero") == 1


def provider_picks(config: PoolsConfig) -> PoolsConfig:
    """The same rules on plain DataCrunch deployments, where the cloud picks which replica a
    lowered count stops (``scale_down_victims: any``)."""
    pools = {n: r.model_copy(update={"scale_down_victims": "any"}) for n, r in config.pools.items()}
    return config.model_copy(update={"pools": pools})


def test_committed_traces_meet_the_targets_with_the_shipped_pools() -> None:
    """The seeds' load (text tasks 20–60 s, no batch uploads): the shipped rules, tuned on the
    platform's load, still meet their objectives; pre-warm is what makes decks fast."""
    config = load_pools(SHIPPED)
    assert config.objectives is not None
    assert {r.scale_down_victims for r in config.pools.values()} == {"idle"}  # one deployment per replica
    for name in ("busy_day.csv", "quiet_week.csv"):
        trace = read_trace(DATA / name)
        data = summary(simulate(trace, config))
        assert data["unfinished"] == 0
        assert data["objectives"] and all(o["met"] for o in data["objectives"].values()), (name, data)
        # Today 1.60x (busy day) and 1.59x (quiet week), 1.7x allowed last round: these committed
        # traces keep 8-page batches and 20-60 s text tasks, and with one task per replica a lone
        # deck pays a cold start per batch and per text replica on little work.
        assert data["cost_usd"] <= 1.65 * data["oracle_cost_usd"], (name, data)
        assert data["cost_usd"] < data["always_on_cost_usd"] / 10
        no_prewarm = summary(simulate(trace, config, policy="no-prewarm"))
        assert no_prewarm["graph_p50_s"] > data["graph_p50_s"] + 120, name


def test_platform_month_meets_the_deck_objectives_at_1x_and_2x() -> None:
    """Issue 12's bar on the platform's load (batch uploads included), with the shipped file as
    it is (the controller stops the idle replica it names: one DataCrunch deployment per replica):
    deck p50 ≤ 12.5 min, p95 ≤ 20 min, task wait p95 ≤ 5 min at ≤ 1.5× the oracle floor; at twice
    the decks per day the same.  On plain deployments, where DataCrunch picks the replica a lower
    count stops (``scale_down_victims: any``), the same objectives at a higher cost."""
    shipped = load_pools(SHIPPED)
    for per_day in (None, 24.0):
        trace = generate("platform-month", seed=1, decks_per_day=per_day)
        data = summary(simulate(trace, shipped))
        assert data["unfinished"] == 0
        assert all(o["met"] for o in data["objectives"].values()), (per_day, data)
        assert data["graph_p50_s"] <= 750 and data["graph_p95_s"] <= 1200 and data["wait_p95_s"] <= 300
        assert data["cost_usd"] <= 1.5 * data["oracle_cost_usd"], (per_day, data["cost_vs_oracle"])
        if per_day is None:
            dc = summary(simulate(trace, provider_picks(shipped), victims="any"))
            assert all(o["met"] for o in dc["objectives"].values()), dc
            assert dc["cost_usd"] <= 1.7 * dc["oracle_cost_usd"], dc["cost_vs_oracle"]
            assert dc["cost_usd"] > data["cost_usd"]


def test_targets_hold_with_counts_only() -> None:
    """A controller that reports counts without work estimates still meets the targets."""
    config = load_pools(SHIPPED)
    data = summary(simulate(read_trace(DATA / "busy_day.csv"), config, counts_only=True))
    assert data["cost_usd"] <= 1.7 * data["oracle_cost_usd"]
    assert data["wait_p95_s"] <= 300 and data["graph_p95_s"] <= 1200


def test_always_on_costs_the_whole_period() -> None:
    config = load_pools(SHIPPED)
    trace = read_trace(DATA / "busy_day.csv")
    data = summary(simulate(trace, config, policy="always-on"))
    assert data["cost_usd"] == pytest.approx(data["always_on_cost_usd"])
    assert data["unfinished"] == 0


def test_generator_is_deterministic_and_realistic(tmp_path: Path) -> None:
    a = generate("busy-day", seed=3)
    assert a == generate("busy-day", seed=3)
    assert a != generate("busy-day", seed=4)
    decks = {t.task_id.split("-")[0] for t in a}
    assert len(decks) == 30
    batches = [t for t in a if t.task_type == "visual_analysis"]
    per_page = sum(t.service_s for t in batches) / sum(1 for _ in batches) / 8
    assert 15 < per_page < 30  # ~25 s a page (the last batch of a deck is shorter)
    text = [t for t in a if t.task_type.startswith(("specialized", "company", "deck_date"))]
    assert all(20 <= t.service_s <= 60 for t in text)
    hours = [(t.arrival_s % 86400) / 3600 for t in a]
    assert all(9 <= h < 18.5 for h in hours)
    path = tmp_path / "t.csv"
    write_trace(path, a)
    assert read_trace(path) == a


def test_platform_month_has_the_platform_load_shape() -> None:
    """Issue 12's load: ~12 decks a working day, 15 % on weekends, batch uploads of 3–8 decks."""
    a = generate("platform-month", seed=11)
    assert a == generate("platform-month", seed=11)
    decks: dict[str, list[TraceTask]] = {}
    for t in a:
        decks.setdefault(t.task_id.split("-")[0], []).append(t)
    arrivals = sorted(ts[0].arrival_s for ts in decks.values())
    weekday = [x for x in arrivals if (x // 86400) % 7 < 5]
    weekend = [x for x in arrivals if (x // 86400) % 7 >= 5]
    working_days = sum(1 for d in range(30) if d % 7 < 5)
    per_working_day = len(weekday) / working_days
    assert 9 <= per_working_day <= 15
    assert 0.05 <= len(weekend) / 8 / per_working_day <= 0.3
    # Batches: 3 or more decks uploaded within a minute of each other.
    groups, start, size = [], arrivals[0], 1
    for x in arrivals[1:]:
        if x - start <= 60 * 3:
            size += 1
        else:
            groups.append(size)
            start, size = x, 1
    groups.append(size)
    assert max(groups) >= 3 and any(3 <= g <= 8 for g in groups)
    hours = [(x % 86400) / 3600 for x in arrivals]
    office = sum(1 for h in hours if 8 <= h < 19.1)
    assert office / len(hours) > 0.85 and office < len(hours)  # a few at night
    lunch = sum(1 for h in hours if 12 <= h < 13.5) / 1.5
    morning = sum(1 for h in hours if 9 <= h < 12) / 3
    assert lunch < morning
    prio = [ts[0].priority for ts in decks.values()]
    assert 0.05 <= prio.count("high") / len(prio) <= 0.16 and prio.count("critical") <= 0.06 * len(prio)
    for ts in decks.values():
        pages = sum(t.service_s for t in ts if t.task_type == "visual_analysis")
        batches = sum(1 for t in ts if t.task_type == "visual_analysis")
        assert pages >= 5 * 20 * 0.99 and batches >= 1
    text = [t for t in a if t.task_type not in ("visual_analysis", "slide_feedback")]
    assert all(20 <= t.service_s <= 180 for t in text)
    assert max(t.service_s for t in text) > 120  # the specialized analyses run long

    # More batch uploads: a larger share of the decks arrives in groups of 3 or more.
    def grouped(tasks: list[TraceTask]) -> float:
        at = sorted(
            {t.arrival_s for t in tasks if t.task_type == "visual_analysis" and t.task_id.endswith("va1")}
        )
        close = sum(1 for a, b in itertools.pairwise(at) if b - a <= 60)
        return close / len(at)

    assert grouped(generate("platform-month", seed=11, batch_share=0.3)) > grouped(a) + 0.1
    with pytest.raises(ValueError, match="platform-month"):
        generate("month", seed=1, batch_share=0.3)
    double = generate("platform-month", seed=11, decks_per_day=24)
    assert 1.5 < len({t.task_id.split("-")[0] for t in double}) / len(decks) < 2.8


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("", "empty file"),
        ("a,b,c\n", "header must be"),
        (H + "1,x,noop,1,normal\n", "expected 6 columns"),
        (H + "soon,x,noop,1,normal,\n", "arrival_s must be"),
        (H + "1,x,noop,-1,normal,\n", "service_s must be"),
        (H + "1,x,noop,1,urgent,\n", "priority must be"),
        (H + "1,x,noop,1,normal,y\n", "not a task listed"),
        (
            H + "1,x,noop,1,normal,\n1,x,noop,1,normal,\n",
            "duplicate task_id",
        ),
    ],
)
def test_bad_traces(tmp_path: Path, content: str, words: str) -> None:
    path = tmp_path / "trace.csv"
    path.write_text(content)
    with pytest.raises(TraceError) as info:
        read_trace(path)
    assert str(path) in str(info.value) and words in str(info.value)


def test_unserved_task_type_is_an_error() -> None:
    with pytest.raises(TraceError, match="no pool"):
        simulate([TraceTask(0.0, "x", "noop", 1.0)], small_pools())


def gpuscale(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpuscale.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_cli_month_json_and_plot(tmp_path: Path) -> None:
    trace = tmp_path / "month.csv"
    proc = gpuscale("trace", "generate", "--kind", "month", "--seed", "5", "--out", str(trace))
    assert proc.returncode == 0, proc.stderr
    assert "decks" in proc.stdout
    plot = tmp_path / "month.png"
    proc = gpuscale("simulate", "--trace", str(trace), "--pools", str(SHIPPED), "--json", "--plot", str(plot))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert JSON_KEYS <= set(data)
    assert data["tasks"] > 3000 and data["unfinished"] == 0
    print("month:", {k: data[k] for k in ("cost_vs_oracle", "wait_p95_s", "graph_p95_s", "sim_wall_s")})
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    quiet = str(DATA / "quiet_week.csv")
    proc = gpuscale("simulate", "--trace", quiet, "--pools", str(SHIPPED), "--policy", "seeds")
    assert proc.returncode == 0, proc.stderr
    assert "oracle floor" in proc.stdout and "policy seeds" in proc.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--policy", "magic"], "--policy must be one of"),
        (["--trace", "/nonexistent/trace.csv"], "cannot read trace"),
    ],
)
def test_cli_bad_arguments_exit_2(args: list[str], words: str) -> None:
    base = {"--trace": str(DATA / "quiet_week.csv"), "--pools": str(SHIPPED)}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    flat = [x for kv in base.items() for x in kv]
    if "--policy" in args:
        flat += ["--policy", "magic"]
    proc = gpuscale("simulate", *flat)
    assert proc.returncode == 2
    assert words in proc.stderr


def test_budget_caps_scale_ups_and_says_so() -> None:
    config = load_pools(SHIPPED)
    trace = read_trace(DATA / "busy_day.csv")
    free = summary(simulate(trace, config, budget_usd=10_000))
    tight = summary(simulate(trace, config, budget_usd=100))  # a busy day every day would cost ~$250
    assert "budget_cap" not in free["scale_events"]
    assert tight["scale_events"].get("budget_cap", 0) > 0
    assert tight["unfinished"] == 0  # capped, not stopped: the work still finishes
    assert tight["cost_usd"] < free["cost_usd"]
    assert tight["graph_p95_s"] > free["graph_p95_s"]


def test_failed_starts_are_replaced_and_back_off() -> None:
    config = load_pools(SHIPPED)
    trace = read_trace(DATA / "busy_day.csv")
    data = summary(simulate(trace, config, startup_failure_rate=0.2, seed=3))
    assert data["unfinished"] == 0
    assert data["scale_events"].get("startup_timeout", 0) > 0
    # Every start fails: nothing finishes, and the backoff keeps the bill small (one probe at a
    # time, mostly waiting) instead of a pool's worth of replicas restarted every 5 minutes.
    broken = simulate(read_trace(DATA / "quiet_week.csv")[:40], config, startup_failure_rate=1.0)
    assert broken.unfinished == 40
    hours = broken.end_s / 3600
    per_hour = broken.cost_usd / hours
    assert per_hour < 0.25 * sum(r.price_per_hour for r in config.pools.values())


def test_replays_are_deterministic() -> None:
    config = load_pools(SHIPPED)
    trace = read_trace(DATA / "busy_day.csv")
    a, b = summary(simulate(trace, config)), summary(simulate(trace, config))
    a.pop("sim_wall_s")
    b.pop("sim_wall_s")
    assert a == b


def test_scale_downs_that_stop_any_replica_cost_handed_back_work() -> None:
    tasks = read_trace(DATA / "busy_day.csv")
    config = load_pools(SHIPPED)
    idle = simulate(tasks, config, victims="idle")
    anyone = simulate(tasks, config, victims="any")
    assert idle.unfinished == anyone.unfinished == 0
    # DataCrunch picks the replica a scale-down stops; a busy one hands its work back.
    assert anyone.cost_usd > idle.cost_usd
    assert simulate(tasks, config, victims="any").cost_usd == anyone.cost_usd  # seeded
    with pytest.raises(ValueError, match="victims"):
        simulate(tasks, config, victims="youngest")
