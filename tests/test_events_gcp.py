"""GCP events: a local HTTP server answers Compute's REST shapes (zone operations, instances).

A `compute.instances.preempted` operation for one replica's instance -> the controller marks it
preempted and replaces it in another zone; an instance that disappears from the list is gone too.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone

import pytest
from controller_fakes import Clock, FakeExecutor, FakeProber, FakeRouter
from fake_http import json_server
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession

from skyhedge.clouds import gcp
from skyhedge.clouds.gcp import RETRY_ATTEMPTS
from skyhedge.clouds.gcp.events import ENDPOINT_ENV, PREEMPTED_OP, GcpEventSource, parse_operation
from skyhedge.controller.loop import Controller, ControllerOptions
from skyhedge.errors import CloudError
from skyhedge.events import LeftoverWatch, Signal
from skyhedge.spec import load_spec

PROJECT = "proj-1"
SPEC = f"""
name: llm
resources:
  instance_type: {{gcp: g2-standard-4}}
placement:
  clouds: [gcp]
  regions: [us-central1]
replica_policy:
  min_replicas: 2
  num_overprovision: 1
  dynamic_ondemand_fallback: false
  policy: spothedge
readiness_probe: {{initial_delay_seconds: 600}}
run: {{command: serve}}
gcp: {{project: {PROJECT}}}
"""


class FakeCompute:
    """Zone -> instances {name: status/labels} and operations; records the requests it served."""

    def __init__(self) -> None:
        self.instances: dict[str, dict[str, dict]] = {}
        self.operations: dict[str, list[dict]] = {}
        self.requests: list[tuple[str, dict]] = []
        # fail this many of the next requests (those whose path contains `fail_path`, if set) with
        # `fail_reply`: skyhedge tries a call RETRY_ATTEMPTS times before it gives up
        self.failures = 0
        self.fail_path: str | None = None
        self.fail_reply: tuple[int, dict] = (
            503,
            {"error": {"code": 503, "message": "backend error", "errors": [{"reason": "backendError"}]}},
        )

    def handle(self, path: str, query: dict) -> tuple[int, dict]:
        self.requests.append((path, query))
        if self.failures and (self.fail_path is None or self.fail_path in path):
            self.failures -= 1
            if not self.failures:
                self.fail_path = None
            return self.fail_reply
        parts = path.strip("/").split("/")
        # compute/v1/projects/{p}/zones/{z}/{kind}
        if len(parts) != 7 or parts[:3] != ["compute", "v1", "projects"] or parts[3] != PROJECT:
            return 404, {"error": {"message": f"no route {path}"}}
        zone, kind = parts[5], parts[6]
        refused = _list_query_refused(query)
        if refused:
            return 400, {"error": {"code": 400, "message": refused, "errors": [{"reason": "invalid"}]}}
        flt = query.get("filter", [""])[0]
        if kind == "operations":
            items = [
                op for op in self.operations.get(zone, []) if f'operationType="{op["operationType"]}"' == flt
            ]
        elif kind == "instances":
            items = [
                {
                    "kind": "compute#instance",
                    "id": str(abs(hash((zone, name))) % 10**18),
                    "name": name,
                    "status": inst["status"],
                    "labels": inst["labels"],
                    "zone": f"https://www.googleapis.com/compute/v1/projects/{PROJECT}/zones/{zone}",
                }
                for name, inst in self.instances.get(zone, {}).items()
                if flt == f"labels.skyhedge-service={inst['labels'].get('skyhedge-service')}"
            ]
        else:
            return 404, {"error": {"message": "unknown collection"}}
        # Compute pages every listing (maxResults, 500 by default): one item a page here, so that a
        # reader stopping at the first page is caught
        page = int(query.get("pageToken", ["0"])[0])
        body: dict = {"kind": f"compute#{kind[:-1]}List", "items": items[page : page + 1]}
        if page + 1 < len(items):
            body["nextPageToken"] = str(page + 1)
        return 200, body


#: Compute's AIP-160 filter as skyhedge writes it: `field=value` or `field="value"`.
_FILTER = re.compile(r'^[A-Za-z][A-Za-z0-9_.-]*=(?:[A-Za-z0-9_.-]+|"[^"\\]*")$')


def _list_query_refused(query: dict) -> str | None:
    """Why Compute answers a list request HTTP 400, or None: an unparsable filter, an order other
    than the two it sorts by, or a filter and an order together, which it refuses ("Specifying both
    a list filter and sort order is not currently supported")."""
    flt, order = query.get("filter", [None])[0], query.get("orderBy", [None])[0]
    if flt is not None and not _FILTER.fullmatch(flt):
        return f"Invalid value for field 'filter': '{flt}'. Invalid list filter expression."
    if order is not None and order not in ("name", "creationTimestamp desc"):
        return f"Invalid value for field 'orderBy': '{order}'. Only name or creationTimestamp desc."
    if flt is not None and order is not None:
        return (
            f"Invalid value for field 'orderBy': '{order}'. Specifying both a list filter and sort order "
            "is not currently supported."
        )
    return None


@pytest.fixture
def compute(monkeypatch):
    fake = FakeCompute()
    monkeypatch.setattr(gcp, "RETRY_BASE_SECONDS", 0.01)  # the backoff between attempts, kept short
    # looked up per request: tests swap `fake.handle`; Google pretty-prints its replies
    with json_server(lambda path, query: fake.handle(path, query), indent=2) as base:
        monkeypatch.setenv(ENDPOINT_ENV, f"{base}/compute/v1")
        yield fake


@pytest.fixture
def session():
    s = AuthorizedSession(AnonymousCredentials())
    yield s
    s.close()


def test_parse_operation_shapes():
    op = {
        "id": "1",
        "name": "systemevent-1",
        "operationType": PREEMPTED_OP,
        "status": "DONE",
        "targetLink": f"https://www.googleapis.com/compute/v1/projects/{PROJECT}/zones/us-central1-a/instances/x-1",
        "zone": f"https://www.googleapis.com/compute/v1/projects/{PROJECT}/zones/us-central1-a",
        "insertTime": "2024-05-01T05:00:00.000-07:00",
    }
    ev = parse_operation(op, region_of={"us-central1-a": "us-central1"}, received_at=0)
    assert ev.signal is Signal.GONE and ev.reason == "preempted" and ev.cloud_id == "x-1"
    assert ev.location.zone == "us-central1-a" and ev.at == pytest.approx(1714564800.0)
    assert (
        parse_operation({**op, "operationType": "compute.instances.insert"}, region_of={}, received_at=0)
        is None
    )
    assert parse_operation({"operationType": PREEMPTED_OP}, region_of={}, received_at=0) is None
    assert parse_operation("junk", region_of={}, received_at=0) is None


class CloudSync:
    """After each apply, mirror the state's live replicas into the fake Compute API as RUNNING."""

    def __init__(self, executor: FakeExecutor, compute: FakeCompute) -> None:
        self.executor, self.compute = executor, compute

    def apply(self, state, plan, now):
        result = self.executor.apply(state, plan, now)
        for rec in state.live():
            rec.cloud_id = f"https://www.googleapis.com/compute/v1/projects/{PROJECT}/zones/{rec.zone}/instances/llm-{rec.id}"
            rec.outputs = {"name": f"llm-{rec.id}"}
            zone = self.compute.instances.setdefault(rec.zone, {})
            zone.setdefault(
                f"llm-{rec.id}",
                {"status": "RUNNING", "labels": {"skyhedge-service": "llm", "skyhedge-replica": rec.id}},
            )
        return result


class GitOpsSync(CloudSync):
    """CI applies: the instances exist (module naming, labels), but nothing is recorded."""

    listed = True

    def apply(self, state, plan, now):
        result = self.executor.apply(state, plan, now)
        for rec in state.live():
            rec.cloud_id = None
            if not self.listed:
                continue
            self.compute.instances.setdefault(rec.zone, {}).setdefault(
                f"skyhedge-llm-{rec.id}",
                {"status": "RUNNING", "labels": {"skyhedge-service": "llm", "skyhedge-replica": rec.id}},
            )
        return result


class NotAppliedYet(GitOpsSync):
    """CI has not applied the commit yet: nothing listed, nothing recorded."""

    listed = False


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat().replace("+00:00", "Z")


def _preempted(op_id: str, zone: str, instance: str, at: float) -> dict:
    return {
        "id": op_id,
        "name": f"systemevent-{op_id}",
        "operationType": PREEMPTED_OP,
        "status": "DONE",
        "targetLink": f"https://www.googleapis.com/compute/v1/projects/{PROJECT}/zones/{zone}/instances/{instance}",
        "zone": f"projects/{PROJECT}/zones/{zone}",
        "insertTime": _rfc3339(at),
    }


def _controller(compute, session, tmp_path, write_spec, sync=CloudSync):
    spec = load_spec(write_spec(SPEC))
    clock = Clock(time.time())
    source = GcpEventSource("llm", PROJECT, {}, session=session, poll_every=5)
    ctl = Controller(
        spec,
        tmp_path / "state",
        executor=sync(FakeExecutor(), compute),
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
    return ctl, clock


def test_preempted_operation_replaces_replica_in_another_zone(compute, session, tmp_path, write_spec):
    ctl, clock = _controller(compute, session, tmp_path, write_spec)
    victim = ctl.state.live()[0]
    compute.instances[victim.zone].pop(f"llm-{victim.id}")  # DELETE termination action: it disappears
    compute.operations[victim.zone] = [
        {
            "id": "77",
            "name": "systemevent-77",
            "operationType": PREEMPTED_OP,
            "status": "DONE",
            "targetLink": victim.cloud_id,
            "zone": f"projects/{PROJECT}/zones/{victim.zone}",
            "insertTime": _rfc3339(clock() + 5),
        }
    ]
    clock.advance(10)
    ctl.tick()
    assert victim.gone_at is not None and victim.reason == "preempted"
    assert ctl.state.policy_memory["memory"]["preempted"] == [victim.location.key]
    live = ctl.state.live()
    assert len(live) == 3 and victim.zone not in {r.zone for r in live}
    paths = {p for p, _ in compute.requests}
    assert f"/compute/v1/projects/{PROJECT}/zones/{victim.zone}/operations" in paths


# Compute's Instance.status values of a machine on its way out: DEPROVISIONING (the tear-down after
# a stop or delete, listed between STOPPING and its end) and PENDING_STOP (a graceful shutdown)
@pytest.mark.parametrize("status", ["TERMINATED", "STOPPING", "DEPROVISIONING", "PENDING_STOP"])
def test_terminated_instance_is_gone(compute, session, tmp_path, write_spec, status):
    ctl, clock = _controller(compute, session, tmp_path, write_spec)
    victim = ctl.state.live()[1]
    compute.instances[victim.zone][f"llm-{victim.id}"]["status"] = status
    clock.advance(10)
    ctl.tick()
    assert victim.reason == "preempted"  # a spot VM stopped without us: the cloud took it
    assert len(ctl.state.live()) == 3


def test_polls_are_rate_limited_and_paginated(compute, session, tmp_path, write_spec):
    ctl, clock = _controller(compute, session, tmp_path, write_spec)
    src = ctl.sources[0]
    live = ctl.state.live()
    zone = live[0].zone
    ops = [
        {
            "id": str(i),
            "name": f"op{i}",
            "operationType": PREEMPTED_OP,
            "targetLink": f"x/instances/other-{i}",
            "zone": f"zones/{zone}",
            "insertTime": _rfc3339(clock()),
        }
        for i in range(2)
    ]
    compute.operations[zone] = ops
    clock.advance(10)
    events = src.poll(clock(), live)
    assert sorted(e.cloud_id for e in events if e.source == "gcp-operations") == ["other-0", "other-1"]
    n = len(compute.requests)
    assert src.poll(clock() + 1, live) == [] and len(compute.requests) == n  # within poll_every
    again = [e.cloud_id for e in src.poll(clock() + 6, live) if e.source == "gcp-operations"]
    assert sorted(again) == ["other-0", "other-1"]  # not recorded yet (no ack): reported again
    src.ack()
    assert [e for e in src.poll(clock() + 12, live) if e.source == "gcp-operations"] == []  # seen already


def test_operations_compute_no_longer_lists_are_forgotten(compute, session, tmp_path, write_spec):
    """A soak audit: every preempted operation read in a zone was remembered for the watcher's
    life, one more ID for each preemption there (the project's other spot VMs' too, which the
    filter by operation type cannot tell apart), though Compute drops them after 14 days. Only
    those the zone still lists are remembered: each is reported once all the same."""
    ctl, clock = _controller(compute, session, tmp_path, write_spec)
    src = ctl.sources[0]
    live = ctl.state.live()
    zone = live[0].zone
    for day in range(20):  # 25 preemptions a "day"; Compute lists the last day's only
        compute.operations[zone] = [
            _preempted(f"{day}-{i}", zone, f"other-{day}-{i}", clock()) for i in range(25)
        ]
        clock.advance(10)
        first = [e for e in src.poll(clock(), live) if e.source == "gcp-operations"]
        src.ack()
        clock.advance(10)
        again = [e for e in src.poll(clock(), live) if e.source == "gcp-operations"]
        src.ack()
        assert len(first) == 25 and again == []  # each reported once, while it is listed
    kept = src._seen_ops  # the operation IDs remembered as recorded (per zone)
    remembered = sum(map(len, kept.values())) if isinstance(kept, dict) else len(kept)
    assert remembered == 25  # (500 before: every operation ever read)


def test_api_errors_become_cloud_errors(compute, session, tmp_path, write_spec):
    ctl, clock = _controller(compute, session, tmp_path, write_spec)
    compute.failures = RETRY_ATTEMPTS  # failing every attempt
    with pytest.raises(CloudError, match=r"HTTP 503: backend error$") as failed:
        ctl.sources[0].poll(clock() + 100, ctl.state.live())
    assert "\n" not in str(failed.value)  # Google's pretty-printed error JSON, reduced to its message
    compute.failures = RETRY_ATTEMPTS
    clock.advance(200)  # failures are rate-limited like successes (poll_every)
    ctl.tick()  # the controller notes it and carries on
    assert any("event source gcp" in n.text for n in ctl.notes)


#: Compute's answers to a project over its per-minute read limit (HTTP 429, or 403 with reason
#: rateLimitExceeded: "Quota exceeded for quota metric 'Read requests'") and a passing backend error:
#: Google's API guidance is to try them again with exponential backoff, as botocore does for EC2.
_TRY_AGAIN = {
    "429": (
        429,
        {"error": {"code": 429, "message": "Too many requests", "errors": [{"reason": "rateLimitExceeded"}]}},
    ),
    "403-rate-limit": (
        403,
        {
            "error": {
                "code": 403,
                "message": "Quota exceeded for quota metric 'Read requests' and limit 'Read requests per "
                "minute' of service 'compute.googleapis.com'",
                "errors": [{"reason": "rateLimitExceeded", "domain": "usageLimits"}],
            }
        },
    ),
    "503": (
        503,
        {"error": {"code": 503, "message": "backend error", "errors": [{"reason": "backendError"}]}},
    ),
}


@pytest.mark.parametrize("reply", list(_TRY_AGAIN), ids=list(_TRY_AGAIN))
def test_a_call_google_says_to_try_again_is_tried_again(compute, session, tmp_path, write_spec, reply):
    """One throttled or failed-over request used to fail the whole poll (a warning, and the
    preemption seen a poll later); now it is tried again, and the poll reports what it finds."""
    ctl, clock = _controller(compute, session, tmp_path, write_spec)
    victim = ctl.state.live()[0]
    compute.instances[victim.zone][f"llm-{victim.id}"]["status"] = "TERMINATED"
    compute.fail_reply, compute.failures = _TRY_AGAIN[reply], RETRY_ATTEMPTS - 1
    before = len(compute.requests)
    events = ctl.sources[0].poll(clock() + 100, ctl.state.live())
    assert [e.replica_id for e in events] == [victim.id]
    assert compute.failures == 0 and len(compute.requests) - before > RETRY_ATTEMPTS - 1


class _Reply:
    def __init__(self, status: int, reason: str = "", headers: dict | None = None) -> None:
        self.status_code, self.headers = status, headers or {}
        self._body = {"error": {"code": status, "message": reason, "errors": [{"reason": reason}]}}

    def json(self) -> dict:
        return self._body


class _Scripted:
    """A session answering each request with the next of `replies`, recording the methods asked."""

    def __init__(self, *replies: _Reply) -> None:
        self.replies, self.asked = list(replies), []

    def request(self, method, url, **_kwargs):
        self.asked.append(method)
        return self.replies.pop(0)


def test_retry_after_is_honoured_and_a_delete_is_not_repeated_on_a_server_error():
    """A 5xx may answer a delete Compute started: asking again would race the operation. A 429 is
    a refusal before anything was done, so any method is asked again, after its `Retry-After`."""
    waits: list[float] = []
    session = _Scripted(_Reply(429, "rateLimitExceeded", {"Retry-After": "2"}), _Reply(200))
    assert gcp.request(session, "DELETE", "u", timeout=1, sleep=waits.append).status_code == 200
    assert session.asked == ["DELETE", "DELETE"] and waits == [2.0]
    session = _Scripted(_Reply(503, "backendError"), _Reply(200))
    assert gcp.request(session, "DELETE", "u", timeout=1, sleep=waits.append).status_code == 503
    assert session.asked == ["DELETE"]
    session = _Scripted(*[_Reply(503, "backendError")] * RETRY_ATTEMPTS)
    assert gcp.request(session, "GET", "u", timeout=1, sleep=waits.append).status_code == 503
    assert session.asked == ["GET"] * RETRY_ATTEMPTS  # then the last answer is the caller's


def test_a_permission_denied_is_not_tried_again(compute, session, tmp_path, write_spec):
    """A 403 that is no rate limit (a permission, a real quota) answers the same every time."""
    ctl, clock = _controller(compute, session, tmp_path, write_spec)
    denied = {
        "error": {
            "code": 403,
            "message": "Required 'compute.zoneOperations.list' permission",
            "errors": [{"reason": "forbidden"}],
        }
    }
    compute.fail_reply, compute.failures = (403, denied), 10
    with pytest.raises(CloudError, match="HTTP 403: Required 'compute.zoneOperations.list' permission"):
        ctl.sources[0].poll(clock() + 100, ctl.state.live())
    zones = {r.zone for r in ctl.state.live()}
    assert compute.failures == 10 - len(zones)  # asked once per zone (each zone's poll fails alone)


def test_a_token_refresh_failure_is_a_cloud_error_noted_by_the_controller(
    compute, session, tmp_path, write_spec, monkeypatch
):
    """AuthorizedSession raises google-auth's own errors (not requests') when the token cannot be
    refreshed, e.g. while the metadata server blips."""
    from google.auth.exceptions import RefreshError

    ctl, clock = _controller(compute, session, tmp_path, write_spec)

    def refresh_fails(*_args, **_kwargs):
        raise RefreshError("metadata server unreachable")

    monkeypatch.setattr(session, "request", refresh_fails)
    with pytest.raises(CloudError, match="metadata server unreachable"):
        ctl.sources[0].poll(clock() + 100, ctl.state.live())
    clock.advance(200)
    ctl.tick()  # noted, and the tick goes on (routing, state) instead of dying
    assert any("event source gcp" in n.text and "metadata server" in n.text for n in ctl.notes)


def test_a_response_that_is_not_an_object_is_a_cloud_error(compute, session, tmp_path, write_spec):
    ctl, clock = _controller(compute, session, tmp_path, write_spec)
    real = compute.handle
    compute.handle = lambda path, query: (200, [])
    try:
        with pytest.raises(CloudError, match="expected a JSON object, got list"):
            ctl.sources[0].poll(clock() + 100, ctl.state.live())
    finally:
        compute.handle = real


def _instances_reply(odd):
    """A handler answering instance listings with `odd(items)`, everything else as usual."""

    def handle(real, path, query):
        # (the odd reply's own page token is not the fake's: its first page stands in)
        code, body = real(path, {k: v for k, v in query.items() if k != "pageToken"})
        return (code, odd(body["items"])) if path.endswith("/instances") and code == 200 else (code, body)

    return handle


@pytest.mark.parametrize(
    ("odd", "message"),
    [
        (lambda items: {"error": {"code": 403, "message": "quota check failed"}}, "quota check failed"),
        (lambda items: {"items": {"x": items}}, "items: expected a list, got dict"),
        (lambda items: {"items": [{**i, "name": None} for i in items]}, r"items\[0\]: no instance name"),
        (lambda items: {"items": ["junk", *items]}, r"items\[0\]: no instance name"),
        (lambda items: {"items": items[:1], "nextPageToken": "again"}, "more than 50 pages"),
    ],
    ids=["error-with-200", "items-not-a-list", "name-null", "item-not-an-object", "endless-pages"],
)
def test_a_listing_that_cannot_be_trusted_is_an_error_not_a_preemption(
    compute, session, tmp_path, write_spec, odd, message
):
    """Replicas missing from the instance listing are taken for gone, so a reply that is not a
    plain, complete listing must fail the poll, never report the replicas as preempted."""
    ctl, clock = _controller(compute, session, tmp_path, write_spec)
    live = ctl.state.live()
    real = compute.handle
    compute.handle = lambda path, query: _instances_reply(odd)(real, path, query)
    try:
        with pytest.raises(CloudError, match=message):
            ctl.sources[0].poll(clock() + 100, live)
        clock.advance(200)
        ctl.tick()
    finally:
        compute.handle = real
    assert [r.id for r in ctl.state.live()] == [r.id for r in live]  # nobody taken for gone
    assert any("event source gcp" in n.text for n in ctl.notes)


@pytest.mark.parametrize("when", [None, "garbage", 1714564800], ids=["missing", "garbage", "a-number"])
def test_an_operation_with_no_readable_time_is_not_taken_for_a_preemption_now(when, caplog):
    op = {
        "id": "7",
        "operationType": PREEMPTED_OP,
        "targetLink": f"https://www.googleapis.com/compute/v1/projects/{PROJECT}/zones/us-central1-a/instances/x-1",
        "zone": f"https://www.googleapis.com/compute/v1/projects/{PROJECT}/zones/us-central1-a",
    }
    if when is not None:
        op["insertTime"] = when
    assert parse_operation(op, region_of={"us-central1-a": "us-central1"}, received_at=1e9) is None
    assert "no readable insertTime" in caplog.text


def test_a_clock_stepped_back_does_not_pause_polling(compute, session, tmp_path, write_spec):
    ctl, clock = _controller(compute, session, tmp_path, write_spec)
    src, live = ctl.sources[0], ctl.state.live()
    src.poll(clock() + 10, live)
    n = len(compute.requests)
    src.poll(clock() + 10 - 3600, live)  # NTP stepped the clock back an hour
    assert len(compute.requests) > n


def test_a_source_raising_a_plain_exception_does_not_stop_the_tick(compute, session, tmp_path, write_spec):
    """A bug or an unwrapped library error in one source is noted; the others and the rest of
    the tick (apply, probes, routing, state) go on."""
    ctl, clock = _controller(compute, session, tmp_path, write_spec)

    class Broken:
        name = "broken"

        def poll(self, now, live):
            raise KeyError("surprise")

        def ack(self):
            pass

    ctl.sources.append(Broken())
    victim = ctl.state.live()[1]
    compute.instances[victim.zone][f"llm-{victim.id}"]["status"] = "TERMINATED"
    clock.advance(10)
    ctl.tick()
    assert victim.reason == "preempted"  # the GCP source still counted
    assert any("event source broken: KeyError" in n.text for n in ctl.notes)


def test_a_leftover_instance_is_reported_once_after_a_grace(compute, session, tmp_path, write_spec, caplog):
    """A running instance labelled for the service that no live replica owns (an apply killed
    before Terraform saved its state, or a failed delete) is reported once, after 10 minutes,
    with the command that deletes it; an instance whose replica is still being created is not."""
    import logging

    ctl, clock = _controller(compute, session, tmp_path, write_spec)
    zone = ctl.state.live()[0].zone
    compute.instances[zone]["llm-r-0099"] = {
        "status": "RUNNING",
        "labels": {"skyhedge-service": "llm", "skyhedge-replica": "r-0099"},
    }
    with caplog.at_level(logging.WARNING):
        for _ in range(70):  # 70 x 10 s: past the grace
            clock.advance(10)
            ctl.tick()
    reports = [r.getMessage() for r in caplog.records if "llm-r-0099" in r.getMessage()]
    assert len(reports) == 1 and "belongs to no live replica" in reports[0]
    assert f"gcloud compute instances delete llm-r-0099 --zone {zone} --project {PROJECT}" in reports[0]
    others = [m for m in (r.getMessage() for r in caplog.records) if "belongs to no live replica" in m]
    assert others == reports  # the service's own replicas are never reported


def test_leftovers_deleted_since_their_report_are_forgotten():
    """A soak audit: every leftover instance ever reported stayed in the watch's memory (AWS and
    GCP share it) for the watcher's life. One no longer listed is forgotten, as one not reported
    yet always was; one that stays is still reported once."""
    watch = LeftoverWatch(grace=600)
    for day in range(30):
        names = [f"llm-r-{day}-{i}" for i in range(3)]
        t = day * 86400.0
        assert watch.due("us-central1-a", names, t) == []
        assert watch.due("us-central1-a", names, t + 600) == names
        assert watch.due("us-central1-a", names, t + 1200) == []  # once
        assert watch.due("us-central1-a", [], t + 1800) == []  # deleted by the operator
    assert len(watch._reported) == 0  # (90 before: each one reported)


def test_gitops_replicas_without_a_recorded_instance_are_still_watched(
    compute, session, tmp_path, write_spec
):
    """In GitOps mode CI applies, so no instance name is recorded: operations and the instance list
    are matched by the module's naming and the `skyhedge-replica` label."""
    ctl, clock = _controller(compute, session, tmp_path, write_spec, sync=GitOpsSync)
    first, second, third = ctl.state.live()
    assert first.cloud_id is None
    compute.operations[first.zone] = [_preempted("5", first.zone, f"skyhedge-llm-{first.id}", clock() + 2)]
    clock.advance(10)
    ctl.tick()
    assert first.gone_at is not None and first.reason == "preempted"
    assert any(f"gcp-operations: gone {first.id} (preempted)" in n.text for n in ctl.notes)
    compute.instances[second.zone][f"skyhedge-llm-{second.id}"]["status"] = "TERMINATED"
    clock.advance(10)
    ctl.tick()
    assert second.gone_at is not None  # seen listed, then stopped
    assert third.gone_at is None  # listed and running


def test_an_unrecorded_replica_never_listed_is_not_taken_for_gone(compute, session, tmp_path, write_spec):
    ctl, clock = _controller(compute, session, tmp_path, write_spec, sync=NotAppliedYet)
    clock.advance(10)
    ctl.tick()
    assert all(r.gone_at is None for r in ctl.state.replicas.values())


def test_an_operation_older_than_the_replica_is_about_an_earlier_machine(
    compute, session, tmp_path, write_spec
):
    """Replica IDs start over with a fresh state dir, and Compute keeps operations up to 14 days: a new
    watcher reads them all. One dated before the replica's launch is not about it."""
    ctl, clock = _controller(compute, session, tmp_path, write_spec)
    victim = ctl.state.live()[0]
    compute.operations[victim.zone] = [
        _preempted("9", victim.zone, f"llm-{victim.id}", victim.launched_at - 86400)
    ]
    clock.advance(10)
    ctl.tick()
    assert victim.gone_at is None and len(ctl.state.live()) == 3


def test_a_poll_failing_in_a_later_zone_loses_no_operation(compute, session, tmp_path, write_spec):
    ctl, clock = _controller(compute, session, tmp_path, write_spec)
    zones = sorted({r.zone for r in ctl.state.live()})
    assert len(zones) >= 2
    victim = next(r for r in ctl.state.live() if r.zone == zones[0])
    compute.operations[victim.zone] = [_preempted("11", victim.zone, f"llm-{victim.id}", clock() + 1)]
    compute.fail_path, compute.failures = f"zones/{zones[1]}/", RETRY_ATTEMPTS
    clock.advance(10)
    ctl.tick()  # the first zone's operations were read, then the second zone failed
    assert any("HTTP 503" in n.text for n in ctl.notes)  # the failing zone is noted...
    assert victim.gone_at is not None and victim.reason == "preempted"  # ...and costs the others nothing
    assert any("gcp-operations: gone" in n.text for n in ctl.notes)  # the operation, not the listing


def test_zone_operations_are_asked_with_the_filter_alone_which_compute_accepts(
    compute, session, tmp_path, write_spec, caplog
):
    """Compute refuses a list filter together with `orderBy` (HTTP 400: "Specifying both a list
    filter and sort order is not currently supported"; the fake answers so too). The watcher asks
    the filter alone, and its first poll neither fails nor warns about the refusal."""
    import logging

    ctl, clock = _controller(compute, session, tmp_path, write_spec)
    victim = ctl.state.live()[0]
    compute.operations[victim.zone] = [_preempted("21", victim.zone, f"llm-{victim.id}", clock() + 1)]
    clock.advance(10)
    with caplog.at_level(logging.WARNING, logger="skyhedge.clouds.gcp.events"):
        ctl.tick()
    assert victim.gone_at is not None and victim.reason == "preempted"
    asked = [q for path, q in compute.requests if path.endswith("/operations")]
    assert asked and all(q == {"filter": [f'operationType="{PREEMPTED_OP}"']} for q in asked)
    assert not [r for r in caplog.records if "HTTP 400" in r.getMessage()]


def test_the_watched_project_is_found_as_apply_finds_it(monkeypatch, write_spec, tmp_path):
    """The google provider reads GOOGLE_PROJECT first; the watcher must poll the same project."""
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    from skyhedge.clouds.gcp import PROJECT_ENV, resolve_project
    from skyhedge.controller.runner import event_sources
    from skyhedge.service import resolve_placement

    for name in PROJECT_ENV:
        monkeypatch.delenv(name, raising=False)

    def no_adc(*_args, **_kwargs):
        raise DefaultCredentialsError("no ADC")

    monkeypatch.setattr(google.auth, "default", no_adc)
    spec = load_spec(write_spec(SPEC.replace(f"gcp: {{project: {PROJECT}}}", "")))
    assert resolve_project(spec.gcp.project) is None
    with pytest.raises(
        CloudError, match=r"^gcp: no project to watch: set gcp.project in .* or \$GOOGLE_PROJECT"
    ):
        event_sources(spec, tmp_path, resolve_placement(spec))
    monkeypatch.setenv("GCLOUD_PROJECT", "from-gcloud")
    monkeypatch.setenv("GOOGLE_PROJECT", "from-provider")
    assert resolve_project(None) == "from-provider" and resolve_project("mine") == "mine"
    monkeypatch.delenv("GOOGLE_PROJECT")
    assert resolve_project(None) == "from-gcloud"
    monkeypatch.delenv("GCLOUD_PROJECT")
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: (AnonymousCredentials(), "from-adc"))
    assert resolve_project(None) == "from-adc"


class ModuleSync(CloudSync):
    """As the gcp-replicas module records a replica: the numeric instance ID as cloud ID, the name
    `skyhedge-<service>-<id>` in its outputs."""

    def apply(self, state, plan, now):
        result = self.executor.apply(state, plan, now)
        for rec in state.live():
            name = f"skyhedge-llm-{rec.id}"
            if not rec.cloud_id:
                rec.cloud_id = str(1000 + int(rec.id[2:]))
            rec.outputs = {"name": name, "cloud_id": rec.cloud_id}
            self.compute.instances.setdefault(rec.zone, {}).setdefault(
                name, {"status": "RUNNING", "labels": {"skyhedge-service": "llm", "skyhedge-replica": rec.id}}
            )
        return result


def test_an_operation_about_an_earlier_vm_of_the_same_name_is_not_about_the_replica(
    compute, session, tmp_path, write_spec
):
    """`apply` recreates a preempted VM under the same name (a new instance ID). A watcher started
    later reads the old operation: its `targetId` is the earlier VM's, so the new one stays."""
    ctl, clock = _controller(compute, session, tmp_path, write_spec, sync=ModuleSync)
    victim = ctl.state.live()[0]
    name = f"skyhedge-llm-{victim.id}"
    op = _preempted("500", victim.zone, name, victim.launched_at + 120)
    op["targetId"] = victim.cloud_id
    compute.operations[victim.zone] = [op]
    clock.advance(3600)
    victim.cloud_id = "9999"  # recreated by an apply: a new instance ID under the same name
    victim.outputs = {"name": name, "cloud_id": "9999"}
    ctl.sources[0] = GcpEventSource("llm", PROJECT, {}, session=session, poll_every=5)  # a new watcher
    ctl.tick()
    assert victim.gone_at is None
    op["targetId"] = "9999"  # the same operation about the VM it has now does count
    ctl.sources[0] = GcpEventSource("llm", PROJECT, {}, session=session, poll_every=5)
    clock.advance(10)
    ctl.tick()
    assert victim.gone_at is not None and victim.reason == "preempted"


def test_preemptions_older_than_the_oldest_live_replica_are_read_to_the_end_and_ignored(
    compute, session, tmp_path, write_spec
):
    """Compute keeps operations up to 14 days and a project's other spot VMs leave theirs in the same
    zones; unordered (a filter cannot be combined with an order), the listing is read to its last
    page: a preemption of this watch's replica on that last page still counts, the older ones none."""
    ctl, clock = _controller(compute, session, tmp_path, write_spec, sync=ModuleSync)
    live = ctl.state.live()
    victim = live[0]
    old = [
        _preempted(f"old-{i}", victim.zone, f"skyhedge-llm-{r.id}", victim.launched_at - 3600 * (i + 1))
        for i, r in enumerate(live * 2)
    ]
    compute.operations[victim.zone] = [
        *old,
        _preempted("new", victim.zone, f"skyhedge-llm-{victim.id}", clock() + 1),
    ]
    clock.advance(10)
    before = len(compute.requests)
    ctl.tick()
    asked = compute.requests[before:]
    pages = [q.get("pageToken") for p, q in asked if p.endswith(f"zones/{victim.zone}/operations")]
    assert len(pages) == len(old) + 1  # one item a page: every page read
    assert victim.gone_at is not None and victim.reason == "preempted"
    assert [r.id for r in ctl.state.replicas.values() if r.gone_at is not None] == [victim.id]


def test_a_clock_set_forward_does_not_end_the_leftover_grace_at_once(
    compute, session, tmp_path, write_spec, caplog
):
    """The 10-minute grace before a leftover instance is reported counts wall-clock time: a clock
    stepped forward 2 h reported an instance seen unowned 10 s earlier (its replica's ID perhaps
    not recorded yet) at the next pass. The watcher moves the grace's times with the jump."""
    import logging

    spec = load_spec(write_spec(SPEC))
    wall, mono = Clock(time.time()), Clock(100.0)
    ctl = Controller(
        spec,
        tmp_path / "state",
        executor=CloudSync(FakeExecutor(), compute),
        router=FakeRouter(),
        prober=FakeProber(),
        sources=[GcpEventSource("llm", PROJECT, {}, session=session, poll_every=5)],
        clock=wall,
        monotonic=mono,
    )
    zone = None
    with caplog.at_level(logging.WARNING):
        for i in range(4):
            ctl.tick()
            if i == 1:
                zone = ctl.state.live()[0].zone
                compute.instances[zone]["llm-r-0099"] = {
                    "status": "RUNNING",
                    "labels": {"skyhedge-service": "llm", "skyhedge-replica": "r-0099"},
                }
            wall.advance(10)
            mono.advance(10)
        wall.advance(7200)
        ctl.tick()
        assert any("the wall clock jumped +7200s" in n.text for n in ctl.notes)
        assert not [r for r in caplog.records if "llm-r-0099" in r.getMessage()]
        for _ in range(60):  # the grace runs on the clock as it now reads
            wall.advance(10)
            mono.advance(10)
            ctl.tick()
    reports = [r.getMessage() for r in caplog.records if "llm-r-0099" in r.getMessage()]
    assert len(reports) == 1 and "belongs to no live replica" in reports[0]


def _three_zones() -> list:
    """Three recorded replicas, one per zone."""
    from skyhedge.state import ReplicaRecord

    return [
        ReplicaRecord(
            f"r-000{i}", "gcp", "us-central1", zone, "spot", 1.0, provisioned_at=2.0, cloud_id=f"{i}"
        )
        for i, zone in enumerate(("us-central1-a", "us-central1-b", "us-central1-c"), start=1)
    ]


def test_a_host_without_credentials_looks_them_up_once_not_once_per_zone(monkeypatch):
    """`plan` and `apply` ask the zones holding replicas which still run. Without credentials,
    google-auth waits for Google's metadata server before it gives up (12 s measured where that
    address does not answer), and each zone looked the credentials up again: 36 s for 3 zones.
    They are the project's, not a zone's: looked up once, and the poll fails with that."""
    calls: list[int] = []

    def no_credentials(*_args, **_kwargs):
        calls.append(1)
        raise CloudError("gcp: no credentials (none found)")

    monkeypatch.setattr("skyhedge.clouds.gcp.events.default_session", no_credentials)
    source = GcpEventSource("llm", PROJECT, {})
    with pytest.raises(CloudError, match="no credentials"):
        source.poll(100.0, _three_zones())
    assert len(calls) == 1


def test_compute_unreachable_is_not_asked_again_for_every_zone(monkeypatch, session):
    """A connection Compute never answers (egress blocked: 10 s a zone measured, the request
    timeout) fails the same way whatever the zone: the poll stops at the first, not after
    waiting as long again for each zone (30 s for 3 zones, for every `plan`)."""
    import socket

    with socket.socket() as probe:  # a port of this host nothing listens on: refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv(ENDPOINT_ENV, f"http://127.0.0.1:{port}/compute/v1")
    asked: list[str] = []
    real = session.request

    def counted(method, url, **kwargs):
        asked.append(url)
        return real(method, url, **kwargs)

    monkeypatch.setattr(session, "request", counted)
    source = GcpEventSource("llm", PROJECT, {}, session=session)
    with pytest.raises(CloudError, match="us-central1-a/operations"):
        source.poll(100.0, _three_zones())
    assert len(asked) == 1, asked
