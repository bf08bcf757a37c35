"""Readiness probes: is a replica's model server answering `readiness_probe.path` with a 2xx?

SkyServe semantics: GET, or POST with `post_data` as a JSON body when it is set (a mapping is
encoded; a string is sent as is, it is taken to be JSON already), with the spec's headers, within
`timeout_seconds` for the whole answer (see `check`). Only a 2xx with its body counts: a redirect is
not followed (it would probe something else), a refused connection, a timeout (also one in the
middle of the body) or any other status is "not ready". Probes go straight to the replica, never
through an HTTP proxy from the environment.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from skyhedge.errors import escape_controls
from skyhedge.spec import ReadinessProbe


@dataclass(frozen=True)
class ProbeResult:
    """One probe's outcome; `status` is the HTTP code when there was one, `error` says why not ready.

    `local`: the probe could not even be made here, this machine being out of what a connection
    needs (`LOCAL_ERRNOS`: file descriptors, ephemeral ports, kernel buffers). Such a result says
    nothing about the replica, and the watcher does not judge it by it (`HttpProber`)."""

    endpoint: str
    ok: bool
    status: int | None
    error: str | None
    seconds: float
    local: bool = False


#: Errors of a probe that say this machine could not open the connection, not that the replica
#: failed: this process out of file descriptors (EMFILE), the system's file table full (ENFILE),
#: no ephemeral port left to connect from (EADDRNOTAVAIL, "Cannot assign requested address": a
#: host churning short connections, TIME_WAIT filling the port range), the kernel out of socket
#: buffers or memory (ENOBUFS, ENOMEM). Judged as failures, every replica went NOT_READY at once,
#: on-demand covers were launched for all of them, and they were FAILED after initial_delay.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EADDRNOTAVAIL, errno.ENOBUFS, errno.ENOMEM})

#: How the error of a probe that got no complete answer in time begins (`check`, `timed_out`).
TIMED_OUT = "TimeoutError"

#: The part of the answer a probe reads: the whole body, or this much of a longer one.
BODY_LIMIT = 65536
#: The most of an error's text a probe keeps (a bad status line may be 64 KiB long).
ERROR_LIMIT = 300


#: The most probes run at once (each a thread, and a timer thread while it waits). A probe that
#: hangs (a booting VM's address drops connections, a wedged server, a black-holed region) costs
#: the whole timeout, so a round with more hung replicas than this costs a timeout per batch: at
#: 32 at once, 200 booting replicas held each round for 7 timeouts (at apply's 16, 13), 1.5-3 min
#: at the default 15 s, while the watcher heard of nothing else. 256 keep a round to one timeout
#: for up to 256 hung replicas, in ~40 MB (1,000 at once: 2,000 threads, 73 MB, 0.9 s to start).
MAX_PROBES_AT_ONCE = 256


def probe_workers(count: int) -> int:
    """Threads for a round of `count` probes: all at once, up to MAX_PROBES_AT_ONCE."""
    return max(1, min(count, MAX_PROBES_AT_ONCE))


def _printable(text: str) -> str:
    """An error's text as one line, its control characters shown escaped (`\\x1b`): it may quote
    what a replica answered (`BadStatusLine: <its first line>`), and it reaches the operator's
    terminal (`routing up --probe`), the watcher's log lines, the dashboard and the state's
    history, where an escape sequence the replica sent must not act on a terminal."""
    text = escape_controls(text.strip()).replace("\t", " ")
    return text if len(text) <= ERROR_LIMIT else text[: ERROR_LIMIT - 3] + "..."


def _request(endpoint: str, readiness: ReadinessProbe) -> tuple[str, str, bytes | None, dict[str, str]]:
    """(method, url, body, headers) of the probe."""
    url = endpoint.rstrip("/") + readiness.path
    headers = {"User-Agent": "skyhedge-probe"}
    data = None
    if readiness.post_data is not None:
        post = readiness.post_data
        data = (post if isinstance(post, str) else json.dumps(post)).encode()
        headers["Content-Type"] = "application/json"
    headers.update(readiness.headers)
    return ("POST" if data is not None else "GET"), url, data, headers


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return cls(parts.hostname, parts.port, timeout=timeout), target


def check(endpoint: str, readiness: ReadinessProbe, *, timeout: float | None = None) -> ProbeResult:
    """Probe once and say why; `timeout` overrides `readiness.timeout_seconds`.

    The timeout bounds the whole probe, connection, headers and body (up to BODY_LIMIT bytes),
    not each read: a server trickling its answer would otherwise hold the probe, and the pass that
    runs it, for as long as it trickles. At the deadline the socket is shut down from a timer,
    which ends any read in progress.
    """
    started = time.monotonic()
    limit = float(readiness.timeout_seconds if timeout is None else timeout)
    status: int | None = None
    error: str | None = None
    local = False
    expired = threading.Event()
    conn: http.client.HTTPConnection | None = None

    def abort() -> None:
        expired.set()
        sock = conn.sock if conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(limit, abort)
    timer.daemon = True
    try:
        method, url, body, headers = _request(endpoint, readiness)
        conn, target = _connection(url, limit)
        timer.start()
        conn.request(method, target, body=body, headers=headers)
        resp = conn.getresponse()
        status = resp.status
        body = resp.read(BODY_LIMIT)
        if len(body) < BODY_LIMIT and resp.length:  # the server closed before its Content-Length
            raise http.client.IncompleteRead(body, resp.length)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        text = _printable(str(exc))
        error = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        local = isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS
        if isinstance(exc, TimeoutError):  # the socket's own timeout, a hair before the timer's
            expired.set()
    finally:
        timer.cancel()
        if conn is not None:
            conn.close()
    if expired.is_set():
        error = f"{TIMED_OUT}: timed out (no complete answer within {limit:g}s)"
    ok = status is not None and 200 <= status < 300 and error is None
    if status is not None and not 200 <= status < 300:
        error = f"HTTP {status}"
    return ProbeResult(endpoint, ok, status, error, time.monotonic() - started, local=local and not ok)


def timed_out(error: str) -> bool:
    """Whether a probe's error (`ProbeResult.error`, a watcher's probe detail) says the replica
    did not answer in time: connected (or not even that) and left waiting, as a hung server or
    a vanished machine leaves its clients, where a refused connection or an error status is an
    answer of sorts. The watcher cuts such a replica's unanswered requests when it takes it out
    of the router (`Controller._cut_hung`)."""
    return error.startswith(TIMED_OUT)


def probe(endpoint: str, readiness: ReadinessProbe, *, timeout: float | None = None) -> bool:
    """True only when `endpoint` + `readiness.path` answers 2xx within the timeout."""
    return check(endpoint, readiness, timeout=timeout).ok


def check_all(
    endpoints: Iterable[str],
    readiness: ReadinessProbe,
    *,
    max_workers: int = MAX_PROBES_AT_ONCE,
    timeout: float | None = None,
) -> dict[str, ProbeResult]:
    """Probe every endpoint concurrently, so one slow replica costs one timeout, not N of them."""
    unique = list(dict.fromkeys(endpoints))
    if not unique:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, probe_workers(len(unique))))) as pool:
        return {r.endpoint: r for r in pool.map(lambda e: check(e, readiness, timeout=timeout), unique)}


def probe_all(
    endpoints: Iterable[str],
    readiness: ReadinessProbe,
    *,
    max_workers: int = MAX_PROBES_AT_ONCE,
    timeout: float | None = None,
) -> dict[str, bool]:
    """endpoint -> passed, probed concurrently (see `check_all` for the reasons)."""
    return {
        e: r.ok for e, r in check_all(endpoints, readiness, max_workers=max_workers, timeout=timeout).items()
    }
