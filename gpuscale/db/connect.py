"""Resolving the database and opening asyncpg pools."""

from __future__ import annotations

from types import TracebackType

import asyncpg

from gpuscale.common.settings import Settings, get_settings
from gpuscale.db.embedded import shared_embedded


def resolve_dsn(settings: Settings | None = None) -> str:
    """The DSN to use: ``GPUSCALE_DATABASE_URL``, or the embedded server (started on demand)."""
    settings = settings or get_settings()
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    return shared_embedded(settings.embedded_pg_dir).dsn()


async def connect_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, command_timeout=60)
    assert pool is not None
    return pool


class Database:
    """``async with Database() as pool``: resolves the DSN, opens a pool, closes it on exit."""

    def __init__(self, dsn: str | None = None, *, min_size: int = 1, max_size: int = 10) -> None:
        self._dsn = dsn
        self._min = min_size
        self._max = max_size
        self.pool: asyncpg.Pool | None = None

    @property
    def dsn(self) -> str:
        if self._dsn is None:
            self._dsn = resolve_dsn()
        return self._dsn

    async def __aenter__(self) -> asyncpg.Pool:
        self.pool = await connect_pool(self.dsn, min_size=self._min, max_size=self._max)
        return self.pool

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
