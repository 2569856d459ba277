"""Database access: where the PostgreSQL server is (external or embedded), pools, migrations."""

from gpuscale.db.connect import Database, connect_pool, resolve_dsn
from gpuscale.db.migrate import migrate

__all__ = ["Database", "connect_pool", "migrate", "resolve_dsn"]
