"""Worker settings, read from the environment (prefix ``GPUSCALE_``) with pydantic-settings.

The worker runs inside the GPU containers (and as local processes for the demo and tests), so
everything it needs to know comes from the environment the provider sets: the database, the pool's
model, how often to heartbeat, how long to drain.  ``OLLAMA_HOST`` keeps the name Ollama's own
tools use; the container id comes from ``GPUSCALE_CONTAINER_ID`` (set by the providers).
"""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from gpuscale.common.settings import DatabaseAccess

# Pools whose tasks run against Ollama.  The bench pool (``noop``) needs no model.
MODEL_POOLS = ("visual", "text")
KNOWN_POOLS = ("visual", "text", "bench")

# How many tasks one replica runs at once, per pool, when not configured.  One vision model on one
# GPU works best one page batch at a time; text prompts are shorter, so two overlap well.
DEFAULT_CONCURRENCY = {"visual": 1, "text": 2, "bench": 4}


class WorkerSettings(DatabaseAccess):
    model_config = SettingsConfigDict(env_prefix="GPUSCALE_", extra="ignore", populate_by_name=True)

    # Ollama.
    ollama_host: str = Field(
        default="http://127.0.0.1:11434", validation_alias=AliasChoices("OLLAMA_HOST", "GPUSCALE_OLLAMA_HOST")
    )
    visual_model: str = "gemma3:12b"
    text_model: str = "gemma3:12b"
    ollama_timeout_s: float = Field(default=300.0, gt=0, description="per Ollama request")
    keep_alive: str = "30m"
    warm_timeout_s: float = Field(default=600.0, gt=0, description="give up warming the model after this")
    num_ctx: int = Field(default=16384, ge=512)
    max_prompt_chars: int = Field(default=48_000, ge=1000, description="deck text sent to text prompts")

    # Runtime.
    heartbeat_interval_s: float = Field(default=10.0, gt=0)
    drain_grace_s: float = Field(default=30.0, ge=0)
    poll_interval_s: float = Field(default=5.0, gt=0, description="claim polling fallback to LISTEN/NOTIFY")
    lease_seconds: float = Field(default=60.0, gt=0)
    # Backoff before a retryable failure is tried again: base * 2^(attempt-1), jittered, capped.
    retry_base_s: float = Field(default=5.0, ge=0)
    retry_max_s: float = Field(default=600.0, ge=0)
    concurrency: int | None = Field(
        default=None,
        ge=1,
        le=64,
        validation_alias=AliasChoices("GPUSCALE_WORKER_CONCURRENCY", "GPUSCALE_CONCURRENCY"),
    )
    # Requests the pool's model serves at once: Ollama's own variable (the deployment sets both
    # from the pools file's ``parallel``); the worker's concurrency defaults to it.
    ollama_num_parallel: int | None = Field(
        default=None, ge=1, le=64, validation_alias=AliasChoices("OLLAMA_NUM_PARALLEL")
    )
    # Load tests (``gpuscale replay``): every task sleeps the seconds its document names
    # (``replay:<seconds>``), served ``OLLAMA_NUM_PARALLEL`` at a time like Ollama; no model.
    worker_replay: bool = False
    container_id: str | None = None
    server_id: str | None = None
    # Epoch seconds when this replica's cold start ends, set by a provider that starts the process
    # early (the emulator's --spawn-early): the worker registers no sooner.
    replica_ready_at: float | None = Field(
        default=None, validation_alias=AliasChoices("GPUSCALE_REPLICA_READY_AT")
    )

    # Documents.  Payloads name a document relative to this root (the worker's own mount of the
    # document store, e.g. /mnt/shared/uploads on Verda) or give an http(s) URL.
    document_root: Path = Path(".gpuscale/documents")
    pdf_dpi: int = Field(default=110, ge=36, le=600)
    max_pdf_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    fetch_timeout_s: float = Field(default=60.0, gt=0)
    max_image_side: int = Field(default=1600, ge=256, description="pages are scaled down to fit this")

    # HTTP API (container health check and model management).
    worker_host: str = "0.0.0.0"
    worker_port: int = Field(default=8001, ge=0, le=65535, description="0 picks a free port")
    worker_token: SecretStr | None = None
    # Where the worker writes the port it listens on (the container health check reads it when
    # GPUSCALE_WORKER_PORT is 0, e.g. Docker host networking with several replicas).
    worker_port_file: Path | None = None

    def model_for(self, pool: str) -> str | None:
        """The Ollama model a pool uses, or None for pools that need no model (or in replay)."""
        if self.worker_replay:
            return None
        if pool == "visual":
            return self.visual_model
        if pool == "text":
            return self.text_model
        return None

    def concurrency_for(self, pool: str) -> int:
        return self.concurrency or self.ollama_num_parallel or DEFAULT_CONCURRENCY.get(pool, 1)

    def resolved_container_id(self) -> str:
        return self.container_id or socket.gethostname()
