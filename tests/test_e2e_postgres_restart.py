"""End to end: restart PostgreSQL mid-run; the controller and the workers reconnect and finish.

This test runs its own embedded PostgreSQL (not the session's shared one, which other tests use),
starts the stack on it, and while a few hundred tasks run stops the server (a fast shutdown: every
connection is cut) and starts it again a couple of seconds later on the same socket.  Every task
must still end ``done`` exactly once, the pool must return to zero, and the controller and the
workers must still be alive (they reconnect; they do not crash or hang).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import asyncpg
import pytest
from db_kit import create_migrated_db
from e2e_stack import Stack

from gpuscale.db.connector import init_connection
from gpuscale.db.embedded import EmbeddedPostgres

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

TASKS = 200
DOWN_S = 3.0


async def test_postgres_restart_mid_run(tmp_path: Path) -> None:
    # A short path: PostgreSQL's unix socket path must stay under ~100 bytes.
    root = Path(tempfile.mkdtemp(prefix="gs-pgr-"))
    server = EmbeddedPostgres(root / "pg")
    await asyncio.to_thread(server.start)
    stack = None
    leftovers: list[int] = []
    try:
        dsn = await create_migrated_db(server.dsn("postgres"), "e2e")

        stack = Stack(dsn, tmp_path)
        await stack.start()
        ids = await stack.enqueue_noop(TASKS, low=0.3, high=1.2)
        while await stack.unfinished(ids) > TASKS * 0.7:
            stack.check_alive()
            await asyncio.sleep(0.25)
        # Cut everything: the stack's own pool too (it reconnects like the others must).
        assert stack.db is not None
        await stack.db.close()
        t0 = time.monotonic()
        await asyncio.to_thread(server.stop)
        await asyncio.sleep(DOWN_S)
        await asyncio.to_thread(server.start)
        assert server.dsn("e2e") == dsn
        restarted_s = time.monotonic() - t0
        stack.db = await asyncpg.create_pool(dsn, min_size=1, max_size=3, init=init_connection)
        from gpuscale.queue import Queue

        stack.queue = Queue(stack.db)
        started = time.monotonic()
        for _ in range(600):
            if await stack.unfinished(ids) == 0:
                break
            stack.check_alive()
            await asyncio.sleep(0.25)
        finish_s = time.monotonic() - started
        replicas_left = await stack.wait_replicas_zero(timeout_s=90)
        outcome = await stack.outcome(ids)
        stack.check_alive()  # the controller did not die of the outage
        api = await stack.api_texts()
    finally:
        if stack is not None:
            leftovers = await stack.stop()
        await asyncio.to_thread(server.stop)
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"{TASKS} tasks; database down {restarted_s:.1f}s; finished {finish_s:.1f}s after it came back; "
        f"statuses {outcome.statuses}, {outcome.attempts} attempts"
    )
    assert outcome.statuses == {"done": TASKS}
    # The workers rode out the outage: none exited on its own (the emulator logs every replica
    # that ends without being asked to).
    emulator_log = (tmp_path / "logs" / "emulator.log").read_text(errors="replace")
    assert "exited (code" not in emulator_log, emulator_log[-3000:]
    assert sorted(outcome.entered_done) == sorted(ids) and outcome.touched_after_done == []
    assert replicas_left == [] and leftovers == []
    assert stack.leaked(stack.log_texts() + api) == []
