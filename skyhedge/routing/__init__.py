"""nginx routing for one service: config generation, validated swaps, graceful reloads and drains.

    Router(spec, state_dir).up([Upstream("r-0001", "http://10.0.0.5:8000"), ...])
    router.drain(survivors)   # before destroying the others
    router.status()           # {"endpoint", "pid", "upstreams", "status_url"}

`config` renders the text (pure), `nginx` knows the binary and its processes, `router` runs the
lifecycle, `stub_status` reads the request counters the autoscaler uses.
"""

from skyhedge.routing.config import RouterOptions, Upstream, render_config
from skyhedge.routing.router import Router, running_router_pid, workers_alive
from skyhedge.routing.stub_status import parse_stub_status, read_stub_status

__all__ = [
    "Router",
    "RouterOptions",
    "Upstream",
    "parse_stub_status",
    "read_stub_status",
    "render_config",
    "running_router_pid",
    "workers_alive",
]
