"""The local cloud's launcher and process bookkeeping, driven directly (no Terraform): fast checks of
what the Terraform-level tests rely on."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from account_support import as_user
from local_support import SERVER, free_base_port, get

from skyhedge.clouds.local import capacity, runtime_dir
from skyhedge.clouds.local import logs as local_logs
from skyhedge.clouds.local.launcher import CONFIG_ENV, EXIT_CAPACITY
from skyhedge.clouds.local.processes import (
    REPLICA_ENV,
    RUNTIME_ENV,
    LocalProcess,
    find_processes,
    is_running,
    kill_all,
    list_pidfiles,
    pid_path,
    proc_starttime,
    prune_logs,
    read_pidfile,
    rotate_logs,
    stop_replica,
    stop_unrecorded,
    write_pidfile,
)
from skyhedge.errors import CloudError
from skyhedge.state import ReplicaRecord

REPO = Path(__file__).resolve().parents[1]


def launch(action: str, cfg: dict, rid: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, CONFIG_ENV: json.dumps(cfg), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "skyhedge.clouds.local.launcher", action, rid or cfg["id"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def config(runtime: Path, tmp_path: Path, port: int, **extra) -> dict:
    server = tmp_path / "server.py"
    server.write_text(SERVER, encoding="utf-8")
    cfg = {
        "id": "r-0001",
        "service": "svc",
        "region": "local",
        "zone": "local-a",
        "market": "spot",
        "port": port,
        "command": f"exec {sys.executable} {server}",
        "setup": None,
        "env": {},
        "workdir": str(tmp_path),
        "runtime_dir": str(runtime),
    }
    cfg.update(extra)
    return cfg


def wait_health(port: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return get(f"http://127.0.0.1:{port}/health")[0]
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_start_serves_and_stop_leaves_nothing(runtime, tmp_path):
    port = free_base_port(1) + 1
    cfg = config(runtime, tmp_path, port)
    done = launch("start", cfg)
    assert done.returncode == 0, done.stderr
    assert wait_health(port) == 200
    proc = read_pidfile(runtime, "r-0001")
    assert proc is not None and is_running(proc) and proc.port == port
    assert find_processes(runtime, "r-0001")
    done = launch("stop", {"id": "r-0001", "runtime_dir": str(runtime), "grace": 5})
    assert done.returncode == 0, done.stderr
    assert "stopped r-0001" in done.stdout
    assert find_processes(runtime) == []
    assert read_pidfile(runtime, "r-0001") is None
    again = launch("stop", {"id": "r-0001", "runtime_dir": str(runtime), "grace": 5})
    assert again.returncode == 0 and "already stopped" in again.stdout


def test_env_values_reach_the_process_literally(runtime, tmp_path):
    evil = 'it\'s "quoted" ${path.module} %{if true}x%{endif} $(touch pwned) `id`\nsecond line; rm -rf /'
    port = free_base_port(1) + 1
    done = launch("start", config(runtime, tmp_path, port, env={"EVIL": evil}))
    assert done.returncode == 0, done.stderr
    wait_health(port)
    assert get(f"http://127.0.0.1:{port}/env/EVIL")[1] == evil
    assert get(f"http://127.0.0.1:{port}/env/PORT")[1] == str(port)
    assert get(f"http://127.0.0.1:{port}/env/TF_IN_AUTOMATION")[1] is None
    assert not (tmp_path / "pwned").exists()


def test_spot_launch_into_a_preempted_zone_fails_like_a_capacity_error(runtime, tmp_path):
    capacity.mark_preempted(runtime, "local-a")
    port = free_base_port(1) + 1
    done = launch("start", config(runtime, tmp_path, port))
    assert done.returncode == EXIT_CAPACITY
    assert "InsufficientCapacity" in done.stderr and "local-a" in done.stderr
    assert find_processes(runtime) == [] and read_pidfile(runtime, "r-0001") is None
    # on-demand is a different market: the zone still has on-demand capacity
    od = launch("start", config(runtime, tmp_path, port, market="on-demand"))
    assert od.returncode == 0, od.stderr


def test_preemption_can_expire_and_be_cleared(runtime):
    now = time.time()
    capacity.mark_preempted(runtime, "local-a", until=now + 60)
    capacity.mark_preempted(runtime, "local-b")
    assert capacity.preempted(runtime, "local-a", now) == (True, now + 60)
    assert capacity.preempted(runtime, "local-a", now + 61) == (False, None)
    assert capacity.preempted(runtime, "local-b", now + 1e6) == (True, None)
    capacity.clear(runtime, "local-b")
    assert capacity.read_capacity(runtime) == {"local-a": now + 60}
    capacity.clear(runtime)
    assert capacity.read_capacity(runtime) == {}


def test_a_malformed_capacity_file_is_an_error_naming_it(runtime, tmp_path):
    capacity.capacity_path(runtime).write_text("{not json", encoding="utf-8")
    done = launch("start", config(runtime, tmp_path, free_base_port(1) + 1))
    assert done.returncode == 1
    assert "capacity.json" in done.stderr


def test_port_in_use_and_instant_exit_are_clear_failures(runtime, tmp_path):
    port = free_base_port(1) + 1
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        done = launch("start", config(runtime, tmp_path, port))
    assert done.returncode == 1 and f"port 127.0.0.1:{port} is already in use" in done.stderr
    crash = launch("start", config(runtime, tmp_path, port, command="echo boom >&2; exit 7"))
    assert crash.returncode == 1
    assert "exited at once with 7" in crash.stderr and "boom" in crash.stderr
    # an interpreter that starts slowly, then fails on a missing script, is caught as well
    slow = launch(
        "start", config(runtime, tmp_path, port, command="sleep 0.3; echo 'no such file' >&2; exit 2")
    )
    assert slow.returncode == 1 and "exited at once with 2" in slow.stderr
    # the log keeps every attempt of the ID; the error quotes only the last one
    assert "boom" not in slow.stderr and slow.stderr.count("=== skyhedge: starting") == 1
    assert find_processes(runtime) == []


def test_a_disk_that_refuses_the_log_or_the_pid_file_is_named_and_leaves_nothing(
    runtime, tmp_path, monkeypatch
):
    """A full disk under the state dir: the launch failed with "OSError: [Errno 28] No space
    left on device", naming no file (which disk?). The log and the pid file are named now, and
    a pid file write leaves no temp file behind."""
    import errno
    import resource

    import skyhedge.clouds.local.processes as processes

    port = free_base_port(1) + 1
    log = runtime / "replicas" / "r-0001.log"
    log.parent.mkdir(parents=True)
    # a file size limit of 0 refuses every write as a full disk does (EFBIG rather than ENOSPC);
    # the log is never a link to /dev/full: a link in its place is refused (test below)
    done = subprocess.run(
        [sys.executable, "-m", "skyhedge.clouds.local.launcher", "start", "r-0001"],
        env={**os.environ, CONFIG_ENV: json.dumps(config(runtime, tmp_path, port)), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)),
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == f"skyhedge-local: r-0001: cannot write its log {log} (File too large)"
    assert find_processes(runtime) == []

    proc = processes.LocalProcess("r-0002", 1, 1, port, "local-a", "spot", 0.0, 0, str(log))

    def full(src, dst, **dir_fds):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched, pytest.raises(OSError) as exc:
        patched.setattr(processes.os, "replace", full)
        write_pidfile(runtime, proc)
    assert exc.value.filename == str(runtime / "replicas" / "r-0002.json")
    assert sorted(p.name for p in (runtime / "replicas").iterdir()) == ["r-0001.log"]


def _plant(kind: str, at: Path, victim: Path) -> str:
    """Put `kind` of file at `at` where a log goes (pointing at `victim`); the refusal it gets."""
    at.parent.mkdir(parents=True, exist_ok=True)
    if kind == "symlink":
        at.symlink_to(victim)
        return "a symbolic link, not a log the launcher made: refused"
    if kind == "hardlink":
        os.link(victim, at)
        return "a file with 2 names (a hard link): refused"
    os.mkfifo(at)
    return "not a regular file: refused"


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
def test_a_log_replaced_by_a_link_is_never_written_through(runtime, tmp_path, kind):
    """Whoever can write the replicas dir (the replicas themselves; other accounts, for a state
    dir under /tmp) could put a link to a file of the user running skyhedge where the next
    launch's log goes: the launcher appended its header and the replica's whole output to it
    (`~/.bashrc` taking the lines a replica prints). The launch fails in one line instead."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    log = runtime / "replicas" / "r-0001.log"
    why = _plant(kind, log, victim)
    port = free_base_port(1) + 1
    done = launch("start", config(runtime, tmp_path, port, command="echo leaked; exec sleep 30"))
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == f"skyhedge-local: r-0001: cannot write its log {log} ({why})"
    assert victim.read_text() == "precious\n"
    assert find_processes(runtime) == [] and read_pidfile(runtime, "r-0001") is None


def test_rotation_neither_truncates_nor_copies_through_a_planted_link(runtime, tmp_path):
    """`rotate_logs` copied a log past its cap (following a link there) to `<id>.log.1`
    (following a link there too) and truncated it (through the link): a link to a big file of
    the user's emptied it."""
    from skyhedge.clouds.local.processes import rotate_logs

    big, other = tmp_path / "big", tmp_path / "other"
    big.write_text("x" * 100)
    other.write_text("mine\n")
    replicas = runtime / "replicas"
    _plant("symlink", replicas / "r-0001.log", big)
    (replicas / "r-0002.log").write_text("y" * 100)  # a real log past the cap, whose .1 is a link
    _plant("symlink", replicas / "r-0002.log.1", other)
    assert rotate_logs(runtime, max_bytes=10) == ["r-0002"]
    assert big.read_text() == "x" * 100 and other.read_text() == "mine\n"
    assert (replicas / "r-0002.log").read_text() == ""
    rotated = replicas / "r-0002.log.1"
    assert not rotated.is_symlink() and rotated.read_text() == "y" * 100


#: An account that is not this one: files are given to it with chown, which needs root.
OTHER_UID = 4242
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another account needs root")


def _forged_pidfile(folder: Path, victim: subprocess.Popen) -> None:
    """A pid file naming `victim` (its real start time: it passes the pid-reuse check)."""
    starttime = proc_starttime(victim.pid)
    forged = LocalProcess("r-0009", victim.pid, victim.pid, 1, "local-a", "spot", 0.0, starttime or 0, "x")
    (folder / "r-0009.json").write_text(json.dumps(asdict(forged)))


@pytest.mark.parametrize("link", ["local", "local/replicas"])
def test_a_local_or_replicas_folder_that_is_a_link_is_never_used(tmp_path, link):
    """`<state>/local` or `local/replicas` made a symbolic link to a folder elsewhere (by a tool
    of the user's, or by an account the state dir's group lets write it, which `check_trusted`
    allows): every log and pid file went there. A log planted there took the replica's whole
    output, a pid file planted there named the process group a stop SIGKILLs, `prune_logs`
    deleted the `r-*.log` files there and `skyhedge logs` printed them. Nothing goes through the
    link now: the launch fails in one line, the rest find nothing there and touch nothing."""
    state, elsewhere = tmp_path / "state", tmp_path / "elsewhere"
    (elsewhere / "replicas").mkdir(parents=True)
    (state / link).parent.mkdir(parents=True)
    (state / link).symlink_to(elsewhere if link == "local" else elsewhere / "replicas")
    folder = elsewhere / "replicas"
    (folder / "r-0001.log").write_text("")
    (folder / "r-0005.log").write_text("my own data\n")  # a gone replica's name, in the link's target
    runtime = runtime_dir(state)
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        _forged_pidfile(folder, victim)
        port = free_base_port(1) + 1
        done = launch("start", config(runtime, tmp_path, port, command="echo SECRET; exec sleep 30"))
        assert done.returncode == 1
        assert done.stderr == (
            f"skyhedge-local: r-0001: cannot keep its log and pid file: {runtime.parent / link}: "
            "a symbolic link, not the folder skyhedge made: refused (links are not followed)\n"
        )
        assert (folder / "r-0001.log").read_text() == "" and not (folder / "r-0001.json").exists()
        assert find_processes(runtime) == []
        assert read_pidfile(runtime, "r-0009") is None and list_pidfiles(runtime) == []
        assert stop_replica(runtime, "r-0009", grace=0.0) is False
        assert victim.poll() is None and (folder / "r-0009.json").exists()
        assert prune_logs(runtime, keep=set()) == [] and rotate_logs(runtime, max_bytes=1) == []
        assert (folder / "r-0005.log").read_text() == "my own data\n"
        record = ReplicaRecord(
            "r-0005", "local", "local", "local-a", "spot", launched_at=1.0, provisioned_at=2.0
        )
        with pytest.raises(CloudError, match="a symbolic link, not the folder skyhedge made: refused"):
            local_logs.read_log(None, state, record, None)  # type: ignore[arg-type]
    finally:
        victim.kill()
        victim.wait()
        kill_all(runtime)


@needs_root
def test_a_local_folder_another_account_made_first_is_refused(tmp_path):
    """A state dir its group may write (allowed: umask 002): another account made `local/` first,
    as a folder of its own, and so owned every log and pid file the launcher put there."""
    state = tmp_path / "state"
    (state / "local").mkdir(parents=True)
    os.chown(state / "local", OTHER_UID, OTHER_UID)
    runtime = runtime_dir(state)
    try:
        done = launch("start", config(runtime, tmp_path, free_base_port(1) + 1))
        assert done.returncode == 1
        assert done.stderr == (
            f"skyhedge-local: r-0001: cannot keep its log and pid file: {runtime}: owned by another "
            f"account (uid {OTHER_UID}), not by you or root: refused\n"
        )
        assert list((state / "local").iterdir()) == [] and find_processes(runtime) == []
    finally:
        kill_all(runtime)


@needs_root
def test_a_log_or_pid_file_another_account_made_is_not_used_and_a_restart_appends(runtime, tmp_path):
    """In a replicas dir the state dir's group may write, another account could make the next
    replica's log first, as a regular file of its own: the launcher appended the replica's whole
    output to it (for that account to read), and `skyhedge logs` showed what it wrote there. The
    launch replaces it with a log of its own, `skyhedge logs` refuses one another account made,
    and a pid file of another account's names no process to stop. A replica restarted under its
    ID still appends to its own log."""
    replicas = runtime / "replicas"
    replicas.mkdir()
    log = replicas / "r-0001.log"
    log.write_text("all good here\n")
    os.chown(log, OTHER_UID, OTHER_UID)
    os.chmod(log, 0o666)
    record = ReplicaRecord("r-0001", "local", "local", "local-a", "spot", launched_at=1.0, provisioned_at=2.0)
    with pytest.raises(CloudError) as refused:
        local_logs.read_log(None, runtime.parent, record, None)  # type: ignore[arg-type]
    assert str(refused.value) == (
        f"r-0001: cannot read its log {log}: owned by another account (uid {OTHER_UID}), "
        "not a log the launcher made: refused"
    )
    port = free_base_port(1) + 1
    assert (
        launch("start", config(runtime, tmp_path, port, command="echo first; exec sleep 30")).returncode == 0
    )
    assert os.stat(log).st_uid == os.geteuid() and "all good" not in log.read_text()
    assert stop_replica(runtime, "r-0001", grace=0.0)
    assert (
        launch("start", config(runtime, tmp_path, port, command="echo second; exec sleep 30")).returncode == 0
    )
    text = local_logs.read_log(None, runtime.parent, record, None).text  # type: ignore[arg-type]
    assert text.count("=== skyhedge: starting r-0001") == 2 and "first" in text and "second" in text
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        _forged_pidfile(replicas, victim)
        os.chown(replicas / "r-0009.json", OTHER_UID, OTHER_UID)
        assert read_pidfile(runtime, "r-0009") is None
        assert [p.id for p in list_pidfiles(runtime)] == ["r-0001"]
        stop_replica(runtime, "r-0009", grace=0.0)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("room", ["made by the old generation", "none"])
def test_rotation_on_a_disk_the_logs_filled_frees_it(tmp_path, room):
    """The copy to `<id>.log.1` needs as much room again as the log: on a disk full of logs it
    failed (ENOSPC) before the truncation, and the disk stayed full. The old generation goes
    first; with no room even then, the log is truncated uncopied: lines lost, the disk freed."""
    from disk_support import fill, small_fs

    from skyhedge.clouds.local.processes import rotate_logs

    with small_fs(tmp_path / "runtime", size="512k") as runtime:
        replicas = runtime / "replicas"
        replicas.mkdir()
        log, old = replicas / "r-0001.log", replicas / "r-0001.log.1"
        log.write_bytes(b"new\n" * 25_000)  # 100 KB
        old.write_bytes(b"old\n" * (25_000 if room == "made by the old generation" else 1))
        filler = fill(runtime)
        try:
            assert rotate_logs(runtime, max_bytes=50_000) == ["r-0001"]
        finally:
            filler.unlink()
        assert log.stat().st_size == 0
        if room == "none":
            assert not old.exists()
        else:
            assert old.read_bytes() == b"new\n" * 25_000
        assert sorted(p.name for p in replicas.iterdir()) == sorted(p.name for p in (log, old) if p.exists())


def test_escape_sequences_a_failed_replica_printed_reach_the_error_escaped(runtime, tmp_path):
    """The log tail in a failed launch's error reaches the operator's terminal (apply's error,
    the watcher's log line, the dashboard): what the replica printed may not retitle, clear or
    recolour it. Control characters are shown escaped; the text around them stays."""
    port = free_base_port(1) + 1
    noisy = r"printf '\033]0;OWNED\007\033[2J\033[31mRED\bover\n'; exit 3"
    crash = launch("start", config(runtime, tmp_path, port, command=noisy))
    assert crash.returncode == 1 and "exited at once with 3;" in crash.stderr
    assert r"\x1b]0;OWNED\x07\x1b[2J\x1b[31mRED\x08over" in crash.stderr
    assert not any(c in crash.stderr for c in "\x1b\x07\b")


def test_a_command_that_goes_to_the_background_is_told_so(runtime, tmp_path):
    """A command that returns 0 at once (`server &`, a self-daemonising server) is no crash:
    the error says it must stay in the foreground, and what it started is stopped with it."""
    port = free_base_port(1) + 1
    background = f"{sys.executable} -c 'import time; time.sleep(600)' &"
    done = launch("start", config(runtime, tmp_path, port, command=background))
    assert done.returncode == 1 and "exited at once with 0" in done.stderr
    assert "must keep running in the foreground" in done.stderr
    assert find_processes(runtime) == []
    crash = launch("start", config(runtime, tmp_path, port, command="exit 3"))
    assert "exited at once with 3;" in crash.stderr and "foreground" not in crash.stderr


def test_setup_runs_first_in_the_workdir(runtime, tmp_path):
    port = free_base_port(1) + 1
    cfg = config(runtime, tmp_path, port, setup="echo ready > setup-done", env={"X": "1"})
    assert launch("start", cfg).returncode == 0
    assert (tmp_path / "setup-done").read_text().strip() == "ready"
    failing = config(runtime, tmp_path, port + 1, id="r-0002", setup="exit 4")
    done = launch("start", failing)
    assert done.returncode == 1 and "run.setup exited with 4" in done.stderr


def test_a_failed_setup_leaves_nothing_running(runtime, tmp_path):
    """What a setup started in the background (a helper daemon, `cmd &`) must not outlive the
    launch the setup failed: before, it ran on until a later `destroy` swept it up as a stray."""
    port = free_base_port(1) + 1
    helper = f"{sys.executable} -c 'import time; time.sleep(600)'"
    failing = config(runtime, tmp_path, port, setup=f"{helper} & echo 'no model' >&2; exit 4")
    done = launch("start", failing)
    assert done.returncode == 1 and "run.setup exited with 4" in done.stderr
    assert "no model" in done.stderr
    assert find_processes(runtime) == []
    assert read_pidfile(runtime, "r-0001") is None


def test_a_setup_that_hangs_is_stopped_after_its_timeout(runtime, tmp_path):
    """Found by an audit: a hanging `run.setup` held the apply, and a watcher's whole pass, for
    good. It gets `setup_timeout` (the spec's readiness_probe.initial_delay_seconds), then the
    launch fails and nothing it started is left."""
    port = free_base_port(1) + 1
    helper = f"{sys.executable} -c 'import time; time.sleep(600)'"
    hangs = config(runtime, tmp_path, port, setup=f"{helper} & sleep 600", setup_timeout=1)
    started = time.monotonic()
    done = launch("start", hangs)
    assert time.monotonic() - started < 20
    assert done.returncode == 1
    assert "run.setup did not finish within 1s (readiness_probe.initial_delay_seconds)" in done.stderr
    assert find_processes(runtime) == [] and read_pidfile(runtime, "r-0001") is None


def test_stop_escalates_to_sigkill_for_the_whole_group(runtime, tmp_path):
    port = free_base_port(1) + 1
    ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    stubborn = f"trap '' TERM; {sys.executable} -c '{ignore}' & wait"
    assert launch("start", config(runtime, tmp_path, port, command=stubborn)).returncode == 0
    deadline = time.monotonic() + 5
    while len(find_processes(runtime)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(find_processes(runtime)) >= 2
    started = time.monotonic()
    assert stop_replica(runtime, "r-0001", grace=0.5) is True
    assert time.monotonic() - started < 5
    assert find_processes(runtime) == []


def test_a_stopped_replica_is_stopped_gracefully_without_waiting_out_the_grace(runtime, tmp_path):
    # a hung replica (found by a chaos run: SIGSTOP on its process group): it acts on no SIGTERM
    # while stopped, so its stop waited the whole grace, then SIGKILLed it without its shutdown
    port = free_base_port(1) + 1
    done = tmp_path / "shut-down"
    graceful = (
        "import signal, sys, time\n"
        "def bye(*_):\n"
        f"    open({str(done)!r}, 'w').close()\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "time.sleep(60)\n"
    )
    script = tmp_path / "graceful.py"
    script.write_text(graceful, encoding="utf-8")
    assert (
        launch("start", config(runtime, tmp_path, port, command=f"exec {sys.executable} {script}")).returncode
        == 0
    )
    proc = read_pidfile(runtime, "r-0001")
    assert proc is not None
    os.killpg(proc.pgid, signal.SIGSTOP)
    started = time.monotonic()
    assert stop_replica(runtime, "r-0001", grace=10.0) is True
    assert time.monotonic() - started < 5
    assert done.exists()  # its own SIGTERM handler ran: not killed at the grace's end
    assert find_processes(runtime) == []


def test_start_replaces_a_leftover_process_of_the_same_id(runtime, tmp_path):
    port = free_base_port(1) + 1
    cfg = config(runtime, tmp_path, port)
    assert launch("start", cfg).returncode == 0
    first = read_pidfile(runtime, "r-0001")
    assert launch("start", cfg).returncode == 0  # e.g. Terraform re-running a create after a crash
    second = read_pidfile(runtime, "r-0001")
    assert first is not None and second is not None and first.pid != second.pid
    assert not is_running(first)
    assert find_processes(runtime) == [second.pid] or second.pid in find_processes(runtime)


def test_kill_all_stops_everything_and_clears_pid_files_a_crash_left(runtime, tmp_path):
    """`destroy`'s safety net after a crash: nothing runs afterwards, and no pid file is left
    claiming a replica (the launcher's own stop, which removes it, never ran)."""
    port = free_base_port(2) + 1
    assert launch("start", config(runtime, tmp_path, port)).returncode == 0
    running = read_pidfile(runtime, "r-0001")
    assert running is not None
    dead = replace(running, id="r-0002", pid=os.getpid(), starttime=-1)  # a process long gone
    write_pidfile(runtime, dead)
    assert running.pid in kill_all(runtime)
    assert find_processes(runtime) == []
    assert read_pidfile(runtime, "r-0001") is None and read_pidfile(runtime, "r-0002") is None


def test_a_pid_file_is_never_written_through_a_link_planted_where_its_temp_file_goes(runtime, tmp_path):
    """The temp file of a pid file had a predictable name (`.<file>.<pid>.tmp`) and was opened
    through whatever stood there: a link planted in a runtime dir another account can write
    turned the launcher's write onto any file it may write."""
    victim = tmp_path / "victim"
    victim.write_text("keep me\n", encoding="utf-8")
    proc = LocalProcess(
        id="r-0007",
        pid=os.getpid(),
        pgid=os.getpgid(0),
        port=1234,
        zone="local-a",
        market="spot",
        started_at=0.0,
        starttime=-1,
        log=str(tmp_path / "r-0007.log"),
    )
    target = pid_path(runtime, proc.id)
    target.parent.mkdir(parents=True, exist_ok=True)
    (target.parent / f".{target.name}.{os.getpid()}.tmp").symlink_to(victim)
    write_pidfile(runtime, proc)
    assert victim.read_text(encoding="utf-8") == "keep me\n"
    assert read_pidfile(runtime, proc.id) == proc
    assert not target.is_symlink()


def _start_in_background(cfg: dict) -> subprocess.Popen[str]:
    env = {**os.environ, CONFIG_ENV: json.dumps(cfg), "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "skyhedge.clouds.local.launcher", "start", cfg["id"]],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, procs: list[subprocess.Popen[str]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def test_spot_launches_run_their_setups_side_by_side(runtime, tmp_path):
    """Each setup waits for a file the test writes only once both setups run: under the capacity
    lock (as before), the second setup waited for the first, which waited for good."""
    base = free_base_port(2)
    go = tmp_path / "go"
    setup = f'touch "{tmp_path}/setup-$SKYHEDGE_REPLICA_ID"; while [ ! -e "{go}" ]; do sleep 0.02; done'
    cfgs = [
        config(runtime, tmp_path, base + i, id=f"r-000{i}", zone=zone, setup=setup)
        for i, zone in ((1, "local-a"), (2, "local-b"))
    ]
    procs = [_start_in_background(cfg) for cfg in cfgs]
    try:
        for i in (1, 2):
            _wait_for(tmp_path / f"setup-r-000{i}", procs)
        go.touch()
        for proc in procs:
            _out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
        assert sorted(p.id for p in list_pidfiles(runtime)) == ["r-0001", "r-0002"]
    finally:
        go.touch()
        for proc in procs:
            proc.kill()
            proc.wait()
        kill_all(runtime)


def test_a_zone_preempted_while_the_setup_ran_refuses_the_launch_and_leaves_nothing(runtime, tmp_path):
    """The zone's room is checked again once the setup is done, under the capacity lock."""
    go = tmp_path / "go"
    setup = f'sleep 300 & touch "{tmp_path}/setup-running"; while [ ! -e "{go}" ]; do sleep 0.02; done'
    cfg = config(runtime, tmp_path, free_base_port(1) + 1, setup=setup)
    proc = _start_in_background(cfg)
    try:
        _wait_for(tmp_path / "setup-running", [proc])
        capacity.mark_preempted(runtime, "local-a")
        go.touch()
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == EXIT_CAPACITY, err
        assert "no spot capacity in local zone local-a" in err
        assert read_pidfile(runtime, "r-0001") is None
        assert find_processes(runtime) == []  # the setup's background `sleep 300` too
    finally:
        go.touch()
        proc.kill()
        proc.wait()
        kill_all(runtime)


def test_stop_unrecorded_stops_what_a_cut_short_launch_left_and_spares_recorded_replicas(runtime, tmp_path):
    """An interrupted apply: Terraform killed a launcher mid-setup, and the setup's process, which
    carries the replica's ID but has no pid file, ran on."""
    port = free_base_port(2)
    assert launch("start", config(runtime, tmp_path, port + 1, market="on-demand")).returncode == 0
    marker = {RUNTIME_ENV: str(runtime.resolve()), REPLICA_ENV: "r-0002"}
    setup = subprocess.Popen(["sleep", "60"], env={**os.environ, **marker})
    try:
        deadline = time.monotonic() + 10
        while setup.pid not in find_processes(runtime) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stop_unrecorded(runtime) == ["r-0002"]
        assert setup.wait(timeout=10) != 0
        recorded = read_pidfile(runtime, "r-0001")
        assert recorded is not None and is_running(recorded)
    finally:
        setup.kill()
        setup.wait()
        kill_all(runtime)


#: The account skyhedge runs as in `as_user`: not root, so file modes bind it.
USER_UID = 4243


@pytest.fixture
def shared_tmp():
    """A folder every account may traverse (pytest's tmp_path is root's alone): for a process of
    USER_UID's to reach a runtime dir inside it. Removed at teardown."""
    import shutil
    import tempfile

    where = Path(tempfile.mkdtemp(prefix="skyhedge-shared-"))
    os.chmod(where, 0o711)
    yield where
    shutil.rmtree(where, ignore_errors=True)


@needs_root
def test_a_log_another_account_made_that_we_may_not_write_is_replaced_too(shared_tmp):
    """Another account in the state dir's group made the next replica's log first, with the
    usual mode 0644: the launch (run by anyone but root) could not open it for writing, and failed
    with "Permission denied" (any launch of that ID, for good), where a log it may write was
    replaced by one of its own."""
    from skyhedge.clouds.local.processes import open_log

    runtime = shared_tmp / "state" / "local"
    (runtime / "replicas").mkdir(parents=True)
    for folder in (shared_tmp / "state", runtime, runtime / "replicas"):
        os.chown(folder, USER_UID, USER_UID)
        os.chmod(folder, 0o775)  # the state dir's group may write it (umask 002): allowed
    log = runtime / "replicas" / "r-0001.log"
    log.write_text("planted\n")
    os.chown(log, OTHER_UID, OTHER_UID)
    os.chmod(log, 0o644)

    def launcher_opens_its_log() -> int:
        fd = open_log(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, b"mine\n")
        os.close(fd)
        return os.stat(log).st_uid

    assert as_user(USER_UID, launcher_opens_its_log) == ("ok", USER_UID)
    assert log.read_text() == "mine\n"
