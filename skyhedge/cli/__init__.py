"""The `skyhedge` command line: thin commands that parse, call, show. Nothing imports this package.

Each command group lives in its own module and registers itself on `main` with `@main.command()`;
adding one is adding a module and a line to `_COMMAND_MODULES`. A module in `_LAZY_COMMANDS` is
imported only when its command runs (or `--help` lists it): `simulate` pulls in numpy, which every
other command would otherwise pay for at start-up (and a Ctrl-C then showed numpy's traceback).
"""

from __future__ import annotations

import importlib

from skyhedge.cli._app import main

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

for _module in _COMMAND_MODULES:
    try:
        importlib.import_module(f"skyhedge.cli.{_module}")
    except ModuleNotFoundError as _exc:  # a command module not written yet
        if _exc.name != f"skyhedge.cli.{_module}":
            raise
main.lazy_commands.update(_LAZY_COMMANDS)

__all__ = ["main"]
