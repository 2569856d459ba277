"""``gpuscale bench fleet`` run small: simulated replicas and a controller against a throwaway
PostgreSQL, directly and through a real PgBouncer; nothing may be lost, no connection may fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gpuscale.db.pgbouncer import find_pgbouncer
from gpuscale.dev.fleetbench import PROBE_POOLS


def _bench(*args: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-m", "gpuscale.cli", "bench", "fleet", "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "GPUSCALE_DATABASE_URL"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _check(result: dict[str, object]) -> None:
    for key in (
        "replicas",
        "pools",
        "peak_connections",
        "connection_errors",
        "claim_p50_ms",
        "claim_p99_ms",
        "reconcile_p99_ms",
        "tasks_done",
        "tasks_lost",
    ):
        assert key in result, key
    assert result["replicas"] == 20 and result["pools"] == 4
    assert result["replicas_started"] == 20
    assert result["connection_errors"] == 0, result["warning_samples"]
    assert result["tasks_lost"] == 0 and result["tasks_unfinished"] == 0 and result["tasks_failed"] == 0
    assert isinstance(result["tasks_done"], int) and result["tasks_done"] > 0
    assert isinstance(result["peak_connections"], int) and result["peak_connections"] > 0
    probes = result["critical_to_provider_ms"]
    assert isinstance(probes, list) and len(probes) == PROBE_POOLS and all(p < 10_000 for p in probes)
    assert result["critical_to_provider_max_ms"] == max(probes)
    assert isinstance(result["critical_to_provider_p50_ms"], float)
    assert min(probes) <= result["critical_to_provider_p50_ms"] <= max(probes)


def test_bench_fleet_direct() -> None:
    result = _bench("--replicas", "20", "--pools", "4", "--duration", "8", "--rate", "40")
    _check(result)
    # A worker's budget is two connections (work + LISTEN), the controller's four.
    assert isinstance(result["peak_connections"], int) and result["peak_connections"] <= 20 * 2 + 4


def test_bench_fleet_bad_input_is_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gpuscale.cli", "bench", "fleet", "--replicas", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--replicas" in proc.stderr


@pytest.mark.skipif(find_pgbouncer() is None and not os.environ.get("CI"), reason="pgbouncer not installed")
def test_bench_fleet_through_pgbouncer() -> None:
    result = _bench(
        "--replicas",
        "20",
        "--pools",
        "4",
        "--duration",
        "8",
        "--rate",
        "40",
        "--pgbouncer",
        "--poll-interval",
        "0.5",
    )
    _check(result)
    assert result["pgbouncer"] is True and result["workers_listen"] is False
    # 20 replicas through PgBouncer's 20 server connections, plus the controller's four (direct).
    assert isinstance(result["peak_connections"], int) and result["peak_connections"] <= 20 + 4
