"""The benchmark scripts: a count out of range is one usage line (no traceback after minutes of
set-up), `simulate_bench.py --optimal-windows 0` skips the optimum, and `routing_bench.py`
leaves no temp dir behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from routing_support import needs_nginx

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def bench(tmp_path: Path, script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("plan_bench.py", ["--repeats", "0"]),
        ("reaction_bench.py", ["--rounds", "0"]),
        ("state_write_bench.py", ["--passes", "0"]),
        ("spec_load_bench.py", ["--repeats", "0"]),
        ("routing_bench.py", ["--replicas", "0"]),
        ("soak_bench.py", ["--replicas", "0"]),
        ("soak_bench.py", ["--minutes", "0"]),
        ("scale_bench.py", ["--replicas", "0"]),
        ("scale_bench.py", ["--passes", "0"]),
        ("probe_bench.py", ["--timeout", "0"]),
        ("traffic_bench.py", ["--rate", "0"]),
        ("traffic_bench.py", ["--scenarios", "kill,nap"]),
        ("traffic_bench.py", ["--scenarios", "ramp", "--target-qps", "0"]),
        ("traffic_bench.py", ["--scenarios", "ramp", "--downscale-delay", "-1"]),
        ("simulate_bench.py", ["--repeats", "0"]),
        ("simulate_bench.py", ["--optimal-windows", "-1"]),
        ("autoscaler_replay.py", ["--seeds", "0"]),
        ("autoscaler_replay.py", ["--delays", "10"]),
        ("autoscaler_replay.py", ["--tolerance", "1"]),
        ("policy_subsets.py", [".", "--seeds", "x"]),
        ("policy_subsets.py", [".", "--seeds", "3-1"]),
        ("memory_bench.py", ["--cycles", "0"]),
        ("memory_bench.py", ["--refreshes", "0"]),
    ],
)
def test_a_count_out_of_range_is_one_usage_error(tmp_path, script, args):
    done = bench(tmp_path, script, *args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"{script}: error: argument")


@pytest.mark.parametrize(
    ("script", "args", "says"),
    [
        ("apply_bench.py", ["--sizes", "abc"], "--sizes: expected comma-separated whole numbers"),
        ("apply_bench.py", ["--sizes", "0"], "--sizes: expected replica counts of at least 5"),
        ("apply_bench.py", ["--sizes", "2"], "--sizes: expected replica counts of at least 5"),
        ("simulate_bench.py", ["--trace", "no-such-trace"], "--trace: no-such-trace: no such trace"),
        ("scale_bench.py", ["--zones", "3,x"], "argument --zones: expected comma-separated whole numbers"),
        ("probe_bench.py", ["--hung", "-1"], "argument --hung: expected counts of at least 0"),
    ],
)
def test_a_bad_size_or_trace_is_one_usage_error(tmp_path, script, args, says):
    done = bench(tmp_path, script, *args)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"{script}: error: {says}")


def test_simulate_bench_without_optimal_windows_prints_the_policies_only(tmp_path):
    trace = tmp_path / "one.csv"
    rows = ["seconds,aws/us-east-1/us-east-1a"] + [f"{30 * i},{1 if i % 500 else 0}" for i in range(3200)]
    trace.write_text("\n".join(rows) + "\n", encoding="utf-8")
    done = bench(
        tmp_path, "simulate_bench.py", "--trace", str(trace), "--repeats", "1", "--optimal-windows", "0"
    )
    assert done.returncode == 0, done.stderr
    assert "spothedge" in done.stdout and "optimal window" not in done.stdout
    assert "optimal per window" not in done.stdout


@needs_nginx
@pytest.mark.timeout(120)
def test_routing_bench_removes_its_temp_dir(tmp_path):
    done = bench(
        tmp_path, "routing_bench.py", "--replicas", "1", "--requests", "20", "--threads", "1", timeout=110
    )
    assert done.returncode == 0, done.stderr
    assert "req/s" in done.stdout
    assert not list(tmp_path.glob("routing-bench-*"))


@needs_nginx
@pytest.mark.timeout(180)
def test_soak_bench_drives_a_watcher_prints_rows_and_leaves_nothing_behind(tmp_path):
    done = bench(tmp_path, "soak_bench.py", "--gone", "4", "--replicas", "2", "--every", "2", timeout=170)
    assert done.returncode == 0, done.stderr
    assert " rss " in done.stdout and "no problem found" in done.stdout, done.stdout
    assert not list(tmp_path.glob("skyhedge-soak-*"))


def test_scale_bench_prints_the_policies_and_the_watcher_and_removes_its_temp_dir(tmp_path):
    done = bench(
        tmp_path, "scale_bench.py", "--replicas", "20", "--zones", "6", "--watch-zones", "6", "--passes", "2"
    )
    assert done.returncode == 0, done.stderr
    assert "skyhedge     6 zones,    20 replicas: steady" in done.stdout
    assert "20 replicas, 6 zones: first pass" in done.stdout and "idle pass median" in done.stdout
    assert not list(tmp_path.glob("scale-bench-*"))


@pytest.mark.timeout(60)
def test_probe_bench_times_a_round_with_hung_replicas_and_removes_its_temp_dir(tmp_path):
    done = bench(tmp_path, "probe_bench.py", "--replicas", "4", "--hung", "0,2", "--timeout", "1", timeout=50)
    assert done.returncode == 0, done.stderr
    rounds = [line for line in done.stdout.splitlines() if "replicas," in line]
    assert len(rounds) == 2 and "2 hung: watcher's probe round" in rounds[1]
    assert not list(tmp_path.glob("probe-bench-*"))
