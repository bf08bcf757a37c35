"""Upgrading skyhedge under a running service: the current code takes over a state dir that an
older release wrote, and leaves the replicas that release launched running.

The fixture (tests/data/upgrade/) is what a release wrote, stripped of this machine's paths and
ports (placeholders `@...@`, filled in here): `2026-11-28-local` is commit 4b717e0's
`skyhedge up` of a two-zone local service (three READY replicas, watcher stopped), before replicas
recorded a revision. Its Terraform state launched each replica with
`triggers_replace = {zone, market, port, command, setup, env}`; the module now has
`{zone, market, port, revision}`, and the first apply of the current code replaced (stopped, then
started) every replica at once. docs/controller.md, "Upgrading skyhedge"."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from local_support import SERVER, free_base_port, get

import skyhedge
from skyhedge.apply import apply_service, destroy_service
from skyhedge.clouds.local import runtime_dir
from skyhedge.clouds.local.processes import (
    REPLICA_ENV,
    RUNTIME_ENV,
    SERVICE_ENV,
    LocalProcess,
    kill_all,
    list_pidfiles,
    log_path,
    proc_starttime,
    replicas_dir,
    write_pidfile,
)
from skyhedge.probe_store import EARLIER_PROBES_KEY, PROBE_KEY, ProbeStore
from skyhedge.spec import load_spec
from skyhedge.state import STATE_FILE, ServiceState, load_state, save_state

FIXTURES = Path(__file__).parent / "data" / "upgrade"


def _terraform_ids(tfstate: Path) -> dict[str, str]:
    """replica ID -> the `id` of its terraform_data (a new one is a replaced replica)."""
    data = json.loads(tfstate.read_text(encoding="utf-8"))
    return {
        inst["index_key"]: inst["attributes"]["id"]
        for res in data["resources"]
        if res["type"] == "terraform_data"
        for inst in res["instances"]
    }


class OldService:
    """The fixture's state dir under `root`, with the replicas it records running as processes
    the older release would have left behind (pid files in the launcher's format)."""

    def __init__(self, root: Path, fixture: str) -> None:
        self.root = root
        self.state_dir = root / "state"
        self.runtime = runtime_dir(self.state_dir).resolve()
        self.base = free_base_port(3)
        self.server = root / "server.py"
        self.server.write_text(SERVER, encoding="utf-8")
        self.processes: list[subprocess.Popen[bytes]] = []
        values = {
            "@RUNTIME_DIR@": str(self.runtime),
            "@PYTHON@": sys.executable,
            "@PYTHONPATH@": str(Path(skyhedge.__file__).resolve().parent.parent),
            **{f"@PORT{n}@": str(self.base + n) for n in (1, 2, 3)},
        }

        def fill(name: str, dest: Path) -> None:
            text = (FIXTURES / fixture / name).read_text(encoding="utf-8")
            for key, value in values.items():
                text = text.replace(key, value)
            assert "@" not in text, f"{name}: a placeholder left unfilled"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text, encoding="utf-8")

        fill("state.json", self.state_dir / "state.json")
        fill("local-local.terraform-state.json", self.tfstate)
        replicas_dir(self.runtime).mkdir(parents=True, exist_ok=True)

    @property
    def tfstate(self) -> Path:
        return self.state_dir / "tf" / "state" / "local-local.tfstate"

    def write_spec(self) -> Path:
        """The spec the fixture was written with (its command: the test's replica server)."""
        spec = {
            "name": "local-echo",
            "placement": {"clouds": ["local"], "zones": ["local-a", "local-b"]},
            "resources": {"local_base_port": self.base},
            "replica_policy": {
                "min_replicas": 1,
                "max_replicas": 2,
                "target_qps_per_replica": 20,
                "num_overprovision": 1,
                "upscale_delay_seconds": 10,
                "downscale_delay_seconds": 30,
                "policy": "skyhedge",
            },
            "readiness_probe": {"path": "/health", "initial_delay_seconds": 10, "timeout_seconds": 2},
            "service": {"host": "127.0.0.1", "port": free_base_port(1) + 1},
            "run": {"command": f"exec {sys.executable} {self.server}"},
        }
        path = self.root / "service.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        return path

    def start_replicas(self) -> dict[str, int]:
        """Start each live replica of the state as the launcher does (its own session, marked with
        the runtime dir and its ID) and record its pid file; returns ID -> pid once all answer."""
        state = json.loads((self.state_dir / "state.json").read_text(encoding="utf-8"))
        pids: dict[str, int] = {}
        for rid, rec in sorted(state["replicas"].items()):
            port = int(rec["outputs"]["port"])
            env = {**os.environ, "PORT": str(port), RUNTIME_ENV: str(self.runtime), REPLICA_ENV: rid}
            # its output to its log, which it holds open (as the older release's launcher had it)
            with open(log_path(self.runtime, rid), "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, str(self.server)],
                    env=env,
                    start_new_session=True,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            self.processes.append(proc)
            started = proc_starttime(proc.pid)
            assert started is not None
            write_pidfile(
                self.runtime,
                LocalProcess(
                    id=rid,
                    pid=proc.pid,
                    pgid=proc.pid,
                    port=port,
                    zone=rec["zone"],
                    market=rec["market"],
                    started_at=time.time(),
                    starttime=started,
                    log=str(log_path(self.runtime, rid)),
                ),
            )
            pids[rid] = proc.pid
        deadline = time.monotonic() + 10
        for rid, rec in state["replicas"].items():
            while True:
                try:
                    get(f"{rec['endpoint']}/health")
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"{rid} never answered"
                    time.sleep(0.05)
        return pids

    def worker(self, replica_id: str) -> subprocess.Popen[bytes]:
        """A process carrying the markers the older release's launcher gave `replica_id` (its
        runtime dir's path, the ID, the service; no runtime dir identity: that release had none),
        in a session of its own: a replica's `setsid` worker, which its replica's group kill misses."""
        env = {
            **os.environ,
            RUNTIME_ENV: str(self.runtime),
            REPLICA_ENV: replica_id,
            SERVICE_ENV: "local-echo",
        }
        proc = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"], env=env, start_new_session=True
        )
        self.processes.append(proc)
        return proc

    def cleanup(self) -> None:
        kill_all(self.runtime)
        for proc in self.processes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@pytest.fixture
def old_service(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    svc = OldService(tmp_path, "2026-11-28-local")
    yield svc
    svc.cleanup()
    shutil.rmtree(tmp_path / "state", ignore_errors=True)


def test_the_first_apply_after_an_upgrade_keeps_the_replicas_an_older_release_launched(old_service):
    pids = old_service.start_replicas()
    ids = _terraform_ids(old_service.tfstate)
    spec = load_spec(old_service.write_spec())
    recorded = load_state(old_service.state_dir, "local-echo")
    fixture_time = max(r.launched_at for r in recorded.live())

    report = apply_service(
        spec, old_service.state_dir, route=False, wait=False, clock=lambda: fixture_time + 60
    )

    assert report.ok, report.errors
    # the root was re-applied (new module, new launcher inputs) ...
    assert report.applied_roots == ["local/local"]
    # ... in place: not one replica stopped or started, no Terraform resource replaced
    assert all(proc.poll() is None for proc in old_service.processes)
    assert {rid: proc_starttime(pid) is not None for rid, pid in pids.items()} == dict.fromkeys(pids, True)
    assert _terraform_ids(old_service.tfstate) == ids
    state = load_state(old_service.state_dir, "local-echo")
    assert sorted(r.id for r in state.live()) == sorted(pids)
    # a replica recorded before revisions existed takes the current one (so it is not outdated)
    assert all(r.revision for r in state.live())
    # and a second apply has nothing left to do
    again = apply_service(
        spec, old_service.state_dir, route=False, wait=False, clock=lambda: fixture_time + 70
    )
    assert again.ok and again.applied_roots == []


#: What a release before `tf/probes.json` (commit c1e790b) kept in state.json for the outdated
#: replicas of a revision, when a reload changed the probe with the revision: the probe itself,
#: its token included.
TOKEN = "Bearer old-release-T0KEN"
OLD_RELEASE_PROBE = {
    "headers": {"Authorization": TOKEN},
    "initial_delay_seconds": 10,
    "path": "/health",
    "post_data": None,
    "timeout_seconds": 2,
}


def _with_old_release_probe(state_dir: Path, revision: str) -> None:
    path = state_dir / STATE_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    data["extra"][EARLIER_PROBES_KEY] = {revision: OLD_RELEASE_PROBE}
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def test_the_first_apply_after_an_upgrade_moves_a_kept_probes_token_out_of_state_json(old_service):
    """An earlier release kept the probe (its `Authorization` token) in state.json, which the umask
    makes 0644 and `--gitops` may commit. Only a watcher's write rewrote it as a digest: `apply`,
    `routing reload|up --probe` and `destroy` wrote it back as they read it, and after an upgrade
    run by `apply` alone the token stayed in state.json for as long as the revision ran."""
    old_service.start_replicas()
    spec = load_spec(old_service.write_spec())
    _with_old_release_probe(old_service.state_dir, "0a6762250693")
    fixture_time = max(r.launched_at for r in load_state(old_service.state_dir, "local-echo").live())

    report = apply_service(
        spec, old_service.state_dir, route=False, wait=False, clock=lambda: fixture_time + 60
    )

    assert report.ok, report.errors
    text = (old_service.state_dir / STATE_FILE).read_text(encoding="utf-8")
    assert "T0KEN" not in text
    # no live replica runs that revision (these were recorded before revisions, so they run the
    # current one): `apply` drops its probe, as a watcher does, instead of writing it back
    assert "0a6762250693" not in json.loads(text)["extra"].get(EARLIER_PROBES_KEY, {})
    store = ProbeStore(old_service.state_dir)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


def test_any_state_write_keeps_an_earlier_releases_probe_as_a_digest(tmp_path):
    """The one writer of state.json (`save_state`: `apply`, `routing`, `destroy`, GitOps and the
    watcher) never writes a probe back into it; probes the file kept already (the probe in force,
    another revision's) still match their digests afterwards."""
    state_dir = tmp_path / "state"
    store = ProbeStore(state_dir)
    in_force = {**OLD_RELEASE_PROBE, "path": "/v2/health", "headers": {"Authorization": "Bearer v2"}}
    store.write([in_force])
    state = ServiceState(service="echo")
    state.extra[PROBE_KEY] = store.digest(in_force)
    state.extra[EARLIER_PROBES_KEY] = {"rev-a": dict(OLD_RELEASE_PROBE), "rev-b": 3}

    save_state(state_dir, state)

    text = (state_dir / STATE_FILE).read_text(encoding="utf-8")
    assert "T0KEN" not in text
    saved = json.loads(text)["extra"]
    assert saved[EARLIER_PROBES_KEY]["rev-b"] == 3  # not a probe: left for the reader's warning
    probes, problem = ProbeStore(state_dir).read()
    assert problem is None
    assert probes[saved[EARLIER_PROBES_KEY]["rev-a"]] == OLD_RELEASE_PROBE
    assert probes[saved[PROBE_KEY]] == in_force
    assert stat.S_IMODE((state_dir / "tf" / "probes.json").stat().st_mode) == 0o600


def test_a_state_dir_moved_after_an_upgrade_still_stops_the_older_releases_strays(old_service, tmp_path):
    """Upgraded, then moved (`mv` while no watcher runs), then `up` at the new path: the replicas
    the older release launched are adopted, and their processes carry only the old path (no
    `SKYHEDGE_LOCAL_RUNTIME_ID`: that release set none). One of them crashes, leaving its `setsid`
    worker: its replacement and `destroy` must stop the worker (measured before, a real `up` of
    the older release then this one: a crashed replica's `sleep` worker outlived both its
    replacement and `destroy`, exit 0). What carries the old path under an ID this state dir never
    adopted from it may be another state dir's that was there: left alone."""
    old_service.start_replicas()
    spec = load_spec(old_service.write_spec())
    fixture_time = max(r.launched_at for r in load_state(old_service.state_dir, "local-echo").live())
    worker = old_service.worker("r-0001")
    stranger = old_service.worker("r-0009")  # no replica of this state dir had that ID
    assert apply_service(
        spec, old_service.state_dir, route=False, wait=False, clock=lambda: fixture_time + 60
    ).ok  # the upgrade: every replica kept
    moved = tmp_path / "moved"
    os.rename(old_service.state_dir, moved)
    report = apply_service(spec, moved, route=False, wait=False, clock=lambda: fixture_time + 70)
    assert report.ok, report.errors
    leaders = {p.id: p for p in list_pidfiles(runtime_dir(moved))}
    assert sorted(leaders) == ["r-0001", "r-0002", "r-0003"]  # adopted, kept running
    os.killpg(leaders["r-0001"].pgid, signal.SIGKILL)  # crashed; its worker runs on

    report = destroy_service(spec, moved, route=False)

    assert report.ok, report.errors
    assert worker.wait(timeout=10) is not None  # was: still running after destroy
    assert stranger.poll() is None


def test_a_launch_keeps_which_replicas_an_older_release_launched_under_an_earlier_path(tmp_path):
    """`local/paths.json` is rewritten at every launch (the path the state dir has then): the IDs
    adopted from an older release under an earlier path stay with that path, so a replacement
    launched after the move does not make its earlier-release siblings' strays unfindable."""
    from skyhedge.clouds.local.processes import RUNTIME_ID_ENV, _launched_here, moved_from, remember_paths

    runtime = tmp_path / "moved" / "local"
    runtime.mkdir(parents=True)
    gone = str(tmp_path / "state" / "local")  # where the older release launched them: nothing there now
    remember_paths(runtime, also=[gone], unmarked={gone: ["r-0002", "r-0001"]})
    remember_paths(runtime)  # a launch after the move

    accept = _launched_here(runtime, moved_from(runtime))
    assert accept({RUNTIME_ENV: gone, REPLICA_ENV: "r-0002"})
    assert not accept({RUNTIME_ENV: gone, REPLICA_ENV: "r-0003"})  # never adopted from there
    assert not accept({RUNTIME_ENV: gone, REPLICA_ENV: "r-0001", RUNTIME_ID_ENV: "1:2"})  # another dir's


def test_a_copy_of_a_state_dir_moved_after_an_upgrade_refuses_the_older_releases_replicas(
    old_service, tmp_path
):
    """`mv state a; cp -a a c` after an upgrade, before `a` ran anything: the older release's
    replicas carry no `SKYHEDGE_LOCAL_RUNTIME_ID`, only the path they were launched under, which is
    gone, so by it alone both `a` and `c` took them for their own, moved there (measured: `c`
    adopted `a`'s three replicas, recorded them in its `paths.json` as `"unmarked"`, and its apply
    of `min_replicas: 1` stopped `a`'s r-0001). The log each replica holds open, named by the kernel at
    its path now (`a`'s `local/replicas/`), says which folder launched it: `c` is refused in one
    line naming `a` and touches nothing; `a` adopts them as any moved state dir."""
    from skyhedge.errors import RenderError

    pids = old_service.start_replicas()
    spec_path = old_service.write_spec()
    spec = load_spec(spec_path)
    fixture_time = max(r.launched_at for r in load_state(old_service.state_dir, "local-echo").live())
    assert apply_service(
        spec, old_service.state_dir, route=False, wait=False, clock=lambda: fixture_time + 60
    ).ok  # the upgrade: every replica kept
    moved, copy = tmp_path / "a", tmp_path / "c"
    os.rename(old_service.state_dir, moved)
    shutil.copytree(moved, copy, symlinks=True)
    kept = {p.name: p.read_bytes() for p in replicas_dir(runtime_dir(copy)).glob("*.json")}

    with pytest.raises(RenderError) as refused:
        apply_service(spec, copy, route=False, wait=False, clock=lambda: fixture_time + 70)
    assert str(refused.value).startswith(
        f"{copy}: replicas r-0001, r-0002, r-0003 are the running replicas of the state dir {moved.resolve()}"
    ), refused.value
    assert {p.name: p.read_bytes() for p in replicas_dir(runtime_dir(copy)).glob("*.json")} == kept
    assert not (runtime_dir(copy) / "paths.json").exists()  # was: the three recorded as its own
    assert all(proc_starttime(pid) is not None for pid in pids.values())

    report = apply_service(spec, moved, route=False, wait=False, clock=lambda: fixture_time + 80)
    assert report.ok and report.created == [] and report.deleted == [], report.errors
    assert {p.id: p.pid for p in list_pidfiles(runtime_dir(moved))} == pids
