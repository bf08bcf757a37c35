"""Which clouds exist, and where each one's parts live: the built-in cloud folders, the clouds a
program registers (`register_cloud`) and the ones installed distributions declare under the
`skyhedge.clouds` entry point group (read the first time a name that is not built in is asked
about, never at import: the local launcher imports `skyhedge.clouds` once per replica launch).
`skyhedge.clouds` re-exports all of it; see its docstring for what a cloud is made of."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any

from skyhedge._entry_points import declared as declared_entry_points
from skyhedge._entry_points import warn as _warn

if TYPE_CHECKING:
    from skyhedge.clouds import CloudRenderer, CloudSpecSection


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
_PACKAGE = __name__.rpartition(".")[0]  # skyhedge.clouds, whose folders are the built-in clouds
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
    return CloudPackage(name, f"{_PACKAGE}.{name}")


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


def cloud_spec_section(name: str) -> CloudSpecSection | None:
    """The top-level spec section cloud `name` owns (its `spec.py`'s `SECTION`), or None when the
    cloud has none (the local cloud). A plug-in's `spec.py` that cannot be imported (an error in it,
    a dependency missing), or whose `SECTION` is missing or is no `CloudSpecSection` for this
    cloud, is a `CloudError` naming the file: a plug-in's own mistake, said in one line rather than
    a traceback at the first spec read."""
    from skyhedge.clouds import CloudSpecSection
    from skyhedge.errors import CloudError

    where = f"{cloud_package(name).package.replace('.', '/')}/spec.py"
    try:
        module = cloud_module(name, "spec")
    except (Exception, SystemExit) as exc:  # a plug-in's own code, even exit(): a dependency missing
        if name in builtin_clouds():
            raise  # skyhedge's own file: a bug, shown whole
        raise CloudError(f"cloud {name!r}: {where} cannot be imported ({type(exc).__name__}: {exc})") from exc
    if module is None:
        return None
    section = getattr(module, "SECTION", None)
    if not isinstance(section, CloudSpecSection):
        got = "none" if section is None else f"a {type(section).__name__}"
        raise CloudError(f"cloud {name!r}: {where} defines no SECTION (a CloudSpecSection), got {got}")
    if section.key != name:
        raise CloudError(
            f"cloud {name!r}: {where}: SECTION.key is {section.key!r}; a cloud owns the key {name!r}"
        )
    if not dataclasses.is_dataclass(section.config):
        raise CloudError(f"cloud {name!r}: {where}: SECTION.config is not a dataclass")
    return section
