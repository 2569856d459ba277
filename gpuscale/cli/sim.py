"""Simulator commands: ``gpuscale simulate``, ``gpuscale trace generate`` and ``gpuscale trace export``."""

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
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    plot: Path | None = typer.Option(
        None, "--plot", help="Write a PNG of queue depth and replicas per pool."
    ),
) -> None:
    """Replay a trace against a scaling policy with a virtual clock and report cost and latency."""
    from gpuscale.controller.pools import PoolsFileError, load_pools
    from gpuscale.controller.simulate.engine import POLICIES
    from gpuscale.controller.simulate.engine import simulate as run_sim
    from gpuscale.controller.simulate.report import format_text, summary
    from gpuscale.controller.simulate.trace import TraceError, read_trace

    if policy not in POLICIES:
        raise fail(f"--policy must be one of {', '.join(POLICIES)}, not {policy!r}")
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
) -> None:
    """Write a realistic trace from the seeds' numbers (30-page decks in working-hour bursts).

    ``platform-month``: ~12 decks a working day (15 % of that on weekends), 8 % of uploads a
    batch of 3–8 decks at once, 2 % critical / 10 % high, pages ~N(28, 8)."""
    from gpuscale.controller.simulate.generate import KINDS
    from gpuscale.controller.simulate.generate import generate as gen
    from gpuscale.controller.simulate.trace import write_trace

    if kind not in KINDS:
        raise fail(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    tasks = gen(kind, seed=seed, decks_per_day=decks_per_day, days=days)
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

    from gpuscale.cli.queue import open_queue, run_db
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


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)
    app.add_typer(trace_app, name="trace")
