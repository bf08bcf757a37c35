"""Does one long-running `skyhedge watch` stay bounded past the caps of what it keeps? Local cloud,
real Terraform (embedded engine), real replica processes, real nginx.

The watcher keeps bounded records: 200 history entries (`ServiceState.HISTORY_LIMIT`), 500 gone
replicas (`state.GONE_KEPT`), 50 notes, the gone replicas' logs (`processes.GONE_LOGS_KEPT`). This
drives one `skyhedge watch` process (a real subprocess, `--interval 1`, `--metrics-port`) through
preemptions back to back (`skyhedge preempt`'s mechanics: a zone is marked out of spot capacity for
a few seconds and its spot replicas are SIGKILLed), waiting each time for the fleet to be READY
again, until `--gone` replicas have gone (or `--minutes` have passed), and prints, per sample:

  gone   replicas gone so far (next_id - 1 - live)     rss    the watcher's resident memory (MB)
  fds    its open file descriptors                     thr    its threads
  kids   its child processes (zomb: of them, zombies)  ngx    nginx worker processes
  state  state.json (kB) and how long writing it takes (ms: `save_state` of it, fsync included)
  dir    every other file under the state dir (kB)     hist   history entries kept
  ports  listening sockets of the watcher, nginx and the replicas (the replicas' must equal the
         live replicas)

and checks after every sample that `skyhedge status --json` parses and lists the live replicas,
that the metrics' counters never go down, that `skyhedge_replicas` adds up to the live replicas,
and that every live replica is routed once the fleet is READY.

    python benchmarks/soak_bench.py [--gone 1100] [--minutes 40] [--replicas 12]

At the defaults it passes the 500 gone replicas kept twice (more than 1,000 replicas launched and
preempted) and the history's 200 entries many times over: about 100 replicas go a minute on 2
shared cores, so 11 minutes (`--gone 4000`: 32 minutes, see docs/controller.md, "What stays
bounded over a long run").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _argtypes import positive  # noqa: E402
from _ports import free_base, free_port_below  # noqa: E402

from skyhedge.clouds.local import runtime_dir  # noqa: E402
from skyhedge.clouds.local.events import preempt_zone  # noqa: E402
from skyhedge.clouds.local.processes import kill_all  # noqa: E402
from skyhedge.routing import Router  # noqa: E402
from skyhedge.spec import load_spec  # noqa: E402
from skyhedge.state import GONE_KEPT, ServiceState, load_state, save_state  # noqa: E402

ZONES = ("local-a", "local-b", "local-c")
NAME = "soak"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# A replica server as small as one can be: /health answers 200 (the tests' `local_support.SERVER`).
SERVER = """
import os
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, ppid) of `pid`, None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def process_figures(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    kids = [(p, st) for p in _pids() if (st := _stat(p)) is not None and st[1] == pid]
    return {
        "rss": int(fields["VmRSS"].split()[0]) / 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "thr": int(fields["Threads"]),
        "kids": len(kids),
        "zomb": sum(1 for _, st in kids if st[0] == "Z"),
    }


def nginx_workers(sdir: Path) -> int:
    """Worker processes of the nginx masters whose command line names this state dir."""
    masters = set()
    for p in _pids():
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            if cmd.startswith(b"nginx: master") and str(sdir).encode() in cmd:
                masters.add(p)
    workers = 0
    for p in _pids():
        st = _stat(p)
        if st is None or st[1] not in masters:
            continue
        with contextlib.suppress(OSError):
            if b"worker" in Path(f"/proc/{p}/cmdline").read_bytes():
                workers += 1
    return workers


def listening(tmp: Path) -> dict[str, int]:
    """Listening TCP sockets held by this run's processes (those whose command line names `tmp`:
    the watcher, nginx's master, the replicas; nginx's workers share the master's): the watcher's,
    nginx's and the replicas' (other services on the host are not counted)."""
    owner: dict[str, str] = {}
    for p in _pids():
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            if str(tmp).encode() not in cmd:
                continue
            kind = (
                "nginx"
                if cmd.startswith(b"nginx")
                else "watcher"
                if b" watch " in cmd.replace(b"\0", b" ")
                else "replicas"
            )
            for fd in os.listdir(f"/proc/{p}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{p}/fd/{fd}")
                    if target.startswith("socket:["):
                        owner[target[8:-1]] = kind
    count = {"watcher": 0, "nginx": 0, "replicas": 0}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in owner:
                    count[owner[cols[9]]] += 1
    return count


def dir_sizes(sdir: Path) -> tuple[int, int]:
    """(state.json bytes, bytes of every other file under the state dir)."""
    state_bytes = other = 0
    for root, _, files in os.walk(sdir):
        for f in files:
            path = Path(root, f)
            with contextlib.suppress(OSError):
                size = path.stat().st_size
                if path == sdir / "state.json":
                    state_bytes = size
                else:
                    other += size
    return state_bytes, other


def breakdown(sdir: Path) -> str:
    """kB per top-level entry of the state dir (and per folder one level below), largest first."""
    sizes: dict[str, int] = {}
    for root, _, files in os.walk(sdir):
        rel = Path(root).relative_to(sdir).parts
        key = "/".join(rel[:2]) if rel else "."
        for f in files:
            with contextlib.suppress(OSError):
                sizes[key if rel else f] = sizes.get(key if rel else f, 0) + Path(root, f).stat().st_size
    ranked = sorted(sizes.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v / 1024:.0f}k" for k, v in ranked[:10])


def write_ms(state: ServiceState, scratch: Path) -> float:
    """How long `save_state` of `state` takes (what the watcher pays at every pass that changes
    a fact), in a scratch dir."""
    scratch.mkdir(exist_ok=True)
    started = time.perf_counter()
    save_state(scratch, state)
    return (time.perf_counter() - started) * 1000


def scrape(url: str) -> dict[str, float]:
    with _NO_PROXY.open(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def totals(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k.split("{")[0] == name)


class Soak:
    def __init__(self, tmp: Path, replicas: int, span: int) -> None:
        self.tmp = tmp
        self.sdir = tmp / "state"
        self.replicas = replicas
        self.base = free_base(span)
        self.span = span
        self.metrics_port = free_port_below(self.base)
        server = tmp / "server.py"
        server.write_text(SERVER)
        self.spec_path = tmp / "service.yaml"
        self.spec_path.write_text(
            f"""
name: {NAME}
placement:
  clouds: [local]
  zones: [{", ".join(ZONES)}]
resources:
  local_base_port: {self.base}
replica_policy:
  min_replicas: {replicas}
  num_overprovision: 0
  dynamic_ondemand_fallback: false
  policy: spothedge
readiness_probe:
  path: /health
  initial_delay_seconds: 30
  timeout_seconds: 2
service:
  port: {free_port_below(self.metrics_port)}
run:
  command: exec {sys.executable} {server}
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.tmp / "watch.log", "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "skyhedge",
                    "watch",
                    str(self.spec_path),
                    "--state-dir",
                    str(self.sdir),
                ]
                + ["--interval", "1", "--log-level", "info", "--metrics-port", str(self.metrics_port)],
                cwd=self.tmp,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def state(self) -> ServiceState:
        return load_state(self.sdir, NAME)

    def converged(self) -> bool:
        st = self.state()
        live = st.live()
        routed = {p[0] for p in st.extra.get("routed") or []}
        return (
            len(live) == self.replicas
            and all(r.fact().ready for r in live)
            and routed == {r.id for r in live}
        )

    def wait_converged(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the watcher exited ({self.proc.returncode}):\n{self.log_tail()}")
            with contextlib.suppress(OSError, ValueError):
                if self.converged():
                    return
            time.sleep(0.2)
        raise RuntimeError(f"not converged within {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return (self.tmp / "watch.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        try:
            Router(load_spec(self.spec_path), self.sdir).down(timeout=5)
        finally:
            kill_all(runtime_dir(self.sdir))


def check(soak: Soak, last: dict[str, float], problems: list[str]) -> dict[str, float]:
    """The outputs an operator reads stay true: status --json, /metrics, routing."""
    st = soak.state()
    live = {r.id for r in st.live()}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "skyhedge",
            "status",
            str(soak.spec_path),
            "--state-dir",
            str(soak.sdir),
            "--json",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    try:
        shown = json.loads(done.stdout)
        listed = {r["id"] for r in shown["replicas"]}
        if not live <= listed:
            problems.append(f"status --json misses live replicas {sorted(live - listed)}")
    except (ValueError, KeyError, TypeError) as exc:
        problems.append(f"status --json: {exc}: {done.stdout[:200]!r} {done.stderr[-300:]!r}")
    samples = scrape(f"http://127.0.0.1:{soak.metrics_port}/metrics")
    for key, value in samples.items():
        if key.split("{")[0].endswith("_total") and value < last.get(key, 0):
            problems.append(f"/metrics: {key} went down from {last[key]:g} to {value:g}")
    if totals(samples, "skyhedge_replicas") != len(st.live()):
        problems.append(
            f"/metrics: skyhedge_replicas adds up to {totals(samples, 'skyhedge_replicas'):g}, "
            f"the state has {len(st.live())} live"
        )
    return samples


COLUMNS = [
    "min",
    "gone",
    "rss",
    "fds",
    "thr",
    "kids",
    "zomb",
    "ngx",
    "state",
    "wr_ms",
    "dir",
    "hist",
    "ports",
    "preempt",
    "launch",
]
WIDTHS = (5, 5, 6, 4, 4, 4, 4, 4, 7, 6, 7, 5, 5, 7, 7)
HEADER = " ".join(f"{c:>{w}}" for c, w in zip(COLUMNS, WIDTHS, strict=True))


def sample(soak: Soak, minutes: float, last: dict[str, float], problems: list[str]) -> dict[str, float]:
    """Print one row of figures (see the module's docstring) and check the outputs; returns the
    metrics scraped (the next check's baseline for the counters)."""
    st = soak.state()
    assert soak.proc is not None
    fig = process_figures(soak.proc.pid)
    scraped = check(soak, last, problems)
    state_bytes, other = dir_sizes(soak.sdir)
    held = listening(soak.tmp)
    if held["replicas"] != len(st.live()):
        problems.append(f"{held['replicas']} replica ports listen, {len(st.live())} live")
    row = [
        f"{minutes:5.1f}",
        f"{st.next_id - 1 - len(st.live()):5d}",
        f"{fig['rss']:6.1f}",
        f"{fig['fds']:4.0f}",
        f"{fig['thr']:4.0f}",
        f"{fig['kids']:4.0f}",
        f"{fig['zomb']:4.0f}",
        f"{nginx_workers(soak.sdir):4d}",
        f"{state_bytes / 1024:7.1f}",
        f"{write_ms(st, soak.tmp / 'scratch'):6.1f}",
        f"{other / 1024:7.1f}",
        f"{len(st.history):5d}",
        f"{sum(held.values()):5d}",
        f"{totals(scraped, 'skyhedge_preemptions_total'):7.0f}",
        f"{totals(scraped, 'skyhedge_launches_total'):7.0f}",
    ]
    print(" ".join(row), flush=True)
    return scraped


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--gone", type=positive, default=2 * GONE_KEPT + 100, help="stop after this many gone"
    )
    parser.add_argument("--minutes", type=positive, default=40, help="or after this many minutes")
    parser.add_argument("--replicas", type=positive, default=12)
    parser.add_argument("--every", type=positive, default=100, help="a row after every N gone replicas")
    args = parser.parse_args()
    # stopped with SIGTERM (or SIGINT, which a background job ignores): the watcher, its nginx and
    # replicas are stopped all the same (`finally`)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="skyhedge-soak-") as tmp:
        soak = Soak(Path(tmp), args.replicas, args.gone + 4 * args.replicas + 10)
        (soak.tmp / "scratch").mkdir()
        started = time.monotonic()
        rounds = 0
        try:
            soak.start()
            soak.wait_converged(120)
            started = time.monotonic()
            print(f"state dir at start: {breakdown(soak.sdir)}")
            print(HEADER, flush=True)
            last: dict[str, float] = {}
            next_row = 0
            while True:
                st = soak.state()
                gone = st.next_id - 1 - len(st.live())
                if gone >= next_row:
                    last = sample(soak, (time.monotonic() - started) / 60, last, problems)
                    next_row = (gone // args.every + 1) * args.every
                if gone >= args.gone or time.monotonic() - started > args.minutes * 60:
                    break
                # the zone with the most live replicas (turn by turn among equals): one at least
                # is taken every round
                counts = {z: sum(1 for r in st.live() if r.zone == z) for z in ZONES}
                zone = max(ZONES, key=lambda z: (counts[z], z == ZONES[rounds % len(ZONES)]))
                preempt_zone(soak.sdir, zone, seconds=3)
                rounds += 1
                time.sleep(3.2)  # the zone is back: the next round has all three to choose from
                soak.wait_converged(180)
            print(f"state dir at end: {breakdown(soak.sdir)}")
            print(f"watcher's log: {(soak.tmp / 'watch.log').stat().st_size / 1024:.0f} kB")
        finally:
            soak.stop()
        print(f"{rounds} preemptions in {(time.monotonic() - started) / 60:.1f} min")
        print("problems:" if problems else "no problem found")
        for line in problems[:40]:
            print(f"  {line}")


if __name__ == "__main__":
    main()
