"""Read one entry point group of the installed distributions without one broken install
breaking every command.

`importlib.metadata.entry_points()` parses every distribution on the path: one whose
entry_points.txt or METADATA does not parse (a line without `=`) made it raise for all of them,
and every command that reads plug-ins (a spec names a cloud or a policy) ended in a traceback
(measured: `TypeError: Pair.__new__() missing 1 required positional argument`). Shared by the
cloud registry (`skyhedge.clouds`) and the policy registry (`skyhedge.policy.base`).

Import-light: `importlib.metadata` (~13 ms) is imported at the first read, not here.
"""

from __future__ import annotations

import sys
from typing import Any

_WARNED: set[str] = set()


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


def declared(group: str, what: str) -> list[Any]:
    """The entry points of `group` (the first of each distribution on the path, as `entry_points`
    gives them). When `entry_points` raises, each distribution is read on its own; one that cannot
    be read and may declare an entry of `group` is a `warning:` line naming its folder and `what`
    it may have provided ("cloud plug-ins", "policy plug-ins")."""
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
