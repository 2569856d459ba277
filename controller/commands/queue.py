"""Queue commands: ``db migrate``, ``enqueue``, ``submit-deck``, ``status``, ``bench queue``."""

from __future__ import annotations

import asyncio

import typer

from controller.cli import not_built

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (print numbers; not tests).", no_args_is_help=True)


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply pending schema migrations (idempotent, safe to run concurrently)."""
    from controller.db import Database, migrate

    async def run() -> None:
        async with Database(max_size=1) as pool, pool.acquire() as conn:
            applied = await migrate(conn)
        typer.echo(f"applied {len(applied)} migration(s)" if applied else "schema is up to date")

    asyncio.run(run())


def enqueue() -> None:
    """Enqueue one task."""
    raise not_built("enqueue")


def submit_deck() -> None:
    """Submit a pitch-deck PDF: creates its whole task graph."""
    raise not_built("submit-deck")


def status() -> None:
    """Show pools, queue counts and servers."""
    raise not_built("status")


@bench_app.command("queue")
def bench_queue() -> None:
    """Enqueue and drain no-op tasks; print throughput."""
    raise not_built("bench queue")


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
    app.command("enqueue")(enqueue)
    app.command("submit-deck")(submit_deck)
    app.command("status")(status)
    app.add_typer(bench_app, name="bench")
