"""What clients see through the router while the controller works: a steady load of completions
against `skyhedge up` on the local cloud, with events injected, counted per second.

    python benchmarks/traffic_bench.py [--rate 40] [--phase 20] [--token-delay 0.005]
                                       [--scenarios kill,scaledown,hang,http500]

A load generator (open loop: `--rate` POSTs to /v1/completions per second, whatever the
latency; a third of the clients open a connection per request, a third keep it alive and reuse
it blindly (http.client), a third reopen one the server closed while idle (urllib3, httpx); no
client retries anything) runs through the whole run, and these happen in turn, `--phase` seconds apart:

  steady     nothing (3 READY replicas)
  kill       one replica's process is SIGKILLed (a preemption: `skyhedge preempt` kills so too);
             the controller launches a replacement, probes it READY and reloads nginx
  scaledown  the spec goes from 3 replicas to 2 (`skyhedge reload`): drain, then destroy
  hang       one replica is SIGSTOPped (accepts connections, never answers) for a phase
  http500    one replica answers every completion with HTTP 500 (its /health stays 200): a
             router-only run (`Router` with two local-echo replicas and that one), the
             controller cannot see it

Printed: one row per second (ok, 5xx by code, connection resets/refusals, client timeouts,
latency p50/p99 of the requests sent in that second, what happened), then totals per phase.
Every process is stopped and the temp dir removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import queue
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from _argtypes import positive  # noqa: E402
from routing_support import Fleet, free_port, make_spec, teardown_router  # noqa: E402

from skyhedge.clouds.local import runtime_dir  # noqa: E402
from skyhedge.clouds.local.processes import kill_all, read_pidfile  # noqa: E402
from skyhedge.routing import Router, Upstream  # noqa: E402
from skyhedge.state import load_state  # noqa: E402

BODY = json.dumps({"prompt": "The keeper", "max_tokens": 8}).encode()
CLIENT_TIMEOUT = 30.0
KINDS = ("new", "ka", "ka+check")


@dataclass
class Sample:
    sent: float  # time.time() the request went out
    outcome: str  # "ok", "http_502", "reset", "refused", "timeout", ...
    latency: float


@dataclass
class Load:
    """An open-loop load generator: `rate` requests a second, handed to a pool of client threads,
    half of them on a kept-alive connection. No retries: every failure is what a client saw."""

    host: str
    port: int
    rate: float
    threads: int = 48
    samples: list[Sample] = field(default_factory=list)
    _todo: queue.Queue[float | None] = field(default_factory=queue.Queue)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pool: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for n in range(self.threads):
            t = threading.Thread(target=self._client, args=(KINDS[n % 3],), daemon=True)
            t.start()
            self._pool.append(t)
        ticker = threading.Thread(target=self._tick, daemon=True)
        ticker.start()
        self._pool.append(ticker)

    def stop(self) -> None:
        self._stop.set()
        for _ in range(self.threads):
            self._todo.put(None)
        for t in self._pool:
            t.join(timeout=CLIENT_TIMEOUT + 5)

    def _tick(self) -> None:
        step = 1.0 / self.rate
        at = time.monotonic()
        while not self._stop.is_set():
            self._todo.put(time.time())
            at += step
            time.sleep(max(0.0, at - time.monotonic()))

    def _client(self, kind: str) -> None:
        """`kind`: "new" (a connection per request), "ka" (kept alive and reused blindly, as
        http.client does) or "ka+check" (kept alive, reopened when the server closed it while
        idle, as urllib3/requests and the OpenAI SDK's httpx do)."""
        conn: http.client.HTTPConnection | None = None
        while self._todo.get() is not None:
            if conn is not None and kind == "ka+check" and _dropped(conn):
                conn.close()
                conn = None
            if conn is None:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=CLIENT_TIMEOUT)
            t0 = time.time()
            headers = {"Content-Type": "application/json"}
            if kind == "new":
                headers["Connection"] = "close"
            try:
                conn.request("POST", "/v1/completions", body=BODY, headers=headers)
                resp = conn.getresponse()
                resp.read()
                outcome = "ok" if resp.status == 200 else f"http_{resp.status}"
                if kind == "new" or resp.will_close:
                    conn.close()
                    conn = None
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                outcome = f"reset[{kind}]"
            except ConnectionRefusedError:
                outcome = f"refused[{kind}]"
            except TimeoutError:
                outcome = f"timeout[{kind}]"
            except (OSError, http.client.HTTPException) as exc:
                outcome = f"{type(exc).__name__}[{kind}]"
            if outcome != "ok" and not outcome.startswith("http_") and conn is not None:
                conn.close()
                conn = None
            with self._lock:
                self.samples.append(Sample(t0, outcome, time.time() - t0))
        if conn is not None:
            conn.close()


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle kept-alive connection was closed by the server (readable at EOF)."""
    if conn.sock is None:
        return True
    readable, _, _ = select.select([conn.sock], [], [], 0)
    return bool(readable)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def report(samples: list[Sample], marks: list[tuple[float, str]], t0: float) -> None:
    """One row per second, then one per phase (from one mark to the next)."""
    by_sec: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        by_sec[int(s.sent - t0)].append(s)
    notes: dict[int, list[str]] = defaultdict(list)
    for at, what in marks:
        notes[int(at - t0)].append(what)
    print(f"{'s':>4} {'sent':>5} {'ok':>5} {'fail':>5}  {'p50ms':>7} {'p99ms':>8}  failures / events")
    for sec in range(0, max(by_sec, default=0) + 1):
        rows = by_sec.get(sec, [])
        fails = Counter(s.outcome for s in rows if s.outcome != "ok")
        lat = [s.latency * 1000 for s in rows if s.outcome == "ok"]
        what = " ".join(f"{k}={v}" for k, v in sorted(fails.items()))
        if notes.get(sec):
            what = (what + "  " if what else "") + "<- " + "; ".join(notes[sec])
        print(
            f"{sec:>4} {len(rows):>5} {len(rows) - sum(fails.values()):>5} {sum(fails.values()):>5}  "
            f"{pct(lat, 0.5):>7.1f} {pct(lat, 0.99):>8.1f}  {what}"
        )
    print()
    print(f"{'phase':<12} {'sent':>6} {'ok':>6} {'failed':>6}  {'p50ms':>7} {'p99ms':>8}  failures")
    phases = [m for m in marks if m[1].startswith("phase ")]
    for i, (start, name) in enumerate(phases[:-1]):  # the last mark ends the run
        end = phases[i + 1][0]
        rows = [s for s in samples if start <= s.sent < end]
        fails = Counter(s.outcome for s in rows if s.outcome != "ok")
        lat = [s.latency * 1000 for s in rows if s.outcome == "ok"]
        print(
            f"{name.removeprefix('phase '):<12} {len(rows):>6} {len(rows) - sum(fails.values()):>6} "
            f"{sum(fails.values()):>6}  {pct(lat, 0.5):>7.1f} {pct(lat, 0.99):>8.1f}  "
            + " ".join(f"{k}={v}" for k, v in sorted(fails.items()))
        )


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            if predicate():
                return
        time.sleep(0.1)
    raise SystemExit(f"traffic_bench.py: error: timed out waiting for {what}")


SPEC = """\
name: traffic
placement: {{clouds: [local], zones: [local-a, local-b, local-c]}}
resources: {{local_base_port: {base}}}
replica_policy: {{min_replicas: {n}, max_replicas: {n}, num_overprovision: 0, policy: spothedge}}
readiness_probe: {{path: /health, initial_delay_seconds: 30, timeout_seconds: 2}}
service: {{port: {port}}}
run:
  command: {python} {server}
  env: {{ECHO_TOKEN_DELAY: "{delay}"}}
"""


@contextlib.contextmanager
def controller(tmp: Path, delay: float) -> Iterator[tuple[Path, Path, int]]:
    """`skyhedge up --no-dashboard` on a 3-replica local service; yields (spec, state dir, port)."""
    port = free_port()
    spec_path = tmp / "service.yaml"
    fields = dict(
        base=free_port() % 20000 + 30000,
        port=port,
        python=sys.executable,
        server=REPO / "examples/local-echo/server.py",
        delay=delay,
    )
    spec_path.write_text(SPEC.format(n=3, **fields))
    sdir = tmp / "state"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = open(tmp / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen(
        [sys.executable, "-m", "skyhedge", "up", str(spec_path), "--state-dir", str(sdir), "--no-dashboard"],
        cwd=tmp,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: len(routed(sdir)) == 3, 120, "3 routed replicas")
        yield spec_path, sdir, port
    finally:
        up.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            up.wait(timeout=30)
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        log.close()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "skyhedge",
                "destroy",
                str(spec_path),
                "--state-dir",
                str(sdir),
                "--auto-approve",
            ],
            cwd=tmp,
            env=env,
            capture_output=True,
            timeout=120,
            check=False,
        )
        _router_down(spec_path, sdir)
        kill_all(runtime_dir(sdir))


def _router_down(spec_path: Path, sdir: Path) -> None:
    from skyhedge.spec import load_spec

    with contextlib.suppress(Exception):
        teardown_router(Router(load_spec(spec_path), sdir))


def routed(sdir: Path) -> list[str]:
    return [p[0] for p in load_state(sdir, "traffic").extra.get("routed") or []]


def replica_pgid(sdir: Path, rid: str) -> int:
    """The replica's process group (the launcher's shell and the server it runs)."""
    proc = read_pidfile(runtime_dir(sdir), rid)
    assert proc is not None, rid
    return proc.pgid


def history_marks(sdir: Path, since: float) -> list[tuple[float, str]]:
    out = []
    for h in load_state(sdir, "traffic").history:
        if h.get("at", 0) < since:
            continue
        if h.get("event") == "routed":
            out.append((h["at"], f"nginx reload +{h.get('added')} -{h.get('removed')}"))
        elif h.get("event") == "plan" and (h.get("create") or h.get("delete")):
            out.append((h["at"], f"plan +{h.get('create') or []} -{h.get('delete') or []}"))
    return out


def run_controller(args: argparse.Namespace, scenarios: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="skyhedge-traffic-") as tmpname:
        tmp = Path(tmpname)
        with controller(tmp, args.token_delay) as (spec_path, sdir, port):
            load = Load("127.0.0.1", port, args.rate)
            marks: list[tuple[float, str]] = []
            t0 = time.time()
            load.start()
            marks.append((time.time(), "phase steady"))
            time.sleep(args.phase)
            stopped: int | None = None
            try:
                if "kill" in scenarios:
                    victim = sorted(routed(sdir))[0]
                    marks.append((time.time(), "phase kill"))
                    os.killpg(replica_pgid(sdir, victim), signal.SIGKILL)
                    marks.append((time.time(), f"SIGKILL {victim}"))
                    wait_for(
                        lambda: len(routed(sdir)) == 3 and victim not in routed(sdir), 120, "replacement"
                    )
                    time.sleep(args.phase)
                if "scaledown" in scenarios:
                    marks.append((time.time(), "phase scaledown"))
                    text = spec_path.read_text().replace(
                        "min_replicas: 3, max_replicas: 3", "min_replicas: 2, max_replicas: 2"
                    )
                    spec_path.write_text(text)
                    wait_for(lambda: len(routed(sdir)) == 2, 60, "scale-down")
                    marks.append((time.time(), "2 routed"))
                    time.sleep(args.phase)
                if "hang" in scenarios:
                    victim = sorted(routed(sdir))[0]
                    marks.append((time.time(), "phase hang"))
                    stopped = replica_pgid(sdir, victim)
                    os.killpg(stopped, signal.SIGSTOP)
                    marks.append((time.time(), f"SIGSTOP {victim}"))
                    time.sleep(args.phase)
                    os.killpg(stopped, signal.SIGCONT)
                    stopped = None
                    marks.append((time.time(), f"SIGCONT {victim}"))
                    time.sleep(args.phase)
                marks.append((time.time(), "phase end"))
            finally:
                if stopped is not None:
                    os.killpg(stopped, signal.SIGCONT)
                load.stop()
            marks += history_marks(sdir, t0)
            marks.sort()
            report(load.samples, marks, t0)


class _Http500(BaseHTTPRequestHandler):
    """A replica whose model broke: /health says 200, every completion 500."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        self._answer(200, b'{"status": "ok"}')

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer(500, b'{"error": {"message": "CUDA error: an illegal memory access"}}')

    def _answer(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """nginx closing its idle keep-alive connections at the end is no error to print."""


def run_http500(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="skyhedge-traffic-") as tmpname:
        tmp = Path(tmpname)
        fleet = Fleet(tmp)
        port = free_port()
        router = Router(make_spec(port), tmp / "state")
        broken = _QuietServer(("127.0.0.1", 0), _Http500)
        serving = threading.Thread(target=broken.serve_forever, daemon=True)
        serving.start()
        try:
            fleet.start(2, env={"ECHO_TOKEN_DELAY": str(args.token_delay)})
            bad = Upstream("r-0003", f"http://127.0.0.1:{broken.server_address[1]}")
            router.up([*fleet.upstreams(), bad])
            load = Load("127.0.0.1", port, args.rate)
            t0 = time.time()
            marks = [(t0, "phase http500")]
            load.start()
            time.sleep(args.phase)
            marks.append((time.time(), "phase end"))
            load.stop()
            report(load.samples, marks, t0)
        finally:
            teardown_router(router)
            fleet.close()
            broken.shutdown()
            broken.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=positive, default=40, help="requests per second")
    parser.add_argument("--phase", type=positive, default=20, help="seconds per phase")
    parser.add_argument("--token-delay", type=float, default=0.005, help="replica seconds per token")
    parser.add_argument("--scenarios", default="kill,scaledown,hang,http500")
    args = parser.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - {"kill", "scaledown", "hang", "http500"}
    if unknown:
        parser.error(f"argument --scenarios: unknown {', '.join(sorted(unknown))}")
    if set(scenarios) & {"kill", "scaledown", "hang"}:
        print("== controller run: skyhedge up, local cloud, 3 replicas ==")
        run_controller(args, scenarios)
    if "http500" in scenarios:
        print("\n== router run: 2 local-echo replicas + 1 answering 500 ==")
        run_http500(args)


if __name__ == "__main__":
    main()
