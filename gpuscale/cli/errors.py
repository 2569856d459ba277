"""How a command says it cannot go on: one red line on stderr and an exit status (2: bad input)."""

from __future__ import annotations

import typer


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)
