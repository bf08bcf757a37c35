"""The omniscient optimum: hand-solved windows, brute force on tiny ones, a bound on policies."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skyhedge.errors import SkyhedgeError
from skyhedge.policy import Candidate, Location, PolicyConfig, make_policy
from skyhedge.simulator.optimum import ready_counts, solve_optimum
from skyhedge.simulator.world import World, score


def test_ready_counts_is_the_minimum_over_the_cold_start():
    assert ready_counts(np.array([1, 2, 2, 1, 2, 2, 2]), 2).tolist() == [0, 0, 1, 1, 1, 1, 2]
    assert ready_counts(np.array([[1, 1], [2, 0]]), 0).tolist() == [3, 1]


def test_plenty_of_capacity_runs_one_spot_replica_from_tick_zero():
    result = solve_optimum([[5] * 6], target=1, cold_start_ticks=2)
    assert result.spot_plan.tolist() == [[1] * 6]
    assert result.ondemand_plan.tolist() == [0] * 6
    assert result.objective == pytest.approx(4)  # the scored ticks' cost (the warm-up is not scored)
    scored = score(result.timeline, target=1, start=2, ondemand_cost_ratio=3)
    assert scored.availability == 1.0 and scored.relative_cost == pytest.approx(4 / 12)


def test_no_capacity_means_on_demand_only():
    result = solve_optimum([[0] * 4, [0] * 4], target=2, cold_start_ticks=1)
    assert result.ondemand_plan.tolist() == [2] * 4
    assert score(result.timeline, target=2, start=1, ondemand_cost_ratio=3).relative_cost == 1.0


def test_a_capacity_gap_is_bridged_by_on_demand_started_a_cold_start_early():
    # Spot ready at t needs x[t-1] = x[t] = 1; the gap at t3, t4 also spoils t5 (x4 = 0).
    # On-demand must be READY at t3..t5, so it runs t2..t5. Spot runs t0..t2 and t5..t9.
    cap = [[1, 1, 1, 0, 0, 1, 1, 1, 1, 1]]
    result = solve_optimum(cap, target=1, cold_start_ticks=1)
    assert result.spot_plan.tolist() == [[1, 1, 1, 0, 0, 1, 1, 1, 1, 1]]
    assert result.ondemand_plan.tolist() == [0, 0, 1, 1, 1, 1, 0, 0, 0, 0]
    assert result.objective == pytest.approx(7 + 3 * 4)
    scored = score(result.timeline, target=1, start=1, ondemand_cost_ratio=3)
    assert scored.availability == 1.0
    assert scored.relative_cost == pytest.approx((7 + 3 * 4) / 27)


def brute_force(cap, target, cold, ratio=3.0):
    cap = np.asarray(cap)
    zones, ticks = cap.shape
    spot_choices = [range(min(int(c), target) + 1) for c in cap.ravel()]
    best = None
    for xs in itertools.product(*spot_choices):
        x = np.asarray(xs).reshape(zones, ticks)
        spot_ready = ready_counts(x, cold)
        for ys in itertools.product(range(target + 1), repeat=ticks):
            y = np.asarray(ys)
            ready = spot_ready + ready_counts(y, cold)
            if (ready[cold:] >= target).all():
                cost = x[:, cold:].sum() + ratio * y[cold:].sum()  # the scored ticks
                best = cost if best is None else min(best, cost)
    return best


@settings(max_examples=12, deadline=None)
@given(
    shape=st.sampled_from([(1, 5, 2), (2, 4, 1)]),
    data=st.data(),
    cold=st.integers(0, 2),
)
def test_matches_brute_force_on_tiny_windows(shape, data, cold):
    zones, ticks, target = shape
    cap = data.draw(
        st.lists(st.lists(st.integers(0, 2), min_size=ticks, max_size=ticks), min_size=zones, max_size=zones)
    )
    cold = min(cold, ticks - 1)
    result = solve_optimum(cap, target=target, cold_start_ticks=cold)
    assert result.objective == pytest.approx(brute_force(cap, target, cold))
    assert (result.spot_plan <= np.asarray(cap)).all()


@settings(max_examples=25, deadline=None)
@given(
    cap=st.lists(st.lists(st.integers(0, 3), min_size=20, max_size=20), min_size=1, max_size=3),
    name=st.sampled_from(["spothedge", "skyserve", "ondemand", "rr"]),
)
def test_no_policy_that_is_always_available_costs_less(cap, name):
    zones = [Location("aws", "us-east-1", f"us-east-1{c}") for c in "abc"[: len(cap)]]
    world = World([Candidate(z, 1.0, 3.0) for z in zones], cap, target=2, cold_start_ticks=2)
    timeline = world.run(make_policy(name, PolicyConfig(num_overprovision=1)))
    optimum = solve_optimum(cap, target=2, cold_start_ticks=2)
    assert score(optimum.timeline, target=2, start=2, ondemand_cost_ratio=3).availability == 1.0
    if score(timeline, target=2, start=2, ondemand_cost_ratio=3).availability == 1.0:
        policy_cost = timeline.spot[2:].sum() + 3 * timeline.ondemand[2:].sum()
        assert optimum.objective <= policy_cost + 1e-6


def _plan_cost(result, prices, cold, ratio=3.0):
    return float((result.spot_plan * prices)[:, cold:].sum() + ratio * result.ondemand_plan[cold:].sum())


def _draw_prices(data, zones):
    choices = st.sampled_from([0.5, 0.8, 1.0, 1.3])
    return np.asarray(data.draw(st.lists(choices, min_size=zones, max_size=zones)))


def _solve_both(cap, target, cold, prices):
    """The default answer and HiGHS's, after checking the default one is HiGHS's optimum and a
    feasible plan that costs what it claims."""
    auto = solve_optimum(cap, target=target, cold_start_ticks=cold, spot_prices=prices)
    exact = solve_optimum(cap, target=target, cold_start_ticks=cold, spot_prices=prices, method="milp")
    assert auto.objective == pytest.approx(exact.objective)
    unit = np.ones((len(cap), 1)) if prices is None else prices.reshape(len(cap), 1)
    assert _plan_cost(auto, unit, cold) == pytest.approx(auto.objective)  # the plan is what it claims
    assert (auto.spot_plan <= np.minimum(cap, target)).all()
    assert (auto.timeline.ready[cold:] >= target).all()
    return auto, exact


@settings(max_examples=60, deadline=None)
@given(data=st.data(), target=st.integers(1, 3), cold=st.integers(0, 4), priced=st.booleans())
def test_where_capacity_never_binds_the_shortest_path_equals_the_integer_program(data, target, cold, priced):
    # Availability traces (a zone has room for all N or none) and pools never between 1 and N - 1.
    zones = data.draw(st.integers(1, 3))
    ticks = data.draw(st.integers(cold + 1, 40))
    room = data.draw(st.sampled_from([10**6, target, target + 2]))
    cap = (
        np.asarray(
            data.draw(
                st.lists(
                    st.lists(st.booleans(), min_size=ticks, max_size=ticks), min_size=zones, max_size=zones
                )
            ),
            dtype=np.int64,
        )
        * room
    )
    prices = _draw_prices(data, zones) if priced else None
    fast, exact = _solve_both(cap, target, cold, prices)
    assert (fast.method, exact.method) == ("runs", "milp")


@settings(max_examples=60, deadline=None)
@given(data=st.data(), target=st.integers(2, 3), cold=st.integers(0, 4), priced=st.booleans())
def test_where_capacity_binds_the_auto_answer_is_still_the_integer_programs(data, target, cold, priced):
    # Finite pools: the bound check may answer by shortest path, but only with the true optimum.
    zones = data.draw(st.integers(1, 4))
    ticks = data.draw(st.integers(cold + 1, 30))
    cap = np.asarray(
        data.draw(
            st.lists(
                st.lists(st.integers(0, target + 1), min_size=ticks, max_size=ticks),
                min_size=zones,
                max_size=zones,
            )
        ),
        dtype=np.int64,
    )
    prices = _draw_prices(data, zones) if priced else None
    _solve_both(cap, target, cold, prices)


def test_a_finite_window_with_a_roomy_zone_throughout_skips_the_integer_program():
    # A dozen finite zones took HiGHS one to two minutes per window; one zone with room for N
    # all along makes the relaxation's bound reachable, so the shortest path answers exactly.
    rng = np.random.default_rng(0)
    cap = rng.integers(0, 3, size=(12, 2880))
    cap[5] = 3
    result = solve_optimum(cap, target=3, cold_start_ticks=4)
    assert result.method == "runs" and result.objective == pytest.approx(3 * (2880 - 4))
    assert result.spot_plan[5].tolist() == [3] * 2880


def test_an_infinite_spot_price_is_refused_not_overflowed():
    # it became the largest float, and the shortest path's running sums overflowed
    with pytest.raises(SkyhedgeError, match="finite"):
        solve_optimum([[1, 1], [2, 2]], target=2, cold_start_ticks=1, spot_prices=np.array([[np.inf], [1.0]]))


def test_a_zone_with_room_for_fewer_than_n_is_left_to_the_integer_program():
    # Room for 1 of 2: one zone cannot hold every replica, so the copies are not independent.
    assert solve_optimum([[1, 1, 1, 1], [2, 2, 0, 0]], target=2, cold_start_ticks=1).method == "milp"
    assert solve_optimum([[2, 2, 2, 2], [2, 2, 0, 0]], target=2, cold_start_ticks=1).method == "runs"


def test_switching_zones_pays_both_during_the_cold_start():
    # Zone a until t4, zone b from t3: the replica in b starts at t4, ready at t5 when a is gone;
    # the two overlap one tick (the cold start), cheaper than any on-demand bridge.
    cap = [[1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1]]
    result = solve_optimum(cap, target=1, cold_start_ticks=1)
    assert result.method == "runs"
    assert result.spot_plan.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]]
    assert result.ondemand_plan.tolist() == [0] * 8
    assert result.objective == pytest.approx(8)  # from t1: a over t1..t4, b over t4..t7


def test_the_unscored_warm_up_never_buys_a_dearer_scored_window():
    """A zone that empties just after the cold start: spot through the warm-up and on-demand from
    tick 4 cost less over the whole window (8 + 3 x 26) than on-demand alone (90), but more over
    the scored ticks (82 against 78). The optimum is the cheapest scored window: on-demand alone."""
    cap = [[1] * 8 + [0] * 22]
    for method in ("auto", "milp"):
        result = solve_optimum(cap, target=1, cold_start_ticks=4, method=method)
        scored = score(result.timeline, target=1, start=4, ondemand_cost_ratio=3)
        assert scored.availability == 1.0 and scored.relative_cost == pytest.approx(1.0)
        assert result.objective == pytest.approx(78)


def test_an_unknown_method_is_refused():
    with pytest.raises(SkyhedgeError, match="method"):
        solve_optimum([[1, 1]], target=1, cold_start_ticks=0, method="greedy")


def test_the_integer_program_keeps_two_rows_per_zone_and_tick_whatever_the_cold_start(monkeypatch):
    """Readiness written as "a <= x[t - k] for k = 0..cold" took cold + 1 rows per zone and tick:
    HiGHS spent 207-333 s in the root LP of one day of a 16-zone market (0-8 per pool), which
    the launch-based rows (two per zone and tick, the same optimum) solve in 12 s (found by an
    audit: `simulate --policy optimal` on a 60-day 16-zone trace went from 4 min 56 s to 21 s)."""
    import scipy.optimize

    shapes: list[tuple[int, int]] = []
    solve = scipy.optimize.milp

    def milp(cost, *, constraints, **kwargs):
        shapes.append(constraints.A.shape)
        return solve(cost, constraints=constraints, **kwargs)

    monkeypatch.setattr(scipy.optimize, "milp", milp)
    zones, ticks = 3, 40
    cap = np.tile([[2, 1, 0, 2, 2], [0, 2, 2, 1, 0], [1, 1, 2, 0, 2]], (1, ticks // 5))
    for cold in (1, 4, 12):
        result = solve_optimum(cap, target=3, cold_start_ticks=cold, method="milp")
        assert (result.timeline.ready[cold:] >= 3).all()
        rows, _ = shapes[-1]
        kinds = zones + 1  # and on demand
        assert rows == kinds * ticks + kinds * (ticks - cold) + (ticks - cold)
