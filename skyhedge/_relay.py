"""Runs a `terraform` binary (`--terraform-bin`) for skyhedge, so that it outlives a killed skyhedge.

    python -I -S .../skyhedge/_relay.py /usr/local/bin/terraform apply ...

Why: a Go program whose standard output or error is a broken pipe is ended by the Go runtime at
its next write, whatever the disposition of SIGPIPE it was started with. A `kill -9` of skyhedge
alone (the OOM killer, a `kill` of its pid) left the terraform it ran mid-apply writing to a pipe
nobody read: it died at its next line ("Still creating... [10s elapsed]"), its state unwritten,
while the replicas it had launched ran on, recorded nowhere (measured: the state held none of the
two replicas 40 s later). Here terraform writes to this process's pipes, which never break; this
process hands each line on to skyhedge (`say`) and, once skyhedge is gone, drops it. Terraform
then finishes, saves its state and releases its lock, as the embedded engine does
(`skyhedge.engine._embedded_main`, which writes through `say` too).

Signals: terraform stays in skyhedge's process group, where a terminal's Ctrl-C (and
`engine.interrupt_running`, for a SIGTERM'd skyhedge) reaches it once, as its graceful stop. This
process must neither die of that SIGINT (or of a SIGTERM sent to the whole group) nor pass it on:
Terraform takes a second interrupt as "exit now", its state unwritten. It exits with terraform's
own status (a signal that ended terraform ends it too), and terraform is SIGKILLed if this process
is (skyhedge's time limit on a hung run kills this process: `engine.Terraform.run`).

Run by its path with the standard library only: no PYTHONPATH is needed, none is given to terraform.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from typing import Any

_PR_SET_PDEATHSIG = 1


def say(out: Any, text: str | bytes) -> None:
    """Write to skyhedge through `out`, a pipe; once skyhedge is gone (`kill -9`), drop the text.

    What runs Terraform runs on: a `BrokenPipeError` at its next line ended the process with
    Terraform mid-apply, its state unwritten and its lock released, while the launches it had
    started ran on, recorded nowhere, beside the next run's launches of the same replicas. Left
    to finish, it saves its state, and the next run waits for its lock."""
    if out.closed:
        return
    try:
        out.write(text)
        out.flush()
    except (BrokenPipeError, ValueError):
        # nowhere to write; replaced so that the interpreter's own flush at exit says nothing
        with contextlib.suppress(OSError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, out.fileno())
            os.close(null)


def _die_with_parent(parent: int) -> None:
    """In the child, before exec: SIGKILL it when this process dies (Linux; elsewhere nothing)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # this process died before the prctl took effect
        os._exit(137)


def _pass_on(src: Any, out: Any) -> None:
    """Terraform's stderr to ours, as it comes (not at the end: a time limit's error shows it)."""
    while chunk := os.read(src.fileno(), 65536):
        say(out, chunk)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python _relay.py TERRAFORM ARGS...", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        # a handler, not SIG_IGN: exec resets handlers, but an ignored SIGINT stays ignored in
        # terraform (Go keeps an inherited SIG_IGN for SIGINT and SIGHUP), which Ctrl-C must stop
        signal.signal(sig, lambda *_: None)
    me = os.getpid()
    try:
        child = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=lambda: _die_with_parent(me),  # safe: one thread so far
        )
    except OSError as exc:
        print(f"cannot start {argv[0]}: {exc}", file=sys.stderr)
        return 127
    assert child.stdout is not None and child.stderr is not None
    errors = threading.Thread(target=_pass_on, args=(child.stderr, sys.stderr.buffer), daemon=True)
    errors.start()
    for line in child.stdout:
        say(sys.stdout.buffer, line)
    code = child.wait()
    errors.join()
    if code < 0:  # ended by a signal: end the same way, so skyhedge sees what terraform did
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
