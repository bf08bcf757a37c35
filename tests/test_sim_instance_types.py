"""Trace directories holding several instance types per zone: split per type, `--instance-type`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from skyhedge.cli import main
from skyhedge.errors import TraceError
from skyhedge.simulator import SimConfig, make_windows
from skyhedge.simulator.traces import instance_type_of, load_trace, load_traces

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
AWS_10_26 = SHARED / "traces" / "cant-be-late" / "availability" / "1-node" / "aws-10-26-2022"

# Two zones x two types; the types differ in length (80 vs 60 ticks of 30 s) and in pattern, so
# a split that shared anything between types (length, windows, zone order) shows.
FILES = {
    "us-west-2a_k80_1": [2, 2, 0, 0, 1, 2, 2, 2, 0, 1] * 4,
    "us-west-2b_k80_1": [1, 1, 1, 2, 2, 0, 0, 1, 1, 1] * 4,
    "us-west-2a_v100_8": [0, 1, 2, 2, 2, 2, 1, 0, 0, 2] * 3,
    "us-west-2b_v100_8": [2, 0, 0, 1, 2, 2, 2, 1, 1, 0] * 3,
}


def write_zone(directory: Path, name: str, data: list[int], gap: int = 60) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps({"metadata": {"gap_seconds": gap}, "data": data}))


def make_dir(directory: Path, names: list[str] | None = None) -> Path:
    for name in names if names is not None else FILES:
        write_zone(directory, name, FILES[name])
    return directory


def invoke(*args: str):
    return CliRunner().invoke(main, ["simulate", *args])


def small(*args: str):
    return invoke("--ticks", "30", "--repeats", "3", "--cold-start", "60", *args)


def test_instance_type_is_the_stem_after_the_first_underscore():
    assert instance_type_of("us-west-2a_k80_1.json") == "k80_1"
    assert instance_type_of(Path("d") / "us-central1-a_v100.json") == "v100"
    assert instance_type_of("us-east-1a.json") is None
    assert instance_type_of("us-east-1a_.json") is None


def test_a_directory_with_each_zone_once_is_loaded_as_before(tmp_path):
    one = make_dir(tmp_path / "one", ["us-west-2a_k80_1", "us-west-2b_k80_1"])
    mixed = make_dir(tmp_path / "mixed", ["us-west-2a_k80_1", "us-west-2b_v100_8"])
    for directory in (one, mixed):
        (trace,) = load_traces(directory)
        before = load_trace(directory)
        assert (trace.name, trace.source, trace.zones) == (directory.name, str(directory), before.zones)
        assert np.array_equal(trace.capacity, before.capacity)


def test_a_zone_with_several_types_splits_into_one_trace_per_type(tmp_path):
    directory = make_dir(tmp_path / "aws")
    traces = load_traces(directory)
    assert [t.name for t in traces] == ["aws[k80_1]", "aws[v100_8]"]
    k80, v100 = traces
    assert [z.zone for z in k80.zones] == [z.zone for z in v100.zones] == ["us-west-2a", "us-west-2b"]
    assert (k80.ticks, v100.ticks) == (80, 60)  # each type keeps its own length
    assert k80.capacity[0, ::2].tolist() == FILES["us-west-2a_k80_1"]
    assert v100.capacity[1, ::2].tolist() == FILES["us-west-2b_v100_8"]
    assert "k80_1" in k80.source and str(directory) in k80.source


def test_files_without_a_type_form_their_own_trace_first(tmp_path):
    directory = tmp_path / "d"
    write_zone(directory, "us-east-1a", [1, 2])
    write_zone(directory, "us-east-1a_k80", [3, 4])
    assert [t.name for t in load_traces(directory)] == ["d", "d[k80]"]


def test_load_trace_still_refuses_several_types_and_points_at_the_split(tmp_path):
    with pytest.raises(TraceError, match="zone us-west-2a appears twice") as info:
        load_trace(make_dir(tmp_path / "aws"))
    message = str(info.value)
    assert "k80_1, v100_8" in message and "--instance-type" in message and "\n" not in message


def test_split_traces_draw_the_windows_of_a_standalone_directory(tmp_path):
    """A split trace is the trace of a directory holding only its type's files: same windows."""
    split = load_traces(make_dir(tmp_path / "aws"))
    config = SimConfig(ticks=30, repeats=4, seed=3, cold_start_seconds=60)
    for trace, kind in zip(split, ["k80_1", "v100_8"], strict=True):
        alone = load_trace(make_dir(tmp_path / kind, [n for n in FILES if n.endswith(kind)]))
        assert trace.zones == alone.zones and np.array_equal(trace.capacity, alone.capacity)
        assert make_windows(trace, config) == make_windows(alone, config)
    # ... and through the command line, down to every per-window number
    args = ["--policy", "spothedge,ondemand,even", "--seed", "3", "--json"]
    together = json.loads(small("--trace", str(tmp_path / "aws"), *args).stdout)
    for kind in ("k80_1", "v100_8"):
        alone = json.loads(small("--trace", str(tmp_path / kind), *args).stdout)
        mine = [row for row in together if row["trace"] == f"aws[{kind}]"]
        drop = {"trace", "seconds_per_window"}
        assert [{k: v for k, v in r.items() if k not in drop} for r in mine] == [
            {k: v for k, v in r.items() if k not in drop} for r in alone
        ]


def test_cli_reports_one_object_per_trace_and_policy(tmp_path):
    directory = make_dir(tmp_path / "aws")
    result = small("--trace", str(directory), "--policy", "spothedge,ondemand", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["trace"], r["policy"]) for r in rows] == [
        ("aws[k80_1]", "spothedge"),
        ("aws[k80_1]", "ondemand"),
        ("aws[v100_8]", "spothedge"),
        ("aws[v100_8]", "ondemand"),
    ]
    table = small("--trace", str(directory), "--policy", "ondemand")
    assert table.exit_code == 0, table.output
    assert "aws[k80_1]" in table.stdout and "aws[v100_8]" in table.stdout


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (["--instance-type", "v100_8"], ["aws[v100_8]"]),
        (["--instance-type", "v100_8,k80_1"], ["aws[k80_1]", "aws[v100_8]"]),
        (["--instance-type", "v100_8", "--instance-type", "k80_1"], ["aws[k80_1]", "aws[v100_8]"]),
    ],
)
def test_instance_type_option_keeps_those_types(tmp_path, option, expected):
    directory = make_dir(tmp_path / "aws")
    result = small("--trace", str(directory), "--policy", "ondemand", *option, "--json")
    assert result.exit_code == 0, result.output
    assert [r["trace"] for r in json.loads(result.stdout)] == expected


def test_instance_type_filter_on_a_single_type_or_mixed_directory(tmp_path):
    one = make_dir(tmp_path / "one", ["us-west-2a_k80_1", "us-west-2b_k80_1"])
    assert [t.name for t in load_traces(one, instance_types=["k80_1"])] == ["one"]  # every file: same name
    mixed = make_dir(tmp_path / "mixed", ["us-west-2a_k80_1", "us-west-2b_v100_8"])
    (trace,) = load_traces(mixed, instance_types=["v100_8"])
    assert trace.name == "mixed[v100_8]" and [z.zone for z in trace.zones] == ["us-west-2b"]


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("p100_1", "aws: no instance type 'p100_1'; its instance types: k80_1, v100_8"),
        ("k80_1,nope", "aws: no instance type 'nope'; its instance types: k80_1, v100_8"),
    ],
)
def test_unknown_instance_type_is_one_line_naming_the_types(tmp_path, kind, message):
    directory = make_dir(tmp_path / "aws")
    result = small("--trace", str(directory), "--policy", "ondemand", "--instance-type", kind)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {tmp_path}/{message}"
    assert result.stdout == ""


def test_instance_type_on_traces_without_types(tmp_path):
    plain = tmp_path / "plain"
    write_zone(plain, "us-east-1a", [1, 2])
    with pytest.raises(TraceError, match="its instance types: none"):
        load_traces(plain, instance_types=["k80_1"])
    csv = tmp_path / "t.csv"
    csv.write_text("seconds,us-east-1a\n0,1\n60,2\n")
    with pytest.raises(TraceError, match="a CSV trace has none"):
        load_traces(csv, instance_types=["k80_1"])
    assert [t.name for t in load_traces(csv)] == ["t"]
    with pytest.raises(TraceError, match="no such trace directory"):
        load_traces(tmp_path / "missing", instance_types=["k80_1"])
    empty = invoke("--trace", str(plain), "--instance-type", " , ")
    assert empty.exit_code != 0 and "--instance-type" in empty.output


def test_the_shared_multi_type_directory_splits_like_standalone_directories(tmp_path):
    if not AWS_10_26.is_dir():
        pytest.skip("../shared is not present (only on the team's machines)")
    traces = load_traces(AWS_10_26)
    kinds = ["k80_1", "k80_8", "v100_1", "v100_8"]
    assert [t.name for t in traces] == [f"aws-10-26-2022[{k}]" for k in kinds]
    config = SimConfig(repeats=10, seed=0)
    for trace, kind in zip(traces, kinds, strict=True):
        assert [z.zone for z in trace.zones] == ["us-west-2a", "us-west-2b"] and trace.availability_only
        alone = tmp_path / kind
        alone.mkdir()
        for file in AWS_10_26.glob(f"*_{kind}.json"):
            (alone / file.name).symlink_to(file)
        standalone = load_trace(alone)
        assert np.array_equal(trace.capacity, standalone.capacity)
        assert make_windows(trace, config) == make_windows(standalone, config)
    result = invoke("--trace", str(AWS_10_26), "--policy", "spothedge,ondemand", "--repeats", "2", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["trace"], r["policy"]) for r in rows] == [
        (f"aws-10-26-2022[{k}]", p) for k in kinds for p in ("spothedge", "ondemand")
    ]
    assert all(r["runs"] == 2 for r in rows)
