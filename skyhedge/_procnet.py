"""Linux's TCP socket tables (/proc/.../net/tcp and tcp6) and a process's socket descriptors, read
the one way the router (whose connections to a gone replica `Router.sever` cuts; whose master
listens on the service port) and the local cloud (which replica holds a port) both need."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

#: `st` of a listening socket in the tables.
LISTEN = "0A"


def tcp_rows(net_dir: Path) -> Iterator[list[str]]:
    """The rows of `net_dir`'s `tcp` and `tcp6` tables (`/proc/net`, or `/proc/<pid>/net` for a
    process's network namespace), split into fields: [1] local address:port, [2] remote, [3]
    state, [9] inode (hex, as the kernel writes them). A table that cannot be read gives none."""
    for name in ("tcp", "tcp6"):
        try:
            lines = (net_dir / name).read_text(encoding="ascii", errors="replace").splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) >= 10:
                yield fields


def local_port(fields: list[str]) -> int:
    """The local port of a `tcp_rows` row (ValueError/IndexError for a malformed one)."""
    return int(fields[1].rsplit(":", 1)[1], 16)


def socket_fds(proc_dir: Path) -> dict[int, int]:
    """Socket inode -> descriptor number in the process of `proc_dir` (`/proc/<pid>`), raising the
    OSError that listing its `fd` folder met (ENOENT: gone; EACCES: not ours to look into, e.g. a
    process made not dumpable by a file capability)."""
    out: dict[int, int] = {}
    for entry in list((proc_dir / "fd").iterdir()):
        with contextlib.suppress(OSError, ValueError):
            target = os.readlink(entry)
            if target.startswith("socket:["):
                out[int(target[8:-1])] = int(entry.name)
    return out


def open_files(proc_dir: Path) -> list[str]:
    """The files the process of `proc_dir` (`/proc/<pid>`) holds open, as the kernel names them
    now (a file renamed since by its new path, a deleted one ending in " (deleted)"): where a
    process's command line or environment says where it was started, these say where that is
    today (a state dir moved with `mv`). Raises the OSError that listing its `fd` folder met."""
    out: list[str] = []
    for entry in list((proc_dir / "fd").iterdir()):
        with contextlib.suppress(OSError):
            target = os.readlink(entry)
            if target.startswith("/"):
                out.append(target)
    return out
