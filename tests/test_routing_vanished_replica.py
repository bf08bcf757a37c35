"""A replica that vanishes without a TCP reset (a cloud VM preempted or deleted: its kernel is gone
with it, nothing answers and nothing closes) while requests are in flight on it.

nginx's connections to it wait for an answer: before, they waited out `service.router.read_timeout`
(600 s by default) on the old workers even after the controller knew the replica gone and reloaded
nginx without it. Now the controller closes them (`Router.sever`) once the reload took the replica
out: each request is retried on another replica at once. Healthy replicas' requests are not touched.

Here a replica "vanishes" by SIGSTOP: it keeps its sockets open and answers nothing, as a VM that
stopped existing does (killing a local process instead would reset its connections).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from controller_fakes import Clock, FakeExecutor, FakeProber, FakeSource
from routing_support import Fleet, complete, free_port, make_spec, needs_nginx

from skyhedge import apply as apply_mod
from skyhedge.apply import UNROUTED_KEY
from skyhedge.cli import main
from skyhedge.controller.adapters import NginxRouter
from skyhedge.controller.loop import Controller
from skyhedge.errors import RoutingError
from skyhedge.events import PreemptionEvent, Signal
from skyhedge.probe import probe
from skyhedge.routing import Router
from skyhedge.routing import nginx as nginx_proc
from skyhedge.routing.router import _peers
from skyhedge.spec import load_spec
from skyhedge.state import ReplicaRecord, ServiceState, load_state, save_state

pytestmark = needs_nginx

# 40 tokens at 50 ms: a 2 s generation, so requests are surely in flight when the replica vanishes
SLOW = {"ECHO_TOKEN_DELAY": "0.05"}
TOKENS = 40
# far above what the test waits: a request left waiting for it fails the test
READ_TIMEOUT = 120
CLIENT_TIMEOUT = 15.0


class Clients:
    """`n` completions sent at once through the router, each recording (status, replica, tokens,
    seconds) or the exception it got."""

    def __init__(self, url: str, n: int, tokens: int = TOKENS) -> None:
        self.results: list[tuple[object, ...]] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._one, args=(url, tokens)) for _ in range(n)]
        for t in self._threads:
            t.start()

    def _one(self, url: str, tokens: int) -> None:
        t0 = time.monotonic()
        try:
            resp = complete(url, max_tokens=tokens, timeout=CLIENT_TIMEOUT)
            got = (
                json.loads(resp.body).get("usage", {}).get("completion_tokens")
                if resp.status == 200
                else None
            )
            row: tuple[object, ...] = (resp.status, resp.replica, got, time.monotonic() - t0)
        except OSError as exc:
            row = (type(exc).__name__, None, None, time.monotonic() - t0)
        with self._lock:
            self.results.append(row)

    def join(self) -> list[tuple[object, ...]]:
        for t in self._threads:
            t.join(timeout=CLIENT_TIMEOUT + 5)
        return self.results


def in_flight_to(router: Router, endpoint: str) -> int:
    """nginx's connections to `endpoint` now (requests waiting on it)."""
    host, port = endpoint.removeprefix("http://").rsplit(":", 1)
    pid = router.pid()
    assert pid is not None
    count = 0
    for worker in nginx_proc.workers(pid):
        peers = nginx_proc.tcp_peers(worker)
        count += sum(1 for inode in nginx_proc.socket_fds(worker) if peers.get(inode) == (host, int(port)))
    return count


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _answered_by_r0002(clients: Clients, router, gone: str, stopped: float) -> None:
    """Every request answered in full by the replica left (r-0002, retried there), within
    seconds of the stop, and nothing left in flight to the gone replica's endpoint `gone`."""
    results = clients.join()
    assert len(results) == 4
    assert all(r[0] == 200 and r[1] == "r-0002" and r[2] == TOKENS for r in results), results
    assert max(r[3] for r in results) < 10, results
    assert time.monotonic() - stopped < 10
    assert in_flight_to(router, gone) == 0


def test_requests_on_a_vanished_replica_are_retried_at_once_and_healthy_ones_finish(
    tmp_path, fleet, routers, monkeypatch
):
    port = free_port()
    router = Router(make_spec(port, router={"read_timeout": READ_TIMEOUT}), tmp_path / "state")
    routers.append(router)
    fleet.start(2, env=SLOW)
    gone, kept = fleet.replicas["r-0001"], fleet.replicas["r-0002"]
    router.up(fleet.upstreams())
    clients = Clients(f"http://127.0.0.1:{port}", 4)
    wait_until(lambda: in_flight_to(router, gone.endpoint) >= 1, 5, "requests in flight on r-0001")
    os.killpg(gone.proc.pid, signal.SIGSTOP)  # the VM vanishes: no reset, no answer
    stopped = time.monotonic()
    router.reload([kept.upstream])
    assert in_flight_to(router, gone.endpoint) >= 1  # the reload alone leaves them waiting

    # not allowed to reach nginx's sockets: one line saying what it costs, nothing closed
    def refused(pid: int, fd: int) -> int:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    with monkeypatch.context() as m:
        m.setattr(nginx_proc, "borrow_fd", refused)
        with pytest.raises(RoutingError, match=r"Operation not permitted.*read_timeout"):
            router.sever([gone.endpoint])
    assert in_flight_to(router, gone.endpoint) >= 1

    assert router.sever([gone.endpoint]) >= 1
    _answered_by_r0002(clients, router, gone.endpoint, stopped)


SPEC = """
name: vanish
placement:
  clouds: [local]
  zones: [local-a, local-b]
replica_policy: {{min_replicas: 2, max_replicas: 2, num_overprovision: 0, policy: spothedge}}
readiness_probe: {{path: /health, initial_delay_seconds: 30}}
service: {{port: {port}, router: {{read_timeout: {read_timeout}}}}}
run: {{command: "true"}}
"""


class FleetExecutor(FakeExecutor):
    """The fake Terraform, each replica it launches a real local-echo process of the fleet."""

    def __init__(self, fleet: Fleet) -> None:
        super().__init__()
        self.fleet = fleet

    def apply(self, state, plan, now):
        result = super().apply(state, plan, now)
        for rid, rec in state.replicas.items():
            if rec.gone_at is None and rec.endpoint and rid not in self.fleet.replicas:
                self.fleet.start(1, first=int(rid.split("-")[1]), env=SLOW)
            if rid in self.fleet.replicas:
                rec.endpoint = self.fleet.replicas[rid].endpoint
        return result


@dataclass
class VictimRun:
    """A controller over a real nginx and two slow replicas, with requests in flight on one of
    them (`victim`), which is then SIGSTOPped: a VM gone, its sockets neither answered nor reset."""

    ctl: Controller
    adapter: NginxRouter
    clock: Clock
    source: FakeSource
    victim: ReplicaRecord
    clients: Clients

    def answered_elsewhere(self) -> None:
        """Every request answered in full by the other replica, within seconds, and the cut said."""
        results = self.clients.join()
        assert len(results) == 4
        assert all(r[0] == 200 and r[1] != self.victim.id and r[2] == TOKENS for r in results), results
        assert max(r[3] for r in results) < 10, results
        notes = [n.text for n in self.ctl.notes]
        assert any(f"to gone {self.victim.id}: a request not answered yet is retried" in n for n in notes), (
            notes
        )


def routed_fleet(
    tmp_path, spec, fleet, routers, prober, source: FakeSource
) -> tuple[Controller, NginxRouter, Clock]:
    """A controller over a real nginx and the fleet's real replicas (launched as it plans them),
    after three passes: both replicas READY and routed."""
    clock = Clock()
    adapter = NginxRouter(spec, tmp_path / "state")
    routers.append(adapter.router)
    ctl = Controller(
        spec,
        tmp_path / "state",
        executor=FleetExecutor(fleet),
        router=adapter,
        prober=prober,
        sources=[source],
        clock=clock,
    )
    for _ in range(3):
        ctl.tick()
        clock.advance(1)
    assert len(ctl.state.extra["routed"]) == 2
    return ctl, adapter, clock


def _victim_run(tmp_path, write_spec, fleet, routers, prober: FakeProber) -> VictimRun:
    port = free_port()
    spec = load_spec(write_spec(SPEC.format(port=port, read_timeout=READ_TIMEOUT)))
    source = FakeSource()
    ctl, adapter, clock = routed_fleet(tmp_path, spec, fleet, routers, prober, source)
    victim = ctl.state.replicas[sorted(pair[0] for pair in ctl.state.extra["routed"])[0]]
    clients = Clients(f"http://127.0.0.1:{port}", 4)
    wait_until(lambda: in_flight_to(adapter.router, victim.endpoint) >= 1, 5, "requests on the victim")
    os.killpg(fleet.replicas[victim.id].proc.pid, signal.SIGSTOP)  # the VM is gone
    return VictimRun(ctl, adapter, clock, source, victim, clients)


def test_the_watcher_cuts_a_preempted_replicas_requests_so_they_are_retried_not_left_waiting(
    tmp_path, write_spec, fleet, routers
):
    run = _victim_run(tmp_path, write_spec, fleet, routers, FakeProber())
    run.source.queue.append(
        PreemptionEvent(Signal.GONE, run.clock(), "fake", replica_id=run.victim.id, reason="preempted")
    )
    run.ctl.tick()
    assert run.victim.id not in {pair[0] for pair in run.ctl.state.extra["routed"]}
    run.answered_elsewhere()


@pytest.mark.skipif(sys.byteorder != "little", reason="/proc/net/tcp spells addresses in host order")
@pytest.mark.parametrize(
    ("raw", "peer"),
    [
        ("0100007F:1F90", ("127.0.0.1", 8080)),
        ("0500000A:0050", ("10.0.0.5", 80)),
        ("00000000000000000000000001000000:1F40", ("::1", 8000)),
        ("0000000000000000FFFF00000500000A:1F40", ("10.0.0.5", 8000)),  # IPv4-mapped: as IPv4
    ],
)
def test_proc_net_tcp_addresses_are_read_as_the_endpoints_spell_them(raw, peer):
    assert nginx_proc._peer(raw) == peer


@pytest.mark.parametrize(
    ("endpoint", "peers"),
    [
        ("http://127.0.0.1:8081", {("127.0.0.1", 8081)}),
        ("http://10.0.0.7", {("10.0.0.7", 80)}),
        ("https://10.0.0.7", {("10.0.0.7", 443)}),
        ("http://[::1]:9000", {("::1", 9000)}),
        ("http://10.0.0.7:99999", set()),
    ],
)
def test_a_replicas_endpoint_names_the_address_and_port_nginx_connected_to(
    endpoint: str, peers: set[tuple[str, int]]
) -> None:
    assert _peers(endpoint) == peers


# -- the paths without a watcher: `apply` and `routing reload` ---------------------------------------


def vm_records(fleet: Fleet, gone: str | None) -> ServiceState:
    """The state of two READY cloud replicas (VMs: nothing resets their connections when they go),
    served by the fleet's processes; `gone` is recorded terminated (destroyed, or preempted)."""
    state = ServiceState(service="echo")
    for rid, replica in fleet.replicas.items():
        state.replicas[rid] = ReplicaRecord(
            rid,
            "aws",
            "us-east-1",
            "us-east-1a",
            "spot",
            launched_at=1.0,
            provisioned_at=2.0,
            ready_at=3.0,
            endpoint=replica.endpoint,
        )
    state.extra["routed"] = [[rid, r.endpoint] for rid, r in sorted(fleet.replicas.items())]
    if gone is not None:
        state.replicas[gone].gone_at, state.replicas[gone].reason = 4.0, "terminated"
    return state


def test_apply_cuts_the_requests_of_a_vm_gone_when_it_takes_it_out_of_the_router(
    tmp_path, fleet, routers, monkeypatch
):
    """`apply` takes a replica Terraform destroyed or replaced out of the router: its requests in
    flight waited for read_timeout (600 s by default), a VM sends no reset. Now they are cut and
    retried on another replica; a cut refused is one warning line, the routing goes on."""
    port = free_port()
    spec = make_spec(port, router={"read_timeout": READ_TIMEOUT})
    state_dir = tmp_path / "state"
    router = Router(spec, state_dir)
    routers.append(router)
    fleet.start(2, env=SLOW)
    gone, kept = fleet.replicas["r-0001"], fleet.replicas["r-0002"]
    router.up(fleet.upstreams())
    clients = Clients(f"http://127.0.0.1:{port}", 4)
    wait_until(lambda: in_flight_to(router, gone.endpoint) >= 1, 5, "requests in flight on r-0001")
    os.killpg(gone.proc.pid, signal.SIGSTOP)  # the VM is deleted: no reset, no answer
    stopped = time.monotonic()
    state = vm_records(fleet, "r-0001")
    said: list[str] = []
    warned: list[str] = []

    def refused(pid: int, fd: int) -> int:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    with monkeypatch.context() as m:
        m.setattr(nginx_proc, "borrow_fd", refused)
        apply_mod.bring_routing_up(spec, state, state_dir, said.append, warned.append)
    assert [u["id"] for u in router.status()["upstreams"]] == ["r-0002"]
    assert state.extra["routed"] == [["r-0002", kept.endpoint]]
    assert len(warned) == 1 and "Operation not permitted" in warned[0] and "read_timeout" in warned[0]
    assert in_flight_to(router, gone.endpoint) >= 1  # refused: they wait on

    # allowed: the same cut, as `apply` makes it once Terraform destroyed the replica
    closed = apply_mod.cut_gone_connections(
        router, state, [("r-0001", gone.endpoint)], said.append, warned.append
    )
    assert closed >= 1 and said == [
        f"routing: closed {closed} connection(s) to gone r-0001: a request not answered yet is retried on "
        "another replica within next_upstream_timeout (30s) of its start, others end (503, or a stream "
        "cut short)"
    ]
    _answered_by_r0002(clients, router, gone.endpoint, stopped)


def _local_router(tmp_path, write_spec, routers, *, probe_timeout: int) -> tuple[Path, Path, Router, int]:
    """A local service's spec (its router on a free port, `read_timeout: READ_TIMEOUT`) and its
    router, not started; returns the spec's path, the state dir, the router and its port."""
    port = free_port()
    spec_path = write_spec(
        f"""
        name: echo
        placement: {{clouds: [local]}}
        run: {{command: "true"}}
        service: {{host: 127.0.0.1, port: {port}, router: {{read_timeout: {READ_TIMEOUT}}}}}
        readiness_probe: {{path: /health, timeout_seconds: {probe_timeout}}}
        """
    )
    state_dir = tmp_path / "state"
    router = Router(load_spec(spec_path), state_dir)
    routers.append(router)
    return spec_path, state_dir, router, port


def test_routing_reload_cuts_the_requests_of_a_replica_the_state_knows_gone(
    tmp_path, write_spec, fleet, routers
):
    """`skyhedge routing reload` after a VM was recorded gone (a watcher stopped before it
    reloaded, an operator) takes it out of the router and cuts what waited on it."""
    spec_path, state_dir, router, port = _local_router(tmp_path, write_spec, routers, probe_timeout=2)
    fleet.start(2, env=SLOW)
    gone = fleet.replicas["r-0001"]
    router.up(fleet.upstreams())
    save_state(state_dir, vm_records(fleet, "r-0001"))
    clients = Clients(f"http://127.0.0.1:{port}", 4)
    wait_until(lambda: in_flight_to(router, gone.endpoint) >= 1, 5, "requests in flight on r-0001")
    os.killpg(gone.proc.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    result = CliRunner().invoke(main, ["routing", "reload", str(spec_path), "--state-dir", str(state_dir)])
    assert result.exit_code == 0, result.output
    assert "connection(s) to gone r-0001: a request not answered yet is retried" in result.stderr
    results = clients.join()
    assert len(results) == 4
    assert all(r[0] == 200 and r[1] == "r-0002" and r[2] == TOKENS for r in results), results
    assert max(r[3] for r in results) < 10, results
    assert time.monotonic() - stopped < 10


def test_a_vanished_replica_whose_probe_failed_first_has_its_requests_cut_once_known_gone(
    tmp_path, write_spec, fleet, routers
):
    """A VM that vanishes fails its probe before its preemption is known: the reload takes it out
    alive (NOT_READY, not cut: a replica that is only slow keeps its requests), and the GONE
    event a pass later changes no routing. Its requests in flight must be cut then all the same;
    they waited for `read_timeout` (measured in a soak: clients gave up at 30 s)."""
    prober = FakeProber()
    run = _victim_run(tmp_path, write_spec, fleet, routers, prober)
    ctl, victim = run.ctl, run.victim
    prober.down.add(victim.id)
    ctl.tick()  # its probe fails first: out of the router, alive
    assert victim.id not in {pair[0] for pair in ctl.state.extra["routed"]}
    assert victim.gone_at is None
    assert in_flight_to(run.adapter.router, victim.endpoint) >= 1
    run.clock.advance(1)
    run.source.queue.append(
        PreemptionEvent(Signal.GONE, run.clock(), "fake", replica_id=victim.id, reason="preempted")
    )
    ctl.tick()
    run.answered_elsewhere()
    assert ctl._unrouted == {}


def _probe_run(tmp_path, write_spec, fleet, routers) -> tuple[Path, Path, Router, int]:
    """Two READY cloud replicas (2 s generations) behind a running router, their state saved;
    returns the spec's path, the state dir, the router and its port."""
    spec_path, state_dir, router, port = _local_router(tmp_path, write_spec, routers, probe_timeout=1)
    fleet.start(2, env={**SLOW, "ECHO_DRAIN_SECONDS": "30"})
    router.up(fleet.upstreams())
    save_state(state_dir, vm_records(fleet, None))
    return spec_path, state_dir, router, port


def _routing(*args: str):
    result = CliRunner().invoke(main, ["routing", *args])
    assert result.exit_code == 0, result.output
    return result


def test_routing_reload_probe_cuts_what_a_hung_replica_holds_that_nginx_can_retry(
    tmp_path, write_spec, fleet, routers
):
    """`routing reload --probe` takes out a replica whose probe timed out (here a VM gone silent:
    it answers nothing, resets nothing) and cuts, as the watcher does (`cut_hung_connections`),
    the requests it has not begun to answer that nginx can still retry: answered by the other
    replica at once. Before, they were left to it (as for a probe refused: a replica shutting
    down may finish its requests), waiting on it until it was recorded gone or `read_timeout`
    passed. It is recorded all the same (`extra.unrouted`, the watcher's table): what was left
    to it is cut once it is recorded gone."""
    spec_path, state_dir, router, port = _probe_run(tmp_path, write_spec, fleet, routers)
    gone = fleet.replicas["r-0001"]
    clients = Clients(f"http://127.0.0.1:{port}", 4)
    wait_until(lambda: in_flight_to(router, gone.endpoint) >= 1, 5, "requests in flight on r-0001")
    os.killpg(gone.proc.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    where = ["--state-dir", str(state_dir)]
    result = _routing("reload", str(spec_path), *where, "--probe")
    assert "r-0001" in result.stderr and "TimeoutError" in result.stderr
    assert (
        "r-0001: out of the router; what nginx can still retry is cut, its other requests in flight may "
        "finish (cut once it is recorded gone)"
    ) in result.stderr
    assert "connection(s) to hung r-0001 (its probe timed out)" in result.stderr  # was: none cut
    assert [u["id"] for u in router.status()["upstreams"]] == ["r-0002"]
    _answered_by_r0002(clients, router, gone.endpoint, stopped)
    state = load_state(state_dir, "echo")
    assert state.extra[UNROUTED_KEY] == {"r-0001": gone.endpoint}

    # recorded gone (a watcher's GONE event, `apply`'s refresh), then routed again: forgotten
    state.replicas["r-0001"].gone_at, state.replicas["r-0001"].reason = time.time(), "preempted"
    save_state(state_dir, state)
    _routing("reload", str(spec_path), *where)
    assert UNROUTED_KEY not in load_state(state_dir, "echo").extra


def test_routing_reload_probe_cuts_nothing_when_no_replica_is_left_to_retry_on(
    tmp_path, write_spec, fleet, routers
):
    """A replica only slow (its probe timed out, 1 s) and no other replica that nginx's old workers
    could retry on: `routing reload --probe` takes it out (no panic mode, unlike the watcher) but
    cuts nothing, and says nothing retried. Before, its requests were cut, nothing could retry
    them, and both were answered 503 in 1.3 s (the line saying them "retried on another
    replica"); left to it, they are answered in full once it goes on."""
    spec_path, state_dir, router, port = _local_router(tmp_path, write_spec, routers, probe_timeout=1)
    fleet.start(1, env=SLOW)
    router.up(fleet.upstreams())
    save_state(state_dir, vm_records(fleet, None))
    slow = fleet.replicas["r-0001"]
    clients = Clients(f"http://127.0.0.1:{port}", 2)
    wait_until(lambda: in_flight_to(router, slow.endpoint) >= 2, 5, "requests in flight on r-0001")
    os.killpg(slow.proc.pid, signal.SIGSTOP)
    try:
        result = _routing("reload", str(spec_path), "--state-dir", str(state_dir), "--probe")
        assert "r-0001" in result.stderr and "TimeoutError" in result.stderr
        assert "connection(s) to hung" not in result.stderr  # was: closed 2, "retried on another replica"
        assert "r-0001: out of the router; its requests in flight may finish" in result.stderr
        assert in_flight_to(router, slow.endpoint) == 2
    finally:
        os.killpg(slow.proc.pid, signal.SIGCONT)  # only slow after all
    results = clients.join()
    assert sorted(r[:3] for r in results) == [(200, "r-0001", TOKENS)] * 2, results  # was: 503, 503


def test_routing_reload_probe_lets_a_replica_shutting_down_finish_its_requests(
    tmp_path, write_spec, fleet, routers
):
    """A replica shutting down gracefully (SIGTERM: its port refuses connections at once, its
    requests in flight go on) fails `--probe` with "Connection refused", yet is not gone: the
    reload takes it out and leaves its requests to finish on it, in full. (A replica whose process
    died has no connection left to cut: its kernel reset them.)"""
    spec_path, state_dir, router, port = _probe_run(tmp_path, write_spec, fleet, routers)
    leaving = fleet.replicas["r-0001"]
    clients = Clients(f"http://127.0.0.1:{port}", 4)
    wait_until(lambda: in_flight_to(router, leaving.endpoint) >= 1, 5, "requests in flight on r-0001")
    held = in_flight_to(router, leaving.endpoint)
    os.kill(leaving.proc.pid, signal.SIGTERM)
    where = ["--state-dir", str(state_dir)]
    readiness = load_spec(spec_path).readiness_probe
    wait_until(lambda: not probe(leaving.endpoint, readiness, timeout=0.2), 5, "its port refusing")
    result = _routing("reload", str(spec_path), *where, "--probe")
    assert "Connection refused" in result.stderr
    assert "connection(s) to gone" not in result.stderr
    assert [u["id"] for u in router.status()["upstreams"]] == ["r-0002"]
    results = clients.join()
    assert all(r[0] == 200 and r[2] == TOKENS for r in results), results
    assert sum(1 for r in results if r[1] == "r-0001") == held, results  # finished where they ran
    assert load_state(state_dir, "echo").extra[UNROUTED_KEY] == {"r-0001": leaving.endpoint}
