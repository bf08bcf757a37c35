"""The local cloud's capacity file (`<state>/local/capacity.json`) and its lock are used as its
replicas' logs and pid files are (`processes.open_replicas_dir`): relative to a `local/` folder
checked first (not a link, this account's), never through a symbolic link, and never as another
account's file. Before, only the launcher's start checked `local/`: `skyhedge preempt` and a
market replay wrote their marks wherever a link led, the lock was created through a link at its
name, and marks another account wrote were read (and acted on: a closed zone's replicas are
killed) as ours."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from skyhedge.cli import main
from skyhedge.clouds.local import capacity, runtime_dir
from skyhedge.clouds.local.events import set_zone_capacity

#: An account that is not this one: files are given to it with chown, which needs root.
OTHER_UID = 4242
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another account needs root")

SPEC = """
name: chaos
placement: {clouds: [local], zones: [local-a, local-b]}
run: {command: "true"}
"""


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def test_preempt_and_a_market_replay_refuse_a_local_folder_that_is_a_link(tmp_path, state, write_spec):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    state.mkdir()
    (state / "local").symlink_to(elsewhere)
    spec = write_spec(SPEC)
    result = CliRunner().invoke(main, ["preempt", str(spec), "--state-dir", str(state), "--zone", "local-a"])
    assert result.exit_code != 0
    assert "a symbolic link, not the folder skyhedge made: refused" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    # the market replay's step (`set_zone_capacity`): refused, as the launcher refuses it
    with pytest.raises(capacity.CapacityFileError, match="a symbolic link, not the folder"):
        set_zone_capacity(state, "local-b", 0)
    assert list(elsewhere.iterdir()) == []  # nothing written through the link
    # readers find no marks there either: the launcher's `_check_room`, `status`
    with pytest.raises(capacity.CapacityFileError, match="a symbolic link"):
        capacity.read_capacity(runtime_dir(state))


def test_a_capacity_file_that_is_a_link_is_not_read_as_the_marks(tmp_path, state):
    theirs = tmp_path / "marks.json"
    theirs.write_text(json.dumps({"version": 1, "preempted": {"local-a": None}}))
    (state / "local").mkdir(parents=True)
    (state / "local" / "capacity.json").symlink_to(theirs)
    runtime = runtime_dir(state)
    with pytest.raises(
        capacity.CapacityFileError, match=r"capacity\.json: a symbolic link .*refused; fix it or"
    ):
        capacity.preempted(runtime, "local-a", 0.0)
    with pytest.raises(capacity.CapacityFileError, match="a symbolic link"):
        capacity.mark_preempted(runtime, "local-b")
    assert json.loads(theirs.read_text()) == {"version": 1, "preempted": {"local-a": None}}
    (state / "local" / "capacity.json").unlink()  # as the error says: deleted, all is well again
    capacity.mark_preempted(runtime, "local-b")
    assert capacity.read_capacity(runtime) == {"local-b": None}


def test_the_lock_is_never_made_through_a_link_at_its_name(tmp_path, state):
    """`open(lock, "a+b")` followed a link planted at the lock's name: it created the file the
    link named (any path the user may write) and locked that."""
    target = tmp_path / "made-through-the-link"
    (state / "local").mkdir(parents=True)
    (state / "local" / "capacity.json.lock").symlink_to(target)
    runtime = runtime_dir(state)
    with (
        pytest.raises(capacity.CapacityFileError, match=r"capacity\.json\.lock: a symbolic link .*delete it"),
        capacity.locked(runtime),
    ):
        pass
    with pytest.raises(capacity.CapacityFileError, match="a symbolic link"):
        set_zone_capacity(state, "local-a", 0)
    assert not target.exists()


@pytest.mark.timeout(20)  # (before: the read waited for a writer, for good)
def test_a_fifo_at_the_capacity_files_name_does_not_hang_a_reader(state):
    (state / "local").mkdir(parents=True)
    os.mkfifo(state / "local" / "capacity.json")
    with pytest.raises(capacity.CapacityFileError, match="not a regular file: refused"):
        capacity.read_capacity(runtime_dir(state))


@needs_root
@pytest.mark.parametrize("name", ["capacity.json", "capacity.json.lock"])
def test_a_capacity_file_or_lock_another_account_made_is_refused(state, name):
    """A state dir its group may write (allowed: umask 002): another account's marks would close
    zones (their replicas killed by a watcher), its lock could be held for ever."""
    (state / "local").mkdir(parents=True)
    planted = state / "local" / name
    planted.write_text(json.dumps({"version": 1, "preempted": {"local-a": None}}))
    os.chown(planted, OTHER_UID, OTHER_UID)
    runtime = runtime_dir(state)
    with pytest.raises(capacity.CapacityFileError, match=f"owned by another account \\(uid {OTHER_UID}\\)"):
        if name == "capacity.json":
            capacity.read_capacity(runtime)
        else:
            with capacity.locked(runtime):
                pass
    assert os.stat(planted).st_uid == OTHER_UID


def test_marks_are_still_written_and_read_and_the_lock_made(state):
    runtime = runtime_dir(state)
    capacity.mark_preempted(runtime, "local-a", until=5.0)
    capacity.set_limit(runtime, "local-b", 2)
    assert capacity.read_capacity(runtime) == {"local-a": 5.0}
    assert capacity.read_limits(runtime) == {"local-b": 2}
    with capacity.locked(runtime):
        assert (runtime / "capacity.json.lock").is_file()
    assert sorted(p.name for p in runtime.iterdir()) == ["capacity.json", "capacity.json.lock"]
