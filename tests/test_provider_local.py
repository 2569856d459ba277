"""The local provider beyond the shared contract: process groups, logs, env, bad commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from provider_kit import STANDIN, no_processes, replica_env, until
from pydantic import SecretStr

from gpuscale.common.errors import ConfigError
from gpuscale.common.settings import Settings
from gpuscale.controller.providers import LaunchSpec, ProviderError, make_provider, worker_command
from gpuscale.controller.providers.datacrunch import DataCrunchProvider
from gpuscale.controller.providers.docker import DockerProvider
from gpuscale.controller.providers.local import LocalProvider, choose_victims

# The leader starts a child that ignores SIGTERM, then exits 0 on SIGTERM itself, abandoning it.
ABANDONS_A_CHILD = (
    sys.executable,
    "-c",
    "import signal, subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import signal, time\\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\nwhile True: time.sleep(0.2)'])\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "while True: time.sleep(0.2)\n",
)


async def test_children_of_a_replica_are_stopped_with_it() -> None:
    provider = LocalProvider({"deck-a": LaunchSpec("visual", command=ABANDONS_A_CHILD)}, stop_grace_s=5)
    await provider.set_replicas("deck-a", 1)
    (rid,) = provider.pids("deck-a")

    async def two_processes() -> bool:
        return len(replica_env(rid)) == 2

    await until(two_processes, "the replica and its child")
    await provider.set_replicas("deck-a", 0)
    await no_processes({rid}, timeout_s=10)
    await provider.aclose()


async def test_env_logs_and_port(tmp_path: Path) -> None:
    command = (
        sys.executable,
        "-c",
        "import os, time\n"
        "print('hello from', os.environ['GPUSCALE_CONTAINER_ID'], flush=True)\n"
        "time.sleep(60)",
    )
    provider = LocalProvider(
        {"deck-a": LaunchSpec("text", command=command, env={"GPUSCALE_DATABASE_URL": "postgresql://x/y"})},
        stop_grace_s=1,
        log_dir=tmp_path,
        base_env={"PATH": "/usr/bin:/bin", "UNRELATED": "left out"},
    )
    await provider.set_replicas("deck-a", 1)
    (rid,) = provider.pids("deck-a")
    log = tmp_path / f"{rid}.log"

    async def logged() -> bool:
        return log.exists() and f"hello from {rid}" in log.read_text()

    await until(logged, "the replica's log line")
    (env,) = replica_env(rid)
    assert env["GPUSCALE_POOL"] == "text" and env["GPUSCALE_DATABASE_URL"] == "postgresql://x/y"
    assert env["GPUSCALE_WORKER_PORT"] == "0" and env["PATH"] == "/usr/bin:/bin" and "UNRELATED" not in env
    await provider.aclose()
    await no_processes({rid})


async def test_a_command_that_cannot_start_is_a_clear_error() -> None:
    provider = LocalProvider({"deck-a": LaunchSpec("visual", command=("/nonexistent/gpuscale-worker",))})
    with pytest.raises(ProviderError, match=r"cannot start replica deck-a-.*nonexistent"):
        await provider.set_replicas("deck-a", 1)
    state = await provider.observe("deck-a")  # observing still works, and says what is wrong
    assert state.replicas == [] and state.target == 1 and state.status == "unhealthy"
    await provider.aclose()


def test_the_default_command_is_the_worker() -> None:
    argv = worker_command("visual")
    assert argv[-3:] == ("worker", "--pool", "visual")
    result = subprocess.run([*argv[:-2], "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_choose_victims_prefers_idle_then_newest() -> None:
    live = [("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0)]
    assert choose_victims(live, 2, idle=["a", "b"]) == ["b", "a"]
    assert choose_victims(live, 2) == ["d", "c"]
    assert choose_victims(live, 3, idle=["b"]) == ["b", "d", "c"]
    assert choose_victims(live, 0, idle=["a"]) == []
    assert choose_victims(live, 2, idle=["zzz"]) == ["d", "c"]  # unknown ids are ignored


async def test_make_provider_builds_each_back_end() -> None:
    launches = {"deck-a": LaunchSpec("visual", command=STANDIN)}
    local = make_provider(Settings(provider="local"), launches)
    assert isinstance(local, LocalProvider)
    docker = make_provider(Settings(provider="docker", docker_host="unix:///nonexistent.sock"), launches)
    assert isinstance(docker, DockerProvider) and docker.base_url == "unix:///nonexistent.sock"
    dc = make_provider(
        Settings(
            provider="datacrunch", datacrunch_client_id="id", datacrunch_client_secret=SecretStr("not-shown")
        )
    )
    assert isinstance(dc, DataCrunchProvider) and "not-shown" not in repr(dc)
    with pytest.raises(ConfigError):
        make_provider(Settings.model_construct(provider="gcp"), launches)  # type: ignore[arg-type]
    for provider in (local, docker, dc):
        await provider.aclose()


async def test_replicas_get_an_allow_list_not_the_controllers_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "dc-secret-never-in-a-replica-41d7"
    monkeypatch.setenv("DATACRUNCH_CLIENT_SECRET", secret)
    monkeypatch.setenv("DATACRUNCH_CLIENT_ID", "dc-id")
    monkeypatch.setenv("GPUSCALE_EMULATOR_CLIENT_SECRET", secret)
    monkeypatch.setenv("GPUSCALE_DATACRUNCH_CLIENT_SECRET", secret)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("GPUSCALE_SERVER_ID", "one-id-for-all")  # per process: must not be shared
    monkeypatch.setenv("GPUSCALE_VISUAL_MODEL", "gemma3:4b")  # a worker setting: passed on
    monkeypatch.setenv("GPUSCALE_WORKER_TOKEN", "worker-token")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    command = (sys.executable, "-c", "import time; time.sleep(60)")
    # Built the way the controller builds it: from its settings and its own environment.
    provider = make_provider(
        Settings(provider="local", local_stop_grace_s=1),
        {"deck-a": LaunchSpec("text", command=command, env={"GPUSCALE_DATABASE_URL": "postgresql://x/y"})},
    )
    try:
        await provider.set_replicas("deck-a", 1)
        (rid,) = provider.pids("deck-a")  # type: ignore[attr-defined]
        await until(lambda: _has_env(rid), "the replica's process")
        (env,) = replica_env(rid)
    finally:
        await provider.aclose()
    await no_processes({rid})
    assert secret not in "".join(env.values())
    assert not any(k.startswith("DATACRUNCH_") for k in env)
    assert "GPUSCALE_SERVER_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert env["GPUSCALE_VISUAL_MODEL"] == "gemma3:4b" and env["GPUSCALE_WORKER_TOKEN"] == "worker-token"
    assert env["LC_ALL"] == "C.UTF-8" and env["PATH"] and env["GPUSCALE_DATABASE_URL"] == "postgresql://x/y"


async def _has_env(rid: str) -> bool:
    return bool(replica_env(rid))


def test_the_allow_list_covers_every_worker_setting() -> None:
    from gpuscale.controller.providers.local import REPLICA_ENV
    from gpuscale.worker.settings import WorkerSettings

    # Set per replica by whoever starts it, never inherited from the controller.
    per_process = {"container_id", "server_id", "worker_port", "worker_port_file", "replica_ready_at"}
    for name, info in WorkerSettings.model_fields.items():
        if name in per_process:
            continue
        names = {f"GPUSCALE_{name.upper()}"}
        alias = info.validation_alias
        if alias is not None:
            names = {str(a) for a in getattr(alias, "choices", [alias])}
        assert names & REPLICA_ENV, f"worker setting {name} would not reach a local replica"
