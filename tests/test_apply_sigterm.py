"""A SIGTERM to `apply` or `destroy` (a CI job cancelled, `timeout`, systemd stopping a unit) stops
as a Ctrl-C does: Terraform is told to stop (SIGINT, as a terminal would have sent it), what it
ran in skyhedge's process group (a local launcher, its `run.setup`) stops with it, and the command
says so in one line, exit 143. Before, skyhedge died at once, without a word, while Terraform went
on as an orphan, and a running `run.setup` outlived everything.

And `destroy` counts what Terraform destroyed: replicas an apply cut short created without the
state hearing of it are "destroyed", not "recorded but never created"."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from controller_fakes import ROUTER_PORT
from local_support import LocalService, make_service

import skyhedge.engine as engine_module
from skyhedge.cli import main
from skyhedge.cli._app import Terminated, sigterm_as_interrupt
from skyhedge.engine import Invocation, Terraform, interrupt_running
from skyhedge.state import load_state, save_state

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def service(tmp_path: Path) -> Iterator[LocalService]:
    """Two local replicas whose `run.setup` marks that it runs, then takes a minute."""
    svc = make_service(tmp_path, "sigterm-svc", replicas=2)
    svc.write()
    data = yaml.safe_load(svc.spec_path.read_text(encoding="utf-8"))
    data["run"]["setup"] = f'touch "{tmp_path}/setup-$SKYHEDGE_REPLICA_ID"; sleep 60'
    data["readiness_probe"]["initial_delay_seconds"] = 120  # the setup's limit: never the cause here
    # the router's port free now (not the default 8080: a developer's own service, another
    # pytest-xdist worker's apply): `apply` checks it before it launches anything
    data["service"] = {"port": ROUTER_PORT}
    svc.spec_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    procs: list[subprocess.Popen[str]] = []
    svc.procs = procs  # type: ignore[attr-defined]
    try:
        yield svc
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        CliRunner().invoke(
            main, ["destroy", str(svc.spec_path), "--state-dir", str(svc.state_dir), "--auto-approve"]
        )
        svc.cleanup()


def _start(svc: LocalService, *args: str) -> subprocess.Popen[str]:
    """`skyhedge ARGS` in its own session (a signal to its group reaches nothing of pytest's)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "skyhedge", *args],
        cwd=svc.root,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    svc.procs.append(proc)  # type: ignore[attr-defined]
    return proc


def _wait_for_setups(svc: LocalService, proc: subprocess.Popen[str], count: int) -> None:
    deadline = time.monotonic() + 90
    while len(list(svc.root.glob("setup-r-*"))) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the launches never reached run.setup"
        time.sleep(0.05)


def test_a_sigterm_during_apply_stops_terraform_and_the_setups_and_says_so_exit_143(service):
    # --no-routing: the router is not what this is about, and its preflight refused the whole
    # apply wherever another process held the default service.port 8080
    apply = _start(
        service,
        "apply",
        str(service.spec_path),
        "--state-dir",
        str(service.state_dir),
        "--auto-approve",
        "--no-routing",
    )
    _wait_for_setups(service, apply, 2)
    apply.send_signal(signal.SIGTERM)
    _out, err = apply.communicate(timeout=90)
    assert apply.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: apply interrupted by SIGTERM (Terraform stopped where it was; "), err
    assert "Traceback" not in err
    # Terraform passed the stop on to the launchers; their run.setup went with them (the sleep 60
    # used to run on, reparented to init)
    deadline = time.monotonic() + 10
    while service.processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.processes() == []
    # and the state is usable: destroy finishes the job
    result = CliRunner().invoke(
        main, ["destroy", str(service.spec_path), "--state-dir", str(service.state_dir), "--auto-approve"]
    )
    assert result.exit_code == 0, result.output
    assert service.processes() == []


def test_destroy_counts_replicas_an_apply_cut_short_created_as_destroyed(service):
    """An apply killed mid-way (`kill -9`, the OOM killer) leaves Terraform's state holding
    replicas that skyhedge's state still records as never provisioned."""
    data = yaml.safe_load(service.spec_path.read_text(encoding="utf-8"))
    del data["run"]["setup"]
    service.spec_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    args = [str(service.spec_path), "--state-dir", str(service.state_dir)]
    result = CliRunner().invoke(main, ["apply", *args, "--auto-approve", "--no-routing"])
    assert result.exit_code == 0, result.output
    state = load_state(service.state_dir, "sigterm-svc")
    launched = sorted(r.id for r in state.live())
    assert launched and sorted(service.pids()) == launched
    for rec in state.live():  # as the cut-short apply left them: launched, never heard of
        rec.provisioned_at, rec.cloud_id, rec.outputs = None, None, {}
    save_state(service.state_dir, state)
    result = CliRunner().invoke(main, ["destroy", *args, "--auto-approve"])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert f"Destroyed {len(launched)} replica(s) in local/local." in flat, result.output
    assert "never created" not in flat
    assert service.processes() == []


def test_interrupt_running_with_nothing_running_signals_nothing():
    assert interrupt_running() == 0


#: Terraform as it takes interrupts (SIGINT or SIGTERM): the first one is a request to stop
#: gracefully, a second one makes it exit at once ("Two interrupts received. Exiting immediately.
#: Note that data loss may have occurred.", its state unwritten).
FAKE_TERRAFORM = """\
import signal, sys, time
heard = []
def on(signum, frame):
    heard.append(signum)
    if len(heard) == 1:
        print("Interrupt received. Please wait for Terraform to exit", flush=True)
    else:
        print("Two interrupts received. Exiting immediately.", flush=True)
        sys.exit(2)
signal.signal(signal.SIGINT, on)
signal.signal(signal.SIGTERM, on)
print("applying", flush=True)
deadline = time.monotonic() + 30
while not heard and time.monotonic() < deadline:
    time.sleep(0.01)
time.sleep(1.0)  # the operations in flight finish, the state is written
print("stopped gracefully", flush=True)
sys.exit(1)
"""


@pytest.fixture
def fake_terraform(tmp_path: Path) -> Iterator[tuple[Terraform, Invocation, dict]]:
    """A Terraform engine running FAKE_TERRAFORM; `run` it in a thread with `start()`."""
    binary = tmp_path / "terraform"
    binary.write_text(f"#!{sys.executable}\n{FAKE_TERRAFORM}", encoding="utf-8")
    binary.chmod(0o755)
    engine = Terraform(home=tmp_path / "tf", binary=str(binary))
    inv = engine.invocation(["apply"], tmp_path)
    box: dict = {"lines": []}

    def start() -> threading.Thread:
        thread = threading.Thread(target=lambda: box.update(done=engine.run(inv, box["lines"].append)))
        thread.start()
        deadline = time.monotonic() + 30
        while "applying" not in box["lines"]:
            assert time.monotonic() < deadline, "the fake Terraform never started"
            time.sleep(0.01)
        return thread

    box["start"] = start
    yield engine, inv, box
    for proc in tuple(engine_module._running):
        proc.kill()


def test_a_sigterm_that_reached_terraform_too_is_not_passed_on_as_a_second_interrupt(
    fake_terraform, sigterm_outside_ignored
):
    """`timeout` and CI runners signal the whole process group, systemd the whole cgroup: Terraform
    got the SIGTERM too, and skyhedge's SIGINT on top of it made it exit at once."""
    _engine, _inv, box = fake_terraform
    with pytest.raises(Terminated), sigterm_as_interrupt():
        thread = box["start"]()
        [proc] = [p for p in engine_module._running if p.returncode is None]
        os.kill(proc.pid, signal.SIGTERM)  # the group's signal reaches Terraform
        os.kill(os.getpid(), signal.SIGTERM)  # and skyhedge
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.01)
    thread.join(timeout=30)
    assert box["lines"].count("Interrupt received. Please wait for Terraform to exit") == 1
    assert "Two interrupts received. Exiting immediately." not in box["lines"]
    assert box["lines"][-1] == "stopped gracefully"


@pytest.fixture
def sigterm_outside_ignored() -> Iterator[None]:
    """A SIGTERM sent to this process after `sigterm_as_interrupt` gave its handler back must not
    end the test run."""
    old = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def test_two_sigterms_to_skyhedge_alone_interrupt_terraform_once(fake_terraform, sigterm_outside_ignored):
    """A second SIGTERM while the first stop is under way (apply waits for Terraform to finish
    what is in flight) was passed on as a second SIGINT: Terraform exited at once."""
    _engine, _inv, box = fake_terraform
    with pytest.raises(Terminated), sigterm_as_interrupt():
        thread = box["start"]()

        go = threading.Event()

        def twice() -> None:
            go.wait()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.7)
            os.kill(os.getpid(), signal.SIGTERM)

        sender = threading.Thread(target=twice)
        sender.start()
        try:
            go.set()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.01)
        finally:  # as apply's thread pool waits for Terraform, still within
            thread.join(timeout=30)
            sender.join()
    assert box["lines"].count("Interrupt received. Please wait for Terraform to exit") == 1
    assert "Two interrupts received. Exiting immediately." not in box["lines"]
    assert box["lines"][-1] == "stopped gracefully"
