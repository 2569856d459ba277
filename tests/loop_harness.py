"""A whole loop for end-to-end tests: the DataCrunch emulator (replicas are real ``gpuscale
worker`` processes), one or more ``gpuscale controller`` processes, real PostgreSQL.

The ``bench`` pool runs ``noop`` tasks (a sleep), so the loop needs no Ollama; timings are
shortened (heartbeat 1 s, leases 4 s, reaper 1 s) so a run takes seconds.
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from controller.deployspec import load_file
from controller.emulator.app import EmulatorConfig
from controller.emulator.server import Emulator
from controller.providers.datacrunch import DataCrunchClient, DataCrunchProvider, RetryPolicy
from controller.queue import NewTask, Queue

ROOT = Path(__file__).resolve().parents[1]

POOLS = """
reconcile_interval: 0.5s
bench_container_scaling:
  min_replicas: 0
  max_replicas: 4
  scale_up_threshold: 1
  scale_up_delay: 1s
  scale_down_delay: 2s
  startup_timeout: 60s
  deployment: deck-bench
  cold_start: 1s
  tasks_per_replica: 4
  default_task_duration: 1s
  drain_target: 5s
  price_per_hour: 1.0
"""

WORKER_TOKEN = "wt-e2e-3f9c1b7d5a"  # a value a leak test can look for
CLIENT_SECRET = "cs-e2e-8a2e4c6f0b"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Loop:
    dsn: str
    tmp: Path
    emulator: Emulator
    env: dict[str, str]
    controllers: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    # ---------------------------------------------------------------- processes
    def start_controller(self) -> int:
        port = free_port()
        log = (self.tmp / f"controller-{port}.log").open("wb")
        self.controllers[port] = subprocess.Popen(
            [sys.executable, "-m", "controller.cli", "controller", "--http-port", str(port)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return port

    def role(self, port: int) -> str | None:
        try:
            return str(httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).json()["role"])
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    def wait_role(self, port: int, wanted: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.role(port) == wanted:
                return
            time.sleep(0.1)
        raise AssertionError(f"controller {port} never became {wanted}")

    def kill_controller(self, port: int) -> None:
        proc = self.controllers.pop(port)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self) -> list[int]:
        codes = []
        for proc in self.controllers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.controllers.values():
            try:
                codes.append(proc.wait(timeout=60))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                codes.append(proc.wait())
        self.controllers.clear()
        return codes

    def worker_pids(self) -> list[int]:
        snap = self.emulator.snapshot()
        dep = snap["deployments"].get("deck-bench", {})
        return [r["pid"] for r in dep.get("replicas", []) if r["pid"] and r["status"] == "running"]

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.tmp.rglob("*.log")))

    # ---------------------------------------------------------------- database / provider
    async def target(self) -> int:
        client = DataCrunchClient(
            self.emulator.base_url,
            self.emulator.client_id,
            self.emulator.client_secret,
            retry=RetryPolicy(attempts=1, initial_s=0.01, max_s=0.01),
        )
        try:
            return (await DataCrunchProvider(client).observe("deck-bench")).target
        finally:
            await client.aclose()

    def target_now(self) -> int:
        snap = self.emulator.snapshot()
        return int(snap["deployments"]["deck-bench"]["scaling"]["max_replica_count"])

    async def counts(self) -> dict[str, int]:
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch(
                "SELECT status::text AS s, count(*) AS n FROM processing_queue GROUP BY 1"
            )
        finally:
            await conn.close()
        return {r["s"]: int(r["n"]) for r in rows}

    async def enqueue_noops(self, n: int, *, sleep_s: float = 0.2, chain_every: int = 0) -> list[int]:
        """``n`` noop tasks; with ``chain_every`` k, every k-th task depends on the one before."""
        pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=2)
        assert pool is not None
        try:
            q = Queue(pool)
            ids: list[int] = []
            for i in range(n):
                deps = [ids[-1]] if chain_every and i % chain_every == 0 and ids else []
                ids.append(await q.enqueue(NewTask("noop", {"sleep_s": sleep_s}, depends_on=deps)))
            return ids
        finally:
            await pool.close()

    async def wait_finished(self, n: int, timeout: float, on_tick: Any = None) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        counts: dict[str, int] = {}
        while time.monotonic() < deadline:
            counts = await self.counts()
            if sum(counts.get(s, 0) for s in ("done", "failed", "dead", "cancelled")) >= n:
                return counts
            if on_tick is not None:
                await on_tick(counts)
            await asyncio.sleep(0.25)
        raise AssertionError(f"run did not finish in {timeout:.0f}s: {counts}\n{self.logs()[-4000:]}")

    async def wait_target(self, wanted: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.target_now() == wanted:
                return
            await asyncio.sleep(0.25)
        raise AssertionError(
            f"pool did not return to {wanted} replicas: {self.emulator.snapshot()['deployments']}"
        )


def make_loop(dsn: str, tmp: Path, *, faults: str | None = None) -> Loop:
    pools_file = tmp / "pools.yaml"
    pools_file.write_text(POOLS)
    worker_env = {
        **os.environ,
        "GPUSCALE_DATABASE_URL": dsn,
        "GPUSCALE_WORKER_TOKEN": WORKER_TOKEN,
        "GPUSCALE_HEARTBEAT_INTERVAL_S": "1",
        "GPUSCALE_LEASE_SECONDS": "4",
        "GPUSCALE_POLL_INTERVAL_S": "0.5",
        "GPUSCALE_DRAIN_GRACE_S": "3",
        "GPUSCALE_RETRY_BASE_S": "0.2",
        "GPUSCALE_RETRY_MAX_S": "1",
    }
    logs = tmp / "replicas"
    logs.mkdir()
    emu = Emulator(
        EmulatorConfig(
            client_secret=CLIENT_SECRET, cold_start_s=0.3, grace_s=5.0, base_env=worker_env, log_dir=logs
        )
    )
    emu.start()
    spec = copy.deepcopy(load_file(ROOT / "deploy" / "datacrunch" / "visual.yaml"))
    spec["name"] = "deck-bench"
    spec["containers"][0]["env"] = [
        {"name": "GPUSCALE_POOL", "value_or_reference_to_secret": "bench", "type": "plain"},
        {
            "name": "GPUSCALE_WORKER_TOKEN",
            "value_or_reference_to_secret": "GPUSCALE_WORKER_TOKEN",
            "type": "secret",
        },
    ]
    spec["scaling"]["min_replica_count"] = spec["scaling"]["max_replica_count"] = 0

    env = {
        **os.environ,
        "GPUSCALE_DATABASE_URL": dsn,
        "GPUSCALE_POOLS_FILE": str(pools_file),
        "GPUSCALE_PROVIDER": "datacrunch",
        "DATACRUNCH_BASE_URL": emu.base_url,
        "DATACRUNCH_CLIENT_ID": emu.client_id,
        "DATACRUNCH_CLIENT_SECRET": CLIENT_SECRET,
        "GPUSCALE_DATACRUNCH_BACKOFF_INITIAL_S": "0.05",
        "GPUSCALE_DATACRUNCH_BACKOFF_MAX_S": "0.5",
        "GPUSCALE_HEARTBEAT_TIMEOUT_S": "4",
        "GPUSCALE_REAPER_INTERVAL_S": "1",
        "GPUSCALE_COST_INTERVAL_S": "1",
    }
    loop = Loop(dsn=dsn, tmp=tmp, emulator=emu, env=env)
    loop._spec = spec  # type: ignore[attr-defined]
    return loop


async def create_deployment(loop: Loop) -> None:
    client = DataCrunchClient(loop.emulator.base_url, loop.emulator.client_id, loop.emulator.client_secret)
    try:
        if await client.get_deployment("deck-bench") is None:
            await client.create_deployment(loop._spec)  # type: ignore[attr-defined]
    finally:
        await client.aclose()
