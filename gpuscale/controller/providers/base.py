"""The provider interface: how the controller reads and sets the replica count of a pool.

A *provider* runs the GPU containers of a deployment (one deployment per pool): the DataCrunch
cloud, a Docker engine on a self-hosted GPU box, or plain worker processes on this machine.  The
controller only ever observes a deployment and pins its replica count; everything provider
specific (OAuth, containers, process groups) lives behind this protocol.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

# Replica statuses the controller understands.  Providers map their own vocabulary onto these;
# anything else is passed through unchanged and treated as "not yet running".
REPLICA_STARTING = "starting"
REPLICA_RUNNING = "running"
REPLICA_STOPPING = "stopping"
REPLICA_FAILED = "failed"


@dataclass(frozen=True)
class Replica:
    """One running (or starting / stopping) copy of a deployment's container."""

    id: str
    status: str  # 'starting' | 'running' | 'stopping' | 'failed' | provider-specific
    started_at: float  # epoch seconds


@dataclass(frozen=True)
class ProviderState:
    """What a provider reports about one deployment."""

    replicas: list[Replica] = field(default_factory=list)
    target: int = 0  # the replica count the provider is currently set to
    paused: bool = False
    status: str = "healthy"  # deployment status, e.g. healthy / paused / quota_reached
    # False when the provider's own autoscaling may change the count (DataCrunch min < max): the
    # controller then pins it even if ``target`` already equals its decision.
    pinned: bool = True
    # Whether lowering the count stops the replicas ``set_replicas(idle=…)`` names (local, docker,
    # a slotted DataCrunch deployment); False where the provider picks them (a plain DataCrunch
    # deployment), which pools whose rules say ``scale_down_victims: idle`` cannot rely on.
    stops_named: bool = True


@dataclass(frozen=True)
class LaunchSpec:
    """How the ``local`` and ``docker`` providers start one replica of a deployment.

    Each replica also gets ``GPUSCALE_CONTAINER_ID`` (its replica id, which the worker registers as
    its ``container_id``) and ``GPUSCALE_POOL`` in its environment."""

    pool: str
    command: tuple[str, ...] = ()  # argv; empty: ``gpuscale worker --pool <pool>`` (local) / image default
    image: str | None = None  # docker only; None: the provider's image template
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # may hold the database URL
    gpus: str | None = None  # docker only: "none" | "all" | a count "2" | device ids "0,1"; None: default


def worker_command(pool: str) -> tuple[str, ...]:
    """``gpuscale worker --pool <pool>`` run by this interpreter, independent of PATH."""
    return (sys.executable, "-m", "gpuscale.cli", "worker", "--pool", pool)


class ProviderError(Exception):
    """A provider call failed for a transient or unknown reason; the controller holds and retries
    on its next tick.  Messages never carry credentials."""


class CapacityError(ProviderError):
    """The provider refused for lack of capacity or quota (a 4xx that is not throttling).

    ``message`` is the provider's own explanation, suitable for logs and the status page."""

    def __init__(self, message: str, *, code: str | None = None, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status_code = status_code


class DeploymentNotFound(ProviderError):
    """The named deployment does not exist on the provider (a configuration error)."""


@runtime_checkable
class Provider(Protocol):
    """One back end that runs the containers of deployments."""

    name: str

    async def observe(self, deployment: str) -> ProviderState:
        """Replicas, target count, paused flag and status of ``deployment``."""
        ...

    async def set_replicas(self, deployment: str, desired: int, *, idle: Collection[str] = ()) -> None:
        """Pin the replica count of ``deployment`` to ``desired``; idempotent.

        ``idle`` holds replica ids known to be idle (no running task): a provider that can choose
        which replicas to stop on a scale-down stops those first, then the newest.  ``desired > 0``
        resumes a paused deployment; ``desired == 0`` may pause it (DataCrunch, when 0/0 is
        refused).  Raises :class:`DeploymentNotFound`, :class:`CapacityError` or
        :class:`ProviderError`."""
        ...

    async def pause(self, deployment: str) -> None:
        """Stop all replicas and keep them stopped until :meth:`resume`."""
        ...

    async def resume(self, deployment: str) -> None:
        """Undo :meth:`pause` (the replica count is then whatever is set)."""
        ...

    async def aclose(self) -> None:
        """Release connections; local back ends also stop every replica they started."""
        ...
