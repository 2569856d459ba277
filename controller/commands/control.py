"""Controller commands: ``controller`` and ``pool pause|resume``."""

from __future__ import annotations

import typer

from controller.cli import not_built

pool_app = typer.Typer(help="Pause or resume scaling of a pool.", no_args_is_help=True)


def controller() -> None:
    """Run the autoscaling controller (observe → decide → act every tick)."""
    raise not_built("controller")


@pool_app.command("pause")
def pause(pool: str) -> None:
    """Pause a pool: its replicas stay as they are."""
    raise not_built("pool pause")


@pool_app.command("resume")
def resume(pool: str) -> None:
    """Resume scaling of a paused pool."""
    raise not_built("pool resume")


def register(app: typer.Typer) -> None:
    app.command("controller")(controller)
    app.add_typer(pool_app, name="pool")
