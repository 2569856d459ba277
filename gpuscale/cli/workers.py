"""Worker commands: ``gpuscale worker --pool P`` and ``gpuscale bench ollama``.

Runs the worker runtime (:mod:`gpuscale.worker.runtime`) for one pool until SIGTERM/SIGINT, then drains.
Settings come from the environment (:class:`gpuscale.worker.settings.WorkerSettings`, prefix
``GPUSCALE_``); the options here override the most common ones for local runs.
"""

from __future__ import annotations

import asyncio

import typer

from gpuscale.cli.errors import fail
from gpuscale.cli.groups import bench_app


def worker(
    pool: str = typer.Option(..., "--pool", help="Pool to serve: visual, text, or bench (noop tasks)."),
    port: int | None = typer.Option(
        None,
        "--port",
        help="HTTP port for /api/health and /metrics (env GPUSCALE_WORKER_PORT; 0 = any free).",
    ),
    host: str | None = typer.Option(None, "--host", help="HTTP bind address (env GPUSCALE_WORKER_HOST)."),
    concurrency: int | None = typer.Option(
        None, "--concurrency", min=1, max=64, help="Tasks run at once (default per pool)."
    ),
) -> None:
    """Run a worker: register, heartbeat, claim and run tasks of one pool; drain on SIGTERM."""
    from pydantic import ValidationError

    from gpuscale.common.settings import describe_settings_error
    from gpuscale.db.connect import resolve_dsn
    from gpuscale.queue import tasktypes
    from gpuscale.worker.runtime import run_worker
    from gpuscale.worker.settings import WorkerSettings

    pools = sorted({t.pool for t in tasktypes.all_types().values()})
    if pool not in pools:
        raise fail(f"unknown pool {pool!r}; pools with task types: {', '.join(pools)}")
    try:
        settings = WorkerSettings()
    except ValidationError as exc:
        raise fail(describe_settings_error(exc)) from None
    updates: dict[str, object] = {}
    if port is not None:
        if not 0 <= port <= 65535:
            raise fail(f"--port must be 0..65535, not {port}")
        updates["worker_port"] = port
    if host is not None:
        updates["worker_host"] = host
    if concurrency is not None:
        updates["concurrency"] = concurrency
    if updates:
        settings = settings.model_copy(update=updates)
    dsn = resolve_dsn()
    code = asyncio.run(run_worker(pool, dsn=dsn, settings=settings))
    if code:
        raise typer.Exit(code)


def bench_ollama(
    model: str = typer.Option(..., "--model", help="Ollama model, e.g. gemma3:12b."),
    max_parallel: int = typer.Option(4, "--max-parallel", min=1, max=64, help="Measure 1..N at once."),
    pool: str = typer.Option("visual", "--pool", help="Whose real requests to send: visual or text."),
    host: str | None = typer.Option(None, "--host", help="Ollama server (default: OLLAMA_HOST)."),
    rounds: int = typer.Option(2, "--rounds", min=1, max=100, help="Requests per stream at each level."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Measure requests/s and latency at 1..N concurrent requests against an Ollama server with the
    pool's real prompts; print the pools-file lines (parallel, batching) to paste.

    The server must run with OLLAMA_NUM_PARALLEL >= N, or it serves one request at a time."""
    import json

    from gpuscale.worker.bench_ollama import Level, run_bench_ollama
    from gpuscale.worker.errors import OllamaError
    from gpuscale.worker.settings import WorkerSettings

    if pool not in ("visual", "text"):
        raise fail(f"--pool must be visual or text, not {pool!r}")
    server = host or WorkerSettings().ollama_host

    def show(lv: Level) -> None:
        if not as_json:
            typer.echo(
                f"{lv.parallel:>3} at once: {lv.per_s:8.3f} requests/s  latency p50 {lv.latency_p50_s:7.2f}s"
                f"  max {lv.latency_max_s:7.2f}s  ({lv.requests} requests)"
            )

    try:
        result = asyncio.run(
            run_bench_ollama(
                server, model, pool=pool, max_parallel=max_parallel, rounds=rounds, on_level=show
            )
        )
    except OllamaError as exc:
        raise fail(f"ollama at {server}: {exc}") from None
    if as_json:
        typer.echo(json.dumps(result.to_dict(), sort_keys=True))
        return
    typer.echo("")
    typer.echo(f"# paste into the {pool} pool of the pools file:")
    for line in result.pools_lines():
        typer.echo(line)


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
    bench_app.command("ollama")(bench_ollama)
