"""Render the Terraform tree of a plan in memory, then write it atomically.

Tree layout (everything a GitOps repository needs; a tree written for one, `RenderContext.tree_dir`,
names no path of this machine: the local cloud's paths are relative to its root's folder):

    skyhedge-tree.json                 manifest: service, backend, roots and their replica IDs
    README.md, .gitignore
    modules/<cloud>-replicas/          copies of the modules the roots call
    <cloud>/<region>/main.tf           terraform block, provider, module call (no spec values)
    <cloud>/<region>/variables.tf      root variables (typed and validated by the module)
    <cloud>/<region>/outputs.tf
    <cloud>/<region>/skyhedge.auto.tfvars.json   every spec-derived value
    <cloud>/<region>/backend.tfbackend.json      backend settings for `init -backend-config`

Rendering is a pure function of its inputs: sorted keys, fixed indentation, no timestamps, so the
same spec and state give a byte-identical tree (and a root's digest says whether it changed).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from skyhedge._interrupts import interrupts_deferred
from skyhedge._resources import modules_dir, templates_dir
from skyhedge.clouds import RenderContext, cloud_names, cloud_package, get_cloud
from skyhedge.errors import RenderError
from skyhedge.planner import CREATE, Plan, PlannedReplica, replica_order
from skyhedge.render.backend import backend_config
from skyhedge.spec import ServiceSpec, nfc_change, nfc_hint
from skyhedge.state import check_writable, umask_mode

TREE_MANIFEST = "skyhedge-tree.json"
TFVARS_FILE = "skyhedge.auto.tfvars.json"
BACKEND_FILE = "backend.tfbackend.json"
FORMAT = 1
REQUIRED_VERSION = ">= 1.5.0, < 2.0.0"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
# Terraform's working files that live beside a root's configuration and must survive a re-render.
_PRESERVED = (
    ".terraform",
    ".terraform.lock.hcl",
    "terraform.tfstate",
    "terraform.tfstate.backup",
    "terraform.tfstate.d",
    # the state Terraform could not save (a full disk): the only record of what its apply launched,
    # until the next run puts it back in place (`engine.restore_errored_state`)
    "errored.tfstate",
)


def hcl_string(value: str) -> str:
    """An HCL string literal whose content is inert: JSON escapes, and `${`/`%{` doubled.

    Templates only ever apply it to skyhedge's own constants; spec values go to JSON files.
    """
    return json.dumps(value, ensure_ascii=False).replace("${", "$${").replace("%{", "%%{")


def _registered_template(name: str) -> tuple[str, str, Callable[[], bool]] | None:
    """`providers/<cloud>.tf.j2` of a cloud registered from outside skyhedge (`register_cloud`
    names the file): skyhedge's templates folder holds only its own clouds' ones."""
    folder, _, file = name.partition("/")
    cloud = file.removesuffix(".tf.j2")
    if folder != "providers" or cloud not in cloud_names():
        return None
    path = cloud_package(cloud).provider_template
    if path is None:
        return None
    mtime = path.stat().st_mtime_ns

    def uptodate() -> bool:  # (the cloud may be registered again since, with another file)
        try:
            return cloud_package(cloud).provider_template == path and path.stat().st_mtime_ns == mtime
        except OSError:
            return False

    return path.read_text(encoding="utf-8"), str(path), uptodate


@functools.lru_cache(maxsize=4)
def _environment(root: str) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader(
            [jinja2.FileSystemLoader(root), jinja2.FunctionLoader(_registered_template)]
        ),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["hcl"] = hcl_string
    return env


def environment() -> jinja2.Environment:
    return _environment(str(templates_dir() / "terraform"))


def _json_bytes(data: Any, where: str = "") -> bytes:
    """`data` as the tree's JSON (UTF-8, which Terraform reads). A value that is no text, a path
    holding bytes outside UTF-8 (a state dir or working directory named so: Linux allows it), is
    one line naming the root and the input, not a UnicodeEncodeError traceback."""
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        field, value = _not_utf8(data) or ("", text)
        raise RenderError(
            f"{where}{field}: {os.fsencode(value)!r} is not UTF-8 text, which Terraform needs: a path "
            "holding bytes outside UTF-8 (the state dir, `run.workdir`, or the directory skyhedge runs "
            "in); use one whose name is UTF-8"
        ) from None


def _tfvars_bytes(inputs: dict[str, Any], where: str) -> bytes:
    """A root's inputs as `_json_bytes` writes them, but for the `replicas` map, in the order its
    IDs were handed out (`replica_order`: `r-9999` before `r-10000`, where text order puts
    `r-10000` first). Terraform reads a map by key, so the order is the reader's only; the root's
    digest is taken over `_json_bytes` (`_render_root`), so a tree rendered before this order
    is not applied again for it, and `write_tree` keeps a file an earlier release wrote in text order
    (`_kept_as_written`)."""
    ordered = json.loads(_json_bytes(inputs, where))  # (every object's keys in text order)
    replicas = ordered.get("replicas")
    if isinstance(replicas, dict):
        ordered["replicas"] = {rid: replicas[rid] for rid in sorted(replicas, key=replica_order)}
    return (json.dumps(ordered, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _as_an_earlier_release_wrote(name: str, data: bytes) -> bytes | None:
    """The bytes a release before ID order wrote for the tree file `name` that this one writes as
    `data`, or None for a file whose bytes it did not order so (every other file). Only the order
    differs: the tfvars' keys (the `replicas` map among them) all in text order, as `_json_bytes`
    writes them, and the manifest's replica lists sorted as text (r-10000 before r-9999)."""
    if not (name == TREE_MANIFEST or (name.endswith("/" + TFVARS_FILE) and not name.startswith("modules/"))):
        return None
    value = json.loads(data)  # (this release's own output: valid JSON)
    if name == TREE_MANIFEST:
        for root in value.get("roots", []):
            root["replicas"] = sorted(root["replicas"])
    return _json_bytes(value)


def _not_utf8(data: Any) -> tuple[str, str] | None:
    """The key path and value of the first string in `data` (a JSON value) that UTF-8 cannot
    encode (surrogate escapes of undecodable bytes), or None."""
    return _first_string(data, _unencodable)


def _unencodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _first_string(data: Any, bad: Callable[[str], bool], path: str = "") -> tuple[str, str] | None:
    """The key path and value of the first string in `data` (a JSON value, keys included) that
    is `bad`, or None."""
    if isinstance(data, str):
        return (path, data) if bad(data) else None
    if isinstance(data, dict):
        pairs = [(f"{path}.{key}" if path else str(key), value) for key, value in data.items()]
        pairs = [(path, key) for key in data] + pairs
    elif isinstance(data, list):
        pairs = [(f"{path}[{i}]", value) for i, value in enumerate(data)]
    else:
        return None
    for here, value in pairs:
        found = _first_string(value, bad, here)
        if found is not None:
            return found
    return None


def _require_nfc(data: Any, where: str) -> None:
    """Refuse a root input Terraform would change (it converts every string to Unicode NFC,
    `skyhedge.spec.nfc_change`): a state dir, working directory or skyhedge install path named
    so (Linux keeps file names as bytes; macOS writes them decomposed) reached the launcher as
    another path, whose directories Terraform then created as a twin of the real ones, and the
    local replicas failed to start. The spec's own values are refused when it is read."""
    found = _first_string(data, lambda text: nfc_change(text) is not None)
    if found is not None:
        field, value = found
        # a path is shown; a spec text (a command, an env value: maybe a secret) is not
        shown = "" if field.startswith("run.") and field != "run.workdir" else f"{value!r} "
        raise RenderError(
            f"{where}{field}: {shown}is not in Unicode NFC ({nfc_hint(value, nfc_change(value) or 0)}), "
            "to which Terraform converts every string: it would name another path; use a state "
            "dir, `run.workdir` and working directory whose names are composed (NFC)"
        )


def _tidy(text: str) -> bytes:
    """Collapse the blank-line runs Jinja blocks leave behind, so `terraform fmt` has nothing to do."""
    text = re.sub(r"\n{3,}", "\n\n", text)
    text = re.sub(r"\{\n\n", "{\n", text)
    text = re.sub(r"\n\n(\s*\})", r"\n\1", text)
    return (text.strip("\n") + "\n").encode("utf-8")


@functools.lru_cache(maxsize=16)
def _module_files_cached(
    module_path: str, stamp: tuple[tuple[str, int, int], ...]
) -> tuple[tuple[str, bytes], ...]:
    base = Path(module_path)
    return tuple((name, (base / name).read_bytes()) for name, _, _ in stamp)


def module_dir(cloud: str, module_name: str) -> Path:
    """Cloud `cloud`'s Terraform module: skyhedge's `modules/<module_name>/`, or the folder that a
    cloud registered from outside skyhedge named (`register_cloud(module_dir=...)`)."""
    return cloud_package(cloud).module_dir or modules_dir() / module_name


def module_files(cloud: str, module_name: str) -> tuple[tuple[str, bytes], ...]:
    """The module's files (relative path, bytes), sorted; cached until a file changes."""
    base = module_dir(cloud, module_name)
    if not base.is_dir():
        raise RenderError(f"Terraform module {module_name!r} of cloud {cloud!r} not found: no folder {base}")
    stamp = []
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base)
        if not path.is_file() or any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
            continue
        st = path.stat()
        stamp.append((rel.as_posix(), st.st_mtime_ns, st.st_size))
    return _module_files_cached(str(base), tuple(stamp))


@dataclass(frozen=True)
class RenderedRoot:
    """One Terraform root: its files (paths relative to the tree) and a digest of everything it uses."""

    cloud: str
    region: str
    module: str
    replicas: tuple[str, ...]
    files: tuple[tuple[str, bytes], ...]
    digest: str

    @property
    def path(self) -> str:
        return f"{self.cloud}/{self.region}"

    @property
    def key(self) -> tuple[str, str]:
        return (self.cloud, self.region)


@dataclass(frozen=True)
class RenderedTree:
    service: str
    roots: tuple[RenderedRoot, ...]
    files: tuple[tuple[str, bytes], ...]

    def root(self, cloud: str, region: str) -> RenderedRoot:
        for r in self.roots:
            if r.key == (cloud, region):
                return r
        raise KeyError(f"{cloud}/{region}")


def _check_name(what: str, value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise RenderError(f"cannot render a root for {what} {value!r}: expected [a-z0-9-] characters")
    return value


def _render_root(
    spec: ServiceSpec,
    cloud: str,
    region: str,
    replicas: list[PlannedReplica],
    *,
    instance_type: str | None,
    context: RenderContext,
) -> RenderedRoot:
    try:
        renderer = get_cloud(cloud)
    except KeyError as exc:
        raise RenderError(str(exc.args[0])) from None
    inputs = renderer.root_inputs(spec, replicas, region, instance_type=instance_type, context=context)
    names = [name for name, _ in renderer.variables]
    if sorted(inputs) != sorted(names):
        raise RenderError(
            f"cloud {cloud!r}: root inputs {sorted(inputs)} do not match its variables {sorted(names)}"
        )
    env = environment()
    ctx = {
        "cloud": cloud,
        "module_name": renderer.module_name,
        "required_version": REQUIRED_VERSION,
        "backend": spec.terraform.backend,
        "variables": names,
        "width": max(len(n) for n in names),
    }
    try:
        main_tf = env.get_template("root/main.tf.j2").render(ctx)
        variables_tf = env.get_template("root/variables.tf.j2").render(
            module_name=renderer.module_name, variables=renderer.variables, nullable=renderer.nullable
        )
        outputs_tf = env.get_template("root/outputs.tf.j2").render(module_name=renderer.module_name)
    except jinja2.TemplateError as exc:
        raise RenderError(f"rendering the {cloud}/{region} root failed: {exc}") from exc
    prefix = f"{cloud}/{region}/"
    backend = backend_config(spec, cloud, region, tree_dir=context.tree_dir)
    if any(r.action == CREATE for r in replicas):  # (`destroy` tears down what was launched)
        _require_nfc({**inputs, **{f"backend.{k}": v for k, v in backend.items()}}, f"{cloud}/{region}: ")
    files = (
        (prefix + BACKEND_FILE, _json_bytes(backend, f"{cloud}/{region}: ")),
        (prefix + "main.tf", _tidy(main_tf)),
        (prefix + "outputs.tf", _tidy(outputs_tf)),
        (prefix + TFVARS_FILE, _tfvars_bytes(inputs, f"{cloud}/{region}: ")),
        (prefix + "variables.tf", _tidy(variables_tf)),
    )
    # the inputs' digest is of their text-ordered JSON, as it was before the `replicas` map was
    # written in ID order: the same inputs, the same digest, so nothing is applied again for it
    canonical = {prefix + TFVARS_FILE: _json_bytes(inputs, f"{cloud}/{region}: ")}
    digest = hashlib.sha256()
    for name, data in (*files, *(("modules/" + n, b) for n, b in module_files(cloud, renderer.module_name))):
        digest.update(name.encode() + b"\0" + hashlib.sha256(canonical.get(name, data)).digest())
    return RenderedRoot(
        cloud=cloud,
        region=region,
        module=renderer.module_name,
        replicas=tuple(sorted((r.id for r in replicas), key=replica_order)),
        files=files,
        digest=digest.hexdigest(),
    )


def render_tree(
    spec: ServiceSpec,
    plan: Plan,
    *,
    context: RenderContext,
    instance_types: Mapping[str, str] | None = None,
    extra_roots: Iterable[tuple[str, str]] = (),
) -> RenderedTree:
    """Render the roots of `plan` (every root it touches, plus `extra_roots`) with its desired replicas.

    A root whose replicas are all being deleted is still rendered (with none), so applying it
    destroys them.
    """
    by_root: dict[tuple[str, str], list[PlannedReplica]] = defaultdict(list)
    for r in plan.desired:
        by_root[r.root].append(r)
    keys = sorted({*plan.roots(), *extra_roots})
    roots = []
    for cloud, region in keys:
        _check_name("cloud", cloud)
        _check_name("region", region)
        roots.append(
            _render_root(
                spec,
                cloud,
                region,
                by_root.get((cloud, region), []),
                instance_type=(instance_types or {}).get(cloud),
                context=context,
            )
        )
    files: dict[str, bytes] = {}
    for root in roots:
        files.update(root.files)
        for name, data in module_files(root.cloud, root.module):
            files[f"modules/{root.module}/{name}"] = data
    manifest = {
        "format": FORMAT,
        "service": spec.name,
        "backend": spec.terraform.backend,
        "roots": [
            {
                "path": r.path,
                "cloud": r.cloud,
                "region": r.region,
                "module": r.module,
                "replicas": list(r.replicas),
            }
            for r in roots
        ],
    }
    env = environment()
    files[TREE_MANIFEST] = _json_bytes(manifest)
    files["README.md"] = (
        env.get_template("README.md.j2").render(service=spec.name, roots=roots).encode("utf-8")
    )
    files[".gitignore"] = env.get_template("gitignore.j2").render().encode("utf-8")
    return RenderedTree(service=spec.name, roots=tuple(roots), files=tuple(sorted(files.items())))


# ------------------------------------------------------------------------------------------------
# Writing


def _old_manifest(out: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((out / TREE_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _old_roots(out: Path) -> list[str]:
    try:
        return [str(r["path"]) for r in _old_manifest(out).get("roots", [])]
    except (KeyError, TypeError):
        return []


def _has_local_state(root_dir: Path) -> bool:
    """A root holding local Terraform state, its default workspace's or another workspace's; a
    backup counts too (a run killed mid-write leaves the state empty, its backup the real one)."""
    files = [
        *root_dir.glob("*.tfstate"),
        *root_dir.glob("*.tfstate.backup"),
        *root_dir.glob("terraform.tfstate.d/*/terraform.tfstate*"),
    ]
    return any(p.is_file() and p.stat().st_size > 0 for p in files)


def _state_dirs(out: Path) -> set[str]:
    """Every folder of `out` holding local Terraform state, listed in the manifest or not (a root
    the manifest of an edited tree lost, state copied in by hand): the swap would delete it."""
    found = set()
    for path in out.rglob("*.tfstate*"):
        parts = path.relative_to(out).parts
        if ".terraform" in parts:
            continue
        cut = parts.index("terraform.tfstate.d") if "terraform.tfstate.d" in parts else len(parts) - 1
        found.add("/".join(parts[:cut]) or ".")
    return found


# The files a root holds besides Terraform's carried-over ones (`_PRESERVED`), and Terraform's
# throw-away working files there (the tree's .gitignore): a re-render may drop both.
_ROOT_FILES = frozenset({"main.tf", "variables.tf", "outputs.tf", TFVARS_FILE, BACKEND_FILE})
_SCRATCH = (".terraform.tfstate.lock.info", "crash.log")
_SCRATCH_SUFFIXES = (".tfplan",)
_TOP_FILES = frozenset({TREE_MANIFEST, "README.md", ".gitignore"})


def _is_terraforms(name: str) -> bool:
    return (
        name in _PRESERVED
        or name in _SCRATCH
        or name.endswith(_SCRATCH_SUFFIXES)
        or ".tfstate" in name  # terraform.tfstate.backup, foo.tfstate: state (checked apart)
    )


#: What an operating system or an editor leaves beside the files it shows or edits: Finder's
#: `.DS_Store`, Explorer's `Thumbs.db`, vim's swap files (`.main.tf.swp`, `.swo`, ... `.swa`) and
#: write probe (`4913`), the backups of vim and emacs (`main.tf~`) and emacs's lock links
#: (`.#main.tf`). Browsing or editing a tree made them, and each blocked the next render and every
#: `--gitops` pass as a file skyhedge does not render (a `.DS_Store` in a Finder window left open).
#: They are neither refused nor deleted: a re-render carries them over where they are (an edit
#: in progress keeps its swap file), and the tree's `.gitignore` lists them, so `--gitops` never
#: commits them (one a user committed by hand stays theirs).
LITTER_NAMES = frozenset({".DS_Store", "Thumbs.db", "4913"})
_LITTER_RE = re.compile(r"\..+\.sw[a-p]|.+~|\.#.+")


def is_litter(name: str) -> bool:
    """Whether a file named `name` is an operating system's or an editor's (`LITTER_NAMES`)."""
    return name in LITTER_NAMES or _LITTER_RE.fullmatch(name) is not None


def _litter(out: Path) -> list[str]:
    """The litter files (and links) in the tree at `out` (`is_litter`), relative, sorted; what
    Terraform keeps (`.terraform/`, a root's workspaces) is carried whole and not looked into."""
    found: list[str] = []
    for folder, dirs, files in os.walk(out):
        here = Path(folder).relative_to(out).as_posix()
        here = "" if here == "." else here
        entries = list(files)
        for d in list(dirs):
            if os.path.islink(os.path.join(folder, d)):
                entries.append(d)
                dirs.remove(d)
            elif d in (".terraform", "terraform.tfstate.d"):
                dirs.remove(d)
        found += [f"{here}/{name}" if here else name for name in entries if is_litter(name)]
    return sorted(found)


def holds_only_litter(out: Path) -> bool:
    """Whether the folder `out` is empty but for litter files (`is_litter`): a new folder for a
    tree that Finder or an editor has already been in counts as empty, not as someone's folder."""
    return all(is_litter(p.name) and (p.is_symlink() or not p.is_dir()) for p in out.iterdir())


def _is_override(name: str) -> bool:
    """Whether Terraform reads `name` as an override file (`override.tf`, `x_override.tf`, and
    their `.tf.json`): someone's change to the module beside it, as no skyhedge module has one."""
    stem = name.removesuffix(".json")
    return stem == "override.tf" or stem.endswith("_override.tf")


def foreign_files(out: Path, tree: RenderedTree) -> list[str]:
    """The files (and links) in the rendered tree at `out` that neither skyhedge renders nor
    Terraform made, sorted: the swap would delete them. A README or a script a user added to a
    GitOps tree (`infra/NOTES.md`), or an `override.tf` in a root, vanished at the next render
    without a word; `write_tree(strict=True)` refuses them instead. Files skyhedge renders in any
    root the old or new manifest lists, and any file of a module it ships (an older release's
    included) but an override file (`_is_override`), are its own, so a root dropped from the
    plan still goes away. An OS's or editor's litter (`is_litter`) is nobody's to refuse: the
    swap carries it over."""
    roots = {r.path for r in tree.roots} | set(_old_roots(out))
    shipped = {p.name for p in modules_dir().iterdir() if p.is_dir()} if modules_dir().is_dir() else set()
    rendered = {name for name, _ in tree.files}
    found: list[str] = []
    for folder, dirs, files in os.walk(out):
        here = Path(folder).relative_to(out).as_posix()
        here = "" if here == "." else here
        in_root = here in roots
        parts = here.split("/") if here else []
        in_module = len(parts) >= 2 and parts[0] == "modules" and parts[1] in shipped
        entries = list(files)
        for d in list(dirs):
            if os.path.islink(os.path.join(folder, d)):
                entries.append(d)  # a link is an entry, never walked into
                dirs.remove(d)
            elif d == ".terraform" or (in_root and d == "terraform.tfstate.d"):
                dirs.remove(d)  # Terraform's own (carried, or checked for state apart)
        for name in entries:
            rel = f"{here}/{name}" if here else name
            if rel in rendered or (in_module and not _is_override(name)) or (not here and name in _TOP_FILES):
                continue
            if in_root and (name in _ROOT_FILES or _is_terraforms(name)):
                continue
            if is_litter(name):  # carried over by the swap, never refused (`LITTER_NAMES`)
                continue
            found.append(rel)
    return sorted(found)


def git_repository_in(out: Path) -> str | None:
    """Why the rendered tree may not replace `out`, when `out` holds a git repository of its own
    (`.git`: a folder, or a worktree's or submodule's file), else None. The swap replaces every
    file the plan does not render, and a tree rendered once and then `git init`ed in place lost
    its repository, history and all, at the next render."""
    if os.path.lexists(out / ".git"):
        return f"{out}: holds a git repository (.git), which replacing the tree would delete"
    # one nested in the tree (a root `git init`ed): deleted the same way. Terraform's own
    # `.terraform` folders (git-sourced modules keep their .git there) are carried over: skipped
    for folder, dirs, files in os.walk(out):
        dirs[:] = [d for d in dirs if d != ".terraform"]
        if ".git" in dirs or ".git" in files:
            where = Path(folder) / ".git"
            return f"{out}: holds a git repository ({where}), which replacing the tree would delete"
    return None


def resolve_path(path: Path) -> Path:
    """`path` made absolute with every symbolic link resolved; it need not exist. A symlink loop
    raises on every Python: `Path.resolve` raises RuntimeError for one up to 3.12, but from 3.13
    on returns the path with the looping link left in it, which the caller would then try to write
    through (`Not a directory`). A link still left in the resolved path is such a loop: resolving
    it strictly raises the OS's ELOOP error."""
    resolved = path.resolve()
    for part in (resolved, *resolved.parents):
        if part.is_symlink():
            part.resolve(strict=True)
    return resolved


def write_tree(tree: RenderedTree, out: Path, *, strict: bool = True) -> None:
    """Write `tree` to `out` so readers see the old tree or the new one, never a mix.

    `strict` (a tree for people and repositories: `render --out`, GitOps) refuses a file in `out`
    that the swap would delete but that neither skyhedge rendered nor Terraform made
    (`foreign_files`); the state's own tree (`tf/tree`) passes False: nobody keeps files there.
    With `strict`, an operating system's or an editor's litter (`is_litter`: `.DS_Store`, swap
    files) is neither refused nor deleted: it is carried over where it is.

    The new tree is written to a temp dir beside `out`, then swapped in: on Linux by one atomic
    exchange of the two directories (renameat2), elsewhere by two renames, between which a reader
    may briefly find no tree (never a partial one). Terraform's own
    files inside a root (`.terraform/`, the lock file, local state) are carried over (one that is a
    symbolic link as the link, never as the file it points to). `out` must be
    absent, empty, or a tree skyhedge rendered (it holds `skyhedge-tree.json`) that holds no
    git repository of its own (`.git`): anything else is refused rather than replaced. A
    symlink is written through (its target is replaced, the link stays), and `out` may not be
    the current directory or hold it: the swap would leave the shell in a deleted directory.
    """
    try:
        out = resolve_path(Path(out))  # "." has no name to rename; a link would itself be replaced
    except (RuntimeError, OSError) as exc:  # a symlink loop
        raise RenderError(f"{out}: cannot resolve the path ({exc})") from exc
    if Path.cwd().resolve().is_relative_to(out):
        raise RenderError(
            f"{out}: is the current directory (or holds it); the tree is swapped in by rename, so "
            "render it from another directory (e.g. cd .. and --out with the directory's name)"
        )
    if out.exists():
        if not out.is_dir():
            raise RenderError(f"{out}: exists and is not a directory")
        if not holds_only_litter(out) and not (out / TREE_MANIFEST).is_file():
            raise RenderError(
                f"{out}: not empty and not a skyhedge-rendered tree (no {TREE_MANIFEST}); "
                "refusing to replace it"
            )
        repo = git_repository_in(out)
        if repo is not None:
            raise RenderError(
                f"{repo}; render into a folder of the repository instead (e.g. {out / 'infra'})"
            )
        owner = _old_manifest(out).get("service")
        if owner is not None and owner != tree.service:
            raise RenderError(
                f"{out}: holds the tree of service {owner!r}, not {tree.service!r}; refusing to "
                "replace it (render each service into its own directory)"
            )
    new_roots = {r.path for r in tree.roots}
    for old in sorted({*_old_roots(out), *_state_dirs(out)}) if out.exists() else []:
        if old not in new_roots and _has_local_state(out / old):
            raise RenderError(
                f"{out / old}: holds Terraform state but the plan has no {old} root any more; "
                "destroy or move that state before rendering"
            )
    foreign = foreign_files(out, tree) if strict and out.exists() else []
    if foreign:
        more = f" (and {len(foreign) - 1} more: {', '.join(foreign[1:4])}" if len(foreign) > 1 else ""
        more += ", ...)" if len(foreign) > 4 else (")" if more else "")
        raise RenderError(
            f"{out / foreign[0]}{more}: not a file skyhedge renders, and the re-rendered tree "
            "would replace it; move it out of the tree (or delete it) and render again"
        )
    check_writable(out, "rendered tree", directory=True)
    # A Ctrl-C between two steps of the swap left the old tree beside the new one, or deleted
    # it with its `.terraform` and workspace state: taken once the tree is whole (_interrupts)
    with interrupts_deferred():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
            os.chmod(tmp, umask_mode("dir"))  # mkdtemp's 0700 would outlive the rename
        except OSError as exc:
            raise RenderError(f"{out}: cannot write the rendered tree ({exc.strerror or exc})") from exc
        try:
            tree = _kept_as_written(tree, out)
            _swap_in(tree, tmp, out, new_roots, litter=_litter(out) if strict and out.exists() else ())
        except OSError as exc:
            raise RenderError(f"{out}: cannot write the rendered tree ({exc.strerror or exc})") from exc


def _kept_as_written(tree: RenderedTree, out: Path) -> RenderedTree:
    """`tree` with the bytes `out` holds for each file that is, byte for byte, what a release
    before replica IDs were listed in ID order (r-9999 before r-10000) wrote for the same values
    (`_as_an_earlier_release_wrote`): such a tree is not rewritten for the order alone, so a GitOps
    repository gets no commit, and `render --out` no diff, that only reorders lines. Any other
    difference is written as rendered, as every render before did: a value, a list's order (a
    plug-in's list under `count` is a change to Terraform), a number for a bool (`0` for `false`,
    which Python's `==` holds equal), a file edited or reformatted by hand. (Compared as parsed
    values instead, all of those were kept, and Terraform went on reading the old file.)"""
    if not out.is_dir():
        return tree
    files = []
    for name, data in tree.files:
        legacy = _as_an_earlier_release_wrote(name, data)
        if legacy is not None and legacy != data:
            with contextlib.suppress(OSError):  # (a regular file only: never a FIFO or a link's target)
                path = out / name
                if stat.S_ISREG(os.lstat(path).st_mode) and path.read_bytes() == legacy:
                    data = legacy
        files.append((name, data))
    return RenderedTree(service=tree.service, roots=tree.roots, files=tuple(files))


def snapshot_tree(out: Path) -> tuple[tuple[str, bytes], ...] | None:
    """The files of the rendered tree at `out` (Terraform's `.terraform` dirs aside), for
    `restore_tree`; None when there is none."""
    if not (out / TREE_MANIFEST).is_file():
        return None
    return tuple(
        (path.relative_to(out).as_posix(), path.read_bytes())
        for path in sorted(out.rglob("*"))
        if path.is_file() and ".terraform" not in path.relative_to(out).parts
    )


def restore_tree(out: Path, files: tuple[tuple[str, bytes], ...] | None) -> None:
    """Put the tree at `out` back as `snapshot_tree` found it (None: there was none), swapped in
    as `write_tree` does; `.terraform` dirs stay. A declined `apply` renders its preview into the
    state's tree: left there, the tree described a plan nobody accepted, which a `terraform
    apply` run by hand in it (as the tree's README invites) would carry out."""
    if files is None:
        shutil.rmtree(out, ignore_errors=True)
        return
    out = Path(out).resolve()
    cached = {p.parent.relative_to(out).as_posix() for p in out.rglob(".terraform") if p.is_dir()}
    with interrupts_deferred():  # as write_tree's swap
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        os.chmod(tmp, umask_mode("dir"))
        _swap_in(RenderedTree(service="", roots=(), files=files), tmp, out, cached, carried=(".terraform",))


_RENAME_EXCHANGE = 2  # linux/fs.h


@functools.cache
def _renameat2() -> Any:
    """libc's renameat2 (Linux, glibc >= 2.28), or None where there is none."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (renameat2 RENAME_EXCHANGE); False where the platform or
    the file system cannot, so the caller falls back to two renames."""
    function = _renameat2()
    if function is None:
        return False
    at_fdcwd = -100
    return function(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _copy_link(src: Path, dst: Path) -> None:
    """Recreate the symbolic link `src` at `dst`, pointing where it points (read, not followed)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.readlink(src), dst)


def _swap_in(
    tree: RenderedTree,
    tmp: Path,
    out: Path,
    new_roots: set[str],
    carried: tuple[str, ...] = _PRESERVED,
    litter: Iterable[str] = (),
) -> None:
    """Fill `tmp` with `tree`, Terraform's files (`carried`) and the `litter` files from `out`
    (paths relative to it, each kept where it is: its folder made again if the tree dropped
    it), then rename it to `out`."""
    moved: list[tuple[Path, Path]] = []
    try:
        for name, data in tree.files:
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if out.exists():
            for root in new_roots:
                for item in carried:
                    src = out / root / item
                    if src.is_symlink():
                        # carried as the link it is, never as what it points to: a tree is often
                        # a git checkout, where anyone who can merge can plant a link, and a
                        # `.terraform.lock.hcl -> /proc/self/environ` was copied in as the
                        # watcher's environment (cloud keys and all), which GitOps then committed
                        _copy_link(src, tmp / root / item)
                    elif src.is_file():
                        shutil.copy2(src, tmp / root / item)
                    elif src.is_dir():
                        moved.append((src, tmp / root / item))
            for rel in litter:
                src, dst = out / rel, tmp / rel
                if os.path.lexists(dst):  # (no rendered or carried file has such a name)
                    continue
                with contextlib.suppress(FileNotFoundError):  # gone meanwhile (vim's `4913` is)
                    if src.is_symlink():  # an emacs lock is a dangling link: copied as the link
                        _copy_link(src, dst)
                    elif src.is_file():
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(src, dst)
        backup = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        if out.exists():
            if _exchange(tmp, out):  # one atomic step: `out` is never absent
                os.rename(tmp, backup)
            else:
                os.rename(out, backup)
                os.rename(tmp, out)
            for src, _ in moved:  # .terraform dirs: big, so moved (not copied) once the swap is done
                rel = src.relative_to(out)
                with contextlib.suppress(OSError):
                    os.rename(backup / rel, out / rel)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
