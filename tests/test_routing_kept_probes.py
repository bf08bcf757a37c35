"""Outdated replicas keep the readiness probe of the spec they were launched under, for `routing
reload --probe` and `apply` too, not only for the watcher.

Mid rolling update from v1 (its model server answers /health) to v2 (`run` changed, it answers
/v2/health), the watcher probes the v1 replicas with /health (`extra.earlier_probes`, the probes in
the private `tf/probes.json`). `routing reload --probe` and `apply` probed every replica with the
spec's /v2/health: the v1 replicas still serving failed it and left the router (every replica, an
outage, while the v2 ones were still booting). And with no watcher at all, `apply` records the
probe of the spec it applies as a watcher's reload does: `apply` of v1 then of v2 rolls every
replica over. Real local-echo replicas and a real nginx here.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from controller_fakes import Clock, clocked_controller
from local_support import LocalService, make_service, spec_dict
from routing_support import Fleet, complete, free_port, needs_nginx, record, teardown_router

from skyhedge.apply import ApplyReport, _not_answering, apply_service, readiness_wait, wait_ready
from skyhedge.cli import main
from skyhedge.probe_store import (
    EARLIER_PROBES_KEY,
    FALLBACK,
    PROBE_KEY,
    PROBES_FILE,
    ProbeStore,
    applied_probes,
    earlier_probes,
)
from skyhedge.routing import Router
from skyhedge.spec import load_spec, readiness_probe_json, replica_revision
from skyhedge.state import ServiceState, load_state, save_state

pytestmark = [needs_nginx, pytest.mark.timeout(60)]

V1 = """
name: echo
placement: {{clouds: [local]}}
run: {{command: python3 examples/local-echo/server.py}}
readiness_probe: {{path: /health, timeout_seconds: 2}}
service: {{host: 127.0.0.1, port: {port}}}
"""
#: The next version: a new command (a new revision) and its new health path.
V2 = V1.replace("server.py}", "server.py --v2}").replace("/health", "/v2/health")


class _V2Server(BaseHTTPRequestHandler):
    """A v2 model server (r-0003): /v2/health and completions answer 200, anything else 404."""

    def do_GET(self) -> None:  # noqa: N802
        self._answer(200 if self.path == "/v2/health" else 404)

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer(200 if self.path == "/v1/completions" else 404)

    def _answer(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.send_header("X-Replica-Id", "r-0003")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mid_update(tmp_path: Path, write_spec) -> Iterator[tuple[Path, Path, Fleet, str]]:
    """Two READY v1 replicas (local-echo, routed by a running router), one v2 replica READY
    (answering /v2/health only), and the spec edited to v2: the state as a watcher stopped mid
    rolling update leaves it, the v1 probe kept for the v1 revision. Yields (v2 spec, state dir,
    fleet, the v2 replica's endpoint)."""
    port = free_port()
    v1_path = write_spec(V1.format(port=port), "v1.yaml")
    v2_path = write_spec(V2.format(port=port), "v2.yaml")
    v1, v2 = load_spec(v1_path), load_spec(v2_path)
    assert replica_revision(v1, "local") != replica_revision(v2, "local")
    state_dir = tmp_path / "state"
    fleet = Fleet(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _V2Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r1, r2 = fleet.start(2)
        new = f"http://127.0.0.1:{server.server_address[1]}"
        state = ServiceState(service="echo")
        state.replicas = {
            "r-0001": record("r-0001", r1.endpoint, revision=replica_revision(v1, "local")),
            "r-0002": record("r-0002", r2.endpoint, revision=replica_revision(v1, "local")),
            "r-0003": record("r-0003", new, revision=replica_revision(v2, "local")),
        }
        # what the watcher keeps (`Controller._write`): the probes first, then their digests
        store = ProbeStore(state_dir)
        kept = readiness_probe_json(v1.readiness_probe)
        store.write([kept, readiness_probe_json(v2.readiness_probe)])
        state.extra[EARLIER_PROBES_KEY] = {replica_revision(v1, "local"): store.digest(kept)}
        save_state(state_dir, state)
        result = run("routing", "up", str(v1_path), "--state-dir", str(state_dir))
        assert result.exit_code == 0, result.output
        yield v2_path, state_dir, fleet, new
    finally:
        teardown_router(Router(v1, state_dir))
        fleet.close()
        server.shutdown()
        server.server_close()


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def routed(state_dir: Path) -> list[str]:
    router = load_state(state_dir, "echo").router
    assert router is not None
    return [u["id"] for u in router["upstreams"]]


def test_routing_reload_probe_keeps_outdated_replicas_routed_with_their_own_probe(mid_update):
    """Before: r-0001 and r-0002 failed /v2/health (HTTP 404) and left the router; only the v2
    replica stayed (with none READY yet, nothing: every request 503)."""
    v2_path, state_dir, _, _ = mid_update
    result = run("routing", "reload", str(v2_path), "--state-dir", str(state_dir), "--probe")
    assert result.exit_code == 0, result.output
    assert "not ready" not in result.output
    assert routed(state_dir) == ["r-0001", "r-0002", "r-0003"]
    endpoint = load_state(state_dir, "echo").router["endpoint"]
    answers = [complete(endpoint) for _ in range(12)]
    assert {a.status for a in answers} == {200}
    assert {a.replica for a in answers} == {"r-0001", "r-0002", "r-0003"}


def test_a_v1_replica_that_does_not_answer_its_own_probe_still_leaves(mid_update):
    """The kept probe is a probe all the same: a dead v1 replica fails it and is taken out."""
    v2_path, state_dir, fleet, _ = mid_update
    fleet.replicas["r-0002"].proc.kill()
    fleet.replicas["r-0002"].proc.wait(timeout=5)
    result = run("routing", "reload", str(v2_path), "--state-dir", str(state_dir), "--probe")
    assert result.exit_code == 0, result.output
    assert routed(state_dir) == ["r-0001", "r-0003"]


def test_a_lost_probes_file_is_one_warning_and_the_specs_probe(mid_update):
    """Without `tf/probes.json` (lost, or from another time) there is no v1 probe to be had: one
    warning line, and the spec's probe for every replica, as before probes were kept."""
    v2_path, state_dir, _, _ = mid_update
    (state_dir / "tf" / PROBES_FILE).unlink()
    result = run("routing", "reload", str(v2_path), "--state-dir", str(state_dir), "--probe")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and PROBES_FILE in warnings[0] and "missing" in warnings[0], result.output
    assert routed(state_dir) == ["r-0003"]


def test_a_corrupt_probes_file_is_one_warning_and_never_rewritten(mid_update):
    """Read-only: `routing reload` does not write the probes file (the watcher does), not even a
    corrupt one."""
    v2_path, state_dir, _, _ = mid_update
    path = state_dir / "tf" / PROBES_FILE
    path.write_text("{not json")
    result = run("routing", "reload", str(v2_path), "--state-dir", str(state_dir), "--probe")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "not a probes file skyhedge wrote" in warnings[0], result.output
    assert path.read_text() == "{not json"


def test_apply_probes_outdated_replicas_with_their_own_probe(mid_update):
    """`apply`'s checks before it releases more of a rolling update (`_not_answering`) and its
    wait for readiness (`wait_ready`) probed the v1 replicas with /v2/health: the rollout stopped
    ("no longer answer(s) the readiness probe") and a v1 replica still loading was never READY."""
    v2_path, state_dir, _, _ = mid_update
    spec, state = load_spec(v2_path), load_state(state_dir, "echo")
    kept, problem = earlier_probes(state_dir, state, spec)
    assert problem is None and set(kept) == {state.replicas["r-0001"].revision}
    assert _not_answering(spec, state, kept) == []
    state.replicas["r-0002"].ready_at = None  # still loading when the spec was edited
    ready, pending = wait_ready(spec, state, timeout=5, earlier=kept)
    assert (ready, pending) == (["r-0002"], [])


def test_without_kept_probes_nothing_changes(mid_update):
    """No `earlier_probes` in the state (no watcher reloaded the spec): the spec's probe for all."""
    v2_path, state_dir, _, _ = mid_update
    state = load_state(state_dir, "echo")
    del state.extra[EARLIER_PROBES_KEY]
    save_state(state_dir, state)
    with contextlib.suppress(FileNotFoundError):
        (state_dir / "tf" / PROBES_FILE).unlink()
    result = run("routing", "reload", str(v2_path), "--state-dir", str(state_dir), "--probe")
    assert result.exit_code == 0, result.output
    assert "warning:" not in result.output
    assert routed(state_dir) == ["r-0003"]


#: A replica server whose health path is $HEALTH (the version it runs): 200 there and at /work
#: (a request any version serves), 404 elsewhere.
VERSIONED_SERVER = """
import os
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path in (os.environ["HEALTH"], "/work") else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


@pytest.fixture
def local_svc(tmp_path: Path, monkeypatch) -> Iterator[LocalService]:
    monkeypatch.chdir(tmp_path)  # local replicas run in the directory skyhedge runs in
    service = make_service(tmp_path, "kept")
    service.server.write_text(VERSIONED_SERVER, encoding="utf-8")
    try:
        yield service
    finally:
        service.cleanup()


def write_version(svc: LocalService, health: str, router_port: int | None = None) -> Path:
    """The spec of the version whose health path is `health` (its `run.env`: a new revision), two
    replicas; routed by an nginx on `router_port` if given."""
    data = spec_dict(svc.name, svc.base_port, replicas=2, server=svc.server, env={"HEALTH": health})
    data["readiness_probe"]["path"] = health
    if router_port is not None:
        data["service"] = {"host": "127.0.0.1", "port": router_port}
    svc.spec_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return svc.spec_path


def write_broken(svc: LocalService) -> Path:
    """A broken v2 (/v2/health): its command exits 3 at once, so its launches fail."""
    write_version(svc, "/v2/health")
    data = yaml.safe_load(svc.spec_path.read_text(encoding="utf-8"))
    data["run"]["command"] = "exit 3"
    svc.spec_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return svc.spec_path


@pytest.mark.timeout(180)
def test_apply_mid_update_takes_the_whole_rolling_update_with_the_kept_probe(local_svc):
    """A watcher stopped mid update (v1 probe kept for the v1 revision), then `apply` of v2: it
    checks the READY replicas before each release (`_not_answering`). Before, the v1 replicas
    failed the v2 probe and the update stopped after its first step ("r-0001, r-0002 no longer
    answer(s) the readiness probe"); now it rolls every replica over."""
    v1 = load_spec(write_version(local_svc, "/health"))
    first = apply_service(v1, local_svc.state_dir, route=False)
    assert first.ok and len(first.ready) == 2, first.errors
    state = load_state(local_svc.state_dir, "kept")
    store = ProbeStore(local_svc.state_dir)  # what the watcher keeps at its reload to v2
    kept = readiness_probe_json(v1.readiness_probe)
    store.write([kept])
    state.extra[EARLIER_PROBES_KEY] = {replica_revision(v1, "local"): store.digest(kept)}
    save_state(local_svc.state_dir, state)

    v2 = load_spec(write_version(local_svc, "/v2/health"))
    report = apply_service(v2, local_svc.state_dir, route=False)
    assert report.ok and report.rollout_stopped is None, report.rollout_stopped
    live = load_state(local_svc.state_dir, "kept").live()
    assert len(live) == 2 and {r.revision for r in live} == {replica_revision(v2, "local")}
    assert sorted(report.deleted) == sorted(first.ready)


# -- `apply` keeps the probes it applies, as a watcher's reload does (no watcher at all here) -------


@pytest.fixture
def routed_svc(local_svc: LocalService) -> Iterator[tuple[LocalService, int]]:
    """`local_svc` routed by a real nginx on a free port, taken down after the test."""
    port = free_port()
    try:
        yield local_svc, port
    finally:
        with contextlib.suppress(Exception):
            teardown_router(Router(load_spec(write_version(local_svc, "/health", port)), local_svc.state_dir))


def kept_digest(state_dir: Path, spec) -> str:
    """The digest state.json names for `spec`'s probe when the probes file holds it."""
    store = ProbeStore(state_dir)
    probes, problem = store.read()
    digest = store.digest(readiness_probe_json(spec.readiness_probe))
    assert problem is None and digest in probes, (problem, sorted(probes))
    return digest


def apply_cli(spec_path: Path, state_dir: Path, *args: str):
    return CliRunner().invoke(
        main, ["apply", str(spec_path), "--state-dir", str(state_dir), "--auto-approve", *args]
    )


class FleetWatch:
    """What a client and an operator see while an apply runs: every 50 ms the READY replicas and
    the routed ones as state.json records them, and one request through nginx (a new connection
    each: the reload's closing of idle keep-alive connections is another matter)."""

    def __init__(self, state_dir: Path, name: str) -> None:
        self.state_dir, self.name = state_dir, name
        self.ready: list[int] = []
        self.routed: list[int] = []
        self.answers: list[int | str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FleetWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        import http.client

        while not self._stop.wait(0.05):
            state = load_state(self.state_dir, self.name)
            live = state.live()
            self.ready.append(
                sum(r.ready_at is not None and r.not_ready_since is None and not r.draining for r in live)
            )
            router = state.router or {}
            self.routed.append(len(router.get("upstreams") or []))
            endpoint = router.get("endpoint")
            if not endpoint:
                continue
            host, port = endpoint.removeprefix("http://").rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
            try:
                conn.request("GET", "/work")
                self.answers.append(conn.getresponse().status)
            except OSError as exc:
                self.answers.append(type(exc).__name__)
            finally:
                conn.close()


@pytest.mark.timeout(240)
def test_apply_v1_then_v2_rolls_every_replica_over_never_below_min(routed_svc):
    """No watcher ever runs: `apply` of v1 (/health), then `apply` of v2 (a new `run.env`, its
    health path /v2/health). Before, nothing recorded v1's probe and the v2 apply stopped after
    its first step ("r-0001, r-0002 no longer answer(s) the readiness probe", exit 1); now the v1
    apply records it as the probe in force, the v2 apply keeps it for the v1 replicas (as a
    watcher's reload does) and rolls them all over, never with fewer than 2 READY and routed
    replicas, every request through nginx answered."""
    svc, port = routed_svc
    first = apply_cli(write_version(svc, "/health", port), svc.state_dir)
    assert first.exit_code == 0, first.output
    v2 = load_spec(write_version(svc, "/v2/health", port))
    with FleetWatch(svc.state_dir, "kept") as seen:
        result = apply_cli(svc.spec_path, svc.state_dir)
    assert result.exit_code == 0, result.output
    assert "stopped short" not in result.output and "warning:" not in result.output, result.output
    live = load_state(svc.state_dir, "kept").live()
    assert len(live) == 2 and {r.revision for r in live} == {replica_revision(v2, "local")}
    assert min(seen.ready) >= 2 and min(seen.routed) >= 2, (seen.ready, seen.routed)
    assert seen.answers and set(seen.answers) == {200}, seen.answers
    # the v1 replicas released, their probe goes too: v2's alone is kept
    after = load_state(svc.state_dir, "kept").extra
    assert EARLIER_PROBES_KEY not in after
    assert after[PROBE_KEY] == kept_digest(svc.state_dir, v2)


@pytest.mark.timeout(240)
def test_a_later_apply_and_a_watcher_find_what_an_apply_kept(routed_svc):
    """`apply` of v2 with --no-rollout takes one step and leaves the v1 replicas serving, their
    probe kept: `routing reload --probe` keeps them routed, a watcher started then reads the store
    as it reads its own (the v1 probe for the v1 revision; the probe in force is the spec's, so no
    "probe changed" check at its start, no warning), and a later `apply` finishes the update."""
    svc, port = routed_svc
    assert apply_cli(write_version(svc, "/health", port), svc.state_dir).exit_code == 0
    v1, v2 = load_spec(svc.spec_path), load_spec(write_version(svc, "/v2/health", port))
    step = apply_cli(svc.spec_path, svc.state_dir, "--no-rollout")
    assert step.exit_code == 0, step.output
    state = load_state(svc.state_dir, "kept")
    v1_rev = replica_revision(v1, "local")
    assert v1_rev in {r.revision for r in state.live()}
    assert (svc.state_dir / "tf" / PROBES_FILE).stat().st_mode & 0o777 == 0o600

    reload = run("routing", "reload", str(svc.spec_path), "--state-dir", str(svc.state_dir), "--probe")
    assert reload.exit_code == 0 and "warning:" not in reload.output, reload.output
    after = load_state(svc.state_dir, "kept")
    assert after.router is not None and len(after.router["upstreams"]) == len(after.live()) == 3

    clock = Clock()
    ctl = clocked_controller(v2, svc.state_dir, clock)
    assert ctl._earlier_probes == {v1_rev: readiness_probe_json(v1.readiness_probe)}
    assert ctl._restart_probe is None and ctl.held_probe is None
    assert [n.text for n in ctl.notes if "probe" in n.text] == []
    assert ctl.state.extra[PROBE_KEY] == state.extra[PROBE_KEY]  # (the same store, the same key)

    rest = apply_cli(svc.spec_path, svc.state_dir)
    assert rest.exit_code == 0, rest.output
    assert {r.revision for r in load_state(svc.state_dir, "kept").live()} == {replica_revision(v2, "local")}


@pytest.mark.timeout(240)
def test_a_state_from_before_the_store_stops_as_before_then_records(local_svc):
    """A state written before probes were kept (no `extra.probe`, no probes file): nothing tells
    v1's probe, so the v2 apply stops after its first step as it always did, with no warning
    about a store it never had; from then on the spec's probe is recorded."""
    v1 = load_spec(write_version(local_svc, "/health"))
    assert apply_service(v1, local_svc.state_dir, route=False).ok
    state = load_state(local_svc.state_dir, "kept")
    del state.extra[PROBE_KEY]
    save_state(local_svc.state_dir, state)
    (local_svc.state_dir / "tf" / PROBES_FILE).unlink()
    v2 = load_spec(write_version(local_svc, "/v2/health"))
    report = apply_service(v2, local_svc.state_dir, route=False)
    assert report.rollout_stopped is not None and "no longer answer" in report.rollout_stopped
    assert report.warnings == []
    extra = load_state(local_svc.state_dir, "kept").extra
    assert EARLIER_PROBES_KEY not in extra
    assert extra[PROBE_KEY] == kept_digest(local_svc.state_dir, v2)


# -- what `apply` keeps, on states made by hand (no replica runs) -----------------------------------


def kept_state(state_dir: Path, spec, revision: str) -> ServiceState:
    """Two READY replicas of `revision` (nothing listens: nothing is probed here), `spec`'s probe
    recorded as the one in force, as an apply or a watcher of `spec` leaves it."""
    state = ServiceState(service="echo")
    state.replicas = {
        rid: record(rid, f"http://127.0.0.1:{free_port()}", revision=revision) for rid in ("r-0001", "r-0002")
    }
    store = ProbeStore(state_dir)
    probe = readiness_probe_json(spec.readiness_probe)
    store.keep(probe, {})
    store.name(state.extra, probe, {})
    save_state(state_dir, state)
    return state


def test_apply_of_a_new_version_keeps_the_outgoing_probe_for_the_outdated_replicas(tmp_path, write_spec):
    """As at a watcher's reload: the v1 replicas keep /health, v2's /v2/health is in force."""
    port = free_port()
    v1, v2 = (
        load_spec(write_spec(V1.format(port=port))),
        load_spec(write_spec(V2.format(port=port), "v2.yaml")),
    )
    state = kept_state(tmp_path, v1, replica_revision(v1, "local"))
    kept = applied_probes(tmp_path, state, v2)
    assert kept.warning is None
    assert kept.in_force == readiness_probe_json(v2.readiness_probe)
    assert kept.earlier == {replica_revision(v1, "local"): readiness_probe_json(v1.readiness_probe)}
    assert kept.probes[replica_revision(v1, "local")].path == "/health"


def test_apply_of_a_probe_only_edit_leaves_the_check_to_a_watcher(tmp_path, write_spec):
    """A probe-only edit (same revision): `applied_probes` alone does not take it (`apply` checks it
    against the READY replicas when it waits: `_check_spec_probe`; with `--no-wait` it asks none);
    the probe they were probed with stays named, and a watcher started later checks the spec's
    against them (`_check_restart_probe`), as without the apply."""
    port = free_port()
    v1 = load_spec(write_spec(V1.format(port=port)))
    edited = load_spec(
        write_spec(V1.format(port=port).replace("timeout_seconds: 2", "timeout_seconds: 3"), "e.yaml")
    )
    assert replica_revision(edited, "local") == replica_revision(v1, "local")
    state = kept_state(tmp_path, v1, replica_revision(v1, "local"))
    kept = applied_probes(tmp_path, state, edited)
    assert kept.in_force == readiness_probe_json(v1.readiness_probe) and kept.earlier == {}
    kept.keep(state, edited)
    save_state(tmp_path, state)
    ctl = clocked_controller(edited, tmp_path, Clock())
    assert ctl._restart_probe is not None and ctl._restart_probe[1] == readiness_probe_json(
        v1.readiness_probe
    )


def test_a_lost_probes_file_is_one_warning_only_when_an_outdated_replica_needs_it(tmp_path, write_spec):
    """The probes file gone: the v2 apply cannot tell the v1 replicas' probe (one warning line, and
    the spec's probe for them); a plain re-apply of v1 needs none (no warning), and records v1's."""
    port = free_port()
    v1, v2 = (
        load_spec(write_spec(V1.format(port=port))),
        load_spec(write_spec(V2.format(port=port), "v2.yaml")),
    )
    state = kept_state(tmp_path, v1, replica_revision(v1, "local"))
    (tmp_path / "tf" / PROBES_FILE).unlink()
    kept = applied_probes(tmp_path, state, v2)
    assert kept.earlier == {} and kept.warning is not None
    assert PROBES_FILE in kept.warning and "missing" in kept.warning and FALLBACK in kept.warning
    again = applied_probes(tmp_path, state, v1)
    assert again.warning is None and again.in_force == readiness_probe_json(v1.readiness_probe)


def test_the_not_ready_line_says_how_long_they_were_waited_on(tmp_path, write_spec, monkeypatch):
    """An outdated replica still loading is waited on as long as its kept probe says (600 s), not
    the spec's 20 s: the wait (`readiness_wait`) and `apply`'s "not ready after Ns" line agree."""
    port = free_port()
    v1_text = V1.format(port=port).replace(
        "timeout_seconds: 2", "timeout_seconds: 2, initial_delay_seconds: 600"
    )
    v2_text = V2.format(port=port).replace(
        "timeout_seconds: 2", "timeout_seconds: 2, initial_delay_seconds: 20"
    )
    v1, v2 = load_spec(write_spec(v1_text)), load_spec(write_spec(v2_text, "v2.yaml"))
    state = kept_state(tmp_path, v1, replica_revision(v1, "local"))
    state.replicas["r-0002"].ready_at = None  # still loading
    kept = applied_probes(tmp_path, state, v2)
    assert readiness_wait(v2, state, kept.probes) == 600.0
    assert readiness_wait(v2, state) == 20.0  # (no kept probe: the spec's)

    import skyhedge.cli.apply as cli_apply

    for waited, said in ((600.0, "600s"), (1_000_000.0, "1000000s"), (2.5, "2.5s")):
        report = ApplyReport(not_ready=["r-0002"], not_ready_after=waited)
        monkeypatch.setattr(cli_apply, "apply_service", lambda *a, report=report, **kw: report)
        result = CliRunner().invoke(main, ["apply", str(tmp_path / "v2.yaml"), "--state-dir", str(tmp_path)])
        assert result.exit_code == 1
        assert f"not ready after {said}: r-0002" in result.output, result.output


def test_an_apply_reverting_a_failed_update_records_the_specs_probe_not_the_failed_ones(tmp_path, write_spec):
    """`apply` of v2 whose launches all failed (Terraform's error: no v2 replica runs) recorded
    v2's probe as the one in force and kept /health for the v1 replicas. Reverting to v1 with
    `apply` then kept v2's probe named as in force, as if the v1 replicas had been probed with
    it (they were probed with their kept /health), and dropped the kept one: a later `apply` of
    v2 found its own probe in force, kept none for the v1 replicas, and probed them with
    /v2/health, which they fail (the rolling update stops after its first step)."""
    port = free_port()
    v1, v2 = (
        load_spec(write_spec(V1.format(port=port))),
        load_spec(write_spec(V2.format(port=port), "v2.yaml")),
    )
    v1_rev = replica_revision(v1, "local")
    state = kept_state(tmp_path, v1, v1_rev)
    failed = applied_probes(tmp_path, state, v2)  # the v2 apply: recorded, then Terraform failed
    failed.keep(state, v2)
    save_state(tmp_path, state)
    assert set(state.extra[EARLIER_PROBES_KEY]) == {v1_rev}

    reverted = applied_probes(tmp_path, state, v1)
    assert reverted.in_force == readiness_probe_json(v1.readiness_probe)
    reverted.keep(state, v1)
    save_state(tmp_path, state)

    again = applied_probes(tmp_path, state, v2)
    assert again.warning is None
    assert again.probes[v1_rev].path == "/health"


@pytest.mark.timeout(240)
def test_a_failed_update_reverted_by_apply_leaves_the_next_apply_the_probe_to_keep(local_svc):
    """No watcher: `apply` of v1 (/health); `apply` of a broken v2 (/v2/health, a command that
    exits at once: Terraform's apply fails, the v1 replicas keep serving); `apply` of v1 again
    (the revert). Before, the revert kept the broken version's probe named as the one in force,
    as if the v1 replicas had been probed with it, so the next `apply` of a v2 with /v2/health saw
    no probe change, kept none for the v1 replicas and asked them /v2/health: both "no longer
    answer" (its rolling update stops after the first step). Now v1's probe is in force again,
    and the v1 replicas are asked /health, which they answer."""
    v1 = load_spec(write_version(local_svc, "/health"))
    assert apply_service(v1, local_svc.state_dir, route=False).ok

    broken = apply_service(load_spec(write_broken(local_svc)), local_svc.state_dir, route=False)
    assert not broken.ok and "exited at once" in str(broken.errors[0])

    assert apply_service(load_spec(write_version(local_svc, "/health")), local_svc.state_dir, route=False).ok
    state = load_state(local_svc.state_dir, "kept")
    assert state.extra[PROBE_KEY] == kept_digest(local_svc.state_dir, v1)

    v2 = load_spec(write_version(local_svc, "/v2/health"))
    kept = applied_probes(local_svc.state_dir, state, v2)
    assert kept.probes[replica_revision(v1, "local")].path == "/health"
    v1_ready = sorted(r.id for r in state.live() if r.revision == replica_revision(v1, "local"))
    assert v1_ready == ["r-0001", "r-0002", "r-0003"]  # r-0003: re-created by the revert, with v1
    assert _not_answering(v2, state, kept.probes) == []  # before: ['r-0001', 'r-0002']


@pytest.mark.timeout(120)
def test_the_failed_launch_an_apply_reverting_an_update_recreates_records_the_reverted_to_revision(local_svc):
    """No watcher: `apply` of v1; `apply` of a broken v2 (its new r-0003 fails to launch, left
    tainted, recorded under the broken revision); `apply` of v1 again, which re-creates r-0003
    with v1's command. Before, r-0003 kept the broken revision in state.json: outdated, asked the
    broken version's /v2/health, never READY, and the next `apply` of a (fixed) v2 created nothing
    ("3 replica(s) still run an older spec"). Now it records v1's revision, is READY, and v2
    rolls every replica over."""
    v1 = load_spec(write_version(local_svc, "/health"))
    assert apply_service(v1, local_svc.state_dir, route=False).ok
    broken = load_spec(write_broken(local_svc))
    assert not apply_service(broken, local_svc.state_dir, route=False).ok
    launched = load_state(local_svc.state_dir, "kept").replicas["r-0003"]
    assert launched.revision == replica_revision(broken, "local")  # what it failed to launch as

    revert = apply_service(load_spec(write_version(local_svc, "/health")), local_svc.state_dir, route=False)
    assert revert.ok and "r-0003" in revert.created, revert.errors
    state = load_state(local_svc.state_dir, "kept")
    assert {r.id: r.revision for r in state.live()} == dict.fromkeys(
        ["r-0001", "r-0002", "r-0003"], replica_revision(v1, "local")
    )  # before: r-0003 under the broken revision
    assert "r-0003" in revert.ready and revert.notes == []

    v2 = load_spec(write_version(local_svc, "/v2/health"))
    report = apply_service(v2, local_svc.state_dir, route=False)
    assert report.ok and report.rollout_stopped is None and report.notes == [], report.notes
    assert sorted(report.deleted) == ["r-0001", "r-0002", "r-0003"]  # before: nothing created nor deleted
    live = load_state(local_svc.state_dir, "kept").live()
    assert len(live) == 2 and {r.revision for r in live} == {replica_revision(v2, "local")}


def _edit_probe_path(svc: LocalService, path: str) -> Path:
    """The spec with only its readiness probe's path changed (same revision: nothing rolls)."""
    data = yaml.safe_load(svc.spec_path.read_text(encoding="utf-8"))
    data["readiness_probe"]["path"] = path
    svc.spec_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return svc.spec_path


def _in_force(state_dir: Path) -> str:
    store = ProbeStore(state_dir)
    probes, _ = store.read()
    return probes[load_state(state_dir, "kept").extra[PROBE_KEY]]["path"]


@needs_nginx
def test_apply_checks_a_probe_only_edit_and_routing_probe_agrees_with_it(routed_svc):
    """A probe-only edit to a path no replica serves, applied: `apply` said nothing and kept the
    earlier probe named, unchecked, until a watcher ran; then `routing up --probe` probed with the
    spec's and took both replicas out (measured: "0 upstreams", every request 503), where a
    watcher refuses that probe and keeps them. `apply` checks it now as the watcher does (one
    warning, the earlier one kept in force), `routing --probe` does the same (both stay routed),
    and an edit that a READY replica passes is checked and taken."""
    svc, port = routed_svc
    spec_path = write_version(svc, "/v1/health", port)
    first = apply_service(load_spec(spec_path), svc.state_dir, route=False)
    assert first.ok and sorted(first.ready) == ["r-0001", "r-0002"], first.errors
    assert _in_force(svc.state_dir) == "/v1/health"

    _edit_probe_path(svc, "/v2/health")
    edited = apply_service(load_spec(spec_path), svc.state_dir, route=False)
    assert edited.ok and edited.created == [] and edited.deleted == []
    assert any(
        "none of the 2 READY replica(s) passes it (r-0001: HTTP 404): not taken" in w for w in edited.warnings
    ), edited.warnings
    assert _in_force(svc.state_dir) == "/v1/health"
    routed_up = run("routing", "up", str(spec_path), "--state-dir", str(svc.state_dir), "--probe")
    assert routed_up.exit_code == 0, routed_up.output
    assert "not taken, they are probed with the earlier one" in routed_up.output
    router = load_state(svc.state_dir, "kept").router
    assert router is not None and [u["id"] for u in router["upstreams"]] == ["r-0001", "r-0002"]  # was: []

    _edit_probe_path(svc, "/work")  # one they answer: checked, taken
    taken = apply_service(load_spec(spec_path), svc.state_dir, route=False)
    assert taken.ok and not taken.warnings, taken.warnings
    assert _in_force(svc.state_dir) == "/work"  # was: /v1/health until a watcher ran


def test_a_declined_apply_neither_takes_nor_says_taken_the_edited_probe(local_svc):
    """A probe edit (to a path the replicas answer) applied with another change, the plan then
    declined at the prompt: before, `apply` had already said the new probe was "checked ...:
    taken", though a declined plan records nothing. Now that is said only once the plan goes
    ahead, and the state names the earlier probe still; the apply confirmed after takes it."""
    spec_path = write_version(local_svc, "/v1/health")
    first = apply_service(load_spec(spec_path), local_svc.state_dir, route=False)
    assert first.ok and sorted(first.ready) == ["r-0001", "r-0002"], first.errors
    _edit_probe_path(local_svc, "/work")
    data = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    data["replica_policy"]["min_replicas"] = data["replica_policy"]["max_replicas"] = 3
    spec_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    state_file = local_svc.state_dir / "state.json"
    before = state_file.read_bytes()

    said: list[str] = []
    asked: list[int] = []
    declined = apply_service(
        load_spec(spec_path),
        local_svc.state_dir,
        route=False,
        confirm=lambda *_: asked.append(1) and False,
        say=said.append,
    )
    assert asked and declined.cancelled and declined.created == []
    assert not [line for line in said if "readiness_probe" in line], said  # was: "...: taken"
    assert state_file.read_bytes() == before and _in_force(local_svc.state_dir) == "/v1/health"

    taken = apply_service(load_spec(spec_path), local_svc.state_dir, route=False, say=said.append)
    assert taken.ok and len(taken.created) == 1, taken.errors
    assert [line for line in said if line.startswith("readiness_probe:")] == [
        "readiness_probe: the spec's is not the one its replicas were probed with: checked (a READY "
        "replica passes it, or none could be asked): taken"
    ]
    assert _in_force(local_svc.state_dir) == "/work"
