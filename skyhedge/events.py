"""Normalised replica/zone events and the one interface every event source implements.

Each cloud speaks its own dialect: AWS sends EventBridge messages through SQS, GCP keeps zone
operations, the local cloud has pid files and a capacity file. One small parser per source
(in `skyhedge/clouds/<cloud>/events.py`) turns that raw input into `PreemptionEvent`s, so the
controller reasons about one shape only (as Karpenter's `interruption/messages` does).

An event only *records a fact*; the controller's next tick decides what to do about it. Sources
are therefore allowed to repeat themselves (an SQS message redelivered, an operation seen twice):
recording "replica r-0003 is gone" twice changes nothing the second time.

    source.watch(wake)                 # optional: a background waiter calls wake() on new input
    events = source.poll(now, live)    # non-blocking: what happened since the last poll
    ...record events in state, save state...
    source.ack()                       # now the source may forget them (e.g. delete SQS messages)

Input that cannot be parsed is logged and acknowledged (never retried forever): see `unparseable`.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from skyhedge.policy.types import Location
from skyhedge.state import ReplicaRecord

log = logging.getLogger("skyhedge.events")

__all__ = [
    "EventSource",
    "LeftoverWatch",
    "PreemptionEvent",
    "ProblemLog",
    "Signal",
    "find_replica",
    "unparseable",
]


class Signal(str, enum.Enum):
    """What a source observed."""

    WARNING = "warning"  # the replica will be taken soon (AWS 2-minute interruption warning)
    REBALANCE = "rebalance"  # the replica's zone is at elevated risk (AWS rebalance recommendation)
    GONE = "gone"  # the replica's machine or process no longer runs
    ZONE_LOST = "zone_lost"  # a zone lost its spot capacity (local capacity file, market trace)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PreemptionEvent:
    """One normalised observation from any source.

    A source names the replica it means by `replica_id` when it knows it, else by `cloud_id`
    (EC2 instance ID, GCP instance name) which the controller maps through the replica records.
    `reason` qualifies GONE: `preempted` (the cloud took it), `failed` (it died on its own) or
    `terminated` (someone else stopped it on purpose).
    """

    signal: Signal
    at: float
    source: str
    replica_id: str | None = None
    cloud_id: str | None = None
    location: Location | None = None
    reason: str = "preempted"
    detail: str = ""

    def describe(self) -> str:
        who = self.replica_id or self.cloud_id or (self.location.key if self.location else "?")
        text = f"{self.source}: {self.signal.value} {who}"
        if self.signal is Signal.GONE and self.reason:  # "" = the controller judges why
            text += f" ({self.reason})"
        return f"{text}: {self.detail}" if self.detail else text


class EventSource:
    """Base of every event source. Subclasses override `poll`, and `ack`/`watch`/`close` if needed.

    `poll` must not block for long: the controller calls it once per tick. A source that can be
    told about new input without polling (SQS long-polling, a pidfd becoming readable) does that
    waiting in `watch`'s background thread and calls `wake()`, which makes the controller tick at
    once instead of at its next period.
    """

    name: str = "source"

    def poll(self, now: float, live: Sequence[ReplicaRecord]) -> list[PreemptionEvent]:
        """Events since the previous poll. `live` are the replicas the controller believes alive."""
        raise NotImplementedError

    def ack(self) -> None:
        """The events of the previous poll are durably recorded: the source may drop them."""

    def watch(self, wake: Callable[[], None]) -> None:
        """Start waiting for input in the background and call `wake()` when some may be there."""

    def problems(self) -> list[str]:
        """Failures met outside `poll` since the last call (a background waiter that cannot reach
        its queue), for the controller to note: `poll` itself returns normally meanwhile."""
        return []

    def close(self) -> None:
        """Stop background waiting and release clients."""


def unparseable(source: str, raw: object, why: str) -> None:
    """Log input a parser could not use. The caller acknowledges it anyway (no poison loops)."""
    text = raw if isinstance(raw, str) else repr(raw)
    if len(text) > 300:
        text = text[:300] + "..."
    log.warning("%s: ignoring unparseable input (%s): %s", source, why, text)


def find_replica(event: PreemptionEvent, records: Sequence[ReplicaRecord]) -> ReplicaRecord | None:
    """The replica record an event names, by replica ID first, then by cloud ID."""
    if event.replica_id:
        for rec in records:
            if rec.id == event.replica_id:
                return rec
    if event.cloud_id:
        for rec in records:
            if rec.cloud_id == event.cloud_id or event.cloud_id in _aliases(rec):
                return rec
    return None


def _aliases(rec: ReplicaRecord) -> set[str]:
    """Other names a cloud may use for this replica (instance name, self link...) from its outputs."""
    out: set[str] = set()
    if rec.cloud_id and "/" in rec.cloud_id:  # a self link: its last segment is the instance name
        out.add(rec.cloud_id.rstrip("/").rsplit("/", 1)[-1])
    for key in ("instance_id", "id", "name", "instance_name", "self_link"):
        value = rec.outputs.get(key) if isinstance(rec.outputs, dict) else None
        if isinstance(value, str) and value:
            out.add(value)
    return out


#: Seconds before the same failure of a background waiter is said again.
PROBLEM_REPEAT_SECONDS = 60.0


class ProblemLog:
    """What a source's background thread failed at, said once and then at most once a minute.

    A thread retrying every few seconds against an unreachable endpoint would otherwise log the
    same line hundreds of times an hour, and `poll` would never know. Each failure is keyed (a
    region, say): logged when its text changes or a minute has passed, and queued for `take()`,
    which the source's `problems()` returns to the controller. `clear` says the key works again.
    """

    def __init__(self, logger: logging.Logger, repeat: float = PROBLEM_REPEAT_SECONDS) -> None:
        self._log = logger
        self.repeat = repeat
        self._last: dict[str, tuple[str, float]] = {}
        self._pending: list[str] = []
        self._lock = threading.Lock()

    def report(self, key: str, text: str) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and last[0] == text and 0 <= now - last[1] < self.repeat:
                return
            self._last[key] = (text, now)
            self._pending.append(text)
        self._log.warning("%s", text)

    def clear(self, key: str, recovered: str | None) -> None:
        """`key` works again; `recovered` (if any) is said when it had failed."""
        with self._lock:
            if self._last.pop(key, None) is None:
                return
            if recovered:
                self._pending.append(recovered)
        if recovered:
            self._log.warning("%s", recovered)

    def take(self) -> list[str]:
        with self._lock:
            out, self._pending = self._pending, []
        return out


#: Seconds an instance must stay unowned before it is reported as a leftover.
LEFTOVER_GRACE = 600.0


class LeftoverWatch:
    """Which running instances tagged for a service, owned by no live replica, to warn about.

    Such an instance was left by an apply killed between the cloud's create call and Terraform
    saving its state, or by a destroy that failed; it bills until someone terminates it, and
    skyhedge does not terminate what it never recorded. One is reported once, and only after it
    stayed unowned for LEFTOVER_GRACE seconds (one just launched or just released is not).
    """

    def __init__(self, grace: float = LEFTOVER_GRACE) -> None:
        self.grace = grace
        self._first: dict[tuple[str, str], float] = {}  # (scope, instance) -> first seen unowned
        self._reported: set[tuple[str, str]] = set()

    def shift_times(self, jump: float, moved: Callable[[float], bool]) -> int:
        """Move the first-seen times with a wall clock jump (`Controller._follow_clock`): a clock
        set forward by more than the grace reported every instance seen unowned a pass earlier
        (one just launched, its ID not yet recorded) as a leftover. Returns how many moved."""
        count = 0
        for key, at in self._first.items():
            if moved(at):
                self._first[key] = at + jump
                count += 1
        return count

    def due(self, scope: str, unowned: Sequence[str], now: float) -> list[str]:
        """Of the instances unowned now in `scope` (a region, a zone), the ones to report now.
        One owned again, or gone, in the same scope starts over."""
        keys = {(scope, name) for name in unowned}
        self._first = {key: at for key, at in self._first.items() if key[0] != scope or key in keys}
        # (those reported too: kept for good, every leftover ever reported stayed in memory)
        self._reported = {key for key in self._reported if key[0] != scope or key in keys}
        out = []
        for key in sorted(keys):
            first = self._first.setdefault(key, now)
            if now < first:  # the wall clock stepped back
                self._first[key] = first = now
            if now - first >= self.grace and key not in self._reported:
                self._reported.add(key)
                out.append(key[1])
        return out
