"""Outdated replicas keep the readiness probe of the spec they were launched under, for `routing
reload --probe` and `apply` too, not only for the watcher.

Mid rolling update from v1 (its model server answers /health) to v2 (`run` changed, it answers
/v2/health), the watcher probes the v1 replicas with /health (`extra.earlier_probes`, the probes in
the private `tf/probes.json`). `routing reload --probe` and `apply` probed every replica with the
spec's /v2/health: the v1 replicas still serving failed it and left the router (every replica, an
outage, while the v2 ones were still booting). Real local-echo replicas and a real nginx here.
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
from local_support import LocalService, make_service, spec_dict
from routing_support import Fleet, complete, free_port, needs_nginx, record, teardown_router

from skyhedge.apply import _not_answering, apply_service, wait_ready
from skyhedge.cli import main
from skyhedge.probe_store import EARLIER_PROBES_KEY, PROBES_FILE, ProbeStore, earlier_probes
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


#: A replica server whose health path is $HEALTH (the version it runs): 200 there, 404 elsewhere.
VERSIONED_SERVER = """
import os
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == os.environ["HEALTH"] else 404)
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


def write_version(svc: LocalService, health: str) -> Path:
    data = spec_dict(svc.name, svc.base_port, replicas=2, server=svc.server, env={"HEALTH": health})
    data["readiness_probe"]["path"] = health
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
