"""The request-rate autoscaler: SkyServe's formula, clipping, hysteresis, counter resets, persistence."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from skyhedge.autoscaler import AutoscalerConfig, AutoscalerState, raw_target, request_rate, step

CFG = AutoscalerConfig(
    min_replicas=1,
    max_replicas=5,
    target_qps_per_replica=2.0,
    upscale_delay_seconds=30,
    downscale_delay_seconds=120,
)


def drive(cfg, state, start, seconds, qps, count=0.0, every=5.0):
    t = start
    while t < start + seconds:
        t += every
        count += qps * every
        state = step(cfg, state, t, count)
    return state, t, count


def test_formula_is_ceil_of_qps_over_target_clipped():
    assert raw_target(CFG, 0.0) == 1
    assert raw_target(CFG, 2.0) == 1
    assert raw_target(CFG, 2.1) == 2
    assert raw_target(CFG, 7.9) == 4
    assert raw_target(CFG, 1000) == 5


def test_upscale_waits_for_the_delay():
    state, t, n = drive(CFG, AutoscalerState(), 0, 60, 0.0)
    assert state.target == 1
    state, t, n = drive(CFG, state, t, 25, 7.0, n)  # wish appears, but only for 25 s
    assert state.target == 1 and state.pending is not None and state.pending > 1
    state, t, n = drive(CFG, state, t, 100, 7.0, n)
    assert state.target == 4


def test_short_burst_does_not_scale():
    state, t, n = drive(CFG, AutoscalerState(), 0, 60, 0.0)
    state, t, n = drive(CFG, state, t, 10, 50.0, n)
    state, t, n = drive(CFG, state, t, 200, 0.0, n)
    assert state.target == 1


def test_downscale_uses_the_longer_delay():
    state, t, n = drive(CFG, AutoscalerState(target=4), 0, 60, 7.0)
    state, t, n = drive(CFG, state, t, 100, 0.0, n)  # window drains after 60 s, delay 120 s not reached
    assert state.target == 4
    state, t, n = drive(CFG, state, t, 200, 0.0, n)
    assert state.target == 1


def test_counter_reset_starts_the_window_over():
    state, t, n = drive(CFG, AutoscalerState(), 0, 60, 1.0)
    state = step(CFG, state, t + 5, 3)  # nginx restarted: the counter went down
    assert state.samples == ((t + 5, 3.0),)
    assert state.target == 1


def test_missing_reading_keeps_target():
    state = step(CFG, AutoscalerState(target=3), 10, None)
    assert state.target == 3


def test_disabled_without_target_qps():
    cfg = AutoscalerConfig(2, 2, None, 0, 0)
    assert step(cfg, AutoscalerState(), 0, 100).target == 2


def test_state_round_trips_json():
    state, _, _ = drive(CFG, AutoscalerState(), 0, 40, 7.0)
    assert AutoscalerState.from_json(state.to_json()) == state
    assert AutoscalerState.from_json({"samples": "bad"}) == AutoscalerState()
    assert AutoscalerState.from_json(None) == AutoscalerState()


def test_rate_needs_a_span():
    assert request_rate(((0.0, 0.0),)) is None
    assert request_rate(((0.0, 0.0), (0.5, 10.0))) is None
    assert request_rate(((0.0, 0.0), (10.0, 50.0))) == 5.0


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.floats(0.1, 30), st.floats(0, 100)), min_size=1, max_size=60))
def test_target_always_within_bounds(steps):
    state, t, n = AutoscalerState(), 0.0, 0.0
    for dt, qps in steps:
        t += dt
        n += qps * dt
        state = step(CFG, state, t, n)
        assert CFG.min_replicas <= state.target <= CFG.max_replicas
