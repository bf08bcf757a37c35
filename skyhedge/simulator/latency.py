"""Request-level latency over a window's ready-replica timeline (the SkyServe paper's model).

Requests arrive (Poisson, or replayed from a recorded file) and are sent round robin over the
replicas READY at that moment; each replica serves its queue first come first served with an
exponential service time (mean 10 s). A request fails when:

- no replica is ready when it arrives;
- it waited more than 100 s in a queue (it is dropped when its turn comes);
- the replica it was sent to disappears before it finished (preemption or scale-in).

As in the paper, a failed request counts with the timeout (100 s) in the percentiles, and the
failure rate is reported beside them. The timeline is a ready count per tick: when it drops, the
newest replicas go (the same order the world terminates them). Arrivals and service times depend
only on the seed and window, never on the policy, so policies are compared on the same requests.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skyhedge.errors import TraceError
from skyhedge.simulator.traces import TICK_SECONDS

__all__ = [
    "DEFAULT_RATE",
    "LatencyStats",
    "MAX_REQUESTS_PER_WINDOW",
    "SERVICE_SECONDS",
    "TIMEOUT_SECONDS",
    "check_replay",
    "load_arrivals",
    "poisson_arrivals",
    "replay_arrivals",
    "simulate_requests",
    "summarize",
]

SERVICE_SECONDS = 10.0
TIMEOUT_SECONDS = 100.0
#: Requests per second: the paper's three Poisson clients at 0.05 req/s each.
DEFAULT_RATE = 0.15
#: Requests one window may replay: each is simulated one by one (about a microsecond and a hundred
#: bytes each), and 1e6 per 24 h window is 11.6 req/s, far beyond what the model's replicas (10 s
#: per request) serve. Recorded gaps so short that a window would get more are refused.
MAX_REQUESTS_PER_WINDOW = 1_000_000


@dataclass(frozen=True)
class LatencyStats:
    latencies: np.ndarray  # seconds per request; failures count as the timeout
    failed: np.ndarray  # bool per request

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def failures(self) -> int:
        return int(self.failed.sum())


def poisson_arrivals(rng: np.random.Generator, duration: float, rate: float = DEFAULT_RATE) -> np.ndarray:
    """Arrival times in [0, duration) of a Poisson process of `rate` requests per second."""
    if rate <= 0 or duration <= 0:
        return np.zeros(0)
    expected = rate * duration
    size = int(expected + 6 * math.sqrt(expected) + 16)
    times = np.cumsum(rng.exponential(1.0 / rate, size))
    while times[-1] < duration:  # pragma: no cover - astronomically rare
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, size))])
    return times[times < duration]


def load_arrivals(path: str | Path) -> np.ndarray:
    """Recorded arrival timestamps (seconds, one per line; blank lines and #comments skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read the arrivals file ({exc})") from exc
    times: list[float] = []
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise TraceError(f"{path}: line {number}: expected a timestamp in seconds, got {text!r}")
        if times and value < times[-1]:
            raise TraceError(f"{path}: line {number}: timestamps must not go backwards")
        times.append(value)
    if len(times) < 2:
        raise TraceError(f"{path}: expected at least two arrival timestamps")
    if times[-1] == times[0]:
        raise TraceError(f"{path}: all timestamps are equal; nothing to replay")
    if not math.isfinite(times[-1] - times[0]):
        raise TraceError(f"{path}: timestamps: expected a finite span, got {times[0]:g} to {times[-1]:g}")
    return np.asarray(times)


def _replay_count(gaps: np.ndarray, span: float, duration: float) -> float:
    """The arrivals the cycled gaps put in [0, duration), counted without making them."""
    cycles = duration / span
    if not cycles < 2**53:
        return math.inf
    full = math.floor(cycles)
    rest = duration - full * span
    return float(full * len(gaps) + int(np.searchsorted(np.cumsum(gaps), rest, side="left")))


def check_replay(recorded: np.ndarray, duration: float, source: str = "arrivals") -> None:
    """Raise `TraceError` (naming `source`) when replaying `recorded` over a window of `duration`
    seconds would give more than `MAX_REQUESTS_PER_WINDOW` requests: a gap of 1e-9 s is fine among
    others, but timestamps all within a nanosecond, cycled over a day, are 1e14 requests."""
    gaps = np.diff(recorded)
    span = float(gaps.sum())
    if span > 0 and duration > 0 and _replay_count(gaps, span, duration) > MAX_REQUESTS_PER_WINDOW:
        rate = len(gaps) / span
        raise TraceError(
            f"{source}: timestamps: expected at most {MAX_REQUESTS_PER_WINDOW} requests per window, got "
            f"about {rate * duration:.3g} ({len(gaps)} gap{'s' if len(gaps) != 1 else ''} over {span:g} s "
            f"= {rate:.3g} req/s, cycled over a window of {duration:g} s)"
        )


def replay_arrivals(recorded: np.ndarray, duration: float) -> np.ndarray:
    """The recorded inter-arrival gaps, replayed from 0 and cycled until `duration`.

    Refused (`check_replay`) when that would be more than `MAX_REQUESTS_PER_WINDOW` arrivals."""
    gaps = np.diff(recorded)
    span = float(gaps.sum())
    if span <= 0:
        raise TraceError("arrivals: all timestamps are equal; nothing to replay")
    if duration <= 0:
        return np.zeros(0)
    check_replay(recorded, duration)
    cycles = int(math.ceil(duration / span)) + 1
    times = np.cumsum(np.tile(gaps, cycles))
    return times[times < duration]


def simulate_requests(
    ready: Sequence[int] | np.ndarray,
    arrivals: np.ndarray,
    service: np.ndarray,
    *,
    tick_seconds: float = TICK_SECONDS,
    timeout: float = TIMEOUT_SECONDS,
) -> LatencyStats:
    """Play `arrivals` (seconds from the timeline's start) against `ready[k]` replicas in tick k."""
    count = len(arrivals)
    latencies = np.full(count, timeout)
    failed = np.ones(count, dtype=bool)
    free_at: list[float] = []  # per replica: when its queue drains
    finishes: list[list[float]] = []  # per replica: finish times of its requests, increasing
    owners: list[list[int]] = []  # per replica: the requests behind those finish times
    turn = 0
    i = 0
    ticks = len(ready)
    for k in range(ticks + 1):
        boundary = k * tick_seconds
        while i < count and (k == ticks or arrivals[i] < boundary):
            at = float(arrivals[i])
            if free_at:
                node = turn % len(free_at)
                turn += 1
                start = free_at[node] if free_at[node] > at else at
                if start - at <= timeout:
                    finish = start + float(service[i])
                    free_at[node] = finish
                    finishes[node].append(finish)
                    owners[node].append(i)
                    latencies[i] = finish - at
                    failed[i] = False
            i += 1
        if k == ticks:
            break
        wanted = int(ready[k])
        while len(free_at) > wanted:  # the newest replicas go; their unfinished requests fail
            gone_finishes = finishes.pop()
            gone_owners = owners.pop()
            free_at.pop()
            for j in gone_owners[bisect_right(gone_finishes, boundary) :]:
                latencies[j] = timeout
                failed[j] = True
        while len(free_at) < wanted:
            free_at.append(boundary)
            finishes.append([])
            owners.append([])
    return LatencyStats(latencies, failed)


def summarize(stats: Sequence[LatencyStats]) -> dict[str, float]:
    """P50/P90/P99 (seconds) and failure rate over all requests of all windows."""
    latencies = np.concatenate([s.latencies for s in stats]) if stats else np.zeros(0)
    failures = sum(s.failures for s in stats)
    if len(latencies) == 0:  # no request reached a window (recorded gaps longer than it)
        return {
            "latency_p50": math.nan,
            "latency_p90": math.nan,
            "latency_p99": math.nan,
            "failure_rate": math.nan,  # of no request: undefined like the percentiles (JSON null)
            "requests": 0,
        }
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    return {
        "latency_p50": float(p50),
        "latency_p90": float(p90),
        "latency_p99": float(p99),
        "failure_rate": failures / len(latencies),
        "requests": int(len(latencies)),
    }
