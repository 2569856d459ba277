"""The Prometheus alert rules and the Grafana dashboard, checked with the real ``promtool``.

- ``promtool check rules`` on deploy/prometheus/alerts.yml, ``promtool test rules`` on its unit
  tests (each alert fires on the series it is meant for and stays quiet on a healthy system), and
  ``promtool check config`` on the example scrape config;
- the dashboard's structure: every panel has queries, a ``pool`` variable exists, the layout fits
  the 24-column grid, and the topics the product promises are all there;
- every PromQL expression (dashboard panels, annotations, variables, alert rules) only uses the
  project's metric names, with the right kind (histograms through ``_bucket``/``_count``/``_sum``),
  and parses: promtool checks each one as a recording rule.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "gpuscale.json"

# The project's metric list (DESIGN.md, issue 6): name -> kind.  Exposed by the controller, except
# the queue-wait / task-duration histograms, which workers expose (the controller may too).
METRICS: dict[str, str] = {
    "gpuscale_queue_depth": "gauge",
    "gpuscale_tasks_running": "gauge",
    "gpuscale_tasks_blocked": "gauge",
    "gpuscale_replicas_desired": "gauge",
    "gpuscale_replicas_provider": "gauge",
    "gpuscale_replicas_registered": "gauge",
    "gpuscale_replicas_starting": "gauge",
    "gpuscale_oldest_queued_age_seconds": "gauge",
    "gpuscale_scale_events_total": "counter",
    "gpuscale_provider_requests_total": "counter",
    "gpuscale_provider_request_seconds": "histogram",
    "gpuscale_reconcile_seconds": "histogram",
    "gpuscale_queue_wait_seconds": "histogram",
    "gpuscale_task_duration_seconds": "histogram",
    "gpuscale_task_failures_total": "counter",
    "gpuscale_tasks_dead_total": "counter",
    "gpuscale_cold_start_seconds": "histogram",
    "gpuscale_spend_usd_total": "counter",
    "gpuscale_leader": "gauge",
}
# Prometheus' own series that rules may use.
BUILTIN_SERIES = {"up"}

# Grafana's template variables, replaced by plausible values before PromQL is parsed.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "${pool}": ".*",
    "$pool": ".*",
}

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk",
    "bottomk", "quantile", "count_values", "group", "inf", "nan",
}  # fmt: skip


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        msg = f"{tool} is not installed (apt-get install -y --no-install-recommends prometheus)"
        if os.environ.get("CI"):
            pytest.fail(msg)  # CI installs it (.ci/run); a missing tool there is a broken build
        pytest.skip(msg)
    return path


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The series names an expression selects (a small PromQL tokenizer, enough for our rules)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group(0)
        rest = text[m.end() :].lstrip()
        if rest.startswith("("):  # a function call
            continue
        if word.lower() in PROMQL_WORDS or re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def check_names(expr: str, *, allow_recorded: bool = False) -> list[str]:
    """Problems with the metric names of one expression (empty when fine)."""
    problems = []
    for name in metric_names(expr):
        if ":" in name and allow_recorded:
            continue  # a recording rule of alerts.yml
        if name in BUILTIN_SERIES:
            continue
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        if name in METRICS:
            if METRICS[name] == "histogram":
                problems.append(f"{name} is a histogram; use {name}_bucket/_count/_sum in {expr!r}")
        elif base in METRICS and METRICS[base] == "histogram":
            pass
        else:
            problems.append(f"unknown metric {name!r} in {expr!r}")
    return problems


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def data_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for p in dash["panels"]:
        if p["type"] == "row":
            panels.extend(p.get("panels", []))  # a collapsed row keeps its panels inside
        else:
            panels.append(p)
    return panels


def dashboard_exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel."""
    return [(p["title"], t["expr"]) for p in data_panels(dash) for t in p["targets"]]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


# --- promtool ---------------------------------------------------------------------------------------
def test_promtool_check_rules() -> None:
    promtool = _need("promtool")
    out = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_unit_tests_of_every_alert() -> None:
    promtool = _need("promtool")
    out = subprocess.run(
        [promtool, "test", "rules", str(ALERTS_TEST)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # Every alert has at least one case where it must fire.
    tested = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    firing = {
        case["alertname"] for t in tested for case in t.get("alert_rule_test", []) if case.get("exp_alerts")
    }
    alerts = {r["alert"] for r in alert_rules() if "alert" in r}
    assert alerts <= firing, f"alerts without a firing test case: {sorted(alerts - firing)}"


def test_promtool_check_example_config() -> None:
    promtool = _need("promtool")
    out = subprocess.run(
        [promtool, "check", "config", str(PROM_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_dashboard_expr_parses_as_promql(tmp_path: Path) -> None:
    """promtool parses each expression (Grafana variables substituted) as a recording rule."""
    promtool = _need("promtool")
    dash = dashboard()
    exprs = [e for _, e in dashboard_exprs(dash)]
    exprs += [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    rules = [{"record": f"dashboard:expr_{i}", "expr": substitute(e)} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout


# --- the alerts' content -------------------------------------------------------------------------
def test_alerts_cover_what_ops_needs() -> None:
    rules = [r for r in alert_rules() if "alert" in r]
    exprs = {r["alert"]: r["expr"] for r in rules}
    # queue waiting longer than the SLA, stuck replicas, provider errors, no leader, budget, dead tasks
    needed = {
        "gpuscale_oldest_queued_age_seconds": "queue waiting longer than the SLA",
        "gpuscale_replicas_starting": "replicas stuck starting",
        "gpuscale_provider_requests_total": "provider errors",
        "gpuscale_leader": "no leader",
        "gpuscale:spend_usd_per_30d:rate1h": "spend above budget pace",
        "gpuscale_tasks_dead_total": "dead tasks",
    }
    for metric, what in needed.items():
        assert any(metric in e for e in exprs.values()), f"no alert for {what} ({metric})"
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


def test_rule_exprs_use_only_project_metrics() -> None:
    problems = [p for r in alert_rules() for p in check_names(r["expr"], allow_recorded=True)]
    assert problems == []


# --- the dashboard's structure --------------------------------------------------------------------
def test_dashboard_has_pool_variable_and_datasource() -> None:
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert "pool" in variables
    pool = variables["pool"]
    assert pool["type"] == "query"
    assert pool["includeAll"] and pool["multi"]
    query = pool["query"]["query"] if isinstance(pool["query"], dict) else pool["query"]
    m = re.fullmatch(r"label_values\((\w+),\s*pool\)", query)
    assert m and m.group(1) in METRICS, query
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert dash["uid"] and dash["title"]


def test_every_panel_has_targets_with_exprs() -> None:
    panels = data_panels(dashboard())
    assert len(panels) >= 15
    for panel in panels:
        assert panel.get("targets"), f"panel {panel['title']!r} has no targets"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["type"] == "prometheus"


def test_every_dashboard_expr_uses_only_project_metrics() -> None:
    dash = dashboard()
    exprs = [e for _, e in dashboard_exprs(dash)]
    exprs += [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    problems = [p for e in exprs for p in check_names(e)]
    assert problems == []


def test_pool_scoped_exprs_filter_on_the_pool_variable() -> None:
    """A metric with a pool label must follow the dashboard's pool selection."""
    pool_less = {"gpuscale_leader", "gpuscale_provider_requests_total", "gpuscale_provider_request_seconds"}
    for title, expr in dashboard_exprs(dashboard()):
        for m in re.finditer(r"(gpuscale_\w+?)(?:_bucket|_count|_sum)?(\{[^}]*\})?(?=\W|$)", expr):
            name = m.group(1)
            if name in pool_less or name.removesuffix("_bucket") in pool_less:
                continue
            assert m.group(2) and 'pool=~"$pool"' in m.group(2), f"{title}: {m.group(0)}"


def test_dashboard_shows_what_the_product_promises() -> None:
    exprs = " ".join(e for _, e in dashboard_exprs(dashboard()))
    for metric in (
        "gpuscale_queue_depth",
        "gpuscale_replicas_desired",
        "gpuscale_replicas_provider",
        "gpuscale_replicas_registered",
        "gpuscale_cold_start_seconds",
        "gpuscale_provider_requests_total",
        "gpuscale_spend_usd_total",
    ):
        assert metric in exprs, metric
    # the decision timeline carries the reason
    assert re.search(r"by \([^)]*reason[^)]*\) \(increase\(gpuscale_scale_events_total", exprs)
    # percentiles of queue wait and task duration by task type
    for hist in ("gpuscale_queue_wait_seconds", "gpuscale_task_duration_seconds"):
        assert re.search(
            rf"histogram_quantile\(0\.95, sum by \([^)]*task_type[^)]*\) \(rate\({hist}_bucket", exprs
        ), hist


def test_dashboard_layout_fits_the_grid() -> None:
    dash = dashboard()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    occupied: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        cells = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells


def test_metric_kinds_match_the_code() -> None:
    """The list above agrees with what controller/metrics.py (and the worker, when built) define."""
    from prometheus_client import REGISTRY

    import gpuscale.controller.metrics

    try:
        import gpuscale.worker.metrics  # noqa: F401
    except ImportError:
        pass
    defined: dict[str, str] = {}
    for collector in list(REGISTRY._collector_to_names):
        for family in collector.describe() if hasattr(collector, "describe") else []:
            name = family.name + ("_total" if family.type == "counter" else "")
            defined[name] = family.type
    overlap = {n for n in METRICS if n in defined}
    assert overlap, "gpuscale.controller.metrics defines none of the project's metrics"
    for name in overlap:
        assert defined[name] == METRICS[name], f"{name}: code says {defined[name]}, list says {METRICS[name]}"
