"""How fast does `skyhedge watch` react to a preemption? Local cloud, real Terraform, processes, nginx.

For N preemptions (`skyhedge preempt`'s mechanics: the zone is marked out of spot capacity and its
spot replicas are SIGKILLed) it measures, from the kill:
  (a) the decision: the controller has recorded a plan that launches the replacement;
  (b) the replacement READY: its first passing readiness probe;
  (c) routing updated: nginx reloaded with the replacement in its upstream.

    python benchmarks/reaction_bench.py [--rounds 5]

SkyServe's controller, for comparison, probes replicas every 10 s and decides every 20 s, so it
notices a preemption 0-10 s after it happens and acts on it 0-20 s later: (a) is 15 s on average
and up to 30 s there. Here a replica's exit wakes the loop through a pidfd.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _argtypes import positive  # noqa: E402

from skyhedge.clouds.local import capacity, runtime_dir  # noqa: E402
from skyhedge.clouds.local.events import preempt_zone  # noqa: E402
from skyhedge.clouds.local.processes import kill_all  # noqa: E402
from skyhedge.controller import ControllerOptions, Watcher  # noqa: E402
from skyhedge.routing import Router  # noqa: E402
from skyhedge.spec import load_spec  # noqa: E402
from skyhedge.state import load_state  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def converged(sdir: Path) -> bool:
    st = load_state(sdir, "bench")
    live = st.live()
    routed = {p[0] for p in st.extra.get("routed") or []}
    return (
        len(live) == 3
        and all(r.fact().ready and r.market == "spot" for r in live)
        and routed == {r.id for r in live}
    )


def wait(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise TimeoutError("timed out")


def one_round(sdir: Path) -> dict[str, float]:
    st = load_state(sdir, "bench")
    victim = min(st.live(), key=lambda r: r.launched_at)
    t0 = time.time()
    preempt_zone(sdir, victim.zone)
    wait(lambda: converged(sdir) and victim.id not in {r.id for r in load_state(sdir, "bench").live()})
    st = load_state(sdir, "bench")
    plan = next(h for h in st.history if h.get("event") == "plan" and h["at"] >= t0 and h.get("create"))
    new = next(rid for rid in plan["create"] if st.replicas[rid].market == "spot")
    routed = next(h for h in st.history if h.get("event") == "routed" and new in h.get("added", []))
    capacity.clear(runtime_dir(sdir), victim.zone)
    return {
        "decision": plan["at"] - t0,
        "ready": float(st.replicas[new].ready_at) - t0,
        "routed": routed["at"] - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=positive, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="skyhedge-reaction-") as tmp:
        tmpdir = Path(tmp)
        spec_path = tmpdir / "service.yaml"
        spec_path.write_text(f"""
name: bench
placement: {{clouds: [local], zones: [local-a, local-b, local-c]}}
resources: {{local_base_port: {free_port() % 20000 + 30000}}}
replica_policy: {{min_replicas: 2, num_overprovision: 1, policy: spothedge}}
readiness_probe: {{path: /health, initial_delay_seconds: 30, timeout_seconds: 2}}
service: {{port: {free_port()}}}
run: {{command: {sys.executable} {REPO / "examples/local-echo/server.py"}}}
""")
        spec = load_spec(spec_path)
        sdir = tmpdir / "state"
        options = ControllerOptions(interval=10.0, busy_interval=0.2)
        rows = []
        try:
            with Watcher(spec, sdir, options=options) as watcher:
                thread = threading.Thread(target=watcher.run, kwargs={"handle_signals": False}, daemon=True)
                thread.start()
                started = time.time()
                wait(lambda: converged(sdir), timeout=120)
                print(f"cold start to 3 READY spot replicas routed: {time.time() - started:.2f}s")
                for i in range(args.rounds):
                    time.sleep(1.0)
                    row = one_round(sdir)
                    rows.append(row)
                    print(
                        f"round {i + 1}: decision {row['decision']:.3f}s  ready {row['ready']:.3f}s  "
                        f"routed {row['routed']:.3f}s"
                    )
                watcher.stop()
                thread.join(timeout=30)
        finally:
            Router(spec, sdir).down(timeout=5)
            kill_all(runtime_dir(sdir))
    print(f"\n{'from the preemption to':<28}{'median':>10}{'max':>10}")
    for key, label in (
        ("decision", "(a) the decision"),
        ("ready", "(b) replacement READY"),
        ("routed", "(c) routing updated"),
    ):
        values = [r[key] for r in rows]
        print(f"{label:<28}{statistics.median(values):>9.3f}s{max(values):>9.3f}s")
    print(f"{'SkyServe (a), for reference':<28}{'~15':>9}s{'~30':>9}s  (10 s probe + 20 s decision loops)")


if __name__ == "__main__":
    main()
