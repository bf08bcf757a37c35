"""The reconcile tick: events -> facts -> plan -> apply changed roots -> probes -> routing.

    delay = controller.tick()

Each tick is safe to repeat and safe to be killed at any point (`kill -9` included):

1. Source events and probe results become facts in the state (`facts.py`).
2. `compute_plan` (the same function `plan` and `apply` use) decides the layout.
3. Before touching Terraform the tick *writes its intent*: new replicas get their records (so their
   IDs are never handed out twice), replicas to remove are marked draining, the policy's memory and
   consumed zone events are saved — all in one atomic state write.
4. Removed replicas leave the router first (drain), then the changed roots are applied.
5. Outputs (endpoints, cloud IDs) are recorded; a launch refused for capacity marks its zone
   preempted (LAUNCH_FAILED) and the next tick places the replica elsewhere, with backoff.

A root is applied when its desired layout differs from the one last applied successfully (a
digest kept in the state), so after a crash mid-apply the root is simply applied again: Terraform
converges it, no replica is created twice, none is left behind. On start every root is applied
once, which reconciles the state with Terraform's own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from skyhedge import autoscaler
from skyhedge.controller.facts import (
    WARNING_GRACE_SECONDS,
    ProbeResult,
    apply_probes,
    ingest,
    mark_gone,
    routable,
    warned,
)
from skyhedge.controller.ports import ApplyReport, Executor, Prober, Root, RouterPort, root_key
from skyhedge.errors import SkyhedgeError
from skyhedge.events import EventSource, PreemptionEvent
from skyhedge.planner import CREATE, DELETE, KEEP, Plan
from skyhedge.policy.types import EventKind, Market, ReplicaStatus, ZoneEvent
from skyhedge.service import Placement, compute_plan, resolve_placement
from skyhedge.spec import ServiceSpec
from skyhedge.state import ReplicaRecord, ServiceState, load_state, save_state

log = logging.getLogger("skyhedge.controller")

BUSY = frozenset(
    {ReplicaStatus.PROVISIONING, ReplicaStatus.STARTING, ReplicaStatus.NOT_READY, ReplicaStatus.SHUTTING_DOWN}
)


@dataclass(frozen=True)
class ControllerOptions:
    """Timing and mode. Times in seconds.

    `interval`: the period when nothing is happening (events wake the loop sooner);
    `busy_interval`: while replicas start, drain or fail probes; `max_backoff`: the longest wait
    after failed applies; `survival_period`: how often spot replicas that stayed READY report
    their zone as SURVIVED to the policy; `assume_ready`: GitOps mode (CI applies; replicas count
    as READY once committed, and nothing is probed or routed).
    """

    interval: float = 10.0
    busy_interval: float = 1.0
    max_backoff: float = 60.0
    survival_period: float = 60.0
    policy: str | None = None
    autoscale: bool = True
    assume_ready: bool = False


@dataclass(frozen=True)
class Note:
    at: float
    text: str


def spec_digest(spec: ServiceSpec) -> str:
    """Changes when anything rendered into the roots may change (command, env, ports...)."""
    return hashlib.sha256(repr(replace(spec, source="")).encode()).hexdigest()[:16]


def root_digest(spec_hash: str, plan: Plan, root: Root) -> str:
    layout = sorted((r.id, r.location.zone, r.market.value) for r in plan.desired if r.root == root)
    return hashlib.sha256(json.dumps([spec_hash, layout]).encode()).hexdigest()[:16]


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
    ) -> None:
        self.spec = spec
        self.state_dir = state_dir
        self.executor = executor
        self.router = router
        self.prober = prober
        self.sources = list(sources)
        self.clock = clock
        self.options = options or ControllerOptions()
        self.placement = placement or resolve_placement(spec)
        self.state: ServiceState = load_state(state_dir, spec.name)
        self.spec_hash = spec_digest(spec)
        self.scaler = autoscaler.AutoscalerConfig.from_spec(spec)
        self.notes: deque[Note] = deque(maxlen=50)
        self.last_plan: Plan | None = None
        self.ticks = 0
        self._failures = int(self.state.extra.get("launch_failures", 0))
        self._started = False
        self._listeners: list[Callable[[Controller], None]] = []

    # -- small helpers ---------------------------------------------------------------------------

    def note(self, text: str, at: float | None = None) -> None:
        at = self.clock() if at is None else at
        self.notes.append(Note(at, text))
        log.info("%s: %s", self.spec.name, text)

    def subscribe(self, listener: Callable[[Controller], None]) -> None:
        """Called after every tick (the dashboard redraws from it)."""
        self._listeners.append(listener)

    def save(self) -> None:
        self.state.extra["launch_failures"] = self._failures
        save_state(self.state_dir, self.state)

    # -- the tick --------------------------------------------------------------------------------

    def tick(self) -> float:
        """One reconcile pass; returns how long to wait before the next (unless woken)."""
        now = self.clock()
        self.ticks += 1
        events = self._poll(now)
        for line in ingest(self.state, events, now):
            self.note(line, now)
        self._expire_warnings(now)
        self._probe(now)
        self._autoscale(now)
        self._survival(now)
        self._route(force=not self._started)  # gone or newly READY replicas: route before applying
        plan, memory = compute_plan(
            self.spec, self.state, now=now, policy_name=self.options.policy, placement=self.placement
        )
        plan = self._finalise(plan)
        self.last_plan = plan
        self.state.policy_memory = memory
        self.state.pending_events = []
        roots = self._dirty_roots(plan)
        report: ApplyReport | None = None
        if roots:
            report = self._act(plan, roots, now)
        else:
            self.save()
        self._started = True
        self._route()
        self.save()
        for source in self.sources:
            source.ack()
        for listener in self._listeners:
            listener(self)
        return self._next_delay(report)

    def _poll(self, now: float) -> list[PreemptionEvent]:
        out: list[PreemptionEvent] = []
        live = self.state.live()
        for source in self.sources:
            try:
                out.extend(source.poll(now, live))
            except SkyhedgeError as exc:  # one broken source must not blind the others
                self.note(f"event source {source.name}: {exc}", now)
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

    def _probe(self, now: float) -> None:
        if self.options.assume_ready or self.prober is None:
            return
        targets = [r for r in self.state.live() if r.endpoint]
        if not targets:
            return
        results = self.prober.probe(targets)
        probes = [ProbeResult(rid, ok, detail) for rid, (ok, detail) in results.items()]
        delay = float(self.spec.readiness_probe.initial_delay_seconds)
        for line in apply_probes(self.state, probes, self.clock(), initial_delay=delay):
            self.note(line)

    def _autoscale(self, now: float) -> None:
        if not self.options.autoscale or not self.scaler.enabled:
            return
        count = self.router.request_count() if self.router is not None else None
        prev = autoscaler.AutoscalerState.from_json(self.state.extra.get("autoscaler"))
        if prev.target is None and self.state.target is not None:
            prev = replace(prev, target=self.state.target)
        new = autoscaler.step(self.scaler, prev, now, count)
        self.state.extra["autoscaler"] = new.to_json()
        if new.target != self.state.target:
            if self.state.target is not None:
                qps = f"{new.qps:.2f}" if new.qps is not None else "?"
                self.note(f"autoscaler: target {self.state.target} -> {new.target} ({qps} req/s)", now)
            self.state.target = new.target

    def _survival(self, now: float) -> None:
        """Report zones whose spot replicas stayed READY through a period (SpotHedge's SURVIVED)."""
        last = self.state.extra.get("survival_at")
        if last is not None and now - float(last) < self.options.survival_period:
            return
        if last is not None:
            seen = set()
            for rec in self.state.live():
                fact = rec.fact()
                survived = fact.is_spot and fact.ready and (rec.ready_at or now) <= float(last)
                if survived and rec.location not in seen:
                    seen.add(rec.location)
                    self.state.record_event(ZoneEvent(EventKind.SURVIVED, rec.location, now, rec.id))
        self.state.extra["survival_at"] = now

    def _finalise(self, plan: Plan) -> Plan:
        """Delete draining replicas the policy no longer counts (scale-down victims whose destroy
        was interrupted, warned replicas past their grace); keep warned ones serving."""
        table = warned(self.state)
        out = []
        for r in plan.replicas:
            rec = self.state.replicas.get(r.id)
            if r.action == KEEP and rec is not None and rec.draining and r.id not in table:
                r = replace(r, action=DELETE)
            out.append(r)
        return replace(plan, replicas=tuple(out))

    def _dirty_roots(self, plan: Plan) -> list[Root]:
        applied = self.state.extra.get("applied") or {}
        roots = set(plan.roots()) | {tuple(k.split("/", 1)) for k in applied}  # type: ignore[misc]
        dirty = []
        for root in sorted(roots):
            changed = any(r.root == root for r in plan.changes)
            if (
                changed
                or not self._started
                or applied.get(root_key(root)) != root_digest(self.spec_hash, plan, root)
            ):
                dirty.append(root)
        return dirty

    # -- acting ----------------------------------------------------------------------------------

    def _act(self, plan: Plan, roots: list[Root], now: float) -> ApplyReport:
        st = self.state
        creates = [r for r in plan.replicas if r.action == CREATE]
        deletes = [r for r in plan.replicas if r.action == DELETE]
        for r in creates:
            st.replicas[r.id] = ReplicaRecord(
                id=r.id,
                cloud=r.location.cloud,
                region=r.location.region,
                zone=r.location.zone,
                market=r.market.value,
                launched_at=now,
                instance_type=self.placement.instance_types.get(r.location.cloud),
            )
        for r in deletes:
            st.replicas[r.id].draining = True
        st.next_id = max(st.next_id, plan.next_id)
        if creates or deletes:
            s = plan.summary()
            text = (
                f"plan: +{len(creates)} -{len(deletes)} -> {s['spot']} spot / {s['on_demand']} on-demand "
                f"in {s['zones_used']} zones, ${s['hourly_cost']:.4f}/h"
            )
            where = ", ".join(f"+{r.id} {r.location.zone} {r.market.value}" for r in creates)
            self.note(f"{text}{' (' + where + ')' if where else ''}", now)
            st.log(
                {
                    "at": now,
                    "event": "plan",
                    "create": [r.id for r in creates],
                    "delete": [r.id for r in deletes],
                    "hourly_cost": s["hourly_cost"],
                }
            )
        self.save()  # the intent is durable before anything changes outside
        routed_ids = {pair[0] for pair in st.extra.get("routed") or []}
        if (
            self.router is not None
            and not self.options.assume_ready
            and any(r.id in routed_ids for r in deletes)
        ):
            self._route(drain=True)  # drain before destroy: removed replicas leave the router first
        try:
            report = self.executor.apply(plan, roots, list(st.replicas.values()))
        except SkyhedgeError as exc:
            report = ApplyReport(present={}, failed={root_key(r): str(exc) for r in roots})
        self._record(plan, roots, report)
        return report

    def _record(self, plan: Plan, roots: list[Root], report: ApplyReport) -> None:
        st = self.state
        now = self.clock()
        keys = {root_key(r) for r in roots}
        applied = st.extra.setdefault("applied", {})
        for key in keys:
            if key in report.applied and key not in report.failed:
                cloud, region = key.split("/", 1)
                applied[key] = root_digest(self.spec_hash, plan, (cloud, region))
            else:
                applied.pop(key, None)
        for rid, p in report.present.items():
            rec = st.replicas.get(rid)
            if rec is None or rec.gone_at is not None:
                continue
            rec.endpoint = p.endpoint or rec.endpoint
            rec.cloud_id = p.cloud_id or rec.cloud_id
            if p.outputs:
                rec.outputs = dict(p.outputs)
            if rec.provisioned_at is None:
                rec.provisioned_at = now
                if Market(rec.market) is Market.SPOT:
                    st.record_event(ZoneEvent(EventKind.LAUNCHED, rec.location, now, rec.id))
            if self.options.assume_ready and rec.ready_at is None:
                rec.ready_at = now
        for r in plan.replicas:
            rec = st.replicas.get(r.id)
            if rec is None or rec.gone_at is not None or root_key(r.root) not in keys:
                continue
            failed_root = root_key(r.root) in report.failed
            if r.action == DELETE and r.id not in report.present and not failed_root:
                mark_gone(st, rec, now, "terminated", "destroyed by plan")
            elif r.id in report.capacity and r.id not in report.present and rec.provisioned_at is None:
                mark_gone(st, rec, now, "failed", "launch refused (capacity)")
                st.record_event(ZoneEvent(EventKind.LAUNCH_FAILED, rec.location, now, rec.id))
                self.note(f"launch of {r.id} in {rec.zone} refused: zone marked preempted", now)
        if report.failed:
            self._failures += 1
            for key, text in sorted(report.failed.items()):
                first = text.strip().splitlines()[0] if text.strip() else "failed"
                self.note(f"apply {key} failed: {first}", now)
        else:
            self._failures = 0
        self.save()

    def _route(self, force: bool = False, drain: bool = False) -> None:
        if self.router is None or self.options.assume_ready:
            return
        wanted = [[r.id, r.endpoint] for r in routable(self.state)]
        routed = self.state.extra.get("routed")
        if not force and wanted == routed and self.router.running():
            return
        pairs = [(str(rid), str(ep)) for rid, ep in wanted]
        if drain:
            self.router.drain(pairs)
        else:
            self.router.reload(pairs)
        before = {pair[0] for pair in routed or []}
        self.state.extra["routed"] = wanted
        now = self.clock()
        added = sorted({pair[0] for pair in wanted} - before)
        removed = sorted(before - {pair[0] for pair in wanted})
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

    def _next_delay(self, report: ApplyReport | None) -> float:
        opts = self.options
        if self._failures:
            return min(opts.max_backoff, opts.busy_interval * (2 ** min(self._failures, 10)))
        delay = opts.interval
        if any(r.fact().status in BUSY for r in self.state.live()) or warned(self.state):
            delay = opts.busy_interval
        scaler = self.state.extra.get("autoscaler") or {}
        if scaler.get("pending_since") is not None:
            delay = min(delay, max(opts.busy_interval, 1.0))
        return delay

    # -- status for the CLI and the dashboard ----------------------------------------------------

    def replicas(self) -> list[ReplicaRecord]:
        return sorted(self.state.live(), key=lambda r: r.id)
