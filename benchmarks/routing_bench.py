"""Router lifecycle and request overhead with a real nginx and local-echo replicas on 127.0.0.1.

    python3 benchmarks/routing_bench.py [--replicas 3] [--requests 2000] [--threads 4]

Printed (median of repeats where it makes sense):

  up          Router.up from nothing until /-/health answers
  reload      a reload that changes the upstreams (nginx -t + swap + SIGHUP + new workers seen)
  noop        a reload with nothing to change (skipped: no worker churn)
  drain       drain with no request in flight (reload + old workers gone)
  down        graceful quit until the master is gone
  req/s       completions (max_tokens=4) from N threads over keep-alive connections, direct to
              one replica vs. through the router to all replicas; and the per-request latency

Every process is stopped and the temp dir removed at the end.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _argtypes import positive  # noqa: E402
from routing_support import Fleet, complete, free_port, make_spec, teardown_router  # noqa: E402

from skyhedge.routing import Router  # noqa: E402


def timed(fn, repeats: int = 1) -> float:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def load(endpoint: str, total: int, threads: int) -> tuple[float, float]:
    """(requests per second, median latency in ms) for `total` completions from `threads` clients."""
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        host, port = endpoint.removeprefix("http://").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        mine = []
        for _ in range(n):
            t0 = time.perf_counter()
            resp = complete(endpoint, conn=conn)
            assert resp.status == 200, resp
            mine.append(time.perf_counter() - t0)
        conn.close()
        with lock:
            latencies.extend(mine)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(total // threads,)) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    return len(latencies) / elapsed, statistics.median(latencies) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=positive, default=3)
    ap.add_argument("--requests", type=positive, default=2000)
    ap.add_argument("--threads", type=positive, default=4)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="routing-bench-"))
    fleet = Fleet(tmp)
    router = Router(make_spec(free_port()), tmp / "state")
    try:
        replicas = fleet.start(args.replicas)
        ups = [r.upstream for r in replicas]
        fewer = ups[:-1] if len(ups) > 1 else ups
        print(f"up        {timed(lambda: router.up(ups)) * 1000:8.1f} ms")
        flip = iter(range(1000))
        print(
            f"reload    {timed(lambda: router.reload(ups if next(flip) % 2 else fewer), 10) * 1000:8.1f} ms"
        )
        router.reload(ups)
        print(f"noop      {timed(lambda: router.reload(ups), 10) * 1000:8.1f} ms")
        flip2 = iter(range(1000))
        drain = timed(lambda: router.drain(fewer if next(flip2) % 2 == 0 else ups), 10)
        print(f"drain     {drain * 1000:8.1f} ms")
        router.reload(ups)
        rps, lat = load(replicas[0].endpoint, args.requests, args.threads)
        print(f"direct    {rps:8.0f} req/s  {lat:6.2f} ms median  (one replica, {args.threads} threads)")
        rps, lat = load(router.endpoint, args.requests, args.threads)
        print(
            f"router    {rps:8.0f} req/s  {lat:6.2f} ms median  ({len(ups)} replicas, {args.threads} threads)"
        )
        print(f"down      {timed(router.down) * 1000:8.1f} ms")
    finally:
        teardown_router(router)
        fleet.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
