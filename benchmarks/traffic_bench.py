"""What clients see through the router while the controller works: a steady load of completions
against `skyhedge up` on the local cloud, with events injected, counted per second.

    python benchmarks/traffic_bench.py [--rate 40] [--phase 20] [--token-delay 0.005]
                                       [--scenarios kill,vanish,scaledown,hang,http500,rollout,ramp]
                                       [--client-timeout 30] [--keep-log FILE] [--target-qps 10]
                                       [--upscale-delay 10] [--downscale-delay 30] [--ramp-hold 60]
                                       [--near-hold 300]

A load generator (open loop: `--rate` POSTs to /v1/completions per second, whatever the
latency; a third of the clients open a connection per request, a third keep it alive and reuse
it blindly (http.client), a third reopen one the server closed while idle (urllib3, httpx); no
client retries anything) runs through the whole run, and these happen in turn, `--phase` seconds apart:

  steady     nothing (3 READY replicas)
  kill       one replica's process is SIGKILLed (a preemption: `skyhedge preempt` kills so too);
             the controller launches a replacement, probes it READY and reloads nginx
  vanish     the same, but as a cloud VM vanishes: its connections are neither answered nor
             reset (the killed process's sockets are kept open by this script); requests in
             flight on it waited for service.router.read_timeout before the watcher cut them
  scaledown  the spec goes from 3 replicas to 2 (`skyhedge reload`): drain, then destroy
  hang       one replica is SIGSTOPped (accepts connections, never answers) for a phase
  http500    one replica answers every completion with HTTP 500 (its /health stays 200): a
             router-only run (`Router` with two local-echo replicas and that one), the
             controller cannot see it
  rollout    (only when named) `skyhedge up` on a copy of examples/local-echo (its own ports),
             the spec edited under the load: run.env (every replica rolls over), min_replicas
             2 -> 3 -> 2, an invalid edit (refused), load_balancing_policy (an nginx reload), a
             run.command that never listens for a minute, then reverted; prints how long each
             took and the lowest READY count `skyhedge status --json` showed per phase
  ramp       (only when named) `skyhedge up --metrics-port` of an autoscaled local service (1-3
             replicas, `--target-qps` per replica, Poisson arrivals): 0.5x the target rate,
             a step to 2.5x, an nginx reload and a watcher restart under it, 2.0x (right at a
             threshold) for `--near-hold` seconds, a drop to 0.5x, then target_qps_per_replica
             divided by 5 and max_replicas 3 -> 2 edited; prints how long each move took (from
             /metrics, scraped twice a second), the targets seen, and the watcher's autoscaler lines

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
import random
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from _argtypes import at_least, positive  # noqa: E402
from _ports import free_port_below  # noqa: E402
from routing_support import (  # noqa: E402
    Fleet,
    free_port,
    make_spec,
    replica_answering_500,
    teardown_router,
)

from skyhedge.clouds.local import runtime_dir  # noqa: E402
from skyhedge.clouds.local.processes import kill_all, read_pidfile  # noqa: E402
from skyhedge.routing import Router, nginx  # noqa: E402
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
    timeout: float = CLIENT_TIMEOUT
    poisson: bool = False  # arrivals at random (exponential gaps), as independent clients make them
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
            t.join(timeout=self.timeout + 5)

    def _tick(self) -> None:
        at = time.monotonic()
        rnd = random.Random(7)
        while not self._stop.is_set():
            self._todo.put(time.time())
            # `rate` is read each time: the ramp scenario changes it under way
            at += rnd.expovariate(self.rate) if self.poisson else 1.0 / self.rate
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
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
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
    print(
        f"{'phase':<12} {'sent':>6} {'ok':>6} {'failed':>6}  {'p50ms':>7} {'p99ms':>8} {'max s':>6}  failures"
    )
    phases = [m for m in marks if m[1].startswith("phase ")]
    for i, (start, name) in enumerate(phases[:-1]):  # the last mark ends the run
        end = phases[i + 1][0]
        rows = [s for s in samples if start <= s.sent < end]
        fails = Counter(s.outcome for s in rows if s.outcome != "ok")
        lat = [s.latency * 1000 for s in rows if s.outcome == "ok"]
        print(
            f"{name.removeprefix('phase '):<12} {len(rows):>6} {len(rows) - sum(fails.values()):>6} "
            f"{sum(fails.values()):>6}  {pct(lat, 0.5):>7.1f} {pct(lat, 0.99):>8.1f} "
            f"{max((s.latency for s in rows), default=float('nan')):>6.1f}  "
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


def stop_and_destroy(
    up: subprocess.Popen,
    log: Any,
    spec_path: Path,
    sdir: Path,
    tmp: Path,
    env: dict[str, str],
    *,
    wait: float,
    destroy_timeout: float,
) -> None:
    """Stop `up` as a Ctrl-C does (SIGKILL to its group if it outlasts `wait`), then destroy
    what it left, so a run leaves no replica or nginx behind."""
    up.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        up.wait(timeout=wait)
    if up.poll() is None:
        os.killpg(up.pid, signal.SIGKILL)
        up.wait()
    log.close()
    argv = [sys.executable, "-m", "skyhedge", "destroy", str(spec_path), "--state-dir", str(sdir)]
    subprocess.run(
        [*argv, "--auto-approve"], cwd=tmp, env=env, capture_output=True, timeout=destroy_timeout, check=False
    )


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
        stop_and_destroy(up, log, spec_path, sdir, tmp, env, wait=30, destroy_timeout=120)
        _router_down(spec_path, sdir)
        kill_all(runtime_dir(sdir))


def _router_down(spec_path: Path, sdir: Path) -> None:
    from skyhedge.spec import load_spec

    with contextlib.suppress(Exception):
        teardown_router(Router(load_spec(spec_path), sdir))


def routed(sdir: Path, name: str = "traffic") -> list[str]:
    return [p[0] for p in load_state(sdir, name).extra.get("routed") or []]


def replica_pgid(sdir: Path, rid: str) -> int:
    """The replica's process group (the launcher's shell and the server it runs)."""
    proc = read_pidfile(runtime_dir(sdir), rid)
    assert proc is not None, rid
    return proc.pgid


def vanish(pgid: int) -> list[int]:
    """A replica's VM vanishes, as a spot VM preempted does: its connections are neither answered
    nor reset. Its processes are stopped, this process takes a copy of every connected socket
    they hold (`borrow_fd`), then they are killed (what the local cloud's preemption does, and
    how the controller hears of it): the kernel resets nothing while the copies stay open.
    Returns the copies; closing them ends the connections."""
    os.killpg(pgid, signal.SIGSTOP)
    held: list[int] = []
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    for pid in pids:
        fields = nginx.stat_fields(pid)
        if fields is None or int(fields[2]) != pgid:
            continue
        peers = nginx.tcp_peers(pid)
        for inode, fd in nginx.socket_fds(pid).items():
            if inode in peers:
                with contextlib.suppress(OSError):
                    held.append(nginx.borrow_fd(pid, fd))
    os.killpg(pgid, signal.SIGKILL)
    return held


def history_marks(sdir: Path, since: float, name: str = "traffic") -> list[tuple[float, str]]:
    out = []
    for h in load_state(sdir, name).history:
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
            load = Load("127.0.0.1", port, args.rate, timeout=args.client_timeout)
            marks: list[tuple[float, str]] = []
            t0 = time.time()
            load.start()
            marks.append((time.time(), "phase steady"))
            time.sleep(args.phase)
            stopped: int | None = None
            held: list[int] = []
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
                if "vanish" in scenarios:
                    victim = sorted(routed(sdir))[0]
                    marks.append((time.time(), "phase vanish"))
                    held = vanish(replica_pgid(sdir, victim))  # open until the run ends
                    marks.append((time.time(), f"{victim} vanished ({len(held)} connections left open)"))
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
                for fd in held:
                    os.close(fd)
            marks += history_marks(sdir, t0)
            marks.sort()
            report(load.samples, marks, t0)


# ---- the rollout scenario: spec changes under traffic, on the local-echo example ----------------


class _Poller:
    """A daemon thread running `_poll` until `stop` (the pollers below; as dataclass mixin)."""

    _stop: threading.Event
    _thread: threading.Thread | None
    join_timeout = 30.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.join_timeout)

    def _poll(self) -> None:
        raise NotImplementedError


@dataclass
class StatusPoller(_Poller):
    """Polls `skyhedge status --json` once a second (what an operator's script would see): READY
    replicas and live IDs over time, to check none of the spec's changes went below the target."""

    spec: Path
    sdir: Path
    cwd: Path
    rows: list[tuple[float, int, frozenset[str]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _poll(self) -> None:
        cmd = [sys.executable, "-m", "skyhedge", "status", str(self.spec), "--state-dir", str(self.sdir)]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        while not self._stop.is_set():
            at = time.time()
            done = subprocess.run(
                [*cmd, "--json"], cwd=self.cwd, env=env, capture_output=True, text=True, check=False
            )
            with contextlib.suppress(ValueError, KeyError, TypeError):
                rows = json.loads(done.stdout)["replicas"]
                ready = sum(1 for r in rows if r["state"] == "READY")
                self.rows.append((at, ready, frozenset(r["id"] for r in rows)))
            self._stop.wait(max(0.0, 1.0 - (time.time() - at)))

    def min_ready(self, start: float, end: float) -> int | None:
        seen = [ready for at, ready, _ in self.rows if start <= at < end]
        return min(seen) if seen else None


def _live(sdir: Path, name: str) -> dict[str, Any]:
    return {r.id: r for r in load_state(sdir, name).live()}


def _settled(sdir: Path, name: str, old: set[str], want: int) -> bool:
    """Every live replica READY and routed, none of `old` left, at least `want` of them."""
    live = _live(sdir, name)
    routed_ids = {p[0] for p in load_state(sdir, name).extra.get("routed") or []}
    return (
        len(live) >= want
        and not (old & set(live))
        and all(r.fact().status.value == "READY" for r in live.values())
        and set(live) <= routed_ids
    )


def _edit(spec_path: Path, old: str, new: str) -> None:
    """Replace one line of the spec in one step (as an editor saving it does)."""
    text = spec_path.read_text()
    assert old in text, old
    tmp = spec_path.with_suffix(".tmp")
    tmp.write_text(text.replace(old, new, 1))
    tmp.replace(spec_path)


def _log_lines(log: Path, start: int, needle: str) -> list[str]:
    return [ln for ln in log.read_text(errors="replace").splitlines()[start:] if needle in ln]


def run_rollout(args: argparse.Namespace) -> None:
    """`skyhedge up --no-dashboard` on a copy of examples/local-echo (own ports) while the spec
    is edited: a `run.env` change (every replica rolls over), min_replicas up and down, an
    invalid edit, a router option, and a command whose replicas never get READY."""
    with tempfile.TemporaryDirectory(prefix="skyhedge-rollout-") as tmpname:
        tmp = Path(tmpname)
        svc = tmp / "svc"
        svc.mkdir()
        for name in ("server.py", "corpus.txt"):
            (svc / name).write_bytes((REPO / "examples/local-echo" / name).read_bytes())
        port = free_port()
        base = free_port() % 10000 + 20000
        text = (REPO / "examples/local-echo/service.yaml").read_text()
        text = text.replace("port: 8080", f"port: {port}").replace(
            "local_base_port: 18000", f"local_base_port: {base}"
        )
        text = text.replace(
            'ECHO_MODEL_SEED: "7"', f'ECHO_MODEL_SEED: "7"\n    ECHO_TOKEN_DELAY: "{args.token_delay}"'
        )
        spec_path = svc / "service.yaml"
        spec_path.write_text(text)
        sdir = tmp / "state"
        name = "local-echo"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        log_path = tmp / "up.log"
        log = open(log_path, "wb")  # noqa: SIM115
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "skyhedge",
                "up",
                str(spec_path),
                "--state-dir",
                str(sdir),
                "--no-dashboard",
            ],
            cwd=tmp,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        poller = StatusPoller(spec_path, sdir, tmp)
        load = Load("127.0.0.1", port, args.rate)
        marks: list[tuple[float, str]] = []
        durations: list[tuple[str, float | None, str]] = []
        try:
            wait_for(lambda: _settled(sdir, name, set(), 2), 180, "2 READY routed replicas")
            poller.start()
            t0 = time.time()
            load.start()
            marks.append((time.time(), "phase steady"))
            time.sleep(args.phase)

            def step(phase: str, old: str, new: str, want: int, timeout: float = 240) -> None:
                before = set(_live(sdir, name))
                marks.append((time.time(), f"phase {phase}"))
                at = time.time()
                _edit(spec_path, old, new)
                roll = phase == "env"
                try:
                    wait_for(lambda: _settled(sdir, name, before if roll else set(), want), timeout, phase)
                    durations.append((phase, time.time() - at, ""))
                except SystemExit as exc:
                    durations.append((phase, None, str(exc)))
                marks.append((time.time(), f"{phase} settled"))
                time.sleep(args.phase)

            step("env", 'ECHO_MODEL_SEED: "7"', 'ECHO_MODEL_SEED: "8"', 2)
            step("scaleup", "min_replicas: 2", "min_replicas: 3", 3)
            step("scaledown", "min_replicas: 3", "min_replicas: 2", 2)

            def logged(phase: str, old: str, new: str, needle: str, what: str, shown: str) -> None:
                """Edit the spec, wait for the watcher's log line holding `needle`, keep those
                holding `shown`, then hold the phase."""
                marks.append((time.time(), f"phase {phase}"))
                seen = len(log_path.read_text(errors="replace").splitlines())
                _edit(spec_path, old, new)
                wait_for(lambda: bool(_log_lines(log_path, seen, needle)), 30, what)
                durations.append((phase, None, " | ".join(_log_lines(log_path, seen, shown))))
                time.sleep(args.phase)

            # (c) an invalid edit: refused in one line, the service unaffected
            logged("invalid", "min_replicas: 2", "min_replicas: many", "refused", "the refusal", "refused")
            _edit(spec_path, "min_replicas: many", "min_replicas: 2")
            # (d) a router change: a graceful nginx reload with the new config
            logged(
                "router",
                "load_balancing_policy: least_load",
                "load_balancing_policy: round_robin",
                "load_balancing_policy",
                "router reload",
                "load_balancing",
            )
            # (e) a revision whose replicas never get READY (a command that never listens)
            before = set(_live(sdir, name))
            marks.append((time.time(), "phase badcmd"))
            seen = len(log_path.read_text(errors="replace").splitlines())
            _edit(spec_path, "command: python3 server.py", "command: sleep 3600")
            time.sleep(max(args.phase, 60))
            durations.append(
                ("badcmd", None, f"old replicas still live: {sorted(before & set(_live(sdir, name)))}")
            )
            marks.append((time.time(), "phase fixed"))
            _edit(spec_path, "command: sleep 3600", "command: python3 server.py")
            at = time.time()
            try:
                wait_for(
                    lambda: _settled(sdir, name, set(), 2) and not _outdated(spec_path, sdir), 240, "fixed"
                )
                durations.append(("fixed", time.time() - at, ""))
            except SystemExit as exc:
                durations.append(("fixed", None, str(exc)))
            time.sleep(args.phase)
            marks.append((time.time(), "phase end"))
            bad_lines = [
                ln
                for ln in log_path.read_text(errors="replace").splitlines()[seen:]
                if "sleep 3600" in ln or "rolling" in ln or "FAILED" in ln or "crash" in ln or "hold" in ln
            ]
        finally:
            load.stop()
            poller.stop()
            stop_and_destroy(up, log, spec_path, sdir, tmp, env, wait=60, destroy_timeout=180)
            with contextlib.suppress(Exception):
                from skyhedge.spec import load_spec

                teardown_router(Router(load_spec(spec_path), sdir))
            kill_all(runtime_dir(sdir))
            if args.keep_log:
                Path(args.keep_log).write_bytes(log_path.read_bytes())
        marks += history_marks(sdir, t0, name)
        marks.sort()
        report(load.samples, marks, t0)
        print()
        print("took (edit -> every replica READY, routed, none of the old ones left):")
        for phase, took, note in durations:
            print(f"  {phase:<10} {'-' if took is None else f'{took:.1f} s':>8}  {note}")
        print("READY replicas (status --json, once a second), lowest per phase:")
        phases = [m for m in marks if m[1].startswith("phase ")]
        for i, (start, what) in enumerate(phases[:-1]):
            print(f"  {what.removeprefix('phase '):<10} {poller.min_ready(start, phases[i + 1][0])}")
        print("watcher log during badcmd/fixed:")
        for ln in bad_lines[:40]:
            print("  " + ln[:300])


def _outdated(spec_path: Path, sdir: Path) -> list[str]:
    from skyhedge.service import outdated_replicas
    from skyhedge.spec import load_spec

    spec = load_spec(spec_path)
    return outdated_replicas(spec, load_state(sdir, spec.name))


# ---- the ramp scenario: the request-rate autoscaler under a load that steps up and down -------

RAMP_SPEC = """\
name: ramp
placement: {{clouds: [local], zones: [local-a, local-b, local-c]}}
resources: {{local_base_port: {base}}}
replica_policy:
  min_replicas: 1
  max_replicas: 3
  target_qps_per_replica: {tq}
  upscale_delay_seconds: {up}
  downscale_delay_seconds: {down}
  num_overprovision: 0
  policy: spothedge
readiness_probe: {{path: /health, initial_delay_seconds: 30, timeout_seconds: 2}}
service: {{port: {port}, load_balancing_policy: least_load}}
run:
  command: {python} {server}
  env: {{ECHO_TOKEN_DELAY: "{delay}"}}
"""


@dataclass
class MetricsPoller(_Poller):
    """Scrapes the watcher's /metrics twice a second: the live request rate, the target and the
    READY count (what a dashboard sees; the state file holds the rate only once a minute)."""

    port: int
    rows: list[tuple[float, float | None, int | None, int | None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    join_timeout = 10.0

    def _poll(self) -> None:
        while not self._stop.is_set():
            at = time.time()
            values: dict[str, float] = {}
            with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/metrics")
                for line in conn.getresponse().read().decode().splitlines():
                    name, _, value = line.partition(" ")
                    if name in ("skyhedge_requests_per_second", "skyhedge_target_replicas"):
                        values[name] = float(value)
                    elif name.startswith("skyhedge_replicas{") and 'state="READY"' in name:
                        values["ready"] = values.get("ready", 0) + float(value)
                conn.close()
            target = values.get("skyhedge_target_replicas")
            ready = values.get("ready")
            self.rows.append(
                (
                    at,
                    values.get("skyhedge_requests_per_second"),
                    None if target is None else int(target),
                    None if ready is None else int(ready),
                )
            )
            self._stop.wait(0.5)

    def first(
        self, since: float, pred: Callable[[float | None, int | None, int | None], bool]
    ) -> float | None:
        for at, qps, target, ready in self.rows:
            if at >= since and pred(qps, target, ready):
                return at - since
        return None

    def targets(self, start: float, end: float) -> list[int]:
        """The distinct targets seen in [start, end), in order (a change each time it moved)."""
        out: list[int] = []
        for at, _, target, _ in self.rows:
            if start <= at < end and target is not None and (not out or out[-1] != target):
                out.append(target)
        return out

    def qps_range(self, start: float, end: float) -> tuple[float, float] | None:
        seen = [q for at, q, _, _ in self.rows if start <= at < end and q is not None]
        return (min(seen), max(seen)) if seen else None


def run_ramp(args: argparse.Namespace) -> None:
    """`skyhedge up` of a 1-3 replica autoscaled local service under a load that steps up, holds
    through an nginx reload and a watcher restart, hovers at a threshold, drops, and then has its
    autoscaling fields edited. Prints per phase how long the autoscaler took and what it chose."""
    tq = args.target_qps
    with tempfile.TemporaryDirectory(prefix="skyhedge-ramp-") as tmpname:
        tmp = Path(tmpname)
        base = free_port() % 5000 + 25000
        port, mport = free_port_below(base), free_port_below(base - 100)
        spec_path = tmp / "service.yaml"
        spec_path.write_text(
            RAMP_SPEC.format(
                base=base,
                port=port,
                tq=tq,
                up=args.upscale_delay,
                down=args.downscale_delay,
                python=sys.executable,
                server=REPO / "examples/local-echo/server.py",
                delay=args.token_delay,
            )
        )
        sdir = tmp / "state"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        log_path = tmp / "up.log"
        argv = [sys.executable, "-m", "skyhedge", "up", str(spec_path), "--state-dir", str(sdir)]
        argv += ["--no-dashboard", "--metrics-port", str(mport)]

        def start_up() -> tuple[subprocess.Popen, Any]:
            log = open(log_path, "ab")  # noqa: SIM115
            proc = subprocess.Popen(
                argv, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            return proc, log

        up, log = start_up()
        poller = MetricsPoller(mport)
        load = Load("127.0.0.1", port, 0.5 * tq, poisson=True)
        marks: list[tuple[float, str]] = []
        took: list[tuple[str, str]] = []
        t0 = time.time()

        def phase(name: str, rate: float | None = None) -> float:
            if rate is not None:
                load.rate = rate
            at = time.time()
            marks.append((at, f"phase {name}"))
            return at

        def until(
            what: str,
            pred: Callable[[float | None, int | None, int | None], bool],
            since: float,
            timeout: float = 300,
        ) -> float | None:
            deadline = time.time() + timeout
            while time.time() < deadline:
                row = poller.rows[-1] if poller.rows else None
                if row is not None and row[0] >= since and pred(*row[1:]):
                    took.append((what, f"{row[0] - since:.1f} s"))
                    return row[0] - since
                time.sleep(0.2)
            took.append((what, f"not within {timeout:.0f} s"))
            return None

        hold = args.ramp_hold
        try:
            wait_for(lambda: len(routed(sdir, "ramp")) >= 1, 120, "1 routed replica")
            poller.start()
            load.start()
            at = phase("low", 0.5 * tq)
            until("low: rate measured", lambda q, t, r: q is not None and q > 0.3 * tq, at)
            time.sleep(hold)
            at = phase("step", 2.5 * tq)
            until("step 0.5->2.5 x target: target 3", lambda q, t, r: t == 3, at)
            until("step 0.5->2.5 x target: 3 READY", lambda q, t, r: r == 3, at)
            time.sleep(hold / 2)
            at = phase("reload")
            _edit(spec_path, "load_balancing_policy: least_load", "load_balancing_policy: round_robin")
            time.sleep(hold / 2)
            rng = poller.qps_range(at, time.time())
            took.append(("reload: req/s seen", f"{rng}, targets {poller.targets(at, time.time())}"))
            at = phase("restart")
            up.send_signal(signal.SIGINT)
            up.wait(timeout=60)
            log.close()
            up, log = start_up()
            until("restart: metrics back", lambda q, t, r: t is not None, at, 60)
            time.sleep(hold / 2)
            rng = poller.qps_range(at, time.time())
            took.append(("restart: req/s seen", f"{rng}, targets {poller.targets(at, time.time())}"))
            at = phase("near", 2.0 * tq)  # a steady load right at the 2-replica threshold
            time.sleep(args.near_hold)
            seen = poller.targets(at, time.time())
            took.append((f"near: 2 x target for {args.near_hold:g} s: targets", f"{seen}"))
            took.append(("near: target changes", f"{len(seen) - 1}"))
            at = phase("drop", 0.5 * tq)
            until("drop 2->0.5 x target: target 1", lambda q, t, r: t == 1, at)
            until("drop: 1 READY", lambda q, t, r: r == 1, at)
            time.sleep(hold / 2)
            at = phase("edit")
            _edit(spec_path, f"target_qps_per_replica: {tq}", f"target_qps_per_replica: {tq / 5:g}")
            until("edit target_qps_per_replica /5 (rate 0.5 x old): target 3", lambda q, t, r: t == 3, at)
            until("edit: 3 READY", lambda q, t, r: r == 3, at)
            at = phase("edit-max")
            _edit(spec_path, "max_replicas: 3", "max_replicas: 2")
            until("edit max_replicas 3->2: target 2", lambda q, t, r: t == 2, at, 60)
            until("edit-max: 2 READY", lambda q, t, r: r == 2, at, 120)
            time.sleep(hold / 4)
            marks.append((time.time(), "phase end"))
        finally:
            load.stop()
            poller.stop()
            stop_and_destroy(up, log, spec_path, sdir, tmp, env, wait=60, destroy_timeout=180)
            _router_down(spec_path, sdir)
            kill_all(runtime_dir(sdir))
            lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if "autoscaler" in ln]
            if args.keep_log:
                Path(args.keep_log).write_bytes(log_path.read_bytes())
        marks += history_marks(sdir, t0, "ramp") if sdir.exists() else []
        marks.sort()
        report(load.samples, marks, t0)
        print()
        print(
            f"autoscaler (target_qps_per_replica {tq:g}, upscale {args.upscale_delay} s, "
            f"downscale {args.downscale_delay} s):"
        )
        for what, value in took:
            print(f"  {what:<58} {value}")
        print("watcher log, autoscaler lines:")
        for ln in lines[:60]:
            print("  " + ln[:200])


def run_http500(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="skyhedge-traffic-") as tmpname:
        tmp = Path(tmpname)
        fleet = Fleet(tmp)
        port = free_port()
        router = Router(make_spec(port), tmp / "state")
        try:
            with replica_answering_500("r-0003") as bad:  # its model broke; /health still passes
                fleet.start(2, env={"ECHO_TOKEN_DELAY": str(args.token_delay)})
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=positive, default=40, help="requests per second")
    parser.add_argument("--phase", type=positive, default=20, help="seconds per phase")
    parser.add_argument("--token-delay", type=float, default=0.005, help="replica seconds per token")
    parser.add_argument(
        "--client-timeout", type=positive, default=CLIENT_TIMEOUT, help="seconds a client waits for an answer"
    )
    parser.add_argument("--scenarios", default="kill,vanish,scaledown,hang,http500")
    parser.add_argument("--keep-log", metavar="FILE", help="rollout, ramp: copy the watcher's log here")
    parser.add_argument("--target-qps", type=positive, default=10, help="ramp: target_qps_per_replica")
    parser.add_argument("--upscale-delay", type=at_least(0), default=10, help="ramp: upscale_delay_seconds")
    parser.add_argument(
        "--downscale-delay", type=at_least(0), default=30, help="ramp: downscale_delay_seconds"
    )
    parser.add_argument("--ramp-hold", type=positive, default=60, help="ramp: seconds each level is held")
    parser.add_argument(
        "--near-hold", type=positive, default=300, help="ramp: seconds of a load at a threshold"
    )
    args = parser.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - {"kill", "vanish", "scaledown", "hang", "http500", "rollout", "ramp"}
    if unknown:
        parser.error(f"argument --scenarios: unknown {', '.join(sorted(unknown))}")
    if set(scenarios) & {"kill", "vanish", "scaledown", "hang"}:
        print("== controller run: skyhedge up, local cloud, 3 replicas ==")
        run_controller(args, scenarios)
    if "rollout" in scenarios:
        print("\n== rollout run: skyhedge up on examples/local-echo, spec edited under load ==")
        run_rollout(args)
    if "ramp" in scenarios:
        print("\n== ramp run: skyhedge up, autoscaled 1-3 local replicas, load stepped up and down ==")
        run_ramp(args)
    if "http500" in scenarios:
        print("\n== router run: 2 local-echo replicas + 1 answering 500 ==")
        run_http500(args)


if __name__ == "__main__":
    main()
