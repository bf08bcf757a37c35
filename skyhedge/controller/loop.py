"""The reconcile tick: events -> facts -> plan -> apply changed roots -> probes -> routing.

    delay = controller.tick()

Each tick is safe to repeat and safe to be killed at any point (`kill -9` included):

1. Source events and probe results become facts in the state (`facts.py`).
2. `compute_plan` (the same function `plan` and `apply` use) decides the layout.
3. Before touching Terraform the tick *writes its intent* (`skyhedge.apply.record_plan`): new
   replicas get their records (so their IDs are never handed out twice), replicas to remove are
   marked draining, the policy's memory and the consumed zone events are saved — all in one
   atomic state write.
4. Removed replicas leave the router first (drain), then the executor applies the roots whose
   rendered inputs differ from the ones last applied successfully (`skyhedge.apply` keeps that
   digest per root in the state) and records outputs, destroyed replicas and refused launches.
5. A launch refused for capacity marks its zone preempted (LAUNCH_FAILED); the next tick places
   the replica elsewhere, with backoff while applies keep failing. Spot launches into a zone that
   keeps refusing wait there (30 s doubling to 5 min, `ControllerOptions.spot_retry`), while
   on-demand replicas cover for them at once.

After a crash mid-apply the root's digest is still the old one, so the next tick (the first after
a restart always runs the executor) applies it again: Terraform converges it, no replica ID is
created twice, and the local event source stops any process no live replica owns.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from skyhedge import autoscaler
from skyhedge.apply import UNROUTED_KEY, held_replicas, record_plan, reopen_unfinished_deletes
from skyhedge.clouds import QuotaRefusal
from skyhedge.controller.facts import (
    NOT_READY_GRACE_SECONDS,
    UNPROBED_SECONDS,
    WARNING_GRACE_SECONDS,
    ProbeResult,
    apply_probes,
    ingest,
    latest_time,
    mark_gone,
    mark_unprobed,
    rollout_stall_reason,
    routable,
    shift_times,
    warned,
)
from skyhedge.controller.ports import ExecResult, Executor, Prober, RouterPort, root_key
from skyhedge.errors import PolicyError, RoutingError, SkyhedgeError
from skyhedge.events import EventSource, PreemptionEvent
from skyhedge.leftovers import (
    Recreated,
    deployment_id,
    instances_left_unsaved,
    lost_replicas,
    unsaved_replicas,
)
from skyhedge.planner import CREATE, DELETE, KEEP, Plan, PlannedReplica, by_replica_id, replica_order
from skyhedge.policy.base import clock_memory
from skyhedge.policy.types import EventKind, Location, Market, ReplicaStatus, ZoneEvent
from skyhedge.probe import timed_out
from skyhedge.probe_store import (  # (the keys re-exported: the watcher's tables)
    EARLIER_PROBES_KEY,  # noqa: F401
    FALLBACK,
    PROBE_KEY,  # noqa: F401
    ProbeStore,
    by_probe,
    earlier_revision,
    outgoing_revisions,
    read_kept,
)
from skyhedge.routing.cuts import cut_hung_connections, gone_cut_note, retry_targets
from skyhedge.service import (
    DECIDED_AT_KEY,
    Placement,
    PolicyClock,
    compute_plan,
    is_gitops,
    remember_decision,
    resolve_placement,
    set_gitops,
    shift_policy_memory,
)
from skyhedge.spec import (
    ReadinessProbe,
    ServiceSpec,
    readiness_probe_json,
    replica_revision,
)
from skyhedge.state import (
    FAILING_ROOTS_KEY,
    LAUNCH_HOLD_KEY,
    QUOTA_KEY,
    RECORD_FIELDS,
    ROLLOUT_KEY,
    STATE_FILE,
    ReplicaRecord,
    ServiceState,
    load_state,
    record_values,
    save_state,
    unwritable,
)

#: `state.extra` key: removed replicas kept running until their requests end, with when their
#: drain began and the nginx workers that may still serve them.
DRAIN_KEY = "drain"
#: The shortest a drain may last before its replica is removed anyway (see `drain_deadline`).
DRAIN_FLOOR_SECONDS = 600.0
# `UNROUTED_KEY` (`state.extra`, from skyhedge.apply): `{replica_id: endpoint}` of replicas taken out
# of the router alive (NOT_READY), whose connections are cut once they are known gone
# (`Controller._sever_gone_unrouted`). In the state so that one taken out before a watcher restart
# (or by `routing reload --probe`, `apply`) and found gone after it is cut all the same.

log = logging.getLogger("skyhedge.controller")
#: A rolling update (or placement move) none of whose replacements could be launched for this
#: long, every launch refused, is stalled: the watcher says so once and `status` shows it. The
#: replicas it replaces keep serving and no on-demand replica stands in for them, so without it a
#: roll in a spot drought looked healthy for ever (N READY, nothing else said in `status`).
ROLLOUT_STALL_SECONDS = 300.0
#: A note identical to the previous one is repeated at most this often (see Controller.note).
NOTE_REPEAT_SECONDS = 60.0
#: The table of noted lines is first pruned at this size (then at twice what pruning left).
NOTED_PRUNE_AT = 64
#: How often (real seconds) a pass bounds what grows with time and traffic (Controller._housekeep).
HOUSEKEEP_SECONDS = 60.0
#: `state.extra` key: when spot replicas that stayed READY last reported their zone SURVIVED.
SURVIVAL_KEY = "survival_at"
#: `state.extra` keys that move at every pass (or survival period) whatever happens: clocks.
CLOCK_KEYS = (DECIDED_AT_KEY, SURVIVAL_KEY)
#: The longest (controller clock seconds) state.json may lag behind the state in memory when all
#: that changed are its clocks: `CLOCK_KEYS`, the autoscaler's `MEASUREMENTS` (samples, rate) and
#: the policy's `clock_memory` (the `skyhedge` policy's decision clock and period). A pass that
#: changes nothing else does not write (`Controller.save`): idle, a watcher rewrote and fsynced
#: state.json every pass, 320 kB at the GONE_KEPT cap, 2.8 GB a day at the default 10 s interval.
#: What a crash (kill -9, power loss) loses is at most this much of those: the rate is rebuilt
#: from the next sample (nginx's counter is cumulative: a window restored a minute old still
#: spans the requests since), the policy's period average skips a minute of updates (a restart's
#: pause skews it more), and a SURVIVED report comes up to a minute early (for replicas that did
#: stay READY). A minute is the autoscaler's window and the survival period: nothing held back is
#: older than one of them. Everything else (replica records, events, launch failures and holds,
#: the policy's other memory, the target and a pending wish, the intent before an apply) is
#: written by the pass that changes it, and the clocks with it; a watcher stopping writes them too.
SAVE_EVERY = 60.0

#: Crash loops: replicas that fail soon after launch (before READY, or within EARLY_FAILURE_SECONDS
#: of it). CRASHES_BEFORE_HOLD bursts of them within CRASH_WINDOW_SECONDS hold new launches for 30 s,
#: doubling with every further one up to CRASH_HOLD_MAX_SECONDS (SkyServe, too, stops relaunching
#: replicas that keep failing on the user's app): a replica command that exits at once, or a model
#: slower to load than `initial_delay_seconds`, would otherwise launch (and bill) a machine a pass.
EARLY_FAILURE_SECONDS = 120.0
CRASH_WINDOW_SECONDS = 600.0
CRASHES_BEFORE_HOLD = 3
CRASH_BURST_SECONDS = 1.0
CRASH_HOLD_MAX_SECONDS = 600.0
#: A replica whose launch failed in this many applies of its own (not for capacity: e.g. its local
#: port taken by another process) is given up, and the policy places a new one (new ID, port).
#: CRASHES_BEFORE_HOLD bursts of launches given up hold new launches as a crash loop does.
LAUNCH_ATTEMPTS = 3
#: A spot drought: a zone that refused a spot launch for capacity gets no new spot launch for
#: `ControllerOptions.spot_retry` seconds, doubling with each further refusal in a row there up
#: to `max_spot_retry`, and is asked at once again after a spot launch there succeeds. The policy
#: knows nothing of it (its plans, and `simulate`'s, are unchanged): the watcher leaves those spot
#: creates out of the pass's plan, while on-demand replicas stand in for them. Without it, with
#: every zone refusing, the policy's reset rule made every zone ACTIVE again at once and every pass
#: after the apply backoff (2 s doubling to 60 s) re-planned and applied N + 1 refused spot
#: launches: measured over the controller fakes, N = 3, an hour's drought, 64 applies and 256
#: refused launches (each a cloud API call, a log line and a replica ID); with these defaults,
#: 15-30 asks (30-45 Terraform runs) and 60-90 refused launches, and spot is asked for again at
#: most 5 min after capacity is back (spot READY 170-410 s after it, 180-200 s before: see
#: docs/controller.md, "In a spot drought"). Only launches on-demand (or anything else) covers
#: wait: those the service is short of without them are asked at every apply (`_pace_spot`).
SPOT_RETRY_SECONDS = 30.0
SPOT_RETRY_MAX_SECONDS = 300.0
#: `state.extra` key of the zones' spot pauses: `{"cloud/region/zone": {"refusals": n, "at": t}}`,
#: the refusals in a row there and when the last was (`Controller._spot_refused`), so that a
#: restarted watcher resumes each pause where it was.
SPOT_PAUSES_KEY = "spot_pauses"
# At a quota: an account quota used up (`ExecResult.quota_refusals`: EC2's
# MaxSpotInstanceCountExceeded or VcpuLimitExceeded, Compute's "Quota 'PREEMPTIBLE_NVIDIA_L4_GPUS'
# exceeded. Limit: 0.0 in region us-central1") refuses every launch of its market in its region
# (or, for a quota across regions, in the cloud) until a person raises it. After one such answer
# none is asked there for `spot_retry` seconds, doubling with each further one up to
# `max_spot_retry` (the drought's schedule, so a raised quota is taken within 5 min), whether or
# not the service is short of them (asking sooner cannot succeed): one pause for the region, not
# one per zone. Said once, with the quota's name and where to raise it, and kept for `status`
# (`state.extra[QUOTA_KEY]`) until a launch there succeeds. Before, each was a zone's stock-out:
# "no spot capacity" per refused replica (on-demand ones too), zone by zone, and a spot-only
# policy asked at every apply (2 s doubling to 60 s) for as long as the quota lasted (measured in
# docs/controller.md, "At a quota").
#: The wall clock moving this much more (or less) than the monotonic clock between two passes is a
#: jump (NTP stepping it, an operator setting it): the controller's timers are moved with it
#: (`Controller._follow_clock`). NTP slews offsets under 128 ms and steps larger ones.
CLOCK_JUMP_SECONDS = 5.0
#: Under a market replay the policy's clock runs `rate` times as fast (`PolicyClock`), and a step
#: of the wall clock moves it `rate` times as far: a 4 s step at speedup 600 moved the policy's
#: times by 2,400 s of market time (a wave's 900 s hold ended at once, a zone's age grew 40 min),
#: unfollowed below CLOCK_JUMP_SECONDS. So a replay follows steps of CLOCK_JUMP_SECONDS / rate
#: and more, down to this floor: below NTP's 128 ms (every step it makes is followed; its slews
#: move the monotonic clock alike), above what a thread switch between a pass's readings of the
#: two clocks may put there (each would read as a jump, and be announced).
REPLAY_CLOCK_JUMP_FLOOR_SECONDS = 0.1


def _boottime() -> float:
    """Seconds on a clock no one sets: CLOCK_BOOTTIME where there is one (it counts a suspend,
    which the replicas of a cloud live through), else `time.monotonic`."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


def _bursts(times: list[float]) -> list[float]:
    """When each burst began (oldest first): failures within CRASH_BURST_SECONDS of each other
    (what one pass finds) are one burst, not N."""
    bursts: list[float] = []
    for at in sorted(times):
        if not bursts or at - bursts[-1] > CRASH_BURST_SECONDS:
            bursts.append(at)
    return bursts


BUSY = frozenset(
    {ReplicaStatus.PROVISIONING, ReplicaStatus.STARTING, ReplicaStatus.NOT_READY, ReplicaStatus.SHUTTING_DOWN}
)
#: Replicas whose next state only a probe can tell: probed at the busy pace even while failed
#: applies back off (the backoff spaces applies, not probes).
PROBED = frozenset({ReplicaStatus.STARTING, ReplicaStatus.NOT_READY})


#: A replica ID in a noted line (`skyhedge.planner.replica_id`'s `r-0007`), as a word of its own.
_REPLICA_ID = re.compile(r"\br-\d+\b")

#: A traceback's last line: `[module.]NameError[: message]`.
_EXCEPTION_LINE = re.compile(
    r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit))\b(?::\s*(.*))?$"
)


def _python_exception(lines: list[str]) -> str | None:
    """A command that died in a Python traceback is explained by its last line (the exception),
    not its first ("Traceback (most recent call last):", or a frame's file): a Ctrl-C reaching a
    local launcher while it still imported its modules read `execution halted (Traceback (most
    recent call last): File ".../urllib/parse.py" ...)` (found by an audit). None: no traceback."""
    start = next((i for i, line in enumerate(lines) if "Traceback (most recent call last):" in line), None)
    if start is None:
        return None
    for line in reversed(lines[start + 1 :]):
        match = _EXCEPTION_LINE.match(line)
        if match:
            if match.group(1) == "KeyboardInterrupt":
                return "interrupted (a Ctrl-C reached the command)"
            return line[:240]
    return None


def apply_cause(detail: str) -> str:
    """The first line of an engine error that says *why* (Terraform's own first line, e.g.
    "local-exec provisioner error", names only the mechanism): the output of the failed command
    when there is one, else the first line that is not an `Error:` heading. An output line
    ending in ':' is followed by a log's tail (the local launcher's "exited at once ...; log
    FILE:"): its last line, the command's own error, is appended (cut to 400 chars; other lines to 240)."""
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    raised = _python_exception(lines)
    if raised is not None:
        return raised
    for i, line in enumerate(lines):
        if "Output: " in line:
            text = line.split("Output: ", 1)[1].strip()
            if text:
                if text.endswith(":"):
                    tail = []
                    for more in lines[i + 1 :]:
                        if more.startswith(("Error:", "│ Error:", "Error running command")):
                            break
                        if not more.startswith("=== skyhedge: "):
                            tail.append(more)
                    if tail:
                        return f"{text} {tail[-1]}"[:400]
                return text.rstrip(":")[:400]
    for line in lines:
        if not line.startswith(("Error:", "│ Error:")):
            return line.lstrip("│ ").strip()[:240]
    return ""


def with_cause(line: str, cause: str) -> str:
    """`line`, and in parentheses what `cause` (`apply_cause`) adds to it: nothing when the line
    says it already, only the tail when the line holds the cause's first part."""
    if not cause or cause in line:
        return line
    lo, hi = 0, len(cause)
    while lo < hi:  # the longest head of the cause that the line already holds
        mid = (lo + hi + 1) // 2
        if cause[:mid] in line:
            lo = mid
        else:
            hi = mid - 1
    rest = cause[lo:].strip() if lo >= 20 else cause
    return f"{line} ({rest})" if rest else line


@dataclass(frozen=True)
class ControllerOptions:
    """Timing and mode. Times in seconds.

    `interval`: the period when nothing is happening (events wake the loop sooner);
    `busy_interval`: while replicas start, drain or fail probes; `max_backoff`: the longest wait
    after failed applies; `max_root_backoff`: the longest wait before a root whose applies keep
    failing (its cloud's API gone: `RootOutage`) is applied again; `spot_retry`: how long spot
    launches into a zone that refused one for capacity wait, doubling per refusal in a row there
    up to `max_spot_retry` (0: retried at the next apply; see SPOT_RETRY_SECONDS);
    `survival_period`: how often spot replicas that stayed READY report their zone as SURVIVED
    to the policy; `assume_ready`: GitOps mode (CI applies; replicas count as READY once
    committed, and nothing is probed or routed).
    """

    interval: float = 10.0
    busy_interval: float = 1.0
    max_backoff: float = 60.0
    max_root_backoff: float = 300.0
    spot_retry: float = SPOT_RETRY_SECONDS
    max_spot_retry: float = SPOT_RETRY_MAX_SECONDS
    survival_period: float = 60.0
    policy: str | None = None
    autoscale: bool = True
    assume_ready: bool = False


@dataclass(frozen=True)
class Note:
    at: float
    text: str


@dataclass(frozen=True)
class _Written:
    """What the controller last wrote to state.json: the state without its clocks, the clocks
    (both as compact JSON: 2 ms to make at the GONE_KEPT cap, where state.json's own indented
    text takes 9 ms more), when, and the file's stat stamp then (a file written or removed by
    anyone else since is written again)."""

    durable: str
    clocks: str
    at: float
    stamp: tuple[int, int, int, int] | None


@dataclass(frozen=True)
class _RecordText:
    """One replica record's part of `Controller._texts`: its field values when it was encoded (a
    deep copy, so that a field changed in place, a record's `outputs`, compares unequal) and its
    compact JSON (`"id":{...}`)."""

    values: tuple[Any, ...]
    text: str


def _http_prober(readiness: ReadinessProbe) -> Prober:
    """The watcher's prober (`runner`'s), for an earlier spec's probe read back from the state."""
    from skyhedge.controller.adapters import HttpProber  # (adapters imports this module's peers)

    return HttpProber(readiness)


def _spot_pause_entry(key: Any, entry: Any) -> Location | None:
    """The zone of one `SPOT_PAUSES_KEY` entry (None: not a zone with `refusals`, a positive
    integer, and `at`, a finite time)."""
    if not isinstance(key, str) or not isinstance(entry, dict):
        return None
    refusals, at = entry.get("refusals"), entry.get("at")
    if not isinstance(refusals, int) or isinstance(refusals, bool) or refusals < 1:
        return None
    try:
        if not isinstance(at, (int, float)) or isinstance(at, bool) or not math.isfinite(float(at)):
            return None
    except OverflowError:  # (an integer past a float's range)
        return None
    try:
        loc = Location.parse(key)
    except ValueError:
        return None
    return loc if all(loc.key.split("/")) else None


def _is_routed_table(value: Any) -> bool:
    """Whether `extra.routed` is what the watcher writes: a list of [replica id, endpoint] pairs."""
    return isinstance(value, list) and all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], str) for p in value
    )


def _is_drain_hold(value: Any) -> bool:
    """Whether one `extra.drain` entry is what `_hold_for_drain` writes: `{since, pids: [pid, ...]}`.
    Its `pids` go to the router's `draining` each pass: a number there (a hand edit) was a
    TypeError at every pass, as a `drain` that is no object was."""
    if not isinstance(value, dict):
        return False
    since, pids = value.get("since"), value.get("pids")
    number = isinstance(since, (int, float)) and not isinstance(since, bool) and math.isfinite(since)
    return number and isinstance(pids, list) and all(type(p) is int for p in pids)


#: `state.extra` tables the watcher reads back as these shapes: (what is expected, its test, what
#: dropping a malformed one costs). A hand edit that breaks one was a traceback at every pass
#: (`routed`: ValueError unpacking a pair; `drain`: AttributeError popping from a string).
_KEPT_SHAPES: dict[str, tuple[str, Callable[[Any], bool], str]] = {
    "routed": (
        "a list of [replica id, endpoint] pairs",
        _is_routed_table,
        "the router is given the routable replicas again",
    ),
    DRAIN_KEY: (
        "an object of replica id -> {since, pids}",
        lambda v: isinstance(v, dict) and all(_is_drain_hold(h) for h in v.values()),
        "released replicas are removed without waiting for their requests",
    ),
    "autoscaler": ("an object", lambda v: isinstance(v, dict), "the autoscaler starts afresh"),
}


def probe_refused(
    prober: Prober, live: Sequence[ReplicaRecord], current: dict[str, str]
) -> tuple[int, str, str] | None:
    """Probe the READY replicas of the current revision (`current`: cloud -> revision) with
    `prober`: (how many were probed, the first one's ID, why it failed) when none passes, else
    None (one passes, or none could be asked: replicas this process could not probe prove nothing
    either way). Outdated replicas keep the probe they were launched under, so they are not
    asked; neither are replicas not READY or draining."""
    ready = [
        r
        for r in live
        if r.ready_at is not None
        and r.not_ready_since is None
        and not r.draining
        and r.revision in (None, current.get(r.cloud))
    ]
    results = prober.probe(ready) if ready else {}
    if not results or any(ok for ok, _ in results.values()):
        return None
    rid = min(results, key=replica_order)
    return len(results), rid, results[rid][1]


#: A failing root's next retry waits at least this many times as long as its last failed run
#: took (`Controller._track_outages`): the loop waits for a run at most 1 / (1 + this) of the time.
ROOT_RETRY_SPACING = 3.0


def _root_of(line: str, roots: Sequence[str] | set[str] | dict[str, Any]) -> str | None:
    """The root of `roots` an executor's error line (`aws/us-east-1: ...`) is about, if any."""
    head = line.split(": ", 1)[0]
    return head if head in roots else None


@dataclass
class RootOutage:
    """A Terraform root (one cloud region) whose applies fail naming no launch of its own (not
    for capacity, not a bad image: `ExecResult.failed_roots`): expired credentials, an endpoint
    refusing connections, throttling, a permission removed.

    The root is held back with a backoff of its own (`busy_interval` doubling per failure, up
    to `max_root_backoff`) while the other roots apply as usual: one backoff for the whole apply
    re-ran the dead root (a Terraform run of 7 s with expired credentials, 28 s against a refused
    endpoint, minutes throttled) at every pass that learned anything, holding up the replacements
    of the other clouds behind it, and up to 75 times an hour. Kept in `state.extra` for `status`
    (`since`, `failures`, `retry_at`, `reason`: the apply's error line, secrets masked;
    `idle_since`, below).

    An outage is *idle* (`idle_since`) once its root, tried, had nothing left to apply (its
    launches refused and placed elsewhere): it stays failing (its last try failed, and nothing
    says the API is back), so `status` and `skyhedge_root_failing` keep saying so, but it is
    neither due (no pass is run for it) nor held (a launch placed there again is tried at once).
    Dropped, the page never fired while the credentials stayed expired: 1 for 5 minutes of a
    2-hour outage, the service quietly running (and billed) elsewhere."""

    since: float
    failures: int
    retry_at: float
    reason: str
    wait: float = 0.0  # the wait before `retry_at` (in memory: a restarted watcher tries at once)
    idle_since: float | None = None  # since when it has had nothing to apply (None: not idle)

    def held(self, now: float) -> bool:
        """Held back by the executor: a retry not due yet (an idle outage is never held)."""
        return self.idle_since is None and self.retry_at > now

    def due(self, now: float) -> bool:
        """Its retry is due: the pass applies even with nothing changed (never when idle)."""
        return self.idle_since is None and self.retry_at <= now

    def to_json(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "failures": self.failures,
            "retry_at": self.retry_at,
            "reason": self.reason,
            "idle_since": self.idle_since,
        }

    @classmethod
    def from_json(cls, value: Any) -> RootOutage | None:
        """A kept record, or None for one a hand edit broke (dropped: the root is tried again)."""
        if not isinstance(value, dict):
            return None
        try:
            since, retry_at = float(value["since"]), float(value["retry_at"])
            failures, reason = int(value["failures"]), str(value["reason"])
        except (KeyError, TypeError, ValueError):
            return None
        if not math.isfinite(since + retry_at):
            return None
        idle = value.get("idle_since")  # (absent from an earlier release's record: not idle)
        ok = isinstance(idle, (int, float)) and not isinstance(idle, bool) and math.isfinite(idle)
        return cls(since, max(1, failures), retry_at, reason, idle_since=float(idle) if ok else None)


#: What an error line must not carry into the log and `status`: AWS access key IDs, and long
#: opaque tokens (a session token, a bearer token echoed in a signature mismatch's canonical
#: request). Terraform's errors hold none of them in the cases measured; this is a guard.
_SECRETS = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b|[A-Za-z0-9+/=_-]{40,}")
#: A long run that is a path of lower-case names (`projects/p/zones/z/instances/svc-r-0001`, an
#: IAM role's `assumed-role/deployer/session`, an API URL's or a state bucket's path): what a
#: permission error names, no secret. A key or a token mixes cases (a secret access key's `/`s
#: included), and so does no path's name: one of 40 characters (a hex token in a path) is masked.
_PATH = re.compile(r"/*[a-z0-9._-]{1,39}(?:/+[a-z0-9._-]{0,39})+")
#: A URL's `user:password@`, and a query parameter carrying a credential (`access_token=`,
#: `X-Goog-Signature=`, `X-Amz-Credential=`): short ones too.
_URL_SECRETS = re.compile(
    r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"
    r"|(?i:(?<=[?&;])[\w.-]*(?:token|signature|secret|password|passw|credential|key)[\w.-]*=)[^&\s'\")]+"
)


def masked(text: str) -> str:
    """`text` with what looks like a key, a token or a URL's password replaced by `***`."""
    text = _URL_SECRETS.sub(
        lambda m: m.group(0).split("=", 1)[0] + "=***" if "=" in m.group(0) else "***", text
    )
    return _SECRETS.sub(lambda m: m.group(0) if _PATH.fullmatch(m.group(0)) else "***", text)


def _span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Controller:
    """Owns one service's state while the supervisor holds its writer lock."""

    def __init__(
        self,
        spec: ServiceSpec,
        state_dir: Path,
        *,
        executor: Executor,
        router: RouterPort | None = None,
        prober: Prober | None = None,
        sources: Sequence[EventSource] = (),
        clock: Callable[[], float] = time.time,
        options: ControllerOptions | None = None,
        placement: Placement | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        self.spec = spec
        self.state_dir = state_dir
        self.executor = executor
        self.router = router
        self.prober = prober
        self.sources = list(sources)
        self.clock = clock
        # a clock no one sets, to tell the wall clock's jumps from time passing (`_follow_clock`)
        # and to measure how long a replica went unprobed; `clock` itself when that is not the wall
        # clock (a test's fake clock, whose steps are time passing)
        self._mono: Callable[[], float] = monotonic or (_boottime if clock is time.time else clock)
        self._clock_seen: tuple[float, float] | None = None  # (clock, monotonic) at the last pass
        self._probed: dict[str, float] = {}  # replica ID -> when (monotonic) a probe was last made
        self._unprobed: set[str] = set()  # NOT_READY for want of a probe made (`mark_unprobed`)
        # replica ID -> endpoint: taken out of the router while not known gone (a failed probe),
        # its connections to be cut once it is (`_sever_gone_unrouted`)
        self._unrouted: dict[str, str] = {}
        # replicas whose last probe timed out (no answer at all: hung, or a vanished machine):
        # taken out of the router, their unanswered requests are cut to be retried (`_cut_hung`)
        self._timed_out: set[str] = set()
        # the policy's time when it runs faster than `clock`: a market replay's (`up --market-trace`)
        self.policy_clock: PolicyClock | None = None
        self.options = options or ControllerOptions()
        self.placement = placement or resolve_placement(spec)
        self.state: ServiceState = load_state(state_dir, spec.name)
        # the lock is ours: a killed run's deletes are decided again, its drains carry on
        drains = self.state.extra.get(DRAIN_KEY)
        if reopened := reopen_unfinished_deletes(self.state, keep=drains if isinstance(drains, dict) else ()):
            log.info("%s: %s: deletes a killed run left unfinished", spec.name, ", ".join(reopened))
        set_gitops(self.state, self.options.assume_ready)
        self.scaler = autoscaler.AutoscalerConfig.from_spec(spec)
        self.notes: deque[Note] = deque(maxlen=50)
        self._noted: dict[str, float] = {}  # text -> when last noted (repeats suppressed)
        self._noted_cap = NOTED_PRUNE_AT  # size at which `_noted` is next pruned
        self._note_lock = threading.Lock()  # `note` runs in the replay's thread too (`_noted`, `notes`)
        self.last_plan: Plan | None = None
        self.ticks = 0
        self._failures = int(self.state.extra.get("launch_failures", 0))
        # root key -> its outage (`RootOutage`): held back with its own backoff. A restarted
        # watcher tries each at once (the operator may have restarted it for renewed credentials),
        # its count of failures kept, so a root still failing backs off from where it was.
        kept = self.state.extra.get(FAILING_ROOTS_KEY)
        self._outages: dict[str, RootOutage] = {}
        for key, value in kept.items() if isinstance(kept, dict) else ():
            if (outage := RootOutage.from_json(value)) is not None:
                if outage.idle_since is None:  # (an idle one is tried with a launch placed there)
                    outage.retry_at = 0.0
                self._outages[str(key)] = outage
        # after a failed apply (or a refused launch), no apply before this time unless a pass
        # learns something new (a source event, a probe changing a replica's state)
        self._retry_at: float | None = None
        # the last failed apply failed only by refused launches (no error): its retry has nothing
        # to ask while every launch left is paused (`_retry_rides_pause`)
        self._refused_only = False
        self._retry_deferred = False  # this pass left that retry to the pause's end
        self._quota_held = False  # this pass's plan had launches held by a quota (`_pace_quota`)
        # the pass runs for a wake-up (a process exit, the capacity file, a message), not for
        # the delay the last pass asked; the supervisor sets it (a direct caller acts as woken)
        self.woken = True
        self.last_apply: ExecResult | None = None  # the last pass's apply (None: nothing applied)
        self._started = False
        # A pass that recorded a plan and then crashed before the executor finished (a failed
        # save: full disk, read-only state dir) left intent that no later plan shows as a change:
        # the next pass applies it anyway.
        self._unsettled = False
        # replicas whose launch kept failing (not crashes) -> when given up; in the state, so a
        # restarted watcher still holds launches that keep failing (`_give_ups`)
        given_up = self.state.extra.get("given_up")
        self._given_up: dict[str, float] = {
            str(k): float(v)
            for k, v in (given_up.items() if isinstance(given_up, dict) else ())
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self._attempts: dict[str, int] = {}  # failed applies per replica never provisioned
        # a zone's spot refusals in a row -> (how many, when the last was): spot launches there
        # wait (`_spot_wait`); forgotten at the first spot launch there that succeeds. Kept in the
        # state (SPOT_PAUSES_KEY, read back by `_load_spot_pauses`): in memory only, a watcher
        # restarted in a drought asked every refusing zone again at once, then from 30 s.
        self._spot_refused: dict[Location, tuple[int, float]] = {}
        self._spot_due: float | None = None  # the earliest a spot launch left out is due
        self._spot_held: set[Location] = set()  # the zones this pass's plan left spot launches out of
        # where the last on-demand launch was refused (quota, capacity): an on-demand launch
        # planned there covers no paused spot launch (`_pace_spot`) until one there succeeds
        self._ondemand_refused: set[Location] = set()
        # quotas found used up, "cloud/region/market" (region "*": the cloud's) -> {reason, since,
        # refusals, at, next_at}: no launch there until next_at (`_pace_quota`); kept in the state
        # (QUOTA_KEY) for `status` and a restarted watcher; dropped at a launch there that succeeds
        self._quota: dict[str, dict[str, Any]] = {}
        self._routing_failed = False
        self._listeners: list[Callable[[Controller], None]] = []
        self._refresh = False  # a reloaded spec: apply and route on the next pass
        self._retiring: list[EventSource] = []  # sources of an earlier spec: one last poll
        # revision -> the prober of the spec its replicas were launched under, for a reload that
        # changed the readiness probe together with the revision (`reconfigure`), and that probe as
        # JSON, kept in the state (EARLIER_PROBES_KEY): a restarted watcher rebuilds the prober from
        # it (an HttpProber, as the watcher's own prober is: `runner`)
        self._earlier_probers: dict[str, Prober] = {}
        self._earlier_probes: dict[str, dict[str, Any]] = {}
        self._probe_store = ProbeStore(state_dir)  # where those probes are kept (not state.json)
        # the probe the current revision's replicas were probed with before a restart, when the
        # spec's differs: checked at the first probe (`_check_restart_probe`), as a reload's is
        self._restart_probe: tuple[ReadinessProbe, dict[str, Any]] | None = None
        # that probe and its prober, kept for the current revision's replicas because none of them
        # passed the spec's: until a reload takes a probe they pass (`held_probe`)
        self._held: tuple[Prober, dict[str, Any]] | None = None
        self._spec_probe: tuple[ServiceSpec, dict[str, Any]] | None = None  # `_in_force`'s
        self._housekept: float | None = None  # time.monotonic() of the last housekeeping
        # replicas a killed run recorded and never read back: once this watcher's first apply has
        # run, what such a run launched and Terraform never saved is found (and, where this
        # state launched it, terminated), as `apply` does (GitOps: CI applies, not this state)
        self._unsaved = [] if is_gitops(self.state) else unsaved_replicas(self.state)
        self._written: _Written | None = None  # what `save` last wrote (None: nothing yet)
        self._record_texts: dict[str, _RecordText] = {}  # replica ID -> its text (`_records_text`)
        self._policy_clocks: dict[str, frozenset[str]] = {}  # policy name -> its clock_memory
        # replicas a pass re-created under their ID (`recreated_replicas`): looked for as those,
        # once a pass applied cleanly (what a killed re-create launched; in memory only)
        self._recreated = Recreated()
        # replicas the event sources found gone (`lost_replicas`): looked for as those, once an
        # apply dropped them from their root (a killed re-create of one left a machine; in memory)
        self._lost: list[ReplicaRecord] = []
        self._load_kept_tables()

    def reconfigure(
        self,
        spec: ServiceSpec,
        *,
        placement: Placement,
        executor: Executor,
        router: RouterPort | None,
        prober: Prober | None,
        sources: Sequence[EventSource],
    ) -> None:
        """Carry on under a reloaded spec (same service name, so the same state). The next pass
        applies and routes whatever the plan says, as the first after a restart does. Sources no
        longer in `sources` are polled once more by it (what they caught since the last pass is
        not lost), acknowledged and closed. A new revision (`run`, `resources`) starts the
        crash-loop count over (`_crashes` counts the current revision's replicas only). The
        operator's notes, the launch bookkeeping and the autoscaler's history stay.

        A new `readiness_probe` that comes with a new revision (the new version's health path)
        is the new replicas' probe: the outdated ones are still probed with the one they were
        launched under until the rolling update releases them. Probed with the new one, they
        all went NOT_READY at the reload and FAILED 180 s later, while a cloud replacement may
        take longer than that to come up: nothing was left to route to (every request 503) until
        it did. A probe-only edit is every replica's (`runner._check_new_probe` refuses one that
        none of them passes)."""
        if self.prober is not None and prober is not None:
            live = self.state.live()
            current = {cloud: replica_revision(spec, cloud) for cloud in {r.cloud for r in live}}
            # the probe in force: the spec's, or the one a restart kept (`held_probe`, or not
            # checked yet: `_restart_probe`)
            if self._held is not None:
                was_prober, was = self._held
            elif self._restart_probe is not None:
                was_prober, was = _http_prober(self._restart_probe[0]), self._restart_probe[1]
            else:
                was_prober, was = self.prober, readiness_probe_json(self.spec.readiness_probe)
            if was != readiness_probe_json(spec.readiness_probe):
                for rev in outgoing_revisions(live, self._earlier_probers, current):  # (as `apply`)
                    self._earlier_probers[rev] = was_prober
                    self._earlier_probes[rev] = was
            # a revision current again (a spec reverted) is probed with the spec's probe
            self._earlier_probers = {
                rev: p for rev, p in self._earlier_probers.items() if rev not in current.values()
            }
        self._retiring += [s for s in self.sources if s not in sources]
        self.spec = spec
        before, self.placement = self.placement, placement
        self._forget_quotas_out_of_reach(before)
        self._forget_spot_pauses_out_of_reach(before)
        self._forget_failing_roots_out_of_reach()
        self.executor = executor
        self.router = router
        self.prober = prober
        # a reload was checked against the probe in force (`runner._check_new_probe`, which a
        # held probe makes it run); one not checked yet is still checked at the first probe,
        # unless the reload went back to it
        self._held = None
        if self._restart_probe is not None and self._restart_probe[1] == readiness_probe_json(
            spec.readiness_probe
        ):
            self._restart_probe = None
        self._keep_earlier_probes()
        self.sources = list(sources)
        self.scaler = autoscaler.AutoscalerConfig.from_spec(spec)
        self._refresh = True

    @property
    def held_probe(self) -> dict[str, Any] | None:
        """The probe the current revision's replicas are probed with when it is not the spec's
        (as JSON): a restart found that none of them passes the spec's (`_check_restart_probe`).
        A reload checks the spec's probe against them again, even when the file is unchanged."""
        return None if self._held is None else self._held[1]

    @property
    def retiring(self) -> list[EventSource]:
        """Sources of an earlier spec, polled once more by the next pass, then closed."""
        return list(self._retiring)

    # -- small helpers ---------------------------------------------------------------------------

    def note(
        self, text: str, at: float | None = None, *, level: int = logging.INFO, repeats: bool = False
    ) -> None:
        """Record and log a line for the operator. A line noted in the last NOTE_REPEAT_SECONDS (a
        failure retried every pass) is not noted again, so it does not flood the log and push
        everything else out of the dashboard's history. `level`: WARNING for what failed (an
        apply, routing, an event source, a crash loop), so that a log pipeline alerting on
        warnings sees it and `--log-level warning` keeps it (every notice was INFO). `repeats`:
        the line answers an event of its own each time (a spec reload's outcome: an edit, a
        request), so it is noted even when the same words were noted a moment ago: the same
        typo made again, or a fix re-read as "no change", went unsaid for a minute."""
        at = self.clock() if at is None else at
        # Called from other threads too (a market replay's, `up --market-trace`): the table of
        # lines noted and `notes` change together under one lock. Without it, a pass pruning the
        # table while the replay noted lost the replay's lines from it (their repeats noted
        # again), and two threads noting one line both noted it.
        with self._note_lock:
            last = self._noted.get(text)
            if not repeats and last is not None and 0 <= at - last < NOTE_REPEAT_SECONDS:
                log.debug("%s: %s (repeated)", self.spec.name, text)
                return
            if len(self._noted) >= self._noted_cap:
                # lines older than the window are dropped once the table has doubled since it was
                # last pruned, not at every line: a pass noting one line per replica (a zone of
                # 1,000 preempted, as many READY) walked the whole table for each, 0.7 s of the pass
                self._noted = {t: a for t, a in self._noted.items() if 0 <= at - a < NOTE_REPEAT_SECONDS}
                self._noted_cap = max(NOTED_PRUNE_AT, 2 * len(self._noted))
            self._noted[text] = at
            self.notes.append(Note(at, text))
            # (in the lock: the log in `notes`' order)
            log.log(level, "%s: %s", self.spec.name, text, extra=self._log_fields(text))

    def _log_fields(self, text: str) -> dict[str, str]:
        """A noted line's structured fields (`--log-format json`): `service`, and `replica_id`,
        `zone` and `market` when the line names exactly one replica of the state (`r-0007 READY in
        ...`, `launch of r-0007 refused ...`): a log pipeline filters on them without parsing the
        text, which stays the text format's. A line naming several (a plan, a routing change with
        several upstreams) or none names no replica."""
        fields = {"service": self.spec.name}
        named = set(_REPLICA_ID.findall(text))
        if len(named) == 1:
            rid = named.pop()
            rec = self.state.replicas.get(rid)
            if rec is not None:
                fields.update(replica_id=rid, zone=rec.zone, market=rec.market)
        return fields

    def subscribe(self, listener: Callable[[Controller], None]) -> None:
        """Called after every tick (the dashboard redraws from it)."""
        self._listeners.append(listener)

    def save(self, *, now: bool = False) -> None:
        """Write the state, unless state.json holds it already, or all that changed since the last
        write are clocks (see SAVE_EVERY) and that write is less than SAVE_EVERY old. `now`: write
        any change (the intent before an apply, and its results)."""
        self.state.extra["launch_failures"] = self._failures
        self.state.prune_gone()
        durable, clocks = self._texts()
        at = self.clock()
        last = self._written
        if last is not None and durable == last.durable and last.stamp == self._stamp():
            if clocks == last.clocks:
                return  # state.json holds this very state
            if not now and 0 <= at - last.at < SAVE_EVERY:  # (a clock stepped back: write)
                return
        self._write(durable, clocks, at)

    def flush(self) -> None:
        """Write the clocks `save` held back: a watcher stopping calls it, so that the next one
        resumes from them (the autoscaler's window, the policy's clock). Only if the rest of the
        state is as last written: a pass cut short (an error, a second Ctrl-C) leaves its
        half-made changes unwritten, as it always has (its events are delivered again)."""
        last = self._written
        if last is None:
            return
        durable, clocks = self._texts()
        if durable == last.durable and (clocks != last.clocks or last.stamp != self._stamp()):
            self._write(durable, clocks, self.clock())

    def _write(self, durable: str, clocks: str, at: float) -> None:
        # the probes first: state.json never names a digest the probes file does not hold
        in_force = self._in_force()
        try:
            self._probe_store.keep(in_force, self._earlier_probes)
        except OSError as exc:
            raise unwritable(self.state_dir, exc) from exc
        save_state(self.state_dir, self.state)
        self._written = _Written(durable, clocks, at, self._stamp())

    def _stamp(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.state_dir / STATE_FILE)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _texts(self) -> tuple[str, str]:
        """The state as compact JSON: everything but its clocks (see SAVE_EVERY), and the clocks.
        Each present key goes to exactly one of the two, so equal pairs are an equal state."""
        st = self.state
        extra = dict(st.extra)
        clocks: dict[str, Any] = {key: extra.pop(key) for key in CLOCK_KEYS if key in extra}
        scaler = extra.get("autoscaler")
        if isinstance(scaler, dict):
            scaler = dict(scaler)
            clocks["autoscaler"] = {k: scaler.pop(k) for k in autoscaler.MEASUREMENTS if k in scaler}
            extra["autoscaler"] = scaler
        memory = st.policy_memory
        inner = memory.get("memory")
        # only the policy that decides (and so was loaded already): a name state.json holds is
        # never imported for this
        running = self.spec.replica_policy.policy if self.options.policy is None else self.options.policy
        if memory.get("policy") == running and isinstance(inner, dict):
            if running not in self._policy_clocks:
                self._policy_clocks[running] = clock_memory(running)
            keys = self._policy_clocks[running]
            if keys:
                inner = dict(inner)
                clocks["policy"] = {k: inner.pop(k) for k in sorted(keys) if k in inner}
                memory = {**memory, "memory": inner}
        view = st.json_view(extra=extra, policy_memory=memory, replicas={})
        durable = json.dumps(view, sort_keys=True) + self._records_text()
        return durable, json.dumps(clocks, sort_keys=True)

    def _records_text(self) -> str:
        """The replica records as compact JSON, for `_texts`: a record is encoded again only when
        one of its fields changed since it last was. Every pass tells whether the state changed by
        this text, and the state keeps up to GONE_KEPT gone records, which never change again:
        converting and encoding them all at every pass grew an idle pass with the records kept
        (a soak audit, `up --market-trace` at speedup 300, 10 passes a second: 13 ms with 5 gone
        records, 33 ms at the cap of 500; `benchmarks/state_write_bench.py` at the cap: 4.3 ms,
        1.1 ms with each record's text kept)."""
        made: dict[str, _RecordText] = {}
        kept = self._record_texts
        for rid, rec in sorted(self.state.replicas.items()):
            values = record_values(rec)
            entry = kept.get(rid)
            if entry is None or entry.values != values:
                record = json.dumps(dict(zip(RECORD_FIELDS, values, strict=True)), sort_keys=True)
                entry = _RecordText(copy.deepcopy(values), f"{json.dumps(rid)}:{record}")
            made[rid] = entry
        self._record_texts = made  # (forgotten records are dropped with it)
        return "{" + ",".join(entry.text for entry in made.values()) + "}"

    # -- the tick --------------------------------------------------------------------------------

    def tick(self) -> float:
        """One reconcile pass; returns how long to wait before the next (unless woken).

        The housekeeping runs whether the pass succeeds or fails: on a full disk every pass
        failed at its first write of state.json, before it, so the logs it rotates and prunes
        (nginx's, the local replicas') were never rotated or pruned again, and the disk they
        filled stayed full."""
        try:
            delay = self._pass()
        except Exception:
            self._housekeep()
            raise
        self._housekeep()
        return delay

    def _pass(self) -> float:
        now = self.clock()
        self._follow_clock(now)
        self.ticks += 1
        events = self._poll(now)
        live = self.state.live()
        for line in ingest(self.state, events, now):
            self.note(line, now)
        if not is_gitops(self.state):
            seen = {r.id for r in self._lost}
            self._lost += [r for r in lost_replicas(self.state, live) if r.id not in seen]
        self._expire_warnings(now)
        learned = self._probe(now) or bool(events)
        # Probing takes time and stamps what it finds when found: the rest of the pass must see
        # those failures as past, or a crash loop found by probes is relaunched before it counts.
        now = max(now, self.clock())
        self._autoscale(now)
        self._survival(now)
        refresh = not self._started or self._refresh
        # replicas gone leave the router now; newly READY ones join at the pass's next routing,
        # right after the plan, in the same nginx reload as the replicas it releases
        self._route(force=refresh, defer_additions=True)
        self._sever_gone_unrouted()  # before the apply: a cloud's takes minutes
        plan, memory = compute_plan(
            self.spec,
            self.state,
            now=now,
            policy_name=self.options.policy,
            placement=self.placement,
            clock=self.policy_clock,
        )
        plan = self._finalise(plan)
        plan = self._pace_spot(plan, now)
        if plan.has_changes and self.options.assume_ready:
            plan, memory = self._settle(plan, memory, now)
        self.last_plan = plan
        self._retry_deferred = False
        result: ExecResult | None = None
        hold = self._crash_hold(now) if any(r.action == CREATE for r in plan.replicas) else 0.0
        self.state.extra.pop(LAUNCH_HOLD_KEY, None)  # set again below while launches are held
        if hold > 0 and self._started and not self._unsettled:
            # a crash loop: launch nothing for now, but release and drain what the plan releases
            until = time.strftime("%H:%M:%S", time.localtime(now + hold))
            window = f"the last {CRASH_WINDOW_SECONDS / 60:.0f} min"
            if self._hold_after(self._crashes(now), now) > 0:
                bursts = len(self._crashes(now))
                why = f"crash loop: {bursts} bursts of replicas failing soon after launch in {window}"
                see = ""
            else:
                why = (
                    f"launches keep failing: {len(self._give_ups(now))} bursts of launches given up "
                    f"after {LAUNCH_ATTEMPTS} failed applies in {window}"
                )
                see = " (see the apply errors above)"
            kept = sorted(
                (r.id for r in plan.replicas if r.outdated and r.action != DELETE), key=replica_order
            )
            if kept:
                # a rolling update to a revision whose replicas fail: it stops where it is, the
                # outdated replicas serving (none is released before a replacement is READY)
                why += (
                    f"; rolling update stopped: {len(kept)} replica(s) of the earlier spec keep serving "
                    f"({', '.join(kept)}) until replicas of the new one get READY (fix or revert the spec)"
                )
            self.note(f"{why}; new launches held until {until}{see}", level=logging.WARNING)
            # `status` says so too: an empty table with no reason sent the operator to the log
            self.state.extra[LAUNCH_HOLD_KEY] = {"until": now + hold, "reason": why}
            plan = replace(
                plan,
                replicas=tuple(r for r in plan.replicas if r.action != CREATE),
                next_id=self.state.next_id,
            )
            # Apply also when the plan changes nothing but replicas were found failed (this pass,
            # or held by a root since): a replica its probe failed still runs (on a cloud, a
            # billed machine) until an apply drops it from its root, and the held launches are
            # what used to carry that apply, so it ran for as long as the hold lasted.
            backing_off = self._retry_left(now) > 0
            if plan.has_changes or ((learned or self._gone_still_applied()) and not backing_off):
                result = self._act(plan, memory, now)
        elif (
            self._failures
            and self._retry_left(now) > 0
            and not (learned or refresh or self._unsettled or self.woken)
        ):
            # backing off after a failed apply, and this pass (run to probe the replicas that
            # did start) learned nothing new: no apply yet, nothing consumed (the pass that
            # applies decides with these events)
            pass
        elif (
            plan.has_changes
            and self._waits_on_held_roots(plan, now)
            and not (refresh or self._failures or self._unsettled or self._outage_due(now))
        ):
            # every change waits on a root held back (its cloud's API failing) until its retry:
            # nothing to apply before then, nothing consumed (a launch waiting there applied,
            # and state.json was written twice, at every pass of the busy pace)
            pass
        elif self._retry_rides_pause(plan, now) and not (refresh or self._unsettled or self._outage_due(now)):
            # the retry of refused launches whose replacements all wait out a pause (a quota's,
            # a zone's): an apply now asks nothing; it goes with the launches when the pause ends
            self._retry_deferred = True
        elif plan.has_changes or refresh or self._failures or self._unsettled or self._outage_due(now):
            result = self._act(plan, memory, now)
        else:  # nothing to do: the policy has still seen the events (saved below)
            remember_decision(self.state, memory, now)
            self.state.pending_events = []
        self._track_rollout(plan, result, now)
        if result is not None and not result.failed:
            self._sweep()
        self._started = True
        self._refresh = False
        self._route()
        self._sever_gone_unrouted()
        self.save()
        finish = getattr(self.executor, "finish", None)  # GitOps: commit with the state just saved
        commit_failed: SkyhedgeError | None = None
        if finish is not None:
            # In GitOps mode the commit is the pass's apply (`skyhedge_applies_total` counts
            # commits): a commit that landed replaces the executor's empty result, a failed one
            # is a failed apply. A failure is raised once the listeners have seen the pass.
            landed = getattr(self.executor, "last_commit", None)
            try:
                note = finish(self.state)
            except SkyhedgeError as exc:
                commit_failed = exc
                self.last_apply = ExecResult(errors=(str(exc),))
            else:
                committed = getattr(self.executor, "last_commit", None)
                if isinstance(committed, ExecResult) and committed is not landed:
                    self.last_apply = committed
                    # the commit wrote state.json with this very state: it is the last write,
                    # or the next idle pass rewrote it for its clocks alone (the working copy
                    # dirty a pass after every commit, not SAVE_EVERY later)
                    self._written = _Written(*self._texts(), self.clock(), self._stamp())
                if note:
                    self.note(note)
        for source in [*self.sources, *self._retiring]:
            source.ack()
        for source in self._retiring:
            try:
                source.close()
            except Exception as exc:  # closing must not cost the pass
                log.debug("closing event source %s: %s", source.name, exc)
        self._retiring = []
        for listener in self._listeners:
            try:
                listener(self)
            except Exception:  # a dashboard or metrics bug must not cost the pass its result
                log.exception("%s: a listener of the reconcile pass failed", self.spec.name)
        if commit_failed is not None:
            raise commit_failed  # the supervisor backs off and retries; `watch --once` exits 1
        return self._next_delay()

    def _poll(self, now: float) -> list[PreemptionEvent]:
        out: list[PreemptionEvent] = []
        live = self.state.live()
        for source in [*self.sources, *self._retiring]:
            try:
                out.extend(source.poll(now, live))
            except (SkyhedgeError, OSError) as exc:  # one broken source must not blind the others
                # (an OSError: the machine's, e.g. out of file descriptors: one line, no traceback)
                self.note(f"event source {source.name}: {exc}", now, level=logging.WARNING)
            except Exception as exc:  # a bug or an unwrapped library error: contained the same way
                log.exception("event source %s failed", source.name)
                text = f"event source {source.name}: {type(exc).__name__}: {exc}"
                self.note(text, now, level=logging.WARNING)
            problems = getattr(source, "problems", None)  # duck-typed sources may lack it
            for problem in problems() if problems is not None else ():
                self.note(f"event source {source.name}: {problem}", now, level=logging.WARNING)
        return out

    def _expire_warnings(self, now: float) -> None:
        table = warned(self.state)
        for rid, at in list(table.items()):
            rec = self.state.replicas.get(rid)
            if rec is None or rec.gone_at is not None:
                table.pop(rid, None)
            elif now - float(at) > WARNING_GRACE_SECONDS:
                table.pop(rid, None)  # no longer protected: _finalise deletes it as any draining one
                self.note(
                    f"{rid} still up {WARNING_GRACE_SECONDS:.0f}s after its warning: terminating it", now
                )

    def _follow_clock(self, wall: float) -> None:
        """Move the controller's timers with a jump of the wall clock (CLOCK_JUMP_SECONDS or more
        against the monotonic clock since the last pass): the times it measures durations from are
        wall-clock times, persisted in the state, and a clock set forward by hours read as hours
        passed: every replica still loading its model was FAILED (past `initial_delay_seconds`),
        every NOT_READY one too, drains and interruption warnings ended at once, and the policy
        saw hours of calm in every zone and released its hedge. Forward, what was stamped up to
        the last pass's reading plus the time elapsed since moves (anything later was stamped
        after the jump); back, what lies ahead of the clock (anything older is past either way,
        and the checks that see a time ahead of the clock start over from now). The first pass
        has no last reading: it moves back what a clock set back while no watcher ran left ahead
        of it (`_catch_up`)."""
        mono = self._mono()
        last, self._clock_seen = self._clock_seen, (wall, mono)
        if last is None:
            self._catch_up(wall)
            return
        elapsed = mono - last[1]
        jump = (wall - last[0]) - elapsed
        if abs(jump) < self._jump_threshold():
            return
        before = last[0] + max(0.0, elapsed)  # the latest the wall clock read before the jump
        moved = self._shift(jump, (lambda t: t <= before) if jump > 0 else (lambda t: wall < t <= before))
        if self._retry_at is not None and self._retry_at <= before + self._backoff():
            self._retry_at += jump
        rate = self.policy_clock.rate if self.policy_clock is not None else 1.0
        size = f"{jump:+.0f}s" if abs(jump) >= 10 else f"{jump:+.1f}s"
        replayed = f" ({jump * rate:+.0f}s of the market replay's time)" if rate != 1.0 else ""
        self.note(
            f"the wall clock jumped {size}{replayed} (set by NTP or by hand?): {moved} replica, "
            "drain, warning and policy times moved with it, so no timer counts the jump as time passed",
            wall,
            level=logging.WARNING,
        )

    def _jump_threshold(self) -> float:
        """The least step of the wall clock `_follow_clock` follows: CLOCK_JUMP_SECONDS, and under
        a market replay that much of the replay's time (REPLAY_CLOCK_JUMP_FLOOR_SECONDS at least)."""
        rate = self.policy_clock.rate if self.policy_clock is not None else 1.0
        if rate <= 1.0:
            return CLOCK_JUMP_SECONDS
        return max(CLOCK_JUMP_SECONDS / rate, REPLAY_CLOCK_JUMP_FLOOR_SECONDS)

    def _catch_up(self, wall: float) -> None:
        """A state stamped ahead of the clock (CLOCK_JUMP_SECONDS or more): the clock was set back
        while no watcher ran. Its times ahead of the clock move back by how far the latest is
        ahead, as a running watcher moves them (`_follow_clock`): the latest reads as now, the
        others keep their order and distances, and the time the watcher was down counts as none
        (it cannot be known). Left ahead, a replica launched "in the future" was judged against
        `initial_delay_seconds` only once the clock caught up, a drain or a warning lasted that
        much longer, and the policy counted every zone in trouble until then."""
        latest = latest_time(self.state)
        seen: list[float] = []

        def note(t: float) -> bool:
            seen.append(t)
            return False

        self._shift_policy(0.0, note)
        latest = max([*seen, *([] if latest is None else [latest])], default=None)
        if latest is None or latest - wall < CLOCK_JUMP_SECONDS:
            return
        ahead = latest - wall
        moved = self._shift(-ahead, lambda t: wall < t <= latest)
        self.note(
            f"the state's times run up to {ahead:.0f}s ahead of the wall clock (set back while no "
            f"watcher ran?): {moved} of them moved back with it, the latest to now",
            wall,
            level=logging.WARNING,
        )

    def _shift(self, jump: float, moved: Callable[[float], bool]) -> int:
        """Move by `jump` the times `moved` says were stamped before a jump: the state's, the
        policy's memory, launches given up, and what event sources time (`shift_times` on a
        source: the clouds' leftover-instance grace). Returns how many moved."""
        count = shift_times(self.state, jump, moved) + self._shift_policy(jump, moved)
        self._given_up = {rid: at + jump if moved(at) else at for rid, at in self._given_up.items()}
        self._spot_refused = {
            loc: (n, at + jump if moved(at) else at) for loc, (n, at) in self._spot_refused.items()
        }
        self._keep_spot_pauses()
        for entry in self._quota.values():
            for name in ("since", "at", "next_at"):
                entry[name] = entry[name] + jump if moved(entry[name]) else entry[name]
        self._keep_quota()
        for source in [*self.sources, *self._retiring]:
            shift = getattr(source, "shift_times", None)
            if shift is None:
                continue
            try:
                count += int(shift(jump, moved) or 0)
            except Exception as exc:  # a source's bug must not cost the pass
                log.debug("moving the times of event source %s: %s", source.name, exc)
        return count

    def _shift_policy(self, jump: float, moved: Callable[[float], bool]) -> int:
        try:
            return shift_policy_memory(
                self.spec,
                self.state,
                jump,
                moved,
                policy_name=self.options.policy,
                clock=self.policy_clock,
            )
        except PolicyError as exc:  # (the jump is still followed: the state's times moved)
            self.note(
                f"the policy's memory was not moved with the clock: {exc}; it may take the jump as "
                "time passed",
                level=logging.WARNING,
            )
            return 0

    def _probe(self, now: float) -> bool:
        """Probe every replica with an endpoint; True when a replica changed state.

        A replica the prober returns nothing for (a probe this process could not make: out of
        descriptors or ports, `HttpProber`) keeps its state, for up to UNPROBED_SECONDS since the
        last probe made of it (or since this watcher first saw it): then a READY one is NOT_READY
        (`mark_unprobed`), not FAILED. Local errors count neither for nor against a replica, but
        the READY they leave in place grows stale: a replica whose process died while the watcher
        could neither probe it nor read its pid file (the same EMFILE) stayed READY, routed and
        counted by the policy, for as long as that lasted. Once probes can be made, its grace
        (NOT_READY_GRACE_SECONDS) counts from the first that fails."""
        if self.options.assume_ready or self.prober is None:
            return False
        targets = [r for r in self.state.live() if r.endpoint]
        if not targets:
            self._probed.clear()
            self._unprobed.clear()
            return False
        if self._restart_probe is not None:
            self._check_restart_probe()
        results: dict[str, tuple[bool, str]] = {}
        for prober, records in self._probers(targets):
            results.update(prober.probe(records))
            problems = getattr(prober, "problems", None)  # probes it could not make (`HttpProber`)
            for problem in problems() if problems is not None else ():
                self.note(problem, level=logging.WARNING)
        mono, at = self._mono(), self.clock()
        probed = {rid: self._probed.get(rid, mono) for rid in (r.id for r in targets)}
        lines: list[str] = []
        for rec in targets:
            if rec.id in results:
                probed[rec.id] = mono
                if rec.id in self._unprobed and not results[rec.id][0] and rec.not_ready_since is not None:
                    rec.not_ready_since = at  # its first real failure: the grace starts now
                self._unprobed.discard(rec.id)
            elif mono - probed[rec.id] >= UNPROBED_SECONDS:
                line = mark_unprobed(self.state, rec, at, mono - probed[rec.id])
                if line is not None:
                    self._unprobed.add(rec.id)
                    lines.append(line)
        self._probed = probed  # (replicas gone or without an endpoint are forgotten)
        self._unprobed &= probed.keys()
        self._timed_out &= probed.keys()
        for rid, (ok, detail) in results.items():
            if not ok and timed_out(str(detail)):
                self._timed_out.add(rid)
            else:
                self._timed_out.discard(rid)
        by_delay: dict[float, list[ProbeResult]] = {}
        for rec in targets:
            if rec.id in results:
                ok, detail = results[rec.id]
                by_delay.setdefault(self._initial_delay(rec), []).append(ProbeResult(rec.id, ok, detail))
        for delay, probes in by_delay.items():
            lines += apply_probes(self.state, probes, at, initial_delay=delay)
        for line in lines:
            self.note(line)
        return bool(lines)

    def _initial_delay(self, rec: ReplicaRecord) -> float:
        """The `initial_delay_seconds` of the probe `rec` is probed with (`_probers`): a probe kept
        is kept whole. Judged by the spec's, a replacement launched while a restart held the
        earlier probe (`held_probe`) was FAILED at the refused edit's shorter delay (a model
        that loads in minutes, at 30 s: a launch loop), and an outdated replica still loading at
        a reload at the new version's."""
        probe: dict[str, Any] | None = None
        rev = earlier_revision(rec, self._earlier_probers, self.spec)
        if rev is not None:
            probe = self._earlier_probes.get(rev)
        elif self._held is not None:
            probe = self._held[1]
        delay = (probe or {}).get("initial_delay_seconds")
        if isinstance(delay, (int, float)) and not isinstance(delay, bool):
            return float(delay)
        return float(self.spec.readiness_probe.initial_delay_seconds)

    def _probers(self, targets: list[ReplicaRecord]) -> list[tuple[Prober, list[ReplicaRecord]]]:
        """Which prober probes which replicas: the current spec's, but for outdated replicas of a
        revision whose probe a reload changed with it (`reconfigure`), probed with theirs. The
        earlier probers of revisions no live replica runs any more (or current again: a spec
        reverted) are dropped."""
        assert self.prober is not None
        prober = self.prober if self._held is None else self._held[0]
        if not self._earlier_probers:
            return [(prober, targets)]
        current: dict[str, str] = {}  # (the spec's revision of the clouds asked about)
        rest, earlier = by_probe(targets, self._earlier_probers, self.spec, current)
        live = {r.revision for r in self.state.live()} - set(current.values())
        self._earlier_probers = {rev: p for rev, p in self._earlier_probers.items() if rev in live}
        self._keep_earlier_probes()
        groups = [(self._earlier_probers[rev], recs) for rev, recs in earlier.items()]
        return [(prober, rest), *groups] if rest else groups

    def _autoscale(self, now: float) -> None:
        if not self.scaler.enabled and (self.state.target is not None or "autoscaler" in self.state.extra):
            # autoscaling turned off (a reloaded spec): forget its size and samples, or turning it
            # back on later would start from the size it chose for the load of back then
            self.state.target = None
            self.state.extra.pop("autoscaler", None)
        if not self.options.autoscale or not self.scaler.enabled:
            return
        count = self.router.request_count() if self.router is not None else None
        prev = autoscaler.AutoscalerState.from_json(self.state.extra.get("autoscaler"))
        if prev.target is None and self.state.target is not None:
            prev = replace(prev, target=self.state.target)
        new = autoscaler.step(self.scaler, prev, now, count)
        self.state.extra["autoscaler"] = new.to_json()
        qps = f"{new.qps:.2f}" if new.qps is not None else "?"
        if new.pending is not None and (
            new.pending != prev.pending or new.pending_since != prev.pending_since
        ):
            # the wish starts its delay (up to downscale_delay_seconds: 20 minutes by default); said
            # only at its adoption, the log was silent for the whole wait
            up = new.pending > new.target
            knob = "upscale_delay_seconds" if up else "downscale_delay_seconds"
            delay = self.scaler.upscale_delay_seconds if up else self.scaler.downscale_delay_seconds
            self.note(
                f"autoscaler: wants {new.pending} replicas, not {new.target} ({qps} req/s); "
                f"adopted after {knob} ({delay:g} s) if the rate holds",
                now,
            )
        if new.target != self.state.target:
            if self.state.target is not None:
                # a reloaded min_replicas/max_replicas moves the target at once, whatever the rate
                clipped = (
                    prev.target is not None and new.target == self.scaler.clip(prev.target) != prev.target
                )
                why = "min_replicas/max_replicas changed" if clipped else f"{qps} req/s"
                self.note(f"autoscaler: target {self.state.target} -> {new.target} ({why})", now)
            self.state.target = new.target

    def _survival(self, now: float) -> None:
        """Report zones whose spot replicas stayed READY through a period (SpotHedge's SURVIVED)."""
        last = self.state.extra.get(SURVIVAL_KEY)
        if last is not None and 0 <= now - float(last) < self.options.survival_period:
            return  # (`now < last`: the wall clock stepped back; report now rather than in hours)
        if last is not None:
            seen = set()
            for rec in self.state.live():
                fact = rec.fact()
                survived = fact.is_spot and fact.ready and (rec.ready_at or now) <= float(last)
                if survived and rec.location not in seen:
                    seen.add(rec.location)
                    self.state.record_event(ZoneEvent(EventKind.SURVIVED, rec.location, now, rec.id))
        self.state.extra[SURVIVAL_KEY] = now

    def _finalise(self, plan: Plan) -> Plan:
        """Delete draining replicas the policy no longer counts (scale-down victims whose destroy
        was interrupted, warned replicas past their grace); keep warned ones serving."""
        table = warned(self.state)
        now = self.clock()
        self._forget_stale_drains()
        out = []
        for r in plan.replicas:
            rec = self.state.replicas.get(r.id)
            if (
                r.action == KEEP
                and rec is not None
                and rec.draining
                and r.id not in table
                and self._drained(r.id, now)
            ):
                r = replace(r, action=DELETE)
            out.append(r)
        return replace(plan, replicas=tuple(out))

    def _forget_stale_drains(self) -> None:
        """Drop drain holds of replicas no longer draining (gone, or a restart reopened them)."""
        table = self.state.extra.get(DRAIN_KEY)
        if not table:
            return
        for rid in list(table):
            rec = self.state.replicas.get(rid)
            if rec is None or rec.gone_at is not None or not rec.draining:
                table.pop(rid)
        if not table:
            self.state.extra.pop(DRAIN_KEY)

    def _settle(self, plan: Plan, memory: dict[str, Any], now: float) -> tuple[Plan, dict[str, Any]]:
        """GitOps: replicas count as READY once committed, so let the policy see that before committing.

        Without this, SpotHedge's on-demand fallback (covering spot replicas that are not READY yet)
        would be committed and removed again one commit later. The plans are folded into one net
        plan: created-and-removed-in-between replicas vanish, the rest keep CREATE/DELETE/KEEP.
        """
        st = self.state
        before = {r.id for r in st.live()}
        prices = self.placement.prices()
        for _ in range(4):
            if not plan.has_changes:
                break
            record_plan(st, plan, memory, self.placement, now)
            for r in plan.replicas:
                rec = st.replicas[r.id]
                if r.action == CREATE:
                    rec.provisioned_at = rec.ready_at = now
                    if r.market is Market.SPOT:
                        st.record_event(ZoneEvent(EventKind.LAUNCHED, r.location, now, r.id))
                elif r.action == DELETE and rec.gone_at is None:
                    rec.gone_at, rec.reason, rec.draining = now, "terminated", False
            plan, memory = compute_plan(
                self.spec,
                st,
                now=now,
                policy_name=self.options.policy,
                placement=self.placement,
                clock=self.policy_clock,
            )
            plan = self._finalise(plan)
        net = [replace(r, action=KEEP if r.id in before else CREATE) for r in plan.desired]
        for rid in sorted(before - {r.id for r in plan.desired}, key=replica_order):
            rec = st.replicas[rid]
            market = Market(rec.market)
            net.append(
                PlannedReplica(rid, rec.location, market, DELETE, prices.get((rec.location, market), 0.0))
            )
        net.sort(key=by_replica_id)  # as `make_plan` orders them
        return replace(plan, replicas=tuple(net), next_id=max(plan.next_id, st.next_id)), memory

    # -- acting ----------------------------------------------------------------------------------

    def _plan_line(self, plan: Plan, creates: list[PlannedReplica], deletes: list[PlannedReplica]) -> str:
        """`plan: +r7 zone spot, -r2 -> 3 spot / 0 on-demand in 3 zones, $x/h`: the layout the
        service is headed for. Replicas kept only until they leave (released and draining, or
        warned of their interruption) are not part of it: they are counted apart."""
        leaving = {r.id for r in plan.desired if (rec := self.state.replicas.get(r.id)) and rec.draining}
        s = replace(plan, replicas=tuple(r for r in plan.replicas if r.id not in leaving)).summary()
        where = ", ".join(f"+{r.id} {r.location.zone} {r.market.value}" for r in creates)
        gone = ", ".join(f"-{r.id}" for r in deletes)
        zones = f"{s['zones_used']} zone{'' if s['zones_used'] == 1 else 's'}"
        out = ", ".join(sorted(leaving, key=replica_order))
        tail = f"; {len(leaving)} more on their way out ({out})" if leaving else ""
        return (
            f"plan: {' '.join(x for x in (where, gone) if x)} -> {s['spot']} spot / {s['on_demand']} "
            f"on-demand in {zones}, ${s['hourly_cost']:.4f}/h{tail}"
        )

    def _act(self, plan: Plan, memory: dict[str, Any], now: float) -> ExecResult:
        st = self.state
        self._unsettled = True  # until this pass's executor run is done and saved
        creates = [r for r in plan.replicas if r.action == CREATE]
        deletes = [r for r in plan.replicas if r.action == DELETE]
        record_plan(st, plan, memory, self.placement, now)
        deployment_id(st)  # what this pass launches carries it (saved below, before Terraform runs)
        if creates or deletes:
            self.note(self._plan_line(plan, creates, deletes), now)
        self.save(now=True)  # the intent is durable before anything changes outside
        routed_ids = {pair[0] for pair in st.extra.get("routed") or []}
        draining = any(r.id in routed_ids for r in deletes)
        # Route before the apply (which may take minutes on a cloud): replicas READY since the last
        # routing join, and those the plan releases leave, in one reload (`_route`'s
        # `defer_additions`). A replica released before it was ever routed (SpotHedge's on-demand
        # cover, once the spot replica it covered is READY) is destroyed without being routed.
        pids = self._route(drain=draining)
        if draining:
            # drain before destroy: removed replicas leave the router first. Without waiting:
            # their destroy is held until their requests end (`_finalise`), and this pass goes
            # on, launching the plan's replacements now and noticing preemptions meanwhile.
            needed = {r.id for r in routable(st)}  # panic: still the only ones that can answer
            held = [r.id for r in deletes if r.id in routed_ids and (pids or r.id in needed)]
            if held:
                self._hold_for_drain(held, pids or [], now)
                plan = replace(
                    plan,
                    replicas=tuple(replace(r, action=KEEP) if r.id in held else r for r in plan.replicas),
                )
        before = {r.id: r.provisioned_at for r in st.live()}
        cloud_ids = {r.id: r.cloud_id for r in st.live()}
        started = self.clock()
        hold = self._held_roots(started)
        try:
            if hold:  # (only executors reporting failed roots have any: `Executor.apply`)
                result = self.executor.apply(st, plan, started, hold=hold)  # type: ignore[call-arg]
            else:
                result = self.executor.apply(st, plan, started)
        except SkyhedgeError as exc:  # (the spec does not render, ...: no replica's own launch failed)
            detail = getattr(exc, "stderr", "") or ""
            result = ExecResult(errors=(str(exc),), detail=detail, failed_replicas=())
            tried: frozenset[str] = frozenset()
        else:  # the failing roots not held were run, or had nothing left to apply
            tried = frozenset(self._outages) - hold
        done = self.clock()
        for line in result.warnings:
            self.note(line, done, level=logging.WARNING)
        for rec in st.live():
            if rec.id in before and before[rec.id] is None and rec.provisioned_at is not None:
                if Market(rec.market) is Market.SPOT:
                    st.record_event(ZoneEvent(EventKind.LAUNCHED, rec.location, done, rec.id))
                    self._spot_refused.pop(rec.location, None)  # capacity there: asked at once again
                else:
                    self._ondemand_refused.discard(rec.location)
                self._lift_quota(rec, done)
                if self.options.assume_ready and rec.ready_at is None:
                    rec.ready_at = done
        by_quota = dict(result.quota_refusals)
        for rid in result.launch_failures:
            rec = st.replicas.get(rid)
            if rid in by_quota:
                continue  # said once per quota (`_note_quota`), not per replica and zone
            zone, market = (rec.zone, rec.market) if rec is not None else ("?", "spot")
            self.note(f"launch of {rid} refused in {zone}: no {market} capacity, re-planning", done)
        self._note_quota(result, done)
        self._note_spot_refusals(result, done)
        self._keep_spot_pauses()
        if not is_gitops(st):
            self._recreated.note(st, cloud_ids)
        if result.applied and not result.failed:
            why = "" if plan.has_changes else " (reconciling with Terraform's state)"
            self.note(f"applied {', '.join(result.applied)} in {done - started:.1f}s{why}", done)
            # (a gone replica a root still holds is looked for once an apply dropped it)
            holding = held_replicas(st)
            lost = [r for r in self._lost if r.id not in holding.get(f"{r.cloud}/{r.region}", ())]
            if self._unsaved or self._recreated.replicas or lost:
                swept = [*self._unsaved, *self._recreated.replicas, *lost]
                for line in instances_left_unsaved(self.spec, st, swept, spare=self._recreated.before):
                    self.note(line, done, level=logging.WARNING)
                self._unsaved, self._recreated = [], Recreated()
                looked = {r.id for r in lost}
                self._lost = [r for r in self._lost if r.id not in looked]
        cause = apply_cause(result.detail)
        held = self._track_outages(result, with_cause, cause, done, took=done - started, tried=tried)
        self._refuse_launches_into_failing_roots(held, done)
        for line in result.errors:
            if _root_of(line, result.failed_roots) is not None:
                continue  # said by `_track_outages`, with its backoff
            self.note(f"apply failed: {masked(with_cause(line, cause))}", done, level=logging.WARNING)
        if result.detail:
            log.debug("%s", result.detail)
        self.last_apply = result
        if result.note:
            self.note(result.note, done)
        # the apply backoff counts the failures no root outage accounts for (a refused launch, an
        # executor that names no root): a failing root has its own, and must not slow the others
        whole = result.launch_failures or any(_root_of(e, held) is None for e in result.errors)
        self._refused_only = bool(result.launch_failures) and not result.errors
        self._failures = self._failures + 1 if whole else 0
        self._retry_at = done + self._backoff() if whole else None
        self._give_up_launches(result, done)
        self.save(now=True)
        self._unsettled = False
        return result

    def _track_rollout(self, plan: Plan, result: ExecResult | None, now: float) -> None:
        """Keep `state.extra[ROLLOUT_KEY]` for `status`: the outdated replicas (an earlier spec's,
        or outside the placement) that serve until replaced, and whether their replacements can
        be launched at all. A replacement is one spot replica while the one it replaces serves
        (no on-demand stand-in), so when every spot launch is refused (a spot drought in every
        allowed zone) the update waits, the service READY on the outdated replicas: correct,
        but `status` showed N READY replicas and nothing else, for as long as it lasted. Once no
        launch has succeeded for ROLLOUT_STALL_SECONDS since the first refusal, it is stalled:
        said once as a warning, and by `status` until a launch succeeds or the update ends."""
        extra = self.state.extra
        kept = sorted((r.id for r in plan.replicas if r.outdated and r.action != DELETE), key=replica_order)
        if not kept:
            extra.pop(ROLLOUT_KEY, None)
            return
        record = extra.get(ROLLOUT_KEY)
        if not isinstance(record, dict):
            record = {"since": now, "refused": {}, "refused_since": None, "stalled_since": None}
        record["replicas"] = kept
        if result is not None:
            created = [r.id for r in plan.replicas if r.action == CREATE]
            if any(
                self.state.replicas[rid].provisioned_at is not None
                for rid in created
                if rid in self.state.replicas
            ):
                record.update(refused={}, refused_since=None, stalled_since=None)  # under way again
            refused: dict[str, int] = record.setdefault("refused", {})
            for rid in result.launch_failures:
                rec = self.state.replicas.get(rid)
                zone = rec.zone if rec is not None else "?"
                refused[zone] = refused.get(zone, 0) + 1
                if record.get("refused_since") is None:
                    record["refused_since"] = now
        if record.get("refused_since") is None and self._spot_held:
            # its replacements held back by their zones' spot pauses (`_pace_spot`) count as
            # refused there, once: the zone refused the launch before it. Counted only from
            # their first ask, an update begun in a drought was said stalled up to a pause late
            # (448 s into it, measured, where it was 300 s before the pauses).
            held = sorted(
                (loc for loc in self._spot_held if loc in self._spot_refused), key=lambda loc: loc.key
            )
            refused = record.setdefault("refused", {})
            for loc in held:
                refused[loc.zone] = refused.get(loc.zone, 0) + 1
            if held:
                last = min(self._spot_refused[loc][1] for loc in held)
                record["refused_since"] = max(float(record.get("since", now)), last)
        first = record.get("refused_since")
        if record.get("stalled_since") is None and first is not None and now - first >= ROLLOUT_STALL_SECONDS:
            record["stalled_since"] = now
            line = f"rolling update stalled ({len(kept)} replica(s) left: {', '.join(kept)}): "
            self.note(line + rollout_stall_reason(record), now, level=logging.WARNING)
        extra[ROLLOUT_KEY] = record

    def _sweep(self) -> None:
        """Every root is converged: stop whatever runs that no live replica owns (crash leftovers)."""
        live = {r.id for r in self.state.live()}
        for source in self.sources:
            sweep = getattr(source, "sweep", None)
            if sweep is None:
                continue
            try:
                stray = sweep(live)
            except (OSError, SkyhedgeError) as exc:
                self.note(f"orphan sweep ({source.name}) failed: {exc}", level=logging.WARNING)
                continue
            if stray:
                self.note(f"stopped orphan replica(s) left by an earlier crash: {', '.join(stray)}")

    def _housekeep(self) -> None:
        """At most once a minute: bound what grows with time and traffic while the watcher runs
        for weeks: the router's logs (rotated past `routing.router.LOG_ROTATE_BYTES`), and what
        event sources keep per replica (a local replica's log) for replicas the state forgot
        (`ServiceState.prune_gone`)."""
        at = time.monotonic()
        if self._housekept is not None and 0 <= at - self._housekept < HOUSEKEEP_SECONDS:
            return
        self._housekept = at
        rotate = getattr(self.router, "rotate_logs", None)
        if rotate is not None and not self.options.assume_ready:
            try:
                rotate()
            except (OSError, SkyhedgeError) as exc:
                self.note(f"rotating the router's logs failed: {exc}", level=logging.WARNING)
        known = set(self.state.replicas)
        for source in self.sources:
            forget = getattr(source, "forget", None)
            if forget is None:
                continue
            try:
                forget(known)
            except (OSError, SkyhedgeError) as exc:
                self.note(f"pruning what {source.name} keeps failed: {exc}", level=logging.WARNING)

    def _route(
        self, force: bool = False, drain: bool = False, *, defer_additions: bool = False
    ) -> list[int] | None:
        """Route to the routable replicas. With `drain` and a router that can drain without
        waiting, returns the old nginx workers' pids (empty: nothing was in flight).

        `defer_additions`: when the only change is replicas to add, and the router runs (serving
        some already, or none yet at start-up), reload nothing now: the pass routes again once
        it has its plan (milliseconds later, before any apply), and one reload then takes the
        additions and the plan's releases. Every reload closes the
        kept-alive connections of nginx's old workers, and a client that reuses one blindly
        (Python's http.client) loses a request on it: after a local preemption the newly READY
        spot replica and its on-demand cover were routed, then the cover released, two reloads a
        pass apart: 3 reloads per preemption, 2 now (`benchmarks/traffic_bench.py`'s kill phase:
        24-25 of 480 requests failed, 15-20 now). A replica gone, or one whose endpoint moved,
        is never deferred: nginx would keep sending it requests."""
        if self.router is None or self.options.assume_ready:
            return None
        wanted = [[r.id, r.endpoint] for r in routable(self.state)]
        routed = self.state.extra.get("routed")
        # a router that can say its config is out of date (a renewed TLS certificate, its config
        # deleted) is reloaded with the same upstreams: nginx reads its files at a reload only
        outdated = getattr(self.router, "outdated", None)
        running = self.router.running()
        stale = outdated() if outdated is not None and running else None
        same = wanted == routed and running
        if not force and not self._routing_failed and same and not stale:
            return None
        # (also when nothing is routed yet: the plan comes within milliseconds, before any
        # apply, and at start-up SpotHedge's on-demand covers, READY with the spot replicas they
        # cover, were routed and then released: two reloads and a drain instead of one reload)
        if (
            defer_additions
            and not force
            and not self._routing_failed
            and running
            and not stale
            and routed is not None
        ):
            now_routed = {(str(rid), str(ep)) for rid, ep in routed}
            if now_routed <= {(str(rid), str(ep)) for rid, ep in wanted}:
                return None  # only additions: the pass's next routing takes them
        if stale:
            self.note(f"routing: {stale}; reloading nginx")
        pairs = [(str(rid), str(ep)) for rid, ep in wanted]
        was_down = routed is not None and not self.router.running()  # killed from outside
        old: list[int] | None = None
        # Released replicas leaving the router (again: routed back while nothing else could answer,
        # then unrouted once replacements are READY) drain like any removal: their destroy waits
        # for the requests they took meanwhile, not only for those of their first drain.
        kept = {pair[0] for pair in wanted}
        leaving = sorted(
            rid
            for rid in {pair[0] for pair in routed or []} - kept
            if (rec := self.state.replicas.get(rid)) is not None and rec.gone_at is None and rec.draining
        )
        try:
            begin = getattr(self.router, "begin_drain", None) if drain or leaving else None
            if begin is not None:
                status, old = begin(pairs)
                if old and leaving:
                    self._hold_for_drain(leaving, old, self.clock())
            else:
                status = self.router.drain(pairs) if drain else self.router.reload(pairs)
        except (RoutingError, OSError) as exc:
            # Never let routing block replacing replicas: keep going, retry on the next tick (an
            # OSError: the router's files could not be written, e.g. a full disk).
            self._routing_failed = True
            stderr = getattr(exc, "stderr", "") or ""
            first = stderr.strip().splitlines()[0] if stderr.strip() else ""
            # nginx's reason once: a refused config's error quotes it already (`Router._install`)
            detail = f" ({first})" if first and first.removeprefix("nginx: ") not in str(exc) else ""
            self.note(f"routing: {exc}{detail}", level=logging.WARNING)
            return None
        self._routing_failed = False
        if isinstance(status, dict):
            self.state.router = status
        if was_down:
            pid = status.get("pid") if isinstance(status, dict) else None
            self.note(f"routing: the router was not running (nginx gone); started it again (pid {pid})")
        before = {pair[0] for pair in routed or []}
        self.state.extra["routed"] = wanted
        now = self.clock()
        added = sorted({pair[0] for pair in wanted} - before, key=replica_order)
        removed = sorted(before - {pair[0] for pair in wanted}, key=replica_order)
        if added or removed or force:
            self.state.log(
                {
                    "at": now,
                    "event": "routed",
                    "upstreams": [p[0] for p in wanted],
                    "added": added,
                    "removed": removed,
                }
            )
            change = (f" +{','.join(added)}" if added else "") + (f" -{','.join(removed)}" if removed else "")
            self.note(f"routing: {len(wanted)} upstreams{change}", now)
        # Replicas gone (preempted, terminated, failed) are out of the new config, but the old
        # workers' requests on them wait on: a vanished VM sends no reset. Cut them now; never an
        # endpoint a live replica has (routed, or not: one launched, while routing failed, at the
        # address and port a gone one left answers what nginx still sent there).
        kept_eps = {str(ep) for _, ep in wanted} | {str(r.endpoint) for r in self.state.live() if r.endpoint}
        dead = {
            str(ep): str(rid)
            for rid, ep in routed or []
            if str(rid) in removed
            and str(ep) not in kept_eps
            and ((rec := self.state.replicas.get(str(rid))) is None or rec.gone_at is not None)
        }
        # Taken out alive (NOT_READY: its probe failed first, as a VM vanishing fails it before the
        # preemption is known): not cut now, a replica that is only slow keeps its requests; cut
        # once it is known gone, a pass or more later (`_sever_gone_unrouted`). But for one whose
        # probe timed out (hung), the requests it has not begun to answer that nginx can still
        # retry are cut now (`_cut_hung`). A released one (draining) is not: its drain waits
        # for its requests (`_drained` cuts what outlives it).
        hung: dict[str, str] = {}
        for rid, ep in routed or []:
            rec = self.state.replicas.get(str(rid))
            if (
                str(rid) in removed
                and rec is not None
                and rec.gone_at is None
                and not rec.draining
                and str(ep) not in {str(e) for _, e in wanted}
            ):
                self._unrouted[str(rid)] = str(ep)
                # (never an endpoint another live replica has: its requests are not this one's)
                if str(rid) in self._timed_out and not any(
                    r.endpoint == str(ep) and r.id != str(rid) for r in self.state.live()
                ):
                    hung[str(ep)] = str(rid)
        # routed again at the endpoint it was taken out at: only slow, never to be cut. At another
        # one (a machine re-created under its ID), the one taken out is gone: `_sever_gone_unrouted`
        for rid, ep in wanted:
            if self._unrouted.get(str(rid)) == str(ep):
                del self._unrouted[str(rid)]
        self._keep_unrouted()
        self._sever(dead, now)
        # (nginx's old workers, which hold those requests, retry them only among what they routed)
        retry_on = retry_targets([str(ep) for _, ep in routed or []], [str(ep) for _, ep in wanted], hung)
        self._cut_hung(hung, retry_on, now)
        return old

    def _sever_gone_unrouted(self) -> None:
        """Cut the router's connections to replicas taken out of it while alive (NOT_READY) that
        are now known gone. Why: a vanished VM's probe fails first, its reload then takes it out
        alive, and the GONE event that follows changes no routing: `_route` never cut its
        requests in flight, which waited for `read_timeout` (600 s by default). Measured in a
        35 min soak: 6 of 14 vanished local replicas each left a request waiting until its
        client's 30 s timeout. Only replicas known gone are cut (a slow one keeps its requests),
        and those re-created under their ID at another endpoint (an apply replaced the vanished
        machine; the record is never gone): the machine taken out is gone."""
        if not self._unrouted:
            return
        # never an endpoint a live replica has (handed to a new replica since: `_route`)
        kept_eps = {str(ep) for _, ep in self.state.extra.get("routed") or []}
        kept_eps |= {str(r.endpoint) for r in self.state.live() if r.endpoint}
        dead: dict[str, str] = {}
        for rid, ep in list(self._unrouted.items()):
            rec = self.state.replicas.get(rid)
            # alive at that endpoint still; at another one, the machine taken out is gone (an apply
            # re-created the replica under its ID: its record is never marked gone)
            if rec is not None and rec.gone_at is None and str(rec.endpoint) == ep:
                continue
            del self._unrouted[rid]
            if ep not in kept_eps:
                dead[ep] = rid
        self._keep_unrouted()
        self._sever(dead, self.clock())

    # -- tables kept in the state for a restarted watcher ----------------------------------------

    def _load_kept_tables(self) -> None:
        """Read back `routed`, `UNROUTED_KEY`, `EARLIER_PROBES_KEY` and `PROBE_KEY`. A state written by
        a release that did not keep them has none (nothing to read); a malformed value (a hand
        edit) is dropped with a warning, never a crash: what is lost is a reload, a cut or an
        earlier probe, not the service."""
        extra = self.state.extra
        for key, (expected, ok, lost) in _KEPT_SHAPES.items():
            value = extra.get(key)
            if value is not None and not ok(value):
                shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
                self.note(
                    f"{STATE_FILE}: extra.{key}: expected {expected}, got {shown}; ignored: {lost}",
                    level=logging.WARNING,
                )
                del extra[key]
        raw = extra.get(UNROUTED_KEY)
        if raw is not None:
            table = raw if isinstance(raw, dict) else {}
            self._unrouted = {str(rid): ep for rid, ep in table.items() if isinstance(ep, str) and ep}
            if not isinstance(raw, dict) or len(self._unrouted) != len(table):
                self.note(
                    f"{STATE_FILE}: extra.{UNROUTED_KEY}: expected an object of replica id -> endpoint; "
                    "ignored what is not: those replicas' requests are not cut once they are gone",
                    level=logging.WARNING,
                )
        self._load_probes()
        self._load_spot_pauses()
        self._forget_spot_pauses_out_of_reach(None)
        quota = self.state.extra.get(QUOTA_KEY)  # (its shape checked when the state was read)
        self._quota = {k: dict(v) for k, v in quota.items()} if isinstance(quota, dict) else {}
        self._forget_quotas_out_of_reach(None)
        self._forget_failing_roots_out_of_reach()
        self._keep_unrouted()
        self._keep_earlier_probes()

    def _load_spot_pauses(self) -> None:
        """Read back the zones' spot pauses (`SPOT_PAUSES_KEY`) a stopped watcher left: a watcher
        restarted in a drought (an upgrade, a crash, a SIGTERM and start) forgot them and asked
        every refusing zone again at once, then from 30 s (measured over the controller fakes,
        N = 3, three zones refusing for 10 to 63 min: 16 refused spot launches in the 5 minutes
        after a restart, 4 with them kept). An entry that is not a zone with a refusal count and a
        time (a hand edit) is dropped with one warning line, never a crash: its zone is asked
        at once, as before. A time ahead of the clock is bounded by `_spot_wait` (the pause
        counts from now, at most `max_spot_retry`)."""
        raw = self.state.extra.get(SPOT_PAUSES_KEY)
        if raw is None:
            return
        where, bad = f"extra.{SPOT_PAUSES_KEY}", None
        if not isinstance(raw, dict):
            bad, expected = raw, "an object of zone 'cloud/region/zone' -> {refusals, at}"
        else:
            expected = "{refusals: a positive integer, at: a time} under a zone 'cloud/region/zone'"
            for key, entry in raw.items():
                loc = _spot_pause_entry(key, entry)
                if loc is not None:
                    self._spot_refused[loc] = (int(entry["refusals"]), float(entry["at"]))
                elif bad is None:
                    where, bad = (
                        f"{where}.{key if isinstance(key, str) and key.isprintable() else repr(key)}",
                        entry,
                    )
        if bad is not None:
            shown = repr(bad) if len(repr(bad)) <= 60 else repr(bad)[:57] + "..."
            self.note(
                f"{STATE_FILE}: {where}: expected {expected}, got {shown}; ignored: "
                "spot launches there are asked for at once",
                level=logging.WARNING,
            )
        self._forget_spot_pauses_launched_since()
        self._keep_spot_pauses()

    def _forget_spot_pauses_out_of_reach(self, before: Placement | None) -> None:
        """Drop the spot pauses of zones where the placement no longer places spot replicas, and
        those of a cloud whose instance type changed since `before` (a stock-out is one type's),
        as `_forget_quotas_out_of_reach` drops quotas: no spot launch is asked there any more, so
        none would succeed there to end them. Kept, they outlived a reload and every restart
        (measured: a reload dropping us-east-1 mid-outage left its two zones' entries in
        `state.json` for good), and a zone put back in the spec days later started from the
        refusal count of the old drought (a 5 min pause at its first refusal, not 30 s)."""
        if not self._spot_refused:
            return
        now_types = self.placement.instance_types
        gone: dict[str, list[Location]] = {}
        for loc in self._spot_refused:
            if not self.placement.allows(loc, Market.SPOT):
                why = "the spec no longer places spot replicas there"
            elif before is not None and before.instance_types.get(loc.cloud) != now_types.get(loc.cloud):
                why = f"the spec's {loc.cloud} instance type is now {now_types.get(loc.cloud)}"
            else:
                continue
            gone.setdefault(why, []).append(loc)
        for why, locs in sorted(gone.items()):
            for loc in locs:
                del self._spot_refused[loc]
            zones = ", ".join(sorted(loc.key for loc in locs))
            self.note(f"spot pause(s) of {zones} no longer followed: {why}")
        if gone:
            self._keep_spot_pauses()

    def _forget_spot_pauses_launched_since(self) -> None:
        """Drop the kept pauses of zones where a spot replica was launched (provisioned) after
        the pause's last refusal: that launch ended the run of refusals, as a watcher's own spot
        launch there does (`_act`), but it was not the watcher's: an `apply` run while no
        watcher ran, or a release before pauses were kept (downgraded to, then upgraded from
        again), which never dropped them. Kept, such a pause held that zone's spot launches
        after the restart while it sold them, and the next refusal there, days later, paused
        it from the old drought's count (measured: a0a4e01's watcher launched spot in local-b
        after this release's pauses of 2 refusals; upgraded again, the next refusal there
        paused it 120 s after "3 refusal(s) in a row", not 30 s after 1)."""
        if not self._spot_refused:
            return
        launched: dict[Location, float] = {}
        for rec in self.state.replicas.values():
            if rec.market == Market.SPOT.value and rec.provisioned_at is not None:
                loc = rec.location
                launched[loc] = max(launched.get(loc, rec.provisioned_at), rec.provisioned_at)
        over = sorted(
            (loc for loc, (_n, at) in self._spot_refused.items() if launched.get(loc, -math.inf) > at),
            key=lambda loc: loc.key,
        )
        for loc in over:
            del self._spot_refused[loc]
        if over:
            zones = ", ".join(loc.key for loc in over)
            self.note(f"spot pause(s) of {zones} over: a spot launch there succeeded since its last refusal")

    def _keep_spot_pauses(self) -> None:
        """Mirror `_spot_refused` into the state (written with the pass that changed it)."""
        if self._spot_refused:
            self.state.extra[SPOT_PAUSES_KEY] = {
                loc.key: {"refusals": n, "at": at}
                for loc, (n, at) in sorted(self._spot_refused.items(), key=lambda item: item[0].key)
            }
        else:
            self.state.extra.pop(SPOT_PAUSES_KEY, None)

    def _load_probes(self) -> None:
        """The earlier probes (`EARLIER_PROBES_KEY`) and the probe in force before the restart
        (`PROBE_KEY`), from the digests state.json holds and the probes file (`probe_store`); an
        earlier release's state.json holds the earlier probes themselves (read, and rewritten as
        digests at the next write). A probes file missing, unreadable or not matching the digests
        falls back to what the watcher did before it kept them, with one warning line: the
        outdated replicas are probed with the spec's probe, which is taken unchecked."""
        found = read_kept(self._probe_store, self.state.extra)
        for rev, readiness in found.earlier.items():
            self._earlier_probes[rev] = readiness_probe_json(readiness)
            if self.prober is not None:  # (GitOps: no prober, nothing is probed)
                self._earlier_probers[rev] = _http_prober(readiness)
        before, bad = found.before, found.problems
        # revisions no live replica runs any more, or current (the spec reverted while stopped)
        live = self.state.live()
        current = {cloud: replica_revision(self.spec, cloud) for cloud in {r.cloud for r in live}}
        if before is not None and self.prober is not None:
            was = readiness_probe_json(before)
            if was != readiness_probe_json(self.spec.readiness_probe):
                # as a reload would: outdated replicas keep the probe they were probed with, and the
                # current revision's replicas are checked against the spec's (at the first probe)
                for rev in outgoing_revisions(live, self._earlier_probers, current):
                    self._earlier_probers[rev] = _http_prober(before)
                    self._earlier_probes[rev] = was
                self._restart_probe = (before, was)
        running = {r.revision for r in live} - set(current.values())
        self._earlier_probers = {r: p for r, p in self._earlier_probers.items() if r in running}
        if bad:
            lost = FALLBACK
            if found.unchecked:
                lost += ", which is taken unchecked"
            self.note(f"{'; '.join(bad)}: ignored: {lost}", level=logging.WARNING)

    def _check_restart_probe(self) -> None:
        """The spec's probe differs from the one the current revision's replicas were probed with
        before the restart (a spec edited while the watcher was stopped, or one a running watcher
        refused: `runner._check_new_probe`). Checked as a reload's is: taken when a READY replica
        passes it (or none can be asked); else the replicas keep the probe they had, which a
        reload then checks again. Taken, a probe that every replica fails marks them all
        NOT_READY at once and FAILED 180 s later: the restart would do what the reload refused."""
        assert self._restart_probe is not None and self.prober is not None
        before, was = self._restart_probe
        self._restart_probe = None
        live = self.state.live()
        current = {cloud: replica_revision(self.spec, cloud) for cloud in {r.cloud for r in live}}
        refused = probe_refused(self.prober, live, current)
        said = "readiness_probe: the spec's is not the one the replicas were probed with before the restart"
        if refused is None:
            self.note(f"{said}: checked (a READY replica passes it, or none could be asked): taken")
        else:
            self._held = (_http_prober(before), was)
            self.note(
                f"{said}, and none of the {refused[0]} READY replica(s) passes it "
                f"({refused[1]}: {refused[2]}): "
                "not taken, they are still probed with the earlier one; fix the probe, or "
                "`skyhedge reload SPEC` to check it again",
                level=logging.WARNING,
            )
        self._keep_earlier_probes()

    def _keep_unrouted(self) -> None:
        """Mirror `_unrouted` into the state (written with the pass that changed it)."""
        if self._unrouted:
            self.state.extra[UNROUTED_KEY] = dict(sorted(self._unrouted.items()))
        else:
            self.state.extra.pop(UNROUTED_KEY, None)

    def _in_force(self) -> dict[str, Any] | None:
        """The probe the current revision's replicas are probed with (None: none is, GitOps): the
        spec's, or the one kept before a restart (held, or not checked yet: a watcher stopped
        before its first probe leaves it to the next to check)."""
        if self.prober is None:
            return None
        if self._held is not None:
            return self._held[1]
        if self._restart_probe is not None:
            return self._restart_probe[1]
        if self._spec_probe is None or self._spec_probe[0] is not self.spec:  # (one JSON per spec)
            self._spec_probe = (self.spec, readiness_probe_json(self.spec.readiness_probe))
        return self._spec_probe[1]

    def _keep_earlier_probes(self) -> None:
        """Mirror the probes kept into the state, as digests (the probes themselves are written to
        the probes file with the state, `_write`): those of `_earlier_probers` only, whose
        revisions some live replica runs (`_probers` and `reconfigure` drop the rest), and the
        probe in force."""
        self._earlier_probes = {
            rev: p for rev, p in self._earlier_probes.items() if rev in self._earlier_probers
        }
        self._probe_store.name(self.state.extra, self._in_force(), self._earlier_probes)

    def _sever(self, endpoints: dict[str, str], now: float) -> None:
        """Close the router's connections to these endpoints (endpoint -> replica ID), replicas
        known gone or being destroyed: requests in flight on a vanished VM are retried on
        another replica at once (or answered 503) instead of waiting for `read_timeout` (600 s
        by default) with no reset ever coming. Healthy replicas' requests are not touched: a
        drain still waits for them."""
        sever = getattr(self.router, "sever", None)
        if sever is None or not endpoints:
            return
        ids = ",".join(sorted(endpoints.values(), key=replica_order))
        try:
            closed = sever(sorted(endpoints))
        except (RoutingError, OSError) as exc:
            self.note(f"routing: {exc}", now, level=logging.WARNING)
            return
        if closed:
            self.note(gone_cut_note(closed, ids, self.spec.service.router), now)

    def _cut_hung(self, endpoints: dict[str, str], retry_on: set[str], now: float) -> None:
        """Close the router's connections to replicas just taken out because their probe timed
        out (endpoint -> replica ID) that carry a request nginx can still retry on another
        replica (`retry_on`: one routed before the reload and after it):
        `routing.cuts.cut_hung_connections` says which and why (`routing reload --probe` cuts the
        same way)."""
        cut_hung_connections(
            self.router,
            self.spec.service.router,
            endpoints,
            lambda text: self.note(text, now),
            lambda text: self.note(text, now, level=logging.WARNING),
            retry_on=retry_on,
        )

    def _hold_for_drain(self, ids: Sequence[str], pids: Sequence[int], now: float) -> None:
        """Keep `ids` running (out of the router) until the nginx workers that may still serve
        them (`pids`) are gone, or `drain_deadline` passes: `_finalise` destroys them then."""
        table = self.state.extra.setdefault(DRAIN_KEY, {})
        for rid in ids:
            entry = table.get(rid)
            if not isinstance(entry, dict) or not isinstance(entry.get("pids"), list):
                entry = {"since": now, "pids": []}  # (a hand-edited hold: `_drained`)
            entry["pids"] = sorted({*entry["pids"], *pids})
            table[rid] = entry

    def drain_deadline(self) -> float:
        """How long a removed replica's requests may run on: the router's read timeout, and at
        least DRAIN_FLOOR_SECONDS. `read_timeout` bounds a generation's silences, not its length
        (nginx never cuts a stream that keeps sending), so a short one must not cut generations
        still going; a fixed 30 s did. The bound is there so a stuck worker cannot keep a
        replica, paid for, for ever."""
        return max(float(self.spec.service.router.read_timeout), DRAIN_FLOOR_SECONDS)

    def _drained(self, rid: str, now: float) -> bool:
        """`rid` may be destroyed: not held for a drain, or its drain finished or timed out."""
        entry = (self.state.extra.get(DRAIN_KEY) or {}).get(rid)
        if entry is None:
            return True
        if not isinstance(entry, dict) or not isinstance(entry.get("since"), (int, float)):
            entry = {"since": -math.inf, "pids": []}  # a hand-edited hold: not one to wait for
        pending = getattr(self.router, "draining", None)
        rec = self.state.replicas.get(rid)
        silent = None if rec is None or rec.not_ready_since is None else now - rec.not_ready_since
        if now - float(entry["since"]) >= self.drain_deadline():
            self.note(f"{rid}: requests still in flight after {self.drain_deadline():.0f}s; removing it", now)
        elif silent is not None and silent > NOT_READY_GRACE_SECONDS:
            # Hung (accepting connections, answering nothing): the requests the drain waits for
            # wait on it, and end only when it is destroyed (a local process killed resets them:
            # nginx retries them elsewhere, or answers 503) or at read_timeout. Waiting for them
            # held it, billed, for the whole drain deadline (600 s), where a routed replica that
            # fails its probes this long is FAILED and replaced (`apply_probes`).
            self.note(
                f"{rid}: not answering its probes for {silent:.0f}s while draining; removing it "
                "(its requests in flight end)",
                now,
                level=logging.WARNING,
            )
        elif pending is not None and pending(entry["pids"]) or rid in {r.id for r in routable(self.state)}:
            return False
        else:  # (a line of its own: the plan that removes it repeats the one that released it)
            self.note(f"{rid}: drained, its requests ended; removing it", now)
            rec = None  # nothing in flight: nothing to cut
        # (not an endpoint another live replica has: its requests are not this one's)
        serving = {r.endpoint for r in routable(self.state)} | {
            r.endpoint for r in self.state.live() if r.id != rid
        }
        if rec is not None and rec.endpoint and rec.endpoint not in serving:
            # destroyed with requests in flight: a cloud VM deleted sends no reset either
            self._sever({rec.endpoint: rid}, now)
        self.state.extra[DRAIN_KEY].pop(rid, None)
        if not self.state.extra[DRAIN_KEY]:
            self.state.extra.pop(DRAIN_KEY)
        return True

    def _failed_lately(self, now: float) -> list[ReplicaRecord]:
        """Replicas of the current revision (or recorded before revisions existed) that failed
        within CRASH_WINDOW_SECONDS: after a spec change, the old command's failures say nothing
        about the new one. The revision is digested once per cloud, and only for replicas in
        the window: per record, it cost a pass ~17 ms once the state held its GONE_KEPT gone
        records (most of them refused launches, recorded `failed`), twice or more a pass."""
        current: dict[str, str] = {}

        def revision(cloud: str) -> str:
            if cloud not in current:
                current[cloud] = replica_revision(self.spec, cloud)
            return current[cloud]

        return [
            r
            for r in self.state.replicas.values()
            if r.gone_at is not None
            and r.reason == "failed"
            and 0 <= now - r.gone_at < CRASH_WINDOW_SECONDS
            and r.revision in (None, revision(r.cloud))
        ]

    def _crashes(self, now: float) -> list[float]:
        """Bursts of replicas failing soon after launch within CRASH_WINDOW_SECONDS (when each
        began, oldest first). Only replicas that ran count: a launch refused for capacity is the
        market's doing, one given up (LAUNCH_ATTEMPTS) was never the app's (`_give_ups` counts
        those)."""
        return _bursts(
            [
                r.gone_at
                for r in self._failed_lately(now)
                if r.gone_at is not None
                and r.provisioned_at is not None
                and r.id not in self._given_up
                and (r.ready_at is None or r.gone_at - r.ready_at < EARLY_FAILURE_SECONDS)
            ]
        )

    def _give_ups(self, now: float) -> list[float]:
        """Bursts of launches given up (LAUNCH_ATTEMPTS failed applies, never provisioned) within
        CRASH_WINDOW_SECONDS, oldest first, counted as `_crashes` counts crashes. One given up is
        replaced at once (a local port taken by another process is that ID's problem, not the next
        one's); launches that keep being given up (a `run.command` that exits before the local
        launcher returns, a quota or image error on a cloud) would otherwise apply and fail a
        replica, or bill a machine, every pass for as long as the watcher runs."""
        return _bursts(
            [
                r.gone_at
                for r in self._failed_lately(now)
                if r.gone_at is not None and r.id in self._given_up and r.provisioned_at is None
            ]
        )

    def _gone_still_applied(self) -> bool:
        """Whether a root's last apply (or commit) still holds a replica the state records gone:
        the next apply of that root destroys it, even when the plan changes nothing."""
        live = {r.id for r in self.state.live()}
        held = set().union(*held_replicas(self.state).values())
        return any(rid in self.state.replicas and rid not in live for rid in held)

    def _crash_hold(self, now: float) -> float:
        """Seconds left before new replicas may be launched (0: no crash loop, and no run of
        launches given up)."""
        return max(self._hold_after(self._crashes(now), now), self._hold_after(self._give_ups(now), now))

    @staticmethod
    def _hold_after(bursts: list[float], now: float) -> float:
        """30 s after the CRASHES_BEFORE_HOLD-th burst, doubling with each further one."""
        if len(bursts) < CRASHES_BEFORE_HOLD:
            return 0.0
        hold = min(CRASH_HOLD_MAX_SECONDS, 30.0 * 2 ** (len(bursts) - CRASHES_BEFORE_HOLD))
        return max(0.0, bursts[-1] + hold - now)

    def _give_up_launches(self, result: ExecResult, at: float) -> None:
        """A replica still never provisioned after LAUNCH_ATTEMPTS failed applies of its own is
        recorded failed, so the policy places a new one instead of retrying it for good. Only
        applies whose errors name it count (`ExecResult.failed_replicas`): an apply that failed
        before reaching any replica (Terraform's state lock held, a full disk, Terraform unable to
        start) gave up replicas that never ran, said so in a warning each ("given up after 3 failed
        launches"), and its give-ups, one burst every three backoffs, held new launches back once
        the cause was gone (measured: "launches keep failing: 4 bursts ..." after a disk full)."""
        pending = {
            rec.id: rec for rec in self.state.live() if rec.provisioned_at is None and rec.cloud_id is None
        }
        self._attempts = {rid: n for rid, n in self._attempts.items() if rid in pending}
        if not result.errors:
            return
        named = result.failed_replicas
        for rid, rec in pending.items():
            if named is not None and rid not in named:
                continue  # the apply never got to it
            self._attempts[rid] = self._attempts.get(rid, 0) + 1
            if self._attempts[rid] < LAUNCH_ATTEMPTS:
                continue
            why = f"launch failed {self._attempts[rid]} times: {result.errors[0]}"
            if mark_gone(self.state, rec, at, "failed", why):
                self._given_up = {
                    k: t for k, t in self._given_up.items() if 0 <= at - t < CRASH_WINDOW_SECONDS
                }
                self._given_up[rid] = at
                self.state.extra["given_up"] = dict(self._given_up)
                self.note(
                    f"{rid} given up after {self._attempts[rid]} failed launches: replacing it",
                    at,
                    level=logging.WARNING,
                )

    def _note_spot_refusals(self, result: ExecResult, at: float) -> None:
        """Count this apply's refused spot launches per zone (one apply's refusals in a zone are
        one refusal: the zone said no once) and say how long spot launches there now wait."""
        zones: dict[Location, int] = {}
        by_quota = dict(result.quota_refusals)  # (paced per region: `_note_quota`)
        for rid in result.launch_failures:
            rec = self.state.replicas.get(rid) if rid not in by_quota else None
            if rec is not None and Market(rec.market) is Market.SPOT:
                zones[rec.location] = zones.get(rec.location, 0) + 1
            elif rec is not None:
                self._ondemand_refused.add(rec.location)
        if self.options.spot_retry <= 0:
            return
        # fewer than N replicas serve or start without spot: the launches that make up N are not
        # paused (`_pace_spot`), and the line said they were, at every refused apply
        target = self.last_plan.target if self.last_plan is not None else 0
        serving = sum(1 for r in self.state.live() if not r.draining and r.provisioned_at is not None)
        tail = (
            ""
            if serving >= target
            else f" (but not the ones the service is short of: {serving} of {target} run)"
        )
        for loc in sorted(zones, key=lambda loc: loc.key):
            count = self._spot_refused.get(loc, (0, at))[0] + 1
            self._spot_refused[loc] = (count, at)
            wait = self._spot_pause(count)
            line = f"spot launches in {loc.zone} paused {wait:.0f}s after {count} refusal(s) in a row"
            self.note(line + tail, at)

    def _spot_pause(self, refusals: int) -> float:
        """How long spot launches wait in a zone after `refusals` refusals in a row there."""
        opts = self.options
        return min(opts.max_spot_retry, opts.spot_retry * 2 ** min(refusals - 1, 20))

    def _spot_wait(self, loc: Location, now: float) -> float:
        """Seconds before a spot launch into `loc` is asked again (0: now). Never more than the
        pause itself: a refusal stamped ahead of a clock stepped back counts from now."""
        entry = self._spot_refused.get(loc)
        if entry is None or self.options.spot_retry <= 0:
            return 0.0
        count, at = entry
        if at > now:
            at = now
            self._spot_refused[loc] = (count, at)
            self._keep_spot_pauses()
        return max(0.0, at + self._spot_pause(count) - now)

    def _pace_spot(self, plan: Plan, now: float) -> Plan:
        """`plan` without its spot launches into zones still waiting after refusals (`_spot_wait`).
        The policy plans them every pass (its reset rule makes a drought's zones ACTIVE again at
        once) and its on-demand cover for them is kept: the service gets its N replicas at once,
        and each zone is asked for spot again when its pause ends. A plan left with no launch at
        all hands out no replica ID.

        Only launches something else covers are left out: while the plan's replicas without them
        (those it keeps or launches, not the ones on their way out) are fewer than the target, the
        missing ones are asked for at every apply, as before the pauses. Without on-demand cover
        (`dynamic_ondemand_fallback: false`, a spot-only policy, no on-demand offer) a paused zone
        was the service's outage: capacity back, the service stayed short until the pause ended
        (up to 5 min: 2-265 s measured after an hour's drought, where the apply backoff asks
        within 1 min: 2-57 s). An on-demand launch into a location that refused the last one
        (quota) and a replica whose launch failed are no cover: they may fail again."""
        self._spot_due = None
        self._spot_held = set()
        plan = self._pace_quota(plan, now)
        if not self._spot_refused:
            return plan
        dues = {
            r.id: wait
            for r in plan.replicas
            if r.action == CREATE
            and r.market is Market.SPOT
            and (wait := self._spot_wait(r.location, now)) > 0
        }
        refused = self._ondemand_refused
        covered = sum(
            1
            for r in plan.desired
            if r.id not in dues
            and r.id not in plan.releasing
            and r.id not in plan.unlaunched  # (its launch failed: retried, maybe failing again)
            and not (r.action == CREATE and r.market is Market.ON_DEMAND and r.location in refused)
        )
        short = max(0, plan.target - covered)
        for rid in sorted(dues, key=lambda rid: (dues[rid], replica_order(rid)))[:short]:
            del dues[rid]  # the service is short without it: asked now
        if not dues:
            return plan
        due = now + min(dues.values())
        self._spot_due = due if self._spot_due is None else min(self._spot_due, due)
        self._spot_held = {r.location for r in plan.replicas if r.id in dues}
        kept = tuple(r for r in plan.replicas if r.id not in dues)
        launches = any(r.action == CREATE for r in kept)
        return replace(plan, replicas=kept, next_id=plan.next_id if launches else self.state.next_id)

    def _root_backoff(self, failures: int) -> float:
        opts = self.options
        return min(opts.max_root_backoff, opts.busy_interval * (2 ** min(failures, 12)))

    def _held_roots(self, now: float) -> frozenset[str]:
        """The failing roots whose retry is not due: the executor leaves them out this time."""
        for outage in self._outages.values():  # a clock stepped back: a backoff from now at most
            if outage.idle_since is None:
                wait = max(outage.wait, self._root_backoff(outage.failures))
                outage.retry_at = min(outage.retry_at, now + wait)
        return frozenset(k for k, o in self._outages.items() if o.held(now))

    def _waits_on_held_roots(self, plan: Plan, now: float) -> bool:
        """Every change of `plan` is in a root held back (`_held_roots`): applying it would
        apply nothing."""
        held = {k for k, o in self._outages.items() if o.held(now)}
        return bool(held) and all(root_key(r.root) in held for r in plan.changes)

    def _outage_due(self, now: float) -> bool:
        """A failing root's retry is due: the pass applies (that root) even if nothing changed."""
        return any(o.due(now) for o in self._outages.values())

    def _applies_roots_itself(self) -> bool:
        """The executor runs the roots (not GitOps, where CI applies: its executor has `finish`,
        and whether a root applies is never known here)."""
        return not self.options.assume_ready and getattr(self.executor, "finish", None) is None

    def _placed_roots(self) -> set[str]:
        """The root keys (`cloud/region`) of the placement's locations."""
        return {f"{c.location.cloud}/{c.location.region}" for c in self.placement.locations}

    def _track_outages(
        self,
        result: ExecResult,
        cause_of: Callable[[str, str], str],
        cause: str,
        done: float,
        took: float,
        tried: frozenset[str] = frozenset(),
    ) -> set[str]:
        """Keep the failing roots (`RootOutage`) after an apply, and say each failure in one line:
        the root, why (secrets masked), since when, and when it is tried again, the other roots
        applying meanwhile; and a recovery once. Returns the roots failing now.

        A retry waits at least ROOT_RETRY_SPACING times as long as the root's failed run took
        (`ExecResult.root_seconds`; the whole apply's `took` from an executor that does not time
        its roots): the pass waits for a root's Terraform run, and against a throttled API one
        ran for over 15 minutes (the provider retrying each call), so retries every 5 minutes
        would hold the loop, and the other clouds' replacements, most of the time.

        A failing root in `tried` (given to the executor, not held) that neither failed again nor
        applied had nothing left to apply: its launches were refused and placed elsewhere. Its
        last try failed, so it is still failing, but idle (`RootOutage.idle_since`): shown by
        `status` and `skyhedge_root_failing`, never due nor held, tried again with the next launch
        placed there. Dropped, the page never fired (1 from 28 s to 330 s of a 2-hour outage)
        while the service quietly ran elsewhere. Dropped it still is where it can never apply
        again: a root the spec no longer places (an `apply` destroyed its replicas while no
        watcher ran), or under an executor that applies no roots of its own (GitOps: CI
        applies). Kept due, its retry ran a pass every `busy_interval` for good (600 passes and
        executor runs in 10 minutes, where 60 is the pace)."""
        failing = set(result.failed_roots)
        whole = any(_root_of(e, failing) is None for e in result.errors)
        placed, applies = self._placed_roots(), self._applies_roots_itself()
        for key in sorted(tried - failing - set(result.applied)) if not whole else ():
            outage = self._outages.get(key)
            if outage is None:
                continue
            if not applies or key not in placed:
                del self._outages[key]
                self.note(f"{key}: no longer failing: nothing left to apply there", done)
            elif outage.idle_since is None:
                outage.idle_since = done
                self.note(
                    f"{key}: nothing left to apply there (its launches placed elsewhere); still failing "
                    "since its last try, tried again with the next launch placed there",
                    done,
                )
        for key in failing:
            line = next((e for e in result.errors if _root_of(e, {key}) is not None), f"{key}: failed")
            reason = masked(cause_of(line, cause))
            was = self._outages.get(key)
            failures = 1 if was is None else was.failures + 1
            since = done if was is None else was.since
            ran = dict(result.root_seconds).get(key, took)
            retry = max(self._root_backoff(failures), ROOT_RETRY_SPACING * ran)
            self._outages[key] = RootOutage(since, failures, done + retry, reason, retry)
            self.note(
                f"apply failed: {reason}; {key} failed {failures} time(s) in a row since "
                f"{time.strftime('%H:%M:%S', time.localtime(since))}, tried again in {_span(retry)} "
                "(the other roots apply meanwhile)",
                done,
                level=logging.WARNING,
            )
        for key in [k for k in result.applied if k in self._outages and k not in failing]:
            outage = self._outages.pop(key)
            self.note(
                f"{key}: applied again after {_span(done - outage.since)} "
                f"and {outage.failures} failed apply(ies)",
                done,
            )
        self._keep_outages()
        return failing

    def _refuse_launches_into_failing_roots(self, failing: set[str], at: float) -> None:
        """Launches waiting on a root out for LAUNCH_ATTEMPTS failed applies in a row are refused,
        as a zone without capacity refuses them: recorded failed with a LAUNCH_FAILED zone event,
        so the policy places them where launches work (another zone, another cloud) and spot
        launches into those zones are paused (`_note_spot_refusals`). Waiting there, they were
        counted by the policy as replicas on their way for as long as the outage lasted, and
        SpotHedge covered each with an on-demand replica elsewhere (measured over an hour of an
        AWS outage with local preemptions: 3 spot replicas waiting on the dead root, 3 on-demand
        ones covering them). A root failing fewer times in a row (a blip, Terraform's state lock
        held a moment) keeps its launches waiting under their IDs, as before.

        Only the roots `failing` in this very apply refuse, as a zone refuses when asked: a launch
        the policy places in a root held back since waits for the root's next try. Refused at
        once, a service whose every root failed (one cloud region, its API gone) was planned a
        new replica at every pass, refused at once: 606 replica IDs in an hour (two before),
        each a record in `state.json`."""
        refused: list[str] = []
        for key, outage in sorted(self._outages.items()):
            if outage.failures < LAUNCH_ATTEMPTS or key not in failing:
                continue
            for rec in sorted(self.state.live(), key=by_replica_id):
                if f"{rec.cloud}/{rec.region}" != key or rec.provisioned_at is not None or rec.cloud_id:
                    continue
                why = f"launch refused: {key} applies keep failing ({outage.reason})"
                if mark_gone(self.state, rec, at, "failed", why):
                    self.state.record_event(ZoneEvent(EventKind.LAUNCH_FAILED, rec.location, at, rec.id))
                    refused.append(rec.id)
                    self.note(
                        f"launch of {rec.id} refused in {rec.zone}: {key} applies keep failing, re-planning",
                        at,
                    )
        if refused:
            self._note_spot_refusals(ExecResult(launch_failures=tuple(refused)), at)

    def _quota_wait(self, loc: Location, market: Market, now: float) -> float:
        """Seconds before a launch on `market` into `loc` is asked again after its region's (or
        cloud's) quota refused one (0: now). A time ahead of the clock counts from now."""
        wait = 0.0
        for key in (f"{loc.cloud}/{loc.region}/{market.value}", f"{loc.cloud}/*/{market.value}"):
            entry = self._quota.get(key)
            if entry is not None:
                pause = self._spot_pause(int(entry["refusals"]))
                wait = max(wait, min(pause, float(entry["next_at"]) - now))
        return wait

    def _pace_quota(self, plan: Plan, now: float) -> Plan:
        """`plan` without its launches into a region (or cloud) whose quota for their market is
        used up and not due to be asked again (`_quota_wait`), covered or not: asking sooner is
        refused again, whatever the service is short of (a stock-out may end any minute; a quota
        waits for a person)."""
        self._quota_held = False
        if not self._quota:
            return plan
        dues = {
            r.id: wait
            for r in plan.replicas
            if r.action == CREATE and (wait := self._quota_wait(r.location, r.market, now)) > 0
        }
        if not dues:
            return plan
        self._quota_held = True
        self._spot_due = now + min(dues.values())
        kept = tuple(r for r in plan.replicas if r.id not in dues)
        launches = any(r.action == CREATE for r in kept)
        return replace(plan, replicas=kept, next_id=plan.next_id if launches else self.state.next_id)

    def _note_quota(self, result: ExecResult, at: float) -> None:
        """Record this apply's quota refusals, one per region (or cloud) and market, however many
        replicas and zones it refused there: every launch of that market there waits
        (`_pace_quota`), where per-zone pauses asked each zone apart and a launch the service was
        short of at every apply. Said once per quota (again only when its words change), at
        WARNING, with the quota and where to raise it. (The policy is told only of the zones
        asked: telling it every zone of the region changed no measured figure, the policies
        asking a region's zones together or ignoring the events.)"""
        found: dict[str, tuple[QuotaRefusal, list[ReplicaRecord]]] = {}
        for rid, refusal in result.quota_refusals:
            rec = self.state.replicas.get(rid)
            if rec is None:
                continue
            region = rec.region if refusal.scope == "region" else "*"
            found.setdefault(f"{rec.cloud}/{region}/{rec.market}", (refusal, []))[1].append(rec)
        for key, (refusal, recs) in sorted(found.items()):
            before = self._quota.get(key)
            count = int(before["refusals"]) + 1 if before is not None else 1
            wait = self._spot_pause(count) if self.options.spot_retry > 0 else 0.0
            self._quota[key] = {
                "reason": refusal.reason,
                "since": float(before["since"]) if before is not None else at,
                "refusals": count,
                "at": at,
                "next_at": at + wait,
            }
            cloud, region, market = key.split("/")
            if before is None or before["reason"] != refusal.reason:
                ids = ", ".join(sorted((r.id for r in recs), key=replica_order))
                where = region if region != "*" else f"every {cloud} region"
                self.note(
                    f"launch of {ids} refused: {refusal.reason}; {market} launches in {where} wait "
                    f"until one succeeds (asked again in {wait:.0f}s, then at most every "
                    f"{self.options.max_spot_retry:.0f}s)",
                    at,
                    level=logging.WARNING,
                )
            else:
                log.debug("%s: %s refused again (%d in a row)", self.spec.name, key, count)
        if found:
            self._keep_quota()

    def _lift_quota(self, rec: ReplicaRecord, at: float) -> None:
        """A launch that succeeded where a quota refused: raised (or freed), said once."""
        for key in (f"{rec.cloud}/{rec.region}/{rec.market}", f"{rec.cloud}/*/{rec.market}"):
            entry = self._quota.pop(key, None)
            if entry is not None:
                where = rec.region if "/*/" not in key else f"{rec.cloud}'s regions"
                self.note(f"{rec.market} launches in {where} succeed again ({rec.id}): quota raised", at)
                self._keep_quota()

    def _forget_quotas_out_of_reach(self, before: Placement | None) -> None:
        """Drop the quotas of a region (or cloud) the placement no longer reaches, and those of a
        cloud whose instance type changed since `before` (another type may count against another
        quota): no launch is asked there any more, so none would ever succeed there to lift them,
        and `status` showed them as current for as long as the state lived (measured: a spec
        reload dropping us-west-2 left its `Quota:` line, "asked again at" a time long past)."""
        if not self._quota:
            return
        regions = {(c.location.cloud, c.location.region) for c in self.placement.locations}
        clouds = {cloud for cloud, _ in regions}
        now_types = self.placement.instance_types
        gone: dict[str, str] = {}
        for key in self._quota:
            cloud, region, _market = key.split("/")
            if not (cloud in clouds if region == "*" else (cloud, region) in regions):
                gone[key] = "the spec no longer places replicas there"
            elif before is not None and before.instance_types.get(cloud) != now_types.get(cloud):
                gone[key] = f"the spec's {cloud} instance type is now {now_types.get(cloud)}"
        for key, why in sorted(gone.items()):
            del self._quota[key]
            self.note(f"quota used up in {key} no longer followed: {why}")
        if gone:
            self._keep_quota()

    def _forget_failing_roots_out_of_reach(self) -> None:
        """Drop the failing roots (`RootOutage`) of a cloud region the placement no longer reaches
        and where no replica of the service lives (none left to destroy there): nothing is ever
        applied there again, so none would recover, and an idle one would be shown failing, and
        `skyhedge_root_failing` page, for as long as the state lived. A root still holding
        replicas keeps its record: their destroy is an apply there."""
        if not self._outages:
            return
        placed = self._placed_roots()
        lived = {f"{r.cloud}/{r.region}" for r in self.state.live()}
        gone = sorted(k for k in self._outages if k not in placed and k not in lived)
        for key in gone:
            del self._outages[key]
            self.note(f"{key}: failing root no longer followed: the spec no longer places replicas there")
        if gone:
            self._keep_outages()

    def _keep_outages(self) -> None:
        """Mirror `_outages` into the state (written with the pass that changed it)."""
        if self._outages:
            self.state.extra[FAILING_ROOTS_KEY] = {k: o.to_json() for k, o in sorted(self._outages.items())}
        else:
            self.state.extra.pop(FAILING_ROOTS_KEY, None)

    def _keep_quota(self) -> None:
        """Mirror `_quota` into the state (written with the pass that changed it)."""
        if self._quota:
            self.state.extra[QUOTA_KEY] = {k: dict(v) for k, v in sorted(self._quota.items())}
        else:
            self.state.extra.pop(QUOTA_KEY, None)

    def _backoff(self) -> float:
        """How long failed applies wait before the next one: busy_interval doubling per failure."""
        opts = self.options
        return min(opts.max_backoff, opts.busy_interval * (2 ** min(self._failures, 10)))

    def _retry_rides_pause(self, plan: Plan, now: float) -> bool:
        """Whether this pass's apply would only retry launches refused last time (no error) with
        a plan that, paced, asks nothing, while a quota holds launches back (zones' pauses may
        too) until later: the retry then goes with them when the first pause ends, and that apply
        reconciles the roots as the retry would have. A region's quota pause and the zones' spot
        pauses fall on different passes, and each refused apply's retry, 2 s later, ran Terraform
        with every launch held (measured over the controller fakes, spot quota of 1 in us-west-2
        and us-east-1 out of spot, an hour: 100 Terraform runs, 42 of them asking nothing, where
        the same refusals taken for stock-outs made 60; now 53, each asking something)."""
        return (
            bool(self._failures)
            and self._refused_only
            and self._quota_held
            and not plan.has_changes
            and self._spot_due is not None
            and self._spot_due > now
        )

    def _retry_left(self, now: float) -> float:
        """Seconds before the next apply after failed ones (0: due now, or nothing failed). Never
        more than the backoff itself: `_retry_at` is a time on the controller's clock, the wall
        clock, and a clock stepped back (NTP, a VM's clock set right) left it that much ahead:
        the passes skipped their applies and asked to sleep as long (3602 s after a 1 h step),
        with nothing probed, routed or replaced meanwhile unless an event woke the loop."""
        if self._retry_at is None:
            return 0.0
        if self._retry_at - now > self._backoff():  # the clock stepped back: wait a backoff from now
            self._retry_at = now + self._backoff()
        return max(0.0, self._retry_at - now)

    def _next_delay(self) -> float:
        opts = self.options
        if self._routing_failed and not self._failures:
            return min(opts.interval, max(opts.busy_interval, 2.0))
        # (a retry left to a pause's end, `_retry_rides_pause`: paced as a pass with none due)
        if self._failures and not self._retry_deferred:
            now = self.clock()
            left = self._backoff() if self._retry_at is None else self._retry_left(now)
            if any(r.fact().status in PROBED for r in self.state.live()):
                # replicas the failed apply did start (beside a refused launch) are probed at the
                # busy pace: READY, routed and their on-demand cover released within a pass, not
                # after up to max_backoff (measured under a market replay: 25-61 s)
                return min(left, opts.busy_interval)
            return left
        delay = opts.interval
        now = self.clock()
        held = {k for k, o in self._outages.items() if o.held(now)}  # (their retry: below)
        busy = (r for r in self.state.live() if f"{r.cloud}/{r.region}" not in held)
        if any(r.fact().status in BUSY for r in busy) or warned(self.state):
            delay = opts.busy_interval
        if self.state.extra.get(DRAIN_KEY):  # replicas wait for their requests to end
            delay = min(delay, max(opts.busy_interval, 1.0))
        hold = self._crash_hold(self.clock())
        if hold > 0:
            delay = max(delay, min(opts.interval, hold))
        scaler = self.state.extra.get("autoscaler") or {}
        if scaler.get("pending_since") is not None:
            delay = min(delay, max(opts.busy_interval, 1.0))
        if self._spot_due is not None:  # a zone's spot pause ends: asked then, not a pass later
            delay = min(delay, max(opts.busy_interval, self._spot_due - self.clock()))
        # a failing root's retry: at its time, not up to an interval later (an idle one has none)
        if retries := [o.retry_at for o in self._outages.values() if o.idle_since is None]:
            delay = min(delay, max(opts.busy_interval, min(retries) - self.clock()))
        return delay

    # -- status for the CLI and the dashboard ----------------------------------------------------

    def replicas(self) -> list[ReplicaRecord]:
        return sorted(self.state.live(), key=by_replica_id)
