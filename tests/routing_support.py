"""Helpers for the routing, probe and local-echo tests: real replica processes, a real nginx, and
teardown that leaves no process behind even when a test fails half-way."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from skyhedge.routing import Router, Upstream
from skyhedge.routing import nginx as nginx_proc
from skyhedge.spec import ServiceSpec, parse_spec
from skyhedge.state import ReplicaRecord

REPO = Path(__file__).resolve().parents[1]
ECHO = REPO / "examples" / "local-echo" / "server.py"


def have_nginx() -> bool:
    return bool(shutil.which("nginx") or os.access("/usr/sbin/nginx", os.X_OK))


needs_nginx = pytest.mark.skipif(not have_nginx(), reason="nginx is not installed (.ci/run installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_spec(
    port: int, *, lb: str = "least_load", name: str = "echo", router: dict[str, Any] | None = None
) -> ServiceSpec:
    service: dict[str, Any] = {"host": "127.0.0.1", "port": port, "load_balancing_policy": lb}
    if router is not None:
        service["router"] = router
    return parse_spec(
        {
            "name": name,
            "placement": {"clouds": ["local"]},
            "run": {"command": "python3 examples/local-echo/server.py"},
            "service": service,
            "readiness_probe": {"path": "/health", "timeout_seconds": 2},
        }
    )


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def replica(self) -> str | None:
        return self.headers.get("x-replica-id")

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    url_base: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    timeout: float = 10.0,
    conn: http.client.HTTPConnection | None = None,
) -> Response:
    """One request; a fresh connection (closed after) unless `conn` is given."""
    own = conn is None
    if conn is None:
        host, port = url_base.removeprefix("http://").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload)
    finally:
        if own:
            conn.close()


def complete(url_base: str, *, max_tokens: int = 4, **kw: Any) -> Response:
    return request(
        url_base, "POST", "/v1/completions", {"prompt": "The keeper", "max_tokens": max_tokens}, **kw
    )


@dataclass
class Replica:
    id: str
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def upstream(self) -> Upstream:
        return Upstream(self.id, self.endpoint)


@dataclass
class Fleet:
    """Real local-echo processes; `close()` kills whatever is left (call it from a finalizer)."""

    log_dir: Path
    replicas: dict[str, Replica] = field(default_factory=dict)

    def start(self, count: int, *, env: dict[str, str] | None = None, first: int = 1) -> list[Replica]:
        started = []
        # A replica binds its port some time after it starts, so until then the kernel may hand the
        # same free port out again: two replicas given one port, the second dies, and a router
        # config listing both is refused (`share the endpoint`). Never hand out a port twice.
        taken = {r.port for r in self.replicas.values() if r.proc.poll() is None}
        for n in range(first, first + count):
            rid = f"r-{n:04d}"
            port = free_port()
            while port in taken:
                port = free_port()
            taken.add(port)
            full_env = {**os.environ, "PORT": str(port), "SKYHEDGE_REPLICA_ID": rid, **(env or {})}
            log = open(self.log_dir / f"{rid}.log", "wb")  # noqa: SIM115 (the child owns it)
            with log:
                proc = subprocess.Popen(
                    [sys.executable, str(ECHO)],
                    env=full_env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.replicas[rid] = Replica(rid, port, proc)
            started.append(self.replicas[rid])
        for r in started:
            wait_healthy(r.endpoint, proc=r.proc)
        return started

    def upstreams(self) -> list[Upstream]:
        return [r.upstream for r in self.replicas.values() if r.proc.poll() is None]

    def kill(self, rid: str, sig: int = signal.SIGKILL, *, wait: float = 10.0) -> int:
        proc = self.replicas[rid].proc
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        return proc.wait(timeout=wait)

    def close(self) -> None:
        """Kill every replica; a test's SIGSTOPped (hung, vanished) one is continued first, so
        that no stopped process group lingers whatever the test did."""
        for r in self.replicas.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(r.proc.pid, signal.SIGCONT)
            if r.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    r.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.proc.wait(timeout=5)


def wait_healthy(
    endpoint: str, *, proc: subprocess.Popen[bytes] | None = None, timeout: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{endpoint}: process exited with {proc.returncode}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if request(endpoint, "GET", "/health", timeout=1.0).status == 200:
                return
        time.sleep(0.02)
    raise AssertionError(f"{endpoint} did not become healthy within {timeout}s")


def teardown_router(router: Router) -> None:
    """Stop nginx however it is (graceful, then by force), leaving no process of it behind: also
    a master whose pid file is gone with its folder (found by its command line)."""
    pids = {nginx_proc.read_pid(router.paths.pid), *nginx_proc.masters_of(router.paths.conf)} - {None}
    with contextlib.suppress(Exception):
        router.down(timeout=3.0)
    for pid in pids:
        if "nginx" in nginx_proc.cmdline(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        for p in nginx_proc.leftovers(pid):
            nginx_proc.signal_pid(p, signal.SIGKILL)


class _Answers500(BaseHTTPRequestHandler):
    """A replica whose model broke while its server runs: `/health` passes, completions answer
    500 (`poison`: only those whose body holds that word, as a prompt tripping a model bug)."""

    protocol_version = "HTTP/1.1"
    poison: bytes | None = None

    def do_GET(self) -> None:  # noqa: N802
        self._answer(200, b'{"status": "ok"}')

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.poison is None or self.poison in body:
            self._answer(500, b'{"error": {"message": "model failure", "type": "internal_error"}}')
        else:
            self._answer(200, b'{"choices": [{"text": " fine"}]}')

    def _answer(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Replica-Id", self.server.replica_id)  # type: ignore[attr-defined]
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """nginx closing its idle keep-alive connections at teardown is no error worth a traceback."""


@contextlib.contextmanager
def replica_answering_500(replica_id: str, *, poison: bytes | None = None) -> Iterator[Upstream]:
    """A fake replica on 127.0.0.1 answering completions with 500 (all of them, or with `poison`
    those holding that word) while `/health` says 200; stopped when the block ends."""
    handler = type("Handler", (_Answers500,), {"poison": poison})
    server = _QuietServer(("127.0.0.1", 0), handler)
    server.replica_id = replica_id  # type: ignore[attr-defined]
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Upstream(replica_id, f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def record(rid: str, endpoint: str | None, *, ready: bool = True, **kw: object) -> ReplicaRecord:
    """A local replica record launched a minute ago, READY (unless `ready` is false) at `endpoint`."""
    now = time.time()
    return ReplicaRecord(
        id=rid,
        cloud="local",
        region="local",
        zone="local-a",
        market="spot",
        launched_at=now - 60,
        provisioned_at=now - 50,
        ready_at=now - 40 if ready else None,
        endpoint=endpoint,
        **kw,  # type: ignore[arg-type]
    )
