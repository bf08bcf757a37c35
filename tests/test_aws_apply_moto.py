"""The AWS path end to end with real components: skyhedge renders the aws-replicas module, the
embedded Terraform engine applies it with the real AWS provider (from a filesystem mirror: no
download), and the provider talks to moto, the AWS emulator, on 127.0.0.1. Then the AWS event
source finds a preempted replica by the tags the real module put on it, and `destroy` removes
everything. Skipped where no mirror holds the AWS provider (see docs/terraform.md)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from routing_support import free_port
from terraform_support import MIRROR_ENV, mirror_config, mirror_holding

from skyhedge.apply import Workspace, apply_service, destroy_service
from skyhedge.clouds.aws.events import AwsEventSource
from skyhedge.errors import EngineError
from skyhedge.events import Signal
from skyhedge.service import outdated_replicas
from skyhedge.spec import load_spec
from skyhedge.state import load_state

REGION = "us-east-1"
AMI = "ami-12c6146b"  # one of moto's built-in images


pytestmark = pytest.mark.skipif(
    mirror_holding("aws") is None,
    reason=f"no provider mirror: set {MIRROR_ENV} to a filesystem mirror holding the aws provider",
)


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    """A moto server on 127.0.0.1 for the module's tests: one, since stopping one takes half a
    second (its HTTP server polls for the shutdown) and its accounts are reset per test anyway
    (`moto_endpoint`)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def moto_endpoint(moto_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The moto server, and the environment that points Terraform's AWS provider (and boto3) at
    it, with providers read from the mirror only. moto keeps its accounts in this process,
    whichever server serves them: they are reset before and after each test, so no test sees
    another's instances, and a test destroys the service only where `destroy` is what it checks
    (each destroy costs the provider's termination waiter, about 14 s)."""
    rc = mirror_config(tmp_path, "aws")
    endpoint = moto_server
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
    reset = f"{endpoint}/moto-api/reset"
    requests.post(reset, timeout=30).raise_for_status()
    try:
        yield endpoint
    finally:
        requests.post(reset, timeout=30)


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
        " ingress_cidrs: [10.0.0.0/8], public_ip: false}\n"
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
        # aws.public_ip: false overrides the default subnets' map_public_ip_on_launch
        assert "PublicIpAddress" not in inst and rec.endpoint == f"http://{inst['PrivateIpAddress']}:8000"
    # the group as the primary interface lists it (where the provider sets the groups on the
    # interface, moto leaves the instance's own list empty)
    group_ids = {g["GroupId"] for i in instances.values() for g in i["NetworkInterfaces"][0]["Groups"]}
    assert len(group_ids) == 1
    groups = ec2.describe_security_groups(GroupIds=sorted(group_ids))["SecurityGroups"]
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
        # a subnet that does not exist (a typo, another account): the error names the spec field
        "missing": ("{use1-az1: subnet-0123456789abcdef0}", "aws.subnets.use1-az1: "),
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


def test_new_subnets_in_another_vpc_or_a_new_disk_size_leave_running_replicas_where_they_are(
    tmp_path: Path, moto_endpoint: str
) -> None:
    """A security group serves one VPC: moving `aws.subnets` to another VPC used to move every
    running replica's group to the new VPC's at once (AWS refuses that) and a new `disk_size`
    resized every running replica's disk in place (EBS cannot shrink). Now the running replicas
    keep their subnet, group and disk, and are rolled over like any outdated replica: the new
    ones launch in the new VPC, with a group of their own."""
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_endpoint)
    old_subnets = {
        s["AvailabilityZoneId"]: s["SubnetId"] for s in ec2.describe_subnets()["Subnets"] if s["DefaultForAz"]
    }
    new_vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    names = {z["ZoneId"]: z["ZoneName"] for z in ec2.describe_availability_zones()["AvailabilityZones"]}
    new_subnets = {
        zone: ec2.create_subnet(VpcId=new_vpc, CidrBlock=cidr, AvailabilityZone=names[zone])["Subnet"][
            "SubnetId"
        ]
        for zone, cidr in (("use1-az1", "10.20.1.0/24"), ("use1-az2", "10.20.2.0/24"))
    }

    def spec_with(subnets: dict[str, str], disk: int) -> Path:
        path = tmp_path / f"service-{disk}.yaml"
        path.write_text(
            "name: mover\n"
            "placement: {clouds: [aws], regions: [us-east-1]}\n"
            f"resources: {{instance_type: {{aws: g6.xlarge}}, image_id: {{aws: {AMI}}}, disk_size: {disk}}}\n"
            "replica_policy: {min_replicas: 1, num_overprovision: 0, policy: spothedge}\n"
            "run: {command: 'python3 -m http.server 8000'}\n"
            f"aws: {{subnets: {{use1-az1: {subnets['use1-az1']}, use1-az2: {subnets['use1-az2']}}}}}\n"
        )
        return path

    def instances() -> dict[str, dict]:
        found = ec2.describe_instances(Filters=[{"Name": "tag:skyhedge:service", "Values": ["mover"]}])
        return {
            i["InstanceId"]: i
            for r in found["Reservations"]
            for i in r["Instances"]
            if i["State"]["Name"] != "terminated"
        }

    def group_vpc(inst: dict) -> set[str]:
        ids = [g["GroupId"] for g in inst["SecurityGroups"]]
        return {g["VpcId"] for g in ec2.describe_security_groups(GroupIds=ids)["SecurityGroups"]}

    def disk_size(inst: dict) -> int:
        volume = inst["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
        return int(ec2.describe_volumes(VolumeIds=[volume])["Volumes"][0]["Size"])

    state_dir = tmp_path / "state"
    first = apply_service(load_spec(spec_with(old_subnets, 100)), state_dir, route=False, wait=False)
    assert first.ok, first.errors
    before = instances()
    assert before and all(i["SubnetId"] in old_subnets.values() for i in before.values())
    old_vpc = next(iter(before.values()))["VpcId"]
    assert old_vpc != new_vpc

    moved = load_spec(spec_with(new_subnets, 50))
    second = apply_service(moved, state_dir, route=False, wait=False)
    assert second.ok, second.errors
    after = instances()
    for iid, inst in before.items():  # still running, untouched
        assert iid in after
        assert after[iid]["SubnetId"] == inst["SubnetId"]
        assert group_vpc(after[iid]) == {old_vpc}
        assert disk_size(after[iid]) == 100
    fresh = {iid: inst for iid, inst in after.items() if iid not in before}
    assert fresh, "no replacement was launched in the new VPC"
    for inst in fresh.values():
        assert inst["SubnetId"] in new_subnets.values() and group_vpc(inst) == {new_vpc}
        assert disk_size(inst) == 50
    state = load_state(state_dir, "mover")
    old_ids = {r.id for r in state.live() if r.cloud_id in before}
    assert old_ids and old_ids <= set(outdated_replicas(moved, state))

    destroyed = destroy_service(moved, state_dir, route=False)
    assert destroyed.ok, destroyed.errors
    assert instances() == {}
    groups = ec2.describe_security_groups(Filters=[{"Name": "tag:skyhedge:service", "Values": ["mover"]}])
    assert groups["SecurityGroups"] == []


def test_without_aws_subnets_replicas_go_to_each_zones_default_subnet(
    tmp_path: Path, moto_endpoint: str
) -> None:
    """The path of an account with its default VPC (no `aws.subnets`): the module finds each
    zone's default subnet from the zone ID (by the account's own name for that zone), launches
    there with a security group of the default VPC, and destroys it all again."""
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_endpoint)
    defaults = {
        s["AvailabilityZoneId"]: s["SubnetId"] for s in ec2.describe_subnets()["Subnets"] if s["DefaultForAz"]
    }
    default_vpc = next(v["VpcId"] for v in ec2.describe_vpcs()["Vpcs"] if v["IsDefault"])
    spec_path = tmp_path / "service.yaml"
    spec_path.write_text(
        "name: plain\n"
        "placement: {clouds: [aws], regions: [us-east-1], zones: [use1-az1, use1-az2]}\n"
        f"resources: {{instance_type: {{aws: g6.xlarge}}, image_id: {{aws: {AMI}}}}}\n"
        "replica_policy: {min_replicas: 2, policy: spothedge}\n"
        "run: {command: 'python3 -m http.server 8000'}\n"
    )
    spec = load_spec(spec_path)
    state_dir = tmp_path / "state"
    report = apply_service(spec, state_dir, route=False, wait=False)
    assert report.ok, report.errors
    live = load_state(state_dir, "plain").live()
    assert live and {r.zone for r in live} <= {"use1-az1", "use1-az2"}
    found = {
        i["InstanceId"]: i
        for r in ec2.describe_instances(Filters=[{"Name": "tag:skyhedge:service", "Values": ["plain"]}])[
            "Reservations"
        ]
        for i in r["Instances"]
    }
    for rec in live:
        inst = found[str(rec.cloud_id)]
        assert inst["SubnetId"] == defaults[rec.zone] and inst["VpcId"] == default_vpc
        # a default subnet gives a public IP, and the router reaches it there
        assert rec.endpoint == f"http://{inst['PublicIpAddress']}:8000"


def _killed_apply(
    tmp_path: Path, moto_endpoint: str, name: str, *, deployment_tag: bool = True
) -> tuple[Path, Path, dict[str, str]]:
    """What an apply killed (`kill -9`, OOM, a cancelled CI runner) between EC2's create calls and
    Terraform saving its state leaves (measured with the real provider: 5 instances running,
    Terraform's state empty, skyhedge's recording the 5 replicas as never created): the plan
    recorded, and an instance per new replica tagged as the module tags it, with the state's
    deployment ID (`deployment_tag=False`: as a skyhedge from before that tag launched them).
    Returns the spec, the state dir and instance ID -> replica ID."""
    from skyhedge.apply import record_plan
    from skyhedge.leftovers import deployment_id
    from skyhedge.service import compute_plan, resolve_placement
    from skyhedge.state import ServiceState, save_state

    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_endpoint)
    spec_path = tmp_path / f"{name}.yaml"
    spec_path.write_text(
        f"name: {name}\n"
        "placement: {clouds: [aws], regions: [us-east-1], zones: [use1-az1]}\n"
        f"resources: {{instance_type: {{aws: g6.xlarge}}, image_id: {{aws: {AMI}}}}}\n"
        "replica_policy: {min_replicas: 1, num_overprovision: 0, dynamic_ondemand_fallback: false,"
        " policy: spothedge}\n"
        "run: {command: 'python3 -m http.server 8000'}\n"
        "aws: {ingress_cidrs: [10.0.0.0/8], public_ip: false}\n"
    )
    spec = load_spec(spec_path)
    state_dir = tmp_path / f"state-{name}"
    state = ServiceState(service=name)
    now = time.time()
    placement = resolve_placement(spec)
    plan, memory = compute_plan(spec, state, now=now, placement=placement)
    record_plan(state, plan, memory, placement, now)
    deployment = deployment_id(state)
    save_state(state_dir, state)
    subnet = next(
        s["SubnetId"]
        for s in ec2.describe_subnets()["Subnets"]
        if s["DefaultForAz"] and s["AvailabilityZoneId"] == "use1-az1"
    )
    launched = {}
    for rec in state.live():
        tags = [{"Key": "skyhedge:service", "Value": name}, {"Key": "skyhedge:replica", "Value": rec.id}]
        if deployment_tag:
            tags.append({"Key": "skyhedge:deployment", "Value": deployment})
        inst = ec2.run_instances(
            ImageId=AMI,
            InstanceType="g6.xlarge",
            MinCount=1,
            MaxCount=1,
            SubnetId=subnet,
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
        )["Instances"][0]
        launched[inst["InstanceId"]] = rec.id
    assert launched
    return spec_path, state_dir, launched


def _instance_states(moto_endpoint: str, ids: Iterable[str]) -> dict[str, str]:
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_endpoint)
    found = ec2.describe_instances(InstanceIds=sorted(ids))["Reservations"]
    return {i["InstanceId"]: i["State"]["Name"] for r in found for i in r["Instances"]}


@pytest.mark.parametrize("tagged", [True, False], ids=["this-state", "before-the-tag"])
def test_destroy_after_a_killed_apply_ends_the_instances_it_left_running(
    tmp_path: Path, moto_endpoint: str, tagged: bool
) -> None:
    """Before, `destroy` said "Destroyed 0 replica(s) ...; 1 recorded but never created,
    forgotten" and exited 0 while the instance ran on, billing, with no word about it.

    An instance carrying this state's deployment tag was launched by this state's own killed
    run: destroy terminates it and says so. One without the tag (launched by a skyhedge from
    before it) could be anyone's: it is named, with the command that terminates it."""
    from click.testing import CliRunner

    from skyhedge.cli import main

    spec_path, state_dir, launched = _killed_apply(tmp_path, moto_endpoint, "killed", deployment_tag=tagged)
    result = CliRunner().invoke(
        main, ["destroy", str(spec_path), "--state-dir", str(state_dir), "--auto-approve"]
    )
    assert result.exit_code == 0, result.output
    [warning] = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    ((iid, rid),) = launched.items()
    assert f"{iid} ({rid})" in warning
    if tagged:
        assert warning == (
            "warning: aws us-east-1: terminated 1 instance(s) of killed that an interrupted run of "
            f"this state launched and Terraform never saved: {iid} ({rid})"
        )
        assert _instance_states(moto_endpoint, launched) == {iid: "terminated"}
    else:
        assert warning.startswith(
            "warning: aws us-east-1: 1 instance(s) tagged for killed still run, in no Terraform"
        )
        assert warning.endswith(f"aws ec2 terminate-instances --region {REGION} --instance-ids {iid}")
        assert _instance_states(moto_endpoint, launched) == {iid: "running"}
    assert load_state(state_dir, "killed").live() == []


def test_an_apply_after_a_killed_apply_terminates_what_that_run_launched_and_nothing_else(
    tmp_path: Path, moto_endpoint: str
) -> None:
    """Before, the next apply launched every such replica again, silently: two instances per
    replica ID, the first in no Terraform state, billing until someone found it. It now
    launches them again and terminates the first ones, which carry this state's deployment tag.
    An instance of the same service name and replica ID from another state (a second state dir,
    a GitOps CI) is someone's live replica: named, never terminated.

    Then the other kill: skyhedge killed (`kill -9`, the OOM killer; or a SIGTERM) after
    Terraform saved its state, before skyhedge read the outputs back (measured: Terraform's state
    holds the instances, skyhedge's records them as never created). The next apply reads them
    back and launches nothing; it used to warn that they were "in no Terraform state" and print
    the command that terminates them: the service's own replicas."""
    from skyhedge.state import save_state

    spec_path, state_dir, launched = _killed_apply(tmp_path, moto_endpoint, "again")
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_endpoint)
    some_rid = sorted(launched.values())[0]
    other_state = ec2.run_instances(
        ImageId=AMI,
        InstanceType="g6.xlarge",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "skyhedge:service", "Value": "again"},
                    {"Key": "skyhedge:replica", "Value": some_rid},
                    {"Key": "skyhedge:deployment", "Value": "0123456789abcdef"},
                ],
            }
        ],
    )["Instances"][0]["InstanceId"]
    spec = load_spec(spec_path)
    report = apply_service(spec, state_dir, route=False, wait=False)
    assert report.ok, report.errors
    terminated, named = report.warnings
    assert terminated.startswith("aws us-east-1: terminated ")
    for iid, rid in launched.items():
        assert f"{iid} ({rid})" in terminated
    assert named.startswith("aws us-east-1: 1 instance(s) tagged for again still run")
    assert f"{other_state} ({some_rid})" in named and "this apply launches their replicas again" in named
    assert _instance_states(moto_endpoint, [*launched, other_state]) == {
        **dict.fromkeys(launched, "terminated"),
        other_state: "running",
    }
    # the replicas themselves converge as before, on instances of their own, tagged as this state's
    state = load_state(state_dir, "again")
    instances = {r.id: r.cloud_id for r in state.live()}
    assert instances and all(iid and iid not in launched for iid in instances.values())
    assert set(_instance_states(moto_endpoint, instances.values()).values()) == {"running"}
    tags = {
        t["Key"]: t["Value"]
        for r in ec2.describe_instances(InstanceIds=sorted(instances.values()))["Reservations"]
        for i in r["Instances"]
        for t in i["Tags"]
    }
    assert tags["skyhedge:deployment"] == state.extra["deployment"]

    for rec in state.live():  # as a run killed after Terraform saved its state leaves them
        rec.cloud_id, rec.provisioned_at, rec.outputs = None, None, {}
    state.extra["terraform"]["roots"] = {}  # nor what was applied
    save_state(state_dir, state)
    ec2.terminate_instances(InstanceIds=[other_state])
    # An apply whose Terraform then fails before reading them back (the state lock held, a
    # provider that cannot start) cannot tell them from leftovers: it names them, never
    # terminates them (before, it terminated the instances Terraform's state holds).
    engine = Workspace(spec, state_dir).engine()

    def locked(*_args: object, **_kwargs: object) -> None:
        raise EngineError("Error acquiring the state lock", root=f"aws/{REGION}")

    engine.apply = locked  # type: ignore[method-assign]
    failed = apply_service(spec, state_dir, engine=engine, route=False, wait=False)
    assert not failed.ok
    [named] = failed.warnings
    assert named.startswith("aws us-east-1: ") and "terminated" not in named.split(":", 2)[1]
    assert all(f"{iid} ({rid})" in named for rid, iid in instances.items())
    assert "not terminated: the apply failed there before reading Terraform's state back" in named
    assert set(_instance_states(moto_endpoint, instances.values()).values()) == {"running"}
    again = apply_service(spec, state_dir, route=False, wait=False)
    assert again.ok, again.errors
    assert again.created == []
    assert again.warnings == []
    assert {r.id: r.cloud_id for r in load_state(state_dir, "again").live()} == instances
    assert set(_instance_states(moto_endpoint, instances.values()).values()) == {"running"}


def test_a_watcher_restarted_after_a_killed_run_terminates_what_that_run_launched(
    tmp_path: Path, moto_endpoint: str
) -> None:
    """`watch` killed while Terraform created instances, then started again (systemd's restart):
    its first pass launches the replicas again, as `apply` does, and it too terminates the
    instances the killed run launched and Terraform never saved, saying so in a warning note.
    Before, they ran on; the watcher warned about each after ten minutes.

    What the watcher launches carries the tag too (before, its executor rendered without it:
    a killed watcher's instances were never terminated, and each switch between `apply` and
    `watch` re-applied every AWS root to add or remove the tag)."""
    from skyhedge.controller.executor import TerraformExecutor
    from skyhedge.controller.loop import Controller

    spec_path, state_dir, launched = _killed_apply(tmp_path, moto_endpoint, "watched")
    spec = load_spec(spec_path)
    ctl = Controller(spec, state_dir, executor=TerraformExecutor(spec, state_dir))
    ctl.tick()
    [note] = [n.text for n in ctl.notes if "terminated" in n.text]
    for iid, rid in launched.items():
        assert f"{iid} ({rid})" in note
    assert _instance_states(moto_endpoint, launched) == dict.fromkeys(launched, "terminated")
    state = load_state(state_dir, "watched")
    live = state.live()
    assert live and all(r.cloud_id and r.cloud_id not in launched for r in live)
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_endpoint)
    found = ec2.describe_instances(InstanceIds=sorted(r.cloud_id for r in live))["Reservations"]
    deployments = {
        t["Value"]
        for r in found
        for i in r["Instances"]
        for t in i["Tags"]
        if t["Key"] == "skyhedge:deployment"
    }
    assert deployments == {state.extra["deployment"]}


def _one_zone_spec(path: Path, name: str, replicas: int) -> Path:
    """`replicas` spot replicas in one zone, no extra and no on-demand fallback: exactly one
    instance per replica, so a test can name each."""
    path.write_text(
        f"name: {name}\n"
        "placement: {clouds: [aws], regions: [us-east-1], zones: [use1-az1]}\n"
        f"resources: {{instance_type: {{aws: g6.xlarge}}, image_id: {{aws: {AMI}}}}}\n"
        f"replica_policy: {{min_replicas: {replicas}, num_overprovision: 0, "
        "dynamic_ondemand_fallback: false, policy: spothedge}\n"
        "run: {command: 'python3 -m http.server 8000'}\n"
        "aws: {ingress_cidrs: [10.0.0.0/8], public_ip: false}\n"
    )
    return path


def _swept(rid: str, orphan: str, elsewhere: str) -> list[str]:
    """The warnings of the sweep after `_recreated_by_a_killed_apply`: this state's orphan
    terminated, another state's instance of the same replica ID named."""
    return [
        "aws us-east-1: terminated 1 instance(s) of recreated that an interrupted run of this state "
        f"launched and Terraform never saved: {orphan} ({rid})",
        "aws us-east-1: 1 instance(s) tagged for recreated still run, in no Terraform state (an apply "
        f"killed before Terraform saved them?): {elsewhere} ({rid}); this apply launches their replicas "
        f"again; they bill until terminated: aws ec2 terminate-instances --region {REGION} --instance-ids "
        f"{elsewhere}",
    ]


def _recreated_by_a_killed_apply(
    tmp_path: Path, moto_endpoint: str
) -> tuple[Any, Path, Any, str, str, str, str]:
    """EC2 took r-0001's spot instance before any watcher noticed; the next apply (a scale-up)
    re-created r-0001 under its ID (Terraform's refresh drops a terminated instance) and was
    killed after EC2's create call, before Terraform saved it. Returns (the scale-up's spec, the
    state dir, an EC2 client, r-0001's ID, its first instance, the killed run's instance, and an
    instance another state dir runs for a replica of the same ID)."""
    from skyhedge.apply import record_plan
    from skyhedge.service import compute_plan, resolve_placement
    from skyhedge.state import save_state

    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_endpoint)

    def spec_of(replicas: int) -> Path:
        return _one_zone_spec(tmp_path / f"recreated-{replicas}.yaml", "recreated", replicas)

    def launch(rid: str, deployment: str) -> str:
        tags = {"skyhedge:service": "recreated", "skyhedge:replica": rid, "skyhedge:deployment": deployment}
        return ec2.run_instances(
            ImageId=AMI,
            InstanceType="g6.xlarge",
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
            ],
        )["Instances"][0]["InstanceId"]

    state_dir = tmp_path / "state-recreated"
    created = apply_service(load_spec(spec_of(1)), state_dir, route=False, wait=False)
    assert created.ok, created.errors
    state = load_state(state_dir, "recreated")
    [rec] = state.live()
    first = str(rec.cloud_id)
    ec2.terminate_instances(InstanceIds=[first])  # the spot instance taken by EC2

    # the killed apply of the scale-up: its plan recorded, r-0001's new instance launched (with
    # this state's tag, as the module tags it), Terraform's state never written
    bigger = load_spec(spec_of(2))
    placement = resolve_placement(bigger)
    now = time.time()
    plan, memory = compute_plan(bigger, state, now=now, placement=placement)
    record_plan(state, plan, memory, placement, now)
    save_state(state_dir, state)
    orphan = launch(rec.id, state.extra["deployment"])
    elsewhere = launch(rec.id, "0123456789abcdef")  # another state dir's replica of that ID
    return bigger, state_dir, ec2, rec.id, first, orphan, elsewhere


@pytest.mark.parametrize("via", ["apply", "watch"])
def test_a_replica_recreated_by_a_killed_apply_leaves_no_instance_running_behind(
    tmp_path: Path, moto_endpoint: str, via: str
) -> None:
    """(`_recreated_by_a_killed_apply`) r-0001 is not "unsaved" in skyhedge's state (it records
    the terminated instance), so the apply after that launched it once more and the killed run's
    instance ran on, in no Terraform state, named only by a watcher's warning after 10 minutes.

    Now an apply that re-creates a replica under its ID terminates what this state launched for
    it that no replica owns (its deployment tag), once that region's apply is clean; another
    state's instance of the same replica ID is named, never terminated. A watcher's pass does
    the same (its warning notes)."""
    bigger, state_dir, ec2, rid, first, orphan, elsewhere = _recreated_by_a_killed_apply(
        tmp_path, moto_endpoint
    )
    if via == "apply":
        report = apply_service(bigger, state_dir, route=False, wait=False)
        assert report.ok, report.errors
        warnings = report.warnings
    else:
        from skyhedge.controller.executor import TerraformExecutor
        from skyhedge.controller.loop import Controller

        ctl = Controller(bigger, state_dir, executor=TerraformExecutor(bigger, state_dir))
        ctl.tick()
        assert not any("apply failed" in n.text for n in ctl.notes), [n.text for n in ctl.notes]
        warnings = [n.text for n in ctl.notes if n.text.startswith("aws ")]
    after = load_state(state_dir, "recreated")
    recreated = str(after.replicas[rid].cloud_id)
    assert recreated not in (first, orphan, elsewhere)
    assert warnings == _swept(rid, orphan, elsewhere)
    assert _instance_states(moto_endpoint, [orphan, elsewhere, recreated]) == {
        orphan: "terminated",
        elsewhere: "running",
        recreated: "running",
    }
    assert {r.id for r in after.live()} == {rid, "r-0002"}
    ec2.terminate_instances(InstanceIds=[elsewhere])
    again = apply_service(bigger, state_dir, route=False, wait=False)
    assert again.ok and again.warnings == [] and again.created == []


def test_a_restarted_watcher_that_finds_the_recreated_replicas_instance_gone_terminates_the_orphan(
    tmp_path: Path, moto_endpoint: str
) -> None:
    """(`_recreated_by_a_killed_apply`) A watcher started after the killed run reconciles before
    it applies (its AWS event source lists the region on its first pass): r-0001's recorded
    instance is terminated, so r-0001 is recorded gone and a new replica takes its place; no pass
    re-creates r-0001 under its ID. The killed run's instance, tagged for r-0001 with this state's
    ID, ran on (named only by the 10-minute warning). Now the replicas a watcher records gone
    are looked for as those it re-creates: once the pass applied their region cleanly, this
    state's instance is terminated and another state's named."""
    from skyhedge.controller.executor import TerraformExecutor
    from skyhedge.controller.loop import Controller

    bigger, state_dir, _ec2, rid, first, orphan, elsewhere = _recreated_by_a_killed_apply(
        tmp_path, moto_endpoint
    )
    source = AwsEventSource("recreated", [REGION], session=boto3.Session(region_name=REGION))
    ctl = Controller(bigger, state_dir, executor=TerraformExecutor(bigger, state_dir), sources=[source])
    try:
        ctl.tick()
    finally:
        source.close()
    texts = [n.text for n in ctl.notes]
    assert not any("apply failed" in t for t in texts), texts
    after = load_state(state_dir, "recreated")
    assert rid not in {r.id for r in after.live()} and len(after.live()) == 2  # replaced, not re-created
    assert [t for t in texts if t.startswith("aws ")] == _swept(rid, orphan, elsewhere)
    live = [str(r.cloud_id) for r in after.live()]
    assert _instance_states(moto_endpoint, [orphan, elsewhere, *live]) == {
        orphan: "terminated",
        elsewhere: "running",
        **dict.fromkeys(live, "running"),
    }


def test_instances_terraform_lost_are_named_not_terminated_when_it_launches_their_replicas_anew(
    tmp_path: Path, moto_endpoint: str
) -> None:
    """Terraform's state lost (deleted, or restored from an older copy) while the replicas serve:
    the next apply that runs the root launches every replica it no longer holds anew, under its ID.
    Those replicas look re-created, and their old instances carry this state's tag: the sweep for
    a killed run's leftovers terminated them at once, before their replacements were READY (every
    replica of the root down for a cold start). skyhedge read them back, which no killed run's
    instance ever was: they are named, with the command, never terminated."""
    spec_path = tmp_path / "lost.yaml"

    def write(replicas: int) -> None:
        _one_zone_spec(spec_path, "lost", replicas)

    write(1)
    state_dir = tmp_path / "state-lost"
    created = apply_service(load_spec(spec_path), state_dir, route=False, wait=False)
    assert created.ok, created.errors
    [rec] = load_state(state_dir, "lost").live()
    serving = str(rec.cloud_id)
    (state_dir / "tf" / "state" / f"aws-{REGION}.tfstate").unlink()

    write(2)  # a scale-up: the root runs again, without the state that held r-0001
    report = apply_service(load_spec(spec_path), state_dir, route=False, wait=False)
    assert report.ok, report.errors
    after = load_state(state_dir, "lost")
    assert str(after.replicas[rec.id].cloud_id) != serving  # launched anew under its ID
    assert _instance_states(moto_endpoint, [serving]) == {serving: "running"}
    assert not any(": terminated " in w for w in report.warnings), report.warnings
    assert any(
        w.startswith(f"aws {REGION}: 1 instance(s) of lost that skyhedge recorded for its replicas still run")
        and f"{serving} ({rec.id})" in w
        and f"--instance-ids {serving}" in w
        for w in report.warnings
    ), report.warnings
