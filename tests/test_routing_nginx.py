"""The router with a real nginx and real local-echo replicas on 127.0.0.1 (issue 4's tests)."""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from routing_support import (
    Response,
    complete,
    free_port,
    make_spec,
    needs_nginx,
    replica_answering_500,
    request,
    teardown_router,
)

from skyhedge.cli import main
from skyhedge.errors import RoutingError
from skyhedge.probe import probe_all
from skyhedge.routing import Router, RouterOptions, Upstream, read_stub_status
from skyhedge.routing import nginx as nginx_proc

pytestmark = [needs_nginx, pytest.mark.timeout(60)]


@pytest.fixture
def make_router(tmp_path: Path) -> Iterator[Callable[..., Router]]:
    made: list[Router] = []

    def _make(
        lb: str = "least_load",
        cls: type[Router] = Router,
        options: RouterOptions | None = None,
        spec_router: dict[str, Any] | None = None,
    ) -> Router:
        spec = make_spec(free_port(), lb=lb, router=spec_router)
        router = cls(spec, tmp_path / f"state{len(made)}", options=options)
        made.append(router)
        return router

    try:
        yield _make
    finally:
        for router in made:
            teardown_router(router)


class Client(threading.Thread):
    """Sends completions through the router in a loop (fresh connection each) until stopped."""

    def __init__(self, endpoint: str, max_tokens: int = 2) -> None:
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.max_tokens = max_tokens
        self.results: list[tuple[float, Response | None, str | None]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            at = time.monotonic()
            try:
                self.results.append((at, complete(self.endpoint, max_tokens=self.max_tokens), None))
            except (OSError, http.client.HTTPException) as exc:
                self.results.append((at, None, repr(exc)))

    def wait_for(self, n: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.results) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.results) >= n, f"client made only {len(self.results)} requests"

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=15)

    def failures(self) -> list[str]:
        return self.failures_of(self.results)

    @staticmethod
    def failures_of(results: list[tuple[float, Response | None, str | None]]) -> list[str]:
        out = []
        for _, resp, err in results:
            if err is not None:
                out.append(err)
            elif resp is not None and resp.status != 200:
                out.append(f"HTTP {resp.status}: {resp.body[:200]!r}")
        return out


def test_a_fleet_never_gives_two_replicas_one_port(fleet, monkeypatch):
    """The kernel may hand out a free port again before the replica given it has bound it: the
    test fleet must not start a second replica on it (seen once in a full run: `upstreams r-0001
    and r-0003 share the endpoint`)."""
    import routing_support

    first, second = free_port(), free_port()
    while second == first:
        second = free_port()
    ports = iter([first, first, second])
    monkeypatch.setattr(routing_support, "free_port", lambda: next(ports))
    replicas = fleet.start(2)
    assert sorted(r.port for r in replicas) == sorted([first, second])
    assert all(r.proc.poll() is None for r in replicas)


@pytest.mark.parametrize("lb", ["least_load", "round_robin"])
def test_300_requests_through_three_replicas_all_succeed_and_all_replicas_serve(fleet, make_router, lb):
    fleet.start(3)
    router = make_router(lb)
    status = router.up(fleet.upstreams())
    assert status["pid"] and len(status["upstreams"]) == 3
    before = read_stub_status(status["status_url"])["requests"]

    served: collections.Counter[str | None] = collections.Counter()
    statuses: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()

    def client(n: int) -> None:
        host, port = router.endpoint.removeprefix("http://").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)  # keep-alive to nginx
        try:
            for _ in range(n):
                resp = complete(router.endpoint, max_tokens=3, conn=conn)
                with lock:
                    statuses[resp.status] += 1
                    served[resp.replica] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(75,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert statuses == {200: 300}
    assert set(served) == {"r-0001", "r-0002", "r-0003"}
    assert min(served.values()) >= 30, served  # spread, not one replica doing almost everything
    assert read_stub_status(status["status_url"])["requests"] >= before + 300


def test_killed_replica_requests_keep_succeeding_and_next_reload_drops_it(fleet, make_router):
    fleet.start(3)
    router = make_router()
    router.up(fleet.upstreams())
    client = Client(router.endpoint)
    client.start()
    try:
        client.wait_for(40)
        fleet.kill("r-0002", signal.SIGKILL)
        killed_at = time.monotonic()
        client.wait_for(len(client.results) + 150)
    finally:
        client.stop()
    # A response the replica had begun to send when it died cannot be saved by any proxy (nginx
    # retries on another upstream only while nothing reached the client): the one request in
    # flight at the kill may be cut short (seen once in CI: IncompleteRead); every other succeeds.
    cut = [
        i
        for i, (at, _, err) in enumerate(client.results)
        if err and "IncompleteRead" in err and at < killed_at
    ]
    assert len(cut) <= 1, client.failures()
    assert Client.failures_of([r for i, r in enumerate(client.results) if i not in cut]) == []
    after = [r for at, r, _ in client.results if at > killed_at + 0.05 and r is not None]
    assert after and all(r.replica in {"r-0001", "r-0003"} for r in after)

    readiness = router.spec.readiness_probe
    ready = probe_all([r.endpoint for r in fleet.replicas.values()], readiness, timeout=1.0)
    upstreams = [r.upstream for r in fleet.replicas.values() if ready[r.endpoint]]
    assert [u.id for u in upstreams] == ["r-0001", "r-0003"]
    status = router.reload(upstreams)
    assert [u["id"] for u in status["upstreams"]] == ["r-0001", "r-0003"]
    conf = router.paths.conf.read_text()
    assert f":{fleet.replicas['r-0002'].port} " not in conf
    served = {complete(router.endpoint).replica for _ in range(20)}
    assert served == {"r-0001", "r-0003"}


def test_planned_scale_down_drains_before_the_replica_goes_with_zero_failures(fleet, make_router):
    fleet.start(3, env={"ECHO_TOKEN_DELAY": "0.01"})
    router = make_router()
    router.up(fleet.upstreams())
    client = Client(router.endpoint, max_tokens=2)

    # Long streamed generations in flight on every replica when the drain starts.
    streams: list[dict[str, object]] = []

    def stream_one() -> None:
        host, port = router.endpoint.removeprefix("http://").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=20)
        body = {"prompt": "The light", "max_tokens": 100, "stream": True}
        rec: dict[str, object] = {"ok": False}
        try:
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            rec["replica"] = resp.getheader("X-Replica-Id")
            data = resp.read().decode()
            rec["ok"] = resp.status == 200 and data.rstrip().endswith("data: [DONE]")
        except (OSError, http.client.HTTPException) as exc:
            rec["error"] = repr(exc)
        finally:
            rec["end"] = time.monotonic()
            conn.close()
            streams.append(rec)

    client.start()
    stream_threads = [threading.Thread(target=stream_one) for _ in range(6)]
    try:
        client.wait_for(20)
        for t in stream_threads:
            t.start()
        time.sleep(0.15)  # the streams are now mid-generation (100 tokens x 10 ms)
        victim = "r-0003"
        survivors = [u for u in fleet.upstreams() if u.id != victim]
        t0 = time.monotonic()
        assert router.drain(survivors, timeout=20.0) is True
        drained_at = time.monotonic()
        exit_code = fleet.kill(victim, signal.SIGTERM)
        client.wait_for(len(client.results) + 30)
    finally:
        client.stop()
        for t in stream_threads:
            t.join(timeout=20)

    assert exit_code == 0
    assert client.failures() == []
    assert len(streams) == 6 and all(s["ok"] for s in streams), streams
    on_victim = [s for s in streams if s.get("replica") == victim]
    assert on_victim, f"least_conn put no stream on {victim}: {streams}"
    # The drain returned only after the victim's in-flight generations had finished.
    # (A drain that did not wait would return ~0.7 s before they end; 0.3 s covers thread wake-up.)
    assert all(float(s["end"]) <= drained_at + 0.3 for s in on_victim)  # type: ignore[arg-type]
    assert drained_at - t0 > 0.5
    late = [r for at, r, _ in client.results if at > drained_at and r is not None]
    assert late and all(r.replica != victim for r in late)


class BrokenRouter(Router):
    """Renders a config nginx -t refuses, as a bad template or value would."""

    broken = False

    def render(self, upstreams, status_port):
        text = super().render(upstreams, status_port)
        return (
            text.replace("server_tokens off;", "server_tokens off;\n    no_such_directive on;")
            if self.broken
            else text
        )


@pytest.mark.parametrize("lb", ["least_load", "round_robin"])
def test_a_replica_answering_500_loses_no_request_while_the_others_can_answer(fleet, make_router, lb):
    # A replica whose model broke while /health still passes: the controller keeps it routed.
    # Its 500s went to the clients, and under least_conn it drew most requests (it answers at
    # once, so it holds the fewest connections): benchmarks/traffic_bench.py saw half fail.
    fleet.start(2)
    router = make_router(lb=lb)
    with replica_answering_500("r-0003") as broken:
        router.up([*fleet.upstreams(), broken])
        answers = [complete(router.endpoint) for _ in range(120)]
    failed = [f"HTTP {r.status} from {r.replica}" for r in answers if r.status != 200]
    assert failed == []
    assert {r.replica for r in answers} == {"r-0001", "r-0002"}


def test_a_request_every_replica_answers_500_gets_that_500_and_takes_no_replica_out(make_router):
    # Retrying a 500 must not count it against the replica (max_fails): counted, two requests
    # that make every replica answer 500 (a prompt tripping a model bug) took all three out for
    # fail_timeout, and every other client got 503 meanwhile.
    router = make_router()
    with contextlib.ExitStack() as stack:
        ups = [stack.enter_context(replica_answering_500(f"r-000{n}", poison=b"poison")) for n in (1, 2, 3)]
        router.up(ups)
        base = router.endpoint
        bad = [request(base, "POST", "/v1/completions", {"prompt": "poison"}) for _ in range(4)]
        good = [request(base, "POST", "/v1/completions", {"prompt": "fine"}) for _ in range(30)]
    assert [r.status for r in bad] == [500] * 4
    assert bad[0].json()["error"]["message"] == "model failure"  # the replica's own answer
    assert collections.Counter(r.status for r in good) == {200: 30}


def test_without_retries_a_replicas_500_reaches_the_client(fleet, make_router):
    fleet.start(1)
    router = make_router(options=RouterOptions(next_upstream_tries=1))
    with replica_answering_500("r-0002") as broken:
        router.up([*fleet.upstreams(), broken])
        statuses = collections.Counter(complete(router.endpoint).status for _ in range(20))
    assert statuses[500] > 0 and statuses[200] > 0


def test_invalid_candidate_is_refused_and_the_old_config_keeps_serving(fleet, make_router):
    fleet.start(3)
    router = make_router(cls=BrokenRouter)
    two = fleet.upstreams()[:2]
    status = router.up(two)
    conf_before = router.paths.conf.read_bytes()

    router.broken = True
    with pytest.raises(RoutingError) as info:
        router.reload(fleet.upstreams())
    # one line that says why, naming the file the refused config was kept in (it exists)
    assert str(info.value).startswith(
        f"nginx refused the new configuration (kept as {router.paths.rejected}): "
    )
    assert '[emerg] unknown directive "no_such_directive"' in str(info.value) and "\n" not in str(info.value)
    assert "no_such_directive" in info.value.stderr and "unknown directive" in info.value.stderr
    assert router.paths.conf.read_bytes() == conf_before
    assert "no_such_directive" in router.paths.rejected.read_text()
    after = router.status()
    assert after["pid"] == status["pid"]
    assert [u["id"] for u in after["upstreams"]] == ["r-0001", "r-0002"]
    served = {complete(router.endpoint).replica for _ in range(20)}
    assert served == {"r-0001", "r-0002"}

    router.broken = False
    assert len(router.reload(fleet.upstreams())["upstreams"]) == 3


def test_no_ready_replica_answers_503_and_router_health_stays_up(fleet, make_router):
    router = make_router()
    router.up([])
    resp = complete(router.endpoint)
    assert resp.status == 503 and resp.json()["error"]["type"] == "service_unavailable"
    assert resp.headers.get("retry-after") == "5"
    health = request(router.endpoint, "GET", "/-/health")
    assert health.status == 200 and health.json()["upstreams"] == 0

    (replica,) = fleet.start(1)
    router.reload([replica.upstream])
    assert complete(router.endpoint).status == 200
    assert request(router.endpoint, "GET", "/-/health").json()["upstreams"] == 1

    fleet.kill(replica.id)  # the only replica dies: nginx's own 502 comes back as JSON 503
    resp = complete(router.endpoint)
    assert resp.status == 503 and "error" in resp.json()


def test_up_is_idempotent_and_down_stops_nginx_and_frees_the_port(fleet, make_router):
    fleet.start(2)
    router = make_router()
    first = router.up(fleet.upstreams()[:1])
    again = router.up(fleet.upstreams())
    assert again["pid"] == first["pid"] and len(again["upstreams"]) == 2
    unchanged = router.up(fleet.upstreams())  # same config: no reload, same workers
    assert unchanged == again
    workers = set(nginx_proc.workers(first["pid"]))
    assert workers

    router.down()
    assert router.status() == {"endpoint": router.endpoint, "pid": None, "upstreams": [], "status_url": None}
    assert not router.paths.pid.exists()
    assert not nginx_proc.alive(first["pid"]) and not any(nginx_proc.alive(w) for w in workers)
    with pytest.raises(OSError):
        request(router.endpoint, "GET", "/-/health", timeout=1.0)
    router.down()  # idempotent too

    restarted = router.up(fleet.upstreams())
    assert restarted["pid"] and restarted["pid"] != first["pid"]


def test_reload_without_a_running_router_is_a_clear_error(make_router):
    router = make_router()
    with pytest.raises(RoutingError, match="not running"):
        router.reload([])


def test_port_in_use_fails_with_nginx_message_of_this_attempt_only(make_router):
    router = make_router()
    router.paths.error_log.parent.mkdir(parents=True, exist_ok=True)
    router.paths.error_log.write_text("[emerg] 1#1: an earlier attempt's error\n")
    with __import__("socket").socket() as busy:
        busy.bind(("127.0.0.1", router.spec.service.port))
        busy.listen()
        with pytest.raises(RoutingError) as info:
            router.up([])
    assert "Address already in use" in info.value.stderr
    assert "an earlier attempt" not in info.value.stderr
    # nginx tries bind() five times and logs each: the report says it once, with the count
    assert info.value.stderr.count("Address already in use") == 1
    assert "times)" in info.value.stderr
    assert router.status()["pid"] is None


def test_missing_nginx_binary_is_a_clear_error(tmp_path):
    router = Router(make_spec(free_port()), tmp_path, nginx_bin="/nonexistent/nginx")
    with pytest.raises(RoutingError, match="not found"):
        router.up([Upstream("r-0001", "http://127.0.0.1:1")])


def test_a_crashed_master_is_replaced_by_up_and_its_orphaned_workers_quit(fleet, make_router):
    fleet.start(1)
    router = make_router()
    pid = router.up(fleet.upstreams())["pid"]
    orphans = set(nginx_proc.workers(pid))
    nginx_proc.signal_pid(pid, signal.SIGKILL)  # the master dies alone; its workers keep the port
    deadline = time.monotonic() + 5
    while nginx_proc.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert router.status()["pid"] is None  # the stale pid file is not trusted
    assert set(nginx_proc.leftovers(pid)) == orphans
    router.preflight()  # `apply`/`watch` check first: the orphans' port is not another process's
    new = router.up(fleet.upstreams())["pid"]
    assert new and new != pid
    assert complete(router.endpoint).status == 200
    deadline = time.monotonic() + 5
    while any(nginx_proc.alive(w) for w in orphans) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(nginx_proc.alive(w) for w in orphans)


def test_a_router_whose_folder_was_deleted_is_found_and_reloaded_in_place(fleet, make_router):
    """`rm -rf router/` (or a cleanup of the state dir) under a running nginx: it kept the port
    with its old upstreams, while every start failed on it ("address in use") and new replicas
    were never routed. It is found by its command line, reported outdated, and a reload writes
    its config, folders and pid file again: the new replica is routed, by the same master."""
    fleet.start(1)
    router = make_router()
    pid = router.up(fleet.upstreams())["pid"]
    assert router.outdated() is None
    shutil.rmtree(router.paths.prefix)
    assert router.pid() == pid and router.outdated() == "the router's config is gone (its folder deleted?)"
    fleet.start(1, first=2)
    assert router.up(fleet.upstreams())["pid"] == pid  # a reload, not a start on a busy port
    assert router.paths.conf.is_file() and nginx_proc.read_pid(router.paths.pid) == pid
    assert router.outdated() is None
    served = {complete(router.endpoint).replica for _ in range(20)}
    assert served == {"r-0001", "r-0002"}


def test_a_config_installed_by_a_run_killed_before_signalling_nginx_is_applied_by_the_next_reload(
    fleet, make_router
):
    """A kill between writing the new config and SIGHUP left nginx serving the old upstreams;
    every later reload found the file as it would write it and skipped the signal, so the
    replica it had dropped stayed routed until some other change came."""
    fleet.start(2)
    router = make_router()
    pid = router.up(fleet.upstreams())["pid"]
    kept = [u for u in fleet.upstreams() if u.id == "r-0001"]
    status_port = router._read_meta().get("status_port")
    router._install(router.render(kept, status_port))  # ... and killed here, before the SIGHUP
    assert {complete(router.endpoint).replica for _ in range(20)} == {"r-0001", "r-0002"}
    router.reload(kept)
    assert router.pid() == pid
    assert {complete(router.endpoint).replica for _ in range(20)} == {"r-0001"}


def test_down_stops_a_router_whose_state_dir_was_deleted_and_makes_nothing_again(fleet, make_router):
    """`rm -rf .skyhedge` (`git clean -fdx`) under a running service: `routing down` said
    "router down" and `destroy` "Nothing to destroy." while nginx held the port, and no command
    stopped it. Found by its command line, it is stopped; no folder is made for it."""
    fleet.start(1)
    router = make_router()
    pid = router.up(fleet.upstreams())["pid"]
    workers = set(nginx_proc.workers(pid))
    state_dir = router.paths.prefix.parent
    shutil.rmtree(state_dir)
    # `status` said "Router: not running" while it held the port
    spec_file = state_dir.parent / f"{state_dir.name}.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "name": "echo",
                "placement": {"clouds": ["local"]},
                "run": {"command": "true"},
                "service": {"host": "127.0.0.1", "port": router.spec.service.port},
            }
        )
    )
    said = CliRunner().invoke(main, ["status", str(spec_file), "--state-dir", str(state_dir)])
    assert said.exit_code == 0, said.output
    assert f"Router: not recorded, but nginx pid {pid} of this state dir still runs" in said.output
    router.down()
    assert not nginx_proc.alive(pid) and not any(nginx_proc.alive(w) for w in workers)
    assert router.pid() is None and not state_dir.exists()
    with pytest.raises(OSError):
        request(router.endpoint, "GET", "/-/health", timeout=1.0)


@pytest.mark.parametrize("lost", ["router.json", "the router's folder"])
def test_a_router_that_lost_its_record_keeps_its_request_counter_across_a_reload(fleet, make_router, lost):
    """router.json is written once nginx answers: a `kill -9` of `apply` or `routing up` in
    between (measured: nginx running, no router.json) left it missing, as does the router's folder
    deleted under a running nginx. The next reload rendered the config without the stub_status
    server: `status_url` null and the autoscaler's request counter gone until nginx restarted.
    The reload keeps the port the serving config has (or, with the config gone too, takes a free
    one), and the counter answers on it."""
    fleet.start(1)
    router = make_router()
    first = router.up(fleet.upstreams())
    assert first["status_url"] is not None
    if lost == "router.json":
        router.paths.meta.unlink()
    else:
        shutil.rmtree(router.paths.prefix)
    fleet.start(1, first=2)
    status = router.up(fleet.upstreams())
    assert status["pid"] == first["pid"]  # a reload of the same master
    assert status["status_url"] is not None
    if lost == "router.json":
        assert status["status_url"] == first["status_url"]
    assert read_stub_status(status["status_url"])["requests"] >= 1
    assert [u["id"] for u in status["upstreams"]] == ["r-0001", "r-0002"]


def test_down_is_bounded_when_a_long_stream_is_in_flight(fleet, make_router):
    fleet.start(1, env={"ECHO_TOKEN_DELAY": "0.05"})
    router = make_router()
    router.up(fleet.upstreams())
    done = threading.Event()

    def long_stream() -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            request(
                router.endpoint, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 200, "stream": True}
            )
        done.set()

    threading.Thread(target=long_stream, daemon=True).start()
    time.sleep(0.2)
    t0 = time.monotonic()
    router.down(timeout=0.5)
    assert time.monotonic() - t0 < 3.0  # graceful for 0.5 s, then a fast stop; not the stream's 10 s
    assert router.status()["pid"] is None
    assert done.wait(5)


def test_an_error_report_quotes_only_the_log_lines_of_this_attempt(tmp_path):
    log = tmp_path / "error.log"
    assert nginx_proc.log_size(log) == 0 and nginx_proc.log_tail(log) == ""
    log.write_text("[emerg] old: bind() failed\n")
    mark = nginx_proc.log_size(log)
    assert nginx_proc.log_tail(log, since=mark) == ""
    with log.open("a") as fh:
        fh.write("[emerg] new: host not found\n[notice] new: exiting\n")
    assert nginx_proc.log_tail(log, since=mark) == "[emerg] new: host not found\n[notice] new: exiting"
    assert nginx_proc.log_tail(log, lines=1, since=mark) == "[notice] new: exiting"
    log.write_text("[emerg] rotated\n")  # truncated since the mark: read it all
    assert nginx_proc.log_tail(log, since=mark) == "[emerg] rotated"
    log.write_text(
        "2026/11/29 02:00:00 [emerg] 7#7: bind() failed (98: Address already in use)\n"
        "2026/11/29 02:00:01 [emerg] 7#7: bind() failed (98: Address already in use)\n"
        "2026/11/29 02:00:02 [emerg] 7#7: still could not bind()\n"
    )  # repeats differing only in their timestamp are said once
    assert nginx_proc.log_tail(log) == (
        "2026/11/29 02:00:00 [emerg] 7#7: bind() failed (98: Address already in use) (2 times)\n"
        "2026/11/29 02:00:02 [emerg] 7#7: still could not bind()"
    )
    # two busy ports: nginx alternates their errors; each is still said once, blank lines dropped
    log.write_text("nginx: [emerg] bind() to :80 failed\n\n\nnginx: [emerg] bind() to :81 failed\n" * 5)
    assert nginx_proc.log_tail(log) == (
        "nginx: [emerg] bind() to :80 failed (5 times)\nnginx: [emerg] bind() to :81 failed (5 times)"
    )


def test_preflight_names_a_port_held_by_another_process_and_accepts_our_own_router(make_router):
    import socket

    router = make_router()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", router.spec.service.port))
        busy.listen()
        with pytest.raises(RoutingError, match=f"service.port {router.spec.service.port} on 127.0.0.1"):
            router.preflight()
    router.preflight()
    router.up([])
    router.preflight()  # the port is held by this router itself: fine


def test_hundreds_of_upstreams_fit_the_shared_zone(make_router):
    # a fixed 64 KiB zone held 63 peers: at 64 nginx refused the config, so `apply` launched the
    # fleet and then failed with no router, and every later reload failed
    router = make_router()
    many = [Upstream(f"r-{i:04d}", f"http://127.0.0.1:{20000 + i}") for i in range(300)]  # never dialled
    router.up(many[:10])
    router.reload(many[:100])
    router.reload(many)
    assert request(router.endpoint, "GET", "/-/health").json()["upstreams"] == 300


def test_the_routers_own_timeout_and_body_limit_answer_as_json(make_router):
    # nginx's own 504 and 413 came back as HTML, which API clients cannot parse
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts, never answers
    try:
        router = make_router(
            options=RouterOptions(read_timeout=1, client_max_body_size="1k", next_upstream_tries=1)
        )
        router.up([Upstream("r-0001", f"http://127.0.0.1:{silent.getsockname()[1]}")])
        resp = complete(router.endpoint)
        assert resp.status == 504 and resp.json()["error"]["type"] == "timeout"
        big = request(router.endpoint, "POST", "/v1/completions", {"prompt": "x" * 4096})
        assert big.status == 413 and big.json()["error"]["type"] == "invalid_request_error"
    finally:
        silent.close()


def test_the_specs_router_knobs_reach_nginx_and_a_fixed_status_port_is_checked_up_front(make_router):
    # the knobs existed but no spec could set them: every router ran the defaults, and the
    # stub_status page moved to a random port at each start, out of reach of a metrics scraper
    status_port = free_port()
    router = make_router(
        spec_router={"read_timeout": 1, "next_upstream_tries": 1, "status_port": status_port}
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", status_port))
        busy.listen()
        with pytest.raises(RoutingError, match=f"service.router.status_port {status_port} on 127.0.0.1"):
            router.preflight()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts, never answers
    try:
        status = router.up([Upstream("r-0001", f"http://127.0.0.1:{silent.getsockname()[1]}")])
        assert status["status_url"] == f"http://127.0.0.1:{status_port}/stub_status"
        assert read_stub_status(status["status_url"])["requests"] >= 1
        started = time.monotonic()
        resp = complete(router.endpoint)
        assert resp.status == 504 and time.monotonic() - started < 10  # 1 s, not the default 600 s
        router.reload([])
        assert router.status()["status_url"] == status["status_url"]  # kept across reloads
    finally:
        silent.close()


def test_the_largest_router_values_the_spec_accepts_pass_nginx_t(make_router):
    # values past these overflowed nginx's parser: refused only by `routing up`, after `apply`
    # had launched the replicas; the spec now stops at them, and nginx takes every one of them
    from skyhedge.spec import ROUTER_INT_LIMITS

    knobs: dict[str, Any] = dict(ROUTER_INT_LIMITS)
    knobs.update(client_max_body_size="64g", worker_processes=999)
    router = make_router(spec_router=knobs)
    nginx_proc.ensure_dirs(router.paths)
    candidate = router.paths.candidate
    candidate.write_text(router.render([Upstream("r-0001", "http://127.0.0.1:9")], None), encoding="utf-8")
    nginx_proc.check_config(router.binary, router.paths, candidate)


def test_preflight_checks_a_status_port_the_spec_changed_while_our_router_runs(make_router, tmp_path):
    # a running router holds its own ports, but not a status port the spec moved since: that one
    # was found busy only by the reload, after `apply` had launched the replicas
    first, second = free_port(), free_port()
    router = make_router(spec_router={"status_port": first})
    router.up([])
    router.preflight()  # our own router holds `first`
    moved = Router(
        make_spec(router.spec.service.port, router={"status_port": second}), router.paths.prefix.parent
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", second))
        busy.listen()
        with pytest.raises(RoutingError, match=f"service.router.status_port {second} on 127.0.0.1"):
            moved.preflight()
    moved.preflight()  # free again: fine


def test_a_running_router_that_lost_its_record_still_holds_its_fixed_status_port(make_router):
    """An `apply` stopped (SIGTERM, Ctrl-C, kill) after nginx started but before router.json was
    written: the next `apply` refused "service.router.status_port N ... is not available for the
    router (Address already in use)", the port held by the service's own nginx, and so did every
    apply after it, while nginx served on."""
    status_port = free_port()
    router = make_router(spec_router={"status_port": status_port})
    first = router.up([])
    router.paths.meta.unlink()
    router.preflight()  # our own router holds it
    status = router.up([])
    assert status["pid"] == first["pid"]
    assert status["status_url"] == f"http://127.0.0.1:{status_port}/stub_status"


def test_a_reloaded_spec_that_moves_the_port_is_checked_first_and_the_running_nginx_moves(make_router):
    # `watch` reloading a spec with another service.port: the running router holds the old port,
    # so preflight checks the new one, and a reload (same master, no restart) listens there
    router = make_router()
    router.up([])
    master, old_port, new_port = router.pid(), router.spec.service.port, free_port()
    moved = Router(make_spec(new_port), router.paths.prefix.parent)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", new_port))
        busy.listen()
        with pytest.raises(RoutingError, match=f"service.port {new_port} on 127.0.0.1 is not available"):
            moved.preflight()
    moved.preflight()
    router.preflight()  # the port it listens on is its own
    moved.up([])
    assert moved.pid() == master
    assert request(f"http://127.0.0.1:{new_port}", "GET", "/-/health", timeout=2.0).status == 200
    with pytest.raises(OSError):
        request(f"http://127.0.0.1:{old_port}", "GET", "/-/health", timeout=1.0)


def test_the_controllers_request_counter_counts_client_requests_only_and_survives_an_nginx_restart(
    fleet, tmp_path
):
    """The autoscaler's QPS comes from this counter: its own stub_status reads must not count as
    traffic (an idle service reads 0 req/s), and a restarted nginx, whose raw counter starts
    over, must not make it jump back or forward."""
    from skyhedge.controller.adapters import NginxRouter

    fleet.start(1)
    upstreams = [(u.id, u.endpoint) for u in fleet.upstreams()]
    adapter = NginxRouter(make_spec(free_port()), tmp_path / "ctl")
    try:
        adapter.reload(upstreams)
        first = adapter.request_count()
        assert first == 0
        for _ in range(3):  # idle: the reads themselves are not traffic
            assert adapter.request_count() == 0
        for _ in range(5):
            assert complete(adapter.router.endpoint, max_tokens=1).status == 200
        assert adapter.request_count() == 5

        adapter.down()
        assert not adapter.running()
        adapter.reload(upstreams)  # a fresh nginx: its raw counter starts over
        assert adapter.running()
        assert adapter.request_count() == 5
        for _ in range(4):
            assert complete(adapter.router.endpoint, max_tokens=1).status == 200
        assert adapter.request_count() == 9
    finally:
        teardown_router(adapter.router)


def test_a_log_past_its_cap_is_rotated_once_and_nginx_writes_a_fresh_one(fleet, make_router):
    """A router serving for weeks: its access log (one line per request) must not grow without
    end. Past the cap it becomes access.log.1 and the running nginx reopens a fresh access.log;
    no request is lost from either, and the error log, under the cap, is left alone."""
    fleet.start(1)
    router = make_router()
    router.up(fleet.upstreams())
    access = router.paths.access_log
    for _ in range(5):
        assert complete(router.endpoint, max_tokens=1).status == 200
    # nginx logs a request after its response has gone out: wait for the fifth line
    deadline = time.monotonic() + 5
    while access.read_text().count("POST /v1/completions") < 5:
        assert time.monotonic() < deadline, "nginx did not log the requests"
        time.sleep(0.02)
    assert access.stat().st_size > 300

    assert router.rotate_logs(max_bytes=300) == [access]

    old = access.with_name("access.log.1")
    assert old.read_text().count("POST /v1/completions") == 5
    assert not router.paths.error_log.with_name("error.log.1").exists()
    # the workers reopen the log a moment after the master (measured under load: a request
    # sent at once may still be logged to access.log.1), so requests go on until one is in the
    # fresh file, and every one of them is in one of the two
    sent = 5
    deadline = time.monotonic() + 10
    while not (access.exists() and "POST /v1/completions" in access.read_text()):
        assert time.monotonic() < deadline, "nginx did not reopen its access log"
        assert complete(router.endpoint, max_tokens=1).status == 200
        sent += 1
        time.sleep(0.1)
    deadline = time.monotonic() + 5
    while (old.read_text() + access.read_text()).count("POST /v1/completions") < sent:
        assert time.monotonic() < deadline, "a request is missing from both logs"
        time.sleep(0.02)
    assert (old.read_text() + access.read_text()).count("POST /v1/completions") == sent
    assert router.rotate_logs(max_bytes=300) == []  # under the cap again: nothing to do


def test_requests_stuck_on_a_hung_replica_end_when_its_process_is_killed(fleet, make_router, tmp_path):
    """A replica that accepts connections and never answers keeps the requests nginx sent it, in
    the old workers, after a reload drops it (NOT_READY); destroying it (the local cloud kills its
    process) resets them: nginx retries each on another replica while `next_upstream_timeout`
    allows (past it nginx answers 503, the client's to retry), so none waits for read_timeout.
    This is why the controller destroys a replica that hangs while draining once it failed its
    probes for the NOT_READY grace, not at the drain's deadline."""
    import subprocess
    import sys

    fleet.start(1)
    port = free_port()
    hang = tmp_path / "hang.py"
    hang.write_text(
        "import socket, sys\n"
        "s = socket.socket()\n"
        "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
        "s.listen(64)\n"
        "held = []\n"
        "while True:\n"
        "    held.append(s.accept()[0])\n",
        encoding="utf-8",
    )
    hung = subprocess.Popen([sys.executable, str(hang), str(port)], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and hung.poll() is None
                time.sleep(0.02)
        router = make_router(lb="round_robin", spec_router={"next_upstream_timeout": 20})
        router.up([*fleet.upstreams(), Upstream("r-hung", f"http://127.0.0.1:{port}")])
        results: list[tuple[int, str | None, float]] = []

        def one() -> None:
            began = time.monotonic()
            r = complete(router.endpoint, timeout=30)
            results.append((r.status, r.replica, time.monotonic() - began))

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        time.sleep(0.5)
        router.reload(fleet.upstreams())  # NOT_READY: out of the router; the old workers keep them
        time.sleep(0.5)
        assert len(results) < 4  # (round robin: some went to the hung replica and wait)
        hung.kill()
        killed = time.monotonic()
        for t in threads:
            t.join(30)
        assert len(results) == 4 and all(status == 200 and rid == "r-0001" for status, rid, _ in results)
        assert time.monotonic() - killed < 5
    finally:
        hung.kill()
        hung.wait(timeout=5)
