"""The spec's `aws:` section (`AwsConfig`), which the AWS cloud owns: its fields, their checks,
which zones `aws.subnets` confines replicas to, what of it makes up a replica's machine, and the
AWS zone-name checks of `placement.zones` (skyhedge.clouds.CloudSpecSection)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from skyhedge.clouds import CloudConfig, CloudSpecSection
from skyhedge.errors import SpecError
from skyhedge.spec_fields import (
    ZONE_RE,
    SpecContext,
    boolean,
    cidr_check,
    matching,
    private_only,
    str_list,
    str_map,
)

if TYPE_CHECKING:
    from skyhedge.spec import ServiceSpec
    from skyhedge.state import ReplicaRecord, ServiceState

# An AWS zone *name* (us-east-1a, us-gov-west-1a). The catalog and this product use zone IDs.
AWS_ZONE_NAME_RE = re.compile(r"^[a-z]{2}(-gov)?-[a-z]+-[0-9]+[a-z]$")
#: An EC2 subnet ID.
SUBNET_RE = re.compile(r"^subnet-[0-9a-f]{8,17}$")
#: An EC2 key pair or IAM instance profile name (printable ASCII, no quotes or spaces).
AWS_NAME_RE = re.compile(r"^[A-Za-z0-9_+=,.@/-]{1,128}$")
#: An SQS queue name (1-80 of A-Z, a-z, 0-9, '-', '_'; `.fifo` ends a FIFO queue's).
SQS_QUEUE_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}$|^[A-Za-z0-9_-]{1,75}\.fifo$")


@dataclass(frozen=True)
class AwsConfig(CloudConfig):
    """`aws:`: where AWS replicas live on the network and what they may use.

    `subnets` (availability zone ID -> subnet ID) launches into those subnets, and only into their
    zones, instead of each zone's default subnet: an account without a default VPC needs it. The
    replicas' VPC is the subnets'. `ingress_cidrs` may reach the model server port (the router
    must be among them). `public_ip` overrides the subnets' own public-IP setting: false keeps
    replicas off the internet (organisations that forbid public IPs; the router then reaches them
    at their private IPs, from inside the network)."""

    events_queue: str | None = None
    subnets: tuple[tuple[str, str], ...] = ()
    key_name: str | None = None
    iam_instance_profile: str | None = None
    ingress_cidrs: tuple[str, ...] = ("0.0.0.0/0",)
    public_ip: bool | None = None

    @property
    def private_endpoint(self) -> bool:
        """Whether the router reaches AWS replicas at their private IPs (see `private_only`)."""
        return self.public_ip is False or private_only(self.ingress_cidrs)

    def subnet_of(self, zone: str) -> str | None:
        return dict(self.subnets).get(zone)

    def confines(self, region: str, zone: str) -> bool:
        """Whether AWS replicas may go to `zone`: with `subnets`, only to the zones they list."""
        return not self.subnets or zone in dict(self.subnets)

    @property
    def confined(self) -> bool:
        return bool(self.subnets)

    #: What `confines` keeps replicas to, for errors that say why no zone is left.
    confinement = "AWS zones are those of aws.subnets"
    #: The field naming them, what its keys are, and the catalog's list they must be in.
    confining_field, confining_kind, confining_level = "aws.subnets", "AWS zone ID", "zones"

    def confining_keys(self) -> tuple[str, ...]:
        return tuple(zone for zone, _ in self.subnets)

    def revision(self, cloud: str | None) -> dict[str, object]:
        """A new key pair means new machines, of every cloud (absent: the digest as before the field
        existed); so is a public IP given or taken away (EC2 sets it at launch), for AWS replicas
        only: `aws.public_ip` does not roll GCP or local replicas over."""
        data: dict[str, object] = {}
        if self.key_name is not None:
            data["aws_key_name"] = self.key_name
        if self.public_ip is not None and cloud in (None, "aws"):
            data["aws_public_ip"] = self.public_ip
        return data

    def moved(self, rec: ReplicaRecord) -> bool:
        """An AWS replica launched in another subnet than `aws.subnets` now gives its zone (or in a
        subnet `aws.subnets` chose, when the spec names none any more): it moves like an outdated
        one (a new VPC's replicas cannot share the old one's security group). A replica launched on
        its zone's default subnet records it with `subnet_default` (module output): it moves when
        `aws.subnets` names another subnet for its zone (another VPC's, typically)."""
        if rec.cloud != SECTION.key:
            return False
        launched = rec.outputs.get("subnet_id") if isinstance(rec.outputs, dict) else None
        if not isinstance(launched, str) or not launched:  # not known (recorded before the module said)
            return False
        wanted = self.subnet_of(rec.zone)
        if wanted is None:  # the zone's default subnet now: moved unless it runs on that one
            return rec.outputs.get("subnet_default") is not True
        return launched != wanted

    def check_state(self, spec: ServiceSpec, state: ServiceState, *, destroying: bool) -> None:
        """With `aws.subnets`, every live AWS replica's zone must keep a subnet: Terraform evaluates
        each replica's subnet (for the ones being moved or destroyed too), and a region's VPC is
        its subnets'. Dropping a zone's subnet under running replicas would fail every apply and
        destroy of that region, so it is refused, with the order that works."""
        if not self.subnets:
            return
        listed = {zone for zone, _ in self.subnets}
        stranded: dict[str, list[str]] = {}
        for rec in state.live():
            if rec.cloud == SECTION.key and rec.zone not in listed:
                stranded.setdefault(rec.zone, []).append(rec.id)
        if stranded:
            zone, ids = sorted(stranded.items())[0]
            raise SpecError(
                f"no subnet for {zone}, where {', '.join(sorted(ids))} still run: keep its subnet and put "
                "the zone in placement.exclude_zones; once they have moved, remove the subnet",
                file=spec.source,
                path="aws.subnets",
            )


class AwsSection(CloudSpecSection):
    key = "aws"
    config = AwsConfig
    zone_hint = " (AWS zones are zone IDs such as 'use1-az1')"

    def parse(self, ctx: SpecContext, d: dict[str, Any]) -> AwsConfig:
        subnets = str_map(ctx, "aws.subnets", d.get("subnets"), numbers=False)
        seen: dict[str, str] = {}
        for zone, subnet in subnets.items():
            if (
                subnet in seen
            ):  # a subnet lies in one zone: the second zone's replicas would land in the first
                raise ctx.fail(
                    f"aws.subnets.{zone}",
                    f"{subnet} is given for {seen[subnet]} too; a subnet lies in one zone",
                )
            seen[subnet] = zone
            if not ZONE_RE.fullmatch(zone) or AWS_ZONE_NAME_RE.fullmatch(zone):
                raise ctx.fail(f"aws.subnets.{zone}", "expected an availability zone ID such as 'use1-az1'")
            matching(ctx, f"aws.subnets.{zone}", subnet, SUBNET_RE, "a subnet ID such as 'subnet-0123abcd'")
        cidrs = str_list(ctx, "aws.ingress_cidrs", d.get("ingress_cidrs", ["0.0.0.0/0"]), cidr_check(ctx))
        if not cidrs:
            raise ctx.fail(
                "aws.ingress_cidrs", "expected at least one CIDR block (the router must reach the replicas)"
            )
        return AwsConfig(
            events_queue=matching(
                ctx, "aws.events_queue", d.get("events_queue"), SQS_QUEUE_RE, "an SQS queue name"
            ),
            subnets=tuple(sorted((str(z), str(s)) for z, s in subnets.items())),
            key_name=matching(ctx, "aws.key_name", d.get("key_name"), AWS_NAME_RE, "an EC2 key pair name"),
            iam_instance_profile=matching(
                ctx,
                "aws.iam_instance_profile",
                d.get("iam_instance_profile"),
                AWS_NAME_RE,
                "an instance profile name",
            ),
            ingress_cidrs=cidrs,
            public_ip=None if d.get("public_ip") is None else boolean(ctx, "aws.public_ip", d["public_ip"]),
        )

    def zone_problem(self, zone: str) -> str | None:
        # Zone names are shuffled per AWS account, so no table can turn one into the zone ID the
        # catalog is keyed on; the user has to look it up in their own account.
        if AWS_ZONE_NAME_RE.fullmatch(zone):
            return (
                f"{zone!r} is an AWS zone name; AWS zones are given as zone IDs such as 'use1-az1' "
                "(the name-to-ID mapping differs per account: 'aws ec2 describe-availability-zones')"
            )
        return None


SECTION = AwsSection()
