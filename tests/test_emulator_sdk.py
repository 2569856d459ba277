"""Conformance: the official DataCrunch/Verda SDK (PyPI ``verda``) drives the emulator.

Everything goes through the SDK's own client and dataclasses, over real HTTP on loopback: if the
SDK cannot talk to the emulator, the emulator is wrong.  Replicas are real processes (a stand-in
that sleeps until SIGTERM), started with the deployment's env, secrets resolved.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from provider_kit import STANDIN, replica_env
from verda import VerdaClient
from verda.containers._containers import (
    ComputeResource,
    Container,
    ContainerDeploymentStatus,
    Deployment,
    DockerHubCredentials,
    EntrypointOverridesSettings,
    EnvVar,
    EnvVarType,
    GeneralStorageMount,
    HealthcheckSettings,
    MemoryMount,
    QueueLoadScalingTrigger,
    ReplicaInfo,
    ScalingOptions,
    ScalingPolicy,
    ScalingTriggers,
)
from verda.exceptions import APIException

from gpuscale.dev.emulator import Emulator, EmulatorConfig

T = TypeVar("T")


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    with Emulator(EmulatorConfig(cold_start_s=0.1, grace_s=2.0, tick_s=0.02)) as emulator:
        yield emulator


@pytest.fixture
def sdk(emu: Emulator) -> VerdaClient:
    return VerdaClient(emu.client_id, emu.client_secret, base_url=emu.base_url)


def wait_for(fn: Callable[[], T], what: str, timeout_s: float = 20.0) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last {value!r}")
        time.sleep(0.05)


def running(sdk: VerdaClient, name: str, count: int) -> Callable[[], list[ReplicaInfo]]:
    def check() -> list[ReplicaInfo]:
        replicas = sdk.containers.get_deployment_replicas(name)
        ok = len(replicas) == count and all(r.status == "running" for r in replicas)
        return replicas if ok and all(replica_env(r.id) for r in replicas) else []

    return check


def spec(name: str) -> Deployment:
    return Deployment(
        name=name,
        containers=[
            Container(
                image="registry.example.com/gpuscale/visual:0.1.0",
                exposed_port=8001,
                healthcheck=HealthcheckSettings(enabled=True, port=8001, path="/api/health"),
                entrypoint_overrides=EntrypointOverridesSettings(enabled=True, cmd=list(STANDIN)),
                env=[
                    EnvVar("GPUSCALE_POOL", "visual", EnvVarType.PLAIN),
                    EnvVar("GPUSCALE_DATABASE_URL", "sdk-db-url", EnvVarType.SECRET),
                ],
                volume_mounts=[GeneralStorageMount("/data"), MemoryMount(size_in_mb=1024)],
            )
        ],
        compute=ComputeResource(name="H100", size=1),
        scaling=ScalingOptions(
            min_replica_count=0,
            max_replica_count=0,
            scale_down_policy=ScalingPolicy(delay_seconds=600),
            scale_up_policy=ScalingPolicy(delay_seconds=120),
            queue_message_ttl_seconds=3600,
            concurrent_requests_per_replica=1,
            scaling_triggers=ScalingTriggers(queue_load=QueueLoadScalingTrigger(threshold=1.0)),
        ),
    )


def test_deployment_lifecycle_through_the_sdk(sdk: VerdaClient) -> None:
    name = "sdk-lifecycle"
    assert any(
        r.name == "H100" and r.size == 1 and r.is_available for r in sdk.containers.get_compute_resources()
    )
    sdk.containers.create_secret("sdk-db-url", "postgresql://emulated/db")
    assert "sdk-db-url" in [s.name for s in sdk.containers.get_secrets()]

    created = sdk.containers.create_deployment(spec(name))
    assert isinstance(created, Deployment)
    assert created.name == name and created.compute.name == "H100"
    assert created.containers[0].healthcheck.path == "/api/health"
    assert created.containers[0].name  # system-managed
    assert created.endpoint_base_url and created.created_at
    assert isinstance(created.containers[0].volume_mounts[1], MemoryMount)

    got = sdk.containers.get_deployment_by_name(name)
    assert got.scaling.min_replica_count == 0 and got.containers[0].env[1].type == EnvVarType.SECRET
    assert name in [d.name for d in sdk.containers.get_deployments()]
    assert sdk.containers.get_deployment_status(name) == ContainerDeploymentStatus.HEALTHY

    # Patch scaling the way the controller does: read, pin min = max, write back.
    scaling = sdk.containers.get_deployment_scaling_options(name)
    scaling.min_replica_count = scaling.max_replica_count = 2
    updated = sdk.containers.update_deployment_scaling_options(name, scaling)
    assert isinstance(updated, ScalingOptions)
    assert (updated.min_replica_count, updated.max_replica_count) == (2, 2)
    assert updated.scale_down_policy.delay_seconds == 600

    replicas = wait_for(running(sdk, name, 2), "2 running replicas")
    assert all(isinstance(r, ReplicaInfo) and r.started_at for r in replicas)
    for replica in replicas:
        (env,) = replica_env(replica.id)
        assert env["GPUSCALE_DATABASE_URL"] == "postgresql://emulated/db"  # the secret, resolved
        assert env["GPUSCALE_POOL"] == "visual" and env["GPUSCALE_CONTAINER_ID"] == replica.id
    assert sdk.containers.get_deployment_status(name) == ContainerDeploymentStatus.HEALTHY

    sdk.containers.pause_deployment(name)
    wait_for(lambda: not sdk.containers.get_deployment_replicas(name), "no replicas while paused")
    assert sdk.containers.get_deployment_status(name) == ContainerDeploymentStatus.PAUSED
    wait_for(lambda: not any(replica_env(r.id) for r in replicas), "paused replicas' processes to exit")

    sdk.containers.resume_deployment(name)
    resumed = wait_for(running(sdk, name, 2), "2 running replicas after resume")

    # A full update (new compute) rolls every replica; the body carries the current scaling.
    got = sdk.containers.get_deployment_by_name(name)
    assert got.scaling.min_replica_count == 2
    got.compute = ComputeResource(name="A100", size=1)
    after = sdk.containers.update_deployment(name, got)
    assert after.compute.name == "A100"
    rolled = wait_for(running(sdk, name, 2), "2 replicas of the new version")
    wait_for(lambda: not {r.id for r in rolled} & {r.id for r in resumed}, "replicas replaced")

    sdk.containers.restart_deployment(name)
    sdk.containers.purge_deployment_queue(name)
    sdk.containers.delete_deployment(name)
    with pytest.raises(APIException) as info:
        sdk.containers.get_deployment_by_name(name)
    assert info.value.code == "not_found"
    wait_for(lambda: not any(replica_env(r.id) for r in rolled), "deleted deployment's processes to exit")
    sdk.containers.delete_secret("sdk-db-url")
    assert "sdk-db-url" not in [s.name for s in sdk.containers.get_secrets()]


def test_environment_variables_through_the_sdk(sdk: VerdaClient) -> None:
    name = "sdk-env"
    sdk.containers.create_deployment(spec(name))
    try:
        env = sdk.containers.get_deployment_environment_variables(name)
        ((container, items),) = env.items()
        assert [e.name for e in items] == ["GPUSCALE_POOL", "GPUSCALE_DATABASE_URL"]
        added = sdk.containers.add_deployment_environment_variables(
            name, container, [EnvVar("GPUSCALE_LOG_FORMAT", "json", EnvVarType.PLAIN)]
        )
        assert "GPUSCALE_LOG_FORMAT" in [e.name for e in added[container]]
        changed = sdk.containers.update_deployment_environment_variables(
            name, container, [EnvVar("GPUSCALE_LOG_FORMAT", "text", EnvVarType.PLAIN)]
        )
        assert {e.name: e.value_or_reference_to_secret for e in changed[container]}[
            "GPUSCALE_LOG_FORMAT"
        ] == "text"
        left = sdk.containers.delete_deployment_environment_variables(
            name, container, ["GPUSCALE_LOG_FORMAT"]
        )
        assert "GPUSCALE_LOG_FORMAT" not in [e.name for e in left[container]]
    finally:
        sdk.containers.delete_deployment(name)


def test_registry_credentials_and_file_secrets_through_the_sdk(sdk: VerdaClient, tmp_path: Path) -> None:
    sdk.containers.add_registry_credentials(DockerHubCredentials("hub", "someone", "not-a-real-token"))
    assert "hub" in [c.name for c in sdk.containers.get_registry_credentials()]
    sdk.containers.delete_registry_credentials("hub")
    assert "hub" not in [c.name for c in sdk.containers.get_registry_credentials()]

    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    sdk.containers.create_fileset_secret_from_file_paths("certs", [str(tmp_path / "ca.pem")])
    assert "certs" in [s.name for s in sdk.containers.get_fileset_secrets()]
    sdk.containers.delete_fileset_secret("certs")
    assert "certs" not in [s.name for s in sdk.containers.get_fileset_secrets()]


def test_errors_come_back_as_the_sdk_expects(emu: Emulator, sdk: VerdaClient) -> None:
    with pytest.raises(APIException) as info:
        VerdaClient(emu.client_id, "wrong-secret", base_url=emu.base_url)
    assert info.value.code == "unauthorized_request"

    bad = spec("sdk-bad")
    bad.compute = ComputeResource(name="TPUv9", size=1)
    with pytest.raises(APIException) as info:
        sdk.containers.create_deployment(bad)
    assert info.value.code == "invalid_request" and "TPUv9" in info.value.message

    sdk.containers.create_deployment(spec("sdk-dup"))
    try:
        with pytest.raises(APIException) as info:
            sdk.containers.create_deployment(spec("sdk-dup"))
        assert info.value.code == "conflict"
        scaling = sdk.containers.get_deployment_scaling_options("sdk-dup")
        scaling.min_replica_count, scaling.max_replica_count = 3, 1
        with pytest.raises(APIException) as info:
            sdk.containers.update_deployment_scaling_options("sdk-dup", scaling)
        assert "min_replica_count" in info.value.message
    finally:
        sdk.containers.delete_deployment("sdk-dup")
    with pytest.raises(APIException) as info:
        sdk.containers.get_deployment_status("sdk-dup")
    assert info.value.code == "not_found"


def test_the_sdk_refreshes_an_expired_token(emu: Emulator, sdk: VerdaClient) -> None:
    sdk.containers.get_deployments()
    emu.expire_tokens()
    # The SDK refreshes only when it thinks its token expired, so make it think so, as it would
    # after expires_in seconds.
    sdk._authentication._expires_at = 0  # type: ignore[attr-defined]
    assert isinstance(sdk.containers.get_deployments(), list)
