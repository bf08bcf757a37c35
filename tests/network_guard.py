"""The tests' network guard: no test reaches another machine (the project's rule).

`install()` (run by conftest, once per process) makes the process's connects, datagrams and name
lookups to an address or a name that is not this machine fail as an unreachable network would,
and records each; `watch_test()` (conftest's autouse fixture) fails the test that made one, so
such a test fails here (no internet) rather than passing here and reaching a real cloud on a
machine with credentials. (A `plan` that began asking clouds which replicas still run is what
such a test would miss.)

This machine is loopback (`127.0.0.0/8`, `::1`, and `::ffff:127.0.0.1`, the same address in an
IPv6 socket), the unspecified address (`0.0.0.0`, `::`: a connect there reaches this machine),
`localhost` and the machine's own name and the addresses that name resolves to (a container's
hostname names its interface's address). Refused before, they failed tests that stay here.

Not covered: subprocesses (Terraform, nginx: their endpoints are set by the tests) and code that
does not go through Python's `socket` module (the embedded Terraform engine's own connections).
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest

#: Network calls this process made to somewhere other than this machine since the last `take()`.
OFF_MACHINE: list[str] = []
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", ""})
_REAL = {
    "getaddrinfo": socket.getaddrinfo,
    "gethostbyname": socket.gethostbyname,
    "gethostbyname_ex": socket.gethostbyname_ex,
    "gethostbyaddr": socket.gethostbyaddr,
}


@functools.cache
def _own_addresses() -> frozenset[str]:
    """The addresses this machine's own name resolves to (asked once, without the guard)."""
    try:
        infos = _REAL["getaddrinfo"](socket.gethostname(), None)
    except OSError:
        return frozenset()
    return frozenset(str(info[4][0]).split("%", 1)[0] for info in infos)


def is_local(host: object) -> bool:
    """Whether `host` (a name or an address, as `connect`, `sendto` or a lookup takes it) is
    this machine."""
    if host is None:
        return True
    text = bytes(host).decode(errors="replace") if isinstance(host, (bytes, bytearray)) else str(host)
    if text.casefold().rstrip(".") in _LOCAL_NAMES or text == socket.gethostname():
        return True
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_unspecified or str(address) in _own_addresses()


def take() -> list[str]:
    """What was recorded since the last call (each once), and forget it."""
    tried = sorted(set(OFF_MACHINE))
    OFF_MACHINE.clear()
    return tried


def _refuse(what: str, host: object) -> None:
    OFF_MACHINE.append(what)
    raise OSError(101, f"test network guard: {host} is not this machine")


def install() -> None:
    """Wrap the socket calls that reach another machine (idempotent)."""
    if getattr(socket.socket.connect, "_skyhedge_guard", False):
        return
    sock_cls = socket.socket
    connect, connect_ex, sendto = sock_cls.connect, sock_cls.connect_ex, sock_cls.sendto

    def _check(sock: socket.socket, address: Any, what: str) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_local(address[0]):
            _refuse(f"{what} {address[0]}:{address[1]}", address[0])

    def guarded_connect(self: socket.socket, address: Any) -> None:
        _check(self, address, "connect to")
        return connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: Any) -> int:
        _check(self, address, "connect to")
        return connect_ex(self, address)

    def guarded_sendto(self: socket.socket, data: Any, *args: Any) -> int:
        # sendto(data, address) or sendto(data, flags, address): a UDP datagram (a DNS query
        # of its own, a metrics push) reaches another machine without a connect
        if args:
            _check(self, args[-1], "datagram to")
        return sendto(self, data, *args)

    def _lookup(name: str) -> Any:
        real = _REAL[name]

        def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
            if not is_local(host):
                OFF_MACHINE.append(f"name lookup of {host}")
                raise socket.gaierror(socket.EAI_NONAME, f"test network guard: {host} is not this machine")
            return real(host, *args, **kwargs)

        return guarded

    guarded_connect._skyhedge_guard = True  # type: ignore[attr-defined]
    sock_cls.connect = guarded_connect  # type: ignore[method-assign]
    sock_cls.connect_ex = guarded_connect_ex  # type: ignore[method-assign]
    sock_cls.sendto = guarded_sendto  # type: ignore[method-assign,assignment]
    for name in _REAL:
        setattr(socket, name, _lookup(name))


def _fail_if_tried(who: str) -> None:
    if tried := take():
        pytest.fail(f"{who} tried to reach another machine: " + "; ".join(tried[:5]))


def watch_test() -> Iterator[None]:
    """The body of conftest's autouse fixture: fails the test whose process tried to reach
    another machine. What was tried before the test began (a fixture of a wider scope, which
    sets up before it; an earlier test's thread or a wider fixture's teardown) fails it too,
    named as such: cleared unseen, it failed no test at all."""
    _fail_if_tried(
        "before this test began, this process (a fixture of a wider scope, or an earlier test's thread)"
    )
    yield
    _fail_if_tried("the test")
