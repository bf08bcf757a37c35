"""`skyhedge logs SPEC REPLICA`: a replica's log, read through its cloud.

local: the replica process's output, from a real launch by the real engine; aws: EC2's console
output (moto); gcp: serial port 1 (a local server speaking Compute's REST shape).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import boto3
import pytest
from click.testing import CliRunner
from fake_http import json_server
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession
from local_support import make_service
from moto import mock_aws

import skyhedge.replica_logs as replica_logs
from skyhedge.apply import apply_service, destroy_service
from skyhedge.cli import main
from skyhedge.clouds.aws import logs as aws_logs
from skyhedge.clouds.gcp import logs as gcp_logs
from skyhedge.clouds.gcp.events import ENDPOINT_ENV
from skyhedge.clouds.local import logs as local_logs
from skyhedge.clouds.local.processes import log_path
from skyhedge.errors import CloudError
from skyhedge.spec import load_spec
from skyhedge.state import ReplicaRecord, ServiceState, save_state


@pytest.fixture
def svc(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # local replicas run in the directory skyhedge runs in
    service = make_service(tmp_path, "logs")
    yield service
    service.cleanup()


def _chatty(svc) -> str:
    """The replica server, saying two lines (one not ASCII) before it serves."""
    return (
        'echo "hello from $SKYHEDGE_REPLICA_ID"; echo "température: ok" >&2; '
        f"exec {sys.executable} {svc.server}"
    )


def _follow(args: list[str], meanwhile: Callable[[], None]) -> tuple[int, str, str]:
    """`skyhedge logs ARGS --tail 0 -f` in a process of its own; once it follows, `meanwhile()`;
    then its (exit code, stdout, stderr) when it ends by itself (20 s at most, else killed).

    It follows once it has printed the log's origin (`==> ... <==`): that line comes right after
    the read that fixed where the follow starts, so what `meanwhile()` writes comes after it."""
    with subprocess.Popen(
        [sys.executable, "-m", "skyhedge.cli", "logs", *args, "--tail", "0", "-f", "--interval", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as follow:
        assert follow.stdout is not None and follow.stderr is not None
        stderr = follow.stderr
        err: list[str] = []
        following = threading.Event()

        def read_stderr() -> None:
            for line in stderr:
                err.append(line)
                if line.startswith("==> "):
                    following.set()
            following.set()  # ended: whatever it said is in `err`

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        try:
            assert following.wait(20), "no `==> ... <==` line within 20 s"
            assert follow.poll() is None, "".join(err)  # following, not ended already
            meanwhile()
            follow.wait(timeout=20)
            out = follow.stdout.read()
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.wait()
            reader.join(timeout=10)
    return follow.returncode, out, "".join(err)


def test_a_local_replica_log_is_its_process_output_and_follow_ends_when_it_is_gone(svc):
    svc.write(replicas=1, command=_chatty(svc))
    spec = load_spec(svc.spec_path)
    report = apply_service(spec, svc.state_dir, route=False)
    assert report.ok, report.errors
    args = [str(svc.spec_path), "r-0001", "--state-dir", str(svc.state_dir)]

    result = CliRunner().invoke(main, ["logs", *args])
    assert result.exit_code == 0, result.output
    assert "hello from r-0001\n" in result.stdout and "température: ok\n" in result.stdout
    assert f"==> r-0001 (local/local/local-a, spot): {log_path(svc.runtime, 'r-0001')} <==" in result.stderr
    tail = CliRunner().invoke(main, ["logs", *args, "--tail", "1"])
    assert tail.exit_code == 0 and tail.stdout == "température: ok\n"

    def write_then_destroy() -> None:
        with open(log_path(svc.runtime, "r-0001"), "a", encoding="utf-8") as log:
            log.write("a line written while following\n")
        time.sleep(0.5)
        assert destroy_service(spec, svc.state_dir, route=False).ok

    rc, out, err = _follow(args, write_then_destroy)
    assert rc == 0, err
    assert out == "a line written while following\n"  # --tail 0: only what came after
    assert err.strip().endswith("r-0001 is gone (terminated): end of its log")

    gone = CliRunner().invoke(main, ["logs", *args, "-f"])  # a gone replica's log stays readable
    assert gone.exit_code == 0 and "hello from r-0001" in gone.stdout
    assert "r-0001 is gone: nothing more to follow" in gone.stderr


def test_follow_ends_when_a_local_replica_process_dies_with_no_watcher_running(svc):
    """README: `--follow` prints new output until the replica is gone. After `apply` (no watcher)
    a preempted or crashed local replica is gone (`plan` says so) but nothing records it, and the
    follow, waiting for the state, never ended. It ends as it does for a destroyed replica."""
    import os
    import signal

    from skyhedge.clouds.local.processes import read_pidfile

    svc.write(replicas=1, command=_chatty(svc))
    spec = load_spec(svc.spec_path)
    assert apply_service(spec, svc.state_dir, route=False).ok
    args = [str(svc.spec_path), "r-0001", "--state-dir", str(svc.state_dir)]

    def last_words_then_die() -> None:
        with open(log_path(svc.runtime, "r-0001"), "a", encoding="utf-8") as log:
            log.write("its last words\n")
        proc = read_pidfile(svc.runtime, "r-0001")
        assert proc is not None
        os.killpg(proc.pgid, signal.SIGKILL)  # the replica dies; no watcher records it

    rc, out, err = _follow(args, last_words_then_die)
    assert rc == 0, err
    assert out == "its last words\n"  # what it wrote before it died is printed first
    assert err.strip().endswith("r-0001 is gone (failed): end of its log")


def test_interval_without_follow_is_a_usage_error(svc):
    """README: `[-f/--follow [--interval S]]`. Without --follow the interval paced nothing and was
    taken silently; refused in one line, as `up --speedup` without `--market-trace` is."""
    svc.write(replicas=1)
    result = CliRunner().invoke(main, ["logs", str(svc.spec_path), "r-0001", "--interval", "1"])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: --interval paces --follow")
    assert len(result.output.splitlines()) == 1


def test_an_unknown_replica_or_a_bad_tail_is_one_line(svc):
    svc.write(replicas=1)
    state = ServiceState(service="logs")
    state.replicas["r-0001"] = ReplicaRecord("r-0001", "local", "local", "local-a", "spot", launched_at=1.0)
    save_state(svc.state_dir, state)
    args = [str(svc.spec_path), "--state-dir", str(svc.state_dir)]
    result = CliRunner().invoke(main, ["logs", *args[:1], "r-9", *args[1:]])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: REPLICA: no replica 'r-9' in the state (live: r-0001; ")
    assert "status" in result.stderr and "--all` lists every one)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    never = CliRunner().invoke(main, ["logs", *args[:1], "r-0001", *args[1:]])
    assert never.exit_code == 1
    assert never.stderr.startswith("error: r-0001: no log yet (its process was never started): ")
    for bad in ("-1", "many"):
        result = CliRunner().invoke(main, ["logs", *args[:1], "r-0001", *args[1:], "--tail", bad])
        assert result.exit_code == 1 and "--tail" in result.stderr and "'all'" in result.stderr


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
def test_a_log_replaced_by_a_link_is_refused_in_one_line_not_printed(svc, tmp_path, kind):
    """A replica (or anyone who can write its log's folder) could replace its log by a link to a
    file of the user running skyhedge (a key, a token): `skyhedge logs` printed that file. It
    reads the log only as a regular file of its own now, and says so in one line. (A FIFO there
    hung the command; it is refused at once too.)"""
    svc.write(replicas=1)
    state = ServiceState(service="logs")
    state.replicas["r-0001"] = ReplicaRecord(
        "r-0001", "local", "local", "local-a", "spot", launched_at=1.0, provisioned_at=2.0
    )
    save_state(svc.state_dir, state)
    secret = tmp_path / "secret"
    secret.write_text("TOKEN=hunter2\n")
    path = log_path(svc.runtime, "r-0001")
    path.parent.mkdir(parents=True)
    if kind == "symlink":
        path.symlink_to(secret)
        why = "a symbolic link, not a log the launcher made: refused"
    elif kind == "hardlink":
        path.hardlink_to(secret)
        why = "a file with 2 names (a hard link): refused"
    else:
        os.mkfifo(path)
        why = "not a regular file: refused"
    args = ["logs", str(svc.spec_path), "r-0001", "--state-dir", str(svc.state_dir)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "hunter2" not in result.output
    assert result.stderr == f"error: r-0001: cannot read its log {path}: {why}\n"


def test_a_gone_replica_whose_log_was_pruned_says_which_logs_are_kept(tmp_path):
    record = ReplicaRecord(
        "r-0001", "local", "local", "local-a", "spot", launched_at=1.0, provisioned_at=2.0, gone_at=3.0
    )
    with pytest.raises(CloudError) as exc:
        local_logs.read_log(None, tmp_path, record, None)  # type: ignore[arg-type]
    assert str(exc.value) == (
        "r-0001: its log is gone (a watcher keeps the logs of the 100 most recently gone replicas, "
        f"256 MiB at most): {log_path((tmp_path / 'local').resolve(), 'r-0001')}"
    )


def test_a_local_log_read_on_survives_truncation_long_logs_and_cut_characters(tmp_path, monkeypatch):
    record = ReplicaRecord("r-0001", "local", "local", "local-a", "spot", launched_at=1.0, provisioned_at=2.0)
    path = log_path(tmp_path / "local", "r-0001")
    path.parent.mkdir(parents=True)
    path.write_bytes("line one\nline two\nun café".encode()[:-1])  # the é half written
    first = local_logs.read_log(None, tmp_path, record, None)  # type: ignore[arg-type]
    assert first.text == "line one\nline two\nun caf" and not first.skipped
    with open(path, "ab") as f:
        f.write(b"\xa9\n")
    second = local_logs.read_log(None, tmp_path, record, first.next)  # type: ignore[arg-type]
    assert second.text == "é\n"
    path.write_text("after a rotation\n")  # shorter than the cursor: read from its start
    third = local_logs.read_log(None, tmp_path, record, second.next)  # type: ignore[arg-type]
    assert third.text == "after a rotation\n" and third.skipped
    monkeypatch.setattr(local_logs, "RECENT_BYTES", 20)
    path.write_text("".join(f"line {i}\n" for i in range(10)))
    recent = local_logs.read_log(None, tmp_path, record, None)  # type: ignore[arg-type]
    assert recent.skipped == "the last 20 of 70 bytes: the whole log is that file"
    assert recent.text == "line 8\nline 9\n"  # whole lines of the last 20 bytes
    assert replica_logs.last_lines("a\nb\nc", 2) == "b\nc" and replica_logs.last_lines("a\n", 0) == ""


AWS_SPEC = """
name: llm
resources:
  instance_type: {aws: g5.xlarge}
placement:
  clouds: [aws]
  regions: [us-east-1]
run: {command: serve}
"""


def test_tail_counts_lines_as_tail_does_a_progress_bar_is_one_line():
    """A model download's progress bar redraws one line with carriage returns; `--tail N` shows
    the last N lines a terminal shows, as `tail -n N`, not N pieces of that bar."""
    bar = "".join(f"\rDownloading model: {p:3d}%" for p in range(101)) + "\n"
    log = "replica: step 1\nreplica: step 2\n" + bar + "replica: model loaded\n"
    assert replica_logs.last_lines(log, 3) == "replica: step 2\n" + bar + "replica: model loaded\n"
    assert replica_logs.last_lines("a\fb\x1cc\u2028d\ne", 1) == "e"
    assert replica_logs.last_lines("a\fb\x1cc\u2028d\ne", 2) == "a\fb\x1cc\u2028d\ne"
    assert replica_logs.last_lines("a\nb\nc\n", 2) == "b\nc\n"
    assert replica_logs.last_lines("a\nb\nc\n", 3) == "a\nb\nc\n"
    assert replica_logs.last_lines("a\nb\nc\n", 9) == "a\nb\nc\n"
    assert replica_logs.last_lines("\n\n", 1) == "\n" and replica_logs.last_lines("", 5) == ""


@pytest.fixture
def ec2_session(monkeypatch):
    with mock_aws():
        session = boto3.Session(
            region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="x"
        )
        monkeypatch.setattr(aws_logs, "SESSION", session)
        yield session


def test_an_aws_replica_log_is_its_instance_console_output(ec2_session, tmp_path, write_spec):
    ec2 = ec2_session.client("ec2")
    image = ec2.describe_images()["Images"][0]["ImageId"]
    instance = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    spec_path = write_spec(AWS_SPEC)
    state = ServiceState(service="llm")
    state.replicas["r-0001"] = ReplicaRecord(
        "r-0001", "aws", "us-east-1", "us-east-1a", "spot", launched_at=1.0, cloud_id=instance
    )
    state.replicas["r-0002"] = ReplicaRecord(
        "r-0002", "aws", "us-east-1", "us-east-1b", "spot", launched_at=1.0, cloud_id="i-0123456789abcdef0"
    )
    state.replicas["r-0003"] = ReplicaRecord(
        "r-0003", "aws", "us-east-1", "us-east-1c", "spot", launched_at=1.0
    )
    save_state(tmp_path / "state", state)
    args = ["--state-dir", str(tmp_path / "state")]

    result = CliRunner().invoke(main, ["logs", str(spec_path), "r-0001", *args, "--tail", "all"])
    assert result.exit_code == 0, result.output
    console = ec2.get_console_output(InstanceId=instance)["Output"]
    assert "Linux version" in console and result.stdout == console
    assert f"EC2 console output of {instance} (us-east-1)" in result.stderr
    spec = load_spec(spec_path)
    first = replica_logs.read_log(spec, tmp_path / "state", state.replicas["r-0001"])
    assert replica_logs.read_log(spec, tmp_path / "state", state.replicas["r-0001"], first.next).text == ""
    slid = aws_logs._after("new tail\n", first.next, "x")  # the window moved past the last read
    assert slid.skipped and slid.text == "new tail\n"
    grown = aws_logs._after(console + "more\n", first.next, "x")
    assert grown.text == "more\n" and not grown.skipped

    missing = CliRunner().invoke(main, ["logs", str(spec_path), "r-0002", *args])
    assert missing.exit_code == 1
    assert missing.stderr.startswith(
        "error: aws: r-0002: GetConsoleOutput i-0123456789abcdef0: InvalidInstanceID"
    )
    unapplied = CliRunner().invoke(main, ["logs", str(spec_path), "r-0003", *args])
    assert unapplied.exit_code == 1
    assert unapplied.stderr == "error: r-0003: no EC2 instance recorded yet (not applied, or not created)\n"


def test_an_aws_replica_a_gitops_watcher_recorded_is_found_by_its_tags(ec2_session, tmp_path, write_spec):
    """Under `watch --gitops` CI applies the tree: the state records the replica as provisioned,
    never its instance ID. Its log is its tagged instance's console, not 'not applied'."""
    ec2 = ec2_session.client("ec2")
    image = ec2.describe_images()["Images"][0]["ImageId"]

    def launch(service: str, rid: str) -> str:
        tags = [{"Key": "skyhedge:service", "Value": service}, {"Key": "skyhedge:replica", "Value": rid}]
        return ec2.run_instances(
            ImageId=image,
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
        )["Instances"][0]["InstanceId"]

    ours = launch("llm", "r-0001")
    launch("other-service", "r-0002")  # another service's replica of the same ID is not ours
    spec_path = write_spec(AWS_SPEC)
    state = ServiceState(service="llm")
    for rid in ("r-0001", "r-0002"):
        state.replicas[rid] = ReplicaRecord(
            rid, "aws", "us-east-1", "us-east-1a", "spot", launched_at=1.0, provisioned_at=2.0, ready_at=3.0
        )
    save_state(tmp_path / "state", state)
    args = ["--state-dir", str(tmp_path / "state")]

    result = CliRunner().invoke(main, ["logs", str(spec_path), "r-0001", *args, "--tail", "all"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ec2.get_console_output(InstanceId=ours)["Output"]
    assert f"EC2 console output of {ours} (us-east-1)" in result.stderr
    other = CliRunner().invoke(main, ["logs", str(spec_path), "r-0002", *args])
    assert other.exit_code == 1
    assert other.stderr == "error: r-0002: no EC2 instance recorded yet (not applied, or not created)\n"


def test_an_aws_console_follow_shows_text_printed_again_and_what_came_before_it():
    """The console is read whole each time; what a follow shows is what follows the previous
    read's end. Text printed again later (a service restarted by systemd, a retry loop printing
    the same line) is not that end: the crash before a restart, or the repeats, are shown."""
    started = "[  OK  ] Started skyhedge-replica.service.\n" + "replica: loading model ...\n" * 12
    boot = "Linux version 6.1\ncloud-init: running boot script\n" + started
    first = aws_logs._after(boot, None, "x")
    assert first.text == boot
    crash = "replica: CUDA error: out of memory\n[FAILED] skyhedge-replica.service: exited, status=1\n"
    restarted = aws_logs._after(boot + crash + started, first.next, "x")
    assert restarted.text == crash + started and not restarted.skipped

    waiting = "boot: waiting for the GPU driver ...\n"
    retries = aws_logs._after("boot\n" + waiting * 10, None, "x")
    more = aws_logs._after("boot\n" + waiting * 13, retries.next, "x")
    assert more.text == waiting * 3 and not more.skipped

    window = 4 * aws_logs.ANCHOR_CHARS  # a console past its window: its oldest text drops out
    old = "".join(f"line {n}\n" for n in range(200))[-window:]
    start = aws_logs._after(old, None, "x")
    slid = aws_logs._after((old + "line 200\nline 201\n")[-window:], start.next, "x")
    assert slid.text == "line 200\nline 201\n" and not slid.skipped


class SerialPort:
    """One instance's serial port 1 as Compute keeps it: everything written, of which only the
    newest `window` bytes are still readable."""

    def __init__(self, window: int = 64) -> None:
        self.written = b""
        self.window = window
        self.requests: list[tuple[str, dict]] = []

    def reply(self, path: str, query: dict) -> tuple[int, dict]:
        self.requests.append((path, query))
        if path != "/compute/v1/projects/proj-1/zones/us-central1-a/instances/skyhedge-llm-r-0001/serialPort":
            return 404, {"error": {"code": 404, "message": f"The resource '{path}' was not found"}}
        oldest = max(0, len(self.written) - self.window)
        start = max(int(query.get("start", ["0"])[0]), oldest)
        return 200, {
            "kind": "compute#serialPortOutput",
            "contents": self.written[start:].decode(),
            "start": str(start),
            "next": str(len(self.written)),
        }


@pytest.fixture
def serial(monkeypatch):
    port = SerialPort()
    with json_server(port.reply) as base:
        monkeypatch.setenv(ENDPOINT_ENV, f"{base}/compute/v1")
        session = AuthorizedSession(AnonymousCredentials())
        monkeypatch.setattr(gcp_logs, "SESSION", session)
        try:
            yield port
        finally:
            session.close()


GCP_SPEC = """
name: llm
resources:
  instance_type: {gcp: g2-standard-4}
placement:
  clouds: [gcp]
  regions: [us-central1]
run: {command: serve}
gcp: {project: proj-1}
"""


def test_a_gcp_replica_log_is_its_serial_port_read_on_from_where_it_stopped(serial, tmp_path, write_spec):
    spec = load_spec(write_spec(GCP_SPEC))
    record = ReplicaRecord("r-0001", "gcp", "us-central1", "us-central1-a", "spot", launched_at=1.0)
    serial.written = b"boot: ok\nstartup-script: pip install\n"
    first = replica_logs.read_log(spec, tmp_path, record)
    assert first.text == "boot: ok\nstartup-script: pip install\n" and not first.skipped
    assert first.source == "serial port 1 of skyhedge-llm-r-0001 (us-central1-a)"
    assert "start" not in serial.requests[-1][1] and serial.requests[-1][1]["port"] == ["1"]
    serial.written += b"startup-script: exit status 1\n"
    second = replica_logs.read_log(spec, tmp_path, record, first.next)
    assert second.text == "startup-script: exit status 1\n" and not second.skipped
    assert serial.requests[-1][1]["start"] == [str(first.next)]
    serial.written += b"x" * 100  # more than the port keeps: what the cursor pointed at is gone
    third = replica_logs.read_log(spec, tmp_path, record, second.next)
    assert third.skipped and third.text == "x" * 64
    other = ReplicaRecord("r-0002", "gcp", "us-central1", "us-central1-a", "spot", launched_at=1.0)
    with pytest.raises(
        CloudError, match=r"^gcp: r-0002: GET .*/skyhedge-llm-r-0002/serialPort: HTTP 404: The"
    ):
        replica_logs.read_log(spec, tmp_path, other)


def test_a_cloud_without_logs_says_so(tmp_path, write_spec):
    record = ReplicaRecord("r-0001", "nocloud", "r", "z", "spot", launched_at=1.0)
    with pytest.raises(CloudError, match=r"^nocloud: skyhedge cannot read replica logs on this cloud$"):
        replica_logs.read_log(load_spec(write_spec(GCP_SPEC)), tmp_path, record)


def test_an_apply_stops_waiting_on_a_replica_that_crashed_while_loading_and_says_so(svc):
    """A model server that dies while loading (past the launch's first half second) held the
    apply for the rest of the probe's initial delay (10 min for an LLM) before "not ready" said
    anything, and `status` kept showing it STARTING: it is now recorded FAILED within seconds and
    the error says it exited, with the logs command."""
    import yaml

    svc.write(replicas=1, command="echo 'loading weights'; sleep 1.5; echo 'CUDA out of memory' >&2; exit 3")
    data = yaml.safe_load(svc.spec_path.read_text())
    data["readiness_probe"]["initial_delay_seconds"] = 120
    svc.spec_path.write_text(yaml.safe_dump(data))
    args = [str(svc.spec_path), "--state-dir", str(svc.state_dir)]
    started = time.monotonic()
    result = CliRunner().invoke(main, ["apply", *args, "--auto-approve", "--no-routing"])
    took = time.monotonic() - started
    assert result.exit_code == 1
    assert took < 60, f"waited {took:.0f}s on a replica that had exited"
    hint = f"(their logs: `skyhedge logs {svc.spec_path} --state-dir {svc.state_dir} r-0001`)"
    assert result.stderr.strip().endswith(f"error: exited before READY: r-0001 {hint}"), result.stderr
    assert "not ready after" not in result.stderr
    status = CliRunner().invoke(main, ["status", *args, "--json", "--all"])
    (rec,) = [r for r in json.loads(status.stdout)["replicas"] if r["id"] == "r-0001"]
    assert rec["state"] == "FAILED"
    logs = CliRunner().invoke(main, ["logs", *args[:1], "r-0001", *args[1:]])
    assert "CUDA out of memory" in logs.output


def test_an_apply_whose_replica_is_preempted_while_it_waits_says_preempted_not_exited(svc):
    """`skyhedge preempt` (or a market) taking a spot replica back while the apply waited for it
    read "exited before READY" and pointed at its logs, which tell nothing of a preemption; the
    replica is PREEMPTED, and the error says so (exit 1 as before: the service is short of it)."""
    import threading

    import yaml

    from skyhedge.clouds.local import runtime_dir
    from skyhedge.clouds.local.events import preempt_zone
    from skyhedge.clouds.local.processes import read_pidfile

    svc.write(replicas=1, zones=("local-a",), command="exec sleep 120")  # never READY by itself
    data = yaml.safe_load(svc.spec_path.read_text())
    data["readiness_probe"]["initial_delay_seconds"] = 120
    svc.spec_path.write_text(yaml.safe_dump(data))

    def preempt_once_launched() -> None:
        deadline = time.monotonic() + 60
        while read_pidfile(runtime_dir(svc.state_dir), "r-0001") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2.5)  # past the launch's own check: the apply waits for readiness by now
        preempt_zone(svc.state_dir, "local-a")

    chaos = threading.Thread(target=preempt_once_launched, daemon=True)
    chaos.start()
    args = [str(svc.spec_path), "--state-dir", str(svc.state_dir)]
    started = time.monotonic()
    result = CliRunner().invoke(main, ["apply", *args, "--auto-approve", "--no-routing"])
    chaos.join(timeout=60)
    assert result.exit_code == 1 and time.monotonic() - started < 60
    assert result.stderr.strip().startswith("error: preempted before READY: r-0001 ("), result.stderr
    assert "exited" not in result.stderr and "skyhedge logs" not in result.stderr
    watch = f"`skyhedge watch {svc.spec_path} --state-dir {svc.state_dir}` replaces it)"
    assert result.stderr.strip().endswith(watch), result.stderr
    status = CliRunner().invoke(main, ["status", *args, "--json", "--all"])
    (rec,) = [r for r in json.loads(status.stdout)["replicas"] if r["id"] == "r-0001"]
    assert rec["state"] == "PREEMPTED"


def test_an_apply_whose_replica_never_gets_ready_names_the_logs_command(svc):
    """It named a file path for local replicas and the clouds' own CLIs for VMs; `skyhedge logs`
    reads both, and the hint is a line to paste."""
    import yaml

    svc.write(replicas=1, command="echo 'loading weights'; exec sleep 120")
    data = yaml.safe_load(svc.spec_path.read_text())
    data["readiness_probe"]["initial_delay_seconds"] = 3
    svc.spec_path.write_text(yaml.safe_dump(data))
    args = [str(svc.spec_path), "--state-dir", str(svc.state_dir)]
    result = CliRunner().invoke(main, ["apply", *args, "--auto-approve", "--no-routing"])
    assert result.exit_code == 1
    hint = f"(their logs: `skyhedge logs {svc.spec_path} --state-dir {svc.state_dir} r-0001`)"
    assert result.stderr.strip().endswith(hint), result.stderr
    logs = CliRunner().invoke(main, ["logs", *args[:1], "r-0001", *args[1:]])
    assert logs.exit_code == 0 and logs.stdout.startswith("=== skyhedge: starting r-0001 (local-a, spot)")
    assert logs.stdout.endswith("\nloading weights\n")
