"""Helpers for the render/engine/local/apply tests: specs, a tiny replica server, free ports, cleanup.

Every test that can start a replica process uses `local_service` (or `kill_replicas`), whose
finalizer SIGKILLs whatever still runs under the test's state dir, even when the test failed.
"""

from __future__ import annotations

import json
import random
import socket
import sys
import textwrap
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from skyhedge.clouds.local import runtime_dir
from skyhedge.clouds.local.processes import find_processes, kill_all, list_pidfiles

# A replica server: /health answers 200, /env/NAME answers the value of $NAME (JSON), port from $PORT.
SERVER = textwrap.dedent(
    """
    import json, os
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health":
                body = json.dumps({"replica": os.environ.get("SKYHEDGE_REPLICA_ID")}).encode()
            elif self.path.startswith("/env/"):
                body = json.dumps(os.environ.get(self.path[5:])).encode()
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
    """
)


def ephemeral_low() -> int:
    """The first port the kernel hands out to outgoing connections (their local end): a replica
    port picked at or above it can be taken between the check and the launch by any client of
    127.0.0.1 (nginx to an upstream, a test's request, Terraform's provider), and the launch then
    fails, "already in use by another process" (seen once in CI)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_base_port(count: int, *, low: int = 20000, high: int = 58000) -> int:
    """A base port such that base+1 .. base+count are all free on 127.0.0.1 right now, below the
    ephemeral range when there is room there (`ephemeral_low`)."""
    if ephemeral_low() - low > 4 * count:
        high = min(high, ephemeral_low())
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(low, high - count)
        if all(port_free(base + i) for i in range(1, count + 1)):
            return base
    raise RuntimeError("no free port range found")


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def get(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=timeout) as resp:
        return resp.status, json.loads(resp.read() or b"null")


def spec_dict(
    name: str,
    base_port: int,
    *,
    replicas: int = 3,
    zones: tuple[str, ...] = ("local-a", "local-b", "local-c"),
    command: str | None = None,
    env: dict[str, str] | None = None,
    server: Path | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "placement": {"clouds": ["local"], "zones": list(zones)},
        "resources": {"local_base_port": base_port},
        "replica_policy": {
            "min_replicas": replicas,
            "num_overprovision": 0,
            "dynamic_ondemand_fallback": False,
            "policy": "spothedge",
        },
        "readiness_probe": {"path": "/health", "initial_delay_seconds": 20, "timeout_seconds": 2},
        "run": {
            "command": command or f"exec {sys.executable} {server}",
            "env": env or {},
        },
    }


@dataclass
class LocalService:
    """A throwaway local service: spec file, state dir, base port, the replica server script."""

    root: Path
    name: str
    base_port: int
    server: Path

    @property
    def spec_path(self) -> Path:
        return self.root / "service.yaml"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def runtime(self) -> Path:
        return runtime_dir(self.state_dir)

    def write(self, **overrides: Any) -> Path:
        data = spec_dict(self.name, self.base_port, server=self.server, **overrides)
        self.spec_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return self.spec_path

    def failing_command(self, replica_id: str, flag: Path, message: str = "refused") -> str:
        """The replica server's command, except that `replica_id` prints `message` and exits at
        once while the file `flag` exists: a launch that fails on purpose, then succeeds."""
        return (
            f'if [ "$SKYHEDGE_REPLICA_ID" = {replica_id} ] && [ -e {flag} ]; then '
            f'echo "{message}" >&2; exit 3; fi; exec {sys.executable} {self.server}'
        )

    def port(self, replica_id: str) -> int:
        return self.base_port + int(replica_id.split("-")[1])

    def pids(self) -> dict[str, int]:
        return {p.id: p.pid for p in list_pidfiles(self.runtime)}

    def processes(self) -> list[int]:
        return find_processes(self.runtime)

    def cleanup(self) -> list[int]:
        return kill_all(self.runtime)


def make_service(tmp_path: Path, name: str, replicas: int = 3) -> LocalService:
    server = tmp_path / "server.py"
    server.write_text(SERVER, encoding="utf-8")
    return LocalService(tmp_path, name, free_base_port(replicas + 6), server)
