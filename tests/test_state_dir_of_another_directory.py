"""The default state dir, `./.skyhedge/<name>/`, is relative to the current directory: a service
deployed from /srv/svc is not seen by `skyhedge destroy svc.yaml` run from $HOME. Those commands
used to answer as if there were no such service ("Nothing to destroy.", "router down: svc", an
empty status, all exit 0) while its replicas and router kept running (and, on a cloud, billing).
Now they also say, on stderr, which state dir they looked in and why it may be the wrong one."""

from __future__ import annotations

from click.testing import CliRunner
from controller_fakes import LOCAL_SPEC

from skyhedge.cli import main
from skyhedge.state import ServiceState, save_state


def _note(where) -> str:
    return (
        f"note: no state of svc in {where}: a service deployed from another directory keeps its state "
        "there (./.skyhedge/<name>/ is per directory); run this where it was deployed, or pass --state-dir\n"
    )


def _deployed_elsewhere(tmp_path, monkeypatch, write_spec):
    spec = write_spec(LOCAL_SPEC)
    save_state(tmp_path / "deployed-here" / ".skyhedge" / "svc", ServiceState(service="svc"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return spec, elsewhere / ".skyhedge" / "svc"


def test_destroy_from_another_directory_says_where_it_looked(tmp_path, monkeypatch, write_spec):
    spec, looked = _deployed_elsewhere(tmp_path, monkeypatch, write_spec)
    result = CliRunner().invoke(main, ["destroy", str(spec), "--auto-approve"])
    assert result.exit_code == 0
    assert result.stdout == "Nothing to destroy.\n"
    assert result.stderr == _note(looked)
    assert not (tmp_path / "elsewhere" / ".skyhedge").exists()


def test_status_and_routing_down_from_another_directory_say_where_they_looked(
    tmp_path, monkeypatch, write_spec
):
    spec, looked = _deployed_elsewhere(tmp_path, monkeypatch, write_spec)
    status = CliRunner().invoke(main, ["status", str(spec)])
    assert status.exit_code == 0 and "Router: not running" in status.stdout
    assert status.stderr == _note(looked)
    down = CliRunner().invoke(main, ["routing", "down", str(spec)])
    assert down.exit_code == 0 and down.stdout == "router down: svc\n"
    assert down.stderr == _note(looked)
    assert not (tmp_path / "elsewhere" / ".skyhedge").exists()


def test_status_json_stays_the_object_alone(tmp_path, monkeypatch, write_spec):
    spec, _ = _deployed_elsewhere(tmp_path, monkeypatch, write_spec)
    result = CliRunner().invoke(main, ["status", str(spec), "--json"])
    assert result.exit_code == 0 and result.stderr == ""


def test_no_note_where_the_state_is(tmp_path, monkeypatch, write_spec):
    spec, _ = _deployed_elsewhere(tmp_path, monkeypatch, write_spec)
    monkeypatch.chdir(tmp_path / "deployed-here")
    for args in (["status", str(spec)], ["destroy", str(spec), "--auto-approve"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and result.stderr == "", result.output


def test_a_state_dir_given_but_empty_is_named_as_given(tmp_path, write_spec):
    spec = write_spec(LOCAL_SPEC)
    typo = tmp_path / "stat"
    result = CliRunner().invoke(main, ["destroy", str(spec), "--state-dir", str(typo), "--auto-approve"])
    assert result.exit_code == 0 and result.stdout == "Nothing to destroy.\n"
    assert result.stderr == f"note: no state of svc in {typo}: check --state-dir\n"
