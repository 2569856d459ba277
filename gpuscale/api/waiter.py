"""Waking ``?wait`` requests when their task finishes: one LISTEN per API process.

The database sends ``NOTIFY gpuscale_finished, '<task id>'`` when a task someone waits on
reaches a final status (migrations 0030 and 0060: the first read of a wait, ``Queue.watch_task``,
asks for it).  :class:`Finished` keeps one LISTEN of the database seam open (it reconnects
with backoff after an outage) and sets the events of the requests waiting on that id.  A request
registers *before* it reads the task's status, so a task finishing in between is never missed;
while the listener is down, waits simply run to their timeout and answer 202.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from gpuscale.db.connector import Listener

log = logging.getLogger(__name__)

CHANNEL = "gpuscale_finished"


class Finished:
    """Events per task id, set when the database says the task finished."""

    def __init__(self, dsn: str) -> None:
        self._waiting: dict[int, set[asyncio.Event]] = {}
        self._listener = Listener(dsn, CHANNEL, self._on_notify, on_state=self._on_state)
        self.listening = self._listener.listening
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

    def _on_notify(self, payload: str) -> None:
        try:
            task_id = int(payload)
        except ValueError:
            return
        for event in self._waiting.get(task_id, ()):
            event.set()

    def _on_state(self, listening: bool) -> None:
        if not listening:
            log.warning("api: LISTEN %s lost; reconnecting", CHANNEL)
            # Waiters that registered during the outage may miss their notification: wake them to
            # look at the task again.
            for events in list(self._waiting.values()):
                for event in events:
                    event.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._listener.run(), name="api-listen")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
