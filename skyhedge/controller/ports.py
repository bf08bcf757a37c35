"""The controller's seams: what it needs from Terraform, the router and the probes.

Each is a small protocol so the controller can be driven by the real thing (`adapters.py`) or by
fakes (tests), and so GitOps mode is just another executor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from skyhedge.clouds import QuotaRefusal
from skyhedge.planner import Plan
from skyhedge.state import ReplicaRecord, ServiceState

Root = tuple[str, str]  # (cloud, region): one Terraform root


def root_key(root: Root) -> str:
    return f"{root[0]}/{root[1]}"


@dataclass(frozen=True)
class ExecResult:
    """What one executor pass did. The facts themselves are already recorded in the state.

    `applied`: root keys applied (fully or partly); `errors`: one line per root that failed for a
    reason other than capacity (retried with backoff); `launch_failures`: replica IDs whose launch
    was refused for capacity or quota (recorded gone with a LAUNCH_FAILED zone event);
    `quota_refusals`: (replica ID, what its cloud says of the quota) for those of
    `launch_failures` refused because an account quota is used up (a whole region's, or cloud's,
    until a person raises it), not a zone's capacity;
    `detail`: the engine's full error text, for the log; `warnings`: lines noted as warnings
    (machines an interrupted run left, removed before Terraform ran, or lookups that failed).

    `failed_roots`: the root keys (`aws/us-east-1`) whose apply failed naming no launch of its
    own (not for capacity, not a bad image): the controller holds each back with a backoff of its
    own (`loop.RootOutage`), so that a cloud whose API is gone (credentials expired, endpoint
    unreachable, throttled) does not hold back the others. An executor that cannot tell leaves
    it empty: its errors are then the whole apply's, retried with the apply backoff.
    `root_seconds`: (root key, seconds) its run took, where the executor timed it: a failing
    root's retry waits at least three times its own run, not the whole apply's (a sibling root
    creating machines for 2 minutes held a root failing once for over 6 minutes).

    `failed_replicas`: the replicas an error names (their own launch failed: a local port taken,
    a command that exits at once, an image or quota error), or None when the executor cannot tell,
    and every replica still waiting for its launch then counts as failed by this apply. An error
    naming none (Terraform's state lock held, its working directory unreadable, a full disk for
    the rendered tree) never reached a replica: it does not count towards giving one up
    (`loop.LAUNCH_ATTEMPTS`), which would replace it under a new ID to fail the same way.
    """

    applied: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    launch_failures: tuple[str, ...] = ()
    quota_refusals: tuple[tuple[str, QuotaRefusal], ...] = ()
    detail: str = ""
    note: str = ""
    warnings: tuple[str, ...] = ()
    failed_replicas: tuple[str, ...] | None = None
    failed_roots: tuple[str, ...] = ()
    root_seconds: tuple[tuple[str, float], ...] = ()

    @property
    def failed(self) -> bool:
        return bool(self.errors or self.launch_failures)


class Executor(Protocol):
    """Makes the Terraform roots match a plan and records the outcome in the state."""

    def apply(self, state: ServiceState, plan: Plan, now: float) -> ExecResult:
        """Apply `plan.desired` to every root that is not up to date (others are skipped), and
        record in `state`: endpoints, cloud IDs and `provisioned_at` of created replicas; destroyed
        ones gone (`terminated`); launches refused for capacity gone (`failed`) with a
        LAUNCH_FAILED zone event. Must not raise for a failed root: report it.

        An executor that reports `ExecResult.failed_roots` is also called with `hold`, the root
        keys it must not apply this time (failing, their retry not due yet): their changes wait,
        the other roots apply as usual. Executors that report none are never given one.

        An executor may also have `finish(state) -> str`, called at the end of every pass once the
        state is saved (GitOps commits there, with that state); it returns a note or ''."""
        ...


class RouterPort(Protocol):
    """The one endpoint in front of the replicas."""

    def reload(self, upstreams: Sequence[tuple[str, str]]) -> dict[str, Any] | None:
        """Route to exactly these (replica ID, endpoint) pairs; start the router if needed.
        Returns the router's status (kept in `state.router` for `skyhedge status`)."""
        ...

    def drain(self, upstreams: Sequence[tuple[str, str]]) -> dict[str, Any] | None:
        """Route to exactly these, then wait (bounded) until requests in flight to the others end."""
        ...

    def running(self) -> bool:
        """Whether the router process is up (a dead router is restarted on the next tick)."""
        ...

    def request_count(self) -> int | None:
        """The router's cumulative request counter (stub_status `requests`), None if unreadable."""
        ...

    # Optional: `outdated() -> str | None`, why the running config needs a reload though the
    # upstreams are the same (a renewed TLS certificate, a deleted config); routers without it
    # are reloaded on changes only. `pid() -> int | None`, the router process: a watcher wakes
    # its loop when it exits (killed, crashed), to start it again at once. `sever(endpoints) ->
    # int`, close the router's connections to replicas known gone (a vanished VM sends no reset),
    # so that requests in flight on them are retried at once: the connections closed; given
    # `awaiting_within=S` (keyword), only those awaiting the answer to a request sent less than
    # S s ago (a hung replica's requests nginx can still retry: `Controller._cut_hung`).


class Prober(Protocol):
    def probe(self, records: Sequence[ReplicaRecord]) -> dict[str, tuple[bool, str]]:
        """Readiness of each replica with an endpoint: ID -> (passed, detail)."""
        ...
