"""Helpers shared by the provider tests: stand-in worker commands, polling, finding processes.

A stand-in replica is a tiny command that sleeps and exits 0 on SIGTERM (the real worker drains
instead).  Finding a replica's processes reads ``/proc/*/environ`` for its
``GPUSCALE_CONTAINER_ID``: that works the same for local processes, the emulator's replicas and,
since the tests run as root on the same kernel, for processes inside Docker containers.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

# Sleeps until SIGTERM, then exits 0.
STANDIN = (
    sys.executable,
    "-c",
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "while True: time.sleep(0.2)\n",
)
# Ignores SIGTERM: only SIGKILL after the grace period ends it.
STUBBORN = (
    sys.executable,
    "-c",
    "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(0.2)\n",
)
# The busybox shell version for containers.
SH_STANDIN = ("sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.2; done")


def replica_pids(replica_id: str) -> list[int]:
    """Process ids of the live processes that belong to ``replica_id``."""
    return [int(env["__pid__"]) for env in replica_env(replica_id)]


def environs_with(entry: str) -> dict[int, list[bytes]]:
    """The live processes whose environment holds ``entry`` (``KEY=value``): pid → its raw entries."""
    marker = entry.encode()
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                items = f.read().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if marker in items:
            found[int(name)] = items
    return found


def replica_env(replica_id: str) -> list[dict[str, str]]:
    """The environments of the live processes that belong to ``replica_id`` (plus ``__pid__``)."""
    found = []
    for pid, items in environs_with(f"GPUSCALE_CONTAINER_ID={replica_id}").items():
        env = {"__pid__": str(pid)}
        for item in items:
            key, _, value = item.partition(b"=")
            if key:
                env[key.decode(errors="replace")] = value.decode(errors="replace")
        found.append(env)
    return found


async def until(
    fn: Callable[[], Awaitable[T | None]], what: str, timeout_s: float = 30.0, every_s: float = 0.05
) -> T:
    """Poll ``fn`` until it returns something truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        last = await fn()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last: {last!r}")
        await asyncio.sleep(every_s)


async def no_processes(replica_ids: set[str], timeout_s: float = 30.0) -> None:
    async def gone() -> bool:
        return not any(replica_env(rid) for rid in replica_ids)

    await until(gone, f"no process left for {sorted(replica_ids)}", timeout_s)
