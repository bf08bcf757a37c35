"""The running watcher's record, `<state dir>/watcher.json`: who watches the service, and how its
last spec reload went.

The writer lock says *that* some skyhedge process works on the service, not which one or what it
does, and probing it would take it (a starting `apply` would fail). So the watcher writes this
record when it starts and removes it when it stops: `status` shows it, and `skyhedge reload`
finds the pid to signal (SIGUSR1) and reads the reload's outcome back from it. A record left by a
killed watcher is recognised as stale: its pid is gone, or now belongs to another process (the
process start time, on Linux, differs).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from skyhedge.routing.nginx import alive, stat_fields  # (any pid: a zombie counts as gone)
from skyhedge.state import atomic_write_text

WATCHER_FILE = "watcher.json"

#: `reload` values: how the running watcher re-reads its spec. "On request": SIGUSR1, which
#: `skyhedge reload` sends (and SIGHUP, except for `up` under its dashboard, where a hangup is
#: the terminal going away).
RELOAD_ON_CHANGE = "on change and on request"
RELOAD_FILE_ONLY = "on change"  # e.g. a watcher run off the main thread: no signal handlers
RELOAD_ON_REQUEST = "on request"
RELOAD_OFF = "off"


def process_start(pid: int) -> str | None:
    """When the process started, as an opaque stamp: clock ticks since boot from /proc (Linux),
    else `ps -o lstart=` (macOS, BSD); None when neither can tell (no such process)."""
    fields = stat_fields(pid)
    if fields is not None:
        return fields[19]  # field 22, starttime
    if Path("/proc/self/stat").exists():
        return None  # Linux without that pid
    try:
        done = subprocess.run(
            ["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    stamp = done.stdout.strip()
    return stamp if done.returncode == 0 and stamp else None


@dataclass(frozen=True)
class WatcherRecord:
    """What `status` and `reload` need to know about the running watcher."""

    pid: int
    started_at: float
    spec: str  # the spec file it re-reads (absolute)
    mode: str  # "apply" or "gitops"
    reload: str  # RELOAD_ON_CHANGE, RELOAD_ON_REQUEST or RELOAD_OFF
    process_start: str | None = None
    #: the last reload's outcome: {"at", "outcome": taken|unchanged|refused|failed, "text"}
    last_reload: dict[str, Any] | None = field(default=None)
    #: where it serves Prometheus metrics (`--metrics-port`), or None
    metrics: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def hears_requests(self) -> bool:
        return self.reload in (RELOAD_ON_CHANGE, RELOAD_ON_REQUEST)


def write(state_dir: Path, record: WatcherRecord) -> None:
    atomic_write_text(Path(state_dir) / WATCHER_FILE, json.dumps(record.to_json(), indent=2) + "\n")


def record_reload(
    state_dir: Path, record: WatcherRecord, at: float, outcome: str, text: str, *, requests: int
) -> WatcherRecord:
    """Store a reload's outcome (best effort: a full disk must not cost the watcher its pass).
    `requests`: how many reload requests the watcher had answered when it read the spec."""
    new = replace(record, last_reload={"at": at, "outcome": outcome, "text": text, "requests": requests})
    with contextlib.suppress(OSError):
        write(state_dir, new)
    return new


def remove(state_dir: Path, pid: int) -> None:
    """Remove the record if it is still this process's (not a successor's)."""
    path = Path(state_dir) / WATCHER_FILE
    current = _read_file(path)
    if current is not None and current.pid == pid:
        with contextlib.suppress(OSError):
            path.unlink()


def _read_file(path: Path) -> WatcherRecord | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return WatcherRecord(
            pid=int(data["pid"]),
            started_at=float(data["started_at"]),
            spec=str(data["spec"]),
            mode=str(data["mode"]),
            reload=str(data["reload"]),
            process_start=data.get("process_start"),
            last_reload=data.get("last_reload") if isinstance(data.get("last_reload"), dict) else None,
            metrics=data["metrics"] if isinstance(data.get("metrics"), str) else None,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read(state_dir: Path) -> WatcherRecord | None:
    """The running watcher's record, or None: no record, an unreadable one, or a stale one (its
    pid gone, or recycled by a process that started at another time)."""
    record = _read_file(Path(state_dir) / WATCHER_FILE)
    if record is None or not alive(record.pid):
        return None
    if record.process_start is not None and process_start(record.pid) != record.process_start:
        return None
    return record


def verified(record: WatcherRecord) -> bool:
    """Whether the record's pid is provably the watcher that wrote it (its start time matches):
    the condition for signalling it, since SIGUSR1 kills a process that does not handle it."""
    return record.process_start is not None and process_start(record.pid) == record.process_start
