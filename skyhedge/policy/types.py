"""The vocabulary shared by policies, the planner, the controller and the simulator.

Everything here is a frozen value: policies receive an `Observation` and return a list of
decisions; they never read a clock, a file or a cloud. The same types are produced by the
controller (from real clouds) and by the simulator (from traces), so there is one SpotHedge.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class Market(str, enum.Enum):
    SPOT = "spot"
    ON_DEMAND = "on-demand"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, order=True)
class Location:
    """A failure domain: one zone of one region of one cloud."""

    cloud: str
    region: str
    zone: str

    @property
    def key(self) -> str:
        return f"{self.cloud}/{self.region}/{self.zone}"

    def __str__(self) -> str:
        return self.key

    @classmethod
    def parse(cls, key: str) -> Location:
        cloud, region, zone = key.split("/")
        return cls(cloud, region, zone)


@dataclass(frozen=True)
class Candidate:
    """A location a replica may be placed in, with its hourly prices there. `spot_price` is
    `math.inf` where the location sells the instance type on-demand only (those locations come in
    `Observation.ondemand_only`, never in `candidates`)."""

    location: Location
    spot_price: float
    ondemand_price: float

    @property
    def sells_spot(self) -> bool:
        return math.isfinite(self.spot_price)


class ReplicaStatus(str, enum.Enum):
    """SkyServe's replica states, derived from facts (see `ReplicaFact.status`)."""

    PROVISIONING = "PROVISIONING"
    STARTING = "STARTING"
    READY = "READY"
    NOT_READY = "NOT_READY"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    PREEMPTED = "PREEMPTED"
    FAILED = "FAILED"
    TERMINATED = "TERMINATED"

    def __str__(self) -> str:
        return self.value


# Allowed status transitions; tests check every observed change against this table.
TRANSITIONS: dict[ReplicaStatus, frozenset[ReplicaStatus]] = {
    ReplicaStatus.PROVISIONING: frozenset(
        {ReplicaStatus.STARTING, ReplicaStatus.FAILED, ReplicaStatus.PREEMPTED, ReplicaStatus.SHUTTING_DOWN}
    ),
    ReplicaStatus.STARTING: frozenset(
        {ReplicaStatus.READY, ReplicaStatus.FAILED, ReplicaStatus.PREEMPTED, ReplicaStatus.SHUTTING_DOWN}
    ),
    ReplicaStatus.READY: frozenset(
        {ReplicaStatus.NOT_READY, ReplicaStatus.PREEMPTED, ReplicaStatus.SHUTTING_DOWN, ReplicaStatus.FAILED}
    ),
    ReplicaStatus.NOT_READY: frozenset(
        {ReplicaStatus.READY, ReplicaStatus.PREEMPTED, ReplicaStatus.SHUTTING_DOWN, ReplicaStatus.FAILED}
    ),
    ReplicaStatus.SHUTTING_DOWN: frozenset({ReplicaStatus.TERMINATED}),
    ReplicaStatus.PREEMPTED: frozenset(),
    ReplicaStatus.FAILED: frozenset(),
    ReplicaStatus.TERMINATED: frozenset(),
}


@dataclass(frozen=True)
class ReplicaFact:
    """What was observed of one replica. Status is derived from these facts, never stored.

    `launched_at`: when it was asked for (seconds, any epoch the caller keeps consistent);
    `provisioned_at`: when the cloud reported it running; `ready_at`: first passing probe;
    `not_ready_since`: probes failing since then (None while healthy);
    `gone_at` + `reason` (`preempted` | `failed` | `terminated`): when and why it went away.
    """

    id: str
    location: Location
    market: Market
    launched_at: float
    provisioned_at: float | None = None
    ready_at: float | None = None
    not_ready_since: float | None = None
    gone_at: float | None = None
    reason: str | None = None
    draining: bool = False

    @property
    def status(self) -> ReplicaStatus:
        if self.gone_at is not None:
            return {
                "preempted": ReplicaStatus.PREEMPTED,
                "failed": ReplicaStatus.FAILED,
            }.get(self.reason or "", ReplicaStatus.TERMINATED)
        if self.draining:
            return ReplicaStatus.SHUTTING_DOWN
        if self.ready_at is None:
            return ReplicaStatus.STARTING if self.provisioned_at is not None else ReplicaStatus.PROVISIONING
        if self.not_ready_since is not None:
            return ReplicaStatus.NOT_READY
        return ReplicaStatus.READY

    @property
    def alive(self) -> bool:
        return self.gone_at is None

    @property
    def ready(self) -> bool:
        return self.status is ReplicaStatus.READY

    @property
    def is_spot(self) -> bool:
        return self.market is Market.SPOT


class EventKind(str, enum.Enum):
    PREEMPTED = "preempted"  # a replica in this location was taken away
    LAUNCH_FAILED = "launch_failed"  # a spot launch was refused (capacity, quota)
    LAUNCHED = "launched"  # a spot launch here succeeded
    SURVIVED = "survived"  # a spot replica here lived through a decision period
    WARNING = "warning"  # interruption warning / rebalance recommendation

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ZoneEvent:
    """A normalised fact about a location, from any source (cloud events, simulator, probes)."""

    kind: EventKind
    location: Location
    at: float
    replica_id: str | None = None


@dataclass(frozen=True)
class Observation:
    """Everything a policy may know at one decision: no clock, no I/O, no look-ahead.

    `replicas` holds only live replicas (gone ones are reported through `events`).
    `events` are the zone events since the previous decision, oldest first.
    `candidates` are the allowed locations that sell spot, with prices, in a stable order (ties
    break by it). `ondemand_only` are allowed locations that sell the type on-demand only: an
    on-demand replica may go there (`ondemand_choices()`), a spot one never.
    `surge`: how many of `target` replace replicas that are READY and serving meanwhile: a
    rolling update's replica beyond the service's own N (the controller's replacement for an
    outdated replica that is still in `replicas`), and, in a placement move, the READY replicas
    outside the allowed locations (not in `replicas`: the policy places N inside while they serve
    until those are READY). The service needs `target - surge` READY from `replicas`, so the
    on-demand fallback covers that many and the surge is placed as spot, not stood in for. Without it, each
    step of every rolling update bought an on-demand stand-in for the starting surge (N = 3: 3 to
    6 on-demand launches per update), paid for a cold start and released again; a move out of
    the zone holding N = 3 bought 3. Never set by
    the simulator (it rolls nothing); 0 leaves every decision as it was.
    """

    now: float
    target: int
    candidates: tuple[Candidate, ...]
    replicas: tuple[ReplicaFact, ...] = ()
    events: tuple[ZoneEvent, ...] = ()
    ondemand_only: tuple[Candidate, ...] = ()
    surge: int = 0

    def ondemand_choices(self) -> tuple[Candidate, ...]:
        """Where an on-demand replica may go: every candidate, then the on-demand-only locations."""
        return self.candidates + self.ondemand_only if self.ondemand_only else self.candidates

    def spot(self) -> list[ReplicaFact]:
        return [r for r in self.replicas if r.market is Market.SPOT]

    def ondemand(self) -> list[ReplicaFact]:
        return [r for r in self.replicas if r.market is Market.ON_DEMAND]


@dataclass(frozen=True)
class LaunchSpot:
    location: Location


@dataclass(frozen=True)
class LaunchOnDemand:
    location: Location


@dataclass(frozen=True)
class Terminate:
    replica_id: str
    drain: bool = True


Decision = LaunchSpot | LaunchOnDemand | Terminate


@dataclass(frozen=True)
class PolicyConfig:
    """The knobs of `replica_policy` a placement policy reads (SkyServe's names)."""

    num_overprovision: int = 1
    base_ondemand_fallback_replicas: int = 0
    dynamic_ondemand_fallback: bool = True
    availability_target: float | None = None
    extra: dict[str, object] = field(default_factory=dict)
