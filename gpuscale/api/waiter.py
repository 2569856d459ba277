"""Waking ``?wait`` requests when their task finishes: one LISTEN per API process.

The database sends ``NOTIFY gpuscale_finished, '<task id>'`` when a task reaches a final status
(migration 0030).  :class:`Finished` keeps one dedicated connection listening (reconnecting with
backoff after an outage) and sets the events of the requests waiting on that id.  A request
registers *before* it reads the task's status, so a task finishing in between is never missed;
while the listener is down, waits simply run to their timeout and answer 202.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import asyncpg

log = logging.getLogger(__name__)

CHANNEL = "gpuscale_finished"


class Finished:
    """Events per task id, set when the database says the task finished."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._waiting: dict[int, set[asyncio.Event]] = {}
        self.listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def watch(self, task_id: int) -> Iterator[asyncio.Event]:
        """An event set when ``task_id`` finishes; register before reading the task's status."""
        event = asyncio.Event()
        self._waiting.setdefault(task_id, set()).add(event)
        try:
            yield event
        finally:
            events = self._waiting.get(task_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiting[task_id]

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            task_id = int(str(payload))
        except ValueError:
            return
        for event in self._waiting.get(task_id, ()):
            event.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="api-listen")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        delay = 0.25
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=10)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, ev=lost: ev.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                self.listening.set()
                delay = 0.25
                # A connection that dies silently (a half-open socket) is found by a periodic ping.
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), 10.0)
                    if not lost.is_set():
                        await conn.fetchval("SELECT 1", timeout=5)
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning(
                    "api: LISTEN %s lost (%s); reconnecting in %.1fs", CHANNEL, type(exc).__name__, delay
                )
            finally:
                self.listening.clear()
                if conn is not None:
                    conn.terminate()
            # Waiters that registered during the outage may have missed their notification.
            for events in list(self._waiting.values()):
                for event in events:
                    event.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
