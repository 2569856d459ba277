"""``gpuscale replay``: the pure parts (scaling a pools file, slicing a trace, the replay worker's
Ollama-like serving) and one short replay on real processes checked against the simulator."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpuscale.controller.pools import load_pools, parse_pools
from gpuscale.controller.simulate import TraceTask, read_trace, simulate
from gpuscale.controller.simulate.engine import DRAIN_GRACE_S, timeline
from gpuscale.dev.replay import graphs_of, pools_yaml, scale_config, slice_trace
from gpuscale.worker.errors import TaskError
from gpuscale.worker.handlers import replay as replay_handlers
from gpuscale.worker.handlers.base import TaskContext
from gpuscale.worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "deploy/datacrunch/pools.yaml"
BUSY = ROOT / "tests/data/busy_day.csv"


def test_scale_config_divides_every_duration() -> None:
    config = load_pools(SHIPPED)
    fast = scale_config(config, 20.0)
    for name, rules in config.pools.items():
        quick = fast.pools[name]
        assert quick.cold_start_s == rules.cold_start_s / 20
        assert quick.startup_timeout_s == rules.startup_timeout_s / 20
        assert quick.scale_up_delay_s == rules.scale_up_delay_s / 20
        assert quick.drain_target_s == rules.drain_target_s / 20
        assert quick.default_task_duration_s == rules.default_task_duration_s / 20
        assert quick.task_durations_s == {t: v / 20 for t, v in rules.task_durations_s.items()}
        assert quick.idle_timeout_s == rules.idle_timeout_s / 20  # auto follows the cold start
        assert (quick.max_replicas, quick.parallel, quick.price_per_hour) == (
            rules.max_replicas,
            rules.parallel,
            rules.price_per_hour,
        )
    assert fast.reconcile_interval_s == config.reconcile_interval_s / 20
    import yaml

    assert parse_pools(yaml.safe_load(pools_yaml(fast))) == fast


def test_slice_keeps_whole_decks_from_zero() -> None:
    tasks = read_trace(BUSY)
    part = slice_trace(tasks, 9 * 3600, 2 * 3600)
    assert part and all(0 <= t.arrival_s < 7200 for t in part)
    assert {t.task_id for t in part} == {t.task_id for t in tasks if 9 * 3600 <= t.arrival_s < 11 * 3600}
    decks = graphs_of(part)
    assert len(decks) == len({t.task_id.split("-")[0] for t in part})
    # Every dependency stays inside its deck.
    ids = {t.task_id for t in part}
    assert all(d in ids for t in part for d in t.depends_on)


async def test_replay_worker_serves_one_at_a_time_in_arrival_order() -> None:
    handler = replay_handlers.make(parallel=1)
    events: list[tuple[str, str]] = []

    def ctx(name: str, seconds: float) -> TaskContext:
        async def progress(percent: float, _msg: str) -> None:
            events.append((name, "progress"))

        return TaskContext(
            task_id=name,
            task_type="visual_analysis",
            payload={"document": replay_handlers.replay_document(seconds)},
            settings=WorkerSettings(),
            progress=progress,
        )

    async def run(name: str, seconds: float) -> None:
        events.append((name, "claimed"))
        out = await handler(ctx(name, seconds))
        events.append((name, "done"))
        assert out["replayed_s"] == pytest.approx(seconds)

    await asyncio.gather(run("a", 0.05), run("b", 0.01), run("c", 0.0))
    served = [n for n, what in events if what == "done"]
    assert served == ["a", "b", "c"]  # first come, first served: b waited for a although shorter
    with pytest.raises(TaskError, match="replay:<seconds>"):
        await handler(dataclasses.replace(ctx("x", 0), payload={"document": "/d.pdf"}))


def test_replay_mode_needs_no_model() -> None:
    settings = WorkerSettings(worker_replay=True, ollama_num_parallel=2)
    assert settings.model_for("visual") is None
    assert settings.concurrency_for("visual") == 2


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--start", "soon"], "--start"),
        (["--start", "30h"], "no task arrives"),
        (["--speed", "0"], "speed"),
    ],
)
def test_cli_bad_input_exits_2(args: list[str], words: str, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gpuscale.cli", "replay", "--trace", str(BUSY), "--pools", str(SHIPPED),
         "--data-dir", str(tmp_path), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert words in out.stderr
    assert not any(tmp_path.iterdir()), "nothing written on bad input"


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_short_replay_agrees_with_the_simulator(dsn: str, tmp_path: Path) -> None:
    """Half a busy hour (three decks, two of them overlapping) at 20× (about 90 s): real
    processes and the simulator agree within 25% on cost, replica-seconds per pool and deck p50
    and p95.  20×, not faster: at 40× a worker must start within 3 s of wall time to register
    on time, which a loaded 2-core machine does not do (late registrations are what make the
    two disagree; the replay reports them as ``registered_late``)."""
    out = subprocess.run(
        [sys.executable, "-m", "gpuscale.cli", "replay", "--trace", str(BUSY), "--pools", str(SHIPPED),
         "--start", "9h30m", "--length", "30m", "--speed", "20", "--compare", "--json",
         "--data-dir", str(tmp_path), "--database-url", dsn],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout)
    real, sim = data["replay"], data["simulate"]
    assert real["unfinished"] == 0 and real["tasks"] == sim["tasks"] > 0
    assert real["replay"]["leftovers_killed"] == 0
    for key in ("cost_usd", "graph_p50_s", "graph_p95_s"):
        assert sim[key] * 0.75 <= real[key] <= sim[key] * 1.25, (key, real[key], sim[key], real["replay"])
    for pool, expected in sim["replica_seconds"].items():
        seconds = real["replica_seconds"][pool]
        assert expected * 0.75 <= seconds <= expected * 1.25, (pool, seconds, expected, real["replay"])
    assert set(real) >= {"wait_p95_s", "graph_p95_s", "oracle_cost_usd", "scale_events", "pools"}


def test_simulated_slice_is_what_compare_uses() -> None:
    part = slice_trace(read_trace(BUSY), 9.5 * 3600, 1800)
    assert len(graphs_of(part)) == 3  # the short replay's slice: three decks
    result = simulate(part, load_pools(SHIPPED))
    assert result.unfinished == 0 and result.tasks == len(part)
    assert isinstance(part[0], TraceTask)


def test_a_stopped_busy_replica_drains_as_the_worker_does() -> None:
    """The simulator stops a busy replica as the worker drains on SIGTERM: billing ends at once,
    its tasks run on for the drain grace (the worker's own default), the rest come back."""
    part = slice_trace(read_trace(BUSY), 9 * 3600, 2 * 3600)
    shipped = load_pools(SHIPPED)
    # Rules that stop idle replicas at once, whatever the provider picks: busy ones get stopped.
    pools = {n: r.model_copy(update={"scale_down_victims": "idle"}) for n, r in shipped.pools.items()}
    config = shipped.model_copy(update={"pools": pools})
    assert WorkerSettings.model_fields["drain_grace_s"].default == DRAIN_GRACE_S

    def finished_after_stop(tl: dict[str, Any]) -> list[tuple[float, float]]:
        stopped = {r["id"]: r["stopped"] for r in tl["replicas"] if r["stopped"] is not None}
        return [
            (t["end"] - stopped[t["replica"]], t["claimed"] - t["first_claim"])
            for t in tl["tasks"]
            if t["replica"] in stopped and t["end"] > stopped[t["replica"]]
        ]

    drained = finished_after_stop(timeline(part, config, victims="newest"))
    assert drained and all(0 < late <= DRAIN_GRACE_S + 0.1 for late, _ in drained)
    assert not finished_after_stop(timeline(part, config, victims="newest", drain_grace_s=0))


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_replay_drives_the_configured_provider(dsn: str, tmp_path: Path) -> None:
    """``--provider configured``: the DataCrunch account of DATACRUNCH_* (here an emulator started
    on its own, as a staging account would be) gets the deployments in replay mode, the controller
    drives it, and the replicas are accounted from its API."""
    import os
    import signal
    import time
    import urllib.request

    from gpuscale.dev.stack import free_port, gpuscale_cmd

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUSCALE_", "DATACRUNCH_"))}
    env.update(
        GPUSCALE_EMULATOR_CLIENT_ID="staging",
        GPUSCALE_EMULATOR_CLIENT_SECRET="staging-secret",
        # What the account's deployments give their workers (the database the replay uses).
        GPUSCALE_DATABASE_URL=dsn,
        GPUSCALE_WORKER_HOST="127.0.0.1",
        GPUSCALE_WORKER_PORT="0",
        GPUSCALE_HEARTBEAT_INTERVAL_S="2",
        GPUSCALE_POLL_INTERVAL_S="1",
        GPUSCALE_DRAIN_GRACE_S="1.5",
        GPUSCALE_LOG_LEVEL="WARNING",
    )
    emulator = subprocess.Popen(
        gpuscale_cmd("emulator", "--port", str(port), "--cold-start", "6", "--grace", "7", "--spawn-early",
                     "--stop-order", "newest", "--log-dir", str(tmp_path / "replicas")),
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_emulator/state", timeout=2).close()
                break
            except OSError:
                assert emulator.poll() is None and time.monotonic() < deadline, "the emulator did not start"
                time.sleep(0.2)
        account = {
            "DATACRUNCH_BASE_URL": f"http://127.0.0.1:{port}/v1",
            "DATACRUNCH_CLIENT_ID": "staging",
            "DATACRUNCH_CLIENT_SECRET": "staging-secret",
        }
        out = subprocess.run(
            [sys.executable, "-m", "gpuscale.cli", "replay", "--trace", str(BUSY), "--pools", str(SHIPPED),
             "--start", "9h30m", "--length", "2m30s", "--speed", "20", "--json", "--provider", "configured",
             "--data-dir", str(tmp_path / "replay"), "--database-url", dsn],
            capture_output=True, text=True, timeout=200, env={**os.environ, **account},
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        real = json.loads(out.stdout)
        assert real["tasks"] == 14 and real["unfinished"] == 0
        assert all(seconds > 0 for seconds in real["replica_seconds"].values()), real["replica_seconds"]
        assert real["replay"]["cold_start_p50_s"] == pytest.approx(120, abs=10)  # the account's, × K
    finally:
        os.killpg(emulator.pid, signal.SIGTERM)
        try:
            emulator.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(emulator.pid, signal.SIGKILL)
            emulator.wait()
