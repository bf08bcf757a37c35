"""Argument types the benchmark scripts share: a count out of range is one argparse usage line
(`script.py: error: argument --x: expected ...`, exit 2), never a traceback after minutes of
set-up. Scripts run as `python benchmarks/NAME.py`, so this folder is on `sys.path` for them."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(minimum: int) -> Callable[[str], int]:
    """A whole number of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected at least {minimum}, got {value}")
        return value

    return parse


#: A whole number of at least 1 (repeats, passes, replicas).
positive = at_least(1)


def counts_of_at_least(minimum: int) -> Callable[[str], list[int]]:
    """Comma-separated whole numbers, each at least `minimum` (`--zones 3,9,27`)."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            expected = "expected comma-separated whole numbers"
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
        if any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"expected counts of at least {minimum}, got {text!r}")
        return values

    return parse
