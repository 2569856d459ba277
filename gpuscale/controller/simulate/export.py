"""The platform's own history as a trace: ``gpuscale trace export``.

Turns rows of the compact task history (``processing_task_history``: one row per completed task,
kept after retention deletes the task itself) into :class:`TraceTask` rows the simulator and
``gpuscale tune`` replay:

* ``arrival_s`` — seconds from midnight (UTC) of the first exported submission, so time of day
  and weekdays keep their meaning;
* ``service_s`` — the measured time of the attempt that finished the task (claim → done).  On a
  replica that serves several tasks at once this includes their sharing of the GPU, so it is an
  upper bound on the solo time;
* ``depends_on`` — the dependencies that are part of the export (a dependency submitted before
  the window is dropped: the dependent's own arrival already follows it);
* tasks are written dependencies first (the trace format's rule), then by submission.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, time
from typing import Any

from gpuscale.controller.simulate.trace import PRIORITY_NAMES, TraceTask


def _epoch(value: datetime) -> float:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def history_to_trace(rows: Iterable[Mapping[str, Any]]) -> list[TraceTask]:
    """Trace rows from history rows (keys: id, task_type, priority, depends_on, created_at,
    started_at, finished_at); see the module doc."""
    items = sorted(rows, key=lambda r: (_epoch(r["created_at"]), int(r["id"])))
    if not items:
        return []
    first = items[0]["created_at"]
    if first.tzinfo is None:
        first = first.replace(tzinfo=UTC)
    midnight = datetime.combine(first.astimezone(UTC).date(), time(0), tzinfo=UTC).timestamp()
    by_id = {int(r["id"]): r for r in items}
    order: list[int] = []
    state: dict[int, int] = {}  # 1: visiting, 2: written

    def visit(start: int) -> None:
        # Iterative depth-first walk: dependencies are written before their dependents.
        stack: list[tuple[int, bool]] = [(start, False)]
        while stack:
            tid, expanded = stack.pop()
            if expanded:
                state[tid] = 2
                order.append(tid)
                continue
            if state.get(tid):
                continue
            state[tid] = 1
            stack.append((tid, True))
            for dep in sorted(by_id[tid]["depends_on"] or (), reverse=True):
                if int(dep) in by_id and not state.get(int(dep)):
                    stack.append((int(dep), False))

    for r in items:
        visit(int(r["id"]))
    out: list[TraceTask] = []
    for tid in order:
        r = by_id[tid]
        started, finished = r.get("started_at"), r["finished_at"]
        service = max(0.0, _epoch(finished) - _epoch(started)) if started is not None else 0.0
        priority = str(r["priority"]) if str(r["priority"]) in PRIORITY_NAMES else "normal"
        out.append(
            TraceTask(
                arrival_s=round(max(0.0, _epoch(r["created_at"]) - midnight), 1),
                task_id=f"t{tid}",
                task_type=str(r["task_type"]),
                service_s=round(service, 1),
                priority=priority,
                depends_on=tuple(f"t{int(d)}" for d in sorted(r["depends_on"] or ()) if int(d) in by_id),
            )
        )
    return out
