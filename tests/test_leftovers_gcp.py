"""GCE instances an interrupted apply left, in no Terraform state (skyhedge/clouds/gcp/leftovers.py).

The gcp-replicas module names each instance after its replica (`skyhedge-llm-r-0003`), and an
instance name is unique per project and zone. An apply killed between Compute Engine's insert and
Terraform saving its state left such an instance running while skyhedge recorded the replica as
never created; every later create of that replica failed with the google provider's
`Error creating instance: googleapi: Error 409: The resource '...' already exists, alreadyExists`
(resource_compute_instance.go's create, googleapi.Error's format), at every apply and watcher pass,
while the instance billed on.

No google provider can run here: a local server speaks Compute's REST shapes on 127.0.0.1 (get,
aggregated list, delete, zone operations), and `FakeGoogleTerraform` stands in for Terraform with
the google provider (its state per root, the module's names and labels, that 409).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_http import json_methods_server
from state_support import first_plan_recorded

from skyhedge.apply import apply_service, destroy_service
from skyhedge.clouds.common import Cleared
from skyhedge.clouds.gcp import leftovers
from skyhedge.clouds.gcp.events import ENDPOINT_ENV
from skyhedge.engine import ApplyResult, Diagnostic, ResourceChange, TerraformRoot
from skyhedge.render import TFVARS_FILE
from skyhedge.spec import load_spec
from skyhedge.state import ReplicaRecord, ServiceState, load_state, save_state

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
  num_overprovision: 0
  dynamic_ondemand_fallback: false
  policy: spothedge
run: {{command: serve}}
gcp: {{project: {PROJECT}}}
"""
DEPLOYMENT = "5f0c2a9d41b7e3c8"
ZONE = "us-central1-a"


class FakeGce:
    """Compute Engine's REST API for one project: instances by (zone, name), zone operations
    (a delete is RUNNING for `polls_until_done` reads of its operation, then DONE and the instance
    gone), and every request served."""

    def __init__(self) -> None:
        self.instances: dict[tuple[str, str], dict[str, Any]] = {}
        self.operations: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.polls_until_done = 1
        self.fail: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}  # (method, path part) -> reply
        self.op_error: dict[str, Any] | None = None  # a delete whose operation ends in this error
        self.unreachable: set[str] = set()  # zones the aggregated listing answers UNREACHABLE for
        # ...in the reply's `unreachables` (asked for a partial success) rather than in their scope
        self.unreachables_field = False
        self._ids = itertools.count(7000000000000000001)
        self.lock = threading.Lock()

    def add(self, zone: str, name: str, labels: dict[str, str], status: str = "RUNNING") -> str:
        iid = str(next(self._ids))
        self.instances[(zone, name)] = {
            "kind": "compute#instance",
            "id": iid,
            "name": name,
            "status": status,
            "labels": dict(labels),
            "zone": f"https://www.googleapis.com/compute/v1/projects/{PROJECT}/zones/{zone}",
            "selfLink": f"https://www.googleapis.com/compute/v1/projects/{PROJECT}/zones/{zone}/instances/{name}",
        }
        return iid

    def names(self) -> set[tuple[str, str]]:
        return set(self.instances)

    def deletes(self) -> list[str]:
        return [p.rsplit("/", 1)[-1] for m, p in self.requests if m == "DELETE"]

    def handle(self, method: str, path: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        with self.lock:
            self.requests.append((method, path))
            for (m, part), reply in self.fail.items():
                if m == method and part in path:
                    return reply
            parts = path.strip("/").split("/")
            if parts[:4] != ["compute", "v1", "projects", PROJECT]:
                return 404, {"error": {"code": 404, "message": f"no route {path}"}}
            rest = parts[4:]
            if rest == ["aggregated", "instances"] and method == "GET":
                flt = query.get("filter", [""])[0]
                if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*=[A-Za-z0-9_.-]+", flt):
                    msg = f"Invalid value for field 'filter': '{flt}'. Invalid list filter expression."
                    return 400, {"error": {"code": 400, "message": msg, "errors": [{"reason": "invalid"}]}}
                scopes: dict[str, Any] = {}
                for (zone, _name), inst in sorted(self.instances.items()):
                    if flt == f"labels.skyhedge-service={inst['labels'].get('skyhedge-service')}":
                        scopes.setdefault(f"zones/{zone}", {"instances": []})["instances"].append(inst)
                scopes["zones/europe-west4-a"] = {"warning": {"code": "NO_RESULTS_ON_PAGE"}}
                partial = query.get("returnPartialSuccess", [""])[0] == "true"
                if self.unreachables_field and self.unreachable:
                    if not partial:  # "partial results in case of failure" only when opted in
                        msg = "Internal error. Please try again or contact Google Support."
                        return 500, {
                            "error": {"code": 500, "message": msg, "errors": [{"reason": "backendError"}]}
                        }
                    for zone in self.unreachable:
                        scopes.pop(f"zones/{zone}", None)
                for zone in self.unreachable if not self.unreachables_field else ():
                    # Compute lists the others and says so in the scope
                    scopes[f"zones/{zone}"] = {
                        "warning": {
                            "code": "UNREACHABLE",
                            "message": f"Scope zones/{zone} is unreachable; results may be incomplete.",
                            "data": [{"key": "scope", "value": f"zones/{zone}"}],
                        }
                    }
                # Compute pages aggregated listings too: one scope a page here
                page = int(query.get("pageToken", ["0"])[0])
                keys = sorted(scopes)
                body = {"kind": "compute#instanceAggregatedList", "items": {keys[page]: scopes[keys[page]]}}
                if self.unreachables_field and partial:
                    body["unreachables"] = sorted(f"zones/{zone}" for zone in self.unreachable)
                if page + 1 < len(keys):
                    body["nextPageToken"] = str(page + 1)
                return 200, body
            if len(rest) == 3 and rest[0] == "zones" and rest[2] in ("instances", "operations"):
                # a zone's listings, which `apply` reads to find replicas gone since the last run
                # (no preemption operations here: a deleted instance is just no longer listed)
                flt = query.get("filter", [""])[0]
                items = [
                    inst
                    for (zone, _name), inst in sorted(self.instances.items())
                    if rest[2] == "instances"
                    and zone == rest[1]
                    and flt == f"labels.skyhedge-service={inst['labels'].get('skyhedge-service')}"
                ]
                return 200, {"items": items}
            if len(rest) == 4 and rest[0] == "zones" and rest[2] == "instances":
                key = (rest[1], rest[3])
                if key not in self.instances:
                    msg = f"The resource 'projects/{PROJECT}/zones/{key[0]}/instances/{key[1]}' was not found"
                    return 404, {"error": {"code": 404, "message": msg, "errors": [{"reason": "notFound"}]}}
                if method == "GET":
                    return 200, self.instances[key]
                if method == "DELETE":
                    op = f"operation-{len(self.operations) + 1}"
                    self.operations[(key[0], op)] = {"instance": key, "reads": 0}
                    return 200, {"kind": "compute#operation", "name": op, "status": "RUNNING"}
            if len(rest) == 4 and rest[0] == "zones" and rest[2] == "operations" and method == "GET":
                op = self.operations.get((rest[1], rest[3]))
                if op is None:
                    return 404, {"error": {"code": 404, "message": "no such operation"}}
                op["reads"] += 1
                if op["reads"] < self.polls_until_done:
                    return 200, {"name": rest[3], "status": "RUNNING"}
                body: dict[str, Any] = {"name": rest[3], "status": "DONE"}
                if self.op_error is not None:
                    body["error"] = self.op_error
                else:
                    self.instances.pop(op["instance"], None)
                return 200, body
            return 404, {"error": {"code": 404, "message": f"unknown {method} {path}"}}


@pytest.fixture
def gce(monkeypatch) -> Iterator[FakeGce]:
    fake = FakeGce()
    with json_methods_server(lambda m, p, q: fake.handle(m, p, q), indent=2) as base:
        monkeypatch.setenv(ENDPOINT_ENV, f"{base}/compute/v1")
        monkeypatch.setattr(leftovers, "POLL_SECONDS", 0.01)
        monkeypatch.setattr(leftovers, "DELETE_WAIT_SECONDS", 5.0)
        yield fake


@pytest.fixture(autouse=True)
def _anonymous(monkeypatch):
    """No Google account: the leftovers' session is anonymous (as events.py's with a local endpoint)."""
    from google.auth.credentials import AnonymousCredentials
    from google.auth.transport.requests import AuthorizedSession

    session = AuthorizedSession(AnonymousCredentials())
    monkeypatch.setattr(leftovers, "SESSION", session)
    yield
    session.close()


def labels(rid: str, deployment: str | None = DEPLOYMENT, service: str = "llm") -> dict[str, str]:
    """The labels the gcp-replicas module gives a replica's instance."""
    out = {"skyhedge-service": service, "managed-by": "skyhedge", "skyhedge-replica": rid}
    out["skyhedge-market"] = "spot"
    if deployment is not None:
        out["skyhedge-deployment"] = deployment
    return out


def record(rid: str, zone: str = ZONE) -> ReplicaRecord:
    return ReplicaRecord(
        id=rid, cloud="gcp", region=zone.rsplit("-", 1)[0], zone=zone, market="spot", launched_at=1.0
    )


@pytest.fixture
def spec(write_spec):
    return load_spec(write_spec(SPEC))


# ------------------------------------------------------------------------------------------------
# clear_before_apply: what holds an unsaved replica's name, before Terraform creates it


def test_before_an_apply_the_instance_this_state_launched_and_terraform_never_saved_is_deleted(gce, spec):
    gce.add(ZONE, "skyhedge-llm-r-0003", labels("r-0003"))
    gce.add(ZONE, "skyhedge-llm-r-0002", labels("r-0002"))  # Terraform saved it before the kill
    gce.polls_until_done = 3
    cleared = leftovers.clear_before_apply(
        spec, [record("r-0002"), record("r-0003"), record("r-0004")], held={"r-0002"}, deployment=DEPLOYMENT
    )
    assert cleared.warnings == (
        "gcp us-central1: deleted 1 instance(s) of llm that an interrupted run of this state launched and "
        "Terraform never saved, holding their replicas' names: skyhedge-llm-r-0003 (r-0003, us-central1-a); "
        "this apply creates them again",
    )
    assert cleared.blocked == {}
    assert gce.deletes() == ["skyhedge-llm-r-0003"]
    assert gce.names() == {(ZONE, "skyhedge-llm-r-0002")}  # gone once its operation was DONE
    polls = [p for m, p in gce.requests if "/operations/" in p]
    assert len(polls) == 3  # waited for the zone operation: the name is free only then
    # the replica Terraform saved is never even looked up: the apply reads it back
    assert not any(p.endswith("/skyhedge-llm-r-0002") for _m, p in gce.requests)


@pytest.mark.parametrize(
    ("found", "whose"),
    [
        (None, "with no skyhedge-deployment label of this state"),
        ("0123456789abcdef", "labelled as another skyhedge state's (skyhedge-deployment=0123456789abcdef)"),
    ],
    ids=["no-label", "another-state"],
)
def test_an_instance_without_this_states_label_is_never_deleted_and_its_replica_is_blocked_in_one_line(
    gce, spec, found, whose
):
    gce.add(ZONE, "skyhedge-llm-r-0003", labels("r-0003", deployment=found))
    cleared = leftovers.clear_before_apply(spec, [record("r-0003")], held=set(), deployment=DEPLOYMENT)
    assert gce.deletes() == [] and cleared.warnings == ()
    [(rid, blocked)] = cleared.blocked.items()
    assert rid == "r-0003" and blocked.evidence == "skyhedge-llm-r-0003"
    assert "\n" not in blocked.line
    assert blocked.line.startswith(
        f"r-0003: instance skyhedge-llm-r-0003 already exists in us-central1-a, in no Terraform state of "
        f"this service and {whose}"
    )
    assert blocked.line.endswith(
        "gcloud compute instances delete skyhedge-llm-r-0003 --zone us-central1-a --project proj-1"
    )


def test_an_instance_with_this_states_id_but_another_replicas_labels_is_kept_and_not_called_another_states(
    gce, spec
):
    """Labels edited by hand: this state's ID on an instance not labelled as the replica whose name
    it holds. What it runs is unknown, so it is kept; the line said it was labelled as "another
    skyhedge state's", naming this state's own ID."""
    gce.add(ZONE, "skyhedge-llm-r-0003", {**labels("r-0003"), "skyhedge-replica": "r-0009"})
    cleared = leftovers.clear_before_apply(spec, [record("r-0003")], held=set(), deployment=DEPLOYMENT)
    assert gce.deletes() == [] and cleared.warnings == ()
    line = cleared.blocked["r-0003"].line
    assert "another skyhedge state's" not in line
    assert (
        "in no Terraform state of this service and labelled with this state's skyhedge-deployment but as "
        "skyhedge-service=llm, skyhedge-replica=r-0009 (labels edited by hand?): skyhedge leaves it alone"
    ) in line


@pytest.mark.parametrize("found", [DEPLOYMENT, None], ids=["another-states-label", "no-label"])
def test_a_state_without_a_deployment_id_deletes_nothing(gce, spec, found):
    """Not even an instance without the label either: "no ID" matches no ID, it proves nothing."""
    gce.add(ZONE, "skyhedge-llm-r-0003", labels("r-0003", deployment=found))
    cleared = leftovers.clear_before_apply(spec, [record("r-0003")], held=set(), deployment=None)
    assert gce.deletes() == [] and set(cleared.blocked) == {"r-0003"}


def test_lookups_and_deletes_that_fail_or_hang_are_warnings_never_raised(gce, spec, monkeypatch):
    err = {"error": {"code": 503, "message": "backend error", "errors": [{"reason": "backendError"}]}}
    gce.add(ZONE, "skyhedge-llm-r-0003", labels("r-0003"))
    gce.fail[("GET", "/instances/skyhedge-llm-r-0003")] = (503, err)
    cleared = leftovers.clear_before_apply(spec, [record("r-0003")], held=set(), deployment=DEPLOYMENT)
    [warning] = cleared.warnings
    assert warning.startswith("gcp us-central1-a: could not look for instance skyhedge-llm-r-0003 (r-0003)")
    assert "HTTP 503: backend error" in warning and cleared.blocked == {}

    gce.fail = {("DELETE", "/instances/skyhedge-llm-r-0003"): (403, {"error": {"message": "denied"}})}
    cleared = leftovers.clear_before_apply(spec, [record("r-0003")], held=set(), deployment=DEPLOYMENT)
    [warning] = cleared.warnings
    assert warning.startswith("gcp us-central1-a: could not delete instance skyhedge-llm-r-0003 (r-0003)")
    assert "HTTP 403: denied" in warning
    assert cleared.blocked["r-0003"].line.endswith("--zone us-central1-a --project proj-1")

    gce.fail = {}
    gce.polls_until_done = 10**9  # a delete that never finishes: bounded
    monkeypatch.setattr(leftovers, "DELETE_WAIT_SECONDS", 0.2)
    started = time.monotonic()
    cleared = leftovers.clear_before_apply(spec, [record("r-0003")], held=set(), deployment=DEPLOYMENT)
    assert time.monotonic() - started < 3
    [warning] = cleared.warnings
    assert "did not finish within 0.2 s" in warning and "r-0003" in cleared.blocked

    gce.polls_until_done = 1
    gce.op_error = {"errors": [{"code": "RESOURCE_IN_USE_BY_ANOTHER_RESOURCE", "message": "in use"}]}
    cleared = leftovers.clear_before_apply(spec, [record("r-0003")], held=set(), deployment=DEPLOYMENT)
    [warning] = cleared.warnings
    assert "the delete failed: RESOURCE_IN_USE_BY_ANOTHER_RESOURCE: in use" in warning


def test_an_unreachable_endpoint_or_no_project_is_a_warning(gce, spec, monkeypatch, write_spec):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(ENDPOINT_ENV, f"http://127.0.0.1:{port}/compute/v1")
    cleared = leftovers.clear_before_apply(spec, [record("r-0003")], held=set(), deployment=DEPLOYMENT)
    [warning] = cleared.warnings
    assert warning.startswith("gcp us-central1-a: could not look for instance skyhedge-llm-r-0003")
    assert leftovers.instances_left("llm", {"us-central1"}, spec=spec)[0].startswith(
        "gcp us-central1: could not look for instances of llm left running (GET "
    )

    from skyhedge.clouds.gcp import PROJECT_ENV

    for name in PROJECT_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("google.auth.default", lambda *a, **k: (None, None))
    bare = load_spec(write_spec(SPEC.replace(f"gcp: {{project: {PROJECT}}}\n", ""), name="bare.yaml"))
    cleared = leftovers.clear_before_apply(bare, [record("r-0003")], held=set(), deployment=DEPLOYMENT)
    assert cleared.warnings == (
        "gcp us-central1: could not look for instances an interrupted run left (no project (set "
        f"gcp.project in {bare.source} or $GOOGLE_PROJECT))",
    )


# ------------------------------------------------------------------------------------------------
# instances_left: after an apply step, and after destroy


def test_instances_left_deletes_this_states_and_names_the_others_with_the_gcloud_command(gce, spec):
    mine = gce.add(ZONE, "skyhedge-llm-r-0003", labels("r-0003"))
    gce.add("us-central1-b", "skyhedge-llm-r-0004", labels("r-0004", deployment=None))
    gce.add("us-central1-c", "skyhedge-llm-r-0005", labels("r-0005", deployment="0123456789abcdef"))
    gce.add("us-central1-c", "skyhedge-llm-r-0006", labels("r-0006", deployment=None))
    served = gce.add(ZONE, "skyhedge-llm-r-0001", labels("r-0001"))  # a live replica owns it
    gce.add(ZONE, "skyhedge-llm-r-0007", labels("r-0007", deployment=None), status="TERMINATED")
    gce.add("europe-west4-a", "skyhedge-llm-r-0008", labels("r-0008", deployment=None))  # another region
    gce.add(ZONE, "skyhedge-other-r-0003", labels("r-0003", service="other"))  # another service
    lines = leftovers.instances_left(
        "llm", {"us-central1"}, owned={served}, again="AGAIN; ", deployment=DEPLOYMENT, spec=spec
    )
    assert lines == [
        "gcp us-central1: deleted 1 instance(s) of llm that an interrupted run of this state launched and "
        "Terraform never saved: skyhedge-llm-r-0003 (r-0003, us-central1-a)",
        "gcp us-central1: 3 instance(s) labelled for llm still run, in no Terraform state (an apply killed "
        "before Terraform saved them?): skyhedge-llm-r-0004 (r-0004, us-central1-b), skyhedge-llm-r-0005 "
        "(r-0005, us-central1-c), skyhedge-llm-r-0006 (r-0006, us-central1-c); AGAIN; they bill until "
        "deleted: gcloud compute instances delete skyhedge-llm-r-0004 --zone us-central1-b --project proj-1; "
        "gcloud compute instances delete skyhedge-llm-r-0005 skyhedge-llm-r-0006 --zone us-central1-c "
        "--project proj-1",
    ]
    assert gce.deletes() == ["skyhedge-llm-r-0003"] and (ZONE, "skyhedge-llm-r-0003") not in gce.names()
    assert mine not in {i["id"] for i in gce.instances.values()}
    # only the replicas asked about; a recorded self link (older states) owns its instance too
    gce.requests.clear()
    link = f"https://compute.googleapis.com/compute/v1/projects/{PROJECT}/zones/us-central1-b/instances/skyhedge-llm-r-0004"
    assert (
        leftovers.instances_left("llm", {"us-central1"}, replicas={"r-0004"}, owned={link}, spec=spec) == []
    )


def test_an_instance_skyhedge_read_back_for_a_replica_is_named_never_deleted_by_the_sweep(gce, spec):
    """`spare`: the machines skyhedge recorded for replicas (a replica Terraform's lost state made
    it launch anew ran there, and may still serve): this state's label does not make them a killed
    run's, which never was read back."""
    old = gce.add(ZONE, "skyhedge-llm-r-0001", labels("r-0001"))
    lines = leftovers.instances_left("llm", {"us-central1"}, deployment=DEPLOYMENT, spare={old}, spec=spec)
    assert gce.deletes() == []
    assert lines == [
        "gcp us-central1: 1 instance(s) of llm that skyhedge recorded for its replicas still run, but "
        "Terraform's state no longer holds them (lost, or restored from an older copy?) and it launched "
        "others in their place: skyhedge-llm-r-0001 (r-0001, us-central1-a); not deleted (they may still "
        "serve): once the new replicas are READY, they bill until deleted: gcloud compute instances delete "
        "skyhedge-llm-r-0001 --zone us-central1-a --project proj-1"
    ]


def test_where_the_apply_failed_before_reading_terraforms_state_back_nothing_is_deleted(gce, spec):
    """An instance Terraform saved is owned by no replica until the apply reads it back: after
    a failed apply there, even one labelled with this state's ID may be a live replica."""
    gce.add(ZONE, "skyhedge-llm-r-0003", labels("r-0003"))
    lines = leftovers.instances_left("llm", {"us-central1"}, deployment=DEPLOYMENT, unread=True, spec=spec)
    assert lines == [
        "gcp us-central1: 1 instance(s) labelled for llm still run that no replica owns: skyhedge-llm-r-0003 "
        "(r-0003, us-central1-a); not deleted: the apply failed there before reading Terraform's state "
        "back, and that state may hold them; the next apply reads back those it holds, the others bill "
        "until deleted: gcloud compute instances delete skyhedge-llm-r-0003 --zone us-central1-a "
        "--project proj-1"
    ]
    assert gce.deletes() == []


def test_the_sweep_tells_the_cloud_which_machines_skyhedge_recorded_and_where_state_was_not_read(
    spec, monkeypatch
):
    """Cloud-neutral (`skyhedge.leftovers.instances_left_unsaved`, what every cloud's sweep gets):
    a live replica's machine is `owned`; one skyhedge read back for a replica (a gone record's, or
    the one a re-created replica ran on before: `spare`) is `spare`, never a killed run's; and a
    region whose last apply failed before reading Terraform's state back is `unread` (its
    instances may be ones Terraform saved)."""
    import skyhedge.leftovers as sweep

    asked: list[dict[str, Any]] = []

    class Cloud:
        @staticmethod
        def instances_left(service: str, regions: set[str], **given: Any) -> list[str]:
            asked.append({"service": service, "regions": regions, **given})
            return []

    monkeypatch.setattr(sweep, "cloud_leftovers", lambda cloud: Cloud)
    state = ServiceState(service="llm", extra={sweep.DEPLOYMENT_KEY: DEPLOYMENT})
    live, gone = record("r-0003"), record("r-0001")
    live.cloud_id, gone.cloud_id, gone.gone_at = "7001", "7000", 5.0
    state.replicas = {r.id: r for r in (live, gone)}
    sweep.instances_left_unsaved(spec, state, [live], spare={"6999", "7001"})
    state.extra["terraform"] = {"roots": {"gcp/us-central1": {"digest": None}}}  # its apply failed
    sweep.instances_left_unsaved(spec, state, [live])
    clean, failed = asked
    assert clean["service"] == "llm" and clean["regions"] == {"us-central1"}
    assert clean["replicas"] == {"r-0003"} and clean["deployment"] == DEPLOYMENT
    assert clean["owned"] == {"7001"} and clean["spare"] == {"7000", "6999"} and clean["unread"] is False
    assert failed["spare"] == {"7000"} and failed["unread"] is True


def test_only_replicas_found_gone_with_a_recorded_machine_are_lost():
    """`lost_replicas`: what a watcher's event sources found gone since `before`, and that had a
    machine (one never launched left none). A replica still live is not lost: looking for its
    leftovers would cost a listing per region at every scale-down."""
    from copy import deepcopy

    from skyhedge.leftovers import lost_replicas

    state = ServiceState(service="llm")
    for rid, cloud_id in (("r-0001", "7001"), ("r-0002", "7002"), ("r-0003", None)):
        state.replicas[rid] = record(rid)
        state.replicas[rid].cloud_id = cloud_id
    before = deepcopy(state.live())
    for rid in ("r-0002", "r-0003"):  # found gone by the event sources
        state.replicas[rid].gone_at = 9.0
    assert [r.id for r in lost_replicas(state, before)] == ["r-0002"]


def test_a_failing_listing_is_one_warning_per_region(gce, spec):
    gce.fail[("GET", "/aggregated/instances")] = (
        403,
        {"error": {"message": "Required 'compute.instances.list'"}},
    )
    assert leftovers.instances_left("llm", {"us-central1", "us-east4"}, spec=spec) == [
        f"gcp {r}: could not look for instances of llm left running (GET {gce_base()}/projects/proj-1/"
        "aggregated/instances: HTTP 403: Required 'compute.instances.list')"
        for r in ("us-central1", "us-east4")
    ]


def test_a_listing_answered_not_found_is_a_warning_not_an_empty_listing(gce, spec):
    """Compute answers 404 for a project it does not know (`notFound`): for an instance or an
    operation that means gone, but for the aggregated listing it means nothing was listed, so
    instances left running there would go unsaid."""
    gce.add(ZONE, "skyhedge-llm-r-0009", labels("r-0009", deployment=None))
    gce.fail[("GET", "/aggregated/instances")] = (
        404,
        {
            "error": {
                "code": 404,
                "message": "The resource 'projects/proj-1' was not found",
                "errors": [{"reason": "notFound"}],
            }
        },
    )
    assert leftovers.instances_left("llm", {"us-central1"}, spec=spec) == [
        "gcp us-central1: could not look for instances of llm left running (GET "
        f"{gce_base()}/projects/proj-1/aggregated/instances: HTTP 404: The resource 'projects/proj-1' "
        "was not found)"
    ]


@pytest.mark.parametrize("where", ["scope-warning", "unreachables-field"])
def test_a_zone_the_listing_could_not_reach_is_a_warning_not_a_zone_without_instances(gce, spec, where):
    """Compute answers an aggregated listing with the zones it could reach and marks the others
    UNREACHABLE in their scope, or, asked for a partial success, names them in the reply's
    `unreachables` (InstanceAggregatedList): an instance left running there was not seen, which
    the sweep says (once per region holding such a zone) rather than report nothing."""
    gce.add(ZONE, "skyhedge-llm-r-0003", labels("r-0003", deployment=None))
    gce.add("us-central1-b", "skyhedge-llm-r-0004", labels("r-0004", deployment=None))
    gce.unreachable = {"us-central1-b", "us-east4-a"}
    gce.unreachables_field = where == "unreachables-field"
    lines = leftovers.instances_left("llm", {"us-central1"}, spec=spec)
    assert lines[0] == (
        "gcp us-central1: could not look for instances of llm left running in us-central1-b (Compute "
        "answered UNREACHABLE for that zone); the next apply looks again"
    )
    assert len(lines) == 2 and "skyhedge-llm-r-0003 (r-0003, us-central1-a)" in lines[1]
    assert "r-0004" not in lines[1]
    gce.unreachable = set()
    assert leftovers.instances_left("llm", {"us-east4"}, spec=spec) == []


def gce_base() -> str:
    import os

    return os.environ[ENDPOINT_ENV]


# ------------------------------------------------------------------------------------------------
# apply / destroy / watch, with Terraform and the google provider faked


class FakeGoogleTerraform:
    """Terraform with the google provider, as far as these replicas go: a state per root (replica
    ID -> instance ID), each apply refreshing it (by instance name, as the provider reads), then
    creating the module's instances (its names and labels, from the root's tfvars) in `gce`,
    failing a create whose name is taken with the provider's error, and destroying what the
    tfvars no longer hold; `kill` stops an apply as a `kill -9` would."""

    def __init__(self, gce: FakeGce) -> None:
        self.gce = gce
        self.state: dict[str, dict[str, str]] = {}
        self.calls: list[tuple[str, str]] = []
        #: the replica whose create the next apply is killed in (`kill -9`), after Compute Engine's
        #: insert and before Terraform saves it; `kill_saved` says whether Terraform had written its
        #: state before (another resource done first: the refreshed state, without the replica's
        #: gone instance, as measured with Terraform 1.11) or had written nothing at all.
        self.kill: str | None = None
        self.kill_saved = True

    def init(self, root: TerraformRoot, *, force: bool = False) -> bool:
        return False

    def held_replicas(self, root: TerraformRoot) -> set[str]:
        self.calls.append(("held", root.name))
        return set(self.state.get(root.name, {}))

    def held_instances(self, root: TerraformRoot, resource_type: str, attribute: str) -> dict[str, set[str]]:
        """`terraform state pull`: the instance IDs (`instance_id`) Terraform's state holds per replica."""
        assert (resource_type, attribute) == ("google_compute_instance", "instance_id")
        self.calls.append(("held_instances", root.name))
        return {rid: {iid} for rid, iid in self.state.get(root.name, {}).items()}

    def _refresh(self, held: dict[str, str], tfvars: dict[str, Any]) -> None:
        """The provider's Read before planning: each instance the state holds is read by its NAME in
        its zone (resource_compute_instance.go's getInstance: `Instances.Get(project, zone, name)`):
        a 404 drops it from the state, and whatever instance carries the name now is the one the
        state holds from then on (its `instance_id` read anew)."""
        for rid in sorted(held):
            name = f"skyhedge-{tfvars['service']}-{rid}"
            zones = {z for (z, n), inst in self.gce.instances.items() if n == name}
            zone = (tfvars["replicas"].get(rid) or {}).get("zone")
            found = self.gce.instances.get((zone, name)) if zone else None
            if found is None and zone is None and zones:
                found = self.gce.instances[(sorted(zones)[0], name)]
            if found is None:
                del held[rid]
            else:
                held[rid] = found["id"]

    def apply(self, root: TerraformRoot, *, plan_file=None, on_event=None, check=True) -> ApplyResult:
        self.calls.append(("apply", root.name))
        tfvars = json.loads((root.path / TFVARS_FILE).read_text())
        held = self.state.setdefault(root.name, {})
        before = dict(held)
        self._refresh(held, tfvars)
        completed: list[ResourceChange] = []
        errors: list[Diagnostic] = []
        killed = False
        for rid in sorted(set(held) - set(tfvars["replicas"])):
            iid = held.pop(rid)
            for key, inst in list(self.gce.instances.items()):
                if inst["id"] == iid:
                    del self.gce.instances[key]
            completed.append(
                ResourceChange(f'module.replicas.google_compute_instance.replica["{rid}"]', "delete")
            )
        for rid, r in sorted(tfvars["replicas"].items()):
            if rid in held:
                continue
            name, address = (
                f"skyhedge-{tfvars['service']}-{rid}",
                f'module.replicas.google_compute_instance.replica["{rid}"]',
            )
            if (r["zone"], name) in self.gce.instances:
                errors.append(
                    Diagnostic(
                        "error",
                        "Error creating instance: googleapi: Error 409: The resource "
                        f"'projects/{PROJECT}/zones/{r['zone']}/instances/{name}' already exists, "
                        "alreadyExists",
                        "",
                        address,
                    )
                )
                continue
            lab = labels(rid, deployment=tfvars.get("deployment"), service=tfvars["service"])
            iid = self.gce.add(r["zone"], name, lab)
            if rid == self.kill:
                killed = True  # inserted; Terraform is killed before it saves it
                continue
            held[rid] = iid
            completed.append(ResourceChange(address, "create"))
        if killed:
            self.kill = None
            if not self.kill_saved:
                self.state[root.name] = before
            raise KeyboardInterrupt  # as a kill -9: nothing of this run is read back
        outputs = {
            "replicas": {
                rid: {"cloud_id": iid, "name": f"skyhedge-llm-{rid}", "endpoint": f"http://10.0.0.{i}:8000"}
                for i, (rid, iid) in enumerate(sorted(held.items()), start=2)
            }
        }
        return ApplyResult(
            root.name, 1 if errors else 0, completed=tuple(completed), errors=tuple(errors), outputs=outputs
        )

    def destroy(self, root: TerraformRoot, *, on_event=None, check=True) -> ApplyResult:
        held = self.state.pop(root.name, {})
        for (zone, name), inst in list(self.gce.instances.items()):
            if inst["id"] in held.values():
                del self.gce.instances[(zone, name)]
        return ApplyResult(
            root.name,
            0,
            completed=tuple(
                ResourceChange(f'module.replicas.google_compute_instance.replica["{rid}"]', "delete")
                for rid in held
            ),
        )


def killed_apply(spec, state_dir: Path, gce: FakeGce, *, deployment_label: bool = True) -> dict[str, str]:
    """What an apply killed between Compute Engine's inserts and Terraform saving its state leaves:
    the plan recorded with the state's deployment ID, an instance per new replica, named and
    labelled as the module does, and Terraform's state empty. Returns replica ID -> instance ID."""
    state, deployment = first_plan_recorded(spec, state_dir)
    return {
        rec.id: gce.add(
            rec.zone, f"skyhedge-llm-{rec.id}", labels(rec.id, deployment if deployment_label else None)
        )
        for rec in state.live()
    }


def test_an_apply_after_a_killed_apply_deletes_what_that_run_launched_and_creates_the_replicas(
    gce, spec, tmp_path
):
    """Before: every such replica's create failed with "already exists" (the replica stayed recorded
    as never created), at this apply and every one after, while the first instances ran on."""
    state_dir = tmp_path / "state"
    launched = killed_apply(spec, state_dir, gce)
    engine = FakeGoogleTerraform(gce)
    report = apply_service(spec, state_dir, engine=engine, route=False, wait=False)
    assert report.ok, [str(e) for e in report.errors]
    [warning] = report.warnings
    assert warning.startswith(
        "gcp us-central1: deleted 2 instance(s) of llm that an interrupted run of this state"
    )
    assert engine.calls[:2] == [("held", "gcp/us-central1"), ("apply", "gcp/us-central1")]  # before Terraform
    assert sorted(gce.deletes()) == sorted(f"skyhedge-llm-{rid}" for rid in launched)
    state = load_state(state_dir, "llm")
    live = {r.id: r.cloud_id for r in state.live()}
    assert sorted(live) == sorted(launched) and all(
        iid and iid not in launched.values() for iid in live.values()
    )
    # what the replicas run on now carries the state's label (the module's input `deployment`)
    assert {i["labels"]["skyhedge-deployment"] for i in gce.instances.values()} == {state.extra["deployment"]}
    assert apply_service(spec, state_dir, engine=engine, route=False, wait=False).warnings == []


def test_a_replica_terraform_saved_before_the_kill_is_read_back_and_left_alone(gce, spec, tmp_path):
    state_dir = tmp_path / "state"
    launched = killed_apply(spec, state_dir, gce)
    engine = FakeGoogleTerraform(gce)
    saved = sorted(launched)[0]
    engine.state["gcp/us-central1"] = {saved: launched[saved]}  # saved just before the kill
    report = apply_service(spec, state_dir, engine=engine, route=False, wait=False)
    assert report.ok, [str(e) for e in report.errors]
    assert f"skyhedge-llm-{saved}" not in gce.deletes()
    assert load_state(state_dir, "llm").replicas[saved].cloud_id == launched[saved]  # it serves


def test_an_interactive_apply_deletes_only_once_confirmed_and_a_declined_one_deletes_nothing(
    gce, spec, tmp_path
):
    """The plan shown is Terraform's (`plan -out`); what an interrupted run left is deleted after
    the user said yes, never while asking, and never when they said no."""
    from skyhedge.engine import PlanResult

    class Planning(FakeGoogleTerraform):
        def plan(self, root, *, out=None, destroy=False, refresh=True, on_event=None) -> PlanResult:
            Path(out).write_text("a saved plan")
            return PlanResult(root.name, 2, add=2)

    state_dir = tmp_path / "state"
    launched = killed_apply(spec, state_dir, gce)
    engine = Planning(gce)
    asked: list[list[str]] = []

    def answer(yes: bool):
        def confirm(plan, roots, previews) -> bool:
            asked.append(gce.deletes())
            return yes

        return confirm

    assert apply_service(
        spec, state_dir, engine=engine, route=False, wait=False, confirm=answer(False)
    ).cancelled
    assert asked == [[]] and gce.deletes() == [] and len(gce.instances) == 2
    report = apply_service(spec, state_dir, engine=engine, route=False, wait=False, confirm=answer(True))
    assert report.ok and asked == [[], []]
    assert sorted(gce.deletes()) == sorted(f"skyhedge-llm-{rid}" for rid in launched)


def test_an_instance_of_someone_else_holding_the_name_fails_the_apply_in_one_clear_line(gce, spec, tmp_path):
    """Never deleted (another state dir's or a GitOps CI's replica, or launched before the label);
    before, the error was the provider's 409 text, naming no command."""
    state_dir = tmp_path / "state"
    launched = killed_apply(spec, state_dir, gce, deployment_label=False)
    engine = FakeGoogleTerraform(gce)
    report = apply_service(spec, state_dir, engine=engine, route=False, wait=False)
    assert gce.deletes() == [] and len(gce.instances) == 2
    first, second = (str(e) for e in report.errors)
    for line, rid in zip((first, second), sorted(launched), strict=True):
        zone = load_state(state_dir, "llm").replicas[rid].zone
        assert line == (
            f"terraform apply failed in gcp/us-central1: {rid}: instance skyhedge-llm-{rid} already exists "
            f"in {zone}, in no Terraform state of this service and "
            "with no skyhedge-deployment label of this state (another state dir, a GitOps CI, or a skyhedge "
            "from before the label may run it): skyhedge leaves it alone and cannot create the replica under "
            "its name; if it is no one's, delete it and apply again: gcloud compute instances delete "
            f"skyhedge-llm-{rid} --zone {zone} --project proj-1"
        )
    assert "alreadyExists" in report.errors[0].stderr  # Terraform's own words stay in the detail
    assert report.warnings == []  # said once, as the error


def test_destroy_deletes_this_states_leftovers_in_the_regions_it_destroyed(gce, spec, tmp_path):
    state_dir = tmp_path / "state"
    engine = FakeGoogleTerraform(gce)
    assert apply_service(spec, state_dir, engine=engine, route=False, wait=False).ok
    deployment = load_state(state_dir, "llm").extra["deployment"]
    gce.add("us-central1-f", "skyhedge-llm-r-0009", labels("r-0009", deployment))
    report = destroy_service(spec, state_dir, engine=engine, route=False)
    assert report.ok
    assert report.warnings == [
        "gcp us-central1: deleted 1 instance(s) of llm that an interrupted run of this state launched and "
        "Terraform never saved: skyhedge-llm-r-0009 (r-0009, us-central1-f)"
    ]
    assert gce.instances == {}


def test_a_restarted_watcher_deletes_what_the_killed_run_launched_and_labels_what_it_launches(
    gce, spec, tmp_path, caplog
):
    """The watcher's executor renders with the state's deployment ID (it rendered none: what a
    watcher launched could not be told from anyone's), clears before Terraform as `apply` does,
    and notes what it deleted as a warning."""
    from skyhedge.controller.executor import TerraformExecutor
    from skyhedge.controller.loop import Controller

    state_dir = tmp_path / "state"
    launched = killed_apply(spec, state_dir, gce)
    engine = FakeGoogleTerraform(gce)
    ctl = Controller(spec, state_dir, executor=TerraformExecutor(spec, state_dir, engine=engine))
    with caplog.at_level(logging.WARNING, logger="skyhedge"):
        ctl.tick()
    [note] = [n for n in ctl.notes if "deleted" in n.text]
    assert note.text.startswith("gcp us-central1: deleted 2 instance(s) of llm")
    assert any(r.levelno == logging.WARNING and note.text in r.getMessage() for r in caplog.records)
    assert not any("apply failed" in n.text for n in ctl.notes)
    state = load_state(state_dir, "llm")
    assert sorted(r.id for r in state.live() if r.cloud_id) == sorted(launched)
    assert {i["labels"]["skyhedge-deployment"] for i in gce.instances.values()} == {state.extra["deployment"]}


# ------------------------------------------------------------------------------------------------
# A replica Terraform re-creates under its own name (its spot VM deleted), killed mid-create


@contextlib.contextmanager
def apply_blind_to_deletes(gce: FakeGce) -> Iterator[None]:
    """The zone listings refused meanwhile (as to an account that may not list them), so that an
    apply does not find a VM deleted since its last run and records nothing gone: Terraform's
    refresh then finds it, and the apply re-creates the replica under its name."""
    gce.fail[("GET", "/operations")] = (403, {"error": {"code": 403, "message": "listing denied"}})
    try:
        yield
    finally:
        del gce.fail[("GET", "/operations")]


def spot_vm_deleted(gce: FakeGce, state_dir: Path, rid: str) -> tuple[str, str]:
    """GCE deletes a preempted spot VM (the module's `instance_termination_action = "DELETE"`)
    before any watcher noticed: skyhedge and Terraform still record the replica's instance.
    Returns (zone, name)."""
    rec = load_state(state_dir, "llm").replicas[rid]
    key = (rec.zone, f"skyhedge-llm-{rid}")
    assert gce.instances.pop(key)["id"] == rec.cloud_id
    return key


def test_a_vm_deleted_since_the_last_run_is_replaced_by_the_next_apply_though_nothing_else_changed(
    gce, spec, tmp_path
):
    """A replica's VM deleted outside skyhedge (the console, `gcloud`, a spot VM GCE deleted) with
    no watcher running: `apply` ran Terraform only in changed roots, so it said "No changes" and
    the service ran a replica short until something else changed the root. The zone listing finds
    it gone first: recorded so, and replaced under a new ID, as a watcher would; nothing else is
    deleted or launched."""
    state_dir = tmp_path / "state"
    engine = FakeGoogleTerraform(gce)
    assert apply_service(spec, state_dir, engine=engine, route=False, wait=False).ok
    spot_vm_deleted(gce, state_dir, "r-0001")
    report = apply_service(spec, state_dir, engine=engine, route=False, wait=False)
    assert report.ok and report.warnings == [], report.warnings
    assert report.created == ["r-0003"] and gce.deletes() == []
    state = load_state(state_dir, "llm")
    assert state.replicas["r-0001"].gone_at is not None
    assert sorted(r.id for r in state.live()) == ["r-0002", "r-0003"]
    assert sorted(i["labels"]["skyhedge-replica"] for i in gce.instances.values()) == ["r-0002", "r-0003"]


def test_a_vm_whose_labels_were_edited_by_hand_is_not_taken_for_gone_by_apply(gce, spec, tmp_path):
    """Its `skyhedge-service` label removed (in the console, by a label policy), a replica's VM is no
    longer in the zone's labelled listing: `apply` recorded it gone ("instance no longer listed"),
    launched a replacement and Terraform deleted the healthy VM (as on AWS before its tags were
    looked past). Its recorded name is looked up before it is judged: running, it is kept; deleted,
    it is gone as before."""
    state_dir = tmp_path / "state"
    engine = FakeGoogleTerraform(gce)
    assert apply_service(spec, state_dir, engine=engine, route=False, wait=False).ok
    rec = load_state(state_dir, "llm").replicas["r-0001"]
    del gce.instances[(rec.zone, f"skyhedge-llm-{rec.id}")]["labels"]["skyhedge-service"]
    report = apply_service(spec, state_dir, engine=engine, route=False, wait=False)
    assert report.ok and report.created == [] and gce.deletes() == [], (report.created, gce.deletes())
    assert sorted(r.id for r in load_state(state_dir, "llm").live()) == ["r-0001", "r-0002"]
    spot_vm_deleted(gce, state_dir, "r-0001")
    report = apply_service(spec, state_dir, engine=engine, route=False, wait=False)
    assert report.ok and report.created == ["r-0003"]
    assert load_state(state_dir, "llm").replicas["r-0001"].gone_at is not None


def test_a_zone_that_could_not_be_listed_is_said_when_another_zone_found_a_vm_gone(gce, spec, tmp_path):
    """One zone's listing refused while another's finds a VM deleted: the poll returns what it
    found and keeps the refusal for the watcher's `problems()`, which `apply` never read: the
    refused zone's replicas went unchecked without a word. Now said as a warning, naming it."""
    state_dir = tmp_path / "state"
    engine = FakeGoogleTerraform(gce)
    assert apply_service(spec, state_dir, engine=engine, route=False, wait=False).ok
    live = {r.id: r for r in load_state(state_dir, "llm").live()}
    assert live["r-0001"].zone != live["r-0002"].zone
    spot_vm_deleted(gce, state_dir, "r-0001")
    refused = f"zones/{live['r-0002'].zone}/operations"
    gce.fail[("GET", refused)] = (403, {"error": {"code": 403, "message": "listing denied"}})
    report = apply_service(spec, state_dir, engine=engine, route=False, wait=False)
    assert report.ok and report.created == ["r-0003"]
    [warning] = report.warnings
    assert warning.startswith("gcp: could not check which replicas still run (gcp: GET ")
    assert refused in warning and "HTTP 403: listing denied" in warning


def test_a_replica_recreated_under_its_name_by_a_killed_apply_is_deleted_and_created_again(
    gce, spec, tmp_path, write_spec
):
    """The apply that scales up also re-creates r-0001 under its name (Terraform's refresh found
    its instance gone); it is killed after Compute Engine's insert of r-0001, once Terraform had
    written its state (the scale-up's replica done first: written without r-0001, as the refresh
    left it). r-0001 is neither in Terraform's state nor "unsaved" in skyhedge's (it records the
    deleted instance): before, every later create of it failed with the provider's 409
    alreadyExists, at every apply, while the killed run's instance billed on.

    Now the 409 on a name this state's interrupted run holds deletes that instance (it is in no
    Terraform state: compared by instance ID with what `terraform state pull` holds) and the
    root is applied once more, creating the replica."""
    bigger = load_spec(write_spec(SPEC.replace("min_replicas: 2", "min_replicas: 3"), name="bigger.yaml"))
    state_dir = tmp_path / "state"
    engine = FakeGoogleTerraform(gce)
    assert apply_service(spec, state_dir, engine=engine, route=False, wait=False).ok
    old = load_state(state_dir, "llm").replicas["r-0001"].cloud_id
    key = spot_vm_deleted(gce, state_dir, "r-0001")
    engine.kill = "r-0001"
    with apply_blind_to_deletes(gce), pytest.raises(KeyboardInterrupt):
        apply_service(bigger, state_dir, engine=engine, route=False, wait=False)
    orphan = gce.instances[key]["id"]
    assert set(engine.state["gcp/us-central1"]) == {"r-0002", "r-0003"}  # r-0001 dropped by the refresh
    assert load_state(state_dir, "llm").replicas["r-0001"].cloud_id == old  # never read back
    gce.requests.clear()
    engine.calls.clear()

    report = apply_service(bigger, state_dir, engine=engine, route=False, wait=False)
    assert report.ok, [str(e) for e in report.errors]
    assert report.warnings == [
        "gcp us-central1: deleted 1 instance(s) of llm that an interrupted run of this state launched and "
        f"Terraform never saved, holding their replicas' names: skyhedge-llm-r-0001 (r-0001, {key[0]}); "
        "this apply creates them again"
    ]
    assert gce.deletes() == ["skyhedge-llm-r-0001"]
    new = load_state(state_dir, "llm").replicas["r-0001"].cloud_id
    assert new not in (old, orphan) and gce.instances[key]["id"] == new
    assert engine.calls == [
        ("held", "gcp/us-central1"),  # r-0003, the scale-up's replica, is unsaved: held, never looked up
        ("apply", "gcp/us-central1"),  # 409 for r-0001
        ("held_instances", "gcp/us-central1"),
        ("apply", "gcp/us-central1"),  # once more, its name free
    ]
    again = apply_service(bigger, state_dir, engine=engine, route=False, wait=False)
    assert again.ok and again.warnings == []


def test_killed_before_terraform_wrote_its_state_the_refresh_adopts_the_instance_by_name(
    gce, spec, tmp_path, write_spec
):
    """Killed before Terraform wrote anything: its state still holds r-0001's deleted instance.
    The google provider reads an instance by name, so the next refresh takes the killed run's
    instance as r-0001's: it serves as r-0001 and is never deleted. (The scale-up's r-0003,
    inserted too and never saved, is the unsaved replica's instance, deleted before Terraform
    creates r-0003 again, as before.)"""
    bigger = load_spec(write_spec(SPEC.replace("min_replicas: 2", "min_replicas: 3"), name="bigger.yaml"))
    state_dir = tmp_path / "state"
    engine = FakeGoogleTerraform(gce)
    assert apply_service(spec, state_dir, engine=engine, route=False, wait=False).ok
    key = spot_vm_deleted(gce, state_dir, "r-0001")
    engine.kill, engine.kill_saved = "r-0001", False
    with apply_blind_to_deletes(gce), pytest.raises(KeyboardInterrupt):
        apply_service(bigger, state_dir, engine=engine, route=False, wait=False)
    orphan = gce.instances[key]["id"]
    report = apply_service(bigger, state_dir, engine=engine, route=False, wait=False)
    assert report.ok, [str(e) for e in report.errors]
    [warning] = report.warnings
    assert "skyhedge-llm-r-0003 (r-0003, " in warning and "r-0001" not in warning
    assert gce.deletes() == ["skyhedge-llm-r-0003"]
    assert load_state(state_dir, "llm").replicas["r-0001"].cloud_id == orphan == gce.instances[key]["id"]


@pytest.mark.parametrize("found", [None, "0123456789abcdef"], ids=["no-label", "another-state"])
def test_a_name_someone_else_holds_blocks_the_recreated_replica_in_one_line_and_is_never_deleted(
    gce, spec, tmp_path, found
):
    """The 409 is looked into as above, but the instance under the name is not this state's:
    never deleted, no second apply, and the error is one line with the command that deletes it
    (before: the provider's 409 text)."""
    state_dir = tmp_path / "state"
    engine = FakeGoogleTerraform(gce)
    assert apply_service(spec, state_dir, engine=engine, route=False, wait=False).ok
    zone, name = spot_vm_deleted(gce, state_dir, "r-0001")
    del engine.state["gcp/us-central1"]["r-0001"]  # as a killed apply's written state
    gce.add(zone, name, labels("r-0001", deployment=found))
    state = load_state(state_dir, "llm")
    state.extra["terraform"]["roots"]["gcp/us-central1"]["digest"] = "killed mid-apply"
    save_state(state_dir, state)
    engine.calls.clear()
    report = apply_service(spec, state_dir, engine=engine, route=False, wait=False)
    assert gce.deletes() == [] and report.warnings == []
    [error] = report.errors
    assert str(error).startswith(
        f"terraform apply failed in gcp/us-central1: r-0001: instance {name} already exists in {zone}, in no "
        "Terraform state of this service and "
    )
    assert str(error).endswith(f"gcloud compute instances delete {name} --zone {zone} --project proj-1")
    assert "alreadyExists" in error.stderr
    assert [c for c, _ in engine.calls] == ["apply", "held_instances"]


def test_no_gce_request_and_no_state_pull_unless_a_run_was_interrupted(gce, spec, tmp_path, write_spec):
    """What finds those instances costs nothing on the usual path: a fresh apply, a scale-up and
    an apply with nothing to change read no Terraform state, and ask Compute Engine only for the
    listings of the zones that hold replicas (which find a VM deleted since the last run); a fresh
    apply asks nothing at all."""
    state_dir = tmp_path / "state"
    engine = FakeGoogleTerraform(gce)
    bigger = load_spec(write_spec(SPEC.replace("min_replicas: 2", "min_replicas: 3"), name="bigger.yaml"))
    for i, s in enumerate((spec, bigger, bigger)):
        report = apply_service(s, state_dir, engine=engine, route=False, wait=False)
        assert report.ok and report.warnings == []
        if i == 0:
            assert gce.requests == []
    assert gce.requests and {(m, p.rsplit("/", 1)[-1]) for m, p in gce.requests} == {
        ("GET", "operations"),
        ("GET", "instances"),
    }
    assert [c for c, _ in engine.calls] == ["apply", "apply"]


def test_a_restarted_watcher_frees_the_name_of_a_replica_recreated_by_a_killed_run(
    gce, spec, tmp_path, write_spec
):
    """The watcher's executor does as `apply`: the 409 on a name this state's killed run holds
    deletes that instance and applies the root once more (before, the replica failed at every
    pass, was given up after 3, and the instance ran on)."""
    from skyhedge.controller.executor import TerraformExecutor
    from skyhedge.controller.loop import Controller

    bigger = load_spec(write_spec(SPEC.replace("min_replicas: 2", "min_replicas: 3"), name="bigger.yaml"))
    state_dir = tmp_path / "state"
    engine = FakeGoogleTerraform(gce)
    assert apply_service(spec, state_dir, engine=engine, route=False, wait=False).ok
    key = spot_vm_deleted(gce, state_dir, "r-0001")
    engine.kill = "r-0001"
    with apply_blind_to_deletes(gce), pytest.raises(KeyboardInterrupt):
        apply_service(bigger, state_dir, engine=engine, route=False, wait=False)
    orphan = gce.instances[key]["id"]
    ctl = Controller(bigger, state_dir, executor=TerraformExecutor(bigger, state_dir, engine=engine))
    ctl.tick()
    assert not any("apply failed" in n.text for n in ctl.notes), [n.text for n in ctl.notes]
    [note] = [n.text for n in ctl.notes if "deleted" in n.text]
    assert note.startswith("gcp us-central1: deleted 1 instance(s) of llm") and "skyhedge-llm-r-0001" in note
    new = load_state(state_dir, "llm").replicas["r-0001"].cloud_id
    assert new != orphan and gce.instances[key]["id"] == new


def test_only_a_create_refused_for_its_own_instance_name_counts_as_a_name_taken():
    def at(rid: str) -> str:
        return f'module.replicas.google_compute_instance.replica["{rid}"]'

    def taken(name: str) -> str:
        return (
            "Error creating instance: googleapi: Error 409: The resource "
            f"'projects/proj-1/zones/{ZONE}/instances/{name}' already exists, alreadyExists"
        )

    errors = [
        Diagnostic("error", taken("skyhedge-llm-r-0001"), "", at("r-0001")),
        Diagnostic("error", taken("skyhedge-llm-r-0009"), "", at("r-0002")),  # not its name
        Diagnostic("error", taken("skyhedge-llm-r-0003-x"), "", at("r-0003")),
        Diagnostic("error", "Error creating Firewall: googleapi: Error 409: already exists, alreadyExists"),
        Diagnostic(
            "error",
            "Error creating instance: googleapi: Error 503: ZONE_RESOURCE_POOL_EXHAUSTED",
            "",
            at("r-0004"),
        ),
    ]
    assert leftovers.names_taken("llm", errors) == {"r-0001"}


def test_after_a_name_conflict_nothing_terraform_holds_is_looked_up_or_deleted(gce, spec):
    """Compared by instance ID: an instance whose ID Terraform's state holds is never deleted,
    whatever its labels say, and a replica Terraform holds is not even looked up."""
    held_by_terraform = gce.add(ZONE, "skyhedge-llm-r-0001", labels("r-0001"))
    gce.add(ZONE, "skyhedge-llm-r-0002", labels("r-0002"))
    cleared = leftovers.clear_name_conflicts(
        spec,
        [record("r-0001"), record("r-0002")],
        held={"r-0002": {"7"}, "r-0009": {held_by_terraform}},
        deployment=DEPLOYMENT,
    )
    assert cleared == Cleared()
    assert gce.requests == [
        ("GET", f"/compute/v1/projects/{PROJECT}/zones/{ZONE}/instances/skyhedge-llm-r-0001")
    ]


def test_an_instance_skyhedge_records_as_its_replicas_own_is_never_deleted_after_a_name_conflict(
    gce, spec, tmp_path, write_spec
):
    """Terraform's state of a root holds none of its replicas any more (the state file lost or
    restored from an old copy, a `terraform state rm`, a backend pointed elsewhere) while each
    replica serves on the instance skyhedge read back for it. The next apply that changes the root
    (here a scale-up) creates them all again, and every create fails 409 on its name: the
    instance under it carries this state's labels and no ID Terraform holds. It is still the very
    instance skyhedge records as the replica's (its `cloud_id`): a live, serving replica, not a
    killed run's machine (one of those was never read back). It is never deleted (before: every
    replica of the root deleted at once, then created anew); the replica's error is one line
    saying so, with the command."""
    bigger = load_spec(write_spec(SPEC.replace("min_replicas: 2", "min_replicas: 3"), name="bigger.yaml"))
    state_dir = tmp_path / "state"
    engine = FakeGoogleTerraform(gce)
    assert apply_service(spec, state_dir, engine=engine, route=False, wait=False).ok
    live = load_state(state_dir, "llm").live()
    serving = {r.id: r.cloud_id for r in live}
    zones = {r.id: r.zone for r in live}
    assert sorted(serving) == ["r-0001", "r-0002"]
    engine.state["gcp/us-central1"] = {}  # Terraform's state lost

    report = apply_service(bigger, state_dir, engine=engine, route=False, wait=False)
    assert gce.deletes() == []
    assert {i["id"] for i in gce.instances.values()} >= set(serving.values())
    errors = sorted(str(e) for e in report.errors)
    assert len(errors) == 2
    for error, (rid, iid) in zip(errors, sorted(serving.items()), strict=True):
        name = f"skyhedge-llm-{rid}"
        assert error.startswith(
            f"terraform apply failed in gcp/us-central1: {rid}: instance {name} ({iid}) already exists"
        ), error
        assert "the one skyhedge recorded for the replica" in error
        assert error.endswith(
            f"gcloud compute instances delete {name} --zone {zones[rid]} --project {PROJECT}"
        )
    state = load_state(state_dir, "llm")
    assert {rid: state.replicas[rid].cloud_id for rid in serving} == serving


def test_a_service_whose_run_outgrew_the_boot_script_limit_since_its_launch_is_still_destroyed(
    gce, write_spec, tmp_path
):
    """The boot-script size check refuses launches the cloud would refuse; `destroy` launches
    nothing, and renders the running replicas only to tear them down: a `run` grown past the
    limit since (a 200 KB run.setup) must not keep the service from being destroyed."""
    state_dir = tmp_path / "state"
    engine = FakeGoogleTerraform(gce)
    assert apply_service(load_spec(write_spec(SPEC)), state_dir, engine=engine, route=False, wait=False).ok
    assert len(gce.instances) == 2
    setup = "x" * 200_000  # base64 JSON: ~267 KB, over Compute's 256 KiB metadata value
    grown = load_spec(write_spec(SPEC.replace("{command: serve}", f"{{command: serve, setup: {setup}}}")))
    report = destroy_service(grown, state_dir, engine=engine, route=False)
    assert report.ok, report.errors
    assert gce.instances == {}
