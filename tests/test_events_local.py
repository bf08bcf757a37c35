"""Local events: real replica processes started by the local launcher, the capacity file, wake-ups,
the orphan sweep, and the chaos helpers behind `skyhedge preempt` and market replays."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from routing_support import free_port
from test_local_launcher import config as launch_config

from skyhedge.clouds.local import capacity, runtime_dir
from skyhedge.clouds.local.events import LocalEventSource, kill_zone, preempt_zone, set_zone_capacity
from skyhedge.clouds.local.processes import (
    find_processes,
    is_running,
    kill_all,
    proc_starttime,
    read_pidfile,
    stop_replica,
)
from skyhedge.events import Signal
from skyhedge.state import ReplicaRecord

REPO = Path(__file__).resolve().parents[1]
REGION_OF = {"local-a": "local", "local-b": "local"}
SLEEPER = f"{sys.executable} -c 'import time; time.sleep(600)'"


@pytest.fixture
def state_dir(tmp_path: Path):
    sdir = tmp_path / "state"
    sdir.mkdir()
    yield sdir
    kill_all(runtime_dir(sdir))


def start(
    sdir: Path,
    rid: str,
    zone: str,
    market: str = "spot",
    port: int = 0,
    *,
    command: str = SLEEPER,
    setup: str | None = None,
) -> subprocess.CompletedProcess:
    """Run the launcher's `start` as Terraform's local-exec does (`command`, `setup`: the
    replica's `run.command` and `run.setup`)."""
    cfg = {
        "id": rid,
        "service": "svc",
        "region": "local",
        "zone": zone,
        "market": market,
        "port": port or free_port(),  # never a fixed port: a parallel run or a user's service may hold it
        "command": command,
        "setup": setup,
        "env": {},
        "workdir": str(sdir),
        "runtime_dir": str(runtime_dir(sdir)),
    }
    env = {**os.environ, "SKYHEDGE_LOCAL_REPLICA": json.dumps(cfg), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "skyhedge.clouds.local.launcher", "start", rid],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def launch(
    sdir: Path,
    rid: str,
    zone: str,
    market: str = "spot",
    port: int = 0,
    *,
    command: str = SLEEPER,
    setup: str | None = None,
) -> ReplicaRecord:
    done = start(sdir, rid, zone, market, port, command=command, setup=setup)
    assert done.returncode == 0, done.stderr
    proc = read_pidfile(runtime_dir(sdir), rid)
    return ReplicaRecord(
        id=rid,
        cloud="local",
        region="local",
        zone=zone,
        market=market,
        launched_at=time.time(),
        provisioned_at=time.time(),
        cloud_id=f"tf-{rid}",
        endpoint=f"http://127.0.0.1:{proc.port}",
    )


def test_exit_is_reported_as_failed_or_preempted(state_dir):
    a = launch(state_dir, "r-0001", "local-a")
    b = launch(state_dir, "r-0002", "local-b")
    src = LocalEventSource(state_dir, REGION_OF)
    assert src.poll(time.time(), [a, b]) == []
    os.killpg(read_pidfile(runtime_dir(state_dir), "r-0002").pgid, signal.SIGKILL)  # a crash
    killed = preempt_zone(state_dir, "local-a", seconds=30)  # a preemption
    assert [p.id for p in killed] == ["r-0001"]
    time.sleep(0.1)
    events = src.poll(time.time(), [a, b])
    kinds = sorted((e.signal.value, e.replica_id or e.location.zone, e.reason) for e in events)
    assert kinds == [
        ("gone", "r-0001", "preempted"),
        ("gone", "r-0002", "failed"),
        ("zone_lost", "local-a", "preempted"),
    ]


def test_a_replica_whose_pid_was_reused_says_so(state_dir):
    """Found by an audit: "process N exited" while N ran on (as another process) read as wrong."""
    from dataclasses import replace

    from skyhedge.clouds.local.processes import write_pidfile

    rec = launch(state_dir, "r-0001", "local-a")
    runtime = runtime_dir(state_dir)
    proc = read_pidfile(runtime, "r-0001")
    os.killpg(proc.pgid, signal.SIGKILL)
    write_pidfile(runtime, replace(proc, pid=os.getpid()))  # the pid now names this very process
    (event,) = LocalEventSource(state_dir, REGION_OF).poll(time.time(), [rec])
    assert event.detail == f"process {os.getpid()} exited (its pid now belongs to another process)"


def test_replicas_not_yet_provisioned_are_not_judged(state_dir):
    rec = ReplicaRecord(
        id="r-0003", cloud="local", region="local", zone="local-a", market="spot", launched_at=time.time()
    )
    assert LocalEventSource(state_dir, REGION_OF).poll(time.time(), [rec]) == []


def test_capacity_marks_are_edges_and_expire(state_dir):
    src = LocalEventSource(state_dir, REGION_OF)
    now = time.time()
    held = [
        ReplicaRecord(
            id="r-0009", cloud="local", region="local", zone="local-b", market="spot", launched_at=now
        )
    ]
    assert src.poll(now, held) == []
    capacity.mark_preempted(runtime_dir(state_dir), "local-b", until=now + 5)
    assert [e.signal for e in src.poll(now, held)] == [Signal.ZONE_LOST]
    assert src.poll(now + 1, held) == []  # still marked: no new event
    assert src.poll(now + 6, held) == []  # expired
    capacity.mark_preempted(runtime_dir(state_dir), "local-b")
    assert [e.location.zone for e in src.poll(now + 7, held)] == ["local-b"]


def test_a_zone_emptied_around_no_replica_of_ours_is_no_event(state_dir):
    """A cloud reports the loss of its own machines only, and the simulator a preemption only
    where it cuts a replica: a market replay emptying zones the service holds nothing in must
    not read as preemptions (two such zones 25 s apart made the skyhedge policy hold an
    on-demand replica for its 15-minute wave rule: relative cost 0.94 where 0.75 was predicted)."""
    src = LocalEventSource(state_dir, REGION_OF)
    now = time.time()
    ondemand = ReplicaRecord(
        id="r-0010", cloud="local", region="local", zone="local-b", market="on-demand", launched_at=now
    )
    assert src.poll(now, [ondemand]) == []
    capacity.mark_preempted(runtime_dir(state_dir), "local-b")
    capacity.mark_preempted(runtime_dir(state_dir), "local-a")
    assert src.poll(now, [ondemand]) == []


def _wakes_within_a_second_of_an_exit(state_dir: Path) -> None:
    rec = launch(state_dir, "r-0004", "local-a")
    src = LocalEventSource(state_dir, REGION_OF)
    woke = threading.Event()
    src.watch(woke.set)
    try:
        time.sleep(0.5)
        woke.clear()
        started = time.monotonic()
        kill_zone(state_dir, "local-a")
        assert woke.wait(2.0)
        assert time.monotonic() - started < 1.0
        assert src.problems() == []
        assert [e.replica_id for e in src.poll(time.time(), [rec])] == ["r-0004"]
    finally:
        src.close()


def test_watch_wakes_within_a_second_of_an_exit(state_dir):
    _wakes_within_a_second_of_an_exit(state_dir)


def test_watch_wakes_at_an_exit_with_descriptors_numbered_past_1024(state_dir, high_descriptors):
    """select() refuses a descriptor numbered 1024 or more: with about a thousand open (a raised
    limit, a pidfd per replica process), every turn of the waking thread failed, and an exit was
    seen only at the next pass (measured: no wake-up within 3 s, instead of 3 ms)."""
    _wakes_within_a_second_of_an_exit(state_dir)


def test_watch_outlives_a_failing_turn_says_so_once_and_still_wakes_at_an_exit(state_dir, monkeypatch):
    # the watcher out of file descriptors (found by a chaos run: `prlimit --nofile` on it): the
    # waking thread died of the OSError with a traceback, and replica exits waited for the next
    # pass, up to `--interval`, for as long as the watcher ran after
    from skyhedge.clouds.local import events

    rec = launch(state_dir, "r-0004", "local-a")
    real = events.list_pidfiles
    calls = {"n": 0}

    def list_pidfiles(runtime: Path):  # every other turn fails, 16 turns long: descriptors run out
        calls["n"] += 1
        if calls["n"] <= 16 and calls["n"] % 2:
            raise OSError(24, "Too many open files", str(runtime / "replicas"))
        return real(runtime)

    monkeypatch.setattr(events, "list_pidfiles", list_pidfiles)
    # turns 4x as often (16 take 0.8 s, not 3.2 s); a working turn between two failing ones is
    # still far shorter than the second it must work to be said to work again
    monkeypatch.setattr(events, "WATCH_PERIOD", 0.05)
    monkeypatch.setattr(events, "WATCH_RECOVERED_SECONDS", 1.0)
    src = LocalEventSource(state_dir, REGION_OF)
    woke = threading.Event()
    src.watch(woke.set)
    try:
        deadline = time.monotonic() + 10
        while calls["n"] <= 16 and time.monotonic() < deadline:
            time.sleep(0.02)
        said = src.problems()
        assert len(said) == 1, said  # once, not at every failing turn nor with each working one between
        assert "Too many open files" in said[0] and "retrying" in said[0]
        recovered = "local replica processes: watching them works again"
        said = []  # all said from here on (`problems()` hands each line out once)
        deadline = time.monotonic() + 5  # working for longer than WATCH_RECOVERED_SECONDS
        while recovered not in said and time.monotonic() < deadline:
            time.sleep(0.05)
            said += src.problems()
        assert said == [recovered]
        woke.clear()
        started = time.monotonic()
        kill_zone(state_dir, "local-a")
        assert woke.wait(2.0)
        assert time.monotonic() - started < 1.0
        assert [e.replica_id for e in src.poll(time.time(), [rec])] == ["r-0004"]
    finally:
        src.close()


def test_sweep_stops_orphans_only(state_dir):
    keep = launch(state_dir, "r-0005", "local-a")
    launch(state_dir, "r-0006", "local-b")
    src = LocalEventSource(state_dir, REGION_OF)
    assert src.sweep({keep.id}) == ["r-0006"]
    rt = runtime_dir(state_dir)
    assert is_running(read_pidfile(rt, "r-0005"))
    assert read_pidfile(rt, "r-0006") is None


def test_the_logs_of_replicas_the_state_forgot_are_removed_and_the_others_kept(state_dir):
    """Every launch writes a log under local/replicas/ and IDs are never reused: a churny fleet
    left one file per replica it ever ran. The logs of replicas the state still records (live, or
    among the gone it keeps) stay, as does that of a replica still running; the rest go."""
    launch(state_dir, "r-0004", "local-a")  # running, whatever the state says
    rt = runtime_dir(state_dir)
    for rid in ("r-0001", "r-0002", "r-0003"):
        (rt / "replicas" / f"{rid}.log").write_text(f"=== {rid} ===\n")
    src = LocalEventSource(state_dir, REGION_OF)

    assert src.forget({"r-0003"}) == ["r-0001", "r-0002"]

    assert sorted(p.name for p in (rt / "replicas").glob("*.log")) == ["r-0003.log", "r-0004.log"]
    assert is_running(read_pidfile(rt, "r-0004"))
    assert src.forget({"r-0003"}) == []


def test_the_logs_of_gone_replicas_are_bounded_by_count_and_bytes_newest_kept(state_dir):
    """The state keeps 500 gone replicas, and each kept its log (up to 64 MiB, and as much in its
    rotated `.log.1`): 500 logs, tens of GB at worst, until the state forgot them. Now the logs
    of gone replicas are kept newest first, at most `GONE_LOGS_KEPT` and `GONE_LOGS_BYTES`
    together; the newest is always kept (`skyhedge logs` of the replica just preempted works),
    as is a running replica's whatever its age or size."""
    from skyhedge.clouds.local.processes import GONE_LOGS_BYTES, GONE_LOGS_KEPT, prune_logs

    assert (GONE_LOGS_KEPT, GONE_LOGS_BYTES) == (100, 256 * 2**20)  # as README and docs say
    launch(state_dir, "r-0009", "local-a")  # running: never counted, never removed
    rt = runtime_dir(state_dir)
    replicas = rt / "replicas"
    os.utime(replicas / "r-0009.log", (1, 1))  # the oldest of all
    for n in range(1, 7):  # r-0001 oldest ... r-0006 newest, 10 bytes each
        log = replicas / f"r-000{n}.log"
        log.write_text("x" * 9 + "\n")
        os.utime(log, (1000 + n, 1000 + n))
    (replicas / "r-0002.log.1").write_text("y" * 30)  # a rotated part counts with its log
    os.utime(replicas / "r-0002.log.1", (1002, 1002))
    known = {f"r-000{n}" for n in range(1, 10)}

    assert prune_logs(rt, known, max_count=4, max_bytes=1000) == ["r-0001", "r-0002"]  # by count
    assert not (replicas / "r-0002.log.1").exists()
    assert prune_logs(rt, known, max_count=4, max_bytes=25) == ["r-0003", "r-0004"]  # by bytes
    assert prune_logs(rt, known, max_count=1, max_bytes=0) == ["r-0005"]  # the newest stays
    assert sorted(p.name for p in replicas.glob("*.log*")) == ["r-0006.log", "r-0009.log"]
    assert is_running(read_pidfile(rt, "r-0009"))


def test_a_running_replicas_log_is_rotated_past_its_cap_and_keeps_taking_lines(state_dir):
    """The process writes to the log it was started with, for as long as it runs: a chatty
    server running for weeks filled the disk. Past the cap the log is copied to `<id>.log.1` and
    truncated in place, and the process's next lines land at its new start; a forgotten
    replica's rotated part goes with its log."""
    from skyhedge.clouds.local.processes import log_path, rotate_logs

    launch(state_dir, "r-0001", "local-a")
    rt = runtime_dir(state_dir)
    log = log_path(rt, "r-0001")
    with open(log, "ab") as process_output:  # as the launcher opens it for the replica: appending
        process_output.write(b"x" * 5000 + b"\n")
        process_output.flush()
        assert rotate_logs(rt, max_bytes=1000) == ["r-0001"]
        assert log.stat().st_size == 0 and (rt / "replicas" / "r-0001.log.1").stat().st_size > 5000
        process_output.write(b"the next line\n")
        process_output.flush()
    assert log.read_bytes() == b"the next line\n"  # at the start, no hole of 5000 zero bytes
    assert rotate_logs(rt, max_bytes=1000) == []
    stop_replica(rt, "r-0001", grace=2.0)
    (rt / "replicas" / "r-0002.log").write_text("old\n")
    (rt / "replicas" / "r-0002.log.1").write_text("older\n")
    src = LocalEventSource(state_dir, REGION_OF)
    assert src.forget(set()) == ["r-0001", "r-0002"]
    assert sorted(p.name for p in (rt / "replicas").iterdir() if "log" in p.name) == []


def test_preempt_kills_what_left_the_replica_group_too(state_dir):
    """A preempted machine takes everything on it: a helper the replica started with `setsid`
    (its own session, out of the process group) must not survive holding its port."""
    # the launcher tests' config: a spot replica in local-a running the command below
    cfg = launch_config(
        runtime_dir(state_dir),
        state_dir,
        free_port(),
        command=f"setsid {SLEEPER} & exec {SLEEPER}",
        workdir=str(state_dir),
    )
    env = {**os.environ, "SKYHEDGE_LOCAL_REPLICA": json.dumps(cfg), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "skyhedge.clouds.local.launcher", "start", "r-0001"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    runtime = runtime_dir(state_dir)
    deadline = time.monotonic() + 5
    while len(find_processes(runtime)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(find_processes(runtime)) == 2  # the replica and its helper in a session of its own
    assert [p.id for p in preempt_zone(state_dir, "local-a")] == ["r-0001"]
    deadline = time.monotonic() + 5
    while find_processes(runtime) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert find_processes(runtime) == []


def test_set_zone_capacity_keeps_the_oldest(state_dir):
    for i in (7, 8, 9):
        launch(state_dir, f"r-000{i}", "local-a")
    launch(state_dir, "r-0010", "local-a", market="on-demand")
    killed = set_zone_capacity(state_dir, "local-a", 1)
    assert sorted(p.id for p in killed) == ["r-0008", "r-0009"]
    assert capacity.read_capacity(runtime_dir(state_dir)) == {}
    killed = set_zone_capacity(state_dir, "local-a", 0)
    assert [p.id for p in killed] == ["r-0007"]
    assert "local-a" in capacity.read_capacity(runtime_dir(state_dir))
    assert is_running(read_pidfile(runtime_dir(state_dir), "r-0010"))  # on-demand is not spot capacity
    set_zone_capacity(state_dir, "local-a", 2)
    assert capacity.read_capacity(runtime_dir(state_dir)) == {}


def test_a_finite_pool_refuses_spot_launches_beyond_its_room(state_dir):
    """A market trace's zone at capacity n has room for n spot replicas: a launch beyond them is
    refused as a cloud's capacity error is (exit 3), not started (it was: 4 spot replicas ran in
    a zone the trace gave 2, and the simulator's cut never happened)."""
    launch(state_dir, "r-0011", "local-a")
    assert set_zone_capacity(state_dir, "local-a", 2) == []
    launch(state_dir, "r-0012", "local-a")
    done = start(state_dir, "r-0013", "local-a")
    assert done.returncode == 3 and "InsufficientCapacity" in done.stderr, done.stderr
    assert read_pidfile(runtime_dir(state_dir), "r-0013") is None
    launch(state_dir, "r-0014", "local-a", market="on-demand")  # on-demand is not the spot pool
    launch(state_dir, "r-0015", "local-b")  # nor is another zone
    set_zone_capacity(state_dir, "local-a", 1_000_000)  # unlimited (a replay's end) lifts the limit
    launch(state_dir, "r-0013", "local-a")


def test_parallel_launches_into_a_finite_pool_take_only_its_room(state_dir):
    """Terraform starts a root's replicas side by side: the room check and the start hold the
    capacity lock together, so three launches into a pool of two start exactly two."""
    set_zone_capacity(state_dir, "local-a", 2)
    results: dict[str, int] = {}

    def one(rid: str) -> None:
        results[rid] = start(state_dir, rid, "local-a").returncode

    threads = [threading.Thread(target=one, args=(rid,)) for rid in ("r-0021", "r-0022", "r-0023")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == [0, 0, 3]


def test_a_shrinking_pool_reports_its_victims_preempted(state_dir):
    """A zone whose capacity drops from 2 to 1 stays open; the replica it took is preempted (a
    PREEMPTED zone event for the policy, a preemption in the metrics), not a crash."""
    a = launch(state_dir, "r-0016", "local-a")
    b = launch(state_dir, "r-0017", "local-a")
    src = LocalEventSource(state_dir, REGION_OF)
    assert src.poll(time.time(), [a, b]) == []
    killed = set_zone_capacity(state_dir, "local-a", 1)
    assert [p.id for p in killed] == ["r-0017"]
    events = src.poll(time.time(), [a, b])
    assert [(e.signal.value, e.replica_id, e.reason) for e in events] == [("gone", "r-0017", "preempted")]


def test_concurrent_marks_are_never_lost(state_dir):
    """`skyhedge preempt` in several shells at once (or beside a market replay): each
    read-modify-write holds the file's lock, so every mark survives."""
    runtime = runtime_dir(state_dir)
    zones = [f"local-{c}" for c in "abcdefgh"]
    for _ in range(5):
        capacity.clear(runtime)
        threads = [threading.Thread(target=capacity.mark_preempted, args=(runtime, z)) for z in zones]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(capacity.read_capacity(runtime)) == zones


def test_preempt_with_a_malformed_capacity_file_is_one_line(state_dir, write_spec):
    from click.testing import CliRunner

    from skyhedge.cli import main

    spec = write_spec("name: svc\nplacement: {clouds: [local], zones: [local-a]}\nrun: {command: 'true'}\n")
    runtime = runtime_dir(state_dir)
    runtime.mkdir(parents=True, exist_ok=True)
    (runtime / capacity.CAPACITY_FILE).write_text("{garbage")
    for extra in ([], ["--clear"]):
        result = CliRunner().invoke(
            main, ["preempt", str(spec), "--state-dir", str(state_dir), "--zone", "local-a", *extra]
        )
        assert result.exit_code == 1 and "Traceback" not in result.output
        [line] = result.output.strip().splitlines()
        assert (
            line.startswith("error: ")
            and "capacity.json: cannot read" in line
            and "fix it or delete it" in line
        )


def test_a_capacity_file_this_process_cannot_open_is_not_called_broken(state_dir, monkeypatch):
    # a watcher out of file descriptors was told to "fix it or delete it" about a sound file:
    # deleting it would have thrown the zones' marks away
    runtime = runtime_dir(state_dir)
    runtime.mkdir(parents=True, exist_ok=True)
    path = runtime / capacity.CAPACITY_FILE
    path.write_text('{"version": 1, "preempted": {"local-a": null}}')
    real = capacity._open_in

    def open_in(dir_fd: int, name: str, flags: int, shown: Path) -> int:
        if name == capacity.CAPACITY_FILE:
            raise OSError(errno.EMFILE, "Too many open files", str(shown))
        return real(dir_fd, name, flags, shown)

    monkeypatch.setattr(capacity, "_open_in", open_in)
    with pytest.raises(capacity.CapacityFileError) as info:
        capacity.read_capacity(runtime)
    assert "Too many open files" in str(info.value) and "delete" not in str(info.value)
    # nor about its folder, opened first
    monkeypatch.setattr(
        capacity, "open_runtime_dir", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EMFILE, "Too many"))
    )
    with pytest.raises(capacity.CapacityFileError) as info:
        capacity.read_capacity(runtime)
    assert "Too many" in str(info.value) and "delete" not in str(info.value)


def test_a_gone_event_whose_reason_the_controller_judges_shows_no_empty_brackets():
    from skyhedge.events import PreemptionEvent, Signal

    judged = PreemptionEvent(Signal.GONE, 1.0, "gcp-instances", replica_id="r-0003", reason="", detail="x")
    assert judged.describe() == "gcp-instances: gone r-0003: x"
    known = PreemptionEvent(Signal.GONE, 1.0, "gcp-operations", replica_id="r-0003", reason="preempted")
    assert known.describe() == "gcp-operations: gone r-0003 (preempted)"


def test_a_zone_emptied_and_reopened_before_the_poll_still_reports_preempted(state_dir):
    """A market replay that empties a zone for one tick (0.5 s at --speedup 60, 0.05 s at 600)
    reopens it before the controller polls: its victims must still read preempted, not failed
    (seen: `gone r-0025 (failed)` after `market tick 0: local-d capacity 0, preempted r-0025`)."""
    a = launch(state_dir, "r-0031", "local-a")
    src = LocalEventSource(state_dir, REGION_OF)
    assert src.poll(time.time(), [a]) == []
    assert [p.id for p in set_zone_capacity(state_dir, "local-a", 0)] == ["r-0031"]
    set_zone_capacity(state_dir, "local-a", 1_000_000)  # the next tick: open again
    events = [e for e in src.poll(time.time(), [a]) if e.signal is Signal.GONE]
    assert [(e.replica_id, e.reason) for e in events] == [("r-0031", "preempted")]


def test_a_preemption_whose_mark_ran_out_before_the_poll_still_reports_preempted(state_dir):
    """`skyhedge preempt --for S` and a watcher that polls only after S (busy in an apply longer
    than that, or started later): its victims must read preempted, not failed. They read failed,
    and three such bursts held every launch as a crash loop (a soak preempting a zone every few
    seconds with `--for 3`: 5 of the first 102 replicas gone `failed`, launches held 30 s)."""
    a = launch(state_dir, "r-0041", "local-a")
    src = LocalEventSource(state_dir, REGION_OF)
    assert src.poll(time.time(), [a]) == []
    assert [p.id for p in preempt_zone(state_dir, "local-a", seconds=0.5)] == ["r-0041"]
    later = time.time() + 1.0  # the mark has run out
    events = [e for e in src.poll(later, [a]) if e.signal is Signal.GONE]
    assert [(e.replica_id, e.reason) for e in events] == [("r-0041", "preempted")]


def kill_a_replay_midway(sdir: Path) -> None:
    """What `kill -9` of `up --market-trace` leaves: a replay recorded as driving local-a and
    local-b, local-a emptied and local-b cut to a pool of 1, and no `stop` to give them back."""
    code = (
        "import os, sys; from pathlib import Path\n"
        "from skyhedge.clouds.local import runtime_dir\n"
        "from skyhedge.clouds.local.capacity import record_replay\n"
        "from skyhedge.clouds.local.events import set_zone_capacity\n"
        "sdir = Path(sys.argv[1]); record_replay(runtime_dir(sdir), ['local-a', 'local-b'])\n"
        "set_zone_capacity(sdir, 'local-a', 0); set_zone_capacity(sdir, 'local-b', 1)\n"
        "os._exit(0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code, str(sdir)], env=env, check=True, timeout=30)
    assert capacity.read_capacity(runtime_dir(sdir)) == {"local-a": None}
    assert capacity.read_limits(runtime_dir(sdir)) == {"local-b": 1}


def test_zones_a_killed_replay_left_closed_are_opened_by_the_next_launch(state_dir):
    """Before, the zones stayed closed for good: a later plain `up` logged refused launches with
    no hint why, until `skyhedge preempt --zone Z --clear` for each (found by an audit)."""
    kill_a_replay_midway(state_dir)
    launch(state_dir, "r-0041", "local-a")
    runtime = runtime_dir(state_dir)
    assert capacity.read_capacity(runtime) == {} and capacity.read_limits(runtime) == {}
    assert "replay" not in json.loads(capacity.capacity_path(runtime).read_text())


def test_a_watcher_reopens_what_a_killed_replay_left_and_says_so(state_dir, caplog):
    kill_a_replay_midway(state_dir)
    capacity.mark_preempted(runtime_dir(state_dir), "local-c")  # a `skyhedge preempt`: not the replay's
    LocalEventSource(state_dir, REGION_OF)
    assert capacity.read_capacity(runtime_dir(state_dir)) == {"local-c": None}
    assert capacity.read_limits(runtime_dir(state_dir)) == {}
    assert "local zones local-a, local-b were left without capacity by a market replay" in caplog.text


def test_a_running_replay_keeps_its_zones(state_dir):
    runtime = runtime_dir(state_dir)
    capacity.record_replay(runtime, ["local-a"])  # this process: alive
    set_zone_capacity(state_dir, "local-a", 0)
    LocalEventSource(state_dir, REGION_OF)
    assert capacity.recover_abandoned(runtime) == []
    assert capacity.read_capacity(runtime) == {"local-a": None}
    capacity.end_replay(runtime)
    assert "replay" not in json.loads(capacity.capacity_path(runtime).read_text())


def test_a_replica_whose_pid_file_was_deleted_but_runs_on_is_recorded_again_not_gone(state_dir, caplog):
    """`rm -rf .skyhedge/svc/local` (or the pid file alone) under a watcher: every replica read as
    gone ("no pid file") while it still served: routed around at once (measured on the local
    example: 22 of 200 requests 503), all replaced, the serving ones stopped. A process of the
    replica that runs on is found by its environment markers and recorded again."""
    import shutil

    rec = launch(state_dir, "r-0001", "local-a")
    pid = read_pidfile(runtime_dir(state_dir), "r-0001").pid
    src = LocalEventSource(state_dir, REGION_OF)
    shutil.rmtree(runtime_dir(state_dir))
    with caplog.at_level("WARNING"):
        assert src.poll(time.time(), [rec]) == []
    assert "its pid file was gone" in caplog.text
    again = read_pidfile(runtime_dir(state_dir), "r-0001")
    assert again is not None and again.pid == pid and is_running(again)
    assert again.port == int(rec.endpoint.rsplit(":", 1)[1]) and again.zone == "local-a"
    # and it is judged as any replica from then on: its exit is reported
    stop_replica(runtime_dir(state_dir), "r-0001", grace=1.0)
    (event,) = src.poll(time.time(), [rec])
    assert event.signal is Signal.GONE and event.replica_id == "r-0001"


def test_a_replica_whose_pid_file_is_gone_and_that_runs_no_more_is_gone(state_dir):
    rec = launch(state_dir, "r-0001", "local-a")
    stop_replica(runtime_dir(state_dir), "r-0001", grace=1.0)
    runtime_dir(state_dir).joinpath("replicas", "r-0001.json").unlink(missing_ok=True)
    (event,) = LocalEventSource(state_dir, REGION_OF).poll(time.time(), [rec])
    assert event.signal is Signal.GONE and event.detail == "no pid file"


def _kill_one(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    _gone(pid)


def _gone(pid: int) -> None:
    """Wait until `pid` has exited (a zombie counts as exited, as for `proc_starttime`)."""
    deadline = time.monotonic() + 5
    while proc_starttime(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc_starttime(pid) is None


def test_a_replica_without_pid_file_whose_command_died_is_gone_though_its_setup_left_a_helper(state_dir):
    """What `run.setup` left in the background carries the replica's markers too: with the pid
    file gone and the replica's command dead, that helper was taken for the replica, which was
    then "kept serving" (and `apply` kept routing to it) for as long as the helper lived."""
    rec = launch(state_dir, "r-0001", "local-a", command=SLEEPER, setup=f"{SLEEPER} &")
    runtime = runtime_dir(state_dir)
    main = read_pidfile(runtime, "r-0001")
    runtime.joinpath("replicas", "r-0001.json").unlink()
    os.killpg(main.pgid, signal.SIGKILL)  # the command, all of it
    _gone(main.pid)
    assert find_processes(runtime, "r-0001")  # the setup's helper runs on
    events = LocalEventSource(state_dir, REGION_OF).poll(time.time(), [rec])
    taken = read_pidfile(runtime, "r-0001")
    if taken is not None:  # (the runner's own group must not be SIGKILLed by the fixture's kill_all)
        runtime.joinpath("replicas", "r-0001.json").unlink()
    # the helper runs in the launcher's process group (here, the test's): recorded as the replica,
    # its group was what stopping or preempting the replica would SIGKILL
    assert taken is None or taken.pgid != os.getpgrp()
    (event,) = events
    assert event.signal is Signal.GONE and event.detail == "no pid file"


def test_a_replica_without_pid_file_whose_leader_died_is_gone_as_with_its_pid_file(state_dir):
    """The pid file names the process the launcher started; when it exited, the replica is gone
    even though a child of it runs on (`stop_replica` then stops that child). Without the pid
    file the child was recorded in the leader's place and the replica kept, as if it served."""
    rec = launch(state_dir, "r-0001", "local-a", command=f"{SLEEPER}; true")  # the shell stays, as the parent
    runtime = runtime_dir(state_dir)
    leader = read_pidfile(runtime, "r-0001").pid
    _kill_one(leader)
    assert find_processes(runtime, "r-0001")  # its child runs on
    (with_file,) = LocalEventSource(state_dir, REGION_OF).poll(time.time(), [rec])
    assert with_file.signal is Signal.GONE
    runtime.joinpath("replicas", "r-0001.json").unlink()
    (without,) = LocalEventSource(state_dir, REGION_OF).poll(time.time(), [rec])
    assert without.signal is Signal.GONE and without.detail == "no pid file"


def test_a_replica_without_pid_file_is_recorded_again_as_its_leader_not_a_helper(state_dir):
    """The process recorded again is the one the launcher started (its session's leader), not a
    helper the command started in a session of its own, which would then speak for the replica."""
    rec = launch(state_dir, "r-0001", "local-a", command=f"setsid {SLEEPER} & exec {SLEEPER}")
    runtime = runtime_dir(state_dir)
    leader = read_pidfile(runtime, "r-0001")
    deadline = time.monotonic() + 5
    while len(find_processes(runtime, "r-0001")) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    runtime.joinpath("replicas", "r-0001.json").unlink()
    assert LocalEventSource(state_dir, REGION_OF).poll(time.time(), [rec]) == []
    again = read_pidfile(runtime, "r-0001")
    assert (again.pid, again.pgid, again.starttime) == (leader.pid, leader.pgid, leader.starttime)


def test_a_spot_replica_without_pid_file_is_preempted_with_its_zone_not_recorded_again(state_dir):
    """`skyhedge preempt` kills what the pid files name: a replica whose pid file was deleted
    outlived its zone's preemption, and was then recorded again and kept serving in a zone marked
    out of spot capacity (before pid files were written again it read as preempted, as now)."""
    rec = launch(state_dir, "r-0001", "local-a", command=SLEEPER)
    runtime = runtime_dir(state_dir)
    runtime.joinpath("replicas", "r-0001.json").unlink()
    src = LocalEventSource(state_dir, REGION_OF)
    assert src.poll(time.time(), [rec]) == []  # recorded again while its zone has capacity
    runtime.joinpath("replicas", "r-0001.json").unlink()
    assert preempt_zone(state_dir, "local-a") == []  # (it found no pid file to kill by)
    (event,) = [e for e in src.poll(time.time(), [rec]) if e.signal is Signal.GONE]
    assert event.replica_id == "r-0001" and event.reason == "preempted"
    assert read_pidfile(runtime, "r-0001") is None


def test_replicas_that_lost_their_pid_files_are_looked_for_in_one_walk_of_proc(state_dir, monkeypatch):
    """`rm -rf .skyhedge/svc/local` under many replicas: each was looked for by reading every
    process's environment (1,000 replicas x 90 processes: 2.5 s of every `plan` and pass). One
    walk of /proc finds them all; those running are recorded again, the others are gone."""
    import shutil

    from skyhedge.clouds.local import processes

    running = [launch(state_dir, f"r-{n:04d}", "local-a") for n in (1, 2)]
    dead = [
        ReplicaRecord(
            f"r-{n:04d}", "local", "local", "local-b", "on-demand", 0.0, provisioned_at=1.0, cloud_id="x"
        )
        for n in range(3, 43)
    ]
    shutil.rmtree(runtime_dir(state_dir))
    read = []
    real = processes._environ
    monkeypatch.setattr(processes, "_environ", lambda pid: read.append(pid) or real(pid))
    processes_now = sum(entry.name.isdigit() for entry in Path("/proc").iterdir())
    events = LocalEventSource(state_dir, REGION_OF).poll(time.time(), [*running, *dead])
    assert sorted(e.replica_id for e in events) == [r.id for r in dead]
    assert all(read_pidfile(runtime_dir(state_dir), r.id) is not None for r in running)
    assert len(read) < 2 * processes_now + 20  # one walk (not one per replica: 42 walks)
