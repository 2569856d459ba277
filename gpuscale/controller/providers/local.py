"""The ``local`` provider: worker processes on this machine, for development and the demo.

Each deployment maps to a :class:`LaunchSpec`; each replica is a process in its own process group
that gets ``GPUSCALE_CONTAINER_ID`` and ``GPUSCALE_POOL``.  Like a cloud, the provider keeps the
count it was set to (a replica that exits on its own is replaced on the next call); unlike
DataCrunch it can choose whom to stop on a scale-down, so it stops idle replicas first, then the
newest.  ``aclose()`` stops every replica it started: it never leaves an orphan.

A replica does not inherit the controller's environment: it gets only the variables named in
:data:`REPLICA_ENV` (the system basics and the worker's own settings), then its deployment's
:class:`LaunchSpec` env.  So the DataCrunch credentials and the controller's other settings never
reach a worker process, as they would not reach a cloud container.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gpuscale.common.processes import ProcessGroup, SpawnError, spawn
from gpuscale.controller.providers.base import (
    REPLICA_RUNNING,
    REPLICA_STOPPING,
    LaunchSpec,
    ProviderError,
    ProviderState,
    Replica,
    worker_command,
)
from gpuscale.controller.providers.pinned import PinnedDeployment, PinnedProvider, choose_victims, state_of

# choose_victims: re-exported for its old importers
__all__ = ["REPLICA_ENV", "LocalProvider", "choose_victims", "replica_base_env"]

log = logging.getLogger(__name__)

# What a replica may take from the controller's environment (everything else is left out).
REPLICA_ENV: frozenset[str] = frozenset(
    {
        # The system: where programs and libraries are, who and where we are, locale, time zone.
        "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
        "LD_LIBRARY_PATH", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
        "PYTHONWARNINGS", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
        "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
        "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
        # The worker's settings (gpuscale.worker.settings.WorkerSettings) and logging.  Not its
        # per-process ids (GPUSCALE_SERVER_ID, GPUSCALE_WORKER_PORT_FILE): replicas would share them.
        "OLLAMA_HOST", "GPUSCALE_OLLAMA_HOST", "GPUSCALE_VISUAL_MODEL", "GPUSCALE_TEXT_MODEL",
        "GPUSCALE_OLLAMA_TIMEOUT_S", "GPUSCALE_KEEP_ALIVE", "GPUSCALE_WARM_TIMEOUT_S", "GPUSCALE_NUM_CTX",
        "GPUSCALE_MAX_PROMPT_CHARS", "GPUSCALE_HEARTBEAT_INTERVAL_S", "GPUSCALE_DRAIN_GRACE_S",
        "GPUSCALE_POLL_INTERVAL_S", "GPUSCALE_LEASE_SECONDS", "GPUSCALE_RETRY_BASE_S",
        "GPUSCALE_RETRY_MAX_S", "GPUSCALE_WORKER_CONCURRENCY", "GPUSCALE_CONCURRENCY",
        "GPUSCALE_PDF_DPI", "GPUSCALE_MAX_PDF_BYTES", "GPUSCALE_FETCH_TIMEOUT_S",
        "GPUSCALE_MAX_IMAGE_SIDE", "GPUSCALE_WORKER_HOST", "GPUSCALE_WORKER_TOKEN",
        "OLLAMA_NUM_PARALLEL", "GPUSCALE_WORKER_REPLAY", "GPUSCALE_DOCUMENT_ROOT",
        "GPUSCALE_DATABASE_LISTEN_URL", "GPUSCALE_DATABASE_LISTEN",
        "GPUSCALE_DATABASE_STATEMENT_CACHE_SIZE", "GPUSCALE_LOG_LEVEL", "GPUSCALE_LOG_FORMAT",
        # The dev tools mark every process of a run with this, to find leftovers.
        "GPUSCALE_DEMO_RUN",
    }
)  # fmt: skip
_REPLICA_ENV_PREFIXES = ("LC_",)


def replica_base_env(source: Mapping[str, str]) -> dict[str, str]:
    """The part of ``source`` (the controller's environment) that a replica may see."""
    return {k: v for k, v in source.items() if k in REPLICA_ENV or k.startswith(_REPLICA_ENV_PREFIXES)}


@dataclass
class _Deployment(PinnedDeployment):
    replicas: dict[str, ProcessGroup] = field(default_factory=dict)


class LocalProvider(PinnedProvider[_Deployment]):
    """Replicas are local processes, started from each deployment's :class:`LaunchSpec`."""

    name = "local"

    def __init__(
        self,
        launches: Mapping[str, LaunchSpec],
        *,
        stop_grace_s: float = 30.0,
        log_dir: Path | None = None,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__({name: _Deployment(spec) for name, spec in launches.items()})
        self.stop_grace_s = stop_grace_s
        self.log_dir = log_dir
        self._base_env = replica_base_env(os.environ if base_env is None else base_env)
        self._closed = False

    def __repr__(self) -> str:
        return f"LocalProvider(deployments={sorted(self._deployments)})"

    def _reap(self, dep: _Deployment) -> None:
        for rid, replica in list(dep.replicas.items()):
            if replica.stopping:
                if replica.stop_task is not None and replica.stop_task.done():
                    del dep.replicas[rid]
            elif replica.exited:
                log.warning("replica %s exited on its own (code %s)", rid, replica.process.returncode)
                del dep.replicas[rid]
                # Its group may still hold children; make sure nothing outlives it.
                replica.kill_now()

    async def _reconcile(self, name: str, dep: _Deployment, idle: Collection[str] = ()) -> None:
        if self._closed:
            return
        self._reap(dep)
        live = [r for r in dep.replicas.values() if not r.stopping]
        want = 0 if dep.paused else dep.target
        if len(live) < want:
            argv = dep.spec.command or worker_command(dep.spec.pool)
            for _ in range(want - len(live)):
                rid = f"{name}-{uuid.uuid4().hex[:8]}"
                env = {
                    **self._base_env,
                    # Replicas share this machine's ports: each worker picks a free one.
                    "GPUSCALE_WORKER_PORT": "0",
                    **dep.spec.env,
                    "GPUSCALE_CONTAINER_ID": rid,
                    "GPUSCALE_POOL": dep.spec.pool,
                }
                try:
                    dep.replicas[rid] = await spawn(rid, argv, env, log_dir=self.log_dir, kind="replica")
                except SpawnError as exc:
                    raise ProviderError(str(exc)) from None
        elif len(live) > want:
            victims = choose_victims([(r.id, r.started_at) for r in live], len(live) - want, idle)
            for rid in victims:
                log.info("stopping replica %s of %s%s", rid, name, " (idle)" if rid in idle else "")
                dep.replicas[rid].begin_stop(self.stop_grace_s)

    async def observe(self, deployment: str) -> ProviderState:
        dep = self._get(deployment)
        async with self._lock:
            await self._reconcile_for_observe(deployment, dep)
        replicas = [
            Replica(r.id, REPLICA_STOPPING if r.stopping else REPLICA_RUNNING, r.started_at)
            for r in sorted(dep.replicas.values(), key=lambda r: r.started_at)
        ]
        return state_of(replicas, dep)

    def pids(self, deployment: str) -> dict[str, int]:
        """Replica id → process id (tests and the demo use it to look for orphans)."""
        return {rid: r.pid for rid, r in self._get(deployment).replicas.items()}

    async def step_down(self) -> None:
        """This controller no longer leads: its replicas belong to the pool, not to it, so it stops
        every one (SIGTERM, then SIGKILL after the grace period, in the background) and sets every
        deployment to zero, rather than leave a new leader's pool over ``max_replicas``."""
        async with self._lock:
            stopping = 0
            for dep in self._deployments.values():
                dep.target = 0
                for replica in dep.replicas.values():
                    if not replica.stopping:
                        replica.begin_stop(self.stop_grace_s)
                        stopping += 1
            if stopping:
                log.warning(
                    "not leading any more: stopping the %d replica(s) this controller started", stopping
                )

    async def aclose(self) -> None:
        """Stop every replica (SIGTERM, grace, SIGKILL) and wait until all are gone."""
        async with self._lock:
            self._closed = True
            tasks = [
                replica.begin_stop(self.stop_grace_s)
                for dep in self._deployments.values()
                for replica in dep.replicas.values()
            ]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            for dep in self._deployments.values():
                dep.replicas.clear()
