"""The compact task history and ``gpuscale trace export`` (issue 12), on the real test database:
completions write history in the same statement, retention of done tasks leaves it, and the export
is a trace the simulator replays."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import asyncpg

from gpuscale.controller.pools import load_pools
from gpuscale.controller.simulate import read_trace, simulate
from gpuscale.queue import NewTask, Queue

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "deploy/datacrunch/pools.yaml"


def gpuscale(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpuscale.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


async def _finish(q: Queue, db: asyncpg.Pool, pool: str, n: int, took_s: float) -> list[int]:
    """Claim ``n`` tasks of ``pool`` and complete them as if each had run ``took_s`` seconds."""
    claimed = await q.claim(pool, "w1", n)
    assert len(claimed) == n
    ids = [t.id for t in claimed]
    # The measured service time is claim → done; move the claim back instead of sleeping.
    await db.execute(
        "UPDATE processing_queue SET started_at = now() - make_interval(secs => $2) WHERE id = ANY($1)",
        ids,
        took_s,
    )
    done = await q.complete_many("w1", [(i, {"ok": True}) for i in ids])
    assert sorted(done) == sorted(ids)
    return ids


async def test_history_outlives_retention_and_exports_a_trace(
    db: asyncpg.Pool, db_env: dict[str, str], tmp_path: Path
) -> None:
    q = Queue(db)
    doc = {"document": "/decks/a.pdf"}
    tasks = [
        NewTask("visual_analysis", {**doc, "first_page": 1, "last_page": 8}, priority="high"),
        NewTask("visual_analysis", {**doc, "first_page": 9, "last_page": 12}, priority="high"),
        NewTask("slide_feedback", doc, priority="high"),
        NewTask("healthcare_classification", doc, priority="high"),
        NewTask("template_analysis", doc, priority="high"),
        NewTask("specialized_science", doc, priority="high"),
    ]
    ids = await q.enqueue_graph(tasks, [[], [], [0, 1], [0, 1], [3], [4]])
    lost = await q.enqueue(NewTask("deck_date_extraction", doc))

    await _finish(q, db, "visual", 2, 200.0)
    # A completion by a server that no longer holds the task writes nothing.
    assert await q.complete(ids[2], "someone-else", {}) is False
    await _finish(q, db, "visual", 1, 60.0)
    claimed = await q.claim("text", "w1", 2)
    healthcare = next(t for t in claimed if t.id == ids[3])
    other = next(t for t in claimed if t.id == lost)
    assert await q.fail(other.id, "w1", "bad input", retryable=False) == "failed"
    await db.execute(
        "UPDATE processing_queue SET started_at = now() - interval '40 s' WHERE id = $1", healthcare.id
    )
    assert await q.complete(healthcare.id, "w1", {})
    await _finish(q, db, "text", 1, 70.0)
    await _finish(q, db, "text", 1, 150.0)

    # Retention deletes every done task; the history stays.
    assert await q.purge_done(older_than_s=0) == 6
    history = await q.history_since(await db.fetchval("SELECT now() - interval '1 day'"))
    assert sorted(r["id"] for r in history) == sorted(ids)  # the failed task is not history

    out = tmp_path / "recent.csv"
    proc = await asyncio.to_thread(gpuscale, db_env, "trace", "export", "--since", "30d", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "wrote 6 tasks" in proc.stdout
    trace = read_trace(out)
    by_type = {t.task_type: t for t in trace}
    assert {t.task_id for t in trace} == {f"t{i}" for i in ids}
    assert [t.service_s for t in trace if t.task_type == "visual_analysis"] == [200.0, 200.0]
    assert abs(by_type["slide_feedback"].service_s - 60) < 5
    assert abs(by_type["specialized_science"].service_s - 150) < 5
    assert by_type["template_analysis"].depends_on == (f"t{ids[3]}",)
    assert set(by_type["slide_feedback"].depends_on) == {f"t{ids[0]}", f"t{ids[1]}"}
    assert {t.priority for t in trace} == {"high"}
    assert len({t.arrival_s for t in trace}) == 1  # one graph, submitted at once
    result = simulate(trace, load_pools(SHIPPED))
    assert result.unfinished == 0 and result.decks == 1

    # Without --out the trace goes to stdout.
    proc = await asyncio.to_thread(gpuscale, db_env, "trace", "export", "--since", "2h")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("arrival_s,task_id") and len(proc.stdout.splitlines()) == 7

    # History has its own (longer) retention.
    assert await q.purge_history(older_than_s=3600) == 0
    assert await q.purge_history(older_than_s=0) == 6


async def test_export_bad_since_exits_2_and_writes_nothing(db_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "x.csv"
    for since in ("soon", "-3d", "0"):
        args = ("trace", "export", "--since", since, "--out", str(out))
        proc = await asyncio.to_thread(gpuscale, db_env, *args)
        assert proc.returncode == 2, (since, proc.stderr)
        assert "--since" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()
