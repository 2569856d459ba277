"""Helpers shared by the tests that make their own databases: a DSN for another database on the same
server, and a new database migrated to the current schema (conftest's template, the e2e tests' own
servers)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import asyncpg

from gpuscale.db.migrate import migrate


def with_database(dsn: str, database: str) -> str:
    """The same server, another database name."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


async def create_migrated_db(admin_dsn: str, name: str, *, replace: bool = False, then: str = "") -> str:
    """Create database name on admin_dsn's server (replace: drop one left by an earlier run first),
    migrate it and run the SQL in then on it; its DSN."""
    admin = await asyncpg.connect(admin_dsn)
    try:
        if replace:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = with_database(admin_dsn, name)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        if then:
            await conn.execute(then)
    finally:
        await conn.close()
    return dsn
