"""Controller commands: ``controller`` and ``pool pause|resume``."""

from __future__ import annotations

import asyncio
import getpass
import socket
from pathlib import Path

import typer

from gpuscale.cli.errors import fail

pool_app = typer.Typer(help="Pause or resume scaling of a pool.", no_args_is_help=True)


def _load_config(pools_file: Path | None):  # type: ignore[no-untyped-def]
    from gpuscale.common.settings import get_settings
    from gpuscale.controller.pools import PoolsFileError, load_pools

    path = pools_file or get_settings().pools_file
    try:
        return load_pools(path)
    except PoolsFileError as exc:
        raise fail(str(exc)) from None


def controller(
    pools_file: Path | None = typer.Option(
        None, "--pools", help="Pools file (default: GPUSCALE_POOLS_FILE or deploy/datacrunch/pools.yaml)."
    ),
    provider: str | None = typer.Option(
        None, "--provider", help="datacrunch, docker or local (default: GPUSCALE_PROVIDER or local)."
    ),
    http_port: int | None = typer.Option(
        None, "--http-port", help="Port of /metrics and the ops API (default: GPUSCALE_HTTP_PORT or 9100)."
    ),
    http_host: str | None = typer.Option(
        None, "--http-host", help="Address to serve on (default 127.0.0.1)."
    ),
    interval: float | None = typer.Option(
        None, "--interval", min=0.1, help="Seconds between reconciles (default: the pools file's)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Observe and decide, log and record; change nothing at the provider."
    ),
    once: bool = typer.Option(False, "--once", help="Reconcile every pool once and exit (0 when it ran)."),
) -> None:
    """Run the autoscaling controller: observe → decide → act, every tick, as leader or standby."""
    from gpuscale.common.settings import Settings
    from gpuscale.db import resolve_dsn

    config = _load_config(pools_file)
    overrides: dict[str, object] = {}
    if provider is not None:
        if provider not in ("datacrunch", "docker", "local"):
            raise fail(f"--provider must be datacrunch, docker or local, not {provider!r}")
        overrides["provider"] = provider
    if http_port is not None:
        overrides["http_port"] = http_port
    if http_host is not None:
        overrides["http_host"] = http_host
    if interval is not None:
        overrides["reconcile_interval_s"] = interval
    settings = Settings(**overrides)  # type: ignore[arg-type]

    from gpuscale.common.errors import ConfigError
    from gpuscale.controller.app import ControllerApp

    dsn = resolve_dsn(settings)
    app = ControllerApp(settings, config, dsn, dry_run=dry_run, http=not once)
    try:
        if once:
            ran, why = asyncio.run(app.run_once())
            if not ran:
                raise fail(f"reconcile did not run: {why}", code=1)
            if why:
                typer.echo(f"reconciled with errors: {why}")
            for view in app.reconciler.views.values():
                d = view.last_decision or {}
                typer.echo(
                    f"{view.name}: {view.replicas_provider if view.replicas_provider is not None else '?'}"
                    f" → {d.get('desired')} ({d.get('reason')}, {d.get('outcome')})"
                )
            return
        asyncio.run(app.run())
    except ConfigError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"cannot start the controller: {exc}", code=1) from None


def _set_paused(pool: str, paused: bool, pools_file: Path | None) -> None:
    from gpuscale.cli.database import open_queue, run_db
    from gpuscale.controller.store import ControllerStore

    config = _load_config(pools_file)
    if pool not in config.pools:
        raise fail(f"unknown pool {pool!r}; pools: {', '.join(config.pools)}")

    async def run() -> None:
        async with open_queue(max_size=2) as q:
            await ControllerStore(q.db).set_paused(
                pool, paused, f"{getpass.getuser()}@{socket.gethostname()}"
            )

    run_db(run)
    typer.echo(f"pool {pool}: {'paused (replicas stay as they are)' if paused else 'resumed'}")


_POOLS_OPT = typer.Option(None, "--pools", help="Pools file (default: GPUSCALE_POOLS_FILE).")


@pool_app.command("pause")
def pause(pool: str = typer.Argument(..., help="Pool name."), pools_file: Path | None = _POOLS_OPT) -> None:
    """Pause a pool: the controller keeps its replicas as they are until resumed."""
    _set_paused(pool, True, pools_file)


@pool_app.command("resume")
def resume(pool: str = typer.Argument(..., help="Pool name."), pools_file: Path | None = _POOLS_OPT) -> None:
    """Resume scaling of a paused pool."""
    _set_paused(pool, False, pools_file)


def register(app: typer.Typer) -> None:
    app.command("controller")(controller)
    app.add_typer(pool_app, name="pool")
