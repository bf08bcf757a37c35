"""SpotHedge vs skyhedge vs the omniscient optimum on every shared trace, with issue 6's bar.

For each trace directory this runs, exactly as a user would,

    skyhedge simulate --trace DIR --policy spothedge,skyhedge,optimal --repeats 10 --json

and prints availability and relative cost per policy, and whether skyhedge meets the bar:
availability >= SpotHedge's and relative cost <= (SpotHedge's + optimum's) / 2.

A directory holding several instance types per zone (cant-be-late's availability/1-node trace)
comes back from `simulate` as one trace per type, named DIR[type]; the report prints each.

    python benchmarks/policy_report.py                  # all shared traces, 2 at a time
    python benchmarks/policy_report.py --seed 1 --target 4 --json out.json

Takes a few minutes: the optimum is an integer program per window (scipy/HiGHS).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "traces"
DEFAULT_TRACES = [
    "skyserve/AWS1",
    "skyserve/AWS2",
    "cant-be-late/availability/1-node/aws-10-26-2022",
    "cant-be-late/availability/16-node/aws-08-27-2023",
    "cant-be-late/preemption/1-node/aws-04-19-2023",
    "cant-be-late/preemption/1-node/aws-04-22-2023",
    "cant-be-late/preemption/1-node/gcp-04-30-2023",
    "cant-be-late/preemption/4-node/aws-08-03-2023",
]
POLICIES = ("spothedge", "skyhedge", "optimal")


def simulate(trace: Path, args: argparse.Namespace) -> tuple[str, dict[str, list[dict]] | str]:
    """Rows of one `--trace DIR` run, grouped by their `trace` field (one group per instance type)."""
    cmd = [
        sys.executable,
        "-m",
        "skyhedge",
        "simulate",
        "--trace",
        str(trace),
        "--policy",
        ",".join(POLICIES),
        "--repeats",
        str(args.repeats),
        "--seed",
        str(args.seed),
        "--target",
        str(args.target),
        "--cold-start",
        str(args.cold_start),
        "--json",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        return trace.name, (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}")
    groups: dict[str, list[dict]] = {}
    for row in json.loads(done.stdout):
        groups.setdefault(row["trace"], []).append(row)
    return trace.name, groups


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", action="append", type=Path, help="trace directory (repeatable)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=int, default=3)
    parser.add_argument("--cold-start", type=float, default=120.0)
    parser.add_argument("--jobs", type=int, default=2, help="simulations run at once")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    traces = args.trace or [SHARED / t for t in DEFAULT_TRACES]
    missing = [t for t in traces if not t.is_dir()]
    if missing:
        print(f"error: no such trace directory: {missing[0]}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    notes: list[str] = []
    results: dict[str, list[dict] | str] = {}
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for label, out in pool.map(lambda t: simulate(t, args), traces):
            if isinstance(out, str):
                results[label] = out
                continue
            results.update(out)
            if len(out) > 1:
                notes.append(f"{label}: {len(out)} instance types per zone; one trace per type")

    rows = []
    header = f"{'trace':<32} {'policy':<10} {'avail %':>8} {'worst %':>8} {'rel.cost':>9}   bar"
    print(
        f"N={args.target}, cold start {args.cold_start:g} s, seed {args.seed}, "
        f"{args.repeats} windows per trace"
    )
    print(header)
    print("-" * len(header))
    met = total = 0
    for label, out in results.items():
        if isinstance(out, str):
            print(f"{label:<32} error: {out.splitlines()[-1]}")
            continue
        by = {row["policy"]: row for row in out}
        sh, sky, opt = (by.get(p) for p in POLICIES)
        verdict = ""
        if sh and sky and opt:
            bar = (sh["relative_cost"] + opt["relative_cost"]) / 2
            avail_ok = sky["availability"] >= sh["availability"]
            cost_ok = sky["relative_cost"] <= bar
            total += 1
            met += avail_ok and cost_ok
            verdict = (
                f"{'MET' if avail_ok and cost_ok else 'NOT MET'} "
                f"(cost <= {bar:.3f}: {'yes' if cost_ok else 'no'}, "
                f"avail {100 * (sky['availability'] - sh['availability']):+.2f} pts)"
            )
            rows.append(
                {
                    "trace": label,
                    "spothedge": [sh["availability"], sh["relative_cost"]],
                    "skyhedge": [sky["availability"], sky["relative_cost"]],
                    "optimal": [opt["availability"], opt["relative_cost"]],
                    "bar_cost": bar,
                    "availability_ok": avail_ok,
                    "cost_ok": cost_ok,
                }
            )
        for policy in POLICIES:
            row = by.get(policy)
            if row is None:
                continue
            print(
                f"{label:<32} {policy:<10} {100 * row['availability']:8.2f} "
                f"{100 * row['availability_min']:8.2f} {row['relative_cost']:9.3f}   "
                f"{verdict if policy == 'skyhedge' else ''}"
            )
    print("-" * len(header))
    print(f"bar met on {met}/{total} traces; {time.perf_counter() - started:.0f} s")
    for note in notes:
        print(f"note: {note}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"config": vars(args) | {"json": str(args.json), "trace": None}, "rows": rows}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
