"""Faults a running watcher meets on the local cloud, found by chaos runs of `skyhedge up` under
load: Terraform's state lock held by another process, a replica process that exits at once (real
engine and processes), the router's nginx killed from outside (real nginx), and the watcher out
of file descriptors. Every process, port and directory a test starts is stopped or removed by
its fixture."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from controller_fakes import LOCAL_SPEC, FakeExecutor, FakeProber, fake_controller
from local_support import LocalService, make_service
from routing_support import needs_nginx

from skyhedge.controller.executor import TerraformExecutor
from skyhedge.controller.loop import Controller, ControllerOptions
from skyhedge.controller.runner import Watcher
from skyhedge.controller.supervisor import Supervisor
from skyhedge.routing import Router
from skyhedge.spec import load_spec

#: Holds Terraform's lock on a local state file (argv[1]) as its local backend takes it, until killed.
HOLD_LOCK = (
    "import fcntl, sys, time\n"
    "held = open(sys.argv[1], 'r+')\n"
    "fcntl.lockf(held, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[LocalService]:
    service = make_service(tmp_path, "faults", replicas=2)
    yield service
    service.cleanup()


def _apply_once(svc: LocalService, replicas: int, **spec: object) -> Controller:
    loaded = load_spec(svc.write(replicas=replicas, **spec))
    ctl = Controller(loaded, svc.state_dir, executor=TerraformExecutor(loaded, svc.state_dir))
    ctl.tick()
    return ctl


def test_an_apply_refused_by_a_held_terraform_lock_names_no_replica_as_failed(svc):
    """The watcher gives up a replica whose launch failed in three applies of its own: an apply
    that never reached it (the state lock held by an operator's `terraform` in the root) must
    not count, or a replica that never ran is replaced under a new ID every three backoffs."""
    first = _apply_once(svc, 1)
    assert first.last_apply is not None and not first.last_apply.failed
    state_file = svc.state_dir / "tf" / "state" / "local-local.tfstate"
    # another process (a lock of this one would go with the first file it closes, POSIX's rule)
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(state_file)], stdout=subprocess.PIPE
    ) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
            ctl = _apply_once(svc, 2)
        finally:
            holder.kill()  # (the `with` waits for it and closes its pipe)
    result = ctl.last_apply
    assert result is not None and result.errors and "state lock" in result.errors[0]
    assert result.failed_replicas == ()


def test_a_replica_whose_command_exits_at_once_is_named_by_the_failed_apply(svc):
    flag = svc.root / "fail"
    flag.touch()
    ctl = _apply_once(svc, 2, command=svc.failing_command("r-0002", flag))
    result = ctl.last_apply
    assert result is not None and result.errors
    assert result.failed_replicas == ("r-0002",)


@pytest.fixture
def routed_watcher(tmp_path: Path, write_spec) -> Iterator[Watcher]:
    """A watcher of LOCAL_SPEC with its real nginx router, over a fake Terraform and prober,
    running its loop in a thread at a 30 s interval; stopped, and its router taken down, after."""
    spec = load_spec(write_spec(LOCAL_SPEC))
    with Watcher(spec, tmp_path / "state", options=ControllerOptions(interval=30.0)) as watcher:
        assert watcher.controller is not None
        for source in watcher.controller.sources:  # no replica process runs: none to watch
            source.close()
        watcher.controller.sources = []
        watcher.controller.executor = FakeExecutor()
        watcher.controller.prober = FakeProber()
        loop = threading.Thread(target=watcher.run, kwargs={"handle_signals": False}, daemon=True)
        loop.start()
        try:
            yield watcher
        finally:
            watcher.stop()
            loop.join(timeout=30)
            Router(spec, tmp_path / "state").down(timeout=5)
    assert not loop.is_alive()


def _wait_for(what: str, predicate, timeout: float) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"no {what} within {timeout:g}s")
        time.sleep(0.05)
    return time.monotonic() - started


@needs_nginx
def test_a_router_killed_from_outside_is_started_again_at_once_not_at_the_next_pass(routed_watcher):
    """nginx killed (kill -9, the OOM killer): every client is refused until it runs again. Only
    the next pass restarted it, up to `--interval` later (9.5 s of refused connections at the
    default 10 s, measured under load); its exit now wakes the loop."""
    ctl = routed_watcher.controller
    assert ctl is not None and ctl.router is not None
    router = ctl.router
    supervisor = routed_watcher.supervisor
    assert supervisor is not None

    def settled() -> bool:  # two READY replicas routed, the on-demand cover released and drained
        routed = ctl.state.extra.get("routed") or []
        return (
            router.running() and len(routed) == len(ctl.state.live()) == 2 and "drain" not in ctl.state.extra
        )

    _wait_for("a settled service", settled, 30)
    ticks = supervisor.ticks
    time.sleep(1.5)
    assert supervisor.ticks == ticks  # the loop waits out its 30 s interval now
    killed = router.pid()
    assert killed is not None
    os.killpg(killed, signal.SIGKILL)  # the master and its workers (their own process group)
    took = _wait_for(
        "router started again", lambda: any("started it again" in n.text for n in list(ctl.notes)), 10
    )
    assert took < 5, took
    assert router.pid() not in (None, killed)


class _Master:
    """A stand-in router master: a real process (a pidfd is taken on it) whose `pid()` a router
    watch asks; `exit_on_next_look` ends it inside the next `pid()` call, so the process exits
    after the watch's last wait on it and before its next look."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        self.exit_on_next_look = False
        self.looks = 0

    def pid(self) -> int | None:
        self.looks += 1
        if self.exit_on_next_look:
            self.kill()
        return self.proc.pid if self.proc.returncode is None else None  # (reaped: not alive)

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def router_watch(monkeypatch) -> Iterator[tuple[_Master, threading.Event]]:
    """`Watcher._watch_router` running over a `_Master` (1 s between looks, as in a watcher), and
    the event its wake-ups set; the watch stopped and the process killed after."""
    from types import SimpleNamespace

    master = _Master()
    woke = threading.Event()
    watcher = SimpleNamespace(
        controller=SimpleNamespace(router=master),
        supervisor=SimpleNamespace(wake=woke.set),
        route=True,
        gitops=None,
    )
    try:
        with Watcher._watch_router(watcher):  # type: ignore[arg-type]
            _wait_for("the watch's first look", lambda: master.looks > 0, 5)
            time.sleep(0.2)
            yield master, woke
    finally:
        master.kill()


def test_the_router_watch_wakes_at_an_exit_with_descriptors_past_1024(high_descriptors, router_watch):
    """select() refuses a descriptor numbered 1024 or more: the watch failed every turn on its
    pidfd, and a killed router was started again only at the next pass (measured: no wake-up in
    5 s, instead of 1 ms)."""
    master, woke = router_watch
    assert not woke.is_set()
    master.kill()
    assert woke.wait(2.0)


def test_the_router_watch_wakes_for_a_router_that_exits_between_two_looks(router_watch):
    """The router exiting after one wait on its pidfd timed out and before the watch looked which
    process is the router: the look finds none, and the watch, which woke only when its pidfd
    said so, forgot the process without a wake-up (a restart waited for the next pass)."""
    master, woke = router_watch
    looks = master.looks
    master.exit_on_next_look = True
    _wait_for("the next look", lambda: master.looks > looks, 5)
    assert woke.wait(2.0)


def _out_of_descriptors(*_: object) -> NoReturn:
    raise OSError(errno.EMFILE, "Too many open files", "/proc")


def test_a_pass_failing_for_the_machine_is_one_log_line_not_a_traceback(caplog):
    """An OSError ending a pass (the watcher out of file descriptors, measured with `prlimit`) is
    the machine's doing: one line and the backoff, as a SkyhedgeError is; it was `tick crashed`
    with a traceback every pass."""
    supervisor = Supervisor(_out_of_descriptors)
    with caplog.at_level(logging.INFO, logger="skyhedge"):
        delay = supervisor.run_once()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "tick failed (1 in a row): [Errno 24] Too many open files: '/proc'"
    ]
    assert errors[0].exc_info is None
    assert supervisor.failures == 1 and delay == supervisor.backoff()


def test_an_event_source_failing_for_the_machine_is_one_note_not_a_traceback(tmp_path, write_spec, caplog):
    """The local source reads pid files: out of file descriptors, its poll raises an OSError (a
    pid file it cannot read is no proof its replica is gone, so it must not answer without it)."""
    ctl = fake_controller(load_spec(write_spec(LOCAL_SPEC)), tmp_path / "state")
    (source,) = ctl.sources
    source.poll = _out_of_descriptors  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, logger="skyhedge"):
        ctl.tick()
    assert "event source fake: [Errno 24] Too many open files: '/proc'" in [n.text for n in ctl.notes]
    assert not [r for r in caplog.records if r.exc_info is not None]
