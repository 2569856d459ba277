"""The ``docker`` provider: worker containers on a self-hosted GPU box, through the Docker Engine.

Each replica is a container created from the pool's image with labels (``gpuscale.deployment``,
``gpuscale.pool``, ``gpuscale.replica``), the launch spec's env plus ``GPUSCALE_CONTAINER_ID`` and
``GPUSCALE_POOL``, a GPU device request (a count or device ids), a restart policy and a stop grace
period.  Replicas are found again by label, so a restarted controller picks up what is running.
On a scale-down it stops idle replicas first (no running task), then the newest, and it removes
exited containers.  docker-py is synchronous, so every engine call runs in a worker thread
(``asyncio.to_thread``) and the controller's event loop never blocks on the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from gpuscale.controller.providers.base import (
    REPLICA_RUNNING,
    REPLICA_STARTING,
    REPLICA_STOPPING,
    CapacityError,
    LaunchSpec,
    ProviderError,
    ProviderState,
    Replica,
)
from gpuscale.controller.providers.pinned import PinnedDeployment, PinnedProvider, choose_victims, state_of

log = logging.getLogger(__name__)

LABEL_MANAGED = "gpuscale.managed"
LABEL_DEPLOYMENT = "gpuscale.deployment"
LABEL_POOL = "gpuscale.pool"
LABEL_REPLICA = "gpuscale.replica"
LABEL_STARTED = "gpuscale.started_at"

_GONE = ("exited", "dead")


def device_requests(gpus: str | None) -> list[Any]:
    """Docker device requests for a GPU setting: "none"/"0"/"" → none, "all", a count, or ids."""
    import docker.types

    value = (gpus or "none").strip().lower()
    if value in ("none", "0", ""):
        return []
    if value == "all":
        return [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
    if value.isdigit():
        return [docker.types.DeviceRequest(count=int(value), capabilities=[["gpu"]])]
    ids = [part.strip() for part in value.split(",") if part.strip()]
    return [docker.types.DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]


def _restart_policy(policy: str) -> dict[str, Any]:
    name, _, retries = policy.partition(":")
    out: dict[str, Any] = {"Name": name or "no"}
    if name == "on-failure":
        out["MaximumRetryCount"] = int(retries or 3)
    return out


@dataclass(frozen=True)
class _Box:
    """What the provider needs of one container."""

    id: str
    replica: str
    status: str  # the engine's state: created, running, restarting, exited, dead, ...
    started_at: float


class DockerProvider(PinnedProvider[PinnedDeployment]):
    """Replicas are containers on one Docker engine."""

    name = "docker"

    def __init__(
        self,
        launches: Mapping[str, LaunchSpec],
        *,
        base_url: str | None = None,
        image_template: str = "gpuscale-{pool}:latest",
        gpus: str = "1",
        network_mode: str = "host",
        restart_policy: str = "on-failure",
        stop_grace_s: float = 60.0,
        stop_on_close: bool = False,
        client: Any = None,
    ) -> None:
        super().__init__({name: PinnedDeployment(spec) for name, spec in launches.items()})
        self.base_url = base_url
        self.image_template = image_template
        self.gpus = gpus
        self.network_mode = network_mode
        self.restart_policy = restart_policy
        self.stop_grace_s = stop_grace_s
        self.stop_on_close = stop_on_close
        self._client = client
        self._stopping: dict[str, asyncio.Task[None]] = {}  # replica id → stop in flight

    def __repr__(self) -> str:
        return f"DockerProvider(base_url={self.base_url!r}, deployments={sorted(self._deployments)})"

    # ------------------------------------------------------------------ engine (in threads)

    def _docker(self) -> Any:
        if self._client is None:
            import docker

            try:
                self._client = (
                    docker.DockerClient(base_url=self.base_url, timeout=30)
                    if self.base_url
                    else docker.from_env(timeout=30)
                )
            except docker.errors.DockerException as exc:
                raise ProviderError(f"cannot reach the Docker engine: {exc}") from None
        return self._client

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import docker.errors
        import requests.exceptions

        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except docker.errors.APIError as exc:
            raise ProviderError(f"docker engine: {exc.explanation or exc}") from None
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise ProviderError(f"docker engine unreachable: {exc}") from None

    def _list_sync(self, deployment: str) -> list[_Box]:
        # The low-level list is one call with labels and state: no per-container inspect that
        # could race with a container being removed meanwhile.
        rows = self._docker().api.containers(all=True, filters={"label": f"{LABEL_DEPLOYMENT}={deployment}"})
        boxes = []
        for row in rows:
            labels = row.get("Labels") or {}
            names = row.get("Names") or [row["Id"]]
            boxes.append(
                _Box(
                    id=row["Id"],
                    replica=labels.get(LABEL_REPLICA) or names[0].lstrip("/"),
                    status=str(row.get("State") or "unknown"),
                    started_at=_float(labels.get(LABEL_STARTED)),
                )
            )
        return boxes

    def _remove_sync(self, box: _Box) -> None:
        import docker.errors

        try:
            self._docker().api.remove_container(box.id, force=True)
        except docker.errors.NotFound:
            pass

    def _stop_sync(self, box: _Box) -> None:
        import docker.errors

        try:
            # The engine sends the stop signal (SIGTERM), waits the grace period, then SIGKILLs.
            self._docker().api.stop(box.id, timeout=max(1, round(self.stop_grace_s)))
        except docker.errors.NotFound:
            return
        self._remove_sync(box)

    def _create_sync(self, deployment: str, dep: PinnedDeployment, replica_id: str) -> None:
        import docker.errors

        spec = dep.spec
        env = {}
        if self.network_mode == "host":
            env["GPUSCALE_WORKER_PORT"] = "0"  # replicas share the host's ports
        env.update(spec.env)
        env.update({"GPUSCALE_CONTAINER_ID": replica_id, "GPUSCALE_POOL": spec.pool})
        gpus = spec.gpus if spec.gpus is not None else self.gpus
        image = spec.image or self.image_template.format(pool=spec.pool, deployment=deployment)
        client = self._docker()
        container = client.containers.create(
            image,
            command=list(spec.command) or None,
            name=replica_id,
            labels={
                LABEL_MANAGED: "true",
                LABEL_DEPLOYMENT: deployment,
                LABEL_POOL: spec.pool,
                LABEL_REPLICA: replica_id,
                LABEL_STARTED: f"{time.time():.3f}",
            },
            environment=env,
            network_mode=self.network_mode,
            restart_policy=_restart_policy(self.restart_policy),
            device_requests=device_requests(gpus) or None,
            stop_signal="SIGTERM",  # the grace period is given to each stop() call
            detach=True,
        )
        try:
            container.start()
        except docker.errors.APIError as exc:
            # Never leave a created-but-dead container behind.
            self._remove_sync(_Box(container.id, replica_id, "created", 0.0))
            reason = str(exc.explanation or exc)
            if "device driver" in reason or "gpu" in reason.lower():
                raise CapacityError(
                    f"docker engine cannot satisfy the GPU request (gpus={gpus}) for {deployment}: {reason}",
                    code="gpu_unavailable",
                ) from None
            raise

    # ------------------------------------------------------------------ reconcile

    def _begin_stop(self, box: _Box) -> None:
        replica_id = box.replica
        if replica_id in self._stopping:
            return
        task = asyncio.create_task(self._call(self._stop_sync, box), name=f"stop-{replica_id}")
        self._stopping[replica_id] = task

        def done(t: asyncio.Task[None]) -> None:
            self._stopping.pop(replica_id, None)
            if not t.cancelled() and t.exception() is not None:
                log.error("stopping replica %s failed: %s", replica_id, t.exception())

        task.add_done_callback(done)

    async def _reconcile(self, deployment: str, dep: PinnedDeployment, idle: Collection[str] = ()) -> None:
        live = []
        for box in await self._call(self._list_sync, deployment):
            if box.replica in self._stopping:
                continue
            if box.status in _GONE or box.status == "created":
                log.info("removing %s container %s (%s)", deployment, box.replica, box.status)
                await self._call(self._remove_sync, box)
                continue
            live.append(box)
        want = 0 if dep.paused else dep.target
        if len(live) < want:
            for _ in range(want - len(live)):
                rid = f"{deployment}-{uuid.uuid4().hex[:8]}"
                await self._call(self._create_sync, deployment, dep, rid)
                log.info("started replica %s of %s", rid, deployment)
        elif len(live) > want:
            by_id = {box.replica: box for box in live}
            ranked = [(rid, box.started_at) for rid, box in by_id.items()]
            for rid in choose_victims(ranked, len(live) - want, idle):
                log.info("stopping replica %s of %s%s", rid, deployment, " (idle)" if rid in idle else "")
                self._begin_stop(by_id[rid])

    async def observe(self, deployment: str) -> ProviderState:
        dep = self._get(deployment)
        async with self._lock:
            await self._reconcile_for_observe(deployment, dep)
            boxes = await self._call(self._list_sync, deployment)
        replicas = []
        for box in boxes:
            if box.replica in self._stopping:
                status = REPLICA_STOPPING
            elif box.status == "running":
                status = REPLICA_RUNNING
            elif box.status in _GONE:
                continue
            else:
                status = REPLICA_STARTING
            replicas.append(Replica(box.replica, status, box.started_at))
        replicas.sort(key=lambda r: r.started_at)
        return state_of(replicas, dep)

    async def wait_stopped(self) -> None:
        """Wait for every stop in flight (tests, shutdown)."""
        while self._stopping:
            await asyncio.gather(*list(self._stopping.values()), return_exceptions=True)

    async def aclose(self) -> None:
        """Wait for stops in flight; with ``stop_on_close`` stop every replica first.  Containers
        otherwise outlive the controller, as cloud replicas do, and are found again by label."""
        if self.stop_on_close:
            async with self._lock:
                for name, dep in self._deployments.items():
                    dep.paused = True
                    await self._reconcile(name, dep)
        await self.wait_stopped()
        if self._client is not None:
            await asyncio.to_thread(self._client.close)
            self._client = None


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0
