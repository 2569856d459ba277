"""The queue commands as a user runs them: real ``gpuscale`` subprocesses on this test's database."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import asyncpg
from fpdf import FPDF


def gpuscale(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpuscale.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


async def count(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM processing_queue"))
    finally:
        await conn.close()


async def test_migrate_enqueue_and_refusals(db_env: dict[str, str], dsn: str) -> None:
    r = gpuscale(db_env, "db", "migrate")
    assert r.returncode == 0 and "up to date" in r.stdout

    r = gpuscale(db_env, "enqueue", "startup_name_extraction", "--payload", '{"document": "/d.pdf"}')
    assert r.returncode == 0, r.stderr
    first = int(r.stdout.strip())
    r = gpuscale(
        db_env,
        "enqueue",
        "template_analysis",
        "--payload",
        '{"document": "/d.pdf"}',
        "--priority",
        "critical",
        "--depends-on",
        str(first),
    )
    assert r.returncode == 0, r.stderr
    second = int(r.stdout.strip())
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            """SELECT status::text, priority::text,
                      ARRAY(SELECT depends_on FROM processing_task_deps WHERE task_id = id) AS depends_on
                 FROM processing_queue WHERE id = $1""",
            second,
        )
    finally:
        await conn.close()
    assert row is not None and (row["status"], row["priority"], list(row["depends_on"])) == (
        "blocked",
        "critical",
        [first],
    )

    refusals = [
        (("enqueue", "nope", "--payload", "{}"), "unknown task type 'nope'"),
        (("enqueue", "startup_name_extraction", "--payload", "{not json"), "not valid JSON"),
        (("enqueue", "startup_name_extraction", "--payload", "{}"), "document: Field required"),
        (
            ("enqueue", "startup_name_extraction", "--payload", '{"document": "x"}', "--priority", "asap"),
            "priority",
        ),
        (
            ("enqueue", "startup_name_extraction", "--payload", '{"document": "x"}', "--depends-on", "99999"),
            "not found",
        ),
    ]
    for args, words in refusals:
        r = gpuscale(db_env, *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert words in r.stderr and "Traceback" not in r.stderr
    assert await count(dsn) == 2


async def test_submit_deck_and_status(db_env: dict[str, str], dsn: str, tmp_path: Path) -> None:
    pdf = FPDF()
    for _ in range(10):
        pdf.add_page()
    pdf.output(str(tmp_path / "deck.pdf"))
    root = tmp_path / "shared" / "uploads"
    db_env = {**db_env, "GPUSCALE_DOCUMENT_ROOT": str(root)}
    r = gpuscale(db_env, "submit-deck", "deck.pdf", "--batch-pages", "4", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    sub = json.loads(r.stdout)
    assert (
        sub["pages"] == 10 and (root / sub["document"]).read_bytes() == (tmp_path / "deck.pdf").read_bytes()
    )
    assert len(sub["task_ids"]["visual_analysis"]) == 3
    assert await count(dsn) == 3 + 1 + 5 + 1 + 3

    (tmp_path / "notes.pdf").write_text("just some text\n")
    r = gpuscale(db_env, "submit-deck", str(tmp_path / "notes.pdf"))
    assert r.returncode == 2 and "not a PDF" in r.stderr
    r = gpuscale(db_env, "submit-deck", str(tmp_path / "missing.pdf"))
    assert r.returncode == 2 and "no such file" in r.stderr
    assert await count(dsn) == 13

    r = gpuscale(db_env, "status", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["pools"]["visual"]["queued"] == 3 and data["pools"]["visual"]["blocked"] == 1
    assert data["pools"]["text"]["blocked"] == 9 and data["pools"]["text"]["running"] == 0
    assert data["servers"] == []

    r = gpuscale(db_env, "status")
    assert r.returncode == 0, r.stderr
    assert "Pools" in r.stdout and "visual" in r.stdout and "blocked" in r.stdout
    assert "none registered" in r.stdout


def test_bench_queue_small(db_env: dict[str, str]) -> None:
    r = gpuscale(
        db_env, "bench", "queue", "--tasks", "500", "--concurrency", "3", "--claim-batch", "20", "--json"
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"enqueue_per_s", "drain_per_s", "depth_read_ms"} <= set(out)
    assert out["tasks"] == 500 and out["duplicates"] == 0
    r = gpuscale(db_env, "bench", "queue", "--tasks", "0")
    assert r.returncode == 2
