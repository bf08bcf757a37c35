"""`skyhedge render SPEC --out DIR`: write the plan's Terraform tree, e.g. into a GitOps repository."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click
from rich.markup import escape

from skyhedge.apply import Workspace, instance_types, roots_with_resources
from skyhedge.cli._app import console, main, spec_argument, state_dir_option
from skyhedge.render import render_tree, write_tree
from skyhedge.service import compute_plan, decided_at, resolve_placement
from skyhedge.spec import load_spec
from skyhedge.state import default_state_dir, load_state


@main.command()
@spec_argument
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write the tree into (created, or replaced if skyhedge rendered it before).",
)
@state_dir_option
def render(spec: Path, out: Path, state_dir: Path | None) -> None:
    """Render SPEC's plan as Terraform: one root per (cloud, region), values in *.auto.tfvars.json.

    Reads the state (to keep replica IDs stable) but never writes it, and plans as of the state's
    last decision, not the clock: same spec and state give a byte-identical tree, whenever it
    runs. The tree is written to a temp dir and swapped into place.
    """
    service = load_spec(spec)
    sdir = state_dir or default_state_dir(service.name)
    state = load_state(sdir, service.name)
    placement = resolve_placement(service)
    # As of the state's last decision, not the clock: re-rendering a committed state (GitOps CI)
    # gives the committed tree however much later it runs.
    now = decided_at(state)
    now = time.time() if now is None else now
    plan, _memory = compute_plan(service, state, now=now, placement=placement, probe_ports=False)
    tree = render_tree(
        service,
        plan,
        # a tree for a repository: no path of this machine in it (relative ones from its roots)
        context=Workspace(service, sdir).context(tree_dir=Path(os.path.abspath(out))),
        instance_types=instance_types(state, placement),
        extra_roots=roots_with_resources(state, now),
    )
    write_tree(tree, out)
    # paths are data, not rich markup: `out[/]` is a directory name, not a closing tag
    console.print(
        escape(f"Rendered {len(tree.roots)} Terraform root(s) for {service.name} into {out}:"),
        highlight=False,
    )
    for root in tree.roots:
        line = escape(f"  {root.path}/  {len(root.replicas)} replica(s)  ")
        console.print(f"{line}[dim]{root.digest[:12]}[/]", highlight=False)
