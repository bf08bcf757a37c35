"""What the watcher keeps for later survives its restart (a Controller rebuilt on the same state
dir stands for one): replicas taken out of the router alive, whose requests are cut once they are
known gone, and the readiness probe outdated replicas of a rolling update were launched under."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence

import pytest
from controller_fakes import THREE_ZONE_SPEC as SPEC
from controller_fakes import Clock, FakeExecutor, FakeProber, FakeRouter, FakeSource, NewProbe
from controller_fakes import clocked_controller as controller
from controller_fakes import run_ticks as run
from fake_http import json_server

from skyhedge.controller.loop import EARLIER_PROBES_KEY, UNROUTED_KEY
from skyhedge.events import PreemptionEvent, Signal
from skyhedge.policy.types import ReplicaStatus
from skyhedge.probe_store import ProbeStore
from skyhedge.spec import load_spec, replica_revision
from skyhedge.state import load_state

#: The next version: a new command, and its new health path with it.
SPEC_V2 = SPEC.replace("/health", "/v2/health").replace('"true"', '"serve v2"')


class SeveringRouter(FakeRouter):
    """A FakeRouter that can cut connections (nginx's `sever`), recording the endpoints cut."""

    def __init__(self) -> None:
        super().__init__()
        self.severed: list[str] = []

    def sever(self, endpoints: Sequence[str]) -> int:
        self.severed += endpoints
        return len(endpoints)


@pytest.fixture
def old_version() -> Iterator[list[str]]:
    """Three replicas of the old version: answer /health, not /v2/health (on 127.0.0.1)."""

    def handle(path: str, _query: dict) -> tuple[int, object]:
        return (200, {}) if path == "/health" else (404, {})

    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(json_server(handle)) for _ in range(3)]


def test_a_replica_taken_out_alive_before_a_restart_is_cut_once_known_gone_after_it(tmp_path, write_spec):
    """A vanished VM fails its probe first (out of the router, alive: not cut, it may be slow only),
    and its GONE event comes a pass later. When a watcher restart fell in between, the replica was
    never cut: its requests in flight waited out `read_timeout` (600 s by default)."""
    spec, clock = load_spec(write_spec(SPEC)), Clock()
    router, prober, executor = SeveringRouter(), FakeProber(), FakeExecutor()
    state_dir = tmp_path / "state"
    ctl = controller(spec, state_dir, clock, router=router, prober=prober, executor=executor)
    run(ctl, clock, 3)
    victim = ctl.state.live()[0]
    prober.down.add(victim.id)
    ctl.tick()  # its probe fails: out of the router, alive
    assert victim.id not in router.current and victim.gone_at is None
    assert load_state(state_dir, "svc").extra[UNROUTED_KEY] == {victim.id: victim.endpoint}

    source = FakeSource()  # the watcher restarts (nginx runs on)
    ctl = controller(
        spec, state_dir, clock, router=router, prober=prober, executor=executor, sources=[source]
    )
    clock.advance(1)
    source.queue.append(
        PreemptionEvent(Signal.GONE, clock(), "fake", replica_id=victim.id, reason="preempted")
    )
    ctl.tick()
    assert ctl.state.replicas[victim.id].gone_at is not None
    assert router.severed == [victim.endpoint]
    assert any(f"to gone {victim.id}: a request not answered yet is retried" in n.text for n in ctl.notes)
    assert UNROUTED_KEY not in load_state(state_dir, "svc").extra  # cut: forgotten


def test_a_replica_routed_again_is_forgotten_and_never_cut(tmp_path, write_spec):
    spec, clock = load_spec(write_spec(SPEC)), Clock()
    router, prober = SeveringRouter(), FakeProber()
    state_dir = tmp_path / "state"
    ctl = controller(spec, state_dir, clock, router=router, prober=prober)
    run(ctl, clock, 3)
    victim = ctl.state.live()[0]
    prober.down.add(victim.id)
    run(ctl, clock, 1)
    assert victim.id in load_state(state_dir, "svc").extra[UNROUTED_KEY]
    prober.down.clear()  # only slow: it answers again
    run(ctl, clock, 2)
    assert victim.id in router.current
    assert UNROUTED_KEY not in load_state(state_dir, "svc").extra
    assert router.severed == []


def test_a_restart_mid_rolling_update_keeps_probing_outdated_replicas_with_their_probe(
    tmp_path, write_spec, old_version
):
    """`run` and `readiness_probe.path` edited together (the new version's health path): the
    outdated replicas are probed with the probe they were launched under until the rolling update
    releases them. After a watcher restart they were all probed with the new path, went NOT_READY
    and FAILED 180 s later, before the new version's replicas were READY: nothing left to route to."""
    spec, clock, router = load_spec(write_spec(SPEC)), Clock(), FakeRouter()
    state_dir = tmp_path / "state"
    ctl = controller(spec, state_dir, clock, router=router)
    run(ctl, clock, 3)
    old = sorted(r.id for r in ctl.state.live())
    assert len(old) == 3
    for rid, endpoint in zip(old, old_version, strict=True):  # the old version, serving on 127.0.0.1
        ctl.state.replicas[rid].endpoint = endpoint
    run(ctl, clock, 1)
    v2 = load_spec(write_spec(SPEC_V2, "v2.yaml"))
    ctl.reconfigure(
        v2, placement=ctl.placement, executor=ctl.executor, router=router, prober=NewProbe(), sources=[]
    )
    run(ctl, clock, 2)
    revision = ctl.state.replicas[old[0]].revision
    assert revision is not None and revision != replica_revision(v2, "local")
    kept = load_state(state_dir, "svc").extra[EARLIER_PROBES_KEY]
    probes, problem = ProbeStore(state_dir).read()  # state.json: a digest; the probe: tf/probes.json
    assert problem is None and probes[kept[revision]]["path"] == "/health"

    new_probe = NewProbe()  # the watcher restarts under the new spec
    ctl = controller(v2, state_dir, clock, router=router, executor=ctl.executor, prober=new_probe)
    run(ctl, clock, 50, step=5)  # 250 s: past NOT_READY_GRACE_SECONDS, the new version still booting
    live = {r.id: r for r in ctl.state.live()}
    assert set(old) <= set(live), "an old replica was failed by the new version's probe"
    assert all(live[rid].fact().status is ReplicaStatus.READY for rid in old)
    assert set(router.current) >= set(old)  # still routed
    assert new_probe.seen and not new_probe.seen & set(old)

    for rid in old:  # the rolling update is over (here: the old replicas are gone)
        ctl.state.replicas[rid].gone_at, ctl.state.replicas[rid].reason = clock(), "terminated"
    run(ctl, clock, 2)
    assert ctl._earlier_probers == {}
    assert EARLIER_PROBES_KEY not in load_state(state_dir, "svc").extra


@pytest.mark.parametrize(
    ("unrouted", "earlier"),
    [
        ("r-0001", ["/health"]),
        ({"r-0001": 7}, {"abc": {"path": "health"}}),
        ({"r-0001": None}, {"abc": "not a probe", "def": {"path": "/h", "timeout_seconds": -1}}),
    ],
)
def test_malformed_kept_tables_are_ignored_with_a_warning(tmp_path, write_spec, caplog, unrouted, earlier):
    """A hand-edited state: the tables are dropped with a warning; the watcher runs on."""
    spec, clock = load_spec(write_spec(SPEC)), Clock()
    state_dir = tmp_path / "state"
    ctl = controller(spec, state_dir, clock)
    run(ctl, clock, 3)
    path = state_dir / "state.json"
    data = json.loads(path.read_text())
    data["extra"].update({UNROUTED_KEY: unrouted, EARLIER_PROBES_KEY: earlier})
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="skyhedge.controller"):
        ctl = controller(spec, state_dir, clock)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"extra.{UNROUTED_KEY}" in line for line in said), said
    assert any(f"extra.{EARLIER_PROBES_KEY}" in line for line in said), said
    run(ctl, clock, 2)
    assert len(ctl.state.live()) == 3
    extra = load_state(state_dir, "svc").extra
    assert UNROUTED_KEY not in extra and EARLIER_PROBES_KEY not in extra


@pytest.mark.parametrize("answers_again", [False, True])
def test_a_replica_taken_out_alive_and_recreated_under_its_id_has_the_old_machines_requests_cut(
    tmp_path, write_spec, answers_again
):
    """A vanished VM fails its probe first (out of the router, alive), and an apply may then
    re-create it under its ID (`recreated_replicas`) at a new address, its record never gone. The
    old machine is gone all the same: its requests in flight wait for `read_timeout` unless cut.
    They were never cut: the entry waited for a `gone_at` that never came, and was dropped
    unsevered once the new machine was routed under the same ID."""
    spec, clock = load_spec(write_spec(SPEC)), Clock()
    router, prober = SeveringRouter(), FakeProber()
    state_dir = tmp_path / "state"
    ctl = controller(spec, state_dir, clock, router=router, prober=prober)
    run(ctl, clock, 3)
    victim = ctl.state.live()[0]
    old_endpoint = victim.endpoint
    prober.down.add(victim.id)
    run(ctl, clock, 1)
    assert load_state(state_dir, "svc").extra[UNROUTED_KEY] == {victim.id: old_endpoint}
    victim.endpoint = "http://127.0.0.1:29999"  # re-created under its ID: a new machine
    if answers_again:
        prober.down.clear()  # the new machine is READY: routed again under the same ID
    run(ctl, clock, 2)
    assert router.severed == [old_endpoint]
    assert UNROUTED_KEY not in load_state(state_dir, "svc").extra
    if answers_again:
        assert victim.id in router.current
