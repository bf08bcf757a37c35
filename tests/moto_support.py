"""What the moto tests (test_aws_apply_moto.py, test_aws_leftovers_moto.py) share: a moto server
that says what it refused, and the states an interrupted run leaves behind, made with boto3.

The tests are two files so that `pytest -n 2 --dist loadfile` can run them on both workers at
once: each apply that launches or terminates waits out the AWS provider's fixed 10 s instance
waiter, and as one file they took a worker for five minutes (332 s; 188 s as two). The
fixtures are in conftest.py (`moto_server`, `moto_endpoint`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import boto3

from skyhedge.apply import apply_service
from skyhedge.spec import load_spec
from skyhedge.state import load_state

REGION = "us-east-1"
AMI = "ami-12c6146b"  # one of moto's built-in images

log = logging.getLogger("tests.moto")


class MotoServer:
    """moto's server on 127.0.0.1 in a thread (as `moto.server.ThreadedMotoServer`), which logs
    every answer of 400 or more with the action it answered, at WARNING: a test that fails on a
    call moto refused (a Terraform error, a boto3 ClientError, a flake under load) shows the
    call and moto's error code in its captured log, where werkzeug's access log said only
    `"POST / HTTP/1.1" 400`."""

    def __init__(self, port: int) -> None:
        # bound here, so a port taken since `free_port` fails the fixture at once (moto's own
        # ThreadedMotoServer binds in its thread and waits for it forever)
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        self.url = f"http://127.0.0.1:{port}"
        self._server = make_server("127.0.0.1", port, self._logged(app), threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="moto")

    @staticmethod
    def _logged(app: Any) -> Any:
        def call(environ: dict[str, Any], start_response: Any) -> Any:
            from io import BytesIO

            size = int(environ.get("CONTENT_LENGTH") or 0)
            body = b""
            if size:  # read to name the action, then handed on (a chunked body is left alone)
                body = environ["wsgi.input"].read(size)
                environ["wsgi.input"] = BytesIO(body)
            status: list[str] = []

            def respond(code: str, headers: Any, exc_info: Any = None) -> Any:
                status.append(code)
                return start_response(code, headers, exc_info)

            answer = app(environ, respond)
            if not status or int(status[0].split()[0]) < 400:
                return answer
            data = b"".join(answer)
            form = parse_qs(body.decode("utf-8", "replace"))
            action = (form.get("Action") or [environ.get("HTTP_X_AMZ_TARGET", environ.get("PATH_INFO"))])[0]
            log.warning(
                "moto answered %s with %s: %s", action, status[0], data.decode("utf-8", "replace")[:500]
            )
            return [data]

        return call

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def one_zone_spec(path: Path, name: str, replicas: int) -> Path:
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


def killed_apply(
    tmp_path: Path, moto_endpoint: str, name: str, *, deployment_tag: bool = True
) -> tuple[Path, Path, dict[str, str]]:
    """What an apply killed (`kill -9`, OOM, a cancelled CI runner) between EC2's create calls and
    Terraform saving its state leaves (measured with the real provider: 5 instances running,
    Terraform's state empty, skyhedge's recording the 5 replicas as never created): the plan
    recorded, and an instance per new replica tagged as the module tags it, with the state's
    deployment ID (`deployment_tag=False`: as a skyhedge from before that tag launched them).
    Returns the spec, the state dir and instance ID -> replica ID."""
    from state_support import first_plan_recorded

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
    state, deployment = first_plan_recorded(spec, state_dir)
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


def instance_states(moto_endpoint: str, ids: Iterable[str]) -> dict[str, str]:
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_endpoint)
    found = ec2.describe_instances(InstanceIds=sorted(ids))["Reservations"]
    return {i["InstanceId"]: i["State"]["Name"] for r in found for i in r["Instances"]}


def swept(rid: str, orphan: str, elsewhere: str) -> list[str]:
    """The warnings of the sweep after `recreated_by_a_killed_apply`: this state's orphan
    terminated, another state's instance of the same replica ID named."""
    return [
        "aws us-east-1: terminated 1 instance(s) of recreated that an interrupted run of this state "
        f"launched and Terraform never saved: {orphan} ({rid})",
        "aws us-east-1: 1 instance(s) tagged for recreated still run, in no Terraform state (an apply "
        f"killed before Terraform saved them?): {elsewhere} ({rid}); this apply launches their replicas "
        f"again; they bill until terminated: aws ec2 terminate-instances --region {REGION} --instance-ids "
        f"{elsewhere}",
    ]


def recreated_by_a_killed_apply(
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
        return one_zone_spec(tmp_path / f"recreated-{replicas}.yaml", "recreated", replicas)

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
