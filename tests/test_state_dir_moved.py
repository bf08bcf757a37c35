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
from skyhedge.errors import RenderError
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
    svc.write(replicas=1)
    with pytest.raises(RenderError) as refused:
        _apply(copy, svc.spec_path)
    assert str(refused.value).startswith(
        f"{copy}: replicas r-0001, r-0002 are the running replicas of the state dir {moved.resolve()}, which "
        "records the same processes: this one is a copy of it (`cp -a`?)"
    )
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
