"""Day-2 operations on a local service's state dir, with the real (embedded) Terraform engine, real
replica processes and real nginx (docs/controller.md, "Moving or restoring a state dir"):

- moved (`mv`, or `cp -a` then the old one deleted): the running replicas and the router are the
  state dir's still. Terraform's recorded backend path named the old place, and every apply after
  the move failed at `terraform init` ("A change in the backend configuration has been detected");
  the router started from the old place held the port ("Address already in use");
- copied (`cp -a` of a live state dir, both kept): the copy refuses in one line, touching nothing;
- restored onto a fresh machine: pid files naming pids that now belong to other processes are
  judged gone, replaced, and those processes never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
from local_support import get, make_service
from routing_support import free_port, have_nginx, teardown_router

from skyhedge.apply import Workspace, apply_service, destroy_service
from skyhedge.clouds.local import runtime_dir
from skyhedge.clouds.local.processes import (
    REPLICA_ENV,
    RUNTIME_ENV,
    LocalProcess,
    foreign_listeners,
    kill_all,
    list_pidfiles,
    proc_starttime,
    write_pidfile,
)
from skyhedge.engine import Terraform
from skyhedge.errors import RenderError, RoutingError
from skyhedge.routing import Router, Upstream
from skyhedge.spec import load_spec
from skyhedge.state import load_state


@pytest.fixture
def svc(tmp_path, monkeypatch):
    """A two-replica local service; every replica process it leaves (under any of the paths its
    state dir had, or recorded in any pid file a test wrote) is SIGKILLed at the end."""
    monkeypatch.chdir(tmp_path)  # local replicas run in the directory skyhedge runs in
    service = make_service(tmp_path, "moved", replicas=2)
    service.write(replicas=2)
    yield service
    for state in [service.state_dir, *tmp_path.glob("elsewhere*")]:
        for proc in list_pidfiles(runtime_dir(state)):
            if proc_starttime(proc.pid) == proc.starttime:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pgid, signal.SIGKILL)
        kill_all(runtime_dir(state))


def _apply(state_dir: Path, spec_path: Path):
    return apply_service(load_spec(spec_path), state_dir, route=False)


def _copy_refused(svc, copy: Path, original: Path) -> None:
    """Apply the copy `copy` with one replica fewer: refused in one line naming `original`, the
    state dir whose running replicas (r-0001, r-0002) it records too."""
    svc.write(replicas=1)
    with pytest.raises(RenderError) as refused:
        _apply(copy, svc.spec_path)
    line = str(refused.value)
    assert line.startswith(
        f"{copy}: replicas r-0001, r-0002 are the running replicas of the state dir "
        f"{original.resolve()}, which records the same processes: this one is a copy of it (`cp -a`?)"
    )
    assert "\n" not in line


def _running(state_dir: Path) -> dict[str, int]:
    return {
        p.id: p.pid for p in list_pidfiles(runtime_dir(state_dir)) if proc_starttime(p.pid) == p.starttime
    }


def test_the_state_dirs_own_backend_is_taken_as_it_is_now_at_init(svc, tmp_path):
    root = Workspace(load_spec(svc.spec_path), svc.state_dir).root("local", "local")
    assert root.backend_config == (f"path={svc.state_dir.resolve()}/tf/state/local-local.tfstate",)
    assert Terraform(home=tmp_path).init_args(root)[-1] == "-reconfigure"


def test_a_moved_state_dir_keeps_its_replicas_and_a_copy_of_it_refuses(svc, tmp_path):
    first = _apply(svc.state_dir, svc.spec_path)
    assert first.ok, first.errors
    before = _running(svc.state_dir)
    assert sorted(before) == ["r-0001", "r-0002"]

    moved = tmp_path / "elsewhere"
    os.rename(svc.state_dir, moved)  # the watcher stopped; `mv state elsewhere`
    again = _apply(moved, svc.spec_path)
    assert again.ok, again.errors  # was: "terraform init failed in local/local (A change in the backend..."
    assert again.created == [] and again.deleted == []
    assert _running(moved) == before  # the same processes: none stopped, none launched
    for proc in list_pidfiles(runtime_dir(moved)):  # adopted: recorded as this path's now
        assert proc.runtime == str(runtime_dir(moved)) and proc.log.startswith(str(moved.resolve()))
    tf_state = json.loads((moved / "tf" / "state" / "local-local.tfstate").read_text())
    dirs = {
        i["attributes"]["input"]["value"]["runtime_dir"]
        for r in tf_state["resources"]
        for i in r["instances"]
    }
    assert dirs == {str(runtime_dir(moved))}
    state = load_state(moved, "moved")
    assert sorted(r.id for r in state.live()) == ["r-0001", "r-0002"]
    for rec in state.live():
        assert get(f"{rec.endpoint}/health") == (200, {"replica": rec.id})

    # an operator's mistake: a copy of the live state dir, applied with one replica fewer
    copy = tmp_path / "elsewhere-copy"
    shutil.copytree(moved, copy, symlinks=True)
    _copy_refused(svc, copy, moved)
    assert _running(moved) == before and _running(copy) == before  # nothing stopped

    # the one that launched them still manages them: it scales down and destroys as before
    down = _apply(moved, svc.spec_path)
    assert down.ok and len(down.deleted) == 1 and len(_running(moved)) == 1
    assert destroy_service(load_spec(svc.spec_path), moved, route=False).ok
    assert _running(moved) == {} and all(proc_starttime(pid) is None for pid in before.values())


def test_a_restored_state_dir_replaces_its_gone_replicas_and_signals_no_process_its_pid_files_name(
    svc, tmp_path
):
    assert _apply(svc.state_dir, svc.spec_path).ok
    backup = tmp_path / "elsewhere-backup"
    shutil.copytree(svc.state_dir, backup, symlinks=True)
    kill_all(runtime_dir(svc.state_dir))  # the old machine, and its processes, are gone
    shutil.rmtree(svc.state_dir)
    # on the new machine, the recorded pids belong to unrelated processes (of this user)
    others = [subprocess.Popen(["sleep", "600"], start_new_session=True) for _ in range(2)]
    try:
        for proc, other in zip(list_pidfiles(runtime_dir(backup)), others, strict=True):
            with open(runtime_dir(backup) / "replicas" / f"{proc.id}.json", "w") as fh:
                json.dump({**asdict(proc), "pid": other.pid, "pgid": other.pid}, fh)
        restored = _apply(backup, svc.spec_path)
        assert restored.ok, restored.errors
        assert sorted(restored.created) == ["r-0003", "r-0004"]
        assert all(other.poll() is None for other in others)  # never signalled
        state = load_state(backup, "moved")
        assert {r.id: r.reason for r in state.replicas.values() if r.gone_at} == {
            "r-0001": "failed",
            "r-0002": "failed",
        }
        assert sorted(_running(backup)) == ["r-0003", "r-0004"]
    finally:
        for other in others:
            other.kill()
            other.wait()


def test_a_replica_launched_before_the_move_holds_its_own_port_not_another_services(tmp_path):
    """Its process carries the old path as its marker: a probe failing once (not READY) had the
    watcher judge its port held by "replica r-0001 of <old path>", and replace it."""
    port = free_port()
    old, new = tmp_path / "old" / "local", tmp_path / "new" / "local"
    env = {**os.environ, RUNTIME_ENV: str(old), REPLICA_ENV: "r-0001"}
    server = (
        f"import socket,time; s=socket.socket(); s.bind(('127.0.0.1',{port})); s.listen(); time.sleep(600)"
    )
    child = subprocess.Popen([sys.executable, "-c", server], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while foreign_listeners(new, {"r-0001": port}) == {} and time.monotonic() < deadline:
            time.sleep(0.05)
        # not recorded here: another state dir's replica on our port, as before
        assert foreign_listeners(new, {"r-0001": port}) == {"r-0001": f"r-0001 of {old}"}
        starttime = proc_starttime(child.pid)
        assert starttime is not None
        write_pidfile(
            new,
            LocalProcess("r-0001", child.pid, child.pid, port, "local-a", "spot", 0.0, starttime, ""),
        )
        assert foreign_listeners(new, {"r-0001": port}) == {}
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(not have_nginx(), reason="nginx is not installed")
def test_the_router_of_a_moved_state_dir_is_replaced_and_a_copys_is_refused(tmp_path):
    from routing_support import make_spec

    spec = make_spec(free_port())
    first = Router(spec, tmp_path / "state")
    ups = [Upstream("r-0001", "http://127.0.0.1:9")]
    first.up(ups)
    old_pid = first.pid()
    moved = tmp_path / "elsewhere"
    router = Router(spec, moved)
    try:
        os.rename(tmp_path / "state", moved)
        assert router.pid() is None  # started from the old path: not this path's master
        router.preflight()  # was: "service.port N ... not available for the router (Address already in use)"
        router.up(ups)
        assert router.pid() not in (None, old_pid)
        assert proc_starttime(old_pid) is None  # the old one stopped, not left holding nothing
        copy = tmp_path / "elsewhere-copy"
        shutil.copytree(moved, copy, symlinks=True)
        with pytest.raises(Exception, match=r"this one is a copy of it \(`cp -a`\?\)"):
            Router(spec, copy).preflight()  # the live router's pid file, copied: never touched
        assert router.pid() is not None
    finally:
        teardown_router(router)
        teardown_router(first)


def test_the_router_of_a_moved_state_dir_is_stopped_by_routing_down(tmp_path):
    """`mv state elsewhere`, then `destroy` (or `routing down`) from the new path: the nginx started
    from the old path was not its master, so only the pid file was removed, and nginx held the
    service port for good (measured: `destroy --auto-approve` said "taking the router down",
    exit 0, and the master ran on, found by no command any more). It is stopped, as `up` replaces
    it; a pid of it taken since by another service's router on another port is left alone
    (`_moved_router`)."""
    from routing_support import make_spec

    spec = make_spec(free_port())
    first = Router(spec, tmp_path / "state")
    first.up([Upstream("r-0001", "http://127.0.0.1:9")])
    old_pid = first.pid()
    assert old_pid is not None
    moved = tmp_path / "elsewhere"
    router = Router(spec, moved)
    try:
        os.rename(tmp_path / "state", moved)
        router.down(timeout=3.0)
        deadline = time.monotonic() + 5
        while proc_starttime(old_pid) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc_starttime(old_pid) is None  # was: running on, the service port held
    finally:
        teardown_router(router)
        teardown_router(first)
        with contextlib.suppress(ProcessLookupError):
            if proc_starttime(old_pid) is not None:
                os.kill(old_pid, signal.SIGKILL)


def test_a_copy_of_a_moved_state_dir_never_stops_the_router_the_original_runs(tmp_path):
    """`mv state a`, then `cp -a a c`: both hold the pid file of the router started from `state`
    (a path now gone), which is `a`'s. `routing down` (or `destroy`) of the copy stopped it
    (measured before: `a`'s nginx gone, its service port refusing connections) and `up` of the
    copy replaced it by the copy's. The router's own open log, which the kernel names at the path
    it has now (inside `a`), says whose it is: the copy is refused in one line, nothing stopped."""
    from routing_support import make_spec

    spec = make_spec(free_port())
    first = Router(spec, tmp_path / "state")
    first.up([Upstream("r-0001", "http://127.0.0.1:9")])
    old_pid = first.pid()
    assert old_pid is not None
    moved, copy = tmp_path / "a", tmp_path / "c"
    try:
        os.rename(tmp_path / "state", moved)
        shutil.copytree(moved, copy, symlinks=True)
        for attempt in (Router(spec, copy).down, Router(spec, copy).preflight):
            with pytest.raises(RoutingError, match=r"this one is a copy of it"):
                attempt()
            assert proc_starttime(old_pid) is not None  # was: stopped by the copy's `down`
        Router(spec, moved).down(timeout=3.0)  # the original's own: stopped
        deadline = time.monotonic() + 5
        while proc_starttime(old_pid) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc_starttime(old_pid) is None
    finally:
        teardown_router(first)
        with contextlib.suppress(ProcessLookupError):
            if proc_starttime(old_pid) is not None:
                os.kill(old_pid, signal.SIGKILL)


def test_a_state_kept_elsewhere_is_not_dropped_when_the_spec_switches_to_the_state_dirs_own(svc, tmp_path):
    """`-reconfigure` is for the state dir's own state file at a new path, not for a backend the
    spec named before (a `terraform.config.path`, an S3 bucket): taken then, `init` forgot that
    state without a word, the state dir's own (empty) state was planned from, and every replica was
    launched again beside the running ones (their processes, or VMs, no state recorded any more).
    Terraform's refusal stands instead: the user migrates the state (docs/controller.md)."""
    import yaml

    kept = tmp_path / "tfstate"
    data = yaml.safe_load(svc.spec_path.read_text())
    svc.spec_path.write_text(
        yaml.safe_dump({**data, "terraform": {"backend": "local", "config": {"path": str(kept)}}})
    )
    first = _apply(svc.state_dir, svc.spec_path)
    assert first.ok, first.errors
    before = _running(svc.state_dir)
    assert sorted(before) == ["r-0001", "r-0002"]

    svc.write(replicas=2)  # the same spec, its `terraform` section dropped
    again = _apply(svc.state_dir, svc.spec_path)
    assert not again.ok and again.created == []  # was: ok, with r-0003 and r-0004 launched
    assert "Backend configuration changed" in again.errors[0].stderr
    assert _running(svc.state_dir) == before


@pytest.mark.skipif(not have_nginx(), reason="nginx is not installed")
@pytest.mark.parametrize("its_pid_file", ["kept", "deleted"])
def test_a_stale_router_pid_now_another_services_router_is_neither_a_copy_nor_stopped(tmp_path, its_pid_file):
    """Our router gone without its pid file (`kill -9`, a reboot), its pid taken since by the
    router of another service on this machine (another port): that one is not ours from before a
    move, since it does not hold our port. Before, `up` refused this state dir as "a copy" of the
    other's (every pass, until the pid file was deleted by hand), or, the other's router folder
    deleted (`rm -rf router/`: a case `routing` supports), SIGQUIT the other service's router."""
    from routing_support import make_spec

    ups = [Upstream("r-0001", "http://127.0.0.1:9")]
    other = Router(make_spec(free_port(), name="other"), tmp_path / "other")
    ours = Router(make_spec(free_port()), tmp_path / "ours")
    try:
        other.up(ups)
        theirs = other.pid()
        assert theirs is not None
        ours.up(ups)
        teardown_router(ours)  # gone, and its pid file left naming a pid the other's router has now
        ours.paths.pid.write_text(f"{theirs}\n")
        if its_pid_file == "deleted":
            other.paths.pid.unlink()
        ours.preflight()
        ours.up(ups)  # was: "... is held by the router of the state dir .../other ...: a copy of it"
        assert ours.pid() not in (None, theirs)
        assert nginx_alive(theirs)  # was (its pid file deleted): stopped by SIGQUIT
    finally:
        teardown_router(ours)
        teardown_router(other)
        for pid in nginx_masters(other):
            os.kill(pid, signal.SIGKILL)


def nginx_alive(pid: int) -> bool:
    from skyhedge.routing import nginx

    return nginx.alive(pid) and "nginx: master process" in nginx.cmdline(pid)


def nginx_masters(router: Router) -> list[int]:
    from skyhedge.routing import nginx

    return nginx.masters_of(router.paths.conf)


@contextlib.contextmanager
def _moved_leader_with_a_setsid_worker(
    old: Path, new: Path, port: int
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Replica r-0001 launched under runtime dir `old` (its markers name it) as a server whose
    worker binds `port` from a session of its own (`setsid`), recorded in `new`'s pid file as a
    moved state dir records it; yields the leader and the worker's pid, both killed on the way out."""
    env = {**os.environ, RUNTIME_ENV: str(old), REPLICA_ENV: "r-0001"}
    worker = (
        f"import socket,time; s=socket.socket(); s.bind(('127.0.0.1',{port})); s.listen(); time.sleep(600)"
    )
    leader = (
        "import subprocess,sys; "
        f"w=subprocess.Popen([sys.executable,'-c',{worker!r}], start_new_session=True); "
        "print(w.pid, flush=True); w.wait()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", leader], env=env, start_new_session=True, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    worker_pid = int(child.stdout.readline())
    try:
        starttime = proc_starttime(child.pid)
        assert starttime is not None
        write_pidfile(
            new,
            LocalProcess("r-0001", child.pid, child.pid, port, "local-a", "spot", 0.0, starttime, ""),
        )
        yield child, worker_pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker_pid, signal.SIGKILL)
        child.kill()
        child.wait()
        child.stdout.close()


def test_a_moved_replicas_worker_in_a_process_group_of_its_own_holds_its_port_for_it(tmp_path):
    """A server whose worker binds the port from a session of its own (`setsid`): after a move its
    marker names the old path like its leader's, and its process group is not the recorded one;
    it was judged another state dir's replica on our port (GONE, replaced) once not READY."""
    port = free_port()
    old, new = tmp_path / "old" / "local", tmp_path / "new" / "local"
    with _moved_leader_with_a_setsid_worker(old, new, port) as (child, worker_pid):
        _wait_listening(port)
        assert os.getpgid(worker_pid) != child.pid
        assert foreign_listeners(new, {"r-0001": port}) == {}  # was: {"r-0001": "r-0001 of <old>"}


def _wait_listening(port: int) -> None:
    import socket

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def test_plan_of_a_moved_state_dir_writes_no_pid_file(svc, tmp_path):
    """`plan` writes nothing (docs): it renders the roots in memory to tell pending work, and that
    render rewrote the moved replicas' pid files (adopting them). `apply` adopts them still."""
    assert _apply(svc.state_dir, svc.spec_path).ok
    moved = tmp_path / "elsewhere"
    os.rename(svc.state_dir, moved)
    files = sorted((runtime_dir(moved) / "replicas").glob("*.json"))
    before = {f.name: f.read_bytes() for f in files}
    from click.testing import CliRunner

    from skyhedge.cli import main

    done = CliRunner().invoke(main, ["plan", str(svc.spec_path), "--state-dir", str(moved)])
    assert done.exit_code == 0, done.output
    assert {f.name: f.read_bytes() for f in files} == before  # was: rewritten, `runtime` the new path
    assert _apply(moved, svc.spec_path).ok
    assert {p.runtime for p in list_pidfiles(runtime_dir(moved))} == {str(runtime_dir(moved))}


def _can_bind_mount() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_bind_mount(), reason="no `unshare -rm` (user and mount namespaces)")
def test_the_state_dir_under_a_second_name_is_not_a_copy_of_itself(svc, tmp_path):
    """The same state dir reached through a bind mount (a container's volume, `/mnt/x` bound to
    `/data`): its pid files name it by the path the replicas were launched under, and that path's
    pid files are the very same files. Before, `ownership` took them for a copy's, and the
    original was refused as "a copy of" itself."""
    assert _apply(svc.state_dir, svc.spec_path).ok
    alias = tmp_path / "alias"
    alias.mkdir()
    check = (
        "import sys; from pathlib import Path; from skyhedge.clouds.local.render import claim_replicas; "
        "print(claim_replicas(Path(sys.argv[1])))"
    )
    script = f'mount --bind "$1" "$2" && exec {sys.executable} -c "$3" "$2/local"'
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(svc.state_dir), str(alias), check],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert (done.returncode, done.stdout) == (0, "[]\n"), done.stderr  # was: "...: this one is a copy of it"


def test_a_copy_whose_original_still_holds_its_terraform_state_is_refused_at_init(svc, tmp_path):
    """`-reconfigure` took a copied state dir's own state file as its state whatever the original
    did: on AWS or GCP, where no local process tells a copy (`cp -a`, a backup restored next to the
    original), the copy's apply then replaced, scaled down or destroyed the original's machines
    (here: local replicas no longer running, so only Terraform's state tells; before
    `-reconfigure`, `init` refused such a copy). Refused in one line naming the original."""
    assert _apply(svc.state_dir, svc.spec_path).ok
    kill_all(runtime_dir(svc.state_dir))  # no running process tells the copy any more
    copy = tmp_path / "elsewhere-copy"
    shutil.copytree(svc.state_dir, copy, symlinks=True)
    again = _apply(copy, svc.spec_path)
    assert not again.ok and again.created == []  # was: ok, r-0003 and r-0004 launched by the copy
    assert str(again.errors[0]).startswith(
        f"{copy}: the Terraform state of local/local is a copy of {svc.state_dir.resolve()}'s, which "
        "is still there"
    )
    assert _running(copy) == {}
    assert _apply(svc.state_dir, svc.spec_path).ok  # the original: as before


def test_stopping_a_moved_replica_stops_its_worker_in_a_session_of_its_own(tmp_path):
    """Stopping a replica signals its process group and the processes carrying its markers, found
    by this runtime dir's path: one launched before a move carries the old path, and its worker in
    a session of its own (setsid) outlived every stop of it after the move (its port held)."""
    from skyhedge.clouds.local.processes import stop_replica

    port = free_port()
    old, new = tmp_path / "old" / "local", tmp_path / "new" / "local"
    with _moved_leader_with_a_setsid_worker(old, new, port) as (child, worker_pid):
        _wait_listening(port)
        assert stop_replica(new, "r-0001", grace=2.0)
        child.wait(timeout=10)
        deadline = time.monotonic() + 5
        while proc_starttime(worker_pid) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc_starttime(worker_pid) is None  # was: running on, its port held


@pytest.mark.parametrize(
    ("recorded", "reconfigure"),
    [
        ({"type": "s3", "config": {"bucket": "b", "key": "k"}}, False),
        ({"type": "local", "config": {"path": "/srv/tfstate/local-local.tfstate"}}, False),
        ({"type": "local", "config": {"path": "/gone/state/tf/state/local-local.tfstate"}}, True),
    ],
)
def test_only_a_state_dirs_own_recorded_backend_is_reconfigured(svc, tmp_path, recorded, reconfigure):
    ws = Workspace(load_spec(svc.spec_path), svc.state_dir)
    data = ws.tf_dir / "data" / "local-local"
    data.mkdir(parents=True)
    (data / "terraform.tfstate").write_text(json.dumps({"version": 3, "backend": recorded}))
    root = ws.root("local", "local")
    assert root.reconfigure is reconfigure and root.refused is None
    assert ("-reconfigure" in Terraform(home=tmp_path).init_args(root)) is reconfigure


def _marked_with(runtime: Path, rid: str, service: str, *, launched: bool = False) -> subprocess.Popen[bytes]:
    """A process carrying the launcher's markers (`runtime`, replica `rid`, `service`, and with
    `launched` the runtime dir's identity, as the launcher gives), in a session of its own, as a
    replica's worker or what a cut-short `run.setup` left is."""
    from skyhedge.clouds.local.processes import RUNTIME_ID_ENV, runtime_identity

    env = {**os.environ, RUNTIME_ENV: str(runtime), REPLICA_ENV: rid, "SKYHEDGE_SERVICE": service}
    if launched:
        env[RUNTIME_ID_ENV] = str(runtime_identity(runtime))
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], env=env, start_new_session=True
    )


def test_destroy_of_a_moved_state_dir_stops_what_carries_its_old_path_and_nothing_else(svc, tmp_path):
    """Moved, applied (the replicas adopted: their pid files name the new path), then `destroy`:
    what carried the old path and no pid file named was left running, since destroy's sweep looked
    only for the new path's marker (measured: a crashed replica's setsid worker, `sleep 600`, ran
    on after `destroy` exited 0). The paths the state dir had are kept in `local/paths.json`; a
    process marked with one that nothing holds now is stopped, one of another path or service is
    not."""
    svc.write(replicas=2, command=f"setsid -f sleep 600; exec {sys.executable} {svc.server}")
    assert _apply(svc.state_dir, svc.spec_path).ok
    old = runtime_dir(svc.state_dir).resolve()
    cut_short = _marked_with(old, "r-0003", "moved", launched=True)  # a launch cut short: no pid file
    other_dir = tmp_path / "other-state" / "local"
    other_dir.mkdir(parents=True)
    foreign = [
        _marked_with(other_dir, "r-0001", "moved"),  # another state dir's, still there
        _marked_with(old, "r-0009", "another-service", launched=True),
        _marked_with(old, "r-0004", "moved"),  # carrying the old path, not launched from this dir
    ]
    try:
        moved = tmp_path / "elsewhere"
        os.rename(svc.state_dir, moved)
        assert _apply(moved, svc.spec_path).ok  # adopts r-0001, r-0002 (pid files rewritten)
        leader = {p.id: p for p in list_pidfiles(runtime_dir(moved))}["r-0001"]
        os.killpg(leader.pgid, signal.SIGKILL)  # the replica crashed; its setsid worker runs on
        report = destroy_service(load_spec(svc.spec_path), moved, route=False)
        assert report.ok, report.errors
        strangers = {p.pid for p in foreign}
        deadline = time.monotonic() + 5
        while set(_carrying(old, "moved")) - strangers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(_carrying(old, "moved")) - strangers == set()  # was: the worker and the cut-short launch
        assert cut_short.poll() is not None
        assert all(p.poll() is None for p in foreign)  # not ours: untouched
    finally:
        for proc in [cut_short, *foreign]:
            proc.kill()
            proc.wait()
        kill_all(old)


def _carrying(runtime: Path, service: str) -> list[int]:
    from skyhedge.clouds.local.processes import find_processes

    found = []
    marker = f"\0SKYHEDGE_SERVICE={service}\0".encode()
    for pid in find_processes(runtime):
        with contextlib.suppress(OSError):  # (gone meanwhile)
            if marker in b"\0" + Path(f"/proc/{pid}/environ").read_bytes():
                found.append(pid)
    return found


def _launched_into(runtime: Path, rid: str, service: str) -> subprocess.Popen[bytes]:
    """A replica's process as the launcher starts it into `runtime` (its environment's markers
    from `replica_env`, the path recorded in `paths.json`), in a session of its own."""
    from skyhedge.clouds.local.launcher import replica_env
    from skyhedge.clouds.local.processes import remember_paths

    remember_paths(runtime)
    cfg = {"id": rid, "service": service, "port": 9, "zone": "z1", "market": "spot"}
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        env=replica_env(cfg, runtime),
        start_new_session=True,
    )


@pytest.mark.parametrize("other_service", ["moved", "another-service"])
def test_a_moved_sweep_never_takes_another_state_dir_that_was_at_the_same_path(tmp_path, other_service):
    """State dir A ran at PATH and was moved away; another one (B) was made at PATH later, ran
    replicas, and was moved away too. Nothing is at PATH now, so both list it in `paths.json`,
    and B's processes carry PATH's marker with the same replica IDs. A's sweep must take none of
    them (measured before: A's `stop_replica` of its crashed r-0001, which every launch of r-0001
    runs first, killed B's r-0001 whatever its service; A's `destroy` took every process of B's
    of the same service name)."""
    from skyhedge.clouds.local.processes import moved_strays, remember_paths, stop_replica

    place = tmp_path / "sd"
    (place / "local").mkdir(parents=True)
    mine = _launched_into(place / "local", "r-0002", "moved")  # A's worker, outliving its replica
    os.rename(place, tmp_path / "a")
    (place / "local").mkdir(parents=True)
    theirs = _launched_into(place / "local", "r-0001", other_service)
    os.rename(place, tmp_path / "b")
    a_runtime = tmp_path / "a" / "local"
    remember_paths(a_runtime)  # (A launched again after its move)
    try:
        assert stop_replica(a_runtime, "r-0001", grace=0.0) is False  # none of A's carries r-0001
        assert moved_strays(a_runtime, "moved") == [mine.pid]
        assert theirs.poll() is None
        assert stop_replica(a_runtime, "r-0002", grace=0.0) is True  # A's own still found
        assert mine.wait(timeout=5) is not None
    finally:
        for proc in (mine, theirs):
            proc.kill()
            proc.wait()


def test_a_hostile_or_malformed_paths_json_is_one_line_and_stops_nothing(tmp_path, caplog):
    """`local/paths.json` decides where destroy looks for a moved state dir's processes: one that
    is malformed (deeply nested JSON, not UTF-8, not an object) must neither raise out of a
    launch or a destroy (measured before: `[[[[...` raised RecursionError, a traceback) nor make a
    process carrying one of the paths it lists stopped unless this runtime dir launched it."""
    from skyhedge.clouds.local.processes import PATHS_FILE, moved_strays, remember_paths

    runtime = tmp_path / "sd" / "local"
    runtime.mkdir(parents=True)
    other = tmp_path / "gone" / "local"  # nothing there: a path no state dir holds now
    stranger = _marked_with(other, "r-0001", "moved")
    try:
        for text in ("[" * 100000, "\xff\xfe", '["/x"]', "{"):
            (runtime / PATHS_FILE).write_bytes(text.encode("latin-1"))
            caplog.clear()
            assert moved_strays(runtime, "moved") == []
            said = [r.getMessage() for r in caplog.records]
            assert len(said) == 1 and said[0].startswith(f"{runtime / PATHS_FILE}: not a JSON object"), said
            remember_paths(runtime)  # a launch: rewritten with the path it has now
        (runtime / PATHS_FILE).write_text(json.dumps({"paths": [str(other)]}))  # hostile
        assert moved_strays(runtime, "moved") == []
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def _moved_and_copied(svc, tmp_path) -> tuple[Path, Path, dict[str, int]]:
    """Apply, `mv state elsewhere`, `cp -a elsewhere elsewhere-copy`: (moved, copy, the running
    replicas before)."""
    assert _apply(svc.state_dir, svc.spec_path).ok
    before = _running(svc.state_dir)
    moved = tmp_path / "elsewhere"
    os.rename(svc.state_dir, moved)
    copy = tmp_path / "elsewhere-copy"
    shutil.copytree(moved, copy, symlinks=True)
    return moved, copy, before


def test_a_copy_of_a_moved_state_dir_refuses_and_the_moved_one_still_adopts(svc, tmp_path):
    """`mv state a; cp -a a c` before `a` ran anything: both hold pid files naming the path the
    replicas were launched under, which is gone, so by path alone each took them for its own, moved
    there (measured: `c` adopted `a`'s replicas, and its apply with one replica fewer stopped one of
    them). The replicas carry the identity of the `local/` folder they were launched into
    (`SKYHEDGE_LOCAL_RUNTIME_ID`), which `mv` keeps and `cp -a` does not: the copy is refused as a
    plain copy is, naming `a`, and touches nothing; `a` adopts them as any moved state dir."""
    moved, copy, before = _moved_and_copied(svc, tmp_path)
    pid_files = sorted((runtime_dir(copy) / "replicas").glob("*.json"))
    kept = {f.name: f.read_bytes() for f in pid_files}

    _copy_refused(svc, copy, moved)
    assert {f.name: f.read_bytes() for f in pid_files} == kept  # was: adopted (rewritten)
    assert _running(moved) == before  # was: r-0002 stopped by the copy's scale-down

    svc.write(replicas=2)
    again = _apply(moved, svc.spec_path)  # the real move: adopted, kept running
    assert again.ok and again.created == [] and again.deleted == [], again.errors
    assert _running(moved) == before
    assert {p.runtime for p in list_pidfiles(runtime_dir(moved))} == {str(runtime_dir(moved))}


def test_a_state_dir_copied_to_another_place_then_deleted_there_adopts_its_replicas(svc, tmp_path):
    """A move to another file system is a copy, then a delete: the `local/` folder the replicas
    were launched into is gone (their log open under a deleted path), so nothing else records
    them, and the copy adopts them, keeps them running, launches none (as before the identity
    check: only a folder still there can be the one it is a copy of)."""
    moved, copy, before = _moved_and_copied(svc, tmp_path)
    shutil.rmtree(moved)
    again = _apply(copy, svc.spec_path)
    assert again.ok and again.created == [] and again.deleted == [], again.errors
    assert _running(copy) == before
    assert {p.runtime for p in list_pidfiles(runtime_dir(copy))} == {str(runtime_dir(copy))}
