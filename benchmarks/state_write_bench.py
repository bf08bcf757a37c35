"""What an idle `skyhedge watch` pass writes: state.json writes, bytes and fsyncs, and the pass's time.

A settled service (3 spot replicas READY, routed, the default `skyhedge` policy, autoscaling on)
is run for N idle passes, 10 s apart on a fake clock (the default `--interval`): no event, no
probe change, no request. Twice: with a small state, and with the state at its cap of
`GONE_KEPT` gone records (`ServiceState.prune_gone`), where state.json is largest. The executor,
router and prober are in-memory fakes, so the figures are the controller's own (the state dir
is a temp dir on the machine's disk: the fsyncs are real).

    python benchmarks/state_write_bench.py [--passes 200] [--load]

`--load`: the router's request counter climbs every pass (constant traffic, the autoscaler's
rate moving), instead of standing still.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _argtypes import positive  # noqa: E402

import skyhedge.state as state_module  # noqa: E402
from skyhedge.controller.loop import Controller  # noqa: E402
from skyhedge.controller.ports import ExecResult, root_key  # noqa: E402
from skyhedge.planner import DELETE, Plan  # noqa: E402
from skyhedge.spec import load_spec, replica_revision  # noqa: E402
from skyhedge.state import GONE_KEPT, STATE_FILE, ReplicaRecord, ServiceState  # noqa: E402

SPEC = """\
name: bench
placement:
  clouds: [local]
  zones: [local-a, local-b, local-c]
replica_policy:
  min_replicas: 3
  max_replicas: 6
  target_qps_per_replica: 10
readiness_probe: {path: /health, initial_delay_seconds: 30}
run: {command: "true"}
"""


class Executor:
    """Terraform as a dict: what the plan launches is provisioned at once."""

    def __init__(self) -> None:
        self.tf: dict[str, set[str]] = {}
        self.applies = 0

    def apply(self, state: ServiceState, plan: Plan, now: float) -> ExecResult:
        self.applies += 1
        applied = set()
        for r in plan.replicas:
            key = root_key(r.root)
            applied.add(key)
            held = self.tf.setdefault(key, set())
            rec = state.replicas[r.id]
            if r.action == DELETE:
                held.discard(r.id)
                if rec.gone_at is None:
                    rec.gone_at, rec.reason, rec.draining = now, "terminated", False
            elif r.id not in held:
                held.add(r.id)
                port = 18000 + int(r.id.split("-")[1])
                rec.endpoint = f"http://127.0.0.1:{port}"
                rec.cloud_id = f"pid-{port}"
                rec.outputs = {"endpoint": rec.endpoint, "port": port, "pid": port}
                rec.provisioned_at = now
        return ExecResult(applied=tuple(sorted(applied)))


class Router:
    def __init__(self) -> None:
        self.count = 0
        self.up = False

    def reload(self, upstreams: Sequence[tuple[str, str]]) -> dict[str, Any]:
        self.up = True
        return {"endpoint": "http://127.0.0.1:8080", "upstreams": [{"id": rid} for rid, _ in upstreams]}

    def drain(self, upstreams: Sequence[tuple[str, str]]) -> dict[str, Any]:
        return self.reload(upstreams)

    def running(self) -> bool:
        return self.up

    def request_count(self) -> int | None:
        return self.count


class Prober:
    def probe(self, records: Sequence[ReplicaRecord]) -> dict[str, tuple[bool, str]]:
        return {r.id: (True, "200") for r in records}


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Counted:
    """Counts state.json writes (and their bytes) and fsyncs while installed."""

    def __init__(self) -> None:
        self.writes = self.bytes = self.fsyncs = 0
        self._write = state_module.atomic_write_text
        self._fsync = os.fsync

    def __enter__(self) -> Counted:
        def write(path: Path, text: str) -> None:
            if path.name == STATE_FILE:
                self.writes += 1
                self.bytes += len(text.encode("utf-8"))
            self._write(path, text)

        def fsync(fd: int) -> None:
            self.fsyncs += 1
            self._fsync(fd)

        state_module.atomic_write_text = write  # type: ignore[assignment]
        os.fsync = fsync  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        state_module.atomic_write_text = self._write  # type: ignore[assignment]
        os.fsync = self._fsync  # type: ignore[assignment]


def add_gone(ctl: Controller, count: int) -> None:
    """`count` gone records, as a churny spot fleet leaves them (at most GONE_KEPT are kept)."""
    spec = ctl.spec
    now = ctl.clock()
    for n in range(count):
        rid = f"r-{1000 + n:04d}"
        port = 19000 + n
        ctl.state.replicas[rid] = ReplicaRecord(
            id=rid,
            cloud="local",
            region="local",
            zone=("local-a", "local-b", "local-c")[n % 3],
            market="spot",
            instance_type="local",
            launched_at=now - 86400 + n * 60,
            provisioned_at=now - 86400 + n * 60 + 2,
            ready_at=now - 86400 + n * 60 + 30,
            gone_at=now - 86400 + n * 60 + 50,
            reason="preempted",
            endpoint=f"http://127.0.0.1:{port}",
            cloud_id=f"pid-{port}",
            outputs={"endpoint": f"http://127.0.0.1:{port}", "port": port, "pid": port},
            revision=replica_revision(spec, "local"),
        )
    ctl.state.next_id = max(ctl.state.next_id, 1000 + count)


def run(spec_path: Path, gone: int, passes: int, load: bool) -> dict[str, float]:
    sdir = Path(tempfile.mkdtemp(prefix="skyhedge-state-bench-"))
    try:
        clock, router, executor = Clock(), Router(), Executor()
        spec = load_spec(spec_path)
        ctl = Controller(spec, sdir, executor=executor, router=router, prober=Prober(), clock=clock)
        for step in [1.0] * 40 + [10.0] * 60:  # launch, READY, routed; the policy's on-demand cover released
            ctl.tick()
            clock.now += step
        live = ctl.state.live()
        assert len(live) == 3 and all(r.fact().ready and r.market == "spot" for r in live), live
        add_gone(ctl, gone)
        ctl.save()
        for _ in range(5):  # settle anything the added records stirred
            ctl.tick()
            clock.now += 10
        size = (sdir / STATE_FILE).stat().st_size
        times = []
        applies = executor.applies
        with Counted() as counted:
            for _ in range(passes):
                if load:
                    router.count += 137
                t0 = time.perf_counter()
                ctl.tick()
                times.append(time.perf_counter() - t0)
                clock.now += 10
        assert executor.applies == applies, "the measured passes were not idle (an apply ran)"
        return {
            "size": size,
            "writes": counted.writes,
            "bytes": counted.bytes,
            "fsyncs": counted.fsyncs,
            "median_ms": statistics.median(times) * 1e3,
            "mean_ms": statistics.fmean(times) * 1e3,
        }
    finally:
        shutil.rmtree(sdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="state_write_bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=positive, default=200, help="idle passes per state size (200)")
    parser.add_argument("--load", action="store_true", help="a request counter that climbs every pass")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="skyhedge-state-bench-spec-") as tmp:
        spec_path = Path(tmp) / "bench.yaml"
        spec_path.write_text(SPEC, encoding="utf-8")
        what = "passes under constant load" if args.load else "idle passes"
        print(f"{args.passes} {what}, 10 s apart (fake clock), default policy, autoscaling on:")
        sizes = (("small state (3 live)", 0), (f"at the cap (3 live + {GONE_KEPT} gone)", GONE_KEPT))
        for label, gone in sizes:
            r = run(spec_path, gone, args.passes, args.load)
            per_day = r["bytes"] / args.passes * 8640 / 1e9  # 8640 passes a day at 10 s
            print(
                f"  {label}: state.json {r['size'] / 1000:.1f} kB; "
                f"{r['writes']} writes ({r['writes'] / args.passes:.2f}/pass), "
                f"{r['bytes'] / 1e6:.2f} MB ({r['bytes'] / args.passes / 1000:.1f} kB/pass, "
                f"{per_day:.2f} GB/day at 10 s), {r['fsyncs']} fsyncs; "
                f"pass median {r['median_ms']:.1f} ms, mean {r['mean_ms']:.1f} ms"
            )


if __name__ == "__main__":
    main()
