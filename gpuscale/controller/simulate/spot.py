"""Spot and fallback deployments in the replay simulator.

Off by default (the replay then runs each pool on one deployment at its ``price_per_hour``).  With
a :class:`SpotModel` each pool's replicas are placed over its ``deployments`` by the controller's
own :func:`gpuscale.controller.placement.place`, each replica billed at its deployment's price, and
spot replicas vanish at ``preemption_per_hour`` per replica-hour (exponential lifetimes, seeded):
their tasks go back to the queue with their work lost, and the provider starts a replacement on
the same deployment (a new cold start), as Verda keeps a deployment at its pinned count.  A pool
whose spot replicas vanish ``preemption_limit`` times within ``preemption_window`` falls back to
the next deployment for the cool-off, as the controller does.

The oracle floor stays the work at the pool's on-demand ``price_per_hour``: spot beats it when
its discount outweighs the work lost to preemptions and the extra cold starts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gpuscale.controller.placement import DeploymentObs, PlacementState, ReplicaObs, place
from gpuscale.controller.pools import PoolRules


@dataclass(frozen=True)
class SpotModel:
    """How the spot market behaves in a replay."""

    preemption_per_hour: float = 0.1  # per spot replica-hour
    seed: int = 1

    def __post_init__(self) -> None:
        if not (self.preemption_per_hour >= 0 and math.isfinite(self.preemption_per_hour)):
            raise ValueError("preemption_per_hour must be a finite number >= 0")


class Replica(Protocol):
    """What this module needs of the engine's replicas."""

    id: str
    pool: int
    ready_at: float
    requested_at: float
    deployment: str
    price: float
    preempt_at: float

    @property
    def tasks(self) -> Sequence[object]: ...


@dataclass
class SpotState:
    """The spot model's state in one replay: the placement memory per pool, preemption counts."""

    model: SpotModel
    rng: random.Random = field(init=False)
    placements: dict[str, PlacementState] = field(default_factory=dict)
    preemptions: dict[str, int] = field(default_factory=dict)
    fallbacks: dict[str, int] = field(default_factory=dict)  # pool → failures that moved its home
    homes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.model.seed)

    def new_replica(self, rules: PoolRules, deployment: str, now: float) -> tuple[float, float]:
        """(price per hour, preemption time) of a replica requested now on ``deployment``."""
        opt = rules.option(deployment)
        price = float(
            opt.price_per_hour if opt is not None and opt.price_per_hour is not None else rules.price_per_hour
        )
        spot = opt is not None and opt.spot
        rate = self.model.preemption_per_hour if spot else 0.0
        preempt_at = now + self.rng.expovariate(rate) * 3600.0 if rate > 0 else math.inf
        return price, preempt_at

    def due(self, replicas: Sequence[Replica], now: float) -> list[Replica]:
        """Replicas whose preemption time has come."""
        return [r for r in replicas if r.preempt_at <= now]

    def place(
        self,
        name: str,
        rules: PoolRules,
        replicas: Sequence[Replica],
        desired: int,
        replace_ids: Sequence[str],
        now: float,
    ) -> dict[str, int]:
        """Per deployment, how many replicas the pool should have (the controller's placement)."""
        observed: dict[str, DeploymentObs | None] = {}
        for opt in rules.options:
            mine = [r for r in replicas if r.deployment == opt.name]
            observed[opt.name] = DeploymentObs(
                opt.name,
                len(mine),
                "healthy",
                tuple(
                    ReplicaObs(
                        r.id,
                        r.requested_at,
                        "running" if r.ready_at <= now else "starting",
                        registered=r.ready_at <= now,
                        busy=bool(r.tasks),
                    )
                    for r in mine
                ),
            )
        placement = place(
            rules,
            observed,
            desired,
            self.placements.get(name, PlacementState()),
            now,
            replace_ids=replace_ids,
        )
        self.placements[name] = placement.state
        if self.homes.get(name, placement.home) != placement.home:
            self.fallbacks[name] = self.fallbacks.get(name, 0) + 1
        self.homes[name] = placement.home
        for dep, ids in placement.vanished.items():
            del dep
            self.preemptions[name] = self.preemptions.get(name, 0) + len(ids)
        return placement.targets


def apply_targets(
    targets: dict[str, int],
    replicas: Sequence[Replica],
    start: Callable[[str], None],
    stop: Callable[[Replica], None],
    pick: Callable[[Sequence[Replica], int], Sequence[Replica]],
) -> None:
    """Start or stop replicas per deployment; ``pick(replicas, n)`` chooses the ``n`` a lower count
    stops, as the provider does (the engine's stop order: idle first, or any)."""
    for dep, target in targets.items():
        mine = [r for r in replicas if r.deployment == dep]
        if target > len(mine):
            for _ in range(target - len(mine)):
                start(dep)
        elif target < len(mine):
            for rep in pick(mine, len(mine) - target):
                stop(rep)
