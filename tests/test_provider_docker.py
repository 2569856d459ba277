"""The Docker provider against a real engine started by the test suite (see docker_engine.py).

What the shared contract suite cannot see: what the created containers look like (labels, env,
restart policy, network), GPU device requests (sent, and the engine's refusal reported clearly
with nothing left behind), finding replicas again after a restart, removing exited containers,
and clear errors for a missing image or an unreachable engine.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import pytest
from docker_engine import BUSYBOX_IMAGE, DockerEngine, docker_engine
from provider_kit import SH_STANDIN, until

from gpuscale.controller.providers import CapacityError, LaunchSpec, ProviderError
from gpuscale.controller.providers.docker import (
    LABEL_DEPLOYMENT,
    LABEL_POOL,
    LABEL_REPLICA,
    DockerProvider,
    device_requests,
)

_names = itertools.count()
FIXTURES = (docker_engine,)  # the session fixture the tests below take as a parameter


def make(engine: DockerEngine, name: str, **kwargs: object) -> DockerProvider:
    spec = LaunchSpec(
        "text",
        command=SH_STANDIN,
        image=str(kwargs.pop("image", BUSYBOX_IMAGE)),
        env={"GPUSCALE_DATABASE_URL": "postgresql://db.internal/gpuscale"},
        gpus=kwargs.pop("gpus", "none"),  # type: ignore[arg-type]
    )
    options: dict[str, object] = {
        "network_mode": "none",
        "restart_policy": "on-failure:2",
        "stop_grace_s": 2.0,
    }
    options.update(kwargs)
    return DockerProvider({name: spec}, base_url=engine.base_url, **options)  # type: ignore[arg-type]


@pytest.fixture
async def named(docker_engine: DockerEngine) -> AsyncIterator[str]:
    name = f"deck-dk-{next(_names)}"
    yield name
    cleanup = make(docker_engine, name, stop_on_close=True)
    await cleanup.aclose()


def containers(engine: DockerEngine, name: str) -> list[dict[str, object]]:
    client = engine.client()
    try:
        return [
            c.attrs for c in client.containers.list(all=True, filters={"label": f"{LABEL_DEPLOYMENT}={name}"})
        ]
    finally:
        client.close()


async def test_containers_carry_labels_env_policy_and_network(
    docker_engine: DockerEngine, named: str
) -> None:
    provider = make(docker_engine, named)
    await provider.set_replicas(named, 1)
    (attrs,) = containers(docker_engine, named)
    (replica,) = (await provider.observe(named)).replicas
    labels = attrs["Config"]["Labels"]  # type: ignore[index]
    assert (
        labels[LABEL_DEPLOYMENT] == named
        and labels[LABEL_POOL] == "text"
        and labels[LABEL_REPLICA] == replica.id
    )
    env = dict(item.split("=", 1) for item in attrs["Config"]["Env"])  # type: ignore[index]
    assert env["GPUSCALE_CONTAINER_ID"] == replica.id and env["GPUSCALE_POOL"] == "text"
    assert env["GPUSCALE_DATABASE_URL"] == "postgresql://db.internal/gpuscale"
    host = attrs["HostConfig"]
    assert host["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 2}  # type: ignore[index]
    assert host["NetworkMode"] == "none"  # type: ignore[index]
    assert attrs["Name"] == f"/{replica.id}"
    assert "postgresql://" not in repr(provider)
    await provider.set_replicas(named, 0)
    await provider.aclose()


async def test_gpu_request_is_sent_and_the_refusal_is_clear(docker_engine: DockerEngine, named: str) -> None:
    provider = make(docker_engine, named, gpus="2")
    with pytest.raises(CapacityError) as info:
        await provider.set_replicas(named, 1)
    message = str(info.value)
    assert "GPU request (gpus=2)" in message and named in message
    assert "could not select device driver" in message  # the engine's own words
    assert containers(docker_engine, named) == []  # the created container was removed again
    state = await provider.observe(named)  # observing still works and says what is wrong
    assert state.status == "unhealthy" and state.replicas == [] and state.target == 1
    assert containers(docker_engine, named) == []
    await provider.aclose()


def test_device_requests() -> None:
    assert device_requests("none") == [] and device_requests("0") == [] and device_requests(None) == []
    (everything,) = device_requests("all")
    assert everything["Count"] == -1 and everything["Capabilities"] == [["gpu"]]
    (two,) = device_requests("2")
    assert two["Count"] == 2
    (ids,) = device_requests("0, 3")
    assert ids["DeviceIDs"] == ["0", "3"] and not ids.get("Count")


async def test_a_new_provider_finds_running_replicas_by_label(
    docker_engine: DockerEngine, named: str
) -> None:
    first = make(docker_engine, named)
    await first.set_replicas(named, 2)
    ids = {r.id for r in (await first.observe(named)).replicas}
    await first.aclose()  # containers outlive the controller, like cloud replicas

    second = make(docker_engine, named)
    state = await second.observe(named)
    assert {r.id for r in state.replicas} == ids
    await second.set_replicas(named, 1)  # it can scale what it did not start
    await second.wait_stopped()
    assert len((await second.observe(named)).replicas) == 1
    await second.set_replicas(named, 0)
    await second.aclose()


async def test_exited_containers_are_removed_and_replaced(docker_engine: DockerEngine, named: str) -> None:
    provider = make(docker_engine, named, restart_policy="no")
    await provider.set_replicas(named, 1)
    (replica,) = (await provider.observe(named)).replicas
    client = docker_engine.client()
    try:
        client.containers.get(replica.id).kill()
    finally:
        client.close()

    async def replaced() -> bool:
        state = await provider.observe(named)
        return [r.status for r in state.replicas] == ["running"] and state.replicas[0].id != replica.id

    await until(replaced, "a new replica instead of the exited one")
    names = [str(c["Name"]).lstrip("/") for c in containers(docker_engine, named)]
    assert replica.id not in names and len(names) == 1
    await provider.set_replicas(named, 0)
    await provider.aclose()


async def test_missing_image_is_a_clear_error(docker_engine: DockerEngine, named: str) -> None:
    provider = make(docker_engine, named, image="gpuscale-nonexistent:1")
    with pytest.raises(ProviderError, match="No such image"):
        await provider.set_replicas(named, 1)
    await provider.aclose()


async def test_unreachable_engine_is_a_provider_error(tmp_path: object) -> None:
    provider = DockerProvider(
        {"deck-x": LaunchSpec("text", image=BUSYBOX_IMAGE)},
        base_url="unix:///tmp/gpuscale-no-such-docker.sock",
    )
    with pytest.raises(ProviderError, match=r"(?i)docker engine"):
        await provider.observe("deck-x")
    await provider.aclose()
