"""The simulated world: a trace window played as a cloud, driving a real policy object.

Each 30 s tick t:

1. the policy gets the `Observation` the controller would build: the live replicas (READY once
   their cold start has passed), and the zone events since the previous decision;
2. its decisions are applied: launches create replicas (`launched_at` = now), terminations remove
   them at once;
3. each zone's spot replicas are cut to the zone's capacity at t, newest first: a replica launched
   this tick that is cut is a failed launch (`LAUNCH_FAILED`), an older one a preemption
   (`PREEMPTED`); the rest report `LAUNCHED` / `SURVIVED`. Within a tick the good news is emitted
   before the bad, so a zone that both kept and lost replicas ends PREEMPTED (as in the paper);
4. replicas whose cold start has passed become READY (ready at tick l + cold start ticks for a
   replica launched at l), and the tick is scored: ready replicas, spot and on-demand counts.

Cutting newest first makes "replica ready" equal the paper's per-zone rule (the zone's count
held through every tick of [t - cold, t]), so the world reproduces the paper's simulator while
speaking the controller's language. On-demand capacity never runs out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from skyhedge.errors import PolicyError
from skyhedge.policy.base import Policy
from skyhedge.policy.types import (
    Candidate,
    EventKind,
    LaunchOnDemand,
    LaunchSpot,
    Location,
    Market,
    Observation,
    ReplicaFact,
    Terminate,
    ZoneEvent,
)
from skyhedge.simulator.traces import TICK_SECONDS

__all__ = ["Timeline", "World", "score"]

_SPOT = Market.SPOT
_ONDEMAND = Market.ON_DEMAND
_LAUNCHED = EventKind.LAUNCHED
_SURVIVED = EventKind.SURVIVED
_PREEMPTED = EventKind.PREEMPTED
_LAUNCH_FAILED = EventKind.LAUNCH_FAILED


@dataclass(frozen=True)
class Timeline:
    """What happened in one window, tick by tick (arrays of length T)."""

    ready: np.ndarray
    spot: np.ndarray
    ondemand: np.ndarray
    spot_by_zone: np.ndarray | None = None  # (zones, T), when recorded
    ondemand_by_zone: np.ndarray | None = None
    preemptions: int = 0
    launch_failures: int = 0


@dataclass(frozen=True)
class Score:
    availability: float
    cost: float
    relative_cost: float


def score(timeline: Timeline, *, target: int, start: int, ondemand_cost_ratio: float) -> Score:
    """Availability and cost over the scored ticks [start, T) (the paper's definitions)."""
    ready = timeline.ready[start:]
    ticks = len(ready)
    if ticks == 0 or target <= 0:
        return Score(float("nan"), 0.0, float("nan"))
    availability = float(np.count_nonzero(ready >= target)) / ticks
    cost = float(timeline.spot[start:].sum()) + ondemand_cost_ratio * float(timeline.ondemand[start:].sum())
    return Score(availability, cost, cost / (target * ondemand_cost_ratio * ticks))


class World:
    """One trace window as a cloud. `capacity[z][t]`: zone z's spot capacity at tick t."""

    def __init__(
        self,
        candidates: Sequence[Candidate],
        capacity: Sequence[Sequence[int]],
        *,
        target: int,
        cold_start_ticks: int,
        tick_seconds: float = TICK_SECONDS,
        record_zones: bool = False,
    ) -> None:
        if len(candidates) != len(capacity):
            raise ValueError("one capacity row per candidate location")
        self.candidates = tuple(candidates)
        self.capacity = [list(map(int, row)) for row in capacity]
        self.ticks = min((len(row) for row in self.capacity), default=0)
        self.target = target
        self.cold_start_ticks = max(0, int(cold_start_ticks))
        self.tick_seconds = tick_seconds
        self.record_zones = record_zones
        self._zone_index = {c.location: z for z, c in enumerate(self.candidates)}
        self._alive: dict[str, ReplicaFact] = {}
        self._stacks: list[list[str]] = [[] for _ in self.candidates]  # spot ids, launch order
        self._ondemand: list[str] = []
        self._ondemand_zone: dict[str, int] = {}
        self._warming: dict[str, int] = {}  # id -> tick it becomes READY
        self._events: tuple[ZoneEvent, ...] = ()
        self._next_id = 0
        self.t = 0
        self.preemptions = 0
        self.launch_failures = 0

    # -- the controller's view ----------------------------------------------------------------

    def observation(self) -> Observation:
        return Observation(
            self.t * self.tick_seconds,
            self.target,
            self.candidates,
            tuple(self._alive.values()),
            self._events,
        )

    @property
    def replicas(self) -> tuple[ReplicaFact, ...]:
        return tuple(self._alive.values())

    def spot_counts(self) -> list[int]:
        return [len(stack) for stack in self._stacks]

    # -- one tick -----------------------------------------------------------------------------

    def step(self, policy: Policy) -> tuple[int, int, int]:
        """Play tick `self.t`; return (ready, spot, on-demand) counts after it."""
        t = self.t
        now = t * self.tick_seconds
        alive = self._alive
        decisions = policy.decide(
            Observation(now, self.target, self.candidates, tuple(alive.values()), self._events)
        )
        launched: set[str] = set()
        for decision in decisions:
            kind = type(decision)
            if kind is LaunchSpot:
                launched.add(self._launch(decision.location, _SPOT, now, t, policy))
            elif kind is LaunchOnDemand:
                self._launch(decision.location, _ONDEMAND, now, t, policy)
            elif kind is Terminate:
                self._remove(decision.replica_id)
            else:
                raise PolicyError(f"policy {policy.name!r} returned {decision!r}, not a decision")

        good: list[ZoneEvent] = []
        bad: list[ZoneEvent] = []
        capacity = self.capacity
        spot_total = 0
        for z, stack in enumerate(self._stacks):
            if not stack:
                continue
            location = self.candidates[z].location
            excess = len(stack) - capacity[z][t]
            for _ in range(excess):
                rid = stack.pop()
                alive.pop(rid)
                self._warming.pop(rid, None)
                if rid in launched:
                    launched.discard(rid)
                    self.launch_failures += 1
                    bad.append(ZoneEvent(_LAUNCH_FAILED, location, now, rid))
                else:
                    self.preemptions += 1
                    bad.append(ZoneEvent(_PREEMPTED, location, now, rid))
            survivors = len(stack)
            spot_total += survivors
            fresh = 0
            if launched:
                for rid in stack:
                    if rid in launched:
                        fresh += 1
                        good.append(ZoneEvent(_LAUNCHED, location, now, rid))
            if survivors > fresh:
                good.append(ZoneEvent(_SURVIVED, location, now))
        good.extend(bad)
        self._events = tuple(good)

        warming = self._warming
        if warming:
            done = [rid for rid, at in warming.items() if at <= t]
            for rid in done:
                del warming[rid]
                fact = alive[rid]
                alive[rid] = ReplicaFact(
                    fact.id, fact.location, fact.market, fact.launched_at, fact.provisioned_at, now
                )
        self.t = t + 1
        return len(alive) - len(warming), spot_total, len(self._ondemand)

    def _launch(self, location: Location, market: Market, now: float, t: int, policy: Policy) -> str:
        z = self._zone_index.get(location)
        if z is None:
            raise PolicyError(f"policy {policy.name!r} launched in {location}, which is not a candidate")
        self._next_id += 1
        rid = f"r-{self._next_id:04d}"
        if self.cold_start_ticks == 0:
            fact = ReplicaFact(rid, location, market, now, now, now)
        else:
            fact = ReplicaFact(rid, location, market, now, now)
            self._warming[rid] = t + self.cold_start_ticks
        self._alive[rid] = fact
        if market is _SPOT:
            self._stacks[z].append(rid)
        else:
            self._ondemand.append(rid)
            self._ondemand_zone[rid] = z
        return rid

    def _remove(self, rid: str) -> None:
        fact = self._alive.pop(rid, None)
        if fact is None:
            return  # already gone: terminating twice is harmless, as in the controller
        self._warming.pop(rid, None)
        if fact.market is _SPOT:
            self._stacks[self._zone_index[fact.location]].remove(rid)
        else:
            self._ondemand.remove(rid)
            del self._ondemand_zone[rid]

    # -- a whole window -----------------------------------------------------------------------

    def run(self, policy: Policy) -> Timeline:
        """Play every tick of the window and return its timeline."""
        ticks = self.ticks - self.t
        ready = np.zeros(ticks, dtype=np.int64)
        spot = np.zeros(ticks, dtype=np.int64)
        ondemand = np.zeros(ticks, dtype=np.int64)
        by_zone = od_by_zone = None
        if self.record_zones:
            by_zone = np.zeros((len(self.candidates), ticks), dtype=np.int64)
            od_by_zone = np.zeros((len(self.candidates), ticks), dtype=np.int64)
        ready_l, spot_l, od_l = [], [], []
        step = self.step
        for i in range(ticks):
            r, s, o = step(policy)
            ready_l.append(r)
            spot_l.append(s)
            od_l.append(o)
            if by_zone is not None and od_by_zone is not None:
                by_zone[:, i] = self.spot_counts()
                for z in self._ondemand_zone.values():
                    od_by_zone[z, i] += 1
        ready[:] = ready_l
        spot[:] = spot_l
        ondemand[:] = od_l
        return Timeline(ready, spot, ondemand, by_zone, od_by_zone, self.preemptions, self.launch_failures)
