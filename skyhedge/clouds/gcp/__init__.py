"""The GCP cloud: render inputs (render.py), zone operations and instance status (events.py)."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from skyhedge.errors import CloudError

__all__ = ["PROJECT_ENV", "api_error_message", "json_object", "request", "resolve_project", "retryable"]

#: Where the google Terraform provider looks for a project when the root sets none, in its order.
PROJECT_ENV = ("GOOGLE_PROJECT", "GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT")

#: Attempts of one Compute call that Google answers "try again": as many as botocore's standard
#: retry mode gives every EC2 call skyhedge makes (throttling and 5xx included).
RETRY_ATTEMPTS = 3
#: Backoff before the second attempt (then doubled), with full jitter; a `Retry-After` up to
#: RETRY_AFTER_MAX_SECONDS is honoured instead.
RETRY_BASE_SECONDS = 0.5
RETRY_AFTER_MAX_SECONDS = 5.0
#: Statuses Google's API guidance says to retry with exponential backoff: too many requests, and
#: the server-side failures (backendError, internalError, a gateway or the service unavailable).
#: A 5xx is retried for a read only: a delete it answered may have started all the same.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
THROTTLED_STATUSES = frozenset({429})
#: Compute's rate limit comes as HTTP 403 with one of these reasons (a 403 is otherwise final:
#: a permission denied or a real quota, retried in vain).
RATE_LIMIT_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})


def api_error_message(response: Any) -> str:
    """One line from a Google API error reply: its `error.message`, else the body, squeezed."""
    try:
        text = str(response.json()["error"]["message"])
    except Exception:
        text = (getattr(response, "text", "") or "")[:200]
    return " ".join(text.split())


def _reasons(response: Any) -> set[str]:
    try:
        errors = response.json()["error"]["errors"]
        return {str(e.get("reason")) for e in errors if isinstance(e, dict)}
    except Exception:
        return set()


def retryable(response: Any, method: str = "GET") -> bool:
    """Whether a Compute reply to `method` says "try again": HTTP 429, a 403 whose reason is a
    rate limit (`rateLimitExceeded`: Compute's "Quota exceeded for quota metric 'Queries'"), both
    refused before anything was done, or for a GET a 5xx."""
    status = getattr(response, "status_code", None)
    again = RETRY_STATUSES if method.upper() == "GET" else THROTTLED_STATUSES
    return status in again or (status == 403 and bool(_reasons(response) & RATE_LIMIT_REASONS))


def _retry_after(response: Any) -> float | None:
    try:
        seconds = float(response.headers.get("Retry-After", ""))
    except (AttributeError, TypeError, ValueError):
        return None
    return seconds if 0 <= seconds <= RETRY_AFTER_MAX_SECONDS else None


def request(
    session: Any,
    method: str,
    url: str,
    *,
    params: Mapping[str, str] | None = None,
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """`session.request`, tried again (RETRY_ATTEMPTS in all, with jittered exponential backoff)
    while the reply is `retryable`; the last reply is returned whatever it is, and exceptions
    (a connection refused, a token that cannot be refreshed) go to the caller unretried.

    Why: EC2 calls get this from botocore; Compute calls went without, so a project busy enough to
    hit its per-minute read limit failed a watcher poll, or left an instance of an interrupted
    run undeleted until the next apply, on one 429."""
    for attempt in range(RETRY_ATTEMPTS):
        reply = session.request(method, url, params=dict(params or {}), timeout=timeout)
        if attempt + 1 >= RETRY_ATTEMPTS or not retryable(reply, method):
            return reply
        wait = _retry_after(reply)
        sleep(wait if wait is not None else random.uniform(0, RETRY_BASE_SECONDS * 2**attempt))
    raise AssertionError("unreachable")  # (the loop returns on its last attempt)


def json_object(response: Any, where: str) -> dict[str, Any]:
    """A Compute reply's body as a JSON object, or a CloudError saying so after `where` (the
    call: `gcp: GET URL`): a proxy's HTML page or a truncated body is one line, not a traceback."""
    try:
        body = response.json()
    except ValueError as exc:
        raise CloudError(f"{where}: not JSON") from exc
    if not isinstance(body, dict):
        raise CloudError(f"{where}: expected a JSON object, got {type(body).__name__}")
    return body


def resolve_project(configured: str | None) -> str | None:
    """The project the replicas live in, found as `apply` finds it: the spec's `gcp.project`, else
    the provider's environment variables, else the Application Default Credentials' project.

    The watcher must poll the project Terraform launched into; guessing differently would leave it
    polling `projects//...` while `apply` works.
    """
    if configured:
        return configured
    for name in PROJECT_ENV:
        if os.environ.get(name):
            return os.environ[name]
    try:
        import google.auth
        from google.auth.exceptions import GoogleAuthError

        _credentials, project = google.auth.default()
    except (ImportError, GoogleAuthError):
        return None
    return project or None
