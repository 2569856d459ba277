"""End to end: kill -9 random workers while a few hundred tasks run; nothing is lost or done twice.

Real pieces only: the test's PostgreSQL, the DataCrunch emulator (``gpuscale emulator``) whose
replicas are real ``gpuscale worker --pool bench`` processes, and ``gpuscale controller`` with the
``datacrunch`` provider pointed at the emulator.  The test enqueues no-op tasks, SIGKILLs a random
running replica every second or so while they run (the emulator replaces crashed replicas, as the
cloud restarts a container), and checks:

- every task ends ``done`` (none ``dead``/``failed``; attempts are generous on purpose: a task
  may be caught in several kills);
- none is completed twice: a trigger installed by the test records every status change into or
  out of ``done``; each task enters ``done`` exactly once and never leaves it, and its result is
  written once;
- the pool returns to 0 replicas, nothing is left running, and no secret shows in any log.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest
import yaml

from controller import deployspec
from controller.demo.procs import ProcessSet, free_port, gpuscale_cmd, wait_http
from controller.demo.run import RUN_MARKER, kill_leftovers
from controller.queue import NewTask, Priority, Queue

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent
TASKS = 300
CLIENT_SECRET = "e2e-client-secret-0c1f9a77"
WORKER_TOKEN = "e2e-worker-token-5d2b8e10"

POOLS = """
bench_scaling:
  min_replicas: 0
  max_replicas: 4
  scale_up_threshold: 1
  scale_up_delay: 1s
  scale_down_delay: 5s
  startup_timeout: 30s
  tasks_per_replica: 4
  deployment: e2e-bench
  cold_start: 2s
  default_task_duration: 0.5s
  drain_target: 5s
  startup_backoff: 2s
  max_startup_backoff: 10s
visual_container_scaling:
  min_replicas: 0
  max_replicas: 1
  deployment: e2e-visual
text_container_scaling:
  min_replicas: 0
  max_replicas: 1
  deployment: e2e-text
reconcile_interval: 1s
"""

AUDIT_SQL = """
CREATE TABLE e2e_done_audit (
    task_id bigint NOT NULL,
    old_status text NOT NULL,
    new_status text NOT NULL,
    old_result jsonb,
    new_result jsonb,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION e2e_done_audit_fn() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status::text = 'done' OR OLD.status::text = 'done' THEN
        INSERT INTO e2e_done_audit (task_id, old_status, new_status, old_result, new_result)
        VALUES (NEW.id, OLD.status::text, NEW.status::text, OLD.result, NEW.result);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER e2e_done_audit AFTER UPDATE ON processing_queue
    FOR EACH ROW EXECUTE FUNCTION e2e_done_audit_fn();
"""


def _spec(pool: str, name: str, concurrency: int) -> dict:
    spec = deployspec.load_file(ROOT / "deploy" / "datacrunch" / "visual.yaml")
    spec["name"] = name
    env = [
        e for e in spec["containers"][0]["env"] if e["name"] not in ("GPUSCALE_POOL", "GPUSCALE_LOG_FORMAT")
    ]
    env += [
        {"name": "GPUSCALE_POOL", "value_or_reference_to_secret": pool, "type": "plain"},
        {
            "name": "GPUSCALE_WORKER_CONCURRENCY",
            "value_or_reference_to_secret": str(concurrency),
            "type": "plain",
        },
    ]
    spec["containers"][0]["env"] = env
    return spec


async def _replicas(http: httpx.AsyncClient, emulator: str, deployment: str) -> list[dict]:
    state = (await http.get(f"{emulator}/_emulator/state")).json()
    return list(state["deployments"].get(deployment, {}).get("replicas", []))


async def test_kill_9_random_workers_nothing_lost_nothing_twice(dsn: str, tmp_path: Path) -> None:
    run_id = uuid.uuid4().hex[:12]
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(AUDIT_SQL)
    finally:
        await conn.close()

    pools_file = tmp_path / "pools.yaml"
    pools_file.write_text(POOLS)
    spec_files = []
    for pool, name, conc in (("bench", "e2e-bench", 4), ("visual", "e2e-visual", 1), ("text", "e2e-text", 1)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_spec(pool, name, conc), sort_keys=False))
        spec_files.append(path)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUSCALE_", "DATACRUNCH_"))}
    env.update(
        {
            RUN_MARKER: run_id,
            "GPUSCALE_DATABASE_URL": dsn,
            "GPUSCALE_WORKER_TOKEN": WORKER_TOKEN,
            "GPUSCALE_WORKER_HOST": "127.0.0.1",
            "GPUSCALE_WORKER_PORT": "0",
            # Short leases and heartbeats, so killed workers' tasks come back within seconds.
            "GPUSCALE_LEASE_SECONDS": "3",
            "GPUSCALE_HEARTBEAT_INTERVAL_S": "0.5",
            "GPUSCALE_POLL_INTERVAL_S": "0.5",
            "GPUSCALE_DRAIN_GRACE_S": "5",
            "PYTHONUNBUFFERED": "1",
        }
    )
    emu_port, http_port = free_port(), free_port()
    emulator = f"http://127.0.0.1:{emu_port}"
    provider_env = {
        "DATACRUNCH_BASE_URL": f"{emulator}/v1",
        "DATACRUNCH_CLIENT_ID": "e2e",
        "DATACRUNCH_CLIENT_SECRET": CLIENT_SECRET,
    }
    log_dir = tmp_path / "logs"
    procs = ProcessSet(log_dir, env)
    http = httpx.AsyncClient(timeout=5.0)
    kills: list[str] = []
    started = time.monotonic()
    try:
        emu = procs.start(
            "emulator",
            gpuscale_cmd("emulator", "--port", str(emu_port), "--cold-start", "1", "--grace", "8",
                         "--log-dir", str(log_dir / "replicas")),
            env={"GPUSCALE_EMULATOR_CLIENT_ID": "e2e", "GPUSCALE_EMULATOR_CLIENT_SECRET": CLIENT_SECRET},
        )  # fmt: skip
        await asyncio.to_thread(wait_http, f"{emulator}/_emulator/state", emu, timeout=30)
        procs.env.update(provider_env)
        await asyncio.to_thread(
            procs.run, "deploy-apply", gpuscale_cmd("deploy", "apply", *map(str, spec_files))
        )
        ctl = procs.start(
            "controller",
            gpuscale_cmd("controller", "--http-port", str(http_port)),
            env={
                "GPUSCALE_POOLS_FILE": str(pools_file),
                "GPUSCALE_PROVIDER": "datacrunch",
                "GPUSCALE_HEARTBEAT_TIMEOUT_S": "3",
                "GPUSCALE_REAPER_INTERVAL_S": "1",
            },
        )
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{http_port}/readyz", ctl, timeout=60)

        db = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        assert db is not None
        try:
            queue = Queue(db)
            rnd = random.Random(7)
            tasks = [
                NewTask(
                    "noop",
                    {"sleep_s": round(rnd.uniform(0.2, 1.2), 2)},
                    priority=Priority.high if i % 10 == 0 else Priority.normal,
                    max_attempts=25,  # a task may be caught in several kills; it must still finish
                )
                for i in range(TASKS)
            ]
            ids = await queue.enqueue_many(tasks)

            # Chaos while work remains: SIGKILL a random running replica about every second.
            deadline = time.monotonic() + 200
            while time.monotonic() < deadline:
                left = await db.fetchval(
                    "SELECT count(*) FROM processing_queue WHERE id = ANY($1::bigint[])"
                    " AND status NOT IN ('done', 'failed', 'dead', 'cancelled')",
                    ids,
                )
                if left == 0:
                    break
                for bad in procs.dead():
                    raise AssertionError(f"{bad.name} died:\n{bad.log_tail()}")
                running = [
                    r for r in await _replicas(http, emulator, "e2e-bench") if r["status"] == "running"
                ]
                if running and left > 20 and len(kills) < 12:
                    victim = rnd.choice(running)
                    try:
                        os.kill(int(victim["pid"]), signal.SIGKILL)
                        kills.append(victim["id"])
                    except ProcessLookupError:
                        pass
                await asyncio.sleep(1.0)
            work_s = time.monotonic() - started

            # The pool returns to zero once the work is done.
            for _ in range(120):
                if not await _replicas(http, emulator, "e2e-bench"):
                    break
                await asyncio.sleep(0.5)
            replicas_left = await _replicas(http, emulator, "e2e-bench")
            rows = await db.fetch(
                "SELECT id, status::text AS status, attempts, result FROM processing_queue"
                " WHERE id = ANY($1::bigint[])",
                ids,
            )
            audit = await db.fetch("SELECT task_id, old_status, new_status, new_result FROM e2e_done_audit")
        finally:
            await db.close()
    finally:
        await http.aclose()
        procs.stop_all()
        leftovers = kill_leftovers(run_id)

    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    attempts = sum(r["attempts"] for r in rows)
    print(
        f"{TASKS} tasks, {len(kills)} workers killed, statuses {statuses}, {attempts} attempts, "
        f"work {work_s:.1f}s, total {time.monotonic() - started:.1f}s"
    )
    assert len(kills) >= 3, "the chaos did not get to kill workers; the test proved nothing"
    assert statuses == {"done": TASKS}
    assert attempts > TASKS, "no task was interrupted by a kill"

    entered = [a["task_id"] for a in audit if a["new_status"] == "done" and a["old_status"] != "done"]
    assert sorted(entered) == sorted(ids), "a task entered 'done' more than once (or never)"
    touched = [a for a in audit if a["old_status"] == "done"]
    assert touched == [], f"a done task was updated again: {touched[:3]}"
    assert all(json.loads(r["result"]) if isinstance(r["result"], str) else r["result"] for r in rows)

    assert replicas_left == [], f"replicas still running after the work: {replicas_left}"
    assert leftovers == [], f"processes left running after the stop: {leftovers}"
    logs = [p.read_text(errors="replace") for p in log_dir.rglob("*.log")]
    for secret in (CLIENT_SECRET, WORKER_TOKEN):
        assert not any(secret in text for text in logs), "a secret leaked into a log"
