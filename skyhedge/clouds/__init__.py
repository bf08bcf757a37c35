"""Cloud registry: cloud name -> the object that turns a plan into that cloud's Terraform inputs.

Each cloud is one folder, `skyhedge/clouds/<name>/`, whose `render.py` defines `CLOUD`, an object
with the `CloudRenderer` shape below; with a module `modules/<module_name>/` and a provider
template `templates/terraform/providers/<name>.tf.j2`, that is all a new cloud needs. The other
files of a cloud folder (event sources, reconcile listings) are looked up by their own users.

Import-light on purpose: the local launcher imports this package once per replica launch.
"""

from __future__ import annotations

import importlib
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
    the directories it needs only relative to its root's folder, so that it applies from another
    clone, user or install the same (a committed tree naming `/home/me/.venv/bin/python` failed
    everywhere else, and two installs rendered two trees).
    """

    state_dir: Path
    workdir: Path
    python: str
    pythonpath: str
    deployment: str | None = None
    tree_dir: Path | None = None

    def portable_path(self, path: Path, cloud: str, region: str) -> str:
        """`path` as a root of this tree should name it: absolute for the state's own tree,
        relative to the root's folder for a tree applied elsewhere (symbolic links resolved on
        both sides, as the tree and the paths are where they are written)."""
        if self.tree_dir is None:
            return str(path)
        root = self.tree_dir.resolve() / cloud / region
        return Path(os.path.relpath(path.resolve(), root)).as_posix()


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


def get_cloud(name: str) -> CloudRenderer:
    """The renderer of cloud `name`; ImportError-free lookup errors become a clear KeyError."""
    try:
        module = importlib.import_module(f"skyhedge.clouds.{name}.render")
    except ModuleNotFoundError as exc:
        if exc.name in {f"skyhedge.clouds.{name}", f"skyhedge.clouds.{name}.render"}:
            raise KeyError(
                f"no renderer for cloud {name!r} (expected skyhedge/clouds/{name}/render.py)"
            ) from None
        raise
    return module.CLOUD  # type: ignore[no-any-return]


__all__ = ["CloudRenderer", "RenderContext", "get_cloud"]
