"""Does a long-running watcher's Python memory grow with the replicas it has seen, or with the
catalog refreshes it has lived through? Measured with `tracemalloc` (Python's own allocations:
what a leak in skyhedge's code would be; an RSS figure mixes in the allocator's fragmentation).

`controller`: the pure Controller (`skyhedge/controller/loop.py`) over the tests' fakes
(`tests/controller_fakes.py`: fake Terraform, router, prober, event source, clock), three local
zones, 2 replicas + SpotHedge's extra one, the watcher's metrics following it. One cycle: a random
READY spot replica is preempted (a GONE event), then 8 passes 5 s apart (its replacement launched,
probed READY, routed, any on-demand cover released). After `--warmup` cycles (past the 500 gone
records kept, `GONE_KEPT`), the traced bytes are read after `--cycles` and 2 x `--cycles` more,
and printed per 1,000 cycles, with the lengths of the controller's, the state's and the metrics'
tables (which must not grow). The first mark's figure includes the tracing's own settling: the
gone records allocated before tracing began are all replaced, by traced ones, as replicas go; the
second's is the steady state. The fakes' own records of calls are cleared each cycle (they are
the test's, not the watcher's).

`catalog`: a user catalog of `--cloud` (the bundled one, its `taken_at` changed each time) rewritten
`--refreshes` times, as `skyhedge catalog refresh` does, and loaded after each, as a watcher's
renders and spec reloads do: the traced bytes kept per 1,000 refreshes.

    python benchmarks/memory_bench.py [--cycles 500] [--warmup 300] [--refreshes 1000] [--cloud local]

Measured (docs/controller.md, "What stays bounded over a long run"): see there.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from _argtypes import at_least, positive  # noqa: E402


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def controller_churn(cycles: int, warmup: int) -> None:
    from controller_fakes import THREE_ZONE_SPEC, Clock, FakeExecutor, FakeProber, FakeRouter, FakeSource

    from skyhedge.controller.loop import Controller
    from skyhedge.controller.metrics import Metrics
    from skyhedge.events import PreemptionEvent, Signal
    from skyhedge.spec import load_spec

    with tempfile.TemporaryDirectory(prefix="skyhedge-memory-") as tmp:
        spec_path = Path(tmp) / "svc.yaml"
        spec_path.write_text(THREE_ZONE_SPEC)
        clock = Clock(1_700_000_000.0)
        executor, router, source = FakeExecutor(), FakeRouter(), FakeSource()
        ctl = Controller(
            load_spec(spec_path),
            Path(tmp) / "state",
            executor=executor,
            router=router,
            prober=FakeProber(),
            sources=[source],
            clock=clock,
        )
        metrics = Metrics()  # the watcher's `--metrics-port` counters follow every pass
        metrics.watch(ctl)
        rng = random.Random(1)

        def cycle() -> None:
            ready = [r for r in ctl.state.live() if r.provisioned_at is not None and r.market == "spot"]
            if ready:
                victim = rng.choice(ready)
                source.queue.append(PreemptionEvent(Signal.GONE, clock(), "fake", replica_id=victim.id))
            for _ in range(8):
                ctl.tick()
                clock.advance(5.0)
            executor.calls.clear()
            del router.reloads[:-1]

        def tables() -> dict[str, int]:
            out = {
                f"ctl.{k}": len(v)
                for k, v in sorted(vars(ctl).items())
                if isinstance(v, (dict, list, set, frozenset)) or type(v).__name__ == "deque"
            }
            out.update(
                {
                    "state.replicas": len(ctl.state.replicas),
                    "state.history": len(ctl.state.history),
                    "state.extra (json)": len(json.dumps(ctl.state.extra)),
                    "state.policy_memory (json)": len(json.dumps(ctl.state.policy_memory)),
                    "metrics series": len(metrics._counts),
                    "metrics text": len(metrics.text()),
                }
            )
            return out

        for _ in range(warmup):
            cycle()
        tracemalloc.start()
        marks: list[tuple[int, int, dict[str, int]]] = [(_traced(), ctl.state.next_id, tables())]
        for _ in range(2):
            for _ in range(cycles):
                cycle()
            marks.append((_traced(), ctl.state.next_id, tables()))
        tracemalloc.stop()
    print(f"controller: {warmup} cycles of warm-up, then {cycles} and {cycles} more")
    for (b0, id0, _), (b1, id1, _) in zip(marks, marks[1:], strict=False):
        per = (b1 - b0) * 1000 / cycles
        print(f"  {id1 - id0:5d} replicas launched: {b1 - b0:+9d} B traced, {per:+9.0f} B per 1,000 cycles")
    grew = [k for k in marks[0][2] if marks[0][2][k] < marks[1][2][k] < marks[2][2][k]]
    print(
        "  tables:", ", ".join(f"{k} {marks[0][2][k]}/{marks[1][2][k]}/{marks[2][2][k]}" for k in marks[0][2])
    )
    print(f"  tables growing at both marks: {', '.join(grew) or 'none'}")


def catalog_refreshes(refreshes: int, cloud: str) -> None:
    from skyhedge.catalog import bundled_path, clear_cache, load_catalog

    base = json.loads(bundled_path(cloud).read_text())
    with tempfile.TemporaryDirectory(prefix="skyhedge-memory-") as tmp:
        os.environ["SKYHEDGE_CATALOG_DIR"] = tmp
        clear_cache()
        path = Path(tmp) / f"{cloud}.json"

        def refresh(i: int) -> None:
            base["taken_at"] = f"2026-01-01T00:00:00Z (refresh {i:06d})"
            path.write_text(json.dumps(base))
            stamp = 1_700_000_000_000_000_000 + i * 1_000_000_000
            os.utime(path, ns=(stamp, stamp))
            load_catalog(cloud)

        refresh(0)
        tracemalloc.start()
        before = _traced()
        for i in range(1, refreshes + 1):
            refresh(i)
        after = _traced()
        tracemalloc.stop()
        clear_cache()
    per = (after - before) * 1000 / refreshes
    print(
        f"catalog ({cloud}, {path.stat().st_size if path.exists() else len(json.dumps(base))} B file): "
        f"{refreshes} refreshes: {after - before:+d} B traced, {per:+.0f} B per 1,000 refreshes"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=positive, default=500, help="preempt/replace cycles between marks")
    ap.add_argument("--warmup", type=at_least(0), default=300, help="cycles before the first mark")
    ap.add_argument("--refreshes", type=positive, default=1000, help="catalog rewrites")
    ap.add_argument("--cloud", default="local", help="the catalog rewritten (local, aws, gcp)")
    ap.add_argument("--only", choices=("controller", "catalog"), help="run one part")
    args = ap.parse_args()
    if args.only in (None, "catalog"):
        catalog_refreshes(args.refreshes, args.cloud)
    if args.only in (None, "controller"):
        controller_churn(args.cycles, args.warmup)


if __name__ == "__main__":
    main()
