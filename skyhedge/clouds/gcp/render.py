"""Terraform inputs for one GCP root (modules/gcp-replicas)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from skyhedge.clouds import RenderContext
from skyhedge.clouds.common import (
    boot_config,
    boot_script_bytes,
    catalog_gpus,
    launches,
    replica_map,
    require_arm_image,
    require_boot_script_fits,
    require_instance_type,
    run_config,
)
from skyhedge.errors import RenderError

if TYPE_CHECKING:
    from skyhedge.planner import PlannedReplica
    from skyhedge.spec import ServiceSpec

# Catalog accelerator names -> the Compute Engine accelerator types an n1 machine can attach.
N1_ACCELERATOR_TYPES = {
    "T4": "nvidia-tesla-t4",
    "V100": "nvidia-tesla-v100",
    "P100": "nvidia-tesla-p100",
    "P4": "nvidia-tesla-p4",
}
# GPUs that come only built into their own machine families (never attached to n1).
BUILT_IN_FAMILIES = {
    "L4": "g2",
    "A100": "a2",
    "A100-80GB": "a2-ultragpu",
    "H100": "a3",
    "H100-MEGA": "a3-megagpu",
    "H200": "a3-ultragpu",
    "B200": "a4",
    "RTX-PRO-6000": "g4",
}
# Machine families whose GPUs are built in: they have GPUs whatever the catalog knows of them.
BUILT_IN_PREFIXES = ("a2-", "a3-", "a4-", "g2-", "g4-")


# Machine series that need a gVNIC network interface (third-generation and later GPU series; a
# VirtIO interface is refused at launch) and those that boot from Hyperdisk only (no pd-balanced).
# From Compute Engine's machine series documentation; the module is not run against the provider
# in CI (docs/terraform.md).
GVNIC_PREFIXES = ("a3-", "a4-", "g4-")
HYPERDISK_ONLY_PREFIXES = ("a3-ultragpu-", "a4-", "g4-")


#: Compute Engine takes a metadata value (the startup script) of at most 256 KiB.
METADATA_VALUE_MAX_BYTES = 256 * 1024

#: Arm machine series: Ampere Altra (T2A), Google Axion (C4A, N4A), NVIDIA Grace (A4X).
ARM_PREFIXES = ("t2a-", "c4a-", "n4a-", "a4x-")


def nic_type_for(machine_type: str) -> str | None:
    """GVNIC where the series requires it; None keeps Compute Engine's default (VirtIO)."""
    return "GVNIC" if machine_type.startswith(GVNIC_PREFIXES) else None


def boot_disk_type_for(machine_type: str) -> str:
    return "hyperdisk-balanced" if machine_type.startswith(HYPERDISK_ONLY_PREFIXES) else "pd-balanced"


def accelerator_for(spec: ServiceSpec, machine_type: str) -> tuple[dict[str, Any] | None, bool]:
    """(guest_accelerator to attach or None, whether the replica has GPUs at all).

    GPUs are attached only to n1 machines, and only the kinds n1 takes; a2/a3/a4/g2/g4 carry
    theirs (a GPU-less `on_host_maintenance = MIGRATE` would be refused for them). An n1 type
    the catalog lists with its GPUs is priced with those: a spec asking other GPUs of it is
    refused rather than launched (or priced) with GPUs it did not ask for."""
    known = catalog_gpus("gcp", machine_type)
    asked: tuple[str, int] | None = None
    if spec.resources.accelerators:
        acc, _, n = spec.resources.accelerators.partition(":")
        asked = (acc.strip().upper(), int(n or 1))
    name, count = known if known is not None else (None, 0)
    if name is None and asked is not None:
        name, count = asked
    if machine_type.startswith(BUILT_IN_PREFIXES):
        return None, True
    if name is None:
        return None, False
    if not machine_type.startswith("n1-"):
        return None, True
    if asked is not None and asked[0] not in N1_ACCELERATOR_TYPES:
        name = asked[0]
    if name.upper() not in N1_ACCELERATOR_TYPES:
        family = BUILT_IN_FAMILIES.get(name.upper())
        hint = f" ({name} comes built into {family} machine types)" if family else ""
        raise RenderError(
            f"{spec.source}: resources.accelerators: {name!r} cannot be attached to the n1 machine "
            f"type {machine_type}{hint}; n1 takes {', '.join(N1_ACCELERATOR_TYPES)}"
        )
    if asked is not None and known is not None and known[0] and (known[0].upper(), known[1]) != asked:
        raise RenderError(
            f"{spec.source}: resources.accelerators: {spec.resources.accelerators!r} differs from the "
            f"{known[1]} x {known[0]} the catalog prices {machine_type} with; ask for that, or list "
            f"{machine_type} with {asked[1]} x {asked[0]} in a user catalog (docs/catalog.md)"
        )
    return {"type": N1_ACCELERATOR_TYPES[name.upper()], "count": count}, True


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
        ("network", "The VPC network of the replicas and their firewall rule."),
        ("subnetwork", "The subnetwork of this region (null: the network's own, auto mode only)."),
        ("ingress_cidrs", "CIDR blocks that may reach the model server port."),
        ("private_endpoint", "Whether the router reaches replicas at their private IP."),
        ("external_ip", "Whether replicas get an ephemeral external IP (false: internal only)."),
        ("nic_type", "GVNIC for the machine series that require it (null: the default)."),
        ("boot_disk_type", "The boot disk type the machine series takes."),
        ("deployment", "The skyhedge state that applies this root (label skyhedge-deployment; null: none)."),
    )
    nullable = frozenset({"project", "accelerator", "image", "subnetwork", "nic_type", "deployment"})

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
        require_arm_image(spec, self.name, machine_type, machine_type.startswith(ARM_PREFIXES))
        accelerator, gpu = accelerator_for(spec, machine_type)
        if new := launches(replicas):  # (not those running already: `launches`)
            size = boot_script_bytes(self.module_name, "startup.sh.tftpl", boot_config(spec, new, gpu))
            where = "bytes Compute Engine takes as a metadata value"
            require_boot_script_fits(spec, self.name, size, METADATA_VALUE_MAX_BYTES, where)
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
            "network": spec.gcp.network or "default",
            "subnetwork": spec.gcp.subnetwork_of(region),
            "ingress_cidrs": list(spec.gcp.ingress_cidrs),
            "private_endpoint": spec.gcp.private_endpoint,
            "external_ip": spec.gcp.external_ip,
            "nic_type": nic_type_for(machine_type),
            "boot_disk_type": boot_disk_type_for(machine_type),
            "deployment": context.deployment,
        }


CLOUD = GcpCloud()
