"""The ``gpuscale`` command line (typer).

Each area registers its commands from its own module in this package, so the root only
assembles them.  Usage errors exit 2 (click's convention); so do configuration errors
(:class:`ConfigError`), with the file, the field and what is wrong, and settings from the
environment that do not validate (the variable and the problem, never its value).
"""

from __future__ import annotations

import logging
import sys

import typer

from gpuscale import __version__
from gpuscale.cli import api, control, demo, providers, queue, replay, sim, workers
from gpuscale.cli.errors import fail
from gpuscale.common.errors import ConfigError

app = typer.Typer(
    name="gpuscale",
    help="Autoscaling controller for on-demand GPU containers, driven by a PostgreSQL task queue.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
    from gpuscale.common.logs import setup_logging

    if log_format not in ("text", "json"):
        raise fail(f"--log-format must be 'text' or 'json', not {log_format!r}")
    setup_logging(log_level, log_format)


for _module in (queue, control, workers, sim, providers, demo, api, replay):
    _module.register(app)


def main() -> None:
    from gpuscale.db.embedded import stop_on_signals

    stop_on_signals()
    try:
        app()
    except ConfigError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except Exception as exc:
        # Imported here, not at the top, so that `--help` stays quick.
        from pydantic import ValidationError

        from gpuscale.common.settings import describe_settings_error, is_settings_error

        if not (isinstance(exc, ValidationError) and is_settings_error(exc)):
            raise  # a bug, not bad input: keep the traceback
        typer.secho(f"error: {describe_settings_error(exc)}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    finally:
        logging.shutdown()
