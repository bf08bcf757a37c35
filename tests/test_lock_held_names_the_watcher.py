"""A command refused because another skyhedge process holds the service: when that process is
the service's watcher (`up` or `watch`), the one error line names it and says how to stop it."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner
from controller_fakes import LOCAL_SPEC as LOCAL

from skyhedge.cli import main
from skyhedge.controller import presence
from skyhedge.state import writer_lock


def _record_watcher(sdir, spec, pid: int) -> None:
    """What a running watcher of `spec` leaves in the state dir (this test process stands in)."""
    presence.write(
        sdir,
        presence.WatcherRecord(
            pid=pid,
            started_at=0.0,
            spec=str(spec),
            mode="apply",
            reload=presence.RELOAD_ON_CHANGE,
            process_start=presence.process_start(pid),
        ),
    )


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        (["destroy"], ["--auto-approve"]),
        (["apply"], ["--auto-approve"]),
        (["routing", "reload"], []),
        (["watch"], ["--once", "--no-routing"]),
    ],
)
def test_a_command_refused_by_a_running_watcher_names_it_and_how_to_stop_it(
    tmp_path, write_spec, command, flags
):
    """`skyhedge destroy` while `up` ran in another terminal said only that "another skyhedge
    process (apply, destroy or watch) holds the lock": not which one, nor what to do."""
    spec = write_spec(LOCAL)
    sdir = tmp_path / "state"
    pid = os.getpid()
    with writer_lock(sdir):
        _record_watcher(sdir, spec, pid)
        result = CliRunner().invoke(main, [*command, str(spec), "--state-dir", str(sdir), *flags])
    assert result.exit_code == 1, result.output
    (line,) = result.output.splitlines()
    assert line.startswith(
        f"error: {sdir}: another skyhedge process (apply, destroy or watch) holds the lock"
    )
    assert f"the watcher of this service runs (pid {pid}, spec {spec}): stop it first" in line
    assert f"`kill {pid}`" in line


def test_without_a_watcher_the_lock_error_stays_as_it_was(tmp_path, write_spec):
    """Another `apply` or `destroy` holds it (no watcher record, or a stale one): nothing to name."""
    spec = write_spec(LOCAL)
    sdir = tmp_path / "state"
    with writer_lock(sdir):
        result = CliRunner().invoke(main, ["destroy", str(spec), "--state-dir", str(sdir), "--auto-approve"])
    assert result.exit_code == 1
    assert result.output == (
        f"error: {sdir}: another skyhedge process (apply, destroy or watch) holds the lock for this service\n"
    )


def test_a_second_watcher_is_told_which_one_runs_instead_of_asked(tmp_path, write_spec):
    spec = write_spec(LOCAL)
    sdir = tmp_path / "state"
    pid = os.getpid()
    with writer_lock(sdir):
        _record_watcher(sdir, spec, pid)
        result = CliRunner().invoke(main, ["watch", str(spec), "--state-dir", str(sdir), "--once"])
    assert result.exit_code == 1
    assert "command of svc running?" not in result.output
    assert f"holds the lock for this service: the watcher of this service runs (pid {pid}," in result.output
