"""Plot a replay: per pool, tasks waiting and running, and replicas (requested and ready) over time."""

from __future__ import annotations

from pathlib import Path

from controller.simulate.engine import SimResult


def plot_result(result: SimResult, out: Path | str, *, title: str | None = None) -> Path:
    """Write a PNG with one panel per pool; the x axis is hours (days for long traces)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    pools = list(result.pools.values())
    fig, axes = plt.subplots(len(pools), 1, figsize=(13, 3.2 * len(pools) + 0.6), sharex=True, squeeze=False)
    end = max(result.end_s, 1.0)
    use_days = end > 3 * 86400
    scale = 86400.0 if use_days else 3600.0
    for ax, pool in zip(axes[:, 0], pools, strict=True):
        s = pool.series
        x = [t / scale for t in s.t] + [end / scale]

        def ext(v: list[int]) -> list[int]:
            return [*v, v[-1]] if v else [0]

        if not s.t:
            x = [0.0, end / scale]
        ax.fill_between(x, ext(s.queued), step="post", alpha=0.35, color="tab:red", label="tasks waiting")
        ax.step(x, ext(s.running), where="post", color="tab:orange", lw=0.9, label="tasks running")
        ax.step(x, ext(s.blocked), where="post", color="tab:gray", lw=0.7, ls=":", label="tasks blocked")
        ax2 = ax.twinx()
        ax2.step(x, ext(s.replicas), where="post", color="tab:blue", lw=1.4, label="replicas (billed)")
        ax2.step(x, ext(s.ready), where="post", color="tab:green", lw=1.0, ls="--", label="replicas ready")
        ax2.set_ylabel("replicas")
        ax2.set_ylim(0, max([*s.replicas, 1]) + 1)
        ax.set_ylabel("tasks")
        ax.set_ylim(bottom=0)
        ax.set_title(
            f"pool {pool.name}: {pool.replica_seconds / 3600:.1f} replica-h for "
            f"{pool.busy_gpu_seconds / 3600:.1f} GPU-h of work, ${pool.cost_usd:.2f}",
            fontsize=10,
        )
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8, ncol=5)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("days" if use_days else "hours")
    oracle = result.oracle_cost_usd
    ratio = f" = {result.cost_usd / oracle:.2f}× floor" if oracle > 0 else ""
    fig.suptitle(
        (title + "\n" if title else "")
        + f"cost ${result.cost_usd:.2f}{ratio}, always-on ${result.always_on_cost_usd:.2f}",
        fontsize=11,
    )
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
