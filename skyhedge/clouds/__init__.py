"""The cloud interface (`CloudRenderer`, `RenderContext`) and, re-exported from `registry`, which
clouds exist and where each one's parts live.

Each cloud is one folder, `skyhedge/clouds/<name>/`, whose `render.py` defines `CLOUD`, an object
with the `CloudRenderer` shape below; with a module `modules/<module_name>/`, a provider template
`templates/terraform/providers/<name>.tf.j2` and a catalog `skyhedge/catalog/data/<name>.json`,
that is all a new cloud needs: the folder *is* the registration (`cloud_names` lists the folders
that hold a `render.py`; the spec, the state and the catalog take exactly those names). The
other files of a cloud folder (`logs.py`, `leftovers.py`, `quota.py`) are optional and found through
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

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from skyhedge.planner import PlannedReplica
    from skyhedge.spec import ServiceSpec
    from skyhedge.spec_fields import SpecContext
    from skyhedge.state import ReplicaRecord, ServiceState


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


class CloudConfig:
    """What skyhedge's core asks of a cloud's parsed spec section (`AwsConfig`, `GcpConfig`): a
    section's frozen dataclass derives from this and overrides what applies to its cloud; the
    defaults say "no say" (all zones allowed, nothing in the replicas' revision, no check against
    the state). A section whose config does not derive from it is parsed and kept
    (`spec.<cloud>`), and the core asks it nothing.

    Why here and not in the core: which zones a cloud's network reaches (`aws.subnets`,
    `gcp.subnetworks`), what of its section makes up a replica's machine, and which changes
    running replicas cannot follow, are that cloud's knowledge; the core used to keep them in
    `{"aws": ..., "gcp": ...}` tables and `if cloud == "aws"` branches that a new cloud had to
    edit."""

    #: What `confines` keeps replicas to, for the error that says why no zone is left.
    confinement = ""
    #: The field naming them (`aws.subnets`), what its keys are (`AWS zone ID`) and the catalog's
    #: list they must be in (`zones` or `regions`): each key the catalog lacks is refused.
    confining_field, confining_kind, confining_level = "", "", "zones"

    def confines(self, region: str, zone: str) -> bool:
        """Whether this cloud's replicas may go to `zone` of `region`."""
        return True

    @property
    def confined(self) -> bool:
        """Whether `confines` leaves any zone out (then its keys are checked against the catalog)."""
        return False

    def confining_keys(self) -> tuple[str, ...]:
        """The zones or regions (`confining_level`) the section names, to check against the catalog."""
        return ()

    def revision(self, cloud: str | None) -> dict[str, object]:
        """What of this section makes up the machine of a replica of `cloud` (None: of any cloud),
        merged into `spec.replica_revision`'s digest: a change of it rolls those replicas over. Its
        keys must not be another cloud's (prefix them with the cloud's name)."""
        return {}

    def moved(self, rec: ReplicaRecord) -> bool:
        """Whether live replica `rec` of this cloud must move like an outdated one, though its
        revision is current (an AWS replica whose zone `aws.subnets` now gives another subnet)."""
        return False

    def check_state(self, spec: ServiceSpec, state: ServiceState, *, destroying: bool) -> None:
        """Refuse (`SpecError` naming the field) a section the live replicas cannot follow, before a
        plan (`destroying` False) or a destroy (True) acts on it."""


class CloudSpecSection:
    """The top-level spec section a cloud owns: `skyhedge/clouds/<cloud>/spec.py` (a plug-in
    cloud's `<package>/spec.py`) defines `SECTION`, an instance of a subclass. skyhedge.spec
    takes the section's key at the top level, refuses a field `config` lacks (did-you-mean and
    all, before any section is parsed), then hands the mapping to `parse` (an absent section as
    `{}`): every known cloud's section is parsed for every spec, so `spec.<cloud>` always holds
    one, as `spec.aws` always held an `AwsConfig`."""

    #: The top-level key, which must be the cloud's name: two clouds can never claim one key.
    key: str = ""
    #: The frozen dataclass `parse` returns (preferably a `CloudConfig`); its fields are the
    #: section's fields, as the unknown-field check and docs/spec.md's table list them.
    config: type = CloudConfig
    #: Said after "unknown zone 'x' for clouds ..." when no catalog of the spec's clouds has it.
    zone_hint: str = ""

    def field_names(self) -> set[str]:
        return {f.name for f in dataclasses.fields(self.config)}

    def parse(self, ctx: SpecContext, data: dict[str, Any]) -> Any:
        """The section as `config`, checked; errors are `ctx.fail(path, message)` with `path`
        starting with `key` (skyhedge.spec_fields has the checks the other sections use)."""
        raise NotImplementedError

    def zone_problem(self, zone: str) -> str | None:
        """Why `zone`, in `placement.zones`/`exclude_zones` of a spec placing on this cloud, cannot
        be one (None: it may be; the catalog is asked later)."""
        return None


#: Where a quota holds: every zone of the launch's region, or every region of the cloud (a
#: project's or account's quota across regions, GCP's `GPUS_ALL_REGIONS`).
QUOTA_SCOPES = ("region", "cloud")


@dataclass(frozen=True)
class QuotaRefusal:
    """A launch refused because an account's quota is used up, not because a zone is out of
    capacity: it holds for a whole region (or cloud) and until a person raises it, so the
    watcher stops asking zone by zone. `reason` is one line naming the quota, where it holds
    and where to raise it; `scope` one of QUOTA_SCOPES."""

    reason: str
    scope: str = "region"


def quota_refusal(
    cloud: str, text: str, *, region: str, market: str, instance_type: str | None = None
) -> QuotaRefusal | None:
    """What a launch's refusal `text` says of a quota, by the cloud's optional `quota.py`
    (`refusal(text, region=, market=, instance_type=)`), None when it is no quota refusal (a
    stock-out) or the cloud has no such file: each cloud knows its own error codes, and where
    its users raise a quota."""
    module = cloud_module(cloud, "quota")
    if module is None:
        return None
    found = module.refusal(text, region=region, market=market, instance_type=instance_type)
    return found if isinstance(found, QuotaRefusal) and found.scope in QUOTA_SCOPES else None


from skyhedge.clouds.registry import (  # noqa: E402 - after CloudRenderer, which it names
    ENTRY_POINT_GROUP,
    CloudPackage,
    builtin_clouds,
    cloud_module,
    cloud_names,
    cloud_package,
    cloud_spec_section,
    forget_plugins,
    get_cloud,
    plugin_clouds,
    register_cloud,
    unregister_cloud,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "CloudConfig",
    "CloudPackage",
    "CloudRenderer",
    "CloudSpecSection",
    "QuotaRefusal",
    "RenderContext",
    "builtin_clouds",
    "cloud_module",
    "cloud_names",
    "cloud_package",
    "cloud_spec_section",
    "forget_plugins",
    "get_cloud",
    "plugin_clouds",
    "quota_refusal",
    "register_cloud",
    "repository_top",
    "tree_path",
    "unregister_cloud",
]
