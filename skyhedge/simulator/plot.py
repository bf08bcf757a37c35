"""One figure summarising a simulation: cost vs availability per policy, and one window's timeline.

Top: relative cost (x) against availability (y) per policy and trace, with error bars of one
standard deviation over the windows. Below, for the first trace's kept window, side by side for
up to two policies (SpotHedge and skyhedge when both ran, so their choices can be compared tick
by tick): each zone's spot capacity (steps, capped at the plot's height) and the spot replicas
the policy ran there, its on-demand count, and its ready replicas against the target. Uses
matplotlib's Agg backend (no display needed); the file's extension picks the format (`FORMATS`:
PNG, SVG, PDF, EPS, PS); written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from skyhedge.errors import OutputError  # noqa: E402
from skyhedge.simulator.runner import OPTIMAL, Summary  # noqa: E402
from skyhedge.simulator.traces import TICK_SECONDS, Trace  # noqa: E402
from skyhedge.state import atomic_write_bytes  # noqa: E402

__all__ = ["FORMATS", "plot_format", "plot_results"]

#: File extensions the plot may have, and the matplotlib format each writes (vector formats and
#: PNG need nothing beyond matplotlib itself).
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf", ".eps": "eps", ".ps": "ps"}

_PREFERRED = ("spothedge", "skyhedge", "skyserve")
#: Timelines drawn side by side (SpotHedge next to skyhedge when both were run).
MAX_TIMELINES = 2
#: Legend entries (policy x trace) drawn inside the cost/availability axes; more go beside it,
#: in columns of at most LEGEND_ROWS entries.
MAX_LEGEND_INSIDE = 12
LEGEND_ROWS = 24


def _timeline_policies(summaries: Sequence[Summary]) -> list[Summary]:
    """The policies whose window-0 timeline is drawn: the preferred ones first, at most
    MAX_TIMELINES, never the optimum (its plan is not a policy's behaviour)."""
    with_timeline = [
        s
        for s in summaries
        if s.policy != OPTIMAL and s.windows and any(w.timeline is not None for w in s.windows)
    ]
    rank = {name: i for i, name in enumerate(_PREFERRED)}
    ordered = sorted(with_timeline, key=lambda s: rank.get(s.policy, len(rank)))
    return ordered[:MAX_TIMELINES]


def _literal(text: str) -> str:
    """`text` drawn as written: trace, zone and policy names come from file and directory names,
    and matplotlib reads `$...$` in a label as math (`price$5-$7` drew "price5 − 7", and
    `m$\\bad{$x` failed the plot with a ParseFatalException traceback after the results)."""
    return text.replace("$", r"\$")


def plot_format(path: str | Path) -> str:
    """The format `path`'s extension asks for (case-insensitive); `OutputError` for any other, so
    that an ``out.svg`` is an SVG and never PNG bytes under that name."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        names = list(FORMATS)
        got = f"'{path.suffix}'" if path.suffix else "none"
        raise OutputError(
            f"{path}: expected a plot file name ending in {', '.join(names[:-1])} or {names[-1]} "
            f"(the extension picks the format), got {got}"
        )
    return fmt


def plot_results(
    summaries: Sequence[Summary], traces: Sequence[Trace], path: str | Path, *, target: int
) -> Path:
    path = Path(path)
    fmt = plot_format(path)  # before drawing anything
    first = traces[0].name if traces else None
    shown = _timeline_policies([s for s in summaries if s.trace == first]) if traces else []
    trace = traces[0] if traces else None
    zones = len(trace.zones) if trace is not None and shown else 0
    columns = max(1, len(shown))
    fig = plt.figure(figsize=(10 if columns == 1 else 16, 4.5 + 1.6 * (zones + 1)))
    grid = fig.add_gridspec(2 + zones, columns, height_ratios=[4.5] + [1.6] * (zones + 1))

    ax = fig.add_subplot(grid[0, :])
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
            label=_literal(f"{summary.policy} ({summary.trace})"),
        )
    ax.set_xlabel("relative cost (on-demand only = 1.0)")
    ax.set_ylabel("availability (%)")
    ax.ticklabel_format(axis="y", useOffset=False)  # 99.98, not "-0.02 +1e2"
    ax.set_title("cost vs availability (mean ± std over windows)")
    ax.grid(alpha=0.3)
    entries = len(summaries)
    beside = None
    if entries <= MAX_LEGEND_INSIDE:
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    else:  # beside the axes, in as many columns as it takes: inside, it hid the points and ran off the top
        columns_needed = -(-entries // LEGEND_ROWS)
        beside = ax.legend(
            fontsize=7, ncol=columns_needed, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0
        )

    if trace is not None:
        for column, summary in enumerate(shown):
            _timeline(fig, grid, column, summary, trace, target)

    # The legend beside the axes is wider than the figure leaves it: counted in, tight_layout gave
    # up ("UserWarning: Tight layout not applied", with matplotlib's source path, on stderr) and
    # the panels' titles ran into the axis label above them. Laid out without it, it is still in
    # the saved image, whose tight bounding box grows to hold it.
    if beside is not None:
        beside.set_in_layout(False)
    fig.tight_layout()
    if beside is not None:
        beside.set_in_layout(True)
    image = io.BytesIO()
    try:
        fig.savefig(image, format=fmt, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    try:
        atomic_write_bytes(path, image.getvalue())
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the plot ({exc.strerror or exc})") from exc
    return path


def _timeline(fig: Any, grid: Any, column: int, summary: Summary, trace: Trace, target: int) -> None:
    """One policy's first kept window: spot replicas over capacity per zone, then ready and
    on-demand replicas against the target."""
    window = next(w for w in summary.windows if w.timeline is not None)
    timeline = window.timeline
    assert timeline is not None
    hours = np.arange(len(timeline.ready)) * TICK_SECONDS / 3600
    order = list(window.window.order)
    capacity = trace.capacity[order, window.window.offset : window.window.offset + len(hours)]
    ceiling = max(target + 2, int(timeline.spot.max(initial=0)) + 1)
    zones = len(order)
    for i, z in enumerate(order):
        zax = fig.add_subplot(grid[1 + i, column])
        zax.fill_between(
            hours, np.minimum(capacity[i], ceiling), step="post", alpha=0.25, color="grey", label="capacity"
        )
        if timeline.spot_by_zone is not None:
            zax.step(hours, timeline.spot_by_zone[i], where="post", color="tab:blue", label="spot replicas")
        zax.set_ylim(0, ceiling + 0.5)
        zax.yaxis.set_major_locator(MaxNLocator(integer=True))
        zax.set_ylabel(_literal(trace.zones[z].zone), fontsize=8)
        zax.tick_params(labelbottom=False)
        if i == 0:
            # two lines: a long trace name on one ran into the title of the panel beside it
            zax.set_title(
                _literal(
                    f"{summary.policy}, window {window.window.index} (offset {window.window.offset} ticks)\n"
                    f"{trace.name}"
                ),
                fontsize=10,
            )
            zax.legend(fontsize=7, loc="upper right")
    tax = fig.add_subplot(grid[1 + zones, column])
    tax.step(hours, timeline.ready, where="post", color="tab:green", label="ready")
    tax.step(hours, timeline.ondemand, where="post", color="tab:red", label="on-demand")
    tax.axhline(target, color="black", linestyle=":", linewidth=1, label="target")
    tax.set_xlabel("hours into the window")
    tax.set_ylabel("replicas", fontsize=8)
    tax.yaxis.set_major_locator(MaxNLocator(integer=True))
    tax.legend(fontsize=7, loc="upper right", ncol=3)
