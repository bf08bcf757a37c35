"""AWS events: the EventBridge message parser, setup-events, the watcher on moto, and the sweep for
instances an interrupted run left (clouds/aws/leftovers.py).

EventBridge `put_events` of an interruption warning is delivered by moto to the SQS queue that
`setup_events` created; the controller reads it and replaces the replica in another zone. A
terminated instance that no message announced is found by the describe_instances reconcile.
Terraform is replaced by an executor that launches and terminates moto instances.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import boto3
import pytest
from controller_fakes import Clock, FakeProber, FakeRouter
from moto import mock_aws

from skyhedge.clouds.aws.events import (
    DETAIL_REBALANCE,
    DETAIL_STATE,
    DETAIL_WARNING,
    FILTER_VALUES_MAX,
    AwsEventSource,
    parse_message,
)
from skyhedge.clouds.aws.setup import event_patterns, rule_names, setup_events
from skyhedge.controller.loop import Controller, ControllerOptions
from skyhedge.controller.ports import ExecResult
from skyhedge.events import Signal
from skyhedge.planner import Plan
from skyhedge.spec import load_spec
from skyhedge.state import ServiceState

REGION = "us-east-1"
SPEC = """
name: llm
resources:
  instance_type: {aws: g5.xlarge}
placement:
  clouds: [aws]
  regions: [us-east-1]
replica_policy:
  min_replicas: 2
  num_overprovision: 1
  dynamic_ondemand_fallback: false
  policy: spothedge
readiness_probe: {initial_delay_seconds: 600}
run: {command: serve}
aws: {events_queue: llm-events}
"""


def _event(detail_type: str, detail: dict, **extra) -> str:
    return json.dumps(
        {
            "version": "0",
            "id": "1",
            "detail-type": detail_type,
            "source": "aws.ec2",
            "account": "1",
            "time": "2024-05-01T12:00:00Z",
            "region": REGION,
            "detail": detail,
            **extra,
        }
    )


@pytest.mark.parametrize(
    "arn",
    [
        "arn:aws:ec2:us-east-1:123456789012:instance/i-1",  # the EC2 User Guide's example now
        "arn:aws:ec2:us-east-1a:instance/i-1",  # an older example's: a zone *name*
    ],
)
def test_parse_interruption_warning_as_documented(arn):
    """The EC2 User Guide's `EC2 Spot Instance Interruption Warning`. Its ARN never gives a zone
    ID (skyhedge's AWS zones: use1-az1), so the event carries no location of its own; the replica
    it names has one."""
    body = _event(
        DETAIL_WARNING,
        {"instance-id": "i-1", "instance-action": "terminate"},
        resources=[arn],
    )
    ev = parse_message(body, received_at=0)
    assert ev is not None and ev.signal is Signal.WARNING and ev.cloud_id == "i-1"
    assert ev.location is None
    assert ev.at == pytest.approx(1714564800.0)


def test_parse_rebalance_and_state_changes():
    arn = ["arn:aws:ec2:us-east-1:123456789012:instance/i-2"]
    rebalance = parse_message(_event(DETAIL_REBALANCE, {"instance-id": "i-2"}, resources=arn), received_at=0)
    assert rebalance.signal is Signal.REBALANCE and rebalance.location is None
    gone = parse_message(_event(DETAIL_STATE, {"instance-id": "i-3", "state": "terminated"}), received_at=0)
    assert gone.signal is Signal.GONE and gone.reason == ""
    assert (
        parse_message(_event(DETAIL_STATE, {"instance-id": "i-3", "state": "running"}), received_at=0) is None
    )


def test_parse_sns_wrapped():
    inner = _event(DETAIL_WARNING, {"instance-id": "i-4"})
    ev = parse_message(json.dumps({"Type": "Notification", "Message": inner}), received_at=0)
    assert ev is not None and ev.cloud_id == "i-4"


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[" * 100_000,
        "[]",
        json.dumps({"detail": {}}),
        _event("Other", {"instance-id": "i"}),
        _event(DETAIL_STATE, {"instance-id": "i-1", "state": ["terminated"]}),
        _event(DETAIL_STATE, {"instance-id": "i-1", "state": {"a": 1}}),
    ],
)
def test_unparseable_is_logged_and_dropped(body, caplog):
    with caplog.at_level(logging.WARNING, logger="skyhedge.events"):
        assert parse_message(body, received_at=5.0) is None
    assert "ignoring unparseable input" in caplog.text


@pytest.fixture
def aws():
    with mock_aws():
        yield boto3.Session(region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing")


def test_setup_events_is_idempotent(aws):
    first = setup_events("llm", [REGION], queue_name="llm-events", session=aws)
    second = setup_events("llm", [REGION], queue_name="llm-events", session=aws)
    assert first == second
    events = aws.client("events", region_name=REGION)
    for name, pattern in zip(rule_names("llm"), event_patterns(), strict=True):
        rule = events.describe_rule(Name=name)
        assert json.loads(rule["EventPattern"]) == pattern
        targets = events.list_targets_by_rule(Rule=name)["Targets"]
        assert [t["Arn"] for t in targets] == [first[0].queue_arn]
    policy = aws.client("sqs", region_name=REGION).get_queue_attributes(
        QueueUrl=first[0].queue_url, AttributeNames=["Policy"]
    )["Attributes"]["Policy"]
    assert sorted(json.loads(policy)["Statement"][0]["Condition"]["ArnEquals"]["aws:SourceArn"]) == sorted(
        first[0].rule_arns
    )


class MotoExecutor:
    """Stands in for Terraform on AWS: launches/terminates moto instances tagged like the module does."""

    def __init__(self, session) -> None:
        self.ec2 = session.client("ec2", region_name=REGION)
        self.instances: dict[str, str] = {}  # replica ID -> instance ID

    def apply(self, state: ServiceState, plan: Plan, now: float) -> ExecResult:
        wanted = {r.id: r for r in plan.desired}
        for rid in [r for r in self.instances if r not in wanted]:
            self.ec2.terminate_instances(InstanceIds=[self.instances.pop(rid)])
            rec = state.replicas[rid]
            if rec.gone_at is None:
                rec.gone_at, rec.reason, rec.draining = now, "terminated", False
        for rid, r in wanted.items():
            if rid in self.instances:
                continue
            tags = [
                {"Key": "skyhedge:service", "Value": plan.service},
                {"Key": "skyhedge:replica", "Value": rid},
            ]
            reply = self.ec2.run_instances(
                ImageId="ami-12c6146b",
                MinCount=1,
                MaxCount=1,
                InstanceType="t3.micro",
                TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
                InstanceMarketOptions={"MarketType": "spot"} if r.market.value == "spot" else {},
            )
            self.instances[rid] = reply["Instances"][0]["InstanceId"]
            rec = state.replicas[rid]
            rec.cloud_id = self.instances[rid]
            rec.endpoint = f"http://10.0.0.{len(self.instances)}:8000"
            rec.provisioned_at = now
        return ExecResult(applied=(f"aws/{REGION}",))


def _controller(aws, tmp_path, write_spec, **source_opts):
    setup_events("llm", [REGION], queue_name="llm-events", session=aws)
    spec = load_spec(write_spec(SPEC))
    source = AwsEventSource("llm", [REGION], queue_name="llm-events", session=aws, **source_opts)
    clock = Clock(time.time())
    ctl = Controller(
        spec,
        tmp_path / "state",
        executor=MotoExecutor(aws),
        router=FakeRouter(),
        prober=FakeProber(),
        sources=[source],
        clock=clock,
        options=ControllerOptions(),
    )
    for _ in range(2):
        ctl.tick()
        clock.advance(1)
    assert len(ctl.state.live()) == 3
    return ctl, source, clock


def test_interruption_warning_via_eventbridge_replaces_replica_elsewhere(aws, tmp_path, write_spec):
    ctl, source, clock = _controller(aws, tmp_path, write_spec)
    victim = ctl.state.live()[0]
    aws.client("events", region_name=REGION).put_events(
        Entries=[
            {
                "Source": "aws.ec2",
                "DetailType": DETAIL_WARNING,
                "Detail": json.dumps({"instance-id": victim.cloud_id, "instance-action": "terminate"}),
                "Resources": [f"arn:aws:ec2:us-east-1a:instance/{victim.cloud_id}"],
            }
        ]
    )
    ctl.tick()
    assert victim.draining and victim.id in ctl.state.extra["warned"]
    replacement = [r for r in ctl.state.live() if r.provisioned_at == clock() and r.id != victim.id]
    assert len(replacement) == 1
    others = {r.zone for r in ctl.state.live() if r.id not in (victim.id, replacement[0].id)}
    assert replacement[0].zone != victim.zone and replacement[0].zone not in others
    # the message was deleted once recorded: nothing is redelivered
    url = aws.client("sqs", region_name=REGION).get_queue_url(QueueName="llm-events")["QueueUrl"]
    attrs = aws.client("sqs", region_name=REGION).get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )
    assert attrs["Attributes"] == {
        "ApproximateNumberOfMessages": "0",
        "ApproximateNumberOfMessagesNotVisible": "0",
    }
    # two minutes later EC2 takes the machine: the state-change message closes the story
    aws.client("ec2", region_name=REGION).terminate_instances(InstanceIds=[victim.cloud_id])
    aws.client("events", region_name=REGION).put_events(
        Entries=[
            {
                "Source": "aws.ec2",
                "DetailType": DETAIL_STATE,
                "Detail": json.dumps({"instance-id": victim.cloud_id, "state": "terminated"}),
            }
        ]
    )
    clock.advance(120)
    ctl.tick()
    assert victim.gone_at is not None and victim.reason == "terminated"
    assert len(ctl.state.live()) == 3


def test_reconcile_finds_a_terminated_instance(aws, tmp_path, write_spec):
    ctl, source, clock = _controller(aws, tmp_path, write_spec, reconcile_every=30)
    victim = ctl.state.live()[1]
    aws.client("ec2", region_name=REGION).terminate_instances(InstanceIds=[victim.cloud_id])  # no message
    clock.advance(31)
    ctl.tick()
    assert victim.gone_at is not None and victim.reason == "preempted"  # spot, gone without us
    assert ctl.state.policy_memory["memory"]["preempted"] == [victim.location.key]
    live = ctl.state.live()
    assert len(live) == 3 and all(r.zone != victim.zone for r in live)


def test_an_instance_whose_tags_were_edited_by_hand_is_not_taken_for_gone(aws, tmp_path, write_spec):
    """Its service tag removed or changed (in the console, by a tag policy), a replica's instance
    is no longer in the tag listing: the reconcile called it gone ("instance no longer listed"),
    and a healthy machine was replaced, then terminated by Terraform. Its recorded ID is looked up
    before it is judged; terminated, it is gone as before."""
    ctl, source, clock = _controller(aws, tmp_path, write_spec, reconcile_every=30)
    ec2 = aws.client("ec2", region_name=REGION)
    edited, renamed = ctl.state.live()[:2]
    ec2.delete_tags(Resources=[edited.cloud_id], Tags=[{"Key": "skyhedge:service"}])
    ec2.create_tags(Resources=[renamed.cloud_id], Tags=[{"Key": "skyhedge:service", "Value": "other"}])
    assert source.reconcile(clock(), ctl.state.live()) == []
    ec2.terminate_instances(InstanceIds=[edited.cloud_id])
    [gone] = source.reconcile(clock(), ctl.state.live())
    assert (gone.signal, gone.replica_id, gone.detail) == (Signal.GONE, edited.id, "instance terminated")


def test_the_reconcile_reads_every_page_of_describe_instances(aws, tmp_path, write_spec):
    """EC2 pages DescribeInstances (`NextToken`); a reconcile that read the first page only would
    take every replica listed on a later one for terminated. Pages of one reservation here (moto
    takes a MaxResults below EC2's minimum of 5), so each replica is on a page of its own."""
    ctl, source, clock = _controller(aws, tmp_path, write_spec, reconcile_every=30)
    pages: list[bool] = []

    def one_a_page(params, **_kwargs):
        params["MaxResults"] = 1

    def count(parsed, **_kwargs):
        pages.append(bool(parsed.get("NextToken")))

    aws.events.register("provide-client-params.ec2.DescribeInstances", one_a_page)
    aws.events.register("after-call.ec2.DescribeInstances", count)
    try:
        events = source.reconcile(clock(), ctl.state.live())
    finally:
        aws.events.unregister("provide-client-params.ec2.DescribeInstances", one_a_page)
        aws.events.unregister("after-call.ec2.DescribeInstances", count)
    assert events == []  # all three running, on pages 1 to 3
    assert len(pages) >= 3 and pages[0] and not pages[-1]


def test_missing_queue_falls_back_to_reconcile(aws, caplog):
    source = AwsEventSource("nosvc", [REGION], session=aws)
    with caplog.at_level(logging.WARNING):
        assert source.poll(0.0, []) == []
    assert "setup-events" in caplog.text


def test_watch_wakes_on_a_message(aws):
    setup_events("llm", [REGION], queue_name="llm-events", session=aws)
    source = AwsEventSource("llm", [REGION], queue_name="llm-events", session=aws, wait_seconds=1)
    woke = threading.Event()
    source.watch(woke.set)
    try:
        aws.client("events", region_name=REGION).put_events(
            Entries=[
                {
                    "Source": "aws.ec2",
                    "DetailType": DETAIL_WARNING,
                    "Detail": json.dumps({"instance-id": "i-9"}),
                }
            ]
        )
        assert woke.wait(10)
        events = source.poll(time.time(), [])
        assert [e.cloud_id for e in events] == ["i-9"]
        source.ack()
    finally:
        source.close()


def _warn(aws, instance_id: str) -> None:
    aws.client("events", region_name=REGION).put_events(
        Entries=[
            {
                "Source": "aws.ec2",
                "DetailType": DETAIL_WARNING,
                "Detail": json.dumps({"instance-id": instance_id, "instance-action": "terminate"}),
            }
        ]
    )


def _ec2_down(aws, *operations: str):
    """Make these EC2 calls fail as an unreachable endpoint does; returns the undo."""
    from botocore.exceptions import EndpointConnectionError

    def boom(**_kw):
        raise EndpointConnectionError(endpoint_url="https://ec2.us-east-1.amazonaws.com")

    names = [f"before-call.ec2.{op}" for op in operations]
    for name in names:
        aws.events.register(name, boom)
    return lambda: [aws.events.unregister(name, boom) for name in names]


def test_a_warning_is_not_lost_when_naming_its_instance_fails(aws, tmp_path, write_spec):
    """A message about an instance not recorded yet needs describe_instances to be named; while
    that fails the message is kept (not deleted from the queue) and counts once it succeeds."""
    ctl, source, clock = _controller(aws, tmp_path, write_spec, reconcile_every=3600)
    victim = ctl.state.live()[0]
    recorded, victim.cloud_id = victim.cloud_id, None  # as after an apply that crashed before outputs
    _warn(aws, recorded)
    undo = _ec2_down(aws, "DescribeInstances")
    clock.advance(1)
    ctl.tick()
    assert victim.id not in ctl.state.extra.get("warned", {})
    assert any("event source aws" in note.text for note in ctl.notes)
    undo()
    clock.advance(1)
    ctl.tick()
    assert victim.id in ctl.state.extra["warned"]


def test_another_instances_message_does_not_hold_back_a_known_replicas_warning(aws, tmp_path, write_spec):
    """The rules match every instance of the account. While describe_instances fails, a message
    about an instance whose ID is not recorded waits; our known replica's warning counts now."""
    ctl, source, clock = _controller(aws, tmp_path, write_spec, reconcile_every=3600)
    victim = ctl.state.live()[0]
    _warn(aws, "i-0123456789abcdef0")  # another team's instance
    _warn(aws, victim.cloud_id)
    undo = _ec2_down(aws, "DescribeInstances")
    clock.advance(1)
    ctl.tick()
    assert victim.id in ctl.state.extra["warned"]
    assert any("wait for the next poll" in note.text for note in ctl.notes)
    assert len(source._buffer) == 1  # the other instance's message, kept for the lookup
    undo()
    lookups = []
    aws.events.register("before-call.ec2.DescribeInstances", lambda **kw: lookups.append(1))
    clock.advance(1)
    ctl.tick()
    assert source._buffer == [] and len(lookups) == 1
    _warn(aws, "i-0123456789abcdef0")  # found not to be ours: not looked up again
    clock.advance(1)
    ctl.tick()
    assert len(lookups) == 1
    sqs = aws.client("sqs", region_name=REGION)
    url = sqs.get_queue_url(QueueName="llm-events")["QueueUrl"]
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
    assert attrs["Attributes"]["ApproximateNumberOfMessages"] == "0"  # every message deleted


def test_a_queue_set_up_after_the_watcher_started_is_read(aws):
    source = AwsEventSource("llm", [REGION], queue_name="llm-events", session=aws, reconcile_every=0.5)
    assert source.poll(time.time(), []) == []
    setup_events("llm", [REGION], queue_name="llm-events", session=aws)
    _warn(aws, "i-9")
    time.sleep(0.6)  # the next lookup is due
    assert [e.cloud_id for e in source.poll(time.time(), [])] == ["i-9"]


def test_a_waiter_that_cannot_reach_sqs_says_so_once_and_tells_the_controller(aws, caplog):
    from botocore.exceptions import EndpointConnectionError

    setup_events("llm", [REGION], queue_name="llm-events", session=aws)

    down = threading.Event()
    down.set()

    def boom(**_kw):  # clients copy the session's handlers when made: switched off by a flag
        if down.is_set():
            raise EndpointConnectionError(endpoint_url="https://sqs.us-east-1.amazonaws.com")

    aws.events.register("before-call.sqs.ReceiveMessage", boom)
    source = AwsEventSource("llm", [REGION], queue_name="llm-events", session=aws, wait_seconds=1)
    source._stop.wait = lambda _seconds: time.sleep(0.05)  # retry fast: many failures, one report
    with caplog.at_level(logging.WARNING, logger="skyhedge.clouds.aws.events"):
        source.watch(lambda: None)
        try:
            time.sleep(1.0)
            problems = source.problems()
            down.clear()
            deadline = time.time() + 10
            while "works again" not in caplog.text and time.time() < deadline:
                time.sleep(0.05)
        finally:
            source.close()
    assert len(problems) == 1 and "Could not connect" in problems[0]
    assert caplog.text.count("Could not connect") == 1
    assert "works again" in caplog.text
    assert source.problems() == [f"aws {REGION}: sqs receive_message works again"]


def test_setup_events_sets_the_retention_of_an_existing_queue(aws):
    sqs = aws.client("sqs", region_name=REGION)
    url = sqs.create_queue(QueueName="llm-events")["QueueUrl"]  # made by hand: 4-day retention
    setup_events("llm", [REGION], queue_name="llm-events", session=aws)
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["MessageRetentionPeriod"])["Attributes"]
    assert attrs["MessageRetentionPeriod"] == "3600"


def test_a_fifo_events_queue_is_set_up_and_receives_the_warnings(aws):
    """The spec takes a FIFO queue name (`.fifo`); SQS and EventBridge then need a FIFO queue with
    content-based deduplication and a message group, else setup failed half-way (queue and rules
    made, no targets) and no warning ever reached the watcher."""
    sqs = aws.client("sqs", region_name=REGION)
    setup = setup_events("llm", [REGION], queue_name="llm-events.fifo", session=aws)
    setup_events("llm", [REGION], queue_name="llm-events.fifo", session=aws)  # still idempotent
    attrs = sqs.get_queue_attributes(QueueUrl=setup[0].queue_url, AttributeNames=["All"])["Attributes"]
    assert attrs["FifoQueue"] == "true" and attrs["ContentBasedDeduplication"] == "true"
    _warn(aws, "i-0123456789abcdef0")
    _warn(aws, "i-0fedcba9876543210")
    bodies = [
        json.loads(m["Body"])["detail"]["instance-id"]
        for m in sqs.receive_message(QueueUrl=setup[0].queue_url, MaxNumberOfMessages=10).get("Messages", [])
    ]
    assert bodies == ["i-0123456789abcdef0", "i-0fedcba9876543210"]


def test_a_failing_reconcile_keeps_the_queues_events_and_waits_its_turn(aws, tmp_path, write_spec, caplog):
    ctl, source, clock = _controller(aws, tmp_path, write_spec, reconcile_every=30)
    victim = ctl.state.live()[0]
    _warn(aws, victim.cloud_id)
    undo = _ec2_down(aws, "DescribeInstances")
    calls = []
    aws.events.register("before-call.ec2.DescribeInstances", lambda **kw: calls.append(1))
    clock.advance(31)
    with caplog.at_level(logging.WARNING):
        ctl.tick()
    assert victim.id in ctl.state.extra["warned"]  # the queue's warning counted all the same
    assert "next reconcile in 30 s" in caplog.text
    tried = len(calls)
    clock.advance(5)
    ctl.tick()
    assert len(calls) == tried  # not retried every tick: at the reconcile pace
    undo()


def test_clients_have_bounded_timeouts_and_only_sqs_waits_past_its_long_poll(aws):
    """An EC2 endpoint that accepts and never answers holds a listing (and `plan`, which asks EC2
    which replicas still run) for read timeout x attempts: 10 s reads, where SQS's long poll
    needs its wait plus a margin."""
    source = AwsEventSource("llm", [REGION], session=aws, wait_seconds=20)
    ec2 = source._client("ec2", REGION).meta.config
    sqs = source._client("sqs", REGION).meta.config
    assert ec2.connect_timeout == 5 and ec2.read_timeout == 10
    assert sqs.connect_timeout == 5 and sqs.read_timeout == 30
    assert ec2.retries["mode"] == sqs.retries["mode"] == "standard"


def _leftover(aws, replica_id: str) -> str:
    """An instance tagged like one of ours that Terraform never recorded (an apply killed between
    RunInstances and saving its state)."""
    tags = [{"Key": "skyhedge:service", "Value": "llm"}, {"Key": "skyhedge:replica", "Value": replica_id}]
    reply = aws.client("ec2", region_name=REGION).run_instances(
        ImageId="ami-12c6146b",
        MinCount=1,
        MaxCount=1,
        InstanceType="t3.micro",
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )
    return reply["Instances"][0]["InstanceId"]


def test_a_leftover_instance_is_reported_once_after_a_grace(aws, tmp_path, write_spec, caplog):
    ctl, source, clock = _controller(aws, tmp_path, write_spec, reconcile_every=30)
    twin = _leftover(aws, ctl.state.live()[0].id)
    with caplog.at_level(logging.WARNING):
        for _ in range(25):  # 25 x 31 s: past the 10 min grace
            clock.advance(31)
            ctl.tick()
    reports = [r.getMessage() for r in caplog.records if twin in r.getMessage()]
    assert len(reports) == 1 and "belongs to no live replica" in reports[0]
    assert f"--instance-ids {twin}" in reports[0]
    assert aws.client("ec2", region_name=REGION).describe_instances(InstanceIds=[twin])["Reservations"]


def test_a_leftover_twin_does_not_keep_a_terminated_replica_alive(aws, tmp_path, write_spec, monkeypatch):
    """The recorded instance is gone from the listing (EC2 drops terminated instances after about
    an hour); a leftover with the same replica tag must not pass for it."""
    ctl, source, clock = _controller(aws, tmp_path, write_spec, reconcile_every=30)
    victim = ctl.state.live()[0]
    _leftover(aws, victim.id)
    listed = source.list_instances
    monkeypatch.setattr(
        source,
        "list_instances",
        lambda region, **kw: [i for i in listed(region, **kw) if i["InstanceId"] != victim.cloud_id],
    )
    clock.advance(31)
    ctl.tick()
    assert victim.gone_at is not None


def test_naming_many_unknown_instances_stays_within_ec2s_filter_limit(aws, tmp_path, write_spec):
    """EC2 takes at most 200 values per filter. A backlog of events about other instances of the
    account (the rules match them all) is looked up in chunks, and our replica is still named."""
    from skyhedge.events import PreemptionEvent

    ctl, source, _clock = _controller(aws, tmp_path, write_spec, reconcile_every=3600)
    ours = ctl.state.live()[0]
    sizes: list[int] = []

    def at_most_200(params, **_kwargs):
        values = [f["Values"] for f in params.get("Filters", []) if f["Name"] == "instance-id"]
        sizes.extend(len(v) for v in values)
        if any(len(v) > FILTER_VALUES_MAX for v in values):
            raise AssertionError("more filter values than EC2 accepts")

    aws.events.register("provide-client-params.ec2.DescribeInstances", at_most_200)
    recorded, ours.cloud_id = ours.cloud_id, None  # as after an apply that crashed before outputs
    foreign = [f"i-{n:017x}" for n in range(450)]
    events = [PreemptionEvent(Signal.WARNING, 1.0, "aws-sqs", cloud_id=i) for i in [*foreign, recorded]]
    assert source._name_replicas(events, ctl.state.live()) == {recorded: ours.id}
    assert sorted(sizes) == [51, 200, 200]


def test_an_odd_message_does_not_hold_back_the_valid_ones_of_its_batch(aws, tmp_path, write_spec):
    ctl, source, clock = _controller(aws, tmp_path, write_spec, reconcile_every=3600)
    victim = ctl.state.live()[0]
    sqs = aws.client("sqs", region_name=REGION)
    url = sqs.get_queue_url(QueueName="llm-events")["QueueUrl"]
    odd = _event(DETAIL_STATE, {"instance-id": victim.cloud_id, "state": ["terminated"]})
    sqs.send_message(QueueUrl=url, MessageBody=odd)
    _warn(aws, str(victim.cloud_id))
    clock.advance(1)
    ctl.tick()
    assert victim.id in ctl.state.extra["warned"] and victim.gone_at is None
    clock.advance(1)
    ctl.tick()  # both were deleted: nothing comes back
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert (
        attrs["ApproximateNumberOfMessages"] == "0" and attrs["ApproximateNumberOfMessagesNotVisible"] == "0"
    )


# -- instances an interrupted run left (skyhedge/clouds/aws/leftovers.py) --------------------------

DEPLOYMENT = "5f0c2a9d41b7e3c8"


def _tagged(ec2, rid: str, deployment: str | None) -> str:
    tags = [{"Key": "skyhedge:service", "Value": "llm"}, {"Key": "skyhedge:replica", "Value": rid}]
    if deployment is not None:
        tags.append({"Key": "skyhedge:deployment", "Value": deployment})
    return ec2.run_instances(
        ImageId="ami-12c6146b",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )["Instances"][0]["InstanceId"]


def _states(ec2) -> dict[str, str]:
    pages = ec2.describe_instances()["Reservations"]
    return {i["InstanceId"]: i["State"]["Name"] for r in pages for i in r["Instances"]}


def test_only_what_an_interrupted_run_of_this_state_launched_is_terminated(aws, monkeypatch):
    """Terminated: tagged with this state's deployment ID, owned by no live replica, not one
    skyhedge read back for a replica (`spare`), in a region whose Terraform state was read back.
    Everything else tagged for the service is named with the command, never terminated."""
    from skyhedge.clouds.aws import leftovers

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    ec2 = aws.client("ec2", region_name=REGION)
    served = _tagged(ec2, "r-0001", DEPLOYMENT)  # a live replica owns it
    killed = _tagged(ec2, "r-0003", DEPLOYMENT)
    untagged = _tagged(ec2, "r-0004", None)
    other = _tagged(ec2, "r-0005", "0123456789abcdef")
    recorded = _tagged(ec2, "r-0006", DEPLOYMENT)  # read back for a replica before

    def sweep(**given):
        return leftovers.instances_left("llm", {REGION}, owned={served}, spare={recorded}, **given)

    lines = sweep(deployment=DEPLOYMENT, unread=True)  # the apply failed before reading back
    assert len(lines) == 1 and "not terminated: the apply failed there" in lines[0]
    assert set(_states(ec2).values()) == {"running"}
    assert sweep(deployment=None)[-1].startswith(f"aws {REGION}: 3 instance(s) tagged for llm still run")
    assert set(_states(ec2).values()) == {"running"}  # no ID of this state: nothing is proven its

    recorded_line, terminated, named = sweep(deployment=DEPLOYMENT)
    assert recorded_line.startswith(f"aws {REGION}: 1 instance(s) of llm that skyhedge recorded")
    assert f"{recorded} (r-0006)" in recorded_line
    assert terminated == (
        f"aws {REGION}: terminated 1 instance(s) of llm that an interrupted run of this state launched "
        f"and Terraform never saved: {killed} (r-0003)"
    )
    assert f"{untagged} (r-0004)" in named and f"{other} (r-0005)" in named and served not in named
    assert _states(ec2) == {
        served: "running",
        killed: "terminated",
        untagged: "running",
        other: "running",
        recorded: "running",
    }
