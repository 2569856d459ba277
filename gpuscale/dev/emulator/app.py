"""The DataCrunch emulator's ASGI app: the container API under ``/v1``, kept in memory.

Same paths, bodies and status codes as the real API (see
``shared/reference/datacrunch-containers-api.md`` and the official SDK), OAuth2 client-credential
tokens, and replicas that are real local processes: each replica waits out a cold start, then runs
the deployment container's command (``entrypoint_overrides`` when enabled, else the configured
default, ``gpuscale worker --pool P``) with the container's env (secrets resolved from the
emulator's own mapping or environment) plus ``GPUSCALE_CONTAINER_ID``.  On a scale-down the
emulator, like the cloud, picks the replica to stop (random by default) and stops it with SIGTERM,
then SIGKILL after the grace period.  ``/_emulator/*`` is the test hook: faults and a state dump.

Shared filesystem mounts (``{"type": "shared", "mount_path": …, "volume_id": …}``) become a local
folder per volume, ``shared_dir/<volume_id>``: replicas share the host's filesystem, so instead of
mounting, the emulator rewrites the env values that name a path under a shared ``mount_path`` to
the same path under that folder (``GPUSCALE_DOCUMENT_ROOT=/mnt/shared/uploads`` →
``<shared_dir>/<volume_id>/uploads``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import os
import random
import secrets as secrets_mod
import shlex
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gpuscale.common.processes import ProcessGroup, ProcessGroups, SpawnError
from gpuscale.controller import deployspec
from gpuscale.dev.emulator.faults import Faults, FaultSpecError

log = logging.getLogger(__name__)

DEFAULT_COMMAND = "{python} -m gpuscale.cli worker --pool {pool}"
# The emulator's (and the controller's) API credentials: not passed on to replicas.
_PRIVATE_ENV = ("DATACRUNCH_", "GPUSCALE_EMULATOR_", "GPUSCALE_DATACRUNCH_")
COMPUTE_RESOURCES = ("H100", "H200", "A100", "L40S", "RTX6000Ada", "RTXA6000", "B200")
COMPUTE_SIZES = (1, 2, 4, 8)


@dataclass
class EmulatorConfig:
    """Everything the emulator needs; the CLI flags and the embedding tests fill it."""

    client_id: str = "emulator"
    client_secret: str = field(default="emulator-secret", repr=False)
    cold_start_s: float = 2.0
    grace_s: float = 10.0
    token_ttl_s: float = 3600.0
    default_command: str = DEFAULT_COMMAND
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    base_env: Mapping[str, str] | None = field(default=None, repr=False)  # None: os.environ
    stop_order: Literal["random", "newest", "oldest"] = "random"
    log_dir: Path | None = None
    tick_s: float = 0.05
    max_replicas: int = 20
    faults: Faults = field(default_factory=Faults)
    shared_dir: Path = Path(".gpuscale/emulator/shared")  # one folder per shared volume under it
    # GPU model → (on-demand, spot) price strings for GET /container-types, over the defaults.
    prices: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Start a replica's process as soon as it is requested and tell it when its cold start ends
    # (GPUSCALE_REPLICA_READY_AT): the worker registers then, so the process's own start-up on a
    # busy machine stays inside the cold start instead of adding to it (``gpuscale replay``).
    spawn_early: bool = False


def shared_path(container: Mapping[str, Any], path: str, shared_dir: Path) -> str | None:
    """Where ``path`` (as the container sees it) lies on this host, if it is under one of the
    container's shared mounts; None otherwise."""
    for mount in container.get("volume_mounts") or []:
        if mount.get("type") != "shared" or not mount.get("volume_id"):
            continue
        base = str(mount["mount_path"]).rstrip("/")
        if path == base or path.startswith(base + "/"):
            local = shared_dir.absolute() / str(mount["volume_id"])
            local.mkdir(parents=True, exist_ok=True)
            return str(local) + path[len(base) :]
    return None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class ApiFailure(Exception):
    """An error answer: status, code, message (and headers)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def _not_found(name: str) -> ApiFailure:
    return ApiFailure(404, "not_found", f"deployment {name!r} not found")


@dataclass
class EmuReplica:
    id: str
    created_at: float
    ready_at: float
    proc: ProcessGroup | None = None
    failed: str | None = None

    @property
    def stopping(self) -> bool:
        return self.proc is not None and self.proc.stopping

    @property
    def status(self) -> str:
        if self.stopping:
            return "stopping"
        if self.proc is not None and self.ready_at > time.time():
            return "starting"  # spawned early, still in its cold start
        if self.proc is not None:
            return "running"
        return "failed" if self.failed else "starting"


@dataclass
class EmuDeployment:
    spec: dict[str, Any]  # normal form (deployspec.normalize), scaling included
    created_at: float
    paused: bool = False
    replicas: dict[str, EmuReplica] = field(default_factory=dict)
    status: str = "initializing"
    env_by_container: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def scaling(self) -> dict[str, Any]:
        return self.spec["scaling"]  # type: ignore[no-any-return]

    def container_names(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(len(self.spec["containers"]))]


class EmulatorState:
    """Deployments, tokens, secrets and the replica reconciler; lives on one event loop."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.faults = config.faults
        self.deployments: dict[str, EmuDeployment] = {}
        self.access_tokens: dict[str, float] = {}  # token → expiry (epoch)
        self.refresh_tokens: set[str] = set()
        self.secrets: dict[str, tuple[str, float]] = {k: (v, time.time()) for k, v in config.secrets.items()}
        self.file_secrets: dict[str, tuple[list[dict[str, str]], float]] = {}
        self.registry_credentials: dict[str, tuple[dict[str, Any], float]] = {}
        self.requests = 0
        self.preempted: list[str] = []  # spot replicas that vanished (faults ``preempt``)
        self._preempt_checked: dict[str, float] = {}
        self.writes = 0  # authenticated POST/PATCH/DELETE calls: `deploy apply` tests count them
        self._random = random.Random(config.faults.seed)
        self.lock = asyncio.Lock()  # held by the reconciler and by every mutating API call
        # Every replica process started and not yet reaped, for shutdown() and kill_all() at exit.
        self.children = ProcessGroups(log_dir=config.log_dir, grace_s=config.grace_s, kind="replica")

    # ------------------------------------------------------------------ tokens

    def issue_tokens(self) -> dict[str, Any]:
        ttl = self.faults.token_ttl if self.faults.token_ttl is not None else self.config.token_ttl_s
        access, refresh = secrets_mod.token_urlsafe(24), secrets_mod.token_urlsafe(24)
        self.access_tokens[access] = time.time() + ttl
        self.refresh_tokens.add(refresh)
        return {
            "access_token": access,
            "refresh_token": refresh,
            "scope": "cloud-api-v1",
            "token_type": "Bearer",
            "expires_in": int(ttl) if ttl >= 1 else ttl,
        }

    def check_token(self, header: str | None) -> None:
        scheme, _, token = (header or "").partition(" ")
        expiry = self.access_tokens.get(token) if scheme.lower() == "bearer" else None
        if expiry is None or expiry <= time.time():
            raise ApiFailure(401, "unauthorized_request", "access token is invalid or expired")

    def expire_tokens(self) -> None:
        self.access_tokens.clear()

    # ------------------------------------------------------------------ faults

    async def apply_faults(self) -> None:
        faults = self.faults
        if faults.slow > 0:
            await asyncio.sleep(faults.slow)
        retry_after = {"Retry-After": f"{faults.retry_after:g}"}
        if faults.throttle_next > 0:
            faults.throttle_next -= 1
            raise ApiFailure(429, "too_many_requests", "rate limit exceeded", retry_after)
        if faults.error_next > 0:
            faults.error_next -= 1
            raise ApiFailure(500, "internal_error", "injected internal server error")
        if faults.throttle and self._random.random() < faults.throttle:
            raise ApiFailure(429, "too_many_requests", "rate limit exceeded", retry_after)
        if faults.error and self._random.random() < faults.error:
            raise ApiFailure(500, "internal_error", "injected internal server error")

    # ------------------------------------------------------------------ deployments

    def get(self, name: str) -> EmuDeployment:
        try:
            return self.deployments[name]
        except KeyError:
            raise _not_found(name) from None

    def render(self, dep: EmuDeployment) -> dict[str, Any]:
        spec = dict(dep.spec)
        spec["containers"] = [
            {"name": cname, **container}
            for cname, container in zip(dep.container_names(), dep.spec["containers"], strict=True)
        ]
        for container in spec["containers"]:
            container["env"] = dep.env_by_container.get(container["name"], container["env"])
        spec["compute"] = {**dep.spec["compute"], "is_available": True}
        spec["endpoint_base_url"] = f"https://containers.emulator.invalid/{dep.name}"
        spec["created_at"] = _iso(dep.created_at)
        return spec

    def _check_body(self, body: Any) -> dict[str, Any]:
        try:
            deployspec.validate(body)
        except deployspec.SpecError as exc:
            raise ApiFailure(400, "invalid_request", str(exc)) from None
        compute = body["compute"]
        if compute["name"] not in COMPUTE_RESOURCES or compute["size"] not in COMPUTE_SIZES:
            raise ApiFailure(
                400, "invalid_request", f"compute {compute['name']} x{compute['size']} is not offered"
            )
        normal = deployspec.normalize(body)
        if normal["scaling"]["max_replica_count"] > self.config.max_replicas:
            raise ApiFailure(
                400, "invalid_request", f"max_replica_count is limited to {self.config.max_replicas}"
            )
        return normal

    def _check_capacity(self, dep_name: str, wanted: int, current: int) -> None:
        if self.faults.no_capacity and wanted > current:
            raise ApiFailure(
                400, "insufficient_capacity", f"not enough GPUs available to scale {dep_name} to {wanted}"
            )

    def create(self, body: Any) -> EmuDeployment:
        normal = self._check_body(body)
        if normal["name"] in self.deployments:
            raise ApiFailure(409, "conflict", f"deployment {normal['name']!r} already exists")
        self._check_capacity(normal["name"], normal["scaling"]["min_replica_count"], 0)
        dep = EmuDeployment(spec=normal, created_at=time.time())
        self.deployments[dep.name] = dep
        log.info("emulator: created deployment %s", dep.name)
        return dep

    def update(self, name: str, body: Any) -> EmuDeployment:
        dep = self.get(name)
        if not isinstance(body, dict):
            raise ApiFailure(400, "invalid_request", "expected a JSON object")
        # A PATCH may omit fields (the SDK sends nulls for what it does not set): merge first.
        merged = self.render(dep)
        for key, value in body.items():
            if value is not None and not key.startswith("_"):
                merged[key] = value
        if merged["name"] != name:
            raise ApiFailure(400, "invalid_request", "a deployment cannot be renamed")
        normal = self._check_body(merged)
        self._check_capacity(name, normal["scaling"]["min_replica_count"], dep.scaling["min_replica_count"])
        changed = normal["containers"] != dep.spec["containers"] or normal["compute"] != dep.spec["compute"]
        dep.spec = normal
        if changed:
            dep.env_by_container.clear()
            self.restart(dep)  # a new version: replace every replica
        return dep

    def set_scaling(self, name: str, body: Any) -> dict[str, Any]:
        dep = self.get(name)
        if not isinstance(body, dict):
            raise ApiFailure(400, "invalid_request", "expected a JSON object")
        merged = {**dep.scaling, **{k: v for k, v in body.items() if v is not None}}
        try:
            deployspec.validate_scaling(merged)
        except deployspec.SpecError as exc:
            raise ApiFailure(400, "invalid_request", str(exc)) from None
        if merged["max_replica_count"] > self.config.max_replicas:
            raise ApiFailure(
                400, "invalid_request", f"max_replica_count is limited to {self.config.max_replicas}"
            )
        if self.faults.refuse_zero and merged["max_replica_count"] == 0:
            raise ApiFailure(400, "invalid_request", "max_replica_count must be at least 1")
        self._check_capacity(name, merged["min_replica_count"], dep.scaling["min_replica_count"])
        dep.spec["scaling"] = deployspec.normalize_scaling(merged)
        return dep.scaling

    def restart(self, dep: EmuDeployment) -> None:
        for replica in list(dep.replicas.values()):
            self._stop_replica(dep, replica)

    def delete(self, name: str) -> None:
        dep = self.get(name)
        del self.deployments[name]
        # Answer at once, as the cloud does; the replicas stop in the background.
        for replica in list(dep.replicas.values()):
            self._stop_replica(dep, replica)
        log.info("emulator: deleted deployment %s", name)

    # ------------------------------------------------------------------ replicas

    def _command(self, dep: EmuDeployment) -> list[str]:
        container = dep.spec["containers"][0]
        overrides = container["entrypoint_overrides"]
        if overrides.get("enabled"):
            argv = list(overrides.get("entrypoint") or []) + list(overrides.get("cmd") or [])
            if argv:
                return [str(a) for a in argv]
        pool = self._env(dep, "").get("GPUSCALE_POOL") or dep.name
        return [
            part.format(python=sys.executable, pool=pool, deployment=dep.name)
            for part in shlex.split(self.config.default_command)
        ]

    def _env(self, dep: EmuDeployment, replica_id: str) -> dict[str, str]:
        source = os.environ if self.config.base_env is None else self.config.base_env
        # A cloud container sees only its deployment's env: never the emulator's own credentials.
        base = {k: v for k, v in source.items() if not k.startswith(_PRIVATE_ENV)}
        # In the cloud each replica has its own network namespace; here they share one, so each
        # worker picks a free port for its HTTP server unless the deployment says otherwise.
        base["GPUSCALE_WORKER_PORT"] = "0"
        cname = dep.container_names()[0]
        for item in dep.env_by_container.get(cname, dep.spec["containers"][0]["env"]):
            value: str | None = item["value_or_reference_to_secret"]
            if item["type"] == "secret":
                ref = item["value_or_reference_to_secret"]
                if ref in self.secrets:
                    value = self.secrets[ref][0]
                else:
                    value = os.environ.get(ref) or os.environ.get(item["name"])
                if value is None:
                    log.warning(
                        "emulator: secret %r for %s is not defined; leaving it unset", ref, item["name"]
                    )
                    continue
            base[item["name"]] = str(value)
        container = dep.spec["containers"][0]
        for name, value in list(base.items()):
            if value.startswith("/"):
                local = shared_path(container, value, self.config.shared_dir)
                if local is not None:
                    base[name] = local
        if replica_id:
            base["GPUSCALE_CONTAINER_ID"] = replica_id
        return base

    def _stop_replica(self, dep: EmuDeployment, replica: EmuReplica) -> asyncio.Task[None] | None:
        if replica.proc is None:
            dep.replicas.pop(replica.id, None)  # never started: nothing to stop
            return None
        return self.children.begin_stop(replica.proc)

    def _pick_victims(self, live: list[EmuReplica], count: int) -> list[EmuReplica]:
        # Replicas still starting go first (cancelling a cold start costs nothing), then the
        # emulator's choice among running ones: like the cloud, it does not ask which are idle.
        now = time.time()
        starting = [r for r in live if r.proc is None or r.ready_at > now]
        running = [r for r in live if r.proc is not None and r.ready_at <= now]
        order = self.config.stop_order
        if order == "random":
            self._random.shuffle(running)
        else:
            running.sort(key=lambda r: r.created_at, reverse=(order == "newest"))
        return (starting + running)[:count]

    async def reconcile(self) -> None:
        """One pass of the replica reconciler (takes the state lock)."""
        async with self.lock:
            await self.reconcile_locked()

    async def reconcile_locked(self) -> None:
        """One reconciler pass; the caller holds the state lock (every mutating API call does,
        see :func:`api`), so nothing changes a deployment while a pass awaits a process start."""
        now = time.time()
        total_live = sum(1 for d in self.deployments.values() for r in d.replicas.values() if not r.stopping)
        for dep in list(self.deployments.values()):
            # Forget replicas whose process has ended (stopped, or crashed: then replaced).
            for replica in list(dep.replicas.values()):
                if replica.proc is not None and replica.proc.exited:
                    if not replica.stopping:
                        log.warning(
                            "emulator: replica %s exited (code %s)",
                            replica.id,
                            replica.proc.process.returncode,
                        )
                        replica.proc.kill_now()
                        self.children.forget(replica.proc)
                    elif replica.proc.stop_task is not None and not replica.proc.stop_task.done():
                        continue
                    del dep.replicas[replica.id]
                    total_live -= 0 if replica.stopping else 1
            if dep.spec.get("is_spot"):
                total_live -= self._preempt(dep, now)
            # Start the processes of replicas whose cold start is over.
            unhealthy = self.faults.is_unhealthy(dep.name)
            for replica in dep.replicas.values():
                if (
                    replica.proc is None
                    and replica.failed is None
                    and not unhealthy
                    and (replica.ready_at <= now or self.config.spawn_early)
                ):
                    env = self._env(dep, replica.id)
                    if self.config.spawn_early:
                        env["GPUSCALE_REPLICA_READY_AT"] = f"{replica.ready_at:.3f}"
                    try:
                        replica.proc = await self.children.start(replica.id, self._command(dep), env=env)
                    except SpawnError as exc:
                        replica.failed = str(exc)
                        log.error("emulator: %s", exc)
            # Scale toward the pinned count, within the quota.
            live = [r for r in dep.replicas.values() if not r.stopping and r.failed is None]
            for replica in [r for r in dep.replicas.values() if r.failed is not None]:
                # A replica that cannot start is retried after another cold start.
                if now - replica.created_at > self.config.cold_start_s + 1:
                    del dep.replicas[replica.id]
            desired = 0 if dep.paused else int(dep.scaling["min_replica_count"])
            allowed = desired
            if self.faults.quota is not None:
                allowed = max(0, min(desired, self.faults.quota - (total_live - len(live))))
            if self.faults.is_sold_out(dep.name):
                allowed = min(allowed, len(live))  # keeps what it has, gets nothing new
            if len(live) < allowed:
                for _ in range(allowed - len(live)):
                    rid = f"{dep.name}-{uuid.uuid4().hex[:10]}"
                    dep.replicas[rid] = EmuReplica(rid, now, now + self.config.cold_start_s)
                    total_live += 1
            elif len(live) > desired:
                for replica in self._pick_victims(live, len(live) - desired):
                    log.info("emulator: scaling %s down, stopping %s", dep.name, replica.id)
                    self._stop_replica(dep, replica)
                    total_live -= 1
            dep.status = self._status(dep, desired, allowed, unhealthy)

    def _preempt(self, dep: EmuDeployment, now: float) -> int:
        """Spot preemption (faults ``preempt``): running replicas of a spot deployment vanish —
        SIGKILL, no notice, gone from the replica list at once, as on the cloud; the scaling
        pass below then starts a replacement.  Returns how many vanished."""
        faults = self.faults
        dt = max(0.0, now - self._preempt_checked.get(dep.name, now))
        self._preempt_checked[dep.name] = now
        if not (faults.preempt_rate or faults.preempt_next or faults.preempt_after is not None):
            return 0
        chance = 1.0 - math.exp(-faults.preempt_rate * dt / 3600.0) if faults.preempt_rate else 0.0
        gone = 0
        for replica in list(dep.replicas.values()):
            proc = replica.proc
            if proc is None or proc.stopping or proc.exited:
                continue
            hit = False
            if faults.preempt_next > 0:
                faults.preempt_next -= 1
                hit = True
            elif faults.preempt_after is not None and now - proc.started_at >= faults.preempt_after:
                hit = True
            elif chance and self._random.random() < chance:
                hit = True
            if not hit:
                continue
            log.warning("emulator: spot replica %s of %s preempted", replica.id, dep.name)
            proc.kill_now()
            self.children.forget(proc)
            del dep.replicas[replica.id]
            self.preempted.append(replica.id)
            gone += 1
        return gone

    @staticmethod
    def _status(dep: EmuDeployment, desired: int, allowed: int, unhealthy: bool) -> str:
        if dep.paused:
            return "paused"
        if allowed < desired:
            return "quota_reached"
        running = sum(1 for r in dep.replicas.values() if r.status == "running")
        if running >= desired:
            return "healthy"
        if unhealthy or any(r.failed for r in dep.replicas.values()):
            return "unhealthy"
        return "degraded" if running else "initializing"

    async def run(self) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception:  # the loop must survive anything one tick does
                log.exception("emulator: reconcile failed")
            await asyncio.sleep(self.config.tick_s)

    async def shutdown(self) -> None:
        """Stop every replica (SIGTERM, grace, SIGKILL) and wait for them."""
        async with self.lock:
            for dep in self.deployments.values():
                for replica in list(dep.replicas.values()):
                    self._stop_replica(dep, replica)
        # Anything else still alive (whatever its deployment became) goes too.
        await self.children.stop_all()

    def kill_all(self) -> None:
        """Last resort from another thread or at exit: SIGKILL every replica's process group."""
        self.children.kill_all()

    def snapshot(self) -> dict[str, Any]:
        return {
            "deployments": {
                name: {
                    "status": dep.status,
                    "paused": dep.paused,
                    "scaling": {k: dep.scaling[k] for k in deployspec.REPLICA_COUNTS},
                    "replicas": [
                        {
                            "id": r.id,
                            "status": r.status,
                            "pid": r.proc.pid if r.proc else None,
                            "started_at": r.created_at,
                        }
                        for r in dep.replicas.values()
                    ],
                }
                for name, dep in self.deployments.items()
            },
            "faults": self.faults.to_dict(),
            "requests": self.requests,
            "preempted": list(self.preempted),
            "writes": self.writes,
        }


# ---------------------------------------------------------------------- HTTP layer

Handler = Callable[[Request, EmulatorState], Awaitable[Response]]


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status)


def _empty(status: int = 200) -> Response:
    return Response(status_code=status)


async def _body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return None
    try:
        return await request.json()
    except ValueError:
        raise ApiFailure(400, "invalid_request", "body is not valid JSON") from None


def api(handler: Handler, *, auth: bool = True) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a handler with fault injection, bearer-token checks and the API's error bodies."""

    async def endpoint(request: Request) -> Response:
        state: EmulatorState = request.app.state.emulator
        state.requests += 1
        try:
            await state.apply_faults()
            if auth:
                state.check_token(request.headers.get("authorization"))
            if request.method == "GET":
                return await handler(request, state)
            if auth:
                state.writes += 1
            # Changes are serialised with the reconciler: one lock for every mutation.
            async with state.lock:
                return await handler(request, state)
        except ApiFailure as exc:
            return JSONResponse(
                {"code": exc.code, "message": exc.message}, status_code=exc.status, headers=exc.headers
            )

    return endpoint


async def token(request: Request, state: EmulatorState) -> Response:
    body = await _body(request)
    if not isinstance(body, dict):
        raise ApiFailure(400, "invalid_request", "expected a JSON object")
    grant = body.get("grant_type")
    if grant == "client_credentials":
        ok = secrets_mod.compare_digest(str(body.get("client_id", "")), state.config.client_id) and (
            secrets_mod.compare_digest(str(body.get("client_secret", "")), state.config.client_secret)
        )
        if not ok:
            raise ApiFailure(401, "unauthorized_request", "invalid client credentials")
        return _json(state.issue_tokens())
    if grant == "refresh_token":
        refresh = str(body.get("refresh_token", ""))
        if refresh not in state.refresh_tokens:
            raise ApiFailure(401, "unauthorized_request", "invalid refresh token")
        state.refresh_tokens.discard(refresh)
        return _json(state.issue_tokens())
    raise ApiFailure(400, "invalid_request", f"unsupported grant_type {grant!r}")


async def list_deployments(request: Request, state: EmulatorState) -> Response:
    return _json([state.render(d) for d in state.deployments.values()])


async def create_deployment(request: Request, state: EmulatorState) -> Response:
    dep = state.create(await _body(request))
    await state.reconcile_locked()
    return _json(state.render(dep), 201)


async def get_deployment(request: Request, state: EmulatorState) -> Response:
    return _json(state.render(state.get(request.path_params["name"])))


async def patch_deployment(request: Request, state: EmulatorState) -> Response:
    dep = state.update(request.path_params["name"], await _body(request))
    await state.reconcile_locked()
    return _json(state.render(dep))


async def delete_deployment(request: Request, state: EmulatorState) -> Response:
    state.delete(request.path_params["name"])
    return _empty()


async def get_status(request: Request, state: EmulatorState) -> Response:
    return _json({"status": state.get(request.path_params["name"]).status})


async def restart(request: Request, state: EmulatorState) -> Response:
    state.restart(state.get(request.path_params["name"]))
    return _empty()


async def get_scaling(request: Request, state: EmulatorState) -> Response:
    return _json(state.get(request.path_params["name"]).scaling)


async def patch_scaling(request: Request, state: EmulatorState) -> Response:
    scaling = state.set_scaling(request.path_params["name"], await _body(request))
    await state.reconcile_locked()
    return _json(scaling)


async def get_replicas(request: Request, state: EmulatorState) -> Response:
    dep = state.get(request.path_params["name"])
    return _json(
        {
            "list": [
                {"id": r.id, "status": r.status, "started_at": _iso(r.created_at)}
                for r in dep.replicas.values()
            ]
        }
    )


async def purge_queue(request: Request, state: EmulatorState) -> Response:
    state.get(request.path_params["name"])  # the emulator never queues HTTP requests
    return _empty()


async def pause(request: Request, state: EmulatorState) -> Response:
    state.get(request.path_params["name"]).paused = True
    await state.reconcile_locked()
    return _empty()


async def resume(request: Request, state: EmulatorState) -> Response:
    dep = state.get(request.path_params["name"])
    if dep.paused:
        state._check_capacity(dep.name, dep.scaling["min_replica_count"], 0)
    dep.paused = False
    await state.reconcile_locked()
    return _empty()


def _env_list(dep: EmuDeployment) -> list[dict[str, Any]]:
    return [
        {"container_name": cname, "env": dep.env_by_container.get(cname, container["env"])}
        for cname, container in zip(dep.container_names(), dep.spec["containers"], strict=True)
    ]


def _env_args(dep: EmuDeployment, body: Any) -> tuple[str, list[Any]]:
    if not isinstance(body, dict) or not isinstance(body.get("env"), list):
        raise ApiFailure(400, "invalid_request", "expected {'container_name', 'env': [...]}")
    cname = body.get("container_name")
    if cname not in dep.container_names():
        raise ApiFailure(404, "not_found", f"container {cname!r} not found in {dep.name}")
    return cname, body["env"]


def _check_env(items: list[Any]) -> list[dict[str, str]]:
    out = []
    for item in items:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("name"), str)
            or not isinstance(item.get("value_or_reference_to_secret"), str)
            or item.get("type") not in ("plain", "secret")
        ):
            raise ApiFailure(
                400, "invalid_request", "env items need name, value_or_reference_to_secret, type"
            )
        out.append({k: item[k] for k in ("name", "value_or_reference_to_secret", "type")})
    return out


async def env_vars(request: Request, state: EmulatorState) -> Response:
    dep = state.get(request.path_params["name"])
    if request.method == "GET":
        return _json(_env_list(dep))
    cname, items = _env_args(dep, await _body(request))
    index = dep.container_names().index(cname)
    current = {e["name"]: e for e in dep.env_by_container.get(cname, dep.spec["containers"][index]["env"])}
    if request.method == "DELETE":
        for name in items:
            current.pop(str(name), None)
    else:
        new = _check_env(items)
        if request.method == "POST":
            clash = [e["name"] for e in new if e["name"] in current]
            if clash:
                raise ApiFailure(409, "conflict", f"environment variables already exist: {', '.join(clash)}")
        for e in new:
            current[e["name"]] = e
    dep.env_by_container[cname] = list(current.values())
    if request.method == "PATCH":
        return _json({"container_name": cname, "env": dep.env_by_container[cname]})
    return _json(_env_list(dep))


async def compute_resources(request: Request, state: EmulatorState) -> Response:
    return _json(
        [{"name": n, "size": s, "is_available": True} for n in COMPUTE_RESOURCES for s in COMPUTE_SIZES]
    )


# GET /container-types: per GPU type, on-demand and spot prices per hour (strings, as the API
# sends them; H100 as in the reference: 1.75 / 0.87).  Shape from the SDK's ContainerType.
CONTAINER_TYPES = (
    ("H100", "H100 SXM5 80GB", 80, "1.75", "0.87"),
    ("H200", "H200 SXM5 141GB", 141, "2.19", "1.10"),
    ("B200", "B200 SXM6 180GB", 180, "3.29", "1.65"),
    ("A100", "A100 SXM4 80GB", 80, "1.29", "0.65"),
    ("L40S", "L40S 48GB", 48, "0.91", "0.46"),
    ("RTX6000Ada", "RTX 6000 Ada 48GB", 48, "0.80", "0.40"),
    ("RTXA6000", "RTX A6000 48GB", 48, "0.49", "0.25"),
)


async def container_types(request: Request, state: EmulatorState) -> Response:
    currency = request.query_params.get("currency", "usd").lower()
    if currency not in ("usd", "eur"):
        raise ApiFailure(400, "invalid_request", f"unknown currency {currency!r}")
    prices = state.config.prices
    return _json(
        [
            {
                "id": f"ct-{model.lower()}-1",
                "model": model,
                "name": name,
                "instance_type": f"1{model}.serverless",
                "cpu": {"description": "", "number_of_cores": 16},
                "gpu": {"description": f"1x {name}", "number_of_gpus": 1},
                "gpu_memory": {"description": f"{mem} GB", "size_in_gigabytes": mem},
                "memory": {"description": "120 GB", "size_in_gigabytes": 120},
                "serverless_price": prices.get(model, (od, spot))[0],
                "serverless_spot_price": prices.get(model, (od, spot))[1],
                "currency": currency,
                "manufacturer": "NVIDIA",
            }
            for model, name, mem, od, spot in CONTAINER_TYPES
        ]
    )


async def secrets_endpoint(request: Request, state: EmulatorState) -> Response:
    if request.method == "GET":
        return _json(
            [
                {"name": n, "created_at": _iso(t), "secret_type": "generic"}
                for n, (_, t) in state.secrets.items()
            ]
        )
    body = await _body(request)
    if (
        not isinstance(body, dict)
        or not isinstance(body.get("name"), str)
        or not isinstance(body.get("value"), str)
    ):
        raise ApiFailure(400, "invalid_request", "expected {'name', 'value'}")
    if body["name"] in state.secrets:
        raise ApiFailure(409, "conflict", f"secret {body['name']!r} already exists")
    state.secrets[body["name"]] = (body["value"], time.time())
    return _empty(201)


async def secret_item(request: Request, state: EmulatorState) -> Response:
    if state.secrets.pop(request.path_params["secret"], None) is None:
        raise ApiFailure(404, "not_found", "secret not found")
    return _empty()


async def file_secrets(request: Request, state: EmulatorState) -> Response:
    if request.method == "GET":
        return _json(
            [
                {"name": n, "created_at": _iso(t), "secret_type": "file-secret"}
                for n, (_, t) in state.file_secrets.items()
            ]
        )
    body = await _body(request)
    if (
        not isinstance(body, dict)
        or not isinstance(body.get("name"), str)
        or not isinstance(body.get("files"), list)
    ):
        raise ApiFailure(400, "invalid_request", "expected {'name', 'files': [...]}")
    for f in body["files"]:
        try:
            base64.b64decode(f["base64_content"], validate=True)
            str(f["file_name"])
        except (KeyError, TypeError, ValueError):
            raise ApiFailure(400, "invalid_request", "files need file_name and base64_content") from None
    state.file_secrets[body["name"]] = (body["files"], time.time())
    return _empty(201)


async def file_secret_item(request: Request, state: EmulatorState) -> Response:
    if state.file_secrets.pop(request.path_params["secret"], None) is None:
        raise ApiFailure(404, "not_found", "file secret not found")
    return _empty()


async def registry_credentials(request: Request, state: EmulatorState) -> Response:
    if request.method == "GET":
        return _json([{"name": n, "created_at": _iso(t)} for n, (_, t) in state.registry_credentials.items()])
    body = await _body(request)
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body.get("type"):
        raise ApiFailure(400, "invalid_request", "expected {'name', 'type', ...}")
    state.registry_credentials[body["name"]] = (body, time.time())
    return _empty(201)


async def registry_credential_item(request: Request, state: EmulatorState) -> Response:
    if state.registry_credentials.pop(request.path_params["cred"], None) is None:
        raise ApiFailure(404, "not_found", "registry credentials not found")
    return _empty()


# ---------------------------------------------------------------------- test hooks (no auth)


async def admin_faults(request: Request) -> Response:
    state: EmulatorState = request.app.state.emulator
    if request.method == "DELETE":
        fresh = Faults(seed=state.faults.seed)
        for key, value in fresh.to_dict().items():
            setattr(state.faults, key, value)
    elif request.method == "POST":
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
            state.faults.update(body)
        except (ValueError, FaultSpecError) as exc:
            return _json({"code": "invalid_request", "message": str(exc)}, 400)
    return _json(state.faults.to_dict())


async def admin_expire_tokens(request: Request) -> Response:
    request.app.state.emulator.expire_tokens()
    return _empty()


async def admin_state(request: Request) -> Response:
    return _json(request.app.state.emulator.snapshot())


def create_app(config: EmulatorConfig | None = None) -> Starlette:
    """The emulator's ASGI app; its lifespan runs the replica reconciler and stops every replica
    on shutdown."""
    state = EmulatorState(config or EmulatorConfig())
    dep = "/v1/container-deployments/{name}"

    def r(path: str, handler: Handler, methods: list[str], *, auth: bool = True) -> Route:
        return Route(path, api(handler, auth=auth), methods=methods)

    routes = [
        r("/v1/oauth2/token", token, ["POST"], auth=False),
        r("/v1/container-deployments", list_deployments, ["GET"]),
        r("/v1/container-deployments", create_deployment, ["POST"]),
        r(dep, get_deployment, ["GET"]),
        r(dep, patch_deployment, ["PATCH"]),
        r(dep, delete_deployment, ["DELETE"]),
        r(dep + "/status", get_status, ["GET"]),
        r(dep + "/restart", restart, ["POST"]),
        r(dep + "/scaling", get_scaling, ["GET"]),
        r(dep + "/scaling", patch_scaling, ["PATCH"]),
        r(dep + "/replicas", get_replicas, ["GET"]),
        r(dep + "/purge-queue", purge_queue, ["POST"]),
        r(dep + "/pause", pause, ["POST"]),
        r(dep + "/resume", resume, ["POST"]),
        r(dep + "/environment-variables", env_vars, ["GET", "POST", "PATCH", "DELETE"]),
        r("/v1/serverless-compute-resources", compute_resources, ["GET"]),
        r("/v1/container-types", container_types, ["GET"]),
        r("/v1/secrets", secrets_endpoint, ["GET", "POST"]),
        r("/v1/secrets/{secret}", secret_item, ["DELETE"]),
        r("/v1/file-secrets", file_secrets, ["GET", "POST"]),
        r("/v1/file-secrets/{secret}", file_secret_item, ["DELETE"]),
        r("/v1/container-registry-credentials", registry_credentials, ["GET", "POST"]),
        r("/v1/container-registry-credentials/{cred}", registry_credential_item, ["DELETE"]),
        Route("/_emulator/faults", admin_faults, methods=["GET", "POST", "DELETE"]),
        Route("/_emulator/expire-tokens", admin_expire_tokens, methods=["POST"]),
        Route("/_emulator/state", admin_state, methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(state.run(), name="emulator-reconciler")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await state.shutdown()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.emulator = state
    return app
