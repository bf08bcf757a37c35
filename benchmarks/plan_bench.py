"""Planning speed: one policy+planner step for 1,000 replicas over 300 zones, and the wall time of
the whole `skyhedge plan` command on the multicloud example. Prints figures; asserts nothing.

    python3 benchmarks/plan_bench.py [--policy spothedge] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _argtypes import positive

from skyhedge.planner import make_plan
from skyhedge.policy import Candidate, Location, Market, Observation, PolicyConfig, ReplicaFact, make_policy

REPO = Path(__file__).resolve().parents[1]


def synthetic(n_zones: int, n_replicas: int) -> Observation:
    cands = tuple(
        Candidate(
            Location("aws", f"region-{i // 3}", f"region-{i // 3}{'abc'[i % 3]}"), 1.0 + (i % 17) / 10, 4.0
        )
        for i in range(n_zones)
    )
    # Most replicas already running and ready, spread round robin; some missing (preempted).
    replicas = tuple(
        ReplicaFact(f"r-{i + 1:04d}", cands[i % n_zones].location, Market.SPOT, 0.0, 1.0, 2.0)
        for i in range(int(n_replicas * 0.9))
    )
    return Observation(now=100.0, target=n_replicas, candidates=cands, replicas=replicas)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default="spothedge")
    ap.add_argument("--repeats", type=positive, default=20)
    args = ap.parse_args()
    obs = synthetic(300, 1000)
    prices = {
        (c.location, m): c.spot_price if m is Market.SPOT else c.ondemand_price
        for c in obs.candidates
        for m in Market
    }
    times = []
    for _ in range(args.repeats):
        policy = make_policy(args.policy, PolicyConfig())
        t0 = time.perf_counter()
        decisions = policy.decide(obs)
        plan = make_plan(
            service="bench",
            target=obs.target,
            policy=args.policy,
            current=obs.replicas,
            decisions=decisions,
            next_id=1,
            prices=prices,
            ondemand_price=4.0,
        )
        times.append(time.perf_counter() - t0)
    print(
        f"planning step ({args.policy}, 1000 replicas, 300 zones): "
        f"median {statistics.median(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms "
        f"({len(plan.changes)} changes)"
    )
    walls = []
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "skyhedge.cli",
                "plan",
                str(REPO / "examples/llm-multicloud/service.yaml"),
                "--state-dir",
                "/tmp/skyhedge-plan-bench",
                "--json",
            ],
            check=True,
            capture_output=True,
            cwd=REPO,
        )
        walls.append(time.perf_counter() - t0)
    print(
        f"`skyhedge plan examples/llm-multicloud/service.yaml --json` wall time: "
        f"median {statistics.median(walls):.2f} s, min {min(walls):.2f} s"
    )


if __name__ == "__main__":
    main()
