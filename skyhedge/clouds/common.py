"""Helpers shared by cloud folders (a cloud folder never imports another; shared needs live here)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from skyhedge._resources import modules_dir
from skyhedge.catalog import load_catalog
from skyhedge.errors import CatalogError, RenderError, SpecError
from skyhedge.planner import CREATE

if TYPE_CHECKING:
    from skyhedge.planner import PlannedReplica
    from skyhedge.spec import ServiceSpec


def run_config(spec: ServiceSpec) -> dict[str, Any]:
    """What a VM replica runs at boot, as data: the modules hand it to the boot script as base64
    JSON (never as shell text), and the script reads it back with a JSON parser."""
    run: dict[str, Any] = {"env": dict(sorted(spec.run.env.items()))}
    for key in ("command", "image", "setup"):
        value = getattr(spec.run, key)
        if value is not None:
            run[key] = value
    return run


def terraform_json_bytes(value: Any) -> int:
    """An upper bound of `value`'s size in Terraform's `jsonencode` (compact, UTF-8): `<`, `>`
    and `&` become `\\u003c`-style escapes, U+2028/U+2029 `\\u2028`, and a backspace or form
    feed may be a 6-byte escape too."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    wider = 5 * sum(text.count(c) for c in "<>&") + 4 * sum(text.count(c) for c in ("\\b", "\\f"))
    return len(text.encode("utf-8", "surrogatepass")) + wider + 3 * sum(text.count(c) for c in "\u2028\u2029")


#: What a module's boot script template interpolates: the replica's settings, base64 JSON.
BOOT_CONFIG = "${config}"


def boot_script_bytes(module: str, template: str, config: Mapping[str, Any]) -> int:
    """Bytes of the boot script that `template` of `module` renders for `config` (at most: its one
    interpolation is `base64encode(jsonencode(config))`)."""
    text = (modules_dir() / module / template).read_text(encoding="utf-8")
    encoded = 4 * math.ceil(terraform_json_bytes(dict(config)) / 3)
    return len(text.encode("utf-8")) - text.count(BOOT_CONFIG) * len(BOOT_CONFIG) + encoded


def launches(replicas: Sequence[PlannedReplica]) -> list[PlannedReplica]:
    """The replicas of a root that its apply creates: only they get a boot script from the spec as
    it is now. The others run already (their boot script is ignored by the module once launched),
    and `destroy` renders them to tear them down: a spec whose `run` grew past the boot script's
    limit since must not keep them from being destroyed or released."""
    return [r for r in replicas if r.action == CREATE]


def boot_config(spec: ServiceSpec, replicas: Sequence[PlannedReplica], gpu: bool) -> dict[str, Any]:
    """The largest `config` a module's boot script gets among `replicas` (what it jsonencodes)."""
    return {
        "replica_id": max((r.id for r in replicas), key=len),
        "service": spec.name,
        "port": spec.resources.ports,
        "command": spec.run.command,
        "image": spec.run.image,
        "setup": spec.run.setup,
        "env": dict(spec.run.env),
        "gpu": gpu,
    }


def require_boot_script_fits(spec: ServiceSpec, cloud: str, size: int, limit: int, where: str) -> None:
    """A replica whose boot script (`size` bytes, `boot_script_bytes`) is over what the cloud takes
    (`limit`, in `where`) is refused here, naming the largest `run` part: the cloud would refuse
    it only at launch, replica after replica (moto never does)."""
    if size <= limit:
        return
    parts = {"run.command": spec.run.command or "", "run.setup": spec.run.setup or ""}
    parts.update({f"run.env.{k}": v for k, v in spec.run.env.items()})
    largest = max(parts, key=lambda part: terraform_json_bytes(parts[part]))
    raise SpecError(
        f"a {cloud} replica's boot script would be about {size} bytes with run.command, run.setup "
        f"and run.env (base64 JSON), over the {limit} {where}; this is the largest part: put it in "
        "a file the replica downloads, or in its image",
        file=spec.source,
        path=largest,
    )


def catalog_gpus(cloud: str, instance_type: str) -> tuple[str | None, int] | None:
    """(accelerator, count) of `instance_type` in `cloud`'s catalog; None when it has no entry."""
    try:
        itype = load_catalog(cloud).instance_type(instance_type)
    except CatalogError:
        return None
    return itype.accelerator, itype.accelerator_count


def has_gpus(spec: ServiceSpec, cloud: str, instance_type: str) -> bool:
    """Whether `instance_type` has NVIDIA GPUs: the catalog says, else the spec's accelerators.
    A container replica gets `--gpus all` only then (Docker fails it without the NVIDIA runtime,
    as on a CPU type a user catalog adds)."""
    known = catalog_gpus(cloud, instance_type)
    if known is not None:
        return known[0] is not None and known[1] > 0
    return bool(spec.resources.accelerators)


def replica_map(replicas: Sequence[PlannedReplica]) -> dict[str, dict[str, Any]]:
    """The `for_each` map keyed by stable replica ID: zone and market."""
    return {
        r.id: {"zone": r.location.zone, "market": r.market.value}
        for r in sorted(replicas, key=lambda r: r.id)
    }


def require_arm_image(spec: ServiceSpec, cloud: str, instance_type: str, arm: bool) -> None:
    """An Arm instance type (AWS Graviton, NVIDIA Grace; GCP Axion, Ampere, Grace) cannot boot the
    modules' default image, an x86_64 Deep Learning image: refused here, naming the field, rather
    than by the cloud at launch, replica after replica."""
    if arm and not spec.resources.image_id.get(cloud):
        raise SpecError(
            f"{instance_type} is an Arm (aarch64) machine and the default {cloud} image is x86_64: "
            f"give an arm64 image",
            file=spec.source,
            path=f"resources.image_id.{cloud}",
        )


def require_instance_type(spec: ServiceSpec, cloud: str, instance_type: str | None) -> str:
    if not instance_type:
        raise RenderError(
            f"{spec.source}: no instance type resolved for cloud {cloud!r} (resources.instance_type)"
        )
    return instance_type


@dataclass(frozen=True)
class Blocked:
    """Why a replica's create will fail, as a cloud's `clear_before_apply` found it: `line`, the
    one line the apply's error for that replica says instead of Terraform's own (which stays in
    the error's detail), when Terraform's error names `evidence` (the machine's name)."""

    line: str
    evidence: str


@dataclass(frozen=True)
class Cleared:
    """What a cloud's `clear_before_apply` did before Terraform applied a root (or its
    `clear_name_conflicts` after a create found a name taken): `warnings` (`warning:` lines:
    machines removed, lookups that failed), the replicas whose create it knows will fail
    (`blocked`, by replica ID), and those whose machine name it found free, or freed (`freed`:
    a create that failed on the name succeeds if applied again)."""

    warnings: tuple[str, ...] = ()
    blocked: dict[str, Blocked] = field(default_factory=dict)
    freed: tuple[str, ...] = ()
