"""The reconcile tick against fakes: preemption -> replacement elsewhere, drain before destroy,
launch failures -> zone marked preempted with backoff, restart after a crash mid-apply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from controller_fakes import (
    Clock,
    FakeExecutor,
    FakeProber,
    FakeRouter,
    FakeSource,
    clocked_controller,
    reconfigured,
)

from skyhedge.controller.facts import WARNING_GRACE_SECONDS
from skyhedge.controller.loop import Controller, ControllerOptions
from skyhedge.events import PreemptionEvent, Signal
from skyhedge.policy.types import TRANSITIONS, Location, ReplicaStatus
from skyhedge.spec import load_spec, replica_revision
from skyhedge.state import load_state

SPEC = """
name: svc
placement:
  clouds: [local]
  zones: [local-a, local-b, local-c]
replica_policy:
  min_replicas: 2
  max_replicas: 4
  target_qps_per_replica: 10
  num_overprovision: 1
  upscale_delay_seconds: 5
  downscale_delay_seconds: 10
  policy: spothedge
readiness_probe:
  path: /health
  initial_delay_seconds: 30
run:
  command: "true"
"""


@pytest.fixture
def world(tmp_path: Path, write_spec):
    spec = load_spec(write_spec(SPEC))
    clock = Clock()
    parts = {
        "spec": spec,
        "dir": tmp_path / "state",
        "clock": clock,
        "executor": FakeExecutor(),
        "router": FakeRouter(),
        "prober": FakeProber(),
        "source": FakeSource(),
    }
    return parts


def preempt(src, clock, victim) -> None:
    """The fake cloud reports `victim` preempted (gone) now."""
    src.queue.append(PreemptionEvent(Signal.GONE, clock(), "fake", replica_id=victim.id, reason="preempted"))


def make(world, monotonic: Clock | None = None, **opts) -> Controller:
    return Controller(
        world["spec"],
        world["dir"],
        executor=world["executor"],
        router=world["router"],
        prober=world["prober"],
        sources=[world["source"]],
        clock=world["clock"],
        options=ControllerOptions(**opts),
        monotonic=monotonic,
    )


def zones(ctl: Controller) -> dict[str, str]:
    return {r.id: r.zone for r in ctl.state.live()}


def settle(ctl: Controller, clock: Clock, ticks: int = 3) -> None:
    for _ in range(ticks):
        ctl.tick()
        clock.advance(1)


def test_first_ticks_launch_spread_and_route(world):
    ctl = make(world)
    settle(ctl, world["clock"])
    live = ctl.state.live()
    assert len(live) == 3  # 2 + 1 overprovision
    assert len({r.zone for r in live}) == 3
    assert all(r.fact().status is ReplicaStatus.READY for r in live)
    assert sorted(world["router"].current) == sorted(r.id for r in live)
    assert world["executor"].ids() == {r.id for r in live}


def test_preemption_is_replaced_in_another_zone_and_routing_follows(world):
    ctl, clock, src = make(world), world["clock"], world["source"]
    settle(ctl, clock)
    victim = next(r for r in ctl.state.live() if r.zone == "local-a")
    preempt(src, clock, victim)
    ctl.tick()
    assert victim.id not in zones(ctl)
    assert victim.id not in world["router"].current
    new = [r for r in ctl.state.live() if r.launched_at == clock()]
    spot = [r for r in new if r.market == "spot"]
    assert len(spot) == 1 and spot[0].zone != "local-a"
    # SpotHedge's dynamic fallback covers the missing READY spot replica with an on-demand one
    assert [r.market for r in new if r not in spot] in ([], ["on-demand"])
    assert victim.id not in world["executor"].ids()
    clock.advance(1)
    ctl.tick()
    assert spot[0].id in world["router"].current
    settle(ctl, clock)
    assert sorted(r.market for r in ctl.state.live()) == ["spot"] * 3  # fallback gone again
    assert load_state(world["dir"], "svc").replicas[victim.id].reason == "preempted"
    assert src.acked >= 2


def test_a_preemption_reloads_the_router_twice_and_never_routes_the_on_demand_cover(world):
    """Every nginx reload costs a request per kept-alive connection a client reuses blindly
    (docs/routing.md). The replica gone leaves the router in the pass that hears of it; the pass
    that finds its replacement READY routes it in the same reload that would release SpotHedge's
    on-demand cover, READY in that pass too: the cover, never routed, goes without a reload.
    (It took three: +spot +cover, then -cover, a pass after the removal.)"""
    ctl, clock, src, router = make(world), world["clock"], world["source"], world["router"]
    settle(ctl, clock)
    victim = next(r for r in ctl.state.live() if r.zone == "local-a")
    survivors = sorted(r.id for r in ctl.state.live() if r is not victim)
    before = len(router.reloads)
    preempt(src, clock, victim)
    ctl.tick()
    assert router.reloads[before:] == [survivors]  # gone: out at once
    new = {r.market: r.id for r in ctl.state.live() if r.launched_at == clock()}
    assert set(new) == {"spot", "on-demand"}
    clock.advance(1)
    ctl.tick()
    assert router.reloads[before + 1 :] == [sorted([*survivors, new["spot"]])]
    assert new["on-demand"] not in {r.id for r in ctl.state.live()}  # released, destroyed
    settle(ctl, clock)
    assert len(router.reloads) - before == 2
    assert all(new["on-demand"] not in upstreams for upstreams in router.reloads)


def test_at_start_up_the_first_ready_replicas_are_routed_in_one_reload_without_their_covers(world):
    """From nothing, SpotHedge launches on-demand covers with the spot replicas; all get READY in
    the same pass. The first routing waits for that pass's plan (milliseconds, before any
    apply), so the spot replicas are routed in one reload and the covers, released by that plan,
    never are: it took two reloads (+spot +covers, then -covers) and a drain of the covers."""
    ctl, clock, router = make(world), world["clock"], world["router"]
    settle(ctl, clock)
    live = ctl.state.live()
    assert sorted(r.market for r in live) == ["spot"] * 3
    assert [upstreams for upstreams in router.reloads if upstreams] == [sorted(r.id for r in live)]
    assert router.drains == 0
    assert "drain" not in ctl.state.extra


def _without_cover(world, write_spec) -> None:
    """The world's spec with no on-demand cover: a replica failing a probe launches nothing."""
    text = SPEC.replace("  policy: spothedge\n", "  policy: spothedge\n  dynamic_ondemand_fallback: false\n")
    world["spec"] = load_spec(write_spec(text, "no-cover.yaml"))


def test_a_replica_gone_leaves_the_router_in_the_same_reload_as_one_newly_ready(world, write_spec):
    """Only additions wait for the pass's plan: a pass that finds one replica gone and another
    READY again reloads once, before its apply, with both changes."""
    _without_cover(world, write_spec)
    ctl, clock, src, router = make(world), world["clock"], world["source"], world["router"]
    settle(ctl, clock)
    sick, victim, other = sorted(ctl.state.live(), key=lambda r: r.id)
    world["prober"].down.add(sick.id)
    ctl.tick()
    clock.advance(1)
    assert router.current == sorted([victim.id, other.id])  # NOT_READY: out
    world["prober"].down.clear()  # READY again, and another one preempted in the same pass
    preempt(src, clock, victim)
    before = len(router.reloads)
    order: list[int] = []
    real_apply = world["executor"].apply
    world["executor"].apply = lambda *a: (order.append(len(router.reloads)), real_apply(*a))[1]
    ctl.tick()
    assert router.reloads[before:] == [sorted([sick.id, other.id])]
    assert order == [before + 1]  # (the replacement's launch) routed before the apply


def test_a_replica_ready_again_is_routed_in_its_pass_when_the_plan_changes_nothing(world, write_spec):
    _without_cover(world, write_spec)
    ctl, clock, router = make(world), world["clock"], world["router"]
    settle(ctl, clock)
    sick = sorted(ctl.state.live(), key=lambda r: r.id)[0]
    world["prober"].down.add(sick.id)
    ctl.tick()
    clock.advance(1)
    assert sick.id not in router.current
    world["prober"].down.clear()
    before = len(router.reloads)
    ctl.tick()
    assert ctl.last_plan is not None and not ctl.last_plan.has_changes
    assert router.reloads[before:] == [sorted(r.id for r in ctl.state.live())]


def test_interruption_warning_replaces_first_and_keeps_serving(world):
    ctl, clock, src = make(world), world["clock"], world["source"]
    settle(ctl, clock)
    victim = next(r for r in ctl.state.live() if r.zone == "local-b")
    src.queue.append(PreemptionEvent(Signal.WARNING, clock(), "fake", cloud_id=f"id-{victim.id}"))
    ctl.tick()
    assert victim.fact().status is ReplicaStatus.SHUTTING_DOWN
    assert victim.id in world["router"].current  # still serving during its 2 minutes
    assert victim.id in world["executor"].ids()  # not destroyed by us
    new_spot = [r for r in ctl.state.live() if r.launched_at == clock() and r.market == "spot"]
    assert len(new_spot) == 1 and new_spot[0].zone != "local-b"  # the replacement is already launching
    clock.advance(1)
    ctl.tick()
    src.queue.append(PreemptionEvent(Signal.GONE, clock(), "fake", cloud_id=f"id-{victim.id}", reason=""))
    ctl.tick()
    assert victim.gone_at is not None and victim.reason == "terminated"
    assert victim.id not in world["router"].current
    settle(ctl, clock)
    assert sorted(r.market for r in ctl.state.live()) == ["spot"] * 3


@pytest.mark.parametrize("ahead", [0.0, 5 * 365 * 86400.0], ids=["on-time", "dated-years-ahead"])
def test_a_warned_replica_the_cloud_does_not_take_is_terminated_after_the_grace(world, ahead):
    """The grace counts from when the warning reached us at the latest: a warning dated in the
    future (a cloud's clock ahead of ours, or a forged time) must not keep the replica for ever."""
    ctl, clock, src = make(world), world["clock"], world["source"]
    settle(ctl, clock)
    victim = next(r for r in ctl.state.live() if r.zone == "local-b")
    dated = clock() + ahead
    src.queue.append(PreemptionEvent(Signal.WARNING, dated, "fake", cloud_id=f"id-{victim.id}"))
    ctl.tick()
    assert victim.draining and victim.gone_at is None
    clock.advance(WARNING_GRACE_SECONDS + 1)
    ctl.tick()
    assert victim.gone_at is not None and victim.id not in world["executor"].ids()


def test_scale_down_drains_before_destroy(world):
    ctl, clock, router = make(world), world["clock"], world["router"]
    ctl.state.target = 3
    settle(ctl, clock)
    assert len(ctl.state.live()) == 4
    ctl.state.target = 2
    ctl.state.extra["autoscaler"] = {"target": 2}
    order: list[str] = []
    real_apply = world["executor"].apply
    world["executor"].apply = lambda *a: (order.append("apply"), real_apply(*a))[1]
    real_drain = router.drain
    router.drain = lambda ups: (order.append(f"drain:{len(ups)}"), real_drain(ups))[1]
    ctl.tick()
    assert order[:2] == ["drain:3", "apply"]
    assert len(ctl.state.live()) == 3


def test_launch_refused_marks_zone_and_backs_off(world):
    ex = world["executor"]
    ex.refuse_zones = {"local-a"}
    ctl, clock = make(world), world["clock"]
    delay = ctl.tick()
    # applies back off after a failed one (2 s); the replicas it did start are probed meanwhile
    assert ctl._backoff() >= 2.0 and delay == ctl.options.busy_interval
    failed = [r for r in ctl.state.replicas.values() if r.reason == "failed"]
    assert [(r.zone, r.market) for r in failed] == [("local-a", "spot")]
    assert failed[0].fact().status is ReplicaStatus.FAILED
    clock.advance(delay)
    ctl.tick()
    settle(ctl, clock)
    live = ctl.state.live()
    assert len(live) == 3 and all(r.zone != "local-a" and r.market == "spot" for r in live)
    assert ctl.state.policy_memory["memory"]["preempted"] == [Location("local", "local", "local-a").key]


def test_crash_mid_apply_then_restart_converges_without_duplicates(world):
    ex = world["executor"]
    ctl, clock = make(world), world["clock"]
    ex.crash_next = True
    with pytest.raises(KeyboardInterrupt):
        ctl.tick()
    saved = load_state(world["dir"], "svc")
    intents = sorted(saved.replicas)
    assert len(intents) >= 3 and saved.next_id == len(intents) + 1  # intent written before the apply
    # restart: a new controller over the same state dir
    ctl2 = make(world)
    settle(ctl2, clock)
    assert sorted(ctl2.state.replicas) == intents  # the intents were applied: no new ID, no duplicate
    assert ex.ids() == {r.id for r in ctl2.state.live()}  # Terraform holds exactly the live ones
    assert all(r.reason == "terminated" for r in ctl2.state.replicas.values() if r.gone_at)


def test_repeated_tick_is_a_no_op(world):
    ctl, clock, ex = make(world), world["clock"], world["executor"]
    settle(ctl, clock)
    calls = len(ex.calls)
    reloads = len(world["router"].reloads)
    settle(ctl, clock, 3)
    assert len(ex.calls) == calls
    assert len(world["router"].reloads) == reloads


def test_restart_reapplies_every_root_once(world):
    ctl, clock, ex = make(world), world["clock"], world["executor"]
    settle(ctl, clock)
    ids = {r.id for r in ctl.state.live()}
    calls = len(ex.calls)
    ctl2 = make(world)
    ctl2.tick()
    assert len(ex.calls) == calls + 1 and {r.id for r in ctl2.state.live()} == ids


def sicken(world):
    """A settled service whose first replica now fails its probes (NOT_READY after one tick)."""
    ctl, clock, prober = make(world), world["clock"], world["prober"]
    settle(ctl, clock)
    sick = ctl.state.live()[0]
    prober.down.add(sick.id)
    ctl.tick()
    assert sick.fact().status is ReplicaStatus.NOT_READY
    return ctl, clock, sick


def test_not_ready_too_long_is_replaced(world):
    ctl, clock, sick = sicken(world)
    assert sick.id not in world["router"].current
    clock.advance(200)
    ctl.tick()
    assert sick.reason == "failed"
    settle(ctl, clock)
    assert len(ctl.state.live()) == 3


def test_a_probe_round_failing_everywhere_keeps_the_last_routes(world):
    """Panic mode: when every READY replica fails one probe round at once (more often the prober's
    network than every replica down), they stay routed rather than nginx answering 503 to all;
    as soon as one passes again, only passing ones are routed."""
    ctl, clock, prober = make(world), world["clock"], world["prober"]
    settle(ctl, clock)
    before = sorted(world["router"].current)
    assert len(before) == 3
    prober.down = {r.id for r in ctl.state.live()}
    ctl.tick()
    assert {ctl.state.replicas[rid].fact().status for rid in before} == {ReplicaStatus.NOT_READY}
    assert sorted(world["router"].current) == before
    healthy = before[0]
    prober.down.discard(healthy)
    clock.advance(1)
    ctl.tick()
    routed = set(world["router"].current)
    assert healthy in routed and not routed & (set(before) - {healthy})  # the failing ones are out


def test_never_ready_fails_after_initial_delay(world):
    ctl, clock, prober = make(world), world["clock"], world["prober"]
    prober.down = {"r-0001"}
    ctl.tick()
    clock.advance(31)
    ctl.tick()
    assert ctl.state.replicas["r-0001"].reason == "failed"


def test_a_replica_nothing_ever_listened_for_is_told_to_listen_on_its_port(world):
    """Found by an audit: a command listening on a port of its own got only "not ready within
    initial_delay_seconds", with nothing pointing at $PORT. A refused connection all along says so;
    another failure (a 500, a timeout) does not get the hint."""

    class Refused(FakeProber):
        def probe(self, records):
            return {
                r.id: (r.id != "r-0001", "ConnectionRefusedError" if r.id == "r-0001" else "200")
                for r in records
            }

    world["prober"] = Refused()
    ctl, clock = make(world), world["clock"]
    ctl.tick()
    clock.advance(31)
    ctl.tick()
    said = [n.text for n in ctl.notes if n.text.startswith("r-0001 FAILED")]
    endpoint = ctl.state.replicas["r-0001"].endpoint
    assert said == [
        "r-0001 FAILED: not ready within initial_delay_seconds=30 "
        f"(nothing accepted connections at {endpoint}: does run.command listen on $PORT?)"
    ]


def test_autoscaler_raises_target_after_upscale_delay(world):
    ctl, clock, router = make(world), world["clock"], world["router"]
    settle(ctl, clock)
    for _ in range(20):  # 35 req/s for 100 s: ceil(35/10) = 4 wanted over the 60 s window
        router.count += 5 * 35
        clock.advance(5)
        ctl.tick()
    assert ctl.state.target == 4
    assert len(ctl.state.live()) == 5  # 4 + 1 overprovision
    for _ in range(30):  # idle: back to min_replicas after the downscale delay
        clock.advance(5)
        ctl.tick()
    assert ctl.state.target == 2
    assert len(ctl.state.live()) == 3


def test_status_changes_follow_the_transition_table(world):
    ctl, clock, src, prober = make(world), world["clock"], world["source"], world["prober"]
    seen: dict[str, list[ReplicaStatus]] = {}

    def record(c: Controller) -> None:
        for r in c.state.replicas.values():
            st = r.fact().status
            if not seen.get(r.id) or seen[r.id][-1] is not st:
                seen.setdefault(r.id, []).append(st)

    real_save = ctl.save
    ctl.save = lambda **kw: (record(ctl), real_save(**kw))[1]  # every persisted state, intents included
    settle(ctl, clock)
    a, b, c = sorted(ctl.state.live(), key=lambda r: r.id)
    src.queue.append(PreemptionEvent(Signal.WARNING, clock(), "fake", replica_id=a.id))
    prober.down.add(b.id)
    settle(ctl, clock, 2)
    src.queue.append(PreemptionEvent(Signal.GONE, clock(), "fake", replica_id=a.id))
    src.queue.append(PreemptionEvent(Signal.GONE, clock(), "fake", replica_id=c.id, reason="preempted"))
    settle(ctl, clock, 2)
    clock.advance(300)
    settle(ctl, clock, 3)
    for rid, chain in seen.items():
        for before, after in zip(chain, chain[1:], strict=False):
            assert after in TRANSITIONS[before], f"{rid}: {before} -> {after} ({chain})"


def test_a_routing_failure_does_not_block_replacement(world):
    ctl, clock, src, router = make(world), world["clock"], world["source"], world["router"]
    settle(ctl, clock)
    assert ctl.state.router["endpoint"] == "http://127.0.0.1:8080"
    victim = ctl.state.live()[0]
    preempt(src, clock, victim)
    router.fail_next = True
    delay = ctl.tick()
    assert any("nginx refused" in n.text for n in ctl.notes)
    assert any(r.launched_at == clock() for r in ctl.state.live())  # the replacement launched anyway
    assert delay <= 2.0
    clock.advance(1)
    ctl.tick()
    assert victim.id not in router.current


def test_a_refused_router_config_says_nginx_reason_once(world):
    """A config nginx refuses is one line quoting nginx's first error (`Router._install`); the
    watcher's note does not repeat that line after it."""
    from skyhedge.errors import RoutingError

    ctl, clock, src, router = make(world), world["clock"], world["source"], world["router"]
    settle(ctl, clock)
    reason = '[emerg] SSL_CTX_use_PrivateKey("/etc/tls/key.pem") failed (key values mismatch)'

    def refuse(upstreams):
        raise RoutingError(
            f"nginx refused the new configuration (kept as nginx.conf.rejected): {reason}",
            stderr=f"nginx: {reason}\nnginx: configuration file nginx.conf test failed\n",
        )

    router.reload = refuse
    victim = ctl.state.live()[0]
    preempt(src, clock, victim)
    ctl.tick()
    refused = [n.text for n in ctl.notes if "nginx refused" in n.text]
    kept = "kept as nginx.conf.rejected"
    assert refused == [f"routing: nginx refused the new configuration ({kept}): {reason}"]


def test_a_failure_retried_every_pass_is_noted_once_a_minute(world):
    """nginx refusing every reload is retried every 2 s; the note is not repeated each time (it
    would flood the log and push everything else out of the dashboard's history)."""
    from skyhedge.errors import RoutingError

    ctl, clock, src, router = make(world), world["clock"], world["source"], world["router"]
    settle(ctl, clock)

    def refuse(upstreams):
        raise RoutingError("nginx refused the config")

    router.reload = refuse
    victim = ctl.state.live()[0]
    preempt(src, clock, victim)
    for _ in range(60):  # two minutes of passes every 2 s
        ctl.tick()
        clock.advance(2)
    refused = [n for n in ctl.notes if "nginx refused" in n.text]
    assert 2 <= len(refused) <= 3  # at 0 s, 60 s (and 120 s): not 60 or 120 times


def test_a_clock_stepped_back_does_not_postpone_replacing_a_sick_replica(world):
    """NTP stepping the wall clock back an hour must not keep a NOT_READY replica for that hour:
    its grace starts over at the new time."""
    ctl, clock, sick = sicken(world)
    clock.advance(-3600)
    ctl.tick()
    clock.advance(200)
    ctl.tick()
    assert sick.reason == "failed"


def test_a_router_killed_from_outside_is_started_again_and_said_so(world):
    ctl, clock, router = make(world), world["clock"], world["router"]
    settle(ctl, clock)
    reloads = len(router.reloads)
    router.dead = True
    clock.advance(10)
    ctl.tick()
    assert len(router.reloads) == reloads + 1 and router.running()
    assert any("router was not running" in n.text and "started it again" in n.text for n in ctl.notes)


def test_a_renewed_tls_certificate_reloads_the_router_with_the_same_upstreams(world):
    """nginx reads service.tls's files only at start and at a reload, and the watcher reloads on
    upstream changes only: a certificate renewed in place was served expired until the next
    preemption. A router that says its config is outdated is reloaded once, and said so."""
    ctl, clock, router = make(world), world["clock"], world["router"]
    settle(ctl, clock)
    reloads = len(router.reloads)
    clock.advance(10)
    ctl.tick()
    assert len(router.reloads) == reloads  # nothing changed: no reload
    # renewed, until the next reload
    router.outdated = lambda: "the TLS certificate or key changed" if len(router.reloads) == reloads else None
    clock.advance(10)
    ctl.tick()
    clock.advance(10)
    ctl.tick()
    assert len(router.reloads) == reloads + 1 and router.current == router.reloads[-2]
    assert sum("TLS certificate or key changed" in n.text for n in ctl.notes) == 1


def test_narrowing_the_placement_moves_replicas_without_dropping_below_n_ready(world, write_spec):
    # zones a and b leave the placement: their replicas keep serving until replacements in the
    # allowed zones are READY, then go one at a time (before: all terminated in the same apply)
    ctl, clock = make(world), world["clock"]
    settle(ctl, clock)
    assert sorted(r.zone for r in ctl.state.live()) == ["local-a", "local-b", "local-c"]
    world["spec"] = load_spec(
        write_spec(
            SPEC.replace("zones: [local-a, local-b, local-c]", "zones: [local-c, local-d]"), "moved.yaml"
        )
    )
    ctl = make(world)
    prober, booting, moved_at = world["prober"], {}, clock()
    for _ in range(40):
        for rec in ctl.state.live():  # a new replica answers its probe only after 5 ticks
            booting.setdefault(rec.id, ctl.ticks if rec.launched_at >= moved_at else -99)
        prober.down = {rid for rid, born in booting.items() if ctl.ticks - born < 5}
        ctl.tick()
        clock.advance(1)
        ready = [r for r in ctl.state.live() if r.fact().status is ReplicaStatus.READY and not r.draining]
        assert len(ready) >= 2, sorted((r.id, r.zone) for r in ctl.state.live())
    assert {r.zone for r in ctl.state.live()} <= {"local-c", "local-d"}


def test_a_pass_that_could_not_save_its_plan_is_applied_by_the_next_one(world, monkeypatch):
    # the plan is recorded, then saving it fails (full disk, read-only state dir) and the pass
    # dies before the executor runs; the next pass sees the recorded replicas as kept, so only
    # the controller's memory of the unfinished pass makes it launch them (before: never)
    import skyhedge.controller.loop as loop

    ctl, clock, src = make(world), world["clock"], world["source"]
    settle(ctl, clock)
    victim = next(r for r in ctl.state.live() if r.zone == "local-a")
    preempt(src, clock, victim)
    real, calls = loop.save_state, {"n": 0}

    def failing_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "save_state", failing_once)
    with pytest.raises(OSError):
        ctl.tick()
    planned = {r.id for r in ctl.state.live()} - world["executor"].ids()
    assert planned  # recorded in memory, never launched
    clock.advance(1)
    ctl.tick()
    assert planned <= world["executor"].ids()


def test_router_files_that_cannot_be_written_never_block_replacing_a_replica(world):
    ctl, clock, src = make(world), world["clock"], world["source"]
    settle(ctl, clock)
    victim = next(r for r in ctl.state.live() if r.zone == "local-a")
    preempt(src, clock, victim)
    world["router"].unwritable = 3
    ctl.tick()  # before: PermissionError out of the pass, before planning
    assert victim.id not in zones(ctl)
    assert len(ctl.state.live()) >= 3 and ctl.state.live()[-1].id in world["executor"].ids()
    assert any("routing:" in n.text and "Permission denied" in n.text for n in ctl.notes)
    settle(ctl, clock, ticks=4)
    assert sorted(world["router"].current) == sorted(r.id for r in routable_ids(ctl))


def routable_ids(ctl: Controller) -> list:
    from skyhedge.controller.facts import routable

    return routable(ctl.state)


def _crash_loop(ctl: Controller, clock: Clock, src: FakeSource, passes: int = 60) -> None:
    for _ in range(passes):
        for rec in ctl.state.live():
            if rec.provisioned_at is not None:
                src.queue.append(
                    PreemptionEvent(Signal.GONE, clock(), "fake", replica_id=rec.id, reason="failed")
                )
        ctl.tick()
        clock.advance(1)


def test_replicas_that_keep_crashing_soon_after_launch_are_relaunched_with_a_growing_hold(world):
    # a command that exits at once: before, a new replica (and a Terraform apply, a VM on a cloud)
    # every pass for as long as the watcher ran
    ctl, clock, src = make(world), world["clock"], world["source"]
    settle(ctl, clock)
    before = ctl.state.next_id
    _crash_loop(ctl, clock, src, passes=120)  # two minutes; every replica dies as it comes up
    launched = ctl.state.next_id - before
    assert launched < 40, launched  # without the hold: five per pass (three spot, two covers), 600
    assert any(n.text.startswith("crash loop:") for n in ctl.notes)


def test_a_launch_that_keeps_failing_is_given_up_and_replaced_under_a_new_id(world):
    # e.g. another process holds the local port of that replica ID: retrying the same ID failed
    # for good, and the replica stayed PROVISIONING
    ctl, clock, src = make(world), world["clock"], world["source"]
    settle(ctl, clock)
    victim = next(r for r in ctl.state.live() if r.zone == "local-a")
    preempt(src, clock, victim)
    world[
        "executor"
    ].broken = "local/local: r-0004: port 127.0.0.1:20004 is already in use by another process"
    for _ in range(4):
        ctl.tick()
        clock.advance(20)
    stuck = [r for r in ctl.state.replicas.values() if r.reason == "failed" and r.provisioned_at is None]
    assert stuck and all(r.gone_at is not None for r in stuck)
    assert sorted(n.text for n in ctl.notes if "given up" in n.text) == [
        f"{r.id} given up after 3 failed launches: replacing it" for r in sorted(stuck, key=lambda r: r.id)
    ]
    world["executor"].broken = None
    settle(ctl, clock, ticks=5)
    live = ctl.state.live()
    assert len(live) >= 3 and all(r.provisioned_at is not None for r in live)
    assert not {r.id for r in stuck} & {r.id for r in live}
    # one launch given up is no loop: nothing was held back
    assert not any(n.text.startswith(("crash loop", "launches keep failing")) for n in ctl.notes)


def test_an_apply_that_fails_before_reaching_any_replica_gives_none_up(world):
    # Terraform's state lock held by another process (or the rendered tree on a full disk, or
    # Terraform unable to start): measured live, the replacement was "given up after 3 failed
    # launches" and placed again under a new ID every three failed applies, though it never ran,
    # and those give-ups held new launches back once the cause was gone
    ctl, clock, src = make(world), world["clock"], world["source"]
    settle(ctl, clock)
    victim = next(r for r in ctl.state.live() if r.zone == "local-a")
    preempt(src, clock, victim)
    world[
        "executor"
    ].root_broken = "local/local: Error acquiring the state lock: resource temporarily unavailable"
    for _ in range(30):  # ten minutes of failed applies
        ctl.tick()
        clock.advance(20)
    assert not [n.text for n in ctl.notes if "given up" in n.text]
    assert not [
        r.id for r in ctl.state.replicas.values() if r.reason == "failed" and r.provisioned_at is None
    ]
    waiting = {r.id for r in ctl.state.live() if r.provisioned_at is None}
    assert waiting and ctl._failures == 30
    world["executor"].root_broken = None  # the lock is released
    ctl.tick()
    live = ctl.state.live()
    assert waiting <= {r.id for r in live} and all(r.provisioned_at is not None for r in live)
    assert not any(n.text.startswith(("launches keep failing", "crash loop")) for n in ctl.notes)


def test_a_wall_clock_stepped_back_during_a_backoff_does_not_stretch_it(world):
    # the controller's clock is the wall clock (its times are stored in the state), and an apply's
    # backoff was a time on it: stepped back an hour (NTP, a VM's clock set right), the passes
    # skipped their applies and asked the supervisor to sleep 3602 s, probing and routing nothing
    ctl, clock, src, ex = make(world), world["clock"], world["source"], world["executor"]
    settle(ctl, clock)
    victim = ctl.state.live()[0]
    src.queue.append(PreemptionEvent(Signal.GONE, clock(), "fake", replica_id=victim.id, reason="failed"))
    ex.root_broken = "local/local: Error acquiring the state lock"
    backoff = ctl.tick()
    assert 0 < backoff <= 2
    ex.root_broken = None
    clock.advance(-3600)
    ctl.woken = False  # as the supervisor runs it: for the delay's end, not for an event
    delay = ctl.tick()
    assert delay <= backoff
    clock.advance(delay)
    ctl.tick()
    assert ctl._failures == 0  # applied at the backoff's end, as without the step
    assert all(r.provisioned_at is not None for r in ctl.state.live())


def probe_out_of_descriptors(ctl, clock, monkeypatch, *, passes: int) -> None:
    """`passes` passes 10 s apart with every probe connection failing EMFILE (the watcher out of
    file descriptors: a probe that cannot be made, not a replica failing one)."""
    import errno
    import socket

    def no_descriptor(*args: object, **kwargs: object) -> socket.socket:
        raise OSError(errno.EMFILE, "Too many open files")

    with monkeypatch.context() as m:
        m.setattr(socket, "create_connection", no_descriptor)
        for _ in range(passes):
            ctl.tick()
            clock.advance(10)


def test_probes_the_watcher_cannot_make_leave_the_replicas_as_they_were(world, monkeypatch):
    # the watcher out of file descriptors (measured by a chaos run: `prlimit --nofile` on it):
    # every probe failed with EMFILE, every READY replica went NOT_READY at once (on-demand covers
    # were launched for them), and after 180 s all of them would be FAILED and replaced

    from skyhedge.controller.adapters import HttpProber
    from skyhedge.controller.facts import UNPROBED_SECONDS

    ctl, clock = make(world), world["clock"]
    settle(ctl, clock)
    ready = sorted(r.id for r in ctl.state.live())
    ctl.prober = HttpProber(world["spec"])
    probe_out_of_descriptors(ctl, clock, monkeypatch, passes=int(UNPROBED_SECONDS // 10))  # to the bound
    live = ctl.state.live()
    assert sorted(r.id for r in live) == ready
    assert all(r.fact().status is ReplicaStatus.READY for r in live)
    said = [n.text for n in ctl.notes if n.text.startswith("readiness probes could not be made")]
    assert len(said) == 3 and len(set(said)) == 1  # once a minute, not every pass
    assert "Too many open files" in said[0]
    ctl.tick()  # descriptors again (nothing listens at the fake endpoints: refused, and judged)
    assert "readiness probes can be made again" in [n.text for n in ctl.notes]


def test_a_replica_no_probe_can_be_made_of_is_not_ready_for_ever(world, monkeypatch):
    # Local errors count neither for nor against a replica, but the READY they left in place never
    # aged: a replica whose process died while the watcher was out of descriptors (its probes
    # EMFILE, its pid file unreadable: no GONE either) stayed READY, routed and counted by the
    # policy, for as long as that lasted (measured: 10 minutes of it, still READY).

    from skyhedge.controller.adapters import HttpProber
    from skyhedge.controller.facts import NOT_READY_GRACE_SECONDS, UNPROBED_SECONDS

    ctl, clock, router = make(world), world["clock"], world["router"]
    settle(ctl, clock)
    ready = sorted(r.id for r in ctl.state.live())
    ctl.prober = HttpProber(world["spec"])
    probe_out_of_descriptors(ctl, clock, monkeypatch, passes=60)  # ten minutes
    kept = {rid: ctl.state.replicas[rid] for rid in ready}
    # none READY past the bound, none FAILED for it (no probe made failed), all still routed (panic)
    assert all(r.gone_at is None and r.fact().status is ReplicaStatus.NOT_READY for r in kept.values())
    assert all(clock() - r.not_ready_since <= 600 - UNPROBED_SECONDS for r in kept.values())
    assert set(ready) <= set(router.current)
    said = [n.text for n in ctl.notes if "no probe of it could be made" in n.text]
    assert sorted(line.split()[0] for line in said) == ready
    # probes can be made again and fail (nothing listens at the fake endpoints): the grace counts
    # from that first failure, not from when they went unprobed
    ctl.tick()
    assert all(r.gone_at is None for r in kept.values())
    clock.advance(NOT_READY_GRACE_SECONDS + 1)
    ctl.tick()
    assert all(r.gone_at is not None and r.reason == "failed" for r in kept.values())


def test_a_replica_unprobed_for_a_while_is_ready_again_at_its_first_passing_probe(world):
    class Unmade(FakeProber):  # returns nothing for the replicas it cannot probe (`HttpProber`)
        blind = False

        def probe(self, records):
            return {} if self.blind else super().probe(records)

    from skyhedge.controller.facts import UNPROBED_SECONDS

    world["prober"] = prober = Unmade()
    ctl, clock = make(world), world["clock"]
    settle(ctl, clock)
    ctl.tick()  # the last probes made
    prober.blind = True
    clock.advance(UNPROBED_SECONDS - 1)
    ctl.tick()
    first = ctl.state.live()
    assert first and all(r.fact().status is ReplicaStatus.READY for r in first)
    clock.advance(2)
    ctl.tick()
    assert all(r.fact().status is ReplicaStatus.NOT_READY for r in first)
    prober.blind = False
    ctl.tick()
    assert all(r.gone_at is None and r.fact().status is ReplicaStatus.READY for r in first)
    assert any(n.text.endswith("READY again") for n in ctl.notes)


def _held_until(ctl: Controller) -> list[str]:
    return [
        n.text.rsplit("held until ", 1)[1].split()[0]
        for n in ctl.notes
        if n.text.startswith("launches keep failing:")
    ]


def test_launches_that_keep_being_given_up_are_held_back_with_a_growing_hold(world):
    # a run.command that exits before the local launcher returns fails the apply itself: before,
    # each replica was given up after three applies and replaced at once, a Terraform apply (a VM
    # on a cloud) and a new replica ID every pass for as long as the watcher ran
    ctl, clock = make(world), world["clock"]
    settle(ctl, clock)
    for rec in ctl.state.live():  # the spec's new command: every replica must be replaced
        rec.gone_at, rec.reason = clock(), "preempted"
    world["executor"].broken = "local/local: r-0004: run.command exited at once with 2"
    before = ctl.state.next_id
    settle(ctl, clock, ticks=300)  # five minutes of one-second passes
    launched = ctl.state.next_id - before
    assert launched < 40, launched  # without the hold: five new replicas every three passes, 500
    held = [n.text for n in ctl.notes if n.text.startswith("launches keep failing:")]
    assert held and "given up after 3 failed applies" in held[0]
    until = sorted(set(_held_until(ctl)))  # a note repeats after a minute: the same time
    secs = [int(h) * 3600 + int(m) * 60 + int(x) for h, m, x in (t.split(":") for t in until)]
    gaps = [b - a for a, b in zip(secs, secs[1:], strict=False)]
    assert len(gaps) >= 2 and gaps == sorted(gaps) and gaps[-1] >= 2 * gaps[0]  # 30 s, 60 s, 120 s...
    assert not any(n.text.startswith("crash loop") for n in ctl.notes)  # the apps never ran
    # fixed: the hold lifts by itself (at most 4 min after the last give-up here), well before the
    # give-ups leave the 10-minute window, and the service comes back
    world["executor"].broken = None
    for _ in range(25):
        ctl.tick()
        clock.advance(10)
    live = ctl.state.live()
    assert len(live) >= 3 and all(r.provisioned_at is not None for r in live)


def test_launches_refused_for_capacity_are_not_held_back(world):
    # the market's refusals mark zones, and the policy moves on at once: holding launches there
    # would keep a service down that an open zone or on-demand could serve
    ctl, clock, src, ex = make(world), world["clock"], world["source"], world["executor"]
    settle(ctl, clock)
    ex.refuse_zones = {"local-a", "local-b", "local-c"}
    for r in ctl.state.live():
        src.queue.append(PreemptionEvent(Signal.GONE, clock(), "fake", replica_id=r.id, reason="preempted"))
    for _ in range(30):
        clock.advance(ctl.tick())
    refused = [r for r in ctl.state.replicas.values() if r.reason == "failed" and r.provisioned_at is None]
    assert len(refused) >= 6  # many refusals over many passes
    assert ctl._give_ups(clock()) == [] and ctl._crash_hold(clock()) == 0
    assert not any(n.text.startswith(("launches keep failing", "crash loop")) for n in ctl.notes)


def test_a_restarted_watcher_still_holds_launches_that_keep_being_given_up(world):
    ctl, clock = make(world), world["clock"]
    settle(ctl, clock)
    for rec in ctl.state.live():
        rec.gone_at, rec.reason = clock(), "preempted"
    world["executor"].broken = "local/local: r-0004: run.command exited at once with 2"
    settle(ctl, clock, ticks=30)
    assert ctl._crash_hold(clock()) > 0
    ctl.save()
    again = make(world)  # a new watcher on the same state directory
    assert again._give_ups(clock()) == ctl._give_ups(clock())
    assert again._crash_hold(clock()) == ctl._crash_hold(clock()) > 0


def _reconfigure(ctl: Controller, spec) -> None:
    ctl.reconfigure(
        spec,
        placement=ctl.placement,
        executor=ctl.executor,
        router=ctl.router,
        prober=ctl.prober,
        sources=ctl.sources,
    )


def test_a_reloaded_spec_with_a_new_revision_starts_the_crash_count_over(world, write_spec):
    # the fixed command must not inherit the old one's crash loop (its replacements held back),
    # and an edit that leaves the revision alone must not lift the hold on the crashing one
    ctl, clock, src = make(world), world["clock"], world["source"]
    settle(ctl, clock)
    _crash_loop(ctl, clock, src)
    assert ctl._crash_hold(clock()) > 0
    _reconfigure(
        ctl, load_spec(write_spec(SPEC.replace("num_overprovision: 1", "num_overprovision: 0"), "a.yaml"))
    )
    assert ctl._crash_hold(clock()) > 0  # same revision: still held
    _reconfigure(ctl, load_spec(write_spec(SPEC.replace('command: "true"', 'command: "serve"'), "b.yaml")))
    assert ctl._crash_hold(clock()) == 0
    before = ctl.state.next_id
    settle(ctl, clock)
    victim = ctl.state.live()[0]
    preempt(src, clock, victim)
    n = ctl.state.next_id
    settle(ctl, clock, ticks=1)
    assert ctl.state.next_id > n > before  # the replacement is launched at once


def test_turning_autoscaling_off_plans_min_replicas_not_the_last_autoscaled_size(world, write_spec):
    from skyhedge.service import service_target

    ctl, clock, router = make(world), world["clock"], world["router"]
    for _ in range(200):  # 35 req/s against 10 per replica: the autoscaler goes to max_replicas
        router.count = (router.count or 0) + 35
        ctl.tick()
        clock.advance(1)
    assert ctl.state.target == 4
    off = load_spec(
        write_spec(
            SPEC.replace("  target_qps_per_replica: 10\n", "").replace("  max_replicas: 4\n", ""), "off.yaml"
        )
    )
    _reconfigure(ctl, off)
    settle(ctl, clock, ticks=5)
    assert service_target(off, ctl.state) == 2
    assert ctl.last_plan is not None and ctl.last_plan.target == 2
    # forgotten, not kept aside: turned on again with no load, it starts from min_replicas
    assert ctl.state.target is None and "autoscaler" not in ctl.state.extra
    _reconfigure(ctl, world["spec"])
    settle(ctl, clock, ticks=1)
    assert ctl.last_plan.target == 2


def test_a_crash_loop_found_by_probes_holds_launches_from_the_third_burst(world):
    """Probing takes time, and a failure it finds is stamped when found, after the pass began:
    that burst must count in the same pass (it was counted one pass, and one burst, late)."""
    clock = world["clock"]

    class SlowBrokenApp(FakeProber):
        def probe(self, records):
            clock.advance(0.5)
            return {r.id: (False, "HTTP 500") for r in records}

    world["prober"] = SlowBrokenApp()
    ctl = make(world)
    for _ in range(240):
        ctl.tick()
        clock.advance(1)
    held = next(n for n in ctl.notes if n.text.startswith("crash loop: 3 bursts"))
    rounds = {r.launched_at for r in ctl.state.replicas.values() if r.launched_at <= held.at}
    assert len(rounds) == 3  # the first launch and two relaunches; none after the third burst


def test_replicas_found_failed_during_a_crash_loop_hold_are_destroyed_at_once(world):
    """A replica its probe failed still runs (on a cloud, a billed machine) until an apply drops
    it from its root. The held launches used to be what carried that apply: the replicas of the
    burst that started the hold kept running for the whole hold (30 s to 10 min, measured on the
    local cloud with a run.command that never listens: three processes for 2 min)."""
    clock = world["clock"]

    class NeverListens(FakeProber):
        def probe(self, records):
            return {r.id: (False, "ConnectionRefusedError") for r in records}

    world["prober"] = NeverListens()
    ctl, ex = make(world), world["executor"]
    held_passes = 0
    for _ in range(240):
        ctl.tick()
        if ctl._crash_hold(clock()) > 0:
            held_passes += 1
            live = {r.id for r in ctl.state.live()}
            assert ex.ids() <= live, sorted(ex.ids() - live)  # failed ones no longer applied
        clock.advance(1)
    assert held_passes > 30 and any(n.text.startswith("crash loop:") for n in ctl.notes)


def test_a_launch_hold_is_recorded_for_status_while_it_lasts(world, tmp_path):
    """`status` showed an empty table and no reason during a crash-loop hold: the reason was only
    in the watcher's log (found by an audit). The state now carries the hold while it lasts."""
    from skyhedge.cli.apply import launch_hold

    clock = world["clock"]

    class NeverListens(FakeProber):
        def probe(self, records):
            return {r.id: (False, "ConnectionRefusedError") for r in records}

    world["prober"] = NeverListens()
    ctl = make(world)
    seen = None
    for _ in range(240):
        ctl.tick()
        if ctl._crash_hold(clock()) > 0 and seen is None:
            seen = launch_hold(ctl.state, clock())
        clock.advance(1)
    assert seen is not None and seen["reason"].startswith("crash loop: 3 bursts of replicas failing")
    assert seen["until"] > 0
    clock.advance(3600)  # the hold is long over, and the next pass launches again
    ctl.tick()
    assert launch_hold(ctl.state, clock()) is None


def test_a_replica_being_released_serves_again_when_nothing_else_can():
    """Its destroy waits for its requests to end; if every other replica is lost meanwhile (a
    preemption during a scale-down), it is routed again rather than an empty router's 503s."""
    from skyhedge.controller.facts import routable
    from skyhedge.state import ReplicaRecord, ServiceState

    st = ServiceState(service="svc")
    for rid, draining in (("r-0001", True), ("r-0002", False)):
        st.replicas[rid] = ReplicaRecord(
            rid,
            "local",
            "local",
            "local-a",
            "spot",
            launched_at=0.0,
            provisioned_at=1.0,
            ready_at=2.0,
            endpoint=f"http://127.0.0.1:1800{rid[-1]}",
            draining=draining,
        )
    assert [r.id for r in routable(st)] == ["r-0002"]
    st.replicas["r-0002"].gone_at = 5.0  # preempted
    assert [r.id for r in routable(st)] == ["r-0001"]


class DrainingRouter(FakeRouter):
    """A router that drains without waiting, as nginx's does: old workers stay until told."""

    def __init__(self) -> None:
        super().__init__()
        self.busy: set[int] = set()
        self._next = 1000
        self.severed: list[str] = []  # endpoints whose connections were cut

    def sever(self, endpoints) -> int:
        self.severed += endpoints
        return len(endpoints)

    def begin_drain(self, upstreams):
        self._next += 1
        self.busy.add(self._next)
        return self.reload(upstreams), [self._next]

    def draining(self, pids) -> bool:
        return bool(self.busy & set(pids))


def _scaled_down_while_draining(world, write_spec) -> tuple[Controller, Clock, DrainingRouter]:
    """Three replicas settled behind a router that drains without waiting, then min_replicas
    2 -> 1: the released replica's requests (the router's busy workers) still run."""
    router = DrainingRouter()
    world["router"] = router
    ctl, clock = make(world), world["clock"]
    settle(ctl, clock)
    router.busy.clear()  # (nothing drains after start-up: the on-demand covers are never routed)
    settle(ctl, clock)
    assert len(ctl.state.live()) == 3 and "drain" not in ctl.state.extra
    smaller = (
        SPEC.replace("  min_replicas: 2\n", "  min_replicas: 1\n")
        .replace("  target_qps_per_replica: 10\n", "")
        .replace("  max_replicas: 4\n", "")
    )
    _reconfigure(ctl, load_spec(write_spec(smaller, "smaller.yaml")))
    settle(ctl, clock, ticks=2)
    return ctl, clock, router


def test_a_released_replica_is_destroyed_only_after_its_requests_end_and_the_pass_goes_on(world, write_spec):
    """The scale-down's victim leaves the router at once and keeps running while the old
    workers serve it; later passes go on (a replacement is launched at once), and it is
    destroyed only once those workers are gone."""
    ctl, clock, router = _scaled_down_while_draining(world, write_spec)
    victims = [r for r in ctl.state.live() if r.draining]
    assert victims and all(r.id in world["executor"].ids() for r in victims)  # still running
    assert not {r.id for r in victims} & set(router.current)  # but no longer routed
    settle(ctl, clock, ticks=3)
    assert all(ctl.state.replicas[r.id].gone_at is None for r in victims)  # requests still running
    router.busy.clear()  # the old workers finished
    settle(ctl, clock, ticks=2)
    assert all(ctl.state.replicas[r.id].gone_at is not None for r in victims)
    assert not {r.id for r in victims} & world["executor"].ids()
    assert "drain" not in ctl.state.extra
    assert any(n.text == f"{victims[0].id}: drained, its requests ended; removing it" for n in ctl.notes)
    assert router.severed == []  # a drain's requests are never cut


@pytest.mark.parametrize("pids", [5, None, "missing"])
def test_a_drain_hold_whose_workers_a_hand_edit_broke_is_one_warning_not_a_crash_per_pass(
    world, write_spec, caplog, pids
):
    """`extra.drain` an object but a hold's `pids` not a list of worker pids: each pass asked the
    router whether those workers still ran, a TypeError (iterating 5 or None) or KeyError (no
    `pids`) that crashed every pass. Read back, such a table is dropped with one warning line,
    as one that is not an object at all is: the replicas released are removed."""
    import json
    import logging

    from skyhedge.state import STATE_FILE

    ctl, clock, router = _scaled_down_while_draining(world, write_spec)
    victims = [r.id for r in ctl.state.live() if r.draining]
    assert victims and ctl.state.extra["drain"]
    path = world["dir"] / STATE_FILE
    data = json.loads(path.read_text())
    hold = data["extra"]["drain"][victims[0]]
    if pids == "missing":
        del hold["pids"]
    else:
        hold["pids"] = pids
    path.write_text(json.dumps(data))
    world["spec"] = ctl.spec
    with caplog.at_level(logging.WARNING, logger="skyhedge.controller"):
        ctl = make(world)
        settle(ctl, clock, ticks=3)
    said = [r.getMessage() for r in caplog.records if "extra.drain" in r.getMessage()]
    assert len(said) == 1, said
    assert all(ctl.state.replicas[rid].gone_at is not None for rid in victims)


def test_a_released_replica_that_hangs_is_destroyed_after_the_not_ready_grace_not_the_drain_deadline(
    world, write_spec
):
    """A released replica that stops answering (accepts connections, answers nothing) holds the
    requests its drain waits for: they end only when it is destroyed (its connections reset:
    nginx retries them elsewhere or answers 503, measured with real nginx) or at read_timeout.
    Its destroy waited for them, up to the 600 s drain deadline; it now comes once it failed its
    probes for NOT_READY_GRACE_SECONDS, as for a replica still routed."""
    from skyhedge.controller.facts import NOT_READY_GRACE_SECONDS

    ctl, clock, router = _scaled_down_while_draining(world, write_spec)
    victims = [r for r in ctl.state.live() if r.draining]
    assert victims and router.busy
    world["prober"].down |= {r.id for r in victims}
    ctl.tick()
    assert all(r.not_ready_since == clock() for r in victims)
    clock.advance(NOT_READY_GRACE_SECONDS - 1)
    ctl.tick()
    assert all(r.gone_at is None for r in victims)  # a busy health endpoint gets its grace
    clock.advance(2)
    settle(ctl, clock, ticks=2)
    assert router.busy  # the old workers still hold the requests stuck on it
    assert all(ctl.state.replicas[r.id].gone_at is not None for r in victims)
    assert not {r.id for r in victims} & world["executor"].ids()
    assert any(n.text.startswith(f"{victims[0].id}: not answering its probes for") for n in ctl.notes)
    # destroyed with requests in flight: they are cut, as a cloud VM deleted would not reset them
    assert sorted(router.severed) == sorted(r.endpoint for r in victims)


def test_a_preempted_replicas_connections_are_cut_once_it_is_out_of_the_router(world):
    """A VM preempted sends no reset: the requests in flight on it would wait for read_timeout
    on nginx's old workers. Once the reload took it out, the router cuts them (nginx retries them
    on another replica); no other replica's connections are touched."""
    router = DrainingRouter()
    world["router"] = router
    ctl, clock, src = make(world), world["clock"], world["source"]
    settle(ctl, clock)
    victim = next(r for r in ctl.state.live() if r.zone == "local-a")
    preempt(src, clock, victim)
    ctl.tick()
    assert victim.id not in router.current
    assert router.severed == [victim.endpoint]
    assert any(
        n.text
        == f"routing: closed 1 connection(s) to gone {victim.id}: a request not answered yet is retried "
        "on another replica within next_upstream_timeout (30s) of its start, others end (503, or a stream "
        "cut short)"
        for n in ctl.notes
    )
    settle(ctl, clock)
    assert router.severed == [victim.endpoint]


def test_a_gone_replicas_endpoint_another_live_replica_has_now_is_never_cut(world):
    """A replica preempted while routing failed stays in nginx's config; its address and port may
    go to a replica launched meanwhile (a cloud's private IP handed out again, a local port
    wrapped around), which then answers what nginx still sends there. When routing recovers,
    the gone replica leaves the router and its endpoint was cut: the connections of the live
    replica that has it now, requests in flight on a healthy machine. An endpoint a live
    replica has is never cut."""
    router = DrainingRouter()
    world["router"] = router
    ctl, clock, src = make(world), world["clock"], world["source"]
    settle(ctl, clock)
    victim = next(r for r in ctl.state.live() if r.zone == "local-a")
    before = {r.id for r in ctl.state.live()}
    preempt(src, clock, victim)
    router.unwritable = 10  # every routing of the pass fails: the victim stays routed
    ctl.tick()
    router.unwritable = 0
    assert victim.id in {pair[0] for pair in ctl.state.extra["routed"]}
    newcomer = next(r for r in ctl.state.live() if r.id not in before)
    newcomer.endpoint, newcomer.ready_at = victim.endpoint, None  # launched there, not READY yet
    world["prober"].down.add(newcomer.id)
    clock.advance(1)
    ctl.tick()
    assert victim.id not in router.current
    assert router.severed == []


def test_a_replica_taken_out_not_ready_is_cut_only_once_known_gone(world):
    """A vanished VM's probe fails before its preemption is known: the reload takes it out alive,
    and the GONE event after that changes no routing. Its connections are cut then (they waited
    for read_timeout: a soak measured clients giving up at 30 s), not while it is only NOT_READY
    (a slow replica keeps its requests), and once only."""
    router = DrainingRouter()
    world["router"] = router
    ctl, clock, src, prober = make(world), world["clock"], world["source"], world["prober"]
    settle(ctl, clock)
    victim = next(r for r in ctl.state.live() if r.zone == "local-a")
    prober.down.add(victim.id)
    ctl.tick()
    assert victim.id not in router.current and victim.gone_at is None
    assert router.severed == []
    executor, seen_by_apply = world["executor"], []
    real_apply = executor.apply

    def apply(state, plan, now):
        seen_by_apply.append(list(router.severed))
        return real_apply(state, plan, now)

    executor.apply = apply
    clock.advance(1)
    preempt(src, clock, victim)
    ctl.tick()
    assert router.severed == [victim.endpoint]
    assert seen_by_apply == [[victim.endpoint]]  # cut before the replacement's apply (minutes on a cloud)
    settle(ctl, clock)
    assert router.severed == [victim.endpoint]
    assert ctl._unrouted == {}  # forgotten once cut: nothing kept per gone replica


def test_a_replica_taken_out_not_ready_that_recovers_is_never_cut(world):
    """Routed again once its probe passes, a replica taken out NOT_READY is no longer one to cut:
    its later exit through a drain (a release) waits for its requests instead."""
    router = DrainingRouter()
    world["router"] = router
    ctl, clock, prober = make(world), world["clock"], world["prober"]
    settle(ctl, clock)
    victim = next(r for r in ctl.state.live() if r.zone == "local-a")
    prober.down.add(victim.id)
    ctl.tick()
    assert victim.id not in router.current
    prober.down.discard(victim.id)
    settle(ctl, clock)
    assert victim.id in router.current
    assert router.severed == []


def test_the_plan_note_counts_replicas_on_their_way_out_apart(world, write_spec):
    """A plan made while a released replica drains names the layout the service is headed for:
    the draining replica is not one of its spot replicas, it is counted apart."""
    ctl, clock, router = _scaled_down_while_draining(world, write_spec)
    victims = sorted(r.id for r in ctl.state.live() if r.draining)
    kept = [r for r in ctl.state.live() if not r.draining]
    assert victims and kept
    world["source"].queue.append(
        PreemptionEvent(Signal.GONE, clock(), "fake", replica_id=kept[0].id, reason="preempted")
    )
    before = len(ctl.notes)
    ctl.tick()
    plans = [n.text for n in list(ctl.notes)[before:] if n.text.startswith("plan: ")]
    assert plans, [n.text for n in ctl.notes]
    line = plans[0]
    assert line.endswith(f"; {len(victims)} more on their way out ({', '.join(victims)})")
    live_spot = [r for r in ctl.state.live() if not r.draining and r.market == "spot"]
    assert f"-> {len(live_spot)} spot / " in line


def test_a_short_read_timeout_does_not_cut_a_drain_short(world, write_spec):
    """`read_timeout` bounds a stream's silences, not its length: a drain may last at least 10 min."""
    from skyhedge.controller.loop import DRAIN_FLOOR_SECONDS

    ctl = make(world)
    assert ctl.drain_deadline() == max(600.0, DRAIN_FLOOR_SECONDS)
    short = SPEC + "service:\n  router: {read_timeout: 5}\n"
    _reconfigure(ctl, load_spec(write_spec(short, "short.yaml")))
    assert ctl.drain_deadline() == DRAIN_FLOOR_SECONDS


def test_a_released_replica_routed_back_in_a_pinch_drains_again_before_it_goes(world, write_spec):
    """Every other replica lost during the drain: the released one serves again. Once the
    replacements are READY it leaves the router again, and its destroy waits for the requests
    it took meanwhile, not only for those of its first drain."""
    ctl, clock, router = _scaled_down_while_draining(world, write_spec)
    src = world["source"]
    victims = {r.id for r in ctl.state.live() if r.draining}
    first = set(router.busy)
    for rec in ctl.state.live():
        if rec.id not in victims:
            src.queue.append(
                PreemptionEvent(Signal.GONE, clock(), "fake", replica_id=rec.id, reason="preempted")
            )
    ctl.tick()
    assert victims & set(router.current)  # routed again: nothing else can answer
    settle(ctl, clock, ticks=6)  # replacements READY: the victims leave the router again
    assert not victims & set(router.current)
    router.busy -= first  # the first drain's workers are gone; the second drain's still serve
    settle(ctl, clock, ticks=3)
    assert all(ctl.state.replicas[rid].gone_at is None for rid in victims)
    router.busy.clear()
    settle(ctl, clock, ticks=3)
    assert all(ctl.state.replicas[rid].gone_at is not None for rid in victims)


def test_a_watcher_restarted_mid_drain_carries_the_drain_on(world, write_spec):
    """A restart reopens the deletes a killed run left unfinished (the plan decides again), but
    not the replicas a drain holds: re-routing them sent new traffic to replicas on their way out
    and pushed their deadline back."""
    ctl, clock, router = _scaled_down_while_draining(world, write_spec)
    victims = {r.id for r in ctl.state.live() if r.draining}
    assert victims and set(ctl.state.extra["drain"]) >= victims
    ctl.save()
    again = make(world)  # a new watcher on the same state dir (and the same nginx)
    assert {r.id for r in again.state.live() if r.draining} == victims
    settle(again, clock, ticks=2)
    assert not victims & set(router.current) and all(again.state.replicas[v].gone_at is None for v in victims)
    router.busy.clear()
    settle(again, clock, ticks=2)
    assert all(again.state.replicas[v].gone_at is not None for v in victims)


def test_an_apply_failure_names_the_commands_own_error_from_the_logs_tail():
    from skyhedge.controller.loop import apply_cause, with_cause

    detail = (
        'Error: local-exec provisioner error (module.replicas.terraform_data.replica["r-0002"])\n'
        "Error running command 'r-0002': exit status 1. Output: skyhedge-local: r-0002: run.command "
        "exited at once with 2; log /s/local/replicas/r-0002.log:\n"
        "=== skyhedge: starting r-0002 (local-b, spot) on port 18002 at 1795965368.450 ===\n"
        "python3: can't open file '/w/missing.py': [Errno 2] No such file or directory\n"
    )
    cause = apply_cause(detail)
    assert cause.endswith("python3: can't open file '/w/missing.py': [Errno 2] No such file or directory")
    line = (
        "local/local: local-exec provisioner error: Error running command 'r-0002': exit status 1. Output: "
        "skyhedge-local: r-0002: run.command exited at once with 2; log /s/local/replicas/r-0002.log:"
    )
    said = with_cause(line, cause)
    assert said == f"{line} (python3: can't open file '/w/missing.py': [Errno 2] No such file or directory)"
    assert with_cause("local/local: boom", "") == "local/local: boom"
    line = "x: port 1 is already in use"
    assert with_cause(line, "port 1 is already in use") == line


def test_a_rolling_update_launches_one_replacement_per_outdated_replica(world, write_spec):
    """The surge (one replica more while outdated ones run) ends once the last outdated replica is
    released: asked for while that one still drained, it launched a spot replica (and its
    on-demand cover) that was released again as soon as the drain ended."""
    router = DrainingRouter()
    world["router"] = router
    lean = SPEC.replace("num_overprovision: 1", "num_overprovision: 0")
    world["spec"] = load_spec(write_spec(lean, "lean.yaml"))
    ctl, clock = make(world), world["clock"]
    settle(ctl, clock)
    router.busy.clear()  # the start-up's on-demand covers drained
    settle(ctl, clock)
    old = {r.id for r in ctl.state.live()}
    assert len(old) == 2 and "drain" not in ctl.state.extra
    first_new = ctl.state.next_id
    _reconfigure(ctl, load_spec(write_spec(lean.replace('command: "true"', 'command: "serve"'), "b.yaml")))
    settle(ctl, clock, ticks=10)  # the released replicas' requests still run
    router.busy.clear()
    settle(ctl, clock, ticks=5)
    live = ctl.state.live()
    assert not {r.id for r in live} & old  # rolled over
    assert sorted(r.market for r in live) == ["spot", "spot"]
    launched = sorted(
        (r.id, r.market) for r in ctl.state.replicas.values() if int(r.id.split("-")[1]) >= first_new
    )
    assert [rid for rid, market in launched if market == "spot"] == sorted(r.id for r in live), launched


class ColdStartProber(FakeProber):
    """READY `cold` seconds after the fake cloud provisioned a replica (a cold start)."""

    def __init__(self, clock: Clock, cold: float = 120.0) -> None:
        super().__init__()
        self.clock, self.cold = clock, cold

    def probe(self, records):
        self.calls += 1
        up = {
            r.id: r.provisioned_at is not None and self.clock() - r.provisioned_at >= self.cold
            for r in records
        }
        return {rid: (ok, "200" if ok else "down") for rid, ok in up.items()}


#: N = 3 with the extra in three local zones, run.command v1, probes that never time out the
#: 120 s cold starts (`_calm_gathered`): the rolling-update and placement-move tests' service.
THREE_ZONES_V1 = (
    "name: svc\nplacement: {clouds: [local], zones: [local-a, local-b, local-c]}\n"
    "replica_policy: {min_replicas: 3, num_overprovision: 1}\n"
    "readiness_probe: {path: /health, initial_delay_seconds: 600}\n"
    'run: {command: "v1"}\n'
)


def _base_ondemand_spec(n: int, base: int, policy: str) -> str:
    """Three local zones, N replicas of which `base` are the base on-demand ones, no extra, and a
    probe whose cold start (600 s) outlasts a pass: the rolling-update-with-base tests' service."""
    return (
        "name: svc\nplacement: {clouds: [local], zones: [local-a, local-b, local-c]}\n"
        f"replica_policy: {{min_replicas: {n}, num_overprovision: 0, "
        f"base_ondemand_fallback_replicas: {base}, policy: {policy}}}\n"
        "readiness_probe: {path: /health, initial_delay_seconds: 600}\n"
        'run: {command: "v1"}\n'
    )


def _calm_gathered(tmp_path: Path, write_spec, text: str, passes: int = 600) -> tuple[Controller, Clock]:
    """A controller of `text` (cold starts of 120 s) after `passes` passes 120 s apart (600: 20 h
    of calm, the replicas settled)."""
    clock = Clock()
    ctl = clocked_controller(
        load_spec(write_spec(text)), tmp_path / "state", clock, prober=ColdStartProber(clock)
    )
    for _ in range(passes):
        ctl.tick()
        clock.advance(120.0)
    return ctl, clock


def _roll(ctl: Controller, clock: Clock, write_spec, text: str, passes: int) -> int:
    """Edit `run.command` v1 -> v2 (a rolling update) and run `passes` passes 5 s apart; returns
    the fewest READY replicas not draining seen after any pass."""
    _reconfigure(ctl, load_spec(write_spec(text.replace('"v1"', '"v2"'), "v2.yaml")))
    lowest = len(ctl.state.live())
    for _ in range(passes):
        ctl.tick()
        live = ctl.state.live()
        lowest = min(lowest, sum(r.fact().status is ReplicaStatus.READY and not r.draining for r in live))
        clock.advance(5.0)
    return lowest


@pytest.mark.parametrize("zone_count", [3, 5])
def test_a_rolling_update_of_serving_spot_replicas_buys_no_on_demand_and_keeps_n_ready(
    tmp_path: Path, write_spec, zone_count
):
    """N = 3 calm spot replicas of the default policy, a 120 s cold start, a new `run.command`:
    each step's surge is one spot replica, started while the outdated one it replaces serves,
    so nothing needs an on-demand stand-in. The policy, asked for N + 1 as if the service needed
    them, covered every starting surge with an on-demand replica, released again once the surge
    was READY (measured: 3 on-demand launches, 360 on-demand replica-seconds per update in three
    zones; in five, the released extra came back too: 6 launches, 720 s, and the replicas left
    gathered in one zone ended spread over three)."""
    zone_names = ", ".join(f"local-{c}" for c in "abcde"[:zone_count])
    text = (
        f"name: svc\nplacement: {{clouds: [local], zones: [{zone_names}]}}\n"
        "replica_policy: {min_replicas: 3, num_overprovision: 1}\n"
        "readiness_probe: {path: /health, initial_delay_seconds: 600}\n"
        'run: {command: "v1"}\n'
    )
    ctl, clock = _calm_gathered(tmp_path, write_spec, text)  # the extra released, the replicas gathered
    old = ctl.state.live()
    assert [r.market for r in old] == ["spot"] * 3 and len({r.zone for r in old}) == 1
    assert all(r.fact().status is ReplicaStatus.READY for r in old)
    started = clock()
    lowest = _roll(ctl, clock, write_spec, text, 200)  # 1000 s: a step is one cold start
    live = ctl.state.live()
    assert not {r.id for r in live} & {r.id for r in old}  # rolled over
    assert [r.market for r in live] == ["spot"] * 3 and {r.zone for r in live} == {old[0].zone}
    launched = [r for r in ctl.state.replicas.values() if r.launched_at >= started]
    assert [r.market for r in launched] == ["spot"] * 3, [(r.id, r.market, r.zone) for r in launched]
    assert lowest == 3


@pytest.mark.parametrize("policy", ["skyhedge", "spothedge", "skyserve"])
@pytest.mark.parametrize("n", [1, 3])
def test_a_rolling_update_of_an_all_on_demand_service_keeps_n_ready(tmp_path: Path, write_spec, n, policy):
    """`base_ondemand_fallback_replicas` = N: the update's surge is a spot replica (with its
    extra), each on-demand replica is replaced once the surge is READY, and when the last
    outdated one was released the policy, back to N on-demand replicas and no spot, released the
    READY spot replicas in the pass that launched the last on-demand replacement (measured, 120 s
    cold start: N = 1 at 0 READY, N = 3 at 2, for 120 s; the default policy first, SpotHedge
    and SkyServe until review 4). They serve until the on-demand replicas are READY."""
    text = _base_ondemand_spec(n, n, policy)
    ctl, clock = _calm_gathered(tmp_path, write_spec, text, passes=30)
    old = ctl.state.live()
    assert [r.market for r in old] == ["on-demand"] * n
    lowest = _roll(ctl, clock, write_spec, text, 300)  # 1500 s: N steps of a cold start or two each
    live = ctl.state.live()
    assert not {r.id for r in live} & {r.id for r in old}  # rolled over
    assert [r.market for r in live] == ["on-demand"] * n  # and back to on-demand only
    assert lowest == n


@pytest.mark.parametrize("policy", ["skyhedge", "spothedge", "skyserve"])
@pytest.mark.parametrize("n", [2, 3])
def test_a_rolling_update_with_a_base_on_demand_replica_keeps_n_ready(tmp_path: Path, write_spec, policy, n):
    """`base_ondemand_fallback_replicas: 1`, no extra: the base replica's replacement is a surge,
    a spot replica, and once the outdated base replica was released the fallback traded a spot
    replica back for an on-demand one, released READY in the pass that launched it (measured,
    120 s cold start: N = 2 at 1 READY with `skyhedge`, N = 3 at 2 with SpotHedge and SkyServe,
    for a cold start). The READY spot replica serves until the on-demand one is READY."""
    text = _base_ondemand_spec(n, 1, policy)
    ctl, clock = _calm_gathered(tmp_path, write_spec, text, passes=150)
    old = ctl.state.live()
    assert sorted(r.market for r in old) == ["on-demand"] + ["spot"] * (n - 1)
    assert all(r.fact().status is ReplicaStatus.READY for r in old)
    lowest = _roll(ctl, clock, write_spec, text, 240)  # 1200 s: N steps of a cold start each
    live = ctl.state.live()
    assert not {r.id for r in live} & {r.id for r in old}  # rolled over
    assert sorted(r.market for r in live) == ["on-demand"] + ["spot"] * (n - 1)
    assert lowest == n


@pytest.mark.parametrize("policy", ["skyhedge", "spothedge"])
def test_a_narrowed_placement_moves_serving_spot_replicas_without_buying_on_demand(
    tmp_path: Path, write_spec, policy
):
    """N = 3 calm spot replicas, a 120 s cold start; `placement` drops the zone holding them
    (all three with `skyhedge`, which gathers them; two with `spothedge`, which spreads N + 1).
    The replicas outside keep serving until their replacements are READY, so the move needs no
    on-demand cover: the policy, which sees only the replicas inside, was told nothing of them
    and took the move for an outage (measured: 3 on-demand launches, 360 on-demand
    replica-seconds with `skyhedge`; 2 and 240 s with `spothedge`; the move took as long)."""
    zones = "zones: [local-a, local-b, local-c]"
    text = (
        f"name: svc\nplacement: {{clouds: [local], {zones}}}\n"
        f"replica_policy: {{min_replicas: 3, num_overprovision: 1, policy: {policy}}}\n"
        "readiness_probe: {path: /health, initial_delay_seconds: 600}\n"
        'run: {command: "v1"}\n'
    )
    ctl, clock = _calm_gathered(tmp_path, write_spec, text)
    old = ctl.state.live()
    assert all(r.market == "spot" and r.fact().status is ReplicaStatus.READY for r in old)
    dropped = old[0].zone
    kept = ", ".join(z for z in ("local-a", "local-b", "local-c") if z != dropped)
    moving = {r.id for r in old if r.zone == dropped}
    started = clock()
    reconfigured(ctl, load_spec(write_spec(text.replace(zones, f"zones: [{kept}]"), "narrowed.yaml")))
    lowest, done = 99, None
    for _ in range(120):  # 600 s: the move is one cold start
        ctl.tick()
        ready = [r for r in ctl.state.live() if r.fact().status is ReplicaStatus.READY and not r.draining]
        lowest = min(lowest, len(ready))
        if done is None and not moving & {r.id for r in ctl.state.live()}:
            done = clock() - started
        clock.advance(5.0)
    assert {r.zone for r in ctl.state.live()} <= set(kept.split(", "))
    launched = [r for r in ctl.state.replicas.values() if r.launched_at >= started]
    assert [r.market for r in launched if r.market != "spot"] == [], [(r.id, r.market) for r in launched]
    assert lowest >= 3
    assert done is not None and done <= 150.0, done  # one cold start and a pass per release


@pytest.mark.parametrize("policy", ["spothedge", "skyserve", "skyhedge"])
def test_a_narrowed_placement_keeps_the_base_on_demand_replicas_through_the_move(
    tmp_path: Path, write_spec, monkeypatch, policy
):
    """`base_ondemand_fallback_replicas: 1` runs on-demand at all times, a move too. A catalog
    where local-a sells on-demand cheapest and spot dearest puts the base there and the 3 spot
    replicas (N = 3 and the extra) in local-b..d; `placement` then keeps local-a and local-e only,
    so all three spot replicas serve outside: the move's surge is all of N. SpotHedge's fallback
    capped its on-demand replicas at N - surge, so it terminated the READY base replica, left the
    service without one until the replicas outside were released, and launched it again."""
    import json as _json

    catalog = _json.loads((Path(__file__).parents[1] / "skyhedge/catalog/data/local.json").read_text())
    for offer in catalog["offers"]:
        dear = offer["zone"] == "local-a"
        offer["ondemand_price"], offer["spot_price"] = (0.5, 0.9) if dear else (1.0, 0.3)
    (tmp_path / "catalog").mkdir()
    (tmp_path / "catalog" / "local.json").write_text(_json.dumps(catalog))
    monkeypatch.setenv("SKYHEDGE_CATALOG_DIR", str(tmp_path / "catalog"))
    zones = "zones: [local-a, local-b, local-c, local-d, local-e]"
    text = (
        f"name: svc\nplacement: {{clouds: [local], {zones}}}\n"
        "replica_policy: {min_replicas: 3, num_overprovision: 1, base_ondemand_fallback_replicas: 1, "
        f"policy: {policy}}}\n"
        "readiness_probe: {path: /health, initial_delay_seconds: 600}\n"
        'run: {command: "v1"}\n'
    )
    ctl, clock = _calm_gathered(tmp_path, write_spec, text)
    old = ctl.state.live()
    base = [r for r in old if r.market != "spot"]
    assert [r.zone for r in base] == ["local-a"] and all(r.zone != "local-a" for r in old if r not in base)
    assert all(r.fact().status is ReplicaStatus.READY for r in old)
    started = clock()
    reconfigured(
        ctl, load_spec(write_spec(text.replace(zones, "zones: [local-a, local-e]"), "narrowed.yaml"))
    )
    lowest, lowest_ondemand = 99, 99
    for _ in range(120):  # 600 s: the move is one cold start
        ctl.tick()
        ready = [r for r in ctl.state.live() if r.fact().status is ReplicaStatus.READY and not r.draining]
        lowest = min(lowest, len(ready))
        lowest_ondemand = min(lowest_ondemand, sum(r.market != "spot" for r in ready))
        clock.advance(5.0)
    assert {r.zone for r in ctl.state.live()} <= {"local-a", "local-e"}
    assert base[0].id in {r.id for r in ctl.state.live()}  # the base replica was never released
    launched = [r for r in ctl.state.replicas.values() if r.launched_at >= started]
    assert [r.id for r in launched if r.market != "spot"] == []
    assert lowest_ondemand == 1 and lowest >= 3


def test_replicas_outside_a_narrowed_placement_stand_in_only_while_they_serve(tmp_path: Path, write_spec):
    """The move's replicas outside stand in for their replacements only while READY: lost mid
    move (preempted, failing their probe), they serve nothing, and on-demand covers the starting
    replacements as it covers any spot replica not READY."""
    text = THREE_ZONES_V1
    ctl, clock = _calm_gathered(tmp_path, write_spec, text)
    old = ctl.state.live()
    dropped = old[0].zone
    kept = [z for z in ("local-a", "local-b", "local-c") if z != dropped]
    narrowed = text.replace("local-a, local-b, local-c", ", ".join(kept))
    reconfigured(ctl, load_spec(write_spec(narrowed, "narrowed.yaml")))
    ctl.tick()
    clock.advance(5.0)
    assert [r.market for r in ctl.state.live() if r.market != "spot"] == []
    for rec in old:
        ctl.sources[0].queue.append(
            PreemptionEvent(Signal.GONE, clock(), "fake", replica_id=rec.id, reason="preempted")
        )
    ctl.tick()
    assert not {r.id for r in old} & {r.id for r in ctl.state.live()}
    assert sum(r.market != "spot" for r in ctl.state.live()) == 3  # nothing READY serves: covered


@pytest.mark.parametrize("change", ["revision", "placement"])
def test_a_rolling_update_in_a_spot_drought_is_said_stalled_by_status_until_it_moves_again(
    tmp_path: Path, write_spec, change, caplog
):
    """Every spot launch refused (a drought in every allowed zone) while a rolling update or a
    placement move waits for its replacements: the outdated replicas serve on (no on-demand
    stand-in for them), so `status` showed 3 READY replicas and nothing else for as long as it
    lasted, and the watcher's log a refusal every few seconds. The watcher now says once that the
    update is stalled and why, `status` (text and --json) shows it, and both end once spot
    capacity is back and the update is done."""
    from click.testing import CliRunner

    from skyhedge.cli import main
    from skyhedge.state import ROLLOUT_KEY

    text = THREE_ZONES_V1
    ctl, clock = _calm_gathered(tmp_path, write_spec, text)
    old = ctl.state.live()
    ctl.executor.refuse_zones = {"local-a", "local-b", "local-c"}
    if change == "revision":
        edited = text.replace('"v1"', '"v2"')
    else:
        kept = [z for z in ("local-a", "local-b", "local-c") if z != old[0].zone]
        edited = text.replace("local-a, local-b, local-c", ", ".join(kept))
    spec_path = write_spec(edited, "edited.yaml")
    reconfigured(ctl, load_spec(spec_path))

    def status(*flags: str) -> str:
        args = ["status", str(spec_path), "--state-dir", str(tmp_path / "state"), *flags]
        out = CliRunner().invoke(main, args)
        assert out.exit_code == 0, out.output
        return out.output if flags else " ".join(out.output.split())

    for _ in range(40):  # 200 s: refused, not stalled yet
        ctl.tick()
        clock.advance(5.0)
    assert ctl.state.extra[ROLLOUT_KEY]["stalled_since"] is None
    assert "Rolling update: r-" in status() and "STALLED" not in status()
    for _ in range(40):  # 400 s
        ctl.tick()
        clock.advance(5.0)
        assert sum(r.fact().status is ReplicaStatus.READY for r in ctl.state.live()) >= 3
    said = [r.getMessage() for r in caplog.records if "rolling update stalled" in r.getMessage()]
    assert len(said) == 1 and "no spot capacity" in said[0], said
    shown = status()
    assert "STALLED since" in shown and "was refused (local-" in shown, shown
    assert all(r.id in shown for r in old)
    record = json.loads(status("--json"))["rollout"]
    assert record["stalled_since"] is not None and sorted(record["replicas"]) == sorted(r.id for r in old)
    ctl.executor.refuse_zones = set()  # spot is back: the update goes on and ends
    for _ in range(200):
        ctl.tick()
        clock.advance(5.0)
    assert not {r.id for r in old} & {r.id for r in ctl.state.live()}
    assert ROLLOUT_KEY not in ctl.state.extra and "Rolling update" not in status()


def test_a_wall_clock_jump_moves_the_rolling_updates_times():
    """The refusals' start is a wall-clock time: a clock set forward 2 h read as 2 h of refused
    launches, and the next refusal said the update stalled at once."""
    from skyhedge.controller.facts import shift_times
    from skyhedge.state import ROLLOUT_KEY, ServiceState

    record = {"replicas": ["r-0001"], "since": 1000.0, "refused": {"local-b": 2}}
    record |= {"refused_since": 1010.0, "stalled_since": None}
    state = ServiceState(service="svc", extra={ROLLOUT_KEY: dict(record)})
    shift_times(state, 7200.0, lambda t: t <= 1020.0)
    assert state.extra[ROLLOUT_KEY] == {**record, "since": 8200.0, "refused_since": 8210.0}


def test_replicas_started_beside_refused_launches_are_probed_without_waiting_for_the_backoff(world):
    """A market replay opened one zone after every zone had refused launches for a while: the
    apply that launched into it had refusals too, so it counted as failed, and the next pass
    came only after the grown backoff (measured: healthy replicas READY after 25, 33 and 61 s
    instead of 1.5 s, their on-demand cover paid meanwhile). The backoff spaces applies, not
    the probes of replicas that did start."""
    ex, clock, prober = world["executor"], world["clock"], world["prober"]
    ex.refuse_zones = {"local-a", "local-b", "local-c"}
    # (a replay's pace: its zones are asked again a tick after a refusal, `MarketReplay.attach`)
    ctl = make(world, busy_interval=0.5, max_backoff=60.0, spot_retry=0.5, max_spot_retry=0.5)
    for _ in range(7):  # every spot launch refused, pass after pass: the backoff grows
        clock.advance(ctl.tick())
        ctl.woken = True
    ex.refuse_zones = {"local-b", "local-c"}  # local-a has room again (the wake-up: capacity file)
    delay = ctl.tick()
    started = [r for r in ctl.state.live() if r.market == "spot"]
    assert started and all(r.zone == "local-a" and r.fact().status is ReplicaStatus.STARTING for r in started)
    assert delay <= 0.5  # was 0.5 * 2**8 -> 60 s
    # a probe-paced pass that learns nothing new does not retry the refused launches yet
    prober.down = {r.id for r in started}
    calls = len(ex.calls)
    clock.advance(delay)
    ctl.woken = False
    assert ctl.tick() <= 0.5
    assert len(ex.calls) == calls
    # the next one finds them READY: routed at once, and the plan acts on it
    prober.down = set()
    clock.advance(0.5)
    ctl.tick()
    assert all(r.fact().status is ReplicaStatus.READY for r in started)
    assert {r.id for r in started} <= set(world["router"].current)
    assert len(ex.calls) > calls


def test_failures_are_logged_as_warnings_and_the_rest_as_info(world, caplog):
    """A log pipeline alerting on warnings, and `--log-level warning`, saw no failure: every
    notice was INFO, "apply failed" included (found by an audit)."""
    import logging

    ctl, ex = make(world), world["executor"]
    ex.fail_next = "local/local: boom"
    with caplog.at_level(logging.INFO, logger="skyhedge.controller"):
        ctl.tick()
    levels = {r.getMessage().split(": ", 1)[1].split(":")[0]: r.levelname for r in caplog.records}
    assert levels["apply failed"] == "WARNING", levels
    assert levels["plan"] == "INFO", levels


def test_a_command_that_died_in_a_python_traceback_is_explained_by_its_exception():
    """A Ctrl-C reaching a local launcher while it imported its modules read `execution halted
    (Traceback (most recent call last): File ".../urllib/parse.py" ...)` (found by an audit)."""
    from skyhedge.controller.loop import apply_cause

    frames = (
        "Error: local-exec provisioner error\n"
        "Error running command 'r-0002': exit status 1. Output: Traceback (most recent call last):\n"
        '  File "/usr/lib/python3.11/runpy.py", line 198, in _run_module_as_main\n'
        '  File "/usr/lib/python3.11/urllib/parse.py", line 40, in <module>\n'
        "    import re\n"
    )
    assert apply_cause(frames + "KeyboardInterrupt\n") == "interrupted (a Ctrl-C reached the command)"
    missing = frames + "ModuleNotFoundError: No module named 'yaml'\n"
    assert apply_cause(missing) == "ModuleNotFoundError: No module named 'yaml'"


class RotatingRouter(FakeRouter):
    def __init__(self) -> None:
        super().__init__()
        self.rotations = 0

    def rotate_logs(self) -> list[Path]:
        self.rotations += 1
        return []


def test_the_watcher_has_the_routers_logs_rotated_about_once_a_minute(world, monkeypatch):
    """The access log grows with every request: a watcher running for weeks keeps it bounded by
    asking the router to rotate its logs, at its first pass and then at most once a minute."""
    import skyhedge.controller.loop as loop

    world["router"] = RotatingRouter()
    ctl = make(world)
    settle(ctl, world["clock"], ticks=5)
    assert world["router"].rotations == 1
    monkeypatch.setattr(loop, "HOUSEKEEP_SECONDS", 0.0)
    settle(ctl, world["clock"], ticks=2)
    assert world["router"].rotations == 3


def test_a_full_disk_failing_every_pass_still_has_the_logs_rotated(world, monkeypatch):
    """On a full disk every pass failed at its write of state.json, before its housekeeping:
    the logs it rotates (nginx's, a local replica's), often what filled the disk, grew on and
    the disk stayed full. The housekeeping now runs after a failed pass too."""
    import skyhedge.controller.loop as loop
    from skyhedge.errors import StateError

    world["router"] = RotatingRouter()
    ctl = make(world)
    settle(ctl, world["clock"])
    assert world["router"].rotations == 1

    def full(state_dir, state):
        raise StateError(f"{state_dir}: cannot write the state dir (No space left on device)")

    monkeypatch.setattr(loop, "save_state", full)
    monkeypatch.setattr(loop, "HOUSEKEEP_SECONDS", 0.0)
    for victim in sorted(ctl.state.live(), key=lambda r: r.id)[:2]:
        preempt(world["source"], world["clock"], victim)
        with pytest.raises(StateError, match="No space left on device"):
            ctl.tick()
        world["clock"].advance(1)
    assert world["router"].rotations == 3


class ForgettingSource(FakeSource):
    def __init__(self) -> None:
        super().__init__()
        self.known: list[set[str]] = []

    def forget(self, known_ids: set[str]) -> list[str]:
        self.known.append(set(known_ids))
        return []


def test_the_watcher_has_its_sources_drop_what_they_keep_for_replicas_the_state_forgot(world, monkeypatch):
    """What a source keeps per replica (a local replica's log) outlives the replica; the state
    keeps the last GONE_KEPT gone records only. At its housekeeping the watcher hands the sources
    the IDs the state still records, live and gone, so they can drop the rest."""
    world["source"] = ForgettingSource()
    ctl = make(world)
    settle(ctl, world["clock"])
    victim = sorted(zones(ctl))[0]
    world["source"].queue.append(
        PreemptionEvent(Signal.GONE, world["clock"](), "fake", replica_id=victim, reason="preempted")
    )
    import skyhedge.controller.loop as loop

    monkeypatch.setattr(loop, "HOUSEKEEP_SECONDS", 0.0)  # every pass is due for housekeeping
    settle(ctl, world["clock"], ticks=2)
    assert len(world["source"].known) == 3  # the first pass of three, then each of two
    assert world["source"].known[-1] == set(load_state(world["dir"], "svc").replicas)
    assert victim in world["source"].known[-1] and ctl.state.replicas[victim].gone_at is not None


def test_a_pass_over_a_state_full_of_refused_launches_digests_the_spec_once_per_cloud(world, monkeypatch):
    """Under a market replay, or a long capacity outage, most of the GONE_KEPT gone records the
    state keeps are refused launches, recorded `failed`. The crash-loop check digested the spec
    (`replica_revision`, a JSON dump and a SHA-256) once per such record, twice or more a pass:
    with 419 of them a pass cost 46 ms of CPU instead of 29 ms (10 passes a second at K = 300)."""
    import skyhedge.controller.loop as loop
    from skyhedge.state import ReplicaRecord

    ctl = make(world)
    settle(ctl, world["clock"])
    now = world["clock"]()
    for n in range(1000, 1400):  # refused launches within the crash window, and older ones
        ctl.state.replicas[f"r-{n:04d}"] = ReplicaRecord(
            id=f"r-{n:04d}",
            cloud="local",
            region="local",
            zone="local-a",
            market="spot",
            launched_at=now - (n - 1000) * 3,
            gone_at=now - (n - 1000) * 3,
            reason="failed",
            revision=replica_revision(world["spec"], "local"),
        )
    digests = []
    real = loop.replica_revision
    monkeypatch.setattr(loop, "replica_revision", lambda *a, **kw: digests.append(a) or real(*a, **kw))
    ctl.tick()
    assert 0 < len(digests) <= 4  # once per cloud for each of the pass's crash-loop checks
    assert ctl._crash_hold(now) == 0  # never provisioned: no crash loop, as before


def test_the_log_says_what_the_autoscaler_waits_for_and_why_its_target_moved(world, write_spec):
    """A wish waits out its delay (downscale_delay_seconds: 20 minutes by default) before it is
    adopted: the log said nothing until then, and a target moved by a reloaded max_replicas was
    put down to the request rate (found by an audit under real load)."""
    ctl, clock, router = make(world), world["clock"], world["router"]
    for _ in range(70):  # 35 req/s against 10 per replica: wants 4, adopted after 5 s
        router.count = (router.count or 0) + 35
        ctl.tick()
        clock.advance(1)
    texts = [n.text for n in ctl.notes if n.text.startswith("autoscaler:")]
    wish = next(i for i, t in enumerate(texts) if t.startswith("autoscaler: wants "))
    assert texts[wish].endswith("adopted after upscale_delay_seconds (5 s) if the rate holds")
    assert "wants 3 replicas, not 2 (" in texts[wish] or "wants 4 replicas, not 2 (" in texts[wish]
    adopted = next(i for i, t in enumerate(texts) if t.startswith("autoscaler: target 2 -> "))
    assert wish < adopted and texts[adopted].endswith(" req/s)")
    assert ctl.state.target == 4
    _reconfigure(ctl, load_spec(write_spec(SPEC.replace("max_replicas: 4", "max_replicas: 3"), "m3.yaml")))
    router.count += 35
    ctl.tick()
    assert ctl.state.target == 3
    assert "autoscaler: target 4 -> 3 (min_replicas/max_replicas changed)" in [n.text for n in ctl.notes]


def _count_writes(monkeypatch) -> list[float]:
    """The controller's state.json writes from now on (each as the `decided_at` it wrote)."""
    import skyhedge.controller.loop as loop

    writes: list[float] = []
    real = loop.save_state

    def counted(state_dir, state):
        writes.append(state.extra.get("decided_at"))
        return real(state_dir, state)

    monkeypatch.setattr(loop, "save_state", counted)
    return writes


def _just_written(ctl: Controller, clock: Clock, writes: list) -> None:
    """Idle passes 10 s apart until one writes state.json (the clocks' flush, at most SAVE_EVERY
    after the last write): the next SAVE_EVERY seconds of idle passes must then write nothing."""
    for _ in range(20):
        n = len(writes)
        ctl.tick()
        clock.advance(10)
        if len(writes) > n:
            return
    raise AssertionError("no idle pass wrote state.json in 200 s")


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return (st.st_ino, st.st_mtime_ns)


@pytest.mark.parametrize("policy", ["spothedge", "skyhedge"])
def test_idle_passes_do_not_rewrite_the_state_file_until_their_clocks_are_a_minute_old(
    world, monkeypatch, policy
):
    """A soak audit: an idle watcher rewrote and fsynced state.json every pass, because the
    autoscaler's samples, the decision time (`decided_at`) and the `skyhedge` policy's decision
    clock move every pass (320 kB a pass at the GONE_KEPT cap: 2.8 GB a day at 10 s). Idle
    passes write them at most once every SAVE_EVERY seconds (a crash loses a minute of them).
    (SURVIVED reports, once a `survival_period`, are events: written when made, so kept apart.)"""
    from skyhedge.controller.loop import SAVE_EVERY

    ctl, clock, ex = make(world, policy=policy, survival_period=3600), world["clock"], world["executor"]
    settle(ctl, clock, 40)
    writes = _count_writes(monkeypatch)
    _just_written(ctl, clock, writes)
    path = world["dir"] / "state.json"
    written_at, stamp, applies = clock() - 10, _stamp(path), len(ex.calls)
    writes.clear()
    while clock() - written_at < SAVE_EVERY:  # 5 idle passes
        ctl.tick()
        assert writes == [] and _stamp(path) == stamp
        clock.advance(10)
    assert len(ex.calls) == applies  # idle passes indeed
    # the clocks did move: only state.json lags behind them
    disk, mem = load_state(world["dir"], "svc"), ctl.state
    assert disk.extra["decided_at"] < mem.extra["decided_at"]
    assert disk.extra["autoscaler"]["samples"] != mem.extra["autoscaler"]["samples"]
    if policy == "skyhedge":
        assert disk.policy_memory["memory"]["last_now"] < mem.policy_memory["memory"]["last_now"]
    assert {k: v for k, v in disk.extra.items() if k not in ("decided_at", "autoscaler", "survival_at")} == {
        k: v for k, v in mem.extra.items() if k not in ("decided_at", "autoscaler", "survival_at")
    }
    ctl.tick()  # SAVE_EVERY after the last write: the clocks are written
    assert len(writes) == 1 and _stamp(path) != stamp
    assert load_state(world["dir"], "svc").to_json() == ctl.state.to_json()


def test_a_change_beyond_the_clocks_is_written_by_the_pass_that_makes_it(world, monkeypatch):
    """Replica records, events, the plan's intent and the autoscaler's wish never wait for the
    clocks' minute: the intent is on disk before the executor runs, and the pass's outcome when
    it ends."""
    ctl, clock, ex, src = (
        make(world, survival_period=3600),
        world["clock"],
        world["executor"],
        world["source"],
    )
    settle(ctl, clock, 40)
    writes = _count_writes(monkeypatch)
    _just_written(ctl, clock, writes)
    writes.clear()
    ctl.tick()  # idle: its clocks are held back
    clock.advance(10)
    assert writes == []
    victim = next(r for r in ctl.state.live() if r.zone == "local-a")
    preempt(src, clock, victim)
    before, seen_by_apply = set(ctl.state.replicas), []
    real_apply = ex.apply

    def apply(state, plan, now):
        seen_by_apply.append(load_state(world["dir"], "svc"))
        return real_apply(state, plan, now)

    ex.apply = apply
    ctl.tick()
    intent = seen_by_apply[0]
    assert intent.replicas[victim.id].gone_at is not None  # the event's fact
    new = set(intent.replicas) - before
    assert new and all(intent.replicas[rid].provisioned_at is None for rid in new)  # before Terraform ran
    assert load_state(world["dir"], "svc").to_json() == ctl.state.to_json()  # and the pass's outcome
    # a wish of the autoscaler (50 req/s against 10 per replica) is written at once, samples too
    settle(ctl, clock, 40)
    _just_written(ctl, clock, writes)
    writes.clear()
    ctl.tick()
    clock.advance(10)
    assert writes == []  # idle again
    world["router"].count += 3000
    ctl.tick()
    assert ctl.state.extra["autoscaler"]["pending"] == 4 and len(writes) == 1
    assert load_state(world["dir"], "svc").extra["autoscaler"] == ctl.state.extra["autoscaler"]


def _churn(ctl: Controller, clock: Clock, src: FakeSource, preemptions: int) -> None:
    """`preemptions` spot replicas preempted one after another, each replaced and READY."""
    for _ in range(preemptions):
        victim = next(r for r in ctl.state.live() if r.market == "spot" and r.provisioned_at is not None)
        gone = PreemptionEvent(Signal.GONE, clock(), "fake", replica_id=victim.id, reason="preempted")
        src.queue.append(gone)
        settle(ctl, clock, 3)


def _encoded_records(monkeypatch) -> list[str]:
    """The replica records JSON-encoded from now on (their IDs), whichever way they are encoded:
    alone, or within a whole state."""
    import json

    encoded: list[str] = []
    real = json.dumps

    def counting(obj, *args, **kwargs):
        if isinstance(obj, dict):
            if "gone_at" in obj and "id" in obj:
                encoded.append(obj["id"])
            if isinstance(obj.get("replicas"), dict):
                encoded.extend(obj["replicas"])
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(json, "dumps", counting)
    return encoded


def test_an_idle_pass_does_not_encode_the_gone_records_again(world, monkeypatch):
    """A soak audit (`up --market-trace` at speedup 300, a pass every 0.1 s): an idle pass took
    13 ms with 5 gone records and 33 ms once the state held its GONE_KEPT (500), because every
    pass encoded the whole state, every gone record included, to tell whether it changed. A gone
    record never changes again: a record is encoded when it changes."""
    ctl, clock, src = make(world, survival_period=3600), world["clock"], world["source"]
    settle(ctl, clock, 40)
    _churn(ctl, clock, src, 20)
    gone = {r.id for r in ctl.state.replicas.values() if r.gone_at is not None}
    assert len(gone) >= 20
    writes = _count_writes(monkeypatch)
    _just_written(ctl, clock, writes)
    writes.clear()
    encoded = _encoded_records(monkeypatch)
    for _ in range(5):  # idle passes, none writing
        ctl.tick()
        clock.advance(10)
    assert writes == []
    assert not gone & set(encoded)


def test_a_gone_record_changed_in_place_is_still_written(world, monkeypatch):
    """What `_texts` keeps of each record is its values as they were: a field changed in place
    (a dict of outputs) is a change of the state, written by the next pass."""
    ctl, clock, src = make(world, survival_period=3600), world["clock"], world["source"]
    settle(ctl, clock, 40)
    _churn(ctl, clock, src, 3)
    writes = _count_writes(monkeypatch)
    _just_written(ctl, clock, writes)
    writes.clear()
    ctl.tick()
    clock.advance(10)
    assert writes == []  # idle
    rec = next(r for r in ctl.state.replicas.values() if r.gone_at is not None)
    rec.outputs["log"] = "/var/log/r.log"
    ctl.tick()
    assert len(writes) == 1
    assert load_state(world["dir"], "svc").replicas[rec.id].outputs["log"] == "/var/log/r.log"
    clock.advance(10)
    ctl.state.replicas.pop(rec.id)  # and one forgotten
    ctl.tick()
    assert len(writes) == 2 and rec.id not in load_state(world["dir"], "svc").replicas


def test_a_line_per_replica_does_not_walk_every_recent_line_for_each(world):
    """A zone of 1,000 replicas preempted notes a line for each (and as many again when their
    replacements are READY): the table of recent lines that suppresses repeats was pruned at
    every line, walking all of them each time (0.7 s of that pass). It is pruned once it has
    doubled; repeats are suppressed as before, and the table stays bounded."""
    ctl = make(world)
    walked = [0]

    class At(float):  # a time that counts how often it is compared with a noted line's
        def __sub__(self, other: float) -> float:
            walked[0] += 1
            return float(self) - float(other)

    for i in range(2000):
        ctl.note(f"r-{i:04d} preempted", At(1000.0 + i / 1000))
    assert len(ctl.notes) > 0
    assert walked[0] <= 10 * 2000  # (pruned per line: 2,000,000)
    ctl.note("r-0007 preempted", At(1010.0))
    assert ctl.notes[-1].text == "r-1999 preempted"  # a repeat within the minute: not noted again
    for second in range(600):  # a line a second for ten minutes: the table keeps about a minute
        ctl.note(f"line {second}", At(2000.0 + second))
    assert len(ctl._noted) <= 2 * 61 + 1
    ctl.note("r-0007 preempted", At(3000.0))
    assert ctl.notes[-1].text == "r-0007 preempted"  # a minute later it is


def test_notes_from_a_replays_thread_and_the_loops_lose_and_double_nothing(world):
    # `up --market-trace`: the replay's thread notes each capacity change (`MarketReplay.on_change`
    # is `Controller.note`) while the loop's thread notes its own lines. Both change the table of
    # lines noted (pruned by rebinding it) and `notes`: unguarded, lines of one thread were lost
    # from the table (measured: 38,468 of 40,000 kept), so their repeats were noted again, and a
    # line both threads noted at once could be noted twice.
    import logging
    import sys
    import threading

    ctl = make(world)
    said: list[str] = []

    class Heard(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    heard = Heard(logging.INFO)
    logger = logging.getLogger("skyhedge.controller")
    logger.addHandler(heard)
    old_level, old_switch = logger.level, sys.getswitchinterval()
    logger.setLevel(logging.INFO)
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    failures: list[BaseException] = []
    n = 8000

    def replay() -> None:
        try:
            for i in range(n):
                ctl.note(f"market tick {i}: local-a capacity {i % 3}")
                ctl.note(f"both {i}")
        except BaseException as exc:  # noqa: BLE001 (what the thread met is the test's finding)
            failures.append(exc)

    try:
        thread = threading.Thread(target=replay)
        thread.start()
        for i in range(n):
            ctl.note(f"loop line {i}")
            ctl.note(f"both {i}")
        thread.join()
    finally:
        sys.setswitchinterval(old_switch)
        logger.removeHandler(heard)
        logger.setLevel(old_level)
    assert not failures
    # the clock stood still: every line is within the repeat window, so each is noted once and kept
    assert len(ctl._noted) == 3 * n
    mine = [line.split(": ", 1)[1] for line in said]
    assert len(mine) == 3 * n and len(set(mine)) == 3 * n
    assert len(ctl.notes) == ctl.notes.maxlen


def _jumping(world, **opts) -> tuple[Controller, Clock, Clock]:
    """A controller whose wall clock (`clock`) can jump while its monotonic clock runs on."""
    wall, mono = world["clock"], Clock(50.0)
    ctl = make(world, monotonic=mono, **opts)
    return ctl, wall, mono


def _both(wall: Clock, mono: Clock, seconds: float) -> None:
    wall.advance(seconds)
    mono.advance(seconds)


def _jumping_controller(spec, sdir: Path) -> tuple[Controller, Clock, Clock]:
    """`_jumping` for a spec of a test's own: fakes all round, one fake source."""
    wall, mono = Clock(), Clock(50.0)
    ctl = Controller(
        spec,
        sdir,
        executor=FakeExecutor(),
        router=FakeRouter(),
        prober=FakeProber(),
        sources=[FakeSource()],
        clock=wall,
        monotonic=mono,
    )
    return ctl, wall, mono


@pytest.mark.parametrize("jump", [7200.0, -7200.0])
def test_a_wall_clock_jump_fails_no_replica_and_moves_no_timer(world, jump):
    # the controller's times are wall-clock times kept in the state: a clock set forward 2 h (NTP
    # stepping a VM's clock, an operator) read as 2 h passed, and the next pass FAILED every replica
    # still loading its model (past initial_delay_seconds: 30 s) and every NOT_READY one (past the
    # 180 s grace); set back, a replica loading would only be FAILED 2 h later
    from skyhedge.controller.facts import NOT_READY_GRACE_SECONDS

    ctl, wall, mono = _jumping(world)
    prober = world["prober"]
    for _ in range(3):
        ctl.tick()
        _both(wall, mono, 1)
    failing = ctl.state.live()[0]
    prober.down.add(failing.id)
    ctl.tick()  # NOT_READY; the policy launches a replica to cover it
    _both(wall, mono, 1)
    loading = [r for r in ctl.state.live() if r.ready_at is None]
    assert loading and failing.fact().status is ReplicaStatus.NOT_READY
    prober.down |= {r.id for r in loading}  # still loading their model
    ctl.tick()
    _both(wall, mono, 1)
    wall.advance(jump)
    ctl.tick()
    assert failing.gone_at is None and all(r.gone_at is None for r in loading)
    assert any(n.text.startswith(f"the wall clock jumped {jump:+.0f}s") for n in ctl.notes)
    # the timers still run, on the clock as it now reads
    _both(wall, mono, 30)
    ctl.tick()
    assert all(r.gone_at == wall() and r.reason == "failed" for r in loading)
    assert failing.gone_at is None
    _both(wall, mono, NOT_READY_GRACE_SECONDS - 30)
    ctl.tick()
    assert failing.gone_at == wall() and failing.reason == "failed"


SKYHEDGE_SPEC = SPEC.replace("policy: spothedge", "policy: skyhedge\n  availability_target: 0.95")


def _layout(ctl: Controller) -> list[tuple[str, str, str, bool]]:
    return sorted((r.id, r.zone, r.market, r.draining) for r in ctl.state.live())


def _policy_view(ctl: Controller) -> tuple[dict[str, float], float]:
    """The `skyhedge` policy's zone ages and decision period as its next decision sees them."""
    from skyhedge.policy.skyhedge import SkyHedge

    policy = SkyHedge()
    policy.restore(ctl.state.policy_memory["memory"])
    now = ctl.clock()
    return {z: policy.zone_age(Location.parse(f"local/local/{z}"), now) for z in ("local-a", "local-b")}, (
        policy.outage_seconds
    )


def test_a_wall_clock_jump_does_not_age_the_policys_zones(tmp_path, write_spec):
    # The skyhedge policy ages zones from remembered times (its last trouble seen per zone, its
    # start) and averages its decision period: after a +2 h step it saw 2 h of calm everywhere,
    # a 300 s period, released its extra replica and the on-demand cover of unsettled spot ones.
    # A run whose clock jumps must decide exactly as one whose clock does not.
    def run(jump: float, where: str) -> tuple[Controller, list, tuple]:
        spec = load_spec(write_spec(SKYHEDGE_SPEC, name=f"{where}.yaml"))
        ctl, wall, mono = _jumping_controller(spec, tmp_path / where)
        for _ in range(5):
            ctl.tick()
            _both(wall, mono, 1)
        wall.advance(jump)
        view = _policy_view(ctl)  # (read before the pass that sees the jump: as the clock reads now)
        for _ in range(3):
            ctl.tick()
            _both(wall, mono, 1)
        return ctl, _layout(ctl), view

    still, layout, _ = run(0.0, "still")
    jumped, after, _ = run(7200.0, "jumped")
    assert any(market == "on-demand" for _, _, market, _ in layout)  # the hedge this is about
    assert after == layout
    assert _policy_view(jumped) == _policy_view(still)
    memory = jumped.state.policy_memory["memory"]
    assert memory["last_now"] == jumped.clock() - 1 and memory["start"] == 1000.0 + 7200.0


WAVE_SPEC = """
name: svc
placement:
  clouds: [local]
  zones: [local-a, local-b, local-c]
replica_policy: {min_replicas: 2, policy: skyhedge, availability_target: 0.95}
readiness_probe: {path: /health, initial_delay_seconds: 30}
run: {command: "true"}
"""


@pytest.mark.parametrize("jump", [4.0, -4.0])
def test_a_small_wall_clock_step_during_a_market_replay_changes_no_decision(tmp_path, write_spec, jump):
    """A replay's policy clock runs `rate` times as fast as the wall clock (`PolicyClock`), and so
    does a step of it: 4 s at speedup 600 is 2,400 s of market time, under the 5 s the controller
    followed, so never moved back (a wave's 900 s hold ended at once; measured: 5 of 400 passes
    decided otherwise for +4 s, 29 for -4 s). Followed from 5 s of the replay's time on, a run
    whose clock steps decides as one whose clock does not."""
    from skyhedge.service import PolicyClock

    def run(step: float, where: str) -> tuple[list[list[tuple[str, str]]], list[str]]:
        spec = load_spec(write_spec(WAVE_SPEC, name=f"{where}.yaml"))
        ctl, wall, mono = _jumping_controller(spec, tmp_path / where)
        src = ctl.sources[0]
        ctl.policy_clock = PolicyClock(origin=wall(), rate=600.0)  # as `MarketReplay.attach` sets it
        layouts = []
        for i in range(70):
            if i == 20:  # a wave: two zones preempted at once
                for rec in ctl.state.live()[:2]:
                    src.queue.append(
                        PreemptionEvent(Signal.GONE, wall(), "fake", replica_id=rec.id, reason="preempted")
                    )
            if i == 30:
                wall.advance(step)
            ctl.tick()
            layouts.append(sorted((r.zone, r.market) for r in ctl.state.live() if not r.draining))
            _both(wall, mono, 0.1)  # a pass every 2 ticks of the trace (60 s of market time)
        return layouts, [n.text for n in ctl.notes if "wall clock jumped" in n.text]

    still, _ = run(0.0, "still")
    stepped, said = run(jump, "stepped")
    assert any(market == "on-demand" for layout in still for _, market in layout)  # the hedge at stake
    assert stepped == still
    assert len(said) == 1
    assert f"jumped {jump:+.1f}s ({jump * 600:+.0f}s of the market replay's time)" in said[0]


def test_a_watcher_restarted_after_the_clock_was_set_back_moves_the_states_times_back(world):
    # The clock set back 2 h while no watcher ran: the state's times lay 2 h ahead of it. Replicas
    # still loading their model were judged against initial_delay_seconds (30 s) only 2 h later,
    # and the policy's last decision lay in the future. Moved back, the latest to now, they read
    # as if no time passed while the watcher was down, and keep their order and distances.
    ctl, wall, mono = _jumping(world, policy="skyhedge")
    for _ in range(3):
        ctl.tick()
        _both(wall, mono, 1)
    victim = ctl.state.live()[0]
    world["source"].queue.append(
        PreemptionEvent(Signal.GONE, wall(), "fake", replica_id=victim.id, reason="preempted")
    )
    ctl.tick()  # the replacement starts loading
    _both(wall, mono, 10)
    loading = [r for r in ctl.state.live() if r.ready_at is None]
    assert loading
    world["prober"].down |= {r.id for r in loading}
    ctl.tick()
    ctl.flush()
    last = wall()
    wall.advance(-7200.0)
    restarted, _, mono = _jumping(world, policy="skyhedge")
    restarted.tick()
    assert any(n.text.startswith("the state's times run up to 7200s ahead") for n in restarted.notes)
    assert restarted.state.extra["decided_at"] == wall()
    assert all(r.launched_at <= wall() for r in restarted.state.replicas.values())
    assert restarted.state.policy_memory["memory"]["last_now"] == wall()
    gone = restarted.state.replicas[victim.id].gone_at
    assert gone == last - 10 - 7200.0  # 10 s before the last pass, as it was
    assert all(restarted.state.replicas[r.id].launched_at == gone for r in loading)
    _both(wall, mono, 21)  # 31 s since their launch: past initial_delay_seconds
    restarted.tick()
    assert all(restarted.state.replicas[r.id].reason == "failed" for r in loading)


def test_a_policy_that_cannot_move_its_memory_with_a_clock_jump_is_said_to(tmp_path, write_spec, monkeypatch):
    # a plug-in's shift_times() that raised (or returned no count) was swallowed: its memory kept
    # the jump as time passed, and nothing said so
    from skyhedge.errors import PolicyError
    from skyhedge.policy.skyhedge import SkyHedge

    def broken(self, jump, moved):
        raise PolicyError("policy 'mine:Policy': shift_times() raised ValueError: no")

    spec = load_spec(write_spec(SKYHEDGE_SPEC))
    ctl, wall, mono = _jumping_controller(spec, tmp_path / "state")
    for _ in range(3):
        ctl.tick()
        _both(wall, mono, 1)
    monkeypatch.setattr(SkyHedge, "shift_times", broken)
    wall.advance(7200)
    ctl.tick()  # the pass goes on
    said = [n.text for n in ctl.notes if "memory was not moved" in n.text]
    assert said == [
        "the policy's memory was not moved with the clock: policy 'mine:Policy': shift_times() raised "
        "ValueError: no; it may take the jump as time passed"
    ]
    assert any("the wall clock jumped +7200s" in n.text for n in ctl.notes)


class _NewProbe(FakeProber):
    """The new spec's probe (the new version's health path): nothing passes it while the new
    version's replicas boot, and the old version's never do."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()
        self.booted = False  # the new version's replicas answer it

    def probe(self, records):
        self.calls += 1
        self.seen |= {r.id for r in records}
        return {r.id: (self.booted, "200" if self.booted else "HTTP 404") for r in records}


def test_a_probe_changed_with_the_revision_is_not_the_old_replicas_probe(world, write_spec):
    """A new version with a new health path (`run` and `readiness_probe.path` edited together):
    the old replicas were probed with the new path, went NOT_READY at the reload and FAILED 180 s
    later, while the new version's replicas, a cloud cold start away, were not READY yet: nothing
    left to route to. The outdated replicas keep the probe they were launched under until the
    rolling update releases them."""
    ctl, clock = make(world), world["clock"]
    settle(ctl, clock)
    old = {r.id for r in ctl.state.live()}
    assert len(old) == 3 and all(r.fact().status is ReplicaStatus.READY for r in ctl.state.live())
    new_spec = load_spec(
        write_spec(
            SPEC.replace("path: /health", "path: /v2/health").replace('"true"', '"serve v2"'), "v2.yaml"
        )
    )
    new_probe = _NewProbe()
    ctl.reconfigure(
        new_spec,
        placement=ctl.placement,
        executor=ctl.executor,
        router=ctl.router,
        prober=new_probe,
        sources=ctl.sources,
    )
    for _ in range(50):  # 250 s: past NOT_READY_GRACE_SECONDS, the replacements still booting
        ctl.tick()
        clock.advance(5)
    live = {r.id: r for r in ctl.state.live()}
    assert old <= set(live), "an old replica was failed by the new version's probe"
    assert all(live[rid].fact().status is ReplicaStatus.READY for rid in old)
    assert set(world["router"].reloads[-1]) >= old  # still routed
    assert not new_probe.seen & old  # the new probe is the new replicas' only
    assert new_probe.seen  # (which it did probe)
    new_probe.booted = True  # the new version is up: the rolling update releases the old replicas
    for _ in range(20):
        ctl.tick()
        clock.advance(5)
    assert not old & {r.id for r in ctl.state.live()} and ctl._earlier_probers == {}
