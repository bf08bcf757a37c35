"""How long one round of readiness probes takes when some replicas hang: the watcher's round
(`HttpProber`, every pass) and `apply`'s wait for READY (`wait_ready`, one round per loop).

A replica that hangs (a VM still booting, whose address drops the connection; a stopped or
wedged server; a black-holed region) costs its probe the whole `readiness_probe.timeout_seconds`.
Probes run concurrently so that this costs a round one timeout, not one per hung replica; a round
with more hung replicas than probes running at once costs a timeout per batch. Healthy replicas
are served by one HTTP server on 127.0.0.1, hung ones by a listener on 127.0.0.1 that never
accepts (each replica its own path, so each its own endpoint). Prints figures; asserts nothing.

    python benchmarks/probe_bench.py [--replicas 50,200] [--hung 0,10,40,200] [--timeout 2]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _argtypes import counts_of_at_least  # noqa: E402

from skyhedge.apply import wait_ready  # noqa: E402
from skyhedge.controller.adapters import HttpProber  # noqa: E402
from skyhedge.spec import load_spec  # noqa: E402
from skyhedge.state import ReplicaRecord, ServiceState  # noqa: E402

SPEC = """\
name: bench
placement: {clouds: [local]}
replica_policy: {min_replicas: 1}
readiness_probe: {path: /health, timeout_seconds: TIMEOUT, initial_delay_seconds: 3600}
run: {command: "true"}
"""


class Server(ThreadingHTTPServer):
    request_queue_size = 1024  # (5 by default: concurrent probes beyond it wait for a SYN retry, 1 s)
    daemon_threads = True


class Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


def timeout(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of seconds, got {text!r}") from None
    if not 1 <= value <= 60:
        raise argparse.ArgumentTypeError(f"expected 1 to 60 seconds, got {value}")
    return value


def records(healthy_port: int, hung_port: int, total: int, hung: int) -> list[ReplicaRecord]:
    out = []
    for i in range(total):
        port = hung_port if i < hung else healthy_port
        out.append(
            ReplicaRecord(
                id=f"r-{i + 1:04d}",
                cloud="local",
                region="local",
                zone="local-a",
                market="spot",
                launched_at=0.0,
                endpoint=f"http://127.0.0.1:{port}/r{i + 1}",
            )
        )
    return out


def peak_threads(fn) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """(seconds `fn()` took, most threads alive meanwhile)."""
    peak = [threading.active_count()]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], threading.active_count())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.perf_counter()
    try:
        fn()
    finally:
        took = time.perf_counter() - started
        done.set()
        watcher.join()
    return took, peak[0] - 1  # (not the watcher)


def main() -> None:
    ap = argparse.ArgumentParser(prog="probe_bench.py", description=__doc__.splitlines()[0])
    counts = counts_of_at_least(0)
    ap.add_argument("--replicas", type=counts, default=[50, 200], help="replica counts (50,200)")
    ap.add_argument("--hung", type=counts, default=[0, 10, 40, 200], help="hung replica counts (0,10,40,200)")
    ap.add_argument("--timeout", type=timeout, default=2, help="readiness_probe.timeout_seconds (2)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="probe-bench-"))
    server = Server(("127.0.0.1", 0), Healthy)
    hung = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        hung.bind(("127.0.0.1", 0))
        hung.listen(4096)  # never accepts: a connection waits in the backlog, or its SYN is dropped
        spec_path = tmp / "bench.yaml"
        spec_path.write_text(SPEC.replace("TIMEOUT", str(args.timeout)), encoding="utf-8")
        spec = load_spec(spec_path)
        prober = HttpProber(spec)
        print(f"readiness_probe.timeout_seconds: {args.timeout}")
        for total in args.replicas:
            for stuck in args.hung:
                if stuck > total:
                    continue
                recs = records(server.server_address[1], hung.getsockname()[1], total, stuck)
                took, threads = peak_threads(lambda recs=recs: prober.probe(recs))
                state = ServiceState(service="bench", replicas={r.id: r for r in recs})
                # one loop of apply's wait: the timeout ends it after its first round
                waited, _ = peak_threads(lambda state=state: wait_ready(spec, state, timeout=0.0))
                print(
                    f"  {total:4d} replicas, {stuck:4d} hung: watcher's probe round {took:6.2f} s "
                    f"({took / args.timeout:4.1f} timeouts, {threads} threads); "
                    f"apply's wait round {waited:6.2f} s ({waited / args.timeout:4.1f} timeouts)"
                )
    finally:
        server.shutdown()
        server.server_close()
        hung.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
