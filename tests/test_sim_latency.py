"""The request-level latency model on hand-worked timelines."""

from __future__ import annotations

import numpy as np
import pytest

from skyhedge.errors import TraceError
from skyhedge.simulator.latency import (
    load_arrivals,
    poisson_arrivals,
    replay_arrivals,
    simulate_requests,
    summarize,
)


def run(ready, arrivals, service):
    return simulate_requests(np.asarray(ready), np.asarray(arrivals, float), np.asarray(service, float))


def test_one_replica_serves_first_come_first_served():
    stats = run([1] * 10, [0, 5, 100], [10, 10, 10])
    assert stats.latencies.tolist() == [10, 15, 10]
    assert stats.failures == 0


def test_no_ready_replica_is_a_failure():
    stats = run([0, 1, 1], [5, 35], [1, 1])
    assert stats.failed.tolist() == [True, False]
    assert stats.latencies.tolist() == [100, 1]


def test_a_replica_that_disappears_fails_its_unfinished_requests():
    stats = run([1, 1, 0, 0], [10, 50], [5, 20])  # the second would finish at 70, after the drop at 60
    assert stats.failed.tolist() == [False, True]


def test_waiting_more_than_the_timeout_is_a_failure():
    stats = run([1] * 10, [0, 1], [150, 1])
    assert stats.failed.tolist() == [False, True]
    assert stats.latencies.tolist() == [150, 100]


def test_round_robin_over_ready_replicas():
    stats = run([2] * 4, [0, 1, 2], [10, 10, 10])
    assert stats.latencies.tolist() == [10, 10, 18]


def test_the_newest_replica_goes_first_when_the_count_drops():
    stats = run([2, 1, 1], [0, 1], [50, 50])
    assert stats.failed.tolist() == [False, True]


def test_summary_counts_failures_at_the_timeout():
    stats = run([1] * 4, [0, 1, 2, 3], [1, 1, 1, 1])
    summary = summarize([stats, run([0] * 4, [0], [1])])
    assert summary["failure_rate"] == pytest.approx(1 / 5)
    assert summary["latency_p99"] == pytest.approx(np.percentile([1, 1, 1, 1, 100], 99))


def test_poisson_rate_and_recorded_replay(tmp_path):
    times = poisson_arrivals(np.random.default_rng(1), 100_000, 0.15)
    assert times.min() >= 0 and times.max() < 100_000 and (np.diff(times) >= 0).all()
    assert len(times) == pytest.approx(15_000, rel=0.05)
    path = tmp_path / "arrivals.txt"
    path.write_text("# recorded\n100\n\n110.5\n130\n")
    recorded = load_arrivals(path)
    assert replay_arrivals(recorded, 100).tolist() == [10.5, 30, 40.5, 60, 70.5, 90]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1\nx\n", "line 2: expected a timestamp"),
        ("5\n4\n", "backwards"),
        ("1\n", "at least two"),
        ("3\n3\n3\n", "all timestamps are equal"),
    ],
)
def test_bad_arrival_files(tmp_path, text, message):
    """Each refusal names the file: the error is read by someone who passed several."""
    path = tmp_path / "a.txt"
    path.write_text(text)
    with pytest.raises(TraceError, match=message) as caught:
        load_arrivals(path)
    assert str(caught.value).startswith(f"{path}: ")
