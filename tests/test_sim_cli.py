"""`skyhedge simulate` through click's CliRunner: output shapes, options, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from skyhedge.cli import main

REQUIRED = {"trace", "policy", "availability", "availability_min", "relative_cost", "runs"}


@pytest.fixture
def trace_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "tiny"
    directory.mkdir()
    patterns = {
        "us-east-1a_v100_1": [2, 2, 0, 0, 1, 2, 2, 2, 0, 1] * 4,
        "us-east-2b_v100_1": [1, 1, 1, 2, 2, 0, 0, 1, 1, 1] * 4,
        "us-west-2c_v100_1": [0, 1, 2, 2, 2, 2, 1, 0, 0, 2] * 4,
    }
    for name, data in patterns.items():
        (directory / f"{name}.json").write_text(json.dumps({"metadata": {"gap_seconds": 60}, "data": data}))
    return directory


def invoke(*args: str):
    return CliRunner().invoke(main, ["simulate", *args])


def small(trace_dir: Path, *extra: str):
    return invoke("--trace", str(trace_dir), "--ticks", "30", "--repeats", "3", "--cold-start", "60", *extra)


def test_json_shape_and_ondemand_is_exactly_one(trace_dir):
    result = small(
        trace_dir, "--policy", "spothedge,skyserve,optimal,ondemand,even,rr,single-region", "--json"
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["policy"] for r in rows] == [
        "spothedge",
        "skyserve",
        "optimal",
        "ondemand",
        "even",
        "rr",
        "single-region",
    ]
    for row in rows:
        assert set(row) >= REQUIRED
        assert row["trace"] == "tiny" and row["runs"] == 3
        assert 0.0 <= row["availability_min"] <= row["availability"] <= 1.0
    by = {r["policy"]: r for r in rows}
    assert by["ondemand"]["relative_cost"] == 1.0 and by["ondemand"]["availability"] == 1.0
    assert by["optimal"]["availability"] == 1.0
    assert by["optimal"]["relative_cost"] <= by["ondemand"]["relative_cost"]


def test_table_output_and_plot(trace_dir, tmp_path):
    png = tmp_path / "out" / "sim.png"
    result = small(trace_dir, "--policy", "spothedge,ondemand", "--plot", str(png))
    assert result.exit_code == 0, result.output
    assert "spothedge" in result.stdout and "ondemand" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["sim.png"]  # no temp file left behind


def test_latency_poisson_and_recorded(trace_dir, tmp_path):
    result = small(trace_dir, "--policy", "ondemand", "--latency", "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)[0]
    assert {"latency_p50", "latency_p90", "latency_p99", "failure_rate"} <= set(row)
    arrivals = tmp_path / "arrivals.txt"
    arrivals.write_text("\n".join(str(i * 7.5) for i in range(50)))
    result = small(trace_dir, "--policy", "ondemand", "--arrivals", str(arrivals), "--json")
    assert result.exit_code == 0, result.output
    # 28 scored ticks (cold start 2 of 30) = 840 s: gaps of 7.5 s from 0 give 111 arrivals per window
    requests = json.loads(result.stdout)[0]["requests"]
    assert requests == 3 * 111 and isinstance(requests, int)  # a count, not 333.0


def test_prices_report_dollars(trace_dir, tmp_path):
    prices = tmp_path / "prices.json"
    zones = ["us-east-1a", "us-east-2b", "us-west-2c"]
    prices.write_text(json.dumps({z: {"spot": 1.0, "ondemand": 3.0} for z in zones}))
    result = small(trace_dir, "--policy", "ondemand,spothedge", "--prices", str(prices), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    # 3 on-demand replicas x $3/h x 28 scored ticks of 30 s
    assert rows[0]["dollars"] == pytest.approx(3 * 3.0 * 28 * 30 / 3600)
    assert rows[0]["ondemand_dollars"] == pytest.approx(rows[0]["dollars"])
    assert rows[1]["dollars"] / rows[1]["ondemand_dollars"] == pytest.approx(rows[1]["relative_cost"])
    assert "warning" not in result.stderr


def test_price_entries_naming_no_zone_of_the_traces_are_named_in_one_warning(trace_dir, tmp_path):
    prices = tmp_path / "prices.json"
    zones = ["us-east-1a", "us-east-2b", "us-west-2c", "us-east-1z", "aws/us-east-2/us-east-2q"]
    prices.write_text(json.dumps({z: {"spot": 1.0, "ondemand": 3.0} for z in zones}))
    result = small(trace_dir, "--policy", "ondemand", "--prices", str(prices), "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == (
        f"warning: {prices}: 2 price entries name no zone of the traces and are ignored: "
        "aws/us-east-2/us-east-2q, us-east-1z"
    )
    assert json.loads(result.stdout)[0]["dollars"] > 0


def test_plugin_policy_by_module_and_class(trace_dir):
    result = small(trace_dir, "--policy", "skyhedge.policy.baselines:EvenSpread,even", "--json")
    assert result.exit_code == 0, result.output
    plugin, builtin = json.loads(result.stdout)
    assert plugin["policy"] == "skyhedge.policy.baselines:EvenSpread"
    assert plugin["relative_cost"] == builtin["relative_cost"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trace", "/nonexistent/trace"], "error: /nonexistent/trace: no such trace directory or file"),
        (["--policy", "nope"], "error: --policy: unknown policy 'nope'"),
        (["--policy", "no.such.module:Thing"], "cannot load"),
        (["--ticks", "100000"], "shorter than one window of 100000 ticks"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(trace_dir, args, message):
    base = ["--trace", str(trace_dir), "--ticks", "30", "--repeats", "1"]
    result = invoke(*base, *args)
    assert result.exit_code == 1
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_bad_prices_and_arrivals_files(trace_dir, tmp_path):
    prices = tmp_path / "p.json"
    prices.write_text(json.dumps({"us-east-1a": {"spot": 1.0, "ondemand": 3.0}}))
    result = small(trace_dir, "--policy", "ondemand", "--prices", str(prices))
    assert result.exit_code == 1
    assert re.search(r"no on-demand price for zone us-(east-2b|west-2c) of tiny", result.stderr)
    prices.write_text("[]")
    assert small(trace_dir, "--prices", str(prices)).exit_code == 1
    missing = small(trace_dir, "--arrivals", str(tmp_path / "missing.txt"))
    assert missing.exit_code == 1 and "cannot read the arrivals file" in missing.stderr


def test_real_trace_smoke(shared_dir):
    aws1 = shared_dir / "traces" / "skyserve" / "AWS1"
    result = invoke("--trace", str(aws1), "--policy", "spothedge,ondemand,even", "--repeats", "2", "--json")
    assert result.exit_code == 0, result.output
    by = {r["policy"]: r for r in json.loads(result.stdout)}
    assert by["ondemand"]["relative_cost"] == 1.0
    assert by["spothedge"]["availability"] > 0.95 > by["even"]["availability"]
    assert by["spothedge"]["relative_cost"] < 0.8


def test_availability_target_reaches_the_policy_and_the_report(trace_dir):
    """`--availability-target` is judged against in the report, and the skyhedge policy hedges for it."""
    loose = json.loads(small(trace_dir, "--policy", "ondemand,skyhedge", "--json").stdout)
    strict = json.loads(
        small(trace_dir, "--policy", "ondemand,skyhedge", "--availability-target", "0.9999", "--json").stdout
    )
    assert {r["availability_target"] for r in loose} == {0.99}
    assert {r["availability_target"] for r in strict} == {0.9999}
    assert loose[0]["availability_target_met"] is True  # on-demand only: availability 1.0
    for row in strict:
        assert row["availability_target_met"] == (row["availability"] >= 0.9999)
    assert strict[1]["relative_cost"] >= loose[1]["relative_cost"]  # a stricter target never hedges less
    bad = small(trace_dir, "--availability-target", "1.5")
    assert bad.exit_code != 0 and "--availability-target" in bad.output


def test_the_table_says_whether_each_policy_met_a_given_availability_target(trace_dir):
    """`--help`: the target is "reported as met or not"; the table said nothing about it (only
    --json did), so a table reader could not tell. Given, it gets a column; not given, none."""
    rows = json.loads(
        small(trace_dir, "--policy", "ondemand,even", "--availability-target", "0.9", "--json").stdout
    )
    met = {r["policy"]: r["availability_target_met"] for r in rows}
    assert met == {"ondemand": True, "even": False}  # the even spread loses availability here
    table = small(trace_dir, "--policy", "ondemand,even", "--availability-target", "0.9")
    assert table.exit_code == 0, table.output
    assert "target 90%" in table.stdout
    lines = {line.split("│")[2].strip(): line for line in table.stdout.splitlines() if line.count("│") > 3}
    assert lines["ondemand"].rstrip(" │").endswith("met") and lines["even"].rstrip(" │").endswith("missed")
    assert "target" not in small(trace_dir, "--policy", "ondemand,even").stdout


def test_policies_are_judged_against_spothedge_when_both_references_ran(trace_dir):
    """With spothedge and optimal in the run, every other policy gets the bar's verdict."""
    rows = json.loads(small(trace_dir, "--policy", "spothedge,skyhedge,optimal,even", "--json").stdout)
    by = {r["policy"]: r for r in rows}
    assert "vs_spothedge" not in by["spothedge"] and "vs_spothedge" not in by["optimal"]
    for name in ("skyhedge", "even"):
        verdict = by[name]["vs_spothedge"]
        limit = (by["spothedge"]["relative_cost"] + by["optimal"]["relative_cost"]) / 2
        assert verdict["cost_limit"] == pytest.approx(limit, abs=1e-6)
        assert verdict["availability_ok"] == (by[name]["availability"] >= by["spothedge"]["availability"])
        assert verdict["cost_ok"] == (by[name]["relative_cost"] <= limit + 1e-9)
        assert verdict["met"] == (verdict["availability_ok"] and verdict["cost_ok"])
    assert by["even"]["vs_spothedge"]["met"] is False  # even spread loses availability here
    table = small(trace_dir, "--policy", "spothedge,even,optimal")
    assert "vs SpotHedge" in table.stdout and "missed: avail" in table.stdout
    without = json.loads(small(trace_dir, "--policy", "spothedge,skyhedge", "--json").stdout)
    assert all("vs_spothedge" not in r for r in without)
    assert "vs SpotHedge" not in small(trace_dir, "--policy", "spothedge,skyhedge").stdout


def test_plot_draws_spothedge_and_skyhedge_side_by_side(trace_dir, tmp_path):
    """The timelines shown are SpotHedge's and skyhedge's (not the optimum's), in that order."""
    from skyhedge.simulator.plot import _timeline_policies
    from skyhedge.simulator.runner import SimConfig, simulate
    from skyhedge.simulator.traces import load_trace

    trace = load_trace(trace_dir)
    config = SimConfig(repeats=1, ticks=30)
    summaries = simulate([trace], ["optimal", "even", "skyhedge", "spothedge"], config, keep_timelines_of=0)
    assert [s.policy for s in _timeline_policies(summaries)] == ["spothedge", "skyhedge"]
    png = tmp_path / "side.png"
    result = small(trace_dir, "--policy", "optimal,skyhedge,spothedge", "--plot", str(png))
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_policy_may_be_repeated_and_names_count_once(trace_dir):
    result = small(trace_dir, "--policy", "spothedge", "--policy", "optimal,spothedge", "--json")
    assert result.exit_code == 0, result.output
    assert [row["policy"] for row in json.loads(result.stdout)] == ["spothedge", "optimal"]


@pytest.mark.parametrize(("flag", "value"), [("--target", "1001"), ("--extra", "101")])
def test_replica_counts_beyond_any_real_service_are_one_line(trace_dir, flag, value):
    """Each replica is simulated tick by tick: a huge count would run for hours, silently."""
    result = small(trace_dir, flag, value)
    assert result.exit_code == 1 and result.stderr.startswith("error: ")
    assert flag in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_price_may_name_a_zone_file_so_each_instance_type_has_its_own(trace_dir, tmp_path):
    """A directory with two instance types per zone is two traces; `<zone>_<type>` keys (the
    files' stems) price each type, ahead of a plain `<zone>` key for both."""
    for path in list(trace_dir.glob("*_v100_1.json")):
        (trace_dir / path.name.replace("_v100_1", "_v100_8")).write_text(path.read_text())
    prices = tmp_path / "prices.json"
    zones = ["us-east-1a", "us-east-2b", "us-west-2c"]
    book = {z: {"spot": 1.0, "ondemand": 3.0} for z in zones}  # the v100_1 files fall back to these
    book.update({f"{z}_v100_8": {"spot": 8.0, "ondemand": 24.0} for z in zones})
    prices.write_text(json.dumps(book))
    result = small(trace_dir, "--policy", "ondemand", "--prices", str(prices), "--json")
    assert result.exit_code == 0, result.output
    by_trace = {row["trace"]: row["dollars"] for row in json.loads(result.stdout)}
    assert by_trace["tiny[v100_1]"] == pytest.approx(3 * 3.0 * 28 * 30 / 3600)
    assert by_trace["tiny[v100_8]"] == pytest.approx(8 * by_trace["tiny[v100_1]"])
    assert "warning" not in result.stderr  # every key names a zone of some trace


def test_the_title_shows_the_cold_start_the_run_used(trace_dir):
    """--cold-start is rounded up to whole 30 s ticks; the table's title says what ran."""
    result = invoke(
        "--trace",
        str(trace_dir),
        "--ticks",
        "30",
        "--repeats",
        "1",
        "--cold-start",
        "45",
        "--policy",
        "spothedge",
    )
    assert result.exit_code == 0, result.output
    assert "cold start 60s" in result.output and "cold start 45s" not in result.output


def test_a_trace_shorter_than_the_default_window_is_simulated_whole_with_a_note(trace_dir):
    """The tiny trace is 80 ticks (40 values of 60 s): without --ticks its windows are the whole
    trace, said once on stderr, and the rows say how long their windows were."""
    result = invoke("--trace", str(trace_dir), "--repeats", "2", "--policy", "spothedge,optimal", "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == (
        "note: tiny: 80 ticks (0.7 h) of trace, shorter than a window of 2880: its windows are the "
        "whole trace (--ticks refuses it instead)"
    )
    rows = json.loads(result.stdout)
    assert [(r["policy"], r["window_ticks"], r["offsets"]) for r in rows] == [
        ("spothedge", 80, [0, 0]),
        ("optimal", 80, [0, 0]),
    ]


def test_the_title_gives_the_window_length_as_simulated(trace_dir, tmp_path):
    """Without --ticks a short trace is simulated whole, but the table's title said "2 windows of
    2880 ticks" over a trace of 80 (found by an audit); the JSON's `window_ticks` was right."""
    result = invoke("--trace", str(trace_dir), "--repeats", "2", "--policy", "spothedge")
    assert result.exit_code == 0, result.output
    assert "2 windows of 80 ticks" in result.stdout and "2880" not in result.stdout
    # beside a trace long enough for the default window, the short one is named with its length
    day = tmp_path / "day"
    day.mkdir()
    (day / "us-east-1a.json").write_text(json.dumps({"metadata": {"gap_seconds": 30}, "data": [3] * 3000}))
    result = invoke("--trace", str(day), "--trace", str(trace_dir), "--repeats", "2", "--policy", "spothedge")
    assert result.exit_code == 0, result.output
    title = " ".join(result.stdout.split())  # the title wraps at the table's width
    assert "2 windows of 2880 ticks (tiny: 80, the whole trace)" in title


def test_a_window_asked_for_with_ticks_is_never_shortened(trace_dir):
    result = invoke("--trace", str(trace_dir), "--ticks", "2880", "--policy", "spothedge")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: {trace_dir}: 80 ticks (0.7 h) of trace, shorter than one window of 2880 ticks"
    ]


def test_names_with_dollar_signs_are_drawn_as_written(trace_dir, tmp_path):
    """matplotlib reads `$...$` as math: a trace directory named `m$\\bad{$x` failed the plot
    with a traceback after the results, and `price$5-$7` was drawn "price5 − 7" (found by an
    audit)."""
    named = trace_dir.rename(trace_dir.with_name("m$\\bad{$x"))
    png = tmp_path / "dollars.png"
    result = small(named, "--policy", "spothedge,rr", "--plot", str(png))
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_plot_of_many_traces_keeps_its_legend_readable_and_off_the_points(trace_dir, tmp_path, monkeypatch):
    """Thirty traces x two policies is sixty legend entries: drawn inside the axes, the legend
    covered the points and ran off the top of the image, losing the first traces' entries (found
    by an audit). Past a dozen entries it goes beside the axes, every entry inside the image."""
    import matplotlib.pyplot as plt

    from skyhedge.simulator import plot

    folder = tmp_path / "many"
    for i in range(30):
        (folder / f"t{i:02d}").mkdir(parents=True)
        for zone in trace_dir.iterdir():
            (folder / f"t{i:02d}" / zone.name).write_bytes(zone.read_bytes())
    figures = []
    monkeypatch.setattr(plot.plt, "close", figures.append)  # keep the figure to measure it
    png = tmp_path / "many.png"
    result = small(folder, "--policy", "spothedge,rr", "--plot", str(png), "--repeats", "1")
    assert result.exit_code == 0, result.output
    [fig] = figures
    try:
        scatter = fig.axes[0]
        legend = scatter.get_legend()
        assert len(legend.get_texts()) == 60
        renderer = fig.canvas.get_renderer()
        box = legend.get_window_extent(renderer)
        assert not box.overlaps(scatter.get_window_extent(renderer))  # no point hidden under it
        image = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)  # what is saved, in pixels
        assert image.x0 <= box.x0 and box.x1 <= image.x1 and image.y0 <= box.y0 and box.y1 <= image.y1
        assert box.y1 <= fig.bbox.y1  # within the figure's height: nothing cut off at the top
    finally:
        plt.close(fig)


def test_two_traces_of_one_name_are_refused_naming_both_paths_and_the_way_out(trace_dir, tmp_path):
    """`--trace 2023/aws --trace 2024/aws`: results are reported by trace name, so two traces named
    `aws` cannot both run. The error said only "two traces share the name 'aws'", naming neither
    path nor flag; it names both and the folder form, whose traces are named by their paths."""
    first, second = tmp_path / "years" / "2023" / "aws", tmp_path / "years" / "2024" / "aws"
    for copy in (first, second):
        copy.mkdir(parents=True)
        for zone in trace_dir.iterdir():
            (copy / zone.name).write_bytes(zone.read_bytes())
    result = small(first, "--trace", str(second), "--policy", "spothedge")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: --trace: {first} and {second} share the name 'aws'; give their common parent folder "
        "instead (each trace is then named by its path in it)"
    ]
    again = small(first, "--trace", str(first), "--policy", "spothedge")
    assert again.stderr.strip().endswith("share the name 'aws'; the same trace given twice")
    folder = small(tmp_path / "years", "--policy", "spothedge", "--json")
    assert folder.exit_code == 0, folder.output
    assert [row["trace"] for row in json.loads(folder.stdout)] == ["2023/aws", "2024/aws"]


def test_a_plot_beside_a_wide_legend_is_laid_out_and_its_titles_stay_apart(trace_dir, tmp_path, monkeypatch):
    """`simulate --trace ../shared/traces --plot` (77 legend entries, long trace names): the
    legend beside the axes made matplotlib give up its layout ("UserWarning: Tight layout not
    applied" on stderr), the panels' titles ran into the axis label above them, and a long trace
    name ran one panel's title into the other's (found walking the README as a new user)."""
    import warnings

    import matplotlib.pyplot as plt

    from skyhedge.simulator import plot

    folder = tmp_path / "many"
    for i in range(30):
        name = folder / "availability" / "1-node" / f"aws-10-26-2022-region-{i:02d}"
        name.mkdir(parents=True)
        for zone in trace_dir.iterdir():
            (name / zone.name).write_bytes(zone.read_bytes())
    figures = []
    monkeypatch.setattr(plot.plt, "close", figures.append)  # keep the figure to measure it
    png = tmp_path / "many.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # matplotlib's layout warning fails the plot here
        result = small(folder, "--policy", "spothedge,skyserve,rr", "--plot", str(png), "--repeats", "1")
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.output
    [fig] = figures
    try:
        renderer = fig.canvas.get_renderer()
        scatter, *panels = fig.axes
        titled = [ax for ax in panels if ax.get_title()]
        assert len(titled) == 2
        left, right = (ax.title.get_window_extent(renderer) for ax in titled)
        assert left.x1 < right.x0  # side by side, apart
        label = scatter.xaxis.label.get_window_extent(renderer)
        assert max(left.y1, right.y1) < label.y0  # below the axis label above them
    finally:
        plt.close(fig)
