"""The database seam: the one class through which gpuscale talks to PostgreSQL.

:class:`Connector` owns the asyncpg connections (``self._conns``: "pool" means a work pool in
this project), registers the JSON codec on each of them once (``json``/``jsonb`` parameters and
columns are Python values everywhere else), runs the statements of :file:`queries.sql` by name,
hands out transactions and dedicated connections, and keeps one LISTEN connection alive across
outages (:class:`Listener`).  It also says, in one place, what "the database is unreachable"
means (:data:`UNREACHABLE`): every retry and every "hold on, the database is away" decision in the
controller and the worker uses that tuple.

No other module imports asyncpg, except the migrations runner for its own bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any

import asyncpg
import asyncpg.exceptions as pg_errors
import asyncpg.pool
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random

from gpuscale.common.settings import DatabaseAccess
from gpuscale.db.migrate import Migration, migrate, pending
from gpuscale.db.queries import sql

log = logging.getLogger(__name__)

# What "the database is unreachable" means: the connection is gone, cannot be made now, or broke
# half-way through an operation.  A PostgreSQL restart or failover raises any of these, depending
# on where each connection was caught: 57P01 (admin shutdown) ends sessions, 57P03 refuses new
# ones while the server starts or stops, a socket that dies mid-query surfaces as
# ConnectionDoesNotExistError or InterfaceError, and asyncpg's pool can trip over its own state
# machine while resetting a dying connection (InternalClientError "cannot switch to state").
UNREACHABLE: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    pg_errors.PostgresConnectionError,  # class 08, ConnectionDoesNotExistError among them
    pg_errors.AdminShutdownError,
    pg_errors.CrashShutdownError,
    pg_errors.CannotConnectNowError,
    pg_errors.TooManyConnectionsError,
)

# Anything a statement can raise because of the database: unreachable, or the server refused it.
DATABASE_ERRORS: tuple[type[Exception], ...] = (*UNREACHABLE, asyncpg.PostgresError)

# A value PostgreSQL cannot store (a NUL in a string, a number out of range): the input's fault.
INVALID_VALUE: type[Exception] = asyncpg.DataError

# The configuration is wrong (credentials, database name): no retry will help.
MISCONFIGURED: tuple[type[Exception], ...] = (
    pg_errors.InvalidAuthorizationSpecificationError,
    pg_errors.InvalidCatalogNameError,
)

# What a one-shot command reports as "cannot use the database" (no server there, or misconfigured).
CANNOT_USE: tuple[type[Exception], ...] = (OSError, *MISCONFIGURED)


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database is away (retry later), not that a statement is wrong."""
    return isinstance(exc, UNREACHABLE)


def _dumps(value: Any) -> str:
    # NaN and infinity are not JSON; PostgreSQL would refuse them anyway, later and less clearly.
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


async def init_connection(conn: asyncpg.Connection) -> None:
    """Per-connection setup: ``json`` and ``jsonb`` travel as Python values.

    Public so that tests which open their own asyncpg pool can get the same codec."""
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(typename, encoder=_dumps, decoder=json.loads, schema="pg_catalog")
    # asyncpg learns the array types it has no built-in codec for by running its type introspection
    # query (10-20 ms of planning on the server) the first time a statement uses one, once per
    # connection and type set.  Learning them all now, with one query at connect, keeps that off a
    # replica's first claim and first completion (and off a whole fleet's when it starts at once).
    await conn.prepare(sql("prime_array_codecs"))


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Release a shared connection without asyncpg's reset query (``pg_advisory_unlock_all(); CLOSE
    ALL; UNLISTEN *; RESET ALL``): a round trip after every statement, and nothing to undo, since
    shared connections never carry session state (LISTEN and session locks live on dedicated ones,
    migrations lock per transaction).  Behind a transaction pooler that query would even run on
    whatever server session comes next.  An open transaction is still rolled back by asyncpg."""


# asyncpg announces its encoding as ``'utf-8'`` (quoted, hyphenated); PostgreSQL reports it back as
# ``UTF8``.  PgBouncer compares the two spellings, finds them different, and sends
# ``SET client_encoding`` before every transaction it hands to a server connection: one more
# round trip per statement.  Asking for the server's own spelling (a later startup parameter wins)
# makes them match.
_SESSION_SETTINGS = {"client_encoding": "UTF8"}


class _OneTrip:
    """Statements in one round trip where named prepared statements cannot be used.

    With ``statement_cache_size=0`` (behind a transaction pooler such as PgBouncer 1.18, which
    keeps no prepared statements) asyncpg runs every statement in two round trips: Parse/Describe
    to learn its parameter and result types, then Parse/Bind/Execute again, since the next
    transaction may land on another server session.  The types never change for a given text on a
    given connection, so this keeps asyncpg's description of each statement per connection
    (unnamed, so it is parsed again on every execution, wherever it lands) and runs each later
    execution as one Parse/Bind/Execute/Sync: one round trip, as with a named statement.

    It uses asyncpg internals (``Connection._get_statement`` and ``Protocol.bind_execute``, what
    ``Connection.fetch`` itself calls); if those are missing, statements take the public path.
    """

    AVAILABLE = hasattr(asyncpg.Connection, "_get_statement")

    def __init__(self) -> None:
        # Per raw connection (a replaced connection drops its entry): statement text → description.
        self._states: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()

    async def run(
        self, conn: Any, query: str, args: tuple[Any, ...], timeout_s: float | None
    ) -> tuple[list[asyncpg.Record], str]:
        """Rows and command status of ``query`` on ``conn`` (a pool's connection)."""
        raw = getattr(conn, "_con", None) or conn
        states = self._states.setdefault(raw, {})
        state = states.get(query)
        if state is None or state.closed:
            # The first time: asyncpg's own Parse/Describe (and type introspection if needed).
            # Unnamed with the cache off, so it stays "unprepared": re-parsed at each execution.
            state = await raw._get_statement(query, timeout_s, use_cache=False)
            states[query] = state
        try:
            rows, status, _ = await raw._protocol.bind_execute(state, args, "", 0, True, timeout_s)
        except (pg_errors.OutdatedSchemaCacheError, pg_errors.InvalidCachedStatementError):
            # The statement's result changed shape (a migration): describe it afresh next time.
            states.pop(query, None)
            raise
        return rows, (status.decode() if isinstance(status, bytes) else str(status or ""))


def _rowcount(status: str) -> int:
    """Rows affected, from a command status such as ``UPDATE 3`` (0 when it carries no count)."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except (ValueError, IndexError):
        return 0


class Session:
    """Named statements on one connection: a transaction, or a connection held for a while."""

    def __init__(self, conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> None:
        self._conn = conn

    async def execute(self, name: str, *args: Any, timeout_s: float | None = None) -> int:
        """Run statement ``name``; returns how many rows it affected."""
        return _rowcount(await self._conn.execute(sql(name), *args, timeout=timeout_s))

    async def fetch(self, name: str, *args: Any, timeout_s: float | None = None) -> list[asyncpg.Record]:
        return await self._conn.fetch(sql(name), *args, timeout=timeout_s)

    async def fetchrow(self, name: str, *args: Any, timeout_s: float | None = None) -> asyncpg.Record | None:
        return await self._conn.fetchrow(sql(name), *args, timeout=timeout_s)

    async def fetchval(self, name: str, *args: Any, timeout_s: float | None = None) -> Any:
        return await self._conn.fetchval(sql(name), *args, timeout=timeout_s)


class DedicatedSession(Session):
    """A connection of its own, outside the shared set (a session-level lock lives on it)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        super().__init__(conn)
        self._own = conn

    def is_closed(self) -> bool:
        return self._own.is_closed()

    async def close(self, timeout_s: float = 5.0) -> None:
        await self._own.close(timeout=timeout_s)

    def terminate(self) -> None:
        """Drop the connection at once, without waiting for the server."""
        self._own.terminate()


class Connector:
    """The database of one process: a set of connections, named statements, LISTEN.

    ``min_connections``/``max_connections`` bound the shared set; ``listen_dsn`` lets LISTEN
    (and dedicated connections) bypass a transaction-pooling proxy such as PgBouncer, which
    cannot carry session state; ``statement_cache_size=0`` is what such a proxy needs too.
    """

    def __init__(
        self,
        dsn: str,
        *,
        min_connections: int = 1,
        max_connections: int = 10,
        listen_dsn: str | None = None,
        statement_cache_size: int = 100,
        command_timeout_s: float = 60.0,
        connect_timeout_s: float = 10.0,
        application_name: str | None = None,
    ) -> None:
        self.dsn = dsn
        self.listen_dsn = listen_dsn or dsn
        self.min_connections = min_connections
        self.max_connections = max_connections
        self.statement_cache_size = statement_cache_size
        self.command_timeout_s = command_timeout_s
        self.connect_timeout_s = connect_timeout_s
        # Shown in pg_stat_activity (a benchmark leaves its own connections out of its counts).
        self._server_settings = dict(_SESSION_SETTINGS)
        if application_name:
            self._server_settings["application_name"] = application_name
        self._conns: asyncpg.Pool | None = None
        self._owned = True
        # Behind a pooler (no statement cache): one round trip per statement (see _OneTrip).
        self._one = _OneTrip() if statement_cache_size == 0 and _OneTrip.AVAILABLE else None

    @classmethod
    def from_settings(
        cls, settings: DatabaseAccess, dsn: str, *, min_connections: int = 1, max_connections: int = 10
    ) -> Connector:
        """A connector with the deployment's database access settings (LISTEN URL, statement
        cache); the connection budget is the caller's."""
        return cls(
            dsn,
            min_connections=min_connections,
            max_connections=max_connections,
            listen_dsn=settings.listen_dsn(dsn),
            statement_cache_size=settings.database_statement_cache_size,
        )

    @classmethod
    def over(cls, conns: asyncpg.Pool) -> Connector:
        """A connector on an asyncpg pool opened elsewhere (tests); :meth:`close` leaves it open.

        Its connections should have been set up with :func:`init_connection`."""
        self = cls("")
        self._conns = conns
        self._owned = False
        return self

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> Connector:
        if self._conns is None:
            self._conns = await asyncpg.create_pool(
                self.dsn,
                min_size=self.min_connections,
                max_size=self.max_connections,
                command_timeout=self.command_timeout_s,
                timeout=self.connect_timeout_s,
                statement_cache_size=self.statement_cache_size,
                init=init_connection,
                reset=_keep_session,
                server_settings=self._server_settings,
            )
        return self

    async def close(self, timeout_s: float = 5.0) -> None:
        conns, self._conns = self._conns, None
        if conns is not None and self._owned:
            try:
                await asyncio.wait_for(conns.close(), timeout_s)
            except Exception:  # a pool closing during an outage may raise anything
                conns.terminate()

    async def __aenter__(self) -> Connector:
        return await self.open()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def _pool(self) -> asyncpg.Pool:
        if self._conns is None:
            raise asyncpg.InterfaceError("the connector is not open")
        return self._conns

    # ------------------------------------------------------------------ statements

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        """When the database turns out to be away, retire every idle connection: after a restart
        they are all dead, and without this each would fail once more before being replaced, so
        the process would stumble for a while after the database came back."""
        try:
            yield
        except UNREACHABLE:
            if self._conns is not None:
                with contextlib.suppress(Exception):
                    await self._conns.expire_connections()
            raise

    async def _one_trip(
        self, name: str, args: tuple[Any, ...], timeout_s: float | None
    ) -> tuple[list[asyncpg.Record], str]:
        assert self._one is not None
        async with self._guard(), self._pool.acquire() as conn:
            return await self._one.run(conn, sql(name), args, timeout_s)

    async def execute(self, name: str, *args: Any, timeout_s: float | None = None) -> int:
        """Run statement ``name``; returns how many rows it affected."""
        if self._one is not None:
            return _rowcount((await self._one_trip(name, args, timeout_s))[1])
        async with self._guard():
            return _rowcount(await self._pool.execute(sql(name), *args, timeout=timeout_s))

    async def fetch(self, name: str, *args: Any, timeout_s: float | None = None) -> list[asyncpg.Record]:
        if self._one is not None:
            return (await self._one_trip(name, args, timeout_s))[0]
        async with self._guard():
            return await self._pool.fetch(sql(name), *args, timeout=timeout_s)

    async def fetchrow(self, name: str, *args: Any, timeout_s: float | None = None) -> asyncpg.Record | None:
        if self._one is not None:
            rows = (await self._one_trip(name, args, timeout_s))[0]
            return rows[0] if rows else None
        async with self._guard():
            return await self._pool.fetchrow(sql(name), *args, timeout=timeout_s)

    async def fetchval(self, name: str, *args: Any, timeout_s: float | None = None) -> Any:
        if self._one is not None:
            rows = (await self._one_trip(name, args, timeout_s))[0]
            return rows[0][0] if rows else None
        async with self._guard():
            return await self._pool.fetchval(sql(name), *args, timeout=timeout_s)

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        """One shared connection for several statements (no transaction)."""
        async with self._guard(), self._pool.acquire() as conn:
            yield Session(conn)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Session]:
        """One transaction: committed when the block ends, rolled back when it raises."""
        async with self._guard(), self._pool.acquire() as conn, conn.transaction():
            yield Session(conn)

    async def dedicated(self, *, timeout_s: float | None = None) -> DedicatedSession:
        """A new connection outside the shared set; the caller closes it."""
        conn = await asyncpg.connect(
            self.listen_dsn,
            timeout=timeout_s or self.connect_timeout_s,
            statement_cache_size=self.statement_cache_size,
            server_settings=self._server_settings,
        )
        try:
            await init_connection(conn)
        except BaseException:
            conn.terminate()
            raise
        return DedicatedSession(conn)

    async def migrate(self) -> list[Migration]:
        """Apply pending migrations (see :mod:`gpuscale.db.migrate`)."""
        async with self._pool.acquire() as conn:
            return await migrate(conn)

    async def pending_migrations(self, *, timeout_s: float | None = None) -> list[Migration]:
        """The migrations this build knows that the database has not applied (health checks)."""
        async with self._pool.acquire(timeout=timeout_s) as conn:
            return await pending(conn)

    def listener(self, channel: str, callback: Callable[[str], None], **kw: Any) -> Listener:
        """A :class:`Listener` for ``channel`` on this database."""
        return Listener(self.listen_dsn, channel, callback, connect_timeout_s=self.connect_timeout_s, **kw)


class Listener:
    """``LISTEN channel`` on a connection of its own, kept open across outages.

    :meth:`run` connects, subscribes and calls ``callback(payload)`` for every notification (and
    ``on_state(True/False)`` when it starts or stops listening: notifications sent while it was
    down are lost, so a listener may want to look again); when
    the connection drops (or a periodic ping finds it silently broken) it reconnects with jittered
    exponential backoff, for as long as it runs.  :attr:`listening` is set while subscribed: a
    readiness signal (notifications sent before it is set are not seen; pollers cover that gap).
    Cancel the task running :meth:`run` to stop.
    """

    def __init__(
        self,
        dsn: str,
        channel: str,
        callback: Callable[[str], None],
        *,
        on_state: Callable[[bool], None] | None = None,
        listening: asyncio.Event | None = None,
        connect_timeout_s: float = 10.0,
        check_interval_s: float = 5.0,
        backoff_initial_s: float = 0.25,
        backoff_max_s: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self.channel = channel
        self._callback = callback
        self._on_state = on_state
        self._connect_timeout_s = connect_timeout_s
        self._check_interval_s = check_interval_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._conn: asyncpg.Connection | None = None
        self.listening = listening if listening is not None else asyncio.Event()
        self.connects = 0  # how many times LISTEN was (re)established

    def _wait(self) -> Any:
        """Exponential backoff with jitter, so listeners of many processes do not reconnect in step."""
        return wait_exponential(multiplier=self._backoff_initial_s, max=self._backoff_max_s) + wait_random(
            0, self._backoff_initial_s
        )

    def _on(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        self._callback(str(payload))

    async def _subscribe(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self._dsn, timeout=self._connect_timeout_s)
        try:
            await conn.add_listener(self.channel, self._on)
        except BaseException:
            conn.terminate()
            raise
        return conn

    def drop(self) -> None:
        """Cut the current connection (as an outage would); :meth:`run` reconnects."""
        if self._conn is not None:
            self._conn.terminate()

    async def run(self) -> None:
        try:
            while True:
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type(DATABASE_ERRORS), wait=self._wait(), reraise=True
                ):
                    with attempt:
                        n = attempt.retry_state.attempt_number
                        if n > 1:
                            log.debug("LISTEN %s: reconnecting (attempt %d)", self.channel, n)
                        self._conn = await self._subscribe()
                conn = self._conn
                assert conn is not None
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, ev=lost: ev.set())
                self.connects += 1
                self.listening.set()
                if self._on_state is not None:
                    self._on_state(True)
                try:
                    while not lost.is_set():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(lost.wait(), self._check_interval_s)
                        if not lost.is_set():
                            # Notice a connection that broke without telling us.
                            await conn.fetchval(sql("ping"), timeout=self._connect_timeout_s)
                except DATABASE_ERRORS as exc:
                    log.debug("LISTEN %s: connection lost (%s)", self.channel, type(exc).__name__)
                finally:
                    self.listening.clear()
                    self._conn = None
                    conn.terminate()
                    if self._on_state is not None:
                        self._on_state(False)
                log.info("LISTEN %s: connection lost; reconnecting", self.channel)
        finally:
            self.listening.clear()
            if self._conn is not None:
                self._conn.terminate()
                self._conn = None
