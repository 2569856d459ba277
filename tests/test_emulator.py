"""The DataCrunch emulator: faults, tokens, replicas as processes, the command line.

Driven over real HTTP by the same async client the controller uses, so every fault the emulator
injects is also a test of how the ``datacrunch`` provider copes with it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from provider_kit import STANDIN, no_processes, replica_env, until

from gpuscale.controller.providers import CapacityError, ProviderError
from gpuscale.controller.providers.datacrunch import DataCrunchClient, DataCrunchProvider, RetryPolicy
from gpuscale.dev.emulator import Emulator, EmulatorConfig, FaultSpecError, parse_faults

_names = itertools.count()


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    with Emulator(
        EmulatorConfig(cold_start_s=0.1, grace_s=2.0, tick_s=0.02, stop_order="random")
    ) as emulator:
        yield emulator


@pytest.fixture
def waits() -> list[float]:
    return []


@pytest.fixture
async def client(emu: Emulator, waits: list[float]) -> AsyncIterator[DataCrunchClient]:
    emu.clear_faults()

    async def record(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(min(seconds, 0.05))

    c = DataCrunchClient(
        emu.base_url,
        emu.client_id,
        emu.client_secret,
        timeout_s=5.0,
        retry=RetryPolicy(attempts=4, initial_s=0.01, max_s=0.05, jitter_s=0.0),
        sleep=record,
    )
    yield c
    emu.clear_faults()
    await c.aclose()


def body(
    name: str, command: tuple[str, ...] = STANDIN, env: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    return {
        "name": name,
        "containers": [
            {
                "image": "registry.example.com/gpuscale/text:0.1.0",
                "exposed_port": 8001,
                "entrypoint_overrides": {"enabled": True, "cmd": list(command)},
                "env": env
                or [{"name": "GPUSCALE_POOL", "value_or_reference_to_secret": "text", "type": "plain"}],
            }
        ],
        "compute": {"name": "A100", "size": 1},
    }


@pytest.fixture
async def deployment(client: DataCrunchClient) -> AsyncIterator[str]:
    name = f"emu-{next(_names)}"
    await client.create_deployment(body(name))
    yield name
    ids = {r["id"] for r in await client.get_replicas(name)}
    await client.delete_deployment(name)
    await no_processes(ids)


async def running(client: DataCrunchClient, name: str, count: int) -> list[dict[str, Any]]:
    async def check() -> list[dict[str, Any]]:
        replicas = await client.get_replicas(name)
        ok = len(replicas) == count and all(r["status"] == "running" for r in replicas)
        return replicas if ok else []

    return await until(check, f"{count} running replicas of {name}")


# ---------------------------------------------------------------------- faults


async def test_429_with_retry_after_is_retried(
    emu: Emulator, client: DataCrunchClient, waits: list[float]
) -> None:
    await client.list_deployments()  # authenticated
    emu.set_faults(throttle_next=2, retry_after=0.25)
    assert isinstance(await client.list_deployments(), list)
    assert waits == [0.25, 0.25]


async def test_500_is_retried(emu: Emulator, client: DataCrunchClient, waits: list[float]) -> None:
    await client.list_deployments()
    emu.set_faults(error_next=2)
    assert isinstance(await client.list_deployments(), list)
    assert len(waits) == 2


async def test_persistent_errors_surface_as_provider_errors(emu: Emulator, client: DataCrunchClient) -> None:
    await client.list_deployments()
    emu.set_faults(error=1.0)
    with pytest.raises(ProviderError, match="gave up after 4 attempts"):
        await client.list_deployments()


async def test_slow_answers_time_out(emu: Emulator) -> None:
    emu.set_faults(slow=1.0)
    c = DataCrunchClient(
        emu.base_url,
        emu.client_id,
        emu.client_secret,
        timeout_s=0.2,
        retry=RetryPolicy(attempts=2, initial_s=0.01),
    )
    try:
        with pytest.raises(ProviderError, match="timed out"):
            await c.list_deployments()
    finally:
        emu.clear_faults()
        await c.aclose()


async def test_expired_tokens_are_renewed_once(emu: Emulator, client: DataCrunchClient) -> None:
    await client.list_deployments()
    emu.expire_tokens()
    assert isinstance(await client.list_deployments(), list)


async def test_short_lived_tokens_expire(emu: Emulator) -> None:
    emu.set_faults(token_ttl=0.3)
    async with httpx.AsyncClient(base_url=emu.base_url) as http:
        answer = await http.post(
            "/oauth2/token",
            json={
                "grant_type": "client_credentials",
                "client_id": emu.client_id,
                "client_secret": emu.client_secret,
            },
        )
        tokens = answer.json()
        assert tokens["expires_in"] == 0.3
        headers = {"Authorization": f"Bearer {tokens['access_token']}"}
        assert (await http.get("/container-deployments", headers=headers)).status_code == 200
        await asyncio.sleep(0.4)
        expired = await http.get("/container-deployments", headers=headers)
        assert expired.status_code == 401 and expired.json()["code"] == "unauthorized_request"
        refreshed = await http.post(
            "/oauth2/token", json={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
        )
        assert refreshed.status_code == 200
        reused = await http.post(
            "/oauth2/token", json={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
        )
        assert reused.status_code == 401  # refresh tokens are single use
        assert (await http.get("/container-deployments")).status_code == 401  # no token at all
    emu.clear_faults()


async def test_quota_reached(emu: Emulator, client: DataCrunchClient, deployment: str) -> None:
    emu.set_faults(quota=1)
    await DataCrunchProvider(client).set_replicas(deployment, 3)
    await running(client, deployment, 1)
    await until(lambda: _status(client, deployment, "quota_reached"), "quota_reached")
    emu.clear_faults()
    await running(client, deployment, 3)
    assert await client.get_status(deployment) == "healthy"


async def _status(client: DataCrunchClient, name: str, want: str) -> bool:
    return await client.get_status(name) == want


async def test_replicas_that_never_become_healthy(
    emu: Emulator, client: DataCrunchClient, deployment: str
) -> None:
    emu.set_faults(unhealthy=[deployment])
    await DataCrunchProvider(client).set_replicas(deployment, 2)
    await asyncio.sleep(0.5)  # several cold starts
    replicas = await client.get_replicas(deployment)
    assert [r["status"] for r in replicas] == ["starting", "starting"]
    assert not any(replica_env(r["id"]) for r in replicas)  # no process was ever started
    assert await client.get_status(deployment) == "unhealthy"
    state = await DataCrunchProvider(client).observe(deployment)
    assert [r.status for r in state.replicas] == ["starting", "starting"]
    emu.clear_faults()
    await running(client, deployment, 2)


async def test_refused_zero_falls_back_to_pause(
    emu: Emulator, client: DataCrunchClient, deployment: str
) -> None:
    provider = DataCrunchProvider(client)
    await provider.set_replicas(deployment, 1)
    (replica,) = await running(client, deployment, 1)
    emu.set_faults(refuse_zero=True)
    await provider.set_replicas(deployment, 0)
    state = await provider.observe(deployment)
    assert state.paused and state.status == "paused" and state.target == 0
    await no_processes({replica["id"]})
    await provider.set_replicas(deployment, 2)  # resume, then pin 2/2
    await running(client, deployment, 2)
    assert not (await provider.observe(deployment)).paused


async def test_no_capacity_is_a_capacity_error(
    emu: Emulator, client: DataCrunchClient, deployment: str
) -> None:
    emu.set_faults(no_capacity=True)
    with pytest.raises(CapacityError, match="not enough GPUs") as info:
        await DataCrunchProvider(client).set_replicas(deployment, 2)
    assert info.value.code == "insufficient_capacity"


# ---------------------------------------------------------------------- replicas


async def test_cold_start_then_sigterm_on_scale_down(
    emu: Emulator, client: DataCrunchClient, deployment: str
) -> None:
    await DataCrunchProvider(client).set_replicas(deployment, 3)
    first = await client.get_replicas(deployment)
    assert len(first) == 3  # created at once, processes follow after the cold start
    replicas = await running(client, deployment, 3)
    await DataCrunchProvider(client).set_replicas(deployment, 1)
    (survivor,) = await running(client, deployment, 1)
    stopped = {r["id"] for r in replicas} - {survivor["id"]}
    await no_processes(stopped)
    snapshot = emu.snapshot()["deployments"][deployment]
    assert [r["id"] for r in snapshot["replicas"]] == [survivor["id"]]


async def test_secrets_resolve_from_the_emulator_environment(
    client: DataCrunchClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMU_TEST_DB_URL", "postgresql://from-env/db")
    monkeypatch.setenv("DATACRUNCH_CLIENT_SECRET", "emulator-own-credential")
    name = f"emu-{next(_names)}"
    env = [
        {"name": "GPUSCALE_POOL", "value_or_reference_to_secret": "text", "type": "plain"},
        {
            "name": "GPUSCALE_DATABASE_URL",
            "value_or_reference_to_secret": "EMU_TEST_DB_URL",
            "type": "secret",
        },
        {
            "name": "GPUSCALE_WORKER_TOKEN",
            "value_or_reference_to_secret": "undefined-secret",
            "type": "secret",
        },
    ]
    await client.create_deployment(body(name, env=env))
    try:
        await DataCrunchProvider(client).set_replicas(name, 1)
        (replica,) = await running(client, name, 1)
        (proc_env,) = await until(lambda: _env(replica["id"]), "the replica's process")
        assert proc_env["GPUSCALE_DATABASE_URL"] == "postgresql://from-env/db"
        assert proc_env["GPUSCALE_CONTAINER_ID"] == replica["id"]
        assert proc_env["GPUSCALE_WORKER_PORT"] == "0"  # replicas share this machine's ports
        assert proc_env.get("GPUSCALE_WORKER_TOKEN") != "undefined-secret"
        # A container sees its deployment's env, not the emulator's own API credentials.
        assert "DATACRUNCH_CLIENT_SECRET" not in proc_env
    finally:
        await client.delete_deployment(name)


async def _env(replica_id: str) -> list[dict[str, str]]:
    return replica_env(replica_id)


async def test_bad_bodies_are_rejected_with_the_field(client: DataCrunchClient) -> None:
    bad = body("emu-bad")
    bad["containers"][0]["exposed_prot"] = 8001
    with pytest.raises(ProviderError, match=r"containers\[0\]\.exposed_prot: unknown field"):
        await client.create_deployment(bad)
    bad = body("Emu_Bad")
    with pytest.raises(ProviderError, match="not a valid deployment name"):
        await client.create_deployment(bad)


# ---------------------------------------------------------------------- fault specs and admin


def test_fault_specs_parse() -> None:
    faults = parse_faults(
        "throttle=0.2,retry_after=3,error=0.1,slow=0.5,token_ttl=5,quota=2,unhealthy,seed=7"
    )
    assert (faults.throttle, faults.retry_after, faults.error, faults.slow) == (0.2, 3.0, 0.1, 0.5)
    assert (faults.token_ttl, faults.quota, faults.unhealthy, faults.seed) == (5.0, 2, ["*"], 7)
    assert parse_faults("unhealthy=deck-a|deck-b,no_capacity,refuse_zero").unhealthy == ["deck-a", "deck-b"]
    assert parse_faults("").to_dict() == parse_faults(None).to_dict()
    for bad in ("throttle=2", "bogus=1", "quota=Many Names!", "quota=-2", "slow"):
        with pytest.raises(FaultSpecError):
            parse_faults(bad)


def test_admin_endpoint(emu: Emulator) -> None:
    assert emu.set_faults("throttle=0.5,seed=3")["throttle"] == 0.5
    assert emu.set_faults(quota=4)["throttle"] == 0.5  # merged
    with pytest.raises(Exception, match="400"):
        emu.set_faults(throttle="lots")
    emu.clear_faults()
    assert emu.snapshot()["faults"]["throttle"] == 0.0


# ---------------------------------------------------------------------- command line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gpuscale() -> list[str]:
    return [sys.executable, "-m", "gpuscale.cli"]


def test_cli_rejects_a_bad_fault_spec() -> None:
    result = subprocess.run(
        [*_gpuscale(), "emulator", "--faults", "bogus=1"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "unknown fault 'bogus'" in result.stderr


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_cli_serves_and_never_orphans_its_replicas(how: str) -> None:
    """SIGTERM: a clean shutdown stops every replica.  SIGKILL: nothing runs in the emulator any
    more, yet the kernel's parent-death signal still ends its replicas."""
    port = _free_port()
    env = {**os.environ, "DATACRUNCH_CLIENT_ID": "cli-id", "DATACRUNCH_CLIENT_SECRET": "cli-secret"}
    proc = await asyncio.create_subprocess_exec(
        *_gpuscale(),
        "emulator",
        "--port",
        str(port),
        "--cold-start",
        "0.1",
        "--grace",
        "2",
        "--client-id",
        "cli-flag-id",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        client = DataCrunchClient(
            f"http://127.0.0.1:{port}/v1", "cli-flag-id", "cli-secret", retry=RetryPolicy(attempts=1)
        )

        async def up() -> bool:
            try:
                await client.list_deployments()
                return True
            except ProviderError:
                return False

        await until(up, "the emulator to answer", timeout_s=30, every_s=0.1)
        await client.create_deployment(body("cli-deck"))
        await DataCrunchProvider(client).set_replicas("cli-deck", 2)
        replicas = await running(client, "cli-deck", 2)
        await until(lambda: _all_up({r["id"] for r in replicas}), "both replica processes")
        await client.aclose()
        proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        raw, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
        output = raw.decode()
        if how == "sigterm":
            assert proc.returncode == 0, output
            assert "DATACRUNCH_BASE_URL=http://127.0.0.1:" in output and "cli-secret" not in output
        await no_processes({r["id"] for r in replicas}, timeout_s=10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _all_up(ids: set[str]) -> bool:
    return all(replica_env(rid) for rid in ids)


def test_snapshot_is_json(emu: Emulator) -> None:
    json.dumps(emu.snapshot())


async def test_spawn_early_starts_the_process_in_the_cold_start_and_says_when_it_ends() -> None:
    config = EmulatorConfig(cold_start_s=3.0, grace_s=2.0, tick_s=0.02, spawn_early=True)
    with Emulator(config) as early:
        c = DataCrunchClient(early.base_url, early.client_id, early.client_secret, timeout_s=5.0)
        name = f"emu-{next(_names)}"
        try:
            await c.create_deployment(body(name))
            await DataCrunchProvider(c).set_replicas(name, 1)
            (replica,) = await c.get_replicas(name)
            # The process runs at once, but the replica is still starting (its cold start).
            (proc_env,) = await until(lambda: _env(replica["id"]), "the replica's process")
            assert (await c.get_replicas(name))[0]["status"] == "starting"
            ready_at = float(proc_env["GPUSCALE_REPLICA_READY_AT"])
            started = early.snapshot()["deployments"][name]["replicas"][0]["started_at"]
            assert ready_at == pytest.approx(started + 3.0, abs=0.01)
            await running(c, name, 1)
            # A scale-down cancels a replica still in its cold start before a running one.
            await DataCrunchProvider(c).set_replicas(name, 2)
            await DataCrunchProvider(c).set_replicas(name, 1)
            (kept,) = await running(c, name, 1)
            assert kept["id"] == replica["id"]
        finally:
            ids = {r["id"] for r in await c.get_replicas(name)}
            await c.delete_deployment(name)
            await no_processes(ids)
            await c.aclose()
