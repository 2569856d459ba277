"""Simulator commands: ``simulate`` and ``trace generate``."""

from __future__ import annotations

import typer

from controller.cli import not_built

trace_app = typer.Typer(help="Load traces for the simulator.", no_args_is_help=True)


def simulate() -> None:
    """Replay a trace against a scaling policy with a virtual clock."""
    raise not_built("simulate")


@trace_app.command("generate")
def generate() -> None:
    """Write a realistic trace from the seeds' numbers."""
    raise not_built("trace generate")


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)
    app.add_typer(trace_app, name="trace")
