"""The service's persisted facts: versioned JSON under the state dir, atomic writes, one writer.

Layout of a state dir (default `./.skyhedge/<service>/`):
    state.json      this file's `ServiceState` (facts, never derived status)
    state.lock      held by the one process allowed to write (apply, destroy, watch)
    tf/             the rendered Terraform roots and their local Terraform state (0700: it holds
                    the `run.env` values, see `private_dir`), and `probes.json`, the readiness
                    probes the watcher keeps for its restart (they may hold a token:
                    `probe_store`)
    router/         nginx prefix (routing)

We store what was observed (launched/ready/gone timestamps, endpoints, Terraform outputs) and
derive replica status from it (`ReplicaFact.status`). Writes go to a temp file and are renamed
into place, so a crash never leaves half a state file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import operator
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from skyhedge._interrupts import interrupts_deferred
from skyhedge._json import JSON_LIMITS, has_lone_surrogate, json_limit
from skyhedge.clouds import cloud_names
from skyhedge.errors import LockHeld, OutputError, StateError
from skyhedge.planner import replica_order
from skyhedge.policy.types import EventKind, Location, Market, ReplicaFact, ZoneEvent
from skyhedge.spec import ZONE_RE

STATE_VERSION = 1
#: Gone replicas kept in the state as history (see ServiceState.prune_gone).
GONE_KEPT = 500
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
    revision: str | None = None  # `spec.replica_revision` at launch (None: before revisions existed)

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
        """A record from already-validated JSON (see `_check_replica`); unknown keys are dropped so
        that a state file written by a newer skyhedge still loads."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ------------------------------------------------------------------------------------------------
# Validating a loaded state file
#
# state.json is meant to be written only by skyhedge, but people hand-edit it and disks corrupt it.
# Everything is checked at load time so that a bad file is one `StateError` naming the field,
# not a traceback from deep inside planning (or, worse, a wrong value accepted silently).

_MISSING: Any = object()

# A rule is (what is expected, in words; a test of a value).
# (what is expected, for the error: text, or a function making it when a check fails; the check)
Rule = tuple[str | Callable[[], str], Callable[[Any], bool]]


def _said(expected: str | Callable[[], str]) -> str:
    return expected() if callable(expected) else expected


def _is_number(value: Any) -> bool:
    """JSON numbers only: `true` is not 1 here, and NaN/Infinity (which `json` accepts) are no time."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value >= 1


def _is_location(value: Any) -> bool:
    """What `ServiceState.events` will hand to `Location.parse` later."""
    if not isinstance(value, str):
        return False
    try:
        Location.parse(value)
    except ValueError:
        return False
    return True


def _one_of(values: list[str]) -> Rule:
    return f"one of {', '.join(values)}", lambda v: isinstance(v, str) and v in values


def _or_null(rule: Rule) -> Rule:
    expected, ok = rule
    return (lambda: f"{_said(expected)} or null"), lambda v: v is None or ok(v)


_STRING: Rule = ("a string", lambda v: isinstance(v, str))
_NUMBER: Rule = ("a finite number", _is_number)
_BOOL: Rule = ("true or false", lambda v: isinstance(v, bool))
_OBJECT: Rule = ("an object", lambda v: isinstance(v, dict))
_LIST: Rule = ("a list", lambda v: isinstance(v, list))

# A replica ID as `planner.replica_id` makes them (`r-0007`; wider past 9999): it keys Terraform's
# `for_each`, names a local replica's pid and log files, and is shown in tables and logs.
_REPLICA_ID: Rule = (
    "a replica ID such as 'r-0007'",
    # as `planner.replica_id` writes them: 'r-00010000' next to 'r-10000' (a hand edit) was two
    # IDs of one number, i.e. one local port for two replicas
    lambda v: (
        isinstance(v, str)
        and v.startswith("r-")
        and v[2:].isascii()
        and v[2:].isdigit()
        and f"r-{int(v[2:]):04d}" == v
    ),
)
# A region or zone as the spec takes them (`spec.ZONE_RE`): shown in tables, logs and metrics.
_PLACE: Rule = (
    "a string of lowercase letters, digits and '-'",
    lambda v: isinstance(v, str) and ZONE_RE.fullmatch(v) is not None,
)

# A cloud skyhedge knows (`cloud_names`: its cloud folders and the registered ones), asked at each
# check: a cloud registered after this module was imported is one too.
_CLOUD: Rule = (
    lambda: f"one of {', '.join(cloud_names())}",
    lambda v: isinstance(v, str) and v in cloud_names(),
)

# One rule per `ReplicaRecord` field (checked just below, so a new field cannot go unvalidated).
_REPLICA_RULES: dict[str, Rule] = {
    "id": _REPLICA_ID,
    "cloud": _CLOUD,
    "region": _PLACE,
    "zone": _PLACE,
    "market": _one_of([m.value for m in Market]),
    "launched_at": _NUMBER,
    "instance_type": _or_null(_STRING),
    "provisioned_at": _or_null(_NUMBER),
    "ready_at": _or_null(_NUMBER),
    "not_ready_since": _or_null(_NUMBER),
    "gone_at": _or_null(_NUMBER),
    "reason": _or_null(_STRING),
    "draining": _BOOL,
    "endpoint": _or_null(_STRING),
    "cloud_id": _or_null(_STRING),
    "outputs": _OBJECT,
    "revision": _or_null(_STRING),
}
if set(_REPLICA_RULES) != {f.name for f in fields(ReplicaRecord)}:
    raise AssertionError("_REPLICA_RULES must have exactly one rule per ReplicaRecord field")
# The fields without a default, which every record must have.
_REPLICA_REQUIRED = {
    f.name for f in fields(ReplicaRecord) if f.default is MISSING and f.default_factory is MISSING
}

# The controller's bookkeeping in `extra` that `apply`, `watch` and `destroy` read back as these
# types (a hand edit that breaks one must be refused in one line, not crash them later).
#: `extra` key of the launch hold in force (`until`, `reason`): set by the watcher while a crash
#: loop (or launches given up) holds new launches back, shown by `status`.
LAUNCH_HOLD_KEY = "launch_hold"
#: `extra` key of the rolling update (or placement move) in progress (`replicas` still serving
#: until replaced, `since`; `refused`, `refused_since`, `stalled_since` while no replacement could
#: be launched): set by the watcher, shown by `status`.
ROLLOUT_KEY = "rollout"
#: `extra` key of the Terraform roots whose applies keep failing naming no launch of their own
#: (a cloud's credentials expired, its endpoint unreachable, throttled): root key -> `since`,
#: `failures` (in a row), `retry_at` (times), `reason` (the error line) and `idle_since` (a time
#: since which it has had nothing to apply, still failing; null or absent: not idle). Set by the
#: watcher, which holds each back with a backoff of its own (`controller.loop.RootOutage`), shown by
#: `status`. (Releases before `idle_since` check the other four only, and so read it.)
FAILING_ROOTS_KEY = "failing_roots"


def _is_failing_roots(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(o, dict)
        and _is_number(o.get("since"))
        and _is_number(o.get("retry_at"))
        and _is_int(o.get("failures"))
        and isinstance(o.get("reason"), str)
        and (o.get("idle_since") is None or _is_number(o.get("idle_since")))
        for o in v.values()
    )


#: `extra` key of the account quotas found used up: `{"cloud/region/market": {reason, since,
#: refusals, at, next_at}}` (region `*`: a quota across the cloud's regions): set by the watcher at
#: a launch refused for quota, dropped at the first launch there that succeeds; shown by `status`.
QUOTA_KEY = "quota"


def _is_quota_table(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str)
        and k.count("/") == 2
        and isinstance(e, dict)
        and isinstance(e.get("reason"), str)
        and _is_int(e.get("refusals"))
        and e["refusals"] >= 1
        and all(_is_number(e.get(t)) for t in ("since", "at", "next_at"))
        for k, e in v.items()
    )


def _is_rollout(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and isinstance(v.get("replicas"), list)
        and all(isinstance(x, str) for x in v["replicas"])
        and _is_number(v.get("since"))
        and isinstance(v.get("refused", {}), dict)
        and all(_is_int(n) for n in v.get("refused", {}).values())
        and all(v.get(k) is None or _is_number(v.get(k)) for k in ("refused_since", "stalled_since"))
    )


_EXTRA_RULES: dict[str, Rule] = {
    "warned": (
        "an object of replica id -> time",
        lambda v: isinstance(v, dict) and all(map(_is_number, v.values())),
    ),
    "terraform": _OBJECT,
    "launch_failures": ("a non-negative integer", lambda v: _is_int(v) and v >= 0),
    "survival_at": _or_null(_NUMBER),
    "decided_at": _or_null(_NUMBER),
    LAUNCH_HOLD_KEY: _or_null(
        (
            "an object with until (a time) and reason (text)",
            lambda v: isinstance(v, dict) and _is_number(v.get("until")) and isinstance(v.get("reason"), str),
        )
    ),
    FAILING_ROOTS_KEY: _or_null(
        (
            "an object of root -> since, retry_at (times), failures (a count), reason (text) "
            "and idle_since (a time or null)",
            _is_failing_roots,
        )
    ),
    QUOTA_KEY: (
        "an object of 'cloud/region/market' -> {reason (text), refusals (a positive integer), "
        "since, at, next_at (times)}",
        _is_quota_table,
    ),
    ROLLOUT_KEY: _or_null(
        (
            "an object with replicas (a list of ids), since (a time), refused (zone -> count), "
            "refused_since and stalled_since (times or null)",
            _is_rollout,
        )
    ),
}

_EVENT_RULES: dict[str, Rule] = {
    "kind": _one_of([k.value for k in EventKind]),
    "location": ("a location 'cloud/region/zone'", _is_location),
    "at": _NUMBER,
}


class _Malformed(Exception):
    """One field that failed its rule; `ServiceState.from_json` adds the file name."""

    def __init__(self, path: str, expected: str, value: Any) -> None:
        if value is _MISSING:
            found = "nothing (the field is missing)"
        elif value is None or isinstance(value, bool):
            found = json.dumps(value)  # as the file has it: null, true, false
        else:
            found = repr(value)  # repr escapes newlines: the message stays one line
            found = found if len(found) <= 60 else found[:57] + "..."
        super().__init__(f"{path}: expected {expected}, got {found}")


def _key(parent: str, key: str) -> str:
    """`parent.key`, quoting a key that would make the path ambiguous or span lines."""
    part = key if key and key.isprintable() and "." not in key and " " not in key else repr(key)
    return f"{parent}.{part}" if parent else part


def _check(value: Any, rule: Rule, path: str) -> Any:
    expected, ok = rule
    if value is _MISSING or not ok(value):
        raise _Malformed(path, _said(expected), value)
    return value


def _check_fields(data: dict[str, Any], rules: dict[str, Rule], required: set[str], path: str) -> None:
    """Every present field obeys its rule; the `required` ones must be present. Other keys pass."""
    for name, rule in rules.items():
        if name in data or name in required:
            _check(data.get(name, _MISSING), rule, _key(path, name))


def _check_replica(key: str, data: Any) -> ReplicaRecord:
    path = _key("replicas", key)
    _check(data, _OBJECT, path)
    _check_fields(data, _REPLICA_RULES, _REPLICA_REQUIRED, path)
    if data["id"] != key:  # save_state keys each record by its id; a mismatch is a hand edit gone wrong
        raise _Malformed(_key(path, "id"), f"the record's key {key!r}", data["id"])
    return ReplicaRecord.from_json(data)


def _check_event(index: int, data: Any) -> dict[str, Any]:
    path = f"pending_events[{index}]"
    _check(data, _OBJECT, path)
    _check_fields(data, _EVENT_RULES, set(_EVENT_RULES), path)
    if "replica_id" in data:
        _check(data["replica_id"], _or_null(_STRING), f"{path}.replica_id")
    return data


def _check_policy_memory(data: dict[str, Any]) -> dict[str, Any]:
    """`{"policy": name, "memory": {...}, "clock"?: [origin, rate]}`: the shape only; the
    policy's `restore()` reads the memory itself (and `compute_plan` names this file if it
    refuses it)."""
    if "policy" in data:
        _check(data["policy"], _STRING, "policy_memory.policy")
    if "memory" in data:
        _check(data["memory"], _OBJECT, "policy_memory.memory")
    if "clock" in data:  # [origin, rate] of a market replay's policy clock (service.PolicyClock)
        _check(data["clock"], ("a list [origin, rate] of numbers", _is_clock), "policy_memory.clock")
    return dict(data)


def _is_clock(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)


def _check_extra(data: dict[str, Any]) -> dict[str, Any]:
    _check_fields(data, _EXTRA_RULES, set(), "extra")
    return data


def _optional(data: dict[str, Any], key: str, rule: Rule, default: Any) -> Any:
    """`data[key]` checked against `rule`, or `default` when it is absent or null (older files and
    hand edits leave these out; the loader has always accepted that)."""
    value = data.get(key)
    return default if value is None else _check(value, rule, key)


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
    #: The file this state was read from (for error messages; not saved).
    source: str = field(default="", compare=False, repr=False)

    HISTORY_LIMIT = 200

    def __post_init__(self) -> None:
        # who hears of every entry `log` appends (`on_log`); not a field: neither saved nor compared
        self._log_listeners: list[Callable[[dict[str, Any]], None]] = []

    def __getstate__(self) -> dict[str, Any]:
        # a copy (`copy.deepcopy`: a spec reload's trial plan) tells no one what it logs, and its
        # listeners (the metrics, holding a lock) are not copied with it
        data = dict(self.__dict__)
        data.pop("_log_listeners", None)
        return data

    def __setstate__(self, data: dict[str, Any]) -> None:
        self.__dict__.update(data)
        self._log_listeners = []

    def on_log(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call `listener(entry)` with every history entry appended from now on, in the thread
        that appends it. The history keeps the last HISTORY_LIMIT entries and one pass may append
        more (a zone of 100 replicas preempted: their `preempted`, their replacements' `launched`
        and `ready`...): the metrics looked for what a pass appended in the history, and lost all
        that the same pass pushed out of it (6 preemptions counted 0 past a cap of 3)."""
        self._log_listeners.append(listener)

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

    def prune_gone(self, keep: int = GONE_KEPT) -> int:
        """Forget all but the `keep` most recently gone replicas; returns how many were dropped.

        Gone records are history (`status --all`), never needed again: replica IDs come from
        `next_id`, not from the records, and Terraform's trees are rendered from the live ones.
        Without a bound, a churny spot fleet's state file grows without end, and it is rewritten
        by every controller pass that changes a fact (20,000 gone records: 15 MB, 4 s per save).
        """
        gone = sorted((r for r in self.replicas.values() if r.gone_at is not None), key=lambda r: r.gone_at)
        drop = gone[: max(0, len(gone) - keep)]
        for rec in drop:
            del self.replicas[rec.id]
        return len(drop)

    def record_event(self, event: ZoneEvent) -> None:
        """Queue a zone event for the policy (`pending_events`) and keep it in `history`.

        A SURVIVED report (a zone's spot replicas stayed READY through a `survival_period`) says
        nothing changed: reports of one zone with nothing else about it recorded in between are one
        history entry, `at` the first report, `last_at` the latest and `count` how many. Each was
        an entry of its own, and under a market replay (a report per zone every 60/K s) they
        filled the 200 entries kept within seconds, pushing out the preemptions, launches and
        READYs an operator reads `history` for. The policy still gets every report."""
        item = {"kind": event.kind.value, "location": event.location.key, "at": event.at}
        if event.replica_id:
            item["replica_id"] = event.replica_id
        self.pending_events.append(item)
        if event.kind is EventKind.SURVIVED and (run := self._survival_run(item["location"])) is not None:
            # changed in place: readers that follow the history by identity (the metrics) are not lost
            run["last_at"] = event.at
            run["count"] = int(run.get("count", 1)) + 1
            if event.replica_id:
                run["replica_id"] = event.replica_id
            return
        self.log({"event": event.kind.value, **item})

    def _survival_run(self, location: str) -> dict[str, Any] | None:
        """The history's latest entry about `location` when it is a SURVIVED one (else None)."""
        for entry in reversed(self.history):
            if isinstance(entry, dict) and entry.get("location") == location:
                return entry if entry.get("event") == EventKind.SURVIVED.value else None
        return None

    def log(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        del self.history[: -self.HISTORY_LIMIT]
        for listener in self._log_listeners:
            listener(entry)

    def to_json(self) -> dict[str, Any]:
        # the records are converted once each (sorted); `asdict` of the whole state converted
        # them a second time, about 8 ms of every pass's save once it kept its 500 gone ones
        # (`save_state` serialises `json_view`, which copies nothing)
        data = asdict(replace(self, replicas={}))
        del data["source"]
        data["replicas"] = {k: asdict(self.replicas[k]) for k in sorted(self.replicas, key=replica_order)}
        return data

    def json_view(self, **replaced: Any) -> dict[str, Any]:
        """What `to_json` returns, but sharing this state's objects instead of copying them: for
        serialising at once (`json.dumps` only reads), never to be changed or kept. `asdict`'s
        deep copies cost 13 ms at GONE_KEPT gone records, 0.6 ms this way: the watcher
        serialises its state every pass to tell whether it needs writing (`Controller.save`).
        `replaced`: top-level fields to show with another value (e.g. `extra` without its clocks)."""
        data = {name: replaced.get(name, getattr(self, name)) for name in _STATE_FIELDS}
        if "replicas" not in replaced:
            records = self.replicas.items()
            data["replicas"] = {k: {n: getattr(r, n) for n in _RECORD_FIELDS} for k, r in records}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], *, where: str) -> ServiceState:
        """The state in `data` (parsed state.json), every field checked: a bad file raises one
        `StateError` naming `where` and the field path, never a traceback later on."""
        if not isinstance(data, dict) or "service" not in data:
            raise StateError(
                f"{where}: not a skyhedge state file (expected an object with 'service' and 'version')"
            )
        version = data.get("version")
        if not _is_int(version) or version != STATE_VERSION:  # `true == 1` in Python
            raise StateError(
                f"{where}: state version {version!r} is not supported (expected {STATE_VERSION})"
            )
        try:
            replicas = _optional(data, "replicas", _OBJECT, {})
            events = _optional(data, "pending_events", _LIST, [])
            return cls(
                service=_check(data["service"], _STRING, "service"),
                version=version,
                next_id=_check(data.get("next_id", 1), ("a positive integer", _is_positive_int), "next_id"),
                # in the order the IDs were handed out, as a state that never left memory holds
                # them: state.json's keys are in text order ("r-10000" before "r-9999"), and the
                # policy's ties (replicas launched together) go by the order it is shown them
                replicas={k: _check_replica(k, replicas[k]) for k in sorted(replicas, key=replica_order)},
                policy_memory=_check_policy_memory(_optional(data, "policy_memory", _OBJECT, {})),
                pending_events=[_check_event(i, e) for i, e in enumerate(events)],
                history=list(_optional(data, "history", _LIST, [])),
                router=_check(data.get("router"), _or_null(_OBJECT), "router"),
                target=_check(data.get("target"), _or_null(("an integer", _is_int)), "target"),
                extra=_check_extra(dict(_optional(data, "extra", _OBJECT, {}))),
                source=where,
            )
        except _Malformed as exc:
            raise StateError(f"{where}: malformed state ({exc})") from None


#: The fields `to_json` (and so state.json) holds: all but `source`.
_STATE_FIELDS = tuple(f.name for f in fields(ServiceState) if f.name != "source")
_RECORD_FIELDS = tuple(f.name for f in fields(ReplicaRecord))
#: The fields of a replica record as state.json holds them, in order.
RECORD_FIELDS = _RECORD_FIELDS
#: A record's field values in RECORD_FIELDS' order, as a tuple (one C call, no dict built): what
#: the watcher compares with a record's values when it last encoded it (`Controller._texts`).
record_values = operator.attrgetter(*_RECORD_FIELDS)


def state_text(state: ServiceState) -> str:
    """state.json's text for `state` (what `save_state` writes)."""
    return json.dumps(state.json_view(), indent=2, sort_keys=True) + "\n"


def umask_mode(kind: str = "file") -> int:
    """The mode a plain `open()`/`mkdir()` would give under the current umask.

    `tempfile` makes 0600 files and 0700 directories; a rendered tree, a plot or a catalog the
    user shares or commits should get the same permissions as any file they create.
    """
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if kind == "dir" else 0o666) & ~mask


def private_dir(path: Path) -> None:
    """Make the directory `path` (and its missing parents) and let only its owner open it (0700).

    For what holds secrets: the state dir's `tf/` holds every `run.env` value (in each root's
    tfvars, in saved plans, and on AWS/GCP in Terraform's local state), and under the usual umask
    (022) every other account on the machine could read those files. An existing directory is
    narrowed too (one made by an older skyhedge); one owned by another account, which cannot be,
    is left as it is (the writer lock already proved it writable)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.stat(path).st_mode & 0o077:
        with contextlib.suppress(PermissionError):
            os.chmod(path, 0o700)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write `data` to `path` so readers see the old file or the new one, never half of one.
    `mode`: the file's permissions (default: what the umask gives a new file); 0600 for one that
    holds a secret, set before it is renamed into place, so it is never readable by others.

    A write or fsync that fails (a full disk, a quota) raises an OSError naming `path`: its own
    error names no file, and a watcher's log said only `routing: [Errno 28] No space left on
    device`, not which of its files (on which disk) could not be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            if exc.filename is not None or exc.errno is None:
                raise
            raise OSError(exc.errno, exc.strerror, str(path)) from exc  # (the same subclass)
        os.chmod(tmp, umask_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_writable(path: Path, what: str = "output", *, directory: bool = False) -> None:
    """Raise `OutputError` unless `path` could be written now (a file, or with `directory` a
    directory): checked before long work, so a typo in an output path fails at once, with the
    reason, not after the work it was for or as the bare errno of a nested mkdir."""
    if directory and path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is not a directory; expected one for the {what}")
    if not directory and path.is_dir():
        raise OutputError(f"{path}: is a directory; expected a file path for the {what}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():  # dangling or a loop: no directory can be made there
            raise OutputError(f"{path}: cannot write the {what}: {parent} is a symbolic link to nowhere")
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: cannot write the {what}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write the {what}: {parent} is not writable")
    # access() trusts the mode bits, and root passes them: a pseudo file system (/sys, /proc) or
    # a read-only mount still refuses. Creating (and removing) a file there is the real answer.
    try:
        probe_new_file(parent)
    except OSError as exc:
        # a pseudo file system answers ENOENT for a file it cannot create (/proc), which reads
        # as if the directory were missing
        reason = "cannot create files there" if exc.errno == errno.ENOENT else exc.strerror or exc
        raise OutputError(f"{path}: cannot write the {what}: {parent}: {reason}") from exc


def probe_new_file(directory: Path) -> None:
    """Create (and remove) a temp file in `directory`; raises the `OSError` that refused it.

    The only reliable test that a directory takes new files: mode bits lie to root, and a
    read-only mount, an immutable directory (`chattr +i`) or a full quota show only when tried.
    Atomic writes need exactly this (a new temp file next to the target)."""
    # a Ctrl-C between the two left the probe behind, in the user's state dir or --out's parent
    with interrupts_deferred():
        fd, probe = tempfile.mkstemp(prefix=".skyhedge-probe-", dir=directory)
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of `text` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def load_state(state_dir: Path, service: str) -> ServiceState:
    """The state in `state_dir`, or a fresh one if there is none yet."""
    path = state_dir / STATE_FILE
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ServiceState(service=service)
    except (OSError, UnicodeDecodeError) as exc:
        raise StateError(f"{path}: cannot read ({exc})") from exc
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StateError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except JSON_LIMITS as exc:  # past json's own limits (skyhedge._json)
        raise StateError(f"{path}: not valid JSON ({json_limit(exc)})") from exc
    if has_lone_surrogate(data):  # `status` and `plan` crashed printing it (UnicodeEncodeError)
        raise StateError(
            f"{path}: not valid JSON (a \\u escape of a lone UTF-16 surrogate, which is no text)"
        )
    state = ServiceState.from_json(data, where=str(path))
    if state.service != service:
        raise StateError(f"{path}: holds service {state.service!r}, not {service!r}")
    return state


def unwritable(state_dir: Path, exc: OSError) -> StateError:
    """The one-line error for a state dir that refuses a write (the CLI prints it, exit 1; a
    watcher logs it and retries at its next pass, rather than a traceback per pass)."""
    where = ""
    if not state_dir.is_absolute():  # the default is: name where it is (run from `/`, a read-only checkout)
        where = f", under {Path.cwd()}: run from a directory you can write, or give --state-dir"
    return StateError(f"{state_dir}: cannot write the state dir ({exc.strerror or exc}){where}")


def save_state(state_dir: Path, state: ServiceState) -> None:
    """Write `state` atomically; a state dir that refuses it (read-only, immutable, full, no
    permission) raises `StateError`, and the previous state.json stays as it was. Probes an
    earlier release kept in it (a token in their headers) are written as digests, the probes to
    the private `tf/probes.json` (`probe_store.digest_inline_probes`), whichever command writes."""
    from skyhedge.probe_store import digest_inline_probes  # (it imports this module)

    try:
        digest_inline_probes(state_dir, state)
    except OSError as exc:
        raise unwritable(state_dir, exc) from exc
    text = state_text(state)
    try:
        atomic_write_text(state_dir / STATE_FILE, text)
    except OSError as exc:
        raise unwritable(state_dir, exc) from exc


@dataclass(frozen=True)
class HeldLock:
    """The lock `writer_lock` holds. `lost()`: its file is no longer the one in the state dir
    (the state dir was deleted or replaced under a long holder, a watcher): the state the holder
    knows is gone, and another writer can take the lock on the new file."""

    path: Path
    identity: tuple[int, int] | None

    def lost(self) -> bool:
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError:  # cannot tell (no permission to look): not a reason to stop
            return False
        return self.identity is not None and (st.st_dev, st.st_ino) != self.identity


@contextlib.contextmanager
def writer_lock(state_dir: Path, *, timeout: float = 0.0) -> Iterator[HeldLock]:
    """Hold the service's one-writer lock, or fail at once with a clear error: another writer
    holds it, or the state dir cannot take the new files every writer needs (`StateError`).

    A state dir this call created is removed again if the holder wrote nothing into it (a run
    refused before its first write: a missing Terraform binary, a busy port), so a failed
    command leaves no directory holding only a lock file behind."""
    lock = FileLock(str(state_dir / LOCK_FILE), timeout=timeout)
    created = _missing_dirs(state_dir)
    try:
        check_trusted(state_dir)  # before making anything under a directory that is not
        state_dir.mkdir(parents=True, exist_ok=True)
        check_trusted(state_dir)  # and what mkdir found there (made by another in the meantime)
        lock.acquire()
    except Timeout:
        held = "another skyhedge process (apply, destroy or watch) holds the lock for this service"
        raise LockHeld(f"{state_dir}: {held}", state_dir) from None
    except OSError as exc:  # a read-only file system, a path under a file, no permission
        raise unwritable(state_dir, exc) from exc
    try:
        # The lock file of an earlier run opens even where no new file can be made (a directory
        # made read-only, immutable or mounted read-only since): refuse here, before the holder
        # changes anything (starts nginx, runs Terraform), not at its first save_state.
        try:
            probe_new_file(state_dir)
        except OSError as exc:
            raise unwritable(state_dir, exc) from exc
        try:
            st = os.stat(state_dir / LOCK_FILE)
            identity: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            identity = None
        yield HeldLock(state_dir / LOCK_FILE, identity)
    finally:
        if created:
            _remove_if_unused(created, state_dir / LOCK_FILE)
        lock.release()


def check_trusted(state_dir: Path) -> None:
    """Refuse a state dir that another account could change under this one (`StateError`).

    What the state dir holds is run: its Terraform roots (whose `terraform_data` commands start
    the local replicas), the pid files that decide which processes a stop signals, the nginx
    config. A state dir another account made first (`--state-dir /tmp/svc`, created by someone
    else before the user's first run), or one under a directory every account may rename entries
    in, let that account run commands as this user (or as root, under sudo). As ssh does for
    `~/.ssh`: the state dir and the directory holding it must be owned by this account or root,
    and neither may be writable by every account unless sticky (/tmp itself is fine). Group
    write is allowed: a umask of 002 with per-user groups makes every directory so."""
    me = os.geteuid()
    for where in (state_dir, state_dir.parent):
        try:
            st = os.stat(where)
        except OSError:  # cannot look (no permission): the writes that follow say why
            continue
        if st.st_uid not in (me, 0):
            raise StateError(
                f"{where}: owned by another account (uid {st.st_uid}), not by you (uid {me}) or root: "
                "it could change the Terraform roots and pid files skyhedge acts on; "
                "use a state dir of your own (--state-dir)"
            )
        if st.st_mode & 0o002 and not st.st_mode & 0o1000:
            raise StateError(
                f"{where}: writable by every account (mode {st.st_mode & 0o7777:04o}): any of them could "
                "change what skyhedge runs; chmod o-w it or use another state dir (--state-dir)"
            )


def _missing_dirs(path: Path) -> list[Path]:
    """The directories `path.mkdir(parents=True)` would create, deepest first."""
    missing: list[Path] = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_if_unused(created: list[Path], lock_file: Path) -> None:
    """Remove the lock file and the directories made for it, if nothing else was written there.

    Called while the lock is still held: a process that opened the lock file before it was
    unlinked is refused as "holds the lock" (every writer tries once, without waiting), never
    handed a lock on a file no longer in the directory."""
    try:
        if [entry.name for entry in created[0].iterdir()] != [LOCK_FILE]:
            return
        lock_file.unlink()
        for directory in created:  # deepest first; stops at the first one holding anything
            directory.rmdir()
    except OSError:
        pass  # something else appeared meanwhile (another writer's file): keep it
