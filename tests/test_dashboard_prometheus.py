"""The dashboard against a real Prometheus.

- the fixture itself: Prometheus scrapes a real ``/metrics`` endpoint on loopback every second
  and answers queries through its HTTP API, and loads alerts.yml;
- during a headless demo, every expression of every dashboard panel, evaluated through
  ``/api/v1/query``, returns data.
"""

from __future__ import annotations

import time
from pathlib import Path
from wsgiref.simple_server import WSGIServer

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
