"""``gpuscale/db/schema.sql`` is the schema the migrations build.

Two databases: one migrated from scratch, one built from ``schema.sql`` alone.  Their catalogs are
described object by object (tables and columns, constraints, indexes, functions with their
bodies, triggers, enums, sequences) and must match.  After a new migration, regenerate the file
with ``.venv/bin/python tests/dump_schema.py``.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg

SCHEMA = Path(__file__).resolve().parent.parent / "gpuscale" / "db" / "schema.sql"

# Each query yields comparable rows; schema_migrations (the runner's own table) is left out.
_DESCRIBE = {
    "columns": """
        SELECT table_name, column_name, data_type, udt_name, is_nullable,
               coalesce(column_default, ''), is_identity, coalesce(identity_generation, '')
          FROM information_schema.columns
         WHERE table_schema = 'public' AND table_name <> 'schema_migrations'""",
    "constraints": """
        SELECT c.conrelid::regclass::text, c.conname, c.contype::text, pg_get_constraintdef(c.oid)
          FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
         WHERE n.nspname = 'public' AND c.conrelid::regclass::text <> 'schema_migrations'""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
         WHERE schemaname = 'public' AND tablename <> 'schema_migrations'""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_function_result(p.oid),
               p.prosrc, p.provolatile::text, l.lanname
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
          JOIN pg_language l ON l.oid = p.prolang
         WHERE n.nspname = 'public'""",
    "triggers": """
        SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) FROM pg_trigger
         WHERE NOT tgisinternal""",
    "enums": """
        SELECT t.typname, array_agg(e.enumlabel ORDER BY e.enumsortorder)::text
          FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid GROUP BY t.typname""",
    "sequences": """
        SELECT sequencename, data_type::text, start_value, increment_by FROM pg_sequences
         WHERE schemaname = 'public'""",
    "tables": """
        SELECT c.relname, c.relkind::text, c.relpersistence::text FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v', 'm', 'p')
           AND c.relname <> 'schema_migrations'""",
}


async def describe(dsn: str) -> dict[str, list[tuple[object, ...]]]:
    conn = await asyncpg.connect(dsn)
    try:
        return {k: sorted(tuple(r) for r in await conn.fetch(q)) for k, q in _DESCRIBE.items()}
    finally:
        await conn.close()


def _diff(a: list[tuple[object, ...]], b: list[tuple[object, ...]]) -> str:
    only_a = [r for r in a if r not in b]
    only_b = [r for r in b if r not in a]
    return f"only in migrated: {only_a}\nonly in schema.sql: {only_b}"


async def test_schema_sql_matches_a_migrated_database(dsn: str, empty_dsn: str) -> None:
    # ``dsn`` is a copy of the session's template, which was migrated from an empty database.
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute(SCHEMA.read_text())
    finally:
        await conn.close()
    migrated = await describe(dsn)
    from_file = await describe(empty_dsn)
    assert migrated["tables"], "the migrated database has no tables"
    for kind in _DESCRIBE:
        assert migrated[kind] == from_file[kind], (
            f"schema.sql and the migrations differ in {kind} "
            f"(regenerate: .venv/bin/python tests/dump_schema.py)\n{_diff(migrated[kind], from_file[kind])}"
        )


async def test_the_comparison_notices_a_difference(empty_dsn: str, dsn: str) -> None:
    """A database one column short of the migrated one is told apart."""
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute(SCHEMA.read_text())
        await conn.execute("ALTER TABLE processing_servers DROP COLUMN version")
    finally:
        await conn.close()
    assert (await describe(empty_dsn))["columns"] != (await describe(dsn))["columns"]
