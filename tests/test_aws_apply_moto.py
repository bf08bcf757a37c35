"""The AWS path end to end with real components: skyhedge renders the aws-replicas module, the
embedded Terraform engine applies it with the real AWS provider (from a filesystem mirror: no
download), and the provider talks to moto, the AWS emulator, on 127.0.0.1. Then the AWS event
source finds a preempted replica by the tags the real module put on it, and `destroy` removes
everything. Skipped where no mirror holds the AWS provider (see docs/terraform.md).

What interrupted runs leave behind on AWS is test_aws_leftovers_moto.py (the same moto fixtures,
conftest.py; helpers in moto_support.py): two files, so that two xdist workers run them at once."""

from __future__ import annotations

import time
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from moto_support import AMI, REGION, instance_states, one_zone_spec
from terraform_support import MIRROR_ENV, mirror_holding

from skyhedge.apply import apply_service, destroy_service
from skyhedge.clouds.aws.events import AwsEventSource
from skyhedge.events import Signal
from skyhedge.service import outdated_replicas
from skyhedge.spec import load_spec
from skyhedge.state import load_state

pytestmark = pytest.mark.skipif(
    mirror_holding("aws") is None,
    reason=f"no provider mirror: set {MIRROR_ENV} to a filesystem mirror holding the aws provider",
)


def test_a_call_moto_refuses_is_named_in_the_failing_tests_log(
    moto_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A test that fails on a call moto refused (a Terraform error, a flake under load) shows which
    call and moto's error code in its captured log: werkzeug's access log said only
    `"POST / HTTP/1.1" 400`, and a first apply's failure nothing at all."""
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_endpoint)
    with pytest.raises(ClientError):
        ec2.describe_instances(InstanceIds=["i-0123456789abcdef0"])
    [line] = [r.getMessage() for r in caplog.records if r.name == "tests.moto"]
    assert line.startswith("moto answered DescribeInstances with 400 ")
    assert "InvalidInstanceID.NotFound" in line and "i-0123456789abcdef0" in line


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
        one_zone_spec(spec_path, "lost", replicas)

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
    assert instance_states(moto_endpoint, [serving]) == {serving: "running"}
    assert not any(": terminated " in w for w in report.warnings), report.warnings
    assert any(
        w.startswith(f"aws {REGION}: 1 instance(s) of lost that skyhedge recorded for its replicas still run")
        and f"{serving} ({rec.id})" in w
        and f"--instance-ids {serving}" in w
        for w in report.warnings
    ), report.warnings


def test_an_instance_terminated_outside_skyhedge_is_shown_by_plan_and_replaced_by_the_next_apply(
    tmp_path: Path, moto_endpoint: str
) -> None:
    """Terminated through the EC2 API (the console, a script, an admin's cleanup), no watcher
    running: `plan` called it kept and `apply` said "No changes: every Terraform root is up to
    date" (the root's files had not changed, so Terraform's refresh never ran), while the service
    ran a replica short (measured). Now both ask EC2 first: the replica is recorded gone and
    replaced under a new ID, nothing else launched or terminated."""
    from click.testing import CliRunner

    from skyhedge.cli import main

    spec = one_zone_spec(tmp_path / "service.yaml", "drift", 2)
    state_dir = tmp_path / "state"
    assert apply_service(load_spec(spec), state_dir, route=False, wait=False).ok
    victim, kept = sorted(load_state(state_dir, "drift").live(), key=lambda r: r.id)
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_endpoint)
    ec2.terminate_instances(InstanceIds=[str(victim.cloud_id)])
    args = [str(spec), "--state-dir", str(state_dir)]

    planned = CliRunner().invoke(main, ["plan", *args])
    assert planned.exit_code == 0, planned.output
    assert "Plan: 1 to create, 1 to keep, 0 to delete." in planned.output
    assert f"aws-reconcile: gone {victim.id}: instance terminated" in planned.output
    applied = CliRunner().invoke(main, ["apply", *args, "--auto-approve", "--no-routing", "--no-wait"])
    assert applied.exit_code == 0, applied.output
    assert "No changes" not in applied.output and "1 created, 0 destroyed" in applied.output
    state = load_state(state_dir, "drift")
    assert state.replicas[victim.id].gone_at is not None
    [new] = [r for r in state.live() if r.id != kept.id]
    assert new.id > victim.id and state.replicas[kept.id].cloud_id == kept.cloud_id
    found = ec2.describe_instances(Filters=[{"Name": "tag:skyhedge:service", "Values": ["drift"]}])
    states = {i["InstanceId"]: i["State"]["Name"] for r in found["Reservations"] for i in r["Instances"]}
    assert sorted(i for i, st in states.items() if st == "running") == sorted([kept.cloud_id, new.cloud_id])


def test_an_edited_dependency_lock_file_is_named_in_one_line_and_a_removed_one_recorded_again(
    tmp_path: Path, moto_endpoint: str
) -> None:
    """`init` ran once per configuration, so an edited `.terraform.lock.hcl` failed every later
    apply with "Required plugins are not installed", naming neither the file nor what to do, and
    a removed one failed every apply with "Inconsistent dependency lock file" (both measured).
    The lock file is part of what `init` depends on: an edited one is named in the error's first
    line; a removed one is recorded again and the apply goes on."""
    import re

    spec_path = tmp_path / "service.yaml"
    state_dir = tmp_path / "state"
    first = apply_service(load_spec(one_zone_spec(spec_path, "pins", 1)), state_dir, route=False, wait=False)
    assert first.ok, first.errors
    lock = state_dir / "tf" / "tree" / "aws" / REGION / ".terraform.lock.hcl"
    trusted = lock.read_text()
    lock.write_text(re.sub(r'"h1:[^"]+"', '"h1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="', trusted))
    failed = apply_service(load_spec(one_zone_spec(spec_path, "pins", 2)), state_dir, route=False, wait=False)
    [error] = failed.errors
    assert str(error).splitlines()[0] == (
        f"aws/{REGION}: the providers do not match Terraform's dependency lock file {lock} (edited by "
        "hand?): put back the one you trust (it pins each provider's version and checksums), or remove "
        "it to have the next run record the providers it installs"
    )
    lock.unlink()
    again = apply_service(load_spec(spec_path), state_dir, route=False, wait=False)
    assert again.ok, again.errors
    assert len(load_state(state_dir, "pins").live()) == 2 and lock.read_text() == trusted


def test_a_state_dir_restored_at_another_path_adopts_the_running_instances(
    tmp_path: Path, moto_endpoint: str
) -> None:
    """A backup of the state dir restored onto a fresh machine (at another path) while the VMs run
    on: Terraform's restored state holds them; nothing is launched again. Before, the backend path
    Terraform recorded at init named the old place, and every apply that ran Terraform failed at
    `terraform init`."""
    import shutil

    spec = load_spec(one_zone_spec(tmp_path / "service.yaml", "restored", 2))
    first = apply_service(spec, tmp_path / "state", route=False, wait=False)
    assert first.ok, first.errors
    ids = sorted(str(r.cloud_id) for r in load_state(tmp_path / "state", "restored").live())
    restored = tmp_path / "restored-elsewhere"
    shutil.copytree(tmp_path / "state", restored, symlinks=True)
    shutil.rmtree(tmp_path / "state")

    # the next apply that runs Terraform (a scale-up: one that changes nothing runs none)
    grown = load_spec(one_zone_spec(tmp_path / "service.yaml", "restored", 3))
    again = apply_service(grown, restored, route=False, wait=False)
    assert again.ok, again.errors  # was: "terraform init failed in aws/us-east-1"
    assert len(again.created) == 1 and again.deleted == []
    live = {r.id: str(r.cloud_id) for r in load_state(restored, "restored").live()}
    assert sorted(v for k, v in live.items() if k not in again.created) == ids  # the running ones kept
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_endpoint)
    found = ec2.describe_instances(Filters=[{"Name": "tag:skyhedge:service", "Values": ["restored"]}])
    running = sorted(
        i["InstanceId"]
        for r in found["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] == "running"
    )
    assert running == sorted(live.values())  # nothing launched twice
