"""A replica that hangs: alive, its port open (the kernel completes connections into its backlog),
answering nothing. Here a real local-echo process stopped with SIGSTOP, behind a real nginx.

Its readiness probe times out and the watcher takes it out of the router (NOT_READY), but the
requests nginx had already sent it wait on the old workers: before, until it was FAILED 180 s
later and its connections cut, when nginx no longer retried them (past `next_upstream_timeout`):
measured with `skyhedge watch`, 3 replicas and 12 clients, every one of the 12 clients held for
189 s, then answered 503. Now the requests it has not begun to answer, and that nginx can still
retry, are cut when it is taken out for a probe that timed out, and answered by another replica
within seconds. What it has begun to answer (a stream) is left alone: a replica only slow to
answer its probe keeps its streams, and nginx could not retry them anyway.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import signal
import socket
import threading
import time

import pytest
from controller_fakes import FakeSource
from routing_support import free_port, make_spec, needs_nginx
from test_routing_vanished_replica import SLOW, TOKENS, in_flight_to, routed_fleet, wait_until

from skyhedge.controller.adapters import HttpProber
from skyhedge.routing import Router
from skyhedge.spec import load_spec, parse_readiness_probe
from skyhedge.state import ReplicaRecord

pytestmark = needs_nginx

CLIENT_TIMEOUT = 20.0


class Call:
    """One completion through the router in a thread: (status, replica, tokens or chunks, seconds)."""

    def __init__(self, url: str, *, stream: bool) -> None:
        self.stream = stream
        self.result: tuple[object, ...] | None = None
        self.first_byte = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url,))
        self._thread.start()

    def _run(self, url: str) -> None:
        t0 = time.monotonic()
        host, port = url.removeprefix("http://").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=CLIENT_TIMEOUT)
        try:
            body = {"prompt": "The keeper", "max_tokens": TOKENS, "stream": self.stream}
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            self.first_byte.set()
            data = resp.read()
            if self.stream:
                got: object = sum(1 for line in data.splitlines() if line.startswith(b"data: {"))
            elif resp.status == 200:
                got = json.loads(data).get("usage", {}).get("completion_tokens")
            else:
                got = None
            self.result = (resp.status, resp.getheader("X-Replica-Id"), got, time.monotonic() - t0)
        except OSError as exc:
            self.result = (type(exc).__name__, None, None, time.monotonic() - t0)
        finally:
            conn.close()
            self.first_byte.set()

    def join(self) -> tuple[object, ...]:
        self._thread.join(timeout=CLIENT_TIMEOUT + 5)
        assert self.result is not None
        return self.result


def test_only_requests_awaiting_their_answer_and_still_retryable_are_cut(tmp_path, fleet, routers):
    """`Router.sever(..., awaiting_within=S)` shuts down only the connections on which a request
    was sent less than S seconds ago and nothing came back since: nginx retries those on another
    replica. A stream under way (its answer begun) is left to finish where it runs."""
    port = free_port()
    spec = make_spec(port, lb="round_robin", router={"read_timeout": 120, "worker_processes": "1"})
    router = Router(spec, tmp_path / "state")
    routers.append(router)
    fleet.start(2, env=SLOW)
    slow, other = fleet.replicas["r-0001"], fleet.replicas["r-0002"]
    router.up(fleet.upstreams())
    url = f"http://127.0.0.1:{port}"
    # round robin, one worker: one stream and one plain request on each replica
    streams = [Call(url, stream=True) for _ in range(2)]
    for s in streams:
        assert s.first_byte.wait(5)
    plain = [Call(url, stream=False) for _ in range(2)]
    wait_until(lambda: in_flight_to(router, slow.endpoint) == 2, 5, "a stream and a request on r-0001")
    time.sleep(0.3)  # tokens of the stream came since its request was sent
    router.reload([other.upstream])  # taken out, as the watcher does at NOT_READY

    assert router.sever([slow.endpoint], awaiting_within=0.1) == 0  # sent too long ago to retry
    assert router.sever([slow.endpoint], awaiting_within=30) == 1  # the plain one only
    stream_results = [s.join() for s in streams]
    plain_results = [p.join() for p in plain]
    assert all(r[0] == 200 and r[2] == TOKENS + 1 for r in stream_results), stream_results  # + [DONE]
    assert sorted(str(r[1]) for r in stream_results) == ["r-0001", "r-0002"], stream_results
    assert all(r[0] == 200 and r[1] == "r-0002" and r[2] == TOKENS for r in plain_results), plain_results


SPEC = """
name: hung
placement:
  clouds: [local]
  zones: [local-a, local-b]
replica_policy: {{min_replicas: 2, max_replicas: 2, num_overprovision: 0, policy: spothedge}}
readiness_probe: {{path: /health, initial_delay_seconds: 30, timeout_seconds: 1}}
service: {{port: {port}, router: {{read_timeout: 120}}}}
run: {{command: "true"}}
"""


def test_a_hung_replicas_requests_are_answered_elsewhere_once_its_probe_times_out(
    tmp_path, write_spec, fleet, routers
):
    """The watcher's pass: the stopped replica's probe times out, it leaves the router, and the
    requests nginx sent it are retried on the other replica at once; before, they waited for it
    to be FAILED (180 s), then nginx answered 503."""
    port = free_port()
    spec = load_spec(write_spec(SPEC.format(port=port)))
    ctl, adapter, clock = routed_fleet(tmp_path, spec, fleet, routers, HttpProber(spec), FakeSource())
    victim = ctl.state.replicas[sorted(pair[0] for pair in ctl.state.extra["routed"])[0]]
    url = f"http://127.0.0.1:{port}"
    calls = [Call(url, stream=False) for _ in range(4)]
    wait_until(lambda: in_flight_to(adapter.router, victim.endpoint) >= 1, 5, "requests on the victim")
    os.killpg(fleet.replicas[victim.id].proc.pid, signal.SIGSTOP)  # hung: alive, answering nothing
    stopped = time.monotonic()
    ctl.tick()
    assert victim.not_ready_since is not None and victim.gone_at is None
    assert victim.id not in {pair[0] for pair in ctl.state.extra["routed"]}
    results = [c.join() for c in calls]
    assert all(r[0] == 200 and r[1] != victim.id and r[2] == TOKENS for r in results), results
    assert time.monotonic() - stopped < 10, results
    assert in_flight_to(adapter.router, victim.endpoint) == 0
    notes = [n.text for n in ctl.notes]
    assert any(f"to hung {victim.id}" in n and "retried" in n for n in notes), notes


@pytest.fixture
def hung_and_healthy(fleet):
    """(endpoint of a hung replica, endpoint of a healthy one): a socket that listens and never
    accepts (the kernel completes connections into its backlog; nothing answers), and local-echo."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    try:
        healthy = fleet.start(1)[0]
        yield f"http://127.0.0.1:{hung.getsockname()[1]}", healthy.endpoint
    finally:
        hung.close()


def test_a_hung_replica_holds_one_probe_round_not_every_pass(hung_and_healthy):
    """Once a replica's probe timed out, the next rounds do not wait for it: its probe goes on
    in the background and its result is taken by a later round. Before, every pass waited out
    its timeout for as long as it hung (180 s until FAILED, at 15 s a pass by default): measured
    with `skyhedge watch`, a replica killed meanwhile left the router 21 s after its exit, and
    an on-demand cover was seen READY 17.1 s after its launch (2.5 s without the hung one)."""
    hung, healthy = hung_and_healthy
    records = [
        ReplicaRecord("r-0001", "local", "local", "local-a", "spot", 0.0, endpoint=hung),
        ReplicaRecord("r-0002", "local", "local", "local-b", "spot", 0.0, endpoint=healthy),
    ]
    readiness = parse_readiness_probe({"path": "/health", "timeout_seconds": 1}, source="test")
    prober = HttpProber(readiness)

    def timed() -> tuple[dict[str, tuple[bool, str]], float]:
        t0 = time.monotonic()
        got = prober.probe(records)
        return got, time.monotonic() - t0

    first, took = timed()
    assert took >= 0.9 and first["r-0002"][0] is True
    assert first["r-0001"][0] is False and first["r-0001"][1].startswith("TimeoutError")
    second, took = timed()  # its probe is under way: this round does not wait for it
    assert took < 0.5 and second == {"r-0002": (True, second["r-0002"][1])}
    time.sleep(1.2)  # the background probe timed out meanwhile: a later round reports it
    third, took = timed()
    assert took < 0.5 and third["r-0001"][0] is False and third["r-0001"][1].startswith("TimeoutError")
    assert third["r-0002"][0] is True


class _Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_background_probe_result_goes_only_to_the_replica_it_probed():
    """A hung replica's probe runs in the background; the replica is gone meanwhile and a new one
    launched at its address (local ports are handed out again). Before, the background probes were
    kept by endpoint alone: the new replica was given the probe of the hung one before it (here
    what its closed socket gave: a failure, for a replica answering 200) and left unprobed while
    that probe was under way. Now a result only ever goes to the replica (ID and launch) it
    probed: the new one is probed as any new replica, at once."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    port = hung.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    readiness = parse_readiness_probe({"path": "/health", "timeout_seconds": 1}, source="test")
    prober = HttpProber(readiness)
    was = [ReplicaRecord("r-0001", "local", "local", "local-a", "spot", 0.0, endpoint=endpoint)]
    server = None
    try:
        assert prober.probe(was)["r-0001"][1].startswith("TimeoutError")
        assert prober.probe(was) == {}  # its probe under way, in the background
        hung.close()  # r-0001 gone; r-0005 launched at the port it had, and answering
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Healthy)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        now = [ReplicaRecord("r-0005", "local", "local", "local-a", "spot", 50.0, endpoint=endpoint)]
        got = prober.probe(now)
        # was: {} (r-0001's probe under way), or r-0001's result (False, "ConnectionRefusedError...")
        assert got == {"r-0005": (True, "HTTP 200")}
        relaunched = [ReplicaRecord("r-0001", "local", "local", "local-a", "spot", 90.0, endpoint=endpoint)]
        assert prober.probe(relaunched) == {"r-0001": (True, "HTTP 200")}  # (same ID, another launch)
    finally:
        hung.close()
        if server is not None:
            server.shutdown()
            server.server_close()


def test_with_no_retries_a_hung_replicas_requests_are_left_to_it_and_none_is_said_retried(
    tmp_path, write_spec, fleet, routers
):
    """`next_upstream_tries: 1`: nginx retries nothing, so a cut request is not answered elsewhere
    but 503 at once (measured before: both requests on the hung replica cut and answered 503 in
    1.2 s, and the note said "retried on another replica"), and a replica only slow to answer its
    probe would lose what it was answering. As with a `next_upstream_timeout` too short for any
    request to be retried, nothing is cut and nothing said: cut once it is FAILED, as before."""
    port = free_port()
    text = SPEC.format(port=port).replace(
        "{read_timeout: 120}", "{read_timeout: 120, next_upstream_tries: 1}"
    )
    spec = load_spec(write_spec(text))
    ctl, adapter, _ = routed_fleet(tmp_path, spec, fleet, routers, HttpProber(spec), FakeSource())
    victim = ctl.state.replicas[sorted(pair[0] for pair in ctl.state.extra["routed"])[0]]
    calls = [Call(f"http://127.0.0.1:{port}", stream=False) for _ in range(4)]
    wait_until(lambda: in_flight_to(adapter.router, victim.endpoint) >= 1, 5, "requests on the victim")
    held = in_flight_to(adapter.router, victim.endpoint)
    os.killpg(fleet.replicas[victim.id].proc.pid, signal.SIGSTOP)
    ctl.tick()
    assert victim.not_ready_since is not None
    assert victim.id not in {pair[0] for pair in ctl.state.extra["routed"]}
    assert in_flight_to(adapter.router, victim.endpoint) == held  # was: all cut, answered 503
    assert not [n.text for n in ctl.notes if "connection(s)" in n.text]
    os.killpg(fleet.replicas[victim.id].proc.pid, signal.SIGCONT)  # only slow after all
    results = [c.join() for c in calls]
    assert all(r[0] == 200 and r[2] == TOKENS for r in results), results
    assert sum(1 for r in results if r[1] == victim.id) == held, results  # answered where they ran


class _Severing:
    """A router that can cut only what nginx could retry (`awaiting_within`), recording each cut."""

    def __init__(self) -> None:
        self.cuts: list[tuple[list[str], float | None]] = []

    def sever(self, endpoints, *, awaiting_within=None) -> int:
        self.cuts.append((list(endpoints), awaiting_within))
        return 1


def test_a_hung_replica_is_cut_only_when_a_replica_its_old_workers_routed_still_serves():
    """nginx's old workers hold a hung replica's requests and retry them only among the replicas
    of their own config: with none of those still routed (the hung one was the only one, or every
    other failed its probe too, or the one routed now was added by this very reload), a cut
    request ends at once (503) where a replica only slow would have answered it. So the watcher
    and `routing reload --probe` cut only with a replica routed before and after the reload."""
    from skyhedge.routing.cuts import cut_hung_connections, retry_targets
    from skyhedge.spec import RouterOptions

    a, b, c = "http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003"
    hung = {a: "r-0001"}
    said: list[str] = []
    for before, after in [([a], []), ([a], [b]), ([a, b], [])]:  # alone; B new; B failed too
        router = _Severing()
        retry_on = retry_targets(before, after, hung)
        assert (
            cut_hung_connections(router, RouterOptions(), hung, said.append, said.append, retry_on=retry_on)
            == 0
        )
        assert router.cuts == [] and said == [], (before, after)
    router = _Severing()
    retry_on = retry_targets([a, b, c], [b], hung)
    assert retry_on == {b}
    assert (
        cut_hung_connections(router, RouterOptions(), hung, said.append, said.append, retry_on=retry_on) == 1
    )
    assert router.cuts == [([a], 29.0)]
    assert said == [
        "routing: closed 1 connection(s) to hung r-0001 (its probe timed out): requests it had not begun "
        "to answer, sent less than 29s ago, retried on another replica"
    ]
