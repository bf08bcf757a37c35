"""skyhedge at a platform team's scale: hundreds to thousands of replicas over tens to hundreds of
zones. Prints figures; asserts nothing.

1. The policies' `decide` (spothedge, skyhedge) over Z zones (three per region) and R READY spot
   replicas spread over them: a steady pass (target R) and a scale-down to R / 10, which releases
   nine replicas in ten (skyhedge ranks the zones for each one it releases).
2. The watcher's pass (`Controller.tick`, the local cloud with Z zones, the default policy; the
   executor, router and prober are in-memory fakes, so the figures are the controller's own, and
   the state dir is a temp dir on this disk): the first pass (launches R + 1 spot replicas), the
   pass after the zone holding most replicas is preempted and the one after it (every replacement
   READY), the median idle pass, and state.json's size and write time with the GONE_KEPT gone
   records the churn leaves.

    python benchmarks/scale_bench.py [--replicas 200,1000] [--zones 30,300] [--watch-zones 50]
        [--passes 20] [--no-watcher]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _argtypes import counts_of_at_least, positive  # noqa: E402

from skyhedge.policy import (  # noqa: E402
    Candidate,
    Location,
    Market,
    Observation,
    PolicyConfig,
    ReplicaFact,
    make_policy,
)

SPEC = """\
name: scale
placement: {clouds: [local]}
resources: {local_base_port: 20000}
replica_policy: {min_replicas: REPLICAS, num_overprovision: 1}
readiness_probe: {path: /health, initial_delay_seconds: 30}
service: {port: 19990}
run: {command: "true"}
"""


def fleet(zones: int, replicas: int) -> tuple[tuple[Candidate, ...], tuple[ReplicaFact, ...]]:
    """`zones` zones, three per region, and `replicas` READY spot replicas spread over them."""
    where = [Location("aws", f"region-{i // 3}", f"region-{i // 3}{'abc'[i % 3]}") for i in range(zones)]
    cands = tuple(Candidate(loc, 1.0 + (i % 7) / 10, 4.0) for i, loc in enumerate(where))
    facts = tuple(
        ReplicaFact(f"r-{i + 1:05d}", cands[i % zones].location, Market.SPOT, 60.0, 90.0, 120.0)
        for i in range(replicas)
    )
    return cands, facts


def decide_ms(policy_name: str, zones: int, replicas: int, target: int) -> tuple[float, int]:
    """(ms of one decision, decisions made), the policy having started an hour earlier."""
    cands, facts = fleet(zones, replicas)
    policy = make_policy(policy_name, PolicyConfig())
    policy.decide(Observation(now=0.0, target=replicas, candidates=cands))
    obs = Observation(now=20 * 3600.0, target=target, candidates=cands, replicas=facts)
    started = time.perf_counter()
    decisions = policy.decide(obs)
    return (time.perf_counter() - started) * 1e3, len(decisions)


def policies(replica_counts: list[int], zone_counts: list[int]) -> None:
    print("policy decide (one pass, the policy started 20 h earlier; ms):")
    for name in ("spothedge", "skyhedge"):
        for zones in zone_counts:
            for replicas in replica_counts:
                steady, _ = decide_ms(name, zones, replicas, replicas)
                down, released = decide_ms(name, zones, replicas, max(1, replicas // 10))
                print(
                    f"  {name:9s} {zones:4d} zones, {replicas:5d} replicas: steady {steady:8.1f} ms; "
                    f"scale-down to {max(1, replicas // 10)} {down:8.1f} ms ({released} decisions)"
                )


def watcher(replicas: int, zones: int, passes: int) -> None:
    """The watcher's passes at `replicas` over `zones` local zones (see the module docstring)."""
    tmp = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    saved = os.environ.get("SKYHEDGE_CATALOG_DIR")
    try:
        catalog = json.loads((REPO / "skyhedge/catalog/data/local.json").read_text(encoding="utf-8"))
        catalog["offers"] = [
            {
                "instance_type": "local",
                "region": "local",
                "zone": f"local-z{i:03d}",
                "ondemand_price": 0.3,
                "spot_price": 0.1 + (i % 7) / 100,
            }
            for i in range(zones)
        ]
        (tmp / "catalog").mkdir()
        (tmp / "catalog/local.json").write_text(json.dumps(catalog), encoding="utf-8")
        os.environ["SKYHEDGE_CATALOG_DIR"] = str(tmp / "catalog")
        from state_write_bench import Clock, Executor, Prober, Router

        import skyhedge.state as state_module
        from skyhedge.controller.loop import Controller
        from skyhedge.events import EventSource, PreemptionEvent, Signal
        from skyhedge.spec import load_spec

        class Preempt(EventSource):
            name = "bench"

            def __init__(self) -> None:
                self.zone: str | None = None

            def poll(self, now, live):  # type: ignore[no-untyped-def]
                zone, self.zone = self.zone, None
                gone = [r for r in live if r.zone == zone]
                return [PreemptionEvent(Signal.GONE, now, "bench", replica_id=r.id) for r in gone]

        spec_path = tmp / "scale.yaml"
        spec_path.write_text(SPEC.replace("REPLICAS", str(replicas)), encoding="utf-8")
        clock, source = Clock(), Preempt()
        ctl = Controller(
            load_spec(spec_path),
            tmp / "state",
            executor=Executor(),
            router=Router(),
            prober=Prober(),
            clock=clock,
            sources=[source],
        )

        def tick() -> float:
            started = time.perf_counter()
            ctl.tick()
            took = time.perf_counter() - started
            clock.now += 10
            return took * 1e3

        first = tick()
        for _ in range(30):  # READY, routed, on-demand cover released
            tick()
        churn: list[float] = []
        worst = (0.0, 0.0, 0)
        for _ in range(3):  # preempt the zone holding most, three times: gone records pile up
            held: dict[str, int] = {}
            for rec in ctl.state.live():
                held[rec.zone] = held.get(rec.zone, 0) + 1
            zone = max(held, key=held.__getitem__)
            source.zone = zone
            hit, after = tick(), tick()
            if hit + after > worst[0] + worst[1]:
                worst = (hit, after, held[zone])
            churn += [tick() for _ in range(3)]
        idle = [tick() for _ in range(passes)]
        size = (tmp / "state" / state_module.STATE_FILE).stat().st_size
        started = time.perf_counter()
        state_module.save_state(tmp / "state", ctl.state)
        save = (time.perf_counter() - started) * 1e3
        gone = sum(1 for r in ctl.state.replicas.values() if r.gone_at is not None)
        print(
            f"  {replicas:5d} replicas, {zones} zones: first pass {first:6.0f} ms; zone of {worst[2]} "
            f"preempted: {worst[0]:6.0f} ms, next {worst[1]:6.0f} ms; idle pass median "
            f"{statistics.median(idle):5.0f} ms; state.json {size / 1e6:.2f} MB "
            f"({len(ctl.state.live())} live, {gone} gone), written in {save:4.0f} ms"
        )
    finally:
        if saved is None:
            os.environ.pop("SKYHEDGE_CATALOG_DIR", None)
        else:
            os.environ["SKYHEDGE_CATALOG_DIR"] = saved
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(prog="scale_bench.py", description=__doc__.splitlines()[0])
    counts = counts_of_at_least(1)
    ap.add_argument("--replicas", type=counts, default=[200, 1000], help="replica counts (200,1000)")
    ap.add_argument("--zones", type=counts, default=[30, 300], help="zone counts for the policies (30,300)")
    ap.add_argument("--watch-zones", type=positive, default=50, help="local zones for the watcher (50)")
    ap.add_argument("--passes", type=positive, default=20, help="idle watcher passes measured (20)")
    ap.add_argument("--no-watcher", action="store_true", help="the policies only")
    args = ap.parse_args()
    policies(args.replicas, args.zones)
    if not args.no_watcher:
        print("watcher passes (in-memory executor, router and prober; default policy):")
        for replicas in args.replicas:
            watcher(replicas, args.watch_zones, args.passes)


if __name__ == "__main__":
    main()
