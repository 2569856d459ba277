"""Real ``gpuscale worker`` processes on the test's database: work done, SIGTERM drain, SIGKILL.

The bench pool (``noop`` tasks) needs no Ollama; the deck test runs a visual and a text worker
against the Ollama stand-in over real HTTP, through a whole deck's task graph.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from pdfs import make_deck

from gpuscale.dev.standin import OllamaStandin
from gpuscale.queue import NewTask, Queue, tasktypes
from gpuscale.queue.tasktypes import validate_result
from gpuscale.worker.handlers.templates import template_for

GPUSCALE = str(Path(sys.executable).with_name("gpuscale"))


class WorkerProc:
    """A ``gpuscale worker`` subprocess whose log goes to a file we can wait on."""

    def __init__(self, pool: str, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [GPUSCALE, "worker", "--pool", pool, "--port", "0", "--host", "127.0.0.1"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.port: int | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_log(self, pattern: str, timeout_s: float = 30.0) -> re.Match[str]:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            m = re.search(pattern, self.log())
            if m:
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.log()}")
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no {pattern!r} in worker log:\n{self.log()}")
            await asyncio.sleep(0.05)

    async def ready(self) -> None:
        m = await self.wait_log(r"ready: pool \w+, \d+ slot\(s\), model \S+, http port (\d+)")
        self.port = int(m.group(1))

    async def wait_exit(self, timeout_s: float = 30.0) -> int:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.proc.poll() is None:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"worker did not exit:\n{self.log()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def workers(db_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    started: list[WorkerProc] = []

    def start(pool: str, **env: str) -> WorkerProc:
        full = {
            **db_env,
            "GPUSCALE_HEARTBEAT_INTERVAL_S": "0.5",
            "GPUSCALE_POLL_INTERVAL_S": "0.5",
            "GPUSCALE_CONTAINER_ID": f"ctr-{pool}-{len(started)}",
            "GPUSCALE_LOG_LEVEL": "INFO",
            **env,
        }
        w = WorkerProc(pool, full, tmp_path / f"worker-{len(started)}.log")
        started.append(w)
        return w

    try:
        yield start
    finally:
        for w in started:
            w.stop()


async def _wait(predicate: Any, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)


async def _statuses(db: asyncpg.Pool) -> dict[int, str]:
    return {r["id"]: r["status"] for r in await db.fetch("SELECT id, status::text FROM processing_queue")}


async def test_bench_worker_runs_tasks_and_serves_health(db: asyncpg.Pool, workers: Any) -> None:
    queue = Queue(db)
    ids = await queue.enqueue_many([NewTask("noop", {"sleep_s": 0.1}) for _ in range(12)])
    w = workers("bench")
    await w.ready()

    async def all_done() -> bool:
        return set((await _statuses(db)).values()) == {"done"}

    await _wait(all_done)
    async with httpx.AsyncClient() as client:
        health = (await client.get(f"http://127.0.0.1:{w.port}/api/health")).json()
        text = (await client.get(f"http://127.0.0.1:{w.port}/metrics")).text
    assert health["status"] == "ready" and health["pool"] == "bench"
    m = re.search(r'gpuscale_worker_tasks_total\{outcome="done",pool="bench",task_type="noop"\} (\S+)', text)
    assert m and float(m.group(1)) == len(ids)
    [server] = await queue.list_servers("bench")
    assert server.container_id == "ctr-bench-0" and server.status == "active"
    w.proc.send_signal(signal.SIGTERM)
    assert await w.wait_exit() == 0
    assert await queue.list_servers(include_dead=True) == []


async def test_sigterm_drains_finishes_short_and_hands_back_long(db: asyncpg.Pool, workers: Any) -> None:
    queue = Queue(db)
    short, long_ = await queue.enqueue_many(
        [NewTask("noop", {"sleep_s": 1.0}), NewTask("noop", {"sleep_s": 120})]
    )
    w = workers("bench", GPUSCALE_DRAIN_GRACE_S="3", GPUSCALE_WORKER_CONCURRENCY="2")
    await w.ready()

    async def both_running() -> bool:
        return set((await _statuses(db)).values()) == {"running"}

    await _wait(both_running)
    w.proc.send_signal(signal.SIGTERM)
    await w.wait_log(r"draining: 2 task\(s\) running")
    # While draining the server row says so, and the health check is not ready.
    servers = await queue.list_servers("bench")
    assert [s.status for s in servers] == ["draining"]
    assert await w.wait_exit() == 0
    rows = {r["id"]: r for r in await db.fetch("SELECT id, status::text, attempts FROM processing_queue")}
    assert rows[short]["status"] == "done"
    assert rows[long_]["status"] == "queued" and rows[long_]["attempts"] == 0
    assert await queue.list_servers(include_dead=True) == []
    assert "handing back 1 task(s)" in w.log()


async def test_sigkill_loses_nothing_leases_expire(db: asyncpg.Pool, workers: Any) -> None:
    queue = Queue(db)
    [tid] = await queue.enqueue_many([NewTask("noop", {"sleep_s": 2.0})])
    w = workers("bench", GPUSCALE_LEASE_SECONDS="1.5")
    await w.ready()

    async def running() -> bool:
        return (await _statuses(db))[tid] == "running"

    await _wait(running)
    w.proc.kill()
    await w.wait_exit()
    await asyncio.sleep(2.0)  # the lease (1.5 s) runs out: nobody extends it any more
    assert await queue.reap_expired() == 1
    row = await db.fetchrow("SELECT status::text, error FROM processing_queue WHERE id = $1", tid)
    assert row["status"] == "queued" and "lease expired" in row["error"]
    # Another worker picks it up and finishes it.
    w2 = workers("bench")
    await w2.ready()

    async def done() -> bool:
        return (await _statuses(db))[tid] == "done"

    await _wait(done)


def test_bad_pool_exits_2(db_env: dict[str, str]) -> None:
    r = subprocess.run(
        [GPUSCALE, "worker", "--pool", "gpu"], env=db_env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "unknown pool 'gpu'" in r.stderr


# The five extractions: the text types that wait for the visual analysis.
DECK_TEXT_TYPES = [
    t.name for t in tasktypes.deck_order() if t.pool == "text" and t.after == ("visual_analysis",)
]


async def test_a_whole_deck_through_visual_and_text_workers(
    db: asyncpg.Pool, workers: Any, tmp_path: Path
) -> None:
    deck = tmp_path / "acme.pdf"
    make_deck(deck, pages=5)
    doc = {"document": deck.name}  # relative to the workers' GPUSCALE_DOCUMENT_ROOT
    tasks = [
        NewTask("visual_analysis", {**doc, "first_page": 1, "last_page": 3}, document_id="acme"),  # 0
        NewTask("visual_analysis", {**doc, "first_page": 4, "last_page": 6}, document_id="acme"),  # 1
        NewTask("slide_feedback", doc, document_id="acme"),  # 2
        *[NewTask(t, doc, document_id="acme") for t in DECK_TEXT_TYPES],  # 3..7
        NewTask("template_analysis", doc, document_id="acme"),  # 8
        *[
            NewTask(t, doc, document_id="acme")
            for t in ("specialized_clinical", "specialized_regulatory", "specialized_science")
        ],  # 9..11
    ]
    after = [[], [], [0, 1], *[[0, 1]] * 5, [5], [8], [8], [8]]
    queue = Queue(db)
    ids = await queue.enqueue_graph(tasks, after)
    with OllamaStandin(models=["gemma3:12b"], latency_s=0.02, load_latency_s=0.2) as standin:
        env = {"OLLAMA_HOST": standin.url, "GPUSCALE_PDF_DPI": "40", "GPUSCALE_DOCUMENT_ROOT": str(tmp_path)}
        visual = workers("visual", **env)
        text = workers("text", **env)
        await visual.ready()
        await text.ready()

        async def finished() -> bool:
            return all(s in ("done", "failed", "dead") for s in (await _statuses(db)).values())

        await _wait(finished, timeout_s=60)
        visual.proc.send_signal(signal.SIGTERM)
        text.proc.send_signal(signal.SIGTERM)
        assert await visual.wait_exit() == 0 and await text.wait_exit() == 0
    rows = {
        r["id"]: r
        for r in await db.fetch("SELECT id, task_type, status::text, result, error FROM processing_queue")
    }
    for tid in ids:
        row = rows[tid]
        assert row["status"] == "done", (row["task_type"], row["error"])
        validate_result(row["task_type"], row["result"])
    batch1, batch2 = (rows[i]["result"] for i in ids[:2])
    assert [p["page"] for p in batch1["pages"]] == [1, 2, 3]
    assert [p["page"] for p in batch2["pages"]] == [4, 5] and batch2["page_count"] == 5
    feedback = rows[ids[2]]["result"]
    assert [s["page"] for s in feedback["slides"]] == [1, 2, 3, 4, 5]
    classification = rows[ids[5]]["result"]
    template = rows[ids[8]]["result"]
    assert template["meta"]["sector"] == classification["sector"]
    assert (
        template["meta"]["template"]
        == template_for(classification["sector"], classification["is_healthcare"]).name
    )
    for i in ids[9:]:
        assert rows[i]["result"]["meta"]["template"] == template["meta"]["template"]
    # Every text task read all five slides.
    assert all(rows[i]["result"]["meta"]["pages"] == 5 for i in ids[3:])
    assert standin.calls["/api/chat"] >= 5 + 5 + 9


def test_gpuscale_worker_help() -> None:
    r = subprocess.run(
        [GPUSCALE, "worker", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert r.returncode == 0 and "--pool" in r.stdout
