"""Helpers shared by cloud folders (a cloud folder never imports another; shared needs live here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from skyhedge.errors import RenderError

if TYPE_CHECKING:
    from skyhedge.planner import PlannedReplica
    from skyhedge.spec import ServiceSpec


def run_config(spec: ServiceSpec) -> dict[str, Any]:
    """What a VM replica runs at boot, as data: the modules hand it to the boot script as base64
    JSON (never as shell text), and the script reads it back with a JSON parser."""
    run: dict[str, Any] = {"env": dict(sorted(spec.run.env.items()))}
    for key in ("command", "image", "setup"):
        value = getattr(spec.run, key)
        if value is not None:
            run[key] = value
    return run


def replica_map(replicas: Sequence[PlannedReplica]) -> dict[str, dict[str, Any]]:
    """The `for_each` map keyed by stable replica ID: zone and market."""
    return {
        r.id: {"zone": r.location.zone, "market": r.market.value}
        for r in sorted(replicas, key=lambda r: r.id)
    }


def require_instance_type(spec: ServiceSpec, cloud: str, instance_type: str | None) -> str:
    if not instance_type:
        raise RenderError(
            f"{spec.source}: no instance type resolved for cloud {cloud!r} (resources.instance_type)"
        )
    return instance_type
