"""Shared fixtures: one real PostgreSQL per test session, a fresh migrated database per test.

With ``GPUSCALE_DATABASE_URL`` set, that server is used instead of the embedded one (the URL's
role must be allowed to create databases).  Each test gets its own database cloned from a migrated
template, and it is dropped ``WITH (FORCE)`` afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
from db_kit import create_migrated_db, with_database

from gpuscale.db.connector import init_connection
from gpuscale.db.embedded import EmbeddedPostgres
from gpuscale.db.pgbouncer import PgBouncer, find_pgbouncer

TEMPLATE_DB = "gpuscale_test_template"
_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """DSN of the server's maintenance database (``postgres``)."""
    external = os.environ.get("GPUSCALE_DATABASE_URL")
    if external:
        yield with_database(external, "postgres")
        return
    root = Path(tempfile.mkdtemp(prefix="gpuscale-test-"))
    server = EmbeddedPostgres(root / "pg")
    server.start()
    try:
        yield server.dsn("postgres")
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_template(pg_server: str) -> str:
    asyncio.run(create_migrated_db(pg_server, TEMPLATE_DB, replace=True))
    return TEMPLATE_DB


def _create_db(pg_server: str, name: str, template: str | None) -> None:
    async def run() -> None:
        admin = await asyncpg.connect(pg_server)
        try:
            tmpl = f' TEMPLATE "{template}"' if template else ""
            await admin.execute(f'CREATE DATABASE "{name}"{tmpl}')
        finally:
            await admin.close()

    asyncio.run(run())


def _drop_db(pg_server: str, name: str) -> None:
    async def run() -> None:
        admin = await asyncpg.connect(pg_server)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(run())


def _fresh_db(pg_server: str, prefix: str, template: str | None) -> Iterator[str]:
    """A database of its own for one test, copied from template (None: empty); its DSN, dropped after."""
    name = f"{prefix}_{os.getpid()}_{next(_counter)}"
    _create_db(pg_server, name, template)
    try:
        yield with_database(pg_server, name)
    finally:
        _drop_db(pg_server, name)


@pytest.fixture
def dsn(pg_server: str, pg_template: str) -> Iterator[str]:
    """A fresh, migrated database for this test; its DSN."""
    yield from _fresh_db(pg_server, "t", pg_template)


@pytest.fixture
def empty_dsn(pg_server: str) -> Iterator[str]:
    """A fresh database with no schema at all (for migration tests)."""
    yield from _fresh_db(pg_server, "e", None)


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """An asyncpg pool on this test's database, with the product's JSON codec (tests read and
    write rows directly; ``Queue(db)`` and ``ControllerStore(db)`` accept it)."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=10, init=init_connection)
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def db_env(dsn: str) -> dict[str, str]:
    """Environment for subprocesses (workers, CLI) that must use this test's database."""
    env = dict(os.environ)
    env["GPUSCALE_DATABASE_URL"] = dsn
    return env


@pytest.fixture(scope="session")
def pgbouncer(pg_server: str) -> Iterator[PgBouncer]:
    """A PgBouncer in transaction pooling mode in front of the session's server (few server
    connections, so tests see what a pooler changes).  Skipped where pgbouncer is not installed,
    except in CI (``.ci/run`` installs it), where that is a failure."""
    if find_pgbouncer() is None:
        if os.environ.get("CI"):
            pytest.fail("pgbouncer is not installed (.ci/run installs it)")
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    with PgBouncer(pg_server, pool_size=4) as bouncer:
        yield bouncer


@pytest.fixture
def pooled_dsn(dsn: str, pgbouncer: PgBouncer) -> str:
    """This test's database, reached through the transaction-mode PgBouncer."""
    return pgbouncer.dsn(urlsplit(dsn).path.lstrip("/"))
