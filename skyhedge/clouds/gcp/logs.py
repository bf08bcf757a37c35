"""A GCP replica's log: its instance's serial port 1 (instances.getSerialPortOutput).

Compute Engine keeps the newest 1 MB of the port; `start` is a byte offset into everything the
port ever wrote, and the reply's `next` is where the following read starts. When `start` has
already left the buffer, the reply begins later than asked: that read is marked skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from skyhedge.clouds.gcp import api_error_message, request, resolve_project
from skyhedge.clouds.gcp.events import compute_endpoint, default_session
from skyhedge.errors import CloudError
from skyhedge.replica_logs import LogChunk

if TYPE_CHECKING:
    from skyhedge.spec import ServiceSpec
    from skyhedge.state import ReplicaRecord

#: A test or a caller with its own authorized session sets this.
SESSION: Any = None


def instance_name(spec: ServiceSpec, record: ReplicaRecord) -> str:
    """The instance's name: as the module reported it, else as the module names it."""
    return str(record.outputs.get("name") or f"skyhedge-{spec.name}-{record.id}")


def read_log(spec: ServiceSpec, state_dir: Path, record: ReplicaRecord, start: object) -> LogChunk:
    import requests
    from google.auth.exceptions import GoogleAuthError

    project = resolve_project(spec.gcp.project)
    if not project:
        raise CloudError(f"gcp: no project: set gcp.project in {spec.source} or $GOOGLE_PROJECT")
    name = instance_name(spec, record)
    url = (
        f"{compute_endpoint()}/projects/{quote(project, safe=':')}/zones/{quote(record.zone, safe='')}"
        f"/instances/{quote(name, safe='')}/serialPort"
    )
    params = {"port": "1"}
    if isinstance(start, int):
        params["start"] = str(start)
    session = SESSION or default_session()
    try:
        reply = request(session, "GET", url, params=params, timeout=30)
    except (requests.RequestException, GoogleAuthError) as exc:
        raise CloudError(f"gcp: {record.id}: GET {url}: {exc}") from exc
    if reply.status_code != 200:
        raise CloudError(f"gcp: {record.id}: GET {url}: HTTP {reply.status_code}: {api_error_message(reply)}")
    try:
        body = reply.json()
        text = str(body.get("contents") or "")
        began, end = int(body.get("start", 0)), int(body["next"])
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CloudError(f"gcp: {record.id}: GET {url}: not a serial port output reply") from exc
    skipped = ""
    if began > (start if isinstance(start, int) else 0):
        skipped = f"the serial port no longer keeps its first {began} bytes"
    return LogChunk(text, end, f"serial port 1 of {name} ({record.zone})", skipped=skipped)
