"""Orchestration of ``gpuscale demo``: start everything, submit decks, watch, summarise, stop.

Order of start (each a child process through the real CLI, brought up by :mod:`gpuscale.dev.stack`):

1. the embedded PostgreSQL under ``<data-dir>/pg`` (this process holds it), a fresh database
   ``gpuscale_demo`` in it, and ``gpuscale db migrate``;
2. the Ollama stand-in (``python -m gpuscale.dev.standin``), unless ``--ollama-host`` names a real Ollama;
3. the DataCrunch emulator (``gpuscale emulator``), whose replicas are ``gpuscale worker``
   processes, and the deployments of the demo's pools created in it with ``gpuscale deploy apply``
   (the same command ops run against the real API);
4. ``gpuscale controller`` with the demo pool rules and the ``datacrunch`` provider pointed at the
   emulator — the real client, OAuth and all;
5. the sample decks, generated into ``<data-dir>/decks`` and submitted.

Then it polls the database, the controller's ``/api/pools`` and ``/api/events`` and the emulator's
state until every task is final and every pool is back to its minimum, and stops everything in
reverse order.  Every child process carries ``GPUSCALE_DEMO_RUN=<id>`` in its environment; after
stopping, any process still carrying it (a replica orphaned by a crash) is killed and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fcntl
import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from gpuscale.controller import deployspec
from gpuscale.controller.pools import PoolsConfig, load_pools
from gpuscale.db import Connector
from gpuscale.dev.demo import decks as deckgen
from gpuscale.dev.demo.summary import PoolSummary, Summary
from gpuscale.dev.demo.view import Decision, DeckView, PoolView, Snapshot
from gpuscale.dev.stack import RUN_MARKER, ProcessFailed, Stack, kill_leftovers, start_fresh_embedded

log = logging.getLogger(__name__)

FINAL = ("done", "failed", "dead", "cancelled")
_NOT_INHERITED = (
    "DATACRUNCH_",
    "OLLAMA_HOST",
    "GPUSCALE_DATABASE_URL",
    "GPUSCALE_PG_DIR",
    "GPUSCALE_DATA_DIR",
    "GPUSCALE_POOLS_FILE",
    "GPUSCALE_PROVIDER",
    "GPUSCALE_HTTP_",
    "GPUSCALE_API_",
    "GPUSCALE_EMULATOR_",
    "GPUSCALE_DOCKER_",
    "GPUSCALE_LOCAL_",
    "GPUSCALE_WORKER_",
    "GPUSCALE_CONTAINER_ID",
    "GPUSCALE_SERVER_ID",
    "GPUSCALE_POOL",
    "GPUSCALE_CONCURRENCY",
)


@dataclass
class DemoOptions:
    decks: int = 3
    pages: int | None = None  # override every deck's page count
    pools_file: Path = Path("deploy/demo/pools.yaml")
    deployment_files: list[Path] = field(
        default_factory=lambda: [Path("deploy/datacrunch/visual.yaml"), Path("deploy/datacrunch/text.yaml")]
    )
    data_dir: Path = Path(".gpuscale/demo")
    ollama_host: str | None = None  # a real Ollama; None: start the stand-in
    timeout_s: float = 600.0
    http_port: int = 0  # controller HTTP port; 0: a free one
    emulator_port: int = 0
    replica_start_s: float = 8.0  # the emulator's simulated container start (before the worker runs)
    standin_latency_s: float = 1.0  # seconds per stand-in inference call
    batch_pages: int = 8
    targets_file: Path | None = None  # write Prometheus file_sd targets (controller and workers)
    refresh_s: float = 0.5
    extra_env: dict[str, str] = field(default_factory=dict)


# The source checkout this module runs from (an editable install), for the shipped deploy files.
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def shipped(path: Path) -> Path:
    """``path`` as given when it exists (relative to the current directory), else the same
    relative path in the source checkout, so ``gpuscale demo`` also works from another folder."""
    if path.exists() or path.is_absolute():
        return path
    candidate = SOURCE_ROOT / path
    return candidate if candidate.exists() else path


class DemoError(RuntimeError):
    """The demo could not start or run; the message says which part and why."""


def _stat_int(stats: Any, name: str) -> int:
    return int(getattr(stats, name, 0) or 0)


def _first(d: dict[str, Any], *keys: str) -> Any:
    """The first of ``keys`` present in ``d`` (nested keys as ``a.b``), else None."""
    for key in keys:
        cur: Any = d
        for part in key.split("."):
            if not isinstance(cur, dict) or part not in cur:
                cur = None
                break
            cur = cur[part]
        if cur is not None:
            return cur
    return None


class Demo:
    """One demo run.  ``async with Demo(options) as demo: await demo.run(on_snapshot)``."""

    def __init__(self, options: DemoOptions) -> None:
        self.o = options
        options.pools_file = shipped(options.pools_file)
        options.deployment_files = [shipped(p) for p in options.deployment_files]
        self.run_id = uuid.uuid4().hex[:12]
        self.data_dir = options.data_dir.absolute()
        self.log_dir = self.data_dir / "logs"
        self.pools: PoolsConfig = load_pools(options.pools_file)
        # The demo's deployments: the production specs (one per pool, found by their
        # GPUSCALE_POOL), named as the demo pools file names them.  A pool without a spec (say,
        # the bench pool) is not part of the demo.
        self.specs = _specs_by_pool(options.deployment_files)
        self.demo_pools = {n: r for n, r in self.pools.pools.items() if n in self.specs}
        self.document_root = _document_root(self.specs, self.data_dir)
        if not self.demo_pools:
            raise DemoError(
                f"no pool of {options.pools_file} has a deployment spec among "
                f"{', '.join(map(str, options.deployment_files))} (matched by their GPUSCALE_POOL env)"
            )
        self.stack: Stack | None = None
        self.pg: Any = None  # EmbeddedPostgres
        self.dsn = ""
        self.db: Connector | None = None
        self.queue: Any = None
        self.controller_url = ""
        self.emulator_url = ""
        self.ollama_url = ""
        self.client_id = "gpuscale-demo"
        # The emulator checks these like the real API; random per run unless given in the
        # environment (tests pass known values to check they never leak); never printed.
        self.client_secret = os.environ.get("DATACRUNCH_CLIENT_SECRET") or secrets.token_urlsafe(24)
        self.worker_token = os.environ.get("GPUSCALE_WORKER_TOKEN") or secrets.token_urlsafe(24)
        self.api_token = secrets.token_urlsafe(24)  # the decks go in through `gpuscale api`
        self.api_url = ""
        self.decks: list[tuple[str, str, int]] = []  # (name, document_id, pages)
        self.started = 0.0
        self.snapshot = Snapshot()
        # Accounting from the emulator's state: replica id -> (pool, first seen, last seen).
        self.replicas_seen: dict[str, list[Any]] = {}
        self.replica_seconds: dict[str, float] = {}
        self.peak: dict[str, int] = {}
        self._last_sample = 0.0
        self.leftovers: list[int] = []
        self._lock_fh: Any = None

    # ------------------------------------------------------------------ setup

    @property
    def deployment_for(self) -> dict[str, str]:
        return {name: rules.deployment for name, rules in self.demo_pools.items()}

    def header_lines(self) -> list[str]:
        lines = []
        if self.o.ollama_host:
            lines.append(f"Ollama: real Ollama at {self.o.ollama_host}")
        else:
            lines.append(
                f"Ollama: the Ollama STAND-IN at {self.ollama_url} — a small Ollama-compatible server with "
                "canned, schema-valid answers (no model, no GPU); use --ollama-host URL for a real Ollama"
            )
        lines.append(
            f"Provider: DataCrunch emulator at {self.emulator_url} (replicas are local `gpuscale worker` "
            f"processes, {self.o.replica_start_s:g} s container start) · controller at {self.controller_url}"
        )
        lines.append(f"Decks submitted through the task API at {self.api_url} (gpuscale api, see /docs)")
        lines.append(f"Logs: {self.log_dir}")
        return lines

    def rules_lines(self) -> list[str]:
        """The demo pool rules, printed at start so the timings make sense."""
        out = [f"Pool rules from {self.o.pools_file}:"]
        for name, r in self.demo_pools.items():
            down = "auto" if r.scale_down_auto else f"{r.idle_timeout_s:g}s"
            out.append(
                f"  {name}: replicas {r.min_replicas}–{r.max_replicas}, scale up at {r.scale_up_threshold} "
                f"waiting after {r.scale_up_delay_s:g}s, down after {down} idle, startup timeout "
                f"{r.startup_timeout_s:g}s, {r.tasks_per_replica} task(s)/replica, "
                f"${r.price_per_hour:g}/replica-hour, prewarm {'on' if r.prewarm else 'off'}"
            )
        return out

    def base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Children must not use a user's settings that point at another system (a database, a
        # cloud account, a pools file): the demo sets those itself.  Everything else passes
        # through, e.g. GPUSCALE_VISUAL_MODEL / GPUSCALE_TEXT_MODEL for a real Ollama.
        for key in list(env):
            if key.startswith(_NOT_INHERITED):
                del env[key]
        env.update(
            {
                RUN_MARKER: self.run_id,
                "GPUSCALE_DATABASE_URL": self.dsn,
                "GPUSCALE_DATA_DIR": str(self.data_dir),
                "GPUSCALE_DOCUMENT_ROOT": str(self.document_root),
                "GPUSCALE_LOG_LEVEL": "INFO",
                "GPUSCALE_WORKER_TOKEN": self.worker_token,
                # Replicas share this machine: each worker's HTTP API on a free loopback port.
                "GPUSCALE_WORKER_HOST": "127.0.0.1",
                "GPUSCALE_WORKER_PORT": "0",
                "GPUSCALE_HEARTBEAT_INTERVAL_S": "2",
                "GPUSCALE_POLL_INTERVAL_S": "1",
                "GPUSCALE_DRAIN_GRACE_S": "10",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.o.extra_env)
        return env

    async def _start_database(self) -> None:
        self.pg, self.dsn = await start_fresh_embedded(self.data_dir)

    def _lock(self) -> None:
        """One demo per data directory: a second one would drop the first one's database."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fh = (self.data_dir / "demo.lock").open("w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise DemoError(
                f"another demo is running in {self.data_dir}; wait for it or use --data-dir"
            ) from None
        self._lock_fh = fh

    async def start(self, progress: Callable[[str], None] = lambda _msg: None) -> None:
        self.started = time.monotonic()
        self._lock()
        for old in self.log_dir.glob("*.log") if self.log_dir.exists() else []:
            old.unlink()
        progress("starting the embedded PostgreSQL")
        await self._start_database()
        stack = self.stack = Stack(
            log_dir=self.log_dir,
            env=self.base_env(),
            client_id=self.client_id,
            client_secret=self.client_secret,
            run_id=self.run_id,
        )

        progress("migrating the database (gpuscale db migrate)")
        await stack.migrate()
        from gpuscale.queue import Queue

        self.db = await Connector(self.dsn, min_connections=1, max_connections=4).open()
        self.queue = Queue(self.db)

        if self.o.ollama_host:
            stack.use_ollama(self.o.ollama_host)
        else:
            progress("starting the Ollama stand-in (python -m gpuscale.dev.standin)")
            models = {
                os.environ.get("GPUSCALE_VISUAL_MODEL", "gemma3:12b"),
                os.environ.get("GPUSCALE_TEXT_MODEL", "gemma3:12b"),
            }
            await stack.start_standin(models, latency_s=self.o.standin_latency_s)
        self.ollama_url = stack.ollama_url

        progress("starting the DataCrunch emulator (gpuscale emulator)")
        self.emulator_url = await stack.start_emulator(
            cold_start_s=self.o.replica_start_s,
            port=self.o.emulator_port,
            shared_dir=self.data_dir / "shared",
        )
        progress("creating the deployments in the emulator (gpuscale deploy apply)")
        await stack.apply_deployments(self.write_specs())

        progress("starting the controller (gpuscale controller)")
        await stack.start_controller(
            env={"GPUSCALE_POOLS_FILE": str(self.o.pools_file.absolute())}, port=self.o.http_port
        )
        self.controller_url = stack.controller_urls["controller"]
        # Listed before it is ready: Prometheus' discovery takes a few seconds to pick it up, and
        # the first scale-up happens soon after the decks arrive.
        self.write_targets()
        await stack.wait_controller()

        progress(f"generating {self.o.decks} sample deck(s) into {self.data_dir / 'decks'}")
        paths = await asyncio.to_thread(
            deckgen.write_decks, self.data_dir / "decks", self.o.decks, pages=self.o.pages
        )
        progress("starting the task API (gpuscale api) and submitting the decks through it")
        self.api_url = await stack.start_api(token=self.api_token)
        async with httpx.AsyncClient(
            base_url=self.api_url, headers={"Authorization": f"Bearer {self.api_token}"}, timeout=60.0
        ) as api:
            for path in paths:
                data = await asyncio.to_thread(path.read_bytes)
                resp = await api.post(
                    "/api/decks",
                    params={
                        "batch_pages": self.o.batch_pages,
                        "document_id": f"demo-{self.run_id}-{path.stem}",
                    },
                    files={"file": (path.name, data, "application/pdf")},
                )
                if resp.status_code != 202:
                    raise DemoError(f"the API refused {path.name}: HTTP {resp.status_code} {resp.text[:300]}")
                sub = resp.json()
                self.decks.append((path.stem, sub["document_id"], sub["pages"]))
        self.snapshot.header = self.header_lines()

    def write_specs(self) -> list[Path]:
        """The demo pools' deployment specs under ``<data-dir>/deploy/``, for ``deploy apply``."""
        out_dir = self.data_dir / "deploy"
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, rules in self.demo_pools.items():
            spec = copy.deepcopy(self.specs[name])
            spec["name"] = rules.deployment
            # The worker holds as many tasks as the controller sizes the pool for; Ollama serves
            # the pool's `parallel` of them at once.
            spec = deployspec.with_serving_env(spec, rules.tasks_per_replica, rules.parallel)
            path = out_dir / f"{name}.yaml"
            path.write_text(yaml.safe_dump(spec, sort_keys=False))
            paths.append(path)
        return paths

    # ------------------------------------------------------------------ watching

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    async def _get_json(self, url: str) -> Any:
        return await self.stack.get_json(url) if self.stack is not None else None

    def _account(self, emu_state: dict[str, Any] | None) -> dict[str, int]:
        """Integrate replica-seconds per pool from the emulator's replica list; replicas per pool."""
        now = time.monotonic()
        dt = now - self._last_sample if self._last_sample else 0.0
        self._last_sample = now
        counts: dict[str, int] = {}
        if not emu_state:
            return counts
        pool_of = {dep: pool for pool, dep in self.deployment_for.items()}
        for dep_name, dep in (emu_state.get("deployments") or {}).items():
            # A slotted deployment (_replica_slots) is one emulator deployment per replica.
            logical = deployspec.logical_name(dep_name, pool_of)
            if logical is None:
                continue
            pool = pool_of[logical]
            replicas = dep.get("replicas") or []
            counts[pool] = counts.get(pool, 0) + len(replicas)
            self.replica_seconds[pool] = self.replica_seconds.get(pool, 0.0) + dt * len(replicas)
            for r in replicas:
                self.replicas_seen.setdefault(str(r.get("id")), [pool, now, now])[2] = now
        for pool, n in counts.items():
            self.peak[pool] = max(self.peak.get(pool, 0), n)
        return counts

    async def poll(self) -> Snapshot:
        assert self.queue is not None
        stats = await self.queue.stats()
        servers = await self.queue.list_servers()
        api_pools = await self._get_json(f"{self.controller_url}/api/pools")
        api_events = await self._get_json(f"{self.controller_url}/api/events?limit=12")
        emu_state = await self._get_json(f"{self.emulator_url}/_emulator/state")
        emu_counts = self._account(emu_state)
        self.write_targets(servers)

        api_by_pool: dict[str, dict[str, Any]] = {}
        if isinstance(api_pools, dict):
            items = api_pools.get("pools", api_pools)
            if isinstance(items, list):
                api_by_pool = {str(p.get("name") or p.get("pool")): p for p in items if isinstance(p, dict)}
            elif isinstance(items, dict):
                api_by_pool = {str(k): v for k, v in items.items() if isinstance(v, dict)}

        decisions: list[Decision] = []
        events = api_events.get("events", []) if isinstance(api_events, dict) else []
        for e in events if isinstance(events, list) else []:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                decisions.append(
                    Decision(
                        at=float(e["at"]),
                        pool=str(e["pool"]),
                        from_replicas=e.get("from_replicas"),
                        to_replicas=int(e["to_replicas"]),
                        reason=str(e.get("reason", "")),
                        detail=str(e.get("detail") or ""),
                        outcome=str(e.get("outcome") or ""),
                    )
                )

        pools: list[PoolView] = []
        for name, rules in self.demo_pools.items():
            s = stats.get(name)
            api = api_by_pool.get(name, {})
            registered = sum(
                1 for sv in servers if sv.pool == name and sv.status in ("starting", "active", "draining")
            )
            last = _first(api, "last_decision", "decision") or {}
            last_txt = ""
            change = next((d for d in decisions if d.pool == name), None)
            if change is not None:
                ago = max(0.0, time.time() - change.at)
                before = "·" if change.from_replicas is None else str(change.from_replicas)
                last_txt = f"{before}→{change.to_replicas} {change.reason} ({ago:.0f}s ago)"
            elif isinstance(last, dict) and last:
                frm, to = (
                    last.get("from_replicas", last.get("current")),
                    last.get("to_replicas", last.get("desired")),
                )
                last_txt = f"{'·' if frm is None else frm}→{to} {last.get('reason', '')}".strip()
            elif isinstance(last, str):
                last_txt = last
            desired = _first(api, "replicas.desired", "replicas_desired", "desired")
            provider = emu_counts.get(name, _first(api, "replicas.provider", "replicas_provider"))
            pools.append(
                PoolView(
                    name=name,
                    min_replicas=rules.min_replicas,
                    max_replicas=rules.max_replicas,
                    queued=s.queued_total + _stat_int(s, "waiting_backoff") if s else 0,
                    running=_stat_int(s, "running"),
                    blocked=_stat_int(s, "blocked"),
                    done=_stat_int(s, "done"),
                    failed=_stat_int(s, "failed") + _stat_int(s, "dead") + _stat_int(s, "cancelled"),
                    desired=int(desired) if isinstance(desired, int | float) else None,
                    provider=int(provider) if isinstance(provider, int | float) else None,
                    registered=registered,
                    paused=bool(api.get("paused", False)),
                    last_decision=last_txt,
                )
            )

        deck_views = []
        for name, doc_id, pages in self.decks:
            tasks = await self.queue.tasks_for_document(doc_id)
            deck_views.append(_deck_view(name, doc_id, pages, tasks))

        snap = self.snapshot
        snap.elapsed_s = self.elapsed()
        snap.pools = pools
        snap.decisions = decisions
        snap.decks = deck_views
        return snap

    def finished(self, snap: Snapshot) -> bool:
        """Every task final and every pool back to its minimum, with no extra worker registered."""
        if not snap.decks or any(d.tasks_done + d.tasks_failed < d.tasks_total for d in snap.decks):
            return False
        for p in snap.pools:
            if p.provider is None or p.provider > p.min_replicas or p.registered > p.min_replicas:
                return False
            if p.queued or p.running or p.blocked:
                return False
        return True

    def check_children(self) -> None:
        if self.stack is not None:
            try:
                self.stack.check_alive()
            except ProcessFailed as exc:
                raise DemoError(str(exc)) from None

    async def run(self, on_snapshot: Callable[[Snapshot], None] = lambda _s: None) -> Snapshot:
        """Poll until finished or timed out; returns the last snapshot."""
        deadline = self.started + self.o.timeout_s
        snap = self.snapshot
        while True:
            self.check_children()
            snap = await self.poll()
            snap.phase = "running"
            on_snapshot(snap)
            if self.finished(snap):
                snap.phase = "finished"
                on_snapshot(snap)
                return snap
            if time.monotonic() > deadline:
                snap.phase = "timed out"
                snap.message = f"timed out after {self.o.timeout_s:g}s"
                on_snapshot(snap)
                return snap
            await asyncio.sleep(self.o.refresh_s)

    # ------------------------------------------------------------------ Prometheus targets

    def write_targets(self, servers: list[Any] | None = None) -> None:
        """A Prometheus file_sd file: the controller, and each registered worker's metrics address."""
        if self.o.targets_file is None:
            return
        groups = []
        if self.controller_url:
            groups.append(
                {
                    "targets": [self.controller_url.removeprefix("http://")],
                    "labels": {"job": "gpuscale-controller"},
                }
            )
        workers = sorted({addr for addr in (_server_metrics_addr(s) for s in servers or []) if addr})
        if workers:
            groups.append({"targets": workers, "labels": {"job": "gpuscale-worker"}})
        tmp = self.o.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        os.replace(tmp, self.o.targets_file)

    # ------------------------------------------------------------------ the end

    async def controller_metrics(self) -> dict[str, dict[str, float]]:
        """A few of the controller's own numbers: cold-start sum/count by pool, spend by pool."""
        out: dict[str, dict[str, float]] = {"cold_sum": {}, "cold_count": {}, "spend": {}}
        if self.stack is None:
            return out
        names = {
            "cold_sum": "gpuscale_cold_start_seconds_sum",
            "cold_count": "gpuscale_cold_start_seconds_count",
            "spend": "gpuscale_spend_usd_total",
        }
        for key, name in names.items():
            for labels, value in await self.stack.metric("controller", name):
                if "pool" in labels:
                    out[key][labels["pool"]] = value
        return out

    async def summary(self, snap: Snapshot) -> Summary:
        metrics = await self.controller_metrics()
        cold_by_pool: dict[str, int] = {}
        for pool, _first_seen, _last in self.replicas_seen.values():
            cold_by_pool[pool] = cold_by_pool.get(pool, 0) + 1
        reasons: dict[str, int] = {}
        ups: dict[str, int] = {}
        downs: dict[str, int] = {}
        events = await self._get_json(f"{self.controller_url}/api/events?limit=1000")
        for e in events.get("events", []) if isinstance(events, dict) else []:
            reason = str(e.get("reason", "?"))
            reasons[reason] = reasons.get(reason, 0) + 1
            frm, to, pool = e.get("from_replicas") or 0, e.get("to_replicas") or 0, str(e.get("pool"))
            if to > frm:
                ups[pool] = ups.get(pool, 0) + 1
            elif to < frm:
                downs[pool] = downs.get(pool, 0) + 1

        pools: dict[str, PoolSummary] = {}
        for p in snap.pools:
            rules = self.pools.pools[p.name]
            rs = self.replica_seconds.get(p.name, 0.0)
            count = metrics["cold_count"].get(p.name, 0.0)
            pools[p.name] = PoolSummary(
                min_replicas=p.min_replicas,
                max_replicas=p.max_replicas,
                replicas_final=p.provider,
                registered_final=p.registered,
                replicas_peak=self.peak.get(p.name, 0),
                replica_seconds=round(rs, 1),
                cost_usd=round(rs * rules.price_per_hour / 3600.0, 6),
                price_per_hour=rules.price_per_hour,
                cold_starts=cold_by_pool.get(p.name, 0),
                cold_start_mean_s=round(metrics["cold_sum"][p.name] / count, 2) if count else None,
                tasks_done=p.done,
                tasks_failed=p.failed,
                scale_ups=ups.get(p.name, 0),
                scale_downs=downs.get(p.name, 0),
            )
        total = sum(d.tasks_total for d in snap.decks)
        done = sum(d.tasks_done for d in snap.decks)
        failed = sum(d.tasks_failed for d in snap.decks)
        problems = []
        if total == 0:
            problems.append("no task was submitted")
        if done < total:
            problems.append(f"{total - done} of {total} tasks not done ({failed} failed)")
        for p in snap.pools:
            if p.provider is None:
                problems.append(f"pool {p.name}: replica count unknown")
            elif p.provider > p.min_replicas or p.registered > p.min_replicas:
                problems.append(
                    f"pool {p.name}: {p.provider} replicas ({p.registered} registered) at the end, "
                    f"min {p.min_replicas}"
                )
        if snap.phase == "timed out":
            problems.append(snap.message)
        if self.leftovers:
            problems.append(
                f"{len(self.leftovers)} process(es) were still running after the stop and were killed"
            )
        return Summary(
            ok=not problems,
            tasks_total=total,
            tasks_done=done,
            tasks_failed=failed,
            tasks_unfinished=total - done - failed,
            decks=len(snap.decks),
            pages=sum(d.pages for d in snap.decks),
            wall_s=round(self.elapsed(), 2),
            replica_seconds=round(sum(self.replica_seconds.values()), 1),
            cost_usd=round(sum(p.cost_usd for p in pools.values()), 6),
            cold_starts=sum(p.cold_starts for p in pools.values()),
            replicas_final={p.name: p.provider for p in snap.pools},
            pools=pools,
            decisions=reasons,
            ollama=self.ollama_url if self.o.ollama_host else f"stand-in ({self.ollama_url})",
            provider=f"datacrunch → emulator ({self.emulator_url})",
            problems=problems,
            logs=str(self.log_dir),
        )

    async def stop(self) -> None:
        """Stop every child (reverse start order), then the database; kill anything left over."""
        if self.stack is not None:
            self.leftovers = await self.stack.stop()
        else:
            self.leftovers = await asyncio.to_thread(kill_leftovers, self.run_id)
        if self.db is not None:
            await self.db.close(timeout_s=10)
            self.db = None
        if self.pg is not None:
            await asyncio.to_thread(self.pg.stop)
            self.pg = None
        if self.o.targets_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.o.targets_file.write_text("[]")
        if self._lock_fh is not None:
            self._lock_fh.close()  # releases the lock
            self._lock_fh = None

    async def __aenter__(self) -> Demo:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _document_root(specs: dict[str, dict[str, Any]], data_dir: Path) -> Path:
    """Where the demo stores decks: the specs' GPUSCALE_DOCUMENT_ROOT on their shared mount, as the
    emulator maps it to a local folder, or ``<data-dir>/documents`` when the specs name none."""
    from gpuscale.dev.emulator.app import shared_path

    for spec in specs.values():
        container = spec["containers"][0]
        for item in container.get("env") or []:
            if item["name"] == "GPUSCALE_DOCUMENT_ROOT" and item.get("type") == "plain":
                local = shared_path(container, str(item["value_or_reference_to_secret"]), data_dir / "shared")
                if local is not None:
                    return Path(local)
    return data_dir / "documents"


def _specs_by_pool(files: list[Path]) -> dict[str, dict[str, Any]]:
    """Deployment specs keyed by the pool their container serves (its GPUSCALE_POOL env)."""
    from gpuscale.controller import deployspec

    out: dict[str, dict[str, Any]] = {}
    for path in files:
        # The pool's preferred deployment is the demo's template; the shared filesystem the
        # emulator stands in for gets a fixed volume id (the shipped specs hold a placeholder).
        spec = deployspec.fill_volume_id(deployspec.load_file(path), "demo-shared")
        for item in spec["containers"][0].get("env") or []:
            if item.get("name") == "GPUSCALE_POOL" and item.get("type") == "plain":
                out[str(item["value_or_reference_to_secret"])] = spec
    return out


def _server_metrics_addr(server: Any) -> str | None:
    """Where a registered worker serves ``/metrics`` (host:port), if it told the registry."""
    caps = getattr(server, "capabilities", None) or {}
    for key in ("http", "metrics", "http_address", "address"):
        value = caps.get(key) if isinstance(caps, dict) else None
        if isinstance(value, str) and value:
            return value.removeprefix("http://").removesuffix("/metrics").rstrip("/")
    port = caps.get("http_port") if isinstance(caps, dict) else None
    if isinstance(port, int) and port > 0:
        return f"127.0.0.1:{port}"
    return None


def _deck_view(name: str, doc_id: str, pages: int, tasks: list[dict[str, Any]]) -> DeckView:
    total = len(tasks)
    done = sum(1 for t in tasks if t["status"] == "done")
    failed = sum(1 for t in tasks if t["status"] in ("failed", "dead", "cancelled"))
    running = [t for t in tasks if t["status"] == "running"]
    progress = 0.0
    if total:
        progress = (100.0 * (done + failed) + sum(float(t.get("progress") or 0) for t in running)) / total
    visual = [t for t in tasks if t["pool"] == "visual"]
    text = [t for t in tasks if t["pool"] == "text"]

    def count(ts: list[dict[str, Any]]) -> str:
        return f"{sum(1 for t in ts if t['status'] == 'done')}/{len(ts)}"

    if total and done == total:
        stage = "done"
    elif failed and done + failed == total:
        stage = "finished with failures"
    else:
        stage = f"visual {count(visual)} · text {count(text)}"
        if running:
            stage += f" · {len(running)} running"
    return DeckView(name, doc_id, pages, total, done, failed, len(running), round(progress, 1), stage)


__all__ = ["RUN_MARKER", "Demo", "DemoError", "DemoOptions", "ProcessFailed", "kill_leftovers"]
