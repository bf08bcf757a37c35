"""The root click group and the one place where skyhedge errors become one line and exit 1."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from skyhedge import __version__
from skyhedge.errors import EngineError, RoutingError, SkyhedgeError

F = TypeVar("F", bound=Callable[..., Any])

console = Console()
err_console = Console(stderr=True)


class SkyhedgeGroup(click.Group):
    """Turns `SkyhedgeError` into `error: <one line>` on stderr and exit code 1 (no traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SkyhedgeError as exc:
            report_error(exc)
            sys.exit(1)


def report_error(exc: SkyhedgeError) -> None:
    click.echo(f"error: {exc}", err=True)
    detail = getattr(exc, "stderr", "")
    if isinstance(exc, (EngineError, RoutingError)) and detail:
        click.echo(detail.rstrip(), err=True)


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
