"""Terraform inputs for one local root (modules/local-replicas)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skyhedge.clouds import RenderContext
from skyhedge.clouds.local import local_port, runtime_dir
from skyhedge.clouds.local.processes import adopt, owner_of, ownership, remember_paths, unmarked_replicas
from skyhedge.errors import RenderError
from skyhedge.planner import replica_number
from skyhedge.spec import replica_revision

if TYPE_CHECKING:
    from skyhedge.planner import PlannedReplica
    from skyhedge.spec import ServiceSpec

MAX_PORT = 65535

log = logging.getLogger("skyhedge.clouds.local.render")


def replica_port(spec: ServiceSpec, replica_id: str) -> int:
    """Replica r-000N listens on resources.local_base_port + N (wrapping past MAX_PORT: `local_port`)."""
    return local_port(spec.resources.local_base_port, replica_number(replica_id), MAX_PORT)


class LocalCloud:
    name = "local"
    module_name = "local-replicas"
    variables = (
        ("service", "The skyhedge service name."),
        ("region", "The local region of this root."),
        ("replicas", "Replicas by stable ID: zone, market and port."),
        ("run", "What each replica runs: command, setup, env and working directory."),
        ("runtime_dir", "Where pid files, logs and the zone capacity file live."),
        ("launcher", "The Python interpreter (and PYTHONPATH) that runs skyhedge's replica launcher."),
    )
    nullable: frozenset[str] = frozenset()

    def root_inputs(
        self,
        spec: ServiceSpec,
        replicas: Sequence[PlannedReplica],
        region: str,
        *,
        instance_type: str | None,
        context: RenderContext,
    ) -> dict[str, Any]:
        if not spec.run.command:
            raise RenderError(
                f"{spec.source}: run.command: the local cloud runs a command (run.image needs a VM cloud)"
            )
        if context.tree_dir is None:  # the state's own tree: its replicas are processes of this machine
            claim_replicas(runtime_dir(context.state_dir), record=not context.read_only)
        reps = {
            r.id: {
                "zone": r.location.zone,
                "market": r.market.value,
                "port": r.port or replica_port(spec, r.id),
                "revision": r.revision or replica_revision(spec, "local"),
            }
            for r in sorted(replicas, key=lambda r: r.id)
        }
        run: dict[str, Any] = {
            "command": spec.run.command,
            "env": dict(sorted(spec.run.env.items())),
            "workdir": context.portable_path(Path(context.workdir), "local", region),
        }
        if spec.run.setup:
            run["setup"] = spec.run.setup
            # a setup that hangs would hold the apply (and a watcher's pass) for good: it gets the
            # time a replica is given to come up, then the launch fails
            run["setup_timeout"] = spec.readiness_probe.initial_delay_seconds
        return {
            "service": spec.name,
            "region": region,
            "replicas": reps,
            "run": run,
            "runtime_dir": context.portable_path(runtime_dir(context.state_dir), "local", region),
            # a tree applied elsewhere leaves the interpreter to the machine applying it (the
            # module's fallback): this one's install path is no fact of the service
            "launcher": (
                {"python": context.python, "pythonpath": context.pythonpath}
                if context.tree_dir is None
                else {"python": "", "pythonpath": ""}
            ),
        }


def claim_replicas(runtime: Path, *, record: bool = True) -> list[str]:
    """Make sure the replica processes recorded under `runtime` are this state dir's to manage,
    before its Terraform runs; returns the IDs adopted.

    A state dir moved (`mv`, a `--state-dir` at the new path after `cp -a`, a restore from a
    backup onto another path) holds the pid files of replicas launched under its old path: they
    are adopted (`processes.adopt`), kept running, said in one log line. A copy of a state dir
    whose original still records the same processes (`cp -a` of a live one, a backup restored
    next to it) is refused in one line: two state dirs applying would each stop, replace and
    route the same replicas as their own (the copy's plan stopping the original's, the original
    then launching them again). The process's recorded state dir decides, or, when that records it
    no more, the `local/` folder it was launched into, wherever that is now: a copy of a moved
    state dir (`mv state a; cp -a a c`) is refused too, not adopting `a`'s (`processes.ownership`).
    Without `record` (`plan`, which writes nothing) a copy is refused the same, and the replicas
    a move left are only named: the apply that follows adopts them.
    """
    try:
        found = ownership(runtime)
    except OSError as exc:  # unreadable: the launcher says why, with the folder named
        log.warning("%s: cannot tell whose its replicas are (%s)", runtime, exc.strerror or exc)
        return []
    if found.shared:
        home = Path(min(found.shared.values())).parent
        raise RenderError(
            f"{runtime.parent}: replicas {', '.join(sorted(found.shared))} are the running replicas of the "
            f"state dir {home}, which records the same processes: this one is a copy of it (`cp -a`?), "
            f"and two state dirs must not manage one set of replicas; use {home}, or, if this copy "
            f"replaces it, stop its watcher and delete {home} first"
        )
    if not found.moved:
        return []
    if not record:
        return sorted(p.id for p in found.moved)
    was_under = sorted({owner for p in found.moved if (owner := owner_of(p))})
    # replicas a release before runtime identities launched: their processes carry only a path,
    # and once their leader is gone only this record says that those carrying it are this one's
    unmarked = unmarked_replicas(found.moved)
    try:
        remember_paths(runtime, also=[*was_under, *sorted(set(unmarked) - set(was_under))], unmarked=unmarked)
        ids = adopt(runtime, found.moved)
    except OSError as exc:
        raise RenderError(
            f"{runtime}: cannot record the replicas of the state dir moved here ({exc.strerror or exc})"
        ) from exc
    was = sorted({str(Path(owner).parent) for owner in was_under})
    log.warning(
        "%s: replicas %s were launched under %s, which no longer records them (the state dir was moved "
        "or restored here): adopted, kept running",
        runtime.parent,
        ", ".join(ids),
        ", ".join(was) or "another path",
    )
    return ids


CLOUD = LocalCloud()
