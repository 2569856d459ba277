"""Worker processes in their own process groups: start, stop with a grace period, never orphan.

Shared by the ``local`` provider and the DataCrunch emulator, whose replicas are both plain
processes on this machine.  Each process leads its own session (``start_new_session``), so a stop
reaches everything it started: SIGTERM to the group, SIGKILL to the group after the grace period,
and a final SIGKILL to the group once the leader is gone, for any child it left behind.
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

from gpuscale.controller.providers.base import ProviderError

log = logging.getLogger(__name__)


def _parent_death_signal() -> Callable[[], None] | None:
    """On Linux, a pre-exec hook that makes the kernel SIGTERM the replica if the process (the
    thread) that started it dies without stopping it, e.g. a SIGKILLed controller or emulator:
    even then no worker is left orphaned.  Resolved once here, so the hook itself only makes
    one C call between fork and exec."""
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


@dataclass
class ProcessReplica:
    """One replica that is a local process."""

    id: str
    started_at: float
    process: asyncio.subprocess.Process
    stop_task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stopping(self) -> bool:
        return self.stop_task is not None

    @property
    def exited(self) -> bool:
        return self.process.returncode is not None


async def spawn(
    replica_id: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    log_dir: Path | None = None,
) -> ProcessReplica:
    """Start ``argv`` in a new session with ``env`` (complete, not merged) as one replica."""
    if not argv:
        raise ProviderError("empty command for a replica")
    stdout: int | None = None
    log_file = None
    if log_dir is not None:
        # A local append-only log file: quick enough not to matter to the event loop.
        log_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
        log_file = open(log_dir / f"{replica_id}.log", "ab")  # noqa: ASYNC230
        stdout = log_file.fileno()
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=asyncio.subprocess.STDOUT if stdout is not None else None,
            start_new_session=True,
            preexec_fn=_PREEXEC,  # one pre-resolved C call between fork and exec
        )
    except OSError as exc:
        raise ProviderError(f"cannot start replica {replica_id}: {argv[0]}: {exc.strerror or exc}") from None
    finally:
        if log_file is not None:
            log_file.close()  # the child holds its own copy of the descriptor
    log.info("replica %s started (pid %d)", replica_id, process.pid)
    return ProcessReplica(id=replica_id, started_at=time.time(), process=process)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def terminate(replica: ProcessReplica, grace_s: float) -> None:
    """SIGTERM the replica's process group, SIGKILL it after ``grace_s``, reap everything."""
    process = replica.process
    if process.returncode is None:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=max(grace_s, 0.0))
        except TimeoutError:
            log.warning("replica %s did not stop within %.1fs; SIGKILL", replica.id, grace_s)
            _signal_group(process.pid, signal.SIGKILL)
            await process.wait()
    # Whatever the leader left in its group (an ollama server, a shell's children) goes too.
    _signal_group(process.pid, signal.SIGKILL)
    log.info("replica %s stopped (exit %s)", replica.id, process.returncode)


def begin_stop(replica: ProcessReplica, grace_s: float) -> asyncio.Task[None]:
    """Start stopping ``replica`` in the background (idempotent); returns the stop task."""
    if replica.stop_task is None:
        replica.stop_task = asyncio.create_task(terminate(replica, grace_s), name=f"stop-{replica.id}")
    return replica.stop_task


def kill_now(replica: ProcessReplica) -> None:
    """SIGKILL the replica's whole group without waiting: the last resort at exit, and the cleanup
    of leftovers when a replica's leader exited on its own."""
    _signal_group(replica.process.pid, signal.SIGKILL)
