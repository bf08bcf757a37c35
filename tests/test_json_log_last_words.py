"""`up`/`watch --log-format json` under a service manager or docker: stdout and stderr both reach
the log pipeline, so the command's last words (what `up` leaves behind, a second Ctrl-C, the
`--down-on-exit` destroy) are one more JSON record on stderr, not a plain line on stdout
(docs/controller.md: "the watcher's own notices included"; only a final error stays its
`error:` line). In text, and under `up`'s dashboard, they stay a line on stdout."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from controller_fakes import LOCAL_SPEC
from local_support import free_base_port

import skyhedge.apply
from skyhedge.cli import main
from skyhedge.cli._app import Terminated
from skyhedge.controller.runner import Watcher
from skyhedge.errors import EngineError
from skyhedge.state import ReplicaRecord, ServiceState, save_state


@pytest.fixture
def served(tmp_path, write_spec):
    """A local service with one routed replica recorded, its state dir, and the spec."""
    spec = write_spec(LOCAL_SPEC + f"resources: {{local_base_port: {free_base_port(4)}}}\n")
    sdir = tmp_path / "state"
    replica = ReplicaRecord(
        id="r-0001", cloud="local", region="local", zone="local-a", market="spot", launched_at=1.0
    )
    state = ServiceState(service="svc", replicas={"r-0001": replica})
    state.extra["routed"] = [["r-0001", "http://127.0.0.1:1"]]
    save_state(sdir, state)
    return spec, sdir


def records(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.strip().splitlines()]


def test_up_json_logs_says_what_it_leaves_behind_as_a_json_record(served, monkeypatch):
    spec, sdir = served
    monkeypatch.setattr(Watcher, "run", lambda self, *args, **kwargs: None)  # stopped at once
    args = ["up", str(spec), "--state-dir", str(sdir), "--no-dashboard", "--log-format", "json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    lines = records(result.stderr)
    last = lines[-1]
    assert last["level"] == "info" and last["logger"] == "skyhedge"
    assert last["message"].startswith("watcher stopped; svc keeps serving at http://127.0.0.1:")
    assert [line["service"] for line in lines] == ["svc"] * len(lines)  # the log's lines and the last words


def test_up_text_logs_keep_the_last_words_on_stdout(served, monkeypatch):
    spec, sdir = served
    monkeypatch.setattr(Watcher, "run", lambda self, *args, **kwargs: None)
    result = CliRunner().invoke(main, ["up", str(spec), "--state-dir", str(sdir), "--no-dashboard"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("watcher stopped; svc keeps serving at")


@pytest.mark.parametrize("verb", ["up", "watch"])
def test_a_second_ctrl_c_with_json_logs_is_a_json_warning(served, monkeypatch, verb):
    spec, sdir = served

    def second_ctrl_c(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Watcher, "run", second_ctrl_c)
    extra = ["--no-dashboard"] if verb == "up" else []
    args = [verb, str(spec), "--state-dir", str(sdir), *extra, "--log-format", "json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130, result.output
    assert result.stdout == ""
    last = records(result.stderr)[-1]
    assert last["level"] == "warning" and last["service"] == "svc"
    assert last["message"].startswith("watcher interrupted by a second Ctrl-C (its pass cut short)")


@pytest.mark.parametrize(
    ("stop", "by", "code"), [(KeyboardInterrupt, "Ctrl-C", 130), (Terminated, "SIGTERM", 143)]
)
def test_an_interrupted_down_on_exit_destroy_says_by_what_and_exits_as_a_shell_reports_it(
    served, monkeypatch, stop, by, code
):
    """A second SIGTERM (systemd's stop, a cancelled CI job) during `--down-on-exit`'s destroy
    exited 130, as a Ctrl-C does."""
    spec, sdir = served
    monkeypatch.setattr(Watcher, "run", lambda self, *args, **kwargs: None)

    def interrupted(*args, **kwargs):
        raise stop

    monkeypatch.setattr(skyhedge.apply, "destroy_service", interrupted)
    args = ["up", str(spec), "--state-dir", str(sdir), "--no-dashboard", "--down-on-exit"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    assert result.stdout.splitlines()[-1] == (
        f"destroy interrupted by {by}; "
        f"`skyhedge destroy {spec} --state-dir {sdir} --auto-approve` finishes it."
    )


def test_a_failed_down_on_exit_destroy_is_the_commands_error_not_a_success(served, monkeypatch):
    """A soak audit: `--down-on-exit` whose destroy failed (there, `terraform init` refused the
    backend of a state dir copied elsewhere; on a cloud, a root's destroy refused) said
    "destroyed 0 replica(s) and the router" and exited 0, the router still serving and the
    replicas running. It is the command's error now, with what still runs and the command that
    finishes it; what it did destroy, and the destroy's warnings, are said before it."""
    spec, sdir = served
    monkeypatch.setattr(Watcher, "run", lambda self, *args, **kwargs: None)
    failed = skyhedge.apply.DestroyReport(
        roots=["local/local"],
        destroyed=["r-0002"],
        errors=[EngineError("terraform destroy failed in local/local: boom", stderr="Error: boom")],
        warnings=["aws us-east-1: 1 instance(s) tagged for svc still run, in no Terraform state"],
    )
    monkeypatch.setattr(skyhedge.apply, "destroy_service", lambda *args, **kwargs: failed)
    args = ["up", str(spec), "--state-dir", str(sdir), "--no-dashboard", "--down-on-exit"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "replica(s) and the router" not in result.stdout
    assert result.stdout.splitlines()[-2:] == [
        "warning: aws us-east-1: 1 instance(s) tagged for svc still run, in no Terraform state",
        "destroyed 1 replica(s): r-0002",
    ]
    assert (
        "error: --down-on-exit: terraform destroy failed in local/local: boom; the replicas not destroyed "
        f"still run: `skyhedge destroy {spec} --state-dir {sdir} --auto-approve` finishes it"
    ) in result.stderr
    assert "Error: boom" in result.stderr  # Terraform's own text, as `destroy` shows it
