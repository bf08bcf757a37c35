"""One PNG summarising a simulation: cost vs availability per policy, and one window's timeline.

Top: relative cost (x) against availability (y) per policy and trace, with error bars of one
standard deviation over the windows. Below, for the first trace's kept window: each zone's spot
capacity (steps, capped at the plot's height) and the spot replicas a policy ran there, its
on-demand count, and its ready replicas against the target. Uses matplotlib's Agg backend (no
display needed); written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from skyhedge.errors import OutputError  # noqa: E402
from skyhedge.simulator.runner import Summary  # noqa: E402
from skyhedge.simulator.traces import TICK_SECONDS, Trace  # noqa: E402
from skyhedge.state import atomic_write_bytes  # noqa: E402

__all__ = ["plot_results"]

_PREFERRED = ("spothedge", "skyhedge", "skyserve")


def _timeline_policy(summaries: Sequence[Summary]) -> Summary | None:
    with_timeline = [s for s in summaries if s.windows and any(w.timeline is not None for w in s.windows)]
    for name in _PREFERRED:
        for summary in with_timeline:
            if summary.policy == name:
                return summary
    return with_timeline[0] if with_timeline else None


def plot_results(
    summaries: Sequence[Summary], traces: Sequence[Trace], path: str | Path, *, target: int
) -> Path:
    path = Path(path)
    first = traces[0].name if traces else None
    shown = _timeline_policy([s for s in summaries if s.trace == first])
    trace = traces[0] if traces else None
    zones = len(trace.zones) if trace is not None and shown is not None else 0
    fig = plt.figure(figsize=(10, 4.5 + 1.6 * (zones + 1)))
    grid = fig.add_gridspec(2 + zones, 1, height_ratios=[4.5] + [1.6] * (zones + 1))

    ax = fig.add_subplot(grid[0])
    markers = "osD^vP*X"
    trace_names = sorted({s.trace for s in summaries})
    policies = list(dict.fromkeys(s.policy for s in summaries))
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(policies)}
    for summary in summaries:
        data = summary.to_json()
        marker = markers[trace_names.index(summary.trace) % len(markers)]
        ax.errorbar(
            data["relative_cost"],
            100 * data["availability"],
            xerr=data["relative_cost_std"],
            yerr=100 * data["availability_std"],
            fmt=marker,
            color=colors[summary.policy],
            capsize=3,
            label=f"{summary.policy} ({summary.trace})",
        )
    ax.set_xlabel("relative cost (on-demand only = 1.0)")
    ax.set_ylabel("availability (%)")
    ax.set_title("cost vs availability (mean ± std over windows)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")

    if shown is not None and trace is not None:
        window = next(w for w in shown.windows if w.timeline is not None)
        timeline = window.timeline
        assert timeline is not None
        hours = np.arange(len(timeline.ready)) * TICK_SECONDS / 3600
        order = list(window.window.order)
        capacity = trace.capacity[order, window.window.offset : window.window.offset + len(hours)]
        ceiling = max(target + 2, int(timeline.spot.max(initial=0)) + 1)
        for i, z in enumerate(order):
            zax = fig.add_subplot(grid[1 + i])
            zax.fill_between(
                hours,
                np.minimum(capacity[i], ceiling),
                step="post",
                alpha=0.25,
                color="grey",
                label="capacity",
            )
            if timeline.spot_by_zone is not None:
                zax.step(
                    hours, timeline.spot_by_zone[i], where="post", color="tab:blue", label="spot replicas"
                )
            zax.set_ylim(0, ceiling + 0.5)
            zax.yaxis.set_major_locator(MaxNLocator(integer=True))
            zax.set_ylabel(trace.zones[z].zone, fontsize=8)
            zax.tick_params(labelbottom=False)
            if i == 0:
                zax.set_title(
                    f"{shown.policy} on {trace.name}, window {window.window.index} "
                    f"(offset {window.window.offset} ticks)"
                )
                zax.legend(fontsize=7, loc="upper right")
        tax = fig.add_subplot(grid[1 + zones])
        tax.step(hours, timeline.ready, where="post", color="tab:green", label="ready")
        tax.step(hours, timeline.ondemand, where="post", color="tab:red", label="on-demand")
        tax.axhline(target, color="black", linestyle=":", linewidth=1, label="target")
        tax.set_xlabel("hours into the window")
        tax.set_ylabel("replicas", fontsize=8)
        tax.yaxis.set_major_locator(MaxNLocator(integer=True))
        tax.legend(fontsize=7, loc="upper right", ncol=3)

    fig.tight_layout()
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=110)
    finally:
        plt.close(fig)
    try:
        atomic_write_bytes(path, png.getvalue())
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the plot ({exc.strerror or exc})") from exc
    return path
