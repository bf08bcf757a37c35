"""The tests' network guard (`network_guard`, installed by conftest): what stays on this machine
goes through, what leaves it is refused and fails the test that tried, whichever way it left."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import network_guard
import pytest


def _listener(family: socket.AddressFamily, host: str) -> socket.socket:
    server = socket.socket(family, socket.SOCK_STREAM)
    try:
        server.bind((host, 0))
    except OSError as exc:  # (no IPv6 on this machine)
        server.close()
        pytest.skip(f"cannot listen on {host}: {exc}")
    server.listen()
    return server


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[socket.socket]:
    family, host = request.param
    listening = _listener(family, host)
    yield listening
    listening.close()


@pytest.mark.parametrize(
    ("server", "connect_to"),
    [
        # an IPv6 socket reaching 127.0.0.1 (a dual-stack client): refused before (Python 3.11's
        # ipaddress does not call ::ffff:127.0.0.1 loopback)
        ((socket.AF_INET6, "::"), "::ffff:127.0.0.1"),
        ((socket.AF_INET, "0.0.0.0"), "0.0.0.0"),  # a server's own bind address, as clients use it
        ((socket.AF_INET, "0.0.0.0"), socket.gethostname()),  # by name: the lookup was let through
        ((socket.AF_INET, "127.0.0.1"), "127.0.0.1"),
    ],
    indirect=["server"],
)
def test_a_connect_to_this_machine_by_any_of_its_addresses_or_names_goes_through(server, connect_to):
    client = socket.socket(server.family, socket.SOCK_STREAM)
    try:
        client.connect((connect_to, server.getsockname()[1]))
    finally:
        client.close()
    assert network_guard.take() == []


@pytest.mark.parametrize(
    ("call", "recorded"),
    [
        (lambda: socket.gethostbyname("example.invalid"), "name lookup of example.invalid"),
        (lambda: socket.gethostbyname_ex("example.invalid"), "name lookup of example.invalid"),
        (lambda: socket.gethostbyaddr("192.0.2.1"), "name lookup of 192.0.2.1"),
        (lambda: socket.getaddrinfo("example.invalid", 443), "name lookup of example.invalid"),
        (lambda: socket.create_connection(("192.0.2.1", 80), timeout=1), "name lookup of 192.0.2.1"),
    ],
    ids=["gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getaddrinfo", "create_connection"],
)
def test_a_lookup_of_another_machine_is_refused_and_recorded(call, recorded):
    with pytest.raises(OSError, match="test network guard"):
        call()
    assert network_guard.take() == [recorded]


def test_a_datagram_to_another_machine_is_refused_and_recorded():
    """UDP needs no connect (a DNS query of a library's own, a statsd push)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with pytest.raises(OSError, match="test network guard"):
            sock.sendto(b"x", ("192.0.2.1", 53))
        with pytest.raises(OSError, match="test network guard"):
            sock.sendto(b"x", 0, ("192.0.2.1", 53))
    finally:
        sock.close()
    assert network_guard.take() == ["datagram to 192.0.2.1:53"]


def test_a_datagram_to_this_machine_goes_through():
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        receiver.bind(("127.0.0.1", 0))
        sender.sendto(b"x", receiver.getsockname())
        assert receiver.recv(1) == b"x"
    finally:
        sender.close()
        receiver.close()
    assert network_guard.take() == []


def test_what_was_tried_before_a_test_began_fails_that_test_not_cleared_unseen():
    """A module- or session-scoped fixture sets up before the autouse check: what it tried was
    cleared at the test's start, and no test failed."""
    network_guard.OFF_MACHINE.append("name lookup of example.invalid")
    check = network_guard.watch_test()
    with pytest.raises(pytest.fail.Exception, match="before this test began.*example.invalid"):
        next(check)
    assert network_guard.take() == []


def test_what_the_test_tried_fails_it_at_its_end():
    check = network_guard.watch_test()
    next(check)
    network_guard.OFF_MACHINE.append("connect to 192.0.2.1:443")
    with pytest.raises(pytest.fail.Exception, match="the test tried.*192.0.2.1:443"):
        next(check)
