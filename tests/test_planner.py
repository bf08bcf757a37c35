"""Planner: stable replica IDs, diffs, and the policy+planner loop over random preemptions."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from skyhedge.planner import CREATE, DELETE, KEEP, make_plan, replica_id, replica_number
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

A = Location("aws", "us-east-1", "us-east-1a")
B = Location("aws", "us-east-1", "us-east-1b")
PRICES = {
    (A, Market.SPOT): 1.0,
    (A, Market.ON_DEMAND): 3.0,
    (B, Market.SPOT): 1.5,
    (B, Market.ON_DEMAND): 3.0,
}


def fact(rid: str, loc: Location = A, market: Market = Market.SPOT, ready: bool = True) -> ReplicaFact:
    return ReplicaFact(rid, loc, market, launched_at=0.0, provisioned_at=1.0, ready_at=2.0 if ready else None)


def _plan(current, decisions, next_id=1):
    return make_plan(
        service="s",
        target=2,
        policy="p",
        current=current,
        decisions=decisions,
        next_id=next_id,
        prices=PRICES,
        ondemand_price=3.0,
    )


def test_ids_are_stable_strings():
    assert replica_id(7) == "r-0007"
    assert replica_number("r-0007") == 7
    assert replica_id(12345) == "r-12345" and replica_number("r-12345") == 12345


def test_empty_state_creates_fresh_ids_in_order():
    plan = _plan([], [LaunchSpot(A), LaunchSpot(B), LaunchOnDemand(A)])
    assert [(r.id, r.action, r.market) for r in plan.replicas] == [
        ("r-0001", CREATE, Market.SPOT),
        ("r-0002", CREATE, Market.SPOT),
        ("r-0003", CREATE, Market.ON_DEMAND),
    ]
    assert plan.next_id == 4
    assert plan.summary()["hourly_cost"] == 1.0 + 1.5 + 3.0
    assert plan.summary()["ondemand_only_hourly_cost"] == 6.0
    assert plan.changed_roots() == {("aws", "us-east-1")}


def test_skipped_numbers_are_never_handed_out():
    plan = make_plan(
        service="s",
        target=2,
        policy="p",
        current=[fact("r-0001")],
        decisions=[LaunchSpot(A), LaunchSpot(B), LaunchOnDemand(A)],
        next_id=2,
        prices=PRICES,
        ondemand_price=3.0,
        skip_numbers=frozenset({3, 4}),
    )
    assert [r.id for r in plan.replicas] == ["r-0001", "r-0002", "r-0005", "r-0006"]
    assert plan.next_id == 7


def test_preemption_replacement_never_renames_survivors_nor_reuses_ids():
    current = [fact("r-0001"), fact("r-0003", B)]  # r-0002 was preempted
    plan = _plan(current, [LaunchSpot(B)], next_id=3)
    assert [(r.id, r.action) for r in plan.replicas] == [
        ("r-0001", KEEP),
        ("r-0003", KEEP),
        ("r-0004", CREATE),
    ]


def test_counter_never_goes_below_ids_in_use():
    plan = _plan([fact("r-0009")], [LaunchSpot(A)], next_id=1)
    assert plan.replicas[-1].id == "r-0010"


def test_terminate_marks_delete_and_unknown_ids_are_harmless():
    plan = _plan([fact("r-0001"), fact("r-0002")], [Terminate("r-0002"), Terminate("r-0099")])
    assert [(r.id, r.action) for r in plan.replicas] == [("r-0001", KEEP), ("r-0002", DELETE)]
    assert plan.has_changes and [r.id for r in plan.desired] == ["r-0001"]


def test_no_decisions_is_no_change():
    plan = _plan([fact("r-0001")], [])
    assert not plan.has_changes
    assert plan.changed_roots() == set()


def test_steady_state_cost_leaves_out_replicas_being_released():
    """A replica being released (warned of its interruption, or drained by a watcher) costs now
    but is gone once the plan has settled: counting it said "0.2% once spot replicas are READY"
    where the settled layout saves 26%, and hid the on-demand stand-in its loss keeps."""
    leaving = ReplicaFact("r-0001", A, Market.SPOT, launched_at=0.0, provisioned_at=1.0, draining=True)
    unlaunched = ReplicaFact("r-0003", A, Market.ON_DEMAND, launched_at=0.0)
    plan = _plan([leaving, fact("r-0002", B), unlaunched], [])
    assert plan.releasing == {"r-0001"} and plan.unlaunched == {"r-0003"}
    s = plan.summary()
    assert s["hourly_cost"] == 1.0 + 1.5 + 3.0  # all three run now
    # settled: r-0002 (spot) and r-0003, the on-demand stand-in for the second of target 2
    assert s["steady_state_hourly_cost"] == 1.5 + 3.0


def test_steady_state_cost_keeps_the_base_on_demand_replicas_that_always_run():
    """`base_ondemand_fallback_replicas` run on-demand whatever the spot replicas do: with every
    spot replica READY they still bill, so the settled cost `plan` shows must count them."""
    spot = [fact("r-0001"), fact("r-0002", B)]
    base = fact("r-0003", A, Market.ON_DEMAND)
    plan = make_plan(
        service="s",
        target=2,
        policy="p",
        current=[*spot, base],
        decisions=[],
        next_id=4,
        prices=PRICES,
        ondemand_price=3.0,
        base_ondemand=1,
    )
    assert plan.summary()["steady_state_hourly_cost"] == 1.0 + 1.5 + 3.0


ZONES = [Location("aws", f"r{i // 3}", f"r{i // 3}{'abc'[i % 3]}") for i in range(9)]


@settings(max_examples=60, deadline=None)
@given(
    n_zones=st.integers(2, 9),
    target=st.integers(1, 6),
    prices=st.lists(st.floats(0.1, 5.0), min_size=9, max_size=9),
    script=st.lists(
        st.tuples(st.sampled_from(["tick", "preempt", "ready"]), st.integers(0, 50)), max_size=40
    ),
)
def test_spothedge_and_planner_keep_ids_stable_over_random_preemptions(n_zones, target, prices, script):
    """Drive policy + planner through preemptions: survivors keep their IDs, IDs are never reused."""
    cands = tuple(Candidate(z, p, 3 * max(prices)) for z, p in zip(ZONES[:n_zones], prices, strict=False))
    pmap = {
        (c.location, m): (c.spot_price if m is Market.SPOT else c.ondemand_price)
        for c in cands
        for m in Market
    }
    policy = make_policy("spothedge", PolicyConfig())
    live: dict[str, ReplicaFact] = {}
    seen: set[str] = set()
    next_id, events, now = 1, [], 0.0
    for action, pick in script:
        now += 30
        if action == "preempt" and live:
            rid = sorted(live)[pick % len(live)]
            gone = live.pop(rid)
            events.append(ZoneEvent(EventKind.PREEMPTED, gone.location, now, rid))
            continue
        if action == "ready":
            live = {
                k: ReplicaFact(v.id, v.location, v.market, v.launched_at, now, now) for k, v in live.items()
            }
            continue
        obs = Observation(now, target, cands, tuple(live.values()), tuple(events))
        events = []
        plan = make_plan(
            service="s",
            target=target,
            policy="spothedge",
            current=tuple(live.values()),
            decisions=policy.decide(obs),
            next_id=next_id,
            prices=pmap,
            ondemand_price=1.0,
        )
        before = dict(live)
        for r in plan.replicas:
            if r.action == KEEP:
                assert before[r.id].location == r.location and before[r.id].market == r.market
            elif r.action == CREATE:
                assert r.id not in seen, "replica IDs must never be reused"
                seen.add(r.id)
                live[r.id] = ReplicaFact(r.id, r.location, r.market, now)
            else:
                live.pop(r.id)
        next_id = plan.next_id
        assert all(replica_number(rid) < next_id for rid in live)
