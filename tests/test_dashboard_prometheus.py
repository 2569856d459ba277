"""The dashboard against a real Prometheus.

- the fixture itself: Prometheus scrapes a real ``/metrics`` endpoint on loopback every second
  and answers queries through its HTTP API, and loads alerts.yml;
- during a headless demo, every expression of every dashboard panel, evaluated through
  ``/api/v1/query``, returns data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import pytest
from prometheus_client import CollectorRegistry, Gauge, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler, make_server
from prometheus_server import PrometheusServer, prometheus_server, write_file_sd  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"


def _serve(registry: CollectorRegistry) -> tuple[WSGIServer, str]:
    import threading

    server = make_server(
        "127.0.0.1", 0, make_wsgi_app(registry), ThreadingWSGIServer, handler_class=_SilentHandler
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"127.0.0.1:{server.server_port}"


def _wait_for(server: PrometheusServer, expr: str, timeout: float = 20.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = server.query(expr)
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"{expr!r} returned no data within {timeout}s")


def test_fixture_scrapes_static_and_file_sd_targets(prometheus_server, tmp_path: Path) -> None:  # noqa: F811
    reg_a, reg_b = CollectorRegistry(), CollectorRegistry()
    Gauge("gpuscale_leader", "leader", registry=reg_a).set(1)
    Gauge("gpuscale_replicas_desired", "desired", ["pool"], registry=reg_b).labels("visual").set(3)
    http_a, addr_a = _serve(reg_a)
    http_b, addr_b = _serve(reg_b)
    sd = tmp_path / "targets.json"
    try:
        prom = prometheus_server(static={"controller": [addr_a]}, file_sd=sd, rule_files=[ALERTS])
        assert _wait_for(prom, "gpuscale_leader")[0]["value"][1] == "1"
        # A target that appears while Prometheus runs (a new worker replica) is picked up.
        write_file_sd(sd, {"worker": [addr_b]})
        result = _wait_for(prom, 'gpuscale_replicas_desired{job="worker"}')
        assert result[0]["metric"]["pool"] == "visual" and result[0]["value"][1] == "3"
        # The alert rules load and are evaluated.
        names = {r["name"] for r in prom.rules()}
        assert {"GpuscaleNoLeader", "GpuscaleDeadTasks"} <= names
    finally:
        http_a.shutdown()
        http_b.shutdown()
    assert prom.proc is not None  # still running until the fixture stops it


# --- the dashboard during a headless demo -----------------------------------------------------------
DASHBOARD = ROOT / "deploy" / "grafana" / "gpuscale.json"
# Grafana's variables as a person looking at the whole demo would have them.
VARS = {"$__rate_interval": "30s", "$__interval": "2s", "$__range": "1h", "$pool": ".*"}
# Every panel must show a number, percentiles included: the controller pre-creates its label sets
# at start and exports queue wait / task duration from the queue, so a short run has real rates.
NAN_TOLERATED: tuple[str, ...] = ()
CLIENT_SECRET = "demo-client-secret-5b0d7e1f"
WORKER_TOKEN = "demo-worker-token-93a4c2aa"


def dashboard_queries() -> dict[str, str]:
    """{"panel title / refId": expr with the variables substituted} for every panel query."""
    dash = json.loads(DASHBOARD.read_text())
    out = {}
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in VARS.items():
                expr = expr.replace(var, value)
            out[f"{panel['title']} / {target['refId']}"] = expr
    return out


def _has_finite_value(result: list[dict]) -> bool:
    for item in result:
        value = item.get("value", [0, "NaN"])[1]
        if value not in ("NaN", "+Inf", "-Inf"):
            return True
    return False


def _processes_with_env(entry: str) -> list[int]:
    pids = []
    needle = entry.encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_headless_demo_every_dashboard_panel_has_data(prometheus_server, tmp_path: Path) -> None:  # noqa: F811
    """One headless demo, scraped by a real Prometheus every second:

    - the demo exits 0 and its JSON says every task is done and every pool is back to 0;
    - every query of every dashboard panel, evaluated through /api/v1/query while the demo runs,
      returned a (finite) value at least once;
    - nothing is left running, and no secret shows in a log, the summary or a metric label.
    """
    targets = tmp_path / "targets.json"
    write_file_sd(targets, {})
    # The demo keeps this file_sd file up to date: the controller, and each worker as it registers.
    prom = prometheus_server(file_sd=targets, rule_files=[ALERTS])
    data_dir = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUSCALE_", "DATACRUNCH_"))}
    env.update({"DATACRUNCH_CLIENT_SECRET": CLIENT_SECRET, "GPUSCALE_WORKER_TOKEN": WORKER_TOKEN})
    argv = [
        sys.executable, "-c", "from gpuscale.cli.app import main; main()", "demo", "--headless", "--json",
        "--decks", "2", "--latency", "0.5", "--timeout", "200", "--data-dir", str(data_dir),
        "--prometheus-targets", str(targets),
    ]  # fmt: skip
    queries = dashboard_queries()
    nonempty: dict[str, bool] = dict.fromkeys(queries, False)
    finite: dict[str, bool] = dict.fromkeys(queries, False)
    errors: dict[str, str] = {}
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    started = time.monotonic()
    try:
        while proc.poll() is None:
            for name, expr in queries.items():
                if finite[name] or name in errors:
                    continue
                try:
                    result = prom.query(expr)
                except ValueError as exc:  # a PromQL error: the panel is broken
                    errors[name] = str(exc)
                    continue
                nonempty[name] = nonempty[name] or bool(result)
                finite[name] = _has_finite_value(result)
            time.sleep(1.0)
        stdout, stderr = proc.communicate(timeout=30)
        # The alert rules were evaluated against the demo's real series without an error.
        rule_health = {r["name"]: (r.get("health"), r.get("lastError", "")) for r in prom.rules()}
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.communicate(timeout=60)
    wall = time.monotonic() - started
    assert proc.returncode == 0, (
        f"demo exited {proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr[-6000:]}"
    )
    summary = json.loads(stdout)
    print(f"demo wall {wall:.1f}s; summary: {json.dumps({k: summary[k] for k in list(summary)[:12]})}")
    assert summary["ok"] is True
    assert summary["tasks_total"] > 0
    assert summary["tasks_done"] == summary["tasks_total"]
    assert summary["tasks_failed"] == 0
    assert summary["replicas_final"] == {"visual": 0, "text": 0}
    assert summary["wall_s"] > 0 and summary["cold_starts"] >= 2
    assert "Ollama STAND-IN" in stderr

    assert errors == {}
    # The criterion: every panel query returned data while the demo ran.
    missing = sorted(name for name, ok in nonempty.items() if not ok)
    assert missing == [], f"dashboard queries that never returned data: {missing}"
    # Stricter: a number, not only NaN (a rate over a window where the series did not move).
    nan_only = sorted(name for name, ok in finite.items() if not ok)
    print(f"{len(queries)} dashboard queries; NaN-only during this run: {nan_only}")
    unexpected = [n for n in nan_only if not n.startswith(NAN_TOLERATED)]
    assert unexpected == [], f"dashboard queries that never returned a number: {unexpected}"

    broken = {name: h for name, h in rule_health.items() if h[0] != "ok"}
    assert broken == {}, f"alert rules that failed to evaluate on the demo's series: {broken}"

    # Nothing left running: no process carries the demo's data dir in its environment.
    assert _processes_with_env(f"GPUSCALE_DATA_DIR={data_dir.absolute()}") == []
    # No secret anywhere it could leak: logs, the summary, metric labels.
    texts = [stdout, stderr] + [p.read_text(errors="replace") for p in data_dir.rglob("*.log")]
    for secret in (CLIENT_SECRET, WORKER_TOKEN):
        assert not any(secret in t for t in texts), "a secret leaked into the demo's output or logs"
    for label in prom_labels(prom):
        for secret in (CLIENT_SECRET, WORKER_TOKEN):
            assert secret not in label


def prom_labels(prom: PrometheusServer) -> list[str]:
    """Every label value Prometheus holds."""
    import httpx

    values = []
    for name in httpx.get(f"{prom.url}/api/v1/labels", timeout=10).json()["data"]:
        values += httpx.get(f"{prom.url}/api/v1/label/{name}/values", timeout=10).json()["data"]
    return values
