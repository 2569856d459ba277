"""The command groups that more than one CLI module adds commands to (``gpuscale bench ...``).

Kept apart so command modules never import each other; :mod:`gpuscale.cli.app` mounts them.
"""

from __future__ import annotations

import typer

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (print numbers; not tests).", no_args_is_help=True)
