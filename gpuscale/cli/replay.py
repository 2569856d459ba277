"""``gpuscale replay``: a trace against a real stack (the demo's by default), compared with the
simulator on the same trace and pools (see :mod:`gpuscale.dev.replay`)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import typer

from gpuscale.cli.errors import fail

# The keys --compare puts side by side (those of `gpuscale simulate --json` that measure the run).
COMPARED = (
    "cost_usd",
    "oracle_cost_usd",
    "wait_p50_s",
    "wait_p95_s",
    "graph_p50_s",
    "graph_p95_s",
    "tasks",
    "unfinished",
)


def _with_replica_seconds(data: dict[str, Any], result: Any) -> dict[str, Any]:
    data["replica_seconds"] = {name: round(p.replica_seconds, 1) for name, p in result.pools.items()}
    return data


def _cell(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _ratio(a: Any, b: Any) -> float | None:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or b == 0:
        return None
    return round(a / b, 3)


def compare_rows(real: dict[str, Any], sim: dict[str, Any]) -> list[tuple[str, Any, Any, float | None]]:
    rows: list[tuple[str, Any, Any, float | None]] = [
        (k, real[k], sim[k], _ratio(real[k], sim[k])) for k in COMPARED
    ]
    for pool, seconds in real["replica_seconds"].items():
        other = sim["replica_seconds"].get(pool, 0.0)
        rows.append((f"replica_seconds.{pool}", seconds, other, _ratio(seconds, other)))
    rows.append(("scale_events", sum(real["scale_events"].values()), sum(sim["scale_events"].values()), None))
    return rows


def replay(
    trace: Path = typer.Option(..., "--trace", help="Trace CSV (as for gpuscale simulate)."),
    pools: Path = typer.Option(
        None, "--pools", help="Pools file (default: GPUSCALE_POOLS_FILE or deploy/datacrunch/pools.yaml)."
    ),
    speed: float = typer.Option(15.0, "--speed", min=0.1, max=1000, help="K: trace seconds per wall second."),
    start: str = typer.Option("0", "--start", help="Replay from this trace time (e.g. 9h)."),
    length: str | None = typer.Option(None, "--length", help="Replay this much trace time (e.g. 2h)."),
    data_dir: Path = typer.Option(Path(".gpuscale/replay"), "--data-dir", help="Logs, PostgreSQL, specs."),
    database_url: str | None = typer.Option(
        None, "--database-url", help="Use this (empty) database instead of an embedded PostgreSQL."
    ),
    provider: str = typer.Option(
        "emulator",
        "--provider",
        help="emulator: the DataCrunch emulator with replay workers here; configured: the DataCrunch "
        "account of DATACRUNCH_* (its deployments are applied in replay mode; needs --database-url "
        "that its replicas can reach; its cold starts are not divided by --speed).",
    ),
    compare: bool = typer.Option(False, "--compare", help="Also simulate the same trace; print both."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Replay a trace on real processes: the emulator's replicas are real workers, the controller
    runs with every duration of the pools file divided by --speed, tasks take service_s / speed.
    Reports in trace time the keys of `gpuscale simulate --json` plus replica_seconds per pool."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from gpuscale.controller.pools import PoolsFileError, load_pools, parse_duration
    from gpuscale.controller.simulate.engine import simulate as run_sim
    from gpuscale.controller.simulate.engine import stop_order
    from gpuscale.controller.simulate.report import summary
    from gpuscale.controller.simulate.trace import TraceError, read_trace
    from gpuscale.dev.replay import Progress as ReplayProgress
    from gpuscale.dev.replay import ReplayError, ReplayOptions, slice_trace
    from gpuscale.dev.replay import replay as run_replay
    from gpuscale.dev.stack import ProcessFailed

    if pools is None:
        from gpuscale.common.settings import get_settings

        pools = get_settings().pools_file
    try:
        start_s = parse_duration(start)
        length_s = None if length is None else parse_duration(length)
    except ValueError as exc:
        raise fail(f"--start/--length: {exc}") from None
    try:
        config = load_pools(pools)
        tasks = slice_trace(read_trace(trace), start_s, length_s)
    except (PoolsFileError, TraceError) as exc:
        raise fail(str(exc)) from None
    if not tasks:
        raise fail(f"{trace}: no task arrives in the chosen slice")
    if provider not in ("emulator", "configured"):
        raise fail(f"--provider must be emulator or configured, not {provider!r}")
    if provider == "configured" and not database_url:
        raise fail("--provider configured needs --database-url (its replicas must reach the database)")
    sim_data: dict[str, Any] | None = None
    sim_timeline: dict[str, Any] = {}
    # Pools that say ``scale_down_victims: idle`` run one deployment per replica (the specs'
    # ``_replica_slots``): the controller stops the idle replica it names, and so does the
    # simulator.  On a plain deployment the emulator, like DataCrunch, picks the replica itself:
    # the newest (``--stop-order newest``), which the simulator then follows.
    victims = "newest" if stop_order(config) == "any" else "idle"
    if compare:
        try:
            sim = run_sim(tasks, config, victims=victims)
        except TraceError as exc:
            raise fail(str(exc)) from None
        sim_data = _with_replica_seconds(summary(sim), sim)
        from gpuscale.controller.simulate.engine import timeline

        sim_timeline = timeline(tasks, config, victims=victims)

    console = Console(stderr=True)
    options = ReplayOptions(speed=speed, data_dir=data_dir, database_url=database_url, provider=provider)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=as_json and not console.is_terminal,
    ) as bar:
        job = bar.add_task("starting", total=len(tasks))

        def say(msg: str) -> None:
            bar.update(job, description=msg)

        def show(p: ReplayProgress) -> None:
            reps = " ".join(f"{n} {c}" for n, c in sorted(p.replicas.items()))
            bar.update(
                job,
                completed=p.done,
                description=f"trace {p.trace_s / 3600:5.2f} h / {p.trace_end_s / 3600:.2f} h · {p.phase} · "
                f"replicas {reps}",
            )

        try:
            result, facts = asyncio.run(run_replay(tasks, config, options, say=say, on_progress=show))
        except (ReplayError, ProcessFailed) as exc:
            raise fail(f"replay: {exc}") from None
    data = _with_replica_seconds(summary(result), result)
    data["replay"] = facts
    if sim_data is not None:
        # Beside the replay's timeline.json, to compare them deck by deck.
        (data_dir / "timeline-sim.json").write_text(json.dumps(sim_timeline, indent=0))
    if as_json:
        out: dict[str, Any] = data if sim_data is None else {"replay": data, "simulate": sim_data}
        if sim_data is not None:
            out["ratio"] = {k: r for k, _a, _b, r in compare_rows(data, sim_data)}
        typer.echo(json.dumps(out, sort_keys=True))
        return
    if sim_data is None:
        from gpuscale.controller.simulate.report import format_text

        typer.echo(format_text(data))
        typer.echo(f"replica seconds {data['replica_seconds']}  ·  run {facts}")
        return
    table = Table(title=f"{trace.name}: replay at {speed:g}× vs simulate ({len(tasks)} tasks)")
    for col in ("", "real", "simulated", "real / sim"):
        table.add_column(col, justify="right" if col else "left")
    for key, a, b, r in compare_rows(data, sim_data):
        table.add_row(key, _cell(a), _cell(b), "" if r is None else f"{r:.2f}")
    Console().print(table)
    typer.echo(f"run: {facts}")
    if facts.get("registered_late"):
        late, worst = facts["registered_late"], facts["registered_late_max_s"]
        typer.echo(
            f"note: {late} replica(s) registered up to {worst:g} s (trace) after their cold start: "
            f"workers could not start within cold_start / {speed:g} here (load {facts.get('load_avg_1m')}), "
            "while the simulator's start on time. Try a lower --speed.",
            err=True,
        )


def register(app: typer.Typer) -> None:
    app.command("replay")(replay)
