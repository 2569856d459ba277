"""A thin wrapper around the official ``ollama.AsyncClient`` for what the worker needs.

It turns the client's several failure modes (connection refused, timeouts, HTTP errors, answers that
are not JSON or do not fit the schema) into :class:`~gpuscale.worker.errors.OllamaError` /
:class:`~gpuscale.worker.errors.InvalidAnswer` with a readable reason, so a handler never crashes on them
and the task is retried.  Structured calls send the answer model's JSON schema as ``format`` and
validate the reply with the same model; the raw text is kept on the error for diagnosis.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, TypeVar

import httpx
import ollama
from pydantic import BaseModel, ValidationError

from gpuscale.worker.errors import InvalidAnswer, OllamaError

log = logging.getLogger(__name__)

A = TypeVar("A", bound=BaseModel)

# Keep this much of a bad answer in the error message (the full text stays on the exception).
_RAW_IN_MESSAGE = 300


class ModelNotFound(OllamaError):
    """The model is not installed on this Ollama."""


def _normalise(name: str) -> str:
    """``gemma3`` and ``gemma3:latest`` are the same model to Ollama."""
    return name if ":" in name else name + ":latest"


def same_model(a: str, b: str) -> bool:
    return _normalise(a) == _normalise(b)


class OllamaClient:
    """Calls to one Ollama server.  ``host`` is ``OLLAMA_HOST`` (``http://127.0.0.1:11434``)."""

    def __init__(
        self,
        host: str,
        *,
        timeout_s: float = 300.0,
        keep_alive: str | float = "30m",
        options: dict[str, Any] | None = None,
    ) -> None:
        self.host = host
        self.timeout_s = timeout_s
        self.keep_alive = keep_alive
        self.options = dict(options or {})
        self._client = ollama.AsyncClient(host=host, timeout=timeout_s)

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> OllamaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ error mapping

    def _wrap(self, exc: BaseException, what: str) -> OllamaError:
        if isinstance(exc, ollama.ResponseError):
            if exc.status_code == 404:
                return ModelNotFound(f"{what}: model not found on Ollama ({exc.error})")
            # 4xx other than 404 means our request is wrong: another attempt would repeat it.
            retryable = not (400 <= exc.status_code < 500) or exc.status_code == 429
            return OllamaError(f"{what}: Ollama answered {exc.status_code}: {exc.error}", retryable=retryable)
        if isinstance(exc, httpx.TimeoutException):
            return OllamaError(f"{what}: Ollama did not answer within {self.timeout_s:g}s")
        if isinstance(exc, ConnectionError | httpx.ConnectError):
            return OllamaError(f"{what}: Ollama unreachable at {self.host}")
        if isinstance(exc, httpx.HTTPError):
            return OllamaError(f"{what}: HTTP error talking to Ollama: {type(exc).__name__}: {exc}")
        return OllamaError(f"{what}: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ server and models

    async def version(self) -> str:
        try:
            data = await self._client._request_raw("GET", "/api/version")
            return str(data.json().get("version", ""))
        except (ollama.ResponseError, ConnectionError, httpx.HTTPError, ValueError) as exc:
            raise self._wrap(exc, "version") from None

    async def list_models(self) -> list[dict[str, Any]]:
        """Installed models (``/api/tags``) as plain dicts."""
        try:
            resp = await self._client.list()
        except (ollama.ResponseError, ConnectionError, httpx.HTTPError) as exc:
            raise self._wrap(exc, "list models") from None
        return [m.model_dump(mode="json", exclude_none=True) for m in resp.models]

    async def model_names(self) -> list[str]:
        return [str(m.get("model") or m.get("name")) for m in await self.list_models()]

    async def loaded_models(self) -> list[str]:
        """Models loaded in memory now (``/api/ps``)."""
        try:
            resp = await self._client.ps()
        except (ollama.ResponseError, ConnectionError, httpx.HTTPError) as exc:
            raise self._wrap(exc, "ps") from None
        return [str(m.model or m.name) for m in resp.models]

    async def is_loaded(self, model: str) -> bool:
        return any(same_model(model, m) for m in await self.loaded_models())

    async def pull(self, model: str) -> str:
        """Pull (download) a model, following Ollama's progress stream; returns ``"success"``.

        Streamed on purpose: a non-streamed pull is one response that arrives only when the whole
        download is done, so a model of several GB outlasts the request timeout, and Ollama
        cancels the pull when the client hangs up.  Streamed, the timeout applies between
        progress lines, which Ollama sends all along while it works.
        """
        what = f"pull {model}"
        status = ""
        try:
            progress = await self._client.pull(model, stream=True)
            async for part in progress:
                if part.status and part.status != status:
                    status = part.status
                    log.debug("%s: %s", what, status)
        except ollama.ResponseError as exc:
            if exc.status_code == -1:  # an {"error": ...} line in the middle of the stream
                raise OllamaError(f"{what}: Ollama reported an error while pulling: {exc.error}") from None
            raise self._wrap(exc, what) from None
        except (ConnectionError, httpx.HTTPError) as exc:
            raise self._wrap(exc, what) from None
        except ValueError as exc:  # a progress line that is not JSON (or not a progress object)
            raise OllamaError(f"{what}: malformed progress from Ollama: {type(exc).__name__}") from None
        if status != "success":
            raise OllamaError(
                f"{what}: the progress stream ended before success (last: {status or 'nothing'})"
            )
        return status

    async def delete(self, model: str) -> None:
        try:
            await self._client.delete(model)
        except (ollama.ResponseError, ConnectionError, httpx.HTTPError) as exc:
            raise self._wrap(exc, f"delete {model}") from None

    async def warm(self, model: str) -> None:
        """Load the model into memory: an empty generate loads it and keeps it (``keep_alive``)."""
        try:
            await self._client.generate(model=model, prompt="", keep_alive=self.keep_alive)
        except (ollama.ResponseError, ConnectionError, httpx.HTTPError) as exc:
            raise self._wrap(exc, f"warm {model}") from None

    # ------------------------------------------------------------------ inference

    async def chat_structured(
        self,
        model: str,
        answer_model: type[A],
        *,
        prompt: str,
        system: str | None = None,
        images: Sequence[bytes] = (),
        options: dict[str, Any] | None = None,
    ) -> A:
        """One chat turn whose answer must be an ``answer_model``; raises ``InvalidAnswer`` if not."""
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": system})
        user: dict[str, Any] = {"role": "user", "content": prompt}
        if images:
            user["images"] = list(images)  # the client base64-encodes bytes
        messages.append(user)
        opts = {"temperature": 0, **self.options, **(options or {})}
        try:
            resp = await self._client.chat(
                model=model,
                messages=messages,
                format=answer_model.model_json_schema(),
                options=opts,
                keep_alive=self.keep_alive,
                stream=False,
            )
        except (ollama.ResponseError, ConnectionError, httpx.HTTPError) as exc:
            raise self._wrap(exc, f"chat with {model}") from None
        except ValidationError as exc:  # the HTTP body itself did not look like a chat answer
            raise OllamaError(
                f"chat with {model}: malformed Ollama response: {exc.error_count()} errors"
            ) from None
        raw = (resp.message.content or "") if resp.message else ""
        return parse_answer(answer_model, raw)


def parse_answer(answer_model: type[A], raw: str) -> A:
    """Validate a model's raw answer; ``InvalidAnswer`` (with the raw text) when it does not fit."""
    text = raw.strip()
    # Some models wrap JSON in a Markdown fence even when asked for a schema.
    if text.startswith("```"):
        text = text.strip("`")
        text = text.split("\n", 1)[1] if "\n" in text else text
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidAnswer(
            f"model answer is not JSON ({exc.msg} at char {exc.pos}): {raw[:_RAW_IN_MESSAGE]!r}", raw=raw
        ) from None
    try:
        return answer_model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()[:5]
        )
        shown = raw[:_RAW_IN_MESSAGE]
        raise InvalidAnswer(
            f"model answer does not match {answer_model.__name__}: {problems}; raw: {shown!r}", raw=raw
        ) from None
