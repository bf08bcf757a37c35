"""Unwritable state dirs, work a failed apply left pending, and the service name rule.

1. A state dir that holds its `state.lock` but takes no new file (made read-only, immutable or
   mounted read-only after the first run) is refused in one line, `error: <state dir>: cannot
   write the state dir (<reason>)`, exit 1, before anything is changed, by every writer; a write
   that fails later is the same one line, and a long-running watcher logs it in one line per pass.
2. `plan --detailed-exitcode` exits 2 while a failed or interrupted apply left work undone: a
   recorded replica never created (`pending`), or a root whose inputs differ from its last
   successful apply (`pending_roots`); the table shows such replicas as `+ create (pending)`.
3. The service name's rule says a name may not end with '-'.
4. A save replaces state.json whole (a temp file flushed to disk, then renamed over it): a
   reader sees the old file or the new one, a failed save leaves the old one and no temp file.

A directory that refuses new files is simulated by refusing `tempfile.mkstemp` there (the tests
run as root, whom `chmod` does not stop; one test uses a real `chmod` when not run as root).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from local_support import LocalService, make_service

from skyhedge.apply import apply_service
from skyhedge.cli import main
from skyhedge.errors import SpecError, StateError
from skyhedge.service import set_gitops
from skyhedge.spec import load_spec
from skyhedge.state import (
    LOCK_FILE,
    STATE_FILE,
    ReplicaRecord,
    ServiceState,
    atomic_write_text,
    load_state,
    save_state,
    writer_lock,
)

REPO = Path(__file__).resolve().parents[1]
DENIED = f"cannot write the state dir ({os.strerror(errno.EACCES)})"


def refuse_new_files(monkeypatch: pytest.MonkeyPatch, directory: Path, *, after: int = 0) -> list[str]:
    """Make `directory` refuse new files as a `chmod a-w` directory does (existing files stay
    writable, the lock file included), after `after` files were made there. Returns the
    prefixes of the files asked for, in order."""
    real = tempfile.mkstemp
    target = directory.resolve()
    asked: list[str] = []

    def mkstemp(suffix: Any = None, prefix: Any = None, dir: Any = None, text: bool = False) -> Any:
        if dir is not None and Path(dir).resolve() == target:
            asked.append(str(prefix))
            if len(asked) > after:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target / f"{prefix}x"))
        return real(suffix, prefix, dir, text)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return asked


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def one_error_line(result: Result, state_dir: Path) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, result.output
    assert result.stderr == f"error: {state_dir}: {DENIED}\n"


# ------------------------------------------------------------------------------------------------
# Finding 3: a state dir that takes no new file


@pytest.fixture
def svc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    service = make_service(tmp_path.resolve(), "frozen")
    yield service
    service.cleanup()


def applied_once(svc: LocalService) -> bytes:
    """The state an earlier run leaves: state.json with a replica recorded, and state.lock.
    Returns the state file's bytes (which a refused command must leave as they are)."""
    svc.write(replicas=1)
    state = ServiceState(service="frozen", next_id=2)
    state.replicas["r-0001"] = ReplicaRecord("r-0001", "local", "local", "local-a", "spot", launched_at=1.0)
    with writer_lock(svc.state_dir):
        save_state(svc.state_dir, state)
    assert (svc.state_dir / LOCK_FILE).exists()
    return (svc.state_dir / STATE_FILE).read_bytes()


def test_the_writer_lock_refuses_a_state_dir_that_takes_no_new_file(tmp_path, monkeypatch):
    with writer_lock(tmp_path):  # the first run: state.lock is made
        pass
    with monkeypatch.context() as m:
        refuse_new_files(m, tmp_path)
        with pytest.raises(StateError) as info, writer_lock(tmp_path):
            pytest.fail("the lock was granted in a state dir that cannot be written")
    assert str(info.value) == f"{tmp_path}: {DENIED}"
    with writer_lock(tmp_path):  # refused, it was released: nothing is left held
        pass


def test_a_state_dir_the_lock_made_is_removed_again_if_nothing_was_written_there(tmp_path):
    fresh = tmp_path / "a" / "b" / "state"
    with pytest.raises(RuntimeError), writer_lock(fresh):
        assert (fresh / LOCK_FILE).exists()
        raise RuntimeError("refused before the first write")
    assert list(tmp_path.iterdir()) == []  # the parents it made too
    with writer_lock(fresh):
        pass  # a run that wrote nothing, ended normally: nothing to keep either
    assert list(tmp_path.iterdir()) == []


def test_a_state_dir_the_lock_made_is_kept_once_something_was_written(tmp_path):
    fresh = tmp_path / "a" / "state"
    with pytest.raises(RuntimeError), writer_lock(fresh):
        save_state(fresh, ServiceState(service="svc"))
        raise RuntimeError("failed after a write")
    assert sorted(p.name for p in fresh.iterdir()) == sorted([LOCK_FILE, STATE_FILE])


def test_a_state_dir_that_was_there_keeps_its_lock_file(tmp_path):
    with writer_lock(tmp_path):
        pass
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_FILE]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway")
def test_the_writer_lock_refuses_a_read_only_state_dir_for_real(tmp_path):
    with writer_lock(tmp_path):
        pass
    tmp_path.chmod(0o555)
    try:
        with (
            pytest.raises(StateError, match=r": cannot write the state dir \(Permission denied\)$"),
            writer_lock(tmp_path),
        ):
            pass
    finally:
        tmp_path.chmod(0o755)


def test_a_state_write_that_fails_later_is_one_state_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    save_state(tmp_path, ServiceState(service="svc"))
    before = (tmp_path / STATE_FILE).read_bytes()
    refuse_new_files(monkeypatch, tmp_path)
    with pytest.raises(StateError) as info:
        save_state(tmp_path, ServiceState(service="svc", next_id=9))
    assert str(info.value) == f"{tmp_path}: {DENIED}"
    assert (tmp_path / STATE_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temp file left behind


def test_a_state_write_the_disk_refuses_when_flushed_is_one_state_error_and_keeps_the_old_file(
    tmp_path, monkeypatch
):
    """A full disk or an I/O error often shows only when the data is flushed (fsync): the save
    fails in one line, before the new file replaces the old, and leaves no temp file behind."""
    save_state(tmp_path, ServiceState(service="svc"))
    before = (tmp_path / STATE_FILE).read_bytes()

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StateError) as info:
        save_state(tmp_path, ServiceState(service="svc", next_id=9))
    assert str(info.value) == f"{tmp_path}: cannot write the state dir ({os.strerror(errno.EIO)})"
    assert (tmp_path / STATE_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temp file left behind


def test_a_reader_of_the_state_file_sees_the_old_one_whole_while_a_save_replaces_it(tmp_path):
    """`status` or a second reader opening state.json during a save reads the file it opened,
    never one truncated and being rewritten in place."""
    save_state(tmp_path, ServiceState(service="svc"))
    before = (tmp_path / STATE_FILE).read_bytes()
    with (tmp_path / STATE_FILE).open("rb") as reader:
        save_state(tmp_path, ServiceState(service="svc", next_id=9, history=[{"n": i} for i in range(50)]))
        assert reader.read() == before
    assert load_state(tmp_path, "svc").next_id == 9


def test_the_state_file_gets_the_permissions_a_plain_write_would_not_the_temp_files(tmp_path):
    """GitOps commits state.json and teams share state dirs: it is made as any file the user
    writes (umask), not with the 0600 of the temp file it was written to."""
    old = os.umask(0o022)
    try:
        save_state(tmp_path, ServiceState(service="svc"))
    finally:
        os.umask(old)
    assert (tmp_path / STATE_FILE).stat().st_mode & 0o777 == 0o644


def test_a_write_a_full_disk_refuses_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    # measured with the state dir on a full tmpfs: the watcher's log said `routing: [Errno 28] No
    # space left on device`, naming no file (the router's config, under the state dir)
    target = tmp_path / "router" / "conf" / "nginx.conf"
    atomic_write_text(target, "old\n")
    save_state(tmp_path, ServiceState(service="svc"))

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        atomic_write_text(target, "new\n")
    assert info.value.errno == errno.ENOSPC and str(target) in str(info.value)
    assert target.read_text() == "old\n"
    assert [p.name for p in target.parent.iterdir()] == ["nginx.conf"]  # no temp file left behind
    with pytest.raises(StateError) as state_info:  # (the state file's own error stays one line)
        save_state(tmp_path, ServiceState(service="svc", next_id=9))
    assert str(state_info.value) == f"{tmp_path}: cannot write the state dir ({os.strerror(errno.ENOSPC)})"


@pytest.mark.parametrize(
    "command",
    [
        ["apply", "--auto-approve", "--no-routing"],
        ["apply", "--auto-approve"],
        ["destroy", "--auto-approve"],
        ["routing", "up"],
        ["routing", "down"],
        ["watch", "--once", "--no-routing"],
        ["watch", "--once"],
        ["up", "--no-dashboard"],
    ],
    ids=" ".join,
)
def test_every_writer_refuses_in_one_line_before_changing_anything(svc, monkeypatch, command):
    from skyhedge.controller.runner import Watcher
    from skyhedge.routing import Router

    before = applied_once(svc)
    touched: list[str] = []

    def must_not_run(name: str) -> Any:
        def record(*_args: Any, **_kwargs: Any) -> Any:
            touched.append(name)
            raise AssertionError(f"{name} ran although the state dir cannot be written")

        return record

    for method in ("up", "down", "reload", "drain", "preflight"):
        monkeypatch.setattr(Router, method, must_not_run(f"router.{method}"))
    monkeypatch.setattr(Watcher, "_build", must_not_run("the watcher's controller"))
    monkeypatch.setattr("skyhedge.apply._Step.converge", must_not_run("terraform apply"))
    monkeypatch.setattr("skyhedge.apply.run_parallel", must_not_run("terraform destroy"))
    refuse_new_files(monkeypatch, svc.state_dir)

    verb, *flags = command
    if verb == "routing":
        verb, flags = "routing", [flags[0]]
        args = ["routing", *flags, str(svc.spec_path), "--state-dir", str(svc.state_dir)]
    else:
        args = [verb, str(svc.spec_path), "--state-dir", str(svc.state_dir), *flags]
    result = run(*args)
    one_error_line(result, svc.state_dir)
    assert touched == []
    assert (svc.state_dir / STATE_FILE).read_bytes() == before
    assert svc.pids() == {}


def test_a_watcher_whose_state_dir_stops_taking_files_logs_one_line_per_pass(tmp_path, monkeypatch, caplog):
    """No traceback every pass: the pass fails as any `SkyhedgeError` does (one line, backoff),
    and works again once the directory is writable."""
    from controller_fakes import LOCAL_SPEC, fake_controller

    from skyhedge.controller.supervisor import Supervisor

    spec_path = tmp_path / "svc.yaml"
    spec_path.write_text(LOCAL_SPEC)
    sdir = tmp_path / "state"
    with writer_lock(sdir):
        ctl = fake_controller(load_spec(spec_path), sdir)
        supervisor = Supervisor(ctl.tick)
        with monkeypatch.context() as m:
            refuse_new_files(m, sdir)
            with caplog.at_level(logging.ERROR, logger="skyhedge"):
                supervisor.run_once()
                supervisor.run_once()
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert [r.getMessage() for r in errors] == [
            f"tick failed (1 in a row): {sdir}: {DENIED}",
            f"tick failed (2 in a row): {sdir}: {DENIED}",
        ]
        assert all(r.exc_info is None for r in errors), "no traceback in the log"
        supervisor.run_once()  # writable again: the pass goes through
        assert supervisor.failures == 0
    assert load_state(sdir, "svc").live()


# ------------------------------------------------------------------------------------------------
# Finding 4: plan after a failed or interrupted apply


def plan_json(svc: LocalService) -> tuple[int, dict[str, Any]]:
    result = run(
        "plan", str(svc.spec_path), "--state-dir", str(svc.state_dir), "--json", "--detailed-exitcode"
    )
    assert result.exit_code in (0, 2), result.output
    return result.exit_code, json.loads(result.stdout)


def test_a_replica_a_failed_apply_never_created_is_pending_until_an_apply_creates_it(svc):
    fail = svc.root / "fail-r-0002"  # while it exists, r-0002's command exits at once: its launch fails
    spec = load_spec(svc.write(replicas=3, command=svc.failing_command("r-0002", fail)))
    fail.touch()
    assert not apply_service(spec, svc.state_dir, route=False).ok
    fail.unlink()

    code, data = plan_json(svc)
    assert code == 2, "the next apply has work to do: not 'no changes'"
    replicas = {r["id"]: r for r in data["replicas"]}
    assert replicas["r-0002"]["action"] == "keep" and replicas["r-0002"]["pending"] is True
    assert replicas["r-0001"]["pending"] is replicas["r-0003"]["pending"] is False
    assert data["summary"]["pending"] == 1 and data["summary"]["create"] == 0
    assert data["pending_roots"] == ["local/local"]  # the failed root is applied again
    table = run("plan", str(svc.spec_path), "--state-dir", str(svc.state_dir)).output
    assert "+ create (pending)" in table
    assert "Plan: 0 to create, 3 to keep (1 of them pending creation), 0 to delete." in table
    assert "r-0002" in table and "the next `apply` creates them, or records those that run" in table

    assert apply_service(spec, svc.state_dir, route=False).ok
    code, data = plan_json(svc)
    assert code == 0, "after a successful apply nothing is pending"
    assert data["summary"]["pending"] == 0 and data["pending_roots"] == []
    assert not any(r["pending"] for r in data["replicas"])
    assert "pending" not in run("plan", str(svc.spec_path), "--state-dir", str(svc.state_dir)).output


def test_a_root_whose_inputs_differ_from_its_last_successful_apply_is_pending(svc):
    """Every replica exists, but the root's last apply did not finish (a Ctrl-C, a kill): its
    recorded digest is not the rendered one, and `apply` would apply the root again."""
    spec = load_spec(svc.write(replicas=1))
    assert apply_service(spec, svc.state_dir, route=False).ok
    assert plan_json(svc)[0] == 0
    state = load_state(svc.state_dir, "frozen")
    state.extra["terraform"]["roots"]["local/local"]["digest"] = None  # as an interrupted apply leaves it
    save_state(svc.state_dir, state)
    code, data = plan_json(svc)
    assert code == 2
    assert data["pending_roots"] == ["local/local"] and data["summary"]["pending"] == 0
    table = run("plan", str(svc.spec_path), "--state-dir", str(svc.state_dir)).output
    assert "1 root(s) not applied as rendered yet (local/local)" in table


LOCAL = """
name: echo
placement: {clouds: [local], zones: [local-a, local-b, local-c]}
replica_policy: {min_replicas: 2, policy: spothedge}
run: {command: python3 server.py}
"""


def test_recorded_replicas_never_created_are_pending_unless_gitops_applies_them(tmp_path, write_spec):
    """Under `watch --gitops`, CI applies the commits and the state never learns cloud IDs:
    a committed replica is not "pending" there, or every GitOps plan would report changes."""
    spec = write_spec(LOCAL)
    sdir = tmp_path / "state"
    state = ServiceState(service="echo", next_id=4)
    for i, zone in enumerate(["local-a", "local-b", "local-c"], start=1):
        rid = f"r-000{i}"
        state.replicas[rid] = ReplicaRecord(
            rid, "local", "local", zone, "spot", launched_at=0.0, ready_at=2.0
        )
    save_state(sdir, state)
    result = run("plan", str(spec), "--state-dir", str(sdir), "--json", "--detailed-exitcode")
    assert result.exit_code == 2, result.output
    data = json.loads(result.stdout)
    assert data["summary"]["pending"] == 3 and data["summary"]["create"] == 0

    set_gitops(state, True)
    save_state(sdir, state)
    result = run("plan", str(spec), "--state-dir", str(sdir), "--json", "--detailed-exitcode")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summary"]["pending"] == 0


# ------------------------------------------------------------------------------------------------
# Finding 9: the service name rule, as refused and as documented


def test_a_name_ending_with_a_dash_is_refused_by_a_rule_that_says_so(write_spec):
    spec = write_spec(LOCAL.replace("name: echo", "name: local-echo-"))
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    assert "not ending with '-'" in str(info.value) and "'local-echo-'" in str(info.value)
    docs = (REPO / "docs" / "spec.md").read_text()
    row = next(line for line in docs.splitlines() if line.startswith("| `name` |"))
    assert "does not end with `-`" in row


def test_a_relative_state_dir_that_refuses_a_write_is_named_with_the_directory_it_is_under(
    tmp_path, monkeypatch
):
    # the default state dir is relative (.skyhedge/NAME): "cannot write" named only that, not the
    # directory the command was run from (`/`, a read-only checkout)
    from skyhedge.state import writer_lock

    (tmp_path / ".skyhedge").write_text("a file where the state dirs' folder would be")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StateError) as info, writer_lock(Path(".skyhedge/svc")):
        pass
    assert str(info.value) == (
        f".skyhedge/svc: cannot write the state dir ({os.strerror(errno.ENOTDIR)}), under {tmp_path}: "
        "run from a directory you can write, or give --state-dir"
    )
