"""AWS event source: EventBridge -> SQS messages, plus a `describe_instances` reconcile.

EC2 announces a spot interruption two minutes ahead (`EC2 Spot Instance Interruption Warning`),
hints at elevated risk (`EC2 Instance Rebalance Recommendation`) and reports every state change
(`EC2 Instance State-change Notification`). `skyhedge aws setup-events` routes these, per region,
into one SQS queue; this source reads it. Messages can be lost or late (a queue not set up, a
rule disabled), so every `reconcile_every` seconds the source also lists the service's instances
by tag and reports the ones that are gone: the safety net Karpenter also keeps.

`parse_message` is the pure parser (one message body in, one event or None out); it is what the
tests feed with EventBridge's documented shapes.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from skyhedge.clouds.aws import new_session
from skyhedge.errors import CloudError
from skyhedge.events import EventSource, LeftoverWatch, PreemptionEvent, ProblemLog, Signal, unparseable
from skyhedge.state import ReplicaRecord

if TYPE_CHECKING:
    from skyhedge.spec import ServiceSpec

log = logging.getLogger("skyhedge.clouds.aws.events")

DETAIL_WARNING = "EC2 Spot Instance Interruption Warning"
DETAIL_REBALANCE = "EC2 Instance Rebalance Recommendation"
DETAIL_STATE = "EC2 Instance State-change Notification"
GONE_STATES = frozenset({"shutting-down", "terminated", "stopping", "stopped"})
# Tags the aws-replicas Terraform module puts on every instance (modules/aws-replicas/main.tf).
TAG_SERVICE = "skyhedge:service"
TAG_REPLICA = "skyhedge:replica"
#: The skyhedge state whose apply launched the instance (modules/aws-replicas, var.deployment).
TAG_DEPLOYMENT = "skyhedge:deployment"
SPOT_TERMINATION_CODES = frozenset({"Server.SpotInstanceTermination", "Server.SpotInstanceShutdown"})
#: DescribeInstances takes at most this many values per filter.
FILTER_VALUES_MAX = 200

__all__ = [
    "event_source",
    "AwsEventSource",
    "default_queue_name",
    "parse_message",
]


#: Seconds an EC2 call's reply may take (SQS reads wait longer: `AwsEventSource._client`).
EC2_READ_TIMEOUT = 10


def default_queue_name(service: str) -> str:
    return f"skyhedge-{service}-events"


def _epoch(text: Any, fallback: float) -> float:
    if not isinstance(text, str):
        return fallback
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return fallback


def parse_message(body: str, *, received_at: float, source: str = "aws-sqs") -> PreemptionEvent | None:
    """One SQS message body (an EventBridge event, optionally wrapped by SNS) -> one event.

    Returns None for input that carries nothing for us (an instance starting, another detail
    type) and for input that cannot be parsed, which is logged; either way the caller deletes it.
    """
    try:
        event = json.loads(body)
    except (TypeError, ValueError, RecursionError):  # nesting deeper than the parser's stack
        unparseable(source, body, "not JSON")
        return None
    if (
        isinstance(event, dict)
        and event.get("Type") == "Notification"
        and isinstance(event.get("Message"), str)
    ):
        return parse_message(event["Message"], received_at=received_at, source=source)
    if not isinstance(event, dict) or not isinstance(event.get("detail"), dict):
        unparseable(source, body, "not an EventBridge event")
        return None
    kind = event.get("detail-type")
    detail = event["detail"]
    instance = detail.get("instance-id")
    if not isinstance(instance, str) or not instance:
        unparseable(source, body, "no detail.instance-id")
        return None
    at = _epoch(event.get("time"), received_at)
    # No location: an event's `resources` ARN names the region (`arn:aws:ec2:us-east-2:ACCOUNT:
    # instance/ID`; older examples had a zone *name*, `us-east-2a`), while skyhedge's AWS zones
    # are zone IDs (use1-az1), which a name maps to only per account. The replica it names has
    # its zone; an event naming none of them is ignored.
    if kind == DETAIL_WARNING:
        action = detail.get("instance-action", "terminate")
        return PreemptionEvent(
            Signal.WARNING,
            at,
            source,
            cloud_id=instance,
            detail=f"spot interruption warning ({action})",
        )
    if kind == DETAIL_REBALANCE:
        return PreemptionEvent(
            Signal.REBALANCE,
            at,
            source,
            cloud_id=instance,
            detail="rebalance recommendation",
        )
    if kind == DETAIL_STATE:
        state = detail.get("state")
        if not isinstance(state, str):
            unparseable(source, body, "detail.state is not a string")
            return None
        if state in GONE_STATES:
            # The notification does not say why; the controller decides by market (spot -> preempted).
            return PreemptionEvent(
                Signal.GONE,
                at,
                source,
                cloud_id=instance,
                reason="",
                detail=f"instance {state}",
            )
        return None
    unparseable(source, body, f"unexpected detail-type {kind!r}")
    return None


def instance_gone_reason(instance: dict[str, Any]) -> str:
    """Why a listed instance is gone: `preempted` when EC2 says the spot market took it, else ''."""
    code = (instance.get("StateReason") or {}).get("Code", "")
    return "preempted" if code in SPOT_TERMINATION_CODES else ""


class AwsEventSource(EventSource):
    """Reads the service's SQS queue in each region it uses and reconciles by tag.

    `session` is a `boto3.Session` (tests pass one bound to moto); clients are made per thread.
    """

    name = "aws"

    def __init__(
        self,
        service: str,
        regions: Sequence[str],
        *,
        queue_name: str | None = None,
        session: Any = None,
        reconcile_every: float = 60.0,
        wait_seconds: int = 20,
    ) -> None:
        self.service = service
        self.regions = tuple(sorted(set(regions)))
        self.queue_name = queue_name or default_queue_name(service)
        self.session = session or new_session()
        self.reconcile_every = reconcile_every
        self.wait_seconds = wait_seconds
        self._queue_urls: dict[str, str] = {}
        self._queue_missing: dict[str, float] = {}  # region -> when a lookup last found no queue
        self._last_reconcile: float | None = None
        self._leftovers = LeftoverWatch()
        self._foreign: set[str] = set()  # instance IDs looked up and found not to be ours
        self._buffer: list[tuple[str, dict[str, Any]]] = []
        self._to_ack: list[tuple[str, str]] = []
        self._problems = ProblemLog(log)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- SQS ------------------------------------------------------------------------------------

    def _client(self, service: str, region: str) -> Any:
        """A boto3 client with bounded waits: botocore's defaults (60 s connect, 60 s read, legacy
        retries) let one unresponsive endpoint hold a controller tick for five minutes. Only SQS
        reads wait past its long poll; EC2's listings answer in seconds, and with the SQS read
        timeout an endpoint that accepted and never answered held `plan` (which asks EC2 which
        replicas still run) 122 s per region (measured: 30 s x 4 attempts, botocore's 3 retries
        and the first)."""
        from botocore.config import Config

        config = Config(
            connect_timeout=5,
            read_timeout=max(30, self.wait_seconds + 10) if service == "sqs" else EC2_READ_TIMEOUT,
            retries={"mode": "standard", "max_attempts": 3},
        )
        return self.session.client(service, region_name=region, config=config)

    def queue_url(self, region: str, sqs: Any = None) -> str | None:
        """The queue's URL in `region`, or None while setup-events was not run there.

        A missing queue is looked up again every `reconcile_every` seconds, so running
        `skyhedge aws setup-events` while the watcher runs is enough: no restart needed.
        """
        url = self._queue_urls.get(region)
        if url is not None:
            return url
        missing = self._queue_missing.get(region)
        if missing is not None and 0 <= time.monotonic() - missing < self.reconcile_every:
            return None
        from botocore.exceptions import BotoCoreError, ClientError

        sqs = sqs or self._client("sqs", region)
        try:
            url = sqs.get_queue_url(QueueName=self.queue_name)["QueueUrl"]
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if "NonExistentQueue" not in code and code != "QueueDoesNotExist":
                raise CloudError(f"aws {region}: sqs get_queue_url {self.queue_name}: {exc}") from exc
            if missing is None:
                log.warning(
                    "aws %s: no SQS queue %r: run `skyhedge aws setup-events SPEC`; until then only "
                    "the describe_instances reconcile (every %.0f s) sees preemptions (the queue is "
                    "looked up again at that pace)",
                    region,
                    self.queue_name,
                    self.reconcile_every,
                )
            self._queue_missing[region] = time.monotonic()
            return None
        except BotoCoreError as exc:
            raise CloudError(f"aws {region}: sqs get_queue_url {self.queue_name}: {exc}") from exc
        if self._queue_missing.pop(region, None) is not None:
            log.warning("aws %s: SQS queue %r found: reading its events now", region, self.queue_name)
        self._queue_urls[region] = str(url)
        return str(url)

    def _receive(self, region: str, sqs: Any, wait: int) -> list[dict[str, Any]]:
        from botocore.exceptions import BotoCoreError, ClientError

        url = self.queue_url(region, sqs)
        if url is None:
            return []
        try:
            reply = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=wait)
        except (ClientError, BotoCoreError) as exc:
            raise CloudError(f"aws {region}: sqs receive_message: {exc}") from exc
        return list(reply.get("Messages") or [])

    def watch(self, wake: Callable[[], None]) -> None:
        """Long-poll each region's queue in a daemon thread; a message wakes the controller."""
        for region in self.regions:
            thread = threading.Thread(
                target=self._long_poll, args=(region, wake), daemon=True, name=f"skyhedge-sqs-{region}"
            )
            thread.start()
            self._threads.append(thread)

    def _long_poll(self, region: str, wake: Callable[[], None]) -> None:
        try:
            sqs = self._client("sqs", region)
        except CloudError as exc:
            self._problems.report(region, str(exc))
            return
        while not self._stop.is_set():
            try:
                messages = self._receive(region, sqs, self.wait_seconds)
            except CloudError as exc:
                # SQS unreachable, credentials gone...: said once (then once a minute) and handed to
                # the controller through problems(), not logged every retry
                self._problems.report(region, str(exc))
                self._stop.wait(5.0)
                continue
            self._problems.clear(region, f"aws {region}: sqs receive_message works again")
            if region not in self._queue_urls:  # no queue yet: wait for the next lookup
                self._stop.wait(max(1.0, min(self.reconcile_every, 60.0)))
                continue
            if messages:
                with self._lock:
                    self._buffer.extend((region, m) for m in messages)
                wake()

    def problems(self) -> list[str]:
        return self._problems.take()

    def poll(self, now: float, live: Sequence[ReplicaRecord]) -> list[PreemptionEvent]:
        with self._lock:
            received, self._buffer = self._buffer, []
        if not self._threads:  # no background poller: read what is there now
            for region in self.regions:
                sqs = self._client("sqs", region)
                for _ in range(10):  # at most 100 messages per region per tick
                    batch = self._receive(region, sqs, 0)
                    received.extend((region, m) for m in batch)
                    if len(batch) < 10:
                        break
        # A message kept from a failed poll may come back from SQS (its visibility timeout ran
        # out): keep one copy, with the newest receipt handle (the only one SQS still honours).
        latest = {m.get("MessageId") or id(m): (region, m) for region, m in received}
        received = list(latest.values())
        mine = [r for r in live if r.cloud == "aws"]
        parsed = [(region, message, _parse_safely(message, now)) for region, message in received]
        try:
            names = self._name_replicas([e for _, _, e in parsed if e is not None], mine)
            held: set[str] = set()
        except CloudError as exc:
            # Only the messages about instances whose ID is not recorded wait for the lookup to
            # work again; a warning for a known replica goes through now. Most such messages are
            # about other instances of the account (the rules match every instance).
            names = {}
            known = {r.cloud_id for r in mine if r.cloud_id}
            held = {
                e.cloud_id
                for _, _, e in parsed
                if e is not None
                and e.cloud_id
                and not e.replica_id
                and e.cloud_id not in known
                and e.cloud_id not in self._foreign
            }
            self._problems.report(
                "lookup", f"{exc} (events about {len(held)} unrecorded instance(s) wait for the next poll)"
            )
        events: list[PreemptionEvent] = []
        kept: list[tuple[str, dict[str, Any]]] = []
        for region, message, event in parsed:
            if event is not None and event.cloud_id in held:
                kept.append((region, message))
                continue
            if event is not None:
                named = event.cloud_id in names
                events.append(replace(event, replica_id=names[str(event.cloud_id)]) if named else event)
            with self._lock:
                self._to_ack.append((region, message["ReceiptHandle"]))
        if kept:
            with self._lock:
                self._buffer[:0] = kept
        last = self._last_reconcile
        # `now < last`: the wall clock stepped back; a reconcile is due rather than hours away
        if mine and (last is None or now < last or now - last >= self.reconcile_every):
            self._last_reconcile = now  # a failing reconcile is retried at the same pace, not every tick
            try:
                events.extend(self.reconcile(now, mine))
            except CloudError as exc:
                log.warning(
                    "%s (the queue's events still count; next reconcile in %.0f s)", exc, self.reconcile_every
                )
        return events

    def _name_replicas(
        self, events: Sequence[PreemptionEvent], live: Sequence[ReplicaRecord]
    ) -> dict[str, str]:
        """Replica IDs, by instance ID, of the instances events name whose ID is not recorded yet
        (an apply that crashed before recording outputs, or GitOps mode where CI launched it), from
        their tags. Instances found not to be ours are remembered and not looked up again."""
        known = {r.cloud_id for r in live if r.cloud_id}
        skip = known | self._foreign
        unknown = sorted(
            {e.cloud_id for e in events if e.cloud_id and e.cloud_id not in skip and not e.replica_id}
        )
        if not unknown or not live:
            return {}
        names: dict[str, str] = {}
        for region in sorted({r.region for r in live}):
            for inst in self.list_instances(region, instance_ids=unknown):
                tags = {t.get("Key"): t.get("Value") for t in inst.get("Tags") or []}
                if tags.get(TAG_SERVICE) == self.service and tags.get(TAG_REPLICA):
                    names[inst["InstanceId"]] = tags[TAG_REPLICA]
        self._problems.clear("lookup", None)
        if len(self._foreign) > 10_000:
            self._foreign.clear()
        # listed by tag: an instance not listed carries no tag of this service, now or later
        self._foreign.update(i for i in unknown if i not in names)
        return names

    def shift_times(self, jump: float, moved: Callable[[float], bool]) -> int:
        """Move the leftover-instance grace's times with a wall clock jump (`LeftoverWatch`)."""
        return self._leftovers.shift_times(jump, moved)

    def ack(self) -> None:
        """Delete the messages returned by the previous poll (they are recorded in state now)."""
        from botocore.exceptions import BotoCoreError, ClientError

        with self._lock:
            pending, self._to_ack = self._to_ack, []
        by_region: dict[str, list[str]] = {}
        for region, handle in pending:
            by_region.setdefault(region, []).append(handle)
        for region, handles in by_region.items():
            url = self.queue_url(region)
            if url is None:
                continue
            sqs = self._client("sqs", region)
            for start in range(0, len(handles), 10):
                entries = [
                    {"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(handles[start : start + 10])
                ]
                try:
                    sqs.delete_message_batch(QueueUrl=url, Entries=entries)
                except (ClientError, BotoCoreError) as exc:
                    # Not fatal: the messages come back after the visibility timeout, and
                    # recording the same fact twice changes nothing.
                    log.warning("aws %s: sqs delete_message_batch: %s", region, exc)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=0.2)
        self._threads = []

    # -- reconcile ------------------------------------------------------------------------------

    def terminate_instances(self, region: str, instance_ids: Sequence[str]) -> None:
        """Terminate `instance_ids` in `region`: CloudError naming the region if EC2 refuses."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client("ec2", region).terminate_instances(InstanceIds=list(instance_ids))
        except (ClientError, BotoCoreError) as exc:
            raise CloudError(f"aws {region}: terminate_instances: {exc}") from exc

    def list_instances(
        self, region: str, *, instance_ids: Sequence[str] = (), tagged_only: bool = True
    ) -> list[dict[str, Any]]:
        """Every instance tagged for this service in `region` (of `instance_ids` if given), any
        state; `tagged_only=False` (with `instance_ids`): those instances whatever their tags."""
        from botocore.exceptions import BotoCoreError, ClientError

        ec2 = self._client("ec2", region)
        out: list[dict[str, Any]] = []
        tagged = {"Name": f"tag:{TAG_SERVICE}", "Values": [self.service]}
        ids = list(instance_ids)
        # EC2 takes at most FILTER_VALUES_MAX values per filter: a burst of events about other
        # instances of the account must not turn every lookup into an error
        requests = (
            [
                [
                    *([tagged] if tagged_only else []),
                    {"Name": "instance-id", "Values": ids[i : i + FILTER_VALUES_MAX]},
                ]
                for i in range(0, len(ids), FILTER_VALUES_MAX)
            ]
            if ids
            else [[tagged]]
        )
        try:
            for filters in requests:
                for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
                    for reservation in page.get("Reservations", []):
                        out.extend(reservation.get("Instances", []))
        except (ClientError, BotoCoreError) as exc:
            raise CloudError(f"aws {region}: describe_instances: {exc}") from exc
        return out

    def reconcile(self, now: float, live: Sequence[ReplicaRecord]) -> list[PreemptionEvent]:
        """GONE events for live replicas whose instance is terminated, stopped or missing.

        Only replicas Terraform has already created (a cloud ID is recorded) are judged: one
        still being launched may legitimately not be listed yet.
        """
        events: list[PreemptionEvent] = []
        for region in sorted({r.region for r in live}):
            instances = self.list_instances(region)
            by_id = {i.get("InstanceId"): i for i in instances}
            # A recorded instance the tag listing misses had its tags edited by hand (the service
            # tag removed or changed): it is looked up by its ID before it is judged gone. Judged
            # "no longer listed", a healthy machine was replaced (and destroyed by Terraform) at
            # every pass that saw it so.
            mine = [r for r in live if r.region == region]
            untagged = sorted({str(r.cloud_id) for r in mine if r.cloud_id and r.cloud_id not in by_id})
            if untagged:
                by_id.update(
                    (i.get("InstanceId"), i)
                    for i in self.list_instances(region, instance_ids=untagged, tagged_only=False)
                )
            by_replica: dict[str, dict[str, Any]] = {}
            for inst in instances:
                tags = {t.get("Key"): t.get("Value") for t in inst.get("Tags") or []}
                rid = tags.get(TAG_REPLICA)
                if rid and (rid not in by_replica or _state(inst) not in GONE_STATES):
                    by_replica[rid] = inst
            self._check_leftovers(region, now, instances, [r for r in live if r.region == region])
            for rec in live:
                if rec.region != region or rec.provisioned_at is None:
                    continue
                # a recorded ID decides alone: a leftover instance with the same replica tag must
                # not make a terminated replica look alive
                inst = by_id.get(rec.cloud_id) if rec.cloud_id else by_replica.get(rec.id)
                if inst is None and not rec.cloud_id:
                    continue  # never seen running (GitOps: CI may not have applied it yet)
                if inst is not None and _state(inst) not in GONE_STATES:
                    continue
                events.append(
                    PreemptionEvent(
                        Signal.GONE,
                        now,
                        "aws-reconcile",
                        replica_id=rec.id,
                        cloud_id=rec.cloud_id if inst is None else inst.get("InstanceId"),
                        reason="" if inst is None else instance_gone_reason(inst),
                        detail="instance no longer listed" if inst is None else f"instance {_state(inst)}",
                    )
                )
        return events

    def _check_leftovers(
        self, region: str, now: float, instances: Sequence[dict[str, Any]], live: Sequence[ReplicaRecord]
    ) -> None:
        """Warn about running instances tagged for this service that no live replica owns."""
        owned = {r.cloud_id for r in live if r.cloud_id}
        unrecorded = {r.id for r in live if not r.cloud_id}  # created, but its ID not recorded yet
        tags_of = {
            str(inst.get("InstanceId")): {t.get("Key"): t.get("Value") for t in inst.get("Tags") or []}
            for inst in instances
            if inst.get("InstanceId") and _state(inst) not in GONE_STATES
        }
        unowned = [
            iid
            for iid, tags in tags_of.items()
            if iid not in owned and tags.get(TAG_REPLICA) not in unrecorded
        ]
        for iid in self._leftovers.due(region, unowned, now):
            log.warning(
                "aws %s: instance %s (%s=%s) is running but belongs to no live replica of %s: a leftover "
                "of an interrupted apply or a failed destroy? It bills until terminated: "
                "aws ec2 terminate-instances --region %s --instance-ids %s",
                region,
                iid,
                TAG_REPLICA,
                tags_of[iid].get(TAG_REPLICA),
                self.service,
                region,
                iid,
            )


class Running(NamedTuple):
    """An instance tagged for a service that still runs: its ID, its `skyhedge:replica` tag and
    its `skyhedge:deployment` tag (None where absent)."""

    instance_id: str
    replica: str | None
    deployment: str | None


def event_source(spec: ServiceSpec, state_dir: Path, watched: Mapping[str, Mapping[str, str]]) -> EventSource:
    """The watcher's event source for this cloud (`controller.runner.event_sources` calls it for
    each cloud the spec uses or a live replica is on; `watched`: cloud -> {zone: region}):
    the queue of `aws.events_queue` for the regions of the watched AWS zones."""
    regions = sorted(set(watched["aws"].values()))
    return AwsEventSource(spec.name, regions, queue_name=spec.aws.events_queue)


def running_instances(service: str, region: str, *, session: Any = None) -> list[Running]:
    """Every instance tagged for `service` in `region` that is not gone (shutting down,
    terminated, stopping, stopped): what still runs, and bills."""
    source = AwsEventSource(service, [region], session=session)
    try:
        instances = source.list_instances(region)
    finally:
        source.close()
    out: list[Running] = []
    for inst in instances:
        if not inst.get("InstanceId") or _state(inst) in GONE_STATES:
            continue
        tags = {t.get("Key"): t.get("Value") for t in inst.get("Tags") or []}
        out.append(Running(str(inst["InstanceId"]), tags.get(TAG_REPLICA), tags.get(TAG_DEPLOYMENT)))
    return sorted(out, key=lambda r: r.instance_id)


def terminate_instances(region: str, instance_ids: Sequence[str], *, session: Any = None) -> None:
    """Terminate `instance_ids` in `region` (CloudError naming the region when EC2 refuses)."""
    source = AwsEventSource("", [region], session=session)
    try:
        source.terminate_instances(region, instance_ids)
    finally:
        source.close()


def _parse_safely(message: dict[str, Any], now: float) -> PreemptionEvent | None:
    """`parse_message`, with any failure on one message logged as unparseable (and the message
    then deleted like any other): one odd message must not hold back the batch it came in."""
    body = message.get("Body", "")
    try:
        return parse_message(body if isinstance(body, str) else "", received_at=now)
    except Exception as exc:  # a shape parse_message does not expect yet: log, drop, go on
        unparseable("aws-sqs", body, f"{type(exc).__name__}: {exc}")
        return None


def _state(instance: dict[str, Any]) -> str:
    return str((instance.get("State") or {}).get("Name", ""))
