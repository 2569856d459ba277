"""The package's shape: modules import one way, the product never imports the development tools.

The import graph is read from the source (``ast``), every ``import`` counted wherever it stands:
at module level, inside a function (the lazy imports the CLI uses to keep ``--help`` fast), or
under ``TYPE_CHECKING``.  A cycle anywhere fails; so does a product module importing
``gpuscale.dev`` (only the CLI may, to offer ``demo`` and ``emulator``).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gpuscale"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The gpuscale module ``name`` refers to (a module, or the package holding a name)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The gpuscale modules ``module`` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # ``from pkg import mod`` imports the submodule ``pkg.mod`` when there is one.
            targets = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
        for target in targets:
            if not target.startswith("gpuscale"):
                continue
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != module:
                out.add(resolved)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    # Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first: a package's own
    # imports are part of what importing anything inside it does.
    for name in modules:
        for parent in _parents(name):
            if parent in modules and parent != name:
                graph[name].add(parent)
    return graph


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    # A package importing its own submodules (``gpuscale/queue/__init__`` re-exporting
    # ``gpuscale.queue.tasks``) is how packages work, not a cycle: leave those edges out.
    edges = {n: {d for d in deps if not d.startswith(n + ".")} for n, deps in graph.items()}
    try:
        graphlib.TopologicalSorter(edges).prepare()
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def test_the_import_graph_is_read_from_every_kind_of_import() -> None:
    """The reader sees module-level, relative, lazy (in a function) and TYPE_CHECKING imports."""
    graph = import_graph()
    assert "gpuscale.cli.errors" in graph["gpuscale.cli.queue"]  # module level
    assert "gpuscale.dev.demo.run" in graph["gpuscale.cli.demo"]  # inside a function
    assert "gpuscale.queue.tasks" in graph["gpuscale.queue"]  # the package re-exports it
    assert "gpuscale.queue" in graph["gpuscale.queue.tasks"]  # importing it runs the package first


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _cycle({"p": {"p.x"}, "p.x": {"p"}}) is None  # a package and its own submodule


def test_no_import_cycles() -> None:
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


PRODUCT_MAY_NOT_IMPORT = ("gpuscale.dev", "gpuscale.cli")


@pytest.mark.parametrize("forbidden", PRODUCT_MAY_NOT_IMPORT)
def test_product_modules_import_neither_the_dev_tools_nor_the_cli(forbidden: str) -> None:
    """Only the CLI may import gpuscale.dev (for ``demo``, ``emulator``); nothing imports the CLI."""
    graph = import_graph()
    offenders = sorted(
        f"{module} imports {dep}"
        for module, deps in graph.items()
        if not module.startswith(("gpuscale.cli", "gpuscale.dev")) and module != "gpuscale.__main__"
        for dep in deps
        if dep == forbidden or dep.startswith(forbidden + ".")
    )
    assert offenders == []


def test_the_dev_tools_do_not_import_the_cli() -> None:
    graph = import_graph()
    offenders = sorted(
        f"{m} imports {d}"
        for m, deps in graph.items()
        if m.startswith("gpuscale.dev")
        for d in deps
        if d.startswith("gpuscale.cli")
    )
    assert offenders == []


def test_cli_commands_do_not_borrow_from_each_other() -> None:
    """Shared CLI helpers live in small modules (errors, database), not in another command's module."""
    graph = import_graph()
    commands = {"gpuscale.cli.control", "gpuscale.cli.queue", "gpuscale.cli.sim", "gpuscale.cli.workers"}
    commands |= {"gpuscale.cli.providers", "gpuscale.cli.demo", "gpuscale.cli.api"}
    commands &= set(graph)
    borrowed = sorted(f"{m} imports {d}" for m in commands for d in graph[m] if d in commands)
    assert borrowed == []
