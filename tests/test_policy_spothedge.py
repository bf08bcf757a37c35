"""SpotHedge / SkyServe and the baselines: hand-worked cases and hypothesis properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skyhedge.errors import PolicyError
from skyhedge.policy import (
    Candidate,
    EventKind,
    LaunchOnDemand,
    LaunchSpot,
    Location,
    Market,
    Observation,
    PolicyConfig,
    ReplicaFact,
    Terminate,
    ZoneEvent,
    make_policy,
)
from skyhedge.policy.spothedge import SkyServe, SpotHedge, fallback_targets, pick_victims

ZONES = [Location("aws", f"r{i // 2}", f"r{i // 2}{'ab'[i % 2]}") for i in range(8)]
A, B, C, D = ZONES[:4]


def cands(*locations: Location, prices: list[float] | None = None, od: list[float] | None = None):
    prices = prices or [1.0] * len(locations)
    od = od or [3.0] * len(locations)
    return tuple(Candidate(loc, p, o) for loc, p, o in zip(locations, prices, od, strict=True))


def spot(rid: str, loc: Location, at: float = 0.0, ready: bool = True) -> ReplicaFact:
    return ReplicaFact(rid, loc, Market.SPOT, at, at, at if ready else None)


def od(rid: str, loc: Location, at: float = 0.0, ready: bool = True) -> ReplicaFact:
    return ReplicaFact(rid, loc, Market.ON_DEMAND, at, at, at if ready else None)


def ev(kind: EventKind, loc: Location) -> ZoneEvent:
    return ZoneEvent(kind, loc, 0.0)


def launches(decisions, kind=LaunchSpot):
    return [d.location for d in decisions if isinstance(d, kind)]


# -- hand-worked cases ---------------------------------------------------------------------------


def test_first_decision_spreads_spot_and_covers_with_ondemand():
    policy = make_policy("spothedge", PolicyConfig(num_overprovision=1))
    decisions = policy.decide(Observation(0, 3, cands(A, B, C, prices=[2.0, 1.0, 3.0], od=[5, 4, 6])))
    # 4 spot: the three zones cheapest first, then the cheapest ACTIVE again; 3 on-demand in the
    # cheapest on-demand zone (no spot is READY yet: min(3, 4 - 0)).
    assert launches(decisions) == [B, A, C, B]
    assert launches(decisions, LaunchOnDemand) == [B, B, B]


def test_ties_break_by_candidate_order():
    policy = make_policy("spothedge", PolicyConfig(num_overprovision=0))
    assert launches(policy.decide(Observation(0, 2, cands(C, A, B)))) == [C, A]


def test_preempted_zone_is_avoided_until_a_replica_survives_there():
    policy = SpotHedge(PolicyConfig(num_overprovision=0))
    zones = cands(A, B, C, D)
    live = (spot("r1", B), spot("r2", C))
    decisions = policy.decide(Observation(0, 3, zones, live, (ev(EventKind.PREEMPTED, A),)))
    assert launches(decisions) == [D]  # A is PREEMPTED, B and C hold replicas
    assert policy.zone_status(zones)[A] == "PREEMPTED"
    policy.decide(Observation(30, 3, zones, live + (spot("r3", D),), (ev(EventKind.SURVIVED, A),)))
    assert policy.zone_status(zones)[A] == "ACTIVE"


def test_skyserve_trusts_a_zone_again_only_after_a_successful_launch():
    policy = SkyServe(PolicyConfig(num_overprovision=0))
    zones = cands(A, B, C, D)
    policy.decide(Observation(0, 3, zones, (), (ev(EventKind.LAUNCH_FAILED, A),)))
    policy.decide(Observation(30, 3, zones, (), (ev(EventKind.SURVIVED, A),)))
    assert policy.zone_status(zones)[A] == "PREEMPTED"
    policy.decide(Observation(60, 3, zones, (), (ev(EventKind.LAUNCHED, A),)))
    assert policy.zone_status(zones)[A] == "ACTIVE"


def test_bad_news_after_good_news_in_one_batch_leaves_the_zone_preempted():
    policy = SpotHedge()
    zones = cands(A, B, C, D)
    policy.decide(Observation(0, 1, zones, (), (ev(EventKind.SURVIVED, A), ev(EventKind.PREEMPTED, A))))
    assert policy.zone_status(zones)[A] == "PREEMPTED"


@pytest.mark.parametrize(
    ("cls", "n_zones", "marked", "reset"),
    [
        (SpotHedge, 3, 2, False),  # the paper's simulator: with 3 zones, reset only when none is ACTIVE
        (SpotHedge, 3, 3, True),
        (SpotHedge, 4, 2, False),
        (SpotHedge, 4, 3, True),  # 4+ zones: fewer than 2 ACTIVE -> all ACTIVE
        (SkyServe, 3, 2, True),  # SkyPilot: fewer than 2 ACTIVE -> all ACTIVE, whatever the count
        (SkyServe, 4, 2, False),
        (SkyServe, 4, 3, True),
    ],
)
def test_reset_rule(cls, n_zones, marked, reset):
    policy = cls()
    zones = cands(*ZONES[:n_zones])
    events = tuple(ev(EventKind.PREEMPTED, z) for z in ZONES[:marked])
    policy.decide(Observation(0, 1, zones, (), events))
    status = policy.zone_status(zones)
    assert all(s == "ACTIVE" for s in status.values()) is reset


def test_ondemand_goes_away_as_spot_becomes_ready_newest_first():
    policy = SpotHedge(PolicyConfig(num_overprovision=1))
    zones = cands(A, B, C)
    spots = (spot("s1", A), spot("s2", B), spot("s3", C, ready=False), spot("s4", A, ready=False))
    ods = (od("o1", A, 0), od("o2", A, 10), od("o3", A, 20, ready=False))
    decisions = policy.decide(Observation(30, 3, zones, spots + ods))
    # 2 READY spot of 4 wanted: on-demand = min(3, 4 - 2) = 2; the not-ready one goes first.
    assert decisions == [Terminate("o3")]
    ready_spots = tuple(spot(r.id, r.location) for r in spots)
    decisions = policy.decide(Observation(60, 3, zones, ready_spots + ods[:2]))
    assert decisions == [Terminate("o2"), Terminate("o1")]  # 4 READY spot: no on-demand, newest first


def test_a_spot_replica_failing_its_probes_is_covered_by_on_demand_like_one_not_ready_yet():
    """READY once but failing its probes now (NOT_READY), it serves nothing: the dynamic fallback
    stands an on-demand replica in for it, as for a spot replica still starting."""
    policy = SpotHedge(PolicyConfig(num_overprovision=0))
    failing = ReplicaFact("s2", B, Market.SPOT, 0, 0, 0, not_ready_since=20.0)
    decisions = policy.decide(Observation(30, 2, cands(A, B), (spot("s1", A), failing)))
    assert decisions == [LaunchOnDemand(A)]


def test_fallback_targets_formula():
    cfg = PolicyConfig(num_overprovision=1, base_ondemand_fallback_replicas=1)
    assert fallback_targets(cfg, 3, 0) == (3, 3)  # spot 3+1-1; on-demand 1 + 3, capped at N
    assert fallback_targets(cfg, 3, 2) == (3, 2)
    assert fallback_targets(cfg, 3, 3) == (3, 1)  # the base stays
    assert fallback_targets(PolicyConfig(dynamic_ondemand_fallback=False), 3, 0) == (4, 0)
    assert fallback_targets(cfg, 0, 0) == (0, 0)
    # a rolling update's surge (N = 3 asked as 4): one more spot replica, no more cover
    assert fallback_targets(cfg, 4, 3, surge=1) == (4, 1)  # the base alone: 3 READY serve N
    assert fallback_targets(cfg, 4, 0, surge=1) == (4, 3)  # still capped at the service's N


def test_a_rolling_updates_surge_is_a_spot_replica_with_no_on_demand_stand_in():
    """The controller asks for N + 1 while an outdated replica is replaced (`Observation.surge`):
    that replica is READY and serving, so the starting surge needs no on-demand cover. Asked for
    N + 1 as if the service needed them, SpotHedge bought one per step of every update (measured
    under `watch`, N = 3, five zones: 4 on-demand launches, 480 on-demand replica-seconds, per
    update), each released again once the surge was READY."""
    policy = SpotHedge()
    zones = [Location("aws", "r", f"r{c}") for c in "abcde"]
    serving = tuple(spot(f"s{i}", z) for i, z in enumerate(zones[:4]))  # N + the extra, READY
    decisions = policy.decide(Observation(30, 4, cands(*zones), serving, surge=1))
    assert decisions == [LaunchSpot(zones[4])]
    starting = (*serving, spot("s9", zones[4], at=30, ready=False))
    assert policy.decide(Observation(60, 4, cands(*zones), starting, surge=1)) == []
    # an outdated replica that stopped serving is one the service lacks: covered as ever
    failing = (*starting[1:], ReplicaFact("s0", zones[0], Market.SPOT, 0, 0, 0, not_ready_since=50.0))
    assert policy.decide(Observation(90, 4, cands(*zones), failing, surge=1)) == [LaunchOnDemand(zones[0])]


def test_surplus_spot_is_trimmed_not_ready_and_newest_first():
    replicas = [
        spot("a", A, 0),
        spot("b", B, 10, ready=False),
        spot("c", C, 20),
        spot("d", A, 30, ready=False),
    ]
    assert [r.id for r in pick_victims(replicas, 3)] == ["d", "b", "c"]
    policy = SpotHedge(PolicyConfig(num_overprovision=0))
    assert policy.decide(Observation(0, 1, cands(A, B, C), tuple(replicas[:3]))) == [
        Terminate("b"),
        Terminate("c"),
    ]


def test_snapshot_restore_round_trip_and_bad_snapshot():
    policy = SpotHedge()
    zones = cands(A, B, C, D)
    policy.decide(Observation(0, 1, zones, (), (ev(EventKind.PREEMPTED, B),)))
    data = policy.snapshot()
    assert data == {"preempted": [B.key]}
    other = SpotHedge()
    other.restore(data)
    assert other.zone_status(zones) == policy.zone_status(zones)
    with pytest.raises(PolicyError):
        other.restore({"preempted": ["not-a-location"]})
    with pytest.raises(PolicyError):
        other.restore({"preempted": "aws/r0/r0a"})


def test_draining_replicas_neither_count_nor_hold_their_zone():
    policy = SpotHedge(PolicyConfig(num_overprovision=0))
    draining = ReplicaFact("x", A, Market.SPOT, 0, 0, 0, draining=True)
    decisions = policy.decide(Observation(0, 1, cands(A, B), (draining,)))
    assert decisions == [LaunchSpot(A), LaunchOnDemand(A)]  # A's replica is leaving: a new one is due


def test_no_candidates_means_no_launches():
    assert make_policy("spothedge").decide(Observation(0, 3, ())) == []


# -- baselines -----------------------------------------------------------------------------------


def test_ondemand_only():
    policy = make_policy("ondemand", PolicyConfig(num_overprovision=2))
    decisions = policy.decide(Observation(0, 2, cands(A, B, od=[4, 3]), (spot("s", A),)))
    assert decisions == [Terminate("s"), LaunchOnDemand(B), LaunchOnDemand(B)]


def test_even_spread_fills_the_emptiest_zone_in_order():
    policy = make_policy("even", PolicyConfig(num_overprovision=1))
    decisions = policy.decide(Observation(0, 3, cands(A, B, C), (spot("s", A),)))
    assert launches(decisions) == [B, C, A]
    assert launches(decisions, LaunchOnDemand) == []


def test_round_robin_keeps_its_turn_across_decisions():
    policy = make_policy("rr", PolicyConfig(num_overprovision=0))
    zones = cands(A, B, C)
    assert launches(policy.decide(Observation(0, 2, zones))) == [A, B]
    assert launches(policy.decide(Observation(30, 2, zones, (spot("x", A),)))) == [C]
    assert policy.snapshot() == {"next": 3}


def test_single_region_uses_only_the_cheapest_region():
    policy = make_policy("single-region", PolicyConfig(num_overprovision=0))
    zones = cands(A, B, C, D, prices=[2, 2, 1, 3])  # C is the cheapest: region r1 = {C, D}
    assert launches(policy.decide(Observation(0, 3, zones))) == [C, D, C]


# -- properties ----------------------------------------------------------------------------------

EVENT_KINDS = list(EventKind)


@st.composite
def situations(draw):
    n = draw(st.integers(1, 7))
    zones = ZONES[:n]
    prices = draw(st.lists(st.sampled_from([0.5, 1.0, 1.5, 2.0]), min_size=n, max_size=n))
    odp = draw(st.lists(st.sampled_from([3.0, 4.0]), min_size=n, max_size=n))
    config = PolicyConfig(
        num_overprovision=draw(st.integers(0, 2)),
        base_ondemand_fallback_replicas=draw(st.integers(0, 3)),
        dynamic_ondemand_fallback=draw(st.booleans()),
    )
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        target = draw(st.integers(0, 6))
        replicas = []
        for i in range(draw(st.integers(0, 8))):
            market = draw(st.sampled_from(list(Market)))
            replicas.append(
                ReplicaFact(
                    f"r{i}",
                    draw(st.sampled_from(zones)),
                    market,
                    float(i),
                    0.0,
                    0.0 if draw(st.booleans()) else None,
                )
            )
        events = [
            ZoneEvent(draw(st.sampled_from(EVENT_KINDS)), draw(st.sampled_from(zones)), 0.0)
            for _ in range(draw(st.integers(0, 5)))
        ]
        steps.append(
            Observation(0.0, target, cands(*zones, prices=prices, od=odp), tuple(replicas), tuple(events))
        )
    return config, steps


def _check(policy, obs, decisions):
    config = policy.config
    live_spot = [r for r in obs.replicas if r.market is Market.SPOT]
    live_od = [r for r in obs.replicas if r.market is Market.ON_DEMAND]
    ready_spot = sum(1 for r in live_spot if r.ready)
    spot_target, od_target = fallback_targets(config, obs.target, ready_spot)
    ids = {r.id: r for r in obs.replicas}
    killed = [ids[d.replica_id] for d in decisions if isinstance(d, Terminate)]
    new_spot = launches(decisions)
    new_od = launches(decisions, LaunchOnDemand)
    # counts: after the decisions, exactly the targets (there is always a candidate here); READY
    # surplus spot replicas stay only while READY on-demand replicas do not make up the on-demand
    # target yet (`spot_surplus`)
    kept_spot = [r for r in live_spot if r not in killed]
    if len(live_spot) > spot_target:
        spare = sorted(kept_spot, key=lambda r: (r.ready, -r.launched_at))[: len(kept_spot) - spot_target]
        assert not new_spot and all(r.ready for r in spare)
        assert len(spare) <= max(0, od_target - sum(1 for r in live_od if r.ready))
    else:
        assert len(kept_spot) + len(new_spot) == spot_target
    assert len(live_od) - sum(not r.is_spot for r in killed) + len(new_od) == od_target
    # fallback cap
    assert od_target <= max(obs.target, 0)
    # spread: new spot replicas go to distinct ACTIVE zones not holding one while such zones remain
    status = policy.zone_status(obs.candidates)
    active = [c.location for c in obs.candidates if status[c.location] == "ACTIVE"]
    holding = {r.location for r in live_spot}
    free = [z for z in active if z not in holding]
    first = new_spot[: len(free)]
    assert len(set(first)) == len(first) and set(first) <= set(free)
    assert all(z in active for z in new_spot)
    # reset rule: never fewer ACTIVE zones than the policy tolerates
    assert len(active) >= min(policy.min_active(len(obs.candidates)), len(obs.candidates))


@settings(max_examples=150, deadline=None)
@given(situations(), st.sampled_from([SpotHedge, SkyServe]))
def test_properties_hold_over_random_situations(situation, cls):
    config, steps = situation
    policy = cls(config)
    for obs in steps:
        _check(policy, obs, policy.decide(obs))


@settings(max_examples=60, deadline=None)
@given(situations(), st.sampled_from(["spothedge", "skyserve", "even", "rr", "single-region", "ondemand"]))
def test_decisions_are_deterministic_and_survive_snapshot_restore(situation, name):
    config, steps = situation
    first, second = make_policy(name, config), make_policy(name, config)
    assert [first.decide(o) for o in steps] == [second.decide(o) for o in steps]
    half = len(steps) // 2
    original = make_policy(name, config)
    for obs in steps[:half]:
        original.decide(obs)
    resumed = make_policy(name, config)
    resumed.restore(original.snapshot())
    assert [resumed.decide(o) for o in steps[half:]] == [original.decide(o) for o in steps[half:]]
