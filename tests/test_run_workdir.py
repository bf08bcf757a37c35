"""`run.workdir`: the directory local replicas run `run.setup` and `run.command` in, relative to
the spec's folder. Without it they run where skyhedge was started, so a watcher started from
another directory (a systemd unit's `/`) launched replicas whose relative command could not start.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from local_support import SERVER, LocalService, free_base_port, spec_dict

from skyhedge.cli import main
from skyhedge.errors import SpecError
from skyhedge.spec import load_spec, replica_revision

LOCAL = """\
name: wd
placement: {clouds: [local], zones: [local-a]}
run:
  command: python3 server.py
"""


def _write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "service.yaml"
    spec.write_text(text, encoding="utf-8")
    return spec


def test_a_relative_workdir_is_the_specs_folder_whatever_the_current_directory(tmp_path, monkeypatch):
    spec = _write(tmp_path / "svc", LOCAL + "  workdir: app\n")
    (tmp_path / "svc" / "app").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_spec(Path("..") / "svc" / "service.yaml").run.workdir == tmp_path / "svc" / "app"
    assert load_spec(spec).run.workdir == tmp_path / "svc" / "app"


def test_an_absolute_workdir_is_taken_as_written(tmp_path):
    spec = _write(tmp_path, LOCAL + f"  workdir: {tmp_path}\n")
    assert load_spec(spec).run.workdir == tmp_path


def test_without_workdir_replicas_run_where_skyhedge_was_started_as_before(tmp_path):
    assert load_spec(_write(tmp_path, LOCAL)).run.workdir is None


def test_a_missing_workdir_is_one_line_naming_the_field(tmp_path):
    spec = _write(tmp_path, LOCAL + "  workdir: nope\n")
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    assert str(err.value) == f"{spec}: run.workdir: no such directory: {tmp_path / 'nope'}"


def test_a_workdir_without_the_local_cloud_is_refused(tmp_path):
    text = LOCAL.replace("clouds: [local], zones: [local-a]", "clouds: [aws], regions: [us-east-1]")
    spec = _write(tmp_path, text + "  workdir: .\n")
    with pytest.raises(
        SpecError, match=r"run\.workdir: only local replicas run in a directory of this machine"
    ):
        load_spec(spec)


def _old_revision(spec) -> str:
    """The digest as computed before `run.workdir` existed."""
    run = {k: v for k, v in asdict(spec.run).items() if k != "workdir"}
    data = {"run": run, "resources": asdict(spec.resources)}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def test_the_revision_is_unchanged_without_workdir_so_an_upgrade_rolls_nothing(tmp_path):
    spec = load_spec(_write(tmp_path, LOCAL))
    assert replica_revision(spec, "local") == _old_revision(spec)


def test_a_workdir_is_part_of_local_replicas_revision_only(tmp_path):
    text = LOCAL.replace("clouds: [local]", "clouds: [local, aws]")
    text = text.replace("zones: [local-a]", "zones: [local-a, use1-az1]")
    plain = load_spec(_write(tmp_path / "a", text))
    moved = load_spec(_write(tmp_path / "b", text + "  workdir: .\n"))
    assert replica_revision(moved, "local") != replica_revision(plain, "local")  # a rolling update
    assert replica_revision(moved, "aws") == replica_revision(plain, "aws")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[LocalService]:
    """A local service whose command names its server relative to `run.workdir` (the spec's folder)."""
    folder = tmp_path / "svc"
    folder.mkdir()
    (folder / "server.py").write_text(SERVER, encoding="utf-8")
    svc = LocalService(folder, "wd-svc", free_base_port(8), folder / "server.py")
    data = spec_dict(svc.name, svc.base_port, replicas=1, command=f"exec {sys.executable} server.py")
    data["run"]["workdir"] = "."
    svc.spec_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    try:
        yield svc
    finally:
        CliRunner().invoke(
            main, ["destroy", str(svc.spec_path), "--state-dir", str(svc.state_dir), "--auto-approve"]
        )
        svc.cleanup()


def test_replicas_start_in_the_workdir_when_apply_runs_from_elsewhere(service, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(
        main,
        [
            "apply",
            str(service.spec_path),
            "--state-dir",
            str(service.state_dir),
            "--auto-approve",
            "--no-routing",
        ],
    )
    assert result.exit_code == 0, result.output
    pids = service.pids()
    assert pids
    for pid in pids.values():
        assert Path(os.readlink(f"/proc/{pid}/cwd")) == service.root


def test_a_deleted_workdir_does_not_stop_destroy_logs_nor_preempt_of_the_replicas_started_in_it(
    service, tmp_path
):
    """A release directory removed while its replicas run: only a command that may launch needs
    it. `destroy` used to refuse ("run.workdir: no such directory"), the replicas ran on."""
    app = service.root / "app"
    app.mkdir()
    (app / "server.py").write_text(SERVER, encoding="utf-8")
    data = yaml.safe_load(service.spec_path.read_text(encoding="utf-8"))
    data["run"]["workdir"] = "app"
    data["placement"]["zones"] = ["local-a"]
    service.spec_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    args = [str(service.spec_path), "--state-dir", str(service.state_dir)]
    applied = CliRunner().invoke(main, ["apply", *args, "--auto-approve", "--no-routing"])
    assert applied.exit_code == 0, applied.output
    [rid] = service.pids()
    app.rename(tmp_path / "app-removed")

    refused = CliRunner().invoke(main, ["apply", *args, "--auto-approve", "--no-routing"])
    assert refused.exit_code == 1
    assert refused.output == f"error: {service.spec_path}: run.workdir: no such directory: {app}\n"

    logs = CliRunner().invoke(main, ["logs", *args, rid])
    assert logs.exit_code == 0, logs.output
    preempted = CliRunner().invoke(main, ["preempt", *args, "--zone", "local-a"])
    assert preempted.exit_code == 0, preempted.output
    assert f"preempted {rid}" in preempted.output
    assert CliRunner().invoke(main, ["preempt", *args, "--zone", "local-a", "--clear"]).exit_code == 0
    destroyed = CliRunner().invoke(main, ["destroy", *args, "--auto-approve"])
    assert destroyed.exit_code == 0, destroyed.output
    assert "Destroyed 1 replica(s) in local/local" in " ".join(destroyed.output.split())
    assert service.processes() == []


def test_one_workdir_reached_through_a_symlink_or_not_is_one_revision(tmp_path, monkeypatch):
    """A release directory behind a `current` link: `apply current/service.yaml` and `cd current &&
    apply service.yaml` (whose relative path is taken from the physical current directory) named
    the folder two ways, two revisions: each rolled every replica over to its own."""
    release = tmp_path / "releases" / "v1"
    _write(release, LOCAL + "  workdir: .\n")
    (tmp_path / "current").symlink_to(release, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    through_link = load_spec(Path("current") / "service.yaml")
    monkeypatch.chdir(tmp_path / "current")
    from_inside = load_spec("service.yaml")
    assert through_link.run.workdir == from_inside.run.workdir == release
    assert replica_revision(through_link, "local") == replica_revision(from_inside, "local")
