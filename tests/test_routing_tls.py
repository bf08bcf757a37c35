"""HTTPS at the router (`service.tls`): a real nginx terminates TLS with the spec's certificate
and key, in front of real replica processes; a renewed certificate is taken by a reload, and
missing or broken files are one line naming the field before nginx is touched."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from routing_support import free_port, needs_nginx, teardown_router

from skyhedge.errors import RoutingError, SpecError
from skyhedge.routing import Router
from skyhedge.routing import nginx as nginx_proc
from skyhedge.routing.config import RouterPaths, render_config
from skyhedge.spec import load_spec, parse_spec

x509 = pytest.importorskip("cryptography.x509")


def _write_cert(folder: Path, serial: int) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (`cert.pem`) and its key (`key.pem`)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "skyhedge-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = folder / "cert.pem", folder / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return certfile, keyfile


def _spec(port: int, tls: dict[str, str] | None, source: str = "<spec>") -> Any:
    service: dict[str, Any] = {"host": "127.0.0.1", "port": port}
    if tls is not None:
        service["tls"] = tls
    return parse_spec(
        {
            "name": "echo",
            "placement": {"clouds": ["local"]},
            "run": {"command": "python3 examples/local-echo/server.py"},
            "service": service,
        },
        source=source,
    )


def _https(port: int, certfile: Path, path: str = "/v1/completions") -> tuple[int, dict[str, Any], int]:
    """(status, JSON body, serial of the certificate served), trusting only `certfile`."""
    context = ssl.create_default_context(cafile=str(certfile))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        body = json.dumps({"prompt": "The keeper", "max_tokens": 4}) if path != "/-/health" else None
        conn.request("POST" if body else "GET", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = json.loads(resp.read())
        served = x509.load_der_x509_certificate(conn.sock.getpeercert(binary_form=True))
        return resp.status, data, served.serial_number
    finally:
        conn.close()


@pytest.fixture
def routers(tmp_path: Path) -> Iterator[Callable[[Any], Router]]:
    made: list[Router] = []

    def make(spec: Any) -> Router:
        router = Router(spec, tmp_path / f"state{len(made)}")
        made.append(router)
        return router

    yield make
    for router in made:
        teardown_router(router)


@needs_nginx
def test_the_router_serves_https_with_the_spec_certificate_and_a_reload_takes_a_renewed_one(
    tmp_path, routers, fleet
):
    certfile, keyfile = _write_cert(tmp_path, serial=1001)
    port = free_port()
    spec = _spec(port, {"certfile": str(certfile), "keyfile": str(keyfile)})
    assert spec.service.url == f"https://127.0.0.1:{port}"
    router = routers(spec)
    fleet.start(2)
    router.up(fleet.upstreams())
    status, body, serial = _https(port, certfile)
    assert status == 200 and body["choices"][0]["text"] and serial == 1001
    assert _https(port, certfile, "/-/health")[1]["upstreams"] == 2
    plain = http.client.HTTPConnection("127.0.0.1", port, timeout=5)  # plain HTTP: refused by nginx
    try:
        plain.request("GET", "/-/health")
        assert plain.getresponse().status == 400
    finally:
        plain.close()

    assert not router.tls_renewed()
    renewed, _ = _write_cert(tmp_path, serial=2002)  # certbot-style renewal, written in place
    assert renewed == certfile and router.tls_renewed()  # what the watcher asks at every pass
    pid = router.pid()
    router.reload(fleet.upstreams())  # same upstreams: reloaded all the same (the digest moved)
    assert router.pid() == pid  # a graceful reload, not a restart
    assert _https(port, certfile)[2] == 2002 and not router.tls_renewed()


@needs_nginx
def test_tls_files_that_cannot_be_read_are_one_line_naming_the_field_and_start_nothing(tmp_path, routers):
    certfile, keyfile = _write_cert(tmp_path, serial=7)
    missing = _spec(free_port(), {"certfile": str(certfile), "keyfile": str(tmp_path / "gone.pem")})
    router = routers(missing)
    with pytest.raises(
        RoutingError, match=r"^service\.tls\.keyfile: .*gone\.pem: No such file or directory$"
    ):
        router.preflight()
    with pytest.raises(RoutingError, match=r"^service\.tls\.keyfile: "):
        router.up([])
    assert router.pid() is None and nginx_proc.read_pid(router.paths.pid) is None
    other = tmp_path / "other"
    other.mkdir()
    _, wrong_key = _write_cert(other, serial=8)  # a key of another certificate: nginx -t refuses it
    mismatched = routers(_spec(free_port(), {"certfile": str(certfile), "keyfile": str(wrong_key)}))
    with pytest.raises(RoutingError, match=r"nginx refused the new configuration .*key values mismatch"):
        mismatched.up([])
    assert mismatched.pid() is None
    (tmp_path / "notpem.txt").write_text("hello\n")
    broken = _spec(free_port(), {"certfile": str(tmp_path / "notpem.txt"), "keyfile": str(keyfile)})
    with pytest.raises(RoutingError, match=r"^service\.tls\.certfile: .*notpem\.txt: not a PEM file"):
        routers(broken).preflight()


@needs_nginx
def test_an_encrypted_key_is_one_line_naming_the_field_before_nginx_asks_for_its_passphrase(
    tmp_path, routers
):
    """nginx asks for an encrypted key's passphrase on the terminal: `routing up`, `apply` and
    `up` waited at its prompt, and a watcher's reload has no terminal to ask."""
    from cryptography.hazmat.primitives import serialization

    certfile, keyfile = _write_cert(tmp_path, serial=9)
    key = serialization.load_pem_private_key(keyfile.read_bytes(), None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    traditional = tmp_path / "traditional.pem"  # `Proc-Type: 4,ENCRYPTED` after the BEGIN line
    traditional.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    for path in (encrypted, traditional):
        router = routers(_spec(free_port(), {"certfile": str(certfile), "keyfile": str(path)}))
        with pytest.raises(
            RoutingError, match=rf"^service\.tls\.keyfile: .*{path.name}: the private key is encrypted"
        ):
            router.up([])
        assert router.pid() is None and not router.paths.rejected.exists()


@needs_nginx
def test_a_running_router_keeps_its_config_when_the_key_vanishes_before_a_reload(tmp_path, routers, fleet):
    certfile, keyfile = _write_cert(tmp_path, serial=5)
    port = free_port()
    router = routers(_spec(port, {"certfile": str(certfile), "keyfile": str(keyfile)}))
    fleet.start(1)
    router.up(fleet.upstreams())
    keyfile.unlink()  # a renewal half done
    with pytest.raises(RoutingError, match=r"^service\.tls\.keyfile: "):
        router.reload([])
    assert _https(port, certfile, "/-/health")[1]["upstreams"] == 1  # still serving as before


def test_tls_paths_are_taken_from_the_spec_folder_and_unsafe_ones_refused(tmp_path):
    spec_file = tmp_path / "svc" / "service.yaml"
    spec_file.parent.mkdir()
    spec_file.write_text(
        "name: echo\nplacement: {clouds: [local]}\nrun: {command: serve}\n"
        "service: {port: 8443, tls: {certfile: certs/fullchain.pem, keyfile: /etc/tls/key.pem}}\n"
    )
    tls = load_spec(spec_file).service.tls
    assert tls is not None
    assert tls.certfile == tmp_path / "svc" / "certs" / "fullchain.pem"
    assert tls.keyfile == Path("/etc/tls/key.pem")
    text = render_config(load_spec(spec_file), [], paths=RouterPaths(tmp_path / "router"))
    assert "listen 127.0.0.1:8443 ssl;" in text
    assert f'ssl_certificate "{tmp_path}/svc/certs/fullchain.pem";' in text
    assert 'ssl_certificate_key "/etc/tls/key.pem";' in text
    plain = render_config(_spec(8080, None), [], paths=RouterPaths(tmp_path / "router"))
    assert "ssl" not in plain and "listen 127.0.0.1:8080;" in plain
    for tls_value, says in (
        ({"certfile": "/c.pem"}, "service.tls.keyfile: required: the path of a PEM file"),
        (
            {"certfile": "/c$host.pem", "keyfile": "/k.pem"},
            "service.tls.certfile: expected a file path nginx",
        ),
        ({"certfile": '/c".pem', "keyfile": "/k.pem"}, "service.tls.certfile: expected a file path nginx"),
        ({"certfile": "/c.pem", "keyfile": "/k.pem", "ca": "/x"}, "service.tls.ca: unknown field"),
    ):
        with pytest.raises(SpecError) as err:
            _spec(8443, tls_value)
        assert says in str(err.value), str(err.value)
