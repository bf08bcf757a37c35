"""Readiness probes: is a replica's model server answering `readiness_probe.path` with a 2xx?

SkyServe semantics: GET, or POST with `post_data` as a JSON body when it is set (a mapping is
encoded; a string is sent as is, it is taken to be JSON already), with the spec's headers, within
`timeout_seconds`. Only a 2xx counts: a redirect is not followed (it would probe something else),
a refused connection, a timeout or any other status is "not ready". Probes go straight to the
replica, never through an HTTP proxy from the environment.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from skyhedge.spec import ReadinessProbe


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


@dataclass(frozen=True)
class ProbeResult:
    """One probe's outcome; `status` is the HTTP code when there was one, `error` says why not ready."""

    endpoint: str
    ok: bool
    status: int | None
    error: str | None
    seconds: float


def _request(endpoint: str, readiness: ReadinessProbe) -> urllib.request.Request:
    url = endpoint.rstrip("/") + readiness.path
    headers = {"User-Agent": "skyhedge-probe"}
    data = None
    if readiness.post_data is not None:
        post = readiness.post_data
        data = (post if isinstance(post, str) else json.dumps(post)).encode()
        headers["Content-Type"] = "application/json"
    headers.update(readiness.headers)
    return urllib.request.Request(
        url, data=data, headers=headers, method="POST" if data is not None else "GET"
    )


def check(endpoint: str, readiness: ReadinessProbe, *, timeout: float | None = None) -> ProbeResult:
    """Probe once and say why; `timeout` overrides `readiness.timeout_seconds`."""
    started = time.monotonic()
    limit = float(readiness.timeout_seconds if timeout is None else timeout)
    status: int | None = None
    error: str | None = None
    try:
        req = _request(endpoint, readiness)
        with _OPENER.open(req, timeout=limit) as resp:
            status = resp.status
            resp.read(65536)
    except urllib.error.HTTPError as exc:
        status = exc.code
        exc.close()
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        error = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
    ok = status is not None and 200 <= status < 300
    if status is not None and not ok:
        error = f"HTTP {status}"
    return ProbeResult(endpoint, ok, status, error, time.monotonic() - started)


def probe(endpoint: str, readiness: ReadinessProbe, *, timeout: float | None = None) -> bool:
    """True only when `endpoint` + `readiness.path` answers 2xx within the timeout."""
    return check(endpoint, readiness, timeout=timeout).ok


def check_all(
    endpoints: Iterable[str],
    readiness: ReadinessProbe,
    *,
    max_workers: int = 32,
    timeout: float | None = None,
) -> dict[str, ProbeResult]:
    """Probe every endpoint concurrently, so one slow replica costs one timeout, not N of them."""
    unique = list(dict.fromkeys(endpoints))
    if not unique:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(unique)))) as pool:
        return {r.endpoint: r for r in pool.map(lambda e: check(e, readiness, timeout=timeout), unique)}


def probe_all(
    endpoints: Iterable[str],
    readiness: ReadinessProbe,
    *,
    max_workers: int = 32,
    timeout: float | None = None,
) -> dict[str, bool]:
    """endpoint -> passed, probed concurrently (see `check_all` for the reasons)."""
    return {
        e: r.ok for e, r in check_all(endpoints, readiness, max_workers=max_workers, timeout=timeout).items()
    }
