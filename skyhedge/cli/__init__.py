"""The `skyhedge` command line: thin commands that parse, call, show. Nothing imports this package.

Each command group lives in its own module and registers itself on `main` with `@main.command()`;
adding one is adding a module and a line to `_COMMAND_MODULES`.
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
    "simulate",
    "watch",
)

for _module in _COMMAND_MODULES:
    try:
        importlib.import_module(f"skyhedge.cli.{_module}")
    except ModuleNotFoundError as _exc:  # a command module not written yet
        if _exc.name != f"skyhedge.cli.{_module}":
            raise

__all__ = ["main"]
