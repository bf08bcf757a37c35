"""Fakes for the controller's seams (Terraform executor, router, prober, event source, clock).

Each records its calls and can be told to fail, so tests assert what the controller asked for.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from skyhedge.clouds import QuotaRefusal, quota_refusal
from skyhedge.controller.loop import Controller, ControllerOptions
from skyhedge.controller.ports import ExecResult, root_key
from skyhedge.errors import RoutingError
from skyhedge.events import EventSource, PreemptionEvent
from skyhedge.planner import DELETE, Plan
from skyhedge.policy.types import EventKind, ZoneEvent
from skyhedge.spec import ServiceSpec
from skyhedge.state import ReplicaRecord, ServiceState


def _free_router_port() -> int:
    """A port free now, below Linux's ephemeral range (no client socket is handed it later) and
    away from local replicas' ports (18000 + N): the suite must pass while a developer's own
    service holds the default 8080. Each pytest-xdist worker (gw0, gw1, ...) looks in its own
    series (24080, 24181, ... for gw0; 24081, 24182, ... for gw1): workers import this at the
    same moment, and one series for all would hand every worker the same port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    offset = int(worker) % 101 if worker.isdigit() else 0
    for port in range(24080 + offset, 32000, 101):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 24080-32000 for the tests' router")


#: The router port of LOCAL_SPEC (the spec's `service.port`).
ROUTER_PORT = _free_router_port()

#: A local-cloud service of one replica, for tests of the watcher around the loop.
LOCAL_SPEC = f"""\
name: svc
placement:
  clouds: [local]
  zones: [local-a, local-b]
replica_policy: {{min_replicas: 1, policy: spothedge}}
service: {{port: {ROUTER_PORT}}}
run: {{command: "true"}}
"""


#: Two AWS zones (one root, aws/us-east-1) and two local ones (root local/local), four spot
#: replicas: the outage and metrics tests' service, one of whose clouds goes away.
TWO_ROOT_SPEC = """
name: svc
resources: {instance_type: {aws: g5.xlarge}}
placement: {clouds: [aws, local], regions: [us-east-1, local], zones: [use1-az1, use1-az2, local-a, local-b]}
replica_policy: {min_replicas: 4, num_overprovision: 0, policy: spothedge}
run: {command: serve}
"""

#: Two AWS regions of three zones each, N = 3, the replica policy's other keys filled in with
#: `%`; us-west-2 is the cheaper (the policies go there first): the quota tests' service.
TWO_REGION_SPEC = """
name: svc
placement:
  clouds: [aws]
  zones: [use1-az1, use1-az2, use1-az4, usw2-az1, usw2-az2, usw2-az3]
resources: {instance_type: {aws: g5.xlarge}}
replica_policy: {min_replicas: 3%s}
run: {command: "true"}
"""


#: Three local zones, 2 replicas and SpotHedge's extra one, a probe with a 30 s initial delay:
#: the metrics and restart tests' service.
THREE_ZONE_SPEC = """
name: svc
placement:
  clouds: [local]
  zones: [local-a, local-b, local-c]
replica_policy: {min_replicas: 2, num_overprovision: 1, policy: spothedge}
readiness_probe: {path: /health, initial_delay_seconds: 30}
run: {command: "true"}
"""


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


#: The clouds' own words for a launch over quota (terraform-provider-aws's RunInstances error;
#: terraform-provider-google's insert operation error), by (cloud, market).
QUOTA_ERRORS = {
    ("aws", "spot"): "creating EC2 Instance: operation error EC2: RunInstances, https response error "
    "StatusCode: 400, RequestID: 0, api error MaxSpotInstanceCountExceeded: Max spot instance count exceeded",
    ("aws", "on-demand"): "creating EC2 Instance: operation error EC2: RunInstances, https response error "
    "StatusCode: 400, RequestID: 0, api error VcpuLimitExceeded: You have requested more vCPU capacity than "
    "your current vCPU limit of 0 allows for the instance bucket that the specified instance type "
    "belongs to.",
    ("gcp", "spot"): "Error waiting for instance to create: Quota 'PREEMPTIBLE_NVIDIA_L4_GPUS' exceeded. "
    "Limit: 0.0 in region us-central1.",
    ("gcp", "on-demand"): "Error waiting for instance to create: Quota 'NVIDIA_L4_GPUS' exceeded. "
    "Limit: 0.0 in region us-central1.",
}


class FakeExecutor:
    """A fake Terraform: keeps {root_key: {replica_id: zone}} and records outcomes like the real one."""

    def __init__(self) -> None:
        self.tf: dict[str, dict[str, str]] = {}
        self.calls: list[list[str]] = []  # desired IDs per call
        self.refuse_zones: set[str] = set()
        self.fail_next: str | None = None
        self.broken: str | None = None  # every apply fails with this error until cleared
        # every apply fails with this error, naming no replica (Terraform's state lock held), until cleared
        self.root_broken: str | None = None
        self.crash_next = False
        # (region, market) -> how many replicas of that market the account's quota lets run in
        # the region (0: none): launches past it are refused with `QUOTA_ERRORS`' words for the
        # cloud and market, read by the cloud's `quota.py` as the real executor reads them
        self.quota: dict[tuple[str, str], int] = {}

    def _over_quota(self, state: ServiceState, r: Any, taken: dict[tuple[str, str], int]) -> bool:
        """Whether launching `r` passes its region's quota; `taken` counts, per (region, market),
        the replicas running when this apply began and those it launched."""
        key = (r.location.region, r.market.value)
        if key not in self.quota:
            return False
        if key not in taken:
            taken[key] = sum(
                1
                for rec in state.live()
                if (rec.region, rec.market) == key and rec.provisioned_at is not None
            )
        if taken[key] >= self.quota[key]:
            return True
        taken[key] += 1
        return False

    def apply(self, state: ServiceState, plan: Plan, now: float) -> ExecResult:
        self.calls.append(sorted(r.id for r in plan.desired))
        if self.broken:
            return ExecResult(errors=(self.broken,))
        if self.root_broken:
            return ExecResult(errors=(self.root_broken,), failed_replicas=())
        if self.crash_next:
            self.crash_next = False
            raise KeyboardInterrupt("simulated kill mid-apply")
        if self.fail_next:
            text, self.fail_next = self.fail_next, None
            return ExecResult(errors=(text,))
        refused: list[str] = []
        quota: list[tuple[str, QuotaRefusal]] = []
        planned: dict[tuple[str, str], int] = {}
        applied = set()
        for r in plan.replicas:
            key = root_key(r.root)
            applied.add(key)
            tf = self.tf.setdefault(key, {})
            rec = state.replicas[r.id]
            if r.action == DELETE:
                tf.pop(r.id, None)
                if rec.gone_at is None:
                    rec.gone_at, rec.reason, rec.draining = now, "terminated", False
                continue
            if r.id in tf:
                continue
            over = self._over_quota(state, r, planned)
            if over:
                text = QUOTA_ERRORS[(r.location.cloud, r.market.value)]
                found = quota_refusal(
                    r.location.cloud,
                    text,
                    region=r.location.region,
                    market=r.market.value,
                    instance_type=rec.instance_type,
                )
                assert found is not None, text
                quota.append((r.id, found))
            if over or (r.location.zone in self.refuse_zones and r.market.value == "spot"):
                refused.append(r.id)
                rec.gone_at, rec.reason = now, "failed"
                state.record_event(ZoneEvent(EventKind.LAUNCH_FAILED, rec.location, now, r.id))
                continue
            tf[r.id] = r.location.zone
            rec.endpoint = f"http://127.0.0.1:{20000 + int(r.id.split('-')[1])}"
            rec.cloud_id = f"id-{r.id}"
            rec.provisioned_at = now
        for tf in self.tf.values():  # replicas gone without a plan (preempted): Terraform drops them
            for rid in list(tf):
                if state.replicas[rid].gone_at is not None:
                    del tf[rid]
        return ExecResult(
            applied=tuple(sorted(applied)), launch_failures=tuple(refused), quota_refusals=tuple(quota)
        )

    def ids(self) -> set[str]:
        return {rid for root in self.tf.values() for rid in root}


#: How long one Terraform run against an endpoint refusing connections took (measured: 27.5 s)
REFUSED_RUN = 27.5


class DeadCloud(FakeExecutor):
    """A fake Terraform whose roots in `dead` fail naming no replica (the provider cannot even be
    configured), each such run costing `run_seconds` of the clock, as the real executor reports
    (`failed_roots`); the other roots apply as FakeExecutor does (its quotas and refusing zones
    included), in the same call. Honours `hold`."""

    def __init__(self, clock: Clock, run_seconds: float = REFUSED_RUN) -> None:
        super().__init__()
        self.clock, self.run_seconds = clock, run_seconds
        self.dead: dict[str, str] = {}
        self.dead_runs: list[float] = []  # when a dead root was run

    def apply(self, state: ServiceState, plan: Plan, now: float, *, hold: frozenset[str] = frozenset()):  # type: ignore[override]
        roots = {root_key(r.root) for r in plan.replicas} - hold
        dead = sorted(k for k in self.dead if k in roots)
        if dead:
            self.dead_runs.append(self.clock.now)
            self.clock.advance(self.run_seconds)
        alive = tuple(
            r for r in plan.replicas if root_key(r.root) not in self.dead and root_key(r.root) not in hold
        )
        result = super().apply(state, replace(plan, replicas=alive), now)
        if not dead:
            return result
        return ExecResult(
            applied=tuple(sorted({*result.applied, *dead})),
            errors=tuple(f"{k}: {self.dead[k]}" for k in dead),
            launch_failures=result.launch_failures,
            quota_refusals=result.quota_refusals,
            failed_replicas=(),
            failed_roots=tuple(dead),
            root_seconds=tuple((k, self.run_seconds) for k in dead),
        )


class FakeRouter:
    def __init__(self) -> None:
        self.reloads: list[list[str]] = []
        self.drains = 0
        self.count: int | None = 0
        self.fail_next = False
        self.unwritable = 0  # reloads left that fail with an OSError (router files not writable)
        self.dead = False  # nginx killed from outside

    def reload(self, upstreams: Sequence[tuple[str, str]]) -> dict:
        if self.fail_next:
            self.fail_next = False
            raise RoutingError("nginx refused the new configuration", stderr="nginx: [emerg] bad")
        if self.unwritable:
            self.unwritable -= 1
            raise PermissionError(13, "Permission denied", "router/conf/.nginx.conf.candidate.tmp")
        self.dead = False
        self.reloads.append([rid for rid, _ in upstreams])
        return {"endpoint": "http://127.0.0.1:8080", "upstreams": [{"id": rid} for rid, _ in upstreams]}

    def drain(self, upstreams: Sequence[tuple[str, str]]) -> dict:
        self.drains += 1
        return self.reload(upstreams)

    def running(self) -> bool:
        return bool(self.reloads) and not self.dead

    def request_count(self) -> int | None:
        return self.count

    @property
    def current(self) -> list[str]:
        return self.reloads[-1] if self.reloads else []


class FakeProber:
    def __init__(self) -> None:
        self.down: set[str] = set()
        self.calls = 0

    def probe(self, records: Sequence[ReplicaRecord]) -> dict[str, tuple[bool, str]]:
        self.calls += 1
        return {r.id: (r.id not in self.down, "down" if r.id in self.down else "200") for r in records}


class NewProbe(FakeProber):
    """A probe no replica passes (a new version's the old replicas fail, or a typo); records whom
    it probed."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def probe(self, records: Sequence[ReplicaRecord]) -> dict[str, tuple[bool, str]]:
        self.seen |= {r.id for r in records}
        return {r.id: (False, "HTTP 404") for r in records}


class FakeSource(EventSource):
    name = "fake"

    def __init__(self) -> None:
        self.queue: list[PreemptionEvent] = []
        self.acked = 0
        self.polls = 0

    def poll(self, now: float, live: Sequence[ReplicaRecord]) -> list[PreemptionEvent]:
        self.polls += 1
        out, self.queue = self.queue, []
        return out

    def ack(self) -> None:
        self.acked += 1


def fake_controller(spec: ServiceSpec, state_dir: Path, **options: object) -> Controller:
    """A controller of `spec` over all the fakes (one FakeSource; a Clock at 1000)."""
    return Controller(
        spec,
        state_dir,
        executor=FakeExecutor(),
        router=FakeRouter(),
        prober=FakeProber(),
        sources=[FakeSource()],
        clock=Clock(),
        options=ControllerOptions(**options),  # type: ignore[arg-type]
    )


def clocked_controller(spec: ServiceSpec, state_dir: Path, clock: Clock, **parts: Any) -> Controller:
    """A controller of `spec` on `clock` over the fakes, any of them (`executor`, `router`,
    `prober`, `sources`) or other Controller arguments replaced by `parts`."""
    parts = {"executor": FakeExecutor(), "router": FakeRouter(), "prober": FakeProber(), **parts}
    return Controller(spec, state_dir, sources=parts.pop("sources", [FakeSource()]), clock=clock, **parts)


def run_ticks(ctl: Controller, clock: Clock, ticks: int, step: float = 1.0) -> None:
    """`ticks` passes of `ctl`, `step` seconds of `clock` apart."""
    for _ in range(ticks):
        ctl.tick()
        clock.advance(step)


def run_for(ctl: Controller, clock: Clock, seconds: float) -> None:
    """Passes for `seconds` of the clock, each after the delay the last one asked for (as the
    watcher sleeps between passes)."""
    end = clock() + seconds
    while clock() < end:
        delay = ctl.tick()
        ctl.woken = False
        clock.advance(max(0.05, delay))


def reconfigured(ctl: Controller, spec: ServiceSpec) -> None:
    """The watcher's reload of an edited spec: its placement resolved anew, the same parts."""
    from skyhedge.service import resolve_placement

    ctl.reconfigure(
        spec,
        placement=resolve_placement(spec),
        executor=ctl.executor,
        router=ctl.router,
        prober=ctl.prober,
        sources=ctl.sources,
    )


def edit_spec(path: Path, old: str, new: str) -> None:
    """Edit a running watcher's spec file in place and date it a moment ago, past the watcher's
    SPEC_SETTLE_SECONDS (the edit is done: the next pass reads it, not the one after)."""
    from skyhedge.controller.runner import SPEC_SETTLE_SECONDS

    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    done = time.time() - 2 * SPEC_SETTLE_SECONDS
    os.utime(path, (done, done))
