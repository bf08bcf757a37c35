"""The request-rate autoscaler replayed on Poisson arrivals (pure: no router, no clock; seconds).

`skyhedge.autoscaler.step` is fed nginx's cumulative request counter as the watcher feeds it
(every 10 s when idle, every second while a wish waits out its delay), under

1. a steady load at a threshold (2 x target_qps_per_replica: where 2 replicas become 3, and
   1.9 x, just under it): how often the target moves, per hour;
2. a step up (1.5 x -> 2.7 x the target, from 2 replicas to 3): seconds from the step until the
   target is 3 or more (0 s when it already was);
3. a step down (2.5 x -> 0.5 x the target, 3 replicas to 1): seconds until the target is 1.

Prints figures; asserts nothing. Deterministic: arrivals come from `random.Random(seed)`.

    python benchmarks/autoscaler_replay.py [--per-replica 0.5,1,2,10] [--delays 10/30]
        [--hours 8] [--seeds 5] [--tolerance 0.1] [--sigmas 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _argtypes import positive  # noqa: E402

from skyhedge import autoscaler  # noqa: E402
from skyhedge.autoscaler import AutoscalerConfig, AutoscalerState, step  # noqa: E402


def rates(text: str) -> list[float]:
    """Comma-separated numbers > 0 (`--per-replica 0.5,1`)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers > 0, got {text!r}")
    return values


def delay_pairs(text: str) -> list[tuple[float, float]]:
    """Comma-separated UP/DOWN pairs of seconds (`--delays 10/30,60/300`)."""
    try:
        pairs = [tuple(float(v) for v in d.split("/")) for d in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or not all(0 <= v < float("inf") for v in p) for p in pairs):
        raise argparse.ArgumentTypeError(f"expected UP/DOWN seconds like 10/30,60/300, got {text!r}")
    return [(p[0], p[1]) for p in pairs]


def fraction(text: str) -> float:
    """A downscale_tolerance: a number in [0, 0.9], as the spec takes it."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 0.9], got {text!r}") from None
    if not 0 <= value <= 0.9:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 0.9], got {text!r}")
    return value


def replay(
    cfg: AutoscalerConfig, load: Callable[[float], float], seconds: float, *, start_target: int, seed: int
) -> list[tuple[float, int]]:
    """(time, target) at each move of the target, starting with (0, start_target). `load(t)` is
    the arrival rate at t, piecewise constant; arrivals are drawn second by second."""
    rnd = random.Random(seed)
    state = AutoscalerState(target=start_target)
    moves = [(0.0, start_target)]
    t, count, second = 0.0, 0, 0
    while t < seconds:
        nxt = t + (1.0 if state.pending is not None else 10.0)
        while second < nxt:  # Poisson arrivals in [second, second + 1) at the rate then
            rate = load(second)
            arrival = rnd.expovariate(rate) if rate > 0 else 2.0
            while arrival < 1.0:
                count += 1
                arrival += rnd.expovariate(rate)
            second += 1
        t = nxt
        state = step(cfg, state, t, count)
        if state.target != moves[-1][1]:
            moves.append((t, state.target))
    return moves


def flaps_per_hour(cfg: AutoscalerConfig, qps: float, hours: float, seeds: int) -> float:
    runs = [replay(cfg, lambda _t: qps, hours * 3600, start_target=2, seed=s) for s in range(seeds)]
    return sum(len(moves) - 1 for moves in runs) / (hours * seeds)


def time_to(
    cfg: AutoscalerConfig, before: float, after: float, start: int, goal: int, seeds: int
) -> list[float]:
    """Seconds from a step in load (at 600 s) until the target is `goal`, per seed."""
    times = []
    for s in range(seeds):
        moves = replay(cfg, lambda t: before if t < 600 else after, 3000, start_target=start, seed=s)
        at_step = [(600.0, target) for t, target in moves if t <= 600][-1]  # already there: 0 s
        later = [move for move in moves if move[0] > 600]
        reached = [t for t, target in (at_step, *later) if (target - goal) * (after - before) >= 0]
        times.append(reached[0] - 600 if reached else float("inf"))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(prog="autoscaler_replay.py", description=__doc__.splitlines()[0])
    ap.add_argument("--per-replica", type=rates, default=[0.5, 1.0, 2.0, 10.0], help="target_qps_per_replica")
    ap.add_argument("--delays", type=delay_pairs, default=[(10.0, 30.0)], help="UP/DOWN delays, e.g. 10/30")
    ap.add_argument("--hours", type=positive, default=8)
    ap.add_argument("--seeds", type=positive, default=5)
    ap.add_argument("--tolerance", type=fraction, default=autoscaler.DOWNSCALE_TOLERANCE)
    ap.add_argument("--sigmas", type=float, default=None, help="what if DOWNSCALE_SIGMAS were this")
    args = ap.parse_args()
    if args.sigmas is not None:
        autoscaler.DOWNSCALE_SIGMAS = args.sigmas
    print("per replica | delays | moves/h at 2.0x | at 1.9x | up 1.5x->2.7x s (median, max) |", end=" ")
    print("down 2.5x->0.5x s")
    for up, down in args.delays:
        for p in args.per_replica:
            cfg = AutoscalerConfig(1, 4, p, up, down, downscale_tolerance=args.tolerance)
            at = flaps_per_hour(cfg, 2.0 * p, args.hours, args.seeds)
            under = flaps_per_hour(cfg, 1.9 * p, args.hours, args.seeds)
            ups = time_to(cfg, 1.5 * p, 2.7 * p, 2, 3, args.seeds)
            downs = time_to(cfg, 2.5 * p, 0.5 * p, 3, 1, args.seeds)
            print(
                f"{p:>11} | {up:g}/{down:g} | {at:15.1f} | {under:7.1f} | "
                f"{statistics.median(ups):6.0f}, {max(ups):4.0f} | "
                f"{statistics.median(downs):6.0f}, {max(downs):4.0f}"
            )


if __name__ == "__main__":
    main()
