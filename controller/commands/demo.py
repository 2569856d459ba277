"""``gpuscale demo``: the whole loop on a laptop."""

from __future__ import annotations

import typer

from controller.cli import not_built


def demo() -> None:
    """Run the whole loop locally: PostgreSQL, emulator, Ollama stand-in, controller, sample decks."""
    raise not_built("demo")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
