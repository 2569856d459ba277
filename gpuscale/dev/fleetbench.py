"""``gpuscale bench fleet``: many simulated replicas and one controller against one PostgreSQL.

What grows with the size of a fleet is not the queue's throughput but the connections, the
heartbeats and what the controller reads every tick.  This benchmark runs the real thing at scale
on one machine:

* a throwaway PostgreSQL (the embedded binaries, its own data folder) with ``max_connections``
  set, optionally behind a real PgBouncer in transaction mode;
* N replicas: real :class:`~gpuscale.worker.runtime.Worker` objects (registration, heartbeats,
  claims, progress, completions of ``noop`` tasks, the real connection budget of a worker), many
  per process, spread over a few child processes, without their HTTP API;
* the real controller (:class:`~gpuscale.controller.app.ControllerApp`: leader, LISTEN fast path,
  ticks, reaper) with an in-memory provider that reports the simulated replicas;
* a producer with a steady stream of noop tasks over P pools, and a few ``critical`` probes into
  empty pools, timed from enqueue to the controller's provider call.

It prints one summary (``--json``: one object).  Not a test; the test suite runs it small.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gpuscale.common.processes import ProcessGroup, spawn
from gpuscale.db.connector import DATABASE_ERRORS, Connector

log = logging.getLogger("gpuscale.bench.fleet")

BENCH_APP = "gpuscale-bench"  # application_name of the bench's own connections (not counted)
PROBE_POOLS = 6  # critical probes, each into an empty pool of its own (p50 and max reported)
_CONNECTION_WORDS = (
    "too many",
    "connection",
    "remaining connection slots",
    "cannotconnectnow",
    "toomanyconnections",
    "the database system is",
    "pgbouncer",
)


@dataclass
class FleetOptions:
    replicas: int = 20
    pools: int = 4
    pgbouncer: bool = False
    max_connections: int = 100
    duration_s: float = 30.0
    rate: float = 50.0  # tasks per second, over all pools
    task_s: float = 0.2  # how long each noop task sleeps
    slots: int = 2  # tasks one replica runs at once
    processes: int = 0  # child processes for the replicas; 0: 1 up to 50 replicas, else 2
    listen: bool | None = None  # workers LISTEN (True) or poll (False); None: poll via PgBouncer
    pool_size: int = 20  # PgBouncer's server connections
    heartbeat_s: float = 10.0
    poll_s: float = 5.0
    tick_s: float = 2.0
    drain_timeout_s: float = 60.0

    def resolved_processes(self) -> int:
        if self.processes > 0:
            return min(self.processes, max(1, self.replicas))
        return 1 if self.replicas <= 50 else 2

    def resolved_listen(self) -> bool:
        return (not self.pgbouncer) if self.listen is None else self.listen


# ------------------------------------------------------------------------------ pools and types


def pool_names(pools: int) -> list[str]:
    return [f"fleet{i:02d}" for i in range(pools)]


def probe_names() -> list[str]:
    return [f"probe{i}" for i in range(PROBE_POOLS)]


def task_type_for(pool: str) -> str:
    return f"noop_{pool}"


def register_types(pools: int) -> None:
    """One noop task type per bench pool (the registry routes each type to one pool)."""
    from gpuscale.queue import tasktypes

    for pool in pool_names(pools) + probe_names():
        name = task_type_for(pool)
        try:
            tasktypes.get(name)
        except tasktypes.UnknownTaskType:
            # A copy of ``noop`` (payload, result, handler) routed to this pool.
            tasktypes.register(replace(tasktypes.get("noop"), name=name, pool=pool, timeout_s=600))


def assign(opts: FleetOptions) -> list[tuple[str, str]]:
    """(pool, replica id) for every replica, spread evenly over the pools."""
    names = pool_names(opts.pools)
    return [(names[i % len(names)], f"{names[i % len(names)]}-r{i:04d}") for i in range(opts.replicas)]


# ------------------------------------------------------------------------------ statistics


def pct(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    data = sorted(samples)
    k = min(len(data) - 1, max(0, round(q * (len(data) - 1))))
    return round(data[k], 2)


class _Counter(logging.Handler):
    """Counts warnings and errors; sorts out the ones about database connections."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.warnings = 0
        self.connection_errors = 0
        self.samples: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f" {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        self.warnings += 1
        low = text.lower()
        if any(w in low for w in _CONNECTION_WORDS):
            self.connection_errors += 1
        key = text[:160]
        if len(self.samples) < 12 or key in self.samples:
            self.samples[key] = self.samples.get(key, 0) + 1


def _machine_ticks() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine so far, from ``/proc/stat``; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def _busy_between(a: tuple[int, int] | None, b: tuple[int, int] | None) -> float | None:
    """Share of all cores busy between two :func:`_machine_ticks` readings (0-1)."""
    if a is None or b is None or b[1] <= a[1]:
        return None
    return round((b[0] - a[0]) / (b[1] - a[1]), 3)


async def _watch_lag(into: list[float]) -> None:
    """How late this process's event loop runs a 100 ms timer: the part of every latency measured
    in this process that is the simulation's own CPU (or the machine's load), not the database."""
    while True:
        t0 = time.perf_counter()
        await asyncio.sleep(0.1)
        into.append((time.perf_counter() - t0 - 0.1) * 1000)


# ------------------------------------------------------------------------------ the scratch server


@contextlib.contextmanager
def scratch_postgres(max_connections: int) -> Iterator[str]:
    """A throwaway PostgreSQL with ``max_connections`` set; yields the DSN of its ``postgres`` db."""
    from gpuscale.db.embedded import EmbeddedPostgres

    root = Path(tempfile.mkdtemp(prefix="gpuscale-fleetbench-"))
    server = EmbeddedPostgres(root / "pg")
    try:
        server.start()
        # A server setting, not a statement: the last line of postgresql.conf wins.
        with (server.pgdata / "postgresql.conf").open("a") as conf:
            conf.write(f"\nmax_connections = {int(max_connections)}\n")
        server.stop()  # max_connections takes a restart
        server.start()
        yield server.dsn("postgres")
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------ child: replicas


async def _child(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run this child's share of replicas until SIGTERM; return their measurements."""
    from gpuscale.worker.handlers.noop import noop
    from gpuscale.worker.runtime import Worker
    from gpuscale.worker.settings import WorkerSettings

    counter = _Counter()
    logging.basicConfig(level=logging.WARNING, handlers=[counter])
    register_types(cfg["pools"])
    claim_ms: list[float] = []
    complete_ms: list[float] = []
    beats = 0
    beat_rows = 0

    class SimReplica(Worker):
        async def _start(self) -> None:
            await super()._start()
            q = self.queue
            claim, complete, renew, beat = q.claim, q.complete, q.renew_leases, q.server_heartbeat

            async def timed_claim(*a: Any, **kw: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return await claim(*a, **kw)
                finally:
                    claim_ms.append((time.perf_counter() - t0) * 1000)

            async def timed_complete(*a: Any, **kw: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return await complete(*a, **kw)
                finally:
                    complete_ms.append((time.perf_counter() - t0) * 1000)

            async def counted_renew(*a: Any, **kw: Any) -> Any:
                nonlocal beat_rows
                ids = await renew(*a, **kw)
                beat_rows += len(ids)
                return ids

            async def counted_beat(*a: Any, **kw: Any) -> Any:
                nonlocal beats, beat_rows
                ok = await beat(*a, **kw)
                beats += 1
                beat_rows += 1
                return ok

            # Instance attributes shadow the methods: only these replicas' calls are timed.
            setattr(q, "claim", timed_claim)  # noqa: B010
            setattr(q, "complete", timed_complete)  # noqa: B010
            setattr(q, "renew_leases", counted_renew)  # noqa: B010
            setattr(q, "server_heartbeat", counted_beat)  # noqa: B010

    settings_kw = dict(cfg["settings"])
    workers: list[Worker] = []
    for pool, rid in cfg["replicas"]:
        settings = WorkerSettings(
            concurrency=cfg["slots"], server_id=rid, container_id=rid, worker_port=0, **settings_kw
        )
        workers.append(
            SimReplica(
                pool, dsn=cfg["dsn"], settings=settings, handlers={task_type_for(pool): noop}, http=False
            )
        )
    runs: list[asyncio.Task[int]] = []
    # Start in small waves, as a fleet comes up, not all in the same millisecond.
    for i in range(0, len(workers), 20):
        runs.extend(asyncio.create_task(w.run()) for w in workers[i : i + 20])
        await asyncio.sleep(0.05)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if all(w.status.ready or r.done() for w, r in zip(workers, runs, strict=True)):
            break
        await asyncio.sleep(0.1)
    started = sum(1 for w in workers if w.status.ready)
    lag_ms: list[float] = []
    cpu_from = [time.process_time()]

    def measure_from_now() -> None:
        # The parent starts the task stream once every process is ready: what was timed before
        # (the fleet's own start, hundreds of registrations at once) is not the steady state.
        del claim_ms[:], complete_ms[:], lag_ms[:]
        cpu_from[0] = time.process_time()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, measure_from_now)  # before READY: the parent's cue
    print(f"READY {started} {len(workers) - started}", flush=True)
    t_ready = time.monotonic()
    beats_at_ready, rows_at_ready = beats, beat_rows
    lag_task = asyncio.create_task(_watch_lag(lag_ms))

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    elapsed = time.monotonic() - t_ready
    cpu_s = time.process_time() - cpu_from[0]
    lag_task.cancel()
    beats_run, rows_run = beats - beats_at_ready, beat_rows - rows_at_ready
    for w in workers:
        w.request_stop()
    codes = await asyncio.gather(*runs, return_exceptions=True)
    failed = sum(1 for c in codes if c != 0)
    return {
        "started": started,
        "exit_failures": failed,
        "claim_ms": [round(x, 3) for x in claim_ms],
        "complete_ms": [round(x, 3) for x in complete_ms],
        "loop_lag_ms": [round(x, 2) for x in lag_ms],
        "heartbeats": beats_run,
        "heartbeat_rows": rows_run,
        "elapsed_s": elapsed,
        "cpu_s": cpu_s,
        "warnings": counter.warnings,
        "connection_errors": counter.connection_errors,
        "samples": counter.samples,
    }


def child_main() -> None:
    cfg = json.loads(sys.stdin.readline())
    result = asyncio.run(_child(cfg))
    # The raw latencies are too long for one pipe line: they go through a file next to the config.
    out = Path(cfg["result_file"])
    out.write_text(json.dumps(result))
    print(f"RESULT {out}", flush=True)


# ------------------------------------------------------------------------------ parent


class BenchProvider:
    """The simulated replicas as a provider sees them; records every call to ``set_replicas``."""

    name = "bench"

    def __init__(self, replicas: dict[str, list[str]]) -> None:
        from gpuscale.controller.providers.base import Replica

        started = time.time() - 3600
        self._replicas = {d: [Replica(r, "running", started) for r in ids] for d, ids in replicas.items()}
        self.targets = {d: len(ids) for d, ids in replicas.items()}
        self.calls: list[tuple[str, int, float]] = []
        self.called: dict[str, asyncio.Event] = {}

    async def observe(self, deployment: str) -> Any:
        from gpuscale.controller.providers.base import ProviderState

        return ProviderState(
            replicas=list(self._replicas.get(deployment, [])), target=self.targets.get(deployment, 0)
        )

    async def set_replicas(self, deployment: str, desired: int, *, idle: Collection[str] = ()) -> None:
        self.calls.append((deployment, desired, time.monotonic()))
        self.targets[deployment] = desired
        self.called.setdefault(deployment, asyncio.Event()).set()

    async def pause(self, deployment: str) -> None:
        return None

    async def resume(self, deployment: str) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _pooler_settings(opts: FleetOptions, listen_dsn: str) -> dict[str, Any]:
    """What a process behind PgBouncer is configured with: LISTEN direct, no prepared statements."""
    if not opts.pgbouncer:
        return {}
    return {"database_listen_url": listen_dsn, "database_statement_cache_size": 0}


def _pools_config(opts: FleetOptions, per_pool: dict[str, int]) -> Any:
    from gpuscale.controller.pools import parse_pools

    pools: dict[str, Any] = {}
    for name in pool_names(opts.pools):
        n = per_pool.get(name, 0)
        # The fleet is fixed: min = max = what runs, so the controller holds (it still observes,
        # decides and records every tick, which is what is measured).
        pools[name] = {
            "min_replicas": n,
            "max_replicas": max(1, n),
            "task_types": [task_type_for(name)],
        }
    for name in probe_names():
        pools[name] = {"min_replicas": 0, "max_replicas": 1, "task_types": [task_type_for(name)]}
    return parse_pools({"pools": pools, "reconcile_interval": opts.tick_s}, "<bench fleet>")


async def _spawn_children(
    opts: FleetOptions, replica_dsn: str, listen_dsn: str, listen: bool, result_dir: Path
) -> list[ProcessGroup]:
    replicas = assign(opts)
    k = opts.resolved_processes()
    settings = {
        "heartbeat_interval_s": opts.heartbeat_s,
        "poll_interval_s": opts.poll_s,
        "drain_grace_s": 30.0,
    }
    if not listen:
        settings["database_listen"] = False
    settings.update(_pooler_settings(opts, listen_dsn))
    procs = []
    for i in range(k):
        share = replicas[i::k]
        cfg = {
            "dsn": replica_dsn,
            "pools": opts.pools,
            "slots": opts.slots,
            "replicas": share,
            "settings": settings,
            "result_file": str(result_dir / f"replicas-{i}.json"),
        }
        # Its own process group: a terminal's Ctrl-C goes to the parent, which stops them in order.
        group = await spawn(
            f"fleet-{i}", [sys.executable, "-m", "gpuscale.dev.fleetbench"], os.environ, pipes=True
        )
        stdin = group.process.stdin
        assert stdin is not None
        stdin.write((json.dumps(cfg) + "\n").encode())
        await stdin.drain()
        stdin.close()
        procs.append(group)
    return procs


async def _read_line(group: ProcessGroup, prefix: str, timeout_s: float) -> str:
    proc = group.process
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"a replica process gave no {prefix.strip()} line within {timeout_s:.0f}s")
        line = await asyncio.wait_for(proc.stdout.readline(), left)
        if not line:
            raise RuntimeError(
                f"a replica process ended (status {await proc.wait()}) before {prefix.strip()}"
            )
        text = line.decode().rstrip("\n")
        if text.startswith(prefix):
            return text[len(prefix) :]


@dataclass
class _Samples:
    peak_connections: int = 0
    connection_samples: list[int] = field(default_factory=list)
    depth_ms: list[float] = field(default_factory=list)
    stats_ms: list[float] = field(default_factory=list)
    enqueued: list[int] = field(default_factory=list)
    enqueue_errors: int = 0
    probe_ms: list[float] = field(default_factory=list)


async def _monitor(dsn: str, stop: asyncio.Event, out: _Samples, pools: list[str]) -> None:
    from gpuscale.queue import Queue

    conn = await Connector(dsn, application_name=BENCH_APP).dedicated()
    db = await Connector(dsn, min_connections=1, max_connections=1, application_name=BENCH_APP).open()
    queue = Queue(db)
    try:
        i = 0
        while not stop.is_set():
            n = await conn.fetchval("client_connections", BENCH_APP)
            out.connection_samples.append(int(n))
            out.peak_connections = max(out.peak_connections, int(n))
            if i % 4 == 0:
                t0 = time.perf_counter()
                await queue.depth(pools[i % len(pools)], 10_000)
                out.depth_ms.append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                await queue.stats()
                out.stats_ms.append((time.perf_counter() - t0) * 1000)
            i += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
    finally:
        await db.close()
        await conn.close()


async def _produce(queue: Any, opts: FleetOptions, stop: asyncio.Event, out: _Samples) -> None:
    from gpuscale.queue import NewTask

    names = pool_names(opts.pools)
    period = 0.1
    start = time.monotonic()
    k = 0
    while not stop.is_set():
        # As many as the rate asks for by now: a late wake-up makes a bigger batch, not fewer tasks.
        n = int(opts.rate * (time.monotonic() - start)) - k
        if n > 0:
            batch = [
                NewTask(task_type_for(names[(k + j) % len(names)]), {"sleep_s": opts.task_s})
                for j in range(n)
            ]
            k += n
            try:
                out.enqueued.extend(await queue.enqueue_many(batch))
            except DATABASE_ERRORS as exc:
                out.enqueue_errors += 1
                log.warning("bench producer: enqueue failed: %s", exc)
        k_next = start + period * (1 + round((time.monotonic() - start) / period))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, k_next - time.monotonic()))


async def _probes(
    queue: Any, provider: BenchProvider, deployments: dict[str, str], opts: FleetOptions, out: _Samples
) -> list[int]:
    """Critical tasks into empty pools, spread over the run: enqueue → provider call."""
    from gpuscale.queue import NewTask

    ids: list[int] = []
    for pool in probe_names():
        await asyncio.sleep(opts.duration_s / (PROBE_POOLS + 1))
        deployment = deployments[pool]
        event = provider.called.setdefault(deployment, asyncio.Event())
        t0 = time.monotonic()
        ids.append(await queue.enqueue(NewTask(task_type_for(pool), {}, priority="critical")))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), 10)
        calls = [c for c in provider.calls if c[0] == deployment]
        out.probe_ms.append(round((calls[0][2] - t0) * 1000, 1) if calls else float("inf"))
    return ids


async def run_fleet(opts: FleetOptions, dsn: str, replica_dsn: str, listen_dsn: str) -> dict[str, Any]:
    from gpuscale.common.settings import Settings
    from gpuscale.controller.app import ControllerApp
    from gpuscale.queue import Queue

    register_types(opts.pools)
    counter = _Counter()
    logging.getLogger().addHandler(counter)
    load_before = os.getloadavg()[0]
    async with Connector(dsn, max_connections=1) as admin:
        await admin.migrate()
        max_conn = int(await admin.fetchval("max_connections"))

    replicas = assign(opts)
    per_pool: dict[str, list[str]] = {}
    for pool, rid in replicas:
        per_pool.setdefault(pool, []).append(rid)
    config = _pools_config(opts, {p: len(ids) for p, ids in per_pool.items()})
    deployments = {name: rules.deployment or name for name, rules in config.pools.items()}
    provider = BenchProvider({deployments[p]: ids for p, ids in per_pool.items()})
    listen = opts.resolved_listen()

    tick_ms: list[float] = []
    fast_ms: list[float] = []
    # Ticks before the run starts (the fleet still registering) are reported apart: the
    # reconcile figures are those of the fleet as measured, all of it up.
    startup_ms: list[float] = []
    running = asyncio.Event()

    class BenchController(ControllerApp):
        async def setup(self) -> None:
            await super().setup()
            rec = self.reconciler
            some = rec.reconcile_some
            every = len(rec.config.pools)

            async def timed(names: Any, spend: Any = None) -> Any:
                # A tick reconciles every pool; the fast path the pools it was notified about.
                t0 = time.perf_counter()
                try:
                    return await some(names, spend)
                finally:
                    ms = (time.perf_counter() - t0) * 1000
                    if len(names) != every:
                        fast_ms.append(ms)
                    else:
                        (tick_ms if running.is_set() else startup_ms).append(ms)

            setattr(rec, "reconcile_some", timed)  # noqa: B010

    settings = Settings(reaper_interval_s=5.0, cost_interval_s=60.0, heartbeat_timeout_s=30.0)
    # The replicas go through PgBouncer; the controller's four connections go straight to
    # PostgreSQL (as the README advises), so its reads never queue behind the fleet's in the pooler.
    controller = BenchController(settings, config, listen_dsn, provider=provider, http=False)  # type: ignore[arg-type]

    samples = _Samples()
    parent_lag: list[float] = []
    lag_task = asyncio.create_task(_watch_lag(parent_lag))
    stop_monitor = asyncio.Event()
    monitor = asyncio.create_task(_monitor(dsn, stop_monitor, samples, pool_names(opts.pools)))
    result_dir = Path(tempfile.mkdtemp(prefix="gpuscale-fleetbench-results-"))
    # The controller and the bench's own connections first, as in production: a fleet that
    # outgrows the server's connections then fails on its replicas, not on its controller.
    controller_task = asyncio.create_task(controller.run())
    for _ in range(600):  # until it leads and listens, so probes measure the fast path
        if (controller.is_leader and controller.listening.is_set()) or controller_task.done():
            break
        await asyncio.sleep(0.05)
    prod_db = await Connector(dsn, min_connections=2, max_connections=2, application_name=BENCH_APP).open()
    queue = Queue(prod_db)
    children = await _spawn_children(opts, replica_dsn, listen_dsn, listen, result_dir)
    try:
        ready = [await _read_line(p, "READY ", 300) for p in children]
        started = sum(int(r.split()[0]) for r in ready)
        for p in children:
            p.signal(signal.SIGUSR1)  # claims and completions are timed from here on
        t_run = time.monotonic()
        cpu_run, machine_run = time.process_time(), _machine_ticks()
        running.set()
        stop_prod = asyncio.Event()
        producer = asyncio.create_task(_produce(queue, opts, stop_prod, samples))
        probe_task = asyncio.create_task(_probes(queue, provider, deployments, opts, samples))
        await asyncio.sleep(opts.duration_s)
        stop_prod.set()
        await producer
        probe_ids = await probe_task
        run_s = time.monotonic() - t_run
        bench_cpu_s = time.process_time() - cpu_run
        machine_busy = _busy_between(machine_run, _machine_ticks())
        # Drain: every task enqueued must end done.
        deadline = time.monotonic() + opts.drain_timeout_s
        ids = samples.enqueued
        last_left, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            left = await prod_db.fetchval("count_unfinished_of", ids)
            if not left:
                break
            if left != last_left:
                last_left, last_change = left, time.monotonic()
            elif time.monotonic() - last_change > 15:
                break  # nothing moves (say, a pool none of whose replicas could connect): unfinished
            await asyncio.sleep(0.25)
        for tid in probe_ids:
            await queue.cancel(tid)
        final = await prod_db.fetchrow("fleet_bench_outcome", ids)
        assert final is not None
    finally:
        await prod_db.close()
        controller.request_stop()
        with contextlib.suppress(Exception):
            await controller_task
        for p in children:
            p.signal(signal.SIGTERM)
        results = []
        for p in children:
            try:
                path = Path(await _read_line(p, "RESULT ", 120))
                results.append(json.loads(await asyncio.to_thread(path.read_text)))
            except (TimeoutError, RuntimeError, ValueError, OSError) as exc:
                log.warning("bench: a replica process gave no result: %s", exc)
            p.kill_now()
            await p.process.wait()
        stop_monitor.set()
        with contextlib.suppress(Exception):
            await monitor
        logging.getLogger().removeHandler(counter)
        shutil.rmtree(result_dir, ignore_errors=True)
        lag_task.cancel()

    claim = [x for r in results for x in r["claim_ms"]]
    complete = [x for r in results for x in r["complete_ms"]]
    elapsed = max((r["elapsed_s"] for r in results), default=run_s) or 1.0
    samples_merged: dict[str, int] = dict(counter.samples)
    for r in results:
        for k, v in r["samples"].items():
            samples_merged[k] = samples_merged.get(k, 0) + v

    def ms(v: Any) -> float | None:
        return None if v is None else round(float(v) * 1000, 1)

    done = int(final["done"])
    return {
        "replicas": opts.replicas,
        "pools": opts.pools,
        "pgbouncer": opts.pgbouncer,
        "workers_listen": listen,
        "slots": opts.slots,
        "processes": len(children),
        "max_connections": max_conn,
        "duration_s": round(run_s, 1),
        "rate": opts.rate,
        "replicas_started": started,
        "peak_connections": samples.peak_connections,
        "connection_errors": counter.connection_errors + sum(r["connection_errors"] for r in results),
        "warnings": counter.warnings + sum(r["warnings"] for r in results),
        "claims": len(claim),
        "claim_p50_ms": pct(claim, 0.5),
        "claim_p99_ms": pct(claim, 0.99),
        "complete_p50_ms": pct(complete, 0.5),
        "complete_p99_ms": pct(complete, 0.99),
        "task_p50_ms": ms(final["e2e_p50"]),
        "task_p99_ms": ms(final["e2e_p99"]),
        "wait_p50_ms": ms(final["wait_p50"]),
        "wait_p99_ms": ms(final["wait_p99"]),
        "replica_loop_lag_p50_ms": pct([x for r in results for x in r["loop_lag_ms"]], 0.5),
        "replica_loop_lag_p99_ms": pct([x for r in results for x in r["loop_lag_ms"]], 0.99),
        "controller_loop_lag_p99_ms": pct(parent_lag, 0.99),
        # Where the machine's CPU went from the start of the task stream (the replica processes
        # until they were stopped, after the drain; this process, with the controller, producer
        # and monitor, and all cores, other sessions included, until the stream ended): when the
        # machine is saturated, every latency above carries its run-queue waits.
        "replica_processes_cpu_s": round(sum(r["cpu_s"] for r in results), 1),
        "bench_process_cpu_s": round(bench_cpu_s, 1),
        "machine_cpu_busy": machine_busy,
        "heartbeats_per_s": round(sum(r["heartbeats"] for r in results) / elapsed, 1),
        "heartbeat_rows_per_s": round(sum(r["heartbeat_rows"] for r in results) / elapsed, 1),
        "reconciles": len(tick_ms),
        "reconcile_p50_ms": pct(tick_ms, 0.5),
        "reconcile_p99_ms": pct(tick_ms, 0.99),
        "fast_reconciles": len(fast_ms),
        "fast_reconcile_p50_ms": pct(fast_ms, 0.5),
        "fast_reconcile_p99_ms": pct(fast_ms, 0.99),
        "depth_read_ms": pct(samples.depth_ms, 0.5),
        "stats_read_ms": pct(samples.stats_ms, 0.5),
        "reconcile_startup_max_ms": max((round(x, 2) for x in startup_ms), default=None),
        "critical_to_provider_ms": samples.probe_ms,
        "critical_to_provider_p50_ms": pct(samples.probe_ms, 0.5),
        "critical_to_provider_max_ms": max(samples.probe_ms, default=None),
        "tasks_enqueued": len(samples.enqueued),
        "tasks_done": done,
        # Lost: enqueued, and then gone from the queue (no row) -- must be 0 whatever else happens.
        # Unfinished: still waiting when the drain gave up, e.g. in a pool none of whose replicas
        # could connect (direct, past max_connections): late, not lost.
        "tasks_lost": len(samples.enqueued) - int(final["present"]),
        "tasks_unfinished": int(final["unfinished"]),
        "tasks_failed": int(final["failed"]),
        "tasks_retried": int(final["retried"]),
        "enqueue_errors": samples.enqueue_errors,
        "load_1m_before": round(load_before, 2),
        "load_1m_after": round(os.getloadavg()[0], 2),
        "warning_samples": samples_merged,
    }


def run_fleet_bench(opts: FleetOptions) -> dict[str, Any]:
    """Start the scratch server (and PgBouncer), run the fleet, tear everything down."""
    from gpuscale.db.pgbouncer import PgBouncer

    with scratch_postgres(opts.max_connections) as dsn:
        if not opts.pgbouncer:
            return asyncio.run(run_fleet(opts, dsn, dsn, dsn))
        with PgBouncer(
            dsn, pool_size=opts.pool_size, max_client_conn=max(1000, opts.replicas * 4)
        ) as bouncer:
            return asyncio.run(run_fleet(opts, dsn, bouncer.dsn("postgres"), dsn))


def options_dict(opts: FleetOptions) -> dict[str, Any]:
    return asdict(opts)


if __name__ == "__main__":
    random.seed()
    child_main()
