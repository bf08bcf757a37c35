"""JSON a user hands skyhedge past `json`'s own limits is one line naming the file.

`json.loads` raises a plain ValueError (not JSONDecodeError) on an integer of more than 4300
digits and a RecursionError on arrays nested past the recursion limit; it accepts a lone UTF-16
surrogate escape (`"\\ud800"`) that no UTF-8 output can print. state.json, a user catalog,
`--prices` and JSON zone traces let them out as tracebacks. Found by an input audit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from skyhedge.catalog.loader import clear_cache
from skyhedge.cli import main

BIG = b'{"a": ' + b"9" * 5000 + b"}"
DEEP = b"[" * 100_000 + b"]" * 100_000
#: A replica whose zone is a lone surrogate: valid to `json` and to the state's checks, and
#: `status` crashed printing it (UnicodeEncodeError).
SURROGATE_STATE = json.dumps(
    {
        "service": "echo",
        "version": 1,
        "replicas": {
            "r-0001": {
                "id": "r-0001",
                "cloud": "local",
                "region": "local",
                "zone": "\ud800",
                "market": "spot",
                "launched_at": 1.0,
            }
        },
    }
).encode()
#: The bundled local catalog with a lone surrogate as its `source` (`catalog show` prints it).
SURROGATE_CATALOG = (
    (Path(__file__).resolve().parents[1] / "skyhedge/catalog/data/local.json")
    .read_bytes()
    .replace(b'"source": "', b'"source": "\\ud800', 1)
)
LIMITS = [(BIG, "a number with too many digits"), (DEEP, "nested too deeply")]
SPEC = """\
name: echo
placement: {clouds: [local]}
run: {command: "python3 server.py"}
"""


def one_line(result, *needles: str) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (BIG, "a number with too many digits"),
        (DEEP, "nested too deeply"),
        (SURROGATE_STATE, "lone UTF-16 surrogate"),
    ],
)
@pytest.mark.parametrize("command", [["plan"], ["status", "--json"]])
def test_state_json(write_spec, tmp_path, data, why, command):
    spec = write_spec(SPEC)
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.json").write_bytes(data)
    result = CliRunner().invoke(main, [command[0], str(spec), *command[1:], "--state-dir", str(state)])
    one_line(result, f"{state / 'state.json'}: not valid JSON (", why)
    assert (state / "state.json").read_bytes() == data


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (BIG, "a number with too many digits"),
        (DEEP, "nested too deeply"),
        (SURROGATE_CATALOG, "lone UTF-16 surrogate"),
    ],
)
def test_user_catalog(tmp_path, monkeypatch, data, why):
    (tmp_path / "local.json").write_bytes(data)
    monkeypatch.setenv("SKYHEDGE_CATALOG_DIR", str(tmp_path))
    clear_cache()
    try:
        result = CliRunner().invoke(main, ["catalog", "show", "--cloud", "local"])
    finally:
        clear_cache()
    one_line(result, f"{tmp_path / 'local.json'}: not valid JSON: ", why)


@pytest.fixture
def trace_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "trace"
    directory.mkdir()
    for zone in ("us-east-1a", "us-east-1b"):
        doc = {"metadata": {"gap_seconds": 60}, "data": [2, 1, 2, 2] * 10}
        (directory / f"{zone}.json").write_text(json.dumps(doc))
    return directory


def simulate(trace: Path, *extra: str):
    args = [
        "simulate",
        "--trace",
        str(trace),
        "--ticks",
        "30",
        "--repeats",
        "1",
        "--cold-start",
        "60",
        *extra,
    ]
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize(
    ("data", "why"), [(BIG, "a number with too many digits"), (DEEP, "nested too deeply")]
)
def test_prices_file(trace_dir, tmp_path, data, why):
    prices = tmp_path / "prices.json"
    prices.write_bytes(data)
    one_line(
        simulate(trace_dir, "--prices", str(prices)), f"{prices}: not a readable JSON price file ({why})"
    )


@pytest.mark.parametrize(
    ("data", "why"), [(BIG, "a number with too many digits"), (DEEP, "nested too deeply")]
)
def test_json_zone_trace(trace_dir, data, why):
    zone = trace_dir / "us-east-1a.json"
    zone.write_bytes(data)
    one_line(simulate(trace_dir), f"{zone}: not a readable JSON trace ({why})")
