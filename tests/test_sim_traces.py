"""Trace loading: both formats, the resampling rule, availability traces, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from skyhedge.errors import TraceError
from skyhedge.policy import Location
from skyhedge.simulator.traces import UNLIMITED, load_trace, load_traces, location_for_zone, resample


def write_zone(directory: Path, name: str, data, gap=300, **extra) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    doc = {"metadata": {"gap_seconds": gap}, "data": data, **extra}
    (directory / f"{name}.json").write_text(json.dumps(doc))


def test_json_dir_resamples_to_30s_ticks_and_keeps_the_shortest(tmp_path):
    write_zone(tmp_path, "us-east-2a_v100_1", [4, 3], gap=60)  # 2 ticks per value, 4 ticks
    write_zone(tmp_path, "us-west-2c_v100_1", [1, 2, 3], gap=60)  # 6 ticks
    trace = load_trace(tmp_path)
    assert trace.name == tmp_path.name
    assert trace.zones == (
        Location("aws", "us-east-2", "us-east-2a"),
        Location("aws", "us-west-2", "us-west-2c"),
    )
    assert trace.capacity.tolist() == [[4, 4, 3, 3], [1, 1, 2, 2]]
    assert not trace.availability_only


def test_resample_rule_for_gaps_that_are_not_multiples_of_30():
    # tick t takes data[floor(t*30/G)]; G=32: ticks 0..14 -> indices 0,0,1,2,3,4,5,6,7,8,9,10,11,12,13
    values = np.arange(16)
    assert resample(values, 32).tolist() == [int(t * 30 // 32) for t in range(17)]
    assert resample([7, 8], 45).tolist() == [7, 7, 8]


def test_binary_traces_mean_as_many_as_asked(tmp_path):
    write_zone(tmp_path, "us-west-2a_k80_1", [1, 0, 1], gap=30)
    write_zone(tmp_path, "us-west-2b_k80_1", [0, 1, 1], gap=30)
    trace = load_trace(tmp_path)
    assert trace.availability_only
    assert trace.capacity.tolist() == [[UNLIMITED, 0, UNLIMITED], [0, UNLIMITED, UNLIMITED]]
    assert load_trace(tmp_path, binary_is_unlimited=False).capacity.tolist() == [[1, 0, 1], [0, 1, 1]]


def test_prices_ride_along(tmp_path):
    write_zone(tmp_path, "us-east-1c_v100_1", [1, 1], gap=60, prices=[0.9, 1.1])
    write_zone(tmp_path, "us-east-1d_v100_1", [1, 2], gap=60)
    trace = load_trace(tmp_path)
    assert trace.spot_prices is not None
    assert trace.spot_prices[0].tolist() == [0.9, 0.9, 1.1, 1.1]
    assert np.isnan(trace.spot_prices[1]).all()


def test_a_null_price_is_a_missing_sample_not_a_broken_trace(tmp_path):
    """Price feeds have gaps; prices only matter with `simulate --prices`, where a zone with a
    missing sample and no fixed price is then refused by name (runner._zone_prices)."""
    write_zone(tmp_path, "us-east-1c_v100_1", [2, 2], gap=60, prices=[None, 1.1])
    trace = load_trace(tmp_path)
    assert trace.capacity.tolist() == [[2, 2, 2, 2]]
    assert trace.spot_prices is not None
    assert np.isnan(trace.spot_prices[0][:2]).all() and trace.spot_prices[0][2:].tolist() == [1.1, 1.1]
    write_zone(tmp_path, "us-east-1c_v100_1", [1, 1], gap=60, prices=["1.0", 1.1])
    with pytest.raises(
        TraceError, match=r"prices\[0\]: expected a number in \[0, 1e\+06\] or null, got '1.0'$"
    ):
        load_trace(tmp_path)


def test_csv_file_and_csv_in_a_directory(tmp_path):
    text = "seconds,us-east-1a,gcp/us-central1/us-central1-a,lab-zone\n0,1,2,0\n60,3,4,1\n"
    (tmp_path / "mine.csv").write_text(text)
    trace = load_trace(tmp_path / "mine.csv")
    assert trace.name == "mine"
    assert trace.zones == (
        Location("aws", "us-east-1", "us-east-1a"),
        Location("gcp", "us-central1", "us-central1-a"),
        Location("trace", "lab-zone", "lab-zone"),
    )
    assert trace.capacity.tolist() == [[1, 1, 3, 3], [2, 2, 4, 4], [0, 0, 1, 1]]
    assert load_trace(tmp_path).capacity.tolist() == trace.capacity.tolist()


def test_zone_names_map_to_locations():
    assert location_for_zone("eu-west-3b") == Location("aws", "eu-west-3", "eu-west-3b")
    assert location_for_zone("asia-northeast1-a") == Location("gcp", "asia-northeast1", "asia-northeast1-a")
    assert location_for_zone("eastus-1") == Location("azure", "eastus", "eastus-1")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "no such trace directory"),
        (lambda d: d.mkdir(), "no \\*.json zone traces"),
        (lambda d: (d.mkdir(), (d / "a.json").write_text("{oops")), "not a readable JSON trace"),
        (lambda d: write_zone(d, "us-east-1a", [1], gap=0), "metadata.gap_seconds"),
        (lambda d: write_zone(d, "us-east-1a", [1, -2]), "data\\[1\\]: expected a non-negative integer"),
        (lambda d: write_zone(d, "us-east-1a", [1, 1.5]), "data\\[1\\]"),
        (lambda d: write_zone(d, "us-east-1a", []), "non-empty list"),
        (lambda d: (write_zone(d, "us-east-1a_x", [1]), write_zone(d, "us-east-1a_y", [1])), "appears twice"),
        (lambda d: write_zone(d, "us-east-1a", [1], gap=10), "shorter than one 30 s tick"),
    ],
)
def test_bad_json_traces_fail_with_one_clear_line(tmp_path, setup, message):
    target = tmp_path / "trace"
    setup(target)
    with pytest.raises(TraceError, match=message) as info:
        load_trace(target)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("zone,a\n0,1\n", "line 1: expected a header"),
        ("seconds,us-east-1a\n0,1\n60\n", "line 3: expected 2 cells"),
        ("seconds,us-east-1a\n0,x\n", "line 2: us-east-1a: expected a non-negative integer"),
        ("seconds,us-east-1a\n0,1\n60,1\n90,1\n", "evenly spaced"),
        ("seconds,us-east-1a\n", "at least one row"),
    ],
)
def test_bad_csv_traces(tmp_path, text, message):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(TraceError, match=message):
        load_trace(path)


def test_the_public_traces_load(shared_dir):
    trace = load_trace(shared_dir / "traces" / "skyserve" / "AWS2")
    assert len(trace.zones) == 3 and trace.ticks == 3247 * 10  # the shortest zone decides
    assert trace.capacity.max() == 16 and not trace.availability_only
    binary = load_trace(
        shared_dir / "traces" / "cant-be-late" / "availability" / "16-node" / "aws-08-27-2023"
    )
    assert not binary.availability_only  # 0..16 values, not an availability trace


def test_a_folder_of_traces_gives_every_trace_below_it_named_by_its_path(tmp_path):
    """`--trace ../shared/traces` runs every trace in the tree; names stay unique (two `AWS1`
    in different folders would not be) and say where each came from."""
    write_zone(tmp_path / "skyserve" / "AWS1", "us-east-1a_v100_1", [1, 2])
    write_zone(tmp_path / "cbl" / "1-node" / "aws", "us-east-1a_k80_1", [1, 0])
    write_zone(tmp_path / "cbl" / "1-node" / "aws", "us-east-1a_v100_1", [1, 1])
    write_zone(tmp_path / "cbl" / "1-node" / "aws", "us-east-1b_k80_1", [0, 1])
    write_zone(tmp_path / ".hidden" / "x", "us-east-1a_v100_1", [1, 1])  # dot-folders skipped
    (tmp_path / "README.md").write_text("not a trace")
    names = [t.name for t in load_traces(tmp_path)]
    assert names == ["cbl/1-node/aws[k80_1]", "cbl/1-node/aws[v100_1]", "skyserve/AWS1"]
    assert [t.name for t in load_traces(tmp_path / "skyserve")] == ["AWS1"]  # one level: its own name
    assert [t.name for t in load_traces(tmp_path, instance_types=["k80_1"])] == ["cbl/1-node/aws[k80_1]"]
    with pytest.raises(TraceError, match=r"no trace directory below it holds instance type 'p3'$"):
        load_traces(tmp_path, instance_types=["p3"])


def test_a_folder_of_links_to_trace_directories_runs_them_and_stops_at_loops(tmp_path):
    """Linked trace directories are traces of the folder (found by an audit: os.walk skipped them,
    so a folder of links ran only its real directories and said nothing); a loop ends."""
    elsewhere = tmp_path / "elsewhere" / "AWS2"
    write_zone(elsewhere, "us-east-2b_v100_1", [1, 2])
    folder = tmp_path / "mine"
    write_zone(folder / "real", "us-east-1a_v100_1", [1, 2])
    (folder / "AWS2").symlink_to(elsewhere, target_is_directory=True)
    (folder / "real" / "back").symlink_to(folder, target_is_directory=True)  # a loop
    assert [t.name for t in load_traces(folder)] == ["AWS2", "real"]


def test_a_folder_with_no_trace_in_or_below_it_is_one_error(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    with pytest.raises(
        TraceError, match=r"no \*.json zone traces or \*.csv trace in this directory or below it$"
    ):
        load_traces(tmp_path)


def test_a_folder_of_traces_keeps_each_directory_to_the_wanted_types_it_holds(tmp_path):
    """`--trace ../shared/traces --instance-type v100_1,k80_1`: a directory holding only v100_1
    runs that type, a directory holding both runs both (found by an audit: the first directory
    lacking one of the types failed the whole folder)."""
    write_zone(tmp_path / "skyserve" / "AWS1", "us-east-1a_v100_1", [1, 2])
    write_zone(tmp_path / "cbl" / "aws", "us-east-1a_k80_1", [1, 0])
    write_zone(tmp_path / "cbl" / "aws", "us-east-1a_v100_1", [1, 1])
    write_zone(tmp_path / "cbl" / "aws", "us-east-1a_k80_8", [0, 1])
    names = [t.name for t in load_traces(tmp_path, instance_types=["v100_1", "k80_1"])]
    assert names == ["cbl/aws[k80_1]", "cbl/aws[v100_1]", "skyserve/AWS1"]
    with pytest.raises(TraceError, match=r"no trace directory below it holds instance type 'p3'$"):
        load_traces(tmp_path, instance_types=["v100_1", "p3"])
