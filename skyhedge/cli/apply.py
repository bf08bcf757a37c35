"""`skyhedge apply | destroy | status SPEC`: run the plan through Terraform and show what runs."""

from __future__ import annotations

import functools
import os
import shlex
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from skyhedge._json import dumps as strict_json
from skyhedge.apply import ApplyReport, apply_service, destroy_service, live_router, live_rows, rolls_on
from skyhedge.cli._app import (
    command_line,
    console,
    echo,
    err_console,
    fitted,
    interrupted_by,
    main,
    no_state_note,
    report_error,
    sigterm_as_interrupt,
    spec_argument,
    state_dir_option,
)
from skyhedge.cli.plan import render_plan_table
from skyhedge.controller import presence
from skyhedge.controller.facts import rollout_line
from skyhedge.engine import PlanResult, replica_of
from skyhedge.errors import SpecError, StateError
from skyhedge.planner import Plan, replica_order
from skyhedge.render import RenderedRoot
from skyhedge.spec import ServiceSpec, load_spec, service_name_in
from skyhedge.state import (
    FAILING_ROOTS_KEY,
    LAUNCH_HOLD_KEY,
    QUOTA_KEY,
    ROLLOUT_KEY,
    ReplicaRecord,
    ServiceState,
    default_state_dir,
    load_state,
)

_terraform_bin_option = click.option(
    "--terraform-bin",
    type=click.Path(dir_okay=False),
    default=None,
    help="Use this terraform or tofu binary instead of the embedded engine (also: $SKYHEDGE_TERRAFORM).",
)


class ProgressView:
    """Turns Terraform's -json events (from several roots at once) into one rich progress bar per root."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}
        self.lock = threading.Lock()

    def expect(self, root: str, total: int | None) -> None:
        with self.lock:
            self._task(root, total)

    def _task(self, root: str, total: int | None) -> Any:
        if root not in self.tasks:
            self.tasks[root] = self.progress.add_task(
                root, total=max(total, 1) if total is not None else None
            )
            if total == 0:
                self.progress.update(self.tasks[root], completed=1)
        return self.tasks[root]

    def __call__(self, root: str, event: dict[str, Any]) -> None:
        kind = event.get("type")
        with self.lock:
            if kind == "change_summary" and event.get("changes", {}).get("operation") == "plan":
                ch = event["changes"]
                self._task(root, int(ch.get("add", 0)) + int(ch.get("change", 0)) + int(ch.get("remove", 0)))
            elif kind in {"apply_complete", "apply_errored"}:
                self.progress.advance(self._task(root, None))
                if kind == "apply_errored":
                    addr = event.get("hook", {}).get("resource", {}).get("addr")
                    action = event.get("hook", {}).get("action", "apply")
                    self.progress.console.print(
                        f"[red]{escape(f'{root}: {replica_of(addr) or addr}: {action} failed')}[/]"
                    )


def _ask(question: str, verb: str, heard: list[KeyboardInterrupt] | None = None) -> bool:
    """A yes/no question; no answer at all (end of input: no terminal, a closed pipe, stdin
    closed as some CI runners and daemons leave it) is a no, reported as "cancelled" like any
    other no, not as click's bare "Aborted!" nor a traceback, with one `error:` line naming the
    flag that skips the question: a CI log otherwise showed a plan and "cancelled", not why.

    A Ctrl-C or SIGTERM while asking is a no too (nothing has changed yet), kept in `heard` for
    the command's exit code; click reports it as it reports the end of input (`Abort`), and it
    was told as one ("no answer on stdin ... run with --auto-approve")."""
    stdin = sys.stdin
    if stdin is not None and not stdin.closed:
        try:
            return click.confirm(question, default=False)
        except click.Abort as exc:
            console.print()
            if isinstance(exc.__context__, KeyboardInterrupt):  # click: `raise Abort() from None`
                if heard is not None:
                    heard.append(exc.__context__)
                by, _code = interrupted_by(exc.__context__)
                echo(f"error: {verb} not confirmed: interrupted by {by} at the question", err=True)
                return False
    else:  # fd 0 closed (`0<&-`): click's input() raised "lost sys.stdin"
        console.print(f"{question} [y/N]: ", markup=False)
    echo(
        f"error: {verb} not confirmed: no answer on stdin (closed, or at its end): "
        f"run with --auto-approve to {verb} without asking",
        err=True,
    )
    return False


def _confirm_apply(
    plan: Plan,
    roots: Sequence[RenderedRoot],
    previews: dict[str, PlanResult],
    *,
    rollout: bool = True,
    heard: list[KeyboardInterrupt] | None = None,
) -> bool:
    """Show skyhedge's plan and what Terraform will do in each root, then ask. With outdated
    replicas, say that the apply goes on to replace them all (the plan shows its first step)."""
    console.print(fitted(render_plan_table(plan), console))
    console.print("Terraform roots to apply:")
    for root in roots:
        p = previews.get(root.path)
        console.print(f"  {root.path}: " + (f"+{p.add} ~{p.change} -{p.remove}" if p else "?"), markup=False)
    outdated = sorted((r.id for r in plan.replicas if r.outdated and r.action != "delete"), key=replica_order)
    if outdated and rollout:
        console.print(
            f"Then the rolling update goes on: {', '.join(outdated)} and any other outdated replica "
            "are replaced one at a time, each released once its replacement is READY "
            "(--no-rollout: this step only).",
            markup=False,
        )
    return _ask("Apply these changes?", "apply", heard)


def _print_apply_report(report: ApplyReport, state_dir: Path) -> None:
    if report.launch_failures:
        zones = sorted({str(f.location) for f in report.launch_failures})
        err_console.print(
            f"[yellow]{len(report.launch_failures)} launch(es) refused for capacity[/] "
            + escape(f"in {', '.join(zones)}: recorded as zone events for the policy")
        )
    failed = {getattr(e, "root", None) for e in report.errors}
    applied = [root for root in report.applied_roots if root not in failed]  # not a failed root's
    if applied:
        console.print(
            f"Applied {', '.join(applied)}: {len(report.created)} created, "
            f"{len(report.deleted)} destroyed"
            + (
                f" (a rolling update in {report.rollout_steps} steps)"
                if report.rollout_steps > 1
                else f" (in {report.rounds} rounds)"
                if report.rounds > 1
                else ""
            )
            + ".",
            markup=False,
        )
    elif report.plan is not None and not report.errors:
        console.print("No changes: every Terraform root is up to date.")
    if report.ready:
        console.print(f"Ready: {', '.join(report.ready)}", markup=False)
    if report.router:
        console.print(
            f"Router: {report.router.get('endpoint')} ({len(report.router.get('upstreams', []))} upstreams)",
            markup=False,
        )
    for note in report.notes:  # notes name paths and quote errors: data, not markup
        console.print(f"[dim]{escape(note)}[/]")
    for line in report.warnings:
        echo(f"warning: {line}", err=True)
    for err in report.errors[1:]:
        report_error(err)


@main.command()
@spec_argument
@state_dir_option
@click.option("--auto-approve", is_flag=True, help="Apply without showing the plan and asking.")
@_terraform_bin_option
@click.option("--no-wait", is_flag=True, help="Do not wait for new replicas to pass the readiness probe.")
@click.option("--no-routing", is_flag=True, help="Leave the router alone (no drain, no reload).")
@click.option(
    "--no-rollout",
    is_flag=True,
    help="Take one step of a rolling update and return (by default apply releases every outdated "
    "replica, one at a time as its replacement becomes READY).",
)
def apply(
    spec: Path,
    state_dir: Path | None,
    auto_approve: bool,
    terraform_bin: str | None,
    no_wait: bool,
    no_routing: bool,
    no_rollout: bool,
) -> None:
    """Plan, show, confirm, then apply the changed Terraform roots of SPEC in parallel."""
    service = load_spec(spec)
    sdir = state_dir or default_state_dir(service.name)
    progress = Progress(
        TextColumn("{task.description}", markup=False),  # root paths name regions: data
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,  # in a pipe no live bars (rich would leave a blank line)
    )
    view = ProgressView(progress)
    heard: list[KeyboardInterrupt] = []  # a Ctrl-C or SIGTERM at the question
    rolls = not no_rollout and rolls_on(service, sdir, route=not no_routing, wait=not no_wait)

    def confirm(plan: Plan, roots: Sequence[RenderedRoot], previews: dict[str, PlanResult]) -> bool:
        progress.stop()  # no live display while asking
        try:
            return _confirm_apply(plan, roots, previews, rollout=rolls, heard=heard)
        finally:
            for root, preview in previews.items():
                view.expect(root, preview.add + preview.change + preview.remove)
            progress.start()

    try:
        with sigterm_as_interrupt(), progress:
            report = apply_service(
                service,
                sdir,
                terraform_bin=terraform_bin,
                confirm=None if auto_approve else confirm,
                wait=not no_wait,
                route=not no_routing,
                rollout=not no_rollout,
                on_event=view,
                say=lambda text: progress.console.print(f"[dim]{escape(text)}[/]"),
            )
    except KeyboardInterrupt as exc:
        _interrupted(
            exc,
            "apply",
            "what it launched is recorded",
            f"`{command_line('apply', spec, state_dir)}` finishes it, "
            f"`{command_line('destroy', spec, state_dir)}` removes it",
        )
    if report.cancelled:
        console.print("Apply cancelled; nothing changed.")
        sys.exit(interrupted_by(heard[0])[1] if heard else 1)
    _print_apply_report(report, sdir)
    if report.errors:
        raise report.errors[0]
    if report.rollout_stopped:  # N READY still serve, but CI must see the update did not finish
        err_console.print(f"error: the rolling update stopped short: {report.rollout_stopped}", markup=False)
        sys.exit(1)
    if report.exited or report.not_ready or report.preempted:
        why = []
        if report.exited:
            why.append(f"exited before READY: {', '.join(report.exited)}")
        if report.preempted:
            why.append(f"preempted before READY: {', '.join(report.preempted)}")
        if report.not_ready:
            # how long they were waited on: a kept probe's delay (an outdated replica's) may be
            # longer than the spec's
            delay = report.not_ready_after
            if delay is None:
                delay = float(service.readiness_probe.initial_delay_seconds)
            # (whole seconds as the spec wrote them: `:g` alone made 1000000 "1e+06")
            shown = str(int(delay)) if float(delay).is_integer() else f"{delay:g}"
            why.append(f"not ready after {shown}s: {', '.join(report.not_ready)}")
        if failed := report.exited or report.not_ready:
            # local: the process's output; a cloud VM: its console, where the boot script's errors go
            hint = f"their logs: `{command_line('logs', spec, state_dir)} {shlex.quote(failed[0])}`"
        else:  # a preemption leaves nothing in the logs to read
            hint = (
                f"`{command_line('apply', spec, state_dir)}` or "
                f"`{command_line('watch', spec, state_dir)}` replaces it"
            )
        # one line however long (PIPE_WIDTH off a terminal): the hint is pasted whole
        err_console.print(f"error: {'; '.join(why)} ({hint})", markup=False, soft_wrap=True)
        sys.exit(1)


def _interrupted(exc: KeyboardInterrupt, verb: str, kept: str, finish: str) -> None:
    """A Ctrl-C (or SIGTERM, `sigterm_as_interrupt`) during `apply` or `destroy`: Terraform stops
    where it was (the terminal sent it the signal too, or skyhedge passed it on) and the state keeps
    what was done. Say so and what finishes it, in one line, and exit 130 (143) as a shell reports a
    Ctrl-C'd (SIGTERM'd) command, rather than click's bare "Aborted!" after the replicas' "create
    failed" lines (which read as a Terraform failure), or nothing at all."""
    by, code = interrupted_by(exc)
    # one line at any terminal width (rich would wrap it)
    echo(f"error: {verb} interrupted by {by} (Terraform stopped where it was; {kept}): {finish}.", err=True)
    raise SystemExit(code)


def _unrecorded_router(state_dir: Path) -> int | None:
    """The pid of an nginx routing for `state_dir` that no state records, or None."""
    try:
        from skyhedge.routing import running_router_pid
    except ImportError:
        return None
    return running_router_pid(state_dir)


def _confirm_destroy(
    records: Sequence[ReplicaRecord], roots: Sequence[str], heard: list[KeyboardInterrupt] | None = None
) -> bool:
    if not records:  # nothing recorded: what a deleted state dir still runs (`roots` says what)
        console.print(f"Stopping {', '.join(roots)}.", markup=False)
        return _ask("Stop them?", "destroy", heard)
    console.print(f"Destroying {len(records)} replica(s) in {', '.join(roots)}:", markup=False)
    for r in records:
        console.print(f"  {r.id}  {r.location}  {r.market}", markup=False)
    return _ask("Destroy them?", "destroy", heard)


@main.command()
@spec_argument
@state_dir_option
@click.option("--auto-approve", is_flag=True, help="Destroy without asking.")
@_terraform_bin_option
def destroy(spec: Path, state_dir: Path | None, auto_approve: bool, terraform_bin: str | None) -> None:
    """Take the router down and destroy every replica of SPEC (all Terraform roots, in parallel)."""
    service = load_spec(spec, launches=False)
    sdir = state_dir or default_state_dir(service.name)
    heard: list[KeyboardInterrupt] = []  # a Ctrl-C or SIGTERM at the question
    try:
        with sigterm_as_interrupt():
            report = destroy_service(
                service,
                sdir,
                terraform_bin=terraform_bin,
                confirm=None if auto_approve else functools.partial(_confirm_destroy, heard=heard),
                say=lambda text: console.print(f"[dim]{escape(text)}[/]"),
            )
    except KeyboardInterrupt as exc:
        _interrupted(
            exc,
            "destroy",
            "what it destroyed is recorded",
            f"`{command_line('destroy', spec, state_dir)}` finishes it",
        )
    if report.cancelled:
        console.print("Destroy cancelled; nothing changed.")
        sys.exit(interrupted_by(heard[0])[1] if heard else 1)
    for err in report.errors[1:]:
        report_error(err)
    if report.errors:
        if report.destroyed:  # what did go, before the error that stops the command
            destroyed = ", ".join(sorted(report.destroyed, key=replica_order))
            console.print(
                f"Destroyed {len(report.destroyed)} replica(s): {destroyed}.",
                markup=False,
            )
        raise report.errors[0]
    if report.orphans:
        console.print(
            f"Nothing recorded (the state dir {os.path.abspath(sdir)} is gone); stopped what it still "
            f"ran: {' and '.join(report.orphans)}.",
            markup=False,
        )
    elif not report.roots:
        console.print("Nothing to destroy.")
        note = no_state_note(sdir, service.name, given=state_dir is not None)
        if note:
            echo(note, err=True)
    else:
        forgot = (
            f"; {len(report.never_created)} recorded but never created, forgotten "
            f"({', '.join(sorted(report.never_created, key=replica_order))})"
            if report.never_created
            else ""
        )
        held = (
            f"; also {len(report.held_gone)} already recorded gone that Terraform still held "
            f"({', '.join(sorted(report.held_gone, key=replica_order))})"
            if report.held_gone
            else ""
        )
        console.print(
            f"Destroyed {len(report.destroyed)} replica(s) in {', '.join(report.roots)}{forgot}{held}.",
            markup=False,
        )
    for line in report.warnings:
        echo(f"warning: {line}", err=True)


def status_json(
    service_name: str,
    rows: list[dict[str, Any]],
    router: dict[str, Any] | None,
    watcher: dict[str, Any] | None = None,
    local_capacity: dict[str, Any] | None = None,
    launch_hold: dict[str, Any] | None = None,
    autoscaler: dict[str, Any] | None = None,
    rollout: dict[str, Any] | None = None,
    failing_roots: dict[str, Any] | None = None,
    quota: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The documented `status --json` object: `service`, `replicas` (rows), `router`, `watcher`
    (the running watcher's record, or null), `local_capacity` (null: every local zone open),
    `launch_hold` (the watcher holding new launches back: `until`, `reason`; null: none) and
    `autoscaler` (its target, the rate it is based on, the wish pending; null: autoscaling off)
    and `rollout` (the rolling update or placement move the watcher last saw in progress, and
    whether it is stalled: `state.extra["rollout"]`; null: none), `failing_roots` (the
    Terraform roots, one per cloud region, whose applies the running watcher sees failing: root
    -> `since`, `failures` in a row, `retry_at`, `reason`, `idle_since` (null unless its launches
    went elsewhere and it has nothing to apply); null: none, or no watcher runs) and
    `quota` (the account quotas the watcher found used up, whose launches wait: `quota_status`;
    null: none)."""
    return {
        "service": service_name,
        "replicas": rows,
        "router": router,
        "watcher": watcher,
        "local_capacity": local_capacity,
        "launch_hold": launch_hold,
        "autoscaler": autoscaler,
        "rollout": rollout,
        "failing_roots": failing_roots,
        "quota": quota,
    }


def quota_status(state: ServiceState) -> list[dict[str, Any]] | None:
    """The account quotas the watcher last found used up (`state.extra[QUOTA_KEY]`), one per
    cloud, region (null: every region of the cloud) and market: the cloud's one line naming the
    quota and where to raise it, since when and how many refusals in a row, the last one (`at`)
    and when launches there are asked again (`next_at`). None when none is known."""
    table = state.extra.get(QUOTA_KEY)
    if not isinstance(table, dict) or not table:
        return None
    out = []
    for key, entry in sorted(table.items()):
        cloud, region, market = key.split("/")
        out.append({"cloud": cloud, "region": None if region == "*" else region, "market": market, **entry})
    return out


def _describe_quota(entry: dict[str, Any], watching: bool, now: float) -> str:
    """One `Quota:` line. "Asked again at" a time only while a watcher runs and its pause is
    ahead: past it (the policy placing its launches elsewhere, or none needed) or with no watcher,
    nothing asks at any time, and the line showed a time long past as the next ask."""
    times = f"{entry['refusals']} refusal(s) since {clock_time(entry['since'])}"
    if not watching:
        again = "no watcher runs: asked again by the next apply that places a launch there"
    elif float(entry["next_at"]) > now:
        again = f"asked again at {clock_time(entry['next_at'])}"
    else:
        again = f"last refused at {clock_time(entry['at'])}; asked again at the next launch placed there"
    return f"{entry['reason']} ({entry['market']}; {times}; {again})"


def autoscaler_status(spec: ServiceSpec, state: ServiceState) -> dict[str, Any] | None:
    """What the request-rate autoscaler decided and why, from the state the watcher saved: the
    target, its bounds, the rate over the window and when it was measured (`qps_at`: a running
    watcher writes its samples once a minute, not every pass, see `loop.SAVE_EVERY`), and a wish
    waiting out its delay (`pending`, since when, and `adopt_at`: when it is adopted if the rate
    holds; written by the pass that makes it). None when it is off."""
    from skyhedge.autoscaler import AutoscalerConfig, AutoscalerState
    from skyhedge.service import service_target

    config = AutoscalerConfig.from_spec(spec)
    if not config.enabled:
        return None
    saved = AutoscalerState.from_json(state.extra.get("autoscaler"))
    pending = saved.pending if saved.pending_since is not None else None
    adopt_at = None
    if pending is not None and saved.pending_since is not None:
        up = pending > service_target(spec, state)
        delay = config.upscale_delay_seconds if up else config.downscale_delay_seconds
        adopt_at = saved.pending_since + delay
    return {
        "target": service_target(spec, state),
        "min_replicas": config.min_replicas,
        "max_replicas": config.max_replicas,
        "target_qps_per_replica": config.target_qps_per_replica,
        "qps": saved.qps,
        "qps_at": saved.samples[-1][0] if saved.qps is not None and saved.samples else None,
        "window_seconds": config.window_seconds,
        "pending": pending,
        "pending_since": saved.pending_since if pending is not None else None,
        "adopt_at": adopt_at,
    }


def clock_time(at: Any, fmt: str = "%H:%M:%S") -> str:
    """`at` (a Unix time from the state or a file beside it) as local time, or as the number it is
    when it is no time the platform can show (a hand edit, a clock far in the future): `status`
    shows such a state in full rather than dying on an OverflowError in the middle of it."""
    try:
        return time.strftime(fmt, time.localtime(float(at)))
    except (OverflowError, ValueError, OSError, TypeError):
        return f"{at!r} (not a time)"


def _describe_autoscaler(scaler: dict[str, Any]) -> str:
    bounds = f"{scaler['min_replicas']}-{scaler['max_replicas']}"
    window = f"{scaler['window_seconds']:.0f} s"
    if scaler["qps"] is None:
        rate = "rate not measured yet"
    elif scaler.get("qps_at") is None:
        rate = f"{scaler['qps']:.1f} req/s over the last {window}"
    else:  # as last saved: up to a minute behind the running watcher (its /metrics has it live)
        at = clock_time(scaler["qps_at"])
        rate = f"{scaler['qps']:.1f} req/s over the {window} to {at}"
    text = (
        f"target {scaler['target']} ({rate}, "
        f"{scaler['target_qps_per_replica']:g} req/s per replica, {bounds} replicas)"
    )
    if scaler["pending"] is not None:
        when = clock_time(scaler["adopt_at"])
        text += f"; wants {scaler['pending']}, adopted at {when} if the rate holds"
    return text


def launch_hold(state: ServiceState, now: float) -> dict[str, Any] | None:
    """The crash-loop (or given-up launches) hold the watcher last recorded, while in force."""
    hold = state.extra.get(LAUNCH_HOLD_KEY)
    return hold if isinstance(hold, dict) and float(hold.get("until", 0.0)) > now else None


def failing_roots(state: ServiceState, watcher: Any) -> dict[str, Any] | None:
    """The roots whose applies the running watcher sees failing (its cloud's API gone: expired
    credentials, an endpoint refusing, throttling), or None. Only while a watcher runs: the
    record is its view, and an `apply` run since it stopped may have worked."""
    roots = state.extra.get(FAILING_ROOTS_KEY)
    return dict(roots) if watcher is not None and isinstance(roots, dict) and roots else None


def _describe_failing(key: str, outage: dict[str, Any]) -> str:
    idle = outage.get("idle_since")  # (absent from an earlier release's record)
    if idle is not None:  # its launches placed elsewhere: no retry of its own
        when = f"nothing to apply there since {clock_time(idle)}: tried with the next launch placed there"
    else:
        when = f"next try {clock_time(outage['retry_at'])}"
    return (
        f"{key}: applies failing since {clock_time(outage['since'])} ({outage['failures']} in a row; "
        f"{when}; the other roots apply as usual): {outage['reason']}"
    )


def current_rollout(state: ServiceState) -> dict[str, Any] | None:
    """The rolling update (or placement move) the watcher last recorded, if any replica it names
    is still live: an `apply` or `destroy` that finished it after the watcher stopped leaves the
    record behind, and `status` must not show an update that is over."""
    record = state.extra.get(ROLLOUT_KEY)
    if not isinstance(record, dict):
        return None
    live = {r.id for r in state.live()}
    kept = [rid for rid in record.get("replicas") or [] if rid in live]
    return {**record, "replicas": kept} if kept else None


def local_capacity(sdir: Path) -> dict[str, Any] | None:
    """What the local cloud's capacity file holds back (`skyhedge preempt`, a market replay):
    zones out of spot capacity (until when, null: until cleared), pools with room for n, and the
    replay driving them; None when every local zone is open."""
    from skyhedge.clouds.local import capacity, runtime_dir

    runtime = runtime_dir(sdir)
    now = time.time()
    try:
        marks = {z: u for z, u in capacity.read_capacity(runtime).items() if u is None or u > now}
        limits = capacity.read_limits(runtime)
        replay = capacity.read_replay(runtime)
    except capacity.CapacityFileError as exc:
        raise StateError(str(exc)) from exc
    if not (marks or limits or replay):
        return None
    return {"preempted": marks, "limits": limits, "replay": replay}


@main.command()
@spec_argument
@state_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option(
    "--all", "include_gone", is_flag=True, help="Include replicas that are gone (preempted, failed...)."
)
def status(spec: Path, state_dir: Path | None, as_json: bool, include_gone: bool) -> None:
    """Show the replicas of SPEC as recorded in the state: where, which market, endpoint and state."""
    loaded: ServiceSpec | None = None
    try:
        loaded = load_spec(spec)
        name = loaded.name
    except SpecError as exc:
        # an edit in progress or a typo the running watcher refused: its state is still worth seeing
        found = service_name_in(spec)
        if found is None:
            raise
        name = found
        err_console.print(f"warning: {exc} (showing {name}'s recorded state)", markup=False, highlight=False)
    sdir = state_dir or default_state_dir(name)
    state = load_state(sdir, name)
    rows = live_rows(state, include_gone=include_gone)
    router = live_router(state, sdir)
    watcher = presence.read(sdir)  # the running watch/up, if any
    try:
        held_back = local_capacity(sdir)
    except StateError as exc:  # a damaged capacity file: the rest of the state is still worth seeing
        held_back = None
        err_console.print(f"warning: {exc}", markup=False, highlight=False, soft_wrap=True)
    hold = launch_hold(state, time.time())
    rollout = current_rollout(state)
    failing = failing_roots(state, watcher)
    quota = quota_status(state)
    scaler = autoscaler_status(loaded, state) if loaded is not None else None
    # --json: the object alone, for scripts
    note = None if as_json else no_state_note(sdir, name, given=state_dir is not None)
    if note:
        echo(note, err=True)
    if as_json:
        record = watcher.to_json() if watcher is not None else None
        shown = status_json(name, rows, router, record, held_back, hold, scaler, rollout, failing, quota)
        echo(strict_json(shown, indent=2))
        return
    table = Table(title=Text(f"skyhedge status: {name}"))
    # One location column keeps the endpoint readable (unwrapped) in an 80-column terminal.
    # (narrower still, the location folds over lines, whole, rather than end in "…")
    for col in ("id", "cloud/region/zone", "market", "state", "endpoint"):
        table.add_column(col, no_wrap=col in {"id", "endpoint", "state"}, overflow="fold")
    for row in rows:
        where = f"{row['cloud']}/{row['region']}/{row['zone']}"
        values = (row["id"], where, row["market"], row["state"], row["endpoint"])
        table.add_row(*(Text(str(v or "-")) for v in values))  # zones, endpoints: data, not markup
    console.print(fitted(table, console))
    if router and router.get("pid") is not None:
        console.print(f"Router: {router.get('endpoint')} (pid {router.get('pid')})", markup=False)
    elif state.router:
        # workers of a killed master keep serving with the last config (docs/routing.md,
        # "Crashes"): "not running" then sent the operator after a router that still answered
        orphans = _answers(state.router.get("endpoint"))
        still = "; its workers still answer on the port, with the last config" if orphans else ""
        console.print(
            f"Router: not running (nginx pid {state.router.get('pid')} is gone{still}; "
            f"`{command_line('routing up', spec, state_dir)}` or `{command_line('watch', spec, state_dir)}` "
            "starts it again)",
            markup=False,
        )
    elif (unrecorded := _unrecorded_router(sdir)) is not None:
        # its state dir deleted under it (`rm -rf .skyhedge`, `git clean -fdx`): nothing recorded,
        # but the nginx of this state dir, found by its command line, still holds the port
        console.print(
            f"Router: not recorded, but nginx pid {unrecorded} of this state dir still runs "
            f"(`{command_line('destroy', spec, state_dir)}` stops it)",
            markup=False,
        )
    else:
        console.print("Router: not running")
    if watcher is None:
        console.print("Watcher: not running")
    else:
        since = clock_time(watcher.started_at, "%Y-%m-%d %H:%M:%S")
        # the spec's path and the reload's text are data: `[prod]/svc.yaml` must not lose `[prod]`
        console.print(
            f"Watcher: pid {watcher.pid} since {since} ({watcher.mode}; {watcher.spec}, "
            f"spec reloads: {watcher.reload})",
            markup=False,
        )
        if watcher.metrics:
            console.print(f"  metrics: {watcher.metrics}", markup=False)
        if watcher.last_reload:
            console.print(f"  last spec reload: {watcher.last_reload.get('text', '')}", markup=False)
    if held_back is not None:
        console.print(f"Local capacity: {_describe_capacity(held_back)}", markup=False)
    if hold is not None:
        until = clock_time(hold["until"])
        console.print(f"Launches held until {until}: {hold['reason']}", markup=False)
    if rollout is not None:
        console.print(f"Rolling update: {rollout_line(rollout)}", markup=False)
    for key, outage in sorted((failing or {}).items()):
        console.print(f"Failing: {_describe_failing(key, outage)}", markup=False, soft_wrap=True)
    for entry in quota or ():
        console.print(f"Quota: {_describe_quota(entry, watcher is not None, time.time())}", markup=False)
    if scaler is not None:
        console.print(f"Autoscaler: {_describe_autoscaler(scaler)}", markup=False)


def _answers(endpoint: object) -> bool:
    """Something accepts connections at the router's `http://host:port` (a quick connect)."""
    import socket
    from urllib.parse import urlsplit

    if not isinstance(endpoint, str):
        return False
    try:
        url = urlsplit(endpoint)
        with socket.create_connection((url.hostname or "127.0.0.1", url.port or 80), timeout=0.3):
            return True
    except (OSError, ValueError):
        return False


def _describe_capacity(held: dict[str, Any]) -> str:
    parts = [
        f"{zone} out of spot capacity " + ("until cleared" if until is None else f"until {clock_time(until)}")
        for zone, until in sorted(held["preempted"].items())
    ]
    parts += [
        f"{zone} has room for {n} spot replica(s)"
        for zone, n in sorted(held["limits"].items())
        if zone not in held["preempted"]  # (a pool's size while its zone is out says nothing)
    ]
    text = "; ".join(parts) or "every zone open"
    replay = held.get("replay")
    if replay:
        text += f" (a market replay, pid {replay.get('pid')}, drives {', '.join(replay.get('zones') or [])})"
    return text
