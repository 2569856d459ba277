"""Provider commands: ``deploy apply`` and ``emulator``."""

from __future__ import annotations

import typer

from controller.cli import not_built

deploy_app = typer.Typer(help="DataCrunch deployments.", no_args_is_help=True)


@deploy_app.command("apply")
def apply() -> None:
    """Create or update deployments from YAML specs, idempotently."""
    raise not_built("deploy apply")


def emulator() -> None:
    """Serve an emulator of the DataCrunch container API on loopback."""
    raise not_built("emulator")


def register(app: typer.Typer) -> None:
    app.add_typer(deploy_app, name="deploy")
    app.command("emulator")(emulator)
