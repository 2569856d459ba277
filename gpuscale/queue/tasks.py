"""The PostgreSQL task queue and the server registry (their statements are in gpuscale/db/queries.sql).

Tasks are typed (:mod:`gpuscale.queue.tasktypes` routes each type to a pool and validates its payload),
carry a priority, may depend on other tasks, and move through::

    blocked ──(last dependency done)──► queued ──claim──► running ──► done
                                          ▲  ▲                 │
                       retry after backoff│  └──release/reap───┤
                                          └────────fail────────┤──► failed (not retryable)
                                                               └──► dead (attempts used up)

Claims use ``FOR UPDATE SKIP LOCKED`` and hand out a lease; a worker extends its leases with its
heartbeat, and leases that run out are reaped back to ``queued`` (or ``dead``).  Completion and
unblocking of dependents happen in one transaction, so a dependent is released exactly once; a
dependency that finally fails takes its dependents down with an error naming it.

Depth and stats reads come from exact counters kept by statement-level triggers (see migration
0001), so they cost the same at a thousand rows as at millions.  ``NOTIFY gpuscale_work`` with the
pool name is sent whenever claimable work appears (enqueue, unblock, release, reap).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from gpuscale.db.connector import Connector, Listener
from gpuscale.queue import tasktypes

NOTIFY_CHANNEL = "gpuscale_work"
SERVER_STATUSES = ("starting", "active", "draining", "dead")
_MAX_TEXT = 16 * 1024  # error and progress texts are cut to this many characters
MAX_PAYLOAD_DEPTH = 32  # nesting of objects/arrays in a payload; deeper is refused
_MAX_ID = 2**63 - 1  # task ids are bigint


class Priority(StrEnum):
    normal = "normal"
    high = "high"
    critical = "critical"


class TaskStatus(StrEnum):
    blocked = "blocked"
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    dead = "dead"
    cancelled = "cancelled"


FINAL_STATUSES = frozenset({TaskStatus.done, TaskStatus.failed, TaskStatus.dead, TaskStatus.cancelled})
_FAILED_STATUSES = ("failed", "dead", "cancelled")


class QueueError(Exception):
    """Base of the queue's errors."""


class InvalidTask(QueueError, ValueError):
    """A task was refused (unknown type, bad payload, too large, bad dependency); nothing written."""


class DocumentTaken(InvalidTask):
    """A batch was to start a document whose id some task already has; nothing written."""


@dataclass
class NewTask:
    task_type: str
    payload: dict[str, Any]
    priority: Priority | str = Priority.normal
    depends_on: list[int] = field(default_factory=list)
    document_id: str | None = None
    max_attempts: int | None = None


@dataclass
class ClaimedTask:
    id: int
    task_type: str
    pool: str
    document_id: str | None
    payload: dict[str, Any]
    priority: Priority
    attempts: int
    max_attempts: int
    depends_on: list[int]
    lease_expires_at: datetime
    # Seconds between becoming claimable (enqueue, unblock, retry, requeue) and this claim, for
    # the queue-wait metric; None if unknown.
    queue_wait_s: float | None = None


@dataclass
class PoolStats:
    pool: str
    queued: dict[Priority, int]  # claimable now, by priority
    waiting_backoff: int  # queued but waiting out a retry backoff
    running: int
    blocked: int
    blocked_on_running: int  # blocked, and every unfinished dependency is queued or running
    oldest_queued_age_s: float | None
    done: int
    failed: int
    dead: int
    cancelled: int = 0

    @property
    def queued_total(self) -> int:
        return sum(self.queued.values())


@dataclass
class RunningRow:
    """A running task (or an unfinished dependency, then ``status`` says queued or running):
    seconds since it was claimed and the progress its worker reported (0-1, None: none yet)."""

    pool: str
    task_type: str
    elapsed_s: float
    progress: float | None
    server: str | None
    status: str = "running"
    id: int | None = None
    deck_age_s: float | None = None  # since its deck (its task graph) was submitted


@dataclass
class BlockedRow:
    """A blocked task and its unfinished dependencies (queued, running or blocked)."""

    pool: str
    task_type: str
    deps: list[RunningRow]
    id: int | None = None
    deck_age_s: float | None = None


@dataclass
class WorkDetail:
    """See :meth:`Queue.work_detail`."""

    queued_by_type: dict[tuple[str, str], int]
    running: list[RunningRow]
    blocked: list[BlockedRow]
    oldest_deck_age_s: dict[str, float] = field(default_factory=dict)  # per pool, claimable tasks


@dataclass
class ServerInfo:
    id: str
    pool: str
    container_id: str | None = None
    status: str = "starting"
    capabilities: dict[str, Any] = field(default_factory=dict)
    current_load: int = 0
    max_concurrent_tasks: int = 1
    models: list[str] = field(default_factory=list)
    version: str | None = None
    last_heartbeat: datetime | None = None
    started_at: datetime | None = None


@dataclass
class _Prepared:
    task_type: str
    pool: str
    document_id: str | None
    payload: dict[str, Any]
    priority: Priority
    max_attempts: int
    existing_deps: list[int]
    local_deps: list[int]  # indices into the same batch


def _depth(value: Any) -> int:
    """How deeply ``value`` nests lists and dicts, without recursion (it may be very deep)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level > MAX_PAYLOAD_DEPTH:
                return level  # deep enough to refuse; no need to walk the rest
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def validate_task(task: NewTask, max_payload_bytes: int = 256 * 1024) -> None:
    """Check ``task`` as :meth:`Queue.enqueue` would, without a database (all but whether its
    dependencies exist).  Raises :class:`InvalidTask`."""
    _validate(task, max_payload_bytes)


def _validate(task: NewTask, max_payload_bytes: int) -> _Prepared:
    try:
        tt = tasktypes.get(task.task_type)
    except tasktypes.UnknownTaskType as exc:
        raise InvalidTask(str(exc)) from None
    if not isinstance(task.payload, dict):
        raise InvalidTask(
            f"{task.task_type}: payload must be a JSON object, not {type(task.payload).__name__}"
        )
    if _depth(task.payload) > MAX_PAYLOAD_DEPTH:
        raise InvalidTask(f"payload for {task.task_type} is nested more than {MAX_PAYLOAD_DEPTH} levels deep")
    try:
        model = tt.payload_model.model_validate(task.payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidTask(f"invalid payload for {task.task_type}: {problems}") from None
    # Store what the model accepted (coerced), limited to the fields the caller gave.
    payload = model.model_dump(mode="json", exclude_unset=True)
    # Measured as stored (compact JSON); the connector's codec writes the same text.
    size = len(json.dumps(payload, separators=(",", ":")).encode())
    if size > max_payload_bytes:
        raise InvalidTask(
            f"payload for {task.task_type} is {size} bytes, over the limit of {max_payload_bytes} bytes"
        )
    try:
        priority = Priority(task.priority)
    except ValueError:
        raise InvalidTask(
            f"unknown priority {task.priority!r}; use one of: {', '.join(p.value for p in Priority)}"
        ) from None
    max_attempts = task.max_attempts if task.max_attempts is not None else tt.max_attempts
    if not isinstance(max_attempts, int) or max_attempts < 1:
        raise InvalidTask(f"max_attempts must be a positive integer, not {max_attempts!r}")
    deps: list[int] = []
    for d in task.depends_on:
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= _MAX_ID:
            raise InvalidTask(f"dependency ids must be integers from 1 to {_MAX_ID}, not {d!r}")
        if d not in deps:
            deps.append(d)
    if task.document_id is not None and not isinstance(task.document_id, str):
        raise InvalidTask("document_id must be a string")
    return _Prepared(task.task_type, tt.pool, task.document_id, payload, priority, max_attempts, deps, [])


class Queue:
    """The queue and server registry on a :class:`~gpuscale.db.Connector` (schema migrated).

    ``db`` may also be an asyncpg pool opened elsewhere (tests), set up with
    :func:`gpuscale.db.connector.init_connection`."""

    def __init__(
        self,
        db: Connector | Any,
        *,
        max_payload_bytes: int = 256 * 1024,
        lease_s: float = 60.0,
        retry_base_s: float = 5.0,
        retry_max_s: float = 600.0,
    ) -> None:
        self.db: Connector = db if isinstance(db, Connector) else Connector.over(db)
        self.max_payload_bytes = max_payload_bytes
        self.lease_s = lease_s
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s

    # ------------------------------------------------------------------ enqueue

    async def enqueue(self, task: NewTask) -> int:
        return (await self.enqueue_many([task]))[0]

    async def enqueue_many(self, tasks: Sequence[NewTask]) -> list[int]:
        """Enqueue a batch; without dependencies this is one statement and one round trip."""
        return await self.enqueue_graph(tasks, [[] for _ in tasks])

    async def enqueue_graph(
        self, tasks: Sequence[NewTask], after: Sequence[Sequence[int]], *, new_document: str | None = None
    ) -> list[int]:
        """Enqueue tasks that may also depend on each other, all in one transaction.

        ``after[i]`` lists indices into ``tasks`` that task ``i`` waits for (on top of its own
        ``depends_on`` ids of existing tasks).  Everything is validated before anything is
        written; a bad task refuses the whole batch.  With ``new_document``, the batch starts that
        document: :class:`DocumentTaken` if a task already has it, decided in the same
        transaction, so two concurrent submissions of one id cannot both succeed.
        """
        if len(after) != len(tasks):
            raise InvalidTask("after must have one entry per task")
        prepared = [_validate(t, self.max_payload_bytes) for t in tasks]
        if not prepared:
            return []
        for i, local in enumerate(after):
            for j in local:
                if not isinstance(j, int) or not 0 <= j < len(tasks) or j == i:
                    raise InvalidTask(f"task {i}: local dependency index {j!r} is out of range")
            prepared[i].local_deps = sorted(set(local))
        _check_acyclic(prepared)
        existing = sorted({d for p in prepared for d in p.existing_deps})
        any_local = any(p.local_deps for p in prepared)

        if not existing and not any_local and new_document is None:
            row = await self.db.fetchrow("insert_tasks", *self._insert_args(prepared, None, {}))
            assert row is not None
            return list(row["ids"])
        async with self.db.transaction() as tx:
            if new_document is not None:
                await tx.execute("lock_document", new_document)
                if await tx.fetchval("document_exists", new_document):
                    raise DocumentTaken(f"deck {new_document!r} already exists")
            status: dict[int, str] = {}
            if existing:
                rows = await tx.fetch("lock_dependencies", existing)
                status = {r["id"]: r["status"] for r in rows}
                missing = [d for d in existing if d not in status]
                if missing:
                    raise InvalidTask(f"dependency task(s) not found: {', '.join(map(str, missing))}")
                bad = [
                    f"{r['id']} ({r['task_type']}) is {r['status']}"
                    for r in rows
                    if r["status"] in _FAILED_STATUSES
                ]
                if bad:
                    raise InvalidTask(f"cannot depend on a task that will never be done: {'; '.join(bad)}")
            ids = await tx.fetchval("reserve_task_ids", len(prepared))
            row = await tx.fetchrow("insert_tasks", *self._insert_args(prepared, list(ids), status))
            assert row is not None
            return list(row["ids"])

    def _insert_args(
        self, prepared: list[_Prepared], ids: list[int] | None, dep_status: dict[int, str]
    ) -> list[Any]:
        pending: list[int] = []
        edge_task: list[int] = []
        edge_dep: list[int] = []
        for i, p in enumerate(prepared):
            n = sum(1 for d in p.existing_deps if dep_status.get(d) != "done") + len(p.local_deps)
            pending.append(n)
            if ids is not None:
                for d in p.existing_deps:
                    edge_task.append(ids[i])
                    edge_dep.append(d)
                for j in p.local_deps:
                    edge_task.append(ids[i])
                    edge_dep.append(ids[j])
        return [
            [p.task_type for p in prepared],
            [p.pool for p in prepared],
            [p.document_id for p in prepared],
            [p.payload for p in prepared],
            [p.priority.value for p in prepared],
            [p.max_attempts for p in prepared],
            pending,
            ids if ids is not None else [None] * len(prepared),
            edge_task,
            edge_dep,
            _heights(prepared),
        ]

    # ------------------------------------------------------------------ worker side

    async def claim(
        self, pool: str, server_id: str, n: int, *, lease_s: float | None = None
    ) -> list[ClaimedTask]:
        """Claim up to ``n`` claimable tasks of ``pool``: critical, high, normal; then the deck
        submitted first; then the task with the longest chain of dependents; then oldest first."""
        if n <= 0:
            return []
        lease = self.lease_s if lease_s is None else lease_s
        rows = await self.db.fetch("claim_tasks", pool, server_id, n, float(lease))
        out = [
            ClaimedTask(
                id=r["id"],
                task_type=r["task_type"],
                pool=r["pool"],
                document_id=r["document_id"],
                payload=r["payload"],
                priority=Priority(r["priority"]),
                attempts=r["attempts"],
                max_attempts=r["max_attempts"],
                depends_on=list(r["depends_on"]),
                lease_expires_at=r["lease_expires_at"],
                queue_wait_s=max(0.0, r["queue_wait_s"]) if r["queue_wait_s"] is not None else None,
            )
            for r in rows
        ]
        # RETURNING has no order: hand them to the worker in claim order.
        order = {Priority.critical: 0, Priority.high: 1, Priority.normal: 2}
        rank = {r["id"]: (r["created_at"], -r["height"]) for r in rows}
        out.sort(key=lambda t: (order[t.priority], *rank[t.id], t.id))
        return out

    async def extend_leases(
        self,
        server_id: str,
        *,
        lease_s: float | None = None,
        task_ids: Sequence[int] | None = None,
        ending_within_s: float | None = None,
    ) -> int:
        """Push back the lease of the tasks ``server_id`` holds; returns how many.

        ``task_ids``: only these (the tasks the worker is really still working on).  A worker that
        gave up on a task — say its completion could not be written — must not keep that task's
        lease alive, or the reaper would never hand it to someone else.  ``ending_within_s``: only
        leases that run out within that many seconds (a heartbeat then writes a task row every few
        beats instead of every beat)."""
        return len(
            await self.renew_leases(
                server_id, lease_s=lease_s, task_ids=task_ids, ending_within_s=ending_within_s
            )
        )

    async def renew_leases(
        self,
        server_id: str,
        *,
        lease_s: float | None = None,
        task_ids: Sequence[int] | None = None,
        ending_within_s: float | None = None,
    ) -> set[int]:
        """:meth:`extend_leases`, returning the ids whose lease it pushed back (a row being
        completed or failed right now is skipped, not waited for)."""
        lease = self.lease_s if lease_s is None else lease_s
        rows = await self.db.fetch(
            "extend_leases",
            server_id,
            float(lease),
            None if task_ids is None else list(task_ids),
            None if ending_within_s is None else float(ending_within_s),
        )
        return {r["id"] for r in rows}

    async def progress(self, task_id: int, server_id: str, percent: float, message: str = "") -> bool:
        pct = 0.0 if math.isnan(percent) else min(100.0, max(0.0, float(percent)))
        return await self.db.execute("report_progress", task_id, server_id, pct, message[:_MAX_TEXT]) == 1

    async def complete(self, task_id: int, server_id: str, result: dict[str, Any]) -> bool:
        """Mark done and release dependents; False if ``server_id`` no longer holds the task."""
        return bool(await self.complete_many(server_id, [(task_id, result)]))

    async def complete_many(self, server_id: str, items: Iterable[tuple[int, dict[str, Any]]]) -> list[int]:
        """Complete a batch in one round trip; returns the ids actually completed."""
        ids: list[int] = []
        results: list[dict[str, Any]] = []
        for task_id, result in items:
            try:
                # Refuse a result that cannot be stored here, naming the task, rather than as an
                # encoding error of the whole batch from the driver.
                json.dumps(result, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise QueueError(f"result of task {task_id} is not JSON-serializable: {exc}") from None
            ids.append(task_id)
            results.append(result)
        if not ids:
            return []
        rows = await self.db.fetch("complete_tasks", ids, results, server_id)
        return [r["id"] for r in rows]

    async def fail(self, task_id: int, server_id: str, error: str, *, retryable: bool = True) -> TaskStatus:
        """Record a failure.  Retryable: queued again after a jittered exponential backoff, or
        ``dead`` once attempts are used up; not retryable: ``failed``.  A final failure fails the
        task's dependents.  If ``server_id`` no longer holds the task nothing changes and its
        current status is returned."""
        async with self.db.transaction() as tx:
            status = await tx.fetchval(
                "fail_task",
                task_id,
                server_id,
                error[:_MAX_TEXT],
                retryable,
                float(self.retry_base_s),
                float(self.retry_max_s),
            )
            if status is None:
                current = await tx.fetchval("task_status", task_id)
                if current is None:
                    raise QueueError(f"task {task_id} not found")
                return TaskStatus(current)
            if status in _FAILED_STATUSES:
                await tx.execute("fail_dependents", [task_id])
            return TaskStatus(status)

    async def release(self, task_id: int, server_id: str) -> bool:
        """Hand a held task back (drain) without spending an attempt."""
        return int(await self.db.fetchval("release_task", task_id, server_id) or 0) == 1

    async def release_all(self, server_id: str) -> int:
        """Hand back everything ``server_id`` holds, without spending attempts."""
        return int(await self.db.fetchval("release_server_tasks", server_id) or 0)

    async def cancel(self, task_id: int) -> bool:
        """Cancel a task that has not finished; its dependents fail.  False if already final."""
        async with self.db.transaction() as tx:
            done = await tx.fetchval("cancel_task", task_id)
            if done is None:
                return False
            await tx.execute("fail_dependents", [task_id])
            return True

    async def reap_expired(self) -> int:
        """Tasks whose lease ran out go back to ``queued`` (or ``dead`` when attempts are used
        up, failing their dependents); returns how many were reaped."""
        reaped = await self._requeue("requeue_expired")
        await self.compact_counts()
        return reaped

    async def _requeue(self, name: str, *args: Any) -> int:
        """Run a requeue statement (``requeue_expired``, ``requeue_server_tasks``) and fail the
        dependents of the tasks it sent to ``dead``, in one transaction."""
        async with self.db.transaction() as tx:
            rows = await tx.fetch(name, *args)
            dead = [r["id"] for r in rows if r["status"] == "dead"]
            if dead:
                await tx.execute("fail_dependents", dead)
            return len(rows)

    # ------------------------------------------------------------------ reads

    async def finished_since(self, after: datetime, *, limit: int = 5000) -> list[dict[str, Any]]:
        """Tasks that finished (done, failed, dead) after ``after``, oldest first, with their queue
        wait and the duration of their last attempt — for fleet-wide timing metrics."""
        return [dict(r) for r in await self.db.fetch("finished_since", after, limit)]

    async def database_now(self) -> datetime:
        """The database server's clock (timing windows must not mix clocks)."""
        value: datetime = await self.db.fetchval("database_now")
        return value

    async def snapshot(self) -> tuple[dict[str, PoolStats], WorkDetail]:
        """:meth:`stats` and :meth:`work_detail` from one statement: one round trip and one
        snapshot of the queue (the controller reads both every tick)."""
        row = await self.db.fetchrow("queue_snapshot", True)
        assert row is not None
        return _stats_of(row), _work_detail_of(row)

    async def work_detail(self) -> WorkDetail:
        """What the controller needs to estimate each pool's work: claimable tasks per type (from
        the counters, minus those in retry backoff), the running tasks with how long they have run
        and their progress, the blocked tasks with their unfinished dependencies (by id, so the
        observation can follow chains of stages), each with its deck's age, and per pool the age of
        the oldest deck with a claimable task.  Cost: the counters plus the running and blocked rows
        (bounded by the replicas' slots and the decks in flight), never the whole queue."""
        return (await self.snapshot())[1]

    async def running_by_server(self) -> dict[str, int]:
        """Tasks running per lease owner (server id): who is busy right now, fresher than the
        load a worker last reported in its heartbeat."""
        return {r["lease_owner"]: int(r["n"]) for r in await self.db.fetch("running_by_server")}

    async def get_task(self, task_id: int) -> dict[str, Any] | None:
        row = await self.db.fetchrow("get_task", task_id)
        if row is None:
            return None
        return _task_row(row)

    async def watch_task(self, task_id: int) -> dict[str, Any] | None:
        """:meth:`get_task`, and ask for ``NOTIFY gpuscale_finished`` when the task finishes: only
        the tasks someone waits on notify (each NOTIFY serialises its commit with every other)."""
        row = await self.db.fetchrow("watch_task", task_id)
        if row is None:  # finished already (or no such task): nothing to watch
            return await self.get_task(task_id)
        return _task_row(row)

    async def tasks_for_document(self, document_id: str) -> list[dict[str, Any]]:
        return [dict(r) for r in await self.db.fetch("tasks_for_document", document_id)]

    async def documents_in_use(self) -> set[str]:
        """The document names that some task's payload holds (the document store keeps them)."""
        return {r["document"] for r in await self.db.fetch("documents_in_use")}

    async def document_tasks(self, document_id: str) -> list[dict[str, Any]]:
        """Every task of a document with all its columns (payload and result decoded), by id."""
        return [_task_row(r) for r in await self.db.fetch("document_tasks", document_id)]

    async def list_tasks(
        self,
        *,
        document_id: str | None = None,
        status: str | None = None,
        after_id: int = 0,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """A page of tasks by ascending id (keyset paging: pass the last id as ``after_id``),
        without payload and result."""
        rows = await self.db.fetch("list_tasks", document_id, status, after_id, limit)
        return [dict(r) for r in rows]

    async def cancel_document(self, document_id: str) -> int:
        """Cancel every unfinished task of a document in one transaction; returns how many."""
        async with self.db.transaction() as tx:
            ids = await tx.fetch("cancel_document_tasks", document_id)
            if ids:
                # Dependents elsewhere (another document's tasks) fail with a reason.
                await tx.execute("fail_dependents", [r["id"] for r in ids])
            return len(ids)

    async def dependency_results(self, task_id: int) -> list[dict[str, Any]]:
        rows = await self.db.fetch("dependency_results", task_id)
        return [
            {"id": r["id"], "task_type": r["task_type"], "payload": r["payload"], "result": r["result"]}
            for r in rows
        ]

    async def stats(self) -> dict[str, PoolStats]:
        """Per-pool counts from the counters table (cost independent of the table's size)."""
        row = await self.db.fetchrow("queue_snapshot", False)  # the counts alone
        assert row is not None
        return _stats_of(row)

    async def depth(self, pool: str, cap: int) -> int:
        """Claimable tasks in ``pool``, at most ``cap``: counters minus tasks in retry backoff."""
        return int(await self.db.fetchval("depth", pool, cap) or 0)

    async def depth_by_scan(self, pool: str) -> int:
        """The same number as :meth:`depth` without a cap, by counting rows: the slow way, kept
        for benchmarks to compare against and for tests to check the counters."""
        return int(await self.db.fetchval("depth_by_scan", pool) or 0)

    async def purge_pool(self, pool: str) -> int:
        """Delete every task of ``pool`` (benchmarks' scratch pool); returns how many."""
        async with self.db.transaction() as tx:
            return await tx.execute("purge_pool", pool)

    async def purge_done(self, *, older_than_s: float, batch: int = 10_000) -> int:
        """Delete up to ``batch`` ``done`` tasks that finished more than ``older_than_s`` ago;
        returns how many.  Failed, dead and cancelled tasks stay: they are the dead letters ops
        look into.  A done task that an unfinished task still depends on is kept, since its
        result is that task's input."""
        return await self.db.execute("purge_done", float(older_than_s), batch)

    async def history_since(self, since: datetime) -> list[dict[str, Any]]:
        """Completed tasks submitted at or after ``since``, from the compact history that outlives
        the retention of done tasks (oldest submission first)."""
        return [dict(r) for r in await self.db.fetch("history_since", since)]

    async def purge_history(self, *, older_than_s: float, batch: int = 10_000) -> int:
        """Delete up to ``batch`` history rows of tasks submitted more than ``older_than_s`` ago."""
        return await self.db.execute("purge_history", float(older_than_s), batch)

    async def vacuum(self) -> None:
        """``VACUUM (ANALYZE)`` the queue tables: after a big purge, so the next claims do not
        walk dead index entries.  Autovacuum does this in a long-running deployment; short-lived
        processes on the embedded server (benchmarks) stop it before autovacuum gets a turn."""
        await self.compact_counts()
        await self.db.execute("vacuum_queue")

    async def compact_counts(self) -> int:
        """Fold the per-connection counter shards together (also done by :meth:`reap_expired`)."""
        return int(await self.db.fetchval("compact_counts") or 0)

    # ------------------------------------------------------------------ server registry

    async def register_server(self, info: ServerInfo) -> None:
        """Insert or refresh a server's row (status ``starting`` or ``active``)."""
        if info.status not in ("starting", "active"):
            raise QueueError(f"a server registers as starting or active, not {info.status!r}")
        await self.db.execute(
            "register_server",
            info.id,
            f"{info.pool}_container"[:50],
            info.pool,
            info.container_id,
            info.status,
            info.capabilities,
            info.current_load,
            info.max_concurrent_tasks,
            list(info.models),
            info.version,
            info.started_at,
        )

    async def server_heartbeat(self, server_id: str, *, current_load: int, status: str | None = None) -> bool:
        """Refresh a heartbeat; False if the server is unknown or was declared dead (its tasks
        have been handed back, so it should stop and register again)."""
        if status is not None and status not in SERVER_STATUSES:
            raise QueueError(f"unknown server status {status!r}")
        return await self.db.execute("server_heartbeat", server_id, current_load, status) == 1

    async def set_server_status(self, server_id: str, status: str) -> None:
        if status not in SERVER_STATUSES:
            raise QueueError(f"unknown server status {status!r}; use one of {', '.join(SERVER_STATUSES)}")
        await self.db.execute("set_server_status", server_id, status)

    async def deregister_server(self, server_id: str) -> None:
        """Remove a server; anything it still holds goes back to the queue without an attempt spent."""
        await self.release_all(server_id)
        await self.db.execute("delete_server", server_id)

    async def list_servers(self, pool: str | None = None, *, include_dead: bool = False) -> list[ServerInfo]:
        rows = await self.db.fetch("list_servers", pool, include_dead)
        return [
            ServerInfo(
                id=r["id"],
                pool=r["pool"],
                container_id=r["container_id"],
                status=r["status"],
                capabilities=r["capabilities"] or {},
                current_load=r["current_load"],
                max_concurrent_tasks=r["max_concurrent_tasks"],
                models=list(r["models"]),
                version=r["version"],
                last_heartbeat=r["last_heartbeat"],
                started_at=r["started_at"],
            )
            for r in rows
        ]

    async def purge_dead_servers(self, *, older_than_s: float) -> int:
        """Delete registry rows of servers declared dead more than ``older_than_s`` ago."""
        return await self.db.execute("purge_dead_servers", float(older_than_s))

    async def reap_dead_servers(self, timeout_s: float) -> list[str]:
        """Servers silent for ``timeout_s`` become ``dead``; their tasks go back to the queue
        (the interrupted attempt counts, so a task that keeps killing servers ends ``dead``)."""
        rows = await self.db.fetch("mark_silent_servers_dead", float(timeout_s))
        ids = [r["id"] for r in rows]
        if ids:
            await self._requeue("requeue_server_tasks", ids)
        return ids

    def listener(self, callback: Callable[[str], None], **kw: Any) -> Listener:
        """``LISTEN gpuscale_work``: ``callback(pool)`` runs whenever claimable work appears in a
        pool; run the returned listener's ``run()`` in a task of its own (``kw``: see
        :class:`~gpuscale.db.Listener`)."""
        return self.db.listener(NOTIFY_CHANNEL, callback, **kw)


def _stats_of(row: Any) -> dict[str, PoolStats]:
    """Per-pool counts from a ``queue_snapshot`` row."""
    counts, blocked_ready, ages = row["counts"], row["blocked_ready"], row["ages"]
    backoff: dict[tuple[str, str], int] = {}
    for r in row["backoff"]:
        key = (r["pool"], r["priority"])
        backoff[key] = backoff.get(key, 0) + int(r["n"])
    out: dict[str, PoolStats] = {}

    def get(pool: str) -> PoolStats:
        if pool not in out:
            out[pool] = PoolStats(pool, {p: 0 for p in Priority}, 0, 0, 0, 0, None, 0, 0, 0, 0)
        return out[pool]

    for r in counts:
        s_ = get(r["pool"])
        n = int(r["n"])
        st = r["status"]
        if st == "queued":
            s_.queued[Priority(r["priority"])] += n
        elif st in ("running", "blocked", "done", "failed", "dead", "cancelled"):
            setattr(s_, st, getattr(s_, st) + n)
    for (pool, priority), n in backoff.items():
        s_ = get(pool)
        pr = Priority(priority)
        s_.queued[pr] = max(0, s_.queued[pr] - n)
        s_.waiting_backoff += n
    for r in blocked_ready:
        get(r["pool"]).blocked_on_running = int(r["n"])
    for r in ages:
        if r["age"] is not None:
            get(r["pool"]).oldest_queued_age_s = max(0.0, float(r["age"]))
    return out


def _work_detail_of(row: Any) -> WorkDetail:
    """The controller's view of each pool's work from a ``queue_snapshot`` row."""
    counts, running, blocked, decks = row["by_type"], row["running"], row["blocked"], row["decks"]
    backoff: dict[tuple[str, str], int] = {}
    for r in row["backoff"]:
        key = (r["pool"], r["task_type"])
        backoff[key] = backoff.get(key, 0) + int(r["n"])
    by_type: dict[tuple[str, str], int] = {}
    for r in counts:
        by_type[(r["pool"], r["task_type"])] = int(r["n"])
    for key, n in backoff.items():
        by_type[key] = max(0, by_type.get(key, 0) - n)
    run = [
        RunningRow(
            r["pool"],
            r["task_type"],
            max(0.0, float(r["elapsed_s"] or 0.0)),
            float(r["progress"]) / 100.0 if r["progress"] else None,
            r["lease_owner"],
            id=r["id"],
            deck_age_s=max(0.0, float(r["deck_age_s"] or 0.0)),
        )
        for r in running
    ]
    tasks: dict[int, BlockedRow] = {}
    for r in blocked:
        tid = r["id"]
        task = tasks.setdefault(
            tid,
            BlockedRow(
                r["pool"], r["task_type"], [], id=tid, deck_age_s=max(0.0, float(r["deck_age_s"] or 0.0))
            ),
        )
        # A blocked dependency is named by id: the observation follows the chain to its ETA.
        task.deps.append(
            RunningRow(
                r["dep_pool"],
                r["dep_type"],
                max(0.0, float(r["dep_elapsed_s"] or 0.0)),
                float(r["dep_progress"]) / 100.0 if r["dep_progress"] else None,
                r["dep_server"],
                r["dep_status"],
                id=r["dep_id"],
            )
        )
    return WorkDetail(
        queued_by_type=by_type,
        running=run,
        blocked=list(tasks.values()),
        oldest_deck_age_s={r["pool"]: max(0.0, float(r["age"])) for r in decks if r["age"] is not None},
    )


def _task_row(row: Any) -> dict[str, Any]:
    out = dict(row)
    out["depends_on"] = list(out["depends_on"])
    return out


def _heights(prepared: list[_Prepared]) -> list[int]:
    """Per task, the longest chain of dependents after it within the batch (the claim order puts
    a deck's critical path first).  The batch is acyclic (checked before)."""
    dependents: list[list[int]] = [[] for _ in prepared]
    for i, p in enumerate(prepared):
        for j in p.local_deps:
            dependents[j].append(i)
    height: dict[int, int] = {}

    def of(i: int) -> int:
        stack = [i]
        while stack:
            k = stack[-1]
            todo = [j for j in dependents[k] if j not in height]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            height[k] = max((height[j] + 1 for j in dependents[k]), default=0)
        return height[i]

    return [of(i) for i in range(len(prepared))]


def _check_acyclic(prepared: list[_Prepared]) -> None:
    """Local dependencies must form a DAG (an edge to a later index is fine if there is no cycle)."""
    state = [0] * len(prepared)  # 0 new, 1 visiting, 2 done

    def visit(i: int) -> None:
        stack = [(i, iter(prepared[i].local_deps))]
        state[i] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
            elif state[nxt] == 1:
                raise InvalidTask(f"dependency cycle through batch index {nxt}")
            elif state[nxt] == 0:
                state[nxt] = 1
                stack.append((nxt, iter(prepared[nxt].local_deps)))

    for i in range(len(prepared)):
        if state[i] == 0:
            visit(i)
