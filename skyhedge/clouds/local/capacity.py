"""The local cloud's capacity file: which zones refuse spot launches, and until when.

`<runtime dir>/capacity.json`:

    {"version": 1, "preempted": {"local-b": null, "local-c": 1767225600.0},
     "limits": {"local-a": 2}, "evicted": {"r-0007": 1767225000.0}}

A zone listed under `preempted` has no spot capacity: indefinitely (`null`) or until the given
Unix time. A spot launch into it fails the way a cloud's capacity error does (the launcher exits
with code 3 and an `InsufficientCapacity` message); on-demand launches are unaffected. A zone
under `limits` has room for that many spot replicas (a market trace's finite pool): a spot launch
into it while that many run there fails the same way. `evicted` names the spot replicas a
shrinking pool took (killed while their zone stayed open), so the event source reports them
preempted, not crashed. `replay` names the market replay driving zones (`up --market-trace`: its
pid, the kernel's start time of that pid, the zones): one that died without giving its zones
their capacity back (`kill -9`) is found by the next launch or watcher (`recover_abandoned`),
which opens them again. Later tools (`skyhedge preempt`, market traces) drive this file; the
launcher only reads it (and holds its lock while it checks the room left and starts a process).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from skyhedge.clouds.local.processes import open_runtime_dir, proc_starttime

CAPACITY_FILE = "capacity.json"
VERSION = 1


class CapacityFileError(ValueError):
    """The capacity file exists but cannot be understood (the launcher refuses to guess). The
    message says what to do: every command that meets it (a launch under `apply` or `watch`,
    `status`, `preempt`) repeats it."""

    def __init__(self, message: str, *, the_files_fault: bool = True) -> None:
        advice = "; fix it or delete it (every local zone then has its spot capacity)"
        super().__init__(message + (advice if the_files_fault else ""))


#: Errors reading the file that are this process's or the machine's, not the file's: deleting the
#: file, as the usual advice says, would throw away the zones' marks for nothing.
_NOT_THE_FILES_FAULT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR})


def capacity_path(runtime_dir: Path) -> Path:
    return Path(runtime_dir) / CAPACITY_FILE


#: Evictions older than this are forgotten (the event source has long reported them).
EVICTED_KEEP_SECONDS = 3600.0


def _open_runtime(runtime_dir: Path, *, create: bool = False) -> int | None:
    """A descriptor on `local/` (`processes.open_runtime_dir`), None when it does not exist (and
    not `create`). A `local/` that is a link, or another account's, is refused (CapacityFileError):
    `skyhedge preempt` and a market replay wrote their marks through it, and read another
    account's marks as theirs, where only the launcher checked it."""
    try:
        return open_runtime_dir(Path(runtime_dir), create=create)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as exc:
        why = exc.strerror or str(exc)  # a refusal's names the folder; an error of the system's does not
        why = why if str(exc.filename) in why else f"{exc.filename or runtime_dir}: {why}"
        raise CapacityFileError(why, the_files_fault=False) from exc


def _open_in(dir_fd: int, name: str, flags: int, shown: Path) -> int:
    """`name` in the `local/` folder open at `dir_fd`, never through a symbolic link (it led the
    lock's create, and every read of the marks, to wherever it pointed) and only as a regular
    file of this account's or root's (another account's marks are not ours to act on: a watcher
    kills the replicas of a zone they close). Refusals are CapacityFileErrors naming `shown`."""
    lock = name != CAPACITY_FILE

    def refused(why: str) -> CapacityFileError:
        # the lock holds nothing: deleting it loses no mark (the file's advice says what it costs)
        advice = "; delete it (a lock file: no mark is lost)" if lock else ""
        return CapacityFileError(f"{shown}: {why}: refused{advice}", the_files_fault=not lock)

    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise refused("a symbolic link (links are not followed)") from None
        if exc.errno == errno.ENXIO:  # a socket (or a FIFO opened to write): not a file of ours
            raise refused("not a regular file") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise refused("not a regular file")
        if info.st_uid not in (os.geteuid(), 0):
            raise refused(f"owned by another account (uid {info.st_uid})")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_doc(runtime_dir: Path) -> dict:
    path = capacity_path(runtime_dir)
    try:
        dir_fd = _open_runtime(runtime_dir)
        if dir_fd is None:
            return {}
        try:
            fd = _open_in(dir_fd, CAPACITY_FILE, os.O_RDONLY, path)
        finally:
            os.close(dir_fd)
        with os.fdopen(fd, "rb") as fh:
            data = json.loads(fh.read().decode("utf-8"))
    except FileNotFoundError:
        return {}
    except CapacityFileError:
        raise
    except (OSError, ValueError) as exc:
        # (measured: a watcher out of file descriptors was told to fix or delete a sound file)
        faulty = not isinstance(exc, OSError) or exc.errno not in _NOT_THE_FILES_FAULT
        raise CapacityFileError(
            f"{path}: cannot read the local capacity file ({exc})", the_files_fault=faulty
        ) from exc
    if not isinstance(data, dict) or not all(
        isinstance(data.get(key, {}), dict) for key in ("preempted", "limits", "evicted", "replay")
    ):
        raise CapacityFileError(f'{path}: expected {{"version": 1, "preempted": {{zone: until|null}}}}')
    return data


def read_capacity(runtime_dir: Path) -> dict[str, float | None]:
    """Zone -> preempted-until (None: indefinitely). A missing file means every zone has capacity."""
    path = capacity_path(runtime_dir)
    out: dict[str, float | None] = {}
    for zone, until in _read_doc(runtime_dir).get("preempted", {}).items():
        if until is not None and (isinstance(until, bool) or not isinstance(until, (int, float))):
            raise CapacityFileError(f"{path}: preempted.{zone}: expected a Unix time or null, got {until!r}")
        out[str(zone)] = None if until is None else float(until)
    return out


def read_limits(runtime_dir: Path) -> dict[str, int]:
    """Zone -> spot replicas it has room for (zones not listed: no limit)."""
    path = capacity_path(runtime_dir)
    out: dict[str, int] = {}
    for zone, count in _read_doc(runtime_dir).get("limits", {}).items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise CapacityFileError(f"{path}: limits.{zone}: expected a count >= 0, got {count!r}")
        out[str(zone)] = count
    return out


def read_replay(runtime_dir: Path) -> dict | None:
    """The market replay recorded as driving zones (`record_replay`), or None."""
    return _read_doc(runtime_dir).get("replay") or None


def read_evicted(runtime_dir: Path) -> set[str]:
    """Replica IDs a shrinking pool took (see the module docstring)."""
    return {str(rid) for rid in _read_doc(runtime_dir).get("evicted", {})}


def preempted(runtime_dir: Path, zone: str, now: float) -> tuple[bool, float | None]:
    """Whether `zone` refuses spot launches at `now`, and until when (None: no end given)."""
    marks = read_capacity(runtime_dir)
    if zone not in marks:
        return False, None
    until = marks[zone]
    if until is not None and until <= now:
        return False, None
    return True, until


def _write(runtime_dir: Path, marks: dict[str, float | None], **sections: dict) -> None:
    """Write the marks; `limits`, `evicted` and `replay` are kept as they are unless given."""
    # Its own atomic write, not skyhedge.state's: the launcher imports this module under
    # `python -S`, where state's third-party imports (filelock) are not available.
    doc: dict = {"version": VERSION, "preempted": dict(sorted(marks.items()))}
    old = _read_doc(runtime_dir)
    for key in ("limits", "evicted", "replay"):
        value = sections[key] if key in sections else old.get(key, {})
        if value:
            doc[key] = dict(sorted(value.items()))
    text = json.dumps(doc, indent=2) + "\n"
    dir_fd = _open_runtime(runtime_dir, create=True)
    assert dir_fd is not None
    try:  # written and renamed relative to the folder checked, never by a path
        tmp = f".capacity.{secrets.token_hex(8)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, CAPACITY_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def locked(runtime_dir: Path) -> Iterator[None]:
    """Hold the capacity file's lock around a read-modify-write: two `skyhedge preempt` (or one
    and a market-trace replay) changing it at once must not lose each other's marks; and around
    a read-check-act that must not interleave with a change of capacity: the launcher holds it
    from checking a zone's room until the new process's pid file is written, `set_zone_capacity`
    from its change until its kills. An advisory `flock` (stdlib: the launcher's `python -S` has
    no filelock); readers need none, writes are atomic renames."""
    import fcntl

    name = CAPACITY_FILE + ".lock"
    dir_fd = _open_runtime(runtime_dir, create=True)
    assert dir_fd is not None
    try:
        fd = _open_in(dir_fd, name, os.O_RDWR | os.O_CREAT, Path(runtime_dir) / name)
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "r+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _held(runtime_dir: Path, lock: bool) -> contextlib.AbstractContextManager[None]:
    """`locked(runtime_dir)`, or nothing where the caller holds it already (`lock=False`)."""
    return locked(runtime_dir) if lock else contextlib.nullcontext()


def mark_preempted(runtime_dir: Path, zone: str, *, until: float | None = None, lock: bool = True) -> None:
    """Mark `zone` out of spot capacity (until a Unix time, or until cleared). `lock=False`: the
    caller holds `locked()` already."""
    with _held(runtime_dir, lock):
        marks = read_capacity(runtime_dir)
        marks[zone] = until
        _write(runtime_dir, marks)


def set_limit(runtime_dir: Path, zone: str, count: int | None, *, lock: bool = True) -> None:
    """`zone` has room for `count` spot replicas (None: no limit)."""
    with _held(runtime_dir, lock):
        limits = read_limits(runtime_dir)
        if count is None:
            limits.pop(zone, None)
        else:
            limits[zone] = int(count)
        _write(runtime_dir, read_capacity(runtime_dir), limits=limits)


def record_evicted(runtime_dir: Path, ids: list[str], now: float, *, lock: bool = True) -> None:
    """Note replicas a shrinking pool is about to take (before they are killed)."""
    with _held(runtime_dir, lock):
        evicted = {
            str(k): float(v)
            for k, v in _read_doc(runtime_dir).get("evicted", {}).items()
            if isinstance(v, (int, float)) and 0 <= now - float(v) < EVICTED_KEEP_SECONDS
        }
        evicted.update({rid: now for rid in ids})
        _write(runtime_dir, read_capacity(runtime_dir), evicted=evicted)


def clear(runtime_dir: Path, zone: str | None = None, *, lock: bool = True) -> None:
    """Give `zone` (or every zone) its capacity back: no mark, no limit."""
    with _held(runtime_dir, lock):
        marks = read_capacity(runtime_dir)
        limits = read_limits(runtime_dir)
        if zone is None:
            marks.clear()
            limits.clear()
        else:
            marks.pop(zone, None)
            limits.pop(zone, None)
        _write(runtime_dir, marks, limits=limits)


def record_replay(runtime_dir: Path, zones: list[str], *, lock: bool = True) -> None:
    """This process drives `zones` from a market trace (see the module docstring)."""
    pid = os.getpid()
    with _held(runtime_dir, lock):
        replay = {"pid": pid, "starttime": proc_starttime(pid), "zones": sorted(zones)}
        _write(runtime_dir, read_capacity(runtime_dir), replay=replay)


def end_replay(runtime_dir: Path, *, lock: bool = True) -> None:
    """The replay gave its zones their capacity back: forget it."""
    with _held(runtime_dir, lock):
        _write(runtime_dir, read_capacity(runtime_dir), replay={})


def recover_abandoned(runtime_dir: Path, *, lock: bool = True) -> list[str]:
    """Open the zones of a market replay whose process is gone (killed before it could give them
    their capacity back): no mark, no limit. Returns those zones (none: nothing was abandoned).
    A zone marked by `skyhedge preempt` since is opened too: the replay's zones were its own."""
    with _held(runtime_dir, lock):
        replay = read_replay(runtime_dir) or {}
        pid, started, zones = replay.get("pid"), replay.get("starttime"), replay.get("zones")
        alive = isinstance(pid, int) and pid > 0 and started is not None and proc_starttime(pid) == started
        if not replay or alive:
            return []
        zones = [str(z) for z in zones] if isinstance(zones, list) else []
        marks, limits = read_capacity(runtime_dir), read_limits(runtime_dir)
        for zone in zones:
            marks.pop(zone, None)
            limits.pop(zone, None)
        _write(runtime_dir, marks, limits=limits, replay={})
        return zones
