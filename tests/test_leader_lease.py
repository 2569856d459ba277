"""The leader lease against a real PostgreSQL: terms, renewal deadline, fencing, release.

Time is moved, not waited for: each elector's monotonic clock is injected, and the database's
view of time is moved by ageing the lease row (what a leader that froze for its whole term would
leave behind).  The end-to-end tests (test_e2e_leader_*) do the same with real processes and
SIGSTOP.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from provider_kit import no_processes, replica_env, until

from gpuscale.common.settings import Settings
from gpuscale.controller.leader import LeaseElector
from gpuscale.controller.providers import LaunchSpec
from gpuscale.controller.providers.fenced import FencedProvider, NotLeader
from gpuscale.controller.providers.local import LocalProvider
from gpuscale.db import Connector


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Made:
    def __init__(self) -> None:
        self.dbs: list[Connector] = []
        self.electors: list[LeaseElector] = []


@pytest.fixture
async def made() -> AsyncIterator[Made]:
    m = Made()
    yield m
    for e in m.electors:
        await e.release()
    for db in m.dbs:
        await db.close()


async def elector(
    made: Made, dsn: str, identity: str, clock: Clock | None = None, **kw: object
) -> LeaseElector:
    db = await Connector(dsn, max_connections=2).open()
    made.dbs.append(db)
    e = LeaseElector(
        db,
        identity,
        lease_duration_s=15,
        renew_deadline_s=10,
        retry_period_s=2,
        clock=clock or Clock(),
        **kw,  # type: ignore[arg-type]
    )
    made.electors.append(e)
    return e


async def age_lease(dsn: str, seconds: float) -> None:
    """Move the database's view of the lease ``seconds`` into the past."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "UPDATE controller_lease SET renewed_at = renewed_at - make_interval(secs => $1)", seconds
        )
    finally:
        await conn.close()


async def lease_row(dsn: str) -> asyncpg.Record:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT * FROM controller_lease WHERE name = 'controller'")
        assert row is not None
        return row
    finally:
        await conn.close()


async def test_one_leader_a_standby_and_generations(dsn: str, made: Made) -> None:
    a = await elector(made, dsn, "a")
    b = await elector(made, dsn, "b")
    assert await a.ensure() and a.generation == 1
    assert not await b.ensure() and b.generation is None
    assert await a.ensure() and a.generation == 1, "a renewal keeps the term"
    assert await a.may_act() and not await b.may_act()
    row = await lease_row(dsn)
    assert (row["holder"], row["generation"], row["duration_s"]) == ("a", 1, 15)


async def test_candidates_at_once_only_one_wins(dsn: str, made: Made) -> None:
    electors = [await elector(made, dsn, f"c{i}") for i in range(6)]
    won = await asyncio.gather(*(e.ensure() for e in electors))
    assert sum(won) == 1
    assert [e.generation for e in electors if e.generation is not None] == [1]


async def test_a_leader_stops_acting_at_its_renew_deadline(dsn: str, made: Made) -> None:
    clock = Clock()
    stopped: list[str] = []

    async def on_stopped() -> None:
        stopped.append("a")

    a = await elector(made, dsn, "a", clock, on_stopped_leading=on_stopped)
    assert await a.ensure()
    clock.now += 9.9
    assert a.is_leader and await a.may_act()
    clock.now += 0.2  # 10.1 s without a renewal: past the deadline, before the 15 s lease ends
    assert not a.is_leader
    assert not await a.may_act(), "a leader past its renew deadline acted"
    assert stopped == []  # noticed at the next attempt, which cleans up
    await a.ensure()
    assert stopped == ["a"]
    # Nobody else wanted the lease: it starts a new term (its old one may still be running in the
    # database, but it stepped down and cleaned up first).
    assert a.is_leader and a.generation == 2


async def test_a_frozen_leader_wakes_up_fenced(dsn: str, made: Made) -> None:
    clock_a = Clock()
    stopped: list[int] = []

    async def on_stopped() -> None:
        stopped.append(1)

    a = await elector(made, dsn, "a", clock_a, on_stopped_leading=on_stopped)
    b = await elector(made, dsn, "b")
    assert await a.ensure()
    # a freezes: its lease runs out in the database, b takes it.
    await age_lease(dsn, 16)
    assert await b.ensure() and b.generation == 2
    # a wakes with its clock not yet past the deadline (the worst case: clocks disagree): the
    # database check of the fence refuses it all the same.
    assert a.is_leader
    assert not await a.may_act()
    # The realistic case: its clock moved on while it was frozen.
    clock_a.now += 20
    assert not a.is_leader and not await a.may_act()
    assert not await a.ensure() and stopped == [1]
    assert await b.may_act()


async def test_an_expired_term_is_not_renewed_even_when_nobody_took_it(dsn: str, made: Made) -> None:
    a = await elector(made, dsn, "a")
    assert await a.ensure()
    await age_lease(dsn, 16)
    assert not await a.may_act(), "the fence let an expired term act"
    assert await a.ensure() and a.generation == 2, "a new term, with a new fencing token"


async def test_release_hands_over_at_once(dsn: str, made: Made) -> None:
    a = await elector(made, dsn, "a")
    b = await elector(made, dsn, "b")
    assert await a.ensure() and not await b.ensure()
    await a.release()
    assert not a.is_leader and not await a.may_act()
    assert await b.ensure() and b.generation == 2


async def test_an_error_while_checking_means_not_leader(dsn: str, made: Made) -> None:
    a = await elector(made, dsn, "a")
    assert await a.ensure()
    # Its connection breaks and the database cannot be reached: the fence cannot check.
    assert a._conn is not None
    a._conn.terminate()
    a._db = Connector("postgresql://gpuscale@127.0.0.1:1/nowhere", connect_timeout_s=1)
    assert not await a.may_act()
    assert a.is_leader, "within its renew deadline it still holds the term, it just may not act"


async def test_a_broken_connection_is_not_a_lost_lease(dsn: str, made: Made) -> None:
    a = await elector(made, dsn, "a")
    assert await a.ensure()
    assert a._conn is not None
    a._conn.terminate()  # as pg_terminate_backend on the leader's session
    assert await a.ensure() and a.generation == 1 and await a.may_act()


async def test_the_fence_refuses_every_provider_call(dsn: str, made: Made, tmp_path: Path) -> None:
    command = (sys.executable, "-c", "import time; time.sleep(60)")
    local = LocalProvider({"d": LaunchSpec("bench", command=command)}, stop_grace_s=1)
    a = await elector(made, dsn, "a")
    fenced = FencedProvider(local, a.may_act)
    try:
        for call in (fenced.observe("d"), fenced.set_replicas("d", 2), fenced.pause("d"), fenced.resume("d")):
            with pytest.raises(NotLeader):
                await call
        assert fenced.refused == 4 and local.pids("d") == {}
        assert await a.ensure()
        await fenced.set_replicas("d", 2)
        ids = set(local.pids("d"))
        assert len(ids) == 2
        await until(lambda: _all_up(ids), "both replicas")
        # Stepping down stops what this controller started, and keeps it stopped.
        await local.step_down()
        await no_processes(ids, timeout_s=10)
        assert (await local.observe("d")).target == 0 and local.pids("d") == {}
    finally:
        await local.aclose()


async def _all_up(ids: set[str]) -> bool:
    return all(replica_env(rid) for rid in ids)


def test_lease_timings_are_checked() -> None:
    assert (Settings().leader_lease_duration_s, Settings().leader_renew_deadline_s) == (15.0, 10.0)
    assert Settings().leader_retry_period_s == 2.0
    with pytest.raises(ValueError, match="RENEW_DEADLINE_S must be less"):
        Settings(leader_lease_duration_s=5, leader_renew_deadline_s=5)
    with pytest.raises(ValueError, match="RETRY_PERIOD_S"):
        Settings(leader_lease_duration_s=5, leader_renew_deadline_s=2, leader_retry_period_s=2)


async def test_fence_checks_asked_together_share_one_round_trip(dsn: str, made: Made) -> None:
    a = await elector(made, dsn, "a")
    assert await a.ensure()
    sent: list[str] = []
    fetch = a._fetchval

    async def counted(name: str, *args: object, **kw: object) -> object:
        sent.append(name)
        return await fetch(name, *args, **kw)  # type: ignore[arg-type]

    a._fetchval = counted  # type: ignore[method-assign]
    # A tick's provider calls ask side by side: one lease_check answers them all.
    assert all(await asyncio.gather(*(a.may_act() for _ in range(8))))
    assert sent == ["lease_check"]
    assert await a.may_act() and sent == ["lease_check"] * 2, "a later call checks afresh"
    await age_lease(dsn, 3600)  # the term is over by the database's clock
    assert not any(await asyncio.gather(*(a.may_act() for _ in range(4))))
    assert sent == ["lease_check"] * 3
