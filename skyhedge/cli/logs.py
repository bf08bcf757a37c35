"""`skyhedge logs`: a replica's log, read through its cloud (skyhedge/replica_logs.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from skyhedge.cli._app import (
    FiniteFloat,
    command_line,
    err_console,
    main,
    spec_argument,
    state_dir_option,
    stdout_reader_gone,
    stop_quietly,
)
from skyhedge.errors import CloudError, SkyhedgeError
from skyhedge.planner import replica_order
from skyhedge.replica_logs import last_lines, read_log
from skyhedge.spec import ServiceSpec, load_spec
from skyhedge.state import ReplicaRecord, default_state_dir, load_state

#: Seconds between reads while following: a local file is cheap to read; a cloud API is rate
#: limited (GetConsoleOutput, getSerialPortOutput), and its console changes slowly.
FOLLOW_EVERY = {"local": 0.5}
FOLLOW_EVERY_CLOUD = 5.0
#: How long a local replica's process must have been seen ended, its pid file left, before the
#: follow takes it for gone. A stop by skyhedge (`destroy`, a release) removes the pid file within
#: a few ms of the process's end and records the replica `terminated` itself: that is its verdict.
LOCAL_EXIT_SECONDS = 1.0


def _tail(_ctx: click.Context, _param: click.Parameter, value: str) -> int | None:
    if value == "all":
        return None
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise click.BadParameter(f"expected a number of lines >= 0 or 'all', got {value!r}")
    return count


def _find(
    records: dict[str, ReplicaRecord], replica: str, spec: Path, state_dir: Path | None
) -> ReplicaRecord:
    record = records.get(replica)
    if record is not None:
        return record
    live = sorted((r.id for r in records.values() if r.gone_at is None), key=replica_order)
    known = f"live: {', '.join(live)}" if live else "no live replica"
    raise SkyhedgeError(
        f"REPLICA: no replica {replica!r} in the state ({known}; "
        f"`{command_line('status', spec, state_dir)} --all` lists every one)"
    )


def _note(text: str) -> None:
    """A line about the log, on stderr: stdout carries the log alone (`skyhedge logs ... | grep`)."""
    err_console.print(text, markup=False, highlight=False, soft_wrap=True)


def _write(text: str) -> None:
    """Print log text; a reader that went away (`| head`) ends the command quietly, as `tail`."""
    if not text:
        return
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        stop_quietly()


@main.command()
@spec_argument
@click.argument("replica")
@state_dir_option
@click.option(
    "--tail",
    default="200",
    metavar="N|all",
    callback=_tail,
    show_default=True,
    help="Show the last N lines of what the log holds now ('all': all of it, up to 1 MiB).",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the replica is gone.")
@click.option(
    "--interval",
    type=FiniteFloat(min=0.1, max=3600),  # `nan` passed a plain range, to fail in time.sleep
    default=None,
    help="Seconds between reads with --follow (default 0.5 on local, 5 on a cloud).",
)
def logs(
    spec: Path, replica: str, state_dir: Path | None, tail: int | None, follow: bool, interval: float | None
) -> None:
    """Print the log of one replica of SPEC (IDs as `skyhedge status` shows them).

    local: the replica process's stdout and stderr. aws, gcp: the instance's console (EC2
    GetConsoleOutput; serial port 1): the boot log, the boot script's errors included, which is
    where a replica that never gets READY shows why. On a VM the service's own output is in its
    journal: `journalctl -u skyhedge-replica`. The log's origin goes to stderr, the log to stdout.
    """
    if interval is not None and not follow:  # as --speedup without --market-trace: a usage error
        raise click.UsageError("--interval paces --follow: give -f/--follow too, or drop --interval")
    service = load_spec(spec, launches=False)
    sdir = state_dir or default_state_dir(service.name)
    record = _find(load_state(sdir, service.name).replicas, replica, spec, state_dir)
    chunk = read_log(service, sdir, record, None)
    where = f"{record.cloud}/{record.region}/{record.zone}, {record.market}"
    gone = f", gone: {record.reason or 'gone'}" if record.gone_at is not None else ""
    _note(f"==> {record.id} ({where}{gone}): {chunk.source} <==")
    if chunk.skipped:
        _note(f"({chunk.skipped})")
    _write(last_lines(chunk.text, tail))
    if not follow:
        return
    if record.gone_at is not None:
        _note(f"{record.id} is gone: nothing more to follow")
        return
    every = interval or FOLLOW_EVERY.get(record.cloud, FOLLOW_EVERY_CLOUD)
    try:
        _follow(service, sdir, record.id, chunk.next, every)
    except KeyboardInterrupt:  # how a follow ends by hand, as `tail -f`: no traceback, no "Aborted!"
        sys.exit(130)


def _follow(service: ServiceSpec, sdir: Path, rid: str, cursor: object, every: float) -> None:
    """Read on from `cursor` every `every` seconds; stop after the read that follows the replica's
    end in the state (a preemption, a scale-down), or a local replica's process ending unrecorded.
    A failing read of a cloud API is told once and retried; the replica's log file vanishing is an
    error."""
    failing: str | None = None
    exited_at: float | None = None  # when a local replica's process was first seen ended
    while True:
        time.sleep(every)
        if stdout_reader_gone():
            stop_quietly()
        state = load_state(sdir, service.name)
        record = state.replicas.get(rid)
        if record is not None and record.cloud == "local" and record.gone_at is None:
            exited_at = _local_exit(sdir, rid, exited_at)
            if exited_at is not None and time.monotonic() - exited_at >= LOCAL_EXIT_SECONDS:
                # With no watcher running nothing records a local replica whose process died
                # (a `preempt`, a crash), and the follow never ended: seen as `plan` sees it, in
                # memory only (the reason, preempted or failed, included).
                from skyhedge.apply import notice_dead_local_replicas

                notice_dead_local_replicas(state, sdir, time.time())
        try:
            chunk = read_log(service, sdir, record, cursor) if record is not None else None
        except CloudError as exc:
            if record is not None and record.cloud == "local":
                raise
            if str(exc) != failing:
                failing = str(exc)
                _note(f"warning: {exc} (retrying)")
            continue
        failing = None
        if chunk is not None:
            if chunk.skipped:
                _note(f"({chunk.skipped})")
            _write(chunk.text)
            cursor = chunk.next
        if record is None or record.gone_at is not None:
            why = record.reason if record is not None and record.reason else "removed from the state"
            _note(f"{rid} is gone ({why}): end of its log")
            return


def _local_exit(sdir: Path, rid: str, since: float | None) -> float | None:
    """When local replica `rid`'s process was first seen ended with its pid file left (a
    `preempt`'s SIGKILL, a crash), keeping `since` while it stays so; None while it runs, or
    while it has no pid file (not started yet, or stopped by skyhedge, which records it)."""
    from skyhedge.clouds.local import runtime_dir
    from skyhedge.clouds.local.processes import is_running, read_pidfile

    proc = read_pidfile(runtime_dir(sdir), rid)
    if proc is None or is_running(proc):
        return None
    return since if since is not None else time.monotonic()
