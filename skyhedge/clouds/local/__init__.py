"""The local cloud: replicas are processes on this machine, launched and stopped by Terraform.

Everything the local cloud keeps lives under `<state dir>/local/` (its "runtime dir"):

    replicas/<id>.json   pid file: pid, process group, port, zone, market, start time, and the
                         runtime dir whose replica it is (a state dir moved or copied: see
                         `processes.ownership`)
    replicas/<id>.log    the replica's stdout and stderr (a watcher keeps those of the 100 most
                         recently gone replicas, 256 MiB together, and removes the rest: see
                         `processes.prune_logs`; past 64 MiB a watcher moves it to <id>.log.1:
                         `processes.rotate_logs`); never opened through a link (`open_log`),
                         and one another account made is refused (replaced by a launch)
    capacity.json        zones marked preempted (see `capacity`): spot launches there fail

`local/` and `replicas/` are used only as real folders of this account's (or root's): never
through a symbolic link, whatever it points to (`processes.open_replicas_dir`); logs and pid
files are opened relative to the folder so checked, never by a path. So are `capacity.json` and
its lock (`processes.open_runtime_dir`), by `skyhedge preempt` and a market replay as by the
launcher: never through a link, and only as this account's (or root's) files.

This package's `__init__` stays import-light: the launcher runs once per replica launch.
"""

from __future__ import annotations

from pathlib import Path

RUNTIME_SUBDIR = "local"


def runtime_dir(state_dir: Path) -> Path:
    """The local cloud's runtime dir for a service state dir (always absolute). The state dir's
    path is resolved (it may be a link: a state dir kept on another disk), `local/` itself is not:
    one that is a link is refused where it is opened (`processes.open_replicas_dir`), where
    resolving it here led every pid file, log and prune to wherever it pointed."""
    return Path(state_dir).resolve() / RUNTIME_SUBDIR


def local_port(base: int, number: int, highest: int = 65535) -> int:
    """The port of local replica r-N: `base + N`, wrapping around after `highest` to `base + 1`.

    Replica IDs grow for ever (every launch, a refused one too, takes a new one: a churny market
    replay used about a thousand in half an hour), and without the wrap a service stopped
    launching for good once `base + N` passed the highest port. Ports of live replicas and of the
    router are skipped when IDs are handed out, so a wrapped ID never lands on one in use.
    """
    span = highest - base
    return base + 1 + (number - 1) % span
