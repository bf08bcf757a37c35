"""Helpers shared by cloud folders (a cloud folder never imports another; shared needs live here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from skyhedge.planner import PlannedReplica
    from skyhedge.spec import ServiceSpec


def boot_config(spec: ServiceSpec) -> dict[str, Any]:
    """What a VM replica runs at boot, as data: the module turns it into base64 JSON in user data
    (never into shell text), and the boot script reads it back with a JSON parser."""
    return {
        "command": spec.run.command,
        "image": spec.run.image,
        "setup": spec.run.setup,
        "env": dict(sorted(spec.run.env.items())),
        "port": spec.resources.ports,
        "service": spec.name,
    }


def replica_map(replicas: Sequence[PlannedReplica], **extra: Any) -> dict[str, dict[str, Any]]:
    """`for_each` map keyed by stable replica ID: zone and market (plus fixed extra fields)."""
    return {
        r.id: {"zone": r.location.zone, "market": r.market.value, **extra}
        for r in sorted(replicas, key=lambda r: r.id)
    }
