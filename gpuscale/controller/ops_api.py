"""The controller's HTTP surface for ops: metrics, health, pools, servers and the decision timeline.

Every process serves it, leader or standby; only the leader's numbers move.  Answers are built
from the reconciler's last view and the database — nothing here acts on a provider, and nothing
here ever contains a secret (the pool rules and provider state carry none).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from gpuscale.controller.store import ControllerStore
    from gpuscale.queue import Queue


class OpsSource(Protocol):
    """What the ops API reads from the controller process (:class:`~gpuscale.controller.app.ControllerApp`);
    a protocol, so this module does not import the process that serves it."""

    controller_id: str

    @property
    def is_leader(self) -> bool: ...

    @property
    def queue(self) -> Queue: ...

    @property
    def store(self) -> ControllerStore: ...

    async def database_ok(self) -> tuple[bool, str | None]: ...

    async def pools_view(self) -> dict[str, Any]: ...


# The pools file's rule for pool names (PoolRules.name): anything else names no pool.
_POOL_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if hasattr(value, "timestamp"):
        return value.timestamp()
    return value


def build_app(ctl: OpsSource) -> Starlette:
    async def metrics(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(_: Request) -> Response:
        ok, error = await ctl.database_ok()
        body = {
            "database": "ok" if ok else "unreachable",
            "role": "leader" if ctl.is_leader else "standby",
            "controller_id": ctl.controller_id,
        }
        if error:
            body["error"] = error
        return JSONResponse(body, status_code=200 if ok else 503)

    async def pools(_: Request) -> Response:
        return JSONResponse(_jsonable(await ctl.pools_view()))

    async def servers(_: Request) -> Response:
        try:
            items = await ctl.queue.list_servers()
        except Exception as exc:
            return JSONResponse({"error": f"database: {type(exc).__name__}"}, status_code=503)
        return JSONResponse({"servers": _jsonable(items), "at": time.time()})

    async def events(request: Request) -> Response:
        pool = request.query_params.get("pool") or None
        if pool is not None and not _POOL_NAME.fullmatch(pool):
            return JSONResponse(
                {"error": "pool must be a pool name (a-z, 0-9, '_' or '-', at most 63)"}, status_code=400
            )
        try:
            limit = int(request.query_params.get("limit", "50"))
        except ValueError:
            return JSONResponse({"error": "limit must be an integer"}, status_code=400)
        if not 1 <= limit <= 1000:
            return JSONResponse({"error": "limit must be between 1 and 1000"}, status_code=400)
        try:
            items = await ctl.store.events(pool, limit)
        except Exception as exc:
            return JSONResponse({"error": f"database: {type(exc).__name__}"}, status_code=503)
        return JSONResponse({"events": _jsonable(items)})

    return Starlette(
        routes=[
            Route("/metrics", metrics),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/api/pools", pools),
            Route("/api/servers", servers),
            Route("/api/events", events),
        ]
    )
