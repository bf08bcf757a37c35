"""Render a plan into Terraform: one root per (cloud, region), values only as JSON.

    tree = render_tree(spec, plan, context=ctx, instance_types=placement.instance_types)
    write_tree(tree, Path("infra"))      # atomic: temp dir, then rename

The rendered tree is self-contained (the modules it calls are copied into `modules/`), so it can be
committed to a GitOps repository and applied by plain Terraform in CI.
"""

from skyhedge.render.backend import backend_config
from skyhedge.render.tree import (
    BACKEND_FILE,
    TFVARS_FILE,
    TREE_MANIFEST,
    RenderedRoot,
    RenderedTree,
    render_tree,
    restore_tree,
    snapshot_tree,
    write_tree,
)

__all__ = [
    "BACKEND_FILE",
    "TFVARS_FILE",
    "TREE_MANIFEST",
    "RenderedRoot",
    "RenderedTree",
    "backend_config",
    "render_tree",
    "restore_tree",
    "snapshot_tree",
    "write_tree",
]
