"""Trace-driven simulation: replay spot-capacity traces through the real policy objects.

`traces` loads and resamples traces, `world` plays a window as a cloud for one policy, `runner`
draws windows and aggregates metrics, `optimum` solves the omniscient integer program, `latency`
models requests over a timeline, `bar` judges policies against SpotHedge and `plot` draws the
results. Never imports engine, render, routing, clouds or controller (DESIGN.md, "Walls").
"""

from skyhedge.simulator.runner import (
    OPTIMAL,
    PriceBook,
    SimConfig,
    Summary,
    load_prices,
    make_windows,
    run_window,
    simulate,
    unmatched_prices,
)
from skyhedge.simulator.traces import TICK_SECONDS, UNLIMITED, Trace, load_trace
from skyhedge.simulator.world import Timeline, World, score

__all__ = [
    "OPTIMAL",
    "TICK_SECONDS",
    "UNLIMITED",
    "PriceBook",
    "SimConfig",
    "Summary",
    "Timeline",
    "Trace",
    "World",
    "load_prices",
    "load_trace",
    "make_windows",
    "run_window",
    "score",
    "simulate",
    "unmatched_prices",
]
