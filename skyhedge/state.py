"""The service's persisted facts: versioned JSON under the state dir, atomic writes, one writer.

Layout of a state dir (default `./.skyhedge/<service>/`):
    state.json      this file's `ServiceState` (facts, never derived status)
    state.lock      held by the one process allowed to write (apply, destroy, watch)
    tf/             the rendered Terraform roots and their local Terraform state
    router/         nginx prefix (routing)

We store what was observed (launched/ready/gone timestamps, endpoints, Terraform outputs) and
derive replica status from it (`ReplicaFact.status`). Writes go to a temp file and are renamed
into place, so a crash never leaves half a state file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from skyhedge.errors import StateError
from skyhedge.policy.types import EventKind, Location, Market, ReplicaFact, ZoneEvent

STATE_VERSION = 1
STATE_FILE = "state.json"
LOCK_FILE = "state.lock"


def default_state_dir(service: str) -> Path:
    return Path(".skyhedge") / service


@dataclass
class ReplicaRecord:
    """Everything known about one replica (live or gone), as plain JSON-able fields."""

    id: str
    cloud: str
    region: str
    zone: str
    market: str
    launched_at: float
    instance_type: str | None = None
    provisioned_at: float | None = None
    ready_at: float | None = None
    not_ready_since: float | None = None
    gone_at: float | None = None
    reason: str | None = None
    draining: bool = False
    endpoint: str | None = None
    cloud_id: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def location(self) -> Location:
        return Location(self.cloud, self.region, self.zone)

    def fact(self) -> ReplicaFact:
        return ReplicaFact(
            id=self.id,
            location=self.location,
            market=Market(self.market),
            launched_at=self.launched_at,
            provisioned_at=self.provisioned_at,
            ready_at=self.ready_at,
            not_ready_since=self.not_ready_since,
            gone_at=self.gone_at,
            reason=self.reason,
            draining=self.draining,
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReplicaRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class ServiceState:
    service: str
    version: int = STATE_VERSION
    next_id: int = 1
    replicas: dict[str, ReplicaRecord] = field(default_factory=dict)
    policy_memory: dict[str, Any] = field(default_factory=dict)
    pending_events: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    router: dict[str, Any] | None = None
    target: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    HISTORY_LIMIT = 200

    def live(self) -> list[ReplicaRecord]:
        return [r for r in self.replicas.values() if r.gone_at is None]

    def facts(self) -> tuple[ReplicaFact, ...]:
        return tuple(r.fact() for r in self.live())

    def events(self) -> tuple[ZoneEvent, ...]:
        return tuple(
            ZoneEvent(
                kind=EventKind(e["kind"]),
                location=Location.parse(e["location"]),
                at=float(e["at"]),
                replica_id=e.get("replica_id"),
            )
            for e in self.pending_events
        )

    def record_event(self, event: ZoneEvent) -> None:
        item = {"kind": event.kind.value, "location": event.location.key, "at": event.at}
        if event.replica_id:
            item["replica_id"] = event.replica_id
        self.pending_events.append(item)
        self.log({"event": event.kind.value, **item})

    def log(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        del self.history[: -self.HISTORY_LIMIT]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["replicas"] = {k: asdict(v) for k, v in sorted(self.replicas.items())}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], *, where: str) -> ServiceState:
        if not isinstance(data, dict) or "service" not in data:
            raise StateError(f"{where}: not a skyhedge state file")
        version = data.get("version")
        if version != STATE_VERSION:
            raise StateError(
                f"{where}: state version {version!r} is not supported (expected {STATE_VERSION})"
            )
        try:
            replicas = {k: ReplicaRecord.from_json(v) for k, v in (data.get("replicas") or {}).items()}
            return cls(
                service=data["service"],
                version=version,
                next_id=int(data.get("next_id", 1)),
                replicas=replicas,
                policy_memory=dict(data.get("policy_memory") or {}),
                pending_events=list(data.get("pending_events") or []),
                history=list(data.get("history") or []),
                router=data.get("router"),
                target=data.get("target"),
                extra=dict(data.get("extra") or {}),
            )
        except (TypeError, ValueError, KeyError) as exc:
            raise StateError(f"{where}: malformed state ({exc})") from exc


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_state(state_dir: Path, service: str) -> ServiceState:
    """The state in `state_dir`, or a fresh one if there is none yet."""
    path = state_dir / STATE_FILE
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ServiceState(service=service)
    except OSError as exc:
        raise StateError(f"{path}: cannot read ({exc})") from exc
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StateError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    state = ServiceState.from_json(data, where=str(path))
    if state.service != service:
        raise StateError(f"{path}: holds service {state.service!r}, not {service!r}")
    return state


def save_state(state_dir: Path, state: ServiceState) -> None:
    atomic_write_text(state_dir / STATE_FILE, json.dumps(state.to_json(), indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def writer_lock(state_dir: Path, *, timeout: float = 0.0) -> Iterator[None]:
    """Hold the service's one-writer lock, or fail at once with a clear error."""
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(state_dir / LOCK_FILE), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise StateError(
            f"{state_dir}: another skyhedge process (apply, destroy or watch) holds the lock for this service"
        ) from None
    try:
        yield
    finally:
        lock.release()
