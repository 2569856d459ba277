"""The embedded PostgreSQL across real processes: one shared server per data directory, stopped by
the last process to leave, on SIGTERM too, and recovered after stale pid files."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from gpuscale.db.embedded import EmbeddedPostgres

# Holds the server until a line arrives on stdin (or a signal ends it).
HOLDER = """
import sys
from pathlib import Path
from gpuscale.db.embedded import EmbeddedPostgres, stop_on_signals
stop_on_signals()
srv = EmbeddedPostgres(Path(sys.argv[1]))
print(srv.start(), flush=True)
sys.stdin.readline()
srv.stop()
"""


class Holder:
    def __init__(self, pgdata: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(pgdata)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert self.proc.stdout is not None
        self.dsn = self.proc.stdout.readline().strip()
        assert self.dsn.startswith("postgresql://"), "holder did not start the server"

    def leave(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.wait(timeout=30) == 0

    def kill(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


def _scratch() -> Path:
    # Not pytest's tmp_path: every pytest session that starts (other suites running at the same
    # time included) resets /tmp/pytest-of-<user> to mode 700, which would lock the server's
    # system user out of a data directory below it.
    return Path(tempfile.mkdtemp(prefix="gpuscale-embedded-"))


@pytest.fixture(scope="module")
def pgdata() -> Iterator[Path]:
    root = _scratch()
    path = root / "pg"
    yield path
    # Whatever happened in the tests, leave no server behind.
    if EmbeddedPostgres(path).running:
        srv = EmbeddedPostgres(path)
        srv.start()
        (path / ".handle_pids.json").write_text(json.dumps([os.getpid()]))
        srv.stop()
    shutil.rmtree(root, ignore_errors=True)


async def query_ok(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError):
        return False
    try:
        return await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


def ok(dsn: str) -> bool:
    return asyncio.run(query_ok(dsn))


def postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().splitlines()[0])


def test_processes_share_one_server_and_the_last_stops_it(pgdata: Path) -> None:
    a = Holder(pgdata)
    b = Holder(pgdata)
    try:
        assert a.dsn == b.dsn
        pid = postmaster_pid(pgdata)
        handles = json.loads((pgdata / ".handle_pids.json").read_text())
        assert sorted(handles) == sorted([a.proc.pid, b.proc.pid])
        a.leave()
        assert EmbeddedPostgres(pgdata).running and postmaster_pid(pgdata) == pid
        assert ok(b.dsn)
    finally:
        b.leave()
    assert not EmbeddedPostgres(pgdata).running
    assert not ok(b.dsn)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_stops_the_server(pgdata: Path, sig: int) -> None:
    a = Holder(pgdata)
    assert ok(a.dsn)
    rc = a.kill(sig)
    assert rc != 0
    if sig == signal.SIGTERM:
        assert rc == 128 + signal.SIGTERM  # an orderly SystemExit, not death by signal
    assert not EmbeddedPostgres(pgdata).running


def test_killed_holder_is_pruned_and_the_next_one_stops_it(pgdata: Path) -> None:
    a = Holder(pgdata)
    a.kill(signal.SIGKILL)  # no exit hooks: its pid stays in the handle list, server orphaned
    assert EmbeddedPostgres(pgdata).running
    assert a.proc.pid in json.loads((pgdata / ".handle_pids.json").read_text())
    b = Holder(pgdata)
    assert ok(b.dsn)
    assert json.loads((pgdata / ".handle_pids.json").read_text()) == [b.proc.pid]
    b.leave()
    assert not EmbeddedPostgres(pgdata).running


def test_stale_postmaster_pid_with_reused_pid_is_recovered(pgdata: Path) -> None:
    a = Holder(pgdata)
    content = (pgdata / "postmaster.pid").read_text().splitlines()
    a.leave()
    assert not (pgdata / "postmaster.pid").exists()
    # A crash left postmaster.pid behind, and its pid now belongs to an unrelated live process.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        content[0] = str(sleeper.pid)
        (pgdata / "postmaster.pid").write_text("\n".join(content) + "\n")
        b = Holder(pgdata)
        try:
            assert ok(b.dsn)
            assert postmaster_pid(pgdata) != sleeper.pid
        finally:
            b.leave()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not EmbeddedPostgres(pgdata).running


@pytest.mark.skipif(os.geteuid() != 0, reason="the server user and folder permissions only matter as root")
def test_private_parent_folders_get_search_permission_only() -> None:
    root = _scratch()
    private = root / "home"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    a = Holder(private / "pg")
    try:
        assert ok(a.dsn)
    finally:
        a.leave()
    mode = stat.S_IMODE(private.stat().st_mode)
    shutil.rmtree(root, ignore_errors=True)
    assert mode == 0o711, oct(mode)  # others may pass through, not list it
