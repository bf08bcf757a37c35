"""The GCP cloud: render inputs (render.py), zone operations and instance status (events.py)."""

from __future__ import annotations

import os
from typing import Any

from skyhedge.errors import CloudError

__all__ = ["PROJECT_ENV", "api_error_message", "json_object", "resolve_project"]

#: Where the google Terraform provider looks for a project when the root sets none, in its order.
PROJECT_ENV = ("GOOGLE_PROJECT", "GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT")


def api_error_message(response: Any) -> str:
    """One line from a Google API error reply: its `error.message`, else the body, squeezed."""
    try:
        text = str(response.json()["error"]["message"])
    except Exception:
        text = (getattr(response, "text", "") or "")[:200]
    return " ".join(text.split())


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
