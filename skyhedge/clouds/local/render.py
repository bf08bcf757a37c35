"""Terraform inputs for one local root (modules/local-replicas)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skyhedge.clouds import RenderContext
from skyhedge.clouds.local import local_port, runtime_dir
from skyhedge.errors import RenderError
from skyhedge.planner import replica_number
from skyhedge.spec import replica_revision

if TYPE_CHECKING:
    from skyhedge.planner import PlannedReplica
    from skyhedge.spec import ServiceSpec

MAX_PORT = 65535


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


CLOUD = LocalCloud()
