"""`skyhedge plan`: the desired layout and what changes, like `terraform plan`."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from skyhedge._json import dumps as strict_json
from skyhedge.apply import (
    Workspace,
    changed_roots,
    instance_types,
    notice_gone_replicas,
    roots_with_resources,
)
from skyhedge.cli._app import check_policy_flag, console, echo, fitted, main, spec_argument, state_dir_option
from skyhedge.clouds import RenderContext
from skyhedge.planner import CREATE, DELETE, KEEP, Plan, by_replica_id, replica_order
from skyhedge.render import render_tree
from skyhedge.service import TERRAFORM_KEY, Placement, compute_plan, is_gitops, resolve_placement
from skyhedge.spec import ServiceSpec, load_spec
from skyhedge.state import ReplicaRecord, ServiceState, default_state_dir, load_state

#: The table's name for a kept replica that was never created (see `Pending`).
PENDING = "pending"
#: The table's name for a replica released by a watcher, still running until its requests end.
RELEASING = "releasing"


@dataclass(frozen=True)
class Pending:
    """Work the plan's actions do not show but the next `apply` does: a failed or interrupted
    apply records its replicas (and plans nothing new for them afterwards), so without this
    `plan` would call "keep" what does not exist and `--detailed-exitcode` would say "no
    changes" while `apply` still has a root to apply.

    `replicas`: kept replicas never created (no `cloud_id`, no `provisioned_at`).
    `roots`: Terraform roots (`cloud/region`) whose rendered inputs differ from those of their
    last successful apply (`skyhedge.apply.changed_roots`, the check `apply` makes), where the
    plan creates and deletes nothing (a root with creates or deletes is a change already).
    `releasing`: replicas a watcher released that still run, out of the router, until their
    requests end (docs/controller.md, step 7): the plan keeps them, their destroy is pending."""

    replicas: frozenset[str] = frozenset()
    roots: tuple[str, ...] = ()
    releasing: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.replicas or self.roots or self.releasing)


def _applied_roots_readable(state: ServiceState) -> bool:
    """Whether `state.extra["terraform"]["roots"]` holds applies to compare with, in the shape
    `apply` writes (`plan` reads any state: a hand-edited one is not judged, never a traceback)."""
    info = state.extra.get(TERRAFORM_KEY)
    roots = info.get("roots") if isinstance(info, dict) else None
    return (
        isinstance(roots, dict)
        and bool(roots)
        and all(isinstance(k, str) and k.count("/") == 1 and isinstance(v, dict) for k, v in roots.items())
    )


def _as_apply_renders(context: RenderContext) -> RenderContext:
    """`context` as the next apply renders with it: a state applied before deployment IDs
    existed gets one at that apply (`deployment_id`), which tags its machines, so its roots
    count as changed, as that apply will find them. Read-only: `plan` records nothing."""
    return replace(context, deployment=context.deployment or "0" * 16, read_only=True)


def pending_work(
    spec: ServiceSpec, state: ServiceState, plan: Plan, state_dir: Path, placement: Placement
) -> Pending:
    """What the next `apply` would still do although `plan` changes nothing (see `Pending`).

    Under GitOps (`watch --gitops`) CI applies the commits and the state never learns the cloud
    IDs: nothing is pending there. The roots are rendered as `apply` renders them (same context,
    instance types and extra roots), in memory: `plan` writes nothing."""
    if is_gitops(state):
        return Pending()
    live = {r.id: r for r in state.live()}
    never_created = frozenset(
        r.id
        for r in plan.replicas
        if r.action == KEEP
        and r.id in live
        and live[r.id].cloud_id is None
        and live[r.id].provisioned_at is None
    )
    releasing = frozenset(
        r.id for r in plan.replicas if r.action == KEEP and r.id in live and live[r.id].draining
    )
    roots: tuple[str, ...] = ()
    if _applied_roots_readable(state):
        applied = state.extra[TERRAFORM_KEY]["roots"]
        tree = render_tree(
            spec,
            plan,
            context=_as_apply_renders(Workspace(spec, state_dir).context(state)),
            instance_types=instance_types(state, placement),
            extra_roots=roots_with_resources(state),
        )
        touched = {f"{cloud}/{region}" for cloud, region in plan.changed_roots()}
        roots = tuple(
            sorted(r.path for r in changed_roots(state, tree) if r.path in applied and r.path not in touched)
        )
    return Pending(never_created, roots, releasing)


def plan_to_json(
    plan: Plan, pending: Pending | None = None, gone: Sequence[ReplicaRecord] = ()
) -> dict[str, object]:
    """The documented `plan --json` object (see README, "plan --json").

    `pending` extends it (never renames): `"pending": true` on a kept replica never created,
    `summary.pending` counting them, and `pending_roots` naming the roots `apply` would re-apply.
    `gone`: recorded replicas found gone since the state was written (a local process that
    died), which the plan replaces and the next `apply` records: the table says so in a note,
    and without this a CI reading the JSON saw a replacement with no sign of what it replaces."""
    pending = pending or Pending()
    summary: dict[str, Any] = dict(plan.summary())
    summary["pending"] = len(pending.replicas)
    summary["releasing"] = len(pending.releasing)
    return {
        "service": plan.service,
        "target": plan.target,
        "policy": plan.policy,
        "replicas": [
            {
                "id": r.id,
                "cloud": r.location.cloud,
                "region": r.location.region,
                "zone": r.location.zone,
                "market": r.market.value,
                "action": r.action,
                "price_per_hour": r.price_per_hour,
                "outdated": r.outdated,
                "pending": r.id in pending.replicas,
                "releasing": r.id in pending.releasing,
            }
            for r in plan.replicas
        ],
        "pending_roots": list(pending.roots),
        "gone": [
            {
                "id": r.id,
                "cloud": r.cloud,
                "region": r.region,
                "zone": r.zone,
                "market": r.market,
                "reason": r.reason,
            }
            for r in sorted(gone, key=by_replica_id)
        ],
        "summary": summary,
    }


_ACTION_STYLE = {
    CREATE: "[green]+ create[/]",
    DELETE: "[red]- delete[/]",
    "keep": "[dim]  keep[/]",
    "outdated": "[yellow]~ outdated[/]",  # kept until its replacement is READY (rolling update)
    PENDING: "[green]+ create (pending)[/]",  # recorded by an apply that failed or was interrupted
    RELEASING: "[red]- delete (draining)[/]",  # out of the router, destroyed once its requests end
}


def render_plan_table(
    plan: Plan, pending: Collection[str] | None = None, releasing: Collection[str] | None = None
) -> Table:
    """Group by cloud/region/zone, market and action, with counts and hourly prices. `pending`:
    IDs of kept replicas never created, shown as `+ create (pending)`, not as kept; `releasing`:
    those being released, shown as `- delete (draining)`. Unset, they are the plan's own (as
    `apply` shows it before asking: a confirmation listing as kept the replicas it is about to
    create, or one it is releasing, told the user less than `plan` did)."""
    pending = plan.unlaunched if pending is None else pending
    releasing = plan.releasing if releasing is None else releasing
    groups: dict[tuple[str, str, str, str, str], list[float]] = defaultdict(list)
    for r in plan.replicas:
        loc = r.location
        action = r.action
        if r.action == KEEP and r.id in pending:
            action = PENDING
        elif r.action == KEEP and r.id in releasing:
            action = RELEASING
        elif r.action == KEEP and r.outdated:
            action = "outdated"
        groups[(loc.cloud, loc.region, loc.zone, r.market.value, action)].append(r.price_per_hour)
    table = Table(
        title=f"{plan.service}: target {plan.target} ready, policy {plan.policy}", title_justify="left"
    )
    # narrower than the table (`fitted`), a location folds over lines, whole, and a change
    # wraps at its words: the counts and prices are never cut to "…"
    table.add_column("cloud/region/zone", overflow="fold")
    table.add_column("market", no_wrap=True)
    table.add_column("change")
    table.add_column("n", justify="right", min_width=2, no_wrap=True)
    table.add_column("each", justify="right", no_wrap=True)
    table.add_column("$/h", justify="right", no_wrap=True)
    for (cloud, region, zone, market, action), prices in sorted(groups.items()):
        table.add_row(
            f"{cloud}/{region}/{zone}",
            market,
            _ACTION_STYLE[action],
            str(len(prices)),
            f"{prices[0]:.4f}",
            f"{sum(prices):.4f}" if action != DELETE else "-",
        )
    s = plan.summary()
    table.add_section()
    table.add_row(
        "total",
        f"{s['spot']}+{s['on_demand']}od",
        "",
        str(s["spot"] + s["on_demand"]),
        "",
        f"{s['hourly_cost']:.4f}",
    )
    table.add_row("when spot is READY", "", "", "", "", f"{s['steady_state_hourly_cost']:.4f}")
    table.add_row("on-demand only", "", "", str(plan.target), "", f"{s['ondemand_only_hourly_cost']:.4f}")
    return table


def render_savings(plan: Plan) -> str:
    s = plan.summary()
    return (
        f"Savings against on-demand only: {s['savings_pct']:.1f}% now, "
        f"{s['steady_state_savings_pct']:.1f}% once spot replicas are READY."
    )


@main.command()
@spec_argument
@state_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--detailed-exitcode", is_flag=True, help="Exit 0 when nothing changes, 2 when something does.")
@click.option("--policy", default=None, help="Override replica_policy.policy for this plan.")
def plan(
    spec: Path, state_dir: Path | None, as_json: bool, detailed_exitcode: bool, policy: str | None
) -> None:
    """Compute the desired layout of SPEC and show what would change against the state."""
    service = load_spec(spec)
    sdir = state_dir or default_state_dir(service.name)
    state = load_state(sdir, service.name)
    check_policy_flag(policy)
    placement = resolve_placement(service, policy)
    now = time.time()
    # As `apply` does first: a replica that no longer runs (a local process that died, a VM
    # terminated outside skyhedge) is gone, so the plan shows its replacement, not "keep" (in
    # memory only: plan never writes).
    before = {r.id for r in state.live()}
    dead, unasked = notice_gone_replicas(service, state, sdir, now)
    gone = [state.replicas[rid] for rid in before - {r.id for r in state.live()}]
    result, _memory = compute_plan(service, state, now=now, placement=placement, policy_name=policy)
    pending = pending_work(service, state, result, sdir, placement)
    if as_json:
        echo(strict_json(plan_to_json(result, pending, gone), indent=2))
        for line in unasked:  # on stderr: stdout stays one JSON object
            click.echo(f"warning: {line}", err=True)
    else:
        console.print(fitted(render_plan_table(result, pending.replicas, pending.releasing), console))
        console.print(render_savings(result))
        s = result.summary()
        kept = f"{s['keep']} to keep"
        if pending.replicas:
            kept += f" ({len(pending.replicas)} of them pending creation)"
        if pending.releasing:
            kept += f" ({len(pending.releasing)} of them being released)"
        console.print(f"Plan: {s['create']} to create, {kept}, {s['delete']} to delete.")
        for note in dead:
            said = f"{note} (the next `apply` records it and replaces it)"
            console.print(said, markup=False, highlight=False)
        for line in unasked:
            console.print(f"warning: {line}", markup=False, highlight=False)
        if pending.replicas:
            console.print(
                f"{len(pending.replicas)} recorded replica(s) were never read back "
                f"({', '.join(sorted(pending.replicas, key=replica_order))}): an apply failed or was "
                "interrupted before recording them (an interrupted one may have started them); the "
                "next `apply` creates them, or records those that run."
            )
        if pending.releasing:
            console.print(
                f"{len(pending.releasing)} replica(s) being released "
                f"({', '.join(sorted(pending.releasing, key=replica_order))}): out of the router until "
                "their requests end, then destroyed."
            )
        if pending.roots:
            console.print(
                f"{len(pending.roots)} root(s) not applied as rendered yet "
                f"({', '.join(pending.roots)}): the next `apply` applies them."
            )
        if s["outdated"]:
            console.print(
                f"{s['outdated']} replica(s) run an older spec (run, resources or placement changed): "
                "a rolling update replaces them one at a time, each once a replacement is READY."
            )
    if detailed_exitcode and (result.has_changes or result.summary()["outdated"] or pending):
        sys.exit(2)
