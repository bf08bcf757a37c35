"""`skyhedge routing up|reload|down SPEC`: the nginx router in front of the service's replicas."""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from skyhedge._json import dumps as strict_json
from skyhedge.apply import UNROUTED_KEY, cut_gone_connections, note_unrouted, notice_dead_local_replicas
from skyhedge.cli._app import (
    command_line,
    console,
    echo,
    err_console,
    main,
    no_state_note,
    spec_argument,
    state_dir_option,
)
from skyhedge.errors import RoutingError
from skyhedge.planner import by_replica_id
from skyhedge.policy.types import ReplicaStatus
from skyhedge.probe import ProbeResult, check_all, timed_out
from skyhedge.probe_store import by_probe, earlier_probes, probe_in_force
from skyhedge.routing import Router, Upstream
from skyhedge.routing.cuts import cut_hung_connections, retry_targets
from skyhedge.spec import ReadinessProbe, ServiceSpec, load_spec
from skyhedge.state import ServiceState, default_state_dir, load_state, save_state, writer_lock

_probe_option = click.option(
    "--probe",
    "probe_now",
    is_flag=True,
    help="Probe the live replicas now and route to those that pass, instead of the recorded READY status.",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print the router's status as JSON.")


def upstreams_from_state(
    service: ServiceSpec,
    state: ServiceState,
    *,
    probe_now: bool,
    earlier: Mapping[str, ReadinessProbe] | None = None,
    in_force: ReadinessProbe | None = None,
    hung: dict[str, str] | None = None,
) -> list[Upstream]:
    """READY replicas with an endpoint; with `probe_now`, the live non-draining ones that pass a
    probe: the spec's, but an outdated replica's is its revision's kept probe (`earlier`), as the
    watcher's (`probe_store.by_probe`). Mid rolling update to a new health path, the replicas still
    serving the old version failed the spec's and left the router (all of them: an outage).
    `in_force`: the probe the state names for the current revision when it is not the spec's
    (`probe_store.probe_in_force`): the spec's is taken only if a READY replica passes it, as the
    watcher takes it (`Controller._check_restart_probe`), else they are probed with that one.
    `hung`, when given, gets endpoint -> ID of those left out because their probe timed out."""
    live = [r for r in state.live() if r.endpoint]
    if not probe_now:
        return [
            Upstream(r.id, r.endpoint) for r in live if r.fact().status is ReplicaStatus.READY and r.endpoint
        ]
    candidates = [r for r in live if not r.draining]
    kept = earlier or {}
    rest, outdated = by_probe(candidates, kept, service)
    results: dict[str, ProbeResult] = {}
    for readiness, group in [(service.readiness_probe, rest), *((kept[v], g) for v, g in outdated.items())]:
        results.update(check_all([r.endpoint or "" for r in group], readiness))
    ready = [r for r in rest if r.fact().status is ReplicaStatus.READY]
    if in_force is not None and ready and not any(results[r.endpoint or ""].ok for r in ready):
        # the spec's probe, which the state does not name as the one in force (a probe-only edit
        # not checked yet), passed by none of the READY replicas: as the watcher, not taken
        first = min(ready, key=by_replica_id)
        why = results[first.endpoint or ""].error
        echo(
            "warning: readiness_probe: the spec's is not the one its replicas were probed with, and "
            f"none of the {len(ready)} READY replica(s) passes it ({first.id}: {why}): not taken, they "
            "are probed with the earlier one; fix the probe",
            err=True,
        )
        results.update(check_all([r.endpoint or "" for r in rest], in_force))
    out: list[Upstream] = []
    for rec in candidates:
        result = results[rec.endpoint or ""]
        if result.ok:
            out.append(Upstream(rec.id, rec.endpoint or ""))
        else:
            detail = escape(f"{rec.endpoint}: not ready ({result.error})")  # error texts are data
            err_console.print(f"[yellow]{escape(rec.id)}[/] {detail}")
            if hung is not None and not result.local and timed_out(result.error or ""):
                hung[rec.endpoint or ""] = rec.id
    return out


def _show(verb: str, status: dict[str, Any], as_json: bool) -> None:
    if as_json:
        echo(strict_json(status, indent=2, sort_keys=True))
        return
    ups = status["upstreams"]
    console.print(
        f"router {verb}: {status['endpoint']} (nginx pid {status['pid']}), "
        f"{len(ups)} upstream{'s' if len(ups) != 1 else ''}",
        markup=False,
    )
    for u in ups:
        console.print(f"  {u['id']}  {u['endpoint']}", markup=False)
    if not ups:
        console.print("  [yellow]no ready replica: requests get 503 until one is ready[/]")


def _route(spec: Path, state_dir: Path | None, *, start: bool, probe_now: bool, as_json: bool) -> None:
    service = load_spec(spec)
    sdir = state_dir or default_state_dir(service.name)
    with writer_lock(sdir):
        state = load_state(sdir, service.name)
        router = Router(service, sdir)
        if not start and router.pid() is None:  # the hint pasted as is: SPEC and --state-dir
            raise RoutingError(
                f"the router of {service.name} is not running "
                f"(start it with `{command_line('routing up', spec, state_dir)}`)"
            )
        # as `apply` does: a local replica whose process died since the state was written is
        # gone (recorded so), not an upstream, whatever its last recorded status
        for line in notice_dead_local_replicas(state, sdir, time.time()):
            err_console.print(line, markup=False)
        earlier: dict[str, ReadinessProbe] = {}
        in_force: ReadinessProbe | None = None
        if probe_now:  # the probes a watcher kept for the outdated replicas (read, never written)
            earlier, problem = earlier_probes(sdir, state, service)
            if problem:
                echo(f"warning: {problem}", err=True)
            in_force = probe_in_force(sdir, state, service)
        timed_out_now: dict[str, str] = {}  # endpoint -> ID: its `--probe` timed out (hung)
        upstreams = upstreams_from_state(
            service, state, probe_now=probe_now, earlier=earlier, in_force=in_force, hung=timed_out_now
        )
        if start and router.pid() is None:
            # nginx found and the ports free, checked before the router's folder is made: a
            # refused first `up` leaves no state dir behind (as `apply` checks before it launches)
            router.preflight()
        served = [(u["id"], u["endpoint"]) for u in router.status()["upstreams"]] if router.pid() else []
        status = router.up(upstreams) if start else router.reload(upstreams)
        state.router = status
        # Taken out alive (failed `--probe`, or not READY): not cut, as the watcher does not cut a
        # NOT_READY one: busy or shutting down gracefully (its port refusing connections already),
        # its answers may still come. Recorded, so its requests are cut once it is known gone. But
        # one whose probe timed out (hung) has what nginx can still retry cut now, as the watcher
        # does (`cut_hung_connections`): with no watcher, it waited for `read_timeout`.
        taken_out = note_unrouted(state, served, upstreams)
        live_eps = {r.id: r.endpoint for r in state.live() if r.endpoint}
        hung = {  # (never an endpoint another live replica has: its requests are not this one's)
            ep: rid
            for ep, rid in timed_out_now.items()
            if rid in taken_out and not any(e == ep and other != rid for other, e in live_eps.items())
        }
        # nginx's old workers, which hold those requests, retry them only on a replica they routed:
        # with none routed still (every one failed its probe), a cut request ends (503) at once
        retry_on = retry_targets([str(ep) for _, ep in served], [u.endpoint for u in upstreams], hung)
        if not retry_on:
            hung = {}
        for rid in taken_out:
            hung_one = rid in hung.values()  # (its probe timed out)
            now_cut = "what nginx can still retry is cut, its other requests" if hung_one else "its requests"
            err_console.print(
                f"{rid}: out of the router; {now_cut} in flight may finish (cut once it is recorded gone)",
                markup=False,
            )
        cut_hung_connections(
            router,
            service.service.router,
            hung,
            lambda text: err_console.print(text, markup=False),
            lambda text: echo(f"warning: {text}", err=True),
            retry_on=retry_on,
        )
        save_state(sdir, state)
        unrouted = copy.deepcopy(state.extra.get(UNROUTED_KEY))
        # replicas the state knows gone, taken out by this reload or taken out alive before: a
        # vanished VM's requests in flight waited for read_timeout; cut, they are retried at once
        cut_gone_connections(
            router,
            state,
            served,
            lambda text: err_console.print(text, markup=False),
            lambda text: echo(f"warning: {text}", err=True),
        )
        if state.extra.get(UNROUTED_KEY) != unrouted:  # the ones cut (gone) left the table
            save_state(sdir, state)
    _show("up" if start else "reloaded", status, as_json)


@main.group()
def routing() -> None:
    """Run the nginx router: one stable endpoint in front of the READY replicas."""


@routing.command()
@spec_argument
@state_dir_option
@_probe_option
@_json_option
def up(spec: Path, state_dir: Path | None, probe_now: bool, as_json: bool) -> None:
    """Start nginx for SPEC (or reload it when it already runs)."""
    _route(spec, state_dir, start=True, probe_now=probe_now, as_json=as_json)


@routing.command()
@spec_argument
@state_dir_option
@_probe_option
@_json_option
def reload(spec: Path, state_dir: Path | None, probe_now: bool, as_json: bool) -> None:
    """Route to the current READY replicas; a config nginx refuses never replaces the serving one."""
    _route(spec, state_dir, start=False, probe_now=probe_now, as_json=as_json)


@routing.command()
@spec_argument
@state_dir_option
def down(spec: Path, state_dir: Path | None) -> None:
    """Stop nginx gracefully (in-flight requests finish first)."""
    service = load_spec(spec, launches=False)
    sdir = state_dir or default_state_dir(service.name)
    with writer_lock(sdir):
        state = load_state(sdir, service.name)
        Router(service, sdir).down()
        if state.router is not None:
            state.router = None
            save_state(sdir, state)
    console.print(f"router down: {service.name}", markup=False)
    note = no_state_note(sdir, service.name, given=state_dir is not None)
    if note:
        echo(note, err=True)
