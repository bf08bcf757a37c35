"""Per-root backend settings, written as JSON for `terraform init -backend-config=FILE`.

A backend block cannot read variables, so the rendered HCL says only `backend "s3" {}` and the
settings live in `backend.tfbackend.json` (Terraform reads a `.json` backend file as JSON: values
stay literal). Every root gets its own state: the spec's key/prefix/path is a *prefix* to which
skyhedge appends `<cloud>/<region>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from skyhedge.clouds import tree_path
from skyhedge.spec import ServiceSpec


def backend_config(
    spec: ServiceSpec, cloud: str, region: str, *, tree_dir: Path | None = None
) -> dict[str, Any]:
    """The backend settings of the (cloud, region) root. A local backend's `path` is absolute,
    or, in a tree written to `tree_dir` to be applied elsewhere (`render --out`, GitOps), relative
    to the root's folder (where Terraform runs: it resolves a relative `path` there) when it lies
    in the tree's repository, so that the committed tree names no directory of the machine that
    rendered it (`clouds.tree_path`; one outside the repository stays absolute)."""
    cfg = dict(spec.terraform.config)
    backend = spec.terraform.backend
    default_prefix = f"skyhedge/{spec.name}"
    if backend == "s3":
        out: dict[str, Any] = {
            "bucket": cfg["bucket"],
            "region": cfg["region"],
            "key": f"{str(cfg.get('key') or default_prefix).rstrip('/')}/{cloud}/{region}/terraform.tfstate",
            "use_lockfile": bool(cfg.get("use_lockfile", True)),
            "encrypt": bool(cfg.get("encrypt", True)),
        }
        if cfg.get("dynamodb_table"):
            out["dynamodb_table"] = cfg["dynamodb_table"]
        return out
    if backend == "gcs":
        return {
            "bucket": cfg["bucket"],
            "prefix": f"{str(cfg.get('prefix') or default_prefix).rstrip('/')}/{cloud}/{region}",
        }
    if cfg.get("path"):
        base = Path(str(cfg["path"])).expanduser()
        if not base.is_absolute():
            base = Path(spec.source).resolve().parent / base
        state = base / f"{cloud}-{region}.tfstate"
        return {"path": str(state) if tree_dir is None else tree_path(state, tree_dir, cloud, region)}
    return {}
