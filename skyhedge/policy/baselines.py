"""The baselines SpotHedge is compared with, as the SkyServe paper's simulator defines them.

- `ondemand`: N on-demand replicas in the cheapest on-demand location; never spot, never extra.
- `even` (the paper's "Even Spread"): N + N_extra spot replicas, each new one into the location
  holding the fewest, ties by price then candidate order. Survivors stay where they are.
- `rr` (the paper's "Round Robin"): N + N_extra spot replicas, new ones to locations in turn
  (candidate order), the turn carried across decisions.
- `single-region` (ASG-like): N + N_extra spot replicas spread evenly over the zones of the
  cheapest region only, the way an auto-scaling group balances one region's zones.

The spot baselines never fall back to on-demand. Like the paper's simulator, which takes the
over-provisioning number as a parameter of every policy, they honour `num_overprovision` (its
figures mix runs with N_extra = 0 and 1; use 0 for its "main" experiment). They keep
`base_ondemand_fallback_replicas` as a static on-demand floor (ASG's OnDemandBaseCapacity), 0 by
default. Like SpotHedge they work on any `Observation` (plan, watch, simulate).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any, ClassVar

from skyhedge.policy.base import Policy
from skyhedge.policy.spothedge import live_replicas, pick_victims
from skyhedge.policy.types import (
    Candidate,
    Decision,
    LaunchOnDemand,
    LaunchSpot,
    Location,
    Observation,
    ReplicaFact,
    Terminate,
)

__all__ = ["EvenSpread", "OnDemandOnly", "RoundRobin", "SingleRegion"]


def _static_mix(policy: Policy, target: int) -> tuple[int, int]:
    """(spot, on-demand) counts of a baseline: the on-demand floor, spot for the rest + extra."""
    if target <= 0:
        return 0, 0
    config = policy.config
    base = min(max(0, config.base_ondemand_fallback_replicas), target)
    return target + max(0, config.num_overprovision) - base, base


def _ondemand_decisions(
    candidates: Sequence[Candidate], ondemand: list[ReplicaFact], wanted: int
) -> list[Decision]:
    if len(ondemand) > wanted:
        return [Terminate(r.id) for r in pick_victims(ondemand, len(ondemand) - wanted)]
    if len(ondemand) < wanted and candidates:
        best = min(candidates, key=lambda c: c.ondemand_price).location
        return [LaunchOnDemand(best) for _ in range(wanted - len(ondemand))]
    return []


def _counts(spot: list[ReplicaFact]) -> dict[Location, int]:
    holding: dict[Location, int] = {}
    for replica in spot:
        holding[replica.location] = holding.get(replica.location, 0) + 1
    return holding


class _SpotBaseline(Policy):
    """Shared shape: keep survivors, place the missing spot replicas, trim surplus."""

    def _zones(self, candidates: tuple[Candidate, ...]) -> list[Candidate]:
        return list(candidates)

    def _place(self, zones: list[Candidate], count: int, holding: dict[Location, int]) -> list[Location]:
        raise NotImplementedError

    def decide(self, obs: Observation) -> list[Decision]:
        spot, ondemand = live_replicas(obs)
        spot_wanted, ondemand_wanted = _static_mix(self, obs.target)
        decisions: list[Decision] = []
        if len(spot) > spot_wanted:
            decisions.extend(Terminate(r.id) for r in pick_victims(spot, len(spot) - spot_wanted))
        elif len(spot) < spot_wanted:
            zones = self._zones(obs.candidates)
            if zones:
                placed = self._place(zones, spot_wanted - len(spot), _counts(spot))
                decisions.extend(LaunchSpot(location) for location in placed)
        decisions.extend(_ondemand_decisions(obs.ondemand_choices(), ondemand, ondemand_wanted))
        return decisions


class OnDemandOnly(Policy):
    """N on-demand replicas, nothing else: the cost every other policy is measured against."""

    name: ClassVar[str] = "ondemand"

    def decide(self, obs: Observation) -> list[Decision]:
        spot, ondemand = live_replicas(obs)
        decisions: list[Decision] = [Terminate(r.id) for r in spot]
        decisions.extend(_ondemand_decisions(obs.ondemand_choices(), ondemand, max(0, obs.target)))
        return decisions


class EvenSpread(_SpotBaseline):
    """Each new spot replica goes to the location holding the fewest (paper: "Even Spread")."""

    name: ClassVar[str] = "even"

    def _place(self, zones: list[Candidate], count: int, holding: dict[Location, int]) -> list[Location]:
        heap = [(holding.get(c.location, 0), c.spot_price, i) for i, c in enumerate(zones)]
        heapq.heapify(heap)
        chosen: list[Location] = []
        for _ in range(count):
            held, price, i = heapq.heappop(heap)
            chosen.append(zones[i].location)
            heapq.heappush(heap, (held + 1, price, i))
        return chosen


class RoundRobin(_SpotBaseline):
    """New spot replicas go to the candidate locations in turn (paper: "Round Robin")."""

    name: ClassVar[str] = "rr"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._next = 0

    def _place(self, zones: list[Candidate], count: int, holding: dict[Location, int]) -> list[Location]:
        chosen: list[Location] = []
        for _ in range(count):
            self._next %= len(zones)
            chosen.append(zones[self._next].location)
            self._next += 1
        return chosen

    def snapshot(self) -> dict[str, Any]:
        return {"next": self._next}

    def restore(self, data: dict[str, Any]) -> None:
        self._next = int(data.get("next", 0))


class SingleRegion(EvenSpread):
    """ASG-like: spot replicas spread evenly over the zones of the cheapest region only."""

    name: ClassVar[str] = "single-region"

    def _zones(self, candidates: tuple[Candidate, ...]) -> list[Candidate]:
        if not candidates:
            return []
        cheapest = min(candidates, key=lambda c: c.spot_price).location
        region = (cheapest.cloud, cheapest.region)
        return [c for c in candidates if (c.location.cloud, c.location.region) == region]
