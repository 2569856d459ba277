"""Plot a replay: per pool, tasks (waiting, running, blocked) and replicas (billed, ready) over time."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gpuscale.controller.simulate.engine import SimResult

if TYPE_CHECKING:
    from gpuscale.controller.simulate.tune import Evaluation as TuneEvaluation
    from gpuscale.controller.simulate.tune import TuneResult


def _money(x: float) -> str:
    # A bare "$" pair would switch matplotlib into math mode.
    return f"\\${x:.2f}"


def plot_result(result: SimResult, out: Path | str, *, title: str | None = None) -> Path:
    """Write a PNG: for each pool a tasks panel and a replicas panel, sharing a time axis in
    hours (days for traces longer than three days), cropped to when something happened."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    pools = list(result.pools.values())
    fig, axes = plt.subplots(
        2 * len(pools),
        1,
        figsize=(13, 2.4 * 2 * len(pools) + 1.0),
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 2] * len(pools)},
    )
    end = max(result.end_s, 1.0)
    use_days = end > 3 * 86400
    scale = 86400.0 if use_days else 3600.0
    active = [p.series.t[1] for p in pools if len(p.series.t) > 1]
    start = max(0.0, min(active, default=0.0) - 0.02 * end)
    for i, pool in enumerate(pools):
        s = pool.series
        ax_t, ax_r = axes[2 * i, 0], axes[2 * i + 1, 0]
        x = [t / scale for t in s.t] + [end / scale]

        def ext(v: list[int]) -> list[int]:
            return [*v, v[-1]] if v else [0, 0]

        if not s.t:
            x = [0.0, end / scale]
        ax_t.fill_between(x, ext(s.queued), step="post", alpha=0.45, color="tab:red", lw=0, label="waiting")
        ax_t.step(x, ext(s.running), where="post", color="tab:orange", lw=0.9, label="running")
        ax_t.step(x, ext(s.blocked), where="post", color="tab:gray", lw=0.7, ls=":", label="blocked on deps")
        ax_t.set_ylabel(f"{pool.name}\ntasks")
        ax_t.set_ylim(bottom=0)
        ax_t.legend(loc="upper left", fontsize=8, ncol=3, framealpha=0.8)
        ax_t.set_title(
            f"pool {pool.name}: {pool.replica_seconds / 3600:.1f} replica-h billed for "
            f"{pool.busy_gpu_seconds / 3600:.1f} GPU-h of work, {_money(pool.cost_usd)}, "
            f"{pool.replicas_started} starts",
            fontsize=10,
            loc="left",
        )
        ax_r.fill_between(x, ext(s.replicas), step="post", alpha=0.25, color="tab:blue", lw=0, label="billed")
        ax_r.step(x, ext(s.replicas), where="post", color="tab:blue", lw=1.0)
        ax_r.step(x, ext(s.ready), where="post", color="tab:green", lw=1.0, ls="--", label="ready")
        ax_r.set_ylabel("replicas")
        ax_r.set_ylim(0, max([*s.replicas, 1]) + 0.5)
        ax_r.yaxis.get_major_locator().set_params(integer=True)
        ax_r.legend(loc="upper left", fontsize=8, ncol=2, framealpha=0.8)
        for ax in (ax_t, ax_r):
            ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("days since trace start" if use_days else "hours since trace start")
    axes[-1, 0].set_xlim(start / scale, end / scale)
    oracle = result.oracle_cost_usd
    ratio = f" = {result.cost_usd / oracle:.2f}× the oracle floor {_money(oracle)}" if oracle > 0 else ""
    fig.suptitle(
        (title + "\n" if title else "")
        + f"cost {_money(result.cost_usd)}{ratio}; always-on {_money(result.always_on_cost_usd)}",
        fontsize=11,
    )
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_frontier(result: TuneResult, out: Path | str, *, title: str | None = None) -> Path:
    """Write a PNG of every replay ``gpuscale tune`` ran: cost (× the oracle floor) against the
    main objective, the frontier, the target and the rules chosen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gpuscale.controller.simulate.tune import SLO_KEYS

    name = "deck_p95" if "deck_p95" in result.slo else next(iter(result.slo))
    key = SLO_KEYS[name]
    target = result.slo[name] / 60.0
    fig, ax = plt.subplots(figsize=(9, 6))
    ok = [e for e in result.evaluations if e.meets]
    bad = [e for e in result.evaluations if not e.meets]

    def xy(evs: list[TuneEvaluation]) -> tuple[list[float], list[float]]:
        return [e.cost_x for e in evs], [e.data[key] / 60 for e in evs]

    ax.scatter(*xy(bad), s=14, c="#bbbbbb", label="misses an objective")
    ax.scatter(*xy(ok), s=18, c="#3b7dd8", label="meets every objective")
    ax.plot(*xy(result.frontier()), "-", c="#d8633b", lw=1.2, label="frontier")
    ax.axhline(target, ls="--", c="#555555", lw=1, label=f"{name} target {target:g} min")
    b = result.best
    ax.scatter([b.cost_x], [b.data[key] / 60], marker="*", s=220, c="#2ca02c", zorder=5, label="chosen")
    ax.set_xlabel("cost (× oracle floor)")
    ax.set_ylabel(f"{name} (min)")
    ax.set_title(title or f"gpuscale tune: {len(result.evaluations)} replays")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
