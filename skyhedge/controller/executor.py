"""The Terraform executor: render the plan, apply the roots that changed, record what happened.

Built from `skyhedge.apply`'s steps (the same ones `skyhedge apply` runs), so `apply`, `destroy`
and `watch` share one bookkeeping of what each root holds (`state.extra["terraform"]`): a root is
applied only when its rendered inputs differ from the ones last applied successfully, roots apply
in parallel, and each root's result is absorbed replica by replica (endpoints, cloud IDs,
destroyed replicas, launches refused for capacity).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from skyhedge.apply import Workspace, absorb_result, changed_roots, instance_types, roots_with_resources
from skyhedge.clouds import QuotaRefusal
from skyhedge.controller.ports import ExecResult
from skyhedge.engine import ApplyResult, EventCallback, Terraform, run_parallel
from skyhedge.errors import EngineError, first_line
from skyhedge.leftovers import clear_before_apply, explained, free_taken_names
from skyhedge.planner import Plan
from skyhedge.render import RenderedRoot, render_tree
from skyhedge.service import Placement, resolve_placement
from skyhedge.spec import ServiceSpec, revision_digests
from skyhedge.state import ServiceState


class TerraformExecutor:
    def __init__(
        self,
        spec: ServiceSpec,
        state_dir: Path,
        *,
        terraform_bin: str | None = None,
        engine: Terraform | None = None,
        placement: Placement | None = None,
        on_event: EventCallback | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spec = spec
        self.clock = clock
        self.workspace = Workspace(spec, state_dir)
        self.engine = engine or self.workspace.engine(terraform_bin)
        self.placement = placement or resolve_placement(spec)
        self.on_event = on_event

    def apply(
        self, state: ServiceState, plan: Plan, now: float, *, hold: frozenset[str] = frozenset()
    ) -> ExecResult:
        """Apply the roots whose rendered inputs changed, but those in `hold` (root keys the
        controller holds back while their cloud's API fails: their turn comes with their own
        backoff, and a Terraform run against a dead endpoint takes 7-30 s, throttled minutes)."""
        ws = self.workspace
        tree = render_tree(
            self.spec,
            plan,
            context=ws.context(state),  # its deployment ID (`_act` made it) tags what this pass launches
            instance_types=instance_types(state, self.placement),
            extra_roots=roots_with_resources(state),
        )
        changed = [r for r in changed_roots(state, tree) if r.path not in hold]
        if not changed:
            return ExecResult()
        ws.write_tree(tree)
        cleared = clear_before_apply(self.spec, state, plan, changed, ws, self.engine)

        took: dict[str, float] = {}  # root key -> seconds its runs took (each in its own thread)

        def run(root: RenderedRoot) -> ApplyResult:
            began = self.clock()
            try:
                return self.engine.apply(
                    ws.root(root.cloud, root.region), on_event=self.on_event, check=False
                )
            finally:
                took[root.path] = took.get(root.path, 0.0) + max(0.0, self.clock() - began)

        # the launches this run makes: an error naming one of them alone is that launch's own
        # failure (a bad image or instance type, its port held), not the root's cloud failing
        launching = {rec.id for rec in state.live() if rec.provisioned_at is None}
        results = run_parallel(changed, run)
        # a create that failed on its machine name, which this state's killed run holds: freed,
        # and the root applied once more (`free_taken_names`)
        results, freed = free_taken_names(
            self.spec, state, changed, results, ws, self.engine, run, blocked=cleared.blocked
        )
        blocked = {**cleared.blocked, **freed.blocked}
        now = self.clock()  # the results are as of now, after Terraform ran
        errors: list[str] = []
        failed_roots: list[str] = []  # failed naming no launch of its own: its cloud's API
        refused: list[str] = []
        quota: list[tuple[str, QuotaRefusal]] = []  # those of them an account quota refused
        named: list[str] = []  # replicas an error names: their own launch failed
        detail: list[str] = []
        revision = revision_digests(self.spec)  # what a replica launched here records
        for root, result in zip(changed, results, strict=True):
            if isinstance(result, BaseException):
                err = result if isinstance(result, EngineError) else EngineError(f"{root.path}: {result}")
                absorb_result(state, root, None, now, revision=revision(root.cloud))
                errors.append(f"{root.path}: {err}")
                failed_roots.append(root.path)
                detail.append(err.stderr)
                continue
            failures = absorb_result(state, root, result, now, revision=revision(root.cloud))
            refused += [f.replica_id for f in failures]
            quota += [(f.replica_id, f.quota) for f in failures if f.quota is not None]
            if not result.ok:
                said = len(errors)
                failed_ids = {f.replica_id for f in failures}
                other = [d for d in result.errors if d.replica_id not in failed_ids]
                named += [d.replica_id for d in other if d.replica_id is not None]
                for diag in list(other):
                    if (line := explained(blocked, diag)) is not None:
                        other.remove(diag)
                        errors.append(f"{root.path}: {line}")
                if other or not result.errors:
                    first = other[0].headline if other else f"exit code {result.exit_code}"
                    errors.append(f"{root.path}: {first_line(first)}")
                # An outage of the root's cloud (held back by the controller with a backoff of its
                # own) is an error naming no launch: the provider not configured, a machine that
                # runs unreadable. Launches refused for capacity alone are none, and neither are
                # launches failing on their own (a bad AMI or instance type: the spec's fault), whose
                # give-up after LAUNCH_ATTEMPTS applies of their own, and the launch hold after
                # bursts of them, stay theirs; as an outage, every launch into the root was refused
                # as a zone without capacity refuses one, with no hold, a new replica ID each time.
                cloud = [d for d in result.errors if d.replica_id not in failed_ids]
                if len(errors) > said and (
                    not cloud or any(d.replica_id is None or d.replica_id not in launching for d in cloud)
                ):
                    failed_roots.append(root.path)
                detail.append(result.error_text())
        state.log(
            {
                "event": "apply",
                "at": now,
                "roots": [r.path for r in changed],
                "errors": errors,
                "launch_failed": refused,
            }
        )
        return ExecResult(
            applied=tuple(r.path for r in changed),
            errors=tuple(errors),
            launch_failures=tuple(refused),
            quota_refusals=tuple(quota),
            detail="\n".join(d for d in detail if d),
            warnings=cleared.warnings + freed.warnings,
            # (a root whose run raised, or failed naming no replica, reached none of them)
            failed_replicas=tuple(dict.fromkeys(named)),
            failed_roots=tuple(failed_roots),
            root_seconds=tuple(sorted(took.items())),
        )
