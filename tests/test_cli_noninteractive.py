"""The CLI as CI runs it: no terminal, stdin at its end or closed, odd flag values.

`apply` and `destroy` without `--auto-approve` ask; in CI nobody answers. They must not hang,
not act, and say in one `error:` line which flag skips the question, whether stdin is
`/dev/null` (end of input) or closed altogether (`0<&-`, as some runners and daemons leave it).
"""

from __future__ import annotations

import concurrent.futures
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from local_support import make_service

from skyhedge.cli import main


@pytest.fixture
def svc(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    service = make_service(tmp_path, "noninteractive", replicas=1)
    yield service
    service.cleanup()


def skyhedge(cwd: Path, *args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m skyhedge ARGS` as a CI job would: stdin `/dev/null` ("eof") or closed."""
    argv = [sys.executable, "-m", "skyhedge", *args]
    if stdin == "closed":
        argv = ["sh", "-c", 'exec "$@" 0<&-', "sh", *argv]
    return subprocess.run(
        argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300
    )


def assert_not_confirmed(proc: subprocess.CompletedProcess[str], verb: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"{verb.capitalize()} cancelled; nothing changed." in proc.stdout
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {verb} not confirmed: no answer on stdin")
    assert f"--auto-approve to {verb} without asking" in line


@pytest.mark.parametrize("stdin", ["eof", "closed"])
def test_apply_without_an_answer_applies_nothing_and_names_the_flag(svc, stdin):
    spec = str(svc.write(replicas=1))
    proc = skyhedge(svc.root, "apply", spec, "--state-dir", str(svc.state_dir), "--no-routing", stdin=stdin)
    assert "Apply these changes? [y/N]" in proc.stdout
    assert_not_confirmed(proc, "apply")
    assert svc.pids() == {}


@pytest.mark.parametrize("stdin", ["eof", "closed"])
def test_destroy_without_an_answer_destroys_nothing_and_names_the_flag(svc, stdin):
    spec = str(svc.write(replicas=1))
    sd = str(svc.state_dir)
    applied = CliRunner().invoke(main, ["apply", spec, "--state-dir", sd, "--no-routing", "--auto-approve"])
    assert applied.exit_code == 0, applied.output
    running = svc.pids()
    assert sorted(running) == ["r-0001"]
    proc = skyhedge(svc.root, "destroy", spec, "--state-dir", sd, stdin=stdin)
    assert "Destroy them? [y/N]" in proc.stdout
    assert_not_confirmed(proc, "destroy")
    assert svc.pids() == running


def test_a_declined_question_is_not_told_about_the_flag(svc):
    """A "no" typed by someone is an answer: no `error:` line about stdin."""
    spec = str(svc.write(replicas=1))
    no = CliRunner().invoke(
        main, ["apply", spec, "--state-dir", str(svc.state_dir), "--no-routing"], input="n\n"
    )
    assert no.exit_code == 1 and "Apply cancelled; nothing changed." in no.output
    assert "not confirmed" not in no.output and svc.pids() == {}


#: read(2)'s number in /proc/PID/syscall, by machine
_READ_SYSCALL = {"x86_64": "0", "aarch64": "63"}


def _wait_reading_stdin(pid: int, timeout: float = 30.0) -> None:
    """Until `pid` is blocked reading fd 0 (its question's answer), as Linux reports it.

    Why not signal as soon as the question shows: the question is written, then stdin read; a
    signal landing between the two (a loaded machine, `-n 2`) is only flagged by Python's C
    handler, and the read(2) that follows blocks with the KeyboardInterrupt pending (measured: a
    60 s timeout under xdist). A person at a terminal answers seconds after the question."""
    number = _READ_SYSCALL.get(platform.machine())
    deadline = time.monotonic() + timeout
    while number is not None and time.monotonic() < deadline:
        try:
            fields = Path(f"/proc/{pid}/syscall").read_text().split()
        except OSError:
            break  # not Linux, or not allowed to look: the fallback below
        if fields[:2] == [number, "0x0"]:
            return
        time.sleep(0.01)
    time.sleep(0.5)


def _interrupt_at_the_question(cwd: Path, signum: int, *args: str) -> tuple[int, str, str]:
    """Run `python -m skyhedge ARGS` with stdin a pipe nobody writes to (someone at a terminal who
    does not answer), send `signum` once the question is asked; its exit code and output."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "skyhedge", *args],
        cwd=cwd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:
        assert proc.stdout is not None
        out = b""
        while b"[y/N]" not in out:
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, "the command ended without asking"
            out += chunk
        _wait_reading_stdin(proc.pid)
        proc.send_signal(signum)
        # stdin stays open until the command has ended: `communicate` closed it at once, and a
        # command reading end-of-input before its signal handler ran (a loaded machine) answered
        # "no answer on stdin", not the signal
        rest_f = pool.submit(proc.stdout.read)
        err_f = pool.submit(proc.stderr.read)  # type: ignore[union-attr]
        proc.wait(timeout=60)
        rest, err = rest_f.result(timeout=60), err_f.result(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        pool.shutdown()  # (the reads end with the process)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()  # type: ignore[union-attr]
    return proc.returncode, (out + rest).decode(), err.decode()


@pytest.mark.parametrize(
    ("signum", "by", "code"), [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGINT, "Ctrl-C", 130)]
)
def test_a_signal_at_the_apply_question_cancels_and_is_not_told_as_no_answer_on_stdin(svc, signum, by, code):
    spec = str(svc.write(replicas=1))
    rc, out, err = _interrupt_at_the_question(
        svc.root, signum, "apply", spec, "--state-dir", str(svc.state_dir), "--no-routing"
    )
    assert rc == code, out + err
    assert "Apply cancelled; nothing changed." in out
    assert err.strip().splitlines() == [f"error: apply not confirmed: interrupted by {by} at the question"]
    assert svc.pids() == {}


def test_a_sigterm_at_the_destroy_question_cancels_with_exit_143(svc):
    spec = str(svc.write(replicas=1))
    sd = str(svc.state_dir)
    applied = CliRunner().invoke(main, ["apply", spec, "--state-dir", sd, "--no-routing", "--auto-approve"])
    assert applied.exit_code == 0, applied.output
    running = svc.pids()
    rc, out, err = _interrupt_at_the_question(svc.root, signal.SIGTERM, "destroy", spec, "--state-dir", sd)
    assert rc == 143, out + err
    assert "Destroy cancelled; nothing changed." in out
    assert err.strip().splitlines() == [
        "error: destroy not confirmed: interrupted by SIGTERM at the question"
    ]
    assert svc.pids() == running
