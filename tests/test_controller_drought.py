"""A spot drought under the watcher (every zone refuses spot launches, on-demand still sells):
on-demand covers the service at once, each zone is asked for spot again after a pause that
doubles while it keeps refusing (30 s to 5 min), and a zone's pause ends at its first spot
launch that succeeds. Over the controller fakes, on a fake clock, passes paced as the watcher
paces them (`woken` False: no wake-up between passes)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from controller_fakes import Clock, FakeExecutor, clocked_controller, run_for

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
    run_for(ctl, clock, 5)
    assert len(ready(ctl, "on-demand")) == 3  # availability first
    run_for(ctl, clock, 3600 - (clock() - start))
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
    run_for(ctl, clock, 3600)  # the pauses are at their longest
    ex.refuse_zones = set()
    back = clock()
    run_for(ctl, clock, SPOT_RETRY_MAX_SECONDS + 10)
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
    run_for(ctl, clock, 120)
    zone = min(ZONES, key=lambda z: ex.asked(z, since=again)[:1] or [float("inf")])
    asks = ex.asked(zone, since=again)
    assert len(asks) >= 2 and asks[1] - asks[0] == pytest.approx(SPOT_RETRY_SECONDS, abs=2.0)
    assert back < asks[0]


def test_a_refusal_in_one_zone_leaves_spot_launches_in_the_others_unpaced(drought):
    ctl, clock, ex = drought
    ex.refuse_zones = {"local-a"}
    run_for(ctl, clock, 10)
    spot = [r for r in ctl.state.live() if r.market == "spot"]
    assert spot and all(r.zone != "local-a" and r.provisioned_at is not None for r in spot)
    assert len(ex.asked("local-a")) == 1  # asked once, then paused


def test_a_wall_clock_stepped_back_during_a_pause_does_not_stretch_it(drought):
    """The pause is kept in wall-clock time: a clock set back an hour must not leave a zone
    unasked for that hour (on-demand paid all along)."""
    ctl, clock, ex = drought
    run_for(ctl, clock, 5)
    assert len(ex.asked("local-a")) == 1
    clock.advance(-3600.0)
    stepped, before = clock(), len(ex.spot_asks)
    run_for(ctl, clock, SPOT_RETRY_SECONDS + 5)
    asks = [at for at, zones in ex.spot_asks[before:] if "local-a" in zones]
    assert asks and asks[0] - stepped <= SPOT_RETRY_SECONDS + 2.0


def _back_after_a_long_drought(ctl: Controller, clock: Clock, ex: Recording, hours: float = 1.0) -> float:
    """A drought of `hours` (the pauses at their longest), then capacity back between two passes:
    seconds from then until the first spot launch that succeeds."""
    end = clock() + 3600 * hours
    while clock() < end + SPOT_RETRY_MAX_SECONDS + 60:
        if clock() >= end:
            ex.refuse_zones = set()
        delay = ctl.tick()
        ctl.woken = False
        if any(r.market == "spot" and r.provisioned_at is not None for r in ctl.state.live()):
            return clock() - end
        clock.advance(max(0.05, delay))
    return float("inf")


@pytest.mark.parametrize(
    "policy",
    [
        "{min_replicas: 3, dynamic_ondemand_fallback: false}",  # SpotHedge's cover switched off
        "{min_replicas: 3, base_ondemand_fallback_replicas: 1, dynamic_ondemand_fallback: false}",
        "{min_replicas: 3, policy: even}",  # a spot-only policy: no cover at all
    ],
)
def test_spot_launches_no_on_demand_covers_are_never_paused(
    tmp_path: Path, write_spec, caplog: pytest.LogCaptureFixture, policy: str
):
    """The pause trades asks for on-demand replica-hours only where on-demand covers the paused
    launches. Without cover, a paused zone was the service's outage: capacity back, the service
    kept fewer than N replicas until the zone's pause ended (up to 5 min, where the apply backoff
    retried within 1 min), and the replicas it still had were all it had."""
    clock, ex = Clock(), Recording()
    ex.refuse_zones = set(ZONES)
    spec = SPEC.replace("replica_policy: {min_replicas: 3}", f"replica_policy: {policy}")
    ctl = clocked_controller(load_spec(write_spec(spec)), tmp_path / "state", clock, executor=ex)
    caplog.set_level(logging.INFO)
    assert _back_after_a_long_drought(ctl, clock, ex) <= ctl.options.max_backoff + 2.0
    # and the log says so: "paused" alone was wrong at every refused apply
    said = [r.getMessage() for r in caplog.records if "spot launches in local-" in r.getMessage()]
    assert said and all("not the ones the service is short of" in line for line in said), said[:2]


def test_a_rolling_update_begun_in_a_drought_is_said_stalled_on_time(drought, write_spec):
    """Its replacements' zones paused, nothing is asked, so nothing was refused: the update was
    said stalled (`state.extra["rollout"]`, `status`) only once a pause ended and a zone refused
    again, 448 s into it here where ROLLOUT_STALL_SECONDS (300 s) was meant."""
    from skyhedge.controller.loop import ROLLOUT_STALL_SECONDS
    from skyhedge.service import resolve_placement
    from skyhedge.state import ROLLOUT_KEY

    ctl, clock, ex = drought
    run_for(ctl, clock, 600)  # every zone paused, the longest pause running
    assert ready(ctl, "on-demand") and ctl._spot_refused
    spec = load_spec(write_spec(SPEC.replace('"true"', '"v2"'), "v2.yaml"))
    parts = {"executor": ex, "router": ctl.router, "prober": ctl.prober, "sources": ctl.sources}
    ctl.reconfigure(spec, placement=resolve_placement(spec), **parts)
    begun = clock()
    run_for(ctl, clock, ROLLOUT_STALL_SECONDS + 10)
    record = ctl.state.extra[ROLLOUT_KEY]
    assert record["stalled_since"] is not None, record
    assert record["stalled_since"] - begun <= ROLLOUT_STALL_SECONDS + 5
    assert set(record["refused"]) <= ZONES and record["refused"]
    assert len(ready(ctl, "on-demand")) >= 3  # serving all along


class NoOnDemand(Recording):
    """A fake Terraform whose on-demand launches are refused too (an on-demand quota used up):
    the cover the policy plans is never bought."""

    def apply(self, state: ServiceState, plan: Plan, now: float):  # type: ignore[override]
        from dataclasses import replace

        from skyhedge.policy.types import EventKind, Market, ZoneEvent

        refused = [r.id for r in plan.replicas if r.action == CREATE and r.market is Market.ON_DEMAND]
        for rid in refused:
            rec = state.replicas[rid]
            rec.gone_at, rec.reason = now, "failed"
            state.record_event(ZoneEvent(EventKind.LAUNCH_FAILED, rec.location, now, rid))
        result = super().apply(
            state, replace(plan, replicas=tuple(r for r in plan.replicas if r.id not in refused)), now
        )
        return replace(result, launch_failures=(*result.launch_failures, *refused))


def test_an_on_demand_cover_refused_too_does_not_let_spot_launches_pause(tmp_path: Path, write_spec):
    """The policy plans its on-demand cover at every pass, but a cover refused (quota) covers
    nothing: capacity back, the first spot launch came only when its zone's pause ended."""
    clock, ex = Clock(), NoOnDemand()
    ex.refuse_zones = set(ZONES)
    ctl = clocked_controller(load_spec(write_spec(SPEC)), tmp_path / "state", clock, executor=ex)
    assert _back_after_a_long_drought(ctl, clock, ex) <= ctl.options.max_backoff + 2.0


def _restarted(ctl: Controller, clock: Clock, ex: Recording) -> Controller:
    """The watcher stopped (its last write: `flush`) and a new one started on the same state dir,
    the fakes' world (what Terraform launched) unchanged."""
    ctl.flush()
    return clocked_controller(ctl.spec, ctl.state_dir, clock, executor=ex, sources=ctl.sources)


def test_a_watcher_restarted_in_a_drought_resumes_each_zones_pause_where_it_was(drought):
    """Kept in memory only, the pauses were forgotten by a restart (an upgrade, a crash, SIGTERM
    and start): every refusing zone was asked again at once, then from 30 s. Measured, three
    zones refusing for 10 to 63 min: 16 refused spot launches in the 5 minutes after a restart;
    now 4, none before its zone's pause ends."""
    ctl, clock, ex = drought
    run_for(ctl, clock, 3600)  # every zone's pause at its longest
    last = {zone: ex.asked(zone)[-1] for zone in ZONES}
    kept = dict(ctl._spot_refused)
    assert kept and all(n >= 5 for n, _ in kept.values())
    restart = clock()
    ctl = _restarted(ctl, clock, ex)
    assert ctl._spot_refused == kept
    run_for(ctl, clock, 300)
    asked = [(at, zone) for at, zones in ex.spot_asks if at >= restart for zone in zones]
    assert len(asked) <= 6, asked  # was 16
    for at, zone in asked:  # each zone waits out its pause, counted from its last refusal
        assert at >= last[zone] + SPOT_RETRY_MAX_SECONDS - 1.0, (zone, at - last[zone])
    assert len(ready(ctl, "on-demand")) == 3  # served all along


def test_a_kept_pause_stamped_far_ahead_of_the_clock_waits_no_longer_than_the_longest_pause(
    drought, tmp_path: Path
):
    """A state restored from another host, or a clock set back while no watcher ran: a pause that
    would end in a year is bounded by `max_spot_retry` from now."""
    from skyhedge.controller.loop import SPOT_PAUSES_KEY
    from skyhedge.state import save_state

    ctl, clock, ex = drought
    run_for(ctl, clock, 5)
    ctl.flush()
    future = clock() + 365 * 86400.0
    ctl.state.extra[SPOT_PAUSES_KEY] = {
        f"local/local/{zone}": {"refusals": 50, "at": future} for zone in sorted(ZONES)
    }
    save_state(ctl.state_dir, ctl.state)
    restart = clock()
    ctl = clocked_controller(ctl.spec, ctl.state_dir, clock, executor=ex, sources=ctl.sources)
    run_for(ctl, clock, SPOT_RETRY_MAX_SECONDS + 10)
    for zone in sorted(ZONES):
        asks = ex.asked(zone, since=restart)
        assert asks and asks[0] - restart <= SPOT_RETRY_MAX_SECONDS + 2.0, (zone, asks)


@pytest.mark.parametrize(
    "table",
    [
        "not a table",
        {"local/local/local-a": "soon"},
        {"local/local/local-a": {"refusals": 0, "at": 1.0}},
        {"local/local/local-a": {"refusals": True, "at": 1.0}},
        {"local/local/local-a": {"refusals": 2, "at": "noon"}},
        {"local-a": {"refusals": 2, "at": 1.0}},
        {"local/local/local-a": {"refusals": 2, "at": 10**400}},
    ],
)
def test_a_broken_kept_pause_is_ignored_with_one_warning_line(
    tmp_path: Path, write_spec, caplog: pytest.LogCaptureFixture, table
):
    """A hand edit must not stop the watcher: its zone is asked at once, as before pauses were kept."""
    from skyhedge.controller.loop import SPOT_PAUSES_KEY
    from skyhedge.state import load_state, save_state

    state_dir = tmp_path / "state"
    clock = Clock()
    good = {"local/local/local-b": {"refusals": 3, "at": clock()}}
    state = load_state(state_dir, "svc")
    state.extra[SPOT_PAUSES_KEY] = table if not isinstance(table, dict) else {**table, **good}
    save_state(state_dir, state)
    caplog.set_level(logging.INFO)
    ctl = clocked_controller(load_spec(write_spec(SPEC)), state_dir, clock, executor=Recording())
    said = [r.getMessage() for r in caplog.records if SPOT_PAUSES_KEY in r.getMessage()]
    assert len(said) == 1 and f"state.json: extra.{SPOT_PAUSES_KEY}" in said[0] and "expected" in said[0], (
        said
    )
    assert "\n" not in said[0]
    kept = {loc.zone for loc in ctl._spot_refused}
    assert kept == (set() if not isinstance(table, dict) else {"local-b"})
    ctl.tick()  # and the watcher runs on


def test_a_reload_or_restart_without_a_paused_zone_forgets_its_pause(
    drought, write_spec, caplog: pytest.LogCaptureFixture
):
    """No spot launch is asked in a zone the spec dropped, so none succeeds there to end its pause:
    before, its entry outlived the reload and every restart (`state.json`, for good), and the zone
    put back in the spec later began at the old drought's refusal count."""
    from controller_fakes import reconfigured

    from skyhedge.controller.loop import SPOT_PAUSES_KEY

    caplog.set_level(logging.INFO)
    ctl, clock, ex = drought
    run_for(ctl, clock, 120)
    assert {loc.zone for loc in ctl._spot_refused} == ZONES
    reconfigured(ctl, load_spec(write_spec(SPEC.replace("local-a, local-b, local-c", "local-a, local-b"))))
    assert {loc.zone for loc in ctl._spot_refused} == {"local-a", "local-b"}
    assert set(ctl.state.extra[SPOT_PAUSES_KEY]) == {"local/local/local-a", "local/local/local-b"}
    lines = [r.getMessage() for r in caplog.records if "no longer followed" in r.getMessage()]
    assert len(lines) == 1 and "local/local/local-c" in lines[0], lines
    assert "no longer places spot" in lines[0], lines
    run_for(ctl, clock, 10)
    ctl.flush()
    # a watcher restarted under a spec that dropped another zone while none ran
    caplog.clear()
    spec = load_spec(write_spec(SPEC.replace("local-a, local-b, local-c", "local-a, local-c")))
    ctl = clocked_controller(spec, ctl.state_dir, clock, executor=ex, sources=ctl.sources)
    assert {loc.zone for loc in ctl._spot_refused} == {"local-a"}
    assert set(ctl.state.extra[SPOT_PAUSES_KEY]) == {"local/local/local-a"}
    said = [r.getMessage() for r in caplog.records if "no longer followed" in r.getMessage()]
    assert len(said) == 1 and "local/local/local-b" in said[0], said


def test_a_kept_pause_of_a_zone_where_spot_was_launched_since_is_over_at_a_restart(drought, caplog):
    """A spot launch that succeeds ends its zone's run of refusals. The watcher's own ends its
    pause; one it did not make (an `apply` while no watcher ran, or a release before pauses were
    kept, downgraded to and upgraded from again, which never dropped them) left the pause in the
    state: the restarted watcher held that zone's spot launches while it sold them, and its next
    refusal there paused it from the old drought's count (measured, a0a4e01 downgraded to:
    "paused 120s after 3 refusal(s) in a row", not 30 s after 1)."""
    from skyhedge.controller.loop import SPOT_PAUSES_KEY
    from skyhedge.state import ReplicaRecord, load_state, save_state

    ctl, clock, ex = drought
    run_for(ctl, clock, 200)
    ctl.flush()
    kept = {loc.zone: entry for loc, entry in ctl._spot_refused.items()}
    assert set(kept) == ZONES and all(n >= 2 for n, _ in kept.values()), kept
    # while no watcher runs, local-b sells spot again and something else launches a replica there
    clock.advance(60)
    ex.refuse_zones.discard("local-b")
    state = load_state(ctl.state_dir, "svc")
    rid = "r-9000"
    state.replicas[rid] = ReplicaRecord(
        id=rid,
        cloud="local",
        region="local",
        zone="local-b",
        market="spot",
        launched_at=clock(),
        provisioned_at=clock(),
        endpoint="http://127.0.0.1:29000",
        cloud_id=f"id-{rid}",
    )
    ex.tf.setdefault("local/local", {})[rid] = "local-b"
    save_state(ctl.state_dir, state)

    caplog.set_level(logging.INFO)
    ctl = clocked_controller(ctl.spec, ctl.state_dir, clock, executor=ex, sources=ctl.sources)
    assert {loc.zone: entry for loc, entry in ctl._spot_refused.items()} == {
        z: kept[z] for z in ("local-a", "local-c")
    }
    said = [r.getMessage() for r in caplog.records if "local/local/local-b" in r.getMessage()]
    assert len(said) == 1 and "over" in said[0], said
    assert sorted(ctl.state.extra[SPOT_PAUSES_KEY]) == ["local/local/local-a", "local/local/local-c"]


def test_a_kept_pause_refused_after_the_zones_last_spot_launch_is_kept(drought):
    """The spot replicas a zone ran before its refusals began do not end its pause."""
    ctl, clock, ex = drought
    ex.refuse_zones = set()
    run_for(ctl, clock, 30)  # spot replicas launched in the zones
    assert ready(ctl, "spot")
    ex.refuse_zones = set(ZONES)
    for rec in ctl.state.live():  # a drought preempts them all
        if rec.market == "spot":
            ctl.sources[0].queue.append(PreemptionEvent(Signal.GONE, clock(), "fake", replica_id=rec.id))
    run_for(ctl, clock, 200)
    kept = dict(ctl._spot_refused)
    assert {loc.zone for loc in kept} == ZONES
    ctl = _restarted(ctl, clock, ex)
    assert ctl._spot_refused == kept
