"""The `skyhedge` command line: thin commands that parse, call, show. Nothing imports this package.

Each command group lives in its own module and registers itself on `main` with `@main.command()`;
adding one is adding a module and a line to `_COMMAND_MODULES`. A module in `_LAZY_COMMANDS` is
imported only when its command runs (or `--help` lists it): `simulate` pulls in numpy, which every
other command would otherwise pay for at start-up (and a Ctrl-C then showed numpy's traceback).
"""

from __future__ import annotations

import importlib
import sys

try:
    from skyhedge.cli._app import main
except KeyboardInterrupt:
    # A Ctrl-C while click and rich load, before `main` can say it in its words: see below.
    sys.stderr.write("error: skyhedge interrupted by Ctrl-C\n")
    raise SystemExit(130) from None

_COMMAND_MODULES = (
    "plan",
    "catalog",
    "render",
    "apply",
    "routing",
    "watch",
    "logs",
)
#: command name -> the module that registers it, imported on first use.
_LAZY_COMMANDS = {"simulate": "skyhedge.cli.simulate"}


def _import_commands() -> None:
    for module in _COMMAND_MODULES:
        try:
            importlib.import_module(f"skyhedge.cli.{module}")
        except ModuleNotFoundError as exc:  # a command module not written yet
            if exc.name != f"skyhedge.cli.{module}":
                raise


try:
    _import_commands()
except KeyboardInterrupt as _exc:
    # Loading the commands is about half a second, most of a `status --json` poll's run: a
    # Ctrl-C there printed Python's traceback and the process died of the signal, where every
    # other moment of a command gives one `error:` line and exit 130 (README, "Commands"). The
    # command is not parsed yet, so the line names skyhedge, as a Ctrl-C before a subcommand does.
    main.interrupted(_exc)
main.lazy_commands.update(_LAZY_COMMANDS)

__all__ = ["main"]
