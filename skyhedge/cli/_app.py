"""The root click group and the one place where skyhedge errors become one line and exit 1."""

from __future__ import annotations

import importlib
import io
import math
import os
import select
import shlex
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from skyhedge import __version__
from skyhedge.errors import (
    EngineError,
    LockHeld,
    PolicyError,
    RoutingError,
    SkyhedgeError,
    escape_controls_in_lines,
)

F = TypeVar("F", bound=Callable[..., Any])

#: Width of tables written to a pipe or file, where rich would assume 80 columns and cut cells
#: ("g6.xlar…"): wide enough for every table skyhedge prints; tables only take what they need.
PIPE_WIDTH = 240


class _Console(Console):
    """rich's console, but a reader gone (`skyhedge catalog show | head -1`) only silences it:
    the command goes on to its own end and exit status. rich's own choice, SystemExit(1) at that
    print, cut `apply` and `watch` short wherever they next printed (between two rounds, or two
    steps of a rolling update), and failed `catalog show | head -1` under `set -o pipefail`;
    exit 0 there instead told CI that an apply cut short had finished, and `plan
    --detailed-exitcode` that nothing changed."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        _to_devnull(self.file)

    def print(self, *objects: Any, soft_wrap: bool | None = None, **kwargs: Any) -> None:
        """As rich prints, but off a terminal a message (text, not a table) is one line however
        long: a log file, a pipe or a CI log met `up`'s last words, the `skyhedge destroy ...
        --auto-approve` to paste, cut in two at 240 columns (at 80 under COLUMNS=80), where a
        line-oriented reader (grep, a log pipeline, a test) saw half a command per line."""
        if soft_wrap is None and not self.is_terminal and all(isinstance(o, str) for o in objects):
            soft_wrap = True
        super().print(*objects, soft_wrap=soft_wrap, **kwargs)


def _console(*, stderr: bool = False) -> Console:
    """A rich console; off a terminal (and without COLUMNS set) as wide as PIPE_WIDTH."""
    probe = _Console(stderr=stderr)
    if probe.is_terminal or "COLUMNS" in os.environ:
        return probe
    return _Console(stderr=stderr, width=PIPE_WIDTH)


console = _console()
err_console = _console(stderr=True)


def fitted(table: Table, target: Console | None = None) -> Table:
    """`table` as drawn on `target` (default: `console`): where its natural width exceeds the
    console's (an 80-column terminal, `COLUMNS=80` in CI), without its frame and with one space
    less per column, which gives back a dozen columns before rich starts cutting cells to `…`
    (a `simulate` table at 120 columns showed no figure at all). Tables mark their figures
    `no_wrap` and let names fold; where even that is too wide, the figures fold over lines too."""
    out = target or console
    if Measurement.get(out, out.options.update_width(10**6), table).maximum <= out.width:
        return table
    table.box = box.SIMPLE_HEAD
    table.show_edge = False
    table.pad_edge = False
    table.collapse_padding = True
    if _cuts_figures(table, out):
        # the names folded as far as they go, the figures still do not fit (`simulate --latency
        # --prices` at 80 or 100 columns): fold them too, over lines, rather than let rich cut
        # every one to "…" ("100.…") and drop a column it squeezed to nothing
        for column in table.columns:
            column.no_wrap, column.overflow = False, "fold"
    return table


def _cuts_figures(table: Table, out: Console) -> bool:
    """Whether `table` drawn at `out`'s width shows a cell of a `no_wrap` column not whole."""
    probe = Console(width=out.width, file=io.StringIO(), no_color=True, force_terminal=False)
    with probe.capture() as drawn:
        probe.print(table)
    lines = drawn.get().splitlines()
    for column in table.columns:
        if not column.no_wrap:
            continue
        for cell in column.cells:
            text = cell.plain if isinstance(cell, Text) else probe.render_str(str(cell)).plain
            if text.strip() and not any(text.strip() in line for line in lines):
                return True
    return False


# click >= 8.2 shows a bare group's help by raising this usage error; 8.1 never raises it.
_NO_ARGS_IS_HELP: tuple[type[BaseException], ...] = tuple(
    getattr(click.exceptions, name) for name in ("NoArgsIsHelpError",) if hasattr(click.exceptions, name)
)


class SkyhedgeGroup(click.Group):
    """Turns `SkyhedgeError` and usage errors into `error: <one line>` on stderr and exit code 1.

    Click prints a usage error as a usage block, a hint and the message, and exits 2; skyhedge
    keeps 2 for `plan --detailed-exitcode`'s "changes present" (as Terraform does), so a wrong flag
    is exit 1 like any other bad input, on one line a CI log shows whole.
    """

    group_class = type  # subgroups (`catalog`, `routing`, `aws`) are SkyhedgeGroups too

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: command name -> module that registers it when imported: a heavy command (`simulate`
        #: imports numpy) is imported only when run or listed, so every other command starts
        #: fast, and a Ctrl-C at start-up does not print numpy's import traceback.
        self.lazy_commands: dict[str, str] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = self.lazy_commands.get(cmd_name)
        if module is not None and cmd_name not in self.commands:
            importlib.import_module(module)  # registers itself on this group (`@main.command()`)
        return super().get_command(ctx, cmd_name)

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except KeyboardInterrupt as exc:  # while parsing (or `--version`, `--help`): not click's
            self.interrupted(exc, _subcommand_path(parent, info_name) if parent is not None else "")
        except click.UsageError as exc:
            if isinstance(exc, _NO_ARGS_IS_HELP):  # bare `skyhedge` (or `skyhedge catalog`): help,
                _show_help(exc)  # and exit 0, not click's 2 (`plan --detailed-exitcode`'s)
            report_usage_error(exc, parent.command_path if parent is not None else "skyhedge")
            sys.exit(1)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return self._invoke(ctx)
        except BrokenPipeError:
            if not stdout_reader_gone():
                raise  # a socket's, a child's pipe: a failure like any other
            # click.echo's output (`--json`) meeting a reader gone (`| head`): click made it exit
            # 1, once the output outgrew the pipe's buffer; as `head`'s writer, stop quietly
            stop_quietly()
        finally:
            # here, not at exit (click: exit 1): the exit status stays the command's own
            # (`plan --detailed-exitcode --json | head -c1` still exits 2)
            try:
                sys.stdout.flush()
            except BrokenPipeError:
                _to_devnull(sys.stdout)

    def _invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SkyhedgeError as exc:
            report_error(_naming_the_holder(exc))
            sys.exit(1)
        except FileNotFoundError:
            if cwd_exists():
                raise
            report_error(SkyhedgeError(CWD_GONE))
            sys.exit(1)
        except click.UsageError as exc:
            if isinstance(exc, _NO_ARGS_IS_HELP):
                _show_help(exc)
            report_usage_error(exc, " ".join(filter(None, (ctx.command_path, ctx.invoked_subcommand))))
            sys.exit(1)
        except KeyboardInterrupt as exc:
            # click's answer is a bare "Aborted!" and exit 1, the status of a failed command: a
            # Ctrl-C'd `render`, `plan` or `simulate` says so in one line and exits as a shell
            # reports a Ctrl-C'd (130) or SIGTERM'd (143) command (`apply`, `destroy` and the
            # watcher say more, and exit the same way, before it gets here)
            self.interrupted(exc, _subcommand_path(ctx))

    @staticmethod
    def interrupted(exc: KeyboardInterrupt, command: str = "") -> NoReturn:
        """`error: COMMAND interrupted by Ctrl-C` (or SIGTERM) on stderr, and the exit status a
        shell gives a command stopped so (130, 143): a script tells "interrupted" from "failed"
        (1) and from `plan --detailed-exitcode`'s "changes" (2)."""
        by, code = interrupted_by(exc)
        echo(f"error: {command or 'skyhedge'} interrupted by {by}", err=True)
        sys.exit(code)


def _subcommand_path(ctx: click.Context, name: str | None = None) -> str:
    """The command `ctx` runs (or `name`, the one it is making a context for), below the root
    (`render`, `routing up`): the root's own name is `skyhedge`, or `python -m skyhedge` when
    run that way."""
    names = [name or ctx.invoked_subcommand or ""]
    while ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(reversed([name for name in names if name]))


def stop_quietly() -> NoReturn:
    """End the command, exit 0, after stdout's reader went away (`skyhedge ... | head`)."""
    # stdout onto /dev/null first: the interpreter's last flush at exit would hit the pipe again
    _to_devnull(sys.stdout)
    sys.exit(0)


def echo(text: str, *, err: bool = False) -> None:
    """`click.echo(text)` (to stderr with `err`), but a reader gone (`plan --json | head -c1`,
    `apply ... 2>&1 | head -1`) only silences the stream, as it does the consoles: the command
    goes on and keeps its own exit status (2 for `plan --detailed-exitcode`'s changes, 1 for an
    error it goes on to report), not the 0 of a command stopped at that write."""
    stream = sys.stderr if err else sys.stdout
    if err:  # messages, which quote what clouds and replicas said: no terminal escapes in them
        text = escape_controls_in_lines(text)
    try:
        click.echo(text, err=err)
    except BrokenPipeError:
        if not _reader_gone(stream):
            raise
        _to_devnull(stream)


def _to_devnull(stream: Any) -> None:
    """Point `stream`'s file descriptor at /dev/null: what is still buffered for a reader gone
    (and any later write) goes nowhere instead of failing again."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (tests)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def stdout_reader_gone() -> bool:
    """The pipe or terminal stdout writes to has no reader any more (`| head` exited): what
    tells a broken pipe of stdout's from another one (a socket, a child's pipe)."""
    return _reader_gone(sys.stdout)


def _reader_gone(stream: Any) -> bool:
    try:
        poll = select.poll()
        poll.register(stream.fileno(), 0)  # errors and hang-ups only, reported whatever is asked
        return any(events & (select.POLLERR | select.POLLHUP) for _fd, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # not a real file (tests), or no poll here
        return False


#: Why a command run from a directory deleted under the shell stops (one line, not a traceback).
CWD_GONE = (
    "the current directory no longer exists (deleted or replaced while this shell was in it): "
    "skyhedge resolves relative paths and starts local replicas there; cd to an existing "
    "directory and run the command again"
)


def cwd_exists() -> bool:
    """Whether the process's current directory still exists: `os.getcwd()` (and so
    `Path.cwd()` and every relative `Path.resolve()`) raises FileNotFoundError once it is
    deleted, which surfaced as a bare traceback from `status`, `apply`, `destroy` and `render`."""
    try:
        os.getcwd()
    except FileNotFoundError:
        return False
    return True


class Terminated(KeyboardInterrupt):
    """A SIGTERM taken as a Ctrl-C: the same graceful stop, told apart in what is said."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within: a SIGTERM (a CI job cancelled, `timeout`, systemd stopping a unit) stops as a Ctrl-C
    does. Ctrl-C reaches Terraform too (the terminal signals the whole process group), which then
    finishes the operations in flight and writes its state; a SIGTERM reaches skyhedge alone, which
    died at once while Terraform went on unseen, as an orphan. So pass it on to the running
    Terraform processes as SIGINT (unless it reached them too: `timeout` and CI runners signal
    the whole process group, systemd the whole cgroup), then raise `Terminated` (a
    KeyboardInterrupt) here, as the Ctrl-C a terminal would have sent. A second SIGTERM changes
    nothing: the stop is on its way (Terraform takes a second interrupt as "exit now")."""
    import signal

    from skyhedge.engine import INTERRUPT_GRACE_SECONDS, interrupt_running

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen = {"n": 0}

    def on_sigterm(signum: int, frame: object) -> None:
        seen["n"] += 1
        if seen["n"] > 1:
            return  # passed on once: a second interrupt makes Terraform exit at once, state unwritten
        # not to a Terraform the SIGTERM reached too (a process group's or cgroup's), for the same reason
        interrupt_running(grace=INTERRUPT_GRACE_SECONDS)
        raise Terminated

    old = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def interrupted_by(exc: KeyboardInterrupt) -> tuple[str, int]:
    """What stopped a command, as said in its one line, and the exit code a shell reports for it."""
    return ("SIGTERM", 143) if isinstance(exc, Terminated) else ("Ctrl-C", 130)


def _show_help(exc: click.UsageError) -> NoReturn:
    if exc.ctx is not None:
        click.echo(exc.ctx.get_help())
    sys.exit(0)


def report_usage_error(exc: click.UsageError, command_path: str) -> None:
    """`error: <click's message> (see 'skyhedge CMD --help')`, on one line; `command_path` names
    the command when click could not build its context (an option missing its value)."""
    message = " ".join(exc.format_message().split())
    where = exc.ctx.command_path if exc.ctx is not None else command_path
    echo(f"error: {message} (see '{where} --help')", err=True)


class FiniteFloat(click.FloatRange):
    """A `click.FloatRange` that also refuses nan and inf: `nan < 0` is false, so a plain range
    lets `--cold-start nan` through to fail deep inside with a traceback."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):  # before the range: "inf is not in 0<=x<=86400" hides why
            self.fail(f"expected a finite number, got {value!r}", param, ctx)
        return super().convert(number, param, ctx)


@contextmanager
def blamed_on(flag: str) -> Iterator[None]:
    """An error of what a flag's value named (a policy that does not exist or does not load)
    names the flag, as spec errors name the field. PolicyError only: a copy of another error
    would lose what it carries besides its message (a SpecError's file and path, an
    EngineError's stderr)."""
    try:
        yield
    except PolicyError as exc:
        raise PolicyError(f"{flag}: {exc}") from exc


def check_policy_flag(policy: str | None) -> None:
    """`--policy NAME` (plan, watch, up): an unknown name or a plug-in that does not load is
    refused before anything starts, naming the flag."""
    if policy is None:
        return
    from skyhedge.policy import policy_class

    with blamed_on("--policy"):
        policy_class(policy)


def _naming_the_holder(exc: SkyhedgeError) -> SkyhedgeError:
    """A lock held by the service's running watcher (`destroy` or `apply` while `up` runs): name
    it and say how to stop it, rather than leave the user to find which process it is."""
    if not isinstance(exc, LockHeld):
        return exc
    from skyhedge.controller import presence

    try:
        record = presence.read(Path(str(exc.state_dir)))
    except OSError:
        return exc
    if record is None:
        return exc
    return LockHeld(
        f"{exc.base}: the watcher of this service runs (pid {record.pid}, spec {record.spec}): stop it first "
        f"(Ctrl-C in its terminal, or `kill {record.pid}`: it stops after its current pass and the "
        "service keeps serving), then run this again",
        exc.state_dir,
    )


def report_error(exc: SkyhedgeError) -> None:
    echo(f"error: {exc}", err=True)
    if os.environ.get("SKYHEDGE_DEBUG") and exc.__cause__ is not None:
        # for plug-in authors and bug reports: where the chained exception came from
        traceback.print_exception(exc.__cause__, file=sys.stderr)
    detail = getattr(exc, "stderr", "")
    if isinstance(exc, (EngineError, RoutingError)) and detail:
        echo(detail.rstrip(), err=True)


@click.group(cls=SkyhedgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="skyhedge")
def main() -> None:
    """skyhedge: serve models on spot capacity across zones, regions and clouds."""


def spec_argument(func: F) -> F:
    return click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))(func)


def state_dir_option(func: F) -> F:
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Where the service's state lives (default ./.skyhedge/<service name>/).",
    )(func)


def wraps_errors(func: F) -> F:
    """For commands called outside the group (tests calling the function directly)."""

    @wraps(func)
    def inner(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SkyhedgeError as exc:
            report_error(exc)
            sys.exit(1)

    return inner  # type: ignore[return-value]


def no_state_note(sdir: Path, service: str, *, given: bool = False) -> str | None:
    """The note for a command that found no state of `service` in `sdir`, naming it absolutely:
    the default state dir is relative to the current directory, so a service deployed from
    another one is not seen here ("Nothing to destroy." while it keeps running). `given`: the
    user named `sdir` with --state-dir. None when the state exists."""
    from skyhedge.state import STATE_FILE

    if (sdir / STATE_FILE).exists():
        return None
    where = f"note: no state of {service} in {os.path.abspath(sdir)}"
    if given:
        return f"{where}: check --state-dir"
    return (
        f"{where}: a service deployed from another directory keeps its state there "
        "(./.skyhedge/<name>/ is per directory); run this where it was deployed, or pass --state-dir"
    )


def command_line(verb: str, spec: Path, state_dir: Path | None) -> str:
    """`skyhedge VERB SPEC [--state-dir DIR]` as a hint to paste: shell-quoted (a path with a
    space is one argument), and with the --state-dir this command was given (as given: the hint
    is pasted where this ran), since without it the command looks in the default state dir and
    finds nothing there ("Nothing to destroy." while the service keeps running)."""
    argv = ["skyhedge", *verb.split(), str(spec)]
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    return shlex.join(argv)
