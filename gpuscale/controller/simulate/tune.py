"""``gpuscale tune``: search pool rules against a trace for the cheapest that meet objectives.

The search is a coordinate descent over the knobs of every pool (maximum replicas, tasks per
replica, drain target, scale-up and scale-down delays, pre-warm) and the global ones that exist
in the pools file's schema, starting from the given pools file.  Each round tries, knob by knob,
a handful of values around the current one, replaying the whole trace with the simulator for
each (in parallel processes), and keeps the best:

* among rules that meet every objective and finish every task: the cheapest;
* otherwise: the smallest total shortfall (sum over objectives of ``max(0, value / target - 1)``),
  then the cheapest.

It stops when a round changes nothing or after ``budget`` replays.  Every replay is kept: the
cost–latency frontier is the set of rules no other rules beat on both cost and the worst
objective (relative to its target).

The rules are edited in the pools file's own YAML document (a deep copy), so whatever else the
file says (deployments, prices, fallbacks, comments aside) is written back unchanged.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from gpuscale.controller.pools import PoolsConfig, _pool_sections, parse_duration, parse_pools
from gpuscale.controller.simulate.engine import simulate, stop_order
from gpuscale.controller.simulate.report import summary
from gpuscale.controller.simulate.trace import TraceTask

# Objective name → the simulator's summary key.
SLO_KEYS = {
    "deck_p50": "graph_p50_s",
    "deck_p95": "graph_p95_s",
    "wait_p50": "wait_p50_s",
    "wait_p95": "wait_p95_s",
}

Change = tuple[str, str, Any]  # (pool name or "" for a global key, YAML key, value)


def parse_slo(text: str) -> dict[str, float]:
    """``deck_p95=20m,wait_p95=5m`` → ``{"deck_p95": 1200.0, "wait_p95": 300.0}``.

    Raises ValueError naming the bad part."""
    out: dict[str, float] = {}
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"expected objectives like deck_p95=20m,wait_p95=5m, not {text!r}")
    for part in parts:
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in SLO_KEYS:
            raise ValueError(
                f"{part!r}: expected NAME=DURATION with NAME one of {', '.join(SLO_KEYS)} (e.g. deck_p95=20m)"
            )
        if name in out:
            raise ValueError(f"{name} is given twice")
        seconds = parse_duration(value.strip())
        if seconds <= 0:
            raise ValueError(f"{name} must be longer than 0")
        out[name] = seconds
    return out


def format_duration(seconds: float) -> str:
    """Seconds as the pools file writes them (``90s``, ``10m``)."""
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class Knob:
    pool: str  # "" for a global key
    key: str  # the YAML key
    candidates: Callable[[Any], list[Any]]  # values to try, given the current one

    @property
    def label(self) -> str:
        return f"{self.pool}.{self.key}" if self.pool else self.key


def _ints(lo: int, hi: int, steps: Sequence[int]) -> Callable[[Any], list[Any]]:
    def values(cur: Any) -> list[Any]:
        c = int(cur)
        return sorted({min(hi, max(lo, c + s)) for s in steps} - {c})

    return values


def _durations(options: Sequence[float | str]) -> Callable[[Any], list[Any]]:
    def values(cur: Any) -> list[Any]:
        formatted = [o if isinstance(o, str) else format_duration(o) for o in options]
        return [o for o in formatted if o != cur]

    return values


def _bools(cur: Any) -> list[Any]:
    return [not bool(cur)]


def knobs_for(config: PoolsConfig) -> list[Knob]:
    """The knobs searched, most effective first."""
    out: list[Knob] = []
    for name in config.pools:
        out.append(Knob(name, "max_replicas", _ints(1, 40, (-2, -1, 1, 2, 4))))
    for name in config.pools:
        out.append(Knob(name, "tasks_per_replica", _ints(1, 8, (-1, 1, -2, 2))))
        out.append(Knob(name, "drain_target", _durations((120, 180, 300, 480, 600, 900))))
        out.append(Knob(name, "scale_up_delay", _durations((0, 15, 30, 60, 120))))
        out.append(Knob(name, "scale_down_delay", _durations(("auto", 30, 60, 120, 300, 600))))
        out.append(Knob(name, "prewarm", _bools))
        if config.pools[name].stage_deadline_s is not None:
            out.insert(
                len(config.pools), Knob(name, "stage_deadline", _steps(30.0, (-90, -60, -30, 30, 60, 120)))
            )
    return out


def _steps(lo: float, deltas: Sequence[float]) -> Callable[[Any], list[Any]]:
    def values(cur: Any) -> list[Any]:
        c = parse_duration(cur)
        return [format_duration(max(lo, c + d)) for d in deltas if max(lo, c + d) != c]

    return values


def _current(config: PoolsConfig, knob: Knob, changes: dict[tuple[str, str], Any]) -> Any:
    if (knob.pool, knob.key) in changes:
        return changes[(knob.pool, knob.key)]
    rules = config.pools[knob.pool]
    attr = {
        "drain_target": "drain_target_s",
        "scale_up_delay": "scale_up_delay_s",
        "scale_down_delay": "scale_down_delay_s",
        "stage_deadline": "stage_deadline_s",
    }.get(knob.key, knob.key)
    value = getattr(rules, attr)
    if (
        knob.key in ("drain_target", "scale_up_delay", "scale_down_delay", "stage_deadline")
        and value != "auto"
    ):
        return format_duration(float(value))
    return value


def apply_changes(raw: dict[str, Any], changes: dict[tuple[str, str], Any], source: str) -> dict[str, Any]:
    """A deep copy of the pools YAML document with ``changes`` applied."""
    doc = copy.deepcopy(raw)
    sections, _ = _pool_sections(doc, source)
    for (pool, key), value in changes.items():
        if not pool:
            doc[key] = value
            continue
        section_key, body = sections[pool]
        if body is None:  # an empty section: the pool takes every default
            body = {}
            sections[pool] = (section_key, body)
            if section_key.startswith("pools."):
                doc["pools"][pool] = body
            else:
                doc[section_key] = body
        body[key] = value
    return doc


@dataclass
class Evaluation:
    changes: dict[tuple[str, str], Any]
    data: dict[str, Any]
    meets: bool
    shortfall: float
    worst: float  # worst objective relative to its target (1.0: exactly on target)

    @property
    def cost_x(self) -> float:
        ratio = self.data.get("cost_vs_oracle")
        return float(ratio) if ratio is not None else math.inf

    def key(self) -> tuple[float, float, float]:
        return (0.0, 0.0, self.cost_x) if self.meets else (1.0, self.shortfall, self.cost_x)

    def describe(self) -> str:
        if not self.changes:
            return "(as given)"
        return ", ".join(f"{p + '.' if p else ''}{k}={v}" for (p, k), v in sorted(self.changes.items()))


def judge(data: dict[str, Any], slo: dict[str, float]) -> tuple[bool, float, float]:
    shortfall = 0.0
    worst = 0.0
    for name, target in slo.items():
        ratio = float(data[SLO_KEYS[name]]) / target
        worst = max(worst, ratio)
        shortfall += max(0.0, ratio - 1.0)
    if data["unfinished"]:
        shortfall += 10.0 + data["unfinished"]
        worst = math.inf
    return shortfall == 0.0, shortfall, worst


@dataclass
class TuneResult:
    slo: dict[str, float]
    evaluations: list[Evaluation]
    best: Evaluation
    base: Evaluation
    document: dict[str, Any] = field(default_factory=dict)  # the best rules as a YAML document

    @property
    def meets(self) -> bool:
        return self.best.meets

    def frontier(self) -> list[Evaluation]:
        """Rules no other rules beat on both cost and worst objective; cheapest first."""
        pts = sorted(self.evaluations, key=lambda e: (e.cost_x, e.worst))
        out: list[Evaluation] = []
        best_worst = math.inf
        for e in pts:
            if e.worst < best_worst:
                out.append(e)
                best_worst = e.worst
        return out


# --- replays in worker processes ------------------------------------------------------------

_TRACE: list[TraceTask] = []


def _init(trace: list[TraceTask]) -> None:
    global _TRACE
    _TRACE = trace


def _replay(doc: dict[str, Any], source: str) -> dict[str, Any]:
    config = parse_pools(doc, source)
    data = summary(simulate(_TRACE, config, victims=stop_order(config)))
    data.pop("pools", None)
    return data


def tune(
    trace: list[TraceTask],
    raw: dict[str, Any],
    slo: dict[str, float],
    *,
    source: str = "<pools>",
    budget: int = 120,
    jobs: int | None = None,
    progress: Callable[[int, int, Evaluation | None], None] | None = None,
) -> TuneResult:
    """Search (see the module doc).  ``raw`` is the pools file's YAML document; ``progress`` is
    called after every replay with (replays done, budget, best so far)."""
    base_config = parse_pools(raw, source)
    knobs = knobs_for(base_config)
    jobs = max(1, jobs or os.cpu_count() or 1)
    seen: dict[frozenset[tuple[tuple[str, str], Any]], Evaluation] = {}
    evaluations: list[Evaluation] = []
    best: Evaluation | None = None

    def note(changes: dict[tuple[str, str], Any], data: dict[str, Any]) -> Evaluation:
        nonlocal best
        meets, shortfall, worst = judge(data, slo)
        ev = Evaluation(dict(changes), data, meets, shortfall, worst)
        seen[frozenset(changes.items())] = ev
        evaluations.append(ev)
        if best is None or ev.key() < best.key():
            best = ev
        if progress is not None:
            progress(len(evaluations), budget, best)
        return ev

    pool_exec = None
    if jobs > 1:
        pool_exec = ProcessPoolExecutor(max_workers=jobs, initializer=_init, initargs=(trace,))
    if pool_exec is None:
        _init(trace)

    def run_many(batch: list[dict[tuple[str, str], Any]]) -> list[Evaluation]:
        todo: list[dict[tuple[str, str], Any]] = []
        for ch in batch:
            if frozenset(ch.items()) not in seen and len(evaluations) + len(todo) < budget:
                todo.append(ch)
        docs = [apply_changes(raw, ch, source) for ch in todo]
        if pool_exec is not None:
            results = list(pool_exec.map(_replay, docs, [source] * len(docs)))
        else:
            results = [_replay(d, source) for d in docs]
        for ch, data in zip(todo, results, strict=True):
            note(ch, data)
        return [seen[frozenset(ch.items())] for ch in batch if frozenset(ch.items()) in seen]

    try:
        base = run_many([{}])[0]
        current: dict[tuple[str, str], Any] = {}
        while len(evaluations) < budget:
            improved = False
            for knob in knobs:
                if len(evaluations) >= budget:
                    break
                cur = _current(base_config, knob, current)
                batch = [{**current, (knob.pool, knob.key): v} for v in knob.candidates(cur)]
                evals = run_many(batch)
                here = seen[frozenset(current.items())]
                winner = min(evals, key=Evaluation.key, default=here)
                if winner.key() < here.key():
                    current = dict(winner.changes)
                    improved = True
            if not improved:
                break
    finally:
        if pool_exec is not None:
            pool_exec.shutdown(cancel_futures=True)
    assert best is not None
    return TuneResult(slo, evaluations, best, base, apply_changes(raw, best.changes, source))
