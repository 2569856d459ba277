"""``gpuscale bench ollama`` against the Ollama stand-in serving like Ollama (one request at a time,
or N batched with a known curve), and the stand-in's serving mode itself."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from gpuscale.dev.standin import OllamaStandin
from gpuscale.queue.results import SlideDescription
from gpuscale.worker.bench_ollama import run_bench_ollama
from gpuscale.worker.ollama_client import OllamaClient


async def _burst(url: str, n: int) -> None:
    async with OllamaClient(url) as client:
        await asyncio.gather(
            *(client.chat_structured("gemma3:12b", SlideDescription, prompt="hi") for _ in range(n))
        )


async def test_standin_serves_num_parallel_at_a_time() -> None:
    with OllamaStandin(latency_s=0.05, num_parallel=1) as one:
        await _burst(one.url, 4)
        assert one.max_in_flight["gemma3:12b"] == 1
    with OllamaStandin(latency_s=0.05, num_parallel=2, batching=[1.0, 1.5]) as two:
        await _burst(two.url, 5)
        assert two.max_in_flight["gemma3:12b"] == 2
    with pytest.raises(ValueError, match="batching"):
        OllamaStandin(num_parallel=2, batching=[1.0])


async def test_bench_finds_one_at_a_time_serving_flat() -> None:
    with OllamaStandin(latency_s=0.4, num_parallel=1) as s:
        result = await run_bench_ollama(s.url, "gemma3:12b", pool="text", max_parallel=3, rounds=2)
    assert [lv.parallel for lv in result.levels] == [1, 2, 3]
    assert [lv.requests for lv in result.levels] == [2, 4, 6]
    # One request at a time: more in flight buys no throughput, only latency.
    assert all(0.7 < v < 1.3 for v in result.batching), result.batching
    assert result.levels[2].latency_max_s > result.levels[0].latency_max_s
    assert result.best_parallel == 1


def test_cli_prints_the_pools_lines_for_a_batching_server() -> None:
    with OllamaStandin(latency_s=0.4, num_parallel=2, batching=[1.0, 1.8]) as s:
        out = subprocess.run(
            [sys.executable, "-m", "gpuscale.cli", "bench", "ollama", "--model", "gemma3:12b",
             "--max-parallel", "3", "--host", s.url, "--pool", "visual", "--json"],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
    data = json.loads(out)
    assert [lv["parallel"] for lv in data["levels"]] == [1, 2, 3]
    # Two at once each take 0.2 × 2 / 1.8 s: 1.8× the throughput of one; a third only waits.
    assert 1.4 < data["batching"][1] < 2.2, data
    assert data["parallel"] == 2, data
    text = subprocess.run(
        [sys.executable, "-m", "gpuscale.cli", "bench", "ollama", "--model", "gemma3:12b",
         "--max-parallel", "2", "--host", "http://127.0.0.1:9", "--pool", "text"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert text.returncode == 2 and "ollama at http://127.0.0.1:9" in text.stderr


def test_cli_human_output_has_paste_lines() -> None:
    with OllamaStandin(latency_s=0.05, num_parallel=1) as s:
        out = subprocess.run(
            [sys.executable, "-m", "gpuscale.cli", "bench", "ollama", "--model", "gemma3:12b",
             "--max-parallel", "2", "--host", s.url, "--pool", "text"],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
    assert "requests/s" in out and "  parallel: " in out and "  batching: [" in out
