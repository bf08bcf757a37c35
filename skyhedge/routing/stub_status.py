"""nginx `stub_status` counters, read over HTTP from the router's local-only status port.

The page looks like:

    Active connections: 2
    server accepts handled requests
     16 16 31
    Reading: 0 Writing: 1 Waiting: 1

`requests` is cumulative since nginx started (a reload keeps it; a restart resets it), so a
reader computes rates from differences and treats a decrease as a restart. Each read of the page
is itself one request.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request

from skyhedge.errors import RoutingError

_PATTERN = re.compile(
    r"Active connections:\s*(?P<active>\d+)\s+"
    r"server accepts handled requests\s+(?P<accepts>\d+)\s+(?P<handled>\d+)\s+(?P<requests>\d+)\s+"
    r"Reading:\s*(?P<reading>\d+)\s+Writing:\s*(?P<writing>\d+)\s+Waiting:\s*(?P<waiting>\d+)"
)
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def parse_stub_status(text: str) -> dict[str, int]:
    """`active`, `accepts`, `handled`, `requests`, `reading`, `writing`, `waiting` as integers."""
    match = _PATTERN.search(text)
    if not match:
        first = text.strip().splitlines()[0] if text.strip() else "empty"
        raise RoutingError(f"not an nginx stub_status page: {first[:80]!r}")
    return {k: int(v) for k, v in match.groupdict().items()}


def read_stub_status(url: str, *, timeout: float = 2.0) -> dict[str, int]:
    """Fetch and parse the status page at `url` (the router's `status()["status_url"]`)."""
    try:
        with _NO_PROXY.open(url, timeout=timeout) as resp:
            text = resp.read(4096).decode("ascii", errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RoutingError(f"cannot read nginx stub_status at {url}: {exc}") from exc
    return parse_stub_status(text)
