"""Process settings, read from the environment (prefix ``GPUSCALE_``) with pydantic-settings.

Secrets are ``SecretStr`` so they never show in a repr, a log line or an error message.  The
DataCrunch credentials and ``OLLAMA_HOST`` keep the names their own tools use, without the prefix.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ProviderName = Literal["datacrunch", "docker", "local"]


class DatabaseAccess(BaseSettings):
    """How a process uses its database connection beyond the URL; the controller's and the
    worker's settings both have these (same names, same environment variables).

    Behind PgBouncer in transaction mode: ``GPUSCALE_DATABASE_URL`` points at PgBouncer,
    ``GPUSCALE_DATABASE_LISTEN_URL`` straight at PostgreSQL (LISTEN needs a session of its own),
    and ``GPUSCALE_DATABASE_STATEMENT_CACHE_SIZE=0`` (named prepared statements do not survive
    from one transaction to the next).  A fleet too large for one direct connection per replica
    sets ``GPUSCALE_DATABASE_LISTEN=false`` on the workers: they poll instead."""

    model_config = SettingsConfigDict(env_prefix="GPUSCALE_", extra="ignore", populate_by_name=True)

    database_listen_url: SecretStr | None = Field(
        default=None, description="direct URL for LISTEN when the database URL goes through a pooler"
    )
    database_listen: bool = Field(
        default=True, description="false: no LISTEN connection; workers claim every poll interval"
    )
    database_statement_cache_size: int = Field(
        default=100, ge=0, description="asyncpg prepared-statement cache; 0 behind PgBouncer"
    )

    def listen_dsn(self, dsn: str) -> str:
        """The URL for LISTEN: the direct one when set, else ``dsn``."""
        return self.database_listen_url.get_secret_value() if self.database_listen_url else dsn


class Settings(DatabaseAccess):
    model_config = SettingsConfigDict(env_prefix="GPUSCALE_", extra="ignore", populate_by_name=True)

    # Database.  Absent: an embedded PostgreSQL under ``data_dir / "pg"``.
    database_url: SecretStr | None = None
    data_dir: Path = Field(default=Path(".gpuscale"), description="state folder, embedded PostgreSQL in ./pg")
    pg_dir: Path | None = Field(default=None, description="embedded PostgreSQL data directory override")

    pools_file: Path = Path("deploy/datacrunch/pools.yaml")
    provider: ProviderName = "local"

    datacrunch_client_id: str | None = Field(
        default=None, validation_alias=AliasChoices("DATACRUNCH_CLIENT_ID", "GPUSCALE_DATACRUNCH_CLIENT_ID")
    )
    datacrunch_client_secret: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("DATACRUNCH_CLIENT_SECRET", "GPUSCALE_DATACRUNCH_CLIENT_SECRET"),
    )
    datacrunch_base_url: str = Field(
        default="https://api.datacrunch.io/v1",
        validation_alias=AliasChoices("DATACRUNCH_BASE_URL", "GPUSCALE_DATACRUNCH_BASE_URL"),
    )

    # DataCrunch client tuning (issue 4).
    datacrunch_timeout_s: float = 10.0
    datacrunch_retry_attempts: int = 5
    datacrunch_backoff_initial_s: float = 0.5
    datacrunch_backoff_max_s: float = 20.0

    # Docker provider (issue 4): engine address (None: DOCKER_HOST / the default socket), the
    # image per pool, GPU request ("none" | "all" | a count | device ids "0,1"), and lifecycle.
    docker_host: str | None = None
    docker_image: str = "gpuscale-{pool}:latest"
    docker_gpus: str = "1"
    docker_network_mode: str = "host"
    docker_restart_policy: str = "on-failure"
    docker_stop_grace_s: float = 60.0

    # Local provider (issue 4): how long a worker gets to drain on SIGTERM, where its output goes.
    local_stop_grace_s: float = 60.0
    local_log_dir: Path | None = None

    # DataCrunch emulator (issue 4).  Its credentials default to DATACRUNCH_CLIENT_ID/SECRET.
    # The Verda shared filesystem (SFS) volume the deployments mount (issue 13): `deploy apply`
    # puts it in place of ${GPUSCALE_SHARED_VOLUME_ID} in the specs and refuses to apply without it.
    shared_volume_id: str | None = None

    emulator_port: int = 8765
    emulator_client_id: str | None = None
    emulator_client_secret: SecretStr | None = None

    http_host: str = "127.0.0.1"
    http_port: int = 9100

    # Controller (issue 6).  The reconcile interval comes from the pools file unless overridden.
    reconcile_interval_s: float | None = None
    heartbeat_timeout_s: float = 30.0  # a worker silent this long is dead; its tasks are requeued
    reaper_interval_s: float = 5.0
    cost_interval_s: float = 15.0
    retention_days: float = 7.0  # `done` tasks older than this are deleted, in batches
    retention_batch: int = 5000
    # The compact task history (`gpuscale trace export`, `gpuscale tune`) is kept this long.
    history_retention_days: float = 90.0
    # Leadership (issue 10): a lease in the database, as client-go's leader election.  The leader
    # renews it every retry period; one that has not renewed for the renew deadline stops acting,
    # before the lease (the duration after its last renewal) expires and a standby may take it.
    leader_lease_duration_s: float = Field(default=15.0, gt=0, le=3600)
    leader_renew_deadline_s: float = Field(default=10.0, gt=0)
    leader_retry_period_s: float = Field(default=2.0, gt=0)

    ollama_host: str = Field(
        default="http://127.0.0.1:11434", validation_alias=AliasChoices("OLLAMA_HOST", "GPUSCALE_OLLAMA_HOST")
    )
    worker_token: SecretStr | None = None

    # Queue limits.
    max_payload_bytes: int = 256 * 1024
    lease_seconds: float = 60.0
    deck_batch_pages: int = 10  # pages per visual_analysis task at most (queue/deck.py)
    # A deck with more pages than this is refused at submission (each page batch is a GPU task);
    # named like the worker's GPUSCALE_MAX_PDF_BYTES.
    max_pdf_pages: int = Field(default=300, ge=1)
    # Where submitted decks are stored (issue 13): a folder every worker mounts too; on Verda the
    # shared filesystem (e.g. /mnt/shared/uploads).  Payloads name documents relative to it.
    document_root: Path = Path(".gpuscale/documents")
    # A stored PDF that no task names any more, untouched this long, is deleted (the API prunes
    # hourly; `gpuscale documents prune` on demand).  Done tasks go after retention_days first.
    document_retention_days: float = Field(default=7.0, gt=0)
    deck_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="largest deck PDF accepted")
    deck_fetch_timeout_s: float = Field(default=60.0, gt=0, description="downloading a deck given by URL")
    # The task API downloads a URL deck only from public addresses, and from the hosts named here
    # (comma-separated, exactly as they appear in the URLs): e.g. the platform's own storage on a
    # private network.  The CLI's submit-deck is the operator's own and is not restricted.
    deck_url_hosts: str = ""

    # HTTP task API (issue 15): bearer tokens it accepts, comma-separated (rotate by listing both).
    api_token: SecretStr | None = None
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)

    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    @model_validator(mode="after")
    def _lease_timings(self) -> Settings:
        if self.leader_renew_deadline_s >= self.leader_lease_duration_s:
            raise ValueError(
                "GPUSCALE_LEADER_RENEW_DEADLINE_S must be less than GPUSCALE_LEADER_LEASE_DURATION_S"
            )
        if self.leader_retry_period_s * 1.2 >= self.leader_renew_deadline_s:
            raise ValueError(
                "GPUSCALE_LEADER_RETRY_PERIOD_S × 1.2 must be less than GPUSCALE_LEADER_RENEW_DEADLINE_S"
            )
        return self

    @property
    def embedded_pg_dir(self) -> Path:
        return (self.pg_dir or self.data_dir / "pg").absolute()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def is_settings_error(exc: ValidationError) -> bool:
    """Whether ``exc`` came from reading settings (this module's or the worker's), not from data."""
    return exc.title.endswith("Settings")


def describe_settings_error(exc: ValidationError) -> str:
    """One line naming each bad setting by its environment variable and saying what is wrong.

    Never the value: the variable may hold a secret (a database URL with its password, a token),
    so only pydantic's message, which does not repeat the input, is used."""
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = [str(part) for part in err.get("loc", ())]
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if not loc:  # a rule across settings: its message names them
            problems.append(msg)
            continue
        name = loc[0]
        # Fields are reported by name (env: GPUSCALE_<NAME>); aliased ones by their alias
        # (e.g. DATACRUNCH_CLIENT_ID), which already is the variable.
        var = name if name.isupper() else f"GPUSCALE_{name.upper()}"
        where = ".".join([var, *loc[1:]])
        problems.append(f"{where}: {msg}")
    return "invalid setting " + "; ".join(problems)
