"""`skyhedge aws setup-events`: route EC2's interruption events into the service's SQS queue.

Per region the spec uses, this creates (or updates in place, so running it twice is harmless):
  - the SQS queue `aws.events_queue` (default `skyhedge-<service>-events`), 1 h retention;
  - two EventBridge rules on the default bus: `skyhedge-<service>-interruption` (spot interruption
    warnings and rebalance recommendations) and `skyhedge-<service>-state` (instances going
    shutting-down/terminated/stopping/stopped), each targeting the queue;
  - the queue policy that lets exactly those rules send to the queue.
EventBridge rules are regional, and EC2 emits an instance's events in its own region, hence one
set per region.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from skyhedge.clouds.aws import new_session
from skyhedge.clouds.aws.events import (
    DETAIL_REBALANCE,
    DETAIL_STATE,
    DETAIL_WARNING,
    GONE_STATES,
    default_queue_name,
)
from skyhedge.errors import CloudError

__all__ = ["RegionSetup", "event_patterns", "rule_names", "setup_events"]

RETENTION_SECONDS = "3600"
TARGET_ID = "skyhedge-sqs"


@dataclass(frozen=True)
class RegionSetup:
    region: str
    queue_url: str
    queue_arn: str
    rule_arns: tuple[str, ...]


def rule_names(service: str) -> tuple[str, str]:
    return (f"skyhedge-{service}-interruption", f"skyhedge-{service}-state")


def event_patterns() -> tuple[dict[str, Any], dict[str, Any]]:
    """The two rules' patterns (one rule cannot filter `detail.state` for one detail type only)."""
    interruption = {"source": ["aws.ec2"], "detail-type": [DETAIL_WARNING, DETAIL_REBALANCE]}
    state = {"source": ["aws.ec2"], "detail-type": [DETAIL_STATE], "detail": {"state": sorted(GONE_STATES)}}
    return interruption, state


def _queue_policy(queue_arn: str, rule_arns: Sequence[str]) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "skyhedge-eventbridge",
                    "Effect": "Allow",
                    "Principal": {"Service": "events.amazonaws.com"},
                    "Action": "sqs:SendMessage",
                    "Resource": queue_arn,
                    "Condition": {"ArnEquals": {"aws:SourceArn": list(rule_arns)}},
                }
            ],
        },
        sort_keys=True,
    )


def _setup_region(session: Any, service: str, queue_name: str, region: str) -> RegionSetup:
    sqs = session.client("sqs", region_name=region)
    events = session.client("events", region_name=region)
    # `aws.events_queue` may name a FIFO queue (`.fifo`): SQS makes one only when asked to, and
    # EventBridge sends to one only with a message group and content-based deduplication (each
    # event's body holds its own ID, so no two events are taken for one), so these are set too
    fifo = queue_name.endswith(".fifo")
    try:
        url = sqs.get_queue_url(QueueName=queue_name)["QueueUrl"]
    except sqs.exceptions.QueueDoesNotExist:
        attributes = {"MessageRetentionPeriod": RETENTION_SECONDS}
        if fifo:
            attributes.update(FifoQueue="true", ContentBasedDeduplication="true")
        url = sqs.create_queue(QueueName=queue_name, Attributes=attributes)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    rule_arns = []
    for name, pattern in zip(rule_names(service), event_patterns(), strict=True):
        reply = events.put_rule(
            Name=name,
            EventPattern=json.dumps(pattern, sort_keys=True),
            State="ENABLED",
            Description=f"skyhedge: EC2 events for service {service} into SQS {queue_name}",
        )
        rule_arns.append(reply["RuleArn"])
        target: dict[str, Any] = {"Id": TARGET_ID, "Arn": arn}
        if fifo:  # one group: the watcher reads every event of the queue anyway
            target["SqsParameters"] = {"MessageGroupId": f"skyhedge-{service}"}
        events.put_targets(Rule=name, Targets=[target])
    # the retention too: a queue made by hand (or by an older skyhedge) keeps AWS's 4-day default,
    # and a watcher started days later would act on interruption warnings long past
    attributes = {"Policy": _queue_policy(arn, rule_arns), "MessageRetentionPeriod": RETENTION_SECONDS}
    if fifo:  # a FIFO queue made by hand may lack it
        attributes["ContentBasedDeduplication"] = "true"
    sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)
    return RegionSetup(region, url, arn, tuple(rule_arns))


def setup_events(
    service: str, regions: Sequence[str], *, queue_name: str | None = None, session: Any = None
) -> list[RegionSetup]:
    """Create or update the queue, rules and policy in every region; idempotent."""
    from botocore.exceptions import BotoCoreError, ClientError

    session = session or new_session()
    queue_name = queue_name or default_queue_name(service)
    out = []
    for region in sorted(set(regions)):
        try:
            out.append(_setup_region(session, service, queue_name, region))
        except (ClientError, BotoCoreError) as exc:
            raise CloudError(f"aws {region}: setting up events for {service}: {exc}") from exc
    return out
