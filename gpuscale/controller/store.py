"""The controller's own state in PostgreSQL: the decision timeline, pause switches and spend.

The task queue's SQL lives in :mod:`gpuscale.queue`; this module owns the tables of migration
``0010_controller``.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import asyncpg


@dataclass(frozen=True)
class ScalingEvent:
    pool: str
    from_replicas: int | None
    to_replicas: int
    reason: str
    detail: str
    outcome: str
    error: str | None
    controller_id: str


def month_start(now: dt.datetime) -> dt.date:
    return dt.date(now.year, now.month, 1)


class ControllerStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def record_event(self, event: ScalingEvent) -> None:
        await self.pool.execute(
            """INSERT INTO scaling_events
                   (pool, from_replicas, to_replicas, reason, detail, outcome, error, controller_id)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
            event.pool,
            event.from_replicas,
            event.to_replicas,
            event.reason,
            event.detail,
            event.outcome,
            event.error,
            event.controller_id,
        )

    async def events(self, pool: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            """SELECT id, pool, at, from_replicas, to_replicas, reason, detail, outcome, error,
                      controller_id
                 FROM scaling_events
                WHERE $1::text IS NULL OR pool = $1
                ORDER BY at DESC, id DESC
                LIMIT $2""",
            pool,
            limit,
        )
        return [{**dict(r), "at": r["at"].timestamp()} for r in rows]

    async def last_events(self) -> dict[str, dict[str, Any]]:
        """The latest recorded decision of every pool."""
        rows = await self.pool.fetch(
            """SELECT DISTINCT ON (pool) pool, to_replicas, reason, outcome, extract(epoch FROM at) AS at
                 FROM scaling_events ORDER BY pool, at DESC, id DESC"""
        )
        return {r["pool"]: dict(r) for r in rows}

    async def set_paused(self, pool: str, paused: bool, by: str) -> None:
        await self.pool.execute(
            """INSERT INTO pool_control (pool, paused, updated_by) VALUES ($1, $2, $3)
               ON CONFLICT (pool) DO UPDATE
                  SET paused = EXCLUDED.paused, updated_at = now(), updated_by = EXCLUDED.updated_by""",
            pool,
            paused,
            by,
        )

    async def paused_pools(self) -> set[str]:
        rows = await self.pool.fetch("SELECT pool FROM pool_control WHERE paused")
        return {r["pool"] for r in rows}

    async def add_spend(self, pool: str, usd: float, replica_seconds: float, now: dt.datetime) -> None:
        await self.pool.execute(
            """INSERT INTO pool_spend (pool, month, usd, replica_seconds) VALUES ($1, $2, $3, $4)
               ON CONFLICT (pool, month) DO UPDATE
                  SET usd = pool_spend.usd + EXCLUDED.usd,
                      replica_seconds = pool_spend.replica_seconds + EXCLUDED.replica_seconds""",
            pool,
            month_start(now),
            usd,
            replica_seconds,
        )

    async def save_pool_state(self, pool: str, state: dict[str, Any], controller_id: str) -> None:
        await self.pool.execute(
            """INSERT INTO pool_state (pool, state, controller_id) VALUES ($1, $2::jsonb, $3)
               ON CONFLICT (pool) DO UPDATE
                  SET state = EXCLUDED.state, controller_id = EXCLUDED.controller_id, updated_at = now()""",
            pool,
            json.dumps(state),
            controller_id,
        )

    async def load_pool_states(self) -> dict[str, dict[str, Any]]:
        rows = await self.pool.fetch("SELECT pool, state FROM pool_state")
        return {r["pool"]: json.loads(r["state"]) for r in rows}

    async def month_spend(self, now: dt.datetime) -> dict[str, float]:
        rows = await self.pool.fetch("SELECT pool, usd FROM pool_spend WHERE month = $1", month_start(now))
        return {r["pool"]: float(r["usd"]) for r in rows}
