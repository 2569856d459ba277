"""A real Prometheus server for tests: the Debian ``prometheus`` binary on loopback.

:class:`PrometheusServer` writes a config with a 1 s scrape interval and the test's targets, starts
``prometheus`` with a temporary data directory on a free 127.0.0.1 port, waits until it is ready,
and stops it (SIGTERM, then SIGKILL) afterwards.  Targets are either static (``{"job": ["host:port",
...]}``) or a ``file_sd`` JSON file that the test (or the demo) rewrites while the server runs;
Prometheus watches that file, so targets that appear mid-run (worker replicas) get scraped too.

``prometheus_server`` is a pytest fixture factory: ``server = prometheus_server(static={...})``
starts one, and the fixture stops every server it started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gpuscale.dev.stack import free_port


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def require_prometheus() -> str:
    """The binary's path; in CI a missing binary fails the test, locally it skips with the fix."""
    binary = prometheus_binary()
    if binary is None:
        msg = "prometheus is not installed (apt-get install -y --no-install-recommends prometheus)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return binary


def write_file_sd(path: Path, targets: dict[str, list[str]]) -> None:
    """Write a file_sd target list atomically (Prometheus may read it at any moment)."""
    groups = [{"targets": sorted(addrs), "labels": {"job": job}} for job, addrs in sorted(targets.items())]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(groups))
    os.replace(tmp, path)


class PrometheusServer:
    """One Prometheus process; :meth:`start` / :meth:`stop`, or use as a context manager."""

    def __init__(
        self,
        *,
        static: dict[str, list[str]] | None = None,
        file_sd: Path | None = None,
        rule_files: list[Path] | None = None,
        scrape_interval: str = "1s",
    ) -> None:
        self.static = static or {}
        self.file_sd = file_sd
        self.rule_files = rule_files or []
        self.scrape_interval = scrape_interval
        self.port = 0
        self.workdir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        scrape_configs: list[dict[str, Any]] = [
            {"job_name": job, "static_configs": [{"targets": list(addrs)}]}
            for job, addrs in self.static.items()
        ]
        if self.file_sd is not None:
            # The job label comes from each target group's labels (see write_file_sd).
            scrape_configs.append(
                {
                    "job_name": "file_sd",
                    "file_sd_configs": [{"files": [str(self.file_sd)], "refresh_interval": "1s"}],
                }
            )
        return {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": scrape_configs,
        }

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        binary = require_prometheus()
        self.workdir = Path(tempfile.mkdtemp(prefix="gpuscale-prom-"))
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        if self.file_sd is not None and not self.file_sd.exists():
            write_file_sd(self.file_sd, {})
        self._log = (self.workdir / "prometheus.log").open("wb")
        # A port can be taken between probing and binding; retry a few times on a fresh one.
        for _attempt in range(3):
            self.port = free_port()
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1d",
                    "--web.enable-lifecycle",
                ],
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            if self._wait_ready(timeout):
                return self
            self._terminate()
        raise RuntimeError(f"prometheus did not become ready; log:\n{self.log_text()[-4000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return False

    def log_text(self) -> str:
        if self.workdir is None:
            return ""
        try:
            return (self.workdir / "prometheus.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _terminate(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        self._terminate()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- HTTP API -----------------------------------------------------------------------------------
    def query(self, expr: str, *, time_s: float | None = None) -> list[dict[str, Any]]:
        """Instant query through ``/api/v1/query``; the result vector (raises on a PromQL error)."""
        params: dict[str, str] = {"query": expr}
        if time_s is not None:
            params["time"] = f"{time_s:.3f}"
        resp = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=10.0)
        body = resp.json()
        if body.get("status") != "success":
            raise ValueError(f"query {expr!r} failed: {body.get('errorType')}: {body.get('error')}")
        result = body["data"]["result"]
        return list(result) if isinstance(result, list) else [result]

    def targets(self) -> list[dict[str, Any]]:
        resp = httpx.get(f"{self.url}/api/v1/targets", timeout=10.0)
        return list(resp.json()["data"]["activeTargets"])

    def wait_for_targets_up(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` targets have been scraped successfully."""
        deadline = time.monotonic() + timeout
        up: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            up = [t for t in self.targets() if t.get("health") == "up"]
            if len(up) >= count:
                return up
            time.sleep(0.2)
        raise TimeoutError(f"only {len(up)} of {count} targets up: {self.targets()}")

    def rules(self) -> list[dict[str, Any]]:
        resp = httpx.get(f"{self.url}/api/v1/rules", timeout=10.0)
        return [rule for group in resp.json()["data"]["groups"] for rule in group["rules"]]


@pytest.fixture
def prometheus_server() -> Iterator[Callable[..., PrometheusServer]]:
    """Factory fixture: ``prometheus_server(static={"job": ["127.0.0.1:9100"]})`` → a started server."""
    started: list[PrometheusServer] = []

    def start(**kwargs: Any) -> PrometheusServer:
        server = PrometheusServer(**kwargs)
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.stop()
