"""Simulation speed on the paper's AWS2 trace: the six built-in policies other than `skyhedge`
(spothedge, skyserve, ondemand, even, rr, single-region) over 10 windows of 24 h (one figure, and
one per policy), then the omniscient optimum per window, with the method that answered (`runs`:
the shortest path, when capacity never binds; `milp`: HiGHS); `--optimal-windows 0` skips it.
With --compare-milp, each window is solved by HiGHS too, to time both and check they agree.
Prints figures; asserts nothing.

    PYTHONPATH=. python3 benchmarks/simulate_bench.py [--trace ../shared/traces/skyserve/AWS2]
        [--repeats 10] [--optimal-windows 10] [--compare-milp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from skyhedge.errors import TraceError
from skyhedge.simulator import SimConfig, load_trace, make_windows, simulate
from skyhedge.simulator.optimum import solve_optimum
from skyhedge.simulator.runner import window_capacity

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = REPO.parent / "shared" / "traces" / "skyserve" / "AWS2"
POLICIES = ["spothedge", "skyserve", "ondemand", "even", "rr", "single-region"]


def count(least: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text}")
        return value

    return parse


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--repeats", type=count(1), default=10)
    ap.add_argument("--optimal-windows", type=count(0), default=10)
    ap.add_argument("--compare-milp", action="store_true", help="also solve each window with HiGHS")
    args = ap.parse_args()

    try:
        trace = load_trace(args.trace)
    except TraceError as exc:  # a missing or malformed trace: a usage error, not a traceback
        ap.error(f"--trace: {exc}")
    config = SimConfig(repeats=args.repeats)
    print(
        f"trace {trace.name}: {len(trace.zones)} zones, {trace.ticks} ticks; {args.repeats} windows of 2880"
    )

    started, cpu = time.perf_counter(), time.process_time()
    summaries = simulate([trace], POLICIES, config, keep_timelines_of=None)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    decisions = len(POLICIES) * args.repeats * config.ticks
    print(
        f"all policies but optimal ({', '.join(POLICIES)}): {wall:.2f} s wall, {cpu:.2f} s CPU "
        f"({decisions} decisions, {1e6 * wall / decisions:.0f} us per tick incl. the world)"
    )
    for summary in summaries:
        seconds = sum(w.seconds for w in summary.windows)
        data = summary.to_json()
        print(
            f"  {summary.policy:14s} {seconds:6.2f} s   availability {data['availability']:.3f}"
            f"  relative cost {data['relative_cost']:.3f}"
        )

    windows = make_windows(trace, config)[: args.optimal_windows]
    times = []
    for window in windows:
        capacity = window_capacity(trace, window, config)
        solve = {"target": config.target, "cold_start_ticks": config.cold_start_ticks}
        started, cpu = time.perf_counter(), time.process_time()
        result = solve_optimum(capacity, **solve)
        times.append(time.perf_counter() - started)
        line = (
            f"  optimal window {window.index} (offset {window.offset}): {result.method} "
            f"{times[-1]:.2f} s wall, {time.process_time() - cpu:.2f} s CPU, objective {result.objective:.0f}"
        )
        if args.compare_milp and result.method != "milp":
            started = time.perf_counter()
            milp = solve_optimum(capacity, **solve, method="milp")
            same = abs(milp.objective - result.objective) < 1e-6
            agree = "same" if same else f"DIFFERS: {milp.objective:.0f}"
            line += f"; milp {time.perf_counter() - started:.2f} s, {agree}"
        print(line)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (wall times grow with it)")
    if not times:
        return
    print(
        f"optimal per window: median {statistics.median(times):.2f} s, mean {statistics.mean(times):.2f} s, "
        f"max {max(times):.2f} s over {len(times)} windows"
    )


if __name__ == "__main__":
    main()
