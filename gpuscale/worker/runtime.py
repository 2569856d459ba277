"""The worker runtime: register, warm the model, claim and run tasks, heartbeat, drain on SIGTERM.

One :class:`Worker` serves one pool.  Its life::

    register (starting) ─► warm model ─► active: claim ⇄ run ─► SIGTERM: draining ─► deregister
                    └──────── heartbeat every N s: extend leases, report load ────────┘

* Claims take up to the free slots, woken by ``LISTEN gpuscale_work`` (the pool's name) or by a
  finished task, with polling every ``poll_interval_s`` as the fallback when a notification is
  missed or the listening connection is down (``GPUSCALE_DATABASE_LISTEN=false``: polling only).
* Connections: one for all the work whatever the slots, one for LISTEN (direct to PostgreSQL
  when ``GPUSCALE_DATABASE_LISTEN_URL`` is set, e.g. behind PgBouncer), none for it when polling.
* Each task runs in its own asyncio task under its type's time limit
  (:mod:`gpuscale.queue.tasktypes`).  A handler that raises, hangs or returns something that is not a
  valid result fails that task only, with a reason; the worker carries on.
* SIGTERM (or SIGINT): stop claiming at once, mark the server ``draining``, let running tasks
  finish within ``drain_grace_s``, hand the rest back with ``release`` (no attempt spent),
  deregister, exit 0.  A second signal ends the grace period at once.  SIGKILL loses nothing
  either: the leases run out and the controller's reaper requeues the tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from gpuscale import __version__
from gpuscale.common.serving import AppServer
from gpuscale.db.connector import DATABASE_ERRORS, UNREACHABLE, Connector, Listener
from gpuscale.queue import ClaimedTask, Queue, ServerInfo, TaskStatus, tasktypes
from gpuscale.worker import metrics
from gpuscale.worker.errors import OllamaError, TaskError
from gpuscale.worker.handlers import Handler, TaskContext, handlers_for_pool, replay
from gpuscale.worker.http import WorkerStatus, create_app
from gpuscale.worker.ollama_client import ModelNotFound, OllamaClient
from gpuscale.worker.settings import WorkerSettings

log = logging.getLogger("worker")

# Connections a worker holds for its work (LISTEN has one more of its own).
WORK_CONNECTIONS = 1

# How far up the dependency graph handlers look for their inputs (visual → classification →
# template → specialised is three levels).
_DEPENDENCY_DEPTH = 4
# How much of a model's invalid answer a task's error keeps (the queue stores 16 KiB at most).
_RAW_ANSWER_IN_ERROR = 12_000
# Bounded time for the last database calls of a drain (release, deregister).
_SHUTDOWN_DB_TIMEOUT_S = 10.0


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    if state.attempt_number == 1:
        log.warning("database unreachable (%s); holding the outcome and retrying", type(exc).__name__)


class StartupError(RuntimeError):
    """The worker cannot start (schema missing, model never loaded); it exits non-zero."""


def _fields(**kw: Any) -> dict[str, Any]:
    return {"fields": kw}


class Worker:
    """One worker process's runtime for one pool (see the module docstring)."""

    def __init__(
        self,
        pool: str,
        *,
        dsn: str,
        settings: WorkerSettings | None = None,
        handlers: Mapping[str, Handler] | None = None,
        ollama: OllamaClient | None = None,
        http: bool = True,
    ) -> None:
        self.pool = pool
        # Without the HTTP API (``gpuscale bench fleet`` runs hundreds of workers in one process);
        # a real replica always serves it: its container health check reads it.
        self.http = http
        self.dsn = dsn
        self.settings = settings or WorkerSettings()
        if handlers is None:
            handlers = handlers_for_pool(pool)
            if self.settings.worker_replay:
                handlers = replay.handlers_for(handlers, self.settings.ollama_num_parallel or 1)
        self.handlers: dict[str, Handler] = dict(handlers)
        if not self.handlers:
            raise StartupError(f"no task types are routed to pool {pool!r}")
        self.model = self.settings.model_for(pool)
        self.slots = self.settings.concurrency_for(pool)
        self.container_id = self.settings.resolved_container_id()
        self.server_id = self.settings.server_id or f"{pool}-{self.container_id}-{uuid.uuid4().hex[:6]}"
        if ollama is None and self.model is not None:
            ollama = OllamaClient(
                self.settings.ollama_host,
                timeout_s=self.settings.ollama_timeout_s,
                keep_alive=self.settings.keep_alive,
            )
        self.ollama = ollama if self.model is not None else None
        self.status = WorkerStatus(
            pool=pool,
            server_id=self.server_id,
            model=self.model,
            slots=self.slots,
            ollama=self.ollama,
            running=lambda: len(self._running),
        )
        self.http_port: int | None = None

        self._db: Connector | None = None
        self._queue: Queue | None = None
        self._listener: Listener | None = None
        self._running: dict[int, asyncio.Task[None]] = {}
        # Per held task, when (monotonic) its lease runs out at the earliest: the claim or the last
        # renewal started before the database set it.  A heartbeat renews only the leases due.
        self._lease_until: dict[int, float] = {}
        self._reporting: set[int] = set()  # tasks past their handler, writing their outcome
        self._abandoned: dict[int, str] = {}  # task id → why we cancelled it ("drain", "lost")
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._server_status = "starting"
        self._http: AppServer | None = None
        self._background: list[asyncio.Task[Any]] = []
        self._labels = {"pool": pool}

    # ------------------------------------------------------------------ public

    @property
    def queue(self) -> Queue:
        assert self._queue is not None, "worker not started"
        return self._queue

    def request_stop(self) -> None:
        """Begin the drain (first call) or end the grace period at once (second call)."""
        if self._stop.is_set():
            if not self._force.is_set():
                log.warning("second stop signal: handing back running tasks now")
            self._force.set()
        else:
            log.info("stop requested: draining (grace %.0fs)", self.settings.drain_grace_s)
            self._stop.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    async def run(self) -> int:
        """Run until stopped; returns the process exit code (0 after a clean drain)."""
        metrics.SLOTS.labels(**self._labels).set(self.slots)
        try:
            await self._start()
        except StartupError as exc:
            log.error("worker cannot start: %s", exc)
            await self._shutdown(deregister=self._queue is not None)
            return 1
        try:
            if await self._warm():
                await self._set_status("active")
                self.status.ready = True
                self.status.detail = "claiming"
                metrics.READY.labels(**self._labels).set(1)
                log.info(
                    "worker %s ready: pool %s, %d slot(s), model %s, http port %s",
                    self.server_id,
                    self.pool,
                    self.slots,
                    self.model or "-",
                    self.http_port,
                    extra=_fields(server_id=self.server_id, pool=self.pool, http_port=self.http_port),
                )
                await self._claim_loop()
            elif not self._stop.is_set():
                log.error(
                    "model %s was not ready within %.0fs; giving up", self.model, self.settings.warm_timeout_s
                )
                await self._shutdown(deregister=True)
                return 1
            await self._drain()
        finally:
            await self._shutdown(deregister=True)
        return 0

    # ------------------------------------------------------------------ start

    async def _start(self) -> None:
        try:
            # One connection for all of its work, whatever the slots (claims, progress, results
            # and heartbeats are short statements), plus one for LISTEN unless it polls: a fleet
            # of N replicas needs at most 2N connections (N through a pooler + N direct, or N).
            self._db = await Connector(
                self.dsn,
                min_connections=1,
                max_connections=WORK_CONNECTIONS,
                listen_dsn=self.settings.listen_dsn(self.dsn),
                statement_cache_size=self.settings.database_statement_cache_size,
            ).open()
            exists = await self._db.fetchval("queue_schema_exists")
        except DATABASE_ERRORS as exc:
            raise StartupError(f"cannot connect to the database: {exc}") from None
        if not exists:
            raise StartupError("the database has no queue schema; run `gpuscale db migrate` first")
        self._queue = Queue(
            self._db,
            lease_s=self.settings.lease_seconds,
            retry_base_s=self.settings.retry_base_s,
            retry_max_s=self.settings.retry_max_s,
        )
        if self.http:
            await self._start_http()
        ready_at = self.settings.replica_ready_at
        if ready_at is not None and ready_at > time.time():
            # The container's cold start is not over yet (the process was started early).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=ready_at - time.time())
        try:
            await self.queue.register_server(self._server_info("starting"))
        except DATABASE_ERRORS as exc:
            # The database went away right after we reached it: the first heartbeat that gets
            # through finds this server unknown and registers it.
            log.warning("could not register yet (%s); the heartbeat will", type(exc).__name__)
        self._background.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeat"))
        if self.settings.database_listen:
            self._listener = self.queue.listener(self._on_notify)
            self._background.append(asyncio.create_task(self._listener.run(), name="listen"))

    def _server_info(self, status: str) -> ServerInfo:
        return ServerInfo(
            id=self.server_id,
            pool=self.pool,
            container_id=self.container_id,
            status=status,
            capabilities={
                "task_types": sorted(self.handlers),
                "http_port": self.http_port,
                "host": socket.gethostname(),
            },
            current_load=len(self._running),
            max_concurrent_tasks=self.slots,
            models=[self.model] if self.model else [],
            version=__version__,
        )

    async def _start_http(self) -> None:
        try:
            server = AppServer(
                create_app(self.status, self.settings.worker_token),
                self.settings.worker_host,
                self.settings.worker_port,
                name="http",
            )
        except OSError as exc:
            where = f"{self.settings.worker_host}:{self.settings.worker_port}"
            raise StartupError(
                f"cannot listen on {where}: {exc.strerror or exc} "
                "(set GPUSCALE_WORKER_PORT; 0 picks a free port)"
            ) from None
        self.http_port = server.port
        if self.settings.worker_port_file is not None:
            try:
                self.settings.worker_port_file.write_text(f"{self.http_port}\n")
            except OSError as exc:
                log.warning("cannot write the port file %s: %s", self.settings.worker_port_file, exc)
        # Returns once it accepts connections, so "listening on" is true when logged.
        await server.start()
        self._http = server
        log.info(
            "worker http listening on %s:%d",
            self.settings.worker_host,
            self.http_port,
            extra=_fields(http_port=self.http_port),
        )

    def _on_notify(self, pool: str) -> None:
        if pool == self.pool:
            self._wake.set()

    async def _warm(self) -> bool:
        """Load the pool's model; True when ready, False if it did not load in time or we stop.

        A missing model is pulled once; right after a successful pull it is warmed again at once
        (even past the deadline: a big pull may outlast ``warm_timeout_s``).  Every other failure,
        a failed pull included, waits with back-off and counts against the deadline, so an Ollama
        that cannot get the model never makes this loop spin.
        """
        if self.ollama is None or self.model is None:
            return True
        self.status.detail = f"loading model {self.model}"
        deadline = time.monotonic() + self.settings.warm_timeout_s
        delay = 0.25
        last_error = ""
        pulled = False  # after a successful pull, "not found" is a real problem, not a cue
        while not self._stop.is_set():
            problem = ""
            try:
                await self.ollama.warm(self.model)
                log.info("model %s loaded", self.model)
                return True
            except ModelNotFound as exc:
                if pulled:
                    problem = f"model {self.model} still not found after pulling it: {exc}"
                else:
                    log.warning("model %s is not installed; pulling it", self.model)
                    self.status.detail = f"pulling model {self.model}"
                    try:
                        await self.ollama.pull(self.model)
                        log.info("model %s pulled", self.model)
                        pulled = True  # warm it again at once (problem stays empty)
                    except OllamaError as pull_exc:
                        problem = f"model {self.model} is not installed and pulling it failed: {pull_exc}"
            except OllamaError as exc:
                problem = f"waiting for Ollama: {exc}"
            if not problem:
                continue
            if problem != last_error:
                log.warning("%s", problem)
                last_error = problem
            self.status.detail = problem
            if time.monotonic() + delay > deadline:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, 5.0)
        return False

    # ------------------------------------------------------------------ claiming

    async def _claim_loop(self) -> None:
        """Claim into free slots until stopped.  While the database is away, claims fail and are
        retried with a backoff no longer than the poll interval, so claiming resumes within about
        one poll interval of its return; running tasks go on meanwhile.  Nothing the database
        does ends this loop: only a stop does."""
        backoff = 0.0
        outage_since: float | None = None
        while not self._stop.is_set():
            self._wake.clear()
            free = self.slots - len(self._running)
            claimed = 0
            if free > 0:
                try:
                    asked_at = time.monotonic()
                    tasks = await self.queue.claim(self.pool, self.server_id, free)
                    backoff = 0.0
                    if outage_since is not None:
                        log.info(
                            "claiming again (the database was unreachable for %.1fs)",
                            time.monotonic() - outage_since,
                        )
                        outage_since = None
                except Exception as exc:  # the database's errors above all; never the loop's end
                    backoff = min(max(backoff * 2, 0.25), self.settings.poll_interval_s)
                    if outage_since is None:
                        outage_since = time.monotonic()
                        if isinstance(exc, DATABASE_ERRORS):
                            log.warning("claim failed (%s: %s); retrying", type(exc).__name__, exc)
                        else:
                            log.exception("claim failed unexpectedly; retrying")
                    tasks = []
                claimed = len(tasks)
                if tasks:
                    self._observe_wait(tasks)
                for task in tasks:
                    if self._stop.is_set():
                        # Stopped while claiming: hand it straight back.
                        await self._release(task.id)
                        continue
                    self._lease_until[task.id] = asked_at + self.settings.lease_seconds
                    self._running[task.id] = asyncio.create_task(self._execute(task), name=f"task-{task.id}")
                metrics.RUNNING.labels(**self._labels).set(len(self._running))
                if claimed == free and not backoff:
                    continue  # the queue may hold more; loop at once (we now have no free slot)
            # Jittered (0.5-1.5x, the same mean): replicas that started together would otherwise
            # poll in step forever, all within a moment of each other, leaving a pool unpolled for
            # most of the interval (the fleet bench's queue wait p50 was 1.2 s at a 5 s interval
            # with 25 polling replicas per pool, whose polls, spread out, come every 0.2 s).
            timeout = backoff or self.settings.poll_interval_s * random.uniform(0.5, 1.5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _observe_wait(self, tasks: list[ClaimedTask]) -> None:
        """Queue-wait metric: claim time minus when each task last became queued."""
        for t in tasks:
            if t.queue_wait_s is not None:
                metrics.QUEUE_WAIT.labels(pool=self.pool, task_type=t.task_type).observe(t.queue_wait_s)

    async def _execute(self, task: ClaimedTask) -> None:
        # The queue as it is now: _shutdown waits for every runner before it lets go of the queue,
        # and holding it here means no report of this task ever finds it torn down.
        queue = self.queue
        started = time.monotonic()
        tt = task.task_type
        labels = {"pool": self.pool, "task_type": tt}
        log.info(
            "task %s (%s) claimed, attempt %d/%d",
            task.id,
            tt,
            task.attempts,
            task.max_attempts,
            extra=_fields(task_id=task.id, task_type=tt, attempt=task.attempts),
        )
        outcome: str
        try:
            result, error, retryable = await self._run_handler(task)
        except asyncio.CancelledError:
            reason = self._abandoned.pop(task.id, None)
            if reason is None:
                raise
            # We cancelled it on purpose; this task itself goes on to report that.
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            if reason == "drain":
                released = await self._release(task.id)
                outcome = "released" if released else "lost"
                log.info("task %s (%s) handed back during drain", task.id, tt)
            else:
                # Declared dead while alive.  If the controller did not requeue the task (its row
                # may still say running, leased to us), hand it back now: otherwise it waits for
                # the lease to run out and the reaper spends the attempt (a last attempt ends
                # dead).  release() only touches a task still running under our lease, and we
                # skip it when a fresh claim of the same task (under our new registration)
                # already replaced this runner, so that claim is never undone.
                if self._running.get(task.id) is current:
                    await self._release(task.id)
                outcome = "lost"
            metrics.TASKS.labels(**labels, outcome=outcome).inc()
            self._finished(task.id, current)
            return
        self._reporting.add(task.id)
        try:
            metrics.TASK_DURATION.labels(**labels).observe(time.monotonic() - started)
            if error is None:
                assert result is not None
                ok = await self._db_retry(lambda: queue.complete(task.id, self.server_id, result))
                outcome = "done" if ok else "lost"
                if ok:
                    log.info(
                        "task %s (%s) done in %.1fs",
                        task.id,
                        tt,
                        time.monotonic() - started,
                        extra=_fields(task_id=task.id, task_type=tt, outcome="done"),
                    )
                else:
                    log.warning("task %s (%s) finished but its lease was lost; result dropped", task.id, tt)
            else:
                metrics.TASK_FAILURES.labels(**labels).inc()
                status = await self._db_retry(
                    lambda: queue.fail(task.id, self.server_id, error, retryable=retryable)
                )
                outcome = {
                    TaskStatus.queued: "retry",
                    TaskStatus.dead: "dead",
                    TaskStatus.failed: "failed",
                }.get(status, "lost")
                log.warning(
                    "task %s (%s) failed (%s): %s",
                    task.id,
                    tt,
                    outcome,
                    error.partition("\nraw answer: ")[0],  # the raw answer stays in the database
                    extra=_fields(task_id=task.id, task_type=tt, outcome=outcome, retryable=retryable),
                )
        except Exception as exc:  # the database is gone for good: the lease will run out and requeue
            outcome = "lost"
            log.error("task %s (%s): could not record its outcome: %s", task.id, tt, exc)
        finally:
            self._reporting.discard(task.id)
        metrics.TASKS.labels(**labels, outcome=outcome).inc()
        self._finished(task.id, asyncio.current_task())

    def _finished(self, task_id: int, runner: asyncio.Task[Any] | None) -> None:
        # Only drop our own entry: after a "lost" cancel the same task id may have been claimed
        # again and be running in a newer asyncio task.
        if self._running.get(task_id) is runner:
            del self._running[task_id]
            self._lease_until.pop(task_id, None)
        metrics.RUNNING.labels(**self._labels).set(len(self._running))
        self._wake.set()  # a slot is free

    async def _run_handler(self, task: ClaimedTask) -> tuple[dict[str, Any] | None, str | None, bool]:
        """(result, None, _) on success, (None, error, retryable) on failure.  Never raises except
        ``CancelledError``."""
        handler = self.handlers.get(task.task_type)
        if handler is None:
            return None, f"this {self.pool} worker has no handler for task type {task.task_type!r}", False
        try:
            timeout_s = tasktypes.get(task.task_type).timeout_s
        except tasktypes.UnknownTaskType:
            timeout_s = 900.0
        deps_cache: list[dict[str, Any]] | None = None

        queue = self.queue

        async def progress(percent: float, message: str) -> None:
            # A progress report is worth nothing next to the task: whatever goes wrong (the
            # database away, above all), the handler carries on.
            try:
                await queue.progress(task.id, self.server_id, percent, message[:500])
            except Exception as exc:
                log.debug("progress update for task %s failed: %s", task.id, exc)

        async def dependency_results() -> list[dict[str, Any]]:
            nonlocal deps_cache
            if deps_cache is None:
                deps_cache = await self._dependency_results(task.id)
            return deps_cache

        ctx = TaskContext(
            task_id=task.id,
            task_type=task.task_type,
            payload=dict(task.payload or {}),
            settings=self.settings,
            server_id=self.server_id,
            model=self.model,
            ollama=self.ollama,
            progress=progress,
            dependency_results=dependency_results,
        )
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline:
                raw = await handler(ctx)
        except TimeoutError as exc:
            if deadline.expired():
                return None, f"{task.task_type} timed out after {timeout_s:g}s (its time limit)", True
            return None, f"handler raised TimeoutError: {exc}", True
        except TaskError as exc:
            error = str(exc) or type(exc).__name__
            if exc.raw:
                # An answer that did not validate: keep the model's text for diagnosis (the
                # message holds only its start); the queue caps the whole error at 16 KiB.
                error += "\nraw answer: " + exc.raw[:_RAW_ANSWER_IN_ERROR]
            return None, error, exc.retryable
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("task %s (%s): handler crashed", task.id, task.task_type)
            return None, f"handler crashed: {type(exc).__name__}: {exc}", True
        # A replayed task's result is its timing, not the task type's answer.
        problem = self._check_result("" if self.settings.worker_replay else task.task_type, raw)
        if problem is not None:
            return None, problem, False
        assert isinstance(raw, dict)
        return raw, None, True

    @staticmethod
    def _check_result(task_type: str, raw: Any) -> str | None:
        """Why a handler's return value cannot be stored, or None if it can."""
        if not isinstance(raw, dict):
            return f"handler returned {type(raw).__name__}, not a JSON object"
        try:
            json.dumps(raw, allow_nan=False)
        except (TypeError, ValueError) as exc:
            return f"handler returned a result that is not valid JSON: {exc}"
        known = tasktypes.all_types().get(task_type)
        if known is not None:
            model = known.result_model
            try:
                model.model_validate(raw)
            except ValueError as exc:
                first = str(exc).splitlines()[:3]
                return f"handler returned a result that does not match {model.__name__}: {' '.join(first)}"
        return None

    async def _dependency_results(self, task_id: int) -> list[dict[str, Any]]:
        """Results of the task's dependencies and their dependencies (up to a few levels)."""
        seen: set[int] = set()
        out: list[dict[str, Any]] = []
        frontier = [task_id]
        for _ in range(_DEPENDENCY_DEPTH):
            nxt: list[int] = []
            for tid in frontier:
                for dep in await self.queue.dependency_results(tid):
                    if dep["id"] in seen:
                        continue
                    seen.add(dep["id"])
                    out.append(dep)
                    nxt.append(dep["id"])
            if not nxt:
                break
            frontier = nxt
        return out

    async def _db_retry(self, call: Any) -> Any:
        """Write a task's outcome, retrying while the database is unreachable.

        The task stays ours until its lease has run out *and* the controller's reaper has handed
        it back, so the finished work is worth waiting for: the write goes through as soon as the
        database is back (backoff at most 2 s), for up to twice the lease.  After that the task
        has most likely run elsewhere; the error goes up and the outcome counts as lost."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(UNREACHABLE),
            wait=wait_exponential(multiplier=0.1, max=2.0) + wait_random(0, 0.1),
            stop=stop_after_delay(max(2 * self.settings.lease_seconds, 10.0)),
            before_sleep=_log_retry,
            reraise=True,
        ):
            with attempt:
                return await call()
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _release(self, task_id: int) -> bool:
        try:
            return await asyncio.wait_for(self.queue.release(task_id, self.server_id), _SHUTDOWN_DB_TIMEOUT_S)
        except DATABASE_ERRORS as exc:
            log.warning("could not hand back task %s (%s); its lease will run out", task_id, exc)
            return False

    # ------------------------------------------------------------------ heartbeat

    async def _set_status(self, status: str) -> None:
        self._server_status = status
        try:
            await self.queue.set_server_status(self.server_id, status)
        except DATABASE_ERRORS as exc:
            log.warning("could not set server status %s: %s", status, exc)

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_interval_s
        while True:
            # Jittered (±20 %, the same mean) for the reason the polls are: a fleet that started
            # together would otherwise send all its heartbeats in one burst every interval.
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))
            try:
                await self.heartbeat()
            except Exception:
                # One bad beat must not end the loop: without heartbeats the leases run out and
                # the controller reaps a healthy worker.  Log it and beat again next interval.
                metrics.HEARTBEATS.labels(pool=self.pool, result="error").inc()
                log.exception("heartbeat failed unexpectedly; carrying on")

    def _renew_within_s(self) -> float:
        """Renew a lease once it has at most half its length left (but always with two beats to
        spare): with a 60 s lease and a 10 s heartbeat a task row is written every third beat."""
        lease = self.settings.lease_seconds
        return min(lease, max(lease / 2, 2 * self.settings.heartbeat_interval_s))

    async def heartbeat(self) -> None:
        """Extend the leases of held tasks and report load; re-register if we were declared dead."""
        try:
            # Only the leases that end within the window need a write: a heartbeat is then one
            # statement, not two, as long as every task is shorter than the lease (most are).
            now = time.monotonic()
            within = self._renew_within_s()
            due = [t for t in self._running if self._lease_until.get(t, now) - now < within]
            if due:
                renewed = await self.queue.renew_leases(self.server_id, task_ids=due, ending_within_s=within)
                for task_id in renewed & self._lease_until.keys():
                    self._lease_until[task_id] = now + self.settings.lease_seconds
            known = await self.queue.server_heartbeat(
                self.server_id, current_load=len(self._running), status=self._server_status
            )
        except DATABASE_ERRORS as exc:
            metrics.HEARTBEATS.labels(pool=self.pool, result="error").inc()
            log.warning("heartbeat failed: %s", exc)
            return
        if known:
            metrics.HEARTBEATS.labels(pool=self.pool, result="ok").inc()
        else:
            # The controller reaped us (a long pause, a network split): our tasks went back to the
            # queue and may already run elsewhere.  Stop working on them and register afresh.
            metrics.HEARTBEATS.labels(pool=self.pool, result="unknown").inc()
            log.warning(
                "this server was declared dead or removed; dropping %d task(s) and re-registering",
                len(self._running),
            )
            for task_id, runner in list(self._running.items()):
                if task_id not in self._reporting:
                    self._abandoned[task_id] = "lost"
                    runner.cancel()
            with contextlib.suppress(*DATABASE_ERRORS):
                await self.queue.register_server(
                    self._server_info("active" if self._server_status == "active" else "starting")
                )
                if self._server_status == "draining":
                    await self.queue.set_server_status(self.server_id, "draining")

    # ------------------------------------------------------------------ drain and shutdown

    async def _drain(self) -> None:
        self.status.draining = True
        self.status.ready = False
        self.status.detail = "draining"
        metrics.READY.labels(**self._labels).set(0)
        metrics.DRAINING.labels(**self._labels).set(1)
        await self._set_status("draining")
        running = list(self._running.values())
        log.info(
            "draining: %d task(s) running, grace %.0fs",
            len(running),
            self.settings.drain_grace_s,
            extra=_fields(running=len(running)),
        )
        if running:
            finished = asyncio.ensure_future(asyncio.wait(running))
            forced = asyncio.ensure_future(self._force.wait())
            await asyncio.wait(
                {finished, forced}, timeout=self.settings.drain_grace_s, return_when=asyncio.FIRST_COMPLETED
            )
            finished.cancel()
            forced.cancel()
        if handed_back := await self._hand_back_running():
            log.info("grace period over: handing back %d task(s)", handed_back)

    async def _hand_back_running(self) -> int:
        """Cancel every handler still running (its task goes back to the queue, no attempt spent,
        unless its result is being reported) and wait for them; returns how many there were."""
        leftover = [(tid, r) for tid, r in self._running.items() if not r.done()]
        for task_id, runner in leftover:
            if task_id not in self._reporting:
                self._abandoned[task_id] = "drain"
                runner.cancel()
        if leftover:
            await asyncio.wait([r for _, r in leftover], timeout=_SHUTDOWN_DB_TIMEOUT_S + 5)
        return len(leftover)

    async def _shutdown(self, *, deregister: bool) -> None:
        """Release whatever is still held, deregister, stop the HTTP server; idempotent."""
        self.status.stopping = True
        # Never tear the queue down under a running handler: hand back what still runs (a drain
        # has already done so; this is for an exit by any other way) and wait for the runners.
        await self._hand_back_running()
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._background = []
        if self._queue is not None and deregister:
            try:
                await asyncio.wait_for(self.queue.deregister_server(self.server_id), _SHUTDOWN_DB_TIMEOUT_S)
                log.info("worker %s deregistered", self.server_id)
            except DATABASE_ERRORS as exc:
                log.warning("could not deregister (%s); the controller will reap this server", exc)
            self._queue = None
        self._listener = None
        if self._http is not None:
            await self._http.stop(timeout_s=5)
            self._http = None
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self.ollama is not None:
            with contextlib.suppress(Exception):
                await self.ollama.close()
        metrics.RUNNING.labels(**self._labels).set(0)
        metrics.DRAINING.labels(**self._labels).set(0)


async def run_worker(pool: str, *, dsn: str, settings: WorkerSettings | None = None) -> int:
    """Entry point of ``gpuscale worker``: run one worker with signal handling; the exit code."""
    worker = Worker(pool, dsn=dsn, settings=settings)
    worker.install_signal_handlers()
    return await worker.run()
