"""The Ollama client wrapper against respx standing in for a real Ollama with a real model.

The answers are shaped like recorded Ollama answers; the failure modes are the ones a GPU box
produces: answers that are not JSON or miss fields, timeouts, 500s, a missing model, a server that
is not there at all.
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest
import respx

from gpuscale.dev.standin import OllamaStandin
from gpuscale.queue.results import StartupName
from gpuscale.worker.errors import InvalidAnswer, OllamaError
from gpuscale.worker.ollama_client import ModelNotFound, OllamaClient, parse_answer, same_model

HOST = "http://ollama.test:11434"


def chat_answer(content: str, model: str = "gemma3:12b") -> dict[str, object]:
    """A non-streamed /api/chat answer as Ollama 0.12 sends it."""
    return {
        "model": model,
        "created_at": "2025-07-15T10:21:33.918Z",
        "message": {"role": "assistant", "content": content},
        "done": True,
        "done_reason": "stop",
        "total_duration": 4_812_345_678,
        "load_duration": 21_456_789,
        "prompt_eval_count": 1843,
        "prompt_eval_duration": 912_345_678,
        "eval_count": 64,
        "eval_duration": 3_812_345_678,
    }


def _ndjson(*lines: dict[str, object]) -> bytes:
    """A streamed Ollama answer: one JSON object a line."""
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


@pytest.fixture
def client() -> OllamaClient:
    return OllamaClient(HOST, timeout_s=5, keep_alive="30m", options={"num_ctx": 8192})


@respx.mock
async def test_structured_chat_sends_schema_and_validates(client: OllamaClient) -> None:
    route = respx.post(f"{HOST}/api/chat").respond(
        json=chat_answer('{"name": "Acme Health", "confidence": 0.93, "evidence": "title slide"}')
    )
    answer = await client.chat_structured(
        "gemma3:12b", StartupName, system="be precise", prompt="Which startup?", images=[b"\x89PNG fake"]
    )
    assert answer == StartupName(name="Acme Health", confidence=0.93, evidence="title slide")
    body = json.loads(route.calls.last.request.content)
    assert body["model"] == "gemma3:12b"
    assert body["stream"] is False
    assert body["keep_alive"] == "30m"
    assert body["format"] == StartupName.model_json_schema()
    assert body["options"] == {"temperature": 0, "num_ctx": 8192}
    assert body["messages"][0] == {"role": "system", "content": "be precise"}
    user = body["messages"][1]
    assert user["role"] == "user" and user["content"] == "Which startup?"
    # Images travel as bare base64 (no data: prefix).
    import base64

    assert base64.b64decode(user["images"][0]) == b"\x89PNG fake"


@respx.mock
async def test_answer_that_is_not_json_is_a_retryable_error_with_the_raw_text(client: OllamaClient) -> None:
    raw = "Sure! The startup is called Acme Health."
    respx.post(f"{HOST}/api/chat").respond(json=chat_answer(raw))
    with pytest.raises(InvalidAnswer) as info:
        await client.chat_structured("gemma3:12b", StartupName, prompt="?")
    assert info.value.retryable is True
    assert info.value.raw == raw
    assert "not JSON" in str(info.value) and "Acme Health" in str(info.value)


@respx.mock
async def test_answer_missing_fields_is_a_retryable_error(client: OllamaClient) -> None:
    respx.post(f"{HOST}/api/chat").respond(json=chat_answer('{"name": "Acme", "confidence": 7}'))
    with pytest.raises(InvalidAnswer) as info:
        await client.chat_structured("gemma3:12b", StartupName, prompt="?")
    message = str(info.value)
    assert "does not match StartupName" in message
    assert "confidence" in message and "evidence" in message
    assert info.value.retryable


def test_fenced_json_is_accepted() -> None:
    raw = '```json\n{"name": null, "confidence": 0.1, "evidence": "none"}\n```'
    assert parse_answer(StartupName, raw).name is None


@respx.mock
async def test_timeout_is_retryable(client: OllamaClient) -> None:
    respx.post(f"{HOST}/api/chat").mock(side_effect=httpx.ReadTimeout("read timed out"))
    with pytest.raises(OllamaError) as info:
        await client.chat_structured("gemma3:12b", StartupName, prompt="?")
    assert info.value.retryable and "did not answer within 5s" in str(info.value)


@respx.mock
async def test_server_error_is_retryable(client: OllamaClient) -> None:
    respx.post(f"{HOST}/api/chat").respond(500, json={"error": "llama runner process has terminated"})
    with pytest.raises(OllamaError) as info:
        await client.chat_structured("gemma3:12b", StartupName, prompt="?")
    assert info.value.retryable
    assert "500" in str(info.value) and "llama runner process has terminated" in str(info.value)


@respx.mock
async def test_bad_request_is_not_retryable(client: OllamaClient) -> None:
    respx.post(f"{HOST}/api/chat").respond(400, json={"error": "invalid format: schema too deep"})
    with pytest.raises(OllamaError) as info:
        await client.chat_structured("gemma3:12b", StartupName, prompt="?")
    assert info.value.retryable is False


@respx.mock
async def test_missing_model(client: OllamaClient) -> None:
    respx.post(f"{HOST}/api/chat").respond(404, json={"error": "model 'llava:13b' not found"})
    with pytest.raises(ModelNotFound):
        await client.chat_structured("llava:13b", StartupName, prompt="?")
    respx.delete(f"{HOST}/api/delete").respond(404, json={"error": "model 'x' not found"})
    with pytest.raises(ModelNotFound):
        await client.delete("x")


@respx.mock
async def test_model_management_calls(client: OllamaClient) -> None:
    respx.get(f"{HOST}/api/tags").respond(
        json={
            "models": [
                {
                    "name": "gemma3:12b",
                    "model": "gemma3:12b",
                    "modified_at": "2025-07-14T09:00:00Z",
                    "size": 8149190253,
                    "digest": "f4031aab637d1ffa37b42570452ae0e4fad0314754d17ded67322e4b95836f8a",
                    "details": {"format": "gguf", "family": "gemma3", "parameter_size": "12.2B"},
                }
            ]
        }
    )
    respx.get(f"{HOST}/api/ps").respond(
        json={
            "models": [
                {
                    "name": "gemma3:12b",
                    "model": "gemma3:12b",
                    "size": 1,
                    "size_vram": 1,
                    "expires_at": "2025-07-15T11:00:00Z",
                    "digest": "x",
                }
            ]
        }
    )
    pull = respx.post(f"{HOST}/api/pull").respond(content=_ndjson({"status": "success"}))
    warm = respx.post(f"{HOST}/api/generate").respond(
        json={
            "model": "gemma3:12b",
            "created_at": "2025-07-15T10:00:00Z",
            "response": "",
            "done": True,
            "done_reason": "load",
        }
    )
    respx.get(f"{HOST}/api/version").respond(json={"version": "0.12.3"})
    assert await client.model_names() == ["gemma3:12b"]
    assert await client.is_loaded("gemma3:12b")
    assert not await client.is_loaded("phi4")
    assert await client.pull("phi4:latest") == "success"
    pull_body = json.loads(pull.calls.last.request.content)
    assert pull_body["model"] == "phi4:latest" and pull_body["stream"] is True
    await client.warm("gemma3:12b")
    warm_body = json.loads(warm.calls.last.request.content)
    assert warm_body["prompt"] == "" and warm_body["keep_alive"] == "30m"
    assert await client.version() == "0.12.3"


async def test_unreachable_ollama_is_a_clear_retryable_error() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = OllamaClient(f"http://127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(OllamaError) as info:
        await client.chat_structured("gemma3:12b", StartupName, prompt="?")
    assert info.value.retryable and "unreachable" in str(info.value)
    with pytest.raises(OllamaError):
        await client.loaded_models()
    await client.close()


def test_same_model() -> None:
    assert same_model("phi4", "phi4:latest")
    assert not same_model("gemma3:12b", "gemma3:27b")


DIGEST = "sha256:" + "ab" * 32


@respx.mock
async def test_pull_follows_the_progress_stream(client: OllamaClient) -> None:
    route = respx.post(f"{HOST}/api/pull").respond(
        headers={"content-type": "application/x-ndjson"},
        content=_ndjson(
            {"status": "pulling manifest"},
            {"status": f"pulling {DIGEST[7:19]}", "digest": DIGEST, "total": 8_149_190_253, "completed": 0},
            {
                "status": f"pulling {DIGEST[7:19]}",
                "digest": DIGEST,
                "total": 8_149_190_253,
                "completed": 8_149_190_253,
            },
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ),
    )
    assert await client.pull("gemma3:12b") == "success"
    body = json.loads(route.calls.last.request.content)
    assert body["model"] == "gemma3:12b" and body["stream"] is True


@respx.mock
async def test_pull_error_in_the_stream_is_a_clear_error(client: OllamaClient) -> None:
    respx.post(f"{HOST}/api/pull").respond(
        content=_ndjson(
            {"status": "pulling manifest"},
            {"error": "pull model manifest: file does not exist"},
        )
    )
    with pytest.raises(OllamaError) as info:
        await client.pull("no-such-model:1b")
    assert str(info.value) == (
        "pull no-such-model:1b: Ollama reported an error while pulling: "
        "pull model manifest: file does not exist"
    )


@respx.mock
async def test_pull_stream_that_stops_before_success_is_an_error(client: OllamaClient) -> None:
    respx.post(f"{HOST}/api/pull").respond(
        content=_ndjson({"status": "pulling manifest"}, {"status": f"pulling {DIGEST[7:19]}"})
    )
    with pytest.raises(OllamaError, match="ended before success"):
        await client.pull("gemma3:12b")
    respx.post(f"{HOST}/api/pull").respond(content=b'{"status": "pulling manifest"}\n<html>proxy error')
    with pytest.raises(OllamaError, match="malformed progress"):
        await client.pull("gemma3:12b")


async def test_pull_longer_than_the_request_timeout_succeeds() -> None:
    """A real HTTP Ollama whose pull takes twice the client's timeout, with progress all along: a
    streamed pull only needs each progress line within the timeout (a big model's download)."""
    with OllamaStandin(models=[], pull_latency_s=2.0) as standin:
        client = OllamaClient(standin.url, timeout_s=1.0)  # a line every 0.5 s
        try:
            assert await client.pull("gemma3:12b") == "success"
            assert "gemma3:12b" in standin.installed
        finally:
            await client.close()
