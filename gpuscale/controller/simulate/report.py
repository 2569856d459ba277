"""The simulator's summary: a JSON-able dict and a text table."""

from __future__ import annotations

from typing import Any

from gpuscale.controller.simulate.engine import SimResult, percentile


def summary(result: SimResult) -> dict[str, Any]:
    """Everything ``gpuscale simulate --json`` prints (one JSON object)."""
    oracle = result.oracle_cost_usd
    cost = result.cost_usd
    return {
        "policy": result.policy,
        "tasks": result.tasks,
        "unfinished": result.unfinished,
        "decks": result.decks,
        "period_days": round(result.period_s / 86400.0, 3),
        "cost_usd": round(cost, 4),
        "oracle_cost_usd": round(oracle, 4),
        "always_on_cost_usd": round(result.always_on_cost_usd, 4),
        "cost_vs_oracle": round(cost / oracle, 3) if oracle > 0 else None,
        "cost_vs_always_on": round(cost / result.always_on_cost_usd, 3)
        if result.always_on_cost_usd > 0
        else None,
        "wait_p50_s": round(percentile(result.waits, 50), 1),
        "wait_p95_s": round(percentile(result.waits, 95), 1),
        "wait_max_s": round(max(result.waits, default=0.0), 1),
        "graph_p50_s": round(percentile(result.graph_times, 50), 1),
        "graph_p95_s": round(percentile(result.graph_times, 95), 1),
        "graph_max_s": round(max(result.graph_times, default=0.0), 1),
        "scale_events": result.scale_events,
        "pools": {
            name: {
                "tasks": p.tasks,
                "replica_hours": round(p.replica_seconds / 3600.0, 3),
                "busy_gpu_hours": round(p.busy_gpu_seconds / 3600.0, 3),
                "cost_usd": round(p.cost_usd, 4),
                "oracle_cost_usd": round(p.oracle_cost_usd, 4),
                "replicas_started": p.replicas_started,
                "max_replicas_seen": p.max_replicas_seen,
                "scale_events": dict(sorted(p.scale_events.items())),
                **(
                    {"preemptions": p.preemptions, "fallbacks": p.fallbacks}
                    if p.spend_usd is not None
                    else {}
                ),
            }
            for name, p in result.pools.items()
        },
        "objectives": _objectives(result),
        "sim_ticks": result.ticks,
        "sim_wall_s": round(result.wall_s, 3),
    }


_OBJECTIVE_KEYS = {
    "deck_p50": lambda r: percentile(r.graph_times, 50),
    "deck_p95": lambda r: percentile(r.graph_times, 95),
    "wait_p50": lambda r: percentile(r.waits, 50),
    "wait_p95": lambda r: percentile(r.waits, 95),
}


def _objectives(result: SimResult) -> dict[str, dict[str, Any]]:
    """Each objective of the pools file: its target, the replay's value, whether it was met."""
    out: dict[str, dict[str, Any]] = {}
    for name, target in result.objectives.items():
        value = float(_OBJECTIVE_KEYS[name](result))
        out[name] = {"target_s": round(target, 1), "value_s": round(value, 1), "met": value <= target}
    return out


def _minutes(seconds: float) -> str:
    return f"{seconds:7.0f}s ({seconds / 60:5.1f} min)"


def format_text(data: dict[str, Any]) -> str:
    """A person's view of :func:`summary`."""
    lines = [
        f"policy {data['policy']}: {data['tasks']} tasks ({data['unfinished']} unfinished), "
        f"{data['decks']} decks over {data['period_days']:g} day(s)",
        "",
        f"{'pool':<10}{'tasks':>7}{'replica-h':>11}{'busy GPU-h':>12}{'cost $':>10}{'floor $':>10}"
        f"{'starts':>8}{'max':>5}",
    ]
    for name, p in data["pools"].items():
        lines.append(
            f"{name:<10}{p['tasks']:>7}{p['replica_hours']:>11.2f}{p['busy_gpu_hours']:>12.2f}"
            f"{p['cost_usd']:>10.2f}{p['oracle_cost_usd']:>10.2f}{p['replicas_started']:>8}{p['max_replicas_seen']:>5}"
        )
    ratio = data["cost_vs_oracle"]
    lines += [
        "",
        f"cost            ${data['cost_usd']:.2f}"
        + (f"  = {ratio:.2f}× the oracle floor" if ratio is not None else ""),
        f"oracle floor    ${data['oracle_cost_usd']:.2f}  (every task's GPU time, no cold start, no idle)",
        f"always on       ${data['always_on_cost_usd']:.2f}  (max replicas of every pool, whole period)",
        f"wait            p50 {_minutes(data['wait_p50_s'])}  p95 {_minutes(data['wait_p95_s'])}  "
        f"max {_minutes(data['wait_max_s'])}",
        f"deck completion p50 {_minutes(data['graph_p50_s'])}  p95 {_minutes(data['graph_p95_s'])}",
        "scale events    " + (", ".join(f"{k} {v}" for k, v in data["scale_events"].items()) or "none"),
        *(
            [
                "spot            "
                + ", ".join(
                    f"{n}: {p['preemptions']} preempted, {p['fallbacks']} home change(s)"
                    for n, p in data["pools"].items()
                    if "preemptions" in p
                )
            ]
            if any("preemptions" in p for p in data["pools"].values())
            else []
        ),
    ]
    if data.get("objectives"):
        lines.append(
            "objectives      "
            + ", ".join(
                f"{k} ≤ {o['target_s'] / 60:g} min: {o['value_s'] / 60:.1f} min "
                + ("met" if o["met"] else "MISSED")
                for k, o in data["objectives"].items()
            )
        )
    lines += [
        f"(replayed in {data['sim_wall_s']:.2f}s, {data['sim_ticks']} controller ticks)",
    ]
    return "\n".join(lines)
