"""Pool rules: the seeds' format as written, durations, validation errors, the shipped files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gpuscale.controller.pools import PoolsFileError, load_pools, parse_duration, parse_pools
from gpuscale.queue import tasktypes

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
V = "visual_container_scaling"

# Verbatim from the PRD (seeds/002_4d6e370fed16f91c.txt), comments included.
SEEDS_YAML = """\
visual_container_scaling:
  min_replicas: 0
  max_replicas: 3
  scale_up_threshold: 2 # tasks waiting
  scale_up_delay: 120s # wait before scaling
  scale_down_delay: 600s # wait before scaling down
  startup_timeout: 300s # max container startup time

text_container_scaling:
  min_replicas: 0
  max_replicas: 5
  scale_up_threshold: 3 # tasks waiting
  scale_up_delay: 120s
  scale_down_delay: 600s
  startup_timeout: 300s
"""


def test_seeds_format_as_written(tmp_path: Path) -> None:
    path = tmp_path / "pools.yaml"
    path.write_text(SEEDS_YAML)
    config = load_pools(path)
    assert set(config.pools) == {"visual", "text"}
    visual = config.pools["visual"]
    assert (visual.min_replicas, visual.max_replicas, visual.scale_up_threshold) == (0, 3, 2)
    assert visual.scale_up_delay_s == 120.0
    assert visual.scale_down_delay_s == 600.0
    assert visual.idle_timeout_s == 600.0
    assert visual.startup_timeout_s == 300.0
    assert config.pools["text"].max_replicas == 5
    # Task types default to the registry's routing; every type served by exactly one pool.
    assert sorted(visual.task_types) == tasktypes.types_for_pool("visual")
    assert config.type_to_pool()["template_analysis"] == "text"
    assert config.pool_for_type("slide_feedback").name == "visual"
    assert config.critical_immediate is True
    assert config.monthly_budget_usd is None
    assert load_pools(DATA / "pools_seeds.yaml") == config


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("10m", 600),
        ("1h", 3600),
        ("1h30m", 5400),
        ("2.5", 2.5),
        (120, 120),
        ("500ms", 0.5),
        (" 5 m ", 300),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["2x", "-5", "", "m", "1h x", True, None, [1], "nan"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_extras_and_auto(tmp_path: Path) -> None:
    config = parse_pools(
        {
            "pools": {
                "visual": {
                    "max_replicas": 4,
                    "scale_down_delay": "auto",
                    "cold_start": "90s",
                    "tasks_per_replica": 2,
                    "price_per_hour": 0.5,
                    "deployment": "vis",
                    "prewarm": False,
                    "task_durations": {"visual_analysis": "3m"},
                }
            },
            "monthly_budget_usd": 100,
        }
    )
    visual = config.pools["visual"]
    assert visual.scale_down_auto and visual.idle_timeout_s == 90.0
    assert visual.duration_for("visual_analysis") == 180.0
    assert visual.duration_for("slide_feedback") == visual.default_task_duration_s
    assert (visual.tasks_per_replica, visual.deployment, visual.prewarm) == (2, "vis", False)
    assert config.monthly_budget_usd == 100


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    [
        (V + ": {min_replicas: 4, max_replicas: 3}", V, "min_replicas"),
        (V + ": {scale_up_delay: 2x}", V + ".scale_up_delay", "duration"),
        (V + ": {scale_down_delay: -1s}", V + ".scale_down_delay", "negative"),
        (V + ": {scale_up_dealy: 10s}", V + ".scale_up_dealy", "xtra"),
        (V + ": {task_types: [nope]}", V + ".task_types", "unknown task type"),
        (
            V + ": {task_types: [visual_analysis]}",
            V + ".task_types",
            "slide_feedback",
        ),
        (
            V + ": {task_types: [visual_analysis, slide_feedback, deck_date_extraction]}",
            V + ".task_types",
            "routed to pool 'text'",
        ),
        (V + ": {max_replicas: many}", V + ".max_replicas", "integer"),
        (V + ": [1, 2]", V, "mapping"),
        ("gpu_pools: {}", "gpu_pools", "unknown top-level key"),
        ("monthly_budget_usd: -3\nvisual_scaling: {}", "monthly_budget_usd", "greater than 0"),
        ("- just\n- a list", "", "mapping at the top level"),
        ("{}", "", "no pools"),
    ],
)
def test_bad_files_name_file_and_field(tmp_path: Path, doc: str, field: str, words: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(doc)
    with pytest.raises(PoolsFileError) as info:
        load_pools(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert field in message
    assert words in message


def test_type_in_two_pools(tmp_path: Path) -> None:
    data = {
        "visual_scaling": {"task_types": ["visual_analysis", "slide_feedback"]},
        "visual_container_scaling": {},
    }
    with pytest.raises(PoolsFileError, match="defined twice"):
        parse_pools(data, "x.yaml")
    data = yaml.safe_load(SEEDS_YAML)
    data["text_container_scaling"]["task_types"] = ["slide_feedback", *tasktypes.types_for_pool("text")]
    with pytest.raises(PoolsFileError, match="already served by pool 'visual'"):
        parse_pools(data, "x.yaml")


def test_missing_and_not_yaml(tmp_path: Path) -> None:
    with pytest.raises(PoolsFileError, match="not found"):
        load_pools(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("visual_container_scaling: {min_replicas: [\n")
    with pytest.raises(PoolsFileError, match="not valid YAML"):
        load_pools(bad)


@pytest.mark.parametrize("path", ["deploy/datacrunch/pools.yaml", "deploy/demo/pools.yaml"])
def test_shipped_files_load(path: str) -> None:
    config = load_pools(ROOT / path)
    assert set(config.pools) == {"visual", "text"}
    served = set(config.type_to_pool())
    assert served == set(tasktypes.types_for_pool("visual")) | set(tasktypes.types_for_pool("text"))
    for rules in config.pools.values():
        assert rules.price_per_hour > 0 and rules.deployment


def test_cli_exits_2_on_bad_pools_file(tmp_path: Path) -> None:
    bad = tmp_path / "pools.yaml"
    bad.write_text("visual_container_scaling: {min_replicas: 5, max_replicas: 1}\n")
    trace = DATA / "quiet_week.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "gpuscale.cli", "simulate", "--trace", str(trace), "--pools", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "min_replicas" in proc.stderr


def test_shipped_deployments_serve_as_the_shipped_pools_say() -> None:
    from gpuscale.controller import deployspec

    root = Path(__file__).resolve().parents[1] / "deploy" / "datacrunch"
    config = load_pools(root / "pools.yaml")
    for name, rules in config.pools.items():
        specs = deployspec.load_all(root / f"{name}.yaml")
        assert [s["name"] for s in specs] == [o.name for o in rules.options]  # every fallback
        for one in specs:
            assert deployspec.serving_mismatches(one, rules.tasks_per_replica, rules.parallel) == []
        spec = specs[0]
        fixed = deployspec.with_serving_env(spec, rules.tasks_per_replica + 1, rules.parallel + 1)
        assert len(deployspec.serving_mismatches(fixed, rules.tasks_per_replica, rules.parallel)) == 2
