"""Providers: the back ends that run a deployment's containers (DataCrunch, Docker, local).

``make_provider(settings, launches)`` builds the one named by ``settings.provider``; the back ends
import lazily so that, say, the local provider never imports the Docker SDK.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from gpuscale.controller.providers.base import (
    CapacityError,
    DeploymentNotFound,
    LaunchSpec,
    Provider,
    ProviderError,
    ProviderState,
    Replica,
    worker_command,
)

if TYPE_CHECKING:
    from gpuscale.common.settings import Settings
    from gpuscale.controller.providers.datacrunch import DataCrunchClient

__all__ = [
    "CapacityError",
    "DeploymentNotFound",
    "LaunchSpec",
    "Provider",
    "ProviderError",
    "ProviderState",
    "Replica",
    "datacrunch_client",
    "make_provider",
    "worker_command",
]


def datacrunch_client(settings: Settings, *, purpose: str) -> DataCrunchClient:
    """A DataCrunch API client from the settings (credentials, timeouts, retries).

    Raises ``ConfigError`` naming ``purpose`` when the credentials are missing."""
    from gpuscale.common.errors import ConfigError
    from gpuscale.controller.providers.datacrunch import DataCrunchClient, RetryPolicy

    if not settings.datacrunch_client_id or settings.datacrunch_client_secret is None:
        raise ConfigError(f"{purpose} needs DATACRUNCH_CLIENT_ID and DATACRUNCH_CLIENT_SECRET")
    return DataCrunchClient(
        settings.datacrunch_base_url,
        settings.datacrunch_client_id,
        settings.datacrunch_client_secret,
        timeout_s=settings.datacrunch_timeout_s,
        retry=RetryPolicy(
            attempts=settings.datacrunch_retry_attempts,
            initial_s=settings.datacrunch_backoff_initial_s,
            max_s=settings.datacrunch_backoff_max_s,
        ),
    )


def make_provider(settings: Settings, launches: Mapping[str, LaunchSpec] | None = None) -> Provider:
    """The provider ``settings.provider`` names.

    ``launches`` maps deployment name → :class:`LaunchSpec`; the ``local`` and ``docker`` providers
    need it (the ``datacrunch`` one reads everything from the API).  Raises ``ConfigError`` when a
    setting it needs is missing."""
    from gpuscale.common.errors import ConfigError

    launches = dict(launches or {})
    if settings.provider == "datacrunch":
        from gpuscale.controller.providers.datacrunch import DataCrunchProvider

        return DataCrunchProvider(datacrunch_client(settings, purpose="provider 'datacrunch'"))
    if settings.provider == "docker":
        from gpuscale.controller.providers.docker import DockerProvider

        return DockerProvider(
            launches,
            base_url=settings.docker_host,
            image_template=settings.docker_image,
            gpus=settings.docker_gpus,
            network_mode=settings.docker_network_mode,
            restart_policy=settings.docker_restart_policy,
            stop_grace_s=settings.docker_stop_grace_s,
        )
    if settings.provider == "local":
        from gpuscale.controller.providers.local import LocalProvider

        return LocalProvider(
            launches, stop_grace_s=settings.local_stop_grace_s, log_dir=settings.local_log_dir
        )
    raise ConfigError(f"unknown provider {settings.provider!r} (datacrunch, docker or local)")
