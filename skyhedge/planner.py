"""PURE. Turn the current replicas plus a policy's decisions into the desired layout and its diff.

Replica IDs are stable strings (`r-0007`) handed out from a counter kept in state: Terraform's
`for_each` keys on them, so a preemption of one replica must never rename another. The planner
does no I/O; prices come in as a mapping so that `plan`, `watch` and `simulate` share it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from skyhedge.policy.types import (
    Decision,
    LaunchOnDemand,
    LaunchSpot,
    Location,
    Market,
    ReplicaFact,
    Terminate,
)

CREATE = "create"
KEEP = "keep"
DELETE = "delete"


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


def replica_id(n: int) -> str:
    return f"r-{n:04d}"


def replica_number(rid: str) -> int:
    """The counter value inside an ID (`r-0007` -> 7); IDs beyond 9999 simply grow wider."""
    return int(rid.split("-", 1)[1])


def replica_order(rid: str) -> tuple[int, int, str]:
    """The sort key of replica IDs: the order they were handed out in, `r-9999` before `r-10000`.

    IDs are never reused, so a long-lived service with preemption churn passes r-9999 (a soak
    reached r-4000 in 30 minutes), and as text "r-10000" sorts before "r-9999": a state reloaded
    from state.json listed its replicas in that order, and SpotHedge's "newest first" then released
    r-9999 where the same state in memory released r-10001. Every ordering of replica IDs goes
    through this key (`by_replica_id` for records), so below r-10000 nothing changes (the 4-digit
    IDs' text order is their number's). A string not shaped like an ID sorts after all IDs, as text.
    """
    digits = rid[2:] if rid.startswith("r-") else ""
    if digits.isascii() and digits.isdigit():
        return (0, int(digits), rid)
    return (1, 0, rid)


def by_replica_id(item: _HasId) -> tuple[int, int, str]:
    """`replica_order` of `item.id`: the sort key of records, facts and planned replicas."""
    return replica_order(item.id)


@dataclass(frozen=True)
class PlannedReplica:
    id: str
    location: Location
    market: Market
    action: str
    price_per_hour: float
    #: the replica's `spec.replica_revision`: rendered into its Terraform inputs, so a spec change
    #: never replaces a running replica in place (a rolling update replaces it instead)
    revision: str = ""
    #: a port fixed at launch (local cloud), kept when `resources.local_base_port` changes
    port: int | None = None
    #: an outdated replica: kept until a replacement is READY, then released (rolling update)
    outdated: bool = False
    #: the subnet a launched AWS replica runs in (from its outputs): it stays there, and in that
    #: subnet's VPC and security group, whatever `aws.subnets` says now
    subnet_id: str | None = None

    @property
    def root(self) -> tuple[str, str]:
        """The Terraform root (cloud, region) this replica is rendered into."""
        return (self.location.cloud, self.location.region)


@dataclass(frozen=True)
class Plan:
    service: str
    target: int
    policy: str
    replicas: tuple[PlannedReplica, ...]
    next_id: int
    ondemand_only_hourly_cost: float
    base_ondemand: int = 0
    #: kept replicas being released (draining: warned by their cloud, or released by a watcher):
    #: they run, and cost, until their requests end, but the plan has already replaced them
    releasing: frozenset[str] = frozenset()
    #: kept replicas recorded but never provisioned (the apply that launched them failed or was
    #: interrupted): the next apply creates them, so a confirmation must not show them as kept
    unlaunched: frozenset[str] = frozenset()

    @property
    def desired(self) -> tuple[PlannedReplica, ...]:
        """Replicas that exist after the plan is applied (created or kept)."""
        return tuple(r for r in self.replicas if r.action != DELETE)

    @property
    def changes(self) -> tuple[PlannedReplica, ...]:
        return tuple(r for r in self.replicas if r.action != KEEP)

    @property
    def has_changes(self) -> bool:
        return bool(self.changes)

    def changed_roots(self) -> set[tuple[str, str]]:
        return {r.root for r in self.changes}

    def roots(self) -> set[tuple[str, str]]:
        return {r.root for r in self.replicas}

    @property
    def hourly_cost(self) -> float:
        return sum(r.price_per_hour for r in self.desired)

    def summary(self) -> dict[str, object]:
        desired = self.desired
        cost = self.hourly_cost
        od = self.ondemand_only_hourly_cost
        # once spot replicas are READY the fallback goes; on-demand replicas that stand in for no
        # spot replica (the static base, or a policy that runs on-demand only) stay; replicas
        # being released go too (they cost now, not then)
        settled = [r for r in desired if r.id not in self.releasing]
        spot_cost = sum(r.price_per_hour for r in settled if r.market is Market.SPOT)
        od_prices = sorted(r.price_per_hour for r in settled if r.market is Market.ON_DEMAND)
        spot_count = sum(1 for r in settled if r.market is Market.SPOT)
        lasting = max(self.base_ondemand, self.target - spot_count)
        steady = spot_cost + sum(od_prices[:lasting])
        return {
            "spot": sum(1 for r in desired if r.market is Market.SPOT),
            "on_demand": sum(1 for r in desired if r.market is Market.ON_DEMAND),
            "hourly_cost": round(cost, 6),
            "ondemand_only_hourly_cost": round(od, 6),
            "savings_pct": round(100.0 * (1 - cost / od), 2) if od > 0 else 0.0,
            "steady_state_hourly_cost": round(steady, 6),
            "steady_state_savings_pct": round(100.0 * (1 - steady / od), 2) if od > 0 else 0.0,
            "zones_used": len({r.location for r in desired}),
            "create": sum(1 for r in self.replicas if r.action == CREATE),
            "delete": sum(1 for r in self.replicas if r.action == DELETE),
            "keep": sum(1 for r in self.replicas if r.action == KEEP),
            "outdated": sum(1 for r in desired if r.outdated),
        }


def make_plan(
    *,
    service: str,
    target: int,
    policy: str,
    current: Sequence[ReplicaFact],
    decisions: Iterable[Decision],
    next_id: int,
    prices: Mapping[tuple[Location, Market], float],
    ondemand_price: float,
    base_ondemand: int = 0,
    skip_numbers: frozenset[int] = frozenset(),
) -> Plan:
    """Apply decisions to the current live replicas.

    Terminations of unknown IDs are ignored (a repeated tick must be harmless); new replicas get
    fresh IDs above every ID already in use, so IDs are never reused. `skip_numbers`: ID numbers
    never handed out (a local replica's port is derived from its number, and some ports are taken
    by the router).
    """
    live = {r.id: r for r in current if r.alive}
    in_use = [replica_number(rid) for rid in live]
    counter = max([next_id, *(n + 1 for n in in_use)])
    deleted: set[str] = set()
    created: list[PlannedReplica] = []
    for d in decisions:
        if isinstance(d, Terminate):
            if d.replica_id in live:
                deleted.add(d.replica_id)
        elif isinstance(d, (LaunchSpot, LaunchOnDemand)):
            market = Market.SPOT if isinstance(d, LaunchSpot) else Market.ON_DEMAND
            while counter in skip_numbers:
                counter += 1
            created.append(
                PlannedReplica(
                    replica_id(counter), d.location, market, CREATE, prices.get((d.location, market), 0.0)
                )
            )
            counter += 1
    kept = [
        PlannedReplica(
            r.id,
            r.location,
            r.market,
            DELETE if r.id in deleted else KEEP,
            prices.get((r.location, r.market), 0.0),
        )
        for r in live.values()
    ]
    replicas = tuple(sorted([*kept, *created], key=by_replica_id))
    kept_ids = [r.id for r in live.values() if r.id not in deleted]
    return Plan(
        service=service,
        target=target,
        policy=policy,
        replicas=replicas,
        next_id=counter,
        ondemand_only_hourly_cost=target * ondemand_price,
        base_ondemand=base_ondemand,
        releasing=frozenset(rid for rid in kept_ids if live[rid].draining),
        unlaunched=frozenset(rid for rid in kept_ids if live[rid].provisioned_at is None),
    )
