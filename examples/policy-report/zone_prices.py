"""Write a `simulate --prices` file from real AWS spot-price history.

Reads raw `DescribeSpotPriceHistory` responses (boto3's shape, one JSON file per region and
instance type, as in `../shared/prices/aws-spot-history-2020`) and writes, per zone, the
time-weighted mean Linux/UNIX spot price: each price counts from its timestamp until the zone's
next price (a zone's last price, whose duration is unknown, carries no weight). The on-demand
price is not in those responses, so it is given on the command line (`--ondemand`, $/h) and is
written beside every zone.

    python examples/policy-report/zone_prices.py p3.2xlarge --ondemand 3.06 \\
        --zone us-east-1f --zone us-east-2a --zone us-west-2c > prices.json

Made `prices-p3.2xlarge-2020q1.json` and `prices-p2.xlarge-2020q1.json` next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from skyhedge.catalog.aws import PRODUCT, as_datetime

DEFAULT_HISTORY = Path(__file__).resolve().parents[3] / "shared" / "prices" / "aws-spot-history-2020"


def read_history(root: Path, instance_type: str) -> dict[str, dict[float, float]]:
    """`PRODUCT` (Linux/UNIX) spot prices of `instance_type` per zone: {zone: {unix time: $/h}}."""
    prices: dict[str, dict[float, float]] = {}
    for file in sorted(root.glob("*/*.json")):
        if file.name != f"{instance_type}.json" and not file.name.endswith(f".{instance_type}.json"):
            continue  # files are <region>/[<date>.]<instance type>.json
        try:
            doc = json.loads(file.read_text())
            rows = doc["SpotPriceHistory"]
            for row in rows:
                if row["InstanceType"] != instance_type or row["ProductDescription"] != PRODUCT:
                    continue
                at = as_datetime(row["Timestamp"]).timestamp()
                prices.setdefault(row["AvailabilityZone"], {})[at] = float(row["SpotPrice"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"error: {file}: not a DescribeSpotPriceHistory response ({exc})") from exc
    return prices


def time_weighted_means(prices: dict[str, dict[float, float]], zones: list[str]) -> dict[str, float]:
    """Mean spot price per zone, each price weighted by how long it held."""
    means = {}
    for zone in zones:
        points = sorted(prices[zone].items())
        total = weight = 0.0
        for (at, price), (until, _) in zip(points, points[1:], strict=False):
            total += price * (until - at)
            weight += until - at
        means[zone] = round(total / weight, 4) if weight > 0 else points[-1][1]
    return means


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("instance_type", help="e.g. p3.2xlarge")
    parser.add_argument("--ondemand", type=float, required=True, help="on-demand price, $/h")
    parser.add_argument("--zone", action="append", required=True, help="a zone to price (repeat)")
    parser.add_argument("--history", type=Path, default=DEFAULT_HISTORY, help="spot-history folder")
    args = parser.parse_args(argv)
    if not args.ondemand > 0:
        parser.error(f"--ondemand: expected a price > 0 in $/h, got {args.ondemand}")
    if not args.history.is_dir():
        parser.error(f"--history: {args.history} is not a folder")
    prices = read_history(args.history, args.instance_type)
    missing = [zone for zone in args.zone if zone not in prices]
    if missing:
        parser.error(f"--zone: no {args.instance_type} Linux/UNIX prices for {', '.join(missing)}")
    means = time_weighted_means(prices, args.zone)
    doc = {zone: {"spot": means[zone], "ondemand": args.ondemand} for zone in args.zone}
    json.dump(doc, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
