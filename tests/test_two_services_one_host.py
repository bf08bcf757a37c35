"""Two skyhedge services on one machine, the `local` cloud and real nginx: acting on one never
stops, kills, re-routes or claims anything of the other, even where they share a service name,
their replicas' port ranges overlap, or one state dir's path ends with the other's.

Every replica process and nginx started here is stopped by the fixtures, even on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from local_support import free_base_port, port_free

from skyhedge.clouds.local import runtime_dir
from skyhedge.clouds.local.events import LocalEventSource
from skyhedge.clouds.local.launcher import CONFIG_ENV
from skyhedge.clouds.local.processes import kill_all, list_pidfiles
from skyhedge.routing import Router
from skyhedge.routing.nginx import alive
from skyhedge.spec import load_spec
from skyhedge.state import ReplicaRecord, load_state

REPO = Path(__file__).resolve().parents[1]
ECHO = REPO / "examples" / "local-echo" / "server.py"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
needs_nginx = pytest.mark.skipif(
    shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(), reason="nginx is not installed"
)


def free_ports(count: int) -> list[int]:
    """`count` free ports outside every replica range these tests use (picked from 20000 up)."""
    found = [port for port in range(12000 + os.getpid() % 3000, 19000, 7) if port_free(port)][:count]
    if len(found) < count:
        raise RuntimeError("no free port")
    return found


@dataclass
class Service:
    """One service of the machine: its folder (spec, state dir), its model name and ports."""

    root: Path
    model: str
    base: int
    port: int

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def runtime(self) -> Path:
        return runtime_dir(self.state_dir)

    @property
    def spec_path(self) -> Path:
        return self.root / "service.yaml"

    def write(
        self,
        *,
        command: str | None = None,
        replicas: int = 2,
        zones: tuple[str, ...] = ("local-a", "local-b"),
    ) -> Path:
        spec = {
            "name": "svc",  # both services: the same name, in two state dirs
            "placement": {"clouds": ["local"], "zones": list(zones)},
            "resources": {"local_base_port": self.base},
            "replica_policy": {
                "min_replicas": replicas,
                "num_overprovision": 0,
                "dynamic_ondemand_fallback": False,
                "policy": "spothedge",
            },
            "readiness_probe": {"path": "/health", "initial_delay_seconds": 20, "timeout_seconds": 2},
            "service": {"port": self.port},
            "run": {
                "command": command or f"exec {sys.executable} {ECHO}",
                "env": {"ECHO_MODEL_NAME": self.model},
            },
        }
        self.spec_path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        return self.spec_path

    def skyhedge(self, *args: str, out: Any = subprocess.PIPE) -> subprocess.Popen[str]:
        """`python -m skyhedge ARGS --state-dir STATE` in the service's folder, started (`SPEC` in
        ARGS stands for the spec's path)."""
        argv = [str(self.spec_path) if arg == "SPEC" else arg for arg in args]
        return subprocess.Popen(
            [sys.executable, "-m", "skyhedge", *argv, "--state-dir", str(self.state_dir)],
            cwd=self.root,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run(self, *args: str) -> tuple[int, str]:
        """The same, run to its end: (exit code, output)."""
        proc = self.skyhedge(*args)
        out = proc.communicate(timeout=180)[0]
        return proc.returncode, out

    def replicas(self) -> dict[str, tuple[int, int]]:
        """ID -> (pid, port) of the replicas running now, from their pid files."""
        return {p.id: (p.pid, p.port) for p in list_pidfiles(self.runtime)}

    def ask(self) -> str:
        """The model that answers a completion through this service's router (or the error)."""
        body = json.dumps({"prompt": "the spot market", "max_tokens": 1}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        try:
            with _NO_PROXY.open(req, timeout=5) as resp:
                return str(json.loads(resp.read())["model"])
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return f"error: {exc}"

    def teardown(self) -> None:
        try:
            if self.spec_path.exists():
                Router(load_spec(self.spec_path), self.state_dir).down(timeout=5)
        finally:
            kill_all(self.runtime)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[tuple[Service, Service]]:
    """Services A and B: B's replica range starts one port above A's (A's r-0002 is B's r-0001)."""
    base = free_base_port(12)
    a_port, b_port = free_ports(2)
    a = Service(tmp_path / "a", "model-a", base, a_port)
    b = Service(tmp_path / "b", "model-b", base + 1, b_port)
    a.root.mkdir()
    b.root.mkdir()
    try:
        yield a, b
    finally:
        for svc in (a, b):
            svc.teardown()


def launch(cfg: dict) -> None:
    """Start a local replica as Terraform does: the launcher, its settings in its environment."""
    env = {**os.environ, CONFIG_ENV: json.dumps(cfg), "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "skyhedge.clouds.local.launcher", "start", cfg["id"]]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def wait_for(what: str, predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def two_state_dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Two services' state dirs; whatever replica runs under either is killed at the end."""
    dirs = (tmp_path / "a" / "state", tmp_path / "b" / "state")
    try:
        yield dirs
    finally:
        for state_dir in dirs:
            kill_all(runtime_dir(state_dir))


def test_a_replica_whose_port_another_services_replica_took_is_gone_not_ready(tmp_path, two_state_dirs):
    """A model server binds its port only once its weights are loaded: until then the port is
    free, and another service's replica (port ranges overlapping) may be handed it. Its answers
    made ours READY, and this service's clients were routed to the other model (63 of 465
    requests in a watcher's 25 s; with `apply`, for good). Now the local event source says ours
    gone, naming the replica that holds its port; that one's own source says nothing of it."""
    port = free_base_port(1) + 1
    ours, theirs = two_state_dirs
    common = {"region": "local", "zone": "local-a", "market": "spot", "port": port, "setup": None,
              "env": {}, "workdir": str(tmp_path), "service": "svc"}  # fmt: skip
    launch({**common, "id": "r-0002", "command": "exec sleep 60", "runtime_dir": str(runtime_dir(ours))})
    launch({**common, "id": "r-0001", "command": f"exec {sys.executable} {ECHO}",
           "runtime_dir": str(runtime_dir(theirs))})  # fmt: skip
    wait_for("the other replica to listen", lambda: not port_free(port))

    def record(rid: str, ready_at: float | None = None) -> ReplicaRecord:
        return ReplicaRecord(rid, "local", "local", "local-a", "spot", launched_at=1.0,
                             provisioned_at=2.0, cloud_id=rid, endpoint=f"http://127.0.0.1:{port}",
                             ready_at=ready_at)  # fmt: skip

    events = LocalEventSource(ours, {"local-a": "local"}).poll(time.time(), [record("r-0002")])
    assert [(e.signal.value, e.replica_id, e.reason) for e in events] == [("gone", "r-0002", "failed")]
    held = f"its port {port} is held by replica r-0001 of {runtime_dir(theirs)}"
    assert events[0].detail == f"{held}, which its probes would reach"
    # the one holding the port is its own; and a READY replica (its port was its own) is not looked at
    assert LocalEventSource(theirs, {"local-a": "local"}).poll(time.time(), [record("r-0001")]) == []
    assert LocalEventSource(ours, {"local-a": "local"}).poll(time.time(), [record("r-0002", 3.0)]) == []


@needs_nginx
def test_apply_never_routes_a_service_to_the_replica_of_another_that_took_its_port(services):
    """A's replica loads (binds nothing yet) while B's apply launches its r-0001 on that very port.
    Before: A's apply said `Ready: r-0001`, exit 0, and A's router sent every request to B's model
    until someone ran a command for A. Now A's apply records its replica gone, naming B's, and
    fails; A's next apply replaces it on a free port; B's replica is never touched."""
    a, b = services
    a.write(command=f"[ -e go ] || sleep 60; exec {sys.executable} {ECHO}", replicas=1, zones=("local-a",))
    b.base = a.base  # B's r-0001 gets A's r-0001's port
    b.write(replicas=1, zones=("local-a",))
    applying = a.skyhedge("apply", "SPEC", "--auto-approve")
    try:
        wait_for(
            "A's replica to be launched", lambda: "r-0001" in a.replicas() or applying.poll() is not None
        )
        assert applying.poll() is None, applying.communicate()[0]
        assert b.run("apply", "SPEC", "--auto-approve")[0] == 0
        theirs = b.replicas()
        assert theirs["r-0001"][1] == a.replicas()["r-0001"][1]
        out = applying.communicate(timeout=120)[0]
    finally:
        if applying.poll() is None:
            applying.kill()
            applying.wait()
    assert applying.returncode == 1, out
    held = f"its port {theirs['r-0001'][1]} is held by replica r-0001 of {b.runtime}"
    assert held in out, out
    assert "Ready: r-0001" not in out, out
    assert all(a.ask() != "model-b" for _ in range(4))
    (a.root / "go").touch()
    code, out = a.run("apply", "SPEC", "--auto-approve")
    assert code == 0, out
    assert [a.ask() for _ in range(4)] == ["model-a"] * 4
    assert b.replicas() == theirs and [b.ask() for _ in range(2)] == ["model-b"] * 2


@needs_nginx
def test_preempt_reload_apply_and_destroy_of_one_service_leave_the_other_alone(services):
    """Same service name, two state dirs, B's port range overlapping A's: every command given A
    acts on A's replicas and router only, and B's replica that took a port A's replica had is
    never taken for A's."""
    a, b = services
    a.write()
    b.write()
    assert a.run("apply", "SPEC", "--auto-approve")[0] == 0
    ours = a.replicas()
    # A's r-0002 crashes, with no watcher of A; B's apply hands its port to B's r-0001
    os.kill(ours["r-0002"][0], signal.SIGKILL)
    wait_for("A's r-0002 to exit", lambda: port_free(ours["r-0002"][1]))
    assert b.run("apply", "SPEC", "--auto-approve")[0] == 0
    theirs = b.replicas()
    assert theirs["r-0001"][1] == ours["r-0002"][1]
    b_router = Router(load_spec(b.spec_path), b.state_dir).pid()
    for args in (
        ["routing", "reload", "SPEC"],  # learns that r-0002 is gone: no longer routed to its port
        ["status", "SPEC"],
        ["logs", "SPEC", "r-0002"],
        ["preempt", "SPEC", "--zone", "local-a", "--for", "60"],
        ["apply", "SPEC", "--auto-approve"],
        ["destroy", "SPEC", "--auto-approve"],
    ):
        code, out = a.run(*args)
        assert code == 0, (args, out)
        assert b.replicas() == theirs, args
        assert Router(load_spec(b.spec_path), b.state_dir).pid() == b_router, args
        assert "model-b" not in {a.ask() for _ in range(3)}, args
    assert a.replicas() == {} and alive(b_router)
    assert [r.id for r in load_state(b.state_dir, "svc").live()] == ["r-0001", "r-0002"]
    assert {b.ask() for _ in range(4)} == {"model-b"}


@needs_nginx
def test_a_router_whose_state_dir_path_ends_another_ones_never_takes_that_one_for_its_own(tmp_path):
    """Router A's state dir is /X/svc, B's /Y/X/svc: A's config path is part of B's nginx command
    line. A pid file of A's dead router naming a pid B's master now has (pids are reused: after
    a reboot, soon) had A's `pid()` find B's master, and `routing down` of A stopped B's router
    (so did `destroy`; `routing reload` SIGHUPed it, `status` showed it as A's)."""
    a_dir = tmp_path / "x" / "svc"
    b_dir = tmp_path / "y" / str(a_dir).lstrip("/")

    def router(folder: Path, port: int) -> Router:
        folder.mkdir(parents=True)
        spec = folder / "service.yaml"
        spec.write_text(
            f"name: svc\nplacement: {{clouds: [local]}}\nservice: {{port: {port}}}\nrun: {{command: x}}\n"
        )
        return Router(load_spec(spec), folder / "state")

    a_port, b_port = free_ports(2)
    a_router, b_router = router(a_dir, a_port), router(b_dir, b_port)
    try:
        b_router.up([])
        master = b_router.pid()
        assert master is not None
        a_router.paths.prefix.mkdir(parents=True)
        a_router.paths.pid.write_text(f"{master}\n")  # A's router died; its pid went to B's master
        assert a_router.pid() is None
        assert a_router.status()["pid"] is None
        a_router.down(timeout=3)
        assert alive(master) and b_router.pid() == master
    finally:
        b_router.down(timeout=5)
        a_router.down(timeout=5)


@needs_nginx
def test_watchers_of_two_services_a_crash_a_restart_and_a_destroy(services):
    """A's watcher is SIGKILLed, then its r-0002 crashes and B's watcher hands that port to its
    r-0001. A's restarted watcher records r-0002 gone at its first pass and never routes to B's
    replica; a second watcher of A is refused in one line; A's destroy, while B's watcher runs,
    leaves B's watcher, replicas and router alone."""
    a, b = services
    a.write()
    b.write()
    watchers: list[subprocess.Popen[str]] = []

    def watch(svc: Service) -> subprocess.Popen[str]:
        with (svc.root / f"watch-{len(watchers)}.log").open("w") as log:
            watchers.append(svc.skyhedge("watch", "SPEC", "--interval", "1", out=log))
        return watchers[-1]

    def serving(svc: Service, ids: set[str]) -> bool:
        st = load_state(svc.state_dir, "svc")
        routed = {pair[0] for pair in st.extra.get("routed") or []}
        return {r.id for r in st.live() if r.fact().ready} == ids == routed

    try:
        first = watch(a)
        wait_for("A to serve r-0001 and r-0002", lambda: serving(a, {"r-0001", "r-0002"}), 60)
        code, out = a.run("watch", "SPEC")
        assert (
            code == 1 and out.count("\n") == 1 and f"the watcher of this service runs (pid {first.pid}" in out
        )
        first.kill()
        first.wait()
        ours = a.replicas()
        os.kill(ours["r-0002"][0], signal.SIGKILL)
        wait_for("A's r-0002 to exit", lambda: port_free(ours["r-0002"][1]))
        watch(b)
        wait_for("B to serve r-0001 and r-0002", lambda: serving(b, {"r-0001", "r-0002"}), 60)
        theirs = b.replicas()
        assert theirs["r-0001"][1] == ours["r-0002"][1]
        watch(a)
        wait_for("A to record r-0002 gone", lambda: load_state(a.state_dir, "svc").replicas["r-0002"].gone_at)
        assert "model-b" not in {a.ask() for _ in range(6)}
        wait_for(
            "A to serve again",
            lambda: len(load_state(a.state_dir, "svc").live()) == 2 and a.ask() == "model-a",
            60,
        )
        assert "model-b" not in {a.ask() for _ in range(6)}
        watchers[-1].send_signal(signal.SIGTERM)
        assert watchers[-1].wait(timeout=60) == 0
        code, out = a.run("destroy", "SPEC", "--auto-approve")
        assert code == 0, out
        time.sleep(2)  # (B's watcher's passes go on meanwhile)
        assert a.replicas() == {} and b.replicas() == theirs and watchers[1].poll() is None
        assert {b.ask() for _ in range(4)} == {"model-b"} and serving(b, {"r-0001", "r-0002"})
    finally:
        for proc in watchers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
