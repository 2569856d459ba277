"""The database seam: where the server is, the one :class:`Connector`, named statements, migrations.

Every statement lives in ``queries.sql``; every connection goes through :class:`Connector`;
:data:`UNREACHABLE` says what "the database is away" means for every retry in the product.
"""

from gpuscale.db.connect import resolve_dsn
from gpuscale.db.connector import (
    CANNOT_USE,
    DATABASE_ERRORS,
    MISCONFIGURED,
    UNREACHABLE,
    Connector,
    DedicatedSession,
    Listener,
    Session,
    is_unreachable,
)
from gpuscale.db.migrate import migrate

__all__ = [
    "CANNOT_USE",
    "DATABASE_ERRORS",
    "MISCONFIGURED",
    "UNREACHABLE",
    "Connector",
    "DedicatedSession",
    "Listener",
    "Session",
    "is_unreachable",
    "migrate",
    "resolve_dsn",
]
