"""What an interrupted run leaves on AWS, end to end with the real provider against moto (as
test_aws_apply_moto.py, whose fixtures it shares: conftest.py, moto_support.py): instances an
apply, a watcher or a re-creation launched and Terraform never saved are terminated where this
state launched them, named where another may have. Skipped where no mirror holds the AWS
provider (see docs/terraform.md)."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from moto_support import (
    AMI,
    REGION,
    instance_states,
    killed_apply,
    recreated_by_a_killed_apply,
    swept,
)
from terraform_support import MIRROR_ENV, mirror_holding

from skyhedge.apply import Workspace, apply_service
from skyhedge.clouds.aws.events import AwsEventSource
from skyhedge.errors import EngineError
from skyhedge.spec import load_spec
from skyhedge.state import load_state

pytestmark = pytest.mark.skipif(
    mirror_holding("aws") is None,
    reason=f"no provider mirror: set {MIRROR_ENV} to a filesystem mirror holding the aws provider",
)


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

    spec_path, state_dir, launched = killed_apply(tmp_path, moto_endpoint, "killed", deployment_tag=tagged)
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
        assert instance_states(moto_endpoint, launched) == {iid: "terminated"}
    else:
        assert warning.startswith(
            "warning: aws us-east-1: 1 instance(s) tagged for killed still run, in no Terraform"
        )
        assert warning.endswith(f"aws ec2 terminate-instances --region {REGION} --instance-ids {iid}")
        assert instance_states(moto_endpoint, launched) == {iid: "running"}
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

    spec_path, state_dir, launched = killed_apply(tmp_path, moto_endpoint, "again")
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
    assert instance_states(moto_endpoint, [*launched, other_state]) == {
        **dict.fromkeys(launched, "terminated"),
        other_state: "running",
    }
    # the replicas themselves converge as before, on instances of their own, tagged as this state's
    state = load_state(state_dir, "again")
    instances = {r.id: r.cloud_id for r in state.live()}
    assert instances and all(iid and iid not in launched for iid in instances.values())
    assert set(instance_states(moto_endpoint, instances.values()).values()) == {"running"}
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
    assert set(instance_states(moto_endpoint, instances.values()).values()) == {"running"}
    again = apply_service(spec, state_dir, route=False, wait=False)
    assert again.ok, again.errors
    assert again.created == []
    assert again.warnings == []
    assert {r.id: r.cloud_id for r in load_state(state_dir, "again").live()} == instances
    assert set(instance_states(moto_endpoint, instances.values()).values()) == {"running"}


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

    spec_path, state_dir, launched = killed_apply(tmp_path, moto_endpoint, "watched")
    spec = load_spec(spec_path)
    ctl = Controller(spec, state_dir, executor=TerraformExecutor(spec, state_dir))
    ctl.tick()
    [note] = [n.text for n in ctl.notes if "terminated" in n.text]
    for iid, rid in launched.items():
        assert f"{iid} ({rid})" in note
    assert instance_states(moto_endpoint, launched) == dict.fromkeys(launched, "terminated")
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


@pytest.mark.parametrize("via", ["apply", "watch"])
def test_a_replica_recreated_by_a_killed_apply_leaves_no_instance_running_behind(
    tmp_path: Path, moto_endpoint: str, via: str
) -> None:
    """(`recreated_by_a_killed_apply`) r-0001 is not "unsaved" in skyhedge's state (it records
    the terminated instance), so the apply after that launched it once more and the killed run's
    instance ran on, in no Terraform state, named only by a watcher's warning after 10 minutes.

    Now an apply that re-creates a replica under its ID terminates what this state launched for
    it that no replica owns (its deployment tag), once that region's apply is clean; another
    state's instance of the same replica ID is named, never terminated. A watcher's pass does
    the same (its warning notes)."""
    bigger, state_dir, ec2, rid, first, orphan, elsewhere = recreated_by_a_killed_apply(
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
    if via == "apply":
        # `apply` asks EC2 first (as a watcher's first pass does): r-0001's recorded instance is
        # terminated, so r-0001 is gone and replaced under a new ID, and what was launched for it
        # is looked for as for a replica found gone
        assert after.replicas[rid].gone_at is not None and after.replicas[rid].cloud_id == first
        replacement = "r-0003"
    else:
        replacement = rid
    recreated = str(after.replicas[replacement].cloud_id)
    assert recreated not in (first, orphan, elsewhere)
    assert warnings == swept(rid, orphan, elsewhere)
    assert instance_states(moto_endpoint, [orphan, elsewhere, recreated]) == {
        orphan: "terminated",
        elsewhere: "running",
        recreated: "running",
    }
    assert {r.id for r in after.live()} == {replacement, "r-0002"}
    ec2.terminate_instances(InstanceIds=[elsewhere])
    again = apply_service(bigger, state_dir, route=False, wait=False)
    assert again.ok and again.warnings == [] and again.created == []


def test_a_restarted_watcher_that_finds_the_recreated_replicas_instance_gone_terminates_the_orphan(
    tmp_path: Path, moto_endpoint: str
) -> None:
    """(`recreated_by_a_killed_apply`) A watcher started after the killed run reconciles before
    it applies (its AWS event source lists the region on its first pass): r-0001's recorded
    instance is terminated, so r-0001 is recorded gone and a new replica takes its place; no pass
    re-creates r-0001 under its ID. The killed run's instance, tagged for r-0001 with this state's
    ID, ran on (named only by the 10-minute warning). Now the replicas a watcher records gone
    are looked for as those it re-creates: once the pass applied their region cleanly, this
    state's instance is terminated and another state's named."""
    from skyhedge.controller.executor import TerraformExecutor
    from skyhedge.controller.loop import Controller

    bigger, state_dir, _ec2, rid, first, orphan, elsewhere = recreated_by_a_killed_apply(
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
    assert [t for t in texts if t.startswith("aws ")] == swept(rid, orphan, elsewhere)
    live = [str(r.cloud_id) for r in after.live()]
    assert instance_states(moto_endpoint, [orphan, elsewhere, *live]) == {
        orphan: "terminated",
        elsewhere: "running",
        **dict.fromkeys(live, "running"),
    }
