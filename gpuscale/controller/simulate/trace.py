"""The trace format: one CSV row per task.

Header ``arrival_s,task_id,task_type,service_s,priority,depends_on``:

* ``arrival_s`` — seconds from the trace start when the task is submitted (a deck's whole graph
  is submitted at once, so its tasks share one arrival time);
* ``task_id`` — unique;
* ``task_type`` — a type some pool serves;
* ``service_s`` — GPU-seconds the task takes running alone on one replica;
* ``priority`` — ``normal``, ``high`` or ``critical``;
* ``depends_on`` — space-separated ids of tasks listed *earlier* in the file (so the graph is
  acyclic by construction), empty for none.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

HEADER = ("arrival_s", "task_id", "task_type", "service_s", "priority", "depends_on")
PRIORITY_NAMES = ("normal", "high", "critical")


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names the file and the line."""


@dataclass(frozen=True)
class TraceTask:
    arrival_s: float
    task_id: str
    task_type: str
    service_s: float
    priority: str = "normal"
    depends_on: tuple[str, ...] = ()


def _number(text: str, what: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TraceError(f"{where}: {what} must be a number, not {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise TraceError(f"{where}: {what} must be a finite number >= 0, not {text!r}")
    return value


def read_trace(path: Path | str) -> list[TraceTask]:
    """Read and validate a trace CSV.  Raises :class:`TraceError` with file and line."""
    path = Path(path)
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read trace: {exc.strerror or exc}") from None
    tasks: list[TraceTask] = []
    seen: set[str] = set()
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise TraceError(f"{path}: empty file (expected header {','.join(HEADER)})") from None
        except csv.Error as exc:
            raise TraceError(f"{path}: not a CSV file: {exc}") from None
        if tuple(h.strip() for h in header) != HEADER:
            raise TraceError(f"{path}:1: header must be {','.join(HEADER)}, got {','.join(header)}")
        try:
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(HEADER):
                    raise TraceError(f"{where}: expected {len(HEADER)} columns, got {len(row)}")
                arrival, task_id, task_type, service, priority, deps = (c.strip() for c in row)
                if not task_id:
                    raise TraceError(f"{where}: empty task_id")
                if task_id in seen:
                    raise TraceError(f"{where}: duplicate task_id {task_id!r}")
                if not task_type:
                    raise TraceError(f"{where}: empty task_type")
                priority = priority or "normal"
                if priority not in PRIORITY_NAMES:
                    raise TraceError(f"{where}: priority must be one of {', '.join(PRIORITY_NAMES)}")
                dep_ids = tuple(deps.split())
                for dep in dep_ids:
                    if dep not in seen:
                        raise TraceError(f"{where}: depends_on {dep!r} is not a task listed earlier")
                tasks.append(
                    TraceTask(
                        arrival_s=_number(arrival, "arrival_s", where),
                        task_id=task_id,
                        task_type=task_type,
                        service_s=_number(service, "service_s", where),
                        priority=priority,
                        depends_on=dep_ids,
                    )
                )
                seen.add(task_id)
        except csv.Error as exc:
            raise TraceError(f"{path}:{reader.line_num}: bad CSV: {exc}") from None
        except UnicodeDecodeError:
            raise TraceError(f"{path}: not UTF-8 text") from None
    return tasks


def write_trace_to(handle: TextIO, tasks: Iterable[TraceTask]) -> int:
    """Write tasks as trace CSV to an open text stream; returns the number of rows."""
    n = 0
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(HEADER)
    for t in tasks:
        writer.writerow(
            (
                f"{t.arrival_s:.1f}",
                t.task_id,
                t.task_type,
                f"{t.service_s:.1f}",
                t.priority,
                " ".join(t.depends_on),
            )
        )
        n += 1
    return n


def write_trace(path: Path | str, tasks: Iterable[TraceTask]) -> int:
    """Write tasks as a trace CSV; returns the number of rows."""
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        return write_trace_to(handle, tasks)
