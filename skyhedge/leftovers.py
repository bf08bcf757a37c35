"""Machines an interrupted run left, and the deployment ID that tells them apart.

A run killed outright (`kill -9`, the OOM killer, a cancelled CI runner) between a cloud's create
call and Terraform saving its state leaves a machine in no Terraform state: billed, and on GCP
holding its replica's instance name, so that the next create of the replica fails. Each skyhedge
state has a deployment ID (`deployment_id`) that the clouds tag their machines with; what carries
this state's ID and no replica owns was launched by such a run, and is removed, while anything
else is only named (another state dir, a GitOps CI, a machine skyhedge read back for a replica).

Which replicas may have left a machine: recorded and never read back (`unsaved_replicas`),
re-created under their ID by this apply (`recreated_replicas`), or found gone by a watcher's event
sources (`lost_replicas`). `clear_before_apply` and `free_taken_names` free names before and
after Terraform runs; `instances_left_unsaved` sweeps after a clean apply. The cloud-specific
parts are each cloud's optional `skyhedge/clouds/<cloud>/leftovers.py` (`cloud_leftovers` finds
it): adding the check to a cloud is adding that file. `skyhedge.apply` and the controller call
these; nothing here runs unless a run was interrupted or a replica was re-created or lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from skyhedge.clouds import cloud_module
from skyhedge.clouds.common import Blocked, Cleared
from skyhedge.engine import ApplyResult, Diagnostic, Terraform
from skyhedge.errors import EngineError, first_line
from skyhedge.planner import KEEP, Plan
from skyhedge.render import RenderedRoot
from skyhedge.service import TERRAFORM_KEY
from skyhedge.spec import ServiceSpec
from skyhedge.state import ReplicaRecord, ServiceState

if TYPE_CHECKING:
    from skyhedge.apply import Workspace

__all__ = [
    "DEPLOYMENT_KEY",
    "Recreated",
    "clear_before_apply",
    "cloud_leftovers",
    "deployment_id",
    "explained",
    "free_taken_names",
    "instances_left_unsaved",
    "lost_replicas",
    "recreated_replicas",
    "unsaved_replicas",
]

#: state.extra key of the state's deployment ID (`deployment_id`).
DEPLOYMENT_KEY = "deployment"


def deployment_id(state: ServiceState) -> str:
    """This state's deployment ID, made (random, kept in the state) on first use by a run that
    applies: clouds tag what they launch with it (`RenderContext.deployment`), so that a later
    run can terminate what an interrupted run of this state launched and Terraform never saved,
    and only that (another state dir, or a GitOps CI, may run replicas of the same service name).
    The state is saved before Terraform runs, so the ID is on disk before anything carries it."""
    import re
    import secrets

    existing = state.extra.get(DEPLOYMENT_KEY)
    # (at most 63: a GCP label value's limit, and so every cloud's modules take it)
    if isinstance(existing, str) and re.fullmatch(r"[a-z0-9]{8,63}", existing):
        return existing  # (anything else was never applied: the module's validation refuses it)

    state.extra[DEPLOYMENT_KEY] = made = secrets.token_hex(8)
    return made


def cloud_leftovers(cloud: str) -> Any:
    """The cloud's `leftovers.py` (`instances_left`: machines tagged for the service that no
    Terraform state holds), or None for a cloud without one. Adding the check to a cloud is adding
    that file; this module only finds it (as `replica_logs` finds `logs.py`)."""
    if cloud in _WITHOUT_LEFTOVERS:
        return None
    module = cloud_module(cloud, "leftovers")
    if module is None:
        # a missing module is searched for afresh at every import (0.1 ms): a pass asks once per
        # replica found gone, 1,000 of them when a zone holding them all is preempted
        _WITHOUT_LEFTOVERS.add(cloud)
    return module


#: Clouds found to have no `leftovers.py` (`cloud_leftovers`).
_WITHOUT_LEFTOVERS: set[str] = set()


def unsaved_replicas(state: ServiceState) -> list[ReplicaRecord]:
    """Live replicas an earlier run recorded but never read back from Terraform, on clouds that
    can look for the machines such a run may have left (`cloud_leftovers`)."""
    return [
        r
        for r in state.live()
        if r.cloud_id is None and r.provisioned_at is None and cloud_leftovers(r.cloud) is not None
    ]


def recreated_replicas(state: ServiceState, before: Mapping[str, str | None]) -> list[ReplicaRecord]:
    """Live replicas, on clouds that can look for leftover machines (`cloud_leftovers`), that an apply
    re-created under their ID: their cloud ID in `before` (taken before Terraform ran) was another.

    Why they are looked for: Terraform re-creates a replica it holds whose machine is gone (a
    spot VM the cloud took before any watcher noticed) under the same ID. An earlier apply killed
    while it did so left the machine it launched in no Terraform state, and the replica was not
    "unsaved" (`unsaved_replicas`: skyhedge still recorded the machine the cloud took), so nothing
    looked: on AWS the apply after it launched the replica once more, and the first one billed on,
    named only by a watcher after 10 minutes. Only a replica re-created now may have such a
    machine, so a clean apply costs no cloud call (a fresh apply, a scale-up: none re-created)."""
    return [
        r
        for r in state.live()
        if before.get(r.id)
        and r.cloud_id
        and r.cloud_id != before[r.id]
        and cloud_leftovers(r.cloud) is not None
    ]


@dataclass
class Recreated:
    """The replicas applies re-created under their ID (`recreated_replicas`), collected until a
    clean apply sweeps for what a killed re-create left, and the cloud IDs they had before (never
    terminated by the sweep: `instances_left_unsaved`'s `spare`). `apply`'s step and the watcher
    each keep one."""

    replicas: list[ReplicaRecord] = field(default_factory=list)
    before: set[str] = field(default_factory=set)

    def note(self, state: ServiceState, before: Mapping[str, str | None]) -> None:
        """After an apply: `before` is each live replica's cloud ID taken before Terraform ran."""
        seen = {r.id for r in self.replicas}
        again = [r for r in recreated_replicas(state, before) if r.id not in seen]
        self.replicas += again
        self.before |= {cid for r in again if (cid := before.get(r.id))}


def lost_replicas(state: ServiceState, before: Sequence[ReplicaRecord]) -> list[ReplicaRecord]:
    """Of the replicas live in `before`, those with a recorded machine that `state` now records
    gone, on clouds that can look for leftover machines (`cloud_leftovers`): a watcher's event
    sources found their machine gone.

    Why they are looked for too: a run killed while Terraform re-created such a replica under its
    ID (`recreated_replicas`) left a machine tagged for it, in no Terraform state. A watcher
    started after that run reconciles before it applies (AWS: its first pass lists the region),
    finds the recorded machine gone and records the replica gone, so no pass re-creates it and
    the killed run's machine ran on, named only by the 10-minute warning. Looked for only once
    an apply dropped the replica from its root (`held_replicas`): Terraform holds nothing of it
    then."""
    return [
        rec
        for r in before
        if r.cloud_id
        and (rec := state.replicas.get(r.id)) is not None
        and rec.gone_at is not None
        and cloud_leftovers(rec.cloud) is not None
    ]


def instances_left_unsaved(
    spec: ServiceSpec, state: ServiceState, unsaved: Sequence[ReplicaRecord], *, spare: Iterable[str] = ()
) -> list[str]:
    """`warning:` lines for the running instances tagged for the `unsaved` replicas (recorded by an
    earlier run, never read back from Terraform; or re-created under their ID by this apply,
    `recreated_replicas`) that no live replica owns now that an apply step ran: those Terraform
    had saved were read back (their replica owns them), the rest are in no Terraform state. Those
    this state launched (its deployment tag) are terminated, but only in a region whose root's
    Terraform state was read back whole (`_read_back`): where its apply failed, an instance
    Terraform saved is owned by no replica either, and is only named. One listing per region.

    An instance skyhedge read back for a replica (a gone record's cloud ID, or one in `spare`: the
    machines re-created replicas ran on before) is never terminated either, only named: a killed
    run's instance never was read back, while one Terraform's state lost (lost, or restored from an
    older copy) and launched anew may still serve until its replacement is READY."""
    owned = {r.cloud_id for r in state.live() if r.cloud_id}
    recorded = {r.cloud_id for r in state.replicas.values() if r.cloud_id} | set(spare)
    deployment = state.extra.get(DEPLOYMENT_KEY)
    unsaved = list({r.id: r for r in unsaved}.values())
    lines: list[str] = []
    for cloud in sorted({r.cloud for r in unsaved}):
        mine = [r for r in unsaved if r.cloud == cloud]
        for region in sorted({r.region for r in mine}):
            lines += cloud_leftovers(cloud).instances_left(
                spec.name,
                {region},
                replicas={r.id for r in mine},
                owned=owned,
                again="this apply launches their replicas again; ",
                deployment=deployment,
                unread=not _read_back(state, cloud, region),
                spec=spec,
                spare=recorded - owned,
            )
    return lines


def _read_back(state: ServiceState, cloud: str, region: str) -> bool:
    """Whether every instance the root of `cloud`/`region` holds is known: its last apply was
    clean (each replica it holds read its outputs back), or it holds nothing skyhedge tracks.
    After a failed apply (digest None) the root may hold instances no record names yet."""
    roots = (state.extra.get(TERRAFORM_KEY) or {}).get("roots") or {}
    info = roots.get(f"{cloud}/{region}")
    return info is None or info.get("digest") is not None


def clear_before_apply(
    spec: ServiceSpec,
    state: ServiceState,
    plan: Plan,
    roots: Sequence[RenderedRoot],
    ws: Workspace,
    engine: Terraform,
) -> Cleared:
    """Before Terraform applies `roots`: what a cloud must clear first for the replicas an earlier
    run recorded and Terraform never saved (kept by `plan`, not new in it), through the cloud's
    optional `leftovers.clear_before_apply(spec, replicas, held=, deployment=)`. A cloud whose
    machine names are the replica's (GCP: unique per zone) needs it: a machine such a run
    launched would fail the replica's create ("already exists") at every apply.

    What Terraform's state holds is read as saved (`Terraform.held_replicas`), never refreshed: a
    replica Terraform saved before the kill is read back by the apply, not touched. A root whose
    state cannot be read is not looked at (one warning): nothing is removed on a guess."""
    earlier = {r.id for r in plan.replicas if r.action == KEEP}
    unsaved = [r for r in unsaved_replicas(state) if r.id in earlier]
    warnings: list[str] = []
    blocked: dict[str, Blocked] = {}
    for root in roots:
        mine = [r for r in unsaved if (r.cloud, r.region) == root.key]
        hook = getattr(cloud_leftovers(root.cloud), "clear_before_apply", None) if mine else None
        if hook is None:
            continue
        try:
            held = engine.held_replicas(ws.root(root.cloud, root.region))
        except EngineError as exc:
            warnings.append(
                f"{root.path}: could not read Terraform's state ({first_line(str(exc))}): machines an "
                f"interrupted run may have left for {', '.join(r.id for r in mine)} were not looked for"
            )
            continue
        cleared = hook(spec, mine, held=held, deployment=state.extra.get(DEPLOYMENT_KEY))
        warnings += cleared.warnings
        blocked.update(cleared.blocked)
    return Cleared(tuple(warnings), blocked)


def free_taken_names(
    spec: ServiceSpec,
    state: ServiceState,
    roots: Sequence[RenderedRoot],
    results: Sequence[ApplyResult | BaseException],
    ws: Workspace,
    engine: Terraform,
    again: Callable[[RenderedRoot], ApplyResult],
    *,
    blocked: Mapping[str, Blocked] | None = None,
) -> tuple[list[ApplyResult | BaseException], Cleared]:
    """After Terraform applied `roots`: where a replica's create failed because its machine name
    is taken (a cloud's optional `leftovers.names_taken(service, errors)`: GCP's 409
    alreadyExists), the cloud's `leftovers.clear_name_conflicts(spec, replicas, held=,
    deployment=)` looks at what holds the name, against the machine IDs Terraform's state holds
    (`Terraform.held_instances`, read only then), and deletes it when an interrupted run of this
    state left it there. A root where it freed a name is applied `again`, once (without a saved
    plan: the confirmed one is spent; the tree is the one confirmed), and its two results count
    as one. Replicas `clear_before_apply` already explained (`blocked`) are not looked at again.

    Returns the results (a retried root's merged) and what the clouds said (`warnings`; `blocked`:
    the replicas whose name someone else holds, explained in one line by `explained`). Nothing
    runs, and no cloud is called, unless a create failed on its name."""
    out = list(results)
    warnings: list[str] = []
    found: dict[str, Blocked] = {}
    for i, (root, result) in enumerate(zip(roots, results, strict=True)):
        if not isinstance(result, ApplyResult) or not result.errors:
            continue
        leftovers = cloud_leftovers(root.cloud)
        taken = getattr(leftovers, "names_taken", None)
        if taken is None:
            continue
        rids = sorted(taken(spec.name, result.errors) - set(blocked or {}))
        mine = [state.replicas[rid] for rid in rids if rid in state.replicas]
        mine = [r for r in mine if (r.cloud, r.region) == root.key]
        if not mine:
            continue
        try:
            held = engine.held_instances(ws.root(root.cloud, root.region), *leftovers.INSTANCE_RESOURCE)
        except EngineError as exc:
            warnings.append(
                f"{root.path}: could not read Terraform's state ({first_line(str(exc))}): what holds the "
                f"names of {', '.join(r.id for r in mine)} was not looked at"
            )
            continue
        cleared = leftovers.clear_name_conflicts(
            spec, mine, held=held, deployment=state.extra.get(DEPLOYMENT_KEY)
        )
        warnings += cleared.warnings
        found.update(cleared.blocked)
        if not cleared.freed:
            continue
        try:
            retried = again(root)
        except Exception as exc:  # noqa: BLE001 - the first result stands; the next apply creates them
            warnings.append(
                f"{root.path}: applying again once the names of {', '.join(cleared.freed)} were free "
                f"failed ({first_line(str(exc))}); the next apply creates them"
            )
            continue
        out[i] = replace(
            retried,
            add=result.add + retried.add,
            change=result.change + retried.change,
            remove=result.remove + retried.remove,
            completed=result.completed + retried.completed,
            warnings=result.warnings + retried.warnings,
        )
    return out, Cleared(tuple(warnings), found)


def explained(blocked: dict[str, Blocked], diag: Diagnostic) -> str | None:
    """The line `clear_before_apply` gave for the replica of `diag`, when Terraform's error is
    about what it found there (names it); else None (Terraform's own headline says it)."""
    found = blocked.get(diag.replica_id or "")
    return found.line if found is not None and found.evidence in diag.text else None
