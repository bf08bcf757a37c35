"""Terraform inputs for one GCP root (modules/gcp-replicas)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from skyhedge.catalog import load_catalog
from skyhedge.clouds import RenderContext
from skyhedge.clouds.common import replica_map, require_instance_type, run_config
from skyhedge.errors import CatalogError, RenderError

if TYPE_CHECKING:
    from skyhedge.planner import PlannedReplica
    from skyhedge.spec import ServiceSpec

# Catalog accelerator names -> Compute Engine accelerator types (attached to n1 machines only;
# a2/a3/g2 machine types come with their GPUs).
ACCELERATOR_TYPES = {
    "T4": "nvidia-tesla-t4",
    "V100": "nvidia-tesla-v100",
    "P100": "nvidia-tesla-p100",
    "P4": "nvidia-tesla-p4",
    "K80": "nvidia-tesla-k80",
    "L4": "nvidia-l4",
    "A100": "nvidia-tesla-a100",
    "A100-80GB": "nvidia-a100-80gb",
    "H100": "nvidia-h100-80gb",
}


def accelerator_for(spec: ServiceSpec, machine_type: str) -> tuple[dict[str, Any] | None, bool]:
    """(guest_accelerator to attach or None, whether the replica has GPUs at all)."""
    try:
        itype = load_catalog("gcp").instance_type(machine_type)
        name, count = itype.accelerator, itype.accelerator_count
    except CatalogError:
        name, count = None, 0
    if name is None and spec.resources.accelerators:
        acc, _, n = spec.resources.accelerators.partition(":")
        name, count = acc, int(n or 1)
    if name is None:
        return None, False
    if not machine_type.startswith("n1-"):
        return None, True
    if name not in ACCELERATOR_TYPES:
        raise RenderError(
            f"{spec.source}: resources.accelerators: no GCP accelerator type known for {name!r}"
        )
    return {"type": ACCELERATOR_TYPES[name], "count": count}, True


class GcpCloud:
    name = "gcp"
    module_name = "gcp-replicas"
    variables = (
        ("service", "The skyhedge service name."),
        ("project", "The GCP project (null: the provider's default)."),
        ("region", "The GCP region of this root."),
        ("machine_type", "The machine type of every replica."),
        ("accelerator", "GPUs to attach to n1 machine types (null: none or built in)."),
        ("gpu", "Whether replicas have GPUs."),
        ("image", "The boot image (null: the module's Deep Learning VM family)."),
        ("disk_size", "Boot disk size in GB."),
        ("port", "The model server's TCP port on each replica."),
        ("replicas", "Replicas by stable ID: zone and market."),
        ("run", "What each replica runs at boot: command or image, setup and env."),
    )
    nullable = frozenset({"project", "accelerator", "image"})

    def root_inputs(
        self,
        spec: ServiceSpec,
        replicas: Sequence[PlannedReplica],
        region: str,
        *,
        instance_type: str | None,
        context: RenderContext,
    ) -> dict[str, Any]:
        machine_type = require_instance_type(spec, self.name, instance_type)
        accelerator, gpu = accelerator_for(spec, machine_type)
        return {
            "service": spec.name,
            "project": spec.gcp.project,
            "region": region,
            "machine_type": machine_type,
            "accelerator": accelerator,
            "gpu": gpu,
            "image": spec.resources.image_id.get("gcp"),
            "disk_size": spec.resources.disk_size,
            "port": spec.resources.ports,
            "replicas": replica_map(replicas),
            "run": run_config(spec),
        }


CLOUD = GcpCloud()
