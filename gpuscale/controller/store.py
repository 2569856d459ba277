"""The controller's own state in PostgreSQL: the decision timeline, pause switches and spend.

Its statements are in ``gpuscale/db/queries.sql`` (the controller tables section); this module
owns the tables of migration ``0010_controller``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from gpuscale.db.connector import Connector
from gpuscale.queue import ServerInfo


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
    """The controller's tables (migration ``0010_controller``) through the database seam."""

    def __init__(self, db: Connector | Any) -> None:
        self.db: Connector = db if isinstance(db, Connector) else Connector.over(db)

    async def record_event(self, event: ScalingEvent) -> None:
        await self.db.execute(
            "record_scaling_event",
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
        rows = await self.db.fetch("scaling_events", pool, limit)
        return [{**dict(r), "at": r["at"].timestamp()} for r in rows]

    async def last_events(self) -> dict[str, dict[str, Any]]:
        """The latest recorded decision of every pool."""
        return {r["pool"]: dict(r) for r in await self.db.fetch("last_scaling_events")}

    async def set_paused(self, pool: str, paused: bool, by: str) -> None:
        await self.db.execute("set_pool_paused", pool, paused, by)

    async def paused_pools(self) -> set[str]:
        return {r["pool"] for r in await self.db.fetch("paused_pools")}

    async def registry_if_changed(self, version: int | None) -> tuple[set[str], int, list[ServerInfo] | None]:
        """The paused pools, the registry's change counter and, when the counter is not
        ``version``, its servers that are not dead (what the controller reads of them;
        ``current_load`` left at 0); ``None`` when nothing changed since ``version``."""
        rows = await self.db.fetch("registry_if_changed", version)
        paused, current = set(rows[0]["paused"]), int(rows[0]["version"])
        if current == version:
            return paused, current, None
        return (
            paused,
            current,
            [
                ServerInfo(
                    id=r["id"],
                    pool=r["pool"],
                    container_id=r["container_id"],
                    status=r["status"],
                    started_at=r["started_at"],
                )
                for r in rows
                if r["id"] is not None
            ],
        )

    async def queued_critical(self, pools: list[str]) -> set[str]:
        """Those of ``pools`` with a queued ``critical`` task (from the counters: no scan)."""
        return {r["pool"] for r in await self.db.fetch("queued_critical_pools", pools)}

    async def add_spend(self, pool: str, usd: float, replica_seconds: float, now: dt.datetime) -> None:
        await self.db.execute("add_pool_spend", pool, month_start(now), usd, replica_seconds)

    async def save_pool_state(self, pool: str, state: dict[str, Any], controller_id: str) -> None:
        await self.save_pool_states({pool: state}, controller_id)

    async def save_pool_states(self, states: dict[str, dict[str, Any]], controller_id: str) -> None:
        """Several pools' saved state in one statement (one round trip)."""
        pools = sorted(states)  # one lock order for every writer
        await self.db.execute("save_pool_states", pools, [states[p] for p in pools], controller_id)

    async def load_pool_states(self) -> dict[str, dict[str, Any]]:
        return {r["pool"]: r["state"] for r in await self.db.fetch("load_pool_states")}

    async def month_spend(self, now: dt.datetime) -> dict[str, float]:
        rows = await self.db.fetch("month_spend", month_start(now))
        return {r["pool"]: float(r["usd"]) for r in rows}
