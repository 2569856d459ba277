"""One contract, three providers: local processes, a real Docker engine, DataCrunch (emulated).

Every provider must scale 0→3→1→0, report its replicas, target and status, pause and resume,
stop idle replicas first where it can choose, raise the typed errors, hand each replica its id and
pool, and leave no process or container behind after a scale-down.  The DataCrunch provider talks
HTTP to the emulator, whose replicas are real processes; it cannot choose whom to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from docker_engine import BUSYBOX_IMAGE, DockerEngine, docker_engine
from provider_kit import SH_STANDIN, STANDIN, STUBBORN, no_processes, replica_env, replica_pids, until

from gpuscale.controller.providers import DeploymentNotFound, LaunchSpec, Provider, ProviderState
from gpuscale.controller.providers.datacrunch import DataCrunchClient, DataCrunchProvider, RetryPolicy
from gpuscale.controller.providers.docker import LABEL_DEPLOYMENT, DockerProvider
from gpuscale.controller.providers.local import LocalProvider
from gpuscale.dev.emulator import Emulator, EmulatorConfig

POOL = "visual"
_names = itertools.count()
FIXTURES = (docker_engine,)  # the session fixture, used through request.getfixturevalue


@dataclass
class Kit:
    provider: Provider
    deployment: str
    can_choose: bool
    extra: Any = None

    async def state(self) -> ProviderState:
        return await self.provider.observe(self.deployment)

    async def wait_running(self, count: int) -> ProviderState:
        async def check() -> ProviderState | None:
            state = await self.state()
            running = [r for r in state.replicas if r.status == "running"]
            settled = len(running) == count and len(state.replicas) == count
            return state if settled and all(replica_env(r.id) for r in running) else None

        return await until(check, f"{count} running replicas of {self.deployment}")


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    config = EmulatorConfig(cold_start_s=0.1, grace_s=2.0, tick_s=0.02, stop_order="random")
    with Emulator(config) as emu:
        yield emu


async def _datacrunch_deployment(client: DataCrunchClient, name: str, command: tuple[str, ...]) -> None:
    await client.create_deployment(
        {
            "name": name,
            "containers": [
                {
                    "image": "registry.example.com/gpuscale/visual:test",
                    "exposed_port": 8001,
                    "healthcheck": {"enabled": True, "port": 8001, "path": "/api/health"},
                    "entrypoint_overrides": {"enabled": True, "entrypoint": None, "cmd": list(command)},
                    "env": [{"name": "GPUSCALE_POOL", "value_or_reference_to_secret": POOL, "type": "plain"}],
                }
            ],
            "compute": {"name": "H100", "size": 1},
            "scaling": {
                "min_replica_count": 0,
                "max_replica_count": 0,
                "scale_down_policy": {"delay_seconds": 600},
                "scale_up_policy": {"delay_seconds": 120},
                "queue_message_ttl_seconds": 3600,
                "concurrent_requests_per_replica": 1,
                "scaling_triggers": {"queue_load": {"threshold": 1.0}},
            },
        }
    )


async def make_kit(kind: str, request: pytest.FixtureRequest, command: str = "standin") -> Kit:
    name = f"deck-{kind}-{next(_names)}"
    if kind == "local":
        argv = STANDIN if command == "standin" else STUBBORN
        return Kit(LocalProvider({name: LaunchSpec(POOL, command=argv)}, stop_grace_s=2.0), name, True)
    if kind == "docker":
        engine: DockerEngine = request.getfixturevalue("docker_engine")
        argv = (
            SH_STANDIN if command == "standin" else ("sh", "-c", "trap '' TERM; while :; do sleep 0.2; done")
        )
        provider = DockerProvider(
            {name: LaunchSpec(POOL, command=argv, image=BUSYBOX_IMAGE, gpus="none")},
            base_url=engine.base_url,
            network_mode="none",
            restart_policy="no",
            stop_grace_s=2.0,
            stop_on_close=True,
        )
        return Kit(provider, name, True, engine)
    emu: Emulator = request.getfixturevalue("emulator")
    client = DataCrunchClient(
        emu.base_url,
        emu.client_id,
        emu.client_secret,
        timeout_s=10,
        retry=RetryPolicy(attempts=3, initial_s=0.01, max_s=0.05, jitter_s=0.01),
    )
    await _datacrunch_deployment(client, name, STANDIN if command == "standin" else STUBBORN)
    return Kit(DataCrunchProvider(client), name, False, emu)


@pytest.fixture(params=["local", "docker", "datacrunch"])
async def kit(request: pytest.FixtureRequest) -> AsyncIterator[Kit]:
    made = await make_kit(request.param, request)
    try:
        yield made
    finally:
        await _teardown(made)


async def _teardown(made: Kit) -> None:
    ids = {r.id for r in (await made.state()).replicas}
    await made.provider.set_replicas(made.deployment, 0)
    if isinstance(made.provider, DataCrunchProvider):
        await made.provider.client.delete_deployment(made.deployment)
    await made.provider.aclose()
    await no_processes(ids)


async def test_scale_0_3_1_0_leaves_nothing_behind(kit: Kit) -> None:
    state = await kit.state()
    assert state.replicas == [] and state.target == 0 and not state.paused

    await kit.provider.set_replicas(kit.deployment, 3)
    state = await kit.wait_running(3)
    assert state.target == 3 and state.status == "healthy"
    ids = {r.id for r in state.replicas}
    assert len(ids) == 3
    for rid in ids:
        envs = replica_env(rid)  # the replica's processes (a shell may have a child), id and pool
        assert envs and all(env["GPUSCALE_POOL"] == POOL for env in envs)

    await kit.provider.set_replicas(kit.deployment, 1)
    state = await kit.wait_running(1)
    assert state.target == 1
    (survivor,) = [r.id for r in state.replicas]
    assert survivor in ids
    await no_processes(ids - {survivor})

    await kit.provider.set_replicas(kit.deployment, 0)
    state = await until(lambda: _empty(kit), f"no replicas of {kit.deployment}", timeout_s=30)
    assert state.target == 0
    await no_processes(ids)
    if isinstance(kit.provider, DockerProvider):
        client = kit.extra.client()
        try:
            left = client.containers.list(
                all=True, filters={"label": [f"{LABEL_DEPLOYMENT}={kit.deployment}"]}
            )
        finally:
            client.close()
        assert left == []


async def _empty(kit: Kit) -> ProviderState | None:
    state = await kit.state()
    return state if not state.replicas else None


async def test_set_replicas_is_idempotent(kit: Kit) -> None:
    await kit.provider.set_replicas(kit.deployment, 2)
    first = {r.id for r in (await kit.wait_running(2)).replicas}
    for _ in range(3):
        await kit.provider.set_replicas(kit.deployment, 2)
    await asyncio.sleep(0.3)
    state = await kit.wait_running(2)
    assert {r.id for r in state.replicas} == first


async def test_scale_down_stops_idle_replicas_first_then_the_newest(kit: Kit) -> None:
    await kit.provider.set_replicas(kit.deployment, 3)
    ordered = sorted((await kit.wait_running(3)).replicas, key=lambda r: r.started_at)
    oldest, middle, newest = (r.id for r in ordered)

    await kit.provider.set_replicas(kit.deployment, 1, idle=[oldest, newest])
    (survivor,) = [r.id for r in (await kit.wait_running(1)).replicas]
    if kit.can_choose:
        assert survivor == middle  # both idle replicas went, the busy one stayed

    await kit.provider.set_replicas(kit.deployment, 3)
    ordered = sorted((await kit.wait_running(3)).replicas, key=lambda r: r.started_at)
    await kit.provider.set_replicas(kit.deployment, 2)  # nobody idle: the newest goes
    remaining = {r.id for r in (await kit.wait_running(2)).replicas}
    if kit.can_choose:
        assert remaining == {ordered[0].id, ordered[1].id}
    assert len(remaining) == 2


async def test_pause_resume_and_status(kit: Kit) -> None:
    await kit.provider.set_replicas(kit.deployment, 2)
    await kit.wait_running(2)

    await kit.provider.pause(kit.deployment)
    await kit.provider.pause(kit.deployment)  # idempotent
    state = await until(lambda: _empty(kit), "paused deployment without replicas")
    assert state.paused and state.status == "paused" and state.target == 0

    await kit.provider.resume(kit.deployment)
    state = await kit.wait_running(2)
    assert not state.paused and state.status == "healthy" and state.target == 2

    # Scaling up a paused deployment resumes it (the DataCrunch provider has to: resume, then pin).
    await kit.provider.pause(kit.deployment)
    await until(lambda: _empty(kit), "paused again")
    await kit.provider.set_replicas(kit.deployment, 1)
    state = await kit.wait_running(1)
    assert not state.paused


async def test_a_replica_that_dies_is_replaced(kit: Kit) -> None:
    import os
    import signal

    await kit.provider.set_replicas(kit.deployment, 1)
    (victim,) = [r.id for r in (await kit.wait_running(1)).replicas]
    for pid in replica_pids(victim):
        with contextlib.suppress(ProcessLookupError):  # a shell's short-lived child may be gone
            os.kill(pid, signal.SIGKILL)

    async def replaced() -> bool:
        state = await kit.state()
        running = [r for r in state.replicas if r.status == "running"]
        return len(running) == 1 and bool(replica_env(running[0].id))

    await until(replaced, "the dead replica to be replaced (or restarted)")


async def test_errors(kit: Kit) -> None:
    with pytest.raises(DeploymentNotFound):
        await kit.provider.observe("no-such-deployment")
    with pytest.raises(DeploymentNotFound):
        await kit.provider.set_replicas("no-such-deployment", 1)
    with pytest.raises(ValueError):
        await kit.provider.set_replicas(kit.deployment, -1)
    assert (await kit.state()).replicas == []


@pytest.mark.parametrize("kind", ["local", "docker", "datacrunch"])
async def test_sigkill_after_the_grace_period(kind: str, request: pytest.FixtureRequest) -> None:
    made = await make_kit(kind, request, command="stubborn")
    try:
        await made.provider.set_replicas(made.deployment, 1)
        (replica,) = (await made.wait_running(1)).replicas
        await made.provider.set_replicas(made.deployment, 0)
        # It ignores SIGTERM: only the SIGKILL after the 2 s grace period ends it.
        await until(lambda: _empty(made), "the stubborn replica to be killed", timeout_s=30)
        await no_processes({replica.id})
    finally:
        await _teardown(made)


async def test_local_aclose_stops_everything() -> None:
    provider = LocalProvider(
        {"deck-a": LaunchSpec(POOL, command=STANDIN), "deck-b": LaunchSpec("text", command=STUBBORN)},
        stop_grace_s=0.5,
    )
    await provider.set_replicas("deck-a", 2)
    await provider.set_replicas("deck-b", 1)
    ids = set(provider.pids("deck-a")) | set(provider.pids("deck-b"))
    await until(lambda: _all_alive(ids), "all replicas up")
    await provider.aclose()
    await no_processes(ids, timeout_s=5)


async def _all_alive(ids: set[str]) -> bool:
    return all(replica_env(rid) for rid in ids)
