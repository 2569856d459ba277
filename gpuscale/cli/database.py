"""What the CLI's database commands share: a migrated queue, and one exit-2 message when the
database cannot be reached.  Used by the queue commands and ``pool pause/resume``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from gpuscale.cli.errors import fail

T = TypeVar("T")

if TYPE_CHECKING:  # imports stay lazy at run time so `--help` is fast
    from gpuscale.queue import Queue


@asynccontextmanager
async def open_queue(*, max_size: int = 4) -> AsyncIterator[Queue]:
    """A :class:`~gpuscale.queue.Queue` on the configured database, schema migrated."""
    from gpuscale.common.settings import get_settings
    from gpuscale.db import Connector, resolve_dsn
    from gpuscale.queue import Queue

    settings = get_settings()
    async with Connector(resolve_dsn(settings), max_connections=max_size) as db:
        await db.migrate()
        yield Queue(db, max_payload_bytes=settings.max_payload_bytes, lease_s=settings.lease_seconds)


def run_db(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``fn`` and turn a database that cannot be reached into a clear exit-2 message.

    The message names the failure, never the DSN (it may carry a password)."""
    from gpuscale.db import CANNOT_USE

    try:
        return asyncio.run(fn())
    except CANNOT_USE as exc:
        raise fail(
            f"cannot use the database ({type(exc).__name__}: {exc}); "
            "check GPUSCALE_DATABASE_URL, or unset it to use the embedded PostgreSQL"
        ) from None
