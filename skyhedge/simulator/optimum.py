"""The omniscient optimum of one window: an integer program over the whole window (HiGHS).

It knows every zone's capacity at every tick in advance and chooses, per tick, how many spot
replicas to run in each zone (x[z,t] <= capacity) and how many on-demand ones (y[t]), so that
at least N replicas are ready at every scored tick, at the least cost. Readiness follows the
simulator's rule: a[z,t] <= x[z,t'] for every t' in [t - cold, t] (a zone's count must have held
through the cold start), likewise for on-demand; nothing is ready before tick `cold`.

Cost minimised: spot replica-ticks (x spot price) + on-demand replica-ticks (x on-demand price)
over the whole window, warm-up included (the replicas that must be ready at tick `cold` are paid
for from tick 0). It is scored like every policy, over [cold, T), so it is a lower bound on the
cost of any policy reaching 100 % availability. No spot replica count above N is ever useful, so
x <= N bounds the search; a and b are continuous (they take the integer window minima).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from skyhedge.errors import SkyhedgeError
from skyhedge.simulator.world import Timeline

__all__ = ["OptimumResult", "ready_counts", "solve_optimum"]


@dataclass(frozen=True)
class OptimumResult:
    timeline: Timeline
    spot_plan: np.ndarray  # (zones, T) spot replicas per zone per tick
    ondemand_plan: np.ndarray  # (T,)
    objective: float
    status: str


def ready_counts(plan: np.ndarray, cold: int) -> np.ndarray:
    """Ready replicas per tick of a count plan (1-D or zones x T): the minimum over [t-cold, t]."""
    plan = np.atleast_2d(np.asarray(plan, dtype=np.int64))
    zones, ticks = plan.shape
    ready = np.zeros((zones, ticks), dtype=np.int64)
    if ticks > cold:
        windows = np.lib.stride_tricks.sliding_window_view(plan, cold + 1, axis=1)
        ready[:, cold:] = windows.min(axis=2)
    return ready.sum(axis=0)


def solve_optimum(
    capacity: np.ndarray | Sequence[Sequence[int]],
    *,
    target: int,
    cold_start_ticks: int,
    ondemand_cost_ratio: float = 3.0,
    spot_prices: np.ndarray | None = None,
    ondemand_price: float | None = None,
    time_limit: float | None = None,
) -> OptimumResult:
    """Solve the window's integer program. `capacity[z, t]`: zone z's spot capacity at tick t.

    Unit prices by default (spot 1, on-demand `ondemand_cost_ratio`); with `spot_prices` (zones x T
    or zones) and `ondemand_price` the objective is in those prices instead.
    """
    cap = np.asarray(capacity, dtype=np.int64)
    zones, ticks = cap.shape
    cold = max(0, int(cold_start_ticks))
    n = int(target)
    if n <= 0 or ticks == 0:
        empty = np.zeros(ticks, dtype=np.int64)
        timeline = Timeline(empty, empty, empty, np.zeros((zones, ticks), dtype=np.int64))
        return OptimumResult(timeline, np.zeros((zones, ticks), dtype=np.int64), empty, 0.0, "trivial")

    zt = zones * ticks
    # Variable layout: x (zt) | a (zt) | y (T) | b (T).
    x0, a0, y0, b0 = 0, zt, 2 * zt, 2 * zt + ticks
    count = 2 * zt + 2 * ticks

    cost = np.zeros(count)
    if spot_prices is None:
        cost[x0:a0] = 1.0
    else:
        prices = np.broadcast_to(np.asarray(spot_prices, dtype=float).reshape(zones, -1), (zones, ticks))
        cost[x0:a0] = np.nan_to_num(prices, nan=1.0).ravel()
    cost[y0:b0] = ondemand_cost_ratio if ondemand_price is None else ondemand_price

    upper = np.empty(count)
    upper[x0:a0] = np.minimum(cap, n).ravel()
    ready_upper = np.full((zones, ticks), float(n))
    ready_upper[:, :cold] = 0
    upper[a0:y0] = ready_upper.ravel()
    upper[y0:b0] = n
    upper[b0:] = n
    upper[b0 : b0 + min(cold, ticks)] = 0
    integrality = np.zeros(count)
    integrality[x0:a0] = 1
    integrality[y0:b0] = 1

    rows, cols, vals = [], [], []
    row = 0
    scored = np.arange(cold, ticks)
    lags = np.arange(cold + 1)
    # a[z,t] - x[z,t-k] <= 0 and b[t] - y[t-k] <= 0 for k in 0..cold, t >= cold.
    for z in range(zones):
        for k in lags:
            r = row + np.arange(len(scored))
            rows += [r, r]
            cols += [a0 + z * ticks + scored, x0 + z * ticks + scored - k]
            vals += [np.ones(len(scored)), -np.ones(len(scored))]
            row += len(scored)
    for k in lags:
        r = row + np.arange(len(scored))
        rows += [r, r]
        cols += [b0 + scored, y0 + scored - k]
        vals += [np.ones(len(scored)), -np.ones(len(scored))]
        row += len(scored)
    readiness_rows = row
    # sum_z a[z,t] + b[t] >= N for t >= cold.
    for z in range(zones):
        rows.append(row + np.arange(len(scored)))
        cols.append(a0 + z * ticks + scored)
        vals.append(np.ones(len(scored)))
    rows.append(row + np.arange(len(scored)))
    cols.append(b0 + scored)
    vals.append(np.ones(len(scored)))
    row += len(scored)

    # scipy is imported here, not at module level: it costs ~0.5 s, and every CLI start would pay it.
    from scipy import sparse
    from scipy.optimize import Bounds, LinearConstraint, milp

    matrix = sparse.csr_array(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(row, count)
    )
    lower_b = np.concatenate([np.full(readiness_rows, -np.inf), np.full(len(scored), float(n))])
    upper_b = np.concatenate([np.zeros(readiness_rows), np.full(len(scored), np.inf)])
    # Objectives are integers in unit prices: a relative gap of 1e-7 makes the answer exact.
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
    solution = np.rint(result.x).astype(np.int64)
    spot_plan = solution[x0:a0].reshape(zones, ticks)
    ondemand_plan = solution[y0:b0]
    ready = ready_counts(spot_plan, cold) + ready_counts(ondemand_plan, cold)
    timeline = Timeline(ready, spot_plan.sum(axis=0), ondemand_plan, spot_plan, None)
    status = "optimal" if result.status == 0 else str(result.message)
    return OptimumResult(timeline, spot_plan, ondemand_plan, float(result.fun), status)
