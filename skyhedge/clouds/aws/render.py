"""Terraform inputs for one AWS root (modules/aws-replicas). Zones are availability zone IDs."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from skyhedge.catalog import load_catalog
from skyhedge.clouds import RenderContext
from skyhedge.clouds.common import (
    boot_config,
    boot_script_bytes,
    has_gpus,
    launches,
    replica_map,
    require_arm_image,
    require_boot_script_fits,
    require_instance_type,
    run_config,
)
from skyhedge.engine import register_spec_field

if TYPE_CHECKING:
    from skyhedge.planner import PlannedReplica
    from skyhedge.spec import ServiceSpec


#: Arm instance families: Graviton's (a generation digit followed by `g`: c7g, m6gd, t4g, g5g,
#: im4gn, is4gen), the first Graviton (a1) and NVIDIA Grace superchips (p6e-gb200).
_ARM_FAMILY = re.compile(r"^(a1|[a-z]+\d+g[a-z]*|[a-z0-9]+-gb\d+)$")

#: EC2 takes at most 16 KB of user data, counted before base64 (RunInstances refuses more).
USER_DATA_MAX_BYTES = 16 * 1024


def is_arm(instance_type: str) -> bool:
    """Whether an EC2 instance type runs aarch64 (its family, before the `.`)."""
    return bool(_ARM_FAMILY.match(instance_type.split(".", 1)[0]))


class AwsCloud:
    name = "aws"
    module_name = "aws-replicas"
    variables = (
        ("service", "The skyhedge service name."),
        ("region", "The AWS region of this root."),
        ("instance_type", "The EC2 instance type of every replica."),
        ("image_id", "The AMI (null: the module's Deep Learning AMI lookup)."),
        ("disk_size", "Root volume size in GiB."),
        ("port", "The model server's TCP port on each replica."),
        ("replicas", "Replicas by stable ID: availability zone ID and market."),
        ("run", "What each replica runs at boot: command or image, setup and env."),
        ("gpu", "Whether replicas have NVIDIA GPUs (a container gets them)."),
        ("subnet_ids", "Subnet per availability zone ID (null: each zone's default subnet)."),
        ("key_name", "An EC2 key pair for SSH (null: none)."),
        ("iam_instance_profile", "An IAM instance profile for the replicas (null: none)."),
        ("ingress_cidrs", "CIDR blocks that may reach the model server port."),
        ("private_endpoint", "Whether the router reaches replicas at their private IP."),
        ("public_ip", "Whether replicas get a public IP (null: as their subnet sets it)."),
        ("deployment", "The skyhedge state that applies this root (tag skyhedge:deployment; null: none)."),
    )
    nullable = frozenset(
        {"image_id", "subnet_ids", "key_name", "iam_instance_profile", "public_ip", "deployment"}
    )

    def root_inputs(
        self,
        spec: ServiceSpec,
        replicas: Sequence[PlannedReplica],
        region: str,
        *,
        instance_type: str | None,
        context: RenderContext,
    ) -> dict[str, Any]:
        itype = require_instance_type(spec, self.name, instance_type)
        require_arm_image(spec, self.name, itype, is_arm(itype))
        gpu = has_gpus(spec, self.name, itype)
        if new := launches(replicas):  # (not those running already: `launches`)
            size = boot_script_bytes(self.module_name, "user_data.sh.tftpl", boot_config(spec, new, gpu))
            where = "bytes EC2 takes as user data"
            require_boot_script_fits(spec, self.name, size, USER_DATA_MAX_BYTES, where)
        # a launched replica stays in the subnet it was launched in (and so in its VPC): passed
        # back only where aws.subnets now names another for its zone, or none at all. A replica on
        # its zone's default subnet records no subnet (module output), so inputs do not churn.
        pinned = {
            r.id: r.subnet_id
            for r in replicas
            if r.subnet_id and r.subnet_id != spec.aws.subnet_of(r.location.zone)
        }
        return {
            "service": spec.name,
            "region": region,
            "instance_type": itype,
            "image_id": spec.resources.image_id.get("aws"),
            "disk_size": spec.resources.disk_size,
            "port": spec.resources.ports,
            "replicas": {
                # only where pinned: a replica in its zone's subnet renders as before
                rid: {**value, "subnet_id": pinned[rid]} if rid in pinned else value
                for rid, value in replica_map(replicas).items()
            },
            "run": run_config(spec),
            "gpu": gpu,
            "subnet_ids": _region_subnets(spec, region),
            "key_name": spec.aws.key_name,
            "iam_instance_profile": spec.aws.iam_instance_profile,
            "ingress_cidrs": list(spec.aws.ingress_cidrs),
            "private_endpoint": spec.aws.private_endpoint,
            "public_ip": spec.aws.public_ip,
            "deployment": context.deployment,
        }


def _region_subnets(spec: ServiceSpec, region: str) -> dict[str, str] | None:
    """`aws.subnets` of this region's zones (the spec's map spans regions; subnets are zonal),
    all of them whichever hold replicas now, so the root's inputs do not churn as replicas move."""
    if not spec.aws.subnets:
        return None
    catalog = load_catalog("aws")
    mine = {zone: subnet for zone, subnet in spec.aws.subnets if catalog.region_of(zone) == region}
    return mine or None  # a region none is listed for: its default VPC (the module needs one subnet)


# a subnet ID the spec gave that the data source cannot read (a typo, another region or account)
register_spec_field(r'data\.aws_subnet\.given\["(?P<zone>[^"]+)"\]', "aws.subnets.{zone}")

CLOUD = AwsCloud()
