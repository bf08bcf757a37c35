"""Cloud registry: which clouds exist, and where each one's parts live.

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

import functools
import importlib
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from skyhedge._entry_points import declared as declared_entry_points
from skyhedge._entry_points import warn as _warn

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
#: The entry point group an installed distribution declares its clouds under.
ENTRY_POINT_GROUP = "skyhedge.clouds"


@functools.cache
def builtin_clouds() -> tuple[str, ...]:
    """The cloud folders shipped with skyhedge (sorted): those under this package with a `render.py`
    (looked up once: the state's loader asks for every replica record)."""
    return tuple(
        sorted(p.name for p in _HERE.iterdir() if (p / "render.py").is_file() and not p.name.startswith("_"))
    )


def cloud_names() -> tuple[str, ...]:
    """Every cloud skyhedge knows (sorted): its own folders, the installed plug-ins and the
    registered ones. Asked at each use, not frozen at import, so that a cloud registered after
    skyhedge loaded is taken."""
    return tuple(sorted({*builtin_clouds(), *plugin_clouds(), *_REGISTERED}))


def _name_problem(name: object) -> str | None:
    """Why `name` cannot name an outside cloud (None: it can). A built-in name is refused: the
    spec, the state and the catalog would mean two clouds by it."""
    if not isinstance(name, str) or not name or not name.replace("-", "").isalnum() or name != name.lower():
        return f"cloud name {name!r}: expected lowercase letters, digits and '-'"
    if name in builtin_clouds():
        return f"cloud {name!r} is built into skyhedge (skyhedge/clouds/{name}/)"
    return None


def register_cloud(
    name: str,
    package: str,
    *,
    module_dir: Path | None = None,
    provider_template: Path | None = None,
    catalog: Path | None = None,
) -> CloudPackage:
    """Make cloud `name` known to skyhedge from this process (a test, a program embedding
    skyhedge); an installed plug-in declares the same `CloudPackage` as an entry point instead
    (`plugin_clouds`). A registration here wins over a plug-in of the same name."""
    problem = _name_problem(name)
    if problem:
        raise ValueError(problem)
    entry = CloudPackage(name, package, module_dir, provider_template, catalog)
    _REGISTERED[name] = entry
    return entry


def _entry_point_label(ep: Any) -> str:
    """`name = value` of entry point `ep` and the distribution declaring it, as a user finds them
    in `pip show`/`entry_points.txt`."""
    dist = getattr(ep, "dist", None)
    try:
        where = f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"
    except Exception:  # noqa: BLE001 - a METADATA that does not parse: name its folder instead
        where = str(getattr(dist, "_path", "an unreadable distribution"))
    return f"'{ep.name} = {ep.value}' of {where}"


def _plugin_problem(ep: Any, obj: object) -> str | None:
    """Why the object entry point `ep` names is no usable cloud (None: it is one)."""
    if not isinstance(obj, CloudPackage):
        return f"names a {type(obj).__name__}, expected a skyhedge.clouds.CloudPackage"
    if obj.name != ep.name:
        return f"its CloudPackage is named {obj.name!r}, not {ep.name!r}"
    for field in ("module_dir", "provider_template", "catalog"):
        path = getattr(obj, field)
        if path is not None and not (isinstance(path, Path) and path.is_absolute()):
            return f"its CloudPackage.{field} {path!r} is not an absolute Path"
    return None


_PLUGINS: Mapping[str, CloudPackage] | None = None  # read once, by `plugin_clouds`
_PLUGINS_LOCK = threading.RLock()  # re-entrant: a plug-in's import may ask for the clouds itself
_READING = False


def plugin_clouds() -> Mapping[str, CloudPackage]:
    """The clouds installed distributions declare in the `skyhedge.clouds` entry point group, by
    name: `mycloud = mypkg.skyhedge_cloud:CLOUD`, where `CLOUD` is a `CloudPackage` named
    `mycloud` whose paths are absolute (DESIGN.md, "Adding a cloud").

    Read once per process, the first time a cloud that is not built in is asked about (the local
    launcher, which only needs its own cloud, never pays for it). A plug-in that cannot be used
    (an invalid or built-in name, an error importing it, the wrong object, a name two
    distributions declare) is one `warning:` line naming its entry point and distribution, and
    skyhedge goes on without it: a spec naming that cloud meets the usual "expected one of ...".
    Two distributions declaring one name are both left out: which one a spec meant (and a state
    was applied with) would depend on the order of `sys.path`."""
    global _PLUGINS, _READING
    with _PLUGINS_LOCK:
        if _PLUGINS is not None:
            return _PLUGINS
        if _READING:  # asked from a plug-in's own import: the plug-ins are not known yet
            return MappingProxyType({})
        _READING = True
        try:
            _PLUGINS = MappingProxyType(_read_plugins())
        finally:
            _READING = False
        return _PLUGINS


def forget_plugins() -> None:
    """Read the entry points again at the next use (tests that put a distribution on the path)."""
    global _PLUGINS
    with _PLUGINS_LOCK:
        _PLUGINS = None


def _read_plugins() -> dict[str, CloudPackage]:
    candidates: dict[str, list[tuple[str, CloudPackage]]] = {}
    for ep in declared_entry_points(ENTRY_POINT_GROUP, "cloud plug-ins"):
        label = _entry_point_label(ep)
        problem = _name_problem(ep.name)
        if problem is None:
            try:
                obj = ep.load()
            except (Exception, SystemExit) as exc:  # the plug-in's own code: any error, even exit()
                problem = f"cannot load ({type(exc).__name__}: {exc})"
            else:
                problem = _plugin_problem(ep, obj)
        if problem:
            _warn(f"cloud plug-in {label} skipped: {problem}")
        else:
            candidates.setdefault(ep.name, []).append((label, obj))
    found: dict[str, CloudPackage] = {}
    for name, declared in candidates.items():
        if len(declared) == 1:
            found[name] = declared[0][1]
        else:
            labels = " and ".join(label for label, _ in declared)
            _warn(f"cloud plug-ins {labels} skipped: each declares cloud {name!r} (uninstall all but one)")
    return found


def unregister_cloud(name: str) -> None:
    """Forget a cloud `register_cloud` made known (tests clean up with it)."""
    _REGISTERED.pop(name, None)


def cloud_package(name: str) -> CloudPackage:
    """Where cloud `name`'s parts live (a built-in cloud's: `skyhedge.clouds.<name>`; the entry
    points are read only for a name that is neither registered nor built in)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in builtin_clouds() and name in plugin_clouds():
        return plugin_clouds()[name]
    return CloudPackage(name, f"{__name__}.{name}")


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
