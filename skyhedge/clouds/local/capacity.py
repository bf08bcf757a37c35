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
import tempfile
from collections.abc import Iterator
from pathlib import Path

from skyhedge.clouds.local.processes import proc_starttime

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


def _read_doc(runtime_dir: Path) -> dict:
    path = capacity_path(runtime_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
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
    path = capacity_path(runtime_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc: dict = {"version": VERSION, "preempted": dict(sorted(marks.items()))}
    old = _read_doc(runtime_dir)
    for key in ("limits", "evicted", "replay"):
        value = sections[key] if key in sections else old.get(key, {})
        if value:
            doc[key] = dict(sorted(value.items()))
    text = json.dumps(doc, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".capacity.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def locked(runtime_dir: Path) -> Iterator[None]:
    """Hold the capacity file's lock around a read-modify-write: two `skyhedge preempt` (or one
    and a market-trace replay) changing it at once must not lose each other's marks; and around
    a read-check-act that must not interleave with a change of capacity: the launcher holds it
    from checking a zone's room until the new process's pid file is written, `set_zone_capacity`
    from its change until its kills. An advisory `flock` (stdlib: the launcher's `python -S` has
    no filelock); readers need none, writes are atomic renames."""
    import fcntl

    path = Path(runtime_dir) / (CAPACITY_FILE + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
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
