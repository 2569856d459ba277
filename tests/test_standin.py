"""The Ollama stand-in, spoken to with the official ``ollama`` client over real loopback HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import ollama
import pytest
from pydantic import BaseModel

from gpuscale.dev.standin import OllamaStandin, parse_keep_alive
from gpuscale.queue import tasktypes
from gpuscale.queue.results import SlideDescription, SlideFeedback
from gpuscale.worker.ollama_client import OllamaClient

ANSWERS = [t.answer_model for t in tasktypes.all_types().values() if t.answer_model is not None]


@pytest.fixture
def standin() -> Iterator[OllamaStandin]:
    with OllamaStandin(models=["gemma3:12b", "phi4"], load_latency_s=0.05) as s:
        yield s


async def test_version_tags_show_say_what_it_is(standin: OllamaStandin) -> None:
    client = ollama.AsyncClient(host=standin.url)
    async with httpx.AsyncClient() as http:
        version = (await http.get(f"{standin.url}/api/version")).json()
        assert version["server"] == "Ollama stand-in" and version["version"].endswith("-standin")
        assert (await http.get(standin.url + "/")).text == "Ollama is running"
    names = sorted(m.model or "" for m in (await client.list()).models)
    assert names == ["gemma3:12b", "phi4:latest"]
    shown = await client.show("gemma3:12b")
    assert "stand-in" in (shown.modelfile or "")
    with pytest.raises(ollama.ResponseError) as info:
        await client.show("llava:13b")
    assert info.value.status_code == 404


async def test_structured_answers_validate_against_every_answer_model(standin: OllamaStandin) -> None:
    client = ollama.AsyncClient(host=standin.url)
    models: list[type[BaseModel]] = [
        SlideDescription,
        SlideFeedback,
        *(t.answer_model for t in tasktypes.all_types().values() if t.answer_model),
    ]
    for model in models:
        messages = [{"role": "user", "content": f"question for {model.__name__}"}]
        first = await client.chat(
            "gemma3:12b", messages=messages, format=model.model_json_schema(), stream=False
        )
        again = await client.chat(
            "gemma3:12b", messages=messages, format=model.model_json_schema(), stream=False
        )
        content = first.message.content or ""
        model.model_validate_json(content)  # fits the schema
        assert again.message.content == content  # same request, same answer
        assert first.done and (first.eval_count or 0) > 0


async def test_image_requests_are_described_by_size(standin: OllamaStandin) -> None:
    from pdfs import _picture

    wrapper = OllamaClient(standin.url)
    answer = await wrapper.chat_structured(
        "gemma3:12b",
        SlideDescription,
        prompt="Slide 3 of 9 of the pitch deck",
        images=[_picture(2, 320, 200)],
    )
    assert "320x200" in answer.description
    assert answer.title.startswith("Slide 3")
    await wrapper.close()


async def test_warm_ps_and_keep_alive(standin: OllamaStandin) -> None:
    client = OllamaClient(standin.url, keep_alive="5m")
    assert await client.loaded_models() == []
    await client.warm("gemma3:12b")
    assert await client.is_loaded("gemma3:12b")
    ps = (await ollama.AsyncClient(host=standin.url).ps()).models
    assert ps[0].expires_at is not None and ps[0].size_vram
    # keep_alive 0 unloads, as with the real server.
    await ollama.AsyncClient(host=standin.url).generate("gemma3:12b", prompt="", keep_alive=0)
    assert not await client.is_loaded("gemma3:12b")
    await client.close()


async def test_pull_and_delete(standin: OllamaStandin) -> None:
    client = ollama.AsyncClient(host=standin.url)
    steps = [p.status async for p in await client.pull("llava:13b", stream=True)]
    assert steps[0] == "pulling manifest" and steps[-1] == "success"
    assert "llava:13b" in [m.model for m in (await client.list()).models]
    assert (await client.pull("moondream", stream=False)).status == "success"
    await client.delete("llava:13b")
    with pytest.raises(ollama.ResponseError) as info:
        await client.delete("llava:13b")
    assert info.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as info:
        await client.chat("llava:13b", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404


async def test_bad_request_bodies(standin: OllamaStandin) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{standin.url}/api/chat", content=b"{not json")
        assert r.status_code == 400 and "invalid JSON" in r.json()["error"]
        r = await http.post(f"{standin.url}/api/chat", json={"model": "gemma3:12b", "messages": "hi"})
        assert r.status_code == 400
        # Streaming is the API's default: one NDJSON line with done=true.
        r = await http.post(f"{standin.url}/api/generate", json={"model": "phi4", "prompt": "Say hi"})
        lines = [json.loads(line) for line in r.text.splitlines()]
        assert lines[-1]["done"] is True and "stand-in" in lines[-1]["response"]
    assert standin.calls["/api/chat"] == 2 and standin.calls["/api/generate"] == 1


def test_keep_alive_parsing() -> None:
    assert parse_keep_alive("30m") == 1800
    assert parse_keep_alive("1h") == 3600
    assert parse_keep_alive(10) == 10
    assert parse_keep_alive("-1") == -1
    assert parse_keep_alive(None) == 300
    assert parse_keep_alive("junk") == 300


def test_runs_as_a_module_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpuscale.dev.standin",
            "--port",
            "0",
            "--latency",
            "0",
            "--models",
            "gemma3:12b",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = None
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"Ollama stand-in listening on (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url, "no listening line"
        assert httpx.get(f"{url}/api/tags").json()["models"][0]["name"] == "gemma3:12b"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
