"""The local cloud: replicas are processes on this machine, launched and stopped by Terraform.

Everything the local cloud keeps lives under `<state dir>/local/` (its "runtime dir"):

    replicas/<id>.json   pid file: pid, process group, port, zone, market, start time
    replicas/<id>.log    the replica's stdout and stderr (removed by a watcher once the state no
                         longer records the replica: see `processes.prune_logs`)
    capacity.json        zones marked preempted (see `capacity`): spot launches there fail

This package's `__init__` stays import-light: the launcher runs once per replica launch.
"""

from __future__ import annotations

from pathlib import Path

RUNTIME_SUBDIR = "local"


def runtime_dir(state_dir: Path) -> Path:
    """The local cloud's runtime dir for a service state dir (always absolute)."""
    return (Path(state_dir) / RUNTIME_SUBDIR).resolve()
