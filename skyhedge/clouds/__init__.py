"""The cloud interface (`CloudRenderer`, `RenderContext`) and, re-exported from `registry`, which
clouds exist and where each one's parts live.

Each cloud is one folder, `skyhedge/clouds/<name>/`, whose `render.py` defines `CLOUD`, an object
with the `CloudRenderer` shape below; with a module `modules/<module_name>/`, a provider template
`templates/terraform/providers/<name>.tf.j2` and a catalog `skyhedge/catalog/data/<name>.json`,
that is all a new cloud needs: the folder *is* the registration (`cloud_names` lists the folders
that hold a `render.py`; the spec, the state and the catalog take exactly those names). The
other files of a cloud folder (`logs.py`, `leftovers.py`) are optional and found through
`cloud_module` by their users.

A cloud that lives outside skyhedge names its Python package and, since it has no place in
skyhedge's data folders, its module, provider template and catalog files, in a `CloudPackage`:
an installed distribution declares it under the `skyhedge.clouds` entry point group (found the
first time the cloud list is needed, so `skyhedge plan/apply/watch` take it with no wrapper), or
a program (a test's temp folder) passes the same to `register_cloud` (DESIGN.md, "Adding a cloud").

Import-light on purpose: the local launcher imports this package once per replica launch, so
the entry points (`importlib.metadata`, ~13 ms, and each plug-in's import) are read only when a
name that is not a built-in cloud is asked about, never at import.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from skyhedge.planner import PlannedReplica
    from skyhedge.spec import ServiceSpec


@dataclass(frozen=True)
class RenderContext:
    """Facts about where skyhedge runs that some clouds need (the local cloud runs processes here).

    `state_dir`: the service's state dir (absolute); `workdir`: where local replicas run their
    command (`run.workdir`, else the directory skyhedge was started in); `python`/`pythonpath`:
    how Terraform's local-exec starts skyhedge's launcher; `deployment`: the ID of the skyhedge
    state that applies the tree (`apply`, `watch`), which clouds tag their machines with so that a
    later apply can tell the machines an interrupted run of this very state launched from anyone
    else's (None for a tree rendered to be applied elsewhere: `render`, GitOps). `tree_dir`: where
    such a tree is written (`render --out`, the GitOps folder), None for the state's own tree: a
    tree that leaves this machine names no path of it (no interpreter, no install directory), and
    the directories it needs in its repository only relative to its root's folder (`tree_path`),
    so that it applies from another clone, user or install the same (a committed tree naming
    `/home/me/.venv/bin/python` failed everywhere else, and two installs rendered two trees).
    `read_only`: the render is only looked at (`plan` telling pending work), so a cloud records
    nothing of this machine's (the local cloud adopts no replica of a moved state dir: `plan`
    writes nothing, and may run as an account that could not).
    """

    state_dir: Path
    workdir: Path
    python: str
    pythonpath: str
    deployment: str | None = None
    tree_dir: Path | None = None
    read_only: bool = False

    def portable_path(self, path: Path, cloud: str, region: str) -> str:
        """`path` as a root of this tree should name it: absolute for the state's own tree; for a
        tree applied elsewhere, see `tree_path`."""
        if self.tree_dir is None:
            return str(path)
        return tree_path(path, self.tree_dir, cloud, region)


def repository_top(tree_dir: Path) -> Path:
    """The folder a tree written to `tree_dir` travels with: the nearest folder above it holding a
    `.git` (a clone, a worktree or a submodule), else its parent (`render --out` outside git)."""
    tree = tree_dir.resolve()
    for folder in tree.parents:
        if (folder / ".git").exists():
            return folder
    return tree.parent


def tree_path(path: Path, tree_dir: Path, cloud: str, region: str) -> str:
    """`path` as the (cloud, region) root of a tree written to `tree_dir` names it: relative to the
    root's folder when `path` is in the repository holding the tree (`repository_top`), so that a
    clone at any path applies it the same; absolute otherwise. A path outside the repository (a
    local backend the spec names `/srv/tfstate`, a `--state-dir` elsewhere) is no part of a
    clone: written relative (`../../../../srv/...`), a clone at another depth resolved it to
    another folder, found no state there and planned every replica anew (`2 to add` for the 2
    running). Symbolic links are resolved on both sides; the `..` steps then stay in the
    repository, so a clone reached through a link above it (whose logical path Terraform's
    `abspath` cleans) resolves them the same."""
    target = path.resolve()
    tree = tree_dir.resolve()
    if not target.is_relative_to(repository_top(tree)):
        return str(path if path.is_absolute() else target)
    return Path(os.path.relpath(target, tree / cloud / region)).as_posix()


class CloudRenderer(Protocol):
    name: str
    module_name: str
    # (root variable name, description), in the order they appear in the rendered root.
    variables: tuple[tuple[str, str], ...]
    # Root variables whose value may be null (they get `default = null`).
    nullable: frozenset[str]

    def root_inputs(
        self,
        spec: ServiceSpec,
        replicas: Sequence[PlannedReplica],
        region: str,
        *,
        instance_type: str | None,
        context: RenderContext,
    ) -> dict[str, Any]:
        """The JSON written to the root's `skyhedge.auto.tfvars.json` (keys = `variables`)."""
        ...


from skyhedge.clouds.registry import (  # noqa: E402 - after CloudRenderer, which it names
    ENTRY_POINT_GROUP,
    CloudPackage,
    builtin_clouds,
    cloud_module,
    cloud_names,
    cloud_package,
    forget_plugins,
    get_cloud,
    plugin_clouds,
    register_cloud,
    unregister_cloud,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "CloudPackage",
    "CloudRenderer",
    "RenderContext",
    "builtin_clouds",
    "cloud_module",
    "cloud_names",
    "cloud_package",
    "forget_plugins",
    "get_cloud",
    "plugin_clouds",
    "register_cloud",
    "repository_top",
    "tree_path",
    "unregister_cloud",
]
