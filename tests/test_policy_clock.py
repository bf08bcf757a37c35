"""A market replay (`up --market-trace --speedup K`) runs the market K times as fast as real time;
the policy's clock runs as fast, so that its timers (the `skyhedge` policy's hazard, settle and
wave times) are counted in trace time, as `simulate` counts them. The state keeps real times."""

from __future__ import annotations

from pathlib import Path

import pytest

from skyhedge.policy import EventKind, Location, Market, Observation, ReplicaFact, ZoneEvent
from skyhedge.service import PolicyClock, compute_plan, remember_decision
from skyhedge.spec import load_spec
from skyhedge.state import ReplicaRecord, ServiceState

FOUR_ZONES = """
name: echo
placement: {clouds: [local], zones: [local-a, local-b, local-c, local-d]}
replica_policy: {min_replicas: 3}
run: {command: python3 server.py}
"""


@pytest.fixture
def spec(tmp_path: Path):
    path = tmp_path / "service.yaml"
    path.write_text(FOUR_ZONES)
    return load_spec(path)


def three_ready_spot() -> ServiceState:
    state = ServiceState(service="echo", next_id=4)
    for i, zone in enumerate(["local-a", "local-b", "local-c"], start=1):
        state.replicas[f"r-{i:04d}"] = ReplicaRecord(
            f"r-{i:04d}",
            "local",
            "local",
            zone,
            "spot",
            launched_at=990.0,
            provisioned_at=991.0,
            ready_at=995.0,
        )
    return state


def decide(spec, state: ServiceState, now: float, clock: PolicyClock | None):
    plan, memory = compute_plan(spec, state, now=now, clock=clock)
    remember_decision(state, memory, now)
    return plan


def creates(plan) -> list[tuple[str, str]]:
    return sorted((r.location.zone, r.market.value) for r in plan.replicas if r.action == "create")


def test_the_hedge_is_released_after_hours_of_trace_calm_not_hours_of_real_time(spec):
    """Three READY spot replicas in a four-zone market: the extra replica (and its on-demand
    stand-in) is wanted at first, and released after about 8 h of calm (rule 2). One real hour of
    a replay at speedup 36 is 36 h of trace: released; without the replay's clock, one hour of
    real calm is not enough."""
    replay, real = three_ready_spot(), three_ready_spot()
    clock = PolicyClock(origin=1000.0, rate=36.0)
    hedged = [("local-a", "on-demand"), ("local-d", "spot")]
    assert creates(decide(spec, replay, 1000.0, clock)) == hedged
    assert creates(decide(spec, real, 1000.0, None)) == hedged
    # an hour later: on the replay's clock the extra is released (the replicas start to gather)
    assert creates(decide(spec, replay, 4600.0, clock)) == [("local-a", "spot")]
    assert creates(decide(spec, real, 4600.0, None)) == hedged


def test_the_memory_is_kept_in_policy_time_with_its_clock_and_not_read_on_another(spec):
    state = three_ready_spot()
    clock = PolicyClock(origin=1000.0, rate=36.0)
    decide(spec, state, 1000.0, clock)
    decide(spec, state, 1010.0, clock)
    assert state.policy_memory["clock"] == [1000.0, 36.0]
    assert state.policy_memory["memory"]["last_now"] == 1000.0 + 10 * 36  # policy time, not real
    # the replay ended: real time again; memory dated on the replay's clock would lie hours ahead
    decide(spec, state, 1020.0, None)
    assert "clock" not in state.policy_memory
    assert state.policy_memory["memory"]["start"] == 1020.0  # started afresh
    # a new replay (another origin) does not read the real-time memory either
    decide(spec, state, 1030.0, PolicyClock(origin=1030.0, rate=60.0))
    assert state.policy_memory["memory"]["start"] == 1030.0
    assert state.policy_memory["clock"] == [1030.0, 60.0]


def test_every_time_the_policy_sees_is_mapped_and_only_those():
    clock = PolicyClock(origin=100.0, rate=10.0)
    a = Location("local", "local", "local-a")
    fact = ReplicaFact("r-0001", a, Market.SPOT, launched_at=90.0, provisioned_at=101.0, ready_at=102.0)
    gone = ReplicaFact("r-0002", a, Market.SPOT, launched_at=100.0, gone_at=105.0, reason="preempted")
    obs = Observation(
        now=110.0,
        target=3,
        candidates=(),
        replicas=(fact, gone),
        events=(ZoneEvent(EventKind.PREEMPTED, a, 105.0, "r-0002"),),
    )
    seen = clock.observe(obs)
    assert seen.now == 200.0 and seen.target == 3
    assert (seen.replicas[0].launched_at, seen.replicas[0].provisioned_at, seen.replicas[0].ready_at) == (
        0.0,
        110.0,
        120.0,
    )
    assert seen.replicas[0].not_ready_since is None and seen.replicas[0].gone_at is None
    assert (seen.replicas[1].gone_at, seen.replicas[1].reason) == (150.0, "preempted")
    assert [(e.at, e.replica_id) for e in seen.events] == [(150.0, "r-0002")]
    assert PolicyClock(origin=100.0).observe(obs) == obs  # rate 1: real time


@pytest.mark.parametrize("jump", [7200.0, -7200.0])
def test_a_wall_clock_step_during_a_replay_leaves_the_policys_decisions_as_they_were(spec, jump):
    """A replay's policy reads controller time t as origin + (t - origin) * rate. A wall clock
    stepped by J during it (NTP, an operator) moves the state's times by J (`facts.shift_times`)
    and the policy's memory by J * rate (`shift_policy_memory`), the origin staying where it is:
    the policy's clock then moves by J * rate too, and every age it reads is what it was. (Moving
    the origin with the jump as well, as for another stored time, would read every remembered
    time (rate - 1) * J off: 70 h at speedup 36 after a 2 h step.) Measured with the controller's
    `_follow_clock` on the `skyhedge` policy: 0 of 60 passes decided otherwise for +-2 h at
    speedups 36 and 600."""
    from skyhedge.controller.facts import shift_times
    from skyhedge.service import shift_policy_memory

    still, stepped = three_ready_spot(), three_ready_spot()
    clock = PolicyClock(origin=1000.0, rate=36.0)
    hedged = [("local-a", "on-demand"), ("local-d", "spot")]
    for state in (still, stepped):
        assert creates(decide(spec, state, 1000.0, clock)) == hedged
        assert creates(decide(spec, state, 1010.0, clock)) == hedged
    # the step, as the controller follows it (`Controller._follow_clock`) at its next pass
    now = 1015.0 + jump
    moved = (lambda t: t <= 1015.0) if jump > 0 else (lambda t: now < t <= 1015.0)
    assert shift_times(stepped, jump, moved) > 0
    assert shift_policy_memory(spec, stepped, jump, moved, clock=clock) > 0
    memory = stepped.policy_memory["memory"]["last_now"]
    assert memory == still.policy_memory["memory"]["last_now"] + 36 * jump  # policy time: rate times as far
    assert creates(decide(spec, stepped, now, clock)) == creates(decide(spec, still, 1015.0, clock)) == hedged
    # later: the same decisions; an hour on (36 h of trace) both release the extra, neither sooner
    for later in (1000.0, 3585.0):
        assert creates(decide(spec, stepped, now + later, clock)) == creates(
            decide(spec, still, 1015.0 + later, clock)
        )
    assert creates(decide(spec, still, 4700.0, clock)) == [("local-a", "spot")]
