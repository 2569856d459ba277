"""The Ollama stand-in: a small Ollama-compatible HTTP server for the demo and end-to-end tests.

It speaks the real API paths and shapes (``/api/tags``, ``/api/show``, ``/api/pull``,
``/api/delete``, ``/api/chat``, ``/api/generate``, ``/api/ps``, ``/api/version``, ``/``) so the real
worker, through the official ``ollama`` client, runs unchanged against it.  It has no model: a chat
whose ``format`` is a JSON schema gets a deterministic instance of that schema (same request, same
answer), which therefore validates against the worker's result models; image requests are
described by their pixel size.  Each inference call waits ``latency_s`` (and the first call on an
unloaded model ``load_latency_s``) so tasks take visible time in the demo.

With ``num_parallel`` it serves like Ollama (``OLLAMA_NUM_PARALLEL``): at most that many inference
calls per model at once, the others wait first come first served; ``m`` calls served together
each take ``latency_s × m / batching[m-1]`` (``batching``: aggregate throughput at 1..N relative to
one call; without it, no gain from batching).  Without ``num_parallel`` every call runs at once.

It says so: ``/api/version`` answers ``{"version": "...-standin", "server": "Ollama stand-in"}``
and every log line starts with "Ollama stand-in".

Embed it (``with OllamaStandin(latency_s=0.5) as s: ... s.url``) or run it:
``python -m gpuscale.dev.standin --port 11434``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import hashlib
import io
import json
import logging
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger("gpuscale.dev.standin")

NAME = "Ollama stand-in"
VERSION = "0.12.0-standin"


def _norm(name: str) -> str:
    return name if ":" in name else name + ":latest"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def parse_keep_alive(value: Any, default_s: float = 300.0) -> float:
    """Ollama's ``keep_alive``: seconds as a number, or a duration like ``"30m"``, ``"1h"``, ``"10s"``."""
    if value is None:
        return default_s
    if isinstance(value, int | float):
        return float(value)
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", str(value))
    if not m:
        return default_s
    number = float(m.group(1))
    unit = m.group(2) or "s"
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


# --------------------------------------------------------------------------- answers from a schema


class _Answerer:
    """Builds a deterministic JSON value that fits a JSON schema (pydantic's dialect)."""

    def __init__(self, root: dict[str, Any], seed: bytes, hints: dict[str, str]) -> None:
        self.root = root
        self.seed = seed
        self.hints = hints

    def _n(self, path: str, modulo: int) -> int:
        digest = hashlib.sha256(self.seed + path.encode()).digest()
        return int.from_bytes(digest[:8], "big") % max(1, modulo)

    def _resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        ref = schema.get("$ref")
        while isinstance(ref, str) and ref.startswith("#/"):
            node: Any = self.root
            for part in ref[2:].split("/"):
                node = node[part]
            schema = {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
            ref = node.get("$ref") if isinstance(node, dict) else None
        return schema

    def value(self, schema: dict[str, Any], path: str = "") -> Any:
        schema = self._resolve(schema)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            options = schema["enum"]
            return options[self._n(path, len(options))]
        for key in ("anyOf", "oneOf"):
            if key in schema:
                variants = [v for v in schema[key] if self._resolve(v).get("type") != "null"] or schema[key]
                return self.value(variants[self._n(path + "|v", len(variants))], path)
        if "allOf" in schema:
            merged: dict[str, Any] = {}
            for part in schema["allOf"]:
                merged.update(self._resolve(part))
            return self.value(merged, path)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind == "object" or "properties" in schema:
            props = schema.get("properties", {})
            return {name: self.value(sub, f"{path}.{name}") for name, sub in props.items()}
        if kind == "array":
            lo = int(schema.get("minItems", 0))
            hi = int(schema.get("maxItems", max(lo, 3)))
            count = min(hi, max(lo, 1 + self._n(path + "#", 3)))
            items = schema.get("items", {"type": "string"})
            return [self.value(items, f"{path}[{i}]") for i in range(count)]
        if kind == "boolean":
            return self._n(path, 2) == 1
        if kind in ("integer", "number"):
            return self._number(schema, path, integer=kind == "integer")
        if kind == "null":
            return None
        return self._string(schema, path)

    def _number(self, schema: dict[str, Any], path: str, *, integer: bool) -> float | int:
        lo = schema.get("minimum", schema.get("exclusiveMinimum"))
        hi = schema.get("maximum", schema.get("exclusiveMaximum"))
        lo_f = float(lo) if lo is not None else 0.0
        hi_f = float(hi) if hi is not None else lo_f + 1000.0
        if "exclusiveMinimum" in schema:
            lo_f += 1 if integer else 1e-6
        if "exclusiveMaximum" in schema:
            hi_f -= 1 if integer else 1e-6
        if integer:
            lo_i, hi_i = int(-(-lo_f // 1)), int(hi_f // 1)
            return lo_i + self._n(path, max(1, hi_i - lo_i + 1))
        fraction = self._n(path, 1000) / 1000.0
        return round(lo_f + (hi_f - lo_f) * fraction, 3)

    def _string(self, schema: dict[str, Any], path: str) -> str:
        fmt = schema.get("format")
        if fmt == "date":
            return (dt.date(2024, 1, 1) + dt.timedelta(days=self._n(path, 700))).isoformat()
        if fmt == "date-time":
            return f"{dt.date(2024, 1, 1) + dt.timedelta(days=self._n(path, 700))}T09:00:00Z"
        field = path.rsplit(".", 1)[-1].split("[", 1)[0] or "answer"
        text = self.hints.get(path) or f"{field.replace('_', ' ')} (stand-in {self._n(path, 16**6):06x})"
        lo = int(schema.get("minLength", 0))
        hi = schema.get("maxLength")
        if len(text) < lo:
            text = text + "." * (lo - len(text))
        if hi is not None:
            text = text[: int(hi)]
        return text


def _image_size(b64: str) -> tuple[int, int] | None:
    try:
        from PIL import Image

        with Image.open(io.BytesIO(base64.b64decode(b64, validate=False))) as img:
            return img.width, img.height
    except Exception:  # a stand-in describes what it can; a bad image is not its problem
        return None


def _hints(text: str, images: list[str]) -> dict[str, str]:
    """Field values that make the canned answers read a little like the request."""
    hints: dict[str, str] = {}
    slide = re.search(r"Slide (\d+) of (\d+)", text)
    if slide:
        hints[".title"] = f"Slide {slide.group(1)} (described by the Ollama stand-in)"
    if images:
        size = _image_size(images[0])
        shown = f"a {size[0]}x{size[1]} image" if size else "an image it could not decode"
        hints[".description"] = f"The Ollama stand-in received {shown}; no real model looked at it."
        hints[".text_content"] = "Text as the Ollama stand-in would read it."
    first = re.search(r"## Slide 1: (.+?) \(", text)
    if first:
        hints[".name"] = first.group(1).split(" (described", 1)[0]
    return hints


# --------------------------------------------------------------------------- the server


class OllamaStandin:
    """An Ollama-compatible server with canned, schema-valid answers.  ``start()`` / ``stop()``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        models: tuple[str, ...] | list[str] = ("gemma3:12b",),
        latency_s: float = 0.0,
        load_latency_s: float = 0.0,
        pull_latency_s: float = 0.0,
        num_parallel: int | None = None,
        batching: list[float] | None = None,
    ) -> None:
        if num_parallel is not None and num_parallel < 1:
            raise ValueError("num_parallel must be >= 1")
        if batching is not None and (num_parallel is None or len(batching) != num_parallel):
            raise ValueError("batching needs one value per call served at once (num_parallel)")
        self.num_parallel = num_parallel
        self.batching = batching
        self._gates: dict[str, asyncio.Semaphore] = {}
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self.host = host
        self.requested_port = port
        self.latency_s = latency_s
        self.load_latency_s = load_latency_s
        self.pull_latency_s = pull_latency_s
        self.installed: dict[str, str] = {_norm(m): _now() for m in models}
        self.loaded: dict[str, float] = {}  # model -> expires at (monotonic)
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server: Any = None
        self.app = Starlette(
            routes=[
                Route("/", self.root, methods=["GET", "HEAD"]),
                Route("/api/version", self.version, methods=["GET"]),
                Route("/api/tags", self.tags, methods=["GET"]),
                Route("/api/ps", self.ps, methods=["GET"]),
                Route("/api/show", self.show, methods=["POST"]),
                Route("/api/pull", self.pull, methods=["POST"]),
                Route("/api/delete", self.delete, methods=["DELETE"]),
                Route("/api/chat", self.chat, methods=["POST"]),
                Route("/api/generate", self.generate, methods=["POST"]),
            ]
        )

    # -- lifecycle

    @property
    def port(self) -> int:
        return int(self._server.port) if self._server is not None else self.requested_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> OllamaStandin:
        from gpuscale.common.serving import AppServer

        self._server = AppServer(self.app, self.host, self.requested_port, name="ollama-standin")
        self._server.start_thread()
        log.info("%s listening on %s (models: %s)", NAME, self.url, ", ".join(sorted(self.installed)))
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop_thread()
            log.info("%s on port %d stopped", NAME, self._server.port)
            self._server = None

    def __enter__(self) -> OllamaStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers

    def _count(self, path: str) -> None:
        with self._lock:
            self.calls[path] += 1

    @staticmethod
    def _not_found(model: str) -> JSONResponse:
        return JSONResponse({"error": f"model '{model}' not found"}, status_code=404)

    async def _body(self, request: Request) -> dict[str, Any] | JSONResponse:
        try:
            body = json.loads(await request.body() or b"{}")
        except json.JSONDecodeError as exc:
            return JSONResponse({"error": f"invalid JSON body: {exc.msg}"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
        return body

    def _model_entry(self, name: str) -> dict[str, Any]:
        family = name.split(":", 1)[0].rstrip("0123456789.") or name
        digest = hashlib.sha256(name.encode()).hexdigest()
        return {
            "name": name,
            "model": name,
            "modified_at": self.installed.get(name, _now()),
            "size": 1_000_000 + int(digest[:6], 16),
            "digest": digest,
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": family,
                "families": [family],
                "parameter_size": "stand-in",
                "quantization_level": "none",
            },
        }

    async def _load(self, model: str, keep_alive: Any) -> int:
        """Mark the model loaded; returns the load time in ns (0 if it was loaded already)."""
        now = time.monotonic()
        with self._lock:
            already = self.loaded.get(model, 0) > now
        load_ns = 0
        if not already and self.load_latency_s > 0:
            started = time.monotonic()
            await asyncio.sleep(self.load_latency_s)
            load_ns = int((time.monotonic() - started) * 1e9)
        seconds = parse_keep_alive(keep_alive)
        with self._lock:
            if seconds == 0:
                self.loaded.pop(model, None)
            else:
                # A negative keep_alive keeps the model loaded forever.
                self.loaded[model] = float("inf") if seconds < 0 else time.monotonic() + seconds
        return load_ns

    # -- routes

    async def root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(self, request: Request) -> Response:
        self._count("/api/version")
        return JSONResponse({"version": VERSION, "server": NAME})

    async def tags(self, request: Request) -> Response:
        self._count("/api/tags")
        with self._lock:
            names = sorted(self.installed)
        return JSONResponse({"models": [self._model_entry(n) for n in names]})

    async def ps(self, request: Request) -> Response:
        self._count("/api/ps")
        now = time.monotonic()
        with self._lock:
            live = {m: exp for m, exp in self.loaded.items() if exp > now}
        models = []
        for name, expires in sorted(live.items()):
            entry = self._model_entry(name)
            left = 10 * 365 * 86400 if expires == float("inf") else expires - now
            entry["expires_at"] = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=left)).isoformat()
            entry["size_vram"] = entry["size"]
            models.append(entry)
        return JSONResponse({"models": models})

    async def show(self, request: Request) -> Response:
        self._count("/api/show")
        body = await self._body(request)
        if isinstance(body, JSONResponse):
            return body
        model = _norm(str(body.get("model") or body.get("name") or ""))
        if model not in self.installed:
            return self._not_found(model)
        entry = self._model_entry(model)
        return JSONResponse(
            {
                "modelfile": f"# {NAME}: no weights behind {model}",
                "parameters": "temperature 0",
                "template": "{{ .Prompt }}",
                "details": entry["details"],
                "model_info": {"general.architecture": entry["details"]["family"]},
                "capabilities": ["completion", "vision"],
                "modified_at": entry["modified_at"],
            }
        )

    async def pull(self, request: Request) -> Response:
        self._count("/api/pull")
        body = await self._body(request)
        if isinstance(body, JSONResponse):
            return body
        model = _norm(str(body.get("model") or body.get("name") or ""))
        if model in (":latest", ""):
            return JSONResponse({"error": "model is required"}, status_code=400)
        log.info("%s: pulling %s", NAME, model)
        digest = "sha256:" + hashlib.sha256(model.encode()).hexdigest()

        async def steps() -> AsyncIterator[dict[str, Any]]:
            yield {"status": "pulling manifest"}
            total = 4
            for i in range(1, total + 1):
                await asyncio.sleep(self.pull_latency_s / total)
                yield {"status": f"pulling {digest[7:19]}", "digest": digest, "total": total, "completed": i}
            yield {"status": "verifying sha256 digest"}
            yield {"status": "writing manifest"}
            with self._lock:
                self.installed[model] = _now()
            yield {"status": "success"}

        if body.get("stream", True):

            async def ndjson() -> AsyncIterator[bytes]:
                async for step in steps():
                    yield (json.dumps(step) + "\n").encode()

            return StreamingResponse(ndjson(), media_type="application/x-ndjson")
        last: dict[str, Any] = {}
        async for step in steps():
            last = step
        return JSONResponse(last)

    async def delete(self, request: Request) -> Response:
        self._count("/api/delete")
        body = await self._body(request)
        if isinstance(body, JSONResponse):
            return body
        model = _norm(str(body.get("model") or body.get("name") or ""))
        with self._lock:
            if model not in self.installed:
                return self._not_found(model)
            del self.installed[model]
            self.loaded.pop(model, None)
        log.info("%s: deleted %s", NAME, model)
        return Response(status_code=200)

    def _answer(self, fmt: Any, text: str, images: list[str], model: str) -> str:
        seed = hashlib.sha256(json.dumps([model, text, [len(i) for i in images]]).encode()).digest()
        hints = _hints(text, images)
        if isinstance(fmt, dict):
            return json.dumps(_Answerer(fmt, seed, hints).value(fmt))
        if fmt == "json":
            return json.dumps({"answer": f"{NAME} answer {seed.hex()[:8]}"})
        words = " ".join(text.split()[:12])
        return f"{NAME} reply (no real model) to: {words}"

    async def _infer(self, body: dict[str, Any], text: str, images: list[str]) -> tuple[str, str, int, int]:
        model = _norm(str(body.get("model") or ""))
        started = time.monotonic()
        load_ns = await self._load(model, body.get("keep_alive"))
        if self.num_parallel is None:
            if self.latency_s > 0:
                await asyncio.sleep(self.latency_s)
        else:
            # Created in the server's own event loop (the first call), one queue per model.
            gate = self._gates.setdefault(model, asyncio.Semaphore(self.num_parallel))
            async with gate:
                self.in_flight[model] += 1
                m = self.in_flight[model]
                self.max_in_flight[model] = max(self.max_in_flight[model], m)
                try:
                    speedup = 1.0 if self.batching is None else self.batching[m - 1] / self.batching[0]
                    if self.latency_s > 0:
                        await asyncio.sleep(self.latency_s * m / speedup)
                finally:
                    self.in_flight[model] -= 1
        content = self._answer(body.get("format"), text, images, model)
        total_ns = int((time.monotonic() - started) * 1e9)
        return model, content, load_ns, total_ns

    @staticmethod
    def _counters(text: str, content: str, load_ns: int, total_ns: int) -> dict[str, Any]:
        return {
            "total_duration": total_ns,
            "load_duration": load_ns,
            "prompt_eval_count": max(1, len(text) // 4),
            "prompt_eval_duration": max(0, total_ns - load_ns) // 2,
            "eval_count": max(1, len(content) // 4),
            "eval_duration": max(0, total_ns - load_ns) // 2,
        }

    async def _model_request(self, request: Request, path: str) -> tuple[dict[str, Any], str] | Response:
        """Count the call, parse the body, check the model is installed: (body, model), or the
        error answer to send."""
        self._count(path)
        body = await self._body(request)
        if isinstance(body, JSONResponse):
            return body
        model = _norm(str(body.get("model") or ""))
        if model not in self.installed:
            return self._not_found(model)
        return body, model

    @staticmethod
    def _reply(body: dict[str, Any], answer: dict[str, Any]) -> Response:
        """Ollama streams NDJSON unless ``stream`` is false; a finished answer is one line."""
        if body.get("stream", True):
            return StreamingResponse(_one_line(answer), media_type="application/x-ndjson")
        return JSONResponse(answer)

    async def chat(self, request: Request) -> Response:
        parsed = await self._model_request(request, "/api/chat")
        if isinstance(parsed, Response):
            return parsed
        body, model = parsed
        messages = body.get("messages") or []
        if not isinstance(messages, list):
            return JSONResponse({"error": "messages must be a list"}, status_code=400)
        text = "\n".join(str(m.get("content") or "") for m in messages if isinstance(m, dict))
        images = [i for m in messages if isinstance(m, dict) for i in (m.get("images") or [])]
        model, content, load_ns, total_ns = await self._infer(body, text, images)
        answer = {
            "model": model,
            "created_at": _now(),
            "message": {"role": "assistant", "content": content},
            "done": True,
            "done_reason": "stop",
            **self._counters(text, content, load_ns, total_ns),
        }
        return self._reply(body, answer)

    async def generate(self, request: Request) -> Response:
        parsed = await self._model_request(request, "/api/generate")
        if isinstance(parsed, Response):
            return parsed
        body, model = parsed
        prompt = str(body.get("prompt") or "")
        if not prompt and not body.get("images"):
            # An empty prompt only loads (or, with keep_alive 0, unloads) the model.
            load_ns = await self._load(model, body.get("keep_alive"))
            reason = "unload" if parse_keep_alive(body.get("keep_alive")) == 0 else "load"
            log.info("%s: %s %s", NAME, reason, model)
            answer = {
                "model": model,
                "created_at": _now(),
                "response": "",
                "done": True,
                "done_reason": reason,
                "load_duration": load_ns,
                "total_duration": load_ns,
            }
        else:
            text = (str(body.get("system") or "") + "\n" + prompt).strip()
            model, content, load_ns, total_ns = await self._infer(body, text, list(body.get("images") or []))
            answer = {
                "model": model,
                "created_at": _now(),
                "response": content,
                "done": True,
                "done_reason": "stop",
                **self._counters(text, content, load_ns, total_ns),
            }
        return self._reply(body, answer)


async def _one_line(answer: dict[str, Any]) -> AsyncIterator[bytes]:
    yield (json.dumps(answer) + "\n").encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpuscale.dev.standin", description=f"Run the {NAME}.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434, help="0 picks a free port (printed)")
    parser.add_argument("--models", default="gemma3:12b", help="comma-separated installed models")
    parser.add_argument("--latency", type=float, default=0.5, help="seconds per chat/generate call")
    parser.add_argument("--load-latency", type=float, default=1.0, help="seconds to 'load' a model")
    parser.add_argument("--pull-latency", type=float, default=1.0, help="seconds a pull takes")
    parser.add_argument(
        "--num-parallel", type=int, default=None, help="serve like Ollama: this many calls at once per model"
    )
    parser.add_argument(
        "--batching", default=None, help="comma-separated aggregate throughput at 1..num-parallel calls"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    standin = OllamaStandin(
        args.host,
        args.port,
        models=[m.strip() for m in args.models.split(",") if m.strip()],
        latency_s=args.latency,
        load_latency_s=args.load_latency,
        pull_latency_s=args.pull_latency,
        num_parallel=args.num_parallel,
        batching=[float(v) for v in args.batching.split(",")] if args.batching else None,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    standin.start()
    # The port line is machine-readable for scripts that started us with --port 0.
    print(f"{NAME} listening on {standin.url}", flush=True)
    try:
        stop.wait()
    finally:
        standin.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
