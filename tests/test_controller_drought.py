"""A spot drought under the watcher (every zone refuses spot launches, on-demand still sells):
on-demand covers the service at once, each zone is asked for spot again after a pause that
doubles while it keeps refusing (30 s to 5 min), and a zone's pause ends at its first spot
launch that succeeds. Over the controller fakes, on a fake clock, passes paced as the watcher
paces them (`woken` False: no wake-up between passes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from controller_fakes import Clock, FakeExecutor, clocked_controller

from skyhedge.controller.loop import SPOT_RETRY_MAX_SECONDS, SPOT_RETRY_SECONDS, Controller
from skyhedge.events import PreemptionEvent, Signal
from skyhedge.planner import CREATE, Plan
from skyhedge.policy.types import ReplicaStatus
from skyhedge.spec import load_spec
from skyhedge.state import ServiceState

#: N = 3 on the default policy (skyhedge), three zones.
SPEC = """
name: svc
placement:
  clouds: [local]
  zones: [local-a, local-b, local-c]
replica_policy: {min_replicas: 3}
readiness_probe: {path: /health, initial_delay_seconds: 600}
run: {command: "true"}
"""
ZONES = {"local-a", "local-b", "local-c"}


class Recording(FakeExecutor):
    """A fake Terraform that also records, per apply that changes anything, when it ran and the
    zones of the spot launches it was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.spot_asks: list[tuple[float, list[str]]] = []

    def apply(self, state: ServiceState, plan: Plan, now: float):  # type: ignore[override]
        if plan.has_changes:
            spot = [r for r in plan.replicas if r.action == CREATE and r.market.value == "spot"]
            self.spot_asks.append((now, [r.location.zone for r in spot]))
        return super().apply(state, plan, now)

    def asked(self, zone: str, since: float = 0.0) -> list[float]:
        return [at for at, zones in self.spot_asks if zone in zones and at >= since]


@pytest.fixture
def drought(tmp_path: Path, write_spec) -> tuple[Controller, Clock, Recording]:
    clock, ex = Clock(), Recording()
    ex.refuse_zones = set(ZONES)
    ctl = clocked_controller(load_spec(write_spec(SPEC)), tmp_path / "state", clock, executor=ex)
    return ctl, clock, ex


def watch(ctl: Controller, clock: Clock, seconds: float) -> None:
    """Passes for `seconds` of the clock, each after the delay the last one asked for."""
    end = clock() + seconds
    while clock() < end:
        delay = ctl.tick()
        ctl.woken = False
        clock.advance(max(0.05, delay))


def ready(ctl: Controller, market: str) -> list[str]:
    return [r.id for r in ctl.state.live() if r.market == market and r.fact().status is ReplicaStatus.READY]


def test_a_spot_drought_is_served_on_demand_at_once_and_each_zone_is_asked_again_ever_less_often(drought):
    """Measured before: every zone refusing for an hour, the reset rule made every zone ACTIVE
    again at once and each apply after the 1 s-to-60 s backoff asked for 4 spot replicas: 64
    applies and 256 refused launches (each a cloud API call and a log line) in the hour."""
    ctl, clock, ex = drought
    start = clock()
    ctl.tick()  # the first apply: on-demand launched beside the refused spot launches
    assert len([r for r in ctl.state.live() if r.market == "on-demand" and r.provisioned_at]) == 3
    watch(ctl, clock, 5)
    assert len(ready(ctl, "on-demand")) == 3  # availability first
    watch(ctl, clock, 3600 - (clock() - start))
    for zone in sorted(ZONES):
        asks = ex.asked(zone)
        gaps = [later - earlier for earlier, later in zip(asks, asks[1:], strict=False)]
        pauses = [min(SPOT_RETRY_MAX_SECONDS, SPOT_RETRY_SECONDS * 2**k) for k in range(len(gaps))]
        # each ask comes when the zone's pause ends (within the busy pace), never sooner
        assert all(p <= g <= p + 2.0 for g, p in zip(gaps, pauses, strict=True)), (zone, gaps)
        assert 10 <= len(asks) <= 20, (zone, len(asks))
    refused = [r for r in ctl.state.replicas.values() if r.reason == "failed" and r.provisioned_at is None]
    assert len(refused) <= 90  # was 256
    assert len(ex.spot_asks) <= 40  # applies that changed anything: was 64
    assert len(ready(ctl, "on-demand")) == 3 and ready(ctl, "spot") == []


def test_spot_is_back_within_the_longest_pause_once_capacity_is_and_the_zones_pause_starts_over(drought):
    ctl, clock, ex = drought
    watch(ctl, clock, 3600)  # the pauses are at their longest
    ex.refuse_zones = set()
    back = clock()
    watch(ctl, clock, SPOT_RETRY_MAX_SECONDS + 10)
    assert len(ready(ctl, "spot")) >= 3
    assert ready(ctl, "on-demand") == []  # the cover released once spot serves
    assert ctl._spot_refused == {}  # a launch that succeeded ends its zone's pause
    # so when a drought comes back, each zone is asked again after the shortest pause
    ex.refuse_zones = set(ZONES)
    source = ctl.sources[0]
    for rec in ctl.state.live():
        if rec.market == "spot":
            source.queue.append(PreemptionEvent(Signal.GONE, clock(), "fake", replica_id=rec.id))
    again = clock()
    watch(ctl, clock, 120)
    zone = min(ZONES, key=lambda z: ex.asked(z, since=again)[:1] or [float("inf")])
    asks = ex.asked(zone, since=again)
    assert len(asks) >= 2 and asks[1] - asks[0] == pytest.approx(SPOT_RETRY_SECONDS, abs=2.0)
    assert back < asks[0]


def test_a_refusal_in_one_zone_leaves_spot_launches_in_the_others_unpaced(drought):
    ctl, clock, ex = drought
    ex.refuse_zones = {"local-a"}
    watch(ctl, clock, 10)
    spot = [r for r in ctl.state.live() if r.market == "spot"]
    assert spot and all(r.zone != "local-a" and r.provisioned_at is not None for r in spot)
    assert len(ex.asked("local-a")) == 1  # asked once, then paused


def test_a_wall_clock_stepped_back_during_a_pause_does_not_stretch_it(drought):
    """The pause is kept in wall-clock time: a clock set back an hour must not leave a zone
    unasked for that hour (on-demand paid all along)."""
    ctl, clock, ex = drought
    watch(ctl, clock, 5)
    assert len(ex.asked("local-a")) == 1
    clock.advance(-3600.0)
    stepped, before = clock(), len(ex.spot_asks)
    watch(ctl, clock, SPOT_RETRY_SECONDS + 5)
    asks = [at for at, zones in ex.spot_asks[before:] if "local-a" in zones]
    assert asks and asks[0] - stepped <= SPOT_RETRY_SECONDS + 2.0
