"""The demo's live view: what the pools, the controller's decisions and the decks are doing.

:class:`Snapshot` is plain data gathered by the orchestrator each refresh (from the database and
the controller's HTTP API); :func:`render` turns it into rich renderables, so the view can be
tested without a terminal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text


@dataclass
class PoolView:
    name: str
    min_replicas: int = 0
    max_replicas: int = 0
    queued: int = 0
    running: int = 0
    blocked: int = 0
    done: int = 0
    failed: int = 0  # failed + dead + cancelled
    desired: int | None = None  # what the controller decided (None: not known yet)
    provider: int | None = None  # replicas the provider runs (starting ones included)
    registered: int = 0  # workers registered and heartbeating
    paused: bool = False
    last_decision: str = ""  # "0→3 queue_above_threshold"


@dataclass
class Decision:
    at: float  # epoch seconds
    pool: str
    from_replicas: int | None
    to_replicas: int
    reason: str
    detail: str = ""
    outcome: str = ""


@dataclass
class DeckView:
    name: str
    document_id: str
    pages: int
    tasks_total: int = 0
    tasks_done: int = 0
    tasks_failed: int = 0
    tasks_running: int = 0
    progress: float = 0.0  # 0-100, over all tasks of the deck (running ones count their progress)
    stage: str = "queued"


@dataclass
class Snapshot:
    elapsed_s: float = 0.0
    phase: str = "starting"
    pools: list[PoolView] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)  # newest first
    decks: list[DeckView] = field(default_factory=list)
    header: list[str] = field(default_factory=list)  # lines about the setup (stand-in, emulator...)
    message: str = ""


def _num(value: int | None) -> str:
    return "·" if value is None else str(value)


def _mmss(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


def pools_table(snapshot: Snapshot) -> Table:
    table = Table(
        title="Pools",
        title_justify="left",
        caption="replicas = desired (controller) / running (provider) / registered (workers)",
        caption_justify="left",
        expand=True,
        pad_edge=False,
    )
    table.add_column("pool", style="bold", no_wrap=True)
    for col in ("queued", "running", "blocked", "done", "failed"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("replicas", justify="center", style="cyan", no_wrap=True)
    table.add_column("min–max", justify="center", style="dim", no_wrap=True)
    table.add_column("last decision", overflow="ellipsis", no_wrap=True, ratio=1, min_width=16)
    for p in snapshot.pools:
        name = p.name + (" (paused)" if p.paused else "")
        table.add_row(
            name,
            str(p.queued),
            str(p.running),
            str(p.blocked),
            str(p.done),
            Text(str(p.failed), style="red" if p.failed else ""),
            f"{_num(p.desired)} / {_num(p.provider)} / {p.registered}",
            f"{p.min_replicas}–{p.max_replicas}",
            p.last_decision,
        )
    return table


def decisions_table(snapshot: Snapshot, limit: int = 8) -> Table:
    table = Table(title="Last decisions", title_justify="left", expand=True, pad_edge=False)
    table.add_column("time", style="dim")
    table.add_column("pool", style="bold")
    table.add_column("replicas", justify="center")
    table.add_column("reason", style="magenta")
    table.add_column("detail", overflow="ellipsis", no_wrap=True, ratio=1)
    for d in snapshot.decisions[:limit]:
        arrow = f"{_num(d.from_replicas)} → {d.to_replicas}"
        detail = d.detail if not d.outcome or d.outcome == "ok" else f"{d.detail} [{d.outcome}]"
        table.add_row(time.strftime("%H:%M:%S", time.localtime(d.at)), d.pool, arrow, d.reason, detail)
    if not snapshot.decisions:
        table.add_row("", "", "", Text("no decision yet", style="dim"), "")
    return table


def decks_table(snapshot: Snapshot) -> Table:
    table = Table(title="Decks", title_justify="left", expand=True, pad_edge=False)
    table.add_column("deck", style="bold", no_wrap=True)
    table.add_column("pages", justify="right")
    table.add_column("progress", ratio=1)
    table.add_column("tasks", justify="right")
    table.add_column("stage")
    for d in snapshot.decks:
        bar = ProgressBar(total=100, completed=d.progress, width=None)
        tasks = f"{d.tasks_done}/{d.tasks_total}"
        if d.tasks_failed:
            tasks += f" ({d.tasks_failed} failed)"
        table.add_row(d.name, str(d.pages), bar, tasks, d.stage)
    return table


def render(snapshot: Snapshot) -> RenderableType:
    title = f"gpuscale demo — {snapshot.phase} — {_mmss(snapshot.elapsed_s)}"
    header = Text("\n".join(snapshot.header), style="dim") if snapshot.header else Text("")
    parts: list[RenderableType] = [header, pools_table(snapshot), decisions_table(snapshot)]
    if snapshot.decks:
        parts.append(decks_table(snapshot))
    if snapshot.message:
        parts.append(Text(snapshot.message, style="yellow"))
    return Panel(Group(*parts), title=title, title_align="left", border_style="blue")
