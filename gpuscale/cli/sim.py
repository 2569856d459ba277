"""Simulator commands: ``gpuscale simulate``, ``gpuscale tune``, ``gpuscale trace generate`` and
``gpuscale trace export``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from gpuscale.cli.errors import fail

trace_app = typer.Typer(help="Traces for the simulator.", no_args_is_help=True)


def simulate(
    trace: Path = typer.Option(
        ..., "--trace", help="Trace CSV: arrival_s,task_id,task_type,service_s,priority,depends_on."
    ),
    pools: Path = typer.Option(
        None, "--pools", help="Pools file (default: GPUSCALE_POOLS_FILE or deploy/datacrunch/pools.yaml)."
    ),
    cold_start: float | None = typer.Option(
        None,
        "--cold-start",
        min=0,
        help="Cold start in seconds for every pool (default: each pool's cold_start).",
    ),
    policy: str = typer.Option("gpuscale", "--policy", help="gpuscale | no-prewarm | always-on | seeds."),
    tick: float | None = typer.Option(
        None, "--tick", min=0.1, help="Controller reconcile interval in seconds (default: the pools file's)."
    ),
    budget: float | None = typer.Option(
        None,
        "--budget",
        min=0.01,
        help="Monthly budget in USD (default: the pools file's).",
    ),
    startup_failure_rate: float = typer.Option(
        0.0, "--startup-failure-rate", min=0.0, max=1.0, help="Chance that a new replica never registers."
    ),
    seed: int = typer.Option(1, "--seed", help="Random seed for --startup-failure-rate."),
    counts_only: bool = typer.Option(
        False, "--counts-only", help="Give the policy task counts only, no work estimates."
    ),
    period_days: float | None = typer.Option(
        None,
        "--period-days",
        min=0.01,
        help="Trace period for the always-on cost (default: whole days spanned).",
    ),
    victims: str | None = typer.Option(
        None,
        "--victims",
        help="Which replicas a scale-down stops: idle (first; local/docker), any (random: DataCrunch "
        "chooses), newest or oldest (default: what the pools file's scale_down_victims says).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    plot: Path | None = typer.Option(
        None, "--plot", help="Write a PNG of queue depth and replicas per pool."
    ),
    spot: float | None = typer.Option(
        None,
        "--spot",
        min=0.0,
        help="Model spot and fallback deployments: spot replicas vanish at this rate per "
        "replica-hour (e.g. 0.1); each replica billed at its deployment's price.",
    ),
) -> None:
    """Replay a trace against a scaling policy with a virtual clock and report cost and latency."""
    from gpuscale.controller.pools import PoolsFileError, load_pools
    from gpuscale.controller.simulate.engine import POLICIES, VICTIMS, stop_order
    from gpuscale.controller.simulate.engine import simulate as run_sim
    from gpuscale.controller.simulate.report import format_text, summary
    from gpuscale.controller.simulate.spot import SpotModel
    from gpuscale.controller.simulate.trace import TraceError, read_trace

    if policy not in POLICIES:
        raise fail(f"--policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    if victims is not None and victims not in VICTIMS:
        raise fail(f"--victims must be one of {', '.join(VICTIMS)}, not {victims!r}")
    if pools is None:
        from gpuscale.common.settings import get_settings

        pools = get_settings().pools_file
    try:
        config = load_pools(pools)
        tasks = read_trace(trace)
        result = run_sim(
            tasks,
            config,
            policy=policy,
            cold_start_s=cold_start,
            tick_s=tick,
            budget_usd=budget,
            startup_failure_rate=startup_failure_rate,
            seed=seed,
            counts_only=counts_only,
            period_s=None if period_days is None else period_days * 86400.0,
            spot=None if spot is None else SpotModel(preemption_per_hour=spot, seed=seed),
            victims=victims or stop_order(config),
        )
    except (PoolsFileError, TraceError) as exc:
        raise fail(str(exc)) from None
    data = summary(result)
    if plot is not None:
        from gpuscale.controller.simulate.plot import plot_result

        try:
            plot_result(result, plot, title=f"{trace.name} — policy {policy}")
        except OSError as exc:
            raise fail(f"{plot}: cannot write plot: {exc.strerror or exc}") from None
    if as_json:
        typer.echo(json.dumps(data, sort_keys=True))
    else:
        typer.echo(format_text(data))
        if plot is not None:
            typer.echo(f"plot written to {plot}")


@trace_app.command("generate")
def generate(
    kind: str = typer.Option(
        "month",
        "--kind",
        help="busy-day | quiet-week | month | platform-month (the platform's load, batch uploads).",
    ),
    out: Path = typer.Option(..., "--out", help="Where to write the trace CSV."),
    seed: int = typer.Option(1, "--seed", help="Random seed (the same seed gives the same trace)."),
    decks_per_day: float | None = typer.Option(
        None,
        "--decks-per-day",
        min=0,
        help="Decks per working day (default: 30 busy-day, 3 quiet-week, 15 month, 12 platform-month).",
    ),
    days: int | None = typer.Option(None, "--days", min=1, max=366, help="Length in days (default by kind)."),
    batch_share: float | None = typer.Option(
        None,
        "--batch-share",
        min=0.0,
        max=1.0,
        help="platform-month: share of uploads that are a batch of 3–8 decks (default 0.08).",
    ),
) -> None:
    """Write a realistic trace from the seeds' numbers (30-page decks in working-hour bursts).

    ``platform-month``: ~12 decks a working day (15 % of that on weekends), 8 % of uploads a
    batch of 3–8 decks at once, 2 % critical / 10 % high, pages ~N(28, 8)."""
    from gpuscale.controller.simulate.generate import KINDS
    from gpuscale.controller.simulate.generate import generate as gen
    from gpuscale.controller.simulate.trace import write_trace

    if kind not in KINDS:
        raise fail(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if batch_share is not None and kind != "platform-month":
        raise fail("--batch-share applies to --kind platform-month only")
    tasks = gen(kind, seed=seed, decks_per_day=decks_per_day, days=days, batch_share=batch_share)
    try:
        n = write_trace(out, tasks)
    except OSError as exc:
        raise fail(f"{out}: cannot write trace: {exc.strerror or exc}") from None
    decks = len({t.task_id.split("-", 1)[0] for t in tasks})
    typer.echo(f"wrote {n} tasks ({decks} decks) to {out}")


@trace_app.command("export")
def export(
    since: str = typer.Option("30d", "--since", help="How far back: 30d, 12h, 90m (submission time)."),
    out: Path | None = typer.Option(None, "--out", help="Where to write the trace CSV (default: stdout)."),
) -> None:
    """Write the platform's recent load, from the database's task history, as a trace.

    Every completed task submitted within ``--since``: arrival, type, measured service time,
    priority and dependencies.  The history outlives the retention of done tasks."""
    import sys
    from datetime import UTC, datetime, timedelta

    from gpuscale.cli.database import open_queue, run_db
    from gpuscale.controller.pools import parse_duration
    from gpuscale.controller.simulate.export import history_to_trace
    from gpuscale.controller.simulate.trace import write_trace, write_trace_to

    try:
        window = parse_duration(since)
    except ValueError as exc:
        raise fail(f"--since: {exc}") from None
    if window <= 0:
        raise fail("--since must be longer than 0")
    if out is not None and (out.is_dir() or not out.absolute().parent.is_dir()):
        raise fail(f"{out}: cannot write trace: not a file in an existing directory")

    async def run() -> list[dict[str, object]]:
        async with open_queue(max_size=2) as q:
            return await q.history_since(datetime.now(UTC) - timedelta(seconds=window))

    tasks = history_to_trace(run_db(run))
    if out is None:
        write_trace_to(sys.stdout, tasks)
        return
    try:
        n = write_trace(out, tasks)
    except OSError as exc:
        raise fail(f"{out}: cannot write trace: {exc.strerror or exc}") from None
    typer.echo(f"wrote {n} tasks submitted in the last {since} to {out}")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def tune(
    trace: Path = typer.Option(..., "--trace", help="Trace CSV to tune against."),
    slo: str | None = typer.Option(
        None,
        "--slo",
        help="Objectives: deck_p50, deck_p95, wait_p50, wait_p95 as NAME=DURATION, comma-separated "
        "(e.g. deck_p95=20m,wait_p95=5m).  Default: the pools file's objectives.",
    ),
    pools: Path = typer.Option(
        None, "--pools", help="Starting rules (default: GPUSCALE_POOLS_FILE or deploy/datacrunch/pools.yaml)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Write the cheapest rules that meet the objectives here."
    ),
    plot: Path | None = typer.Option(None, "--plot", help="Write a PNG of the cost–latency frontier."),
    budget: int = typer.Option(120, "--budget", min=1, max=5000, help="At most this many replays."),
    jobs: int | None = typer.Option(None, "--jobs", min=1, max=64, help="Replays at once (default: CPUs)."),
) -> None:
    """Search pool rules against a trace with the simulator; write the cheapest that meet --slo.

    Prints the cost–latency frontier; exits 1 (writing nothing) when no rules tried meet the
    objectives."""
    import yaml
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from gpuscale.controller.pools import PoolsFileError, load_pools
    from gpuscale.controller.simulate.trace import TraceError, read_trace
    from gpuscale.controller.simulate.tune import SLO_KEYS, Evaluation, format_duration, parse_slo
    from gpuscale.controller.simulate.tune import tune as run_tune

    objectives: dict[str, float] = {}
    if slo is not None:
        try:
            objectives = parse_slo(slo)
        except ValueError as exc:
            raise fail(f"--slo: {exc}") from None
    if pools is None:
        from gpuscale.common.settings import get_settings

        pools = get_settings().pools_file
    for path, what in ((out, "--out"), (plot, "--plot")):
        if path is not None and (path.is_dir() or not path.absolute().parent.is_dir()):
            raise fail(f"{what} {path}: not a file in an existing directory")
    try:
        config = load_pools(pools)  # the clear error for a bad file
        if not objectives:
            if config.objectives is None or not config.objectives.targets():
                raise fail(f"give --slo, or objectives in {pools} (e.g. objectives: {{deck_p95: 20m}})")
            objectives = config.objectives.targets()
            slo = ",".join(f"{k}={format_duration(v)}" for k, v in objectives.items())
        raw = yaml.safe_load(pools.read_text(encoding="utf-8"))
        tasks = read_trace(trace)
        if not tasks:
            raise TraceError(f"{trace}: the trace has no tasks")
    except (PoolsFileError, TraceError) as exc:
        raise fail(str(exc)) from None

    console = Console(stderr=True)
    goal = ", ".join(f"{k} ≤ {format_duration(v)}" for k, v in objectives.items())
    with Progress(
        TextColumn("[bold]tuning[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[best]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        job = bar.add_task("replays", total=budget, best="")

        def on_progress(done: int, total: int, best: Evaluation | None) -> None:
            text = ""
            if best is not None:
                text = f"best {best.cost_x:.2f}× floor" + (" (meets)" if best.meets else " (misses)")
            bar.update(job, completed=done, best=text)

        try:
            result = run_tune(
                tasks, raw, objectives, source=str(pools), budget=budget, jobs=jobs, progress=on_progress
            )
        except TraceError as exc:
            raise fail(str(exc)) from None

    table = Table(title=f"cost–latency frontier ({len(result.evaluations)} replays; objectives {goal})")
    for col in ("cost × floor", "cost $", "wait p95", "deck p50", "deck p95", "meets", "rules (changed)"):
        if col.startswith("rules"):
            table.add_column(col, justify="left", overflow="fold", min_width=40)
        else:
            table.add_column(col, justify="left" if col == "meets" else "right", no_wrap=True)
    for ev in result.frontier():
        d = ev.data
        mark = "[green]yes[/green]" if ev.meets else "no"
        if ev is result.best:
            mark += " ← chosen" if ev.meets else " ← closest"
        table.add_row(
            f"{ev.cost_x:.2f}",
            f"{d['cost_usd']:.2f}",
            _minutes(d["wait_p95_s"]),
            _minutes(d["graph_p50_s"]),
            _minutes(d["graph_p95_s"]),
            mark,
            ev.describe(),
        )
    stdout = Console()
    if not stdout.is_terminal:
        stdout = Console(width=200)  # piped or captured: no terminal width to fit
    stdout.print(table)
    best = result.best
    summary_line = f"{best.cost_x:.2f}× the oracle floor (${best.data['cost_usd']:.2f}), " + ", ".join(
        f"{k} {_minutes(best.data[SLO_KEYS[k]])}" for k in objectives
    )
    if plot is not None:
        from gpuscale.controller.simulate.plot import plot_frontier

        try:
            plot_frontier(result, plot, title=f"gpuscale tune on {trace.name}: {goal}")
        except OSError as exc:
            raise fail(f"{plot}: cannot write plot: {exc.strerror or exc}") from None
        typer.echo(f"frontier plot written to {plot}")
    if not result.meets:
        raise fail(
            f"no rules tried meet {goal} on {trace.name} ({len(result.evaluations)} replays); "
            f"the closest: {summary_line} with {best.describe()}",
            code=1,
        )
    typer.echo(f"cheapest rules that meet {goal}: {summary_line}; {best.describe()}")
    if out is not None:
        result.document["objectives"] = {k: format_duration(v) for k, v in objectives.items()}
        header = (
            f"# Written by gpuscale tune --trace {trace.name} --slo {slo} (from {pools.name}):\n"
            f"# {summary_line} on that trace.\n"
        )
        try:
            out.write_text(header + yaml.safe_dump(result.document, sort_keys=False), encoding="utf-8")
        except OSError as exc:
            raise fail(f"{out}: cannot write pools file: {exc.strerror or exc}") from None
        typer.echo(f"rules written to {out}")


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)
    app.command("tune")(tune)
    app.add_typer(trace_app, name="trace")
