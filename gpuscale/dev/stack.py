"""The development stack: the real programs of gpuscale as child processes on this machine.

One bring-up for ``gpuscale demo`` and for the end-to-end tests: each piece is a child process
started through the real CLI, in its own process group (:mod:`gpuscale.common.processes`), logged
to ``<log_dir>/<name>.log``:

1. ``gpuscale db migrate`` (:meth:`Stack.migrate`), when the database is new;
2. the Ollama stand-in (``python -m gpuscale.dev.standin``), unless a real Ollama is used;
3. the DataCrunch emulator (``gpuscale emulator``), whose replicas are ``gpuscale worker``
   processes, and the deployments created in it with ``gpuscale deploy apply`` (the command ops
   run against the real API);
4. one or more ``gpuscale controller`` with the ``datacrunch`` provider pointed at the emulator
   (the real client, OAuth and all).

Each start waits on the piece's readiness endpoint (failing early, with the log's tail, if the
child dies).  Every child carries ``GPUSCALE_DEMO_RUN=<run id>`` in its environment: after
:meth:`Stack.stop` stops them (reverse start order, so a controller stops before the emulator it
talks to), :func:`kill_leftovers` kills and reports anything of the run still alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from gpuscale.common.processes import ProcessFailed, ProcessGroup, ProcessGroups

RUN_MARKER = "GPUSCALE_DEMO_RUN"

__all__ = [
    "RUN_MARKER",
    "ProcessFailed",
    "Stack",
    "free_port",
    "gpuscale_cmd",
    "kill_leftovers",
    "wait_http",
]


FRESH_DB = "gpuscale_demo"  # named in queries.sql (drop_demo_database, create_demo_database)


async def start_fresh_embedded(data_dir: Path) -> tuple[Any, str]:
    """Start the embedded PostgreSQL in ``data_dir`` and give it an empty ``FRESH_DB``.

    The demo and ``gpuscale replay`` start from a fresh database each run, so everything they
    count and read back is that run's.  Returns the server (stop it with ``.stop()``) and the DSN.
    """
    from gpuscale.db import Connector
    from gpuscale.db.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(data_dir / "pg")
    await asyncio.to_thread(pg.start)
    admin = await Connector(pg.dsn("postgres")).dedicated()
    try:
        await admin.execute("drop_demo_database")
        await admin.execute("create_demo_database")
    finally:
        await admin.close()
    return pg, pg.dsn(FRESH_DB)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the child binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gpuscale_cmd(*args: str) -> list[str]:
    """The ``gpuscale`` CLI: the console script next to this interpreter (the venv's), else the same
    entry point through this interpreter (works without the venv on PATH)."""
    script = Path(sys.executable).parent / "gpuscale"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), *args]
    return [sys.executable, "-c", "from gpuscale.cli.app import main; main()", *args]


async def wait_http(
    http: httpx.AsyncClient,
    url: str,
    child: ProcessGroup | None = None,
    *,
    timeout_s: float = 60.0,
    ok: Sequence[int] = (200,),
) -> None:
    """Wait until ``url`` (a readiness endpoint) answers one of ``ok``; fail early, with the log's
    tail, if ``child`` exits meanwhile."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if child is not None and child.exited:
            raise ProcessFailed(f"{child.name} exited with {child.returncode}:\n{child.log_tail()}")
        try:
            resp = await http.get(url, timeout=2.0)
            if resp.status_code in ok:
                return
            last = f"HTTP {resp.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        await asyncio.sleep(0.2)
    name = child.name if child else url
    tail = child.log_tail() if child else ""
    raise ProcessFailed(f"{name} not ready at {url} after {timeout_s:.0f}s ({last}):\n{tail}")


def kill_leftovers(run_id: str) -> list[int]:
    """Kill every process whose environment carries this run's marker; returns their pids."""
    marker = f"{RUN_MARKER}={run_id}".encode()
    me = os.getpid()
    killed: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return killed
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in env.split(b"\0"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


class Stack:
    """One run's child processes: stand-in, emulator, deployments, controllers; :meth:`stop` ends all.

    ``env`` is every child's base environment (the database URL, the worker token, timings); the
    emulator's address and credentials are added to it once the emulator is up, so the commands
    and controllers started after it reach it.
    """

    def __init__(
        self,
        *,
        log_dir: Path,
        env: Mapping[str, str],
        client_id: str,
        client_secret: str,
        run_id: str | None = None,
        stop_grace_s: float = 15.0,
    ) -> None:
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.log_dir = log_dir
        self.client_id = client_id
        self.client_secret = client_secret
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs = ProcessGroups(
            env={**env, RUN_MARKER: self.run_id}, log_dir=log_dir, grace_s=stop_grace_s
        )
        self.http = httpx.AsyncClient(timeout=5.0)
        self.ollama_url = ""
        self.emulator_url = ""
        self.api_url = ""
        self.controllers: dict[str, ProcessGroup] = {}
        self.controller_urls: dict[str, str] = {}  # child name -> http://127.0.0.1:port
        self.expected_dead: set[str] = set()  # children stopped or killed on purpose

    @property
    def env(self) -> dict[str, str]:
        """The base environment of the children started from now on (mutable)."""
        return self.procs.env

    # ------------------------------------------------------------------ the pieces

    async def migrate(self) -> None:
        await self.procs.run("migrate", gpuscale_cmd("db", "migrate"))

    async def start_standin(
        self, models: Iterable[str], *, latency_s: float = 1.0, load_latency_s: float = 0.5, port: int = 0
    ) -> str:
        """The Ollama stand-in; every later child gets ``OLLAMA_HOST`` pointing at it."""
        port = port or free_port()
        argv = [sys.executable, "-m", "gpuscale.dev.standin", "--port", str(port)]
        argv += ["--models", ",".join(sorted(set(models)))]
        argv += ["--latency", f"{latency_s:g}", "--load-latency", f"{load_latency_s:g}"]
        child = await self.procs.start("ollama-standin", argv)
        self.ollama_url = f"http://127.0.0.1:{port}"
        await wait_http(self.http, f"{self.ollama_url}/api/version", child, timeout_s=30)
        self.use_ollama(self.ollama_url)
        return self.ollama_url

    def use_ollama(self, url: str) -> None:
        self.ollama_url = url.rstrip("/")
        self.env["OLLAMA_HOST"] = self.ollama_url

    async def start_emulator(
        self,
        *,
        cold_start_s: float,
        grace_s: float | None = None,
        port: int = 0,
        shared_dir: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> str:
        """The DataCrunch emulator, checking this stack's client credentials like the real OAuth
        endpoint does; every later child gets ``DATACRUNCH_*`` pointing at it.  ``shared_dir``:
        where the deployments' shared volumes live (see ``gpuscale emulator --shared-dir``)."""
        port = port or free_port()
        argv = gpuscale_cmd("emulator", "--port", str(port), "--cold-start", f"{cold_start_s:g}")
        if grace_s is not None:
            argv += ["--grace", f"{grace_s:g}"]
        argv += ["--log-dir", str(self.log_dir / "replicas")]
        if shared_dir is not None:
            argv += ["--shared-dir", str(shared_dir)]
        argv += list(extra_args)  # e.g. gpuscale replay's --spawn-early --stop-order newest
        env = {
            "GPUSCALE_EMULATOR_CLIENT_ID": self.client_id,
            "GPUSCALE_EMULATOR_CLIENT_SECRET": self.client_secret,
        }
        child = await self.procs.start("emulator", argv, env=env)
        self.emulator_url = f"http://127.0.0.1:{port}"
        await wait_http(self.http, f"{self.emulator_url}/_emulator/state", child, timeout_s=30)
        self.env.update(
            {
                "DATACRUNCH_BASE_URL": f"{self.emulator_url}/v1",
                "DATACRUNCH_CLIENT_ID": self.client_id,
                "DATACRUNCH_CLIENT_SECRET": self.client_secret,
            }
        )
        return self.emulator_url

    async def apply_deployments(self, spec_files: Sequence[Path]) -> None:
        """``gpuscale deploy apply`` against the emulator."""
        await self.procs.run("deploy-apply", gpuscale_cmd("deploy", "apply", *map(str, spec_files)))

    async def start_controller(
        self, name: str = "controller", *, env: Mapping[str, str] | None = None, port: int = 0
    ) -> ProcessGroup:
        """``gpuscale controller`` with its ops HTTP API on ``port`` (0: a free one); not waited for
        (see :meth:`wait_controller`)."""
        port = port or free_port()
        child = await self.procs.start(
            name,
            gpuscale_cmd("controller", "--http-port", str(port)),
            env={"GPUSCALE_PROVIDER": "datacrunch", "GPUSCALE_HTTP_PORT": str(port), **(env or {})},
        )
        self.controllers[name] = child
        self.controller_urls[name] = f"http://127.0.0.1:{port}"
        return child

    async def start_api(self, *, token: str, port: int = 0) -> str:
        """``gpuscale api`` (the decks' front door) accepting ``token``; ready when /api/health is."""
        port = port or free_port()
        child = await self.procs.start(
            "api", gpuscale_cmd("api", "--port", str(port)), env={"GPUSCALE_API_TOKEN": token}
        )
        self.api_url = f"http://127.0.0.1:{port}"
        await wait_http(self.http, f"{self.api_url}/api/health", child, timeout_s=60)
        return self.api_url

    async def wait_controller(self, name: str = "controller", timeout_s: float = 60.0) -> None:
        await wait_http(
            self.http, f"{self.controller_urls[name]}/readyz", self.controllers[name], timeout_s=timeout_s
        )

    # ------------------------------------------------------------------ watching

    def dead(self) -> list[ProcessGroup]:
        """Children that exited although they should still run."""
        return [c for c in self.procs.dead() if c.name not in self.expected_dead]

    def check_alive(self) -> None:
        """:class:`ProcessFailed` (with its log's tail) when a child exited on its own."""
        for child in self.dead():
            raise ProcessFailed(
                f"{child.name} exited with {child.returncode} (log: {child.log_path}):\n{child.log_tail(20)}"
            )

    async def get_json(self, url: str) -> Any:
        """The JSON answer of ``url``, or None when it does not answer 200 with JSON."""
        try:
            resp = await self.http.get(url)
            if resp.status_code == 200:
                return resp.json()
        except (httpx.HTTPError, ValueError):
            pass
        return None

    async def emulator_state(self) -> dict[str, Any] | None:
        state = await self.get_json(f"{self.emulator_url}/_emulator/state")
        return state if isinstance(state, dict) else None

    async def replicas(self, deployment: str) -> list[dict[str, Any]]:
        """The emulator's replicas of ``deployment``."""
        state = await self.emulator_state() or {}
        return list(state.get("deployments", {}).get(deployment, {}).get("replicas", []))

    async def metric(self, controller: str, name: str) -> list[tuple[dict[str, str], float]]:
        """Samples of one metric from one controller's /metrics ([] when it does not answer)."""
        from prometheus_client.parser import text_string_to_metric_families

        try:
            text = (await self.http.get(self.controller_urls[controller] + "/metrics")).text
        except httpx.HTTPError:
            return []
        return [
            (dict(sample.labels), float(sample.value))
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        ]

    def log_texts(self) -> list[str]:
        return [p.read_text(errors="replace") for p in self.log_dir.rglob("*.log")]

    # ------------------------------------------------------------------ the end

    async def stop(self) -> list[int]:
        """Stop every child (reverse start order); returns the pids of processes of this run that
        were still alive after that and had to be killed."""
        await self.procs.stop_all(in_order=True)
        await self.http.aclose()
        return await asyncio.to_thread(kill_leftovers, self.run_id)
