"""What Terraform's `local-exec` runs to start and stop a local replica (no shell in between).

    python -m skyhedge.clouds.local.launcher start r-0001
    python -m skyhedge.clouds.local.launcher stop r-0001

The replica's settings arrive as JSON in `$SKYHEDGE_LOCAL_REPLICA` (see
modules/local-replicas/main.tf), so quotes, `${...}`, `%{...}` or newlines in a command or an env
value are data, never syntax. `start` refuses a spot launch into a zone the capacity file marks
preempted (exit 3, `InsufficientCapacity`, the marker skyhedge's engine recognises), then runs
`run.setup` (if any) and starts `/bin/sh -c run.command` detached, both in the replica's `workdir`
(`run.workdir`, else the directory skyhedge was started in): its own session, stdin from
/dev/null, output to the replica's log file, `$PORT` and `run.env` set. `stop` sends SIGTERM to the
process group and SIGKILL after the grace period. Both are safe to repeat.

Exit codes: 0 done, 1 failed (message on stderr), 2 bad invocation, 3 no spot capacity,
130 interrupted (SIGINT: a Ctrl-C in the terminal reaches the whole foreground process group,
Terraform's local-exec children included; the one-line reason is "interrupted", which skyhedge
shows as the launch's failure, not the first line of a KeyboardInterrupt traceback).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from skyhedge.clouds.local import capacity
from skyhedge.clouds.local.processes import (
    REPLICA_ENV,
    RUNTIME_ENV,
    RUNTIME_ID_ENV,
    SERVICE_ENV,
    LocalProcess,
    is_running,
    list_pidfiles,
    log_path,
    open_log,
    open_replicas_dir,
    proc_starttime,
    remember_paths,
    replicas_dir,
    runtime_identity,
    stop_replica,
    write_pidfile,
)
from skyhedge.errors import escape_controls

CONFIG_ENV = "SKYHEDGE_LOCAL_REPLICA"
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CAPACITY = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process Ctrl-C ended
# How long a fresh process must survive before the launch counts: catches `command not found` and
# an interpreter that exits on a missing script. 0.15 s missed Python's own start-up on a busy
# 2-core machine; what slips through is caught later by the readiness probe (never READY).
STARTUP_CHECK_SECONDS = 0.5
# Variables skyhedge sets for Terraform and the launcher; the replica should not inherit them.
# PYTHONPATH is the launcher's own (where skyhedge lives): a replica that needs one sets it in run.env.
_PRIVATE_ENV = (
    "TF_IN_AUTOMATION",
    "TF_CLI_CONFIG_FILE",
    "TF_DATA_DIR",
    "TF_INPUT",
    "PYTHONPATH",
    "SKYHEDGE_LAUNCHER_PYTHON",  # skyhedge.engine's, for the stop step (modules/local-replicas)
    CONFIG_ENV,
)


class LaunchError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        self.code = code
        super().__init__(message)


def port_in_use(port: int) -> bool:
    """Whether 127.0.0.1:`port` is held (a replica could not listen there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _log_tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of this attempt's output: the log keeps every attempt of a replica
    ID (each opened by a `=== skyhedge: starting` line), and an error should not repeat them all.
    The tail reaches the operator's terminal and logs (apply's error, the watcher's log line,
    the dashboard), so control characters in it are shown escaped: an escape sequence the
    replica printed (a title, a cleared screen, a colour) must not act on the terminal."""
    try:
        with os.fdopen(open_log(path), "rb") as fh:
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    attempt = text.splitlines()
    for i in range(len(attempt) - 1, -1, -1):
        if attempt[i].startswith("=== skyhedge: starting "):
            attempt = attempt[i:]
            break
    return "\n".join(escape_controls(line) for line in attempt[-lines:])


def replica_env(cfg: dict[str, Any], runtime: Path) -> dict[str, str]:
    """The replica's environment: ours minus skyhedge's private variables, plus run.env and PORT."""
    env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
    env.update({str(k): str(v) for k, v in (cfg.get("env") or {}).items()})
    env.update(
        {
            "PORT": str(cfg["port"]),
            REPLICA_ENV: cfg["id"],
            SERVICE_ENV: cfg["service"],
            "SKYHEDGE_ZONE": cfg["zone"],
            "SKYHEDGE_MARKET": cfg["market"],
            RUNTIME_ENV: str(runtime),
        }
    )
    env.pop(RUNTIME_ID_ENV, None)  # (a launcher run from a replica's shell: never its runtime dir's)
    identity = runtime_identity(runtime)  # which runtime dir launched it, once its path is gone
    if identity is not None:
        env[RUNTIME_ID_ENV] = identity
    return env


def start(cfg: dict[str, Any], *, now: float | None = None) -> LocalProcess:
    given = Path(cfg["runtime_dir"])
    runtime = given.parent.resolve() / given.name  # `local/` itself unresolved: a link there is refused
    rid, zone, market = cfg["id"], cfg["zone"], cfg["market"]
    fixed_now = now
    now = time.time() if now is None else now
    try:  # before anything is written there: a `local/` or `replicas/` that is a link, or another's
        os.close(open_replicas_dir(runtime, create=True))
    except OSError as exc:
        why = exc.strerror or str(exc)  # a refusal's names the folder; an error of the system's does not
        why = why if str(exc.filename) in why else f"{exc.filename or replicas_dir(runtime)}: {why}"
        raise LaunchError(f"{rid}: cannot keep its log and pid file: {why}") from exc
    spot = market == "spot"
    if spot:  # a zone without room refuses at once, before a setup runs for nothing
        with capacity.locked(runtime):
            _check_room(runtime, rid, zone, now)
    # run.setup runs outside the capacity lock: under it, every spot launch's setup waited for
    # the one before (five replicas with a 60 s setup took five minutes)
    log = _prepare(runtime, cfg, now)
    try:  # the path its processes carry (`RUNTIME_ENV`): found again after the state dir moved
        remember_paths(runtime)
    except OSError as exc:
        why = f"{exc.filename}: {exc.strerror or exc}"
        raise LaunchError(f"{rid}: cannot record its runtime dir's path: {why}") from exc
    try:
        # A spot launch holds the capacity file's lock from checking its zone's room (again: it
        # may have filled, or been marked preempted, during the setup) until its pid file is
        # written: parallel launches into one finite pool (Terraform runs them side by side) and
        # a market replay shrinking it cannot each see a free slot that only one of them has.
        with capacity.locked(runtime) if spot else contextlib.nullcontext():
            if spot:
                _check_room(runtime, rid, zone, time.time() if fixed_now is None else fixed_now)
            child = _spawn(runtime, cfg, log)
            proc = _record(runtime, cfg, child, log, now)
    except BaseException:
        stop_replica(runtime, rid, grace=0.0)  # what the setup left in the background goes too
        raise
    try:
        return _settle(runtime, cfg, child, log, proc)
    except KeyboardInterrupt:
        # the launch counts as failed: a process nobody records as created must not stay behind
        stop_replica(runtime, rid, grace=0.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)  # reaped: no zombie, no "still running" warning
        raise


def _check_room(runtime: Path, rid: str, zone: str, now: float) -> None:
    """Refuse a spot launch the way a cloud's capacity error does: the zone is marked preempted,
    or its pool (`limits`) already holds as many spot replicas as it has room for."""
    try:
        capacity.recover_abandoned(runtime, lock=False)  # a killed replay's zones are open again
        refused, until = capacity.preempted(runtime, zone, now)
        limit = capacity.read_limits(runtime).get(zone)
    except capacity.CapacityFileError as exc:
        raise LaunchError(str(exc)) from exc
    if refused:
        when = (
            "until cleared"
            if until is None
            else f"until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(until))}"
        )
        raise LaunchError(
            f"InsufficientCapacity: no spot capacity in local zone {zone} for {rid} "
            f"(marked preempted {when} in {capacity.capacity_path(runtime)})",
            EXIT_CAPACITY,
        )
    if limit is not None:
        held = [
            p.id
            for p in list_pidfiles(runtime)
            if p.zone == zone and p.market == "spot" and p.id != rid and is_running(p)
        ]
        if len(held) >= limit:
            raise LaunchError(
                f"InsufficientCapacity: no spot capacity in local zone {zone} for {rid} "
                f"(its pool of {limit} is held by {', '.join(sorted(held)) or 'none'}; "
                f"{capacity.capacity_path(runtime)})",
                EXIT_CAPACITY,
            )


def _open_for_append(rid: str, log: Path) -> int:
    """The replica's log opened to append (created if need be), never through a link planted in
    its place (`processes.open_log`): a LaunchError naming it if refused."""
    try:
        return open_log(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    except OSError as exc:
        raise LaunchError(f"{rid}: cannot write its log {log} ({exc.strerror or exc})") from exc


def _shell(cfg: dict[str, Any], runtime: Path, log: IO[bytes]) -> dict[str, Any]:
    """How setup and command alike run: in the replica's directory and environment, output to its log."""
    return {
        "cwd": Path(cfg["workdir"]),
        "env": replica_env(cfg, runtime),
        "stdin": subprocess.DEVNULL,
        "stdout": log,
        "stderr": subprocess.STDOUT,
    }


def _prepare(runtime: Path, cfg: dict[str, Any], now: float) -> Path:
    """Everything before the command starts: a leftover of the same ID stopped, the port and the
    directory checked, the log's header written, `run.setup` run. Returns the log's path."""
    rid, zone, market, port = cfg["id"], cfg["zone"], cfg["market"], int(cfg["port"])
    # Idempotent: a leftover process of the same ID (crash before Terraform recorded it) goes first.
    stop_replica(runtime, rid, grace=2.0)
    if port_in_use(port):
        raise LaunchError(f"{rid}: port 127.0.0.1:{port} is already in use by another process")
    workdir = Path(cfg["workdir"])
    if not workdir.is_dir():
        raise LaunchError(f"{rid}: working directory {workdir} does not exist")
    log = log_path(runtime, rid)
    # unbuffered: a write the disk refuses fails here, named, not later as a bare errno
    with os.fdopen(_open_for_append(rid, log), "ab", buffering=0) as fh:
        try:
            fh.write(
                f"=== skyhedge: starting {rid} ({zone}, {market}) on port {port} at {now:.3f} ===\n".encode()
            )
        except OSError as exc:  # a full disk: "OSError: [Errno 28] No space left on device", no file
            raise LaunchError(f"{rid}: cannot write its log {log} ({exc.strerror or exc})") from exc
        shell = _shell(cfg, runtime, fh)
        if cfg.get("setup"):
            try:
                limit = cfg.get("setup_timeout")
                try:
                    setup = ["/bin/sh", "-c", cfg["setup"]]
                    done = subprocess.run(setup, check=False, timeout=limit, **shell)
                except subprocess.TimeoutExpired:
                    raise LaunchError(
                        f"{rid}: run.setup did not finish within {limit:g}s "
                        f"(readiness_probe.initial_delay_seconds); log {log}:\n{_log_tail(log)}"
                    ) from None
                if done.returncode != 0:
                    raise LaunchError(
                        f"{rid}: run.setup exited with {done.returncode}; log {log}:\n{_log_tail(log)}"
                    )
            except BaseException:
                # What the setup started in the background (`helper &`, which a non-interactive
                # shell also shields from Ctrl-C) carries the replica's ID: a launch that failed
                # must leave nothing running, as one whose command exits at once leaves nothing.
                stop_replica(runtime, rid, grace=0.0)
                raise
    return log


def _spawn(runtime: Path, cfg: dict[str, Any], log: Path) -> subprocess.Popen[bytes]:
    """Start `run.command` detached: its own session, so that it outlives the launcher."""
    with os.fdopen(_open_for_append(cfg["id"], log), "ab") as fh:
        return subprocess.Popen(
            ["/bin/sh", "-c", cfg["command"]],
            start_new_session=True,
            close_fds=True,
            **_shell(cfg, runtime, fh),
        )


def _record(
    runtime: Path, cfg: dict[str, Any], child: subprocess.Popen[bytes], log: Path, now: float
) -> LocalProcess:
    """Write the started process's pid file."""
    starttime = proc_starttime(child.pid)
    proc = LocalProcess(
        id=cfg["id"],
        pid=child.pid,
        pgid=child.pid,
        port=int(cfg["port"]),
        zone=cfg["zone"],
        market=cfg["market"],
        started_at=now,
        starttime=starttime if starttime is not None else -1,
        log=str(log),
        runtime=str(runtime),
    )
    write_pidfile(runtime, proc)
    return proc


def _settle(
    runtime: Path, cfg: dict[str, Any], child: subprocess.Popen[bytes], log: Path, proc: LocalProcess
) -> LocalProcess:
    """Check the recorded process survives its first moments."""
    rid = cfg["id"]
    deadline = time.monotonic() + STARTUP_CHECK_SECONDS
    code = child.poll()
    while code is None and time.monotonic() < deadline:  # a failure is reported as soon as seen
        time.sleep(0.02)
        code = child.poll()
    if code is not None:
        stop_replica(runtime, rid, grace=0.0)
        # Exit 0 is no crash: the command went to the background (a trailing `&`, a server that
        # daemonises itself), and what it left there was just stopped with it. Say so, or the
        # user hunts for an error in a log that holds none.
        hint = (
            " (run.command must keep running in the foreground: one that ends in `&` or "
            "daemonises itself returns at once, and the launcher stops what it left behind)"
            if code == 0
            else ""
        )
        raise LaunchError(
            f"{rid}: run.command exited at once with {code}{hint}; log {log}:\n{_log_tail(log)}"
        )
    return proc


def stop(cfg: dict[str, Any]) -> bool:
    return stop_replica(Path(cfg["runtime_dir"]), cfg["id"], grace=float(cfg.get("grace", 10)))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C reached the launcher: say so in one line, no traceback
        print(f"skyhedge-local: {' '.join(args)}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args: list[str]) -> int:
    if len(args) != 2 or args[0] not in {"start", "stop"}:
        print("usage: python -m skyhedge.clouds.local.launcher {start|stop} REPLICA_ID", file=sys.stderr)
        return EXIT_USAGE
    action, rid = args
    try:
        cfg = json.loads(os.environ[CONFIG_ENV])
        if cfg.get("id") != rid:
            raise ValueError(f"{CONFIG_ENV} is for {cfg.get('id')!r}, not {rid!r}")
    except (KeyError, ValueError) as exc:
        print(f"skyhedge-local: {action} {rid}: bad or missing ${CONFIG_ENV} ({exc})", file=sys.stderr)
        return EXIT_USAGE
    try:
        if action == "start":
            proc = start(cfg)
            print(f"skyhedge-local: started {rid} (pid {proc.pid}) on port {proc.port} in {proc.zone}")
        else:
            was = stop(cfg)
            print(f"skyhedge-local: {'stopped' if was else 'already stopped'} {rid}")
    except LaunchError as exc:
        print(f"skyhedge-local: {exc}", file=sys.stderr)
        return exc.code
    except capacity.CapacityFileError as exc:  # its lock refused (a link, another account's file)
        print(f"skyhedge-local: {action} {rid}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (KeyError, OSError) as exc:
        print(f"skyhedge-local: {action} {rid}: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
