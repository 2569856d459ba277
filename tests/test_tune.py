"""``gpuscale tune``: objectives parsing, the search against a trace, and the CLI's exit codes."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gpuscale.controller.pools import load_pools, parse_pools
from gpuscale.controller.simulate import TraceTask, read_trace, simulate, write_trace
from gpuscale.controller.simulate.report import summary
from gpuscale.controller.simulate.tune import parse_slo, tune

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
SHIPPED = ROOT / "deploy/datacrunch/pools.yaml"


def gpuscale(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpuscale.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_parse_slo() -> None:
    assert parse_slo("deck_p95=20m,wait_p95=5m") == {"deck_p95": 1200.0, "wait_p95": 300.0}
    assert parse_slo(" deck_p50 = 90s ") == {"deck_p50": 90.0}
    for bad, words in [
        ("", "expected objectives"),
        ("deck_p99=20m", "NAME one of"),
        ("deck_p95", "NAME=DURATION"),
        ("deck_p95=soon", "duration"),
        ("deck_p95=0", "longer than 0"),
        ("deck_p95=20m,deck_p95=10m", "twice"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_slo(bad)


def _slice() -> list[TraceTask]:
    """The first 8 decks of the busy day: enough load for the knobs to matter, fast to replay."""
    trace = read_trace(DATA / "busy_day.csv")
    decks = sorted({t.task_id.split("-")[0] for t in trace})[:8]
    return [t for t in trace if t.task_id.split("-")[0] in decks]


def test_tune_finds_cheaper_rules_that_still_meet_the_objectives() -> None:
    trace = _slice()
    raw = yaml.safe_load(SHIPPED.read_text())
    slo = {"deck_p95": 1500.0, "wait_p95": 400.0}
    seen: list[int] = []
    result = tune(
        trace, raw, slo, source=str(SHIPPED), budget=25, jobs=1, progress=lambda d, t, b: seen.append(d)
    )
    assert seen == list(range(1, len(result.evaluations) + 1)) and len(result.evaluations) <= 25
    assert result.meets and result.best.cost_x <= result.base.cost_x
    front = result.frontier()
    assert front and all(a.cost_x <= b.cost_x and a.worst > b.worst for a, b in itertools.pairwise(front))
    # The document written is a valid pools file that replays to the numbers reported (with the
    # stop order the file states: the controller stops the idle replica, one deployment each).
    tuned = parse_pools(result.document, "tuned")
    (victims,) = {r.scale_down_victims for r in tuned.pools.values()}
    data = summary(simulate(trace, tuned, victims=victims))
    assert data["graph_p95_s"] <= 1500 and data["wait_p95_s"] <= 400
    assert data["cost_usd"] == pytest.approx(result.best.data["cost_usd"])
    # Everything else in the file is kept.
    assert (
        result.document["visual_container_scaling"]["deployments"]
        == raw["visual_container_scaling"]["deployments"]
    )


def test_cli_tune_writes_rules_and_plot(tmp_path: Path) -> None:
    trace = tmp_path / "slice.csv"
    write_trace(trace, _slice())
    out, plot = tmp_path / "pools.yaml", tmp_path / "frontier.png"
    proc = gpuscale(
        "tune", "--trace", str(trace), "--slo", "deck_p95=25m,wait_p95=7m", "--pools", str(SHIPPED),
        "--budget", "12", "--out", str(out), "--plot", str(plot),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "cost–latency frontier" in proc.stdout and "chosen" in proc.stdout
    assert "cheapest rules that meet" in proc.stdout
    config = load_pools(out)
    assert set(config.pools) == {"visual", "text"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_tune_says_plainly_when_nothing_meets(tmp_path: Path) -> None:
    trace = tmp_path / "slice.csv"
    write_trace(trace, _slice())
    out = tmp_path / "pools.yaml"
    proc = gpuscale(
        "tune", "--trace", str(trace), "--slo", "deck_p95=1m", "--pools", str(SHIPPED), "--budget", "4",
        "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "no rules tried meet deck_p95 ≤ 1m" in proc.stderr and "closest" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--slo", "deck_p95=fast"], "--slo"),
        (["--slo", "latency=5m"], "--slo"),
        (["--slo", "deck_p95=20m", "--trace", "/nonexistent.csv"], "cannot read trace"),
        (["--slo", "deck_p95=20m", "--pools", "/nonexistent.yaml"], "pools file not found"),
        (["--slo", "deck_p95=20m", "--out", "/nonexistent/dir/p.yaml"], "--out"),
    ],
)
def test_cli_tune_bad_input_exits_2(tmp_path: Path, args: list[str], words: str) -> None:
    base = {"--trace": str(DATA / "quiet_week.csv"), "--pools": str(SHIPPED)}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    proc = gpuscale("tune", *[x for kv in base.items() for x in kv])
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
