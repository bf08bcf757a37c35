"""The AWS path end to end with real components: skyhedge renders the aws-replicas module, the
embedded Terraform engine applies it with the real AWS provider (from a filesystem mirror: no
download), and the provider talks to moto, the AWS emulator, on 127.0.0.1. Then the AWS event
source finds a preempted replica by the tags the real module put on it, and `destroy` removes
everything. Skipped where no mirror holds the AWS provider (see docs/terraform.md)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from routing_support import free_port
from terraform_support import MIRROR_ENV, mirror_config, mirror_holding

from skyhedge.apply import apply_service, destroy_service
from skyhedge.clouds.aws.events import AwsEventSource
from skyhedge.events import Signal
from skyhedge.spec import load_spec
from skyhedge.state import load_state

REGION = "us-east-1"
AMI = "ami-12c6146b"  # one of moto's built-in images


pytestmark = pytest.mark.skipif(
    mirror_holding("aws") is None,
    reason=f"no provider mirror: set {MIRROR_ENV} to a filesystem mirror holding the aws provider",
)


@pytest.fixture
def moto_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto server on 127.0.0.1, and the environment that points Terraform's AWS provider (and
    boto3) at it, with providers read from the mirror only."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    rc = mirror_config(tmp_path, "aws")
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {
        "TF_CLI_CONFIG_FILE": str(rc),
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    try:
        yield endpoint
    finally:
        server.stop()


def test_apply_preempt_and_destroy_through_the_real_provider(tmp_path: Path, moto_endpoint: str) -> None:
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_endpoint)
    subnets = {
        s["AvailabilityZoneId"]: s["SubnetId"] for s in ec2.describe_subnets()["Subnets"] if s["DefaultForAz"]
    }
    spec_path = tmp_path / "service.yaml"
    spec_path.write_text(
        "name: llm\n"
        "placement: {clouds: [aws], regions: [us-east-1]}\n"
        f"resources: {{instance_type: {{aws: g6.xlarge}}, image_id: {{aws: {AMI}}}}}\n"
        "replica_policy: {min_replicas: 2, policy: spothedge}\n"
        "run: {command: 'python3 -m http.server 8000'}\n"
        f"aws: {{subnets: {{use1-az1: {subnets['use1-az1']}, use1-az2: {subnets['use1-az2']}}},"
        " ingress_cidrs: [10.0.0.0/8]}\n"
    )
    spec = load_spec(spec_path)
    state_dir = tmp_path / "state"

    # no readiness wait and no router: the replicas' addresses are moto's, not reachable
    report = apply_service(spec, state_dir, route=False, wait=False)
    assert report.ok, report.errors
    state = load_state(state_dir, "llm")
    live = state.live()
    assert len(live) == 5 and {r.zone for r in live} <= {"use1-az1", "use1-az2"}

    instances = {
        i["InstanceId"]: i
        for r in ec2.describe_instances(Filters=[{"Name": "tag:skyhedge:service", "Values": ["llm"]}])[
            "Reservations"
        ]
        for i in r["Instances"]
    }
    assert sorted(instances) == sorted(r.cloud_id for r in live)
    for rec in live:
        inst = instances[str(rec.cloud_id)]
        tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
        assert tags["skyhedge:replica"] == rec.id and inst["SubnetId"] == subnets[rec.zone]
        assert (inst.get("InstanceLifecycle") == "spot") == (rec.market == "spot")
        assert inst["InstanceType"] == "g6.xlarge" and inst["ImageId"] == AMI
    groups = ec2.describe_security_groups(
        GroupIds=[g["GroupId"] for g in next(iter(instances.values()))["SecurityGroups"]]
    )["SecurityGroups"]
    assert [p["IpRanges"] for p in groups[0]["IpPermissions"]] == [
        [{"CidrIp": "10.0.0.0/8", "Description": "model server"}]
    ]

    # a spot replica taken by EC2: the event source names it by the module's own tags
    victim = next(r for r in live if r.market == "spot")
    ec2.terminate_instances(InstanceIds=[str(victim.cloud_id)])
    source = AwsEventSource("llm", [REGION], session=boto3.Session(region_name=REGION))
    try:
        gone = [e for e in source.reconcile(time.time(), live) if e.signal is Signal.GONE]
    finally:
        source.close()
    assert [e.replica_id for e in gone] == [victim.id]

    destroyed = destroy_service(spec, state_dir, route=False)
    assert destroyed.ok, destroyed.errors
    left = ec2.describe_instances(Filters=[{"Name": "tag:skyhedge:service", "Values": ["llm"]}])
    states = {i["State"]["Name"] for r in left["Reservations"] for i in r["Instances"]}
    assert states <= {"terminated"}
    assert load_state(state_dir, "llm").live() == []


def test_subnets_of_two_vpcs_or_filed_under_another_zone_are_refused_before_anything_runs(
    tmp_path: Path, moto_endpoint: str
) -> None:
    """AWS would refuse such replicas one by one (a security group serves one VPC), or launch them
    in a zone skyhedge does not watch: the module's preconditions stop the plan instead."""
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_endpoint)
    default = {
        s["AvailabilityZoneId"]: s["SubnetId"] for s in ec2.describe_subnets()["Subnets"] if s["DefaultForAz"]
    }
    other_vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    az2 = next(z for z in ec2.describe_availability_zones()["AvailabilityZones"] if z["ZoneId"] == "use1-az2")
    foreign = ec2.create_subnet(VpcId=other_vpc, CidrBlock="10.9.1.0/24", AvailabilityZone=az2["ZoneName"])
    cases = {
        "two-vpcs": (
            f"{{use1-az1: {default['use1-az1']}, use1-az2: {foreign['Subnet']['SubnetId']}}}",
            "one VPC",
        ),
        "swapped": (
            f"{{use1-az1: {default['use1-az2']}, use1-az2: {default['use1-az1']}}}",
            "is in use1-az2, not use1-az1",
        ),
    }
    for name, (subnets, reason) in cases.items():
        spec_path = tmp_path / f"{name}.yaml"
        spec_path.write_text(
            f"name: {name}\n"
            "placement: {clouds: [aws], regions: [us-east-1]}\n"
            f"resources: {{instance_type: {{aws: g6.xlarge}}, image_id: {{aws: {AMI}}}}}\n"
            "replica_policy: {min_replicas: 2, policy: spothedge}\n"
            "run: {command: 'python3 -m http.server 8000'}\n"
            f"aws: {{subnets: {subnets}}}\n"
        )
        report = apply_service(load_spec(spec_path), tmp_path / name, route=False, wait=False)
        assert not report.ok
        assert any(reason in str(e) for e in report.errors), report.errors
        running = ec2.describe_instances(Filters=[{"Name": "tag:skyhedge:service", "Values": [name]}])
        assert running["Reservations"] == []
        assert all(r.cloud_id is None for r in load_state(tmp_path / name, name).live())  # none created
