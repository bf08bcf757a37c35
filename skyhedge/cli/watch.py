"""`skyhedge watch | up | reload | preempt | aws setup-events`: the controller's commands."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from skyhedge.apply import routed_pairs
from skyhedge.cli._app import (
    FiniteFloat,
    check_policy_flag,
    command_line,
    console,
    echo,
    err_console,
    interrupted_by,
    main,
    sigterm_as_interrupt,
    spec_argument,
    state_dir_option,
)
from skyhedge.controller.loop import ControllerOptions
from skyhedge.errors import SpecError, StateError
from skyhedge.planner import replica_order
from skyhedge.service import Placement, resolve_placement
from skyhedge.spec import ServiceSpec, load_spec
from skyhedge.state import STATE_FILE, ServiceState, default_state_dir, load_state, unwritable

_terraform_bin = click.option(
    "--terraform-bin",
    type=click.Path(dir_okay=False),
    default=None,
    help="Use this terraform or tofu binary instead of the embedded engine (also: $SKYHEDGE_TERRAFORM).",
)
_interval = click.option(
    "--interval",
    type=FiniteFloat(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds between reconcile passes when nothing happens (events wake it sooner).",
)
_policy = click.option("--policy", default=None, help="Override replica_policy.policy.")
_no_spec_reload = click.option(
    "--no-spec-reload",
    is_flag=True,
    help="Run with SPEC as it was at start: do not re-read it when the file changes, on SIGHUP "
    "or on `skyhedge reload`.",
)

_metrics_port = click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Serve Prometheus metrics (replicas per zone and market, serving, cost, preemptions...) "
    "at http://HOST:PORT/metrics.",
)
_metrics_host = click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="Address the metrics endpoint listens on (0.0.0.0 for a scraper on another host).",
)


class TraceTime(click.ParamType):
    """A time into a trace: seconds, or a number with a unit (`90s`, `15m`, `12h`, `2d`)."""

    name = "time"
    UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        text = str(value).strip().lower()
        scale = self.UNITS.get(text[-1:], 1) if text else 1
        number = text[:-1] if text[-1:] in self.UNITS else text
        try:
            seconds = float(number) * scale
        except ValueError:
            self.fail(f"expected seconds or a number with s, m, h or d (e.g. 12h), got {value!r}", param, ctx)
        if not math.isfinite(seconds) or seconds < 0:
            self.fail(f"expected a time of 0 or more, got {value!r}", param, ctx)
        return seconds


def _given(param: str) -> bool:
    """Whether the command line (or the environment) set `param`, rather than its default."""
    source = click.get_current_context().get_parameter_source(param)
    return source is not None and source.name != "DEFAULT"


def _check_metrics_flags(port: int | None) -> None:
    if port is None and _given("metrics_host"):
        raise click.UsageError("--metrics-host is where --metrics-port listens: give --metrics-port too")


def _check_gitops_flags(gitops: Path | None, gitops_path: str | None) -> None:
    """`--gitops-path` alone is a usage error: ignored, the watcher ran in apply mode on the
    GitOps state, launching the committed replicas itself (on a cloud, billed machines) and
    turning GitOps mode off in the state, where the user had only forgotten `--gitops`."""
    if gitops is None and gitops_path is not None:
        raise click.UsageError("--gitops-path is where --gitops writes the tree: give --gitops REPO_DIR too")


def _check_policy(service: ServiceSpec, policy: str | None) -> None:
    """`--policy` is checked before anything starts, as `plan --policy` is: inside the loop an
    unknown name failed every pass for ever, behind a router answering 503 to everyone."""
    if policy is None:
        return
    check_policy_flag(policy)  # PolicyError: unknown name, plug-in that does not load
    resolve_placement(service, policy)  # SpecError: e.g. no spot zone unless the policy is ondemand


def _check_metrics_port(service: ServiceSpec, port: int | None) -> None:
    """Refuse a metrics port the router or a local replica needs: bound first by the watcher, it
    kept nginx from ever starting (the replicas launched, nothing routed to them), or made a
    replica's launch fail ("port in use")."""
    if port is None:
        return
    from skyhedge.controller.metrics import local_port_conflict, router_port_conflict

    taken = router_port_conflict(service, port)
    if taken is not None:
        raise click.UsageError(taken[1])
    conflict = local_port_conflict(service, port)
    if conflict is not None:
        raise click.UsageError(conflict)


@contextlib.contextmanager
def _metrics(host: str, port: int | None) -> Iterator[Any]:
    """Listen for the watcher's metrics while it runs (None without --metrics-port).

    Entered before the `Watcher`: a port that cannot be listened on is refused before the
    watcher takes the lock and builds its event sources, which made the state dir (`local/`
    beside the lock file), so a refused first run left a directory behind (docs/terraform.md:
    a writer refused before it writes anything removes the state dir it made)."""
    if port is None:
        yield None
        return
    from skyhedge.controller.metrics import Metrics, MetricsServer

    server = MetricsServer(Metrics(), host=host, port=port)
    try:
        yield server
    finally:
        server.close()


def _serve_metrics(server: Any, watcher: Any, port: int | None, log_format: str) -> None:
    """Feed the listening `server` (`_metrics`) from the watcher's passes, and say where."""
    if server is None:
        return
    server.metrics.watch(watcher.controller, lambda: watcher.last_reload_outcome)
    watcher.metrics_url = server.address  # `status` shows it
    watcher.metrics_port = port  # a reloaded spec moving local replicas onto it is refused
    _say(f"metrics at {server.address}", log_format)


_log_format = click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one JSON object per line (time, level, logger, message, service, and replica_id, "
    "zone, market on a line about one replica) for a log pipeline; the watcher's own notices go "
    "through the log too.",
)


#: Fields a record may carry (`logging`'s `extra`, set by `Controller.note`) that a JSON line
#: gives as its own, for a log pipeline to filter on without parsing `message`.
JSON_LOG_FIELDS = ("service", "replica_id", "zone", "market")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record: `time` (UTC, ISO 8601, ms), `level`, `logger`, `message`,
    `service` (the record's, else `service`: a watcher's lines are all about its one service),
    `replica_id`, `zone` and `market` when the line is about one replica (`Controller.note`), and
    `exception` when there is one. `message` is the text format's, service prefix included, so
    that both formats say the same. Newlines stay escaped inside the object: one record, one line."""

    def __init__(self, service: str | None = None) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.service is not None:
            out["service"] = self.service
        for key in JSON_LOG_FIELDS:
            value = getattr(record, key, None)
            if isinstance(value, str):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def _last_words(text: str, log_format: str, level: int = logging.INFO, *, service: str | None = None) -> None:
    """What the command leaves behind, said once its log is closed: a line on stdout, or with
    `--log-format json` one more JSON record on stderr, after the log's own (under systemd or
    docker both streams reach the pipeline, which met this one line that was not JSON), with the
    `service` field the log's lines have."""
    if log_format == "json":
        record = logging.LogRecord("skyhedge", level, __file__, 0, "%s", (text,), None)
        echo(JsonLogFormatter(service).format(record), err=True)
    else:
        console.print(text, markup=False, highlight=False)  # paths and names are data


def _say(text: str, log_format: str) -> None:
    """A notice for the operator: plain on stderr, or a log record when logs are JSON (a log
    pipeline must not meet a line that is not JSON)."""
    if log_format == "json":
        logging.getLogger("skyhedge").info("%s", text)
    else:
        err_console.print(text, markup=False)  # paths and names are data: `[prod]` stays


#: `up`'s log file under the dashboard (`<state dir>/watch.log`) is rotated past this size, to
#: `watch.log.1` (one old generation): `up` left running for weeks appended to it without end.
LOG_FILE_MAX_BYTES = 16 * 2**20


class _LogFile(logging.handlers.RotatingFileHandler):
    """`up`'s log file under the dashboard. A line it cannot write (a full disk, a quota, an I/O
    error) is said in one line on stderr, once until a line is written again: logging's own
    `handleError` printed a 50-line "--- Logging error ---" traceback into the dashboard for
    every line the watcher logged (measured with the state dir on a full file system)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, maxBytes=LOG_FILE_MAX_BYTES, backupCount=1)
        self._failing = False  # said; silent until a line is written again
        self._failed = False  # the line being written failed

    def emit(self, record: logging.LogRecord) -> None:
        self._failed = False
        super().emit(record)  # (calls handleError on a failure)
        if not self._failed:
            self._failing = False

    def close(self) -> None:
        """Closed on the way out: lines still buffered that cannot be written either (said
        already) are dropped, not an OSError traceback as `up` exits."""
        with contextlib.suppress(OSError):
            super().close()

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        self._failed = True
        if self._failing:
            return
        self._failing = True
        exc = sys.exc_info()[1]
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(
                f"warning: {self.baseFilename}: cannot write the watcher's log ({reason}); "
                "its lines are lost until it can\n"
            )


@contextlib.contextmanager
def _logging(
    level: str, path: Path | None = None, log_format: str = "text", *, service: str | None = None
) -> Iterator[None]:
    """Log skyhedge's lines to stderr (or a file, under the dashboard) while the command runs;
    `service`: the JSON lines' `service` field (`JsonLogFormatter`)."""
    try:
        handler: logging.Handler = _LogFile(path) if path else logging.StreamHandler(sys.stderr)
    except OSError as exc:  # a state dir that takes no new file (read-only, immutable)
        raise StateError(f"{path}: cannot write the watcher's log ({exc.strerror or exc})") from exc
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter(service))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("skyhedge")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()


def _load(spec: Path, state_dir: Path | None, *, launches: bool = True) -> tuple[ServiceSpec, Path]:
    service = load_spec(spec, launches=launches)
    return service, state_dir or default_state_dir(service.name)


@main.command()
@spec_argument
@state_dir_option
@click.option(
    "--gitops",
    "gitops",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="REPO_DIR",
    help="Write the re-rendered tree into this git working copy and commit it "
    "instead of applying (CI applies).",
)
@click.option(
    "--gitops-path",
    default=None,
    metavar="SUBDIR",
    help="Folder of REPO_DIR the tree is written to (default: infra).",
)
@click.option("--once", is_flag=True, help="Run one reconcile pass and exit.")
@_interval
@_terraform_bin
@_policy
@_no_spec_reload
@click.option("--no-routing", is_flag=True, help="Do not manage the nginx router.")
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning"]), default="info", show_default=True
)
@_metrics_port
@_metrics_host
@_log_format
def watch(
    spec: Path,
    state_dir: Path | None,
    gitops: Path | None,
    gitops_path: str | None,
    once: bool,
    interval: float,
    terraform_bin: str | None,
    policy: str | None,
    no_spec_reload: bool,
    no_routing: bool,
    log_level: str,
    metrics_port: int | None,
    metrics_host: str,
    log_format: str,
) -> None:
    """Keep SPEC's service up on spot capacity: react to preemptions, re-plan, apply, route."""
    from skyhedge.controller.runner import Watcher

    _check_metrics_flags(metrics_port)
    _check_gitops_flags(gitops, gitops_path)
    service, sdir = _load(spec, state_dir)
    _check_policy(service, policy)
    _check_metrics_port(service, metrics_port)
    options = ControllerOptions(interval=interval, policy=policy)
    interrupted = False
    try:
        with (
            _logging(log_level, log_format=log_format, service=service.name),
            _metrics(metrics_host, metrics_port) as metrics_server,
            Watcher(
                service,
                sdir,
                options=options,
                gitops=gitops,
                gitops_subdir=gitops_path,
                terraform_bin=terraform_bin,
                route=not no_routing,
                spec_path=spec,
                reload_on_change=not no_spec_reload,
                reload_on_request=not no_spec_reload,
            ) as watcher,
        ):
            _serve_metrics(metrics_server, watcher, metrics_port, log_format)
            mode = f"gitops into {gitops}" if gitops else "applying with Terraform"
            # `--once` is one pass and done: nothing to stop (the line read as a watcher left running)
            stop = "" if once else "; Ctrl-C stops the watcher (the service keeps running)"
            _say(f"watching {service.name} ({mode}); state in {sdir}{stop}", log_format)
            watcher.run(once=once)
    except KeyboardInterrupt:  # a second Ctrl-C: the pass in progress, or the watcher's shutdown
        interrupted = True  # after it (as for `up`: a double tap lands there), was cut short
    if interrupted:
        _last_words(
            "watcher interrupted by a second Ctrl-C (its pass cut short); the service keeps what "
            f"was last applied, and `{command_line('watch', spec, state_dir)}` resumes.",
            log_format,
            logging.WARNING,
            service=service.name,
        )
        raise SystemExit(130)


@main.command()
@spec_argument
@state_dir_option
@click.option(
    "--market-trace",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    metavar="DIR",
    help="Drive the local zones' spot capacity from a real trace (../shared/traces format).",
)
@click.option(
    "--speedup",
    type=FiniteFloat(min=0.001),
    default=60.0,
    show_default=True,
    help="Trace seconds per real second.",
)
@click.option(
    "--market-start",
    type=TraceTime(),
    default=None,
    metavar="TIME",
    help="Start the replay this far into the trace: seconds, or 90m, 12h, 2d (default: its start).",
)
@click.option(
    "--market-instance-type",
    default=None,
    metavar="TYPE",
    help="Replay this instance type's files of a trace directory holding several per zone (v100_1).",
)
@click.option("--no-dashboard", is_flag=True, help="Log lines instead of the live dashboard.")
@click.option("--down-on-exit", is_flag=True, help="Destroy the replicas and the router when stopped.")
@_interval
@_terraform_bin
@_policy
@_no_spec_reload
@_metrics_port
@_metrics_host
@_log_format
def up(
    spec: Path,
    state_dir: Path | None,
    market_trace: Path | None,
    speedup: float,
    market_start: float | None,
    market_instance_type: str | None,
    no_dashboard: bool,
    down_on_exit: bool,
    interval: float,
    terraform_bin: str | None,
    policy: str | None,
    no_spec_reload: bool,
    metrics_port: int | None,
    metrics_host: str,
    log_format: str,
) -> None:
    """Apply SPEC, bring routing up and watch it, with a live dashboard (= apply + routing + watch)."""
    from skyhedge.controller.runner import Watcher

    if market_trace is None and _given("speedup"):
        raise click.UsageError("--speedup paces a --market-trace replay; give one, or drop --speedup")
    if market_trace is None and market_instance_type is not None:
        raise click.UsageError(
            "--market-instance-type picks a --market-trace's files; give one, or drop --market-instance-type"
        )
    if market_trace is None and market_start is not None:
        raise click.UsageError(
            "--market-start places a --market-trace replay; give one, or drop --market-start"
        )
    _check_metrics_flags(metrics_port)
    service, sdir = _load(spec, state_dir)
    _check_policy(service, policy)
    _check_metrics_port(service, metrics_port)
    replay = None
    if market_trace is not None:
        # read and checked before anything is written or started: a bad trace or start is one
        # line, with no state dir left behind
        from skyhedge.controller.market import MarketReplay
        from skyhedge.simulator.traces import TICK_SECONDS

        replay = MarketReplay(
            market_trace,
            resolve_placement(service, policy).zones("local", spot=True),
            sdir,
            speedup=speedup,
            start_tick=int((market_start or 0.0) // TICK_SECONDS),
            instance_type=market_instance_type,
        )
    # a live dashboard needs a terminal; in a pipe, a file or a service manager, log lines instead
    no_dashboard = no_dashboard or not console.is_terminal
    log_file = sdir / "watch.log"
    if not no_dashboard:  # the log goes to a file from the first line (otherwise the lock makes the dir,
        try:  # and removes a new one again if the run is refused before it writes anything)
            sdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise unwritable(sdir, exc) from exc
    options = ControllerOptions(interval=interval, policy=policy, busy_interval=0.5)
    # the last words: with the dashboard the log went to a file and they are for the terminal
    said = log_format if no_dashboard else "text"
    try:
        with (
            _logging("info", None if no_dashboard else log_file, log_format, service=service.name),
            _metrics(metrics_host, metrics_port) as metrics_server,
            Watcher(
                service,
                sdir,
                options=options,
                terraform_bin=terraform_bin,
                spec_path=spec,
                reload_on_change=not no_spec_reload,
                reload_on_request=not no_spec_reload,
                # under the dashboard a hangup is the terminal going away: stop (SIGHUP's default)
                reload_on_hangup=no_dashboard,
            ) as watcher,
        ):
            _serve_metrics(metrics_server, watcher, metrics_port, log_format)
            ctl = watcher.controller
            assert ctl is not None
            if replay is not None:
                from skyhedge.clouds.local import capacity, runtime_dir

                try:
                    _drive(replay, watcher)
                except capacity.CapacityFileError as exc:  # (as `preempt` says it: one line)
                    raise StateError(str(exc)) from exc
                except OSError as exc:
                    raise StateError(
                        f"{runtime_dir(sdir)}: cannot record the market replay ({exc.strerror or exc})"
                    ) from exc
            try:
                if no_dashboard:
                    _say(
                        f"{service.name}: serving at {service.service.url} once replicas are READY; "
                        "Ctrl-C stops",
                        log_format,
                    )
                    watcher.run()
                else:
                    from skyhedge.controller.dashboard import Dashboard

                    with Dashboard(ctl, console=console):
                        watcher.run()
            finally:
                if replay is not None:
                    replay.stop()
    except KeyboardInterrupt:  # a second Ctrl-C: the pass in progress was cut short
        _interrupted(service, sdir, spec, state_dir, down_on_exit=down_on_exit, log_format=said)
    if down_on_exit:
        from skyhedge.apply import destroy_service

        _last_words("destroying the replicas and the router (--down-on-exit)", said, service=service.name)
        try:
            with sigterm_as_interrupt():  # a SIGTERM stops Terraform gracefully, as a Ctrl-C does
                report = destroy_service(watcher.spec, sdir, terraform_bin=terraform_bin)  # as last reloaded
        except KeyboardInterrupt as exc:
            finish = f"{command_line('destroy', spec, state_dir)} --auto-approve"
            by, code = interrupted_by(exc)
            _last_words(
                f"destroy interrupted by {by}; `{finish}` finishes it.",
                said,
                logging.WARNING,
                service=service.name,
            )
            raise SystemExit(code) from None
        _down_reported(report, spec, sdir, state_dir, said, service=service.name)
    else:
        ctl = watcher.controller
        assert ctl is not None
        log_note = "" if no_dashboard else f" Log: {log_file}"  # without the dashboard it went to stderr
        text = stopped_message(watcher.spec, ctl.state, spec, state_dir) + log_note
        _last_words(text, said, service=service.name)


def _down_reported(
    report: Any,
    spec: Path,
    sdir: Path,
    state_dir: Path | None,
    log_format: str,
    *,
    service: str | None = None,
) -> None:
    """Say what `--down-on-exit`'s destroy did (`apply.DestroyReport`). One that failed is the
    command's error, naming what still runs and the command that finishes it: it used to say
    "destroyed 0 replica(s) and the router" and exit 0, the router still serving and the replicas
    running (found by a soak audit: `terraform init` refused a moved state dir's backend; on a
    cloud, a root whose destroy failed bills on). The destroy's warnings (instances left running,
    on AWS and GCP) are said as `destroy` says them."""
    from skyhedge.errors import EngineError
    from skyhedge.routing.router import running_router_pid

    for line in report.warnings:
        _last_words(f"warning: {line}", log_format, logging.WARNING, service=service)
    if not report.errors:
        _last_words(
            f"destroyed {len(report.destroyed)} replica(s) and the router", log_format, service=service
        )
        return
    if report.destroyed:
        gone = ", ".join(sorted(report.destroyed, key=replica_order))
        text = f"destroyed {len(report.destroyed)} replica(s): {gone}"
        _last_words(text, log_format, logging.WARNING, service=service)
    first = report.errors[0]
    more = f" (and {len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
    left = "the replicas not destroyed"
    if running_router_pid(sdir) is not None:  # (a root that failed to initialise: before the router)
        left = f"the router and {left}"
    finish = f"{command_line('destroy', spec, state_dir)} --auto-approve"
    raise EngineError(
        f"--down-on-exit: {first}{more}; {left} still run: `{finish}` finishes it",
        stderr=getattr(first, "stderr", ""),
    )


def _drive(replay: Any, watcher: Any) -> None:
    """Start `replay` on the watcher's controller: its changes logged once through the
    controller's notes, the policy on trace time, and the driven zones following spec reloads."""
    ctl = watcher.controller
    replay.on_change = ctl.note  # the controller's note logs each change, once
    replay.remap(ctl.placement.zones("local", spot=True))  # (the same zones: a no-op)
    ctl.note(replay.describe())
    replay.attach(ctl)  # the policy decides on trace time

    def follow(_spec: ServiceSpec, placement: Placement) -> None:
        if replay.remap(placement.zones("local", spot=True)):
            ctl.note(replay.describe())  # the new mapping, as at start

    watcher.on_reload(follow)
    replay.start()


def _interrupted(
    service: ServiceSpec,
    sdir: Path,
    spec: Path,
    state_dir: Path | None,
    *,
    down_on_exit: bool = False,
    log_format: str = "text",
) -> None:
    """A second Ctrl-C stops the watcher at once, mid-pass (safe: see "Restart safety" in
    docs/controller.md): say so, and what the state last saved leaves behind, instead of
    click's bare "Aborted!"; exit 130, as a shell reports a Ctrl-C'd command."""
    try:
        state = load_state(sdir, service.name)
    except StateError:  # unreadable: say what can be said without it
        state = ServiceState(service=service.name)
    how = "watcher interrupted by a second Ctrl-C (its pass cut short)"
    text = stopped_message(service, state, spec, state_dir, how=how)
    if down_on_exit:
        text += " --down-on-exit was skipped."
    _last_words(text, log_format, logging.WARNING, service=service.name)
    raise SystemExit(130)


def _routed_ids(state: ServiceState) -> set[str]:
    """The replicas nginx was last given: the watcher's record, else the router's (an `apply`)."""
    if state.extra.get("routed") is not None:  # (a hand edit's pairs that are none: none routed)
        return {str(pair[0]) for pair in routed_pairs(state)}
    return {str(u.get("id")) for u in (state.router or {}).get("upstreams") or []}


def stopped_message(
    service: ServiceSpec,
    state: ServiceState,
    spec: Path,
    state_dir: Path | None,
    *,
    how: str = "watcher stopped",
) -> str:
    """What `up` leaves behind when its watcher stops, and the commands that finish or remove it.

    "keeps serving" only when the router has an upstream: a Ctrl-C during the first apply leaves
    replicas that are not ready and a router answering 503, and saying "serving" then sent the
    operator away from a service that was not.
    """
    live = {r.id for r in state.live()}
    routed = _routed_ids(state) & live
    unrouted = len(live - routed)
    destroy = command_line("destroy", spec, state_dir)
    finish = command_line("up", spec, state_dir)
    url = service.service.url
    if routed:
        rest = f", {unrouted} not routed yet" if unrouted else ""
        return (
            f"{how}; {service.name} keeps serving at {url} with {len(routed)} routed "
            f"replica(s){rest} (`{destroy}` removes it)."
        )
    if unrouted:
        # a replica Terraform never created (the apply failed before it: an unreadable Terraform
        # CLI config, a refused launch) is not "starting": no process or machine is there to wait for
        created = sum(1 for r in state.live() if r.id not in routed and r.provisioned_at is not None)
        if not created:
            return (
                f"{how}; {unrouted} replica(s) of {service.name} planned, none launched, none routed "
                f"({url} answers 503): `{finish}` launches them, `{destroy}` removes the rest."
            )
        rest = f" ({unrouted - created} more planned, not launched)" if created < unrouted else ""
        return (
            f"{how}; {created} replica(s) of {service.name} left starting{rest}, none routed "
            f"({url} answers 503): `{finish}` finishes them, `{destroy}` removes them."
        )
    return (
        f"{how}; {service.name} has no replica running: `{finish}` starts it again, "
        f"`{destroy}` removes the router."
    )


@main.command("reload")
@spec_argument
@state_dir_option
@click.option(
    "--timeout",
    type=FiniteFloat(min=0, min_open=True, max=86400),
    default=120.0,
    show_default=True,
    help="Seconds to wait for the watcher's answer (it re-reads the spec before its next pass).",
)
def reload_cmd(spec: Path, state_dir: Path | None, timeout: float) -> None:
    """Make the running watcher of SPEC re-read it now, and say what it did with it."""
    from skyhedge.controller import presence

    try:
        service, sdir = _load(spec, state_dir)
    except SpecError as exc:  # refused here already, without asking the watcher: said the same way
        raise SpecError(f"spec reload refused: {exc}") from exc
    record = presence.read(sdir)
    if record is None and state_dir is None:
        # the spec may rename the service: its watcher runs under the old name's state dir
        # (and will refuse the rename, which is the answer to give)
        for other in sorted(sdir.parent.glob("*/" + presence.WATCHER_FILE)):
            found = presence.read(other.parent)
            if found is not None and _same_file(found.spec, spec):
                record, sdir = found, other.parent
                break
    if record is None:
        raise StateError(
            f"no watcher is running for {service.name} (state dir {sdir}): "
            f"`{command_line('watch', spec, state_dir)}` starts one"
        )
    if not _same_file(record.spec, spec):
        raise StateError(
            f"the watcher of {service.name} (pid {record.pid}) reads {record.spec}, not {spec}: "
            "edit that file, or restart the watcher on this one"
        )
    if not record.hears_requests:
        raise StateError(
            f"the watcher of {service.name} (pid {record.pid}) does not re-read its spec on request "
            f"(spec reloads: {record.reload}): restart it"
        )
    if not presence.verified(record):  # SIGUSR1 kills a process that does not handle it
        raise StateError(
            f"cannot tell whether pid {record.pid} is still the watcher of {service.name} "
            "(its start time is unknown): not signalling it"
        )
    answered = int((record.last_reload or {}).get("requests", 0))
    try:
        os.kill(record.pid, signal.SIGUSR1)
    except OSError as exc:
        raise StateError(f"cannot signal the watcher (pid {record.pid}): {exc.strerror or exc}") from exc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = presence.read(sdir)
        if now is None or now.pid != record.pid:
            raise StateError(f"the watcher of {service.name} (pid {record.pid}) stopped before it answered")
        last = now.last_reload or {}
        if int(last.get("requests", 0)) > answered and last.get("outcome"):  # this request's answer
            if last["outcome"] in ("refused", "failed"):
                raise SpecError(str(last.get("text", "refused")))
            console.print(str(last.get("text", "")), markup=False, highlight=False)
            return
    raise StateError(
        f"the watcher of {service.name} (pid {record.pid}) has not answered within {timeout:g}s: it "
        "re-reads the spec before its next pass, which a long apply delays; its log says when it does"
    )


def _same_file(recorded: str, given: Path) -> bool:
    """Whether `given` names the file the watcher re-reads (symlinks followed now, not when
    recorded: a `current/` link that moved still names it)."""
    try:
        return os.path.samefile(recorded, given)
    except OSError:
        return os.path.abspath(recorded) == os.path.abspath(given)


@main.command()
@spec_argument
@state_dir_option
@click.option("--zone", required=True, help="The local zone to take capacity from.")
@click.option(
    "--for",
    "seconds",
    type=FiniteFloat(min=0, min_open=True, max=366 * 86400),  # a year: longer is a typo
    default=None,
    help="Give the capacity back after this many seconds (default: until --clear).",
)
@click.option("--clear", is_flag=True, help="Give the zone its capacity back now instead.")
def preempt(spec: Path, state_dir: Path | None, zone: str, seconds: float | None, clear: bool) -> None:
    """Local chaos: mark a local zone out of spot capacity and kill its spot replicas."""
    from skyhedge.clouds.local import capacity, runtime_dir
    from skyhedge.clouds.local.events import preempt_zone

    if clear and seconds is not None:
        raise click.UsageError("--clear gives the capacity back now; it takes no --for")
    service, sdir = _load(spec, state_dir, launches=False)
    # a --state-dir of another service (a pasted path): its replicas are not this spec's to kill
    load_state(sdir, service.name)
    zones = sorted(resolve_placement(service).zones("local"))
    if zone not in zones:
        raise SpecError(
            f"--zone {zone!r} is not a local zone of this service (its local zones: "
            f"{', '.join(zones) or 'none'})",
            file=service.source,
        )
    try:
        if clear:
            capacity.clear(runtime_dir(sdir), zone)
            console.print(f"{zone}: capacity restored", markup=False)
            return
        killed = preempt_zone(sdir, zone, seconds=seconds)
    except capacity.CapacityFileError as exc:
        raise StateError(str(exc)) from exc
    except OSError as exc:
        raise StateError(f"{runtime_dir(sdir)}: cannot write ({exc.strerror or exc})") from exc
    until = f"for {seconds:g}s" if seconds else "until `--clear`"
    who = (
        f"preempted {', '.join(f'{p.id} (pid {p.pid})' for p in killed)}"
        if killed
        else "no running spot replica there to preempt"
    )
    console.print(f"{zone}: out of spot capacity {until}; {who} at {time.strftime('%H:%M:%S')}", markup=False)
    if not (sdir / STATE_FILE).exists():  # chaos before a deployment is allowed, but say what it does
        err_console.print(
            f"note: no service is deployed under {sdir} yet: its next deployment starts with {zone} out "
            f"of spot capacity {until}",
            markup=False,
        )


@main.group()
def aws() -> None:
    """AWS helpers."""


@aws.command("setup-events")
@spec_argument
def setup_events_cmd(spec: Path) -> None:
    """Create (or update) the EventBridge rules and SQS queue that carry EC2 interruption events."""
    from skyhedge.clouds.aws.events import default_queue_name
    from skyhedge.clouds.aws.setup import setup_events

    service = load_spec(spec)
    regions = sorted(
        {c.location.region for c in resolve_placement(service).locations if c.location.cloud == "aws"}
    )
    if not regions:
        raise SpecError(
            "the service uses no AWS region (placement.clouds has no aws)",
            file=service.source,
            path="placement.clouds",
        )
    queue = service.aws.events_queue or default_queue_name(service.name)
    done = setup_events(service.name, regions, queue_name=queue)
    for r in done:
        console.print(
            f"{r.region}: queue {r.queue_url}; rules {', '.join(a.rsplit('/', 1)[-1] for a in r.rule_arns)}",
            markup=False,
        )
    if not service.aws.events_queue:
        tip = f"tip: set aws.events_queue: {queue} in {spec} to name the queue explicitly"
        console.print(f"[dim]{escape(tip)}[/]")
