"""Readiness probe semantics against a small in-process HTTP server that records what it got."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from routing_support import free_port

from skyhedge.probe import check, check_all, probe, probe_all
from skyhedge.spec import ReadinessProbe


class Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.seen: list[dict[str, object]] = []


class Handler(BaseHTTPRequestHandler):
    server: Recorder

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append(
            {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
        )
        path = self.path
        if path.startswith("/slow"):
            time.sleep(2.0)
            path = "/ok"
        codes = {
            "/ok": 200,
            "/created": 204,
            "/redirect": 302,
            "/fail": 500,
            "/missing": 404,
            "/loading": 503,
        }
        code = codes.get(path, 404)
        self.send_response(code)
        if code == 302:
            self.send_header("Location", "/ok")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = _answer
    do_POST = _answer


@pytest.fixture
def server() -> Iterator[Recorder]:
    srv = Recorder()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def url(srv: Recorder) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}"


def test_get_by_default_and_only_2xx_counts(server):
    assert probe(url(server), ReadinessProbe(path="/ok")) is True
    assert probe(url(server) + "/", ReadinessProbe(path="/created")) is True
    for path in ("/fail", "/missing", "/loading"):
        assert probe(url(server), ReadinessProbe(path=path)) is False
    assert {s["method"] for s in server.seen} == {"GET"}
    result = check(url(server), ReadinessProbe(path="/loading"))
    assert (result.ok, result.status, result.error) == (False, 503, "HTTP 503")


def test_redirect_is_not_followed(server):
    assert probe(url(server), ReadinessProbe(path="/redirect")) is False
    assert [s["path"] for s in server.seen] == ["/redirect"]


def test_post_with_json_body_and_headers(server):
    rp = ReadinessProbe(
        path="/ok", post_data={"prompt": "hi", "max_tokens": 1}, headers={"Authorization": "Bearer t"}
    )
    assert probe(url(server), rp) is True
    (seen,) = server.seen
    assert seen["method"] == "POST"
    assert json.loads(seen["body"]) == {"prompt": "hi", "max_tokens": 1}
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["content-type"] == "application/json"
    assert headers["authorization"] == "Bearer t"


def test_string_post_data_is_sent_as_is(server):
    assert probe(url(server), ReadinessProbe(path="/ok", post_data='{"a": 1}')) is True
    assert server.seen[0]["body"] == b'{"a": 1}'


def test_headers_on_get(server):
    assert probe(url(server), ReadinessProbe(path="/ok", headers={"X-Probe": "yes"})) is True
    assert {k.lower(): v for k, v in server.seen[0]["headers"].items()}["x-probe"] == "yes"


def test_timeout_from_the_spec_and_override(server):
    t0 = time.monotonic()
    assert probe(url(server), ReadinessProbe(path="/slow", timeout_seconds=1)) is False
    assert 0.9 < time.monotonic() - t0 < 1.8
    t0 = time.monotonic()
    result = check(url(server), ReadinessProbe(path="/slow", timeout_seconds=30), timeout=0.3)
    assert result.ok is False and "timed out" in (result.error or "").lower()
    assert time.monotonic() - t0 < 1.2


def test_unreachable_and_malformed_endpoints_are_not_ready():
    closed = f"http://127.0.0.1:{free_port()}"
    result = check(closed, ReadinessProbe())
    assert result.ok is False and result.status is None and "refused" in (result.error or "").lower()
    assert probe("not a url", ReadinessProbe()) is False


@pytest.mark.parametrize(
    "code",
    [errno.EMFILE, errno.ENFILE, errno.EADDRNOTAVAIL, errno.ENOBUFS, errno.ENOMEM],
    ids=["EMFILE", "ENFILE", "EADDRNOTAVAIL", "ENOBUFS", "ENOMEM"],
)
def test_a_probe_this_machine_cannot_open_a_connection_for_says_so_apart(server, monkeypatch, code):
    # out of descriptors, file table, ephemeral ports or socket buffers: the prober's own limit,
    # not the replica's failure. The watcher must not judge a replica by it (`HttpProber`); a
    # refused connection stays the replica's
    def cannot_connect(*args: object, **kwargs: object) -> socket.socket:
        raise OSError(code, os.strerror(code))

    refused = check(f"http://127.0.0.1:{free_port()}", ReadinessProbe())
    assert refused.ok is False and refused.local is False
    monkeypatch.setattr(socket, "create_connection", cannot_connect)
    result = check(url(server) + "/ok", ReadinessProbe())
    assert result.ok is False and result.local is True and os.strerror(code) in (result.error or "")


def test_probe_all_is_concurrent_and_keyed_by_endpoint(server):
    base = url(server)
    endpoints = [f"{base}", f"{base}/", f"http://localhost:{server.server_address[1]}"]
    closed = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    results = probe_all([*endpoints, closed], ReadinessProbe(path="/slow", timeout_seconds=5))
    elapsed = time.monotonic() - t0
    assert results == {endpoints[0]: True, endpoints[1]: True, endpoints[2]: True, closed: False}
    assert elapsed < 3.5  # three 2-second probes at once, not one after another
    assert probe_all([], ReadinessProbe()) == {}
    detail = check_all([closed], ReadinessProbe())
    assert detail[closed].error


@pytest.fixture
def raw_server() -> Iterator[tuple[int, dict[str, str]]]:
    """A socket server misbehaving as told: mode 'trickle' (200, then one body byte every 0.2 s),
    'hang' (200 and a Content-Length, then nothing) or 'dribble' (the status line byte by byte)."""
    mode: dict[str, str] = {"mode": "trickle"}
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.1)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def handle(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.recv(65536)
            if mode["mode"] == "trickle":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                while not stop.is_set():
                    conn.sendall(b"x")
                    time.sleep(0.2)
            elif mode["mode"] == "hang":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
                stop.wait(30)
            else:
                for ch in b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 200:
                    if stop.is_set():
                        break
                    conn.sendall(bytes([ch]))
                    time.sleep(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conns.append(conn)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], mode
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in conns:
            conn.close()
        listener.close()


@pytest.mark.parametrize("mode", ["trickle", "hang", "dribble"])
def test_the_timeout_bounds_the_whole_answer_and_a_partial_one_is_not_ready(raw_server, mode):
    # the timeout used to bound each read: a trickling answer held the probe (and the pass that
    # ran it) for as long as it trickled, and 200 headers with a body that never came was READY
    port, server_mode = raw_server
    server_mode["mode"] = mode
    t0 = time.monotonic()
    result = check(f"http://127.0.0.1:{port}", ReadinessProbe(path="/health", timeout_seconds=1))
    assert result.ok is False and "timed out" in (result.error or "")
    assert time.monotonic() - t0 < 3


def test_a_body_cut_short_is_not_ready():
    # 200 with Content-Length 100, three bytes, then the connection closes
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        result = check(f"http://127.0.0.1:{listener.getsockname()[1]}", ReadinessProbe(timeout_seconds=5))
    finally:
        thread.join(timeout=5)
        listener.close()
    assert result.ok is False and "IncompleteRead" in (result.error or "")


def test_what_a_replica_answers_reaches_the_error_as_one_line_without_control_characters():
    """A malformed status line is quoted in the error (`BadStatusLine: <line>`), which reaches the
    operator's terminal (`routing up --probe`), the watcher's log and the state's history: the
    escape sequences and line breaks a replica sent are shown escaped, and a long line is cut."""
    answers = [
        b"\x1b]0;OWNED\x07\x1b[2J\x1b[31mRED\r\nsecond line\r\n",
        b"HTTP/1.1 " + b"x" * 5000 + b"\r\n\r\n",
    ]
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def serve() -> None:
        for answer in answers:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        escaped, long = (check(endpoint, ReadinessProbe(timeout_seconds=5)) for _ in answers)
    finally:
        thread.join(timeout=5)
        listener.close()
    assert escaped.ok is False
    assert escaped.error == r"BadStatusLine: \x1b]0;OWNED\x07\x1b[2J\x1b[31mRED"
    assert long.ok is False and long.error is not None
    assert long.error.startswith("BadStatusLine: HTTP/1.1 xxx") and long.error.endswith("...")
    assert len(long.error) < 350


def test_a_round_probes_up_to_256_replicas_at_once(monkeypatch):
    """A probe that hangs costs the whole timeout (a booting VM whose address drops connections, a
    wedged server): with 32 probes at once (16 in apply's wait for READY), 200 booting replicas
    held each round for 7 timeouts (13), minutes at the default 15 s. Every probe of a round of
    up to 256 runs at once, so the round costs one timeout; beyond that, they run in batches."""
    import skyhedge.probe as probe_module
    from skyhedge.apply import wait_ready
    from skyhedge.probe import MAX_PROBES_AT_ONCE
    from skyhedge.state import ReplicaRecord, ServiceState

    assert MAX_PROBES_AT_ONCE == 256
    replicas = 200
    together = threading.Barrier(replicas, timeout=10)  # broken unless all 200 wait at once

    def hung(endpoint, readiness, *, timeout=None):
        together.wait()
        return probe_module.ProbeResult(endpoint, True, 200, None, 0.0)

    monkeypatch.setattr(probe_module, "check", hung)
    endpoints = [f"http://127.0.0.1:1/r{i}" for i in range(replicas)]
    assert all(probe_all(endpoints, ReadinessProbe()).values())

    together.reset()
    state = ServiceState(service="s")
    for i in range(replicas):
        rid = f"r-{i + 1:04d}"
        state.replicas[rid] = ReplicaRecord(
            rid, "local", "local", "local-a", "spot", 0.0, endpoint=endpoints[i]
        )

    class Spec:  # what wait_ready reads of a spec
        readiness_probe = ReadinessProbe(initial_delay_seconds=30)

    ready, waiting = wait_ready(Spec(), state, probe=lambda e, r, *, timeout: together.wait() >= 0)
    assert len(ready) == replicas and waiting == []
