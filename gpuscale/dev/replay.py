"""``gpuscale replay``: drive a real stack with a trace, faster than life, and report in trace time.

The stack (the demo's, by default): a PostgreSQL (embedded under ``<data-dir>/pg``, or the one
``database_url`` names), the DataCrunch emulator whose replicas are real ``gpuscale worker``
processes in replay mode (every task sleeps the seconds its document names, served as Ollama
serves: ``parallel`` at a time, first come first served), the deployments created with ``gpuscale
deploy apply`` from the shipped specs, and ``gpuscale controller`` with the ``datacrunch`` provider
pointed at the emulator.  With ``speed`` K:

* every duration of the pools file (delays, cold start, startup timeout, idle timeout, expected
  task durations, drain target, backoffs, the reconcile interval) is divided by K;
* the emulator's cold start is ``cold_start / K``, and it starts each replica's worker process as
  soon as the replica is asked for (``--spawn-early``); the worker registers when the cold start
  ends, so its own start-up on a busy machine stays inside the cold start, as in a container;
* each deck of the trace is enqueued, as its task graph with the trace's priorities, at
  ``arrival_s / K`` and each task takes ``service_s / K`` on its worker.

At the end everything is read back from the database (claims, finishes) and from the emulator's
replica accounting (sampled while it runs), multiplied by K, and summarised with the simulator's
own report (:func:`gpuscale.controller.simulate.report.summary`), plus ``replica_seconds`` per pool.

The processes are :class:`gpuscale.dev.stack.Stack`'s: every child carries the run's marker, and
whatever of the run is still alive after the stop is killed and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpuscale.controller import deployspec
from gpuscale.controller.pools import PoolRules, PoolsConfig, parse_pools
from gpuscale.controller.simulate.engine import DAY_S, PoolResult, SimResult
from gpuscale.controller.simulate.trace import TraceTask
from gpuscale.db import Connector
from gpuscale.dev.stack import Stack, start_fresh_embedded
from gpuscale.queue import NewTask, Queue
from gpuscale.worker.handlers.replay import replay_document
from gpuscale.worker.settings import WorkerSettings

# The replay's own embedded server holds the demo's database name (queries.sql creates it).
ROOT = Path(__file__).resolve().parents[2]
SPECS = (ROOT / "deploy" / "datacrunch" / "visual.yaml", ROOT / "deploy" / "datacrunch" / "text.yaml")
FINAL = ("done", "failed", "dead", "cancelled")
_NOT_INHERITED = ("DATACRUNCH_", "OLLAMA_", "GPUSCALE_")
_KEEP = ("GPUSCALE_LOG_LEVEL",)
_CONFIGURED_ENV = ("DATACRUNCH_", "GPUSCALE_DATACRUNCH_")
PROVIDERS = ("emulator", "configured")
# A replica registering more than this (trace seconds) after its cold start counts as late.
_LATE_S = 5.0
_DRAIN_GRACE_S = float(WorkerSettings.model_fields["drain_grace_s"].default)


class ReplayError(RuntimeError):
    """The replay could not run (a stack part did not start, a bad trace for these pools)."""


def scale_config(config: PoolsConfig, speed: float) -> PoolsConfig:
    """``config`` with every duration divided by ``speed`` (``scale_down_delay: auto`` stays auto:
    it follows the cold start, which is scaled)."""

    def scaled(rules: PoolRules) -> PoolRules:
        changes: dict[str, Any] = {}
        for name in type(rules).model_fields:
            if not name.endswith("_s"):
                continue
            value = getattr(rules, name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                changes[name] = value / speed
            elif isinstance(value, dict):
                changes[name] = {k: v / speed for k, v in value.items()}
        return rules.model_copy(update=changes)

    pools = {name: scaled(r) for name, r in config.pools.items()}
    return config.model_copy(
        update={"pools": pools, "reconcile_interval_s": config.reconcile_interval_s / speed}
    )


def pools_yaml(config: PoolsConfig) -> str:
    """A pools file that parses back to ``config`` (durations as plain seconds)."""
    data: dict[str, Any] = {
        "pools": {n: r.model_dump(mode="json", by_alias=True) for n, r in config.pools.items()}
    }
    for key, value in config.model_dump(mode="json", by_alias=True).items():
        if key != "pools" and value is not None:
            data[key] = value
    text = yaml.safe_dump(data, sort_keys=False)
    parse_pools(yaml.safe_load(text), "<replay pools>")  # fail here, not in the controller
    return text


def slice_trace(tasks: Sequence[TraceTask], start_s: float, length_s: float | None) -> list[TraceTask]:
    """The tasks arriving in ``[start_s, start_s + length_s)``, with arrivals from 0.  Dependencies
    on tasks outside the slice are dropped (a deck's tasks arrive together, so none are)."""
    end = math.inf if length_s is None else start_s + length_s
    kept = [t for t in tasks if start_s <= t.arrival_s < end]
    ids = {t.task_id for t in kept}
    return [
        TraceTask(
            arrival_s=t.arrival_s - start_s,
            task_id=t.task_id,
            task_type=t.task_type,
            service_s=t.service_s,
            priority=t.priority,
            depends_on=tuple(d for d in t.depends_on if d in ids),
        )
        for t in kept
    ]


def graphs_of(tasks: Sequence[TraceTask]) -> list[list[int]]:
    """Indices of each connected task graph (a deck), in order of first appearance."""
    index = {t.task_id: i for i, t in enumerate(tasks)}
    parent = list(range(len(tasks)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, t in enumerate(tasks):
        for dep in t.depends_on:
            a, b = find(i), find(index[dep])
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(len(tasks)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def _payload(task: TraceTask, seconds: float) -> dict[str, Any]:
    payload: dict[str, Any] = {"document": replay_document(seconds)}
    if task.task_type == "visual_analysis":
        payload.update(first_page=1, last_page=1)
    return payload


@dataclass
class ReplayOptions:
    speed: float = 15.0
    data_dir: Path = Path(".gpuscale/replay")
    # None: an embedded PostgreSQL under data_dir with a fresh database; else this (empty or
    # migrated) database is used as it is.
    database_url: str | None = None
    deployment_files: Sequence[Path] = SPECS
    sample_s: float = 0.25  # how often the provider's replicas are sampled (wall seconds)
    # "emulator": the DataCrunch emulator with replay workers on this machine (cold start / K);
    # "configured": the DataCrunch account of DATACRUNCH_* (a staging one: the deployments are
    # applied in replay mode), whose replicas must reach ``database_url``; its cold starts are its
    # own, not divided by K.
    provider: str = "emulator"
    drain_timeout_s: float = 600.0  # after the last arrival: wait this long (wall) at most
    extra_env: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Progress:
    """What the progress bar shows (trace time)."""

    trace_s: float
    trace_end_s: float
    done: int
    tasks: int
    replicas: dict[str, int]
    phase: str


class Replay:
    def __init__(self, tasks: Sequence[TraceTask], config: PoolsConfig, options: ReplayOptions) -> None:
        if options.speed <= 0:
            raise ReplayError("speed must be > 0")
        self.tasks = list(tasks)
        self.config = config
        self.o = options
        self.k = options.speed
        self.scaled = scale_config(config, self.k)
        types = config.type_to_pool()
        for t in self.tasks:
            if t.task_type not in types:
                raise ReplayError(f"task {t.task_id!r}: no pool in the pools file serves {t.task_type!r}")
        self.graphs = graphs_of(self.tasks)
        self.run_id = uuid.uuid4().hex[:12]
        self.data_dir = options.data_dir.absolute()
        self.log_dir = self.data_dir / "logs"
        self.specs = _specs_by_pool(options.deployment_files)
        missing = sorted(set(config.pools) - set(self.specs))
        if missing:
            raise ReplayError(f"no deployment spec for pool(s) {', '.join(missing)} (by GPUSCALE_POOL)")
        if options.provider not in PROVIDERS:
            raise ReplayError(f"provider must be one of {', '.join(PROVIDERS)}, not {options.provider!r}")
        self.configured: Any = None  # the configured provider's API, to sample its replicas
        if options.provider == "configured":
            if not options.database_url:
                raise ReplayError("--provider configured needs --database-url (its replicas must reach it)")
            from gpuscale.common.errors import ConfigError
            from gpuscale.common.settings import Settings
            from gpuscale.controller.providers import make_provider

            try:
                self.configured = make_provider(Settings(provider="datacrunch"))
            except ConfigError as exc:
                raise ReplayError(str(exc)) from None
        self.client_secret = secrets.token_urlsafe(24)
        self.worker_token = secrets.token_urlsafe(24)
        self.stack: Stack | None = None
        self.pg: Any = None
        self.dsn = ""
        self.db: Connector | None = None
        self.queue: Queue | None = None
        self.t0 = 0.0  # wall (time.time) when trace time 0 was
        self.db_ids: list[int] = []
        self.enqueued_at: dict[int, float] = {}  # graph index -> wall time it was enqueued
        self.late_s: list[float] = []  # how late each deck was enqueued (wall)
        # Emulator accounting: replica id -> [deployment, first seen, last seen] (wall, billed
        # states: starting and running).
        self.seen: dict[str, list[Any]] = {}
        self.max_seen: dict[str, int] = {}
        self.leftovers: list[int] = []
        self.cold_starts: list[float] = []
        self.late_registrations: list[float] = []
        self.registered: dict[str, float] = {}
        self.overheads: list[float] = []

    # ------------------------------------------------------------------ stack
    def _env(self) -> dict[str, str]:
        # The configured provider's account travels to deploy apply and the controller.
        keep = _KEEP + (_CONFIGURED_ENV if self.configured is not None else ())
        env = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_INHERITED) or k.startswith(keep)}
        env.update(
            {
                "GPUSCALE_DATABASE_URL": self.dsn,
                "GPUSCALE_WORKER_TOKEN": self.worker_token,
                "GPUSCALE_WORKER_HOST": "127.0.0.1",
                "GPUSCALE_WORKER_PORT": "0",
                "GPUSCALE_HEARTBEAT_INTERVAL_S": "2",
                "GPUSCALE_POLL_INTERVAL_S": "1",
                # A stopped replica's drain takes the production grace / K, like every duration.
                "GPUSCALE_DRAIN_GRACE_S": f"{_DRAIN_GRACE_S / self.k:.3f}",
                "GPUSCALE_LOG_LEVEL": os.environ.get("GPUSCALE_LOG_LEVEL", "WARNING"),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.o.extra_env)
        return env

    async def _database(self) -> None:
        if self.o.database_url:
            self.dsn = self.o.database_url
            return
        self.pg, self.dsn = await start_fresh_embedded(self.data_dir)

    def _spec_files(self) -> list[Path]:
        """Every deployment of every pool (fallbacks included), as the shipped specs say, with the
        pool's serving settings and replay mode."""
        out_dir = self.data_dir / "deploy"
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, rules in self.scaled.pools.items():
            wanted = {o.name for o in rules.options}
            docs = []
            for spec in self.specs[name]:
                if spec["name"] not in wanted:
                    continue
                spec = deployspec.with_serving_env(spec, rules.tasks_per_replica, rules.parallel)
                env = [e for e in spec["containers"][0]["env"] if e["name"] != "GPUSCALE_WORKER_REPLAY"]
                env.append(
                    {
                        "name": "GPUSCALE_WORKER_REPLAY",
                        "value_or_reference_to_secret": "true",
                        "type": "plain",
                    }
                )
                spec["containers"][0]["env"] = env
                docs.append(spec)
            missing = sorted(wanted - {d["name"] for d in docs})
            if missing:
                raise ReplayError(f"pool {name}: no deployment spec named {', '.join(missing)}")
            path = out_dir / f"{name}.yaml"
            path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
            paths.append(path)
        return paths

    async def start(self, say: Callable[[str], None] = lambda _m: None) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        say("starting PostgreSQL")
        await self._database()
        stack = self.stack = Stack(
            log_dir=self.log_dir,
            env=self._env(),
            client_id="replay",
            client_secret=self.client_secret,
            run_id=self.run_id,
            stop_grace_s=30.0,
        )
        await stack.migrate()
        self.db = await Connector(self.dsn, min_connections=1, max_connections=4).open()
        self.queue = Queue(self.db)
        cold = min(r.cold_start_s for r in self.scaled.pools.values())
        if self.configured is not None:
            say("creating the deployments on the configured provider (gpuscale deploy apply)")
            await stack.apply_deployments(self._spec_files())
            await self._start_controller(say)
            return
        say(f"starting the emulator (cold start {cold:.2f}s)")
        await stack.start_emulator(
            cold_start_s=cold,
            grace_s=_DRAIN_GRACE_S / self.k + 5,  # SIGKILL only after the (scaled) drain
            # Replicas spawned at once register when their cold start ends; a scale-down stops
            # the newest (the simulator compares with the same rule).
            extra_args=("--spawn-early", "--stop-order", "newest"),
        )
        say("creating the deployments (gpuscale deploy apply)")
        await stack.apply_deployments(self._spec_files())
        await self._start_controller(say)

    async def _start_controller(self, say: Callable[[str], None]) -> None:
        stack = self.stack
        assert stack is not None
        say(f"starting the controller (every duration / {self.k:g})")
        pools_file = self.data_dir / "pools.yaml"
        pools_file.write_text(pools_yaml(self.scaled))
        await stack.start_controller(env={"GPUSCALE_POOLS_FILE": str(pools_file)})
        await stack.wait_controller()

    async def stop(self) -> None:
        if self.stack is not None:
            self.leftovers = await self.stack.stop()
            self.stack = None
        if self.configured is not None:
            with contextlib.suppress(Exception):
                await self.configured.aclose()
        if self.db is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.db.close(), 10)
            self.db = None
        if self.pg is not None:
            await asyncio.to_thread(self.pg.stop)
            self.pg = None

    # ------------------------------------------------------------------ run
    def trace_now(self) -> float:
        return (time.time() - self.t0) * self.k

    async def _enqueue_all(self) -> None:
        assert self.queue is not None
        order = sorted(range(len(self.graphs)), key=lambda g: self.tasks[self.graphs[g][0]].arrival_s)
        self.db_ids = [0] * len(self.tasks)
        for g in order:
            members = self.graphs[g]
            arrival = self.tasks[members[0]].arrival_s
            wait = self.t0 + arrival / self.k - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            local = {self.tasks[i].task_id: j for j, i in enumerate(members)}
            news = [
                NewTask(
                    self.tasks[i].task_type,
                    _payload(self.tasks[i], self.tasks[i].service_s / self.k),
                    priority=self.tasks[i].priority,
                    document_id=f"replay-{g}",
                )
                for i in members
            ]
            after = [[local[d] for d in self.tasks[i].depends_on] for i in members]
            now = time.time()
            ids = await self.queue.enqueue_graph(news, after)
            self.enqueued_at[g] = now
            self.late_s.append(now - (self.t0 + arrival / self.k))
            for i, db_id in zip(members, ids, strict=True):
                self.db_ids[i] = db_id

    async def _sample(self) -> dict[str, int]:
        """Billed replicas per deployment now (starting or running), recorded per replica."""
        assert self.stack is not None
        state: dict[str, Any] | None
        if self.configured is not None:
            state = await self._provider_state()
        else:
            state = await self.stack.emulator_state()
        if state is None:
            raise ReplayError("the emulator does not answer")
        now = time.time()
        counts: dict[str, int] = {}
        options = {o.name for r in self.scaled.pools.values() for o in r.options}
        for name, body in state["deployments"].items():
            # A slotted deployment (_replica_slots) is one emulator deployment per replica slot.
            dep = deployspec.logical_name(name, options) or name
            n = 0
            for r in body["replicas"]:
                if r["status"] not in ("starting", "running"):
                    continue
                n += 1
                entry = self.seen.get(r["id"])
                if entry is None:
                    # Billed from the request (the emulator's creation time), as in the simulator.
                    self.seen[r["id"]] = [dep, min(float(r["started_at"]), now), now]
                else:
                    entry[2] = now
            counts[dep] = counts.get(dep, 0) + n
        return counts

    async def _provider_state(self) -> dict[str, Any]:
        """The configured provider's replicas, in the emulator state's shape."""
        names = [o.name for r in self.scaled.pools.values() for o in r.options]
        states = await asyncio.gather(*(self.configured.observe(n) for n in names))
        return {
            "deployments": {
                name: {
                    "replicas": [
                        # Billed unless stopping or failed; a provider's own words for "on" vary.
                        {
                            "id": r.id,
                            "status": "running" if r.status not in ("stopping", "failed") else r.status,
                            "started_at": r.started_at,
                        }
                        for r in st.replicas
                    ]
                }
                for name, st in zip(names, states, strict=True)
            }
        }

    async def _registrations(self) -> None:
        """When each replica's worker registered (servers are deleted when they deregister, so
        this is sampled while the replay runs)."""
        assert self.db is not None
        for r in await self.db.fetch("replay_registrations"):
            self.registered.setdefault(r["container_id"], r["started_at"])

    async def _final_count(self) -> int:
        assert self.db is not None
        return int(await self.db.fetchval("replay_final_count", [i for i in self.db_ids if i], list(FINAL)))

    async def run(self, on_progress: Callable[[Progress], None] = lambda _p: None) -> SimResult:
        assert self.stack is not None
        end_arrival = max((t.arrival_s for t in self.tasks), default=0.0)
        by_dep = {o.name: n for n, r in self.scaled.pools.items() for o in r.options}
        self.t0 = time.time() + 0.5
        feeder = asyncio.create_task(self._enqueue_all())
        last_check = 0.0
        done = 0
        at_rest_since: float | None = None
        started = time.monotonic()
        try:
            while True:
                counts = await self._sample()
                replicas: dict[str, int] = {}
                for d, n in counts.items():  # a pool's deployments (fallbacks) together
                    replicas[by_dep.get(d, d)] = replicas.get(by_dep.get(d, d), 0) + n
                for pool_name, n in replicas.items():
                    self.max_seen[pool_name] = max(self.max_seen.get(pool_name, 0), n)
                if time.monotonic() - last_check > 1.0:
                    last_check = time.monotonic()
                    await self._registrations()
                    self.stack.check_alive()
                    if feeder.done():
                        feeder.result()  # raises what went wrong enqueueing
                        done = await self._final_count()
                    elif self.db_ids:
                        done = await self._final_count()
                phase = "arrivals" if not feeder.done() else "draining"
                on_progress(Progress(self.trace_now(), end_arrival, done, len(self.tasks), replicas, phase))
                if feeder.done() and done >= len(self.tasks):
                    # At rest: every pool back to its minimum.
                    at_min = all(replicas.get(n, 0) <= r.min_replicas for n, r in self.scaled.pools.items())
                    if at_min:
                        at_rest_since = at_rest_since or time.time()
                        if time.time() - at_rest_since > 2 * self.o.sample_s:
                            break
                    else:
                        at_rest_since = None
                if (
                    feeder.done()
                    and time.monotonic() - started > end_arrival / self.k + self.o.drain_timeout_s
                ):
                    break  # report what did not finish as unfinished
                await asyncio.sleep(self.o.sample_s)
        finally:
            if not feeder.done():
                feeder.cancel()
                with contextlib.suppress(BaseException):
                    await feeder
        return await self.result()

    # ------------------------------------------------------------------ result
    async def result(self) -> SimResult:
        assert self.db is not None
        rows = await self.db.fetch("replay_task_times", [i for i in self.db_ids if i])
        by_id = {r["id"]: r for r in rows}
        k, t0 = self.k, self.t0
        # Diagnostics in trace seconds: how long replicas took from request to registered, and
        # how much longer than its service time each task held its worker (claim to finish).
        await self._registrations()
        registered = self.registered
        self.cold_starts = sorted(
            (registered[rid] - first) * k
            for rid, (_dep, first, _last) in self.seen.items()
            if registered.get(rid) is not None
        )
        # The replay's own lag: replicas that registered later than their pool's cold start (a
        # worker process that could not start within cold_start / K wall seconds on a loaded
        # machine).  The simulator's replicas are ready at exactly cold_start: with many late
        # ones the comparison measures the machine, not the model.
        dep_cold = {o.name: r.cold_start_s for r in self.config.pools.values() for o in r.options}
        self.late_registrations = sorted(
            late
            for rid, (dep, first, _last) in self.seen.items()
            if registered.get(rid) is not None
            and (late := (registered[rid] - first) * k - dep_cold.get(dep, 0.0)) > _LATE_S
        )
        self.overheads = sorted(
            (r["finished_at"] - r["started_at"]) * k - self.tasks[i].service_s
            for i, db_id in enumerate(self.db_ids)
            if (r := by_id.get(db_id)) is not None and r["status"] == "done" and r["started_at"] is not None
        )
        waits: list[float] = []
        for i in self.db_ids:
            r = by_id.get(i)
            if r is not None and r["started_at"] is not None and r["queued_at"] is not None:
                waits.append(max(0.0, r["started_at"] - r["queued_at"]) * k)
        graph_times: list[float] = []
        last_event = 0.0
        for members in self.graphs:
            ends = [by_id.get(self.db_ids[i]) for i in members]
            if any(e is None or e["status"] != "done" or e["finished_at"] is None for e in ends):
                continue
            finish = max(e["finished_at"] for e in ends if e is not None)
            # From the trace's arrival (not when the feeder got to it): lateness counts against us.
            arrival = self.tasks[members[0]].arrival_s
            graph_times.append((finish - t0) * k - arrival)
            last_event = max(last_event, (finish - t0) * k)
        end = max((v[2] - t0) * k for v in self.seen.values()) if self.seen else last_event
        end = max(end, last_event)
        events = await self.db.fetch("replay_scale_events")
        pools: dict[str, PoolResult] = {}
        for name, rules in self.config.pools.items():
            pools[name] = PoolResult(name=name, price_per_hour=rules.price_per_hour)
        dep_pool = {o.name: n for n, r in self.scaled.pools.items() for o in r.options}
        for dep, first, last in self.seen.values():
            pool = dep_pool.get(dep)
            if pool is not None:
                pools[pool].replica_seconds += (last - first) * k
                pools[pool].replicas_started += 1
        for pool_name, n in self.max_seen.items():
            if pool_name in pools:
                pools[pool_name].max_replicas_seen = n
        types = self.config.type_to_pool()
        for t in self.tasks:
            pools[types[t.task_type]].tasks += 1
            pools[types[t.task_type]].busy_gpu_seconds += t.service_s
        for e in events:
            if e["pool"] in pools:
                pools[e["pool"]].scale_events[e["reason"]] = int(e["n"])
        final = sum(1 for i in self.db_ids if by_id.get(i) is not None and by_id[i]["status"] == "done")
        await self._write_timeline(by_id)
        period = max(DAY_S, math.ceil(end / DAY_S - 1e-9) * DAY_S)
        always_on = sum(r.max_replicas * r.price_per_hour for r in self.config.pools.values()) * period / 3600
        return SimResult(
            policy="replay",
            pools=pools,
            waits=waits,
            graph_times=graph_times,
            tasks=len(self.tasks),
            unfinished=len(self.tasks) - final,
            decks=len(self.graphs),
            period_s=period,
            end_s=end,
            always_on_cost_usd=always_on,
            ticks=0,
            wall_s=time.time() - t0,
        )

    async def _write_timeline(self, by_id: Mapping[int, Any]) -> None:
        """``<data-dir>/timeline.json``: every task, replica and applied scale change in trace
        seconds, the same shape as :func:`gpuscale.controller.simulate.engine.timeline`, so a
        disagreement can be traced to the deck, replica or decision where it starts."""
        assert self.db is not None
        k, t0 = self.k, self.t0

        def trace_s(at: float | None) -> float | None:
            return None if at is None else round((at - t0) * k, 1)

        deck_of = {i: g for g, members in enumerate(self.graphs) for i in members}
        tasks = []
        for i, db_id in enumerate(self.db_ids):
            r = by_id.get(db_id)
            t = self.tasks[i]
            tasks.append(
                {
                    "id": t.task_id,
                    "type": t.task_type,
                    "deck": deck_of[i],
                    "arrival": t.arrival_s,
                    "service": t.service_s,
                    "ready": trace_s(r["queued_at"]) if r else None,
                    "claimed": trace_s(r["started_at"]) if r else None,
                    "end": trace_s(r["finished_at"]) if r else None,
                    "replica": r["server"] if r else None,
                    "attempts": r["attempts"] if r else None,
                }
            )
        dep_pool = {o.name: n for n, r in self.scaled.pools.items() for o in r.options}
        replicas = [
            {
                "id": rid,
                "pool": dep_pool.get(dep, dep),
                "requested": trace_s(first),
                "ready": trace_s(self.registered.get(rid)),
                "stopped": trace_s(last),
            }
            for rid, (dep, first, last) in sorted(self.seen.items(), key=lambda kv: kv[1][1])
        ]
        scale = [
            {
                "pool": e["pool"],
                "at": trace_s(e["at"]),
                "from": e["from_replicas"],
                "to": e["to_replicas"],
                "reason": e["reason"],
            }
            for e in await self.db.fetch("replay_scale_log")
        ]
        path = self.data_dir / "timeline.json"
        path.write_text(json.dumps({"tasks": tasks, "replicas": replicas, "scale": scale}, indent=0))


def _specs_by_pool(files: Sequence[Path]) -> dict[str, list[dict[str, Any]]]:
    """Every deployment of the spec files, by the pool their container serves (GPUSCALE_POOL)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in files:
        for spec in deployspec.load_all(Path(path)):
            spec = deployspec.fill_volume_id(spec, "replay-shared")
            env = {
                e["name"]: e["value_or_reference_to_secret"] for e in spec["containers"][0].get("env") or []
            }
            pool = env.get("GPUSCALE_POOL")
            if pool:
                out.setdefault(pool, []).append(spec)
    return out


async def replay(
    tasks: Sequence[TraceTask],
    config: PoolsConfig,
    options: ReplayOptions,
    *,
    say: Callable[[str], None] = lambda _m: None,
    on_progress: Callable[[Progress], None] = lambda _p: None,
) -> tuple[SimResult, dict[str, Any]]:
    """Run the whole replay (start, run, stop); returns the result and facts about the run
    (worker start time, enqueue lateness, leftovers killed, wall time)."""
    r = Replay(tasks, config, options)
    wall = time.monotonic()
    try:
        await r.start(say)
        result = await r.run(on_progress)
    finally:
        say("stopping the stack")
        await r.stop()

    def pct(values: list[float], q: float) -> float | None:
        return round(values[min(len(values) - 1, int(q * len(values)))], 1) if values else None

    facts = {
        "speed": r.k,
        "cold_start_p50_s": pct(r.cold_starts, 0.5),
        "cold_start_max_s": pct(r.cold_starts, 1.0),
        "registered_late": len(r.late_registrations),
        "registered_late_max_s": pct(r.late_registrations, 1.0) or 0.0,
        "task_overhead_p50_s": pct(r.overheads, 0.5),
        "task_overhead_p95_s": pct(r.overheads, 0.95),
        "enqueue_late_p95_s": round(sorted(r.late_s)[int(0.95 * (len(r.late_s) - 1))], 3)
        if r.late_s
        else 0.0,
        "leftovers_killed": len(r.leftovers),
        "wall_s": round(time.monotonic() - wall, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
    }
    return result, facts
