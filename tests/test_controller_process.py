"""``gpuscale controller`` as real processes: the ops HTTP API, leader failover, SIGTERM, --once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gpuscale.dev.emulator.app import EmulatorConfig
from gpuscale.dev.emulator.server import Emulator
from gpuscale.dev.stack import free_port

ROOT = Path(__file__).resolve().parents[1]
SLEEPER = f"{sys.executable} -c 'import time; time.sleep(600)'"

POOLS_YAML = "\nreconcile_interval: 1s\n" + "".join(
    f"""{pool}_container_scaling:
  min_replicas: 0
  max_replicas: 2
  scale_up_threshold: 1
  scale_up_delay: 5s
  scale_down_delay: 30s
  startup_timeout: 60s
  deployment: gpuscale-{pool}
  cold_start: 2s
  price_per_hour: {price}
"""
    for pool, price in (("visual", 0.5), ("text", 0.8))
)  # the two pools alike but for name and price


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    emu = Emulator(EmulatorConfig(cold_start_s=0.05, grace_s=1.0, default_command=SLEEPER))
    emu.start()
    try:
        for name in ("visual", "text"):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "gpuscale.cli",
                    "deploy",
                    "apply",
                    str(ROOT / f"deploy/datacrunch/{name}.yaml"),
                ],
                env={**os.environ, **_dc_env(emu), "GPUSCALE_SHARED_VOLUME_ID": "sfs-test"},
                check=True,
                capture_output=True,
                timeout=60,
            )
        yield emu
    finally:
        emu.stop()


def _dc_env(emu: Emulator) -> dict[str, str]:
    return {
        "DATACRUNCH_BASE_URL": emu.base_url,
        "DATACRUNCH_CLIENT_ID": emu.client_id,
        "DATACRUNCH_CLIENT_SECRET": emu.client_secret,
        "GPUSCALE_PROVIDER": "datacrunch",
    }


@pytest.fixture
def ctl_env(db_env: dict[str, str], emulator: Emulator, tmp_path: Path) -> dict[str, str]:
    pools = tmp_path / "pools.yaml"
    pools.write_text(POOLS_YAML)
    return {
        **db_env,
        **_dc_env(emulator),
        "GPUSCALE_POOLS_FILE": str(pools),
        "GPUSCALE_DATACRUNCH_RETRY_ATTEMPTS": "2",
        # A short leader lease: a killed leader's term ends in seconds.
        "GPUSCALE_LEADER_LEASE_DURATION_S": "3",
        "GPUSCALE_LEADER_RENEW_DEADLINE_S": "2",
        "GPUSCALE_LEADER_RETRY_PERIOD_S": "0.5",
    }


def start_controller(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gpuscale.cli", "controller", "--http-port", str(port)],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_ready(port: int, timeout: float = 30) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            if r.status_code == 200:
                return dict(r.json())
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"controller on port {port} never became ready")


def role(port: int) -> str:
    return str(httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).json()["role"])


def wait_role(port: int, wanted: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if role(port) == wanted:
            return
        time.sleep(0.1)
    raise AssertionError(f"controller on port {port} is not {wanted}")


def wait_decision(port: int, pool: str, timeout: float = 30) -> None:
    """Until the controller has recorded a decision for ``pool`` (its first tick did)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"http://127.0.0.1:{port}/api/events", params={"pool": pool, "limit": 1}, timeout=2)
        if r.status_code == 200 and r.json()["events"]:
            return
        time.sleep(0.1)
    raise AssertionError(f"controller on port {port} recorded no decision for {pool}")


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()
    return proc.returncode


def start_leader(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A controller on a free port that is up and leading, and that port (stopped again if it is not)."""
    port = free_port()
    proc = start_controller(env, port, log)
    try:
        wait_ready(port)
        wait_role(port, "leader")
    except BaseException:
        stop(proc)
        raise
    return proc, port


def test_ops_api_and_clean_sigterm(ctl_env: dict[str, str], tmp_path: Path) -> None:
    proc, port = start_leader(ctl_env, tmp_path / "ctl.log")
    try:
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz").text == "ok"
        for _ in range(50):
            pools = httpx.get(f"{base}/api/pools").json()
            if all(p["last_decision"] for p in pools["pools"]):
                break
            time.sleep(0.1)
        by_name = {p["name"]: p for p in pools["pools"]}
        assert set(by_name) == {"visual", "text"}
        assert by_name["visual"]["deployment"] == "gpuscale-visual"
        assert by_name["visual"]["replicas_provider"] == 0
        assert by_name["visual"]["last_decision"]["reason"]
        assert by_name["visual"]["rules"]["max_replicas"] == 2
        metrics = httpx.get(f"{base}/metrics").text
        for name in (
            "gpuscale_replicas_desired",
            "gpuscale_queue_depth",
            "gpuscale_leader 1.0",
            "gpuscale_reconcile_seconds",
        ):
            assert name in metrics
        assert httpx.get(f"{base}/api/servers").json()["servers"] == []
        events = httpx.get(f"{base}/api/events", params={"pool": "visual", "limit": 5}).json()["events"]
        assert isinstance(events, list)
        assert httpx.get(f"{base}/api/events", params={"limit": "x"}).status_code == 400
        # Nothing secret in any answer.
        secret = ctl_env["DATACRUNCH_CLIENT_SECRET"]
        for path in ("/api/pools", "/api/servers", "/api/events", "/metrics", "/readyz"):
            assert secret not in httpx.get(f"{base}{path}").text
    finally:
        code = stop(proc)
    log = (tmp_path / "ctl.log").read_text()
    assert code == 0, log
    assert ctl_env["DATACRUNCH_CLIENT_SECRET"] not in log
    assert "stopped" in log


def test_standby_takes_over_when_the_leader_is_killed(ctl_env: dict[str, str], tmp_path: Path) -> None:
    first, p1 = start_leader(ctl_env, tmp_path / "a.log")
    p2 = free_port()
    try:
        second = start_controller(ctl_env, p2, tmp_path / "b.log")
        try:
            wait_ready(p2)
            time.sleep(2)
            assert role(p2) == "standby" and role(p1) == "leader"
            # Standbys still serve metrics, with the leader flag at 0.
            assert "gpuscale_leader 0.0" in httpx.get(f"http://127.0.0.1:{p2}/metrics").text
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
            started = time.monotonic()
            wait_role(p2, "leader", timeout=15)
            took = time.monotonic() - started
            assert took < 10, f"takeover took {took:.1f}s"
        finally:
            assert stop(second) == 0
    finally:
        stop(first)


def test_once_and_bad_pools_file(ctl_env: dict[str, str], tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gpuscale.cli", "controller", "--once"],
        env=ctl_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "visual:" in out.stdout and "text:" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("visual_container_scaling:\n  min_replicas: 5\n  max_replicas: 1\n")
    out = subprocess.run(
        [sys.executable, "-m", "gpuscale.cli", "controller", "--once", "--pools", str(bad)],
        env=ctl_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "bad.yaml" in out.stderr and "min_replicas" in out.stderr


def test_pool_pause_and_resume_cli(ctl_env: dict[str, str]) -> None:
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "gpuscale.cli", "pool", *a],
        env=ctl_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = run("pause", "visual")
    assert out.returncode == 0 and "paused" in out.stdout
    out = run("pause", "nope")
    assert out.returncode == 2 and "unknown pool" in out.stderr
    out = run("resume", "visual")
    assert out.returncode == 0 and "resumed" in out.stdout
    json.dumps(out.stdout)


def test_status_shows_the_controllers_view(ctl_env: dict[str, str], tmp_path: Path) -> None:
    proc, port = start_leader(ctl_env, tmp_path / "ctl.log")
    try:
        wait_decision(port, "visual")
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "gpuscale.cli",
                "status",
                "--json",
                "--controller",
                f"http://127.0.0.1:{port}",
            ],
            env=ctl_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        pools = json.loads(out.stdout)["pools"]
        assert pools["visual"]["replicas"] == "0/0/0"
        assert "(" in pools["visual"]["decision"]
        table = subprocess.run(
            [sys.executable, "-m", "gpuscale.cli", "status", "--controller", f"http://127.0.0.1:{port}"],
            env={**ctl_env, "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert table.returncode == 0 and "replicas" in table.stdout and "decision" in table.stdout
    finally:
        assert stop(proc) == 0


def test_json_logs_one_object_per_decision(ctl_env: dict[str, str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gpuscale.cli", "--log-format", "json", "controller", "--once"],
        env=ctl_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stderr.splitlines() if line.strip()]
    decisions = [rec for rec in lines if rec.get("reason")]
    assert {rec["pool"] for rec in decisions} == {"visual", "text"}
    assert all({"from", "to", "outcome", "level", "ts"} <= rec.keys() for rec in decisions)
