"""Turning observations (source events, probe results, apply results) into facts in the state.

Only facts are written: timestamps (`provisioned_at`, `ready_at`, `not_ready_since`, `gone_at`),
a reason, the `draining` flag, and zone events for the policy. Status is derived from them
(`ReplicaFact.status`). Every function here is safe to repeat: recording that a replica is gone a
second time, or a probe result that matches what is known, changes nothing.

Bookkeeping the controller keeps in `state.extra` (plain JSON):
    warned      {replica_id: at}  replicas under an interruption warning: still serving, being
                replaced, not counted by the policy (draining), terminated by the cloud soon
    applied     {"cloud/region": digest}  the desired layout last applied to each Terraform root
    routed      [[id, endpoint], ...]  the upstreams the router last loaded
    autoscaler  the request-rate autoscaler's memory
    launch_failures  consecutive failed applies (for backoff)
    rollout     the rolling update or placement move in progress (`rollout_line`)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from skyhedge.events import PreemptionEvent, Signal, find_replica
from skyhedge.policy.types import EventKind, Market, ReplicaStatus, ZoneEvent
from skyhedge.state import ReplicaRecord, ServiceState

log = logging.getLogger("skyhedge.controller")

# A READY replica failing its probe this long is replaced (SkyServe's 180 s threshold).
NOT_READY_GRACE_SECONDS = 180.0
# A warned replica the cloud has not taken after this long is terminated by us.
WARNING_GRACE_SECONDS = 300.0
# A READY replica no probe could be made of for this long (every probe failing with a local error,
# `skyhedge.probe.LOCAL_ERRNOS`) is no longer counted READY: NOT_READY, until a probe can be made.
UNPROBED_SECONDS = NOT_READY_GRACE_SECONDS


def warned(state: ServiceState) -> dict[str, float]:
    table = state.extra.setdefault("warned", {})
    assert isinstance(table, dict)
    return table


def mark_gone(state: ServiceState, rec: ReplicaRecord, at: float, reason: str, why: str) -> bool:
    """Record that a replica is gone; returns False if that was already known."""
    if rec.gone_at is not None:
        return False
    rec.gone_at = at
    rec.reason = reason
    warned(state).pop(rec.id, None)
    state.log(
        {
            "at": at,
            "event": "gone",
            "replica_id": rec.id,
            "location": rec.location.key,
            "reason": reason,
            "why": why,
        }
    )
    return True


#: An event dated this long before a replica's launch is about an earlier machine, not it (the
#: margin allows for clock skew between this machine and the cloud's event times).
EVENT_SKEW_SECONDS = 60.0


def _gone_reason(event: PreemptionEvent, rec: ReplicaRecord, state: ServiceState) -> str:
    """Why a replica is gone, when the source did not know: spot -> preempted, on-demand -> failed.

    A replica we were draining (scale-down) or that was already warned ended as planned:
    its preemption, if any, was counted when the warning came.
    """
    if rec.draining:
        return "terminated"
    if event.reason:
        return event.reason
    return "preempted" if Market(rec.market) is Market.SPOT else "failed"


def ingest(state: ServiceState, events: Iterable[PreemptionEvent], now: float) -> list[str]:
    """Record source events as facts and zone events; returns one line per fact recorded."""
    notes: list[str] = []
    live = state.live()
    for event in events:
        # A source's clock (or a cloud's) may run ahead of ours: an event dated in the future would
        # stretch every grace counted from it (a warned replica never terminated), so it is now.
        at = min(event.at, now)
        if event.signal is Signal.ZONE_LOST:
            if event.location is not None:
                state.record_event(ZoneEvent(EventKind.PREEMPTED, event.location, at))
                notes.append(event.describe())
            continue
        rec = find_replica(event, live)
        if rec is None or rec.gone_at is not None:
            log.debug("ignoring %s (not a live replica of %s)", event.describe(), state.service)
            continue
        if at < rec.launched_at - EVENT_SKEW_SECONDS:
            # about an earlier machine of the same name (replica IDs start over with a fresh state
            # dir; GCP keeps operations up to 14 days and a new watcher reads them all again)
            log.debug("ignoring %s (older than %s's launch)", event.describe(), rec.id)
            continue
        if event.signal is Signal.REBALANCE:
            state.record_event(ZoneEvent(EventKind.WARNING, rec.location, at, rec.id))
            notes.append(f"{event.describe()} ({rec.id} in {rec.zone})")
        elif event.signal is Signal.WARNING:
            if rec.id in warned(state) or rec.draining:
                continue
            # Start the replacement now: the policy ignores draining replicas, so it launches one;
            # routing keeps sending traffic here until the cloud actually takes the machine.
            warned(state)[rec.id] = at
            rec.draining = True
            state.record_event(ZoneEvent(EventKind.PREEMPTED, rec.location, at, rec.id))
            notes.append(f"{event.describe()} ({rec.id} in {rec.zone}): replacing it now")
        elif event.signal is Signal.GONE:
            reason = _gone_reason(event, rec, state)
            was_warned = rec.id in warned(state)
            if mark_gone(state, rec, at, reason, event.describe()):
                if reason == "preempted" and not was_warned:
                    state.record_event(ZoneEvent(EventKind.PREEMPTED, rec.location, at, rec.id))
                notes.append(f"{event.describe()} ({rec.id} in {rec.zone}): {reason}")
    return notes


@dataclass(frozen=True)
class ProbeResult:
    replica_id: str
    ok: bool
    detail: str = ""


def apply_probes(
    state: ServiceState, results: Sequence[ProbeResult], now: float, *, initial_delay: float
) -> list[str]:
    """Fold readiness probe results into facts (SkyServe's semantics).

    First success -> `ready_at` (READY). A failure of a READY replica -> `not_ready_since`
    (NOT_READY); failing for longer than NOT_READY_GRACE_SECONDS -> FAILED (replaced). A replica
    that never answered within `initial_delay` seconds of being provisioned -> FAILED.
    """
    notes: list[str] = []
    by_id = {r.id: r for r in state.live()}
    for res in results:
        rec = by_id.get(res.replica_id)
        if rec is None:
            continue
        if res.ok:
            if rec.provisioned_at is None:
                rec.provisioned_at = now
            if rec.ready_at is None:
                rec.ready_at = now
                notes.append(f"{rec.id} READY in {rec.zone} after {now - rec.launched_at:.1f}s")
                state.log({"at": now, "event": "ready", "replica_id": rec.id, "location": rec.location.key})
            elif rec.not_ready_since is not None:
                rec.not_ready_since = None
                notes.append(f"{rec.id} READY again")
            continue
        if rec.draining:  # on its way out already: only stop routing to it
            if rec.ready_at is not None and rec.not_ready_since is None:
                rec.not_ready_since = now
            continue
        if rec.ready_at is not None:
            if rec.not_ready_since is not None and now < rec.not_ready_since:
                rec.not_ready_since = now  # the wall clock stepped back: the grace starts over now
            if rec.not_ready_since is None:
                rec.not_ready_since = now
                notes.append(f"{rec.id} NOT_READY ({res.detail})")
            elif now - rec.not_ready_since > NOT_READY_GRACE_SECONDS and mark_gone(
                state, rec, now, "failed", f"not ready for {now - rec.not_ready_since:.0f}s ({res.detail})"
            ):
                notes.append(f"{rec.id} FAILED: not ready for {NOT_READY_GRACE_SECONDS:.0f}s")
        else:
            started = rec.provisioned_at if rec.provisioned_at is not None else rec.launched_at
            if now - started > initial_delay and mark_gone(
                state, rec, now, "failed", f"no passing probe within {initial_delay:.0f}s ({res.detail})"
            ):
                # a refused connection all along: nothing ever listened where the probe looks
                # (found by an audit: a command on a port of its own got only "not ready")
                hint = (
                    f" (nothing accepted connections at {rec.endpoint}: does run.command listen on $PORT?)"
                    if "refused" in res.detail.lower() and rec.endpoint
                    else ""
                )
                notes.append(
                    f"{rec.id} FAILED: not ready within initial_delay_seconds={initial_delay:.0f}{hint}"
                )
    return notes


def routable(state: ServiceState) -> list[ReplicaRecord]:
    """Replicas the router should send traffic to: READY ones, and warned ones still answering.

    A replica being drained for a scale-down is out (that is what draining means); a warned one
    stays in until the cloud takes it, since it still serves and nginx retries elsewhere if not.
    When no replica is READY but some were and only failed their last probes (NOT_READY, not yet
    FAILED), those stay routed ("panic mode", as Envoy's panic threshold): a probe round failing
    everywhere at once is more often the prober's network or a slow health endpoint than every
    replica down, and nginx's own retries and timeouts still guard each request, where an empty
    upstream list would answer 503 to all of them. Failing that, READY replicas being released.
    """
    table = warned(state)
    ready: list[ReplicaRecord] = []
    failing: list[ReplicaRecord] = []
    leaving: list[ReplicaRecord] = []
    for rec in state.live():
        if rec.endpoint is None or rec.ready_at is None:
            continue
        if rec.draining and rec.id not in table:
            if rec.not_ready_since is None:
                leaving.append(rec)
            continue
        (ready if rec.not_ready_since is None else failing).append(rec)
    # Last, replicas being released that still answer (their destroy waits for their requests):
    # when every other one is gone (a preemption during a scale-down or a rolling update), they
    # serve again rather than leaving the router with nothing but 503s.
    return sorted(ready or failing or leaving, key=lambda r: r.id)


def status_counts(state: ServiceState) -> dict[ReplicaStatus, int]:
    counts: dict[ReplicaStatus, int] = {}
    for rec in state.live():
        st = rec.fact().status
        counts[st] = counts.get(st, 0) + 1
    return counts


def mark_unprobed(state: ServiceState, rec: ReplicaRecord, now: float, seconds: float) -> str | None:
    """A READY replica no probe could be made of for `seconds` (UNPROBED_SECONDS or more) is
    NOT_READY: what is known of it is too old to claim it serves (its process or machine may be
    gone while the watcher, out of descriptors, can neither probe it nor hear from its cloud). It
    is not FAILED for it: only a probe that was made counts against a replica (`apply_probes`).
    Returns the line to note, or None when it was not READY."""
    if rec.gone_at is not None or rec.ready_at is None or rec.not_ready_since is not None or rec.draining:
        return None
    rec.not_ready_since = now
    return (
        f"{rec.id} NOT_READY (no probe of it could be made for {seconds:.0f}s: not counted READY "
        "until one can)"
    )


def _map_times(state: ServiceState, shift: Callable[[float], float]) -> None:
    """Replace every time `shift_times` moves by `shift(time)` (one walk for moving and reading)."""

    def each(t: Any) -> Any:
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            return shift(float(t))
        return t

    for rec in state.replicas.values():
        rec.launched_at = each(rec.launched_at)
        rec.provisioned_at = each(rec.provisioned_at)
        rec.ready_at = each(rec.ready_at)
        rec.not_ready_since = each(rec.not_ready_since)
        rec.gone_at = each(rec.gone_at)
    for event in state.pending_events:
        if isinstance(event, dict) and "at" in event:
            event["at"] = each(event["at"])
    extra = state.extra
    for key in ("warned", "given_up"):
        table = extra.get(key)
        if isinstance(table, dict):
            for rid, at in table.items():
                table[rid] = each(at)
    drains = extra.get("drain")
    if isinstance(drains, dict):
        for entry in drains.values():
            if isinstance(entry, dict) and "since" in entry:
                entry["since"] = each(entry["since"])
    for key in ("survival_at", "decided_at"):
        if key in extra:
            extra[key] = each(extra[key])
    rollout = extra.get("rollout")
    if isinstance(rollout, dict):  # (a jump forward read as 5 minutes of refusals: stalled)
        for key in ("since", "refused_since", "stalled_since"):
            if isinstance(rollout.get(key), (int, float)):
                rollout[key] = each(rollout[key])
    scaler = extra.get("autoscaler")
    if isinstance(scaler, dict):
        if isinstance(scaler.get("samples"), list):
            scaler["samples"] = [
                [each(s[0]), *s[1:]] if isinstance(s, list) and s else s for s in scaler["samples"]
            ]
        if "pending_since" in scaler:
            scaler["pending_since"] = each(scaler["pending_since"])


def shift_times(state: ServiceState, jump: float, moved: Callable[[float], bool]) -> int:
    """Move by `jump` seconds every time the controller measures a duration from that `moved`
    says was stamped before the wall clock jumped by `jump` (see `Controller._follow_clock`): the
    replicas' launch, provisioning, READY, NOT_READY and gone times, zone events the policy has
    not seen yet, interruption warnings, drains, launches given up, the last SURVIVED report and
    decision, the autoscaler's window, and the rolling update's times (`rollout`). Durations then
    read as they were (a replica loading its model for 10 s still has 10 s behind it), where a
    clock set forward by hours failed every replica still loading (past `initial_delay_seconds`)
    or failing its probe, and ended drains and interruption warnings at once. Returns how many
    times moved. (The policy's memory is moved by the policy: `Policy.shift_times`.)"""
    count = 0

    def shift(t: float) -> float:
        nonlocal count
        if not moved(t):
            return t
        count += 1
        return t + jump

    _map_times(state, shift)
    return count


def latest_time(state: ServiceState) -> float | None:
    """The latest of the times `shift_times` moves (None: none): a watcher starting on a state
    stamped ahead of its clock finds how far the clock was set back while none ran."""
    seen: list[float] = []

    def note(t: float) -> float:
        seen.append(t)
        return t

    _map_times(state, note)
    return max(seen, default=None)


def _at(t: Any) -> str:
    try:
        return time.strftime("%H:%M:%S", time.localtime(float(t)))
    except (OverflowError, ValueError, OSError, TypeError):
        return f"{t!r} (not a time)"


def rollout_stall_reason(record: dict[str, Any]) -> str:
    """Why the rolling update in `record` (`state.extra["rollout"]`) is not moving, in one line:
    every replacement's launch refused since `refused_since`, per zone."""
    refused = record.get("refused") or {}
    zones = ", ".join(f"{zone} {count}x" for zone, count in sorted(refused.items()))
    return (
        f"every launch of a replacement since {_at(record.get('refused_since'))} was refused "
        f"({zones}: no spot capacity); the replicas it replaces keep serving, and it goes on by "
        "itself once a launch succeeds (replicas that serve get no on-demand stand-in)"
    )


def rollout_line(record: dict[str, Any]) -> str:
    """`status`'s line for the rolling update or placement move in progress."""
    kept = record.get("replicas") or []
    head = (
        f"{', '.join(kept)} (of an earlier spec, or outside the placement) serve until replaced, "
        f"since {_at(record.get('since'))}"
    )
    if record.get("stalled_since") is None:
        return head
    return f"{head}; STALLED since {_at(record['stalled_since'])}: {rollout_stall_reason(record)}"
