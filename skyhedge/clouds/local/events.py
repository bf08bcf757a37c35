"""Local event source: replica processes that exit, and the zone capacity file.

The local cloud's "machines" are processes started by the launcher (pid files under
`<state dir>/local/replicas/`, see `processes.py`); its "spot market" is `capacity.json` (see
`capacity.py`). This source reports:

- GONE for a live replica whose process no longer runs: `preempted` when its zone is marked
  preempted in the capacity file (that is how `skyhedge preempt` and market traces take
  capacity away), else `failed` (the process crashed);
- GONE (`failed`) for one not READY whose port another replica listens on (another service's
  whose port range overlaps, that took the port while ours loaded: `processes.foreign_listeners`);
- ZONE_LOST when a zone holding spot replicas of the service becomes marked preempted.

Waking: a background thread holds a pidfd (Linux >= 5.3) per replica process and `poll`s
them, so a process exit wakes the controller within milliseconds; the capacity file's mtime is
checked on the same loop. Without pidfds it falls back to checking liveness every 0.2 s.

`preempt_zone` and `set_zone_capacity` are the local chaos tools behind `skyhedge preempt` and
`skyhedge up --market-trace`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from skyhedge._fds import readable
from skyhedge.clouds.local import capacity, runtime_dir
from skyhedge.clouds.local.processes import (
    LocalProcess,
    find_processes,
    foreign_listeners,
    is_running,
    list_pidfiles,
    proc_starttime,
    prune_logs,
    read_pidfile,
    readopt,
    replica_processes,
    rotate_logs,
    stop_replica,
)
from skyhedge.events import EventSource, PreemptionEvent, ProblemLog, Signal
from skyhedge.policy.types import Location
from skyhedge.state import ReplicaRecord

if TYPE_CHECKING:
    from skyhedge.spec import ServiceSpec

log = logging.getLogger("skyhedge.clouds.local.events")

WATCH_PERIOD = 0.2
#: How long the waking thread must work again, after failing, before it says so.
WATCH_RECOVERED_SECONDS = 10.0
#: `set_zone_capacity` counts from this up mean "no limit" (a trace's unlimited, a replay's end).
UNLIMITED_COUNT = 1_000_000

__all__ = ["LocalEventSource", "event_source", "kill_zone", "preempt_zone", "set_zone_capacity"]


def _marked(runtime: Path, now: float) -> set[str]:
    """Zones the capacity file marks preempted at `now` (an unreadable file marks none, logged)."""
    try:
        marks = capacity.read_capacity(runtime)
    except capacity.CapacityFileError as exc:
        log.warning("%s", exc)
        return set()
    return {zone for zone, until in marks.items() if until is None or until > now}


class LocalEventSource(EventSource):
    name = "local"

    def __init__(self, state_dir: Path, region_of: dict[str, str]) -> None:
        self.runtime = runtime_dir(state_dir)
        self.region_of = dict(region_of)
        try:
            if reopened := capacity.recover_abandoned(self.runtime):
                log.warning(
                    "local zones %s were left without capacity by a market replay that was killed; "
                    "their capacity is back",
                    ", ".join(reopened),
                )
        except (OSError, capacity.CapacityFileError) as exc:
            log.warning("%s", exc)
        self._known_marked: set[str] | None = None
        self._problems = ProblemLog(log)  # what the waking thread failed at (`problems()`)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self, now: float, live: Sequence[ReplicaRecord]) -> list[PreemptionEvent]:
        events: list[PreemptionEvent] = []
        marked = _marked(self.runtime, now)
        if self._known_marked is not None:
            # only where the service holds spot replicas, as a cloud tells of its own machines
            # only: a zone emptied around none of ours is learned, as in the simulator and on
            # AWS or GCP, from a refused launch (before, a market replay's zones emptying 25 s
            # apart around no replica of ours read as a preemption wave to the skyhedge policy)
            held = {r.zone for r in live if r.cloud == "local" and r.market == "spot"}
            for zone in sorted((marked - self._known_marked) & held):
                region = self.region_of.get(zone, "local")
                events.append(
                    PreemptionEvent(
                        Signal.ZONE_LOST,
                        now,
                        "local-capacity",
                        location=Location("local", region, zone),
                        detail=f"zone {zone} marked out of spot capacity",
                    )
                )
        self._known_marked = marked
        evicted: set[str] | None = None
        running: dict[str, list[int]] | None = None  # replicas' processes, looked up once a poll
        unproven: dict[str, int] = {}  # running replicas not READY now: ID -> port
        for rec in live:
            if rec.cloud != "local" or rec.provisioned_at is None or rec.cloud_id is None:
                # Not launched by our Terraform yet (or, in GitOps mode, never by us): Terraform is
                # the one to say whether it started.
                continue
            proc = read_pidfile(self.runtime, rec.id)
            if proc is not None and is_running(proc):
                if rec.ready_at is None or rec.not_ready_since is not None:
                    unproven[rec.id] = proc.port
                continue
            # (not a spot replica of a zone marked out of capacity: `skyhedge preempt` finds what
            # it kills by pid file, so one without it outlived its zone's preemption by chance)
            spot_taken = rec.market == "spot" and rec.zone in marked
            if proc is None and not spot_taken and running is None:
                running = replica_processes(self.runtime)
            if proc is None and not spot_taken and (found := self._readopt(rec, running)) is not None:
                log.warning(
                    "%s: its pid file was gone (deleted by hand?) but process %d (%s) runs on: recorded "
                    "again, kept serving",
                    rec.id,
                    found.pid,
                    rec.zone,
                )
                continue
            if rec.market == "spot" and rec.zone not in marked and evicted is None:
                evicted = _evicted(self.runtime)
            taken = rec.zone in marked or rec.id in (evicted or ())  # a pool emptied or shrunk
            reason = "preempted" if taken and rec.market == "spot" else "failed"
            if proc is None:
                why = "no pid file"
            elif proc_starttime(proc.pid) is not None:  # the pid lives on, as another process
                why = f"process {proc.pid} exited (its pid now belongs to another process)"
            else:
                why = f"process {proc.pid} exited"
            events.append(
                PreemptionEvent(
                    Signal.GONE, now, "local-process", replica_id=rec.id, reason=reason, detail=why
                )
            )
        # Before a probe may find one READY: its port answered for another replica (another
        # service's, whose port range overlaps) that took it while ours loaded (`foreign_listeners`).
        # It cannot serve there while that one holds it: gone, and replaced under a new ID and port.
        # READY ones are not looked at: they held their port when found READY, and hold it still.
        for rid, other in sorted(foreign_listeners(self.runtime, unproven).items()):
            events.append(
                PreemptionEvent(
                    Signal.GONE,
                    now,
                    "local-process",
                    replica_id=rid,
                    reason="failed",
                    detail=f"its port {unproven[rid]} is held by replica {other}, which its probes "
                    "would reach",
                )
            )
        return events

    def _readopt(self, rec: ReplicaRecord, running: dict[str, list[int]] | None) -> LocalProcess | None:
        try:
            port = urlsplit(rec.endpoint or "").port or 0
        except ValueError:
            port = 0
        try:
            return readopt(
                self.runtime,
                rec.id,
                port=port,
                zone=rec.zone,
                market=rec.market,
                started_at=rec.provisioned_at or rec.launched_at,
                pids=None if running is None else running.get(rec.id, []),
            )
        except OSError as exc:  # the runtime dir cannot be made again: judged by what is known
            log.warning("%s: its pid file is gone and cannot be written again (%s)", rec.id, exc)
            return None

    def sweep(self, live_ids: set[str]) -> list[str]:
        """Stop replica processes of this service that no live replica owns (orphans); return their IDs.

        Called by the controller only when every root is converged, so Terraform holds exactly the
        live replicas and anything else running is left over from a crash.
        """
        stray: set[str] = set()
        for proc in list_pidfiles(self.runtime):
            if proc.id not in live_ids and is_running(proc):
                stray.add(proc.id)
        for pid in find_processes(self.runtime):
            rid = _replica_of(pid)
            if rid and rid not in live_ids:
                stray.add(rid)
        for rid in sorted(stray):
            log.warning("stopping orphan local replica %s (not in the state)", rid)
            stop_replica(self.runtime, rid, grace=2.0)
        return sorted(stray)

    def forget(self, known_ids: set[str]) -> list[str]:
        """Bound the replicas' logs: remove those of replicas the state no longer records (it
        keeps the last `state.GONE_KEPT` gone ones) and of gone ones past the last
        `processes.GONE_LOGS_KEPT` (or `GONE_LOGS_BYTES` together), and rotate those past 64 MiB
        (`processes.rotate_logs`). Returns the IDs whose logs were removed."""
        rotate_logs(self.runtime)
        return prune_logs(self.runtime, known_ids)

    # -- waking ---------------------------------------------------------------------------------

    def watch(self, wake: Callable[[], None]) -> None:
        self._thread = threading.Thread(
            target=self._watch, args=(wake,), daemon=True, name="skyhedge-local-watch"
        )
        self._thread.start()

    def _watch(self, wake: Callable[[], None]) -> None:
        """Wake the controller when a replica process exits or the capacity file changes. A turn
        that fails (the watcher out of file descriptors, the runtime dir unreadable for a while)
        is said once (then once a minute, `problems()`) and retried: it ended this thread with a
        traceback, and for as long as the watcher ran after, replica exits waited for the next pass
        (up to `--interval`; measured 7-9 s at the default 10 s, instead of milliseconds)."""
        fds: dict[tuple[int, int], int] = {}  # (pid, starttime) -> pidfd
        mtime = self._capacity_mtime()
        use_pidfd = hasattr(os, "pidfd_open")
        alive: set[tuple[int, int]] = set()
        failed: float | None = None  # time.monotonic() of the last failed turn
        try:
            while not self._stop.is_set():
                try:
                    use_pidfd, mtime, alive = self._watch_turn(wake, fds, use_pidfd, mtime, alive)
                except Exception as exc:  # an OSError most likely; a bug must not end wake-ups either
                    failed = time.monotonic()
                    self._problems.report(
                        "watch",
                        f"local replica processes: watching them failed ({type(exc).__name__}: {exc}); "
                        "retrying (until then, a replica's exit is seen at the next pass)",
                    )
                    self._stop.wait(WATCH_PERIOD)
                    continue
                # works again only once it kept working a while: turns that fail every other
                # time (file descriptors running out and freed) said both lines each second
                if failed is not None and time.monotonic() - failed >= WATCH_RECOVERED_SECONDS:
                    failed = None
                    self._problems.clear("watch", "local replica processes: watching them works again")
        finally:
            for fd in fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _watch_turn(
        self,
        wake: Callable[[], None],
        fds: dict[tuple[int, int], int],
        use_pidfd: bool,
        mtime: float | None,
        alive: set[tuple[int, int]],
    ) -> tuple[bool, float | None, set[tuple[int, int]]]:
        """One turn of `_watch`: up to WATCH_PERIOD waiting for an exit. Returns whether pidfds are
        still used, the capacity file's mtime and the processes alive, for the next turn."""
        procs = {(p.pid, p.starttime): p for p in list_pidfiles(self.runtime)}
        current = {k for k, p in procs.items() if is_running(p)}
        if alive - current:
            wake()
        alive = current
        for key in [k for k in fds if k not in current]:
            os.close(fds.pop(key))
        if use_pidfd:
            for key in current - set(fds):
                try:
                    fds[key] = os.pidfd_open(key[0])
                except OSError as exc:
                    if exc.errno in (errno.ENOSYS, errno.EPERM):
                        use_pidfd = False  # old kernel or sandbox: poll liveness instead
        if fds:
            if readable(fds.values(), WATCH_PERIOD):
                wake()
        else:
            self._stop.wait(WATCH_PERIOD)
        new_mtime = self._capacity_mtime()
        if new_mtime != mtime:
            mtime = new_mtime
            wake()
        return use_pidfd, mtime, alive

    def _capacity_mtime(self) -> float | None:
        try:
            return os.stat(capacity.capacity_path(self.runtime), follow_symlinks=False).st_mtime_ns / 1e9
        except OSError:
            return None

    def problems(self) -> list[str]:
        return self._problems.take()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None


def event_source(spec: ServiceSpec, state_dir: Path, watched: Mapping[str, Mapping[str, str]]) -> EventSource:
    """The watcher's event source for this cloud (`controller.runner.event_sources` calls it for
    each cloud the spec uses or a live replica is on; `watched`: cloud -> {zone: region}): the
    local source is handed every watched zone, of every cloud, as it always was."""
    return LocalEventSource(state_dir, {z: r for zones in watched.values() for z, r in zones.items()})


def _evicted(runtime: Path) -> set[str]:
    """Replicas a shrinking pool took (an unreadable file names none, logged)."""
    try:
        return capacity.read_evicted(runtime)
    except capacity.CapacityFileError as exc:
        log.warning("%s", exc)
        return set()


def _replica_of(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for item in raw.split(b"\0"):
        if item.startswith(b"SKYHEDGE_REPLICA_ID="):
            return item.split(b"=", 1)[1].decode(errors="replace")
    return None


# -- chaos ----------------------------------------------------------------------------------------


def kill_zone(
    state_dir: Path, zone: str, *, market: str | None = "spot", keep: int = 0, evict: bool = False
) -> list[LocalProcess]:
    """SIGKILL the replica processes in `zone` (spot ones by default), all but the oldest `keep`.

    An abrupt kill, as a preemption is: no graceful shutdown, the router sees failed connections.
    `evict`: record the victims as taken by their pool first (`capacity.record_evicted`; the
    caller holds the capacity lock), so a zone that stays open still reports them preempted.
    """
    runtime = runtime_dir(state_dir)
    procs = [
        p
        for p in list_pidfiles(runtime)
        if p.zone == zone and (market is None or p.market == market) and is_running(p)
    ]
    procs.sort(key=lambda p: p.started_at)
    victims = procs[keep:]
    if evict and victims:
        capacity.record_evicted(runtime, [p.id for p in victims], time.time(), lock=False)
    for p in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pgid, signal.SIGKILL)
    if victims:
        # A process the replica started in a session of its own (`setsid helper &`, a server
        # that daemonises a worker) left the group but carries the replica's ID: a preempted
        # machine takes everything on it, and a survivor would hold its port or GPU until the
        # replica's Terraform resource is destroyed.
        ids = {p.id for p in victims}
        for pid in find_processes(runtime):
            if _replica_of(pid) in ids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while any(is_running(p) for p in victims) and time.monotonic() < deadline:
        time.sleep(0.01)
    return victims


def preempt_zone(
    state_dir: Path, zone: str, *, seconds: float | None = None, now: float | None = None
) -> list[LocalProcess]:
    """Mark `zone` out of spot capacity (for `seconds`, or until cleared) and kill its spot replicas.

    The mark comes first, so the controller's replacement cannot land back in the same zone. The
    victims are recorded as evicted too (as `set_zone_capacity` records them): a watcher that
    notices one only after a short mark ran out (busy in an apply longer than `--for`, or started
    later) read it as a crash (`failed`), and three such bursts held every new launch as a crash
    loop (`skyhedge preempt --for 3` every few seconds: 5 of 102 gone replicas `failed`, launches
    held 30 s within a minute). Under the capacity file's lock, as the launcher checks it.
    """
    now = time.time() if now is None else now
    runtime = runtime_dir(state_dir)
    with capacity.locked(runtime):
        capacity.mark_preempted(runtime, zone, until=None if seconds is None else now + seconds, lock=False)
        return kill_zone(state_dir, zone, evict=True)


def set_zone_capacity(state_dir: Path, zone: str, count: int) -> list[LocalProcess]:
    """Drive a zone from a market trace: 0 -> preempted (its spot replicas killed); n > 0 -> open
    with room for n spot replicas (spot launches beyond n are refused, as a full pool refuses
    them), and spot replicas beyond n are killed (the trace says only n machines survive there).
    `count` >= UNLIMITED_COUNT: open without a limit.

    Under the capacity file's lock, which the launcher holds from checking a zone's room to
    recording its new process: a launch cannot slip in between the change and the kills.
    """
    runtime = runtime_dir(state_dir)
    with capacity.locked(runtime):
        if count <= 0:
            if zone not in _marked(runtime, time.time()):
                capacity.mark_preempted(runtime, zone, lock=False)
            # evicted too: the next tick may reopen the zone before the controller polls, and a
            # victim of an unmarked zone would read as a crash (`failed`), not a preemption
            return kill_zone(state_dir, zone, evict=True)
        if zone in _marked(runtime, time.time()):
            capacity.clear(runtime, zone, lock=False)
        limit = None if count >= UNLIMITED_COUNT else count
        if capacity.read_limits(runtime).get(zone) != limit:
            capacity.set_limit(runtime, zone, limit, lock=False)
        return kill_zone(state_dir, zone, keep=count, evict=True)
