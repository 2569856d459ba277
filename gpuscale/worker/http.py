"""The worker's HTTP API (port 8001 by default): the container health check and model management.

* ``GET /api/health`` — 200 ``{"status": "ready", ...}`` once the model is loaded and the worker
  claims tasks; 503 while starting, draining, or when Ollama does not answer.  After warming,
  Ollama may unload an idle model (``keep_alive`` ran out): the worker still claims tasks and the
  next one loads the model again, so that is still 200, but the status says ``model_unloaded``
  rather than claim a loaded model.  The body always says which, with the model, whether it is
  loaded, whether the worker is claiming (``ready``), and the current load.
* ``GET /api/models``, ``POST /api/models/{name}`` (pull), ``DELETE /api/models/{name}`` — need
  ``Authorization: Bearer $GPUSCALE_WORKER_TOKEN`` (compared in constant time); 401 otherwise,
  and always 401 when no token is configured (model management is then off).  ``name`` must have
  Ollama's ``[namespace/]name[:tag]`` form; anything else is 400 and never reaches Ollama.
* ``GET /metrics`` — the worker's Prometheus metrics (:mod:`gpuscale.worker.metrics`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gpuscale import __version__
from gpuscale.worker.errors import OllamaError
from gpuscale.worker.metrics import REGISTRY
from gpuscale.worker.ollama_client import ModelNotFound, OllamaClient, same_model

log = logging.getLogger(__name__)

# A health check must answer quickly even when Ollama hangs.
HEALTH_OLLAMA_TIMEOUT_S = 2.0

# Ollama's model names: ``[host/][namespace/]name[:tag]`` (e.g. ``gemma3:12b``,
# ``library/gemma3:12b``, ``hf.co/org/model:Q4_K_M``).  Every part starts with a letter, digit or
# underscore, so ``.``/``..`` path segments, leading dashes, spaces and control characters never
# reach Ollama.
_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"
MODEL_NAME_RE = re.compile(
    rf"(?:[A-Za-z0-9_][A-Za-z0-9_.-]{{0,252}}(?::[0-9]{{1,5}})?/)?(?:{_PART}/)?{_PART}(?::{_PART})?"
)


def valid_model_name(name: str) -> bool:
    return MODEL_NAME_RE.fullmatch(name) is not None and ".." not in name


def _bad_model_name() -> JSONResponse:
    # The name is not echoed back: it is whatever the caller sent.
    return JSONResponse(
        {"error": "invalid model name: expected Ollama's [namespace/]name[:tag], e.g. gemma3:12b"},
        status_code=400,
    )


@dataclass
class WorkerStatus:
    """What the runtime shares with the HTTP API; the runtime updates it as it goes."""

    pool: str
    server_id: str
    model: str | None
    slots: int
    ollama: OllamaClient | None = None
    ready: bool = False  # model warmed (or no model needed) and claiming
    draining: bool = False
    stopping: bool = False
    running: Callable[[], int] = field(default=lambda: 0)
    detail: str = "starting"


def _authorized(request: Request, token: SecretStr | None) -> bool:
    if token is None or not token.get_secret_value():
        return False
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    return hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode())


def _unauthorized() -> JSONResponse:
    return JSONResponse(
        {"error": "unauthorized: send Authorization: Bearer <GPUSCALE_WORKER_TOKEN>"},
        status_code=401,
        headers={"WWW-Authenticate": 'Bearer realm="gpuscale-worker"'},
    )


def create_app(status: WorkerStatus, token: SecretStr | None) -> Starlette:
    async def health(request: Request) -> Response:
        body: dict[str, Any] = {
            "pool": status.pool,
            "server_id": status.server_id,
            "version": __version__,
            "model": status.model,
            "model_loaded": None,
            "ollama": None,
            "running": status.running(),
            "slots": status.slots,
        }
        ollama_ok = True
        if status.ollama is not None and status.model:
            try:
                loaded = await asyncio.wait_for(status.ollama.loaded_models(), HEALTH_OLLAMA_TIMEOUT_S)
                body["ollama"] = "ok"
                body["model_loaded"] = any(same_model(status.model, m) for m in loaded)
            except (OllamaError, TimeoutError) as exc:
                ollama_ok = False
                body["ollama"] = "unreachable"
                body["ollama_error"] = str(exc) if isinstance(exc, OllamaError) else "timed out"
        if status.stopping:
            state = "stopping"
        elif status.draining:
            state = "draining"
        elif not ollama_ok:
            state = "ollama_unreachable"
        elif not status.ready:
            state = "starting"
        elif body["model_loaded"] is False:
            state = "model_unloaded"  # unloaded by keep_alive; the next task reloads it
        else:
            state = "ready"
        body["status"] = state
        body["ready"] = status.ready and not (status.draining or status.stopping)
        body["detail"] = status.detail
        return JSONResponse(body, status_code=200 if state in ("ready", "model_unloaded") else 503)

    def _ollama_for(request: Request) -> OllamaClient | Response:
        """This worker's Ollama client for an authorized request, or the response that refuses it."""
        if not _authorized(request, token):
            return _unauthorized()
        if status.ollama is None:
            return JSONResponse({"error": f"the {status.pool} pool runs no Ollama"}, status_code=409)
        return status.ollama

    def _model_request(request: Request) -> tuple[OllamaClient, str] | Response:
        """The Ollama client and the valid model name a /models/{name} request is about, or the refusal."""
        ollama = _ollama_for(request)
        if isinstance(ollama, Response):
            return ollama
        name = request.path_params["name"]
        if not valid_model_name(name):
            return _bad_model_name()
        return ollama, name

    async def list_models(request: Request) -> Response:
        ollama = _ollama_for(request)
        if isinstance(ollama, Response):
            return ollama
        try:
            installed = await ollama.list_models()
            loaded = await ollama.loaded_models()
        except OllamaError as exc:
            return JSONResponse({"error": str(exc)}, status_code=502)
        return JSONResponse({"pool_model": status.model, "models": installed, "loaded": loaded})

    async def pull_model(request: Request) -> Response:
        if isinstance(found := _model_request(request), Response):
            return found
        ollama, name = found
        log.info("pulling model %s (requested over HTTP)", name)
        try:
            result = await ollama.pull(name)
        except OllamaError as exc:
            return JSONResponse({"error": str(exc)}, status_code=502)
        return JSONResponse({"model": name, "status": result or "success"})

    async def delete_model(request: Request) -> Response:
        if isinstance(found := _model_request(request), Response):
            return found
        ollama, name = found
        force = request.query_params.get("force", "").lower() in ("1", "true", "yes")
        if status.model and same_model(name, status.model) and not force:
            # Deleting the model this worker serves would fail every task it claims next.
            return JSONResponse(
                {"error": f"{name} is the model this {status.pool} worker serves; add ?force=true"},
                status_code=409,
            )
        try:
            await ollama.delete(name)
        except ModelNotFound:
            return JSONResponse({"error": f"model {name} is not installed"}, status_code=404)
        except OllamaError as exc:
            return JSONResponse({"error": str(exc)}, status_code=502)
        log.info("deleted model %s (requested over HTTP)", name)
        return JSONResponse({"model": name, "status": "deleted"})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/api/health", health, methods=["GET"]),
            Route("/api/models", list_models, methods=["GET"]),
            Route("/api/models/{name:path}", pull_model, methods=["POST"]),
            Route("/api/models/{name:path}", delete_model, methods=["DELETE"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
    )
