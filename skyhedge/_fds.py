"""Waiting on file descriptors of any number (pidfds: readable once their process exits).

`select.select` refuses a descriptor numbered FD_SETSIZE (1024) or more ("filedescriptor out of
range in select()"), and a watcher whose limit is raised (`ulimit -n`, systemd's LimitNOFILE, a
container's default of 1M) gets such numbers once about a thousand are open: a pidfd per local
replica process, a socket per probe in flight. Each turn of the threads that wait on pidfds then
failed, and replica or router exits were seen only at the next pass. `poll` has no such bound.
"""

from __future__ import annotations

import select
from collections.abc import Iterable


def readable(fds: Iterable[int], timeout: float) -> list[int]:
    """Those of `fds` readable within `timeout` seconds (0: without waiting); [] when none is."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(max(0, round(timeout * 1000)))]
