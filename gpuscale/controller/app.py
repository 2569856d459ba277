"""The ``gpuscale controller`` process: wiring of the database, the leader lease, the provider,
the reconciler, the periodic jobs (apscheduler) and the ops HTTP server.

Leadership is a lease in the database (:mod:`gpuscale.controller.leader`), renewed by a task of
its own every retry period; the provider the reconciler uses is fenced by it
(:class:`~gpuscale.controller.providers.fenced.FencedProvider`), so only the current leader's
term ever reaches the provider.  When this process stops leading, a provider whose replicas are
its own processes (``local``) stops them: they belong to the pool, not to this process.

Jobs (AsyncIOScheduler, one instance of each at a time):

* reconcile — every ``reconcile_interval`` (pools file; 5-10 s), every pool, leader only;
* reaper — servers whose heartbeat stopped become ``dead`` and their tasks go back to the queue;
  expired leases are requeued too;
* cost — replicas × price accrued into ``pool_spend`` and ``gpuscale_spend_usd_total``;
* retention — ``done`` tasks older than ``retention_days`` deleted in batches.

A ``LISTEN gpuscale_work`` connection is the fast path: new claimable work (a ``critical`` task
above all) reconciles its pool at once instead of at the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from gpuscale.common.serving import AppServer
from gpuscale.common.settings import Settings
from gpuscale.controller import metrics as m
from gpuscale.controller.leader import LeaseElector, export_leader_gauge
from gpuscale.controller.ops_api import build_app
from gpuscale.controller.pools import PoolsConfig
from gpuscale.controller.providers import LaunchSpec, Provider, make_provider
from gpuscale.controller.providers.fenced import FencedProvider
from gpuscale.controller.reconcile import PoolView, Reconciler
from gpuscale.controller.store import ControllerStore
from gpuscale.db import Connector
from gpuscale.queue import Queue

log = logging.getLogger("gpuscale.controller")

PRICE_REFRESH_S = 3600.0  # how often the provider's price list is read again

# Connections for the controller's work; LISTEN and the leader's session have one each.
WORK_CONNECTIONS = 2
# The fast path (see _fast_reconcile): notifications gathered this long, reconciles this far apart.
FAST_COALESCE_S = 0.05
FAST_MIN_GAP_S = 0.25


def default_launches(config: PoolsConfig, dsn: str) -> dict[str, LaunchSpec]:
    """Local/docker launch specs: one worker per replica, pointed at this controller's database."""
    return {
        opt.name: LaunchSpec(pool=name, env={"GPUSCALE_DATABASE_URL": dsn})
        for name, r in config.pools.items()
        for opt in r.options
    }


class ControllerApp:
    def __init__(
        self,
        settings: Settings,
        config: PoolsConfig,
        dsn: str,
        *,
        provider: Provider | None = None,
        dry_run: bool = False,
        http: bool = True,
    ) -> None:
        self.settings = settings
        self.config = config
        self.dsn = dsn
        self.dry_run = dry_run
        self.http = http
        self.controller_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._provider = provider
        self.interval = settings.reconcile_interval_s or config.reconcile_interval_s
        # At most four connections whatever the fleet: two for the work (ticks, reaper, API),
        # LISTEN and the leader's lease (both direct when GPUSCALE_DATABASE_LISTEN_URL is set).
        self.db = Connector(
            dsn,
            min_connections=1,
            max_connections=WORK_CONNECTIONS,
            listen_dsn=settings.listen_dsn(dsn),
            statement_cache_size=settings.database_statement_cache_size,
        )
        self.leader = LeaseElector(
            self.db,
            self.controller_id,
            lease_duration_s=settings.leader_lease_duration_s,
            renew_deadline_s=settings.leader_renew_deadline_s,
            retry_period_s=settings.leader_retry_period_s,
            on_stopped_leading=self._stopped_leading,
        )
        self._lease_stop = asyncio.Event()
        self._stop = asyncio.Event()
        # Set while the LISTEN connection is up: the fast path works from then on (tests wait on it).
        self.listening = asyncio.Event()
        self._pending_fast: set[str] = set()
        self._fast_task: asyncio.Task[None] | None = None
        self._last_fast = float("-inf")
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_cost: float | None = None
        self._api_prices: dict[str, float] = {}  # deployment → $/replica-hour from the API
        self._prices_at = float("-inf")
        self._spend_cache: dict[str, float] | None = None
        self._timings_since: dt.datetime | None = None
        self._stopping = False
        self._leading = False  # whether the last tick ran as leader (load saved state on a change)
        self.http_port: int | None = None

    # -------------------------------------------------------------- accessors used by the API
    @property
    def is_leader(self) -> bool:
        return self.leader.is_leader

    @property
    def queue(self) -> Queue:
        return self._queue

    @property
    def store(self) -> ControllerStore:
        return self._store

    async def database_ok(self) -> tuple[bool, str | None]:
        try:
            await asyncio.wait_for(self.db.fetchval("ping"), timeout=2)
            return True, None
        except Exception as exc:
            return False, type(exc).__name__

    async def pools_view(self) -> dict[str, Any]:
        views: dict[str, PoolView] = self.reconciler.views
        return {
            "controller_id": self.controller_id,
            "role": "leader" if self.is_leader else "standby",
            "term": self.leader.generation if self.is_leader else None,
            "lease": await self.leader.read(),
            "dry_run": self.dry_run,
            "provider": self.provider.name,
            "pools": list(views.values()),
            "at": time.time(),
        }

    # -------------------------------------------------------------- lifecycle
    async def setup(self) -> None:
        await self.db.open()
        await self.db.migrate()
        self._queue = Queue(self.db, lease_s=self.settings.lease_seconds)
        self._store = ControllerStore(self.db)
        self.raw_provider = self._provider or make_provider(
            self.settings, default_launches(self.config, self.dsn)
        )
        # Every call the reconciler (or anything else here) makes goes through the fence.
        self.provider = FencedProvider(self.raw_provider, self.leader.may_act)
        self.reconciler = Reconciler(
            self.config,
            self._queue,
            self._store,
            self.provider,
            controller_id=self.controller_id,
            dry_run=self.dry_run,
            may_act=self.leader.may_act,
            leading=lambda: self.leader.is_leader,
        )
        export_leader_gauge(self.leader)

    async def _stopped_leading(self) -> None:
        """The lease is lost (not renewed within the renew deadline, or taken): stop what this
        process started where that is processes of its own, so the pool's new leader does not
        run on top of them."""
        self._leading = False
        self._timings_since = None
        step_down = getattr(self.raw_provider, "step_down", None)
        if step_down is not None:
            await step_down()

    async def teardown(self) -> None:
        # Stop acting, stop what we started, and only then hand the lease over: a standby that
        # took it earlier could start replicas while ours still run.
        self.leader.resign()
        self._lease_stop.set()
        with contextlib.suppress(Exception):
            await self.raw_provider.aclose()
        await self.leader.release()
        await self.db.close()

    def request_stop(self) -> None:
        self._stop.set()

    # -------------------------------------------------------------- jobs
    async def tick(self) -> bool:
        """One reconcile of every pool, if this process is the leader; returns whether it ran."""
        if not await self._lead():
            return False
        spend = await self._month_spend()
        await self.reconciler.reconcile_all(spend)
        await self.export_task_timings()
        return True

    async def _lead(self, *, renew: bool = True) -> bool:
        """Whether this process may act now; on becoming leader, take over the saved policy state.

        ``renew=False`` (the fast path) trusts the lease task's last renewal instead of renewing
        first: every provider call is fenced anyway."""
        if not (await self.leader.ensure() if renew else self.leader.is_leader):
            self._timings_since = None
            self._leading = False
            return False
        if not self._leading:
            self._leading = True
            await self.reconciler.load_states()
        return True

    async def export_task_timings(self) -> None:
        """Feed the fleet-wide queue-wait / duration histograms and the failure counter from the
        tasks finished since the last tick.  Only the leader exports, from when it became leader,
        so summing over controllers never counts a task twice."""
        try:
            if self._timings_since is None:
                self._timings_since = await self._queue.database_now()
                return
            rows = await self._queue.finished_since(self._timings_since)
        except Exception as exc:
            log.debug("task timings: %s", type(exc).__name__)
            return
        for r in rows:
            pool, tt = r["pool"], r["task_type"]
            if r["wait_s"] is not None and r["wait_s"] >= 0:
                m.QUEUE_WAIT_SECONDS.labels(pool, tt).observe(r["wait_s"])
            if r["duration_s"] is not None and r["duration_s"] >= 0:
                m.TASK_DURATION_SECONDS.labels(pool, tt).observe(r["duration_s"])
                if r["status"] == "done":
                    self.reconciler.learn_duration(tt, r["duration_s"])
            if r["status"] != "done":
                m.TASK_FAILURES.labels(pool, tt).inc()
        if rows:
            self._timings_since = rows[-1]["finished_at"]
            self.reconciler.export_expected()

    async def _month_spend(self) -> dict[str, float] | None:
        if self.config.monthly_budget_usd is None:
            return None
        try:
            self._spend_cache = await self._store.month_spend(dt.datetime.now(dt.UTC))
        except Exception:
            pass  # keep the last known spend
        return self._spend_cache

    async def reap(self) -> None:
        if not await self.leader.ensure():
            return
        try:
            dead = await self._queue.reap_dead_servers(self.settings.heartbeat_timeout_s)
            if dead:
                log.warning("reaper: %d server(s) stopped heartbeating: %s", len(dead), ", ".join(dead))
            expired = await self._queue.reap_expired()
            if expired:
                log.warning("reaper: %d expired lease(s) handed back to the queue", expired)
        except Exception as exc:
            log.warning("reaper failed: %s", type(exc).__name__)

    async def account_cost(self) -> None:
        now = time.time()
        last, self._last_cost = self._last_cost, now
        if last is None or not self.is_leader:
            return
        dt_s = now - last
        await self.refresh_prices()
        for name, rules in self.config.pools.items():
            # Each deployment's replicas at its own price: the API's (GET /container-types) when
            # it could be read, else the pools file's.
            counts = self.reconciler.deployment_counts.get(name) or {}
            replicas = sum(counts.values())
            usd = 0.0
            for opt in rules.options:
                n = counts.get(opt.name, 0)
                price, source = self.price_of(name, opt.name)
                m.DEPLOYMENT_PRICE.labels(name, opt.name, source).set(price)
                part = n * price * dt_s / 3600
                m.DEPLOYMENT_SPEND_USD.labels(name, opt.name).inc(part)
                usd += part
            m.SPEND_USD.labels(name).inc(usd)
            try:
                await self._store.add_spend(name, usd, replicas * dt_s, dt.datetime.now(dt.UTC))
            except Exception as exc:
                log.warning("cost accounting failed for %s: %s", name, type(exc).__name__)

    def price_of(self, pool: str, deployment: str) -> tuple[float, str]:
        """(price per replica-hour, "api" or "pools_file") of one of a pool's deployments."""
        api = self._api_prices.get(deployment)
        if api is not None:
            return api, "api"
        opt = self.config.pools[pool].option(deployment)
        fallback = opt.price_per_hour if opt is not None else None
        return float(
            fallback if fallback is not None else self.config.pools[pool].price_per_hour
        ), "pools_file"

    async def refresh_prices(self, *, force: bool = False) -> None:
        """Read the deployments' prices from the provider's API (hourly); a provider without
        prices, or an API that cannot be read, leaves the pools file's prices in use."""
        read = getattr(self.provider, "deployment_prices", None)
        now = time.monotonic()
        if read is None or (not force and now - self._prices_at < PRICE_REFRESH_S):
            return
        self._prices_at = now
        names = [o.name for r in self.config.pools.values() for o in r.options]
        try:
            self._api_prices = dict(await read(names))
        except Exception as exc:  # the pools file's prices stay in use
            log.warning("prices: could not read the provider's prices (%s); using the pools file's", exc)
            self._api_prices = {}
            return
        log.info(
            "prices from the API: %s",
            ", ".join(f"{k} ${v:.2f}/h" for k, v in sorted(self._api_prices.items())) or "none",
        )

    async def retention(self) -> None:
        if not await self.leader.ensure():
            return
        try:
            deleted = await self._queue.purge_done(
                older_than_s=self.settings.retention_days * 86400, batch=self.settings.retention_batch
            )
            if deleted:
                log.info("retention: deleted %d done task(s)", deleted)
            history = await self._queue.purge_history(
                older_than_s=self.settings.history_retention_days * 86400, batch=self.settings.retention_batch
            )
            if history:
                log.info("retention: deleted %d task history row(s)", history)
        except Exception as exc:
            log.warning("retention failed: %s", type(exc).__name__)

    # -------------------------------------------------------------- fast path
    def _on_work(self, pool: str) -> None:
        if self._stopping or pool not in self.config.pools or not self.is_leader:
            return
        if self.reconciler.at_max(pool):
            return  # it cannot scale up: new work there waits for the tick (no observation now)
        self._pending_fast.add(pool)
        if self._fast_task is None or self._fast_task.done():
            task = asyncio.get_running_loop().create_task(self._fast_reconcile())
            self._fast_task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _fast_reconcile(self) -> None:
        """Reconcile the notified pools where the new work can change the decision before the
        next tick (:meth:`Reconciler.fast_worthy`), all of them on one observation.

        Notifications come with every enqueue: a steady stream into many pools would otherwise
        mean one full observation per pool and notification.  They are gathered for
        ``FAST_COALESCE_S`` and fast reconciles are at least ``FAST_MIN_GAP_S`` apart, so the
        fast path costs a few observations a second at most, whatever the traffic and the number
        of pools.  Pools where new work changes nothing before the tick (at their max, or already
        waiting out their scale-up delay without a critical task) cost no observation and do not
        hold back the next fast reconcile, so a critical task still reaches the provider well
        within a second while the fleet's other pools take a steady stream."""
        loop = asyncio.get_running_loop()
        try:
            while self._pending_fast and not self._stopping:
                wait = max(FAST_COALESCE_S, self._last_fast + FAST_MIN_GAP_S - loop.time())
                await asyncio.sleep(wait)
                pools, self._pending_fast = sorted(self._pending_fast), set()
                if not pools or not await self._lead(renew=False):
                    continue
                pools = await self.reconciler.fast_worthy(pools)
                if pools:
                    self._last_fast = loop.time()
                    await self.reconciler.reconcile_some(pools, self._spend_cache)
        except Exception:
            log.exception("fast reconcile failed")
        finally:
            self._pending_fast.clear()

    async def _listen_loop(self) -> None:
        """LISTEN for new claimable work (the fast path); the seam's listener reconnects.  The
        app's ``listening`` event is set while it is subscribed."""
        if not self.settings.database_listen:
            log.warning("GPUSCALE_DATABASE_LISTEN is off: new work waits for the next tick (no fast path)")
            return
        await self._queue.listener(self._on_work, listening=self.listening).run()

    # -------------------------------------------------------------- run
    async def run(self) -> None:
        await self.setup()
        server: AppServer | None = None
        if self.http:
            # Signals stay ours (see the handlers below), so a signal stops the controller in
            # order: tick, lock, then the HTTP server.  A taken port fails here, saying so.
            server = AppServer(
                build_app(self), self.settings.http_host, self.settings.http_port, name="controller-http"
            )
            await server.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        scheduler = AsyncIOScheduler()
        common = {"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
        job = self._tracked
        scheduler.add_job(
            job(self.tick), "interval", seconds=self.interval, next_run_time=dt.datetime.now(), **common
        )
        scheduler.add_job(job(self.reap), "interval", seconds=self.settings.reaper_interval_s, **common)
        scheduler.add_job(
            job(self.account_cost),
            "interval",
            seconds=self.settings.cost_interval_s,
            next_run_time=dt.datetime.now(),
            **common,
        )
        scheduler.add_job(job(self.retention), "interval", seconds=3600, **common)
        scheduler.start()
        listener = asyncio.create_task(self._listen_loop())
        lease = asyncio.create_task(self.leader.run(self._lease_stop))
        log.info(
            "controller %s: provider=%s pools=%s interval=%.1fs%s http=%s",
            self.controller_id,
            self.provider.name,
            ",".join(self.config.pools),
            self.interval,
            " DRY-RUN" if self.dry_run else "",
            f"{self.settings.http_host}:{self.settings.http_port}" if self.http else "off",
        )
        try:
            await self._stop.wait()
        finally:
            log.info("controller: shutting down (finishing the tick in progress)")
            self._stopping = True  # no new fast-path reconciles
            scheduler.pause()
            # apscheduler's shutdown cancels running coroutine jobs: let them finish first, so a
            # provider call is never cut in half and every decision is recorded.
            await self._wait_running_jobs(limit_s=60)
            scheduler.shutdown(wait=False)
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            self._lease_stop.set()
            await asyncio.gather(lease, return_exceptions=True)
            await self.account_cost()
            if server is not None:
                await server.stop(timeout_s=5)
            await self.teardown()
            log.info("controller: stopped")

    def _tracked(self, fn: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        """Wrap a periodic job so shutdown can wait for the run in progress."""

        async def run() -> Any:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                return await fn()
            finally:
                self._tasks.discard(task)

        run.__name__ = getattr(fn, "__name__", "job")
        return run

    async def _wait_running_jobs(self, limit_s: float) -> None:
        """Wait for the jobs and fast-path reconciles in progress (not for new ones)."""
        pending = {t for t in self._tasks if t is not asyncio.current_task()}
        if pending:
            _done, late = await asyncio.wait(pending, timeout=limit_s)
            for t in late:
                log.warning("controller: a job did not finish within %.0fs; cancelling it", limit_s)
                t.cancel()

    async def run_once(self) -> tuple[bool, str]:
        """``--once``: one reconcile of every pool; (ran, why not)."""
        await self.setup()
        try:
            if not await self.leader.ensure():
                return False, "another controller holds the leader lease (or the database is unreachable)"
            await self.reap()
            decisions = await self.reconciler.reconcile_all(await self._month_spend())
            errors = [e for v in self.reconciler.views.values() for e in v.errors]
            if len(decisions) != len(self.config.pools):
                return False, "some pools could not be reconciled: " + "; ".join(errors)
            return True, "; ".join(errors)
        finally:
            await self.teardown()
