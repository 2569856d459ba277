"""The database seam holds: asyncpg and SQL stay inside ``gpuscale/db``.

Every statement is named in ``gpuscale/db/queries.sql`` and runs through the connector; no other
product module imports asyncpg or carries SQL.  These checks read the source, so a statement
smuggled into a module elsewhere fails here rather than in review.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from gpuscale.db.queries import parse, queries

PACKAGE = Path(__file__).resolve().parent.parent / "gpuscale"
SEAM = PACKAGE / "db"
# The migrations runner keeps its own bookkeeping (schema_migrations, the advisory lock).
ASYNCPG_ALLOWED = {SEAM / "connector.py", SEAM / "migrate.py"}
# Modules not yet on the seam: none.  Nothing may join this set.
PENDING: set[Path] = set()
# A statement's shape in a string: a verb followed, somewhere, by the word that completes it.
_SQL = re.compile(r"\b(SELECT\b[\s\S]*\bFROM|INSERT\s+INTO|UPDATE\s+\w+\s+(\w+\s+)?SET|DELETE\s+FROM)\b")


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imports_asyncpg(path: Path) -> bool:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "asyncpg" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "asyncpg":
            return True
    return False


def _sql_strings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    texts: list[str] = []
    inside_fstrings: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):  # an f-string: its literal parts, placeholders as {}
            inside_fstrings.update(id(v) for v in node.values)
            texts.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings | inside_fstrings
        ):
            texts.append(node.value)
    return [t.strip().splitlines()[0][:80] for t in texts if _SQL.search(t)]


def test_only_the_seam_imports_asyncpg() -> None:
    importers = {p for p in _modules() if _imports_asyncpg(p)}
    assert importers - ASYNCPG_ALLOWED - PENDING == set(), sorted(
        str(p.relative_to(PACKAGE)) for p in importers
    )


def test_no_sql_outside_the_seam() -> None:
    offenders = {
        str(p.relative_to(PACKAGE)): hits
        for p in _modules()
        if p not in ASYNCPG_ALLOWED | PENDING and (hits := _sql_strings(p))
    }
    assert offenders == {}


def test_the_guard_sees_sql_and_imports(tmp_path: Path) -> None:
    """The two checks above would notice what they look for."""
    sample = tmp_path / "m.py"
    sample.write_text(
        'import asyncpg.pool\nQ = """UPDATE processing_queue t\n SET status = 1"""\n'
        'R = f"SELECT {1} FROM x"\nS = "DELETE FROM processing_servers"\n'
    )
    assert _imports_asyncpg(sample)
    assert len(_sql_strings(sample)) == 3
    assert not _SQL.search("select the pool from the list")  # lowercase prose is not SQL


def test_queries_are_named_once_and_parameters_only() -> None:
    q = queries()
    assert {"claim_tasks", "insert_tasks", "complete_tasks", "register_server"} <= set(q)
    for name, text in q.items():
        assert "{" not in text.replace("'{}'", ""), f"{name}: looks like a format placeholder"
    try:
        parse("-- name: a\nSELECT 1\n-- name: a\nSELECT 2\n")
    except ValueError as exc:
        assert "twice" in str(exc)
    else:
        raise AssertionError("a duplicate name was accepted")


def test_every_named_query_is_used_and_every_use_exists() -> None:
    """A name in code that queries.sql lacks fails here, not at run time; an unused statement is
    dead text."""
    source = "\n".join(p.read_text() for p in _modules())
    used = set(
        re.findall(r"""(?:execute|fetch|fetchrow|fetchval|_requeue)\(\s*["']([a-z_0-9]+)["']""", source)
    )
    used |= set(re.findall(r"""sql\(["']([a-z_0-9]+)["']\)""", source))
    assert used - set(queries()) == set()
    assert set(queries()) - used == set()
