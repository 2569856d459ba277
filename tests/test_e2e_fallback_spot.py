"""End to end: fallback deployments and spot replicas on the emulator, decks read from the share.

Real processes: the emulator (replicas are ``gpuscale worker`` processes), a ``gpuscale controller``
with the ``datacrunch`` provider, the Ollama stand-in.  The visual pool prefers a spot deployment
and falls back to an on-demand one:

1. Spot is sold out (emulator fault ``quota=e2e-visual-spot``): the preferred deployment answers
   ``quota_reached`` and the pool runs on the fallback.  Decks are submitted with ``gpuscale
   submit-deck`` from a folder of their own, into the shared filesystem's uploads; the replicas
   read them through their own mount of it.
2. Spot capacity comes back: after the cool-off the replicas move back to the preferred
   deployment (the fallback's idle replicas go first, busy ones finish their task).  A backlog
   keeps both fallback replicas busy when the cool-off ends, so one of them makes room for the
   spot probe, which runs a task while the backlog lasts (issue 13's flake: without that the
   probe only came once the backlog was over, and mostly found nothing left to run).
3. A spot replica is preempted while it holds a task (``preempt=next:1``: SIGKILL, gone from the
   list): the controller hands the task back to the queue without spending an attempt.

Every task ends ``done`` exactly once.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from e2e_stack import Stack
from pdfs import make_deck

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

SPOT, ONDEMAND = "e2e-visual-spot", "e2e-visual"
GPUSCALE = str(Path(sys.executable).with_name("gpuscale"))

POOLS = """
visual_container_scaling:
  min_replicas: 0
  max_replicas: 2
  scale_up_threshold: 1
  scale_up_delay: 1s
  scale_down_delay: 6s
  startup_timeout: 40s
  tasks_per_replica: 1
  cold_start: 2s
  default_task_duration: 4s
  drain_target: 5s
  deployments:
    - {name: e2e-visual-spot, spot: true, price_per_hour: 0.87}
    - {name: e2e-visual, price_per_hour: 1.75}
  fallback_cooloff: 5s
  # Kept short: after capacity returns, the spot probe must come up while the fallback still has
  # work, or the decks all finish on demand and there is nothing left to run on spot.
  max_fallback_cooloff: 8s
  preemption_limit: 3
text_container_scaling:
  min_replicas: 0
  max_replicas: 2
  scale_up_threshold: 1
  scale_up_delay: 1s
  scale_down_delay: 6s
  startup_timeout: 40s
  tasks_per_replica: 2
  cold_start: 2s
  default_task_duration: 2s
  drain_target: 10s
  deployment: e2e-text
reconcile_interval: 1s
"""

DEPLOYMENTS = (("visual", SPOT, 1, True), ("visual", ONDEMAND, 1, False), ("text", "e2e-text", 2, False))


async def submit(stack: Stack, folder: Path, pages: int, *names: str) -> None:
    """``gpuscale submit-deck`` run from a folder of its own, into the shared uploads, one deck
    of ``pages`` per name, side by side (each is a CLI process start)."""
    await asyncio.gather(*(asyncio.to_thread(_submit_deck, stack, folder, name, pages) for name in names))


def _submit_deck(stack: Stack, folder: Path, name: str, pages: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    make_deck(folder / name, pages=pages)  # fpdf and PIL, no shared state between threads
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUSCALE_", "DATACRUNCH_"))}
    env.update(
        GPUSCALE_DATABASE_URL=stack.dsn,
        GPUSCALE_DOCUMENT_ROOT=str(stack.document_root),
        GPUSCALE_DECK_BATCH_PAGES="2",
    )
    r = subprocess.run(
        [GPUSCALE, "submit-deck", name], cwd=folder, env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    (folder / name).unlink()  # only the copy on the shared filesystem is left to read


async def faults(stack: Stack, body: dict[str, Any]) -> None:
    resp = await stack.http.post(f"{stack.emulator}/_emulator/faults", json=body)
    assert resp.status_code == 200, resp.text


async def running_on(stack: Stack, deployment: str) -> list[int]:
    """Tasks running right now on a registered worker of a replica of ``deployment``."""
    assert stack.db is not None
    rows = await stack.db.fetch(
        """SELECT t.id FROM processing_queue t JOIN processing_servers s ON s.id = t.lease_owner
            WHERE t.status = 'running' AND s.container_id LIKE $1""",
        f"{deployment}-%",
    )
    return [r["id"] for r in rows]


async def spot_tasks(stack: Stack) -> list[int]:
    return await running_on(stack, SPOT)


async def test_fallback_on_quota_spot_preemption_and_the_way_back(dsn: str, tmp_path: Path) -> None:
    stack = Stack(
        dsn,
        tmp_path,
        pools_yaml=POOLS,
        deployments=DEPLOYMENTS,
        standin_models=["gemma3:12b"],
        standin_latency_s=1.5,
    )
    stack.env["GPUSCALE_PDF_DPI"] = "40"
    # Leases and the heartbeat timeout longer than a controller tick: the preempted replica's task
    # must come back through the controller (no attempt spent), not through the reaper.
    stack.env["GPUSCALE_LEASE_SECONDS"] = "10"
    stack.controller_env["GPUSCALE_HEARTBEAT_TIMEOUT_S"] = "10"
    samples: list[dict[str, Any]] = []
    phase = "quota"
    preempted: list[int] = []
    backlog_at_spot: int | None = None  # visual tasks still queued when spot first ran one

    async def sample() -> dict[str, Any]:
        counts = {
            d: len([r for r in await stack.replicas(d) if r["status"] != "stopping"])
            for d in (SPOT, ONDEMAND)
        }
        pools = await stack.get_json(stack.controller_urls["controller-1"] + "/api/pools")
        visual = next((p for p in (pools or {}).get("pools", []) if p["name"] == "visual"), {})
        row = {"phase": phase, "home": visual.get("home"), **counts}
        samples.append(row)
        return row

    async def until(what: str, check: Any, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            stack.check_alive()
            await sample()
            if await check():
                return
            await asyncio.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}; last samples {samples[-5:]}")

    try:
        await stack.start()
        assert stack.db is not None
        await faults(stack, {"quota": SPOT})  # spot H100s are sold out
        await submit(stack, tmp_path / "laptop", 6, "first.pdf")

        # 1. The preferred deployment answers quota_reached; the pool runs on the fallback.
        async def fallback_done() -> bool:
            assert stack.db is not None
            n = await stack.db.fetchval(
                "SELECT count(*) FROM processing_queue"
                " WHERE task_type = 'visual_analysis' AND status = 'done'"
            )
            return bool(n) and samples[-1]["home"] == ONDEMAND

        await until("a visual task done on the fallback", fallback_done)
        # More decks while spot is still sold out: a backlog that keeps both fallback replicas busy
        # at every tick (a worker claims its next task the moment it finishes one), so none goes
        # idle to make room for the spot probe when capacity returns (issue 13: the probe came
        # only when the backlog was over, and found nothing left to run).
        await submit(stack, tmp_path / "elsewhere", 12, "second.pdf", "third.pdf", "fourth.pdf")

        async def fallback_full() -> bool:
            return len(await running_on(stack, ONDEMAND)) == 2

        await until("both fallback replicas busy", fallback_full)
        quota_rows = [s for s in samples if s["phase"] == "quota"]
        assert all(s[SPOT] == 0 for s in quota_rows), quota_rows
        assert any(s[ONDEMAND] > 0 for s in quota_rows)

        # 2. Capacity is back: more decks; after the cool-off the replicas move back to spot.
        phase = "recovered"
        await faults(stack, {"quota": None})

        async def on_spot() -> bool:
            nonlocal backlog_at_spot
            if not await spot_tasks(stack):
                return False
            assert stack.db is not None
            backlog_at_spot = await stack.db.fetchval(
                "SELECT count(*) FROM processing_queue WHERE pool = 'visual' AND status = 'queued'"
            )
            return True

        await until("a spot replica running a task", on_spot)
        assert samples[-1]["home"] == SPOT

        # 3. Preempted mid-task.
        phase = "preempted"
        preempted = await spot_tasks(stack)
        await faults(stack, {"preempt": "next:1"})

        async def finished() -> bool:
            assert stack.db is not None
            left = await stack.db.fetchval(
                "SELECT count(*) FROM processing_queue"
                " WHERE status NOT IN ('done', 'failed', 'dead', 'cancelled')"
            )
            return left == 0

        await until("every task finished", finished, timeout_s=240)
        phase = "drained"

        async def visual_gone() -> bool:
            row = samples[-1]
            return row[SPOT] == 0 and row[ONDEMAND] == 0

        await until("the visual pool back at zero", visual_gone, timeout_s=60)
        ids = [r["id"] for r in await stack.db.fetch("SELECT id FROM processing_queue")]
        outcome = await stack.outcome(ids)
        attempts = {
            r["id"]: r["attempts"]
            for r in await stack.db.fetch(
                "SELECT id, attempts FROM processing_queue WHERE id = ANY($1)", preempted
            )
        }
        emu = await stack.emulator_state()
        preemptions = await stack.metric("controller-1", "gpuscale_replica_preemptions_total")
        events = (
            await stack.get_json(stack.controller_urls["controller-1"] + "/api/events?pool=visual&limit=500")
        )["events"]
    finally:
        leftovers = await stack.stop()

    print(f"{len(ids)} tasks; preempted task attempts {attempts}; samples {len(samples)}")
    # Every task done exactly once, decks read from the shared filesystem by the replicas.
    assert outcome.statuses == {"done": len(ids)}, outcome.statuses
    assert sorted(outcome.entered_done) == sorted(ids) and outcome.touched_after_done == []
    # The spot replica really was preempted mid-task, and the controller saw it vanish.
    assert emu is not None and emu["preempted"], emu
    assert preempted, "no task was running on the preempted spot replica"
    assert sum(v for labels, v in preemptions if labels.get("deployment") == SPOT) >= 1
    # Its task went back without spending an attempt: one attempt for the run that finished it.
    assert all(n == 1 for n in attempts.values()), attempts
    # The decision log says where replicas ran and why.
    details = " | ".join(e["detail"] for e in events)
    assert f"{SPOT} failed (quota_reached)" in details
    assert f"placed: {SPOT} 0 (cooling off" in details
    # The way back came under load: the probe took a busy fallback replica's place and ran a task
    # while the backlog lasted, not once the fallback's replicas had nothing left to do.
    assert backlog_at_spot, backlog_at_spot
    # Back on the preferred deployment after it recovered: spot replicas and none on demand.
    back = [
        s for s in samples if s["phase"] != "quota" and s["home"] == SPOT and s[SPOT] > 0 and s[ONDEMAND] == 0
    ]
    assert back, samples[-20:]
    assert leftovers == []
