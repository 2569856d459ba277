"""Child processes of the demo: started in their own process group, logged to files, always stopped.

Every child gets a new session (``start_new_session``) so that stopping it also stops what *it*
started (the emulator's worker replicas): SIGTERM to the whole group, a grace period, then SIGKILL
to the group.  :class:`ProcessSet` stops its children in reverse start order, so the controller
stops before the emulator it talks to, and the emulator before the database.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the child binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gpuscale_cmd(*args: str) -> list[str]:
    """The ``gpuscale`` CLI: the console script next to this interpreter (the venv's), else the same
    entry point through this interpreter (works without the venv on PATH)."""
    script = Path(sys.executable).parent / "gpuscale"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), *args]
    return [sys.executable, "-c", "from gpuscale.cli.app import main; main()", *args]


class ChildFailed(RuntimeError):
    """A child exited early or never became ready; the message carries the tail of its log."""


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes]
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM the child's process group, wait ``grace_s``, then SIGKILL the group."""
        if self.alive():
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=5)
        # The leader may be gone while members of its group (replicas it started) linger.
        self._signal_group(signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode


class ProcessSet:
    """The demo's children; ``stop_all()`` (or leaving the ``with`` block) stops every one."""

    def __init__(self, log_dir: Path, env: Mapping[str, str]) -> None:
        self.log_dir = log_dir
        self.env = dict(env)
        self.children: list[Child] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> Child:
        log_path = self.log_dir / f"{name}.log"
        log = log_path.open("ab")
        full_env = {**self.env, **(env or {})}
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
        child = Child(name, list(argv), log_path, proc, log)
        self.children.append(child)
        return child

    def run(self, name: str, argv: Sequence[str], *, timeout: float = 120.0) -> None:
        """Run a command to completion (``db migrate``); raises :class:`ChildFailed` on non-zero."""
        child = self.start(name, argv)
        try:
            rc = child.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.stop(grace_s=2)
            raise ChildFailed(f"{name} did not finish in {timeout:.0f}s:\n{child.log_tail()}") from None
        finally:
            if child._log is not None:
                child._log.close()
                child._log = None
        self.children.remove(child)
        if rc != 0:
            raise ChildFailed(f"{name} exited with {rc}:\n{child.log_tail()}")

    def dead(self) -> list[Child]:
        """Children that exited although they should still run."""
        return [c for c in self.children if not c.alive()]

    def stop_all(self, grace_s: float = 15.0) -> None:
        for child in reversed(self.children):
            child.stop(grace_s=grace_s)

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def wait_http(
    url: str, child: Child | None = None, *, timeout: float = 60.0, ok: Sequence[int] = (200,)
) -> None:
    """Wait until ``url`` answers one of ``ok``; fail early if ``child`` dies meanwhile."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise ChildFailed(f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}")
        try:
            resp = httpx.get(url, timeout=2.0)
            if resp.status_code in ok:
                return
            last = f"HTTP {resp.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    name = child.name if child else url
    tail = child.log_tail() if child else ""
    raise ChildFailed(f"{name} not ready at {url} after {timeout:.0f}s ({last}):\n{tail}")
