"""Providers: the back ends that run a deployment's containers (DataCrunch, Docker, local)."""

from __future__ import annotations

from controller.providers.base import (
    CapacityError,
    DeploymentNotFound,
    Provider,
    ProviderError,
    ProviderState,
    Replica,
)

__all__ = [
    "CapacityError",
    "DeploymentNotFound",
    "Provider",
    "ProviderError",
    "ProviderState",
    "Replica",
]
