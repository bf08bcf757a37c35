"""GCP event source: zone operations `compute.instances.preempted` and instance status, polled.

GCP has no push channel comparable to EventBridge for preemptions that needs no extra setup, but
every preemption leaves a zone operation of type `compute.instances.preempted` naming the
instance. This source lists those operations in the zones where the service has replicas, and the
service's instances by label (a spot VM with `instance_termination_action = "DELETE"` simply
disappears; one with STOP goes TERMINATED). Both go through google-auth's `AuthorizedSession` and
the Compute REST API; `SKYHEDGE_GCP_COMPUTE_ENDPOINT` points it elsewhere (tests use a local
server).

`parse_operation` and `parse_instance` are the pure parsers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from skyhedge.clouds.gcp import PROJECT_ENV, api_error_message, json_object, request, resolve_project
from skyhedge.errors import CloudError
from skyhedge.events import EventSource, LeftoverWatch, PreemptionEvent, Signal, unparseable
from skyhedge.policy.types import Location
from skyhedge.state import ReplicaRecord

if TYPE_CHECKING:
    from skyhedge.spec import ServiceSpec

log = logging.getLogger("skyhedge.clouds.gcp.events")

DEFAULT_ENDPOINT = "https://compute.googleapis.com/compute/v1"
ENDPOINT_ENV = "SKYHEDGE_GCP_COMPUTE_ENDPOINT"
PREEMPTED_OP = "compute.instances.preempted"
#: Instance statuses of a machine that no longer serves (Compute's Instance.status: PENDING_STOP is
#: a graceful shutdown under way, DEPROVISIONING the tear-down after a stop or delete; REPAIRING
#: and PENDING, a flex-start VM waiting for capacity, come back or go on to RUNNING).
GONE_STATUSES = frozenset(
    {"PENDING_STOP", "STOPPING", "STOPPED", "TERMINATED", "SUSPENDING", "SUSPENDED", "DEPROVISIONING"}
)
# Labels the gcp-replicas Terraform module puts on every instance (labels cannot hold ':').
LABEL_SERVICE = "skyhedge-service"
LABEL_REPLICA = "skyhedge-replica"
SCOPES = ("https://www.googleapis.com/auth/compute.readonly",)
#: A Compute listing longer than this many pages (500 items each by default) is an error.
MAX_PAGES = 50
#: Operations dated this long before the oldest live replica's launch in a zone cannot be about it
#: (the controller ignores them too: controller/facts.py EVENT_SKEW_SECONDS).
OPERATION_SKEW_SECONDS = 60.0

__all__ = [
    "GcpEventSource",
    "Unreachable",
    "event_source",
    "compute_endpoint",
    "parse_instance",
    "parse_operation",
]


class Unreachable(CloudError):
    """Compute could not be reached at all (a connection refused or timed out, a token that cannot
    be refreshed): whatever the zone, the next call would fail the same way, after as long."""


def event_source(
    spec: ServiceSpec, state_dir: Path, watched: Mapping[str, Mapping[str, str]]
) -> EventSource | None:
    """The watcher's event source for this cloud (`controller.runner.event_sources` calls it for
    each cloud the spec uses or a live replica is on; `watched`: cloud -> {zone: region}):
    the project's zone operations. No project known is an error when the spec places replicas
    on GCP, and only a warning when the spec moved away and replicas remain there."""
    project = resolve_project(spec.gcp.project)
    if project:
        return GcpEventSource(spec.name, project, dict(watched["gcp"]))
    if "gcp" in spec.placement.clouds:
        raise CloudError(
            f"gcp: no project to watch: set gcp.project in {spec.source} or ${PROJECT_ENV[0]} (as for apply)"
        )
    log.warning("gcp: replicas remain there but no project is known: their preemptions go unseen")
    return None


def compute_endpoint() -> str:
    return os.environ.get(ENDPOINT_ENV, DEFAULT_ENDPOINT).rstrip("/")


def _epoch(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _last(link: Any) -> str | None:
    return link.rstrip("/").rsplit("/", 1)[-1] if isinstance(link, str) and link else None


def parse_operation(op: Any, *, region_of: dict[str, str], received_at: float) -> PreemptionEvent | None:
    """A zone operation -> GONE (preempted) for the instance it names, or None (logged if malformed)."""
    if not isinstance(op, dict):
        unparseable("gcp-operations", op, "not an object")
        return None
    if op.get("operationType") != PREEMPTED_OP:
        return None
    name = _last(op.get("targetLink"))
    if not name:
        unparseable("gcp-operations", op, "no targetLink")
        return None
    zone = _last(op.get("zone"))
    location = Location("gcp", region_of[zone], zone) if zone in region_of else None
    at = _epoch(op.get("insertTime"))
    if at is None:
        # Undated, it could be days old (Compute keeps operations up to 14 days) and would pass for
        # a preemption of the replica holding that name now; a real one also shows in the listing.
        unparseable("gcp-operations", op, "no readable insertTime")
        return None
    return PreemptionEvent(
        Signal.GONE,
        at,
        "gcp-operations",
        cloud_id=name,
        location=location,
        reason="preempted",
        detail=f"operation {op.get('name', '?')}",
    )


def parse_instance(inst: Any) -> tuple[str, str, str | None] | None:
    """(instance name, status, replica label) of one listed instance, or None if malformed."""
    if not isinstance(inst, dict) or not isinstance(inst.get("name"), str):
        unparseable("gcp-instances", inst, "no name")
        return None
    labels = inst.get("labels") if isinstance(inst.get("labels"), dict) else {}
    return inst["name"], str(inst.get("status", "")), labels.get(LABEL_REPLICA)


def default_session(scopes: Sequence[str] = SCOPES) -> Any:
    """An `AuthorizedSession` with Application Default Credentials (`scopes`: read-only unless
    the caller changes instances, as leftovers.py deletes some).

    When the endpoint is overridden (a local test server) and no credentials exist, anonymous
    credentials are used so tests need no Google account.
    """
    import google.auth
    from google.auth.credentials import AnonymousCredentials
    from google.auth.exceptions import DefaultCredentialsError
    from google.auth.transport.requests import AuthorizedSession

    try:
        credentials, _project = google.auth.default(scopes=list(scopes))
    except DefaultCredentialsError as exc:
        if ENDPOINT_ENV not in os.environ:
            raise CloudError(
                f"gcp: no credentials ({exc}); run `gcloud auth application-default login`"
            ) from exc
        credentials = AnonymousCredentials()
    return AuthorizedSession(credentials)


class GcpEventSource(EventSource):
    """Polls preemption operations and instance status in the zones holding live GCP replicas."""

    name = "gcp"

    def __init__(
        self,
        service: str,
        project: str,
        region_of: dict[str, str],
        *,
        session: Any = None,
        poll_every: float = 10.0,
        timeout: float = 10.0,
    ) -> None:
        self.service = service
        self.project = project
        self.region_of = dict(region_of)
        self._session = session
        self.poll_every = poll_every
        self.timeout = timeout
        self._last_poll: float | None = None
        # per zone, the preempted operations recorded (`ack`) that its last poll still listed
        self._seen_ops: dict[str, set[str]] = {}
        self._unacked: dict[str, set[str]] = {}  # per zone, operations returned by poll, not yet recorded
        self._listed: set[str] = set()  # unrecorded replicas (GitOps) once seen listed
        self._leftovers = LeftoverWatch()
        self._problems: list[str] = []  # zones whose poll failed while others reported events

    @property
    def session(self) -> Any:
        if self._session is None:
            self._session = default_session()
        return self._session

    def _get(self, path: str, params: dict[str, str]) -> list[Any]:
        """GET a Compute list, following `nextPageToken`. A reply that is not a list page (an
        `error` object, `items` not a list) or a listing longer than MAX_PAGES pages is an error,
        never a shorter list: an instance missing from the list reads as a preemption."""
        url = self._url(path)
        items: list[Any] = []
        params = dict(params)
        for _ in range(MAX_PAGES):
            reply = self._request(url, params)
            if reply.status_code != 200:
                raise CloudError(f"gcp: GET {url}: HTTP {reply.status_code}: {api_error_message(reply)}")
            body = json_object(reply, f"gcp: GET {url}")
            if "error" in body:
                raise CloudError(f"gcp: GET {url}: {api_error_message(reply)}")
            page = body.get("items", [])
            if not isinstance(page, list):
                raise CloudError(f"gcp: GET {url}: items: expected a list, got {type(page).__name__}")
            items.extend(page)
            token = body.get("nextPageToken")
            if not token:
                return items
            params["pageToken"] = token
        raise CloudError(f"gcp: GET {url}: more than {MAX_PAGES} pages; the listing was not read to its end")

    def _url(self, path: str) -> str:
        return f"{compute_endpoint()}/projects/{quote(self.project, safe=':')}/{path}"  # from env too

    def _request(self, url: str, params: dict[str, str]) -> Any:
        """One GET (tried again as `request` does): Compute's reply, whatever its status. A failure
        to reach Compute at all is `Unreachable`."""
        import requests
        from google.auth.exceptions import GoogleAuthError

        try:
            return request(self.session, "GET", url, params=params, timeout=self.timeout)
        except requests.ConnectionError as exc:  # refused, no route, connect timed out, DNS
            raise Unreachable(f"gcp: GET {url}: {exc}") from exc
        except GoogleAuthError as exc:  # a token refresh failing: no zone can be asked either
            raise Unreachable(f"gcp: GET {url}: {exc}") from exc
        except requests.RequestException as exc:
            raise CloudError(f"gcp: GET {url}: {exc}") from exc

    def instance_status(self, zone: str, name: str, instance_id: str | None) -> str | None:
        """The status of instance `name` in `zone` whatever its labels, or None when Compute holds
        none of that name (or only another machine of that name than `instance_id`, when given).

        Why: the zone's listing is filtered by the service's label, so a replica's VM whose labels
        were edited by hand (the `skyhedge-service` label removed or changed) is not in it. Judged
        "no longer listed", a healthy VM was recorded gone, replaced, and deleted by Terraform."""
        url = self._url(f"zones/{quote(zone, safe='')}/instances/{quote(name, safe='')}")
        reply = self._request(url, {})
        if reply.status_code == 404:
            return None
        if reply.status_code != 200:
            raise CloudError(f"gcp: GET {url}: HTTP {reply.status_code}: {api_error_message(reply)}")
        body = json_object(reply, f"gcp: GET {url}")
        if instance_id and instance_id.isdigit() and str(body.get("id", instance_id)) != instance_id:
            return None  # that name was given to another machine since: the recorded one is gone
        return str(body.get("status", ""))

    def instance_name(self, replica_id: str) -> str:
        """The name the gcp-replicas module gives a replica's instance (modules/gcp-replicas)."""
        return f"skyhedge-{self.service}-{replica_id}"

    def poll(self, now: float, live: Sequence[ReplicaRecord]) -> list[PreemptionEvent]:
        mine = [r for r in live if r.cloud == "gcp"]
        last = self._last_poll
        if not mine or (last is not None and last <= now < last + self.poll_every):
            return []  # (`now < last`: the wall clock stepped back; poll now rather than in hours)
        self._last_poll = now
        # Operations count as seen only once the controller recorded them (`ack`): a poll failing
        # in a later zone must not lose the ones already read.
        read: dict[str, set[str]] = {}  # per zone
        # A replica whose instance name is not recorded (GitOps mode: CI applied it) is known by
        # the module's naming and its label.
        by_name = {self.instance_name(r.id): r.id for r in mine if not r.cloud_id}
        # The instance ID each recorded replica's VM has now: an operation naming the same instance
        # name with another `targetId` is about an earlier VM of that name (one `apply` recreated).
        id_of = {
            str(r.outputs.get("name")): r.cloud_id
            for r in mine
            if r.cloud_id and r.cloud_id.isdigit() and r.outputs.get("name")
        }
        events: list[PreemptionEvent] = []
        failures: list[CloudError] = []
        # The credentials are the project's, not a zone's: looked up once, before any zone. Looked
        # up per zone, a host without any waited for Google's metadata server in each (12 s a zone
        # measured where that address does not answer: 36 s for a `plan` with 3 zones).
        _ = self.session
        for zone in sorted({r.zone for r in mine}):
            self.region_of.setdefault(zone, next(r.region for r in mine if r.zone == zone))
            try:
                self._poll_zone(zone, now, mine, by_name, id_of, read, events)
            except Unreachable as exc:  # Compute itself, not this zone: the next zones would wait too
                failures.append(exc)
                break
            except CloudError as exc:  # one zone's failure must not blind the others
                failures.append(exc)
        self._listed &= {r.id for r in mine}
        for zone, keys in read.items():
            self._unacked.setdefault(zone, set()).update(keys)
        if failures and not events:
            raise failures[0]
        self._problems.extend(str(f) for f in failures)  # said by `problems()`, with the events kept
        return events

    def problems(self) -> list[str]:
        out, self._problems = self._problems, []
        return out

    def _poll_zone(
        self,
        zone: str,
        now: float,
        mine: Sequence[ReplicaRecord],
        by_name: dict[str, str],
        id_of: dict[str, str],
        read: dict[str, set[str]],
        events: list[PreemptionEvent],
    ) -> None:
        """One zone's preempted operations and instance listing, appended to `events`."""
        # Only as far back as the oldest live replica here: Compute keeps a finished operation up
        # to 14 days, and a project's other spot VMs leave theirs in the same zones. Filtered, not
        # ordered: Compute refuses a list filter together with `orderBy` (HTTP 400, "Specifying
        # both a list filter and sort order is not currently supported"), so every preemption it
        # keeps is read and the old ones dropped here.
        cutoff = min(r.launched_at for r in mine if r.zone == zone) - OPERATION_SKEW_SECONDS

        def too_old(op: Any) -> bool:
            at = _epoch(op.get("insertTime")) if isinstance(op, dict) else None
            return at is not None and at < cutoff

        query = {"filter": f'operationType="{PREEMPTED_OP}"'}
        ops = [op for op in self._get(f"zones/{zone}/operations", query) if not too_old(op)]
        keys = [str(op.get("id") or op.get("name") or op) if isinstance(op, dict) else repr(op) for op in ops]
        # Only what this listing still holds is remembered: an operation Compute dropped (after 14
        # days), or older than the zone's oldest live replica (a bound that only moves on), is not
        # listed again, and if it were, an event about a machine gone or older than its replica is
        # ignored (`facts.ingest`). Remembered for good, every preemption in the zone, the
        # project's other spot VMs' included, stayed in memory for the watcher's life.
        seen = self._seen_ops.get(zone)
        if seen:
            seen &= set(keys)
        taken = read.setdefault(zone, set())
        for op, key in zip(ops, keys, strict=True):
            if (seen and key in seen) or key in taken:
                continue
            taken.add(key)
            event = parse_operation(op, region_of=self.region_of, received_at=now)
            if event is not None:
                target_id = str(op.get("targetId") or "")
                recorded = id_of.get(str(event.cloud_id))
                if target_id and recorded and target_id != recorded:
                    log.debug(
                        "gcp %s: %s is about an earlier VM named %s", zone, event.detail, event.cloud_id
                    )
                    continue
                rid = by_name.get(str(event.cloud_id))
                events.append(replace(event, replica_id=rid) if rid else event)
        listed = self._get(f"zones/{zone}/instances", {"filter": f"labels.{LABEL_SERVICE}={self.service}"})
        status: dict[str, str] = {}
        by_label: dict[str, str] = {}
        label_of: dict[str, str | None] = {}
        for i, inst in enumerate(listed):
            parsed = parse_instance(inst)
            if parsed is None:  # which instance it is is unknown: "not listed" proves nothing
                raise CloudError(f"gcp: zones/{zone}/instances: items[{i}]: no instance name")
            name, st, rid = parsed
            status[name] = st
            label_of[name] = rid
            if rid:
                by_label[rid] = name
        self._check_leftovers(zone, now, status, label_of, [r for r in mine if r.zone == zone])
        for rec in mine:
            if rec.zone != zone:
                continue
            if rec.cloud_id:
                # The module records the instance ID as cloud ID (a self link before) and the name in
                # its outputs.
                name = str(rec.outputs.get("name") or _last(rec.cloud_id) or rec.cloud_id)
                if name not in status:
                    name = by_label.get(rec.id, name)
                if name not in status and (found := self.instance_status(zone, name, rec.cloud_id)):
                    status[name] = found  # its labels edited by hand: looked up by its name
            else:
                name = by_label.get(rec.id, self.instance_name(rec.id))
                if name in status:
                    self._listed.add(rec.id)
                elif rec.id not in self._listed:
                    continue  # never seen listed: CI may not have applied it yet
            st = status.get(name)
            if st is not None and st not in GONE_STATUSES:
                continue
            detail = "instance no longer listed" if st is None else f"instance {st}"
            events.append(
                PreemptionEvent(
                    Signal.GONE,
                    now,
                    "gcp-instances",
                    replica_id=rec.id,
                    cloud_id=name,
                    reason="",
                    detail=detail,
                )
            )

    def shift_times(self, jump: float, moved: Callable[[float], bool]) -> int:
        """Move the leftover-instance grace's times with a wall clock jump (`LeftoverWatch`)."""
        return self._leftovers.shift_times(jump, moved)

    def ack(self) -> None:
        for zone, keys in self._unacked.items():
            self._seen_ops.setdefault(zone, set()).update(keys)
        self._unacked = {}

    def _check_leftovers(
        self,
        zone: str,
        now: float,
        status: dict[str, str],
        label_of: dict[str, str | None],
        live: Sequence[ReplicaRecord],
    ) -> None:
        """Warn about running instances labelled for this service that no live replica owns (see
        `LeftoverWatch`); skyhedge does not delete what it never recorded."""
        owned = {str(r.outputs.get("name") or _last(r.cloud_id) or r.cloud_id) for r in live if r.cloud_id}
        unrecorded = {r.id for r in live if not r.cloud_id}
        unowned = [
            name
            for name, st in status.items()
            if st not in GONE_STATUSES and name not in owned and label_of.get(name) not in unrecorded
        ]
        for name in self._leftovers.due(zone, unowned, now):
            log.warning(
                "gcp %s: instance %s (%s=%s) is running but belongs to no live replica of %s: a leftover "
                "of an interrupted apply or a failed destroy? It bills until deleted: "
                "gcloud compute instances delete %s --zone %s --project %s",
                zone,
                name,
                LABEL_REPLICA,
                label_of.get(name),
                self.service,
                name,
                zone,
                self.project,
            )
