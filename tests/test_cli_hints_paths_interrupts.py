"""What the CLI prints must be true and usable.

- Hints: a hint naming a command (`up`'s exit line, `reload`'s "starts one") works when pasted: the
  spec path shell-quoted, `--state-dir` included when one was given.
- Paths, names and error texts are printed verbatim, never read as rich markup: `[prod]` stays,
  and `out[/]` is a directory name, not a closing tag that crashes after the work is done.
- A Ctrl-C reaching the local launcher fails the launch with "interrupted" (not a traceback's
  first line); `up` says "keeps serving" only while the router has an upstream; commands other
  than `simulate` start without importing numpy.
- `--metrics-port` inside the local replicas' port range is refused in one line.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from controller_fakes import LOCAL_SPEC, Clock, FakeExecutor, FakeProber, FakeRouter, FakeSource
from local_support import free_base_port
from rich.console import Console
from test_local_launcher import config as launch_config

from skyhedge.cli import main
from skyhedge.cli._app import command_line
from skyhedge.cli.watch import _say, stopped_message
from skyhedge.clouds.local import launcher
from skyhedge.clouds.local.launcher import CONFIG_ENV, EXIT_INTERRUPTED
from skyhedge.clouds.local.processes import find_processes, read_pidfile
from skyhedge.controller import presence
from skyhedge.controller.dashboard import render
from skyhedge.controller.loop import Controller, ControllerOptions
from skyhedge.controller.metrics import local_port_conflict
from skyhedge.controller.runner import Watcher
from skyhedge.spec import load_spec
from skyhedge.state import ReplicaRecord, ServiceState, save_state

REPO = Path(__file__).resolve().parents[1]
ECHO = REPO / "examples/local-echo/service.yaml"
#: LOCAL_SPEC with its local replicas on 23701 and up.
BASED = LOCAL_SPEC + "resources: {local_base_port: 23700}\n"


def run(*args: str | Path):
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="skyhedge")


def flat(text: str) -> str:
    """Output with rich's line wrapping undone (a long temp path may be wrapped at a space)."""
    return " ".join(text.split())


@pytest.fixture
def prod_spec(tmp_path: Path) -> Path:
    """The local-echo example under a directory named like rich markup: `[prod]`."""
    folder = tmp_path / "[prod]"
    folder.mkdir()
    spec = folder / "svc.yaml"
    spec.write_text(ECHO.read_text(encoding="utf-8"), encoding="utf-8")
    return spec


# --- verbatim paths --------------------------------------------------------------------


@pytest.mark.parametrize("out_name", ["out[/]", "out[bold]x", "[prod] tree"])
def test_render_names_an_out_dir_that_looks_like_markup_as_written_and_exits_0(tmp_path, prod_spec, out_name):
    out = tmp_path / out_name
    result = run("render", prod_spec, "--out", out, "--state-dir", tmp_path / "state")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and result.exception is None
    assert f"into {out}:" in flat(result.output)
    assert (out / "local").is_dir()  # the tree was written where asked


def test_status_shows_the_watchers_spec_path_with_its_brackets(tmp_path, prod_spec):
    sdir = tmp_path / "state"
    sdir.mkdir()
    reloaded = f"spec reloaded from {prod_spec}: replica_policy.min_replicas: 1 -> 2 [/]"
    presence.write(
        sdir,
        presence.WatcherRecord(
            pid=os.getpid(),
            started_at=time.time(),
            spec=str(prod_spec),
            mode="apply",
            reload=presence.RELOAD_ON_CHANGE,
            last_reload={"at": time.time(), "outcome": "taken", "text": reloaded},
        ),
    )
    result = run("status", prod_spec, "--state-dir", sdir)
    assert result.exit_code == 0, result.output
    assert f"(apply; {prod_spec}," in flat(result.output)
    assert f"last spec reload: {reloaded}" in flat(result.output)


def test_a_watcher_notice_prints_paths_verbatim(capsys):
    _say("watching svc; state in /srv/[prod]/state [/] x", "text")
    assert "/srv/[prod]/state [/] x" in capsys.readouterr().err


def test_the_dashboard_shows_zone_names_and_notes_as_written(tmp_path, write_spec):
    ctl = Controller(
        load_spec(write_spec(LOCAL_SPEC)),
        tmp_path / "s",
        executor=FakeExecutor(),
        router=FakeRouter(),
        prober=FakeProber(),
        sources=[FakeSource()],
        clock=Clock(),
        options=ControllerOptions(),
    )
    ctl.tick()
    ctl.note("spec reload refused: /srv/[prod]/svc.yaml: name: [bold] [/]")
    console = Console(record=True, width=200)
    console.print(render(ctl, endpoint="http://127.0.0.1:8080"))
    assert "spec reload refused: /srv/[prod]/svc.yaml: name: [bold] [/]" in console.export_text()


# --- hints that work when pasted -------------------------------------------------------


def test_a_hint_quotes_the_spec_and_carries_the_state_dir_it_was_given():
    hint = command_line("destroy", Path("sp ace/my svc/service spec.yaml"), Path("../state dir"))
    assert shlex.split(hint) == [
        "skyhedge",
        "destroy",
        "sp ace/my svc/service spec.yaml",
        "--state-dir",
        "../state dir",
    ]
    assert command_line("destroy", Path("service.yaml"), None) == "skyhedge destroy service.yaml"


def test_reload_without_a_watcher_names_a_watch_command_that_works(tmp_path, write_spec):
    folder = tmp_path / "sp ace"
    folder.mkdir()
    spec = folder / "service spec.yaml"
    spec.write_text(LOCAL_SPEC, encoding="utf-8")
    sdir = tmp_path / "state dir"
    result = run("reload", spec, "--state-dir", sdir)
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    hint = line.split("`")[1]
    assert shlex.split(hint) == ["skyhedge", "watch", str(spec), "--state-dir", str(sdir)]


def _state(*replicas: ReplicaRecord, routed: list[str] | None = None) -> ServiceState:
    state = ServiceState(service="svc", replicas={r.id: r for r in replicas})
    if routed is not None:
        state.extra["routed"] = [[rid, f"http://127.0.0.1:{23700 + i}"] for i, rid in enumerate(routed)]
    return state


def _replica(rid: str, **kw: object) -> ReplicaRecord:
    return ReplicaRecord(
        id=rid, cloud="local", region="local", zone="local-a", market="spot", launched_at=1.0, **kw
    )  # type: ignore[arg-type]


def test_up_says_keeps_serving_only_with_routed_replicas_and_gives_a_pasteable_destroy(tmp_path, write_spec):
    service = load_spec(write_spec(LOCAL_SPEC))
    spec, sdir = Path("my svc/service.yaml"), Path("state dir")
    state = _state(_replica("r-0001"), _replica("r-0002"), routed=["r-0001"])
    text = stopped_message(service, state, spec, sdir)
    assert f"svc keeps serving at {service.service.url} with 1 routed replica(s), 1 not routed yet" in text
    assert "(`skyhedge destroy 'my svc/service.yaml' --state-dir 'state dir'` removes it)" in text


def test_up_stopped_before_anything_was_routed_does_not_claim_to_serve(tmp_path, write_spec):
    """A Ctrl-C during the first apply: replicas recorded, none READY, nginx with 0 upstreams."""
    service = load_spec(write_spec(LOCAL_SPEC))
    state = _state(
        _replica("r-0001", provisioned_at=1.5),
        _replica("r-0002", provisioned_at=1.5),
        _replica("r-0003", gone_at=2.0),
        _replica("r-0004"),  # not created yet
        routed=[],
    )
    text = stopped_message(service, state, Path("service.yaml"), None)
    assert "keeps serving" not in text
    assert "2 replica(s) of svc left starting (1 more planned, not launched), none routed" in text
    assert "`skyhedge up service.yaml` finishes them, `skyhedge destroy service.yaml` removes them" in text


def test_up_stopped_after_an_apply_that_launched_nothing_does_not_call_them_starting(tmp_path, write_spec):
    """An apply that failed before Terraform created anything (an unreadable Terraform CLI
    config): the records are plans, nothing is starting."""
    service = load_spec(write_spec(LOCAL_SPEC))
    state = _state(_replica("r-0001"), _replica("r-0002"), routed=[])
    text = stopped_message(service, state, Path("service.yaml"), None)
    assert "starting" not in text
    assert "2 replica(s) of svc planned, none launched, none routed" in text
    assert "`skyhedge up service.yaml` launches them" in text


# --- Ctrl-C ----------------------------------------------------------------------------


def _second_ctrl_c(self: Watcher, *args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt  # what the watcher's SIGINT handler raises at the second Ctrl-C


@pytest.mark.parametrize("verb", ["up", "watch"])
def test_a_second_ctrl_c_says_what_it_left_behind_and_exits_130(tmp_path, write_spec, monkeypatch, verb):
    """Not click's bare "Aborted!": the pass was cut short, the service keeps what the state
    last saved, and the hint to carry on works when pasted."""
    spec, sdir = write_spec(BASED), tmp_path / "state dir"
    save_state(sdir, _state(_replica("r-0001"), _replica("r-0002"), routed=["r-0001", "r-0002"]))
    monkeypatch.setattr(Watcher, "run", _second_ctrl_c)
    result = run(verb, spec, "--state-dir", sdir, *(["--no-dashboard"] if verb == "up" else []))
    assert result.exit_code == 130, result.output
    last = flat(result.output).split("Ctrl-C stops")[-1]
    assert "Aborted" not in result.output
    assert "watcher interrupted by a second Ctrl-C (its pass cut short)" in last
    if verb == "up":
        assert "svc keeps serving at http://127.0.0.1:" in last and "with 2 routed replica(s)" in last
        hint = last.split("`")[1]
        assert shlex.split(hint) == ["skyhedge", "destroy", str(spec), "--state-dir", str(sdir)]
    else:
        hint = last.split("`")[1]
        assert shlex.split(hint) == ["skyhedge", "watch", str(spec), "--state-dir", str(sdir)]


def _ctrl_c_during_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first Ctrl-C ends `run` (the watcher idle between passes stops at once); the second,
    a double tap ~0.1 s later, lands while the watcher shuts down, where the SIGINT handler is
    Python's own again."""
    monkeypatch.setattr(Watcher, "run", lambda self, *args, **kwargs: None)
    real_exit = Watcher.__exit__

    def exit_then_ctrl_c(self: Watcher, *exc: object) -> None:
        real_exit(self, *exc)
        raise KeyboardInterrupt

    monkeypatch.setattr(Watcher, "__exit__", exit_then_ctrl_c)


@pytest.mark.parametrize("verb", ["up", "watch"])
def test_a_second_ctrl_c_during_the_shutdown_is_the_same_130_not_aborted(
    tmp_path, write_spec, monkeypatch, verb
):
    """docs/controller.md: a second Ctrl-C exits 130 with the "interrupted" line, however soon
    it follows the first (`watch` answered click's bare "Aborted!" and exit 1 when it came while
    the watcher shut down; `up` did not)."""
    spec, sdir = write_spec(BASED), tmp_path / "state"
    save_state(sdir, _state(_replica("r-0001"), routed=["r-0001"]))
    _ctrl_c_during_shutdown(monkeypatch)
    result = run(verb, spec, "--state-dir", sdir, *(["--no-dashboard"] if verb == "up" else []))
    assert result.exit_code == 130, result.output
    assert "Aborted" not in result.output
    assert "watcher interrupted by a second Ctrl-C (its pass cut short)" in flat(result.output)


def _launch_config(runtime: Path, tmp_path: Path, **extra: object) -> dict:
    """The launcher tests' replica config, running a process that just waits."""
    port = free_base_port(1) + 1
    return launch_config(
        runtime, tmp_path, port, **{"market": "on-demand", "command": "exec sleep 30", **extra}
    )


def test_a_launch_interrupted_after_the_start_fails_with_interrupted_and_leaves_no_process(
    runtime, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv(CONFIG_ENV, json.dumps(_launch_config(runtime, tmp_path)))

    real_sleep, pressed = time.sleep, []

    def ctrl_c(seconds: float) -> None:  # Ctrl-C during the start-up check, once: the clean-up
        if not pressed:  # that follows sleeps too (`time` is the global module), and must not
            pressed.append(seconds)  # be interrupted by a second, imaginary Ctrl-C
            raise KeyboardInterrupt
        real_sleep(seconds)

    monkeypatch.setattr(launcher.time, "sleep", ctrl_c)
    assert launcher.main(["start", "r-0001"]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert err == "skyhedge-local: start r-0001: interrupted\n"
    assert read_pidfile(runtime, "r-0001") is None and find_processes(runtime) == []


def test_sigint_to_the_launcher_is_one_line_saying_interrupted(runtime, tmp_path):
    marker = tmp_path / "setup-running"
    cfg = _launch_config(runtime, tmp_path, setup=f"touch '{marker}'; sleep 30")
    env = {**os.environ, CONFIG_ENV: json.dumps(cfg), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "skyhedge.clouds.local.launcher", "start", "r-0001"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not marker.exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED
    assert err.strip().splitlines()[0] == "skyhedge-local: start r-0001: interrupted"
    assert "Traceback" not in err


def test_commands_other_than_simulate_start_without_numpy():
    """numpy's import is most of start-up; a Ctrl-C there printed its 40-line traceback."""
    code = "import sys; import skyhedge.cli; print('numpy' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_simulate_is_still_listed_and_runs_its_help():
    listed = run("--help")
    assert listed.exit_code == 0 and "simulate" in listed.output
    helped = run("simulate", "--help")
    assert helped.exit_code == 0 and "--trace" in helped.output


# --- the metrics port and the local replicas' ports -----------------------------------


@pytest.mark.parametrize("command", ["watch", "up"])
@pytest.mark.parametrize("port", [23701, 23721, 65535])
def test_a_metrics_port_among_the_local_replicas_ports_is_refused_in_one_line(
    tmp_path, write_spec, command, port
):
    spec = write_spec(BASED)
    result = run(command, spec, "--state-dir", tmp_path / "state", "--metrics-port", str(port))
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: --metrics-port {port} is in the local replicas' port range 23701-65535")
    assert not (tmp_path / "state").exists()  # refused before the watcher took the state dir


def test_a_metrics_port_up_to_the_base_or_for_a_cloud_only_spec_is_fine(write_spec):
    assert local_port_conflict(load_spec(write_spec(BASED)), 23700) is None
    assert local_port_conflict(load_spec(write_spec(BASED)), 9100) is None
    cloud_only = load_spec(REPO / "examples/gitops/service.yaml")
    assert "local" not in cloud_only.placement.clouds
    assert local_port_conflict(cloud_only, 23721) is None


def test_a_spec_reload_lowering_the_base_below_the_metrics_port_is_refused(tmp_path):
    spec_file = tmp_path / "service.yaml"
    spec_file.write_text(BASED, encoding="utf-8")
    with Watcher(load_spec(spec_file), tmp_path / "state", spec_path=spec_file, route=False) as w:
        w.metrics_port = 23650
        spec_file.write_text(BASED.replace("23700", "23600"), encoding="utf-8")
        assert w.reload(spec_file) is False
        assert w.spec.resources.local_base_port == 23700
        assert w.controller is not None
        note = w.controller.notes[-1].text
        assert note.startswith(f"spec reload refused: {spec_file}: resources.local_base_port: 23600 puts")
        assert "--metrics-port 23650" in note


def test_status_of_a_dead_router_names_commands_that_work_for_this_spec_and_state_dir(tmp_path, prod_spec):
    sdir = tmp_path / "state dir"
    sdir.mkdir()
    gone = {"pid": 4194305, "endpoint": "http://127.0.0.1:8080", "upstreams": []}  # above pid_max
    save_state(sdir, ServiceState(service=load_spec(prod_spec).name, router=gone))
    result = run("status", prod_spec, "--state-dir", sdir)
    assert result.exit_code == 0, result.output
    line = flat(result.output).split("Router: not running", 1)[1]
    hints = line.split("`")[1::2]
    assert [shlex.split(h) for h in hints] == [
        ["skyhedge", "routing", "up", str(prod_spec), "--state-dir", str(sdir)],
        ["skyhedge", "watch", str(prod_spec), "--state-dir", str(sdir)],
    ]


@pytest.mark.parametrize("command", ["watch", "up"])
def test_an_unknown_policy_is_refused_before_anything_starts(tmp_path, write_spec, command):
    """As `plan --policy` does: in the loop it failed every pass for ever, behind a router
    answering 503 to everyone."""
    result = run(command, write_spec(BASED), "--state-dir", tmp_path / "state", "--policy", "nope")
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: --policy: ") and "unknown policy 'nope'" in line
    assert line.endswith(" or 'module:Class')")  # as the spec's and `simulate`'s say: plug-ins too
    assert not (tmp_path / "state").exists()


def test_a_watcher_log_that_cannot_be_opened_is_one_state_error(tmp_path, monkeypatch):
    """Under the dashboard `up` logs to <state dir>/watch.log, opened before the state lock: a
    state dir that takes no new file was a PermissionError traceback there."""
    import logging.handlers

    from skyhedge.cli.watch import _logging
    from skyhedge.errors import StateError

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(logging.handlers.RotatingFileHandler, "_open", refuse)
    refused = pytest.raises(
        StateError, match=r"watch.log: cannot write the watcher's log \(Permission denied\)"
    )
    with refused, _logging("info", tmp_path / "watch.log"):
        pass


def test_a_watcher_log_that_stops_taking_lines_says_so_once_not_a_traceback_per_line(tmp_path, capfd):
    """`up` under its dashboard with its state dir on a full file system: every line the watcher
    logged printed logging's "--- Logging error ---" and a 50-line traceback into the dashboard
    (measured on a full tmpfs). Said once now, in one line naming the file, until a line is
    written again. (/dev/full refuses every write with ENOSPC, as a full disk does.)"""
    import logging

    from skyhedge.cli.watch import _logging

    full = Path("/dev/full")
    if not full.exists():
        pytest.skip("no /dev/full on this system")
    log = logging.getLogger("skyhedge.controller")
    with _logging("info", full):
        for i in range(3):
            log.info("svc: plan: +r-%04d local-a spot", i)
    err = capfd.readouterr().err
    assert err.splitlines() == [
        "warning: /dev/full: cannot write the watcher's log (No space left on device); its lines "
        "are lost until it can"
    ]


def test_the_watchers_log_file_is_rotated_past_its_cap_and_keeps_one_old_generation(tmp_path, monkeypatch):
    """`up` under its dashboard, left running for weeks, appended to <state dir>/watch.log
    without end (and every later run on the state dir appended to the same file). Past its cap
    it becomes watch.log.1, so the two together stay within about twice the cap."""
    import logging

    import skyhedge.cli.watch as watch

    monkeypatch.setattr(watch, "LOG_FILE_MAX_BYTES", 2000)
    path = tmp_path / "watch.log"
    with watch._logging("info", path):
        for i in range(400):
            logging.getLogger("skyhedge.controller").info("svc: plan: +r-%04d local-a spot", i)
    assert path.exists() and (tmp_path / "watch.log.1").exists()
    assert not (tmp_path / "watch.log.2").exists()
    assert path.stat().st_size <= 2000 and (tmp_path / "watch.log.1").stat().st_size <= 2000
    assert "r-0399" in path.read_text()  # the newest lines are in the current file


@pytest.mark.parametrize("verb", [["status"], ["destroy", "--auto-approve"], ["apply", "--auto-approve"]])
def test_a_deleted_current_directory_is_one_line_not_a_traceback(tmp_path, write_spec, monkeypatch, verb):
    """A shell left in a directory deleted under it (a `git checkout`, an `rm -rf` of a scratch
    dir): relative paths and local replicas' working directory cannot be resolved, and the command
    says so in one line with exit 1 (before: a FileNotFoundError traceback, no hint)."""
    spec = write_spec(LOCAL_SPEC)
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)  # back to the test's directory at teardown
    gone.rmdir()
    result = CliRunner().invoke(main, [*verb, str(spec)])
    assert result.exit_code == 1
    assert not isinstance(result.exception, FileNotFoundError)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the current directory no longer exists")
    assert "cd to an existing directory" in lines[0]


def test_a_watchers_pass_in_a_deleted_directory_fails_in_one_line(tmp_path, write_spec, monkeypatch):
    """The controller renders every pass: a directory deleted under a running watcher fails the
    pass with a RenderError it reports in one line, not a FileNotFoundError from deep inside."""
    from skyhedge.apply import Workspace
    from skyhedge.errors import RenderError
    from skyhedge.spec import load_spec

    ws = Workspace(load_spec(write_spec(LOCAL_SPEC)), tmp_path / "state")
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(RenderError, match="current directory no longer exists"):
        ws.context()
