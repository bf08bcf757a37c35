"""examples/policy-report/zone_prices.py: the price files beside it are reproducible from raw history."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "policy-report" / "zone_prices.py"
HOUR = "2020-01-01T{:02d}:00:00.000Z"


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60
    )


def row(zone: str, hour: int, price: float, kind: str = "p2.xlarge", os: str = "Linux/UNIX") -> dict:
    return {
        "AvailabilityZone": zone,
        "InstanceType": kind,
        "ProductDescription": os,
        "SpotPrice": f"{price:.6f}",
        "Timestamp": HOUR.format(hour),
    }


@pytest.fixture
def history(tmp_path: Path) -> Path:
    region = tmp_path / "us-east-1"
    region.mkdir()
    rows = [
        row("us-east-1a", 0, 1.0),  # holds 1 h
        row("us-east-1a", 1, 4.0),  # holds 3 h
        row("us-east-1a", 4, 100.0),  # the last price: how long it held is unknown
        row("us-east-1a", 2, 50.0, os="SUSE Linux"),  # other products are not ours
    ]
    (region / "2020-01-05.p2.xlarge.json").write_text(json.dumps({"SpotPriceHistory": rows}))
    other = [row("us-east-1a", 0, 70.0, kind="p2.16xlarge"), row("us-east-1a", 9, 70.0, kind="p2.16xlarge")]
    (region / "2020-01-05.p2.16xlarge.json").write_text(json.dumps({"SpotPriceHistory": other}))
    return tmp_path


def test_each_price_is_weighted_by_how_long_it_held(history):
    result = run("p2.xlarge", "--ondemand", "0.9", "--zone", "us-east-1a", "--history", history)
    assert result.returncode == 0, result.stderr
    # (1 x 1 h + 4 x 3 h) / 4 h; the SUSE row, the last price and p2.16xlarge's file play no part
    assert json.loads(result.stdout) == {"us-east-1a": {"spot": 3.25, "ondemand": 0.9}}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ondemand", "0", "--zone", "us-east-1a"], "--ondemand: expected a price > 0"),
        (
            ["--ondemand", "0.9", "--zone", "us-east-1z"],
            "--zone: no p2.xlarge Linux/UNIX prices for us-east-1z",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_option(history, args, message):
    result = run("p2.xlarge", *args, "--history", history)
    assert result.returncode == 2
    assert result.stdout == ""
    assert message in result.stderr.strip().splitlines()[-1]


def test_a_file_that_is_not_a_history_response_is_named(history):
    bad = history / "us-east-1" / "p2.xlarge.json"
    bad.write_text('{"Nope": []}')
    result = run("p2.xlarge", "--ondemand", "0.9", "--zone", "us-east-1a", "--history", history)
    assert result.returncode == 1
    expected = f"error: {bad}: not a DescribeSpotPriceHistory response ('SpotPriceHistory')"
    assert result.stderr.strip() == expected


@pytest.mark.parametrize(("kind", "ondemand"), [("p3.2xlarge", "3.06"), ("p2.xlarge", "0.9")])
def test_the_committed_price_files_come_from_the_shared_history(shared_dir, kind, ondemand):
    committed = REPO / "examples" / "policy-report" / f"prices-{kind}-2020q1.json"
    zones = json.loads(committed.read_text())
    args = [arg for zone in zones for arg in ("--zone", zone)]
    history = shared_dir / "prices" / "aws-spot-history-2020"
    result = run(kind, "--ondemand", ondemand, *args, "--history", history)
    assert result.returncode == 0, result.stderr
    assert result.stdout == committed.read_text()
