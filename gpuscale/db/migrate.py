"""Ordered SQL migrations (``controller/db/migrations/NNNN_name.sql``).

Each file runs in its own transaction and is recorded in ``schema_migrations``; a transaction-level
advisory lock serializes concurrent ``gpuscale db migrate`` runs, so running it twice, or twice at
once, changes nothing the second time (also through PgBouncer in transaction mode).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources

import asyncpg
import asyncpg.pool

log = logging.getLogger(__name__)

# Arbitrary but fixed: the advisory lock key that serializes migrations.
MIGRATION_LOCK_KEY = 0x6770_7573_6D69  # "gpusmi"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    out: list[Migration] = []
    root = resources.files("gpuscale.db") / "migrations"
    for entry in root.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        stem = entry.name[:-4]
        version_text, _, name = stem.partition("_")
        out.append(Migration(int(version_text), name, entry.read_text()))
    out.sort(key=lambda m: m.version)
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return out


async def migrate(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> list[Migration]:
    """Apply the pending migrations; returns those applied (empty when up to date).

    Each step takes the migration lock for its own transaction (``pg_advisory_xact_lock``) and
    checks again under it whether the step is still pending: a session-level lock would break
    behind a transaction pooler (PgBouncer), where lock and unlock can land on different server
    sessions and the lock would leak."""
    applied: list[Migration] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    for m in load_migrations():
        if m.version in done:
            continue
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            if await conn.fetchval("SELECT 1 FROM schema_migrations WHERE version = $1", m.version):
                continue  # applied by a concurrent run while we waited for the lock
            await conn.execute(m.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.version, m.name
            )
        log.debug("applied migration %04d_%s", m.version, m.name)
        applied.append(m)
    return applied


async def pending(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> list[Migration]:
    """The migrations this build knows that the database has not applied (health checks)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done = (
        {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")} if exists else set()
    )
    return [m for m in load_migrations() if m.version not in done]
