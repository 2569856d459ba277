"""The part shared by providers that keep the replica count themselves (``local``, ``docker``).

DataCrunch keeps a deployment's count on its side; the ``local`` and ``docker`` providers have no
such service, so they remember per deployment the count they were set to, whether it is paused and
why starting a replica last failed, and bring the running replicas to that count on every call.
:class:`PinnedProvider` holds that record and the ``set_replicas`` / ``pause`` / ``resume`` /
observe-time bookkeeping around it; a subclass only says how to reconcile one deployment
(:meth:`PinnedProvider._reconcile`) and how to list its replicas.  :func:`state_of` turns the
replicas and the record into the :class:`ProviderState` the controller reads.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from gpuscale.controller.providers.base import (
    REPLICA_RUNNING,
    DeploymentNotFound,
    LaunchSpec,
    ProviderError,
    ProviderState,
    Replica,
)


def choose_victims(live: list[tuple[str, float]], count: int, idle: Collection[str] = ()) -> list[str]:
    """Which ``count`` replicas to stop: idle ones first, then the newest (ties: by id).

    ``live`` is ``(replica_id, started_at)`` of the replicas not already stopping."""
    idle_set = set(idle)
    ranked = sorted(live, key=lambda item: (item[0] not in idle_set, -item[1], item[0]))
    return [rid for rid, _ in ranked[: max(count, 0)]]


@dataclass
class PinnedDeployment:
    """What a pinning provider remembers of one deployment."""

    spec: LaunchSpec
    target: int = 0
    paused: bool = False
    last_error: str | None = None  # why the last attempt to start a replica failed


def state_of(replicas: list[Replica], dep: PinnedDeployment) -> ProviderState:
    """The :class:`ProviderState` of a deployment with these ``replicas`` (sorted by the caller).

    Status: ``paused``; ``healthy`` once enough replicas run; ``unhealthy`` when starting the
    missing ones failed; otherwise ``degraded`` (some run) or ``initializing`` (none yet)."""
    running = sum(1 for r in replicas if r.status == REPLICA_RUNNING)
    if dep.paused:
        status = "paused"
    elif running >= dep.target:
        status = "healthy"
    elif dep.last_error:
        status = "unhealthy"
    else:
        status = "degraded" if running else "initializing"
    return ProviderState(
        replicas=replicas, target=0 if dep.paused else dep.target, paused=dep.paused, status=status
    )


D = TypeVar("D", bound=PinnedDeployment)


class PinnedProvider(ABC, Generic[D]):
    """Base of a provider that pins each deployment's replica count itself.

    Every change of the record and every reconcile runs under one lock, so concurrent calls never
    start or stop the same replicas twice."""

    name: str

    def __init__(self, deployments: Mapping[str, D]) -> None:
        self._deployments: dict[str, D] = dict(deployments)
        self._lock = asyncio.Lock()

    def _get(self, deployment: str) -> D:
        try:
            return self._deployments[deployment]
        except KeyError:
            raise DeploymentNotFound(f"{self.name} provider has no deployment {deployment!r}") from None

    @abstractmethod
    async def _reconcile(self, deployment: str, dep: D, idle: Collection[str] = ()) -> None:
        """Start or stop replicas of ``deployment`` until ``dep`` is met (called under the lock);
        on a scale-down stop the ``idle`` replicas first."""

    async def _reconcile_for_observe(self, deployment: str, dep: D) -> None:
        """Reconcile before observing; a failure is kept in ``last_error`` rather than raised
        (call under the lock)."""
        try:
            await self._reconcile(deployment, dep)
        except ProviderError as exc:
            # Observing must still work when replicas cannot start: report it in the status.
            dep.last_error = str(exc)
            # Logged under the subclass's module, as each provider logs everything else.
            logging.getLogger(type(self).__module__).warning("%s: %s", deployment, exc)

    async def set_replicas(self, deployment: str, desired: int, *, idle: Collection[str] = ()) -> None:
        if desired < 0:
            raise ValueError("desired replica count must be >= 0")
        dep = self._get(deployment)
        async with self._lock:
            dep.target = desired
            if desired > 0:
                dep.paused = False  # as on DataCrunch: scaling up resumes a paused deployment
            try:
                await self._reconcile(deployment, dep, idle)
            except ProviderError as exc:
                dep.last_error = str(exc)
                raise
            dep.last_error = None

    async def pause(self, deployment: str) -> None:
        dep = self._get(deployment)
        async with self._lock:
            dep.paused = True
            await self._reconcile(deployment, dep)

    async def resume(self, deployment: str) -> None:
        dep = self._get(deployment)
        async with self._lock:
            dep.paused = False
            await self._reconcile(deployment, dep)
