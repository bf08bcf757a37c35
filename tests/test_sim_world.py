"""The simulated world on tiny hand-made traces whose outcome is worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skyhedge.errors import PolicyError
from skyhedge.policy import (
    Candidate,
    EventKind,
    LaunchSpot,
    Location,
    Observation,
    Policy,
    PolicyConfig,
    make_policy,
)
from skyhedge.simulator.optimum import ready_counts
from skyhedge.simulator.world import World, score

A = Location("aws", "us-east-1", "us-east-1a")
B = Location("aws", "us-west-2", "us-west-2a")
C = Location("aws", "us-west-2", "us-west-2b")


def world(capacity, *, target=1, cold=1, zones=(A, B, C), record=True):
    candidates = [Candidate(z, 1.0, 3.0) for z in zones[: len(capacity)]]
    return World(candidates, capacity, target=target, cold_start_ticks=cold, record_zones=record)


def test_cold_start_and_ondemand_handover():
    # 1 zone, plenty of capacity, N=1, extra 0, cold start 2 ticks.
    # t0: 1 spot + 1 on-demand launched (no spot READY) -> both READY at t2;
    # t3: the policy sees the READY spot and lets the on-demand one go.
    timeline = world([[5] * 6], cold=2).run(make_policy("spothedge", PolicyConfig(num_overprovision=0)))
    assert timeline.ready.tolist() == [0, 0, 2, 1, 1, 1]
    assert timeline.spot.tolist() == [1] * 6
    assert timeline.ondemand.tolist() == [1, 1, 1, 0, 0, 0]
    result = score(timeline, target=1, start=2, ondemand_cost_ratio=3)
    assert result.availability == 1.0
    assert result.relative_cost == pytest.approx((4 + 3 * 1) / (1 * 3 * 4))


def test_preemption_then_fallback_covers_after_its_own_cold_start():
    # Capacity disappears at t5: the spot replica is preempted; the policy learns it at t6 and
    # launches on-demand, READY at t8 (cold start 2): ticks 5, 6, 7 are unavailable.
    timeline = world([[2] * 5 + [0] * 7], cold=2).run(
        make_policy("spothedge", PolicyConfig(num_overprovision=0))
    )
    assert timeline.ready.tolist() == [0, 0, 2, 1, 1, 0, 0, 0, 1, 1, 1, 1]
    assert timeline.ondemand.tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert timeline.preemptions == 1
    assert timeline.launch_failures == 6  # t6..t11: the one zone is retried every tick and refused
    result = score(timeline, target=1, start=2, ondemand_cost_ratio=3)
    assert result.availability == pytest.approx(7 / 10)
    assert result.relative_cost == pytest.approx((3 + 3 * 7) / (3 * 10))


def test_capping_failed_launches_and_the_reset_rule_by_hand():
    # N=1, extra 1 (2 spot wanted), cold 1, zones A (capacity 1, none at t4..t7) and B (never any).
    # t0: spot to A (ok) and B (refused); on-demand 1.   t1: A ACTIVE, B PREEMPTED; the 2nd spot
    # goes to A again (cheapest ACTIVE) and is cut: A PREEMPTED.   t2: none ACTIVE -> reset; B
    # refused ...   t4: A's replica is preempted.   t5..t7: both refused every tick.   t8: A again.
    a = [1, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    b = [0] * 10
    timeline = world([a, b], cold=1).run(make_policy("spothedge", PolicyConfig(num_overprovision=1)))
    assert timeline.spot_by_zone is not None
    assert timeline.spot_by_zone.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0, 1, 1], [0] * 10]
    assert timeline.ondemand.tolist() == [1] * 10
    assert timeline.ready.tolist() == [0, 2, 2, 2, 1, 1, 1, 1, 1, 2]
    assert timeline.preemptions == 1
    assert timeline.launch_failures == 13
    result = score(timeline, target=1, start=1, ondemand_cost_ratio=3)
    assert result.availability == 1.0
    assert result.relative_cost == pytest.approx((5 + 3 * 9) / (3 * 9))


def test_ondemand_only_costs_exactly_one():
    timeline = world([[0, 1, 2, 3] * 5], target=3, cold=4).run(make_policy("ondemand"))
    result = score(timeline, target=3, start=4, ondemand_cost_ratio=3)
    assert result.availability == 1.0 and result.relative_cost == 1.0


class Spy(Policy):
    """Launches one spot replica per tick into zone A and records what it was shown."""

    name = "spy"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[Observation] = []

    def decide(self, obs):
        self.seen.append(obs)
        return [LaunchSpot(obs.candidates[0].location)]


def test_events_and_observations_speak_the_controllers_language():
    spy = Spy()
    w = world([[1, 2, 1, 1]], cold=1)
    w.run(spy)
    kinds = [[e.kind for e in obs.events] for obs in spy.seen]
    assert kinds[0] == []
    assert kinds[1] == [EventKind.LAUNCHED]  # t0: launched into capacity 1
    assert kinds[2] == [EventKind.LAUNCHED, EventKind.SURVIVED]  # t1: capacity 2
    # t2: capacity 1 keeps the oldest; the newest goes first (the fresh launch, then r-0002)
    assert kinds[3] == [EventKind.SURVIVED, EventKind.LAUNCH_FAILED, EventKind.PREEMPTED]
    assert [obs.now for obs in spy.seen] == [0, 30, 60, 90]
    assert [len(obs.replicas) for obs in spy.seen] == [0, 1, 2, 1]
    # cold start 1 tick: READY at t1 (scored), which the policy sees at t2, as the paper uses t-1
    assert [sum(r.ready for r in obs.replicas) for obs in spy.seen] == [0, 0, 1, 1]
    assert spy.seen[2].replicas[0].status.value == "READY"


def test_a_launch_outside_the_candidates_is_a_policy_error():
    class Stray(Policy):
        name = "stray"

        def decide(self, obs):
            return [LaunchSpot(Location("gcp", "x", "x-a"))]

    with pytest.raises(PolicyError, match="not a candidate"):
        world([[1, 1]]).run(Stray())


@settings(max_examples=80, deadline=None)
@given(
    capacity=st.integers(1, 3).flatmap(
        lambda z: st.integers(6, 24).flatmap(
            lambda t: st.lists(st.lists(st.integers(0, 3), min_size=t, max_size=t), min_size=z, max_size=z)
        )
    ),
    name=st.sampled_from(["spothedge", "skyserve", "even", "rr", "single-region", "ondemand"]),
    cold=st.integers(0, 3),
    target=st.integers(1, 3),
    extra=st.integers(0, 2),
)
def test_per_replica_readiness_equals_the_papers_per_zone_rule(capacity, name, cold, target, extra):
    """Cutting newest first makes READY replicas = min of each zone's count over [t-cold, t]."""
    timeline = world(capacity, target=target, cold=cold).run(
        make_policy(name, PolicyConfig(num_overprovision=extra))
    )
    assert timeline.spot_by_zone is not None
    assert (timeline.spot_by_zone <= np.asarray(capacity)).all()
    expected = ready_counts(timeline.spot_by_zone, cold) + ready_counts(timeline.ondemand, cold)
    assert timeline.ready.tolist() == expected.tolist()
