"""Migrations against the real PostgreSQL: idempotent, and safe when run concurrently."""

from __future__ import annotations

import asyncio

import asyncpg

from gpuscale.db.migrate import load_migrations, migrate


async def test_migrate_twice_changes_nothing(empty_dsn: str) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        first = await migrate(conn)
        second = await migrate(conn)
        assert [m.version for m in first] == [m.version for m in load_migrations()]
        assert second == []
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == [m.version for m in load_migrations()]
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_each_once(empty_dsn: str) -> None:
    conns = [await asyncpg.connect(empty_dsn) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        applied = [m.version for r in results for m in r]
        assert sorted(applied) == [m.version for m in load_migrations()]
    finally:
        for c in conns:
            await c.close()
