"""`skyhedge plan`: the desired layout and what changes, like `terraform plan`."""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import click
from rich.table import Table

from skyhedge.cli._app import console, main, spec_argument, state_dir_option
from skyhedge.planner import CREATE, DELETE, Plan
from skyhedge.service import compute_plan
from skyhedge.spec import load_spec
from skyhedge.state import default_state_dir, load_state


def plan_to_json(plan: Plan) -> dict[str, object]:
    """The documented `plan --json` object (see README, "plan --json")."""
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
            }
            for r in plan.replicas
        ],
        "summary": plan.summary(),
    }


_ACTION_STYLE = {
    CREATE: "[green]+ create[/]",
    DELETE: "[red]- delete[/]",
    "keep": "[dim]  keep[/]",
    "outdated": "[yellow]~ outdated[/]",  # kept until its replacement is READY (rolling update)
}


def render_plan_table(plan: Plan) -> Table:
    """Group by cloud/region/zone, market and action, with counts and hourly prices."""
    groups: dict[tuple[str, str, str, str, str], list[float]] = defaultdict(list)
    for r in plan.replicas:
        loc = r.location
        action = "outdated" if r.outdated and r.action == "keep" else r.action
        groups[(loc.cloud, loc.region, loc.zone, r.market.value, action)].append(r.price_per_hour)
    table = Table(
        title=f"{plan.service}: target {plan.target} ready, policy {plan.policy}", title_justify="left"
    )
    table.add_column("cloud/region/zone", no_wrap=True)
    table.add_column("market", no_wrap=True)
    table.add_column("change", no_wrap=True)
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
    result, _memory = compute_plan(service, state, now=time.time(), policy_name=policy)
    if as_json:
        click.echo(json.dumps(plan_to_json(result), indent=2))
    else:
        console.print(render_plan_table(result))
        console.print(render_savings(result))
        s = result.summary()
        console.print(f"Plan: {s['create']} to create, {s['keep']} to keep, {s['delete']} to delete.")
        if s["outdated"]:
            console.print(
                f"{s['outdated']} replica(s) run an older spec (run, resources or placement changed): "
                "a rolling update replaces them one at a time, each once a replacement is READY."
            )
    if detailed_exitcode and (result.has_changes or result.summary()["outdated"]):
        sys.exit(2)
