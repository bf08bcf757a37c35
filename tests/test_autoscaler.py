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


#: An upscale delay longer than a short burst plus the rate's window (60 s): the wish a 10 s
#: burst makes lasts about 70 s (CFG's 30 s delay scales on it; so does SkyServe's, were its
#: delay that short).
PATIENT = AutoscalerConfig(1, 5, 2.0, upscale_delay_seconds=120, downscale_delay_seconds=120)


def targets(cfg, state, start, seconds, qps, count=0.0, every=5.0):
    """`drive`, also returning the target after every sample."""
    seen = []
    for _ in range(int(seconds // every)):
        state, start, count = drive(cfg, state, start, every, qps, count, every)
        seen.append(state.target)
    return state, start, count, seen


def test_short_burst_does_not_scale():
    state, t, n = drive(PATIENT, AutoscalerState(), 0, 60, 0.0)
    state, t, n, burst = targets(PATIENT, state, t, 10, 50.0, n)
    state, t, n, after = targets(PATIENT, state, t, 200, 0.0, n)
    assert set(burst + after) == {1}


def test_two_short_bursts_minutes_apart_do_not_add_up_to_a_long_one():
    """A wish that went away is forgotten: the next one waits its whole delay again."""
    state, t, n = drive(PATIENT, AutoscalerState(), 0, 60, 0.0)
    state, t, n = drive(PATIENT, state, t, 10, 50.0, n)
    assert state.pending is not None
    state, t, n = drive(PATIENT, state, t, 200, 0.0, n)
    assert state.pending is None
    state, t, n, burst = targets(PATIENT, state, t, 10, 50.0, n)
    state, t, n, after = targets(PATIENT, state, t, 100, 0.0, n)
    assert set(burst + after) == {1}


def test_a_wish_held_exactly_its_delay_is_adopted():
    state = AutoscalerState()
    for now, count in ((0.0, 0.0), (10.0, 0.0), (20.0, 100.0)):
        state = step(CFG, state, now, count)
    assert state.target == 1 and state.pending == 3 and state.pending_since == 20.0
    state = step(CFG, state, 20.0 + CFG.upscale_delay_seconds, 250.0)
    assert state.target == 3 and state.pending is None


def test_a_wish_in_the_other_direction_waits_its_own_delay():
    """A lull wished the service smaller for 90 s (of a 120 s delay); a burst then wishes it larger:
    that wish starts now, not when the lull's did."""
    state = AutoscalerState(target=4)
    for now in (0.0, 10.0, 100.0):
        state = step(CFG, state, now, 0.0)
    assert state.target == 4 and state.pending == 1 and state.pending_since == 10.0
    state = step(CFG, state, 105.0, 2000.0)
    assert state.target == 4 and state.pending == 5 and state.pending_since == 105.0


def test_the_rate_spans_the_whole_window_when_samples_are_sparse():
    """The watcher samples on events, not on a clock: a sample at or before the window's start is
    kept, so 600 requests over the last 100 s are 6 req/s, not 600 over the last 50 s."""
    state = AutoscalerState()
    for now, count in ((0.0, 0.0), (50.0, 0.0), (100.0, 600.0)):
        state = step(CFG, state, now, count)
    assert state.qps == 6.0


def test_a_rate_that_is_an_exact_multiple_of_the_target_needs_no_replica_more():
    cfg = AutoscalerConfig(1, 10, 1.4, 0, 0)
    assert 4.2 / 1.4 > 3  # binary floating point: 3.0000000000000004
    assert raw_target(cfg, 4.2) == 3


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
