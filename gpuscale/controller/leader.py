"""Leader election with a lease in PostgreSQL, in the manner of client-go's leader election.

Several controllers may run; the one holding the lease acts, the others stand by.  The lease is a
row (``controller_lease``: holder, generation, renewed_at, duration) that the leader renews every
*retry period*.  Three times govern it (client-go's names and defaults: 15 s / 10 s / 2 s):

* **lease duration** — a term ends this long after its last renewal, by the database's clock;
  only then (or after a release) may a standby take the lease, starting a new term with the next
  *generation*;
* **renew deadline** — a leader that has not renewed for this long stops acting, by its own
  monotonic clock, counted from when it *sent* its last successful renewal.  The deadline is
  shorter than the lease, so a leader stops before its lease can expire: a frozen process (SIGSTOP,
  a stalled event loop, a VM pause) wakes up no longer leading and acts on nothing;
* **retry period** — how often the leader renews and a standby tries to take the lease.

Holding the lease is not enough to act: every provider action is *fenced* (:meth:`may_act`).  Right
before each call the leader checks, in the database, that its term (the generation) is still the
current, unexpired one, and then, synchronously, that its renew deadline has not passed.  Any error
while checking means "not leader, don't act".

Unlike a session-scoped advisory lock, the lease does not depend on one connection: a leader whose
connection breaks reconnects and renews on the next try; it loses the lease only when it cannot
renew within the renew deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gpuscale.controller.metrics import LEADER
from gpuscale.db.connector import Connector, DedicatedSession

log = logging.getLogger(__name__)

LEASE_NAME = "controller"
JITTER = 1.2  # a standby waits retry_period × [1, 1.2) between tries, so standbys do not go in step


class LeaseElector:
    """Acquires, renews, fences and releases the lease for one controller process."""

    def __init__(
        self,
        db: Connector,
        identity: str,
        *,
        name: str = LEASE_NAME,
        lease_duration_s: float = 15.0,
        renew_deadline_s: float = 10.0,
        retry_period_s: float = 2.0,
        on_stopped_leading: Callable[[], Awaitable[Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < renew_deadline_s < lease_duration_s:
            raise ValueError("the renew deadline must be positive and shorter than the lease duration")
        if not 0 < retry_period_s * JITTER < renew_deadline_s:
            raise ValueError("the retry period (× 1.2) must be positive and shorter than the renew deadline")
        self._db = db
        self.identity = identity
        self.name = name
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self.retry_period_s = retry_period_s
        self._on_stopped = on_stopped_leading
        self._clock = clock
        self._conn: DedicatedSession | None = None
        self._lock = asyncio.Lock()  # one attempt (renew or acquire) at a time
        self._conn_lock = asyncio.Lock()  # one statement at a time on the lease's connection
        # The fence check in flight, shared by every call that asks while it is (see may_act).
        self._check: asyncio.Future[Any] | None = None
        self._check_gen: int | None = None
        self.generation: int | None = None  # the term this process holds, if any
        self._valid_until = float("-inf")  # local monotonic: renew deadline of the last renewal
        self._resigning = False
        self.transitions = 0  # terms started by this process

    # ------------------------------------------------------------------ state

    @property
    def is_leader(self) -> bool:
        """Whether this process leads *now*: it holds a term and its renew deadline has not passed.

        Read at the moment it is asked (``/readyz``, the ``gpuscale_leader`` gauge), so a process
        that wakes from a freeze answers "standby" before it has run a single line of its loop."""
        return self.generation is not None and self._clock() < self._valid_until

    def seconds_left(self) -> float:
        """How long this process may still act without a new renewal (0 when not leading)."""
        return max(0.0, self._valid_until - self._clock()) if self.generation is not None else 0.0

    # ------------------------------------------------------------------ database

    async def _fetchval(self, name: str, *args: Any, timeout_s: float) -> Any:
        """Run a lease statement on the lease's own connection (renewals and fence checks never
        queue behind the reconciler's statements), reconnecting when it is gone; on any error the
        connection is dropped and the error raised."""
        async with self._conn_lock:
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await self._db.dedicated(timeout_s=timeout_s)
                return await asyncio.wait_for(self._conn.fetchval(name, *args), timeout_s)
            except BaseException:
                self._drop_connection()
                raise

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.terminate()

    # ------------------------------------------------------------------ acquire / renew

    async def try_acquire_or_renew(self) -> bool:
        """One attempt: renew the term this process holds, or take a free lease.  Returns
        :attr:`is_leader` afterwards.  Never raises for a database problem: that is a failed try."""
        async with self._lock:
            if self._resigning:
                return False
            sent = self._clock()  # the renew deadline counts from before the request left
            gen = self.generation
            try:
                if gen is not None and self.is_leader:
                    budget = max(0.05, min(self.retry_period_s, self._valid_until - sent))
                    row = await self._fetchval(
                        "lease_renew", self.name, self.identity, gen, self.lease_duration_s, timeout_s=budget
                    )
                    if row == gen:
                        self._valid_until = sent + self.renew_deadline_s
                        return self.is_leader
                    log.warning("leader: term %d of the lease is over (taken or expired)", gen)
                    await self._stop_leading()
                elif gen is not None:
                    # The renew deadline passed without a renewal: this term is over for us.
                    await self._stop_leading()
                new = await self._fetchval(
                    "lease_acquire",
                    self.name,
                    self.identity,
                    self.lease_duration_s,
                    timeout_s=self.retry_period_s,
                )
            except Exception as exc:  # any failure to check is a failed try, never "still leader"
                log.debug("leader: lease attempt failed: %s", type(exc).__name__)
                if self.generation is not None and not self.is_leader:
                    await self._stop_leading()
                return self.is_leader
            if new is None:
                return False
            self.generation = int(new)
            self._valid_until = sent + self.renew_deadline_s
            self.transitions += 1
            log.info("leader: acquired the lease (term %d)", self.generation)
            return self.is_leader

    async def ensure(self) -> bool:
        """Acquire or confirm leadership now; whether this process may act."""
        return await self.try_acquire_or_renew()

    async def _stop_leading(self) -> None:
        gen, self.generation = self.generation, None
        self._valid_until = float("-inf")
        if gen is None:
            return
        log.warning("leader: stopped leading (term %d)", gen)
        if self._on_stopped is not None:
            try:
                await self._on_stopped()
            except Exception:
                log.exception("leader: cleaning up after losing the lease failed")

    async def run(self, stop: asyncio.Event) -> None:
        """Renew (as leader) or try to acquire (as standby) every retry period until ``stop``."""
        while not stop.is_set():
            await self.try_acquire_or_renew()
            wait = self.retry_period_s
            if not self.is_leader:
                wait *= 1 + random.random() * (JITTER - 1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    # ------------------------------------------------------------------ fencing

    async def may_act(self) -> bool:
        """The fence before every provider action: the term is still ours in the database, and
        the renew deadline has not passed.  Any error means no.

        Calls that ask while a check is already on its way share its round trip: a tick observes
        every deployment side by side, and one ``lease_check`` per call, one at a time on the
        lease's connection, made the tick grow by a round trip per deployment.  A shared answer
        was sent at most one round trip before the caller asked; the term cannot pass to another
        controller in that time without this one's renew deadline passing first (it is shorter
        than the lease), and each caller checks that deadline itself right after (below)."""
        gen = self.generation
        if self._resigning or gen is None or not self.is_leader:
            return False
        try:
            row = await asyncio.shield(self._shared_check(gen))
        except Exception as exc:
            log.debug("leader: fence check failed: %s", type(exc).__name__)
            return False
        # Checked again after the round trip, with no await in between and the provider call: a
        # process frozen during the check wakes up past its deadline and is refused here.
        return row == gen and self.generation == gen and self.is_leader and not self._resigning

    def _shared_check(self, gen: int) -> asyncio.Future[Any]:
        """The ``lease_check`` of term ``gen`` in flight, or a new one."""
        check = self._check
        if check is None or check.done() or self._check_gen != gen:
            check = asyncio.ensure_future(
                self._fetchval(
                    "lease_check",
                    self.name,
                    self.identity,
                    gen,
                    timeout_s=max(0.05, min(self.retry_period_s, self.seconds_left())),
                )
            )
            # Its error is each caller's to see; read here too, so one nobody waits for any more
            # (every caller cancelled) is not reported as never retrieved.
            check.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._check, self._check_gen = check, gen
        return check

    async def read(self) -> dict[str, Any] | None:
        """The lease as the database sees it (holder, term, expiry), for ops; None if unknown."""
        try:
            row = await asyncio.wait_for(self._db.fetchrow("lease_read", self.name), self.retry_period_s)
        except Exception as exc:
            log.debug("leader: cannot read the lease: %s", type(exc).__name__)
            return None
        if row is None:
            return {"holder": None, "generation": 0, "expired": True}
        left = row["renewed_at"].timestamp() + row["duration_s"] - row["now"].timestamp()
        return {
            "holder": row["holder"],
            "generation": row["generation"],
            "expired": bool(row["expired"]),
            "expires_in_s": round(left, 3),
            "duration_s": row["duration_s"],
        }

    # ------------------------------------------------------------------ release

    def resign(self) -> None:
        """Stop acting at once (shutdown); the lease is kept until :meth:`release`."""
        self._resigning = True

    async def release(self) -> None:
        """Give the lease back (after this process has stopped what it started), so a standby
        takes over at its next try instead of waiting for the lease to expire."""
        self._resigning = True
        async with self._lock:
            gen, self.generation = self.generation, None
            self._valid_until = float("-inf")
            if gen is not None:
                try:
                    await self._fetchval(
                        "lease_release", self.name, self.identity, gen, timeout_s=self.retry_period_s
                    )
                    log.info("leader: released the lease (term %d)", gen)
                except Exception as exc:
                    log.warning("leader: could not release the lease (%s); it expires", type(exc).__name__)
            async with self._conn_lock:
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        await self._conn.close(timeout_s=1.0)
                    self._conn = None


def export_leader_gauge(elector: LeaseElector) -> None:
    """``gpuscale_leader`` is read from the elector at scrape time, never from a stale value."""
    LEADER.set_function(lambda: 1.0 if elector.is_leader else 0.0)
