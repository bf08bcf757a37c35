"""The whole loop on the local cloud: real Terraform (embedded engine), real replica processes,
real nginx, and `skyhedge watch` as a real process.

1. Under a steady client load through the router, a zone is preempted: a replacement becomes READY
   in another zone, routing follows, and at least 99.9% of the requests succeed.
2. The watcher is killed with SIGKILL (its whole process group: Terraform and the launcher too)
   in the middle of an apply; a new watcher converges: no orphan process, no duplicate replica,
   Terraform's state holds exactly the live replicas.

Every process started here (watchers, replicas, nginx) is stopped by the fixture, even on failure.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from skyhedge.clouds.local import runtime_dir
from skyhedge.clouds.local.events import preempt_zone
from skyhedge.clouds.local.processes import find_processes, kill_all, list_pidfiles
from skyhedge.routing import Router
from skyhedge.spec import load_spec
from skyhedge.state import load_state

REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "examples" / "local-echo" / "server.py"
pytestmark = pytest.mark.skipif(
    shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(), reason="nginx is not installed"
)
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_below(limit: int) -> int:
    """A free port under `limit`: a metrics port must stay out of the local replicas' range."""
    for _ in range(200):
        port = random.randrange(10000, limit)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port below {limit}")


def free_base(span: int = 40) -> int:
    """A base port with `span` free ports above it (replica r-000N listens on base + N)."""
    for _ in range(50):
        base = free_port() % 20000 + 30000
        ok = True
        for p in range(base + 1, base + span):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range")


class Service:
    """One service under test: spec, state dir, and the watcher processes started for it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state_dir = tmp / "state"
        self.port = free_port()
        self.base = free_base()
        self.spec_path = tmp / "service.yaml"
        self.spec_path.write_text(
            f"""
name: e2e
placement:
  clouds: [local]
  zones: [local-a, local-b, local-c]
resources:
  local_base_port: {self.base}
replica_policy:
  min_replicas: 2
  num_overprovision: 1
  policy: spothedge
readiness_probe:
  path: /health
  initial_delay_seconds: 30
  timeout_seconds: 2
service:
  port: {self.port}
  load_balancing_policy: round_robin
run:
  command: {sys.executable} {SERVER}
"""
        )
        self.spec = load_spec(self.spec_path)
        self.watchers: list[subprocess.Popen[bytes]] = []

    def start_watcher(self, *extra: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        log = open(self.tmp / f"watch-{len(self.watchers)}.log", "wb")  # noqa: SIM115 (closed by the child's exit)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "skyhedge",
                "watch",
                str(self.spec_path),
                "--state-dir",
                str(self.state_dir),
                "--interval",
                "2",
                "--log-level",
                "info",
                *extra,
            ],
            cwd=self.tmp,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.watchers.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(self.tmp.glob("watch-*.log")))

    def state(self):
        return load_state(self.state_dir, "e2e")

    def wait(self, what: str, predicate, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        checked = time.monotonic()
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() - checked > 1.0:  # a crashing watcher will not get there: fail now
                checked = time.monotonic()
                if "tick crashed" in self.logs():
                    raise AssertionError(f"the watcher crashed while waiting for {what}\n{self.logs()}")
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")

    def converged(self) -> bool:
        st = self.state()
        live = st.live()
        ready = [r for r in live if r.fact().ready and r.market == "spot"]
        routed = {pair[0] for pair in st.extra.get("routed") or []}
        return len(live) == 3 and len(ready) == 3 and routed == {r.id for r in live}

    def kill_watchers(self) -> None:
        for proc in self.watchers:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def teardown(self) -> None:
        self.kill_watchers()
        try:
            Router(self.spec, self.state_dir).down(timeout=5)
        finally:
            kill_all(runtime_dir(self.state_dir))


@pytest.fixture
def service(tmp_path: Path):
    svc = Service(tmp_path)
    try:
        yield svc
    finally:
        svc.teardown()


class Load:
    """A steady client: completions through the router from 4 threads, counting outcomes."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url = url
        self.ok = 0
        self.failed: list[str] = []
        self.replicas: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = threads
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        body = json.dumps({"model": "local-echo", "prompt": "the spot market", "max_tokens": 4}).encode()
        while not self._stop.is_set():
            req = urllib.request.Request(
                self.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
            )
            try:
                with _NO_PROXY.open(req, timeout=10) as resp:
                    resp.read()
                    rid = resp.headers.get("X-Replica-Id", "?")
                with self._lock:
                    self.ok += 1
                    self.replicas.add(rid)
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                # HTTPException: a response cut short when its replica was killed mid-body
                with self._lock:
                    self.failed.append(f"{time.time():.3f} {exc}")
            time.sleep(0.01)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)

    @property
    def total(self) -> int:
        return self.ok + len(self.failed)


def _scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from test_controller_metrics import parse

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as resp:
        return parse(resp.read().decode())


def test_preemption_under_load_is_replaced_in_another_zone(service):
    metrics_port = free_port_below(service.base)  # above the base is refused: a replica's port
    service.start_watcher("--metrics-port", str(metrics_port))
    service.wait("3 READY spot replicas routed", service.converged, timeout=90)
    before = {r.id: r.zone for r in service.state().live()}
    victim_id, victim_zone = sorted(before.items())[0]
    url = f"http://127.0.0.1:{service.port}"
    with Load(url) as load:
        service.wait("traffic", lambda: load.ok > 50, timeout=20)
        killed = preempt_zone(service.state_dir, victim_zone, seconds=120)
        assert victim_id in {p.id for p in killed}
        service.wait(
            "the victim recorded preempted",
            lambda: service.state().replicas[victim_id].reason == "preempted",
            timeout=20,
        )
        service.wait(
            "a READY replacement routed",
            lambda: service.converged() and victim_id not in {r.id for r in service.state().live()},
            timeout=60,
        )
        seen = load.total
        service.wait("traffic after the change", lambda: load.total > seen + 100, timeout=20)
    st = service.state()
    new = [r for r in st.live() if r.id not in before]
    assert new and all(r.zone != victim_zone for r in new)
    routed = [pair[0] for pair in st.extra["routed"]]
    assert sorted(routed) == sorted(r.id for r in st.live())
    assert Router(service.spec, service.state_dir).status()["upstreams"] == [
        {"id": r.id, "endpoint": r.endpoint} for r in sorted(st.live(), key=lambda r: r.id)
    ]
    assert new[0].id in load.replicas  # the replacement served traffic
    success = load.ok / load.total
    print(f"requests through the router: {load.ok} ok of {load.total} ({100 * success:.2f}%)")
    # Only requests in flight on the killed replica may fail: at most one per client thread.
    assert len(load.failed) <= load.threads and success >= 0.99, (
        f"{len(load.failed)} of {load.total} failed: {load.failed[:5]}"
    )
    # no process of a gone replica is left
    alive = {p.id for p in list_pidfiles(runtime_dir(service.state_dir))}
    assert alive == {r.id for r in st.live()}
    # the watcher's Prometheus endpoint saw it all
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    serving = ("skyhedge_serving", frozenset())
    service.wait("metrics of the settled fleet", lambda: _scrape(url)[serving] == 1, 20)
    samples = _scrape(url)
    where = frozenset({("cloud", "local"), ("region", "local"), ("zone", victim_zone), ("market", "spot")})
    assert samples[("skyhedge_preemptions_total", where)] == 1
    ready = sum(
        v for (n, lab), v in samples.items() if n == "skyhedge_replicas" and ("state", "READY") in lab
    )
    assert ready == samples[("skyhedge_ready_replicas", frozenset())] >= 3
    assert samples[("skyhedge_serving_seconds_total", frozenset())] > 0
    from skyhedge.controller import presence

    record = presence.read(service.state_dir)
    assert record is not None and record.metrics == url  # `status` shows where they are


def _tf_replicas(state_dir: Path) -> set[str]:
    ids: set[str] = set()
    for path in (state_dir / "tf" / "state").glob("*.tfstate"):
        data = json.loads(path.read_text())
        for res in data.get("resources", []):
            if res.get("type") == "terraform_data":
                ids |= {inst.get("index_key") for inst in res.get("instances", [])}
    return ids


def _processes_by_replica(state_dir: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for pid in find_processes(runtime_dir(state_dir)):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rid = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"SKYHEDGE_REPLICA_ID=")), "?")
        counts[rid] = counts.get(rid, 0) + 1
    return counts


def test_kill_9_mid_apply_then_restart_converges_without_orphans(service):
    first = service.start_watcher()
    replicas = runtime_dir(service.state_dir) / "replicas"

    def mid_apply() -> bool:  # the launcher has started a process, Terraform has not reported back
        st = service.state()
        return any(replicas.glob("r-*.json")) and any(r.endpoint is None for r in st.live())

    service.wait("an apply in progress", mid_apply, timeout=60)
    os.killpg(first.pid, signal.SIGKILL)  # the watcher, its Terraform and any launcher: mid-apply
    first.wait(timeout=10)
    intents = sorted(service.state().replicas)
    service.start_watcher()
    service.wait("convergence after the restart", service.converged, timeout=90)
    st = service.state()
    live = {r.id for r in st.live()}
    # no duplicate: replicas launched before the kill kept their IDs; all IDs are distinct records
    assert set(intents) <= set(st.replicas)
    assert _tf_replicas(service.state_dir) == live
    # no orphan: exactly one process group leader per live replica, nothing else of this service
    procs = _processes_by_replica(service.state_dir)
    assert set(procs) == live, procs
    assert {p.id for p in list_pidfiles(runtime_dir(service.state_dir))} == live
    # a second watcher is refused while this one runs
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "skyhedge",
            "watch",
            str(service.spec_path),
            "--state-dir",
            str(service.state_dir),
            "--once",
        ],
        cwd=service.tmp,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode == 1 and "the watcher of this service runs (pid" in second.stderr


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _edit_spec(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text.replace(old, new))
    os.replace(tmp, path)  # as editors and `git checkout` do: the watcher never reads half a file


def test_a_spec_change_rolls_over_under_load_without_an_outage(service):
    """Editing `run.env` while the watcher runs: it re-reads the spec and replaces the replicas
    one at a time, each once a replacement is READY (the router always has READY upstreams);
    Terraform never restarts them all at once. Then `service.port` moves, and the same nginx
    master answers on the new port."""
    from skyhedge.spec import replica_revision

    watcher = service.start_watcher()
    service.wait("3 READY spot replicas routed", service.converged, timeout=90)
    before = {r.id for r in service.state().live()}
    old_revision = replica_revision(service.spec)
    assert {r.revision for r in service.state().live()} == {old_revision}
    url = f"http://127.0.0.1:{service.port}"
    with Load(url) as load:
        service.wait("traffic", lambda: load.ok > 50, timeout=20)
        _edit_spec(service.spec_path, "run:\n", "run:\n  env: {ROLL_MARK: '2'}\n")
        new_spec = load_spec(service.spec_path)
        new_revision = replica_revision(new_spec)
        assert new_revision != old_revision
        service.wait(
            "every replica replaced by one of the new revision",
            lambda: service.converged() and not before & {r.id for r in service.state().live()},
            timeout=180,
        )
        seen = load.total
        service.wait("traffic after the roll-over", lambda: load.total > seen + 100, timeout=20)
    live = service.state().live()
    assert {r.revision for r in live} == {new_revision}
    pids = {p.id: p.pid for p in list_pidfiles(runtime_dir(service.state_dir))}
    assert all(_environ(pids[r.id]).get("ROLL_MARK") == "2" for r in live)
    print(f"roll-over under load: {load.ok} ok, {len(load.failed)} failed")
    assert len(load.failed) <= load.threads, load.failed
    assert load.ok / load.total >= 0.995, (load.ok, load.failed)
    assert "spec reloaded from" in service.logs() and "run.env changed" in service.logs()
    assert watcher.poll() is None and len(service.watchers) == 1  # one watcher, never restarted

    master = Router(service.spec, service.state_dir).pid()
    moved = free_port()
    _edit_spec(service.spec_path, f"port: {service.port}", f"port: {moved}")
    service.wait(
        "the router answering on the moved port",
        lambda: _NO_PROXY.open(f"http://127.0.0.1:{moved}/-/health", timeout=2).status == 200,
        timeout=30,
    )
    assert Router(load_spec(service.spec_path), service.state_dir).pid() == master  # reloaded, not restarted
    service.wait(  # (noted once the reload is taken, just after nginx moved)
        "the reload noted", lambda: f"service.port: {service.port} -> {moved}" in service.logs(), timeout=10
    )


def _stream(url: str, tokens: int, out: list[dict[str, object]]) -> None:
    """One streamed completion through the router; records its replica, chunk count and end."""
    body = json.dumps(
        {"model": "local-echo", "prompt": "the spot market", "max_tokens": tokens, "stream": True}
    ).encode()
    req = urllib.request.Request(
        url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    result: dict[str, object] = {"chunks": 0, "done": False}
    try:
        with _NO_PROXY.open(req, timeout=60) as resp:
            result["replica"] = resp.headers.get("X-Replica-Id", "?")
            for line in resp:
                if line.startswith(b"data: [DONE]"):
                    result["done"] = True
                elif line.startswith(b"data: "):
                    result["chunks"] = int(result["chunks"]) + 1  # type: ignore[call-overload]
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        result["error"] = str(exc)
    result["end"] = time.time()
    out.append(result)


def test_a_replica_released_mid_generation_finishes_it_while_the_watcher_goes_on(service):
    """A scale-down releases a replica serving a long generation: it leaves the router at once,
    keeps running until that generation is done, and only then is destroyed. Meanwhile the
    watcher goes on with its passes (the drain no longer blocks one for up to 30 s, during which
    a preemption went unnoticed and the replacement was not launched)."""
    _edit_spec(service.spec_path, "run:\n", "run:\n  env: {ECHO_TOKEN_DELAY: '0.05'}\n")
    service.start_watcher()
    service.wait("3 READY spot replicas routed", service.converged, timeout=90)
    url = f"http://127.0.0.1:{service.port}"
    streams: list[dict[str, object]] = []
    threads = [threading.Thread(target=_stream, args=(url, 300, streams), daemon=True) for _ in range(3)]
    for t in threads:  # round robin over 3 upstreams: one 15 s generation on each replica
        t.start()
        time.sleep(0.3)
    time.sleep(1.0)
    _edit_spec(service.spec_path, "min_replicas: 2", "min_replicas: 1")
    service.wait("a replica released", lambda: any(r.draining for r in service.state().live()), timeout=20)
    victim = next(r for r in service.state().live() if r.draining)
    released_at = time.time()
    # the victim is out of the router at once, but still running
    service.wait(
        "the victim unrouted", lambda: victim.id not in {p[0] for p in service.state().extra["routed"]}, 10
    )
    assert victim.id in {p.id for p in list_pidfiles(runtime_dir(service.state_dir))}
    # the watcher goes on meanwhile: a preemption elsewhere is seen within seconds
    other = next(r for r in service.state().live() if r.id != victim.id and not r.draining)
    preempt_zone(service.state_dir, other.zone, seconds=120)
    service.wait(
        "the preemption noticed during the drain",
        lambda: service.state().replicas[other.id].gone_at is not None,
        timeout=8,
    )
    noticed = time.time()
    for t in threads:
        t.join(timeout=40)
    mine = [s for s in streams if s.get("replica") == victim.id]
    assert mine and all(s["done"] and "error" not in s for s in mine), streams  # finished, not cut
    service.wait(
        "the victim destroyed once drained",
        lambda: service.state().replicas[victim.id].gone_at is not None,
        30,
    )
    assert noticed - released_at < 8
    assert float(service.state().replicas[victim.id].gone_at) >= min(float(s["end"]) for s in mine) - 1.0  # type: ignore[arg-type]
    assert "drain" not in service.state().extra  # the hold is released with the replica


def test_a_rollout_to_a_command_that_never_gets_ready_keeps_every_old_replica_serving(service):
    """A new `run.command` whose replicas never listen: the watcher keeps launching them (and
    holds its launches once they crash-loop), but none of the three READY replicas of the earlier
    spec (N = 2 plus the policy's extra) is released, and the log says the update stopped. Before,
    the outdated replicas were released against N alone, before any replacement was READY: the
    extra went at once, leaving N for as long as the bad spec stayed."""
    service.start_watcher()
    service.wait("3 READY spot replicas routed", service.converged, timeout=90)
    before = {r.id for r in service.state().live()}
    url = f"http://127.0.0.1:{service.port}"
    with Load(url) as load:
        service.wait("traffic", lambda: load.ok > 50, timeout=20)
        text = service.spec_path.read_text()
        bad = text.replace(f"command: {sys.executable} {SERVER}", "command: sleep 3600").replace(
            "initial_delay_seconds: 30", "initial_delay_seconds: 2"
        )
        assert bad != text
        service.spec_path.with_suffix(".tmp").write_text(bad)
        os.replace(service.spec_path.with_suffix(".tmp"), service.spec_path)
        deadline = time.monotonic() + 60
        while "rolling update stopped" not in service.logs():
            st = service.state()
            live = {r.id for r in st.live() if not r.draining}
            routed = {pair[0] for pair in st.extra.get("routed") or []}
            assert before <= live and before <= routed, (sorted(live), sorted(routed), service.logs())
            assert time.monotonic() < deadline, service.logs()
            time.sleep(0.2)
    assert not load.failed, load.failed[:5]
    assert before <= {r.id for r in service.state().live()}
    logs = (service.tmp / "watch-0.log").read_text(errors="replace")
    line = next(ln for ln in logs.splitlines() if "rolling update stopped" in ln)
    assert "3 replica(s) of the earlier spec keep serving" in line, line
