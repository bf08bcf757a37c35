"""The omniscient optimum of one window: an integer program over the whole window (HiGHS).

It knows every zone's capacity at every tick in advance and chooses, per tick, how many spot
replicas to run in each zone (x[z,t] <= capacity) and how many on-demand ones (y[t]), so that
at least N replicas are ready at every scored tick, at the least cost. Readiness follows the
simulator's rule: a[z,t] <= x[z,t'] for every t' in [t - cold, t] (a zone's count must have held
through the cold start), likewise for on-demand; nothing is ready before tick `cold` (HiGHS is
given it written with launches, `_solve_milp`: the same optimum in far fewer rows).

Cost minimised: spot replica-ticks (x spot price) + on-demand replica-ticks (x on-demand price)
over the scored ticks [cold, T), the ticks every policy is scored on, so it is a lower bound on
the cost of any policy reaching 100 % availability. The warm-up ticks [0, cold) weigh
WARMUP_WEIGHT of a scored tick: they only break ties. (Weighed fully, the optimum traded scored
cost for warm-up cost nobody counts, and could score above on-demand only: 1.05 on a zone that
empties just after the cold start.) `objective` is the scored cost of the plan. No spot
replica count above N is ever useful, so x <= N bounds the search; a and b are continuous (they
take the integer window minima).

When no zone ever holds between 1 and N - 1 (availability traces: a zone has room for everything
or nothing), capacity never binds and the program splits into N copies of the one-replica
problem, solved exactly by a shortest path over the window instead (`_solve_runs`): 0.1 s where
HiGHS took 8-25 s per nine-zone window (docs/simulate.md). When capacity does bind, the same
shortest path gives a lower bound (every zone with any room taken as having room for N) and a
feasible plan (only ticks where a zone has room for N); when the plan meets the bound it is the
optimum and HiGHS is skipped. Why the shortest path is exact: any plan is a set of *runs*
(one replica in one zone, or on demand, paid over [s, e], ready over [s + cold, e]); covering
every scored tick N times with runs is an interval-covering program, whose constraint matrix has
consecutive ones (totally unimodular), so its optimum is N times the one-replica optimum.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from skyhedge.errors import SkyhedgeError
from skyhedge.simulator.world import Timeline

__all__ = ["WARMUP_WEIGHT", "OptimumResult", "capacity_never_binds", "ready_counts", "solve_optimum"]

#: What a replica-tick of the unscored warm-up weighs against a scored one (a tie-breaker).
WARMUP_WEIGHT = 1e-6


@dataclass(frozen=True)
class OptimumResult:
    timeline: Timeline
    spot_plan: np.ndarray  # (zones, T) spot replicas per zone per tick
    ondemand_plan: np.ndarray  # (T,)
    objective: float
    status: str
    method: str = "milp"  # "runs" (shortest path) or "milp" (HiGHS); "trivial" with nothing to do


def ready_counts(plan: np.ndarray, cold: int) -> np.ndarray:
    """Ready replicas per tick of a count plan (1-D or zones x T): the minimum over [t-cold, t]."""
    plan = np.atleast_2d(np.asarray(plan, dtype=np.int64))
    zones, ticks = plan.shape
    ready = np.zeros((zones, ticks), dtype=np.int64)
    if ticks > cold:
        windows = np.lib.stride_tricks.sliding_window_view(plan, cold + 1, axis=1)
        ready[:, cold:] = windows.min(axis=2)
    return ready.sum(axis=0)


def capacity_never_binds(capacity: np.ndarray, target: int) -> bool:
    """No zone ever has room for between 1 and `target` - 1 replicas: the shortest path applies."""
    cap = np.asarray(capacity)
    return bool(((cap <= 0) | (cap >= target)).all())


def solve_optimum(
    capacity: np.ndarray | Sequence[Sequence[int]],
    *,
    target: int,
    cold_start_ticks: int,
    ondemand_cost_ratio: float = 3.0,
    spot_prices: np.ndarray | None = None,
    ondemand_price: float | None = None,
    time_limit: float | None = None,
    method: str = "auto",
) -> OptimumResult:
    """Solve the window's integer program. `capacity[z, t]`: zone z's spot capacity at tick t.

    Unit prices by default (spot 1, on-demand `ondemand_cost_ratio`); with `spot_prices` (zones x T
    or zones) and `ondemand_price` the objective is in those prices instead. `method` "auto" takes
    the shortest path when capacity never binds (module docstring) and HiGHS otherwise; "milp"
    always HiGHS. `OptimumResult.method` says which one answered.
    """
    cap = np.asarray(capacity, dtype=np.int64)
    zones, ticks = cap.shape
    cold = max(0, int(cold_start_ticks))
    n = int(target)
    if n <= 0 or ticks == 0:
        empty = np.zeros(ticks, dtype=np.int64)
        timeline = Timeline(empty, empty, empty, np.zeros((zones, ticks), dtype=np.int64))
        nothing = np.zeros((zones, ticks), dtype=np.int64)
        return OptimumResult(timeline, nothing, empty, 0.0, "trivial", "trivial")

    spot_cost = _spot_costs(spot_prices, zones, ticks)
    od_cost = float(ondemand_cost_ratio if ondemand_price is None else ondemand_price)
    if method not in ("auto", "milp"):
        raise SkyhedgeError(f"optimum: method must be 'auto' or 'milp', got {method!r}")
    weight = np.ones(ticks)
    weight[:cold] = WARMUP_WEIGHT
    spot_weighted = spot_cost * weight
    od_weighted = od_cost * weight
    result = None
    if method == "auto" and zones and ticks > cold and (spot_cost > 0).all() and 0 < od_cost < math.inf:
        runs = _solve_runs(cap > 0, n, cold, spot_weighted, od_weighted)
        if runs is not None and capacity_never_binds(cap, n):
            result = runs
        # Capacity binds somewhere. `runs` solved the relaxation in which a zone with any room
        # has room for N: a lower bound. Using only the ticks a zone has room for all N gives a
        # feasible plan; when it costs no more than the bound, it is the optimum, and HiGHS
        # (minutes per window with a dozen finite zones) is not needed.
        elif runs is not None:
            roomy = _solve_runs(cap >= n, n, cold, spot_weighted, od_weighted)
            if roomy is not None and roomy.objective <= runs.objective + 1e-9 * max(1.0, abs(runs.objective)):
                result = roomy
    if result is None:
        result = _solve_milp(cap, n, cold, spot_weighted, od_weighted, time_limit)
    scored = float(
        (result.spot_plan[:, cold:] * spot_cost[:, cold:]).sum() + od_cost * result.ondemand_plan[cold:].sum()
    )
    return replace(result, objective=scored)


def _solve_milp(
    cap: np.ndarray, n: int, cold: int, spot_cost: np.ndarray, od_cost: np.ndarray, time_limit: float | None
) -> OptimumResult:
    """The integer program of the module docstring, solved by HiGHS (costs per zone and tick, and
    per tick for on-demand).

    Readiness is written with launches: per kind k (each zone, then on demand) and tick t,
    x[k,t] replicas run, u[k,t] >= x[k,t] - x[k,t-1] were launched, and a[k,t] <= x[k,t] - (the
    launches of the last `cold` ticks) are ready. That is never more than the count rule's
    min(x[k, t-cold..t]), and equal to it on any plan without replicas launched only to be
    stopped before they are ready, which no cheapest plan has: both programs have one optimum.
    It takes two rows per kind and tick where "a <= x[t-k] for k = 0..cold" took cold + 1: the
    root LP of a 16-zone day went from 207-333 s to 12 s.
    """
    zones, ticks = cap.shape
    kinds = zones + 1  # the spot zones, then on demand
    kt = kinds * ticks
    # Variable layout, each kinds x ticks: x (replicas) | u (launches) | a (ready).
    x0, u0, a0 = 0, kt, 2 * kt
    count = 3 * kt

    cost = np.zeros(count)
    cost[x0:u0] = np.vstack([spot_cost, od_cost[np.newaxis, :]]).ravel()

    upper = np.empty(count)
    upper[x0:u0] = np.vstack([np.minimum(cap, n), np.full((1, ticks), n)]).ravel()
    upper[u0:a0] = n
    ready_upper = np.full((kinds, ticks), float(n))
    ready_upper[:, :cold] = 0
    upper[a0:] = ready_upper.ravel()
    integrality = np.zeros(count)
    integrality[x0:u0] = 1

    rows, cols, vals = [], [], []
    every = np.arange(ticks)
    scored = np.arange(cold, ticks)
    ones, minus = np.ones(ticks), -np.ones(ticks)
    # u[k,t] - x[k,t] + x[k,t-1] >= 0 (at t = 0, u - x >= 0: every replica then is launched).
    for k in range(kinds):
        r = k * ticks + every
        rows += [r, r, r[1:]]
        cols += [u0 + k * ticks + every, x0 + k * ticks + every, x0 + k * ticks + every[1:] - 1]
        vals += [ones, minus, ones[1:]]
    launch_rows = kt
    row = kt
    # a[k,t] - x[k,t] + u[k,t] + ... + u[k,t-cold+1] <= 0 for t >= cold.
    for k in range(kinds):
        r = row + np.arange(len(scored))
        rows += [r, r]
        cols += [a0 + k * ticks + scored, x0 + k * ticks + scored]
        vals += [ones[: len(scored)], minus[: len(scored)]]
        for lag in range(cold):
            rows.append(r)
            cols.append(u0 + k * ticks + scored - lag)
            vals.append(ones[: len(scored)])
        row += len(scored)
    ready_rows = row - launch_rows
    # sum_k a[k,t] >= N for t >= cold.
    for k in range(kinds):
        rows.append(row + np.arange(len(scored)))
        cols.append(a0 + k * ticks + scored)
        vals.append(ones[: len(scored)])
    row += len(scored)

    # scipy is imported here, not at module level: it costs ~0.5 s, and every CLI start would pay it.
    from scipy import sparse
    from scipy.optimize import Bounds, LinearConstraint, milp

    matrix = sparse.csr_array(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(row, count)
    )
    lower_b = np.concatenate(
        [np.zeros(launch_rows), np.full(ready_rows, -np.inf), np.full(len(scored), float(n))]
    )
    upper_b = np.concatenate(
        [np.full(launch_rows, np.inf), np.zeros(ready_rows), np.full(len(scored), np.inf)]
    )
    # Scored costs are integers in unit prices (the warm-up adds under 1e-4): a relative gap of
    # 1e-7 makes the answer exact.
    options = {"disp": False, "mip_rel_gap": 1e-7}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    result = milp(
        cost,
        constraints=LinearConstraint(matrix, lower_b, upper_b),
        integrality=integrality,
        bounds=Bounds(np.zeros(count), upper),
        options=options,
    )
    if result.x is None:
        raise SkyhedgeError(f"optimum: the integer program found no solution ({result.message})")
    plan = np.rint(result.x[x0:u0]).astype(np.int64).reshape(kinds, ticks)
    spot_plan, ondemand_plan = plan[:zones], plan[zones]
    ready = ready_counts(spot_plan, cold) + ready_counts(ondemand_plan, cold)
    timeline = Timeline(ready, spot_plan.sum(axis=0), ondemand_plan, spot_plan, None)
    status = "optimal" if result.status == 0 else str(result.message)
    return OptimumResult(timeline, spot_plan, ondemand_plan, float(result.fun), status)


def _spot_costs(spot_prices: np.ndarray | None, zones: int, ticks: int) -> np.ndarray:
    """Spot price per zone and tick (unit prices by default; a missing price counts as 1)."""
    if spot_prices is None:
        return np.ones((zones, ticks))
    prices = np.broadcast_to(np.asarray(spot_prices, dtype=float).reshape(zones, -1), (zones, ticks))
    if np.isinf(prices).any():
        raise SkyhedgeError("optimum: spot prices must be finite (a missing price is NaN)")
    return np.nan_to_num(prices, nan=1.0)


def _solve_runs(
    available: np.ndarray, target: int, cold: int, spot_cost: np.ndarray, od_cost: np.ndarray
) -> OptimumResult | None:
    """The exact optimum when capacity never binds (module docstring): N copies of the cheapest
    chain of runs covering [cold, T) once.

    A chain is a sequence of runs, each in another zone than the one before (two runs of one
    zone in a row merge into a cheaper one) and each starting `cold` ticks before the previous
    one's coverage ends, so the next covers from the tick after it. best[k][e] is the cheapest
    chain covering [cold, e] whose last run is in zone k (k = zones: on demand) and ends at e; a
    run of zone k over [s, e'] needs k available at every tick of it. For each k, the
    predecessors e of e' form a window [first_k(e'), e' - 1] whose ends only move forward, so a
    monotone deque gives each minimum in amortised O(1): O(T x zones) in all. None if the chain
    found would run more than N replicas in one zone (never for a cheapest chain: see above).
    """
    zones, ticks = available.shape
    kinds = zones + 1  # the spot zones, then on demand
    # prefix[k][t]: cost of one replica of kind k over ticks [0, t)
    prefix = np.zeros((kinds, ticks + 1))
    prefix[:zones, 1:] = np.cumsum(spot_cost, axis=1)
    prefix[zones, 1:] = np.cumsum(od_cost)
    inf = math.inf
    best = np.full((kinds, ticks), inf)
    came = np.full((kinds, ticks), -1, dtype=np.int64)  # predecessor's end tick (cold - 1: start)
    came_kind = np.full((kinds, ticks), -1, dtype=np.int64)
    # the two cheapest chains ending at e, over all kinds: (cost, kind) each
    tops: dict[int, list[tuple[float, int]]] = {cold - 1: [(0.0, -1), (inf, -1)]}
    last_gap = np.full(kinds, -1, dtype=np.int64)  # last tick <= e' where kind k was unavailable
    for k in range(zones):
        gaps = np.flatnonzero(~available[k, :cold])
        if len(gaps):
            last_gap[k] = gaps[-1]
    windows: list[deque[tuple[int, float]]] = [deque() for _ in range(kinds)]
    for end in range(cold, ticks):
        prev = end - 1  # a chain ending at `prev` becomes a predecessor of runs ending at `end`
        pair = tops.get(prev)
        for k in range(kinds):
            if k < zones and not available[k, end]:
                last_gap[k] = end
            window = windows[k]
            if pair is not None:
                value, kind = pair[0] if pair[0][1] != k else pair[1]
                if value < inf:
                    # a run of k after a chain ending at prev starts at prev + 1 - cold
                    key = value - prefix[k, prev + 1 - cold]
                    while window and window[-1][1] >= key:
                        window.pop()
                    window.append((prev, key))
            first = max(cold - 1, int(last_gap[k]) + cold)  # the run must start after the gap
            while window and window[0][0] < first:
                window.popleft()
            if window:
                prev_end, key = window[0]
                best[k, end] = prefix[k, end + 1] + key
                came[k, end] = prev_end
                pair_prev = tops[prev_end]
                came_kind[k, end] = pair_prev[0][1] if pair_prev[0][1] != k else pair_prev[1][1]
        column = sorted((float(best[k, end]), k) for k in range(kinds))
        tops[end] = column[:2]
    k = int(np.argmin(best[:, ticks - 1]))
    if not math.isfinite(best[k, ticks - 1]):  # on demand is always there: cannot happen
        raise SkyhedgeError("optimum: no chain of runs covers the window")
    spot_plan = np.zeros((zones, ticks), dtype=np.int64)
    ondemand_plan = np.zeros(ticks, dtype=np.int64)
    end = ticks - 1
    while k >= 0:
        prev = int(came[k, end])
        start = prev + 1 - cold
        plan = ondemand_plan if k == zones else spot_plan[k]
        plan[start : end + 1] += target
        k, end = int(came_kind[k, end]), prev
    if (spot_plan > target).any():
        return None
    objective = float(target * best[:, ticks - 1].min())
    ready = ready_counts(spot_plan, cold) + ready_counts(ondemand_plan, cold)
    timeline = Timeline(ready, spot_plan.sum(axis=0), ondemand_plan, spot_plan, None)
    return OptimumResult(timeline, spot_plan, ondemand_plan, objective, "optimal", "runs")
