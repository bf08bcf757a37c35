"""A service port below 1024 as an unprivileged user: the router's port check binds in skyhedge's
own process, which the kernel refuses such a port (EACCES) whatever nginx could do. An nginx given
CAP_NET_BIND_SERVICE (`setcap cap_net_bind_service=+ep`, the usual way to serve :80 or :443
without root) binds it all the same, so the check must let it through; for any other nginx the
refusal must say why and what to do, not "free it"."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from skyhedge.errors import RoutingError
from skyhedge.routing import Router
from skyhedge.routing import nginx as nginx_proc
from skyhedge.spec import parse_spec

# security.capability as `setcap` writes it (read back from a copy of Debian's nginx):
# revision 2 with the effective flag, permitted = 1 << CAP_NET_BIND_SERVICE
CAP_EP = bytes.fromhex("0100000200040000000000000000000000000000")
# `setcap cap_net_bind_service=+p`: permitted but not effective; nginx, not capability-aware,
# never raises it, so it cannot bind the port
CAP_P_ONLY = bytes.fromhex("0000000200040000000000000000000000000000")


@pytest.fixture
def fake_nginx(tmp_path: Path) -> Iterator[Path]:
    """An executable standing in for nginx: the port check only needs its path."""
    binary = tmp_path / "bin" / "nginx"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    forget_capabilities()
    yield binary
    forget_capabilities()


def forget_capabilities() -> None:
    """The capability read is cached per binary; each test fakes its own."""
    cached = getattr(nginx_proc, "binds_low_ports", None)
    if cached is not None:
        cached.cache_clear()


@pytest.fixture
def as_a_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """bind() below 1024 refused with EACCES, as the kernel does for a user (CI runs as root)."""
    real_bind = socket.socket.bind

    def bind(self: socket.socket, address: tuple[str, int]) -> None:
        if 0 < address[1] < 1024:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        real_bind(self, address)

    monkeypatch.setattr(socket.socket, "bind", bind)


def capabilities(monkeypatch: pytest.MonkeyPatch, binary: Path, value: bytes | None) -> None:
    real = os.getxattr

    def getxattr(path: str | Path, attribute: str, *args: object, **kwargs: object) -> bytes:
        if Path(path) == binary and attribute == "security.capability":
            if value is None:
                raise OSError(errno.ENODATA, os.strerror(errno.ENODATA), str(path))
            return value
        return real(path, attribute, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "getxattr", getxattr)


def router_on(port: int, state_dir: Path, binary: Path) -> Router:
    spec = parse_spec(
        {
            "name": "low",
            "placement": {"clouds": ["local"]},
            "run": {"command": "python3 server.py"},
            "service": {"host": "127.0.0.1", "port": port},
        }
    )
    return Router(spec, state_dir, nginx_bin=str(binary))


def test_a_user_may_route_port_80_through_an_nginx_allowed_to_bind_it(
    tmp_path, fake_nginx, as_a_user, monkeypatch
):
    capabilities(monkeypatch, fake_nginx, CAP_EP)
    router_on(80, tmp_path / "state", fake_nginx).preflight()  # nginx binds :80 itself


@pytest.mark.parametrize("caps", [None, CAP_P_ONLY], ids=["no-capabilities", "permitted-not-effective"])
def test_port_80_for_a_user_is_refused_saying_why_and_what_to_do(
    tmp_path, fake_nginx, as_a_user, monkeypatch, caps
):
    capabilities(monkeypatch, fake_nginx, caps)
    with pytest.raises(RoutingError) as err:
        router_on(80, tmp_path / "state", fake_nginx).preflight()
    message = str(err.value)
    assert message.startswith("service.port 80 on 127.0.0.1 is not available for the router")
    assert "below 1024" in message and "above 1023" in message
    assert f"setcap cap_net_bind_service=+ep {fake_nginx}" in message
    assert "free it" not in message  # nothing holds it: freeing it would not help
    assert "\n" not in message


def test_capability_of_a_binary_is_read_from_its_file_attributes(fake_nginx, monkeypatch):
    for value, expected in ((CAP_EP, True), (CAP_P_ONLY, False), (None, False), (b"\x01", False)):
        forget_capabilities()
        capabilities(monkeypatch, fake_nginx, value)
        assert nginx_proc.binds_low_ports(str(fake_nginx)) is expected, value
    forget_capabilities()
    assert nginx_proc.binds_low_ports(str(fake_nginx.parent / "missing")) is False
