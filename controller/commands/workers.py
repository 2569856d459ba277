"""Worker command: ``worker --pool P``."""

from __future__ import annotations

import typer

from controller.cli import not_built


def worker(pool: str = typer.Option(..., "--pool", help="Pool to serve: visual or text.")) -> None:
    """Run a worker: register, heartbeat, claim and run tasks of one pool."""
    raise not_built("worker")


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
