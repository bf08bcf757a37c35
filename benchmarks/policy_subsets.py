"""issue 6's bar on smaller markets: SpotHedge vs skyhedge vs the optimum on k-zone subsets of a trace.

The hidden traces may have fewer zones than the shared ones. A subset keeps each zone's real
history and drops the others, so it is a real market of fewer zones (the zones' timing against
each other is the recording's). Subsets are the first COUNT combinations of K zones in a fixed
shuffled order (seeded by K), so a run is reproducible.

    python benchmarks/policy_subsets.py ../shared/traces/skyserve/AWS1 --zones 2 --count 3
    python benchmarks/policy_subsets.py DIR --zones 3 --count 6 --seeds 0-3

Prints one line per subset and seed (availability / relative cost per policy, the verdict, the
availability delta and the cost margin under the bar) and the count met. Results of sessions 18
and 19 are in docs/policy.md ("Smaller markets", "GCP1's 3- and 4-zone subsets").
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from skyhedge.simulator.bar import judge  # noqa: E402
from skyhedge.simulator.runner import SimConfig, simulate  # noqa: E402
from skyhedge.simulator.traces import load_traces  # noqa: E402

TRACE_SUFFIXES = {".json", ".csv"}


def seeds(text: str) -> list[int]:
    first, _, last = text.partition("-")
    try:
        found = list(range(int(first), int(last or first) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a seed or a range such as 0-3, got {text!r}") from None
    if not found:
        raise argparse.ArgumentTypeError(f"empty seed range {text!r}: write it low-high, e.g. 0-3")
    return found


def subsets(files: list[Path], k: int, count: int) -> list[tuple[Path, ...]]:
    combos = list(itertools.combinations(files, k))
    random.Random(k).shuffle(combos)
    return combos[:count]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace_dir", type=Path, help="a trace directory with one file per zone")
    ap.add_argument("--zones", type=int, default=2, help="zones per subset (default 2)")
    ap.add_argument("--count", type=int, default=5, help="subsets to run (default 5)")
    ap.add_argument("--seeds", type=seeds, default="0", help="seed or range, e.g. 0-3 (default 0)")
    args = ap.parse_args(argv)
    if not args.trace_dir.is_dir():
        ap.error(f"{args.trace_dir}: not a trace directory")
    files = sorted(p for p in args.trace_dir.iterdir() if p.suffix.lower() in TRACE_SUFFIXES)
    if not 1 <= args.zones < len(files):
        ap.error(f"--zones must be from 1 to {len(files) - 1} ({args.trace_dir} has {len(files)} zones)")
    met = total = 0
    with tempfile.TemporaryDirectory(prefix="skyhedge-subsets-") as tmp:
        for combo in subsets(files, args.zones, args.count):
            name = "+".join(p.stem.split("_")[0] for p in combo)
            where = Path(tmp) / f"{args.trace_dir.name}_{name}"
            where.mkdir()
            for p in combo:
                (where / p.name).symlink_to(p.resolve())
            trace = load_traces(where)[0]
            for seed in args.seeds:
                policies = ["spothedge", "skyhedge", "optimal"]
                runs = simulate([trace], policies, SimConfig(seed=seed), workers=2)
                rows = [r.to_json() for r in runs]
                verdict = judge(rows)[(trace.name, "skyhedge")]
                sh, sky, opt = rows
                met += verdict.met
                total += 1
                print(
                    f"{trace.name} seed {seed}: SpotHedge {100 * sh['availability']:.3f} % / "
                    f"{sh['relative_cost']:.4f}, skyhedge {100 * sky['availability']:.3f} % / "
                    f"{sky['relative_cost']:.4f}, optimum {opt['relative_cost']:.4f}: "
                    f"{'met' if verdict.met else 'missed'} (availability "
                    f"{100 * verdict.availability_delta:+.3f} pts, cost margin {verdict.cost_margin:+.4f})",
                    flush=True,
                )
    print(f"bar met on {met} of {total}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
