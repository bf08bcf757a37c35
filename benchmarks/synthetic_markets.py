"""Synthetic many-zone availability markets, to stress a policy on shapes the shared traces lack.

They are hypotheses, not data: use them to find structural weak spots, never to tune constants.
Three shapes, all all-or-nothing (a 1 means "as many as asked"), 300 s samples, 21 days:

- `aws9`: nine zones in three regions, independent. Each zone stays up for a Lomax time
  (scale 8 h, shape 1.3: heavy-tailed calm, as the public traces' zones age) and then is out
  for a log-normal time (median 20 min).
- `gcp6`: six zones in two regions, each up for Lomax(4 h, 1.3), plus regional scarcity: every
  region goes through scarce spells (median 1 h, every Lomax(6 h, 1.5)) during which each of its
  zones is out 80 % of the samples.
- `exp6`: the same six zones, independent and *memoryless*: up for an exponential time (mean
  3 h), then out for an exponential time (mean 30 min). A zone's risk does not fall as it stays
  up, against what every public trace shows (docs/policy.md, "Zones age"): this shape measures
  what the policy loses where its main assumption is false.

Writes one CSV per market (the `seconds,<zone>,...` format `simulate` reads) to --out, then,
unless --no-simulate, runs `skyhedge simulate --policy spothedge,skyhedge,optimal` on each
and prints the SpotHedge bar per trace and --seeds window seed.

    PYTHONPATH=. python3 benchmarks/synthetic_markets.py --out /tmp/synthetic [--markets 3] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from skyhedge.simulator import SimConfig, load_trace, simulate
from skyhedge.simulator.bar import annotate
from skyhedge.state import atomic_write_text

GAP = 300
DAYS = 21
AWS9 = {
    "us-east-1": ["us-east-1a", "us-east-1c", "us-east-1d"],
    "us-east-2": ["us-east-2a", "us-east-2b", "us-east-2c"],
    "us-west-2": ["us-west-2a", "us-west-2b", "us-west-2c"],
}
GCP6 = {
    "us-central1": ["us-central1-a", "us-central1-b", "us-central1-c", "us-central1-f"],
    "us-east1": ["us-east1-b", "us-east1-c"],
}

#: (name, cloud, regions, kind of market) per synthetic shape, generated in this order.
SHAPES = (
    ("aws9", "aws", AWS9, "calm"),
    ("gcp6", "gcp", GCP6, "scarce"),
    ("exp6", "gcp", GCP6, "memoryless"),
)


def _lomax(rng: np.random.Generator, scale: float, shape: float) -> float:
    return float(scale * rng.pareto(shape))


def market(
    rng: np.random.Generator, cloud: str, regions: dict[str, list[str]], *, kind: str
) -> tuple[list[str], np.ndarray]:
    """(zone names as cloud/region/zone, availability 0/1 per zone and sample).

    `kind`: "calm" (aging zones), "scarce" (aging zones plus regional scarce spells) or
    "memoryless" (exponential up and out times)."""
    samples = DAYS * 86400 // GAP
    if kind == "memoryless":
        return _memoryless(rng, cloud, regions, samples)
    scarce = kind == "scarce"
    up_scale = (4 if scarce else 8) * 3600
    names, rows = [], []
    for region, zones in regions.items():
        spells = np.zeros(samples, dtype=bool)
        if scarce:
            t = 0
            while t < samples:
                t += int(_lomax(rng, 6 * 3600, 1.5) / GAP)
                length = int(rng.lognormal(np.log(3600), 1.0) / GAP) + 1
                spells[t : t + length] = True
                t += length
        for zone in zones:
            up = np.ones(samples, dtype=np.int8)
            t = int(rng.uniform(0, 4 * 3600) / GAP)
            while t < samples:
                t += int(_lomax(rng, up_scale, 1.3) / GAP) + 1
                out = int(rng.lognormal(np.log(1200), 1.2) / GAP) + 1
                up[t : t + out] = 0
                t += out
            up[spells & (rng.random(samples) < 0.8)] = 0
            names.append(f"{cloud}/{region}/{zone}")
            rows.append(up)
    return names, np.array(rows)


def _memoryless(
    rng: np.random.Generator, cloud: str, regions: dict[str, list[str]], samples: int
) -> tuple[list[str], np.ndarray]:
    names, rows = [], []
    for region, zones in regions.items():
        for zone in zones:
            row = np.zeros(samples, dtype=np.int8)
            t, up = 0, rng.random() < 6 / 7  # the stationary share of up-time
            while t < samples:
                length = int(rng.exponential(3 * 3600 if up else 1800) / GAP) + 1
                row[t : t + length] = up
                t, up = t + length, not up
            names.append(f"{cloud}/{region}/{zone}")
            rows.append(row)
    return names, np.array(rows)


def write_csv(path: Path, names: list[str], rows: np.ndarray) -> None:
    lines = ["seconds," + ",".join(names)]
    lines += [f"{i * GAP}," + ",".join(str(int(v)) for v in rows[:, i]) for i in range(rows.shape[1])]
    atomic_write_text(path, "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--markets", type=int, default=3, help="markets of each shape (generator seeds 100, 101, ...)"
    )
    ap.add_argument("--seeds", default="0,1,2", help="window seeds for simulate")
    ap.add_argument("--no-simulate", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    paths = []
    for m in range(args.markets):
        rng = np.random.default_rng(100 + m)
        shapes = (
            ("aws9", "aws", AWS9, "calm"),
            ("gcp6", "gcp", GCP6, "scarce"),
            ("exp6", "gcp", GCP6, "memoryless"),
        )
        for shape, cloud, regions, kind in shapes:
            names, rows = market(rng, cloud, regions, kind=kind)
            path = args.out / f"m{m}-{shape}.csv"
            write_csv(path, names, rows)
            paths.append(path)
            print(f"{path}: {len(names)} zones, zone availability {rows.mean():.3f}")
    if args.no_simulate:
        return
    met = total = 0
    for path in paths:
        trace = load_trace(path)
        for seed in (int(s) for s in args.seeds.split(",")):
            rows = [
                s.to_json()
                for s in simulate([trace], ["spothedge", "skyhedge", "optimal"], SimConfig(seed=seed))
            ]
            mine = next(r for r in annotate(rows) if r["policy"] == "skyhedge")
            verdict = mine["vs_spothedge"]
            met += verdict["met"]
            total += 1
            print(
                f"{path.stem:10s} seed {seed}: skyhedge {mine['availability']:.4f} / "
                f"{mine['relative_cost']:.3f}, availability {100 * verdict['availability_delta']:+.2f} pts, "
                f"cost margin {verdict['cost_margin']:+.3f}: {'met' if verdict['met'] else 'missed'}"
            )
    print(f"bar met on {met} of {total} trace-seed pairs")


if __name__ == "__main__":
    main()
