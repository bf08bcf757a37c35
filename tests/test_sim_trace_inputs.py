"""`skyhedge simulate` on unusual but reasonable inputs: each is read as meant,
or refused in one line `error: <file or flag>: <reason>` with exit 1, never a traceback, and never
after minutes of simulating the traces before it."""

from __future__ import annotations

import importlib
import json
import math
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_sim_bad_input import one_error_line

from skyhedge.cli import main
from skyhedge.policy import Location
from skyhedge.simulator import runner
from skyhedge.simulator.runner import Summary, Window, WindowResult
from skyhedge.simulator.traces import UNLIMITED, load_trace, load_traces, location_for_zone

TEN_YEARS = 10 * 365 * 86400


def invoke(*args: str):
    return CliRunner().invoke(main, ["simulate", *args])


def small(trace: Path | str, *extra: str):
    return invoke("--trace", str(trace), "--ticks", "30", "--repeats", "2", "--cold-start", "60", *extra)


def rows_of(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def write_zone(directory: Path, name: str, data: list[int], gap: float = 60) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps({"metadata": {"gap_seconds": gap}, "data": data}))
    return path


def three_zones(directory: Path, names: tuple[str, str, str]) -> Path:
    patterns = ([2, 2, 0, 0, 1, 2, 2, 2, 0, 1] * 4, [1, 1, 1, 2, 2, 0, 0, 1, 1, 1] * 4, [0, 1, 2] * 14)
    for name, data in zip(names, patterns, strict=True):
        write_zone(directory, f"{name}.json", data)
    return directory


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("trace", "seconds_per_window")} for row in rows]


# --- AWS zone IDs are AWS zones of their region ---------------------------------------


@pytest.mark.parametrize(
    ("zone", "region"),
    [
        ("use1-az1", "us-east-1"),  # in the bundled catalog
        ("usw2-az3", "us-west-2"),
        ("usw1-az1", "us-west-1"),  # not in the catalog: AWS's region codes
        ("apse2-az1", "ap-southeast-2"),
    ],
)
def test_an_aws_zone_id_is_an_aws_zone_of_the_region_its_prefix_names(zone, region):
    assert location_for_zone(zone) == Location("aws", region, zone)


def test_a_zone_id_with_an_unknown_prefix_keeps_the_trace_fallback():
    assert location_for_zone("xyz9-az1") == Location("trace", "xyz9-az1", "xyz9-az1")


def test_zone_ids_and_zone_names_of_one_region_simulate_alike(tmp_path):
    """Same data, both sets of names zones of us-east-1: `single-region` must see one region."""
    names = three_zones(tmp_path / "names", ("us-east-1a", "us-east-1b", "us-east-1c"))
    ids = three_zones(tmp_path / "ids", ("use1-az1", "use1-az2", "use1-az4"))
    assert {z.region for z in load_trace(ids).zones} == {"us-east-1"}
    policy = ("--policy", "single-region,spothedge", "--json")
    assert without_timing(rows_of(small(ids, *policy))) == without_timing(rows_of(small(names, *policy)))


# --- availability_target_met agrees with the printed availability ---------------------


def test_availability_target_met_is_judged_on_the_printed_availability(tmp_path):
    """Every window at exactly 0.7: the float mean lies one ulp below 0.7, the verdict must not."""
    write_zone(tmp_path / "slo", "us-east-1a.json", [1] * 74 + [0] * 30, gap=30)
    result = invoke(
        "--trace", str(tmp_path / "slo"), "--ticks", "104", "--repeats", "3", "--target", "1",
        "--extra", "0", "--policy", "rr", "--availability-target", "0.7", "--json",
    )  # fmt: skip
    [row] = rows_of(result)
    assert row["availability"] == 0.7 and row["availability_per_window"] == [0.7, 0.7, 0.7]
    assert row["availability_target_met"] is True
    assert row["windows_meeting_target"] == 1.0


# --- plug-in names that cannot load ---------------------------------------------------


def test_a_plugin_module_raising_at_import_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "bb_raises_at_import.py").write_text('raise KeyError("at import")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    trace = three_zones(tmp_path / "t", ("us-east-1a", "us-east-1b", "us-east-1c"))
    line = one_error_line(small(trace, "--policy", "bb_raises_at_import:X"))
    assert line == "error: --policy: policy 'bb_raises_at_import:X': cannot load (KeyError: 'at import')"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        (":X", "expected 'module:Class'"),
        ("os:", "expected 'module:Class'"),
        (".relative:X", "expected an absolute module name"),
    ],
)
def test_a_plugin_name_without_a_module_or_class_is_one_line(tmp_path, name, reason):
    trace = three_zones(tmp_path / "t", ("us-east-1a", "us-east-1b", "us-east-1c"))
    one_error_line(small(trace, "--policy", name), f"error: --policy: policy {name!r}: {reason}")


# --- `--trace .` and `--trace ""` ------------------------------------------------------


def test_trace_dot_is_named_after_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(three_zones(tmp_path / "here", ("us-east-1a", "us-east-1b", "us-east-1c")))
    assert {row["trace"] for row in rows_of(small(".", "--policy", "spothedge", "--json"))} == {"here"}


def test_an_empty_trace_value_is_refused_not_read_as_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(three_zones(tmp_path / "here", ("us-east-1a", "us-east-1b", "us-east-1c")))
    one_error_line(small("", "--policy", "spothedge"), "'--trace'", "empty value")


# --- CSV header cells without a zone ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "column"),
    [
        ("seconds,,us-west-2b\n0,1,2\n60,1,2\n", 2),
        ("seconds,us-east-1a,us-west-2b,\n0,1,2,\n60,1,2,\n", 4),  # trailing comma on every line
    ],
)
def test_a_csv_header_cell_naming_no_zone_is_refused_naming_the_column(tmp_path, text, column):
    path = tmp_path / "t.csv"
    path.write_text(text)
    one_error_line(small(path), f"error: {path}: line 1: column {column}: expected a zone name, got ''")


# --- memory --------------------------------------------------------------------------


def test_repeats_beyond_the_bound_are_one_line_naming_the_flag(tmp_path):
    trace = three_zones(tmp_path / "t", ("us-east-1a", "us-east-1b", "us-east-1c"))
    result = invoke("--trace", str(trace), "--ticks", "30", "--repeats", "1000000000000")
    one_error_line(result, "'--repeats'", "1<=x<=100000")


def test_a_trace_of_too_many_zone_ticks_is_refused_before_it_is_resampled(tmp_path):
    """Thirty one-sample ten-year zones: each within the span limit, 2.5 GB together."""
    directory = tmp_path / "many10y"
    for i in range(30):
        write_zone(directory, f"z{i:02d}.json", [i % 3 + 1], gap=TEN_YEARS)
    one_error_line(
        small(directory, "--policy", "spothedge"),
        f"error: {directory}: 30 zones x 10512000 ticks",
        "expected at most 100000000 per trace",
    )


def test_running_out_of_memory_is_one_line(tmp_path, monkeypatch):
    def exhausted(*args: object, **kwargs: object) -> None:
        raise MemoryError("Unable to allocate 7.28 TiB for an array with shape (1000000000000,)")

    monkeypatch.setattr(importlib.import_module("skyhedge.cli.simulate"), "run_simulation", exhausted)
    trace = three_zones(tmp_path / "t", ("us-east-1a", "us-east-1b", "us-east-1c"))
    one_error_line(small(trace, "--policy", "spothedge"), "error: out of memory", "7.28 TiB")


# --- on-demand cost ratio and JSON ------------------------------------------------------


@pytest.mark.parametrize("ratio", ["1e-308", "1e308", "0.0009", "1001"])
def test_an_absurd_ondemand_cost_ratio_is_one_line_naming_the_flag(tmp_path, ratio):
    trace = three_zones(tmp_path / "t", ("us-east-1a", "us-east-1b", "us-east-1c"))
    one_error_line(small(trace, "--ondemand-cost-ratio", ratio), "'--ondemand-cost-ratio'")


def test_a_non_finite_number_is_null_in_the_json_never_infinity():
    window = Window(0, 0, (0,))
    result = WindowResult("p", window, 1.0, math.inf, math.inf, math.nan, 0, 0, 0.0)
    with np.errstate(invalid="ignore"):  # the std of [inf] is NaN: null as well
        row = Summary("t", "p", [result]).to_json()
    assert row["relative_cost"] is None and row["relative_cost_per_window"] == [None]
    json.dumps(row, allow_nan=False)  # valid JSON


def test_the_spot_share_is_the_mean_over_the_windows_where_replicas_ran():
    """A window where no replica ran has no spot share (NaN): it is left out of the mean, not
    allowed to turn the whole trace's figure into null."""
    ran = WindowResult("p", Window(0, 0, (0,)), 1.0, 0.5, 0.5, 0.25, 0, 0, 0.0)
    idle = WindowResult("p", Window(1, 0, (0,)), 1.0, 0.0, 0.0, math.nan, 0, 0, 0.0)
    assert Summary("t", "p", [ran, idle]).to_json()["spot_share"] == 0.25


# --- public-trace-family inputs ---------------------------------------------------------


def test_one_zone_json_file_is_a_one_zone_trace_named_after_its_stem(tmp_path):
    path = write_zone(tmp_path / "d", "us-east-1f_v100_1.json", [2, 1, 0, 3] * 10)
    [trace] = load_traces(path)
    assert trace.name == "us-east-1f_v100_1" and trace.instance_type == "v100_1"
    assert trace.zones == (Location("aws", "us-east-1", "us-east-1f"),)
    assert {row["trace"] for row in rows_of(small(path, "--policy", "spothedge", "--json"))} == {
        "us-east-1f_v100_1"
    }


def test_extensions_match_in_any_case(tmp_path):
    write_zone(tmp_path / "lower", "us-east-1a.json", [2, 1, 0, 3] * 10)
    write_zone(tmp_path / "upper", "us-east-1a.JSON", [2, 1, 0, 3] * 10)
    assert (
        load_trace(tmp_path / "upper").capacity.tolist() == load_trace(tmp_path / "lower").capacity.tolist()
    )
    (tmp_path / "CAPS.CSV").write_text("seconds,us-east-1a\n0,2\n60,1\n")
    assert load_trace(tmp_path / "CAPS.CSV").capacity.tolist() == [[2, 2, 1, 1]]


def test_dotfiles_in_a_trace_directory_are_skipped(tmp_path):
    """macOS AppleDouble files: binary metadata beside every file copied to a FAT/SMB share."""
    directory = tmp_path / "copied"
    write_zone(directory, "us-east-1a.json", [2, 1, 0, 3] * 10)
    (directory / "._us-east-1a.json").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    trace = load_trace(directory)
    assert trace.zones == (Location("aws", "us-east-1", "us-east-1a"),)


def test_a_zone_file_linking_to_missing_data_is_refused_naming_it_not_dropped(tmp_path):
    """git-annex and DataLad keep each file as a symbolic link into an object store, dangling
    until its data is fetched: a zone whose data was not fetched must fail the trace naming the
    file, not vanish from it (the trace was simulated as if that zone did not exist)."""
    directory = tmp_path / "annexed"
    write_zone(directory, "us-east-1a.json", [2, 1, 0, 3] * 10)
    (directory / "us-east-1b.json").symlink_to(tmp_path / "objects" / "missing")
    line = one_error_line(small(directory, "--policy", "spothedge", "--json"), "us-east-1b.json")
    assert "symbolic link to a missing file" in line

    nothing_fetched = tmp_path / "folder" / "unfetched"  # a folder of traces: the same
    nothing_fetched.mkdir(parents=True)
    (nothing_fetched / "us-east-1a.json").symlink_to(tmp_path / "objects" / "missing")
    one_error_line(small(tmp_path / "folder", "--json"), "unfetched/us-east-1a.json", "missing file")

    one_error_line(small(directory / "us-east-1b.json", "--json"), "us-east-1b.json", "missing file")


def test_a_trace_no_longer_than_the_cold_start_is_blamed_not_a_ticks_flag_never_given(tmp_path):
    """Without --ticks a short trace is simulated whole; one of 4 ticks leaves nothing to score
    after a 4-tick cold start. The error names the trace: "--ticks 4 must exceed the cold start"
    sent the user looking for a flag they never gave."""
    directory = tmp_path / "four_ticks"
    write_zone(directory, "us-east-1a.json", [2, 2], gap=60)
    line = one_error_line(invoke("--trace", str(directory), "--policy", "spothedge"), "four_ticks")
    assert "--ticks" not in line and "cold start (4 ticks)" in line
    given = invoke("--trace", str(directory), "--policy", "spothedge", "--ticks", "4")
    one_error_line(given, "--ticks 4 must exceed the cold start")  # a --ticks given is still named


def test_a_price_array_unlike_data_in_length_never_stops_the_simulation(tmp_path):
    """A spot-price feed rarely ends exactly where the capacity samples do. The optional `prices`
    (read only with --prices) refused the whole trace: "prices: expected 40 entries like data,
    got 38", --prices or not. Samples past a short array's end are missing (null): --prices then
    needs that zone's spot price; entries past the data's end are unused."""
    directory = tmp_path / "priced"
    for zone, prices in (("us-east-1a", [0.5] * 38), ("us-east-1b", [0.7] * 45)):
        directory.mkdir(exist_ok=True)
        doc = {"metadata": {"gap_seconds": 60}, "data": [2, 1, 0, 3] * 10, "prices": prices}
        (directory / f"{zone}.json").write_text(json.dumps(doc))
    assert len(rows_of(small(directory, "--policy", "spothedge,optimal", "--json"))) == 2
    trace = load_trace(directory)
    assert trace.spot_prices is not None and trace.spot_prices.shape == trace.capacity.shape
    assert np.isnan(trace.spot_prices[0, 76:]).all() and (trace.spot_prices[0, :76] == 0.5).all()
    assert (trace.spot_prices[1] == 0.7).all()
    od_only = tmp_path / "od.json"
    od_only.write_text(json.dumps({"us-east-1a": {"ondemand": 3}, "us-east-1b": {"ondemand": 3}}))
    one_error_line(small(directory, "--prices", str(od_only)), "no spot price for zone us-east-1a")
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"us-east-1a": {"ondemand": 3, "spot": 0.6}, "us-east-1b": {"ondemand": 3}}))
    assert all(row["dollars"] > 0 for row in rows_of(small(directory, "--prices", str(both), "--json")))


def test_a_capacity_past_the_shortest_zones_end_still_makes_a_capacity_trace(tmp_path):
    """The 4s lie beyond the shortest zone, so the resampled trace holds only 0/1: it is still a
    capacity trace (1 = one replica), not an availability trace (1 = as many as asked)."""
    directory = tmp_path / "binary_tail"
    write_zone(directory, "us-east-1a.json", [1, 0] * 20 + [4] * 5)
    write_zone(directory, "us-east-1b.json", [1, 0] * 20)
    trace = load_trace(directory)
    assert not trace.availability_only
    assert trace.capacity.max() == 1 and UNLIMITED not in trace.capacity


# --- every trace checked before any is simulated ----------------------------------------


@pytest.fixture
def nothing_simulated(monkeypatch):
    def simulated(*args: object, **kwargs: object) -> None:
        raise AssertionError("a window was simulated before every trace was checked")

    monkeypatch.setattr(runner, "run_window", simulated)


def test_a_window_longer_than_a_later_trace_fails_before_any_is_simulated(tmp_path, nothing_simulated):
    long = three_zones(tmp_path / "long", ("us-east-1a", "us-east-1b", "us-east-1c"))
    short = tmp_path / "short"
    write_zone(short, "us-east-1a.json", [1, 2] * 5)
    result = invoke("--trace", str(long), "--trace", str(short), "--ticks", "30", "--policy", "spothedge")
    one_error_line(result, f"error: {short}: 20 ticks", "shorter than one window of 30 ticks")


def test_a_zone_of_a_later_trace_missing_from_prices_fails_before_any_is_simulated(
    tmp_path, nothing_simulated
):
    first = three_zones(tmp_path / "first", ("us-east-1a", "us-east-1b", "us-east-1c"))
    second = tmp_path / "second"
    write_zone(second, "us-west-2a.json", [1, 2] * 20)
    prices = tmp_path / "prices.json"
    prices.write_text(
        json.dumps({z: {"spot": 1.0, "ondemand": 3.0} for z in ("us-east-1a", "us-east-1b", "us-east-1c")})
    )
    result = small(first, "--trace", str(second), "--prices", str(prices), "--policy", "spothedge")
    one_error_line(result, "error: --prices: no on-demand price for zone us-west-2a of second")


def test_a_worker_killed_while_solving_the_optimum_is_one_line(tmp_path, monkeypatch):
    """The OOM killer ends a worker with SIGKILL, which the pool reports as BrokenProcessPool
    (found by an audit: `--ticks 31559 --cold-start 86400` on AWS1 took 12 GB and printed a
    traceback)."""

    class KilledPool:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def __enter__(self) -> KilledPool:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
            return None

        def submit(self, *args: object, **kwargs: object) -> Future:
            future: Future = Future()
            future.set_exception(BrokenProcessPool("A process in the process pool was terminated abruptly"))
            return future

    monkeypatch.setattr(runner, "ProcessPoolExecutor", KilledPool)
    monkeypatch.setattr(runner, "_usable_cpus", lambda: 4)  # the optimum goes to worker processes
    trace = three_zones(tmp_path / "t", ("us-east-1a", "us-east-1b", "us-east-1c"))
    one_error_line(
        small(trace, "--policy", "spothedge,optimal"),
        "error: t: the process solving the optimum of window 1 died abruptly",
        "running out of memory",
    )


def test_a_worker_solving_one_window_is_sent_that_window_not_the_whole_trace(tmp_path, monkeypatch):
    """Each window's task was pickled with the whole trace: ten 24 h windows of a 3-year nine-zone
    trace (227 MB of capacity) took the process tree to 3.3 GB (1.3 GB sent the windows alone).
    The results are those of solving in this process, offsets in the whole trace included."""
    sent: list[tuple[int, int]] = []

    class InlinePool:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def __enter__(self) -> InlinePool:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
            return None

        def submit(self, fn, trace, window, *args: object, **kwargs: object) -> Future:
            sent.append(trace.capacity.shape)
            future: Future = Future()
            future.set_result(fn(trace, window, *args, **kwargs))
            return future

    monkeypatch.setattr(runner, "ProcessPoolExecutor", InlinePool)
    write_zone(tmp_path / "long", "us-east-1a.json", [2, 0, 3, 3, 1, 3] * 100)  # 600 min: 1200 ticks
    write_zone(tmp_path / "long", "us-east-1b.json", [3, 3, 0, 1, 3, 2] * 100)
    [trace] = load_traces(tmp_path / "long")
    config = runner.SimConfig(ticks=40, repeats=3, cold_start_seconds=60)
    inline = runner.simulate([trace], ["optimal"], config, workers=4)
    assert sent == [(2, 40)] * 3  # two zones, one window's 40 ticks each
    alone = runner.simulate([trace], ["optimal"], config, workers=1)
    assert without_timing([s.to_json() for s in inline]) == without_timing([s.to_json() for s in alone])
    assert [w.window for w in inline[0].windows] == [w.window for w in alone[0].windows]
    assert max(w.window.offset for w in inline[0].windows) > 0


def test_the_optimum_runs_one_process_per_cpu_the_process_may_use(tmp_path, monkeypatch):
    """`taskset -c 0`, a container's cpuset or a batch job's CPUs: `os.cpu_count()` counts the
    machine's CPUs, so a process pinned to one CPU of a 2-CPU machine started two solver
    processes on it (measured), and pinned to 2 of 64, up to ten."""
    pools: list[object] = []

    class Pool:
        def __init__(self, *args: object, max_workers: int, **kwargs: object) -> None:
            pools.append(max_workers)

        def __enter__(self) -> Pool:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
            return None

        def submit(self, fn, *args: object, **kwargs: object) -> Future:
            future: Future = Future()
            future.set_result(fn(*args, **kwargs))
            return future

    monkeypatch.setattr(runner, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 64)
    trace = load_trace(three_zones(tmp_path / "t", ("us-east-1a", "us-east-1b", "us-east-1c")))
    config = runner.SimConfig(ticks=30, repeats=10, cold_start_seconds=60)
    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    runner.simulate([trace], ["optimal"], config)
    assert pools == []  # one usable CPU: solved in this process
    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: {2, 3}, raising=False)
    runner.simulate([trace], ["optimal"], config)
    assert pools == [2]


def test_an_optimum_too_big_to_solve_is_refused_before_any_work(tmp_path):
    """Its integer program grows with zones x ticks x cold-start ticks: a day-long window and cold
    start on AWS1 took 12 GB before the system killed the solver (found by an audit). Refused in
    one line, naming the flags, before a single window is simulated; where capacity never binds
    (a shortest path solves it) the same flags run."""
    finite = tmp_path / "finite"
    for zone in ("us-east-1a", "us-east-1b", "us-east-1c"):
        write_zone(finite, f"{zone}.json", [2] * 20000, gap=30)  # pools of 2 < N: capacity binds
    args = ("--trace", str(finite), "--ticks", "20000", "--cold-start", "86400", "--repeats", "1")
    one_error_line(
        invoke(*args, "--policy", "spothedge,optimal"),
        "error: finite: the optimum's integer program would have 197,290,880 constraint entries",
        "use shorter --ticks or --cold-start, or leave 'optimal' out",
    )
    assert invoke(*args, "--policy", "spothedge").exit_code == 0  # no optimum asked: no limit


def test_a_price_key_with_a_line_break_is_quoted_in_the_one_line(tmp_path):
    """Found by an input audit: `{"a\\nb": ...}` split the error over two lines."""
    from skyhedge.errors import TraceError
    from skyhedge.simulator.runner import load_prices

    prices = tmp_path / "p.json"
    prices.write_text(json.dumps({"a\nb": {"ondemand": "x"}}))
    with pytest.raises(TraceError) as info:
        load_prices(prices)
    assert (
        str(info.value)
        == f"{prices}: 'a\\nb'.ondemand: expected a price >= 0 in $/h (at most 1e+06), got 'x'"
    )
