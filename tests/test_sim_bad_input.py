"""`skyhedge simulate` on absurd input: one line `error: FILE: field: ...`, exit 1, never a
traceback or a multi-GB allocation (audit 10, findings 6-9, 13 and 14)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from skyhedge.cli import main
from skyhedge.errors import TraceError
from skyhedge.simulator.latency import load_arrivals, replay_arrivals, summarize
from skyhedge.simulator.traces import load_trace, load_traces

ZONES = ("us-east-1a", "us-east-2b", "us-west-2c")
MAX_TRACE_SECONDS = 10 * 365 * 86400  # docs/simulate.md: a zone trace spans at most 10 years
MAX_REQUESTS_PER_WINDOW = 1_000_000  # docs/simulate.md: requests one window may replay


@pytest.fixture
def trace_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "tiny"
    directory.mkdir()
    for z, zone in enumerate(ZONES):
        data = [(i + z) % 3 for i in range(40)]
        (directory / f"{zone}.json").write_text(json.dumps({"metadata": {"gap_seconds": 60}, "data": data}))
    return directory


def invoke(*args: str):
    return CliRunner().invoke(main, ["simulate", *args])


def small(trace: Path, *extra: str):
    return invoke("--trace", str(trace), "--ticks", "30", "--repeats", "2", "--cold-start", "60", *extra)


def one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == ""
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def zone_file(directory: Path, gap: object, data: object = None, **extra: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    doc = {"metadata": {"gap_seconds": gap}, "data": [1, 1, 1, 0, 1, 1, 1, 1, 1, 1] if data is None else data}
    path = directory / "us-east-1a.json"
    path.write_text(json.dumps({**doc, **extra}))
    return path


# --- finding 6: huge or non-finite numbers in trace files ---------------------------------------


@pytest.mark.parametrize("gap", [1e308, 1e20, 1e12, MAX_TRACE_SECONDS / 10 * 1.01])
def test_a_gap_spanning_more_than_ten_years_is_one_line(tmp_path, gap):
    """Ten samples 1e12 s apart used to be resampled to 30 s ticks up front: 2.4 TiB."""
    path = zone_file(tmp_path / "t", gap)
    line = one_error_line(small(tmp_path / "t", "--policy", "spothedge"))
    assert line.startswith(f"error: {path}: metadata.gap_seconds: expected at most 3650 days (10 years)")
    with pytest.raises(TraceError, match="metadata.gap_seconds"):
        load_trace(tmp_path / "t")


@pytest.mark.parametrize(
    ("data", "field"),
    [([1, 1e30], "data[1]"), ([1, 10**30], "data[1]"), ([1, 2_000_000], "data[1]")],
)
def test_huge_capacities_are_one_line(tmp_path, data, field):
    path = zone_file(tmp_path / "t", 60, data)
    one_error_line(small(tmp_path / "t"), f"{path}: {field}: expected a non-negative integer <= 1000000")


def test_huge_trace_prices_are_one_line(tmp_path):
    path = zone_file(tmp_path / "t", 60, [1, 1], prices=[1.0, 1e300])
    with pytest.raises(TraceError, match=r"prices\[1\]: expected a number in \[0, 1e\+06\]") as info:
        load_trace(path.parent)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "seconds,us-east-1a,us-west-2b\n0,2,3\n1e12,2,3\n2e12,2,3\n3e12,2,3\n",
            "seconds: expected at most 3650 days",
        ),
        ("seconds,us-east-1a\n0,1\ninf,1\n", "line 3: seconds: expected a finite number, got 'inf'"),
        ("seconds,us-east-1a\n0,1\nnan,1\n", "line 3: seconds: expected a finite number, got 'nan'"),
        ("seconds,us-east-1a\n-1e308,1\n1e308,1\n", "seconds: expected at most 3650 days"),
        ("seconds,us-east-1a\n0,1\n30,inf\n", "line 3: us-east-1a: expected a non-negative integer"),
        ("seconds,us-east-1a\n0,1\n30,nan\n", "line 3: us-east-1a: expected a non-negative integer"),
        ("seconds,us-east-1a\n0,1\n30,1e30\n", "line 3: us-east-1a: expected a non-negative integer"),
    ],
)
def test_huge_or_non_finite_csv_numbers_are_one_line(tmp_path, text, needle):
    path = tmp_path / "t.csv"
    path.write_text(text)
    one_error_line(small(path), f"error: {path}: {needle}")


# --- finding 6: arrival gaps ---------------------------------------------------------------------


def test_arrivals_a_nanosecond_apart_cycled_over_a_day_are_refused_in_one_line(trace_dir, tmp_path):
    """0 and 1e-9 cycled over a window are 1e14 requests: refused up front (they used to allocate
    628 TiB), naming the file."""
    arrivals = tmp_path / "arr.txt"
    arrivals.write_text("0\n1e-9\n")
    result = small(trace_dir, "--policy", "ondemand", "--arrivals", str(arrivals))
    one_error_line(
        result, f"error: {arrivals}: timestamps: expected at most {MAX_REQUESTS_PER_WINDOW} requests"
    )
    with pytest.raises(TraceError, match="at most 1000000 requests per window"):
        replay_arrivals(load_arrivals(arrivals), 86_400)  # the library refuses too, without allocating


def test_a_nanosecond_gap_among_others_is_ordinary_data(trace_dir, tmp_path):
    arrivals = tmp_path / "arr.txt"
    arrivals.write_text("0\n1e-9\n" + "".join(f"{7.5 * i}\n" for i in range(1, 50)))
    result = small(trace_dir, "--policy", "ondemand", "--arrivals", str(arrivals), "--json")
    assert result.exit_code == 0, result.output
    # 840 scored seconds; 50 gaps per 367.5 s cycle: 2 cycles (100) + 1e-9 and 7.5 s steps to 105
    assert json.loads(result.stdout)[0]["requests"] == 2 * 114


def test_replay_at_the_request_cap_is_accepted():
    from skyhedge.simulator import latency

    assert latency.MAX_REQUESTS_PER_WINDOW == MAX_REQUESTS_PER_WINDOW
    recorded = np.arange(0, 1001) * (86_400 / MAX_REQUESTS_PER_WINDOW)
    assert len(replay_arrivals(recorded, 86_400)) <= MAX_REQUESTS_PER_WINDOW
    with pytest.raises(TraceError):
        replay_arrivals(recorded / 2, 86_400)


def test_arrival_timestamps_whose_span_overflows_are_refused(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("-1e308\n1e308\n")
    with pytest.raises(TraceError, match="timestamps: expected a finite span") as info:
        load_arrivals(path)
    assert str(info.value).startswith(f"{path}: ")


# --- finding 7: windows that receive no request --------------------------------------------------


def test_windows_without_requests_report_zero_requests(trace_dir, tmp_path):
    arrivals = tmp_path / "arr.txt"
    arrivals.write_text("0\n1e12\n")  # the first replayed arrival is 1e12 s into the window
    result = small(trace_dir, "--policy", "ondemand", "--arrivals", str(arrivals), "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)[0]
    assert row["requests"] == 0
    assert row["latency_p50"] is row["latency_p90"] is row["latency_p99"] is row["failure_rate"] is None
    table = small(trace_dir, "--policy", "ondemand", "--arrivals", str(arrivals))
    assert table.exit_code == 0, table.output
    assert table.exception is None
    cells = [line for line in table.stdout.splitlines() if "ondemand" in line][0].split("│")
    assert [cell.strip() for cell in cells[-5:-1]] == ["-", "-", "-", "-"]
    assert summarize([])["requests"] == 0


# --- finding 8: infinite prices ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1e400", "Infinity", "-Infinity", "1e300"])
def test_an_infinite_price_is_refused_like_nan(trace_dir, tmp_path, value):
    prices = tmp_path / "p.json"
    entries = {zone: '{"spot": 1.0, "ondemand": 3.0}' for zone in ZONES}
    entries[ZONES[0]] = f'{{"spot": 1.0, "ondemand": {value}}}'
    prices.write_text("{" + ", ".join(f'"{z}": {e}' for z, e in entries.items()) + "}")
    result = small(trace_dir, "--policy", "ondemand", "--prices", str(prices), "--json")
    one_error_line(result, f"error: {prices}: {ZONES[0]}.ondemand: expected a price >= 0 in $/h")


# --- finding 9: the plot's format follows its extension ------------------------------------------


@pytest.mark.parametrize(
    ("name", "magic"),
    [("p.svg", b"<?xml"), ("p.pdf", b"%PDF"), ("p.PNG", b"\x89PNG"), ("p.eps", b"%!PS")],
)
def test_the_plot_is_written_in_the_format_of_its_extension(trace_dir, tmp_path, name, magic):
    plot = tmp_path / "out" / name
    result = small(trace_dir, "--policy", "spothedge,ondemand", "--plot", str(plot))
    assert result.exit_code == 0, result.output
    assert plot.read_bytes().startswith(magic)
    assert [p.name for p in plot.parent.iterdir()] == [name]  # atomic: no temp file left behind


@pytest.mark.parametrize("name", ["p.txt", "p", "p.svg.bak"])
def test_a_plot_extension_it_cannot_write_is_refused_before_simulating(
    trace_dir, tmp_path, monkeypatch, name
):
    import skyhedge.cli.simulate as cli

    def boom(*args, **kwargs):  # pragma: no cover - reached only if the check came too late
        raise AssertionError("simulated before checking the plot path")

    monkeypatch.setattr(cli, "run_simulation", boom)
    plot = tmp_path / name
    one_error_line(
        small(trace_dir, "--plot", str(plot)), f"error: {plot}: expected a plot file name ending in .png"
    )
    assert not plot.exists()


# --- finding 13: error text ----------------------------------------------------------------------


def test_an_unknown_policy_lists_optimal_too(trace_dir):
    line = one_error_line(small(trace_dir, "--policy", "spothedge,bogus"), "unknown policy 'bogus'")
    assert "optimal" in line and "spothedge" in line


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["use1-az9"], "1 price entry names no zone of the traces and is ignored: use1-az9"),
        (
            ["use1-az9", "use1-az8"],
            "2 price entries name no zone of the traces and are ignored: use1-az8, use1-az9",
        ),
    ],
)
def test_the_unmatched_prices_warning_agrees_in_number(trace_dir, tmp_path, extra, expected):
    prices = tmp_path / "p.json"
    prices.write_text(json.dumps({z: {"spot": 1.0, "ondemand": 3.0} for z in (*ZONES, *extra)}))
    result = small(trace_dir, "--policy", "ondemand", "--prices", str(prices), "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == f"warning: {prices}: {expected}"


def test_files_starting_with_a_utf8_bom_load(tmp_path):
    """Excel writes a BOM before 'seconds'; editors on Windows before JSON."""
    csv_path = tmp_path / "excel.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfseconds,us-east-1a\r\n0,2\r\n60,3\r\n")
    assert load_trace(csv_path).capacity.tolist() == [[2, 2, 3, 3]]
    path = zone_file(tmp_path / "j", 60, [2, 3])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_trace(path.parent).capacity.tolist() == [[2, 2, 3, 3]]
    arrivals = tmp_path / "a.txt"
    arrivals.write_bytes(b"\xef\xbb\xbf0\n1.5\n")
    assert load_arrivals(arrivals).tolist() == [0, 1.5]


# --- finding 14: a directory mixing JSON zone files and a CSV -------------------------------------


def test_a_directory_mixing_json_zone_files_and_a_csv_is_refused(trace_dir):
    (trace_dir / "extra.csv").write_text("seconds,us-east-1a\n0,1\n30,1\n")
    with pytest.raises(TraceError, match=r"mixes \*\.json zone traces with \*\.csv \(extra\.csv\)"):
        load_trace(trace_dir)
    with pytest.raises(TraceError, match="expected one format per directory"):
        load_traces(trace_dir)
    one_error_line(small(trace_dir), f"error: {trace_dir}: mixes *.json zone traces with *.csv")
