"""Terraform inputs for one AWS root (modules/aws-replicas). Zones are availability zone IDs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from skyhedge.clouds import RenderContext
from skyhedge.clouds.common import replica_map, require_instance_type, run_config

if TYPE_CHECKING:
    from skyhedge.planner import PlannedReplica
    from skyhedge.spec import ServiceSpec


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
    )
    nullable = frozenset({"image_id"})

    def root_inputs(
        self,
        spec: ServiceSpec,
        replicas: Sequence[PlannedReplica],
        region: str,
        *,
        instance_type: str | None,
        context: RenderContext,
    ) -> dict[str, Any]:
        return {
            "service": spec.name,
            "region": region,
            "instance_type": require_instance_type(spec, self.name, instance_type),
            "image_id": spec.resources.image_id.get("aws"),
            "disk_size": spec.resources.disk_size,
            "port": spec.resources.ports,
            "replicas": replica_map(replicas),
            "run": run_config(spec),
        }


CLOUD = AwsCloud()
