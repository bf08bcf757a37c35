"""Orchestrate one apply (or destroy) of a service: plan -> state -> render -> Terraform -> state.

    report = apply_service(spec, state_dir)          # what `skyhedge apply` runs
    report = destroy_service(spec, state_dir)        # what `skyhedge destroy` runs

Order matters for crash safety (every step is safe to repeat, and a crash between two steps
leaves state that the next apply converges from):

  1. compute_plan (policy + planner) under the service's writer lock;
  2. record it: new replicas as PROVISIONING records, deleted ones as draining, the policy's
     memory, the consumed zone events;
  3. render every root and compare each root's digest with the one last applied successfully:
     only roots whose inputs changed are applied, in parallel (one Terraform process per root);
  4. read each root's result replica by replica: endpoints and cloud IDs from the outputs,
     destroyed replicas marked gone, a launch refused for capacity marked gone ("failed") with a
     LAUNCH_FAILED zone event, after which the plan is computed again (up to `max_rounds`) so the
     policy can place that replica elsewhere. A failed apply saves no outputs, so they are read
     back with a refresh-only apply: the replicas created beside a refused one get their endpoints
     in the same pass;
  5. wait for readiness (skyhedge.probe), then bring routing up / reload it (skyhedge.routing).

A root whose apply failed keeps its old digest, so the next apply retries it.

Where things live under the state dir:

    tf/tree/                  the rendered tree (replaced atomically on every render)
    tf/data/<cloud>-<region>/ Terraform's working data for that root (TF_DATA_DIR)
    tf/state/<cloud>-<region>.tfstate   Terraform state (local backend without `path` only)
    tf/terraformrc            the empty CLI config used when the user has none
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import skyhedge
from skyhedge.clouds import QuotaRefusal, RenderContext, quota_refusal
from skyhedge.clouds.common import Blocked
from skyhedge.engine import (
    ApplyResult,
    EventCallback,
    PlanResult,
    Terraform,
    TerraformRoot,
    capacity_reason,
    run_parallel,
)
from skyhedge.errors import EngineError, RenderError, RoutingError, SpecError, first_line
from skyhedge.leftovers import (
    DEPLOYMENT_KEY,
    Recreated,
    clear_before_apply,
    cloud_leftovers,
    deployment_id,
    explained,
    free_taken_names,
    instances_left_unsaved,
    lost_replicas,
    unsaved_replicas,
)
from skyhedge.planner import CREATE, DELETE, KEEP, Plan, PlannedReplica, by_replica_id, replica_order
from skyhedge.policy.types import EventKind, Location, Market, ZoneEvent
from skyhedge.probe import probe_workers
from skyhedge.probe_store import (
    EARLIER_PROBES_KEY,
    PROBE_KEY,
    AppliedProbes,
    ProbeStore,
    applied_probes,
    earlier_revision,
    spec_probe_refused,
)
from skyhedge.render import RenderedRoot, RenderedTree, render_tree, restore_tree, snapshot_tree, write_tree
from skyhedge.routing.cuts import gone_cut_note
from skyhedge.service import (
    GITOPS_KEY,
    TERRAFORM_KEY,
    Placement,
    check_cloud_sections,
    compute_plan,
    outdated_replicas,
    remember_decision,
    resolve_placement,
    set_gitops,
)
from skyhedge.spec import ReadinessProbe, ServiceSpec, readiness_probe_json, revision_digests
from skyhedge.state import (
    QUOTA_KEY,
    ROLLOUT_KEY,
    STATE_FILE,
    ReplicaRecord,
    ServiceState,
    load_state,
    private_dir,
    save_state,
    writer_lock,
)

__all__ = [
    "ApplyReport",
    "DestroyReport",
    "LaunchFailure",
    "Workspace",
    "absorb_result",
    "apply_service",
    "changed_roots",
    "destroy_service",
    "instance_types",
    "live_rows",
    "record_plan",
    "committed_roots",
    "roots_with_resources",
    "wait_ready",
]

EXTRA_KEY = TERRAFORM_KEY
#: GitOps: how long a root emptied by a commit stays rendered (empty) for CI to apply it.
EMPTIED_ROOT_HOLD_SECONDS = 7 * 24 * 3600.0
PLAN_FILE = "skyhedge.tfplan"

Confirm = Callable[[Plan, Sequence[RenderedRoot], dict[str, PlanResult]], bool]
Clock = Callable[[], float]
Say = Callable[[str], None]


# ------------------------------------------------------------------------------------------------
# Where a service's Terraform lives


class Workspace:
    """The paths of one service's Terraform under its state dir, and how to run each root."""

    def __init__(self, spec: ServiceSpec, state_dir: Path) -> None:
        self.spec = spec
        self.state_dir = Path(state_dir).resolve()
        self.tf_dir = self.state_dir / "tf"
        self.tree_dir = self.tf_dir / "tree"

    def context(self, state: ServiceState | None = None, *, tree_dir: Path | None = None) -> RenderContext:
        """What the clouds need to render this workspace's roots; with the `state` that will
        apply them, its deployment ID too (`deployment_id`; the tree of `render` carries none);
        with `tree_dir`, for a tree written there to be applied elsewhere (`render --out`,
        GitOps), which names no path of this machine (`RenderContext.portable_path`)."""
        try:
            workdir = self.spec.run.workdir or Path.cwd().resolve()
        except FileNotFoundError:
            # a watcher whose directory was deleted under it: each pass says why in one line
            # (local replicas start there), not a FileNotFoundError from deep in the pass
            raise RenderError(
                "the current directory no longer exists: local replicas are started in it; "
                "restart skyhedge from an existing directory"
            ) from None
        return RenderContext(
            state_dir=self.state_dir,
            workdir=workdir,
            python=sys.executable,
            pythonpath=str(Path(skyhedge.__file__).resolve().parent.parent),
            deployment=None if state is None else state.extra.get(DEPLOYMENT_KEY),
            tree_dir=tree_dir,
        )

    def root(self, cloud: str, region: str) -> TerraformRoot:
        slug = f"{cloud}-{region}"
        extra: tuple[str, ...] = ()
        if self.spec.terraform.backend == "local" and not self.spec.terraform.config.get("path"):
            extra = (f"path={self.tf_dir / 'state' / f'{slug}.tfstate'}",)
        data_dir = self.tf_dir / "data" / slug
        reconfigure, refused = False, None
        if extra:
            # the state file is the state dir's own: a moved or restored state dir names it anew
            # (never when the backend `init` recorded is another: its state must be migrated)
            reconfigure, copied = _own_backend_recorded(data_dir, self.tf_dir / "state" / f"{slug}.tfstate")
            if copied is not None:
                refused = (
                    f"{self.state_dir}: the Terraform state of {cloud}/{region} is a copy of {copied}'s, "
                    "which is still there and records the same machines: two state dirs must not manage "
                    f"one set of replicas; use {copied}, or, if this copy replaces it, delete {copied} first"
                )
        return TerraformRoot(
            path=self.tree_dir / cloud / region,
            name=f"{cloud}/{region}",
            data_dir=data_dir,
            backend_config=extra,
            reconfigure=reconfigure,
            refused=refused,
        )

    def plan_file(self, cloud: str, region: str) -> Path:
        """Where `apply` keeps the saved plan the user confirmed (applied as is)."""
        return self.tf_dir / "data" / f"{cloud}-{region}" / PLAN_FILE

    def engine(self, terraform_bin: str | None = None) -> Terraform:
        return Terraform(home=self.tf_dir, binary=terraform_bin)

    def write_tree(self, tree: RenderedTree) -> None:
        """Write `tree` as the state's tree (`tf/tree`), in a `tf/` only the owner can open: its
        tfvars, saved plans and local Terraform state hold the `run.env` values (`private_dir`).
        Nobody keeps files of their own there, so a file skyhedge did not render is dropped, not
        refused (`strict=False`): a watcher's pass never stops on one."""
        try:
            private_dir(self.tf_dir)
        except OSError as exc:
            why = exc.strerror or exc
            raise RenderError(f"{self.tf_dir}: cannot write the rendered tree ({why})") from exc
        write_tree(tree, self.tree_dir, strict=False)


def _own_backend_recorded(data_dir: Path, state_file: Path) -> tuple[bool, Path | None]:
    """Whether `terraform init` may take the state dir's own local state file `state_file` as the
    root's backend as it is now (`-reconfigure`), and the state dir this one is a copy of, if so.

    `-reconfigure` only when the backend `init` last recorded (`<data dir>/terraform.tfstate`) is
    a state dir's own file `tf/state/<name>` too: this one's before it was moved or restored
    elsewhere (or none is recorded yet). Why: after the spec named another backend (an S3 bucket,
    a `terraform.config.path`) and then none, `-reconfigure` forgot that state without a word,
    planned from the state dir's own (empty) one and launched every replica again beside the
    running ones (VMs no state records any more); Terraform's "Backend configuration changed"
    refusal says to migrate it. And a state file recorded at another path that is still there,
    holding resources, is the original's of a copy (`cp -a`, a backup restored next to it): both
    would manage the same machines (the copy's apply replacing or destroying the original's)."""
    try:
        recorded = json.loads((data_dir / "terraform.tfstate").read_text(encoding="utf-8"))["backend"]
    except (OSError, ValueError, KeyError, TypeError):
        return True, None  # nothing (readable) recorded: `init` records it afresh (or says why it cannot)
    config = recorded.get("config") if isinstance(recorded, dict) else None
    path = config.get("path") if isinstance(config, dict) else None
    if recorded.get("type") != "local" or not isinstance(path, str):
        return False, None
    old = Path(path)
    if old.parts[-3:] != ("tf", "state", state_file.name):
        return False, None
    if old == state_file:
        return True, None
    try:
        if os.path.samefile(old, state_file):  # this very file under another name (a bind mount)
            return True, None
        held = json.loads(old.read_text(encoding="utf-8")).get("resources")
    except (OSError, ValueError, AttributeError):
        return True, None  # gone with the old path: moved
    return True, (old.parent.parent.parent if held else None)


# ------------------------------------------------------------------------------------------------
# What Terraform holds, per root, as far as skyhedge knows (in state.extra["terraform"])


def _tracked(state: ServiceState) -> dict[str, dict[str, Any]]:
    return state.extra.setdefault(EXTRA_KEY, {}).setdefault("roots", {})


def _root_key(path: str) -> tuple[str, str]:
    cloud, region = path.split("/", 1)
    return cloud, region


def committed_roots(state: ServiceState) -> dict[str, dict[str, Any]]:
    """GitOps: per root path, the replica IDs of the last committed tree (`replicas`) and, for a
    root a commit emptied, when (`emptied_at`). Read-only view: {} when there are none."""
    info = state.extra.get(GITOPS_KEY)
    roots = info.get("roots") if isinstance(info, dict) else None
    return roots if isinstance(roots, dict) else {}


def held_replicas(state: ServiceState) -> dict[str, set[str]]:
    """Per root path, the replica IDs its last apply (or, GitOps, its last commit) holds: what
    Terraform destroys with the root, gone from the state or not. Read-only."""
    info = state.extra.get(EXTRA_KEY)
    applied = info.get("roots") if isinstance(info, dict) else None
    held: dict[str, set[str]] = {}
    for roots in (applied if isinstance(applied, dict) else {}, committed_roots(state)):
        for path, root in roots.items():
            ids = root.get("replicas") if isinstance(root, dict) else None
            if isinstance(ids, list):
                held.setdefault(path, set()).update(rid for rid in ids if isinstance(rid, str))
    return held


def roots_with_resources(state: ServiceState, now: float | None = None) -> set[tuple[str, str]]:
    """Roots whose Terraform state may still hold replicas (so they must stay rendered).

    Applied roots stay until an apply has emptied them. Committed ones (GitOps) get no word back
    from CI: a root a commit emptied stays rendered, empty, for EMPTIED_ROOT_HOLD_SECONDS after
    `now`'s commit, so that CI applies it (destroying what ran there) however late or batched its
    runs are; `now` None keeps it."""
    keys = {
        _root_key(p) for p, info in _tracked(state).items() if info.get("replicas") or not info.get("digest")
    }
    for path, info in committed_roots(state).items():
        if not isinstance(info, dict):
            continue
        emptied = info.get("emptied_at")
        held = isinstance(emptied, (int, float)) and (
            now is None or now - float(emptied) < EMPTIED_ROOT_HOLD_SECONDS
        )
        if info.get("replicas") or held:
            keys.add(_root_key(path))
    return keys


def instance_types(state: ServiceState, placement: Placement | None) -> dict[str, str]:
    """Instance type per cloud: the placement's, else the one recorded on a replica (a cloud the
    spec no longer allows still needs its root rendered, to destroy what runs there)."""
    types = {r.cloud: r.instance_type for r in state.replicas.values() if r.instance_type}
    if placement is not None:
        types.update(placement.instance_types)
    return types


def changed_roots(state: ServiceState, tree: RenderedTree) -> list[RenderedRoot]:
    tracked = _tracked(state)
    return [r for r in tree.roots if tracked.get(r.path, {}).get("digest") != r.digest]


# ------------------------------------------------------------------------------------------------
# Reports


@dataclass(frozen=True)
class LaunchFailure:
    """A launch refused for capacity or quota: `message`, the cloud's own words; `quota`, what they
    say of an account quota used up (its cloud's `quota.py`), None for a zone out of capacity."""

    replica_id: str
    location: Location
    market: str
    message: str
    quota: QuotaRefusal | None = None


@dataclass
class ApplyReport:
    plan: Plan | None = None
    cancelled: bool = False
    rounds: int = 0
    applied_roots: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    launch_failures: list[LaunchFailure] = field(default_factory=list)
    errors: list[EngineError] = field(default_factory=list)
    ready: list[str] = field(default_factory=list)
    not_ready: list[str] = field(default_factory=list)
    #: how long `not_ready` were waited on (seconds): the longest `initial_delay_seconds` of the
    #: probes of the replicas waited on, a kept probe's among them (not always the spec's)
    not_ready_after: float | None = None
    # replicas whose process died while the apply waited for them to be READY (local: recorded
    # gone at once, rather than waited on for the rest of the probe's initial delay)
    exited: list[str] = field(default_factory=list)
    # ... and those of them a spot market took back (`skyhedge preempt`): not in `exited`, whose
    # error points at the logs, which tell nothing of a preemption
    preempted: list[str] = field(default_factory=list)
    router: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    rollout_steps: int = 0  # steps that changed something (more than one: a rolling update)
    rollout_stopped: str | None = None  # why a rolling update stopped short of the end
    warnings: list[str] = field(default_factory=list)  # `warning:` lines (instances left running)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.cancelled


# ------------------------------------------------------------------------------------------------
# Recording a plan and a root's result in state


def reopen_unfinished_deletes(state: ServiceState, *, keep: Iterable[str] = ()) -> list[str]:
    """Clear `draining` on replicas a killed run left marked for deletion; returns their IDs.

    A delete is recorded (draining) before Terraform runs and settled by the result; a run
    killed in between (kill -9, OOM) leaves the mark, and a draining replica is one neither the
    policy nor the rolling update looks at any more: it stayed SHUTTING_DOWN, serving nothing,
    for good. Called at the start of a run that holds the writer lock, when any mark is such a
    leftover, so the next plan decides again. Interruption warnings keep theirs (the replica
    still serves until the cloud takes it), and so do the IDs in `keep` (a watcher's drains in
    progress: their replicas wait, out of the router, for their requests to end)."""
    warned = state.extra.get("warned")
    kept = set(keep) | (set(warned) if isinstance(warned, dict) else set())
    reopened = [r.id for r in state.live() if r.draining and r.id not in kept]
    for rid in reopened:
        state.replicas[rid].draining = False
    return sorted(reopened, key=replica_order)


def notice_dead_local_replicas(
    state: ServiceState, state_dir: Path, now: float, *, skip: Iterable[str] = ()
) -> list[str]:
    """Record local replicas whose process died since the state was written (a preemption, a
    crash) as gone; returns one line per replica. Without a watcher nothing else would notice:
    Terraform's refresh cannot (a `terraform_data` launch has no remote object to read), so
    `apply` said "No changes" and kept routing to the dead replica. (VMs deleted outside
    skyhedge: `notice_gone_replicas`.) Replicas in `skip` are not judged."""
    skipped = set(skip)
    live = [r for r in state.live() if r.id not in skipped]
    if not any(r.cloud == "local" for r in live):
        return []
    from skyhedge.clouds.local.events import LocalEventSource
    from skyhedge.controller.facts import ingest
    from skyhedge.events import Signal

    source = LocalEventSource(state_dir, {r.zone: r.region for r in live if r.cloud == "local"})
    try:
        gone = [e for e in source.poll(now, live) if e.signal is Signal.GONE]
    finally:
        source.close()
    return ingest(state, gone, now)


def record_plan(
    state: ServiceState, plan: Plan, memory: dict[str, Any], placement: Placement, now: float
) -> None:
    """Act on `plan` in state: new records for creates, draining for deletes, policy memory kept.

    A kept replica recorded before revisions existed (`revision` null) gets the revision its root
    is rendered with from now on: without it, that revision followed the spec, so every `run`
    change changed the local module's replacement triggers of all such replicas at once (measured
    after an upgrade: `plan` said "2 to keep", Terraform restarted both, and 1,844 of 2,158
    requests failed), where a recorded revision makes them outdated and rolls them one by one."""
    remember_decision(state, memory, now)
    state.pending_events.clear()  # the policy has seen them; its memory now holds their effect
    state.next_id = max(state.next_id, plan.next_id)
    for r in plan.replicas:
        if r.action == CREATE and r.id not in state.replicas:
            state.replicas[r.id] = ReplicaRecord(
                id=r.id,
                cloud=r.location.cloud,
                region=r.location.region,
                zone=r.location.zone,
                market=r.market.value,
                launched_at=now,
                instance_type=placement.instance_types.get(r.location.cloud),
                revision=r.revision or None,
            )
        elif r.action == DELETE and r.id in state.replicas:
            state.replicas[r.id].draining = True
        elif r.action == KEEP and r.revision and (rec := state.replicas.get(r.id)) and rec.revision is None:
            rec.revision = r.revision
    # The rolling update `status` shows (`rollout`, which the watcher keeps): only the replicas
    # this plan still replaces. An `apply` that left none (the spec reverted, or the update
    # finished by it) left the watcher's record naming live replicas, which `status` then showed
    # being replaced, STALLED, for as long as they ran.
    rollout = state.extra.get(ROLLOUT_KEY)
    if isinstance(rollout, dict):
        # (in launch order, as the watcher keeps them: `planner.replica_order`, never as text)
        kept = sorted((r.id for r in plan.replicas if r.outdated and r.action != DELETE), key=replica_order)
        if kept:
            rollout["replicas"] = kept
        else:
            state.extra.pop(ROLLOUT_KEY)
    if plan.has_changes:
        state.log(
            {
                "event": "plan",
                "at": now,
                "policy": plan.policy,
                "target": plan.target,
                "create": [r.id for r in plan.replicas if r.action == CREATE],
                "delete": [r.id for r in plan.replicas if r.action == DELETE],
            }
        )


def absorb_result(
    state: ServiceState, root: RenderedRoot, result: ApplyResult | None, now: float, *, revision: str
) -> list[LaunchFailure]:
    """Update the records of `root`'s replicas from one apply (complete, partial or failed).

    `revision` is the one the applied spec gives `root`'s replicas (`replica_revision(spec,
    root.cloud)`): a replica Terraform (re)created here records it, whatever revision it had.
    A root launches every replica with the spec it was rendered from (the local module's `run`,
    a VM's user data), so a kept replica Terraform re-created under its ID (a launch of a failed
    update left it tainted, a spot VM gone) runs that spec. Recorded under its old revision, the
    launch of a broken update re-created by the `apply` reverting it stayed "outdated", probed
    with the broken version's probe, never READY, and the next update's rolling step waited on
    it for good: "3 replica(s) still run an older spec", nothing created."""
    tracked = _tracked(state)
    in_root = [rec for rec in state.replicas.values() if (rec.cloud, rec.region) == root.key]
    desired = set(root.replicas)
    failures: list[LaunchFailure] = []
    if result is None:  # Terraform did not even run to completion: nothing is known to have changed
        for rec in in_root:
            if rec.gone_at is None and rec.id not in desired:
                rec.draining = False  # still there; the next plan decides again
        entry = tracked.setdefault(root.path, {})
        entry["digest"] = None
        entry["replicas"] = sorted(set(entry.get("replicas", [])) | desired)
        return failures
    errors = {d.replica_id: d for d in result.errors if d.replica_id}
    done = {c.replica_id: c.action for c in result.completed if c.replica_id}
    launched = {c.replica_id for c in result.completed if c.replica_id and c.action in {"create", "replace"}}
    outputs = (result.outputs or {}).get("replicas") or {}
    for rec in in_root:
        if rec.id in desired and rec.gone_at is None:
            diag = errors.get(rec.id)
            if diag is not None:
                if diag.capacity and rec.provisioned_at is None:
                    rec.gone_at, rec.reason = now, "failed"
                    state.record_event(ZoneEvent(EventKind.LAUNCH_FAILED, rec.location, now, rec.id))
                    said = f"{diag.summary}\n{diag.detail}"
                    quota = quota_refusal(
                        rec.cloud, said, region=rec.region, market=rec.market, instance_type=rec.instance_type
                    )
                    why = capacity_reason(diag)
                    failures.append(LaunchFailure(rec.id, rec.location, rec.market, why, quota))
                continue
            if rec.id in outputs:
                out = dict(outputs[rec.id] or {})
                if rec.cloud_id is not None and out.get("cloud_id") != rec.cloud_id:
                    # Replaced (its command or env changed): a new process that must become ready again.
                    rec.provisioned_at, rec.ready_at, rec.not_ready_since = now, None, None
                rec.endpoint = out.get("endpoint")
                rec.cloud_id = out.get("cloud_id")
                rec.outputs = out
                if rec.provisioned_at is None:
                    rec.provisioned_at = now
            elif done.get(rec.id) in {"create", "replace"} and rec.provisioned_at is None:
                rec.provisioned_at = now  # created; the outputs could not be read back
            if rec.id in launched:
                rec.revision = revision
            if rec.id in launched and rec.provisioned_at is not None:
                _lift_quota(state, rec)
        elif rec.id not in desired:
            destroyed = result.ok or done.get(rec.id) == "delete"
            if rec.gone_at is None:
                if destroyed:
                    rec.gone_at, rec.reason, rec.draining = now, "terminated", False
                    state.log({"event": "terminated", "at": now, "replica_id": rec.id})
                else:
                    rec.draining = False  # still there; the next plan decides again
            if destroyed:
                rec.outputs = {}
    if result.ok:
        if outputs:
            tracked[root.path] = {"digest": root.digest, "replicas": sorted(outputs)}
        else:
            tracked.pop(root.path, None)
    else:
        entry = tracked.setdefault(root.path, {})
        entry["digest"] = None
        entry["replicas"] = sorted(
            (set(entry.get("replicas", [])) | desired | set(done))
            - {rid for rid, action in done.items() if action == "delete"}
        )
    return failures


def _lift_quota(state: ServiceState, rec: ReplicaRecord) -> None:
    """A launch that succeeded where the watcher had found the account's quota used up: the quota
    has room now (raised, or freed), so `status` stops naming it. Here, in the path `apply` and
    the watcher share: an `apply` that launched there left the `Quota:` line (and, for the next
    watcher, its pause) in place, since only the watcher's own launches lifted it."""
    table = state.extra.get(QUOTA_KEY)
    if not isinstance(table, dict):
        return
    for key in (f"{rec.cloud}/{rec.region}/{rec.market}", f"{rec.cloud}/*/{rec.market}"):
        table.pop(key, None)
    if not table:
        state.extra.pop(QUOTA_KEY, None)


# ------------------------------------------------------------------------------------------------
# Readiness and routing (their modules are owned by the probe/routing code; imported lazily)


#: How often (seconds) `wait_ready` asks whether a replica it waits on has died.
DIED_CHECK_SECONDS = 1.0


def _probe_fn() -> Callable[..., bool]:
    from skyhedge.probe import probe

    return probe


def _readiness_of(
    spec: ServiceSpec, earlier: Mapping[str, ReadinessProbe] | None
) -> Callable[[ReplicaRecord], ReadinessProbe]:
    """Each replica's readiness probe: the spec's, but an outdated replica's is the one of the
    spec it was launched under when one is kept (`earlier`: `probe_store.applied_probes`), as the
    watcher chooses (`earlier_revision`). Probed with the spec's (the new version's health path),
    the replicas still serving the old version failed it mid rolling update."""
    kept = earlier or {}
    current: dict[str, str] = {}

    def of(rec: ReplicaRecord) -> ReadinessProbe:
        rev = earlier_revision(rec, kept, spec, current)
        return spec.readiness_probe if rev is None else kept[rev]

    return of


def _probe_each(
    pool: ThreadPoolExecutor,
    probe: Callable[..., bool],
    readiness_of: Callable[[ReplicaRecord], ReadinessProbe],
    records: Sequence[ReplicaRecord],
) -> list[bool]:
    """The readiness probe of every record (`readiness_of` it), concurrently, in their order."""

    def one(rec: ReplicaRecord) -> bool:
        readiness = readiness_of(rec)
        return probe(rec.endpoint, readiness, timeout=readiness.timeout_seconds)

    return list(pool.map(one, records))


def _waited_on(state: ServiceState) -> list[ReplicaRecord]:
    """The replicas `wait_ready` waits on: live, with an endpoint, not READY yet, not released."""
    return [r for r in state.live() if r.endpoint and r.ready_at is None and not r.draining]


def readiness_wait(
    spec: ServiceSpec, state: ServiceState, earlier: Mapping[str, ReadinessProbe] | None = None
) -> float:
    """How long `wait_ready` waits by default: the longest `initial_delay_seconds` of the probes
    of the replicas it waits on (an outdated one's is its kept probe's, `earlier`). `apply` says
    it in its "not ready after Ns" line, which showed the spec's delay when a longer one applied."""
    readiness = _readiness_of(spec, earlier)
    return float(max((readiness(r).initial_delay_seconds for r in _waited_on(state)), default=0))


def wait_ready(
    spec: ServiceSpec,
    state: ServiceState,
    *,
    clock: Clock = time.time,
    timeout: float | None = None,
    interval: float = 0.25,
    probe: Callable[..., bool] | None = None,
    died: Callable[[float, Sequence[str]], list[str]] | None = None,
    earlier: Mapping[str, ReadinessProbe] | None = None,
) -> tuple[list[str], list[str]]:
    """Probe live replicas that are not READY yet until they are, or `timeout` (default: the
    longest `initial_delay_seconds` of their probes) passes. Returns (became ready, still not
    ready). An outdated replica is probed with its revision's kept probe (`earlier`), as the
    watcher probes it (`_readiness_of`).

    `died(now, pending IDs)`, asked at most every DIED_CHECK_SECONDS, records replicas known to
    be dead as gone in `state` (`notice_dead_local_replicas`) and returns a line for each: they are
    waited on no longer. A model server that crashes while loading would otherwise hold the apply
    for the rest of the initial delay (often 10 min for an LLM) before "not ready" said anything.
    It is asked too, about those that passed, before a pass counts: a local replica whose port
    another service's replica took passed by that one's answer (`foreign_listeners`)."""
    probe = probe or _probe_fn()
    readiness = _readiness_of(spec, earlier)
    pending = {r.id: r for r in _waited_on(state)}
    limit = readiness_wait(spec, state, earlier) if timeout is None else float(timeout)
    deadline = time.monotonic() + limit
    ready: list[str] = []
    checked = time.monotonic()  # (the launch itself just checked the processes' first moments)
    with ThreadPoolExecutor(max_workers=probe_workers(len(pending))) as pool:
        while pending:
            if died is not None and time.monotonic() - checked >= DIED_CHECK_SECONDS:
                checked = time.monotonic()
                died(clock(), sorted(pending, key=replica_order))
                for rid in [rid for rid in pending if state.replicas[rid].gone_at is not None]:
                    del pending[rid]
                if not pending:
                    break
            recs = list(pending.values())
            results = _probe_each(pool, probe, readiness, recs)
            passed = [rec.id for rec, ok in zip(recs, results, strict=True) if ok]
            if passed and died is not None:
                # a pass is taken only from a replica still its port's: one whose port another
                # service's replica took while it loaded passed by that one's answer (`died`
                # records it gone: `LocalEventSource.poll`), and apply routed to the other's model
                died(clock(), passed)
            for rec, ok in zip(recs, results, strict=True):
                if state.replicas[rec.id].gone_at is not None:
                    pending.pop(rec.id, None)
                elif ok:
                    rec.ready_at, rec.not_ready_since = clock(), None
                    ready.append(rec.id)
                    del pending[rec.id]
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(interval)
    return sorted(ready, key=replica_order), sorted(pending, key=replica_order)


def _upstreams(state: ServiceState) -> list[Any]:
    from skyhedge.routing import Upstream

    return [
        Upstream(r.id, r.endpoint)
        for r in sorted(state.live(), key=lambda r: r.id)
        if r.endpoint and r.ready_at is not None and r.not_ready_since is None and not r.draining
    ]


def _router(spec: ServiceSpec, state_dir: Path) -> Any | None:
    try:
        from skyhedge.routing import Router
    except ImportError:
        return None
    return Router(spec, state_dir)


def drain_before_destroy(spec: ServiceSpec, state: ServiceState, state_dir: Path, say: Say) -> None:
    """If routing is up and replicas are about to go, route around them first (drain)."""
    if state.router is None or not any(r.draining for r in state.live()):
        return
    router = _router(spec, state_dir)
    if router is None or router.pid() is None:
        return
    draining = [r.id for r in sorted(state.live(), key=by_replica_id) if r.draining]
    say(f"draining {', '.join(draining)} from the router")
    ups = _upstreams(state)
    served = routed_pairs(state)
    router.drain(ups, timeout=30.0)
    state.extra["routed"] = [[u.id, u.endpoint] for u in ups]  # what it serves now (as the watcher's)
    note_unrouted(state, served, ups)


def routed_pairs(state: ServiceState) -> list[Sequence[Any]]:
    """`extra.routed`: the (ID, endpoint) pairs the router was last given (a hand edit: none)."""
    served = state.extra.get("routed")
    if not isinstance(served, list):
        return []
    return [p for p in served if isinstance(p, (list, tuple)) and len(p) == 2]


#: `state.extra` key: `{replica_id: endpoint}` of replicas taken out of the router alive (not READY,
#: a failed probe), whose nginx connections are cut once they are known gone. The watcher keeps the
#: same table (`Controller._sever_gone_unrouted`); `routing reload`/`up` and `apply` keep it too, so
#: whichever runs after the replica is recorded gone cuts what still waits on it.
UNROUTED_KEY = "unrouted"


def note_unrouted(state: ServiceState, served: Iterable[Sequence[Any]], routed: Iterable[Any]) -> list[str]:
    """Record in `extra.unrouted` the replicas of `served` ((ID, endpoint) pairs routed before) that
    the reload to `routed` (Upstreams) took out alive: not gone, not draining, on the same endpoint.
    Drop the ones routed again at that endpoint. Returns the IDs recorded now.

    Why not cut them at once: a replica that fails its probe may still finish its requests in
    flight: busy, or shutting down gracefully, where its port already refuses connections
    (measured: local-echo SIGTERMed, its probe refused, the 2 requests nginx had on it answered
    200 by it, in full). One whose process died has no connection left to cut (its kernel reset
    them: measured, 0 of 2 left right after a SIGKILL). One that
    vanished (a VM: no reset) is cut once it is recorded gone, by whichever of `routing reload`,
    `apply` or the watcher runs then (`cut_gone_connections`)."""
    now = {(str(u.id), str(u.endpoint)) for u in routed}
    now_ids = {rid for rid, _ in now}
    now_eps = {ep for _, ep in now}
    raw = state.extra.get(UNROUTED_KEY)
    table = {str(k): v for k, v in raw.items() if isinstance(v, str) and v} if isinstance(raw, dict) else {}
    added: list[str] = []
    for pair in served:
        rid, endpoint = str(pair[0]), str(pair[1] or "")
        rec = state.replicas.get(rid)
        if (
            endpoint
            and rid not in now_ids
            and endpoint not in now_eps
            and rec is not None
            and rec.gone_at is None
            and not rec.draining
            and rec.endpoint == endpoint
        ):
            table[rid] = endpoint
            added.append(rid)
    # Routed again at the endpoint it was taken out at: nothing to cut. Routed again at another one
    # (a machine re-created under its ID), the one taken out is gone: `_gone_unrouted` cuts it.
    for rid, endpoint in now:
        if table.get(rid) == endpoint:
            del table[rid]
    if table:
        state.extra[UNROUTED_KEY] = dict(sorted(table.items()))
    else:
        state.extra.pop(UNROUTED_KEY, None)
    return sorted(added, key=replica_order)


def _gone_unrouted(state: ServiceState) -> dict[str, str]:
    """Take out of `extra.unrouted` the replicas now gone (or forgotten, or moved to another
    endpoint); returns their old endpoint -> ID, less any endpoint a live replica has now."""
    raw = state.extra.get(UNROUTED_KEY)
    if not isinstance(raw, dict):
        return {}
    live_eps = {str(r.endpoint) for r in state.live() if r.endpoint}
    gone: dict[str, str] = {}
    for rid, endpoint in list(raw.items()):
        rec = state.replicas.get(str(rid))
        if rec is not None and rec.gone_at is None and rec.endpoint == endpoint:
            continue
        del raw[rid]
        if isinstance(endpoint, str) and endpoint and endpoint not in live_eps:
            gone[endpoint] = str(rid)
    if not raw:
        state.extra.pop(UNROUTED_KEY, None)
    return gone


def cut_gone_connections(
    router: Any, state: ServiceState, served: Iterable[Sequence[Any]], say: Say, warn: Say
) -> int:
    """Close the router's connections to the replicas of `served` ((ID, endpoint) pairs it routed
    to before) that are gone now (destroyed, preempted, forgotten) or moved to another endpoint (a
    machine replaced under its ID), once it no longer routes to them; returns how many closed.

    Why: a cloud VM that is deleted or vanishes sends no TCP reset, so nginx's requests in flight
    on it (a drain that timed out, a replica Terraform replaced) waited for `read_timeout` (600 s
    by default) after `apply` or `routing reload` took it out. Cut (`Router.sever`), each is
    retried on another replica at once, as the watcher does (`Controller._sever`). Replicas still
    there are not touched (a local replica's killed process reset its connections already: none
    are left to close). Being refused the cut (see docs/routing.md) is one `warn` line: those
    requests wait as before, and the command goes on. Replicas taken out earlier while alive
    (`note_unrouted`) and gone since are cut too."""
    dead: dict[str, str] = _gone_unrouted(state)
    for pair in served:
        rid, endpoint = str(pair[0]), str(pair[1] or "")
        rec = state.replicas.get(rid)
        if endpoint and (rec is None or rec.gone_at is not None or rec.endpoint != endpoint):
            dead[endpoint] = rid
    if not dead or router is None or router.pid() is None:
        return 0
    serving = {str(u.get("endpoint")) for u in router.status().get("upstreams", []) if isinstance(u, dict)}
    dead = {ep: rid for ep, rid in dead.items() if ep not in serving}
    if not dead:
        return 0
    try:
        closed = int(router.sever(sorted(dead)))
    except RoutingError as exc:
        warn(f"routing: {exc}")
        return 0
    if closed:
        ids = ",".join(sorted(set(dead.values()), key=replica_order))
        options = getattr(getattr(router, "spec", None), "service", None)
        say(gone_cut_note(closed, ids, getattr(options, "router", None)))
    return closed


def bring_routing_up(
    spec: ServiceSpec, state: ServiceState, state_dir: Path, say: Say, warn: Say | None = None
) -> dict[str, Any] | None:
    router = _router(spec, state_dir)
    if router is None:
        say("routing is not available in this build; replicas are reachable at their endpoints")
        return None
    ups = _upstreams(state)
    if not ups:
        if router.pid() is not None:
            state.router = router.status()
        return state.router
    pairs = routed_pairs(state)
    state.router = router.up(ups)
    # what the router serves, as the watcher records it: its next pass diffs against this
    state.extra["routed"] = [[u.id, u.endpoint] for u in ups]
    note_unrouted(state, pairs, ups)  # taken out alive: cut once gone, not now
    # replicas gone since (a VM Terraform replaced), or taken out alive before and gone since
    cut_gone_connections(router, state, pairs, say, warn or say)
    return state.router


# ------------------------------------------------------------------------------------------------
# apply


def _noop(_: str) -> None:
    pass


def notice_gone_replicas(
    spec: ServiceSpec, state: ServiceState, state_dir: Path, now: float
) -> tuple[list[str], list[str]]:
    """Record live replicas that no longer run as gone, asking each cloud they are on once, as a
    watcher's pass does (its `events.py`'s source: `reconcile` where it has one, a VM listing,
    else `poll`); returns (one line per replica recorded gone, one warning per cloud that could
    not be asked).

    Why every cloud and not only the local one: `apply` runs Terraform only in a root whose
    files changed, so Terraform's refresh never saw a VM terminated outside skyhedge (from the
    console, `aws ec2 terminate-instances`, a GCP instance deleted): `plan` showed it kept and
    `apply` said "No changes" while the service ran a replica short, until something else
    changed the root (measured on moto). Recorded gone here, the policy replaces it under a new
    ID, as a watcher would. A cloud that cannot be asked (no credentials, no project) only
    warns: its replicas are then judged by the state, as before."""
    from skyhedge.clouds import cloud_module
    from skyhedge.controller.facts import ingest
    from skyhedge.events import Signal

    lines = notice_dead_local_replicas(state, state_dir, now)  # every local one, launched or not
    # Only replicas whose machine was recorded: one never read back is the leftovers' business
    # (`unsaved_replicas`), and a fresh apply asks no cloud anything.
    by_cloud: dict[str, list[ReplicaRecord]] = {}
    for rec in state.live():
        if rec.cloud_id:
            by_cloud.setdefault(rec.cloud, []).append(rec)
    gone: list[Any] = []
    warnings: list[str] = []
    for cloud, mine in sorted(by_cloud.items()):
        try:
            module = cloud_module(cloud, "events")
            make = getattr(module, "event_source", None) if module is not None else None
            source = make(spec, state_dir, {cloud: {r.zone: r.region for r in mine}}) if make else None
            if source is None:
                continue
            try:
                look = getattr(source, "reconcile", None) or source.poll
                gone += [e for e in look(now, mine) if e.signal is Signal.GONE]
                # what failed beside the events found (GCP: a zone that could not be listed while
                # another could): its replicas were not judged, which is said as for a whole cloud
                warnings += [
                    f"{cloud}: could not check which replicas still run ({first_line(p)}); those gone "
                    "since the state was written are replaced once a watcher or apply sees them"
                    for p in source.problems()
                ]
            finally:
                source.close()
        except Exception as exc:  # a cloud that cannot be asked must not stop the apply
            warnings.append(
                f"{cloud}: could not check which replicas still run ({first_line(str(exc))}); "
                "those gone since the state was written are replaced once a watcher or apply sees them"
            )
    return lines + ingest(state, gone, now), warnings


def apply_service(
    spec: ServiceSpec,
    state_dir: Path,
    *,
    engine: Terraform | None = None,
    terraform_bin: str | None = None,
    confirm: Confirm | None = None,
    wait: bool = True,
    route: bool = True,
    on_event: EventCallback | None = None,
    say: Say = _noop,
    clock: Clock = time.time,
    max_rounds: int = 3,
    policy_name: str | None = None,
    rollout: bool = True,
) -> ApplyReport:
    """Converge the service to its plan (see the module docstring). Never raises for a failed
    root: the report lists what failed, and the state says what exists.

    `rollout` (with `wait`): while replicas run an outdated spec (or sit outside the placement),
    take further steps of the rolling update in the same apply, each releasing one once its
    replacement is READY, as `watch` would. The confirmation is asked before the first step that
    changes anything (its plan marks the outdated replicas; the CLI says the update continues).
    It stops when none is outdated; short of that (a step changed nothing, the step budget ran
    out, a READY replica stopped answering its probe) `report.rollout_stopped` says why. Without
    routing while a router runs, it takes one step only: the router, not reloaded, would keep
    sending requests to the replicas released."""
    ws = Workspace(spec, state_dir)
    engine = engine or ws.engine(terraform_bin)
    placement = resolve_placement(spec)
    report = ApplyReport()
    with writer_lock(ws.state_dir):
        first = not ws.tf_dir.exists()  # no Terraform files yet: this run makes them
        state = load_state(ws.state_dir, spec.name)
        if reopened := reopen_unfinished_deletes(state):
            say(f"{', '.join(reopened)}: deletes a killed run left unfinished; the plan decides again")
        live_before = state.live()
        notes, unasked = notice_gone_replicas(spec, state, ws.state_dir, clock())
        for note in notes:
            say(note)
        report.warnings += unasked
        # found gone with a recorded machine: a run killed while it re-created one under its ID
        # left a machine tagged for it, looked for (as a watcher does) once a step dropped it
        lost = lost_replicas(state, live_before)
        # the probes of the outdated replicas (mid rolling update), kept by a watcher or an earlier
        # apply: probed with the spec's, they failed it (an earlier health path). And the probe
        # this apply moves away from, kept for them as a watcher's reload keeps it: recorded with
        # the first step that goes ahead (`_Step.converge`), for later applies and watchers
        probes = applied_probes(ws.state_dir, state, spec)
        earlier = probes.probes if wait else {}
        if probes.warning and wait:
            report.warnings.append(probes.warning)
        # (said once the plan goes ahead: a declined one takes, records and claims nothing)
        probe_taken = _check_spec_probe(spec, state, probes, report) if wait else None
        # recorded by an earlier run that failed or was killed, never saved by Terraform: did EC2
        # launch them all the same?
        # (Terraform may have saved them though: a kill -9 of skyhedge alone, or a SIGTERM, after
        # Terraform wrote its state but before skyhedge read its outputs. So they are looked for
        # once the first step has run, and an instance a replica owns then is no leftover.)
        unsaved = unsaved_replicas(state)
        set_gitops(state, False)  # applied from here on, whatever advanced it before
        router = _router(spec, ws.state_dir)
        if route and router is not None:
            router.preflight()  # before any replica is launched, not after
        single = ""  # why a rolling update takes one step only
        if rollout and not rolls_on(spec, ws.state_dir, route=route, wait=wait):
            rollout = False
            if wait:
                single = " (one step only: --no-routing while the router runs)"
        asking = confirm  # until a step that changes something has been confirmed
        steps_left: int | None = None  # two per outdated replica: one launches, one releases
        while True:
            step = _Step(
                spec, ws, engine, placement, state, report, on_event, say, clock, policy_name, probes
            )
            before = (len(report.created), len(report.deleted))
            try:
                converged = step.converge(asking, max_rounds, route)
            except BaseException:
                _forget_unused_workspace(ws, first)
                raise
            if not converged:
                _forget_unused_workspace(ws, first)
                return report
            if probe_taken:
                say(probe_taken)
                probe_taken = None
            # (a replica whose create was blocked has its own error naming what holds it)
            holding = held_replicas(state)
            dropped = [r for r in lost if r.id not in holding.get(f"{r.cloud}/{r.region}", ())]
            lost = [r for r in lost if r not in dropped]
            unsaved = [r for r in [*unsaved, *step.recreated.replicas, *dropped] if r.id not in step.blocked]
            if unsaved:
                report.warnings += instances_left_unsaved(spec, state, unsaved, spare=step.recreated.before)
            unsaved = []
            if step.asked:
                asking = None
            moved = (len(report.created), len(report.deleted)) != before
            if moved:
                report.rollout_steps += 1
            if wait:

                def died(now: float, waiting: Sequence[str]) -> list[str]:
                    others = {r.id for r in state.live()} - set(waiting)
                    lines = notice_dead_local_replicas(state, ws.state_dir, now, skip=others)
                    for line in lines:
                        say(line)
                    for rid in waiting:
                        if (rec := state.replicas[rid]).gone_at is not None:
                            (report.preempted if rec.reason == "preempted" else report.exited).append(rid)
                    return lines

                report.exited, report.preempted = [], []
                limit = readiness_wait(spec, state, earlier)  # (a kept probe's delay may be longer)
                ready, not_ready = wait_ready(
                    spec, state, clock=clock, timeout=limit, died=died, earlier=earlier
                )
                report.ready = sorted({*report.ready, *ready} - set(not_ready), key=replica_order)
                report.not_ready = not_ready
                report.not_ready_after = limit if not_ready else None
                save_state(ws.state_dir, state)
            if route:
                if report.errors and (kept := reopen_unfinished_deletes(state)):
                    # drained for a delete the failed apply did not carry out: they still serve,
                    # so the router takes them back (the next plan decides about them again)
                    say(f"{', '.join(kept)}: not deleted (the apply failed); routing to them again")
                report.router = bring_routing_up(spec, state, ws.state_dir, say, report.warnings.append)
                save_state(ws.state_dir, state)
            outdated = set(outdated_replicas(spec, state, placement))
            if not (
                rollout
                and wait
                and outdated
                and not report.errors
                and not report.not_ready
                and not report.exited
                and not report.preempted
            ):
                break
            if steps_left is None:
                steps_left = 2 * len(outdated) + 2
            elif not moved:
                report.rollout_stopped = "a step changed nothing (no replacement could be placed)"
                break
            if steps_left <= 0:
                report.rollout_stopped = "it took more steps than two per outdated replica, plus two"
                break
            silent = _not_answering(spec, state, earlier)
            if silent:
                report.rollout_stopped = (
                    f"{', '.join(silent)} no longer answer(s) the readiness probe: not releasing "
                    "more while fewer may be serving than the state says (`watch` replaces them)"
                )
                break
            steps_left -= 1
            say(f"rolling update: {len(outdated)} outdated replica(s) left")
        live = {r.id for r in state.live()}
        report.ready = [rid for rid in report.ready if rid in live]  # not ones released since
        named = {k: state.extra.get(k) for k in (EARLIER_PROBES_KEY, PROBE_KEY)}
        probes.keep(state, spec)  # the probes of revisions released by the last step go
        if named != {k: state.extra.get(k) for k in (EARLIER_PROBES_KEY, PROBE_KEY)}:
            save_state(ws.state_dir, state)
        if outdated:
            report.notes.append(
                f"{len(outdated)} replica(s) still run an older spec or outside the placement "
                f"({', '.join(sorted(outdated, key=replica_order))}): `apply` or `watch` continues the "
                "rolling update, releasing each once its replacement is READY" + single
            )
    return report


def _forget_unused_workspace(ws: Workspace, first: bool) -> None:
    """Remove the Terraform files a first apply made when it recorded nothing (declined, or
    refused before its plan was saved): "nothing changed" holds on disk too, and `writer_lock`
    then removes the state dir it made. No `state.json` means nothing was applied (the plan is
    saved before Terraform applies it); files that were there before this run are never touched."""
    if first and not (ws.state_dir / STATE_FILE).exists():
        shutil.rmtree(ws.tf_dir, ignore_errors=True)


def rolls_on(spec: ServiceSpec, state_dir: Path, *, route: bool, wait: bool) -> bool:
    """Whether an apply can take a rolling update past its first step: it must wait for
    readiness (to know when a replacement is READY), and route, unless no router runs (one not
    reloaded would keep sending requests to the replicas released)."""
    if not wait:
        return False
    if route:
        return True
    router = _router(spec, Path(state_dir))
    return router is None or router.pid() is None


def _check_spec_probe(
    spec: ServiceSpec, state: ServiceState, probes: AppliedProbes, report: ApplyReport
) -> str | None:
    """A spec whose probe is not the one the current revision's READY replicas were probed with
    (a probe-only edit, or one a watcher refused): check it against them as a watcher does at its
    start (`spec_probe_refused`). Taken (one passes, or none can be asked), it is the one in force
    from now on; refused, they keep the one they had, said in one warning line. Before, `apply`
    took it unchecked into nothing: the state kept the earlier one named until a watcher ran, said
    nothing of a probe every replica failed, and `routing reload --probe` took them all out.
    Returns the line that says it was taken, for the caller to say once the plan goes ahead: it is
    recorded with the first step's state (`AppliedProbes.keep`), and a plan declined at the prompt
    records nothing (it said "taken" all the same, before the question)."""
    spec_probe = readiness_probe_json(spec.readiness_probe)
    if probes.in_force == spec_probe:
        return None
    said = "readiness_probe: the spec's is not the one its replicas were probed with"
    refused = spec_probe_refused(spec, state.live())
    if refused is None:
        probes.in_force = spec_probe
        return f"{said}: checked (a READY replica passes it, or none could be asked): taken"
    count, rid, why = refused
    report.warnings.append(
        f"{said}, and none of the {count} READY replica(s) passes it ({rid}: {why}): not taken, they "
        "are still probed with the earlier one; fix the probe and apply again"
    )
    return None


def _not_answering(
    spec: ServiceSpec, state: ServiceState, earlier: Mapping[str, ReadinessProbe] | None = None
) -> list[str]:
    """READY replicas that fail their readiness probe now, twice (preempted or crashed during a
    long rolling update, unseen by an apply that holds the lock `watch` would need). Outdated
    replicas are asked their revision's kept probe (`earlier`): asked the new version's health
    path, they all failed it and the rolling update stopped."""
    probe = _probe_fn()
    readiness = _readiness_of(spec, earlier)
    ready = [
        r
        for r in state.live()
        if r.endpoint and r.ready_at is not None and r.not_ready_since is None and not r.draining
    ]
    for attempt in range(2):
        with ThreadPoolExecutor(max_workers=probe_workers(len(ready))) as pool:
            ok = _probe_each(pool, probe, readiness, ready)
        ready = [r for r, good in zip(ready, ok, strict=True) if not good]
        if not ready:
            break
        if attempt == 0:
            time.sleep(1.0)  # one blip is not a lost replica
    return sorted((r.id for r in ready), key=replica_order)


@dataclass
class _Step:
    """One step of an apply: plan, render, apply the changed roots, re-plan around refused
    launches (up to `max_rounds`). Waiting and routing are the caller's."""

    spec: ServiceSpec
    ws: Workspace
    engine: Terraform
    placement: Placement
    state: ServiceState
    report: ApplyReport
    on_event: EventCallback | None
    say: Say
    clock: Clock
    policy_name: str | None
    #: the readiness probes this apply keeps (`probe_store.applied_probes`), recorded before the
    #: state is first saved: a declined plan records nothing
    probes: AppliedProbes | None = None

    asked: bool = False  # the confirmation was shown (and accepted)
    #: replicas whose create a cloud's `clear_before_apply` found blocked (their error says why)
    blocked: dict[str, Blocked] = field(default_factory=dict)
    #: replicas this step re-created under their ID, and their cloud IDs before
    recreated: Recreated = field(default_factory=Recreated)

    def converge(self, confirm: Confirm | None, max_rounds: int, route: bool) -> bool:
        """False if the user declined the plan (`report.cancelled`)."""
        spec, ws, engine, state, report, clock = (
            self.spec,
            self.ws,
            self.engine,
            self.state,
            self.report,
            self.clock,
        )
        for round_no in range(1, max_rounds + 1):
            now = clock()
            plan, memory = compute_plan(
                spec, state, now=now, placement=self.placement, policy_name=self.policy_name
            )
            deployment_id(state)
            tree = render_tree(
                spec,
                plan,
                context=ws.context(state),
                instance_types=instance_types(state, self.placement),
                extra_roots=roots_with_resources(state),
            )
            asking = round_no == 1 and confirm is not None
            before = snapshot_tree(ws.tree_dir) if asking else None
            ws.write_tree(tree)
            changed = changed_roots(state, tree)
            plan_files: dict[str, str] = {}
            if round_no == 1:
                if report.plan is None or confirm is not None:
                    report.plan = plan  # the plan shown (or that would have been)
                if confirm is not None and changed:
                    try:
                        previews = _preview(engine, ws, changed)
                    except BaseException:  # refused before anything was asked: as before it
                        restore_tree(ws.tree_dir, before)
                        raise
                    if not confirm(plan, changed, previews):
                        # "nothing changed": the tree and saved plans go back to what they were
                        restore_tree(ws.tree_dir, before)
                        for name in previews:
                            ws.plan_file(*_root_key(name)).unlink(missing_ok=True)
                        report.cancelled = True
                        return False
                    self.asked = True
                    plan_files = {name: str(ws.plan_file(*_root_key(name))) for name in previews}
            record_plan(state, plan, memory, self.placement, now)
            if self.probes is not None:
                self.probes.keep(state, spec)  # (the probes file first, then state.json)
            save_state(ws.state_dir, state)
            report.rounds += 1
            if not changed:
                break
            if route:
                drain_before_destroy(spec, state, ws.state_dir, self.say)
            cleared = clear_before_apply(spec, state, plan, changed, ws, engine)
            report.warnings += cleared.warnings
            self.blocked.update(cleared.blocked)
            self.say(f"applying {len(changed)} root(s): {', '.join(r.path for r in changed)}")

            def run(root: RenderedRoot, plan_files: dict[str, str] = plan_files) -> ApplyResult:
                return engine.apply(
                    ws.root(root.cloud, root.region),
                    plan_file=plan_files.get(root.path),
                    on_event=self.on_event,
                    check=False,
                )

            ids_before = {r.id: r.cloud_id for r in state.live()}
            served = [(r.id, r.endpoint) for r in state.live() if r.endpoint]
            try:
                results = run_parallel(changed, run)
                results, freed = free_taken_names(
                    spec,
                    state,
                    changed,
                    results,
                    ws,
                    engine,
                    lambda root: run(root, {}),
                    blocked=cleared.blocked,
                )
            except KeyboardInterrupt:  # Terraform has stopped (the pool waited for it)
                _stop_cut_short_launches(ws, changed, self.say)
                raise
            report.warnings += freed.warnings
            self.blocked.update(freed.blocked)
            blocked = {**cleared.blocked, **freed.blocked}
            round_failures = _absorb_round(
                report, state, changed, results, clock, revision_digests(spec), blocked
            )
            if route:
                # destroyed (a drain that timed out: requests still in flight) or replaced: a cloud
                # VM gone sends no reset, and the readiness wait for new replicas may last minutes
                router = _router(spec, ws.state_dir)
                cut_gone_connections(router, state, served, self.say, report.warnings.append)
            self.recreated.note(state, ids_before)
            state.log(
                {
                    "event": "apply",
                    "at": clock(),
                    "round": round_no,
                    "roots": [r.path for r in changed],
                    "errors": [str(e) for e in report.errors],
                    "launch_failed": [f.replica_id for f in report.launch_failures],
                }
            )
            save_state(ws.state_dir, state)
            for f in round_failures:
                self.say(
                    f"{f.replica_id}: launch refused in {f.location} ({f.market}): "
                    + first_line(f.quota.reason if f.quota else f.message)
                )
            # A launch a killed run cut short (Terraform and its launcher killed together) stays
            # in Terraform's state as created, with no process: this run changed nothing for it,
            # read its endpoint back, and waited for it the whole initial_delay_seconds, then
            # failed; only the next apply replaced it. Replicas this round launched are not
            # judged here (a command that dies at start fails its launch); one whose command died
            # since is replaced in a later round, if there is one (at most `max_rounds`: a
            # crash-looping command is bounded, then left to the readiness wait to report).
            touched = {
                c.replica_id
                for res in results
                if isinstance(res, ApplyResult)
                for c in res.completed
                if c.replica_id
            }
            dead = notice_dead_local_replicas(state, ws.state_dir, clock(), skip=touched)
            for note in dead:
                self.say(note)
            if dead:
                save_state(ws.state_dir, state)
            if not (round_failures or dead) or report.errors:
                break
            self.say(
                "re-planning around the refused launches"
                if round_failures
                else "re-planning around the replicas that are not running"
            )
        return True


def _stop_cut_short_launches(ws: Workspace, roots: Sequence[RenderedRoot], say: Say) -> None:
    """After an interrupted apply: Terraform killed the local launchers it was running, and what
    their `run.setup` had started may still run, recorded nowhere. Stop it."""
    if not any(root.cloud == "local" for root in roots):
        return
    from skyhedge.clouds.local import runtime_dir
    from skyhedge.clouds.local.processes import stop_unrecorded

    stopped = stop_unrecorded(runtime_dir(ws.state_dir))
    if stopped:
        say(f"stopped what the interrupted launches of {', '.join(stopped)} had started")


def _absorb_round(
    report: ApplyReport,
    state: ServiceState,
    roots: Sequence[RenderedRoot],
    results: Sequence[ApplyResult | Exception],
    clock: Clock,
    revision: Callable[[str | None], str],
    blocked: dict[str, Blocked] | None = None,
) -> list[LaunchFailure]:
    """Record one round's per-root results in state and report; return its capacity refusals.
    `revision`: the applied spec's `revision_digests` (what a replica launched here records).
    A replica's error `clear_before_apply` explained (`blocked`) is one error of its own, in
    those words (Terraform's text in its detail)."""
    failures: list[LaunchFailure] = []
    for root, result in zip(roots, results, strict=True):
        if isinstance(result, Exception):
            report.errors.append(
                result
                if isinstance(result, EngineError)
                else EngineError(f"{root.path}: {result.__class__.__name__}: {result}", root=root.path)
            )
            absorb_result(state, root, None, clock(), revision=revision(root.cloud))
            continue
        refused = absorb_result(state, root, result, clock(), revision=revision(root.cloud))
        failures += refused
        if root.path not in report.applied_roots:  # (once, over the rounds and steps of an apply)
            report.applied_roots.append(root.path)
        report.launch_failures += refused
        ever_refused = {f.replica_id for f in report.launch_failures}  # their tainted leftovers too
        for change in result.completed:
            if change.replica_id and change.action == "create":
                report.created.append(change.replica_id)
            elif change.replica_id and change.action == "delete" and change.replica_id not in ever_refused:
                report.deleted.append(change.replica_id)
        other = [d for d in result.errors if d.replica_id not in {f.replica_id for f in refused}]
        for diag in list(other):
            if (line := explained(blocked or {}, diag)) is not None:
                other.remove(diag)
                report.errors.append(
                    EngineError(
                        f"terraform apply failed in {root.path}: {line}", stderr=diag.text, root=root.path
                    )
                )
        if not result.ok and (other or not result.errors):
            first = other[0] if other else None
            summary = first.headline if first else f"exit code {result.exit_code}"
            report.errors.append(
                EngineError(
                    f"terraform apply failed in {root.path}: {summary}"
                    + (f" ({first.replica_id})" if first and first.replica_id else ""),
                    stderr="\n".join(d.text for d in other) + ("\n" + result.stderr if result.stderr else ""),
                    root=root.path,
                )
            )
    return failures


def _preview(engine: Terraform, ws: Workspace, roots: Sequence[RenderedRoot]) -> dict[str, PlanResult]:
    """`terraform plan -out` for each root to be applied, so what the user confirms is what runs."""

    def run(root: RenderedRoot) -> PlanResult:
        out = ws.plan_file(root.cloud, root.region)
        out.parent.mkdir(parents=True, exist_ok=True)
        return engine.plan(ws.root(root.cloud, root.region), out=str(out))

    out: dict[str, PlanResult] = {}
    for root, result in zip(roots, run_parallel(roots, run), strict=True):
        if isinstance(result, Exception):
            raise result
        out[root.path] = result
    return out


# ------------------------------------------------------------------------------------------------
# destroy


@dataclass
class DestroyReport:
    cancelled: bool = False
    roots: list[str] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)
    #: recorded replicas a failed or interrupted apply never created: forgotten, not destroyed
    never_created: list[str] = field(default_factory=list)
    #: replicas already recorded gone (failed, preempted) that a root's last apply still held:
    #: their machines (local processes) are destroyed with the root, and said so
    held_gone: list[str] = field(default_factory=list)
    errors: list[EngineError] = field(default_factory=list)
    strays: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # `warning:` lines (instances left running)
    #: what a deleted state dir still ran, stopped (its router, its local replicas' processes)
    orphans: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.cancelled


def _kept_plan(spec: ServiceSpec, state: ServiceState) -> Plan:
    """The live replicas as a plan that changes nothing (to render the roots as they stand)."""
    replicas = tuple(
        PlannedReplica(r.id, r.location, Market(r.market), KEEP, 0.0)
        for r in sorted(state.live(), key=by_replica_id)
    )
    return Plan(spec.name, len(replicas), "destroy", replicas, state.next_id, 0.0)


def destroy_service(
    spec: ServiceSpec,
    state_dir: Path,
    *,
    engine: Terraform | None = None,
    terraform_bin: str | None = None,
    confirm: Callable[[Sequence[ReplicaRecord], Sequence[str]], bool] | None = None,
    route: bool = True,
    on_event: EventCallback | None = None,
    say: Say = _noop,
    clock: Clock = time.time,
) -> DestroyReport:
    """Take routing down, then destroy every root that may hold replicas (in parallel)."""
    ws = Workspace(spec, state_dir)
    report = DestroyReport()
    if not ws.state_dir.exists():
        # never applied (nothing to destroy, nor to create for it), or deleted under a running
        # service: what it still runs is stopped (`_stop_what_a_deleted_state_dir_ran`)
        _stop_what_a_deleted_state_dir_ran(spec, ws, report, confirm, route=route, say=say)
        return report
    engine = engine or ws.engine(terraform_bin)
    with writer_lock(ws.state_dir):
        state = load_state(ws.state_dir, spec.name)
        check_cloud_sections(spec, state, destroying=True)  # before asking or stopping anything
        keys = sorted(roots_with_resources(state) | {(r.cloud, r.region) for r in state.live()})
        report.roots = [f"{c}/{r}" for c, r in keys]
        if confirm is not None and keys and not confirm(state.live(), report.roots):
            report.cancelled = True
            return report
        roots: list[RenderedRoot] = []
        types: Mapping[str, str] | None = None
        if keys:
            placement: Placement | None = None
            with contextlib.suppress(SpecError):  # else the spec dropped these clouds: records' types do
                placement = resolve_placement(spec)
            types = instance_types(state, placement)

            def destroy_tree() -> RenderedTree:
                """The state's replicas as they are (kept), in every root that may hold some."""
                return render_tree(
                    spec,
                    _kept_plan(spec, state),
                    context=ws.context(state),
                    instance_types=types,
                    extra_roots=keys,
                )

            tree = destroy_tree()
            ws.write_tree(tree)
            roots = [tree.root(c, r) for c, r in keys]
            # Every root must initialise (a changed backend, a provider that cannot be installed)
            # before the router goes down: failing after it would leave the replicas running and
            # unrouted, the service down with nothing destroyed.
            inits = run_parallel(roots, lambda root: engine.init(ws.root(root.cloud, root.region)))
            failed = [r for r in inits if isinstance(r, Exception)]
            if failed:
                report.errors += [
                    r if isinstance(r, EngineError) else EngineError(f"{r.__class__.__name__}: {r}")
                    for r in failed
                ]
                return report
        if route:
            router = _router(spec, ws.state_dir)
            if router is not None and (state.router is not None or router.pid() is not None):
                say("taking the router down")
                router.down()
            state.router = None
            state.extra.pop("routed", None)  # what the router served: gone with it
            save_state(ws.state_dir, state)
        if roots:
            results = run_parallel(
                roots,
                lambda root: engine.destroy(ws.root(root.cloud, root.region), on_event=on_event, check=False),
            )
            for root, result in zip(roots, results, strict=True):
                now = clock()
                if isinstance(result, ApplyResult) and result.ok:
                    held = held_replicas(state).get(root.path, set())
                    # what Terraform itself destroyed: an apply cut short (a SIGTERM, a kill)
                    # may have created replicas the state still records as never launched
                    deleted = {c.replica_id for c in result.completed if c.action in ("delete", "replace")}
                    for rec in state.replicas.values():
                        if (rec.cloud, rec.region) == root.key:
                            if rec.gone_at is not None and rec.id in held:
                                report.held_gone.append(rec.id)
                            if rec.gone_at is None:
                                rec.gone_at, rec.reason, rec.draining = now, "terminated", False
                                created = (
                                    rec.provisioned_at is not None
                                    or rec.cloud_id is not None
                                    or rec.id in deleted
                                )
                                (report.destroyed if created else report.never_created).append(rec.id)
                            rec.outputs = {}
                    _tracked(state).pop(root.path, None)
                elif isinstance(result, ApplyResult):
                    first = result.errors[0].headline if result.errors else f"exit code {result.exit_code}"
                    report.errors.append(
                        EngineError(
                            f"terraform destroy failed in {root.path}: {first}",
                            stderr=result.error_text(),
                            root=root.path,
                        )
                    )
                else:
                    report.errors.append(
                        result
                        if isinstance(result, EngineError)
                        else EngineError(f"{root.path}: {result}", root=root.path)
                    )
            state.log(
                {
                    "event": "destroy",
                    "at": clock(),
                    "roots": report.roots,
                    "errors": [str(e) for e in report.errors],
                }
            )
            save_state(ws.state_dir, state)
        if not report.errors and not state.live() and QUOTA_KEY in state.extra:
            # nothing of the service runs: the quotas the watcher found used up are no fact about
            # it any more (`status` named them, "asked again at" a time past, until the next launch
            # there succeeded, which the next service's placement may never ask for)
            state.extra.pop(QUOTA_KEY, None)
            save_state(ws.state_dir, state)
        if not report.errors and (state.target is not None or "autoscaler" in state.extra):
            # The service is gone, and so is its load: the next apply starts from min_replicas,
            # not from the target the autoscaler last chose for traffic that no longer exists.
            state.target = None
            state.extra.pop("autoscaler", None)
            save_state(ws.state_dir, state)
        if "local" in spec.placement.clouds or any(c == "local" for c, _ in keys):
            report.strays = _stop_local_strays(ws, state, say) if not report.errors else []
        if not report.errors and not state.live():
            report.warnings += _forget_what_only_replicas_needed(ws, state)
            if keys:
                # the state's tree described the destroyed replicas (`run.env` values included):
                # a `terraform apply` run by hand there, as its README invites, launched them
                # again. Rendered anew with none, every root still there (Terraform runs in it)
                try:
                    ws.write_tree(destroy_tree())
                except (RenderError, OSError) as exc:
                    report.warnings.append(f"{ws.tree_dir}: still lists the destroyed replicas ({exc})")
        if not report.errors:  # a cloud's machines of the service still running after a clean destroy
            live_clouds = {r.cloud for r in state.live()}
            for cloud in sorted({c for c, _ in keys} - live_clouds):
                if (leftovers := cloud_leftovers(cloud)) is not None:
                    report.warnings += leftovers.instances_left(
                        spec.name,
                        {r for c, r in keys if c == cloud},
                        deployment=state.extra.get(DEPLOYMENT_KEY),
                        spec=spec,
                    )
    return report


def _stop_what_a_deleted_state_dir_ran(
    spec: ServiceSpec,
    ws: Workspace,
    report: DestroyReport,
    confirm: Callable[[Sequence[ReplicaRecord], Sequence[str]], bool] | None,
    *,
    route: bool,
    say: Say,
) -> None:
    """Stop the router and the local replica processes of a state dir that no longer exists.

    A state dir deleted under a running service (`rm -rf .skyhedge`, `git clean -fdx`) took
    every record with it, but not the processes: `destroy` said "Nothing to destroy." and
    `routing down` "router down" while nginx held the port and the replicas served on, and no
    command could stop them. They are still known by what names the state dir: nginx by its
    command line (`-p <state dir>/router/`), local replicas by the runtime dir in their
    environment. Nothing is made on disk for it (the state dir stays absent)."""
    from skyhedge.clouds.local import runtime_dir
    from skyhedge.clouds.local.processes import kill_all, replica_processes

    router = _router(spec, ws.state_dir) if route else None
    nginx = router.pid() if router is not None else None
    local = sorted(replica_processes(runtime_dir(ws.state_dir)))
    if nginx is None and not local:
        return
    what = [f"its router (nginx pid {nginx})"] if nginx is not None else []
    what += [f"{len(local)} local replica(s) ({', '.join(local)})"] if local else []
    running = f"what the deleted state dir {ws.state_dir} still runs: {' and '.join(what)}"
    report.roots = [running]
    if confirm is not None and not confirm([], [running]):
        report.cancelled = True
        return
    if router is not None and nginx is not None:
        say("taking the router down")
        router.down()
    report.strays = kill_all(runtime_dir(ws.state_dir)) if local else []
    report.orphans = what


def _forget_what_only_replicas_needed(ws: Workspace, state: ServiceState) -> list[str]:
    """After a clean destroy (no replica left), remove what only the replicas needed: the kept
    readiness probes (`tf/probes.json`, and their names in the state: a probe's headers or
    `post_data` may hold a token, and no replica is left to probe with them). What stays is what
    the docs say stays: `state.json` (replica IDs, history, the deployment ID), Terraform's state
    and data, the replicas' and the router's logs. Returns warnings."""
    warnings: list[str] = []
    if any(state.extra.get(k) is not None for k in (EARLIER_PROBES_KEY, PROBE_KEY)):
        state.extra.pop(EARLIER_PROBES_KEY, None)
        state.extra.pop(PROBE_KEY, None)
        save_state(ws.state_dir, state)  # first: state.json never names a probe the file lacks
    store = ProbeStore(ws.state_dir)
    try:
        store.write([])
    except OSError as exc:
        warnings.append(f"{store.path}: cannot remove the kept probes ({exc.strerror or exc})")
    return warnings


def _stop_local_strays(ws: Workspace, state: ServiceState, say: Say) -> list[int]:
    """After a clean destroy nothing of this service may run locally: stop leftovers of crashes."""
    from skyhedge.clouds.local import runtime_dir
    from skyhedge.clouds.local.processes import forget_paths, kill_all, moved_strays

    live_local = [r for r in state.live() if r.cloud == "local"]
    if live_local:
        return []
    # and those carrying the path the state dir had before it was moved (nothing is there now)
    runtime = runtime_dir(ws.state_dir)
    pids = kill_all(runtime, also=moved_strays(runtime, ws.spec.name))
    forget_paths(runtime)  # none of them runs: the next launch records the path it has then
    if pids:
        say(f"stopped {len(pids)} stray local process(es) left by an earlier crash: {pids}")
    return pids


def live_router(state: ServiceState, state_dir: Path) -> dict[str, Any] | None:
    """The router as recorded, with `pid` null when its nginx master no longer runs; None when
    no router was ever brought up (or it was taken down).

    Why: the record outlives a router killed from outside (OOM killer, a reboot, `kill -9`), and
    `status` must not report a dead router as serving; its endpoint and upstreams are still what
    a restart (`routing up`, `watch`) serves again, so they stay in the answer."""
    if state.router is None:
        return None
    try:
        from skyhedge.routing import running_router_pid
    except ImportError:
        return {**state.router, "pid": None}
    if running_router_pid(state_dir) is None:
        return {**state.router, "pid": None}
    return state.router


def live_rows(state: ServiceState, *, include_gone: bool = False) -> list[dict[str, Any]]:
    """The `status --json` replica rows: id, cloud, region, zone, market, endpoint, state."""
    recs: Iterable[ReplicaRecord] = state.replicas.values() if include_gone else state.live()
    return [
        {
            "id": r.id,
            "cloud": r.cloud,
            "region": r.region,
            "zone": r.zone,
            "market": r.market,
            "endpoint": r.endpoint,
            "state": r.fact().status.value,
        }
        for r in sorted(recs, key=by_replica_id)
    ]
