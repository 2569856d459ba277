"""Leader election with a PostgreSQL advisory lock held on a dedicated connection.

Several controllers may run; the one holding the lock acts, the others stand by and keep trying.
The lock lives as long as its session, so a leader whose process dies (or whose connection breaks)
loses it at once and a standby takes over on its next attempt.  A leader re-checks its connection
before every tick; when the check fails it steps down immediately — it never acts on a lock it may
no longer hold.
"""

from __future__ import annotations

import asyncio
import logging

from gpuscale.controller.metrics import LEADER
from gpuscale.db.connector import DATABASE_ERRORS, Connector, DedicatedSession

log = logging.getLogger(__name__)

LEADER_LOCK_KEY = 0x6770_7573_6C64  # "gpusld"


class LeaderElector:
    def __init__(self, dsn: str, *, key: int = LEADER_LOCK_KEY, check_timeout_s: float = 2.0) -> None:
        self._db = Connector(dsn)  # only for a dedicated connection: the lock lives on it
        self._key = key
        self._timeout = check_timeout_s
        self._conn: DedicatedSession | None = None
        self._lock = asyncio.Lock()
        self.is_leader = False

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        was = self.is_leader
        self.is_leader = False
        LEADER.set(0)
        if conn is not None:
            try:
                conn.terminate()
            except Exception:  # pragma: no cover - connection already gone
                pass
        if was:
            log.warning("leader: stepped down (lost the database connection)")

    async def ensure(self) -> bool:
        """Acquire or confirm leadership; returns whether this process may act now."""
        async with self._lock:
            try:
                if self._conn is None or self._conn.is_closed():
                    if self.is_leader:
                        await self._drop()
                    self._conn = await self._db.dedicated(timeout_s=self._timeout)
                if self.is_leader:
                    # The session (and with it the lock) must still be alive.
                    await self._conn.fetchval("ping", timeout_s=self._timeout)
                    return True
                got = await self._conn.fetchval("try_leader_lock", self._key, timeout_s=self._timeout)
            except DATABASE_ERRORS as exc:
                log.debug("leader check failed: %s", type(exc).__name__)
                await self._drop()
                return False
            if got:
                self.is_leader = True
                LEADER.set(1)
                log.info("leader: acquired the leader lock")
            return bool(got)

    async def release(self) -> None:
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                try:
                    if self.is_leader:
                        await self._conn.execute("release_leader_lock", self._key)
                    await self._conn.close(timeout_s=self._timeout)
                except DATABASE_ERRORS:
                    pass
            self._conn = None
            if self.is_leader:
                log.info("leader: released the leader lock")
            self.is_leader = False
            LEADER.set(0)
