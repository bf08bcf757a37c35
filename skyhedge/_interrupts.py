"""Hold a Ctrl-C (or SIGTERM) back across a few steps that must not be cut in two.

A rendered tree is swapped into place in several file system steps (an exchange of two
directories, a rename of the old tree aside, Terraform's `.terraform` and workspace state moved
back into the new tree, the old one removed). A Ctrl-C landing between two of them left the old
tree beside the new one (`.infra.old-1a2b3c4d`, in a GitOps repository's root), or, between the
exchange and the rename, deleted the old tree, workspace state (`terraform.tfstate.d/`) and all,
and inside `shutil.rmtree` (Python 3.11) its `finally` closed a descriptor twice, turning the
Ctrl-C into `cannot write the rendered tree (Bad file descriptor)`, exit 1. Those steps take
milliseconds: the signal is taken right after them, as if it had come a moment later.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: what a user or a supervisor sends to stop a command
_STOPS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Within: SIGINT and SIGTERM are noted, not acted on; on leaving, each one noted is raised
    again, under the handler that was in force (a KeyboardInterrupt for Ctrl-C, the command's own
    SIGTERM handling, or the default: the process ends as it would have).

    Python runs signal handlers in the main thread only, so elsewhere (a watcher run off the main
    thread by a program) nothing needs holding and nothing is changed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []

    def note(signum: int, frame: object) -> None:
        if signum not in noted:
            noted.append(signum)

    previous: dict[int, object] = {}
    try:
        for signum in _STOPS:
            handler = signal.getsignal(signum)
            if handler is None:  # installed outside Python: cannot be put back, so left alone
                continue
            previous[signum] = handler
            signal.signal(signum, note)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        for signum in noted:
            signal.raise_signal(signum)
