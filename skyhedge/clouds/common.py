"""Helpers shared by cloud folders (a cloud folder never imports another; shared needs live here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from skyhedge.catalog import load_catalog
from skyhedge.errors import CatalogError, RenderError, SpecError

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


def catalog_gpus(cloud: str, instance_type: str) -> tuple[str | None, int] | None:
    """(accelerator, count) of `instance_type` in `cloud`'s catalog; None when it has no entry."""
    try:
        itype = load_catalog(cloud).instance_type(instance_type)
    except CatalogError:
        return None
    return itype.accelerator, itype.accelerator_count


def has_gpus(spec: ServiceSpec, cloud: str, instance_type: str) -> bool:
    """Whether `instance_type` has NVIDIA GPUs: the catalog says, else the spec's accelerators.
    A container replica gets `--gpus all` only then (Docker fails it without the NVIDIA runtime,
    as on a CPU type a user catalog adds)."""
    known = catalog_gpus(cloud, instance_type)
    if known is not None:
        return known[0] is not None and known[1] > 0
    return bool(spec.resources.accelerators)


def replica_map(replicas: Sequence[PlannedReplica]) -> dict[str, dict[str, Any]]:
    """The `for_each` map keyed by stable replica ID: zone and market."""
    return {
        r.id: {"zone": r.location.zone, "market": r.market.value}
        for r in sorted(replicas, key=lambda r: r.id)
    }


def require_arm_image(spec: ServiceSpec, cloud: str, instance_type: str, arm: bool) -> None:
    """An Arm instance type (AWS Graviton, NVIDIA Grace; GCP Axion, Ampere, Grace) cannot boot the
    modules' default image, an x86_64 Deep Learning image: refused here, naming the field, rather
    than by the cloud at launch, replica after replica."""
    if arm and not spec.resources.image_id.get(cloud):
        raise SpecError(
            f"{instance_type} is an Arm (aarch64) machine and the default {cloud} image is x86_64: "
            f"give an arm64 image",
            file=spec.source,
            path=f"resources.image_id.{cloud}",
        )


def require_instance_type(spec: ServiceSpec, cloud: str, instance_type: str | None) -> str:
    if not instance_type:
        raise RenderError(
            f"{spec.source}: no instance type resolved for cloud {cloud!r} (resources.instance_type)"
        )
    return instance_type


@dataclass(frozen=True)
class Blocked:
    """Why a replica's create will fail, as a cloud's `clear_before_apply` found it: `line`, the
    one line the apply's error for that replica says instead of Terraform's own (which stays in
    the error's detail), when Terraform's error names `evidence` (the machine's name)."""

    line: str
    evidence: str


@dataclass(frozen=True)
class Cleared:
    """What a cloud's `clear_before_apply` did before Terraform applied a root (or its
    `clear_name_conflicts` after a create found a name taken): `warnings` (`warning:` lines:
    machines removed, lookups that failed), the replicas whose create it knows will fail
    (`blocked`, by replica ID), and those whose machine name it found free, or freed (`freed`:
    a create that failed on the name succeeds if applied again)."""

    warnings: tuple[str, ...] = ()
    blocked: dict[str, Blocked] = field(default_factory=dict)
    freed: tuple[str, ...] = ()
