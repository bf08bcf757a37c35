"""The real implementations of the controller's seams: nginx routing and HTTP readiness probes.

(The Terraform executor is in `executor.py`, GitOps in `gitops.py`.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skyhedge.controller.facts import UNPROBED_SECONDS
from skyhedge.errors import RoutingError
from skyhedge.probe import MAX_PROBES_AT_ONCE, ProbeResult, check, check_all, timed_out
from skyhedge.routing import Router, Upstream, read_stub_status, workers_alive
from skyhedge.spec import ReadinessProbe, ServiceSpec
from skyhedge.state import ReplicaRecord

log = logging.getLogger("skyhedge.controller")


class NginxRouter:
    """`RouterPort` over `skyhedge.routing.Router`: start-or-reload, drain, request counter."""

    def __init__(self, spec: ServiceSpec, state_dir: Path, *, drain_timeout: float = 30.0) -> None:
        self.router = Router(spec, state_dir)
        self.drain_timeout = drain_timeout
        self._raw: int | None = None
        self._count = 0

    def use(self, spec: ServiceSpec) -> None:
        """Route for a reloaded spec (its port, its knobs) from the next reload on; the request
        counter carries on, so the autoscaler sees no jump."""
        self.router = Router(spec, self.router.paths.prefix.parent)

    def running(self) -> bool:
        return self.router.pid() is not None

    def pid(self) -> int | None:
        """The running nginx master's pid (None: not running): the watcher wakes its loop when
        that process exits (`runner.Watcher._watch_router`)."""
        return self.router.pid()

    def outdated(self) -> str | None:
        """Why the running config must be reloaded though the upstreams did not change (a renewed
        TLS certificate, a deleted config: `Router.outdated`), or None."""
        return self.router.outdated()

    def reload(self, upstreams: Sequence[tuple[str, str]]) -> dict[str, Any]:
        return self._up([Upstream(rid, endpoint) for rid, endpoint in upstreams])

    def drain(self, upstreams: Sequence[tuple[str, str]]) -> dict[str, Any]:
        ups = [Upstream(rid, endpoint) for rid, endpoint in upstreams]
        if not self.running():
            return self._up(ups)
        if not self.router.drain(ups, timeout=self.drain_timeout):
            log.warning(
                "requests still in flight to removed replicas after %.0fs; going on", self.drain_timeout
            )
        return self.router.status()

    def begin_drain(self, upstreams: Sequence[tuple[str, str]]) -> tuple[dict[str, Any], list[int]]:
        """Route to `upstreams` only, without waiting: (status, the old workers' pids). The
        controller keeps the removed replicas running until `draining(pids)` is False (their
        requests ended) or its deadline passes, and goes on with its passes meanwhile."""
        ups = [Upstream(rid, endpoint) for rid, endpoint in upstreams]
        if not self.running():
            return self._up(ups), []
        old = self.router.begin_drain(ups)
        return self.router.status(), old

    def draining(self, pids: Sequence[int]) -> bool:
        return workers_alive(pids)

    def sever(self, endpoints: Sequence[str], *, awaiting_within: float | None = None) -> int:
        """Close nginx's connections to replicas known gone (`Router.sever`): their requests in
        flight are retried elsewhere at once instead of waiting out `read_timeout`. With
        `awaiting_within`, only the requests nginx can still retry (a hung replica's)."""
        return self.router.sever(endpoints, awaiting_within=awaiting_within)

    def _up(self, ups: list[Upstream]) -> dict[str, Any]:
        """Start-or-reload; after a start, the fresh nginx's counter is read at once as the new
        baseline: the router's own health check of the new nginx is not client traffic."""
        started = not self.running()
        status = self.router.up(ups)
        if started and self._raw is not None:
            self._raw = None
            self._read_raw(status)
        return status

    def _read_raw(self, status: dict[str, Any]) -> int | None:
        url = status.get("status_url")
        if not url:
            return None
        try:
            raw = read_stub_status(url)["requests"]
        except RoutingError as exc:
            log.debug("%s", exc)
            return None
        if self._raw is not None:
            delta = raw - self._raw if raw >= self._raw else raw
            self._count += max(0, delta - 1)
        self._raw = raw
        return raw

    def request_count(self) -> int | None:
        """Client requests seen by the router, monotonic across nginx restarts.

        Each read of stub_status is itself one request; it is subtracted so an idle service reads
        0 req/s. After a restart this adapter made, counting goes on from the new nginx's
        counter as read right after its start; after one made by someone else (seen as the raw
        counter going down), from zero, with their health check in it.
        """
        if self._read_raw(self.router.status()) is None:
            return None
        return self._count

    def rotate_logs(self) -> list[Path]:
        """Keep nginx's logs bounded (see `Router.rotate_logs`); the watcher calls it once a minute."""
        return self.router.rotate_logs()

    def down(self) -> None:
        self.router.down()


@dataclass(frozen=True, order=True)
class _Probed:
    """What one probe is of: the replica (its ID and launch) at its endpoint."""

    endpoint: str
    replica: str
    launched_at: float


class _Behind:
    """One probe running in a daemon thread (`HttpProber`); `result` once it ended, which it does
    within the probe's timeout (`skyhedge.probe.check` bounds the whole probe)."""

    def __init__(self, endpoint: str, readiness: ReadinessProbe) -> None:
        self.result: ProbeResult | None = None
        threading.Thread(
            target=self._run, args=(endpoint, readiness), name="skyhedge-probe", daemon=True
        ).start()

    def _run(self, endpoint: str, readiness: ReadinessProbe) -> None:
        self.result = check(endpoint, readiness)


class HttpProber:
    """`Prober` over `skyhedge.probe`: the spec's readiness probe, all replicas concurrently.

    A probe this machine could not make (out of descriptors or ports: `ProbeResult.local`) is left
    out of the results, so the replica keeps the state it had (for up to UNPROBED_SECONDS: see
    `Controller._probe`), and said once a minute through `problems()`. Judged failed, every READY
    replica went NOT_READY at once (on-demand covers launched for them) and, after 180 s of it,
    FAILED and replaced: a healthy service taken down by its watcher's own trouble.

    A replica whose last probe timed out (hung, or a machine gone silent) is probed in the
    background instead: a round starts its probe and does not wait for it, and a later round
    takes its result (left out of the results meanwhile, so the replica keeps its state). Why:
    waited for, it held every pass of the watcher for the whole timeout for as long as it hung
    (until FAILED, 180 s: 15 s a pass at the default timeout, up to an hour at the longest), and
    with it everything else the pass does: measured, a replica killed meanwhile left the router
    21 s after its exit, and a cover launched for the hung one was seen READY 17.1 s after its
    launch instead of 2.5 s. Only the round that finds it hung waits for it."""

    def __init__(self, spec: ServiceSpec | ReadinessProbe) -> None:
        # a spec's probe, or a probe alone: an earlier spec's, which a restarted watcher reads back
        # from the state for the outdated replicas of a rolling update (`Controller`)
        self.readiness = spec if isinstance(spec, ReadinessProbe) else spec.readiness_probe
        self._said: list[str] = []
        self._unmade = False  # the last probes this process could not make
        # replicas (`_Probed`: endpoint and replica, for a new replica at a reused address must
        # never be given what a probe of the hung one before it found) whose last probe timed out
        self._slow: set[_Probed] = set()
        self._behind: dict[_Probed, _Behind] = {}  # their probes under way

    def _results(self, targets: Sequence[_Probed]) -> dict[_Probed, ProbeResult]:
        """This round's results: every target probed at once, but those found hung before, whose
        probes run in the background (at most MAX_PROBES_AT_ONCE; any more are waited for):
        theirs only once one ended, and only to the replica it probed. Why keyed by replica too:
        local ports (and a cloud's private addresses) are handed out again, and a replica
        launched at the address of a hung one gone meanwhile was given that one's stale result
        (a timeout, or what its closing socket gave) and left unprobed while it was under way."""
        self._slow &= set(targets)
        self._behind = {t: b for t, b in self._behind.items() if t in self._slow}  # (they end alone)
        waited = [t for t in targets if t not in self._slow]
        done: dict[_Probed, ProbeResult] = {}
        for target in sorted(self._slow):
            behind = self._behind.get(target)
            if behind is None and len(self._behind) < MAX_PROBES_AT_ONCE:
                self._behind[target] = _Behind(target.endpoint, self.readiness)
            elif behind is None:
                waited.append(target)
            elif behind.result is not None:
                done[target] = behind.result
                del self._behind[target]
        fresh = check_all([t.endpoint for t in waited], self.readiness)  # (an address probed once)
        results = {**{t: fresh[t.endpoint] for t in waited if t.endpoint in fresh}, **done}
        for target, res in results.items():
            if not res.ok and not res.local and timed_out(res.error or ""):
                self._slow.add(target)
            else:
                self._slow.discard(target)
        return results

    def probe(self, records: Sequence[ReplicaRecord]) -> dict[str, tuple[bool, str]]:
        targets = [_Probed(r.endpoint, r.id, r.launched_at) for r in records if r.endpoint]
        results = self._results(targets)
        out: dict[str, tuple[bool, str]] = {}
        why = ""
        for target in targets:
            res = results.get(target)
            if res is not None and res.local:
                why = res.error or "?"
            elif res is not None:
                out[target.replica] = (res.ok, res.error or f"HTTP {res.status}")
        if why:
            # the same words every time: the controller says a line again only a minute later
            self._said.append(
                f"readiness probes could not be made from this process ({why}): the replicas "
                f"keep their last state for up to {UNPROBED_SECONDS:.0f}s, then count NOT_READY until "
                "a probe can be made"
            )
        elif out and self._unmade:
            self._said.append("readiness probes can be made again")
        self._unmade = bool(why) or (self._unmade and not out)
        return out

    def problems(self) -> list[str]:
        """What the last probes could not do, for the controller to note (as a warning)."""
        said, self._said = self._said, []
        return said
