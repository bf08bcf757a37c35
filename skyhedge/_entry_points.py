"""Read one entry point group of the installed distributions without one broken install
breaking every command.

`importlib.metadata.entry_points()` parses every distribution on the path: one whose
entry_points.txt or METADATA does not parse (a line without `=`) made it raise for all of them,
and every command that reads plug-ins (a spec names a cloud or a policy) ended in a traceback
(measured: `TypeError: Pair.__new__() missing 1 required positional argument`). Shared by the
cloud registry (`skyhedge.clouds`) and the policy registry (`skyhedge.policy.base`).

Import-light: `importlib.metadata` (~13 ms) is imported at the first read, not here.

A group's entry points are kept per process (`declared`) for as long as the path is unchanged:
the same `sys.path`, and each of its folders (and zip files) with the same modification time.
Reading them took 4.5-13 ms (`load_spec`'s median, 130 distributions installed) at every spec
load (`available_policies` checks the spec's policy name), and the watcher loads the spec at every
pass: 0.6-1.2 ms with them kept (`benchmarks/spec_load_bench.py`). A distribution installed (or
removed) while it runs adds (or removes) a `*.dist-info` folder in a folder of the path, which
changes that folder's time, so the next read sees it; a policy name not found reads them again
(`available_policies(fresh=True)`), for an entry point added in place.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

_WARNED: set[str] = set()
#: group -> (the path's stamp when it was read, its entry points): see `declared`.
_DECLARED: dict[str, tuple[tuple[Any, ...], list[Any]]] = {}
#: A folder changed this recently (seconds) is read again at the next call: a file system whose
#: times are coarse (1 s, 2 s) may give an install made just after the read the same time.
_SETTLE_SECONDS = 2.0


def warn_once(line: str) -> None:
    """`warn`, once per process: the policy registry is read at every spec load (a watcher's
    reloads included)."""
    if line not in _WARNED:
        _WARNED.add(line)
        warn(line)


def warn(line: str) -> None:
    """One `warning:` line on stderr (a plug-in's error text escaped, so it stays one line).
    Not `logging`: plug-ins are read while the spec is, before a command sets up its log, and
    the line must reach the user whatever logging's settings."""
    from skyhedge.errors import escape_controls  # (its regexes are not on the launcher's path)

    try:
        sys.stderr.write(f"warning: {escape_controls(line)}\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed or full stderr: nothing else to do
        pass


def _path_stamp() -> tuple[tuple[Any, ...], bool]:
    """What the installed distributions depend on, cheaply: `sys.path` and the modification time
    of each of its entries (a few stats), and whether one of them changed in the last
    _SETTLE_SECONDS (then the read is not kept)."""
    stamp: list[Any] = []
    recent = False
    now = time.time_ns()
    for entry in sys.path:
        try:
            mtime = os.stat(entry or ".").st_mtime_ns
        except (OSError, ValueError, TypeError):
            mtime = None
        else:
            recent = recent or abs(now - mtime) < _SETTLE_SECONDS * 1e9
        stamp.append((entry, mtime))
    return tuple(stamp), recent


def forget_declared() -> None:
    """Read the entry points again at the next `declared` (a test that edits a distribution in
    place, which changes no folder of the path)."""
    _DECLARED.clear()


def declared(group: str, what: str, *, fresh: bool = False) -> list[Any]:
    """The entry points of `group` (the first of each distribution on the path, as `entry_points`
    gives them). When `entry_points` raises, each distribution is read on its own; one that cannot
    be read and may declare an entry of `group` is a `warning:` line naming its folder and `what`
    it may have provided ("cloud plug-ins", "policy plug-ins"). Kept while the path is unchanged
    (see the module's docstring), unless `fresh`: a caller that did not find a name it looks for
    reads again (an install the folders' times do not show: an entry point added in place).
    A copy of the list is returned."""
    stamp, recent = _path_stamp()  # (before the read: a change during it reads again next time)
    kept = _DECLARED.get(group)
    if kept is not None and kept[0] == stamp and not fresh:
        return list(kept[1])
    found = _read_declared(group, what)
    if recent:
        _DECLARED.pop(group, None)
    else:
        _DECLARED[group] = (stamp, found)
    return list(found)


def _read_declared(group: str, what: str) -> list[Any]:
    from importlib.metadata import distributions, entry_points

    try:
        return list(entry_points(group=group))
    except Exception:  # noqa: BLE001 - read again one distribution at a time, below
        pass
    found: list[Any] = []
    seen: set[str] = set()
    for dist in distributions():
        try:
            name = dist.metadata["Name"] or ""
            key = name.lower().replace("_", "-").replace(".", "-")
            if key in seen:
                continue  # shadowed by the copy earlier on the path
            seen.add(key)
            found.extend(dist.entry_points.select(group=group))
        except Exception as exc:  # noqa: BLE001 - a broken install is a warning, not a traceback
            text = _read_or_none(dist, "entry_points.txt")
            if text is None or f"[{group}]" in text:
                where = getattr(dist, "_path", None) or "a distribution"
                warn_once(f"{what} of {where} skipped: cannot read it ({type(exc).__name__}: {exc})")
    return found


def _read_or_none(dist: Any, filename: str) -> str | None:
    try:
        return dist.read_text(filename) or ""
    except Exception:  # noqa: BLE001 - unreadable: the caller says so
        return None
