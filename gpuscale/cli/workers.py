"""Worker command: ``gpuscale worker --pool P``.

Runs the worker runtime (:mod:`gpuscale.worker.runtime`) for one pool until SIGTERM/SIGINT, then drains.
Settings come from the environment (:class:`gpuscale.worker.settings.WorkerSettings`, prefix
``GPUSCALE_``); the options here override the most common ones for local runs.
"""

from __future__ import annotations

import asyncio

import typer

from gpuscale.cli.errors import fail


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
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise fail(f"bad worker settings: {problems}") from None
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


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
