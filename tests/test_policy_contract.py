"""The contract every online placement policy signs, checked by hypothesis over random markets.

For each policy: after acting on its decisions, the replicas alive (spot + on-demand) are never fewer
than the target; it never keeps more than target + its own over-provisioning budget of spot, nor
more on-demand than the target; it is deterministic for a given seed; and its memory survives a
snapshot/restore round trip (the controller persists it across restarts).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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

ZONES = [Location("aws", f"reg{i // 3}", f"reg{i // 3}-{'abc'[i % 3]}") for i in range(9)]
COLD = 120.0
STEP = 30.0
ONLINE = ["spothedge", "skyserve", "skyhedge"]

markets = st.fixed_dictionaries(
    {
        "n_zones": st.integers(1, 6),
        "target": st.integers(1, 5),
        "extra": st.integers(0, 2),
        "prices": st.lists(st.floats(0.2, 2.0), min_size=6, max_size=6),
        # capacity[tick][zone]
        "capacity": st.lists(st.lists(st.integers(0, 4), min_size=6, max_size=6), min_size=5, max_size=60),
    }
)


def play(
    name: str,
    market: dict,
    seed: int = 0,
    *,
    restore_every: int = 0,
    surge: int = 0,
    moved: int = 0,
    base: int = 0,
):
    """A small world: spot capped at capacity (newest first), cold start, events like the simulator.
    Yields (decisions, alive replicas after acting) each tick. `surge`: asked for on top of the
    market's target as a rolling update's (`Observation.surge`). `moved`: that many of the target
    told to be surge without being asked on top, as a placement move's (replicas serving outside
    the allowed locations). `base`: `base_ondemand_fallback_replicas`."""
    zones = ZONES[: market["n_zones"]]
    od_price = 3 * max(market["prices"])
    prices = market["prices"][: len(zones)]
    cands = tuple(Candidate(z, p, od_price) for z, p in zip(zones, prices, strict=True))
    config = PolicyConfig(num_overprovision=market["extra"], base_ondemand_fallback_replicas=base)
    policy = make_policy(name, config, seed=seed)
    alive: dict[str, ReplicaFact] = {}
    events: list[ZoneEvent] = []
    counter = 0
    for t, caps in enumerate(market["capacity"]):
        now = t * STEP
        for z, loc in enumerate(ZONES[: market["n_zones"]]):
            here = sorted(
                (r for r in alive.values() if r.location == loc and r.market is Market.SPOT),
                key=lambda r: r.launched_at,
            )
            for victim in here[caps[z] :]:
                del alive[victim.id]
                events.append(ZoneEvent(EventKind.PREEMPTED, loc, now, victim.id))
        facts = tuple(
            ReplicaFact(
                r.id,
                r.location,
                r.market,
                r.launched_at,
                r.launched_at,
                r.launched_at + COLD if now >= r.launched_at + COLD else None,
            )
            for r in alive.values()
        )
        if restore_every and t % restore_every == 0:
            memory = json.loads(json.dumps(policy.snapshot()))
            policy = make_policy(name, config, seed=seed)
            policy.restore(memory)
        target = market["target"] + surge
        told = min(surge + moved, target)
        decisions = policy.decide(Observation(now, target, cands, facts, tuple(events), surge=told))
        events = []
        for d in decisions:
            if isinstance(d, Terminate):
                alive.pop(d.replica_id, None)
        for d in decisions:
            if isinstance(d, (LaunchSpot, LaunchOnDemand)):
                counter += 1
                market_kind = Market.SPOT if isinstance(d, LaunchSpot) else Market.ON_DEMAND
                if market_kind is Market.SPOT:
                    z = ZONES.index(d.location)
                    used = sum(1 for r in alive.values() if r.location == d.location and r.is_spot)
                    if used >= caps[z]:
                        events.append(ZoneEvent(EventKind.LAUNCH_FAILED, d.location, now))
                        continue
                    events.append(ZoneEvent(EventKind.LAUNCHED, d.location, now))
                rid = f"r-{counter:04d}"
                alive[rid] = ReplicaFact(rid, d.location, market_kind, now)
        yield decisions, list(alive.values())


@pytest.mark.parametrize("name", ONLINE)
@settings(max_examples=40, deadline=None)
@given(market=markets)
def test_never_fewer_than_target_and_within_budget(name, market):
    target, extra = market["target"], market["extra"]
    for _, alive in play(name, market):
        spot = sum(1 for r in alive if r.market is Market.SPOT)
        ondemand = len(alive) - spot
        assert spot + ondemand >= target, "a policy must always ask for at least the target"
        assert ondemand <= target, "on-demand fallback is capped at the target"
        assert spot <= target + max(extra, 2), "spot stays within target + over-provisioning budget"


@pytest.mark.parametrize("name", ONLINE)
@settings(max_examples=40, deadline=None)
@given(market=markets)
def test_a_rolling_updates_surge_is_asked_on_spot_and_never_covered_on_demand(name, market):
    """Mid rolling update the controller asks for N + 1, the one a surge (its outdated replica
    still serves): the service's N stay asked for and covered, the surge adds spot only."""
    target, extra = market["target"], market["extra"]
    for _, alive in play(name, market, surge=1):
        spot = sum(1 for r in alive if r.market is Market.SPOT)
        assert len(alive) >= target, "the service's N are always asked for"
        assert len(alive) - spot <= target, "on-demand covers the service's N at most"
        assert spot <= target + 1 + max(extra, 2), "spot stays within the budget, plus the surge"


@pytest.mark.parametrize("name", ONLINE)
@settings(max_examples=40, deadline=None)
@given(market=markets, data=st.data())
def test_a_moves_surge_never_takes_the_base_on_demand_replicas(name, market, data):
    """A placement move tells the policy that up to all of N serve outside (`surge` up to the
    target, nothing asked on top). `base_ondemand_fallback_replicas` run on-demand at all times:
    SpotHedge's fallback capped its on-demand replicas at N - surge, so a move of all N
    terminated the READY base replicas, to launch them again once the ones outside went."""
    target = market["target"]
    base = data.draw(st.integers(1, target), label="base")
    moved = data.draw(st.integers(0, target), label="moved")
    for decisions, alive in play(name, market, moved=moved, base=base):
        ondemand = sum(1 for r in alive if r.market is Market.ON_DEMAND)
        assert ondemand >= base, (decisions, alive)
        assert ondemand <= target, "on-demand stays capped at the target"


@pytest.mark.parametrize("name", ONLINE)
@settings(max_examples=25, deadline=None)
@given(market=markets, seed=st.integers(0, 3))
def test_deterministic_per_seed(name, market, seed):
    first = [d for d, _ in play(name, market, seed)]
    second = [d for d, _ in play(name, market, seed)]
    assert first == second


@pytest.mark.parametrize("name", ONLINE)
@settings(max_examples=25, deadline=None)
@given(market=markets)
def test_snapshot_restore_round_trip_changes_nothing(name, market):
    straight = [d for d, _ in play(name, market)]
    restored = [d for d, _ in play(name, market, restore_every=3)]
    assert straight == restored
