"""Clients that keep a connection to the router alive across its reloads.

A reload (`nginx -s reload`, SIGHUP: every routing change) makes nginx's old workers close their
idle keep-alive connections. A client that reuses such a connection without checking whether the
server closed it (a hand-written `http.client` loop) fails its next request, once per connection
and reload. `service.router.client_keepalive_timeout: 0` closes each client connection after its
response, so there is none to reuse: the same clients fail nothing.
"""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time

from routing_support import free_port, make_spec, needs_nginx

from skyhedge.routing import Router

pytestmark = needs_nginx

BODY = b'{"prompt": "The sea", "max_tokens": 2, "seed": 1}'
CLIENTS = 2
RELOADS = 5


def blind_clients_across_reloads(router: Router, port: int) -> tuple[int, int, set[str]]:
    """CLIENTS loops of completions, 0.1 s apart, each on one kept-alive connection reused without
    a check (reopened only after a failure or a `Connection: close`), while nginx reloads RELOADS
    times; returns (answered 200, failed, the Connection header values seen)."""
    stop = threading.Event()
    lock = threading.Lock()
    tally = {"ok": 0, "failed": 0}
    seen: set[str] = set()

    def loop() -> None:
        conn: http.client.HTTPConnection | None = None
        while not stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("POST", "/v1/completions", BODY, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                header = (resp.getheader("Connection") or "").lower()
                with lock:
                    tally["ok" if resp.status == 200 else "failed"] += 1
                    seen.add(header)
                if header == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                with lock:
                    tally["failed"] += 1
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(0.1)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=loop) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        pid = router.pid()
        assert pid is not None
        for _ in range(RELOADS):
            os.kill(pid, signal.SIGHUP)
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
    return tally["ok"], tally["failed"], seen


def test_blind_keep_alive_clients_lose_requests_to_reloads_by_default(tmp_path, fleet, routers):
    """The behaviour the knob exists for (and the docs measure): kept-alive connections a reload
    closed fail the requests sent on them."""
    port = free_port()
    router = Router(make_spec(port), tmp_path / "state")
    routers.append(router)
    fleet.start(1)
    router.up(fleet.upstreams())
    assert "keepalive_timeout 75s;" in router.paths.conf.read_text()
    ok, failed, seen = blind_clients_across_reloads(router, port)
    assert ok > 0 and failed >= 1, (ok, failed)
    assert "keep-alive" in seen


def test_client_keepalive_timeout_0_leaves_no_connection_for_a_reload_to_break(tmp_path, fleet, routers):
    port = free_port()
    router = Router(make_spec(port, router={"client_keepalive_timeout": 0}), tmp_path / "state")
    routers.append(router)
    fleet.start(1)
    router.up(fleet.upstreams())
    assert "keepalive_timeout 0s;" in router.paths.conf.read_text()
    ok, failed, seen = blind_clients_across_reloads(router, port)
    assert ok > 0 and failed == 0, (ok, failed)
    assert seen == {"close"}
