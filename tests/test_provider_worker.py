"""Providers with the real worker: each replica registers its replica id as ``container_id``.

The local provider and the emulator (behind the ``datacrunch`` provider) start the real
``gpuscale worker --pool bench`` (their default command) on the test's database.  The controller
maps idle servers to replica ids through ``processing_servers.container_id``, so the id a
provider reports and the id the worker registers must be the same string.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from provider_kit import no_processes, until

from gpuscale.controller.providers import LaunchSpec, Provider
from gpuscale.controller.providers.datacrunch import DataCrunchClient, DataCrunchProvider, RetryPolicy
from gpuscale.controller.providers.local import LocalProvider
from gpuscale.dev.emulator import Emulator, EmulatorConfig

DEPLOYMENT = "gpuscale-bench"


@pytest.fixture(params=["local", "datacrunch"])
async def provider(request: pytest.FixtureRequest, dsn: str) -> AsyncIterator[Provider]:
    worker_env = {"GPUSCALE_DATABASE_URL": dsn, "GPUSCALE_HEARTBEAT_INTERVAL_S": "1"}
    if request.param == "local":
        local = LocalProvider({DEPLOYMENT: LaunchSpec("bench", env=worker_env)}, stop_grace_s=20)
        yield local
        await local.aclose()
        return
    emu = Emulator(EmulatorConfig(cold_start_s=0.1, grace_s=20, tick_s=0.05, secrets={"db-url": dsn}))
    await emu.__aenter__()
    client = DataCrunchClient(emu.base_url, emu.client_id, emu.client_secret, retry=RetryPolicy(attempts=2))
    await client.create_deployment(
        {
            "name": DEPLOYMENT,
            "containers": [
                {
                    "image": "registry.example.com/gpuscale/bench:test",
                    "exposed_port": 8001,
                    "env": [
                        {"name": "GPUSCALE_POOL", "value_or_reference_to_secret": "bench", "type": "plain"},
                        {
                            "name": "GPUSCALE_DATABASE_URL",
                            "value_or_reference_to_secret": "db-url",
                            "type": "secret",
                        },
                        {
                            "name": "GPUSCALE_HEARTBEAT_INTERVAL_S",
                            "value_or_reference_to_secret": "1",
                            "type": "plain",
                        },
                    ],
                }
            ],
            "compute": {"name": "H100", "size": 1},
        }
    )
    try:
        yield DataCrunchProvider(client)
    finally:
        await client.aclose()
        await emu.__aexit__(None, None, None)


async def _active(db: asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT container_id, pool, status FROM processing_servers"
        " WHERE status = 'active' ORDER BY container_id"
    )
    return [dict(r) for r in rows]


async def test_replicas_register_their_ids_and_deregister_when_stopped(
    provider: Provider, db: asyncpg.Pool
) -> None:
    await provider.set_replicas(DEPLOYMENT, 2)

    async def registered() -> list[str] | None:
        state = await provider.observe(DEPLOYMENT)
        ids = sorted(r.id for r in state.replicas if r.status == "running")
        active = await _active(db)
        servers = sorted(row["container_id"] for row in active)
        return ids if len(ids) == 2 and servers == ids and all(r["pool"] == "bench" for r in active) else None

    ids = await until(registered, "both workers registered under their replica ids", timeout_s=60)

    await provider.set_replicas(DEPLOYMENT, 1, idle=[ids[0]])

    async def one_left() -> list[dict[str, Any]] | None:
        state = await provider.observe(DEPLOYMENT)
        active = await _active(db)
        live = [r.id for r in state.replicas]
        return active if len(live) == 1 and [a["container_id"] for a in active] == live else None

    (survivor,) = await until(one_left, "the stopped worker to deregister", timeout_s=60)
    if isinstance(provider, LocalProvider):
        assert survivor["container_id"] == ids[1]  # the idle one was stopped
    await provider.set_replicas(DEPLOYMENT, 0)
    await until(lambda: _none_active(db), "every worker deregistered", timeout_s=60)
    await no_processes(set(ids))


async def _none_active(db: asyncpg.Pool) -> bool:
    return not await _active(db)
