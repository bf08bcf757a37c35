"""Ports the benchmark scripts take on 127.0.0.1: a free port for a router or metrics endpoint,
and a base with free ports above it for local replicas (r-000N listens on base + N). Scripts run
as `python benchmarks/NAME.py`, so this folder is on `sys.path` for them."""

from __future__ import annotations

import socket


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_below(top: int) -> int:
    """A free port under `top`: the watcher refuses a metrics or router port in the replicas'
    range, which starts above the base."""
    for port in range(top - 1, max(1024, top - 2000), -1):
        if _free(port):
            return port
    raise SystemExit(f"error: no free port below {top}")


def free_base(span: int, *, low: int = 20000, high: int = 32000, step: int = 97) -> int:
    """A base port with `span` free ports above it, below the ephemeral range by default (a port
    there may be handed to an outgoing connection while the replicas are down)."""
    for base in range(low, high - span, step):
        if all(_free(p) for p in range(base + 1, base + span + 1)):
            return base
    raise SystemExit(f"error: no {span} free ports in a row between {low} and {high}")
