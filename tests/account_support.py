"""Running a piece of a test as another account than root, for what file modes and process
credentials decide (root bypasses both). Forked, not exec'd: the interpreter (root's own
install, often under /root) need not be readable by that account."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another account needs root")


def become(uid: int) -> None:
    """In a forked child: drop to `uid` (its group the same number), no supplementary groups."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def as_user(uid: int, call: Callable[[], object]) -> tuple[str, object]:
    """`call()` in a forked child running as `uid`: ("ok", its result) or ("error", its
    OSError's text). The child never returns into pytest."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            become(uid)
            try:
                out: list[object] = ["ok", call()]
            except OSError as exc:
                out = ["error", str(exc)]
            os.write(write, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    kind, value = json.loads(data)
    return kind, value
