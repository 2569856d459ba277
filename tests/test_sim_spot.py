"""The simulator's spot model: spot replicas priced per deployment, preempted, falling back."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuscale.controller.pools import load_pools
from gpuscale.controller.simulate.engine import simulate
from gpuscale.controller.simulate.report import format_text, summary
from gpuscale.controller.simulate.spot import SpotModel
from gpuscale.controller.simulate.trace import read_trace

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "deploy/datacrunch/pools.yaml"
BUSY_DAY = ROOT / "tests/data/busy_day.csv"


def test_spot_with_fallback_costs_less_than_the_on_demand_floor_at_the_same_latency() -> None:
    config, trace = load_pools(SHIPPED), read_trace(BUSY_DAY)
    on_demand = summary(simulate(trace, config))
    spot = summary(simulate(trace, config, spot=SpotModel(preemption_per_hour=0.5, seed=3)))
    assert spot["unfinished"] == 0
    assert spot["cost_usd"] < spot["oracle_cost_usd"] == on_demand["oracle_cost_usd"]
    assert spot["cost_usd"] < 0.75 * on_demand["cost_usd"]
    assert spot["wait_p95_s"] <= 300 and spot["graph_p95_s"] <= 1200
    assert "preempted" in format_text(spot)
    # Deterministic: the same seed replays the same preemptions.
    again = summary(simulate(trace, config, spot=SpotModel(preemption_per_hour=0.5, seed=3)))
    assert again["cost_usd"] == spot["cost_usd"]


def test_spot_replicas_that_keep_vanishing_fall_back_and_every_task_finishes() -> None:
    config, trace = load_pools(SHIPPED), read_trace(BUSY_DAY)
    data = summary(simulate(trace, config, spot=SpotModel(preemption_per_hour=20.0, seed=1)))
    assert data["unfinished"] == 0
    visual = data["pools"]["visual"]
    assert visual["preemptions"] > 0 and visual["fallbacks"] > 0
    calm = summary(simulate(trace, config, spot=SpotModel(preemption_per_hour=0.0)))
    assert calm["pools"]["visual"]["preemptions"] == 0 and calm["pools"]["visual"]["fallbacks"] == 0
    # Work lost to preemptions and on-demand fallback cost more than calm spot.
    assert data["cost_usd"] > calm["cost_usd"]


def test_spot_model_checks_its_rate() -> None:
    with pytest.raises(ValueError):
        SpotModel(preemption_per_hour=-1)


def test_a_spot_pool_is_scaled_down_in_the_same_stop_order_as_a_plain_one() -> None:
    """Placement's scale-downs go through the engine's stop order: with the provider picking
    (``any``) a spot month differs from idle-first, as a plain month does."""
    config, trace = load_pools(SHIPPED), read_trace(BUSY_DAY)
    calm = SpotModel(preemption_per_hour=0.0)
    idle = summary(simulate(trace, config, spot=calm, victims="idle"))
    anyone = summary(simulate(trace, config, spot=calm, victims="any"))
    assert idle["unfinished"] == anyone["unfinished"] == 0
    assert (idle["cost_usd"], idle["graph_p95_s"]) != (anyone["cost_usd"], anyone["graph_p95_s"])
