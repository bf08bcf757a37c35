"""The one loader for data directories (`templates/`, `modules/`) that works installed or not.

In a source checkout they sit at the repository root; an installed wheel carries copies under
`skyhedge/_data/` (see setup.py). Nothing else in skyhedge builds these paths by hand.
"""

from __future__ import annotations

import os
from pathlib import Path

from skyhedge.errors import RenderError

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """Return the directory `templates` or `modules`, preferring the checkout's live copy."""
    checkout = _PACKAGE.parent
    candidates = [_PACKAGE / "_data" / name]
    if (checkout / "setup.cfg").is_file():
        candidates.insert(0, checkout / name)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    if not (_PACKAGE / "__init__.py").is_file():
        # a long-running process (a watcher, `up`) outliving its install: a wheel replaced by an
        # editable install, or a checkout deleted after a wheel replaced it; its code is the old one
        raise RenderError(
            f"skyhedge is no longer installed in {_PACKAGE}, where this process (pid {os.getpid()}) "
            "loaded it from: it was reinstalled elsewhere since it started; restart it"
        )
    raise RenderError(f"skyhedge data directory {name!r} not found (broken install?)")


def templates_dir() -> Path:
    return data_dir("templates")


def modules_dir() -> Path:
    return data_dir("modules")
