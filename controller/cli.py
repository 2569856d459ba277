"""The ``gpuscale`` command line (typer).

Each area registers its commands from its own module under :mod:`controller.commands`, so the
root only assembles them.  Usage errors exit 2 (click's convention); so do configuration errors
(:class:`ConfigError`), with the file, the field and what is wrong.
"""

from __future__ import annotations

import logging
import sys

import typer

from controller import __version__

app = typer.Typer(
    name="gpuscale",
    help="Autoscaling controller for on-demand GPU containers, driven by a PostgreSQL task queue.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class ConfigError(Exception):
    """Bad configuration or arguments found after parsing: printed, then exit 2."""


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def not_built(command: str) -> typer.Exit:
    return fail(f"`gpuscale {command}` is not built yet")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gpuscale {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
    log_level: str = typer.Option("INFO", "--log-level", envvar="GPUSCALE_LOG_LEVEL", help="Log level."),
    log_format: str = typer.Option(
        "text", "--log-format", envvar="GPUSCALE_LOG_FORMAT", help="Log format: text or json."
    ),
) -> None:
    from controller.logs import setup_logging

    if log_format not in ("text", "json"):
        raise fail(f"--log-format must be 'text' or 'json', not {log_format!r}")
    setup_logging(log_level, log_format)


def _register_all() -> None:
    from controller.commands import control, demo, providers, queue, sim, workers

    for module in (queue, control, workers, sim, providers, demo):
        module.register(app)


# Run as ``python -m controller.cli`` this file is ``__main__`` and the command modules import the
# real ``controller.cli``: only that copy registers the commands, and ``__main__`` delegates to it.
if __name__ != "__main__":
    _register_all()


def main() -> None:
    from controller.db.embedded import stop_on_signals

    stop_on_signals()
    try:
        app()
    except ConfigError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    finally:
        logging.shutdown()


if __name__ == "__main__":
    from controller import cli as _cli

    _cli.main()
