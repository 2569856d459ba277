"""Where the database is: ``GPUSCALE_DATABASE_URL``, or the embedded server started on demand."""

from __future__ import annotations

from gpuscale.common.settings import Settings, get_settings
from gpuscale.db.embedded import shared_embedded


def resolve_dsn(settings: Settings | None = None) -> str:
    """The DSN to use: ``GPUSCALE_DATABASE_URL``, or the embedded server (started on demand)."""
    settings = settings or get_settings()
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    return shared_embedded(settings.embedded_pg_dir).dsn()
