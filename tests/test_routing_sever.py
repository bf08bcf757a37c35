"""`nginx.sever` without nginx: a process of the test's holding a TCP connection to a listener
of the test's stands in for a worker with a request in flight on a replica that vanished."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from account_support import as_user, become, needs_root

from skyhedge.routing import nginx as nginx_proc

HOLD = """
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print("connected", flush=True)
time.sleep(60)
"""


@pytest.fixture
def held() -> Iterator[tuple[subprocess.Popen[str], socket.socket, int]]:
    """A child process holding a connection to a listener on 127.0.0.1: (child, server side, port)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "connected"
        conn, _ = listener.accept()
        conn.settimeout(5)
        with conn:
            yield child, conn, port
    finally:
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()
        listener.close()


def _gone_pid() -> int:
    """The pid of a process that exited and was reaped."""
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


@pytest.mark.skipif(not nginx_proc.CAN_SEE_WORKERS, reason="needs /proc")
def test_a_worker_that_exits_first_does_not_hide_the_others_connections(held):
    """nginx's workers share one connection table, which was read from the first worker listed
    only: after a reload that one is often an old worker on its way out, and once it had exited
    (its /proc entry gone) nothing was found to close, and nothing said so: the requests on the
    vanished replica waited out read_timeout after all."""
    child, conn, port = held
    assert nginx_proc.sever([_gone_pid(), child.pid], {("127.0.0.1", port)}) == 1
    assert conn.recv(1) == b""  # the child's side was shut down: the server side reads its end


#: The account nginx and skyhedge both run as in the test below: not root.
USER_UID = 4244
_PR_SET_DUMPABLE = 4


def _worker_as(uid: int, port: int, dumpable: bool) -> tuple[int, int]:
    """A forked stand-in for an nginx worker, running as `uid`, holding a connection to
    127.0.0.1:`port`: (its pid, the write end of a pipe whose closing ends it). Not dumpable, it
    is what an nginx given a file capability (`setcap cap_net_bind_service=+ep`, docs/routing.md:
    a port below 1024 as a user) runs as: its /proc/<pid>/fd is root's."""
    "127.0.0.1".encode("idna")  # the codec `connect` imports: root's stdlib is not the child's to read
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.close(stop_w)
            become(uid)
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, int(dumpable), 0, 0, 0)
            conn = socket.create_connection(("127.0.0.1", port))
            os.write(ready_w, b"x")
            os.read(stop_r, 1)  # until the test is done
            conn.close()
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(stop_r)
    with os.fdopen(ready_r, "rb") as fh:
        assert fh.read(1) == b"x"
    return pid, stop_w


@needs_root
@pytest.mark.skipif(not nginx_proc.CAN_SEE_WORKERS, reason="needs /proc")
@pytest.mark.parametrize("dumpable", [True, False])
def test_workers_it_may_not_look_into_are_said_not_passed_over(dumpable):
    """A worker whose descriptors skyhedge may not list (an nginx with a file capability is not
    dumpable: its /proc/<pid>/fd is root's, even for the account it runs as) showed no socket at
    all: nothing was closed, 0 returned, and the watcher said nothing, where docs/routing.md
    promises a warning that the requests wait for read_timeout. It is an EACCES now (a
    RoutingError in `Router.sever`, the watcher's warning line)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        pid, stop = _worker_as(USER_UID, port, dumpable)
        try:
            conn, _ = listener.accept()
            with conn:
                kind, value = as_user(USER_UID, lambda: nginx_proc.sever([pid], {("127.0.0.1", port)}))
                if dumpable:
                    assert (kind, value) == ("ok", 1)
                else:
                    assert kind == "error" and "Permission denied" in str(value), (kind, value)
        finally:
            os.close(stop)
            os.waitpid(pid, 0)


@pytest.mark.skipif(not nginx_proc.CAN_SEE_WORKERS, reason="needs /proc")
@pytest.mark.parametrize(
    ("machine", "number"),
    [("x86_64", 438), ("aarch64", 438), ("riscv64", 438), ("alpha", 548), ("ia64", 1462), ("mips64", None)],
)
def test_pidfd_getfd_is_called_by_its_number_on_the_machine(monkeypatch, machine, number):
    """pidfd_getfd was called as system call 438 everywhere, said to be "the same number on every
    Linux architecture": on alpha (548) and ia64 (1462) 438 is another call, and mips numbers it
    by ABI. Where its number is not known, nothing is called: ENOSYS, the watcher's warning."""
    called: list[int] = []

    class Libc:
        def syscall(self, nr: int, *args: int) -> int:
            called.append(nr)
            return os.dup(0)

    monkeypatch.setattr(nginx_proc.platform, "machine", lambda: machine)
    monkeypatch.setattr(nginx_proc.ctypes, "CDLL", lambda *a, **k: Libc())
    if number is None:
        with pytest.raises(OSError) as exc:
            nginx_proc.borrow_fd(os.getpid(), 0)
        assert exc.value.errno == errno.ENOSYS and called == []
    else:
        os.close(nginx_proc.borrow_fd(os.getpid(), 0))
        assert called == [number]
