"""Cloud registry: which clouds exist, and where each one's parts live.

Each cloud is one folder, `skyhedge/clouds/<name>/`, whose `render.py` defines `CLOUD`, an object
with the `CloudRenderer` shape below; with a module `modules/<module_name>/`, a provider template
`templates/terraform/providers/<name>.tf.j2` and a catalog `skyhedge/catalog/data/<name>.json`,
that is all a new cloud needs: the folder *is* the registration (`cloud_names` lists the folders
that hold a `render.py`; the spec, the state and the catalog take exactly those names). The
other files of a cloud folder (`logs.py`, `leftovers.py`) are optional and found through
`cloud_module` by their users.

A cloud that lives outside skyhedge (a plug-in, a test's temp folder) is one `register_cloud`
call naming its Python package and, since it has no place in skyhedge's data folders, its
module, provider template and catalog files (DESIGN.md, "Adding a cloud").

Import-light on purpose: the local launcher imports this package once per replica launch.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
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


@dataclass(frozen=True)
class CloudPackage:
    """Where cloud `name`'s parts live: `package`, the Python package holding its `render.py` (and
    its optional `logs.py`, `leftovers.py`); the data files, when not skyhedge's own (None: the
    module `modules/<module_name>/`, the template `templates/terraform/providers/<name>.tf.j2`,
    the catalog `skyhedge/catalog/data/<name>.json`)."""

    name: str
    package: str
    module_dir: Path | None = None
    provider_template: Path | None = None
    catalog: Path | None = None


_HERE = Path(__file__).resolve().parent
#: Clouds registered from outside skyhedge (`register_cloud`), by name.
_REGISTERED: dict[str, CloudPackage] = {}


@functools.cache
def builtin_clouds() -> tuple[str, ...]:
    """The cloud folders shipped with skyhedge (sorted): those under this package with a `render.py`
    (looked up once: the state's loader asks for every replica record)."""
    return tuple(
        sorted(p.name for p in _HERE.iterdir() if (p / "render.py").is_file() and not p.name.startswith("_"))
    )


def cloud_names() -> tuple[str, ...]:
    """Every cloud skyhedge knows (sorted): its own folders and the registered ones. Asked at each
    use, not frozen at import, so that a cloud registered after skyhedge loaded is taken."""
    return tuple(sorted({*builtin_clouds(), *_REGISTERED}))


def register_cloud(
    name: str,
    package: str,
    *,
    module_dir: Path | None = None,
    provider_template: Path | None = None,
    catalog: Path | None = None,
) -> CloudPackage:
    """Make cloud `name` known to skyhedge: the one registration point of a cloud that is not a
    folder of `skyhedge/clouds/` (see the module docstring). A built-in name is refused: the
    spec, the state and the catalog would mean two clouds by it."""
    if not name or not name.replace("-", "").isalnum() or name != name.lower():
        raise ValueError(f"cloud name {name!r}: expected lowercase letters, digits and '-'")
    if name in builtin_clouds():
        raise ValueError(f"cloud {name!r} is built into skyhedge (skyhedge/clouds/{name}/)")
    entry = CloudPackage(name, package, module_dir, provider_template, catalog)
    _REGISTERED[name] = entry
    return entry


def unregister_cloud(name: str) -> None:
    """Forget a cloud `register_cloud` made known (tests clean up with it)."""
    _REGISTERED.pop(name, None)


def cloud_package(name: str) -> CloudPackage:
    """Where cloud `name`'s parts live (a built-in cloud's: `skyhedge.clouds.<name>`)."""
    return _REGISTERED.get(name) or CloudPackage(name, f"{__name__}.{name}")


def cloud_module(name: str, part: str) -> ModuleType | None:
    """The module `part` (`render`, `logs`, `leftovers`) of cloud `name`, or None when the cloud
    has no such file (an error inside the file itself is raised as is)."""
    package = cloud_package(name).package
    try:
        return importlib.import_module(f"{package}.{part}")
    except ModuleNotFoundError as exc:
        if exc.name in {package, f"{package}.{part}"}:
            return None
        raise


def get_cloud(name: str) -> CloudRenderer:
    """The renderer of cloud `name`; ImportError-free lookup errors become a clear KeyError."""
    module = cloud_module(name, "render")
    if module is None:
        package = cloud_package(name).package
        raise KeyError(f"no renderer for cloud {name!r} (expected {package.replace('.', '/')}/render.py)")
    return module.CLOUD  # type: ignore[no-any-return]


__all__ = [
    "CloudPackage",
    "CloudRenderer",
    "RenderContext",
    "builtin_clouds",
    "cloud_module",
    "cloud_names",
    "cloud_package",
    "get_cloud",
    "register_cloud",
    "unregister_cloud",
]
