"""The controller's seams: what it needs from Terraform, the router and the probes.

Each is a small protocol so the controller can be driven by the real thing (`adapters.py`) or by
fakes (tests), and so GitOps mode is just another executor.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from skyhedge.planner import Plan
from skyhedge.state import ReplicaRecord

Root = tuple[str, str]  # (cloud, region): one Terraform root


def root_key(root: Root) -> str:
    return f"{root[0]}/{root[1]}"


@dataclass(frozen=True)
class Present:
    """A replica that exists in a root's Terraform state after an apply, with its outputs."""

    replica_id: str
    endpoint: str | None = None
    cloud_id: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ApplyReport:
    """What an apply achieved.

    `present`: every replica the applied roots now hold (by ID). `failed`: root key -> error text
    for roots whose apply failed (the replicas it did create are still in `present`).
    `capacity`: IDs of replicas whose launch was refused for capacity or quota.
    `applied`: root keys whose Terraform state now matches the desired layout.
    """

    present: dict[str, Present]
    applied: frozenset[str] = frozenset()
    failed: dict[str, str] = field(default_factory=dict)
    capacity: frozenset[str] = frozenset()
    note: str = ""


class Executor(Protocol):
    """Makes Terraform roots match a plan's desired layout."""

    def apply(self, plan: Plan, roots: Collection[Root], records: Sequence[ReplicaRecord]) -> ApplyReport:
        """Apply `plan.desired` for `roots` only; `records` are the state's replicas (for outputs)."""
        ...


class RouterPort(Protocol):
    """The one endpoint in front of the replicas."""

    def reload(self, upstreams: Sequence[tuple[str, str]]) -> None:
        """Route to exactly these (replica ID, endpoint) pairs; start the router if needed."""
        ...

    def drain(self, upstreams: Sequence[tuple[str, str]]) -> None:
        """Route to exactly these, then wait (bounded) until requests in flight to the others end."""
        ...

    def running(self) -> bool:
        """Whether the router process is up (a dead router is restarted on the next tick)."""
        ...

    def request_count(self) -> int | None:
        """The router's cumulative request counter (stub_status `requests`), None if unreadable."""
        ...


class Prober(Protocol):
    def probe(self, records: Sequence[ReplicaRecord]) -> dict[str, tuple[bool, str]]:
        """Readiness of each replica with an endpoint: ID -> (passed, detail)."""
        ...
