"""The named SQL statements of :file:`queries.sql`, loaded once by name.

Every statement gpuscale runs (outside the migrations runner's own bookkeeping) lives in
``queries.sql`` under a ``-- name: <name>`` line; code refers to statements by name only, and the
:class:`~gpuscale.db.connector.Connector` looks them up here.  Nothing is ever formatted into a
statement: values travel as ``$n`` parameters.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_NAME = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$")


class UnknownQuery(KeyError):
    """No statement of that name in queries.sql (a typo in code, caught by the tests)."""


def parse(text: str) -> dict[str, str]:
    """Split a queries file into ``{name: statement}``; comment lines are kept out of the text."""
    out: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []

    def flush() -> None:
        if name is None:
            return
        sql = "\n".join(lines).strip().rstrip(";").strip()
        if not sql:
            raise ValueError(f"query {name!r} is empty")
        if name in out:
            raise ValueError(f"query {name!r} is defined twice")
        out[name] = sql

    for line in text.splitlines():
        m = _NAME.match(line)
        if m:
            flush()
            name, lines = m.group(1), []
        elif name is not None and not line.lstrip().startswith("--"):
            lines.append(line)
    flush()
    return out


@cache
def queries() -> dict[str, str]:
    """All statements of the package's ``queries.sql``."""
    return parse((resources.files("gpuscale.db") / "queries.sql").read_text())


def sql(name: str) -> str:
    """The statement called ``name``."""
    try:
        return queries()[name]
    except KeyError:
        raise UnknownQuery(name) from None
