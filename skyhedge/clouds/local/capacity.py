"""The local cloud's capacity file: which zones refuse spot launches, and until when.

`<runtime dir>/capacity.json`:

    {"version": 1, "preempted": {"local-b": null, "local-c": 1767225600.0}}

A zone listed under `preempted` has no spot capacity: indefinitely (`null`) or until the given
Unix time. A spot launch into it fails the way a cloud's capacity error does (the launcher exits
with code 3 and an `InsufficientCapacity` message); on-demand launches are unaffected. Later
tools (`skyhedge preempt`, market traces) drive this file; the launcher only reads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

CAPACITY_FILE = "capacity.json"
VERSION = 1


class CapacityFileError(ValueError):
    """The capacity file exists but cannot be understood (the launcher refuses to guess)."""


def capacity_path(runtime_dir: Path) -> Path:
    return Path(runtime_dir) / CAPACITY_FILE


def read_capacity(runtime_dir: Path) -> dict[str, float | None]:
    """Zone -> preempted-until (None: indefinitely). A missing file means every zone has capacity."""
    path = capacity_path(runtime_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CapacityFileError(f"{path}: cannot read the local capacity file ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("preempted", {}), dict):
        raise CapacityFileError(f'{path}: expected {{"version": 1, "preempted": {{zone: until|null}}}}')
    out: dict[str, float | None] = {}
    for zone, until in data.get("preempted", {}).items():
        if until is not None and (isinstance(until, bool) or not isinstance(until, (int, float))):
            raise CapacityFileError(f"{path}: preempted.{zone}: expected a Unix time or null, got {until!r}")
        out[str(zone)] = None if until is None else float(until)
    return out


def preempted(runtime_dir: Path, zone: str, now: float) -> tuple[bool, float | None]:
    """Whether `zone` refuses spot launches at `now`, and until when (None: no end given)."""
    marks = read_capacity(runtime_dir)
    if zone not in marks:
        return False, None
    until = marks[zone]
    if until is not None and until <= now:
        return False, None
    return True, until


def _write(runtime_dir: Path, marks: dict[str, float | None]) -> None:
    # Its own atomic write, not skyhedge.state's: the launcher imports this module under
    # `python -S`, where state's third-party imports (filelock) are not available.
    path = capacity_path(runtime_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"version": VERSION, "preempted": dict(sorted(marks.items()))}, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".capacity.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _updating(runtime_dir: Path) -> Iterator[None]:
    """Hold the capacity file's lock around a read-modify-write: two `skyhedge preempt` (or one
    and a market-trace replay) changing it at once must not lose each other's marks. An advisory
    `flock` (stdlib: the launcher's `python -S` has no filelock); readers need none, writes are
    atomic renames."""
    import fcntl

    path = Path(runtime_dir) / (CAPACITY_FILE + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def mark_preempted(runtime_dir: Path, zone: str, *, until: float | None = None) -> None:
    """Mark `zone` out of spot capacity (until a Unix time, or until cleared)."""
    with _updating(runtime_dir):
        marks = read_capacity(runtime_dir)
        marks[zone] = until
        _write(runtime_dir, marks)


def clear(runtime_dir: Path, zone: str | None = None) -> None:
    """Give `zone` (or every zone) its capacity back."""
    with _updating(runtime_dir):
        marks = read_capacity(runtime_dir)
        if zone is None:
            marks.clear()
        else:
            marks.pop(zone, None)
        _write(runtime_dir, marks)
