"""The demo's summary: what ran, how long it took, what it cost — as a rich table or JSON.

``ok`` is the demo's verdict and its exit status: every task done and every pool back to its
minimum replica count (with nothing registered above it).  ``problems`` says why not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text


@dataclass
class PoolSummary:
    min_replicas: int
    max_replicas: int
    replicas_final: int | None  # the provider's count at the end (None: unknown)
    registered_final: int
    replicas_peak: int
    replica_seconds: float
    cost_usd: float
    price_per_hour: float
    cold_starts: int  # replicas that registered during the run
    cold_start_mean_s: float | None
    tasks_done: int
    tasks_failed: int
    scale_ups: int
    scale_downs: int


@dataclass
class Summary:
    ok: bool
    tasks_total: int
    tasks_done: int
    tasks_failed: int  # failed + dead + cancelled
    tasks_unfinished: int
    decks: int
    pages: int
    wall_s: float
    replica_seconds: float
    cost_usd: float
    cold_starts: int
    replicas_final: dict[str, int | None]
    pools: dict[str, PoolSummary]
    decisions: dict[str, int]  # reason -> count
    ollama: str  # "stand-in" or the real Ollama's URL
    provider: str
    problems: list[str] = field(default_factory=list)
    logs: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _money(usd: float) -> str:
    return f"${usd:,.4f}" if usd < 1 else f"${usd:,.2f}"


def render_summary(s: Summary) -> RenderableType:
    verdict = (
        Text("✔ every task done, every pool back to its minimum", style="bold green")
        if s.ok
        else Text("✘ " + "; ".join(s.problems), style="bold red")
    )
    totals = Table.grid(padding=(0, 2))
    totals.add_column(style="bold")
    totals.add_column()
    totals.add_row(
        "tasks",
        f"{s.tasks_done} done, {s.tasks_failed} failed, {s.tasks_unfinished} unfinished "
        f"of {s.tasks_total} ({s.decks} decks, {s.pages} pages)",
    )
    totals.add_row("wall time", f"{s.wall_s:.1f} s")
    totals.add_row("replica-seconds", f"{s.replica_seconds:.1f}")
    totals.add_row(
        "estimated cost", _money(s.cost_usd) + "  (replica-seconds × the pools file's price per hour)"
    )
    totals.add_row("cold starts", str(s.cold_starts))
    totals.add_row("decisions", ", ".join(f"{r} ×{n}" for r, n in sorted(s.decisions.items())) or "none")
    totals.add_row("ollama", s.ollama)
    totals.add_row("provider", s.provider)
    if s.logs:
        totals.add_row("logs", s.logs)

    for name, p in s.pools.items():
        final = "?" if p.replicas_final is None else str(p.replicas_final)
        cold = "" if p.cold_start_mean_s is None else f", avg {p.cold_start_mean_s:.1f} s"
        totals.add_row(
            f"pool {name}",
            f"{p.tasks_done} done, {p.tasks_failed} failed · peak {p.replicas_peak} replicas, "
            f"{final} at the end (min {p.min_replicas}) · {p.replica_seconds:.1f} replica-s, "
            f"{_money(p.cost_usd)} · {p.cold_starts} cold starts{cold}",
        )
    return Group(Text("Summary", style="bold underline"), totals, verdict)
