"""Provider commands: ``gpuscale deploy apply`` and ``gpuscale emulator``.

``deploy apply`` expands a slotted spec (``_replica_slots: N``, see
:mod:`gpuscale.controller.deployspec`) into its N one-replica deployments and applies each.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import typer

from gpuscale.cli.errors import fail

deploy_app = typer.Typer(help="DataCrunch deployments.", no_args_is_help=True)


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, str) else f"'{value}'"


async def _apply(files: list[Path], dry_run: bool) -> int:
    from gpuscale.common.errors import ConfigError
    from gpuscale.common.settings import get_settings
    from gpuscale.controller import deployspec
    from gpuscale.controller.providers import datacrunch_client
    from gpuscale.controller.providers.base import ProviderError

    # Every deployment of every file (a pool's fallback deployments share its file), slotted
    # ones expanded into their slots (``_replica_slots``: one DataCrunch deployment per replica).
    specs: list[dict[str, Any]] = []
    origins: list[Path] = []
    logical: list[str] = []  # the spec's own name, for a slotted deployment's summary line
    try:
        for path in files:
            for spec in deployspec.load_all(path):
                for item in deployspec.expand(spec):
                    specs.append(item)
                    origins.append(path)
                    logical.append(spec["name"])
    except deployspec.SpecError as exc:
        raise fail(str(exc)) from None
    names = [s["name"] for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise fail(f"deployment {', '.join(duplicates)} is defined twice (slots included)")
    settings = get_settings()
    volume_id = (settings.shared_volume_id or "").strip()
    for i, (spec, path) in enumerate(zip(specs, origins, strict=True)):
        unfilled = deployspec.placeholders(spec)
        if unfilled and not volume_id:
            raise fail(
                f"{path}: {spec['name']}: {unfilled[0]} is {deployspec.VOLUME_PLACEHOLDER}; set "
                "GPUSCALE_SHARED_VOLUME_ID to the id of the shared filesystem the containers mount"
            )
        if unfilled:
            specs[i] = deployspec.fill_volume_id(spec, volume_id)

    try:
        client = datacrunch_client(settings, purpose="deploy apply")
    except ConfigError as exc:
        raise fail(str(exc)) from None
    suffix = " (dry run: nothing changed)" if dry_run else ""
    try:
        existing = {str(d.get("name")) for d in await client.list_deployments()}
        unchanged: dict[str, int] = {}  # per slotted deployment, its slots left as they are
        for spec, path, base in zip(specs, origins, logical, strict=True):
            name = spec["name"]
            current = await client.get_deployment(name) if name in existing else None
            changes = deployspec.diff(current, spec)
            if current is None:
                first = deployspec.slot_name(base, 0)
                if name not in (base, first):
                    # Slots after the first are the same spec: one line each, not the spec again.
                    typer.echo(f"{name}: create from {path}, as {first}{suffix}")
                else:
                    typer.echo(f"{name}: create from {path}{suffix}")
                    for key, _, new in changes:
                        typer.echo(f"  + {key} = {_show(new)}")
                    typer.echo(
                        f"  + scaling.min_replica_count = {spec['scaling']['min_replica_count']}, "
                        f"max_replica_count = {spec['scaling']['max_replica_count']}"
                    )
                if not dry_run:
                    await client.create_deployment(spec)
            elif not changes:
                if name == base:
                    typer.echo(f"{name}: unchanged")
                else:
                    unchanged[base] = unchanged.get(base, 0) + 1
            else:
                typer.echo(f"{name}: update, {len(changes)} change(s) from {path}{suffix}")
                for key, old, new in changes:
                    typer.echo(f"  ~ {key}: {_show(old)} -> {_show(new)}")
                if not dry_run:
                    await client.update_deployment(name, deployspec.update_body(current, spec))
        for base, n in unchanged.items():
            total = logical.count(base)
            typer.echo(f"{base}: {n} of {total} slot(s) unchanged ({deployspec.slot_name(base, 0)} …)")
        for base in dict.fromkeys(b for b, s in zip(logical, specs, strict=True) if s["name"] != b):
            if base in existing:
                # The controller keeps using a plain deployment of the logical name while it
                # exists (its replicas would run on, unmanaged, if it switched to the slots).
                typer.secho(
                    f"note: {base} also exists as one plain deployment; the controller keeps using it "
                    f"until it is deleted (scale it to 0 first), then uses the slots",
                    err=True,
                    fg=typer.colors.YELLOW,
                )
        plain = {s["name"] for s in specs if s["name"] in logical}
        for base in sorted(plain):
            left = sorted(n for n in existing if n != base and deployspec.logical_name(n, (base,)) == base)
            if left:
                # The other way round (a rollback to a spec without slots): the controller then
                # drives the plain deployment only, and a slot still pinned to a replica would run
                # on, billed and unmanaged.
                typer.secho(
                    f"note: {base} also exists as {len(left)} slot deployment(s) ({left[0]} …); "
                    "while the plain one exists the controller drives only it: pin the slots to 0 "
                    "and delete them",
                    err=True,
                    fg=typer.colors.YELLOW,
                )
    except ProviderError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        return 1
    finally:
        await client.aclose()
    return 0


@deploy_app.command("apply")
def apply(
    files: list[Path] = typer.Argument(..., help="Deployment specs, e.g. deploy/datacrunch/visual.yaml."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the changes without making them."),
) -> None:
    """Create or update DataCrunch deployments from YAML specs, idempotently.

    Shows what changes; changes nothing when the deployment already matches.  The replica counts
    of an existing deployment are the controller's and are left as they are.  A spec with
    ``_replica_slots: N`` is created as N deployments NAME-r00 … (one replica each), so the
    controller can stop exactly the replica it chooses.
    """
    specs = [f for f in files if f.name != "pools.yaml"]  # the pool rules live next to the specs
    if not specs:
        raise fail("no deployment spec given (pools.yaml holds pool rules, not a deployment)")
    code = asyncio.run(_apply(specs, dry_run))
    if code:
        raise typer.Exit(code)


async def _prices(currency: str) -> list[dict[str, Any]]:
    from gpuscale.common.errors import ConfigError
    from gpuscale.common.settings import get_settings
    from gpuscale.controller.prices import parse_container_types
    from gpuscale.controller.providers import datacrunch_client

    try:
        client = datacrunch_client(get_settings(), purpose="deploy prices")
    except ConfigError as exc:
        raise fail(str(exc)) from None
    try:
        types = parse_container_types(await client.get_container_types(currency))
    finally:
        await client.aclose()
    return [
        {
            "model": t.model,
            "name": t.name,
            "gpus": t.gpus,
            "gpu_memory_gb": t.gpu_memory_gb,
            "on_demand_per_hour": t.on_demand,
            "spot_per_hour": t.spot,
            "spot_saving": round(1 - t.spot / t.on_demand, 3) if t.on_demand else None,
            "currency": t.currency,
        }
        for t in sorted(types, key=lambda t: (-t.on_demand, t.model))
    ]


@deploy_app.command("prices")
def prices(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    currency: str = typer.Option("usd", "--currency", help="usd or eur."),
) -> None:
    """List the GPU types' container prices per hour, on demand and spot (GET /container-types).

    The controller prices each deployment's replicas with these (its compute type and is_spot);
    the pools file's prices are the fallback when the API cannot be read."""
    import json

    from gpuscale.controller.providers.base import ProviderError

    currency = currency.strip().lower()
    if currency not in ("usd", "eur"):
        raise fail(f"--currency must be usd or eur, not {currency!r}")
    try:
        rows = asyncio.run(_prices(currency))
    except ProviderError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Container prices per GPU-hour ({currency.upper()})")
    for col, justify in (
        ("GPU", "left"),
        ("type", "left"),
        ("memory", "right"),
        ("on demand", "right"),
        ("spot", "right"),
        ("spot saves", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        mem = f"{r['gpu_memory_gb']:g} GB" if r["gpu_memory_gb"] else ""
        saving = f"{r['spot_saving']:.0%}" if r["spot_saving"] is not None else ""
        table.add_row(
            r["model"],
            r["name"],
            mem,
            f"{r['on_demand_per_hour']:.2f}",
            f"{r['spot_per_hour']:.2f}",
            saving,
        )
    Console().print(table)


def emulator(
    port: int = typer.Option(
        None, "--port", help="Port on 127.0.0.1 (default GPUSCALE_EMULATOR_PORT, 8765)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    cold_start: float = typer.Option(2.0, "--cold-start", min=0, help="Seconds before a new replica starts."),
    grace: float = typer.Option(10.0, "--grace", min=0, help="Seconds between SIGTERM and SIGKILL."),
    faults: str = typer.Option(
        "",
        "--faults",
        help="Fault spec, e.g. 'throttle=0.2,error=0.1,quota=2', 'quota=DEPLOYMENT' (sold out), "
        "'preempt=0.5' (spot replicas per replica-hour), 'preempt=next:1' or 'preempt=after:30'.",
    ),
    command: str = typer.Option(
        None,
        "--command",
        help="Replica command when a deployment has no entrypoint override; {pool} and {python} "
        "are filled in (default: gpuscale worker --pool {pool}).",
    ),
    secret: list[str] = typer.Option(
        [], "--secret", help="NAME=VALUE for a secret reference (repeatable); else the environment."
    ),
    stop_order: str = typer.Option("random", "--stop-order", help="Which replica a scale-down stops."),
    spawn_early: bool = typer.Option(
        False,
        "--spawn-early",
        help="Start a replica's process at once; it registers when its cold start ends (replay).",
    ),
    log_dir: Path = typer.Option(None, "--log-dir", help="Write each replica's output to DIR/<id>.log."),
    shared_dir: Path = typer.Option(
        Path(".gpuscale/emulator/shared"),
        "--shared-dir",
        help="Local stand-in for shared filesystem mounts: volume V is DIR/V on this host.",
    ),
    client_id: str = typer.Option(
        None,
        "--client-id",
        help="OAuth2 client id it accepts (default GPUSCALE_EMULATOR_CLIENT_ID, DATACRUNCH_CLIENT_ID or "
        "'emulator'); the secret comes from GPUSCALE_EMULATOR_CLIENT_SECRET or DATACRUNCH_CLIENT_SECRET "
        "(default 'emulator-secret'), never from a flag.",
    ),
) -> None:
    """Serve an emulator of the DataCrunch container API on loopback.

    Deployments live in memory; replicas are real local worker processes.  Point the controller
    at it with DATACRUNCH_BASE_URL=http://127.0.0.1:PORT/v1 and the same client id and secret.
    """
    from gpuscale.common.settings import get_settings
    from gpuscale.dev.emulator import EmulatorConfig, FaultSpecError, parse_faults, serve_forever
    from gpuscale.dev.emulator.app import DEFAULT_COMMAND

    settings = get_settings()
    try:
        parsed = parse_faults(faults)
    except FaultSpecError as exc:
        raise fail(f"--faults: {exc}") from None
    if stop_order not in ("random", "newest", "oldest"):
        raise fail("--stop-order must be random, newest or oldest")
    secrets: dict[str, str] = {}
    for item in secret:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise fail(
                "--secret expects NAME=VALUE (an item had no '=' or no name; not shown: it may be a secret)"
            )
        secrets[name] = value
    client_id = client_id or settings.emulator_client_id or settings.datacrunch_client_id or "emulator"
    secret_value = settings.emulator_client_secret or settings.datacrunch_client_secret
    config = EmulatorConfig(
        client_id=client_id,
        client_secret=secret_value.get_secret_value() if secret_value else "emulator-secret",
        cold_start_s=cold_start,
        grace_s=grace,
        default_command=command or DEFAULT_COMMAND,
        secrets=secrets,
        stop_order=stop_order,  # type: ignore[arg-type]
        spawn_early=spawn_early,
        log_dir=log_dir,
        faults=parsed,
        shared_dir=shared_dir,
    )
    listen = port if port is not None else settings.emulator_port
    typer.echo(
        f"DataCrunch emulator: DATACRUNCH_BASE_URL=http://{host}:{listen}/v1 "
        f"DATACRUNCH_CLIENT_ID={client_id}"
        + ("" if secret_value else " DATACRUNCH_CLIENT_SECRET=emulator-secret")
    )
    asyncio.run(serve_forever(config, host, listen))


def register(app: typer.Typer) -> None:
    app.add_typer(deploy_app, name="deploy")
    app.command("emulator")(emulator)
