"""Child processes in their own process groups: start, stop with a grace period, never orphan.

The one process manager of gpuscale: the ``local`` provider's replicas, the DataCrunch emulator's
replicas, and the children of the demo and of the end-to-end tests' stack all run through it.

Each child leads its own session (``start_new_session``), so a stop reaches everything it started:
SIGTERM to the group, SIGKILL to the group after the grace period, and a final SIGKILL to the group
once the leader is gone, for any child it left behind.  On Linux the kernel also SIGTERMs a child
whose parent dies without stopping it (``PR_SET_PDEATHSIG``), e.g. a SIGKILLed controller.

:class:`ProcessGroup` is one child; :class:`ProcessGroups` is a set of them sharing a base
environment and a log folder, that can stop them all (in reverse start order, or all at once) and,
as a last resort from any thread, SIGKILL them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class SpawnError(RuntimeError):
    """A child could not be started (no such program, not executable, ...)."""


class ProcessFailed(RuntimeError):
    """A child exited early, failed, or never became ready; the message carries its log's tail."""


def _parent_death_signal() -> Callable[[], None] | None:
    """On Linux, a pre-exec hook that makes the kernel SIGTERM the child if the thread that started
    it dies without stopping it: even then nothing is left orphaned.  Resolved once here, so the
    hook itself only makes one C call between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)

    def hook() -> None:
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)

    return hook


_PREEXEC = _parent_death_signal()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


@dataclass
class ProcessGroup:
    """One child process leading its own process group."""

    name: str
    argv: list[str]
    process: asyncio.subprocess.Process
    log_path: Path | None = None
    kind: str = "process"
    started_at: float = field(default_factory=time.time)
    stop_task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def id(self) -> str:
        return self.name

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def exited(self) -> bool:
        return self.process.returncode is not None

    @property
    def stopping(self) -> bool:
        return self.stop_task is not None

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None:
            return ""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self, grace_s: float) -> int | None:
        """SIGTERM the group, SIGKILL it after ``grace_s``, reap everything; the exit code."""
        process = self.process
        if process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=max(grace_s, 0.0))
            except TimeoutError:
                log.warning("%s %s did not stop within %.1fs; SIGKILL", self.kind, self.name, grace_s)
                _signal_group(process.pid, signal.SIGKILL)
                await process.wait()
        # Whatever the leader left in its group (an ollama server, a shell's children) goes too.
        _signal_group(process.pid, signal.SIGKILL)
        log.info("%s %s stopped (exit %s)", self.kind, self.name, process.returncode)
        return process.returncode

    def begin_stop(self, grace_s: float) -> asyncio.Task[None]:
        """Start stopping in the background (idempotent); returns the stop task."""
        if self.stop_task is None:

            async def stop() -> None:
                await self.stop(grace_s)

            self.stop_task = asyncio.create_task(stop(), name=f"stop-{self.name}")
        return self.stop_task

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the whole group (no wait)."""
        _signal_group(self.process.pid, sig)

    def kill_now(self) -> None:
        """SIGKILL the whole group without waiting: the last resort at exit, and the cleanup of
        leftovers when the leader exited on its own.  Safe from any thread."""
        _signal_group(self.process.pid, signal.SIGKILL)


async def spawn(
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    log_dir: Path | None = None,
    cwd: Path | None = None,
    kind: str = "process",
    pipes: bool = False,
) -> ProcessGroup:
    """Start ``argv`` in a new session with ``env`` (complete, not merged).  With ``log_dir`` its
    stdout and stderr are appended to ``<log_dir>/<name>.log``; with ``pipes`` its stdin and stdout
    are pipes (``group.process.stdin``/``stdout``) and stderr is inherited; else all are inherited
    (stdin: /dev/null).  ``kind`` names what the child is in messages (``replica``)."""
    if not argv:
        raise SpawnError(f"empty command for {kind} {name}")
    stdout: int | None = None
    log_file = None
    log_path = None
    if pipes:
        stdout = asyncio.subprocess.PIPE
    elif log_dir is not None:
        # A local append-only log file: quick enough not to matter to the event loop.
        log_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
        log_path = log_dir / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: ASYNC230
        stdout = log_file.fileno()
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env),
            cwd=cwd,
            stdin=asyncio.subprocess.PIPE if pipes else asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=asyncio.subprocess.STDOUT if log_file is not None else None,
            start_new_session=True,
            preexec_fn=_PREEXEC,  # one pre-resolved C call between fork and exec
        )
    except OSError as exc:
        raise SpawnError(f"cannot start {kind} {name}: {argv[0]}: {exc.strerror or exc}") from None
    finally:
        if log_file is not None:
            log_file.close()  # the child holds its own copy of the descriptor
    log.info("%s %s started (pid %d)", kind, name, process.pid)
    return ProcessGroup(name=name, argv=list(argv), process=process, log_path=log_path, kind=kind)


class ProcessGroups:
    """A set of children sharing a base environment and a log folder; none outlives :meth:`stop_all`.

    ``start`` merges its ``env`` over the base environment (the child sees only that: pass
    ``os.environ`` as the base to inherit it).  Stopped and exited children stay listed until
    :meth:`forget`, so :meth:`dead` can tell which exited although they should still run.
    """

    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
        grace_s: float = 10.0,
        kind: str = "process",
    ) -> None:
        self.env: dict[str, str] = dict(env or {})
        self.log_dir = log_dir
        self.grace_s = grace_s
        self.kind = kind
        self.groups: dict[str, ProcessGroup] = {}
        self._stops: set[asyncio.Task[None]] = set()

    async def start(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> ProcessGroup:
        env = {**self.env, **(env or {})}
        group = await spawn(name, argv, env, log_dir=self.log_dir, cwd=cwd, kind=self.kind)
        self.groups[name] = group
        return group

    async def run(self, name: str, argv: Sequence[str], *, timeout_s: float = 120.0) -> None:
        """Run a command to completion (``db migrate``); :class:`ProcessFailed` unless it exits 0."""
        group = await self.start(name, argv)
        try:
            rc = await asyncio.wait_for(group.process.wait(), timeout_s)
        except TimeoutError:
            await group.stop(grace_s=2)
            raise ProcessFailed(f"{name} did not finish in {timeout_s:.0f}s:\n{group.log_tail()}") from None
        finally:
            self.forget(group)
        if rc != 0:
            raise ProcessFailed(f"{name} exited with {rc}:\n{group.log_tail()}")

    def forget(self, group: ProcessGroup) -> None:
        if self.groups.get(group.name) is group:
            del self.groups[group.name]

    def dead(self) -> list[ProcessGroup]:
        """Children that exited although nobody stopped them."""
        return [g for g in self.groups.values() if g.exited and not g.stopping]

    def begin_stop(self, group: ProcessGroup, grace_s: float | None = None) -> asyncio.Task[None]:
        """Start stopping ``group`` in the background; it is forgotten once it is gone."""
        task = group.begin_stop(self.grace_s if grace_s is None else grace_s)
        if task not in self._stops:
            self._stops.add(task)

            def done(t: asyncio.Task[None]) -> None:
                self._stops.discard(t)
                self.forget(group)

            task.add_done_callback(done)
        return task

    async def stop_all(self, grace_s: float | None = None, *, in_order: bool = False) -> None:
        """Stop every child and wait until all are gone: all at once, or (``in_order``) one after
        another in reverse start order, so each stops before what it talks to."""
        groups = list(self.groups.values())
        if in_order:
            for group in reversed(groups):
                await self.begin_stop(group, grace_s)
        else:
            for group in groups:
                self.begin_stop(group, grace_s)
        if self._stops:
            await asyncio.gather(*list(self._stops), return_exceptions=True)

    def kill_all(self) -> None:
        """Last resort, from any thread or at exit: SIGKILL every child's process group."""
        for group in list(self.groups.values()):
            group.kill_now()
