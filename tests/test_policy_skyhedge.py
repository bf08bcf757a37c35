"""SkyHedge: budget properties (hypothesis), determinism, snapshot round trips, worked scenarios.

The properties drive the policy through a tiny fake cloud defined here (per-zone capacity per
tick, newest replicas cut first, a fixed cold start, optional interruption warnings), so they do
not depend on the simulator's internals.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, given, settings
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
from skyhedge.policy.skyhedge import HAZARD_SCALE, PRIOR_AGE_SECONDS, SkyHedge, hazard

TICK = 30.0
HOUR = 3600.0


def zones(count: int) -> list[Location]:
    # two zones per region, so region structure exists
    return [
        Location("aws", f"us-test-{z // 2 + 1}", f"us-test-{z // 2 + 1}{'abcd'[z % 2]}") for z in range(count)
    ]


@dataclass
class FakeCloud:
    """Capacity per zone per tick; cuts the newest spot replicas first; READY after `cold` ticks."""

    capacity: list[list[int]]
    cold: int
    warn_ticks: frozenset[int] = frozenset()
    locations: list[Location] = field(init=False)
    candidates: tuple[Candidate, ...] = field(init=False)
    alive: dict[str, ReplicaFact] = field(default_factory=dict)
    launched_tick: dict[str, int] = field(default_factory=dict)
    events: tuple[ZoneEvent, ...] = ()
    doomed: set[str] = field(default_factory=set)
    warned: set[str] = field(default_factory=set)
    next_id: int = 0

    def __post_init__(self) -> None:
        self.locations = zones(len(self.capacity))
        self.candidates = tuple(Candidate(loc, 1.0 + 0.05 * z, 3.0) for z, loc in enumerate(self.locations))

    def observation(self, t: int, target: int) -> Observation:
        return Observation(t * TICK, target, self.candidates, tuple(self.alive.values()), self.events)

    def apply(self, t: int, decisions: list) -> None:
        now = t * TICK
        fresh: set[str] = set()
        for decision in decisions:
            if isinstance(decision, Terminate):
                self.alive.pop(decision.replica_id, None)
            else:
                market = Market.SPOT if isinstance(decision, LaunchSpot) else Market.ON_DEMAND
                self.next_id += 1
                rid = f"r-{self.next_id:04d}"
                self.alive[rid] = ReplicaFact(rid, decision.location, market, now, now)
                self.launched_tick[rid] = t
                fresh.add(rid)
        good: list[ZoneEvent] = []
        bad: list[ZoneEvent] = []
        for rid in sorted(self.doomed & set(self.alive)):  # warned last tick: taken now
            bad.append(ZoneEvent(EventKind.PREEMPTED, self.alive.pop(rid).location, now, rid))
        self.doomed.clear()
        for z, loc in enumerate(self.locations):
            stack = sorted(
                (r for r in self.alive.values() if r.is_spot and r.location == loc),
                key=lambda r: (r.launched_at, r.id),
            )
            cap = self.capacity[z][t]
            for r in stack[cap:]:
                del self.alive[r.id]
                kind = EventKind.LAUNCH_FAILED if r.id in fresh else EventKind.PREEMPTED
                bad.append(ZoneEvent(kind, loc, now, r.id))
            kept = stack[:cap]
            for r in kept:
                if r.id in fresh:
                    good.append(ZoneEvent(EventKind.LAUNCHED, loc, now, r.id))
            if any(r.id not in fresh for r in kept):
                good.append(ZoneEvent(EventKind.SURVIVED, loc, now))
        if t in self.warn_ticks:
            spot = sorted((r for r in self.alive.values() if r.is_spot), key=lambda r: r.id)
            if spot:
                victim = spot[t % len(spot)]
                bad.append(ZoneEvent(EventKind.WARNING, victim.location, now, victim.id))
                self.doomed.add(victim.id)
                self.warned.add(victim.id)
        for rid, fact in list(self.alive.items()):
            if fact.ready_at is None and t - self.launched_tick[rid] >= self.cold:
                self.alive[rid] = ReplicaFact(fact.id, fact.location, fact.market, fact.launched_at, now, now)
        self.events = tuple(good + bad)


def check_budget(obs: Observation, decisions: list, extra: int, warned_alive: int) -> None:
    live = {r.id: r for r in obs.replicas if r.gone_at is None and not r.draining}
    terminated = [d.replica_id for d in decisions if isinstance(d, Terminate)]
    assert len(terminated) == len(set(terminated)), "terminates a replica twice"
    assert set(terminated) <= set(live), "terminates a replica that is not live"
    names = {c.location for c in obs.candidates}
    launches = [d for d in decisions if isinstance(d, (LaunchSpot, LaunchOnDemand))]
    assert all(d.location in names for d in launches), "launches outside the candidates"
    kept = [r for rid, r in live.items() if rid not in terminated]
    spot_after = sum(r.is_spot for r in kept) + sum(isinstance(d, LaunchSpot) for d in decisions)
    od_after = sum(not r.is_spot for r in kept) + sum(isinstance(d, LaunchOnDemand) for d in decisions)
    n = obs.target
    assert spot_after + od_after >= n, "asks for fewer than N replicas in total"
    assert od_after <= n, "more on-demand replicas than N"
    assert spot_after <= n + extra + 1 + warned_alive, "more spot replicas than N + N_extra + 1"


capacities = st.integers(min_value=1, max_value=4).flatmap(
    lambda z: st.lists(
        st.lists(st.sampled_from([0, 0, 1, 2, 3, 50]), min_size=4, max_size=4).map(
            lambda steps: [v for v in steps for _ in range(15)]  # 15-tick plateaus, like real traces
        ),
        min_size=z,
        max_size=z,
    )
)


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    return {
        "capacity": draw(capacities),
        "cold": draw(st.integers(min_value=0, max_value=4)),
        "target": draw(st.integers(min_value=1, max_value=4)),
        "extra": draw(st.integers(min_value=0, max_value=2)),
        "avail": draw(st.sampled_from([None, 0.9, 0.99, 0.999, 1.0])),
        "warn": frozenset(draw(st.lists(st.integers(min_value=0, max_value=59), max_size=4))),
        "seed": draw(st.integers(min_value=0, max_value=5)),
    }


def run(scenario: dict, *, snapshot_at: int | None = None) -> list[list]:
    config = PolicyConfig(num_overprovision=scenario["extra"], availability_target=scenario["avail"])
    policy = SkyHedge(config, seed=scenario["seed"])
    twin: SkyHedge | None = None
    cloud = FakeCloud(scenario["capacity"], scenario["cold"], scenario["warn"])
    history: list[list] = []
    for t in range(len(scenario["capacity"][0])):
        obs = cloud.observation(t, scenario["target"])
        if t == snapshot_at:
            twin = SkyHedge(config, seed=scenario["seed"])
            twin.restore(json.loads(json.dumps(policy.snapshot())))
        decisions = policy.decide(obs)
        if twin is not None:
            assert twin.decide(obs) == decisions, f"restored policy diverged at tick {t}"
        warned_alive = len(cloud.warned & {r.id for r in obs.replicas})
        check_budget(obs, decisions, scenario["extra"], warned_alive)
        history.append(decisions)
        cloud.apply(t, decisions)
    return history


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(scenarios())
def test_budget_rules_hold_on_any_capacity(scenario: dict) -> None:
    run(scenario)


@FAST
@given(scenarios())
def test_deterministic_per_seed(scenario: dict) -> None:
    assert run(scenario) == run(scenario)


@FAST
@given(scenarios(), st.integers(min_value=0, max_value=59))
def test_snapshot_restore_round_trip(scenario: dict, at: int) -> None:
    run(scenario, snapshot_at=at)


# -- worked scenarios ---------------------------------------------------------------------------


def fact(rid: str, loc: Location, *, ready: bool = True, at: float = 0.0, spot: bool = True) -> ReplicaFact:
    market = Market.SPOT if spot else Market.ON_DEMAND
    return ReplicaFact(rid, loc, market, at, at, at + 120 if ready else None)


def kinds(decisions: list) -> tuple[int, int, int]:
    return (
        sum(isinstance(d, LaunchSpot) for d in decisions),
        sum(isinstance(d, LaunchOnDemand) for d in decisions),
        sum(isinstance(d, Terminate) for d in decisions),
    )


def test_registered_as_the_default_name() -> None:
    assert isinstance(make_policy("skyhedge"), SkyHedge)


def test_cold_start_hedges_like_spothedge() -> None:
    z = zones(3)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    decisions = SkyHedge().decide(Observation(0.0, 3, cands))
    # N + 1 spot spread over the three zones, and N on-demand while nothing is READY
    assert kinds(decisions) == (4, 3, 0)
    assert {d.location for d in decisions if isinstance(d, LaunchSpot)} == set(z)


def finite_capacity_policy(z: list[Location], target: float | None = None) -> SkyHedge:
    """A policy that has seen a zone refuse one more replica (so it knows capacity is finite)."""
    policy = SkyHedge(PolicyConfig(availability_target=target))
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    held = (fact("a1", z[0]), fact("a2", z[0]), fact("b1", z[1]), fact("c1", z[2]))
    refused = (ZoneEvent(EventKind.LAUNCH_FAILED, z[0], 0.0, "a3"),)
    policy.decide(Observation(30.0, 3, cands, held, refused))
    return policy


def test_extra_dropped_once_every_held_zone_is_calm_then_finite_pools_consolidate_too() -> None:
    z = zones(3)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    held = (fact("a1", z[0]), fact("a2", z[0], at=60.0), fact("b1", z[1]), fact("c1", z[2]))
    policy = finite_capacity_policy(z)
    # one hour in: zones are young, SpotHedge's extra stays
    assert kinds(policy.decide(Observation(HOUR, 3, cands, held))) == (0, 0, 0)
    # a day without trouble: D * sum(hazard) is below 1 - 0.99 (D = cold start + decision period,
    # about 250 s after these sparse decisions), so the extra goes; without it the replicas
    # gather in one zone (rule 4, finite pools too), so it goes from a zone holding one
    assert policy.outage_seconds < 260 and 260 * 3 * hazard(24 * HOUR) < 0.01
    assert policy.decide(Observation(24 * HOUR, 3, cands, held)) == [Terminate("c1")]
    # then the replica left alone in zone b moves to the zone holding two (ACTIVE again since a
    # launch there succeeded), launched first there
    left = held[:3]
    launched = (ZoneEvent(EventKind.LAUNCHED, z[0], 60.0, "a2"),)
    assert policy.decide(Observation(24 * HOUR + 30, 3, cands, left, launched)) == [LaunchSpot(z[0])]
    gathered = (*left, fact("a3", z[0], at=24 * HOUR + 30))
    assert policy.decide(Observation(24 * HOUR + 400, 3, cands, gathered)) == [Terminate("b1")]


def test_finite_pools_do_not_gather_into_a_zone_that_just_refused() -> None:
    z = zones(3)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = finite_capacity_policy(z)  # zone 0 refused a third replica at t=0
    left = (fact("a1", z[0]), fact("a2", z[0]), fact("b1", z[1]))
    launched = (ZoneEvent(EventKind.LAUNCHED, z[0], 60.0, "a2"),)  # ACTIVE again for SpotHedge
    policy.decide(Observation(60.0, 3, cands, (*left, fact("c1", z[2])), launched))
    assert policy.zone_status(cands)[z[0]] == "ACTIVE"
    # a day on, the extra goes and the replicas gather in zone 0, the zone holding two ...
    calm = 24 * HOUR
    assert policy.decide(Observation(calm, 3, cands, left)) == [LaunchSpot(z[0])]
    # ... unless it refused within half an hour: it may be full, so they gather in zone 1
    refusal = (ZoneEvent(EventKind.LAUNCH_FAILED, z[0], calm + 30),)
    assert policy.decide(Observation(calm + 60, 3, cands, left, refusal)) == [LaunchSpot(z[1])]


def test_a_higher_availability_target_keeps_the_extra_longer() -> None:
    z = zones(3)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    held = (fact("a1", z[0]), fact("a2", z[0], at=60.0), fact("b1", z[1]), fact("c1", z[2]))
    policy = finite_capacity_policy(z, target=0.999)
    assert policy.decide(Observation(12 * HOUR, 3, cands, held)) == []


def test_trouble_brings_the_extra_back() -> None:
    z = zones(3)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = finite_capacity_policy(z)
    calm = (fact("a1", z[0]), fact("b1", z[1]), fact("c1", z[2]))
    # calm for 12 hours: no extra; the replicas start gathering into one zone (rule 4)
    gather = policy.decide(Observation(12 * HOUR, 3, cands, calm))
    assert kinds(gather) == (1, 0, 0)
    # a preemption in zone b: b is young again, its replica is gone -> replace it and re-hedge
    lost = (ZoneEvent(EventKind.PREEMPTED, z[1], 12 * HOUR + 30, "b1"),)
    left = (fact("a1", z[0]), fact("c1", z[2]))
    decisions = policy.decide(Observation(12 * HOUR + 60, 3, cands, left, lost))
    spot, ondemand, _ = kinds(decisions)
    assert spot == 2  # the lost replica and the extra
    assert ondemand == 2  # SpotHedge's fallback: N + 1 - READY spot (2)


def test_all_or_nothing_zones_consolidate_instead_of_hedging() -> None:
    z = zones(3)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = SkyHedge()  # never saw a partial zone: assumes all-or-nothing
    held = (fact("a1", z[0]), fact("a2", z[0]), fact("b1", z[1]), fact("c1", z[2], at=90.0))
    # 3 zones < N + 1: an extra would share a zone, so none is held; the surplus leaves a
    # least stacked zone, the one alone in its region among them (no region-mate vouches for it)
    decisions = policy.decide(Observation(HOUR, 3, cands, held))
    assert decisions == [Terminate("c1")]
    # with one replica per zone left, it gathers them into the held zone with most replicas
    left = (fact("a1", z[0]), fact("a2", z[0]), fact("b1", z[1]))
    assert policy.decide(Observation(HOUR + 30, 3, cands, left)) == [LaunchSpot(z[0])]


def test_equally_calm_zones_are_told_apart_by_their_region_mates() -> None:
    # three zones of one region and one alone (gcp-04-30-2023's shape), all calm since start-up:
    # the lone zone's replica is the surplus, and the replicas gather in the crowded region
    crowd = [Location("gcp", "us-central1", f"us-central1-{x}") for x in "abc"]
    lone = Location("gcp", "us-east1", "us-east1-b")
    z = [lone, *crowd]  # the lone zone first: candidate order alone would keep it
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = SkyHedge()
    policy.decide(Observation(0.0, 3, cands))
    held = tuple(fact(f"r{i}", loc) for i, loc in enumerate(z))
    assert policy.decide(Observation(20 * HOUR, 3, cands, held)) == [Terminate("r0")]
    left = held[1:]
    decisions = policy.decide(Observation(20 * HOUR + 30, 3, cands, left))
    assert len(decisions) == 1 and isinstance(decisions[0], LaunchSpot)
    assert decisions[0].location in crowd
    calm = 10 * HOUR + PRIOR_AGE_SECONDS  # trouble assumed just before start-up (t = 0)
    assert policy.region_calm(crowd[0], cands, 10 * HOUR) == (calm, 2 * calm)
    assert policy.region_calm(lone, cands, 10 * HOUR) == (0.0, 0.0)


def _big_and_small_regions() -> tuple[list[Location], list[Location], tuple, tuple]:
    """Four zones of us-east-1 and two of us-central1, one replica held in two zones of each."""
    big = [Location("aws", "us-east-1", f"us-east-1{x}") for x in "abcd"]
    small = [Location("gcp", "us-central1", f"us-central1-{x}") for x in "ab"]
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in [*big, *small])
    held = (fact("a", big[0]), fact("b", big[1]), fact("c", small[0]), fact("d", small[1]))
    return big, small, cands, held


def _released_and_gathered(policy: SkyHedge, cands: tuple, held: tuple, at: float) -> list:
    """The extra released at `at` (asserted to leave the big region), then one gathering step."""
    decisions = policy.decide(Observation(at, 3, cands, held))
    assert len(decisions) == 1 and isinstance(decisions[0], Terminate)
    assert decisions[0].replica_id in {"a", "b"}  # the surplus leaves the troubled region
    left = tuple(r for r in held if r.id != decisions[0].replica_id)
    return policy.decide(Observation(at + 30, 3, cands, left))


def test_a_region_is_as_calm_as_its_least_calm_zone_not_as_its_zone_count() -> None:
    # four zones of one region, one of which just had trouble, against two calm zones of another:
    # the replicas gather in the smaller calm region, not where the summed calm is larger
    big, small, cands, held = _big_and_small_regions()
    policy = SkyHedge()
    policy.decide(Observation(0.0, 3, cands))
    # us-east-1d refuses a launch at 20 h: the held zones themselves are all equally calm
    refused = (ZoneEvent(EventKind.LAUNCH_FAILED, big[3], 20 * HOUR),)
    policy.decide(Observation(20 * HOUR, 3, cands, held, refused))
    assert policy.region_calm(big[0], cands, 21 * HOUR)[1] > policy.region_calm(small[0], cands, 21 * HOUR)[1]
    decisions = _released_and_gathered(policy, cands, held, 21 * HOUR)
    assert decisions == [LaunchSpot(decisions[0].location)] and decisions[0].location in small


def test_a_refusal_seen_at_start_up_counts_against_its_region() -> None:
    # as above, but us-east-1d refuses the very first launches: trouble is assumed everywhere at
    # start-up, yet a refusal actually seen then is evidence, so the calm tie between the regions
    # goes to the one nothing was seen in (with both dated at start-up, the larger region won on
    # the summed calm of its mates: mix-1node-all gathered into us-east-1 and lost it)
    big, small, cands, held = _big_and_small_regions()
    policy = SkyHedge()
    policy.decide(Observation(0.0, 3, cands, (), (ZoneEvent(EventKind.LAUNCH_FAILED, big[3], 0.0),)))
    assert policy.zone_age(big[3], 20 * HOUR) < policy.zone_age(big[0], 20 * HOUR)
    decisions = _released_and_gathered(policy, cands, held, 20 * HOUR)
    assert len(decisions) == 1 and isinstance(decisions[0], LaunchSpot) and decisions[0].location in small


def test_warning_starts_the_replacement_without_killing_the_warned_replica() -> None:
    z = zones(4)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = SkyHedge()
    held = tuple(fact(f"r{i}", loc) for i, loc in enumerate(z))
    assert policy.decide(Observation(HOUR, 3, cands, held)) == []  # one per zone over 4 zones
    warning = (ZoneEvent(EventKind.WARNING, z[2], HOUR + 10, "r2"),)
    decisions = policy.decide(Observation(HOUR + 30, 3, cands, held, warning))
    assert not any(isinstance(d, Terminate) for d in decisions)
    launches = [d.location for d in decisions if isinstance(d, LaunchSpot)]
    assert len(launches) == 1 and launches[0] != z[2]  # replacement elsewhere: z[2] is troubled
    assert policy.snapshot()["warned"] == ["r2"]


def test_on_demand_covers_replicas_until_their_zone_settles() -> None:
    z = zones(3)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = finite_capacity_policy(z)
    t0 = 10 * HOUR
    lost = (ZoneEvent(EventKind.PREEMPTED, z[0], t0, "a1"),)
    # two replicas in zone a are READY 150 s after its preemption, but zone a has not settled
    # (2 cold starts = 240 s): losing both would leave 2 < N, so one on-demand replica stays
    # (SpotHedge would release it: 4 READY spot replicas = N + 1)
    held = (fact("a8", z[0], at=t0), fact("a9", z[0], at=t0), fact("b1", z[1]), fact("c1", z[2]))
    od = (fact("od1", z[0], spot=False, at=t0),)
    policy.decide(Observation(t0 + 30, 3, cands, held[2:] + od, lost))
    assert policy.decide(Observation(t0 + 150, 3, cands, held + od)) == []
    # once zone a has been calm for 240 s the on-demand replica goes
    assert policy.decide(Observation(t0 + 300, 3, cands, held + od)) == [Terminate("od1")]


def test_never_below_n_ready_when_releasing() -> None:
    z = zones(3)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = SkyHedge()
    policy.decide(Observation(0.0, 3, cands))
    # gathering into zone 0: its second replica is not READY yet, so the lone replicas it will
    # replace keep serving (releasing one would leave two READY) and the new one is kept
    held = (fact("a1", z[0]), fact("a2", z[0], ready=False, at=20 * HOUR), fact("b1", z[1]), fact("c1", z[2]))
    assert policy.decide(Observation(20 * HOUR + 30, 3, cands, held)) == []
    # once it is READY, one lone replica goes
    ready = (fact("a1", z[0]), fact("a2", z[0], at=20 * HOUR), fact("b1", z[1]), fact("c1", z[2]))
    decisions = policy.decide(Observation(20 * HOUR + 300, 3, cands, ready))
    assert len(decisions) == 1 and decisions[0] in (Terminate("b1"), Terminate("c1"))


def test_a_rolling_updates_surge_gathers_with_the_rest_and_buys_no_on_demand() -> None:
    """The controller asks for N + 1 while an outdated replica is replaced (`Observation.surge`).
    Taken for a service of N + 1, three calm gathered replicas (the extra released, rule 2) got
    the extra back, spread out, plus an on-demand replica for each spot one not READY (rule 3):
    two spot and two on-demand launches per step, 6 on-demand per update of N = 3 (measured
    under `watch`, five zones), released again, and the replicas left gathered ended spread.
    The outdated replica serves until the surge is READY: the surge is one more spot replica,
    in the anchor zone, and the hedge and cover stay the service's N's."""
    z = zones(5)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = SkyHedge()
    policy.decide(Observation(0.0, 3, cands))
    t = 20 * HOUR
    gathered = tuple(fact(f"a{i}", z[0], at=HOUR) for i in range(3))
    assert policy.decide(Observation(t, 3, cands, gathered)) == []  # calm: no extra, no cover
    assert policy.decide(Observation(t + 30, 4, cands, gathered, surge=1)) == [LaunchSpot(z[0])]
    starting = (*gathered, fact("a9", z[0], ready=False, at=t + 30))
    assert policy.decide(Observation(t + 60, 4, cands, starting, surge=1)) == []
    # an outdated replica that stopped serving leaves the service short (2 of N READY): as
    # without an update, the extra comes back, covered, and so is the missing replica
    failing = replace(gathered[0], not_ready_since=t + 50)
    decisions = policy.decide(Observation(t + 90, 4, cands, (failing, *starting[1:]), surge=1))
    assert kinds(decisions) == (1, 2, 0)


@pytest.mark.parametrize("target", [0.0, 1.5, float("nan"), "high", True])
def test_bad_availability_target_is_refused(target: object) -> None:
    with pytest.raises(PolicyError, match="availability_target"):
        SkyHedge(PolicyConfig(availability_target=target))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "snapshot",
    [
        {"trouble": ["aws/x/y"]},
        {"trouble": {"not-a-location": 1.0}},
        {"warned": "r1"},
        {"refused": ["aws/x/y"]},
        {"cold_start": "slow"},
    ],
)
def test_bad_snapshot_is_refused(snapshot: dict) -> None:
    with pytest.raises(PolicyError):
        SkyHedge().restore(snapshot)


def test_snapshot_is_json_and_keeps_spothedge_memory() -> None:
    z = zones(3)
    policy = finite_capacity_policy(z)
    data = json.loads(json.dumps(policy.snapshot()))
    assert data["partial"] is True
    assert "preempted" in data and "trouble" in data
    restored = SkyHedge()
    restored.restore(data)
    assert restored.snapshot() == policy.snapshot()


def _refusals_everywhere_but_the_held_zone(partial: bool) -> tuple[SkyHedge, list[Location], tuple]:
    """Three replicas stacked in zone 0; zones 1-3 just refused a launch, so SpotHedge's memory
    marked them PREEMPTED and, with one zone left ACTIVE, its reset rule made all ACTIVE again."""
    z = zones(4)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = SkyHedge()
    policy.decide(Observation(0.0, 3, cands))
    if partial:  # zone 0 refused a third replica while holding two: capacity is finite
        two = (fact("a1", z[0]), fact("a2", z[0]))
        policy.decide(Observation(600.0, 3, cands, two, (ZoneEvent(EventKind.LAUNCH_FAILED, z[0], 590.0),)))
    held = (fact("a1", z[0]), fact("a2", z[0]), fact("a3", z[0], at=700.0))
    events = (ZoneEvent(EventKind.SURVIVED, z[0], HOUR - 30, "a1"),) + tuple(
        ZoneEvent(EventKind.LAUNCH_FAILED, loc, HOUR - 30) for loc in z[1:]
    )
    decisions = policy.decide(Observation(HOUR, 3, cands, held, events))
    assert policy.zone_status(cands) == dict.fromkeys(z, "ACTIVE")  # the reset happened
    return policy, z, decisions


def test_finite_pools_stack_the_extra_instead_of_asking_zones_that_just_refused() -> None:
    policy, z, decisions = _refusals_everywhere_but_the_held_zone(partial=True)
    assert [d.location for d in decisions if isinstance(d, LaunchSpot)] == [z[0]]
    # half an hour later the refusals are old news: the extra is asked of another zone again
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    held = (fact("a1", z[0]), fact("a2", z[0]), fact("a3", z[0], at=700.0))
    later = policy.decide(Observation(HOUR + 1801, 3, cands, held))
    assert [d.location for d in later if isinstance(d, LaunchSpot)] == [z[1]]


def test_all_or_nothing_zones_keep_spothedges_retries() -> None:
    # a stacked extra hedges nothing when a zone loses all or nothing: the next zone is asked
    _, z, decisions = _refusals_everywhere_but_the_held_zone(partial=False)
    assert [d.location for d in decisions if isinstance(d, LaunchSpot)] == [z[1]]


def _spread_with_most_zones_marked(count: int, refused_at: float) -> tuple[SkyHedge, list[Location], tuple]:
    """All-or-nothing zones: one READY replica in each of zones 0-2; every other zone refused a
    launch at `refused_at`, so SpotHedge's memory marks it PREEMPTED (3 ACTIVE: no reset)."""
    z = zones(count)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = SkyHedge()
    policy.decide(Observation(0.0, 3, cands))
    held = (fact("a1", z[0]), fact("b1", z[1]), fact("c1", z[2]))
    refusals = tuple(ZoneEvent(EventKind.LAUNCH_FAILED, loc, refused_at) for loc in z[3:])
    policy.decide(Observation(refused_at + 30, 3, cands, held, refusals))
    return policy, z, held


def spot_launches(decisions: list) -> list[Location]:
    return [d.location for d in decisions if isinstance(d, LaunchSpot)]


def test_many_marked_all_or_nothing_zones_are_asked_again_for_the_extra() -> None:
    policy, z, held = _spread_with_most_zones_marked(9, refused_at=600.0)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    assert list(policy.zone_status(cands).values()).count("ACTIVE") == 3
    # 45 min in, every zone is young (the extra is wanted) and the marked ones have been calm
    # for 30 min: the calmest marked zone (a tie: the first candidate) is ACTIVE again and the
    # extra replica goes there, spread N + 1 over distinct zones instead of gathering
    # (with SpotHedge's on-demand stand-in until it is READY)
    now = 600.0 + HAZARD_SCALE + 300
    decisions = policy.decide(Observation(now, 3, cands, held))
    assert spot_launches(decisions) == [z[3]] and kinds(decisions) == (1, 1, 0)
    assert policy.zone_status(cands)[z[3]] == "ACTIVE"
    # it refuses: marked again, its calm starts over, and the next calmest zone is asked
    refused = (ZoneEvent(EventKind.LAUNCH_FAILED, z[3], now + 15),)
    assert spot_launches(policy.decide(Observation(now + 30, 3, cands, held, refused))) == [z[4]]
    assert policy.zone_status(cands)[z[3]] == "PREEMPTED"


def test_marked_zones_stay_marked_while_young_or_while_half_the_zones_are_active() -> None:
    # marked 20 minutes ago: too young to ask again; no extra, the replicas start gathering
    policy, z, held = _spread_with_most_zones_marked(9, refused_at=600.0)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    decisions = policy.decide(Observation(600.0 + 1200, 3, cands, held))
    assert decisions == [LaunchSpot(z[0])]  # one step of consolidation, no extra
    assert list(policy.zone_status(cands).values()).count("ACTIVE") == 3
    # five zones, three ACTIVE: more than half are, SpotHedge's memory is left alone
    policy, z, held = _spread_with_most_zones_marked(5, refused_at=600.0)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    decisions = policy.decide(Observation(600.0 + HAZARD_SCALE + 300, 3, cands, held))
    assert decisions == [LaunchSpot(z[0])]
    assert list(policy.zone_status(cands).values()).count("PREEMPTED") == 2


def test_base_on_demand_replicas_always_run_and_the_rest_is_hedged_spot() -> None:
    """`base_ondemand_fallback_replicas` is SkyServe's static floor: those run on-demand at all
    times, and the rules place the remaining N - base as spot (plus the extra while it is held)."""
    z = zones(3)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = SkyHedge(PolicyConfig(base_ondemand_fallback_replicas=2))
    # N = 3: one spot replica + its extra, two base on-demand + one covering the not-READY spot
    assert kinds(policy.decide(Observation(0.0, 3, cands))) == (2, 3, 0)
    # settled spot: the dynamic cover goes, the base stays
    held = (fact("a1", z[0]), fact("b1", z[1]))
    od = tuple(fact(f"od{i}", z[0], spot=False) for i in range(3))
    decisions = policy.decide(Observation(30 * HOUR, 3, cands, held + od))
    assert (
        kinds(decisions)[1] == 0
        and sum(isinstance(d, Terminate) and d.replica_id.startswith("od") for d in decisions) == 1
    )
    # a base as large as N: on-demand only, the READY spot replicas serving until they are READY
    everything = SkyHedge(PolicyConfig(base_ondemand_fallback_replicas=5))
    assert kinds(everything.decide(Observation(0.0, 3, cands, held))) == (0, 3, 0)
    od = tuple(fact(f"od{i}", z[0], spot=False) for i in range(3))
    assert kinds(everything.decide(Observation(300.0, 3, cands, held + od))) == (0, 0, 2)


def test_an_all_on_demand_service_releases_spot_only_behind_ready_on_demand_replicas() -> None:
    """N = base on-demand replicas: after a rolling update (its surge and extra were spot) or a
    base raised under spot replicas, the READY spot replicas serve until on-demand ones stand in
    for them, not-ready and newest released first. All released in the pass that launched the
    on-demand replacement, a rolling update of N = 1 served nothing for a cold start."""
    z = zones(3)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = SkyHedge(PolicyConfig(base_ondemand_fallback_replicas=1))
    surge, extra = fact("s1", z[0], at=0.0), fact("s2", z[1], at=60.0)
    starting = fact("s3", z[2], ready=False, at=200.0)
    assert policy.decide(Observation(300.0, 1, cands, (surge, extra, starting))) == [
        Terminate("s2"),
        Terminate("s3"),
        LaunchOnDemand(z[0]),
    ]
    new_od = fact("od1", z[0], ready=False, at=300.0, spot=False)
    assert policy.decide(Observation(305.0, 1, cands, (surge, new_od))) == []
    ready_od = fact("od1", z[0], at=300.0, spot=False)
    assert policy.decide(Observation(420.0, 1, cands, (surge, ready_od))) == [Terminate("s1")]


def test_without_dynamic_fallback_no_on_demand_covers_spot() -> None:
    z = zones(3)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = SkyHedge(PolicyConfig(dynamic_ondemand_fallback=False))
    assert kinds(policy.decide(Observation(0.0, 3, cands))) == (4, 0, 0)
    od = (fact("od1", z[0], spot=False),)
    lost = (ZoneEvent(EventKind.PREEMPTED, z[0], 10.0, "a1"),)
    decisions = policy.decide(Observation(40.0, 3, cands, (fact("b1", z[1]), *od), lost))
    assert Terminate("od1") in decisions and kinds(decisions)[1] == 0


def test_the_extras_on_demand_stand_in_is_bought_only_while_the_risk_pays_for_it() -> None:
    # rule 10: the extra is wanted but not held on spot (N READY); an on-demand replica standing
    # in for it costs on-demand / spot (3x here) the spot extra, so it runs only while the
    # predicted unhedged risk exceeds the budget 3x: right after trouble, not an hour on
    z = zones(3)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = finite_capacity_policy(z)
    trouble = 10 * HOUR
    lost = (ZoneEvent(EventKind.PREEMPTED, z[0], trouble, "a9"),)
    held = tuple(fact(f"a{i}", z[0]) for i in range(3))
    policy.decide(Observation(trouble, 3, cands, held, lost))
    budget = 1 - 0.99
    soon, later = trouble + 600, trouble + HOUR
    seen = {}
    for t in range(int(trouble) + 30, int(later) + 1, 30):  # decisions every 30 s
        seen[t] = kinds(policy.decide(Observation(float(t), 3, cands, held)))
        if t in (soon, later):
            risk = policy.unhedged_risk({z[0]}, t)
            assert risk > 3 * budget if t == soon else budget < risk <= 3 * budget
    assert seen[soon][:2] == (1, 1)  # the extra is launched, and covered meanwhile
    assert seen[later][:2] == (1, 0)  # still wanted, but no longer worth an on-demand stand-in


def test_a_wave_that_leaves_one_zone_keeps_one_on_demand_for_a_while() -> None:
    """Rule 9: preemptions in several zones at once, the replicas left in one zone: one on-demand
    replica stays for WAVE_HOLD_SECONDS, however settled that zone's replicas are."""
    from skyhedge.policy.skyhedge import WAVE_HOLD_SECONDS

    z = zones(4)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = SkyHedge()
    t0 = 20 * HOUR
    calm = (fact("a1", z[0]), fact("b1", z[1]), fact("c1", z[2]), fact("d1", z[3]))
    policy.decide(Observation(0.0, 3, cands, calm))  # started long before: every zone calm for hours
    wave = tuple(ZoneEvent(EventKind.PREEMPTED, z[i], t0, f"{'bcd'[i - 1]}1") for i in (1, 2, 3))
    survivors = (fact("a1", z[0]), fact("a2", z[0], at=t0 - 600), fact("a3", z[0], at=t0 - 600))
    od = (fact("od1", z[0], spot=False, at=t0),)
    decisions = policy.decide(Observation(t0 + 30, 3, cands, survivors + od, wave))
    assert Terminate("od1") not in decisions  # zone a is calm and holds N READY, but survived a wave
    assert Terminate("od1") not in policy.decide(
        Observation(t0 + WAVE_HOLD_SECONDS - 30, 3, cands, survivors + od)
    )
    restored = SkyHedge()
    restored.restore(json.loads(json.dumps(policy.snapshot())))
    later = restored.decide(Observation(t0 + WAVE_HOLD_SECONDS + 30, 3, cands, survivors + od))
    assert Terminate("od1") in later


def test_a_wave_seen_zone_by_zone_in_passes_seconds_apart_is_still_a_wave() -> None:
    """The watcher runs a pass per event, so a wave's zones reach the policy seconds apart, one
    per observation: rule 9 must hold the on-demand replica there too (it never fired under
    `watch`). Losses a simulator tick apart (30 s) stay separate, as in one-observation waves."""
    z = zones(4)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    t0 = 20 * HOUR
    calm = (fact("a1", z[0]), fact("b1", z[1]), fact("c1", z[2]), fact("d1", z[3]))
    survivors = (fact("a1", z[0]), fact("a2", z[0], at=t0 - 600), fact("a3", z[0], at=t0 - 600))
    od = (fact("od1", z[0], spot=False, at=t0),)

    def after_losses(gap: float) -> list:
        policy = SkyHedge()
        policy.decide(Observation(0.0, 3, cands, calm))
        first = (ZoneEvent(EventKind.PREEMPTED, z[1], t0, "b1"),)
        second = (ZoneEvent(EventKind.PREEMPTED, z[2], t0 + gap, "c1"),)
        policy.decide(Observation(t0 + 1, 3, cands, survivors + (fact("c1", z[2]),) + od, first))
        return policy.decide(Observation(t0 + gap + 1, 3, cands, survivors + od, second))

    assert Terminate("od1") not in after_losses(2.0)  # one wave, two passes
    assert Terminate("od1") in after_losses(30.0)  # a tick apart: two separate losses


def test_a_single_zone_preemption_is_no_wave() -> None:
    z = zones(4)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = SkyHedge()
    t0 = 20 * HOUR
    calm = (fact("a1", z[0]), fact("a2", z[0]), fact("a3", z[0]), fact("b1", z[1]))
    policy.decide(Observation(0.0, 3, cands, calm))
    lost = (ZoneEvent(EventKind.PREEMPTED, z[1], t0, "b1"),)
    od = (fact("od1", z[0], spot=False, at=t0),)
    decisions = policy.decide(Observation(t0 + 30, 3, cands, calm[:3] + od, lost))
    assert Terminate("od1") in decisions


def test_replicas_launched_at_start_up_are_covered_until_their_zones_settle() -> None:
    """Start-up counts as trouble for the replicas launched since, from the first decision on
    (those found running by a freshly started controller are settled): READY at 150 s, two cold
    starts (240 s) after start-up has not passed, so the on-demand cover stays until then."""
    z = zones(3)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = SkyHedge()
    first = policy.decide(Observation(0.0, 3, cands))
    spot = tuple(fact(f"s{i}", loc) for i, loc in enumerate(spot_launches(first)))
    ondemand = tuple(fact(f"o{i}", d.location, spot=False) for i, d in enumerate(first[len(spot) :]))
    assert all(isinstance(d, LaunchOnDemand) for d in first[len(spot) :])
    assert len(spot) == 4 and len(ondemand) == 3
    cover = {r.id for r in ondemand}
    at_150 = policy.decide(Observation(150.0, 3, cands, spot + ondemand))
    assert not {d.replica_id for d in at_150 if isinstance(d, Terminate)} & cover
    at_300 = policy.decide(Observation(300.0, 3, cands, spot + ondemand))
    assert {d.replica_id for d in at_300 if isinstance(d, Terminate)} >= cover


def test_surplus_on_demand_replicas_go_newest_first() -> None:
    """With one base on-demand replica asked and two running (both READY), the one launched last
    goes: the older one has served longest without trouble."""
    z = zones(3)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = SkyHedge(PolicyConfig(base_ondemand_fallback_replicas=1))
    spot = tuple(fact(f"s{i}", loc) for i, loc in enumerate(z))
    ondemand = (fact("od1", z[0], spot=False), fact("od2", z[0], spot=False, at=100.0))
    assert policy.decide(Observation(HOUR, 3, cands, spot + ondemand)) == [Terminate("od2")]


def test_the_extra_is_kept_while_fewer_than_n_spot_replicas_are_ready() -> None:
    """Zones calm for a day would let the extra go, but only once N spot replicas are READY:
    releasing a starting one now would leave the service waiting on the others' cold start."""
    z = zones(3)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = SkyHedge()
    policy.decide(Observation(0.0, 2, cands))
    starting = 24 * HOUR - 60
    held = (
        fact("a1", z[0]),
        fact("b1", z[1], ready=False, at=starting),
        fact("c1", z[2], ready=False, at=starting),
    )
    assert kinds(policy.decide(Observation(24 * HOUR, 2, cands, held))) == (0, 2, 0)


def test_warned_replicas_are_forgotten_once_they_are_gone() -> None:
    """The memory names a warned replica only while it runs (it is saved in the state at every
    pass: a watcher's churn would grow it without end)."""
    z = zones(4)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = SkyHedge()
    held = tuple(fact(f"r{i}", loc) for i, loc in enumerate(z))
    warning = (ZoneEvent(EventKind.WARNING, z[2], HOUR + 10, "r2"),)
    policy.decide(Observation(HOUR + 30, 3, cands, held, warning))
    assert policy.snapshot()["warned"] == ["r2"]
    taken = (ZoneEvent(EventKind.PREEMPTED, z[2], HOUR + 100, "r2"),)
    rest = (*(r for r in held if r.id != "r2"), fact("r4", z[1], at=HOUR + 30, ready=False))
    policy.decide(Observation(HOUR + 120, 3, cands, rest, taken))
    assert policy.snapshot()["warned"] == []


def test_in_a_finite_pool_where_every_zone_refused_lately_the_missing_replica_is_still_asked_for() -> None:
    """Rule 7 skips zones that refused within HAZARD_SCALE only while another ACTIVE zone can take
    the replica; when all of them refused, one is asked again (never none: the spot replica would
    never come back, and the on-demand stand-in would bill on)."""
    z = zones(3)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = SkyHedge()
    policy.decide(Observation(0.0, 2, cands))
    two = (fact("a1", z[0]), fact("a2", z[0]))
    policy.decide(Observation(600.0, 2, cands, two, (ZoneEvent(EventKind.LAUNCH_FAILED, z[0], 590.0),)))
    everywhere = tuple(ZoneEvent(EventKind.LAUNCH_FAILED, loc, 890.0) for loc in z)
    decisions = policy.decide(Observation(900.0, 2, cands, two, everywhere))
    assert spot_launches(decisions) == [z[1]]


def test_marked_zones_stay_marked_while_exactly_half_the_zones_are_active() -> None:
    """Rule 8 asks marked zones again only while fewer than half of the zones are ACTIVE (at
    exactly half it cost aws-04-22-2023 a seed, docs/policy.md): six zones, three ACTIVE."""
    policy, z, held = _spread_with_most_zones_marked(6, refused_at=600.0)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    decisions = policy.decide(Observation(600.0 + HAZARD_SCALE + 300, 3, cands, held))
    assert decisions == [LaunchSpot(z[0])]
    assert list(policy.zone_status(cands).values()).count("PREEMPTED") == 3


def released_one_at_a_time(
    policy: SkyHedge, obs: Observation, spot: list[ReplicaFact], want: int, ready_spot: int
) -> list[ReplicaFact]:
    """The surplus rule as the module docstring states it, zone by zone ranked afresh for every
    replica released (what `_surplus` computed before it kept the ranks in a heap)."""
    stack = 1 if policy._partial and want > obs.target else -1
    price = {c.location: c.spot_price for c in obs.candidates}
    order = {c.location: i for i, c in enumerate(obs.candidates)}
    counts: dict[Location, int] = {}
    for r in spot:
        counts[r.location] = counts.get(r.location, 0) + 1
    victims: list[ReplicaFact] = []
    ready_left = ready_spot
    for _ in range(len(spot) - want):
        zone = max(
            (z for z, c in counts.items() if c > 0),
            key=lambda z: (
                stack * counts[z],
                price.get(z, 0.0),
                -policy.zone_age(z, obs.now),
                *(-x for x in policy.region_calm(z, obs.candidates, obs.now)),
                -order.get(z, 0),
            ),
        )
        members = [r for r in spot if r.location == zone and r not in victims]
        victim = min(members, key=lambda r: (r.ready_at is not None, -r.launched_at))
        if victim.ready_at is not None and ready_left - 1 < want:
            break
        victims.append(victim)
        counts[zone] -= 1
        ready_left -= victim.ready_at is not None
    return victims


@st.composite
def surplus_cases(draw: st.DrawFn) -> tuple[SkyHedge, Observation, list[ReplicaFact], int, int]:
    regions = draw(st.integers(1, 3))
    where = [
        Location("aws", f"r{z % regions}", f"r{z % regions}-{z}") for z in range(draw(st.integers(1, 8)))
    ]
    cands = tuple(Candidate(loc, draw(st.sampled_from([1.0, 1.0, 1.5])), 3.0) for loc in where)
    policy = SkyHedge()
    policy.decide(Observation(0.0, 1, cands))
    for loc in where:  # trouble at a few distinct times, ties included
        if draw(st.booleans()):
            policy._trouble[loc] = draw(st.sampled_from([10.0, 500.0, 500.0]))
    policy._partial = draw(st.booleans())
    spot = [
        ReplicaFact(
            f"r-{i:04d}",
            draw(st.sampled_from(where)),
            Market.SPOT,
            launched := draw(st.sampled_from([0.0, 60.0, 60.0, 600.0])),
            launched,
            launched + 120 if draw(st.integers(0, 3)) else None,
        )
        for i in range(draw(st.integers(1, 30)))
    ]
    want = draw(st.integers(0, len(spot)))
    target = draw(st.integers(max(0, want - 1), want))
    obs = Observation(HOUR, target, cands, tuple(spot))
    return policy, obs, spot, want, sum(r.ready_at is not None for r in spot)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(surplus_cases())
def test_the_surplus_is_released_by_the_one_at_a_time_rule(case) -> None:
    policy, obs, spot, want, ready_spot = case
    held: dict[Location, int] = {}
    for r in spot:
        held[r.location] = held.get(r.location, 0) + 1
    expected = released_one_at_a_time(policy, obs, spot, want, ready_spot)
    assert policy._surplus(obs, spot, held, want, ready_spot) == expected


def test_a_large_scale_down_ranks_each_zone_once_not_once_per_released_replica() -> None:
    # 1,000 READY replicas over 30 zones down to 100: ranking every zone afresh for each of the
    # 900 released replicas (each rank walking every candidate for its region-mates) took 4 s
    z = zones(30)
    cands = tuple(Candidate(loc, 1.0 + (i % 4) / 10, 3.0) for i, loc in enumerate(z))
    asked: list[Location] = []

    class Counting(SkyHedge):
        def zone_age(self, location: Location, now: float) -> float:
            asked.append(location)
            return super().zone_age(location, now)

    policy = Counting()
    policy.decide(Observation(0.0, 1000, cands))
    fleet = tuple(fact(f"r-{i:04d}", z[i % 30], at=60.0) for i in range(1000))
    asked.clear()
    decisions = policy.decide(Observation(20 * HOUR, 100, cands, fleet))
    assert kinds(decisions) == (0, 0, 900)
    assert len(asked) <= 10 * len(z)  # a handful of times per zone, not per zone per release


def test_shifting_its_times_makes_a_clock_jump_look_like_no_time_passed() -> None:
    """The controller moves the policy's memory with a wall clock jump (`Policy.shift_times`):
    every remembered time stamped before the jump moves, so zone ages, refusals, the wave window
    and the decision period read as they did; times `moved` refuses stay."""
    z = zones(3)
    cands = tuple(Candidate(loc, 1.0, 3.0) for loc in z)
    policy = finite_capacity_policy(z)  # zone 0 refused at t=0, decided at t=30
    lost = (
        ZoneEvent(EventKind.PREEMPTED, z[1], 40.0, "b1"),
        ZoneEvent(EventKind.PREEMPTED, z[2], 45.0, "c1"),
    )
    policy.decide(Observation(60.0, 3, cands, (fact("a1", z[0]), fact("a2", z[0])), lost))
    before = policy.snapshot()
    ages = [policy.zone_age(loc, 60.0) for loc in z]
    jump = 2 * HOUR
    moved = policy.shift_times(jump, lambda t: t <= 60.0)
    after = policy.snapshot()
    # start, last decision, wave, two zones' trouble (zone 0 refused at its usual size: no
    # trouble), one refusal, two losses
    assert moved == 8
    assert [policy.zone_age(loc, 60.0 + jump) for loc in z] == ages
    assert after["last_now"] == before["last_now"] + jump and after["wave_at"] == before["wave_at"] + jump
    assert after["refused"] == {k: t + jump for k, t in before["refused"].items()}
    times = {"start", "last_now", "wave_at", "trouble", "refused", "lost_at"}
    assert {k: v for k, v in after.items() if k not in times} == {
        k: v for k, v in before.items() if k not in times
    }
    # the next decision's period is the time that passed (30 s), not the jump
    policy.decide(Observation(90.0 + jump, 3, cands, (fact("a1", z[0]), fact("a2", z[0]))))
    assert policy.snapshot()["interval"] == pytest.approx(0.8 * before["interval"] + 0.2 * 30.0)
    assert SkyHedge().shift_times(jump, lambda t: True) == 0  # a fresh memory holds no times
    kept = policy.snapshot()
    assert policy.shift_times(-jump, lambda t: False) == 0 and policy.snapshot() == kept
