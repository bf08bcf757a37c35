"""What a spec load costs the watcher, which loads its spec at every pass: `load_spec` of a small
spec, N times, with the policy plug-ins' entry points read at every load (as before they were
kept per process) and kept (`skyhedge._entry_points.declared`), and what a plug-in installed
mid-run costs the first load after it.

    python benchmarks/spec_load_bench.py [--repeats 200]

The figures depend on how many distributions the interpreter has installed (each one's
`entry_points.txt` is read by a scan); the script prints that count with them.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _argtypes import positive  # noqa: E402

from skyhedge import _entry_points  # noqa: E402
from skyhedge.spec import load_spec  # noqa: E402

SPEC = """\
name: bench
placement: {clouds: [local], zones: [local-a, local-b]}
replica_policy: {min_replicas: 2, policy: skyhedge}
run: {command: "true"}
"""


def timed(run: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median and 90th percentile, in ms."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spec_load_bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive, default=200, help="loads per figure (default 200)")
    args = parser.parse_args(argv)
    from importlib.metadata import distributions

    tmp = Path(tempfile.mkdtemp(prefix="spec-load-bench."))
    try:
        spec = tmp / "service.yaml"
        spec.write_text(SPEC)
        load_spec(spec)  # imports
        dists = sum(1 for _ in distributions())
        print(f"{dists} distributions on the path; {args.repeats} loads each")

        def uncached() -> None:
            _entry_points.forget_declared()
            load_spec(spec)

        for label, run in (
            ("entry points read every load", uncached),
            ("entry points kept", lambda: load_spec(spec)),
        ):
            median, p90 = timed(run, args.repeats)
            print(f"  load_spec, {label}: median {median:.2f} ms, p90 {p90:.2f} ms")
        # a plug-in "installed" mid-run: a new *.dist-info folder in a folder on the path
        site = tmp / "site"
        site.mkdir()
        sys.path.insert(0, str(site))
        load_spec(spec)
        info = site / "bench_plugin-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bench-plugin\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text("[skyhedge.policies]\nbench-greedy = bench_plugin:Greedy\n")
        start = time.perf_counter()
        load_spec(spec)
        first = (time.perf_counter() - start) * 1000
        (tmp / "named.yaml").write_text(SPEC.replace("policy: skyhedge", "policy: bench-greedy"))
        found = load_spec(tmp / "named.yaml").replica_policy.policy == "bench-greedy"
        print(f"  first load after a plug-in is installed: {first:.2f} ms; its policy name accepted: {found}")
        sys.path.remove(str(site))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
