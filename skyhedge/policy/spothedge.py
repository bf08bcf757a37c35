"""SpotHedge, as the SkyServe paper publishes it, and SkyServe's shipped variant.

Both are pure: an `Observation` in, decisions out. The only memory is which locations are
PREEMPTED (every location starts ACTIVE), learned from `obs.events`:

- a preemption or a refused spot launch in a location marks it PREEMPTED;
- a successful spot launch there (and, for the published SpotHedge, a spot replica that lived
  through a decision period there) marks it ACTIVE again;
- when too few candidate locations remain ACTIVE, all become ACTIVE again (reset rule). SkyServe
  resets when fewer than 2 are ACTIVE. The paper's simulator resets when `active <= min(1, n-3)`:
  fewer than 2 with four or more locations, none left with three or fewer. On 3-zone traces this
  difference alone moves SpotHedge's cost by 0.1-0.2 of on-demand (see docs/simulate.md).

Counts (SkyServe's `replica_policy` knobs, see `PolicyConfig`):

- spot target = N + num_overprovision - base_ondemand_fallback_replicas;
- on-demand target = base + (dynamic fallback: max(0, spot target - READY spot)), capped at N,
  so on-demand replicas cover exactly the spot replicas that are not serving yet and go away as
  spot replicas become READY (a rolling update's surge, `Observation.surge`, is not covered: the
  outdated replica it replaces is still serving);
- surplus replicas are terminated not-ready first, then newest first (the oldest READY ones are
  the ones serving traffic).

A new spot replica goes to the cheapest ACTIVE location that holds no spot replica of the service
yet, else the cheapest ACTIVE one; on-demand replicas go to the cheapest on-demand location. Ties
break by candidate order. The same objects serve `plan`, `watch` and `simulate` (~200k calls per
simulation), so `decide` avoids allocation-heavy work and caches price orderings per candidate
tuple.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from itertools import islice
from typing import Any, ClassVar

from skyhedge.errors import PolicyError
from skyhedge.policy.base import Policy
from skyhedge.policy.types import (
    Candidate,
    Decision,
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
)

__all__ = [
    "SkyServe",
    "SpotHedge",
    "fallback_targets",
    "is_ready",
    "live_replicas",
    "pick_victims",
]

_PREEMPTING = frozenset({EventKind.PREEMPTED, EventKind.LAUNCH_FAILED})


def is_ready(replica: ReplicaFact) -> bool:
    """READY without the enum round-trip of `ReplicaFact.ready` (this runs in the hot loop)."""
    return (
        replica.ready_at is not None
        and replica.not_ready_since is None
        and replica.gone_at is None
        and not replica.draining
    )


def live_replicas(obs: Observation) -> tuple[list[ReplicaFact], list[ReplicaFact]]:
    """The spot and on-demand replicas that count: alive and not already shutting down."""
    spot: list[ReplicaFact] = []
    ondemand: list[ReplicaFact] = []
    for replica in obs.replicas:
        if replica.gone_at is not None or replica.draining:
            continue
        if replica.market is Market.SPOT:
            spot.append(replica)
        else:
            ondemand.append(replica)
    return spot, ondemand


def pick_victims(replicas: Sequence[ReplicaFact], count: int) -> list[ReplicaFact]:
    """The `count` replicas to terminate: not-ready first, then newest first.

    Keeping the oldest READY replicas keeps the ones serving traffic; in the simulator this also
    makes per-replica readiness equal the paper's per-zone "count held through the cold start".
    """
    if count <= 0:
        return []
    order = sorted(
        range(len(replicas)),
        key=lambda i: (is_ready(replicas[i]), -replicas[i].launched_at, -i),
    )
    return [replicas[i] for i in order[:count]]


def fallback_targets(config: PolicyConfig, target: int, ready_spot: int, surge: int = 0) -> tuple[int, int]:
    """(spot target, on-demand target) for N = `target` with `ready_spot` spot replicas READY.

    `surge` (`Observation.surge`): replicas of `target` whose outdated replica serves meanwhile
    (a rolling update's beyond the service's N; a placement move's, for replicas outside it).
    They are spot replicas like the rest, but the on-demand fallback covers the service's N only:
    the outdated replica a surge replica replaces is READY and serving, so an on-demand stand-in
    for the surge would serve nothing the service lacks. The `base_ondemand_fallback_replicas`
    run whatever the surge: a move's surge can be all of N (every replica outside a narrowed
    placement still serving), and capped at `target - surge` the base was terminated mid move,
    READY, and launched again once the replicas outside were released (measured, N = 3 moved
    out of three zones, a 120 s cold start: 245 s without a READY on-demand replica, and one
    on-demand launch to put the base back)."""
    if target <= 0:
        return 0, 0
    surge = min(max(0, surge), target)
    base = max(0, config.base_ondemand_fallback_replicas)
    spot_target = max(0, target + max(0, config.num_overprovision) - base)
    ondemand = base
    if config.dynamic_ondemand_fallback:
        ondemand += max(0, spot_target - surge - ready_spot)
    return spot_target, min(ondemand, max(min(base, target), target - surge))


def spot_surplus(
    spot: Sequence[ReplicaFact], ondemand: Sequence[ReplicaFact], count: int, ondemand_target: int
) -> list[ReplicaFact]:
    """`count` surplus spot replicas to release (`pick_victims`), but a READY one only once READY
    on-demand replicas make up `ondemand_target`: the surplus is spot the fallback trades for
    on-demand (a base on-demand replica coming back after a rolling update, whose surge was spot,
    replaced it), and released in the pass that launched that replacement it took the service
    one READY replica below N for a cold start (N = 1, `base_ondemand_fallback_replicas: 1`: 0
    READY; N = 3 with a base of 1: 2). The oldest READY ones serve on until then."""
    victims = pick_victims(spot, count)
    spare = max(0, ondemand_target - sum(1 for r in ondemand if is_ready(r)))
    ready = [r for r in victims if is_ready(r)]  # last in `victims`, the oldest last
    kept = {r.id for r in ready[max(0, len(ready) - spare) :]}
    return [r for r in victims if r.id not in kept]


def _cheapest_ondemand(candidates: Sequence[Candidate]) -> Candidate:
    return min(candidates, key=lambda c: c.ondemand_price)  # min keeps the first of equals


class SpotHedge(Policy):
    """SpotHedge as published (SkyServe paper, EuroSys '25; its simulator artifact)."""

    name: ClassVar[str] = "spothedge"
    #: Event kinds that bring a location back to ACTIVE. The published policy trusts a location
    #: again as soon as a spot replica survives there; SkyServe only on a successful launch.
    activating: ClassVar[frozenset[EventKind]] = frozenset({EventKind.LAUNCHED, EventKind.SURVIVED})

    def __init__(self, config: PolicyConfig | None = None, *, seed: int = 0) -> None:
        super().__init__(config, seed=seed)
        self._preempted: set[Location] = set()
        self._cached_for: tuple[Candidate, ...] | None = None
        self._cached_ondemand: tuple[Candidate, ...] | None = None
        self._spot_order: list[Location] = []
        self._ondemand_best: Location | None = None

    # -- memory -------------------------------------------------------------------------------

    def observe(self, events: Iterable[ZoneEvent]) -> None:
        """Fold zone events (oldest first) into the ACTIVE/PREEMPTED memory."""
        preempted = self._preempted
        activating = self.activating
        for event in events:
            kind = event.kind
            if kind in _PREEMPTING:
                preempted.add(event.location)
            elif kind in activating:
                preempted.discard(event.location)

    @staticmethod
    def min_active(locations: int) -> int:
        """Fewest ACTIVE locations tolerated before all become ACTIVE again.

        The paper's simulator resets when `active <= min(1, n - 3)`: with 4+ locations that is
        "fewer than 2 ACTIVE"; with 3 or fewer, "none ACTIVE" (resetting as soon as 2 of 3 zones
        failed would throw away what was just learned and relaunch into a zone without capacity).
        """
        return 2 if locations >= 4 else 1

    def _apply_reset_rule(self, candidates: Sequence[Candidate]) -> None:
        if not self._preempted:
            return
        needed = self.min_active(len(candidates))
        active = 0
        for candidate in candidates:
            if candidate.location not in self._preempted:
                active += 1
                if active >= needed:
                    return
        self._preempted.clear()

    def zone_status(self, candidates: Sequence[Candidate]) -> dict[Location, str]:
        """ACTIVE/PREEMPTED per candidate location, as the next decision would see it."""
        return {c.location: ("PREEMPTED" if c.location in self._preempted else "ACTIVE") for c in candidates}

    def snapshot(self) -> dict[str, Any]:
        return {"preempted": sorted(location.key for location in self._preempted)}

    def restore(self, data: dict[str, Any]) -> None:
        keys = data.get("preempted", [])
        if not isinstance(keys, list):
            raise PolicyError(f"{self.name}: snapshot field 'preempted' must be a list of locations")
        try:
            self._preempted = {Location.parse(str(key)) for key in keys}
        except ValueError as exc:
            raise PolicyError(f"{self.name}: snapshot has a bad location ({exc})") from exc

    # -- decisions ----------------------------------------------------------------------------

    def _orderings(self, candidates: tuple[Candidate, ...], ondemand: tuple[Candidate, ...]) -> None:
        if candidates is self._cached_for and ondemand is self._cached_ondemand:
            return
        self._cached_for, self._cached_ondemand = candidates, ondemand
        ranked = sorted(range(len(candidates)), key=lambda i: (candidates[i].spot_price, i))
        self._spot_order = [candidates[i].location for i in ranked]
        self._ondemand_best = _cheapest_ondemand(ondemand).location if ondemand else None

    def place_spot(
        self, count: int, holding: dict[Location, int], avoid: Collection[Location] = ()
    ) -> list[Location]:
        """Locations for `count` new spot replicas given the spot replicas per location now.

        The cheapest ACTIVE locations holding none come first, one replica each (so replicas sit in
        distinct zones while distinct ACTIVE zones remain); the rest go to the cheapest ACTIVE one.
        Locations in `avoid` are left out unless no other ACTIVE location remains.
        """
        if count <= 0:
            return []
        preempted = self._preempted
        active = [location for location in self._spot_order if location not in preempted]
        if avoid:
            active = [location for location in active if location not in avoid] or active
        if not active:
            return []
        chosen = list(islice((loc for loc in active if not holding.get(loc)), count))
        chosen.extend([active[0]] * (count - len(chosen)))
        for location in chosen:
            holding[location] = holding.get(location, 0) + 1
        return chosen

    def decide(self, obs: Observation) -> list[Decision]:
        candidates = obs.candidates
        self.observe(obs.events)
        self._apply_reset_rule(candidates)
        self._orderings(candidates, obs.ondemand_choices())
        spot, ondemand = live_replicas(obs)
        ready_spot = 0
        for replica in spot:
            if replica.ready_at is not None and replica.not_ready_since is None:
                ready_spot += 1
        spot_target, ondemand_target = fallback_targets(self.config, obs.target, ready_spot, obs.surge)

        decisions: list[Decision] = []
        if len(spot) < spot_target:
            holding: dict[Location, int] = {}
            for replica in spot:
                holding[replica.location] = holding.get(replica.location, 0) + 1
            for location in self.place_spot(spot_target - len(spot), holding):
                decisions.append(LaunchSpot(location))
        elif len(spot) > spot_target:
            surplus = spot_surplus(spot, ondemand, len(spot) - spot_target, ondemand_target)
            decisions.extend(Terminate(r.id) for r in surplus)

        if len(ondemand) < ondemand_target:
            if self._ondemand_best is not None:
                launch = LaunchOnDemand(self._ondemand_best)
                decisions.extend(launch for _ in range(ondemand_target - len(ondemand)))
        elif len(ondemand) > ondemand_target:
            victims = pick_victims(ondemand, len(ondemand) - ondemand_target)
            decisions.extend(Terminate(r.id) for r in victims)
        return decisions


class SkyServe(SpotHedge):
    """SkyPilot's shipped SpotHedge (`sky/serve`, `DynamicFallbackSpotPlacer`).

    Differences from the published policy: a location becomes ACTIVE again only when a spot launch
    there succeeds (the replica manager calls `set_active` when a launch finishes), not when a
    replica merely survives; and all locations become ACTIVE again as soon as fewer than 2 are
    (`set_preemptive`), whatever their number. Placement is the same: the cheapest ACTIVE location
    not holding a spot replica, else the cheapest ACTIVE one.
    """

    name: ClassVar[str] = "skyserve"
    activating: ClassVar[frozenset[EventKind]] = frozenset({EventKind.LAUNCHED})

    @staticmethod
    def min_active(locations: int) -> int:
        """`set_preemptive` clears all marks when fewer than 2 locations stay ACTIVE."""
        return 2
