"""GCE instances labelled for a service that no Terraform state holds (`skyhedge.leftovers` finds
this file per cloud: `clear_before_apply` before Terraform applies a root, `names_taken` and
`clear_name_conflicts` when a create failed on its name, `instances_left` after).

An apply killed (`kill -9`, the OOM killer, a cancelled CI runner) between Compute Engine's
insert call and Terraform saving its state leaves a running instance that Terraform's state
lacks, while skyhedge's state records its replica as never created. The module names each
instance after its replica (`skyhedge-SERVICE-r-0003`), and an instance name is unique in its
project and zone: the next apply's create of that replica failed with "googleapi: Error 409:
The resource 'projects/P/zones/Z/instances/skyhedge-SERVICE-r-0003' already exists,
alreadyExists", at every apply and every watcher pass, while the instance billed on.

What skyhedge's own state launched carries that state's ID (label `skyhedge-deployment`, set by
the apply that renders the root): before Terraform runs, such an instance that Terraform's state
does not hold is deleted (the replica is then created again under its name), and said so in a
`warning:` line. An instance holding the name without that label (a GitOps apply, another state
dir of the same service name, an instance from before the label) may be someone's live replica:
it is never deleted; the apply's failure for that replica says so in one line, with the
`gcloud` command that deletes it. After the apply, and after `destroy`, instances labelled for
the service that no live replica owns are handled the same way (`instances_left`).

A replica Terraform re-creates under its name (its spot VM deleted by GCE) is not "unsaved":
skyhedge records its deleted VM. Killed mid-create after Terraform wrote its refreshed state
(without the replica), the killed run's instance held the name and the replica's create failed
with 409 at every apply. That 409 is the trigger (`names_taken`): the instance is deleted when it
is this state's and its numeric ID is not one Terraform's state holds (`clear_name_conflicts`),
and the caller applies the root once more. (Killed before Terraform wrote anything, the
provider, which reads an instance by name, adopts the instance at the next refresh.)

A lookup or a delete that fails or times out is a warning, never the command's failure.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from skyhedge.clouds.common import Blocked, Cleared
from skyhedge.clouds.gcp import PROJECT_ENV, api_error_message, json_object, request, resolve_project
from skyhedge.clouds.gcp.events import (
    GONE_STATUSES,
    LABEL_REPLICA,
    LABEL_SERVICE,
    MAX_PAGES,
    compute_endpoint,
    default_session,
)
from skyhedge.errors import CloudError

if TYPE_CHECKING:
    from skyhedge.engine import Diagnostic
    from skyhedge.spec import ServiceSpec
    from skyhedge.state import ReplicaRecord

#: The label the gcp-replicas module puts the applying state's deployment ID in (`deployment`).
LABEL_DEPLOYMENT = "skyhedge-deployment"
#: Deleting needs more than events.py's read-only scope.
SCOPES = ("https://www.googleapis.com/auth/compute",)
#: Seconds one Compute call may take.
REQUEST_TIMEOUT = 30.0
#: Seconds to wait for the zone operations of the deletes of one call to be DONE: the name is
#: free only then. Bounded: a stuck delete must not hold the apply (its create then fails, the
#: next apply tries again).
DELETE_WAIT_SECONDS = 180.0
#: Seconds between two reads of a pending zone operation.
POLL_SECONDS = 2.0
#: A test or a caller with its own authorized session sets this.
SESSION: Any = None

__all__ = [
    "INSTANCE_RESOURCE",
    "LABEL_DEPLOYMENT",
    "clear_before_apply",
    "clear_name_conflicts",
    "instance_name",
    "instances_left",
    "names_taken",
]


def instance_name(service: str, replica_id: str) -> str:
    """The name the gcp-replicas module gives a replica's instance."""
    return f"skyhedge-{service}-{replica_id}"


def _last(link: Any) -> str:
    return link.rstrip("/").rsplit("/", 1)[-1] if isinstance(link, str) and link else ""


def _region_of(zone: str) -> str:
    return zone.rsplit("-", 1)[0]


def _delete_command(project: str, zone: str, names: Sequence[str]) -> str:
    return f"gcloud compute instances delete {' '.join(names)} --zone {zone} --project {project}"


def _project(spec: ServiceSpec | None) -> str:
    project = resolve_project(spec.gcp.project if spec is not None else None)
    if not project:
        where = f"set gcp.project in {spec.source}" if spec is not None else "set gcp.project"
        raise CloudError(f"no project ({where} or ${PROJECT_ENV[0]})")
    return project


class _Compute:
    """The few Compute Engine calls this needs, on one project (google-auth + requests, as
    events.py; `SKYHEDGE_GCP_COMPUTE_ENDPOINT` points them elsewhere)."""

    def __init__(self, project: str) -> None:
        self.project = project
        self.session = SESSION if SESSION is not None else default_session(SCOPES)
        self.base = f"{compute_endpoint()}/projects/{quote(project, safe=':')}"

    def call(
        self, method: str, path: str, params: Mapping[str, str] | None = None, *, gone_if_404: bool = True
    ) -> dict[str, Any] | None:
        """The reply's JSON object; None for a 404 (no such instance or operation). A listing
        (`gone_if_404` false) takes a 404 (an unknown project) for the error it is: nothing was
        listed, which must not read as nothing left running."""
        import requests
        from google.auth.exceptions import GoogleAuthError

        url = f"{self.base}/{path}"
        try:
            reply = request(self.session, method, url, params=params, timeout=REQUEST_TIMEOUT)
        except (requests.RequestException, GoogleAuthError) as exc:  # a token refresh can fail too
            raise CloudError(f"{method} {url}: {exc.__class__.__name__}: {exc}") from exc
        if reply.status_code == 404 and gone_if_404:
            return None
        if reply.status_code != 200:
            raise CloudError(f"{method} {url}: HTTP {reply.status_code}: {api_error_message(reply)}")
        return json_object(reply, f"{method} {url}")

    def instance(self, zone: str, name: str) -> dict[str, Any] | None:
        return self.call("GET", f"zones/{quote(zone, safe='')}/instances/{quote(name, safe='')}")

    def labelled(self, service: str) -> tuple[list[dict[str, Any]], set[str]]:
        """Every instance labelled for `service`, in every zone (one aggregated listing), each with
        `zone` as a plain zone name; and the zones the listing could not read (a scope whose
        `warning.code` is UNREACHABLE, or one named in the reply's `unreachables`, where Compute
        puts them when asked for a partial success: it lists the others, so an instance left
        running in such a zone would otherwise go unsaid).

        `returnPartialSuccess`: without it, one zone that cannot be read may fail the listing of
        every other zone, and the sweep would say nothing but "could not look"."""
        found: list[dict[str, Any]] = []
        unreachable: set[str] = set()
        params = {"filter": f"labels.{LABEL_SERVICE}={service}", "returnPartialSuccess": "true"}
        for _ in range(MAX_PAGES):
            body = self.call("GET", "aggregated/instances", params, gone_if_404=False) or {}
            scopes = body.get("items") or {}
            if not isinstance(scopes, dict):
                raise CloudError(
                    f"aggregated/instances: items: expected an object, got {type(scopes).__name__}"
                )
            dark = body.get("unreachables")
            for scope in dark if isinstance(dark, list) else []:
                unreachable.add(_last(scope) or str(scope))
            for scope, held in scopes.items():
                warning = held.get("warning") if isinstance(held, dict) else None
                if isinstance(warning, dict) and warning.get("code") == "UNREACHABLE":
                    unreachable.add(_last(scope) or str(scope))
                listed = held.get("instances") if isinstance(held, dict) else None
                for inst in listed if isinstance(listed, list) else []:
                    if isinstance(inst, dict) and isinstance(inst.get("name"), str):
                        zone = _last(inst.get("zone")) or _last(scope)
                        found.append({**inst, "zone": zone})
            token = body.get("nextPageToken")
            if not token:
                return found, unreachable
            params["pageToken"] = str(token)
        raise CloudError(f"aggregated/instances: more than {MAX_PAGES} pages; not read to its end")

    def delete(self, targets: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str | None]:
        """Delete each (zone, name) and wait, at most DELETE_WAIT_SECONDS in all, for its zone
        operation to be DONE. Returns (zone, name) -> None when deleted (or already gone), else
        why not."""
        pending: dict[tuple[str, str], str] = {}
        out: dict[tuple[str, str], str | None] = {}
        for zone, name in targets:
            try:
                op = self.call("DELETE", f"zones/{quote(zone, safe='')}/instances/{quote(name, safe='')}")
            except CloudError as exc:
                out[(zone, name)] = str(exc)
                continue
            if op is None:
                out[(zone, name)] = None  # gone already
            elif op.get("status") == "DONE":
                out[(zone, name)] = _operation_error(op)
            elif not isinstance(op.get("name"), str):
                out[(zone, name)] = "the delete's reply names no operation"
            else:
                pending[(zone, name)] = op["name"]
        deadline = time.monotonic() + DELETE_WAIT_SECONDS
        while pending:
            if time.monotonic() >= deadline:
                for key, op_name in pending.items():
                    out[key] = (
                        f"its delete (operation {op_name}) did not finish within {DELETE_WAIT_SECONDS:g} s"
                    )
                break
            time.sleep(POLL_SECONDS)
            for key, op_name in list(pending.items()):
                try:
                    op = self.call(
                        "GET", f"zones/{quote(key[0], safe='')}/operations/{quote(op_name, safe='')}"
                    )
                except CloudError as exc:
                    out[key] = f"reading its delete's operation {op_name} failed ({exc})"
                    del pending[key]
                    continue
                if op is None:
                    out[key] = f"its delete's operation {op_name} is not found"
                elif op.get("status") == "DONE":
                    out[key] = _operation_error(op)
                else:
                    continue
                del pending[key]
        return out


def _operation_error(op: Mapping[str, Any]) -> str | None:
    """Why a DONE zone operation failed, or None if it did not."""
    error = op.get("error")
    if not error:
        return None
    errors = error.get("errors") if isinstance(error, dict) else None
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        first = errors[0]
        return f"the delete failed: {first.get('code', '?')}: {first.get('message', '')}".rstrip(": ")
    return f"the delete failed: {error}"


def _whose(labels: Mapping[str, Any], service: str, rid: str, deployment: str | None) -> str | None:
    """None when `labels` are those this state's module gives replica `rid` of `service` (its
    deployment ID, service and replica): launched by this very state. Else how the instance is
    labelled, as its replica's `Blocked` line says it."""
    if (
        deployment is not None
        and labels.get(LABEL_DEPLOYMENT) == deployment
        and labels.get(LABEL_SERVICE) == service
        and labels.get(LABEL_REPLICA) == rid
    ):
        return None
    mark = labels.get(LABEL_DEPLOYMENT)
    if mark and mark == deployment:
        # this state's ID on an instance not labelled as this replica: its labels were edited,
        # so what it runs is unknown (never this state's own ID called another state's)
        return (
            f"labelled with this state's {LABEL_DEPLOYMENT} but as {LABEL_SERVICE}="
            f"{labels.get(LABEL_SERVICE, '(none)')}, "
            f"{LABEL_REPLICA}={labels.get(LABEL_REPLICA, '(none)')} (labels edited by hand?)"
        )
    return (
        f"labelled as another skyhedge state's ({LABEL_DEPLOYMENT}={mark})"
        if mark
        else f"with no {LABEL_DEPLOYMENT} label of this state"
    ) + " (another state dir, a GitOps CI, or a skyhedge from before the label may run it)"


def _someone_elses(project: str, rec: ReplicaRecord, name: str, whose: str) -> Blocked:
    return Blocked(
        f"{rec.id}: instance {name} already exists in {rec.zone}, in no Terraform state of this "
        f"service and {whose}: skyhedge leaves it alone and cannot create the replica under its "
        "name; if it is no one's, delete it and apply again: " + _delete_command(project, rec.zone, [name]),
        evidence=name,
    )


@dataclass
class _Names:
    """What holds each replica's instance name in its zone (`_look_up`)."""

    ours: dict[tuple[str, str], tuple[ReplicaRecord, dict[str, Any]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    blocked: dict[str, Blocked] = field(default_factory=dict)  # names someone else holds
    free: list[str] = field(default_factory=list)  # replicas whose name nothing holds


def _look_up(
    compute: _Compute, spec: ServiceSpec, todo: Sequence[ReplicaRecord], deployment: str | None
) -> _Names:
    """Each replica's instance name in its zone: the instances this state launched for them,
    keyed by (zone, name), are `ours`."""
    names = _Names()
    for rec in todo:
        name = instance_name(spec.name, rec.id)
        try:
            inst = compute.instance(rec.zone, name)
        except CloudError as exc:
            names.warnings.append(
                f"gcp {rec.zone}: could not look for instance {name} ({rec.id}) that an interrupted run "
                f"may have left holding its name ({exc})"
            )
            continue
        if inst is None:
            names.free.append(rec.id)
            continue
        labels = inst.get("labels") if isinstance(inst.get("labels"), dict) else {}
        whose = _whose(labels, spec.name, rec.id, deployment)
        if whose is None:
            names.ours[(rec.zone, name)] = (rec, inst)
        else:
            names.blocked[rec.id] = _someone_elses(compute.project, rec, name, whose)
    return names


def _delete_ours(
    compute: _Compute, spec: ServiceSpec, regions: str, ours: Mapping[tuple[str, str], ReplicaRecord]
) -> tuple[list[str], dict[str, Blocked], list[str]]:
    """Delete the instances an interrupted run of this state left holding their replicas' names
    (waiting for each zone operation: the name is free only then): (warnings, `Blocked` lines for
    those not deleted, replicas whose name is free now)."""
    warnings: list[str] = []
    blocked: dict[str, Blocked] = {}
    if not ours:
        return warnings, blocked, []
    outcome = compute.delete(sorted(ours))
    done = [key for key in sorted(ours) if outcome.get(key) is None]
    if done:
        warnings.append(
            f"gcp {regions}: deleted {len(done)} instance(s) of {spec.name} that an interrupted run of "
            "this state launched and Terraform never saved, holding their replicas' names: "
            + ", ".join(f"{name} ({ours[(zone, name)].id}, {zone})" for zone, name in done)
            + "; this apply creates them again"
        )
    for key in sorted(ours):
        why = outcome.get(key)
        if why is None:
            continue
        (zone, name), rid = key, ours[key].id
        warnings.append(
            f"gcp {zone}: could not delete instance {name} ({rid}) that an interrupted run of this "
            f"state launched and Terraform never saved: {why}"
        )
        blocked[rid] = Blocked(
            f"{rid}: instance {name} in {zone}, launched by an interrupted run of this state and "
            f"never saved by Terraform, still holds the replica's name ({why}); the next apply "
            f"deletes it again, or: {_delete_command(compute.project, zone, [name])}",
            evidence=name,
        )
    return warnings, blocked, [ours[key].id for key in done]


def clear_before_apply(
    spec: ServiceSpec,
    replicas: Sequence[ReplicaRecord],
    *,
    held: Iterable[str],
    deployment: str | None,
) -> Cleared:
    """Before Terraform applies one root: for each of `replicas` (recorded by an earlier run,
    never read back from Terraform) whose ID Terraform's state does not hold (`held`), the
    instance already carrying its name in its zone, which Terraform's create would collide with.

    Labelled with this state's `deployment` ID (and the service and replica): launched by an
    interrupted run of this very state, so deleted (the apply creates the replica again), one
    `warning:` line per root. Anything else holding the name is left alone: the replica is
    `blocked`, and the apply's error for it names the instance and the command that deletes it.
    A replica Terraform did save (a kill after the save) is in `held`: never looked at, the apply
    reads it back. Failures to look or to delete are warnings, never raised."""
    todo = [r for r in sorted(replicas, key=lambda r: r.id) if r.id not in set(held)]
    regions, compute = _regions_and_compute(spec, todo)
    if isinstance(compute, Cleared):
        return compute
    names = _look_up(compute, spec, todo, deployment)
    more, not_deleted, _freed = _delete_ours(
        compute, spec, regions, {k: r for k, (r, _i) in names.ours.items()}
    )
    return Cleared(tuple(names.warnings + more), {**names.blocked, **not_deleted})


#: The module's instance resource and the attribute holding its server-assigned ID
#: (`Terraform.held_instances`). Not `id` nor `self_link`: both are made of the name, the same
#: for a replica's first instance and one re-created under its name.
INSTANCE_RESOURCE = ("google_compute_instance", "instance_id")


def names_taken(service: str, errors: Iterable[Diagnostic]) -> set[str]:
    """The replicas whose create Terraform's apply reports failed because their instance name
    is taken: the google provider's `Error creating instance: googleapi: Error 409: The resource
    'projects/P/zones/Z/instances/skyhedge-NAME-r-0003' already exists, alreadyExists`."""
    return {
        rid
        for diag in errors
        if (rid := diag.replica_id)
        and "alreadyExists" in diag.text
        and f"/instances/{instance_name(service, rid)}'" in diag.text
    }


def clear_name_conflicts(
    spec: ServiceSpec,
    replicas: Sequence[ReplicaRecord],
    *,
    held: Mapping[str, set[str]],
    deployment: str | None,
) -> Cleared:
    """After Terraform's create of `replicas` failed on their instance name (`names_taken`):
    the instance holding each name, when it is this state's and Terraform's state does not hold
    it, is deleted, and the replica is `freed` (the caller applies the root once more).

    Why after the failure, not before every apply: such an instance is left by an apply killed
    while it re-created, under its ID, a replica Terraform held (its spot VM deleted by GCE),
    after Terraform had written its state without the replica (another resource of the root
    done first). skyhedge still records the deleted VM for that replica, so nothing before the
    apply sets it apart from any replica it keeps: finding it there would take a `terraform
    state pull` and a Compute request per replica at every apply. The provider's 409 names it
    exactly, at no cost until then: measured, 0 Compute requests and 0 `state pull` over a
    fresh apply, a scale-up and an apply with nothing to change. (Killed before Terraform wrote
    anything, its state still holds the replica's deleted VM, and the provider, which reads an
    instance by its name, adopts the killed run's instance at the next refresh: no 409, nothing
    to delete.)

    `held`: per replica, the instance IDs Terraform's state holds (`Terraform.held_instances`,
    read after the failed apply). A replica Terraform holds is never looked at, and an instance
    whose ID it holds is never deleted, nor one whose ID skyhedge recorded for the replica (its
    `cloud_id`: read back, so no killed run's, but the live replica's; `_recorded`). Else as
    `clear_before_apply`: an instance this state's labels do not mark as this replica's is left
    alone, and the replica's error is one line with the command that deletes it. Failures to
    look or to delete are warnings, never raised."""
    kept = {iid for ids in held.values() for iid in ids}
    todo = [r for r in sorted(replicas, key=lambda r: r.id) if r.id not in held]
    regions, compute = _regions_and_compute(spec, todo, f"the instances holding the names of {_ids(todo)}")
    if isinstance(compute, Cleared):
        return compute
    names = _look_up(compute, spec, todo, deployment)
    ours: dict[tuple[str, str], ReplicaRecord] = {}
    for key, (rec, inst) in names.ours.items():
        iid = str(inst.get("id", ""))
        if iid in kept:
            continue
        if rec.cloud_id and iid == rec.cloud_id:
            names.blocked[rec.id] = _recorded(compute.project, rec, key[1], iid)
            continue
        ours[key] = rec
    more, not_deleted, freed = _delete_ours(compute, spec, regions, ours)
    return Cleared(
        tuple(names.warnings + more), {**names.blocked, **not_deleted}, tuple(sorted([*names.free, *freed]))
    )


def _recorded(project: str, rec: ReplicaRecord, name: str, iid: str) -> Blocked:
    """The line for a name held by the very instance skyhedge read back for the replica (its
    `cloud_id`) though Terraform's state no longer holds it.

    Why it is never deleted: a killed run's instance was never read back, so this one is the
    replica's live machine, serving. Terraform lost it (its state file lost or restored from an
    older copy, a `terraform state rm`, a backend pointed elsewhere): deleting it would take every
    such replica of the root down at once, to create them anew."""
    return Blocked(
        f"{rec.id}: instance {name} ({iid}) already exists in {rec.zone} and is the one skyhedge "
        "recorded for the replica, but Terraform's state does not hold it (its state lost, or "
        "restored from an older copy?): skyhedge leaves it alone; restore Terraform's state, or "
        "delete it and apply again: " + _delete_command(project, rec.zone, [name]),
        evidence=name,
    )


def _regions_and_compute(
    spec: ServiceSpec, todo: Sequence[ReplicaRecord], what: str = "instances an interrupted run left"
) -> tuple[str, _Compute | Cleared]:
    """The regions of `todo` (as said in warnings), and a Compute client for the spec's project;
    or, instead of the client, what to return: nothing to do (no replica), or the one warning
    that the project or credentials could not be had (never raised: see the module docstring)."""
    regions = ", ".join(sorted({r.region for r in todo}))
    if not todo:
        return regions, Cleared()
    try:
        return regions, _Compute(_project(spec))
    except CloudError as exc:
        return regions, Cleared((f"gcp {regions}: could not look for {what} ({exc})",))


def _ids(records: Sequence[ReplicaRecord]) -> str:
    return ", ".join(r.id for r in records)


@dataclass(frozen=True)
class _Left:
    name: str
    zone: str
    replica: str | None

    def said(self) -> str:
        return f"{self.name} ({self.replica or 'no replica label'}, {self.zone})"


def _said(left: Sequence[_Left]) -> str:
    return ", ".join(i.said() for i in left)


def _commands(project: str, left: Sequence[_Left]) -> str:
    zones = sorted({i.zone for i in left})
    return "; ".join(_delete_command(project, z, [i.name for i in left if i.zone == z]) for z in zones)


def _owned_keys(owned: Iterable[str]) -> set[str]:
    """Instance IDs as recorded (the numeric instance ID; a self link in older states, compared
    from `projects/` on, whatever host and API version it was written with)."""
    keys: set[str] = set()
    for item in owned:
        keys.add(item)
        if "projects/" in item:
            keys.add(item[item.index("projects/") :])
    return keys


def instances_left(
    service: str,
    regions: Iterable[str],
    *,
    replicas: Iterable[str] | None = None,
    owned: Iterable[str] = (),
    again: str = "",
    deployment: str | None = None,
    unread: bool = False,
    spec: ServiceSpec | None = None,
    spare: Iterable[str] = (),
) -> list[str]:
    """`warning:` lines, per region holding instances labelled for `service` (`replicas`: only
    those labelled for these replica IDs) that are not stopped and that no live replica owns
    (`owned`: their recorded cloud IDs).

    Those labelled with `deployment` (this state's ID) were launched by an interrupted run of
    this very state: they are deleted, and the line says so. The others are named with the
    command that deletes them; `again` is said of them before it. A listing, or a delete, that
    fails is a warning too, never the command's failure. The project is the spec's, as `apply`
    finds it. `unread`: the regions' Terraform state was not read back (their apply failed), so
    an instance there may be one Terraform saved that no replica owns yet: nothing is deleted,
    and the line says why (as AWS's). `spare`: instance IDs skyhedge read back for a replica
    (an interrupted run's never were): never deleted, named in their own line (as AWS's)."""
    wanted = sorted(set(regions))
    mine = None if replicas is None else set(replicas)
    skip = _owned_keys(owned)
    kept = _owned_keys(spare)
    try:
        project = _project(spec)
        compute = _Compute(project)
        found, unreachable = compute.labelled(service)
    except CloudError as exc:
        return [f"gcp {r}: could not look for instances of {service} left running ({exc})" for r in wanted]
    out: list[str] = []
    for region in wanted:
        dark = sorted(z for z in unreachable if _region_of(z) == region)
        if dark:
            out.append(
                f"gcp {region}: could not look for instances of {service} left running in "
                f"{', '.join(dark)} (Compute answered UNREACHABLE for that zone); the next apply looks again"
            )
        ours: list[_Left] = []
        others: list[_Left] = []
        recorded: list[_Left] = []
        for inst in found:
            labels = inst.get("labels") if isinstance(inst.get("labels"), dict) else {}
            rid = labels.get(LABEL_REPLICA)
            link = str(inst.get("selfLink") or "")
            if (
                _region_of(inst["zone"]) != region
                or str(inst.get("status", "")) in GONE_STATUSES
                or (mine is not None and rid not in mine)
                or str(inst.get("id", "")) in skip
                or (link and _owned_keys([link]) & skip)
            ):
                continue
            left = _Left(inst["name"], inst["zone"], rid)
            if str(inst.get("id", "")) in kept or (link and _owned_keys([link]) & kept):
                recorded.append(left)
            elif not unread and deployment is not None and labels.get(LABEL_DEPLOYMENT) == deployment:
                ours.append(left)
            else:
                others.append(left)
        if recorded:
            out.append(
                f"gcp {region}: {len(recorded)} instance(s) of {service} that skyhedge recorded for its "
                "replicas still run, but Terraform's state no longer holds them (lost, or restored from an "
                f"older copy?) and it launched others in their place: {_said(recorded)}; not deleted (they "
                "may still serve): once the new replicas are READY, they bill until deleted: "
                + _commands(project, recorded)
            )
        if ours:
            outcome = compute.delete([(i.zone, i.name) for i in ours])
            done = [i for i in ours if outcome.get((i.zone, i.name)) is None]
            failed = [i for i in ours if outcome.get((i.zone, i.name)) is not None]
            if done:
                out.append(
                    f"gcp {region}: deleted {len(done)} instance(s) of {service} that an interrupted run of "
                    f"this state launched and Terraform never saved: {_said(done)}"
                )
            if failed:
                why = outcome[(failed[0].zone, failed[0].name)]
                out.append(
                    f"gcp {region}: {len(failed)} instance(s) of {service} that an interrupted run of this "
                    f"state launched still run, in no Terraform state: {_said(failed)}; deleting them "
                    f"failed ({why}); they bill until deleted: {_commands(project, failed)}"
                )
        if others and unread:
            out.append(
                f"gcp {region}: {len(others)} instance(s) labelled for {service} still run that no replica "
                f"owns: {_said(others)}; not deleted: the apply failed there before reading Terraform's "
                "state back, and that state may hold them; the next apply reads back those it holds, the "
                f"others bill until deleted: {_commands(project, others)}"
            )
        elif others:
            out.append(
                f"gcp {region}: {len(others)} instance(s) labelled for {service} still run, in no Terraform "
                f"state (an apply killed before Terraform saved them?): {_said(others)}; {again}they bill "
                f"until deleted: {_commands(project, others)}"
            )
    return out
