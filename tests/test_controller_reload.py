"""A running watcher re-reads its spec: when the file changes (checked before every pass) or on
request (SIGUSR1 from `skyhedge reload`, or SIGHUP). A spec it can take is taken between two
passes without a restart; one it cannot (does not load, renames the service, moves the router to
a taken port, ...) is refused in one line naming the file and field, and the running spec stays.
(The whole loop, live, is in test_controller_local_e2e.py: a `run.env` change rolls the replicas
over under load.)"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from controller_fakes import LOCAL_SPEC as LOCAL
from controller_fakes import ROUTER_PORT
from routing_support import needs_nginx, record

from skyhedge.clouds.local import capacity, runtime_dir
from skyhedge.controller import presence
from skyhedge.controller.runner import SPEC_SETTLE_SECONDS, Watcher
from skyhedge.errors import RoutingError
from skyhedge.routing import Router
from skyhedge.spec import load_spec, replica_revision, spec_changes
from skyhedge.state import ReplicaRecord

REPO = Path(__file__).resolve().parents[1]


def rewrite(path: Path, old: str, new: str) -> None:
    """Edit the spec as an editor would; the stamp moves even within one mtime tick (size, inode).
    Dated a moment ago, past SPEC_SETTLE_SECONDS: the edit is done, and the next pass reads it."""
    text = path.read_text()
    assert old in text
    tmp = path.with_suffix(".swp")
    tmp.write_text(text.replace(old, new))
    done = time.time() - 2 * SPEC_SETTLE_SECONDS
    os.utime(tmp, (done, done))
    os.replace(tmp, path)


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "service.yaml"
    path.write_text(LOCAL)
    return path


def watcher_for(spec_file: Path, tmp_path: Path, **kw) -> Watcher:
    kw.setdefault("route", False)
    return Watcher(load_spec(spec_file), tmp_path / "state", spec_path=spec_file, **kw)


def notes(w: Watcher) -> list[str]:
    assert w.controller is not None
    return [n.text for n in w.controller.notes]


def test_an_edited_spec_is_taken_before_the_next_pass_and_the_change_is_named(spec_file, tmp_path):
    with watcher_for(spec_file, tmp_path) as w:
        w._check_spec()
        assert notes(w) == []  # nothing changed since it started
        rewrite(spec_file, "min_replicas: 1", "min_replicas: 2")
        w._check_spec()
        assert w.controller is not None
        assert w.spec.replica_policy.min_replicas == 2
        assert w.controller.spec is w.spec
        assert notes(w)[-1] == f"spec reloaded from {spec_file}: replica_policy.min_replicas: 1 -> 2"
        w._check_spec()  # read once: not again
        assert len(notes(w)) == 1


def test_a_spec_written_in_place_is_read_once_it_stands_still_not_half_written(spec_file, tmp_path):
    """A writer that rewrites the file in place (truncate, then write in pieces) leaves a prefix
    of the new spec between its writes, and a prefix can be a valid spec: read then, a watcher
    took `run.command: p` and started rolling every replica over to it. An edit is read once the
    file has stood still for SPEC_SETTLE_SECONDS; a reload request reads at once."""
    full = LOCAL.replace('run: {command: "true"}', "run:\n  command: python3 -m http.server")
    prefix = full[: full.index("python3") + 1] + "\n"  # `command: p`: a valid spec
    assert load_spec(_written(tmp_path / "prefix.yaml", prefix)).run.command == "p"
    with watcher_for(spec_file, tmp_path) as w:
        spec_file.write_text(prefix)  # the first piece, this moment
        w._check_spec()
        assert w.spec.run.command == "true" and notes(w) == []
        spec_file.write_text(full)  # the rest, still within the settle time
        w._check_spec()
        assert w.spec.run.command == "true" and notes(w) == []
        done = time.time() - 2 * SPEC_SETTLE_SECONDS  # ... and then it stood still
        os.utime(spec_file, (done, done))
        w._check_spec()
        assert w.spec.run.command == "python3 -m http.server"
        assert len(notes(w)) == 1 and "run.command" in notes(w)[0]
        spec_file.write_text(LOCAL)  # written this moment, but asked for: read at once
        w.request_reload()
        w._check_spec()
        assert w.spec.run.command == "true"


def test_an_in_place_rewrite_that_starts_between_the_settle_check_and_the_read_is_not_taken(
    spec_file, tmp_path, monkeypatch
):
    """The settle check and the read were two stats apart: a writer truncating the file and
    writing its first piece between them (right after an edit that had stood still) had that
    prefix read, unchecked, and taken (a valid spec: `run.command: p`). What is read is the file
    whose stamp was checked, and a file that changed while it was read is read again later."""
    from skyhedge.controller import runner

    full = LOCAL.replace('run: {command: "true"}', "run:\n  command: python3 -m http.server")
    prefix = full[: full.index("python3") + 1] + "\n"  # `command: p`: a valid spec
    with watcher_for(spec_file, tmp_path) as w:
        rewrite(spec_file, "min_replicas: 1", "min_replicas: 2")  # an edit done a moment ago
        settling = runner._SpecFile.settling

        def then_a_writer_starts(stamp):
            answer = settling(stamp)
            with open(spec_file, "r+") as fh:  # in place: truncated, then its first piece
                fh.truncate(0)
                fh.write(prefix)
            return answer

        monkeypatch.setattr(runner._SpecFile, "settling", staticmethod(then_a_writer_starts))
        w._check_spec()
        assert w.spec.run.command == "true", notes(w)
        monkeypatch.setattr(runner._SpecFile, "settling", staticmethod(settling))
        spec_file.write_text(full)  # the writer's last piece: read once it stands still
        w._check_spec()
        assert w.spec.run.command == "true", notes(w)
        done = time.time() - 2 * SPEC_SETTLE_SECONDS
        os.utime(spec_file, (done, done))
        w._check_spec()
        assert w.spec.run.command == "python3 -m http.server"
        assert w.spec.replica_policy.min_replicas == 1


def _written(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_run_change_names_no_value_and_says_the_replicas_roll_over(spec_file, tmp_path):
    with watcher_for(spec_file, tmp_path) as w:
        rewrite(spec_file, 'command: "true"', 'command: "serve --token s3cret"')
        w._check_spec()
        assert notes(w)[-1].endswith(
            "run.command changed (replicas roll over to the new revision one at a time)"
        )
        assert "s3cret" not in notes(w)[-1]


@pytest.mark.parametrize(
    ("old", "new", "why"),
    [
        ("min_replicas: 1", "min_replicas: many", "replica_policy.min_replicas"),
        ("min_replicas: 1", "min_replicas: [1", "invalid YAML"),
        ("name: svc", "name: other", "name: the service is named 'other' now, 'svc' when this watcher"),
        ("zones: [local-a, local-b]", "zones: [local-a, mars-1]", "mars-1"),
        # a plug-in policy is only checked for its shape when the spec loads: it must also import
        ("policy: spothedge", "policy: 'nosuchmodule:Hedge'", "nosuchmodule"),
        ("run:", "terraform: {backend: local, config: {path: /tmp/x.tfstate}}\nrun:", "terraform: the"),
    ],
)
def test_a_spec_it_cannot_take_is_refused_in_one_line_and_the_running_one_stays(
    spec_file, tmp_path, old, new, why
):
    with watcher_for(spec_file, tmp_path) as w:
        running, controller = w.spec, w.controller
        assert controller is not None
        executor = controller.executor
        rewrite(spec_file, old, new)
        w._check_spec()
        (line,) = notes(w)
        assert line.startswith("spec reload refused: ") and str(spec_file) in line and why in line, line
        assert line.endswith("; keeping the running spec") and "\n" not in line
        assert w.spec is running and controller.spec is running and controller.executor is executor
        w._check_spec()  # the same bad content is not refused again every pass
        assert len(notes(w)) == 1
        rewrite(spec_file, new, old)  # fixed: taken (here: identical to the running spec)
        w._check_spec()
        assert notes(w)[-1] == f"spec {spec_file} re-read: no change from the running spec"


def test_every_reload_outcome_is_said_even_when_the_same_words_were_said_a_moment_ago(spec_file, tmp_path):
    """Each outcome answers an edit of its own. The watcher says a repeated line once a minute (a
    failure retried every pass), and reload outcomes went through that too: the same typo made
    again after a fix, and the fix itself re-read as "no change", were not logged at all within
    the minute (measured live: a refused `min_replicas: many`, fixed, then made again, logged one
    refusal of two; `skyhedge_spec_refused` and `status` said 1, the log said nothing)."""
    with watcher_for(spec_file, tmp_path) as w:
        for _ in range(2):
            rewrite(spec_file, "min_replicas: 1", "min_replicas: many")
            w._check_spec()
            rewrite(spec_file, "min_replicas: many", "min_replicas: 1")
            w._check_spec()
            rewrite(spec_file, "min_replicas: 1", "min_replicas: 2")
            w._check_spec()
            rewrite(spec_file, "min_replicas: 2", "min_replicas: 1")
            w._check_spec()
        said = notes(w)
        assert [line.split(":")[0] for line in said] == [
            "spec reload refused",
            f"spec {spec_file} re-read",
            f"spec reloaded from {spec_file}",
            f"spec reloaded from {spec_file}",
        ] * 2, said
        assert said[:4] == said[4:]


def test_a_probe_edit_no_ready_replica_passes_is_refused_before_it_fails_them_all(spec_file, tmp_path):
    """The next probe uses a reloaded `readiness_probe`, on every replica at once: a path typo
    made every READY replica NOT_READY, then FAILED and replaced 180 s later by replicas of the
    same revision failing the same probe (measured live, 5 READY to 0 routed, every request 503
    from then on). Such an edit is refused, probed against the READY replicas before it is
    taken; one that some of them pass is taken, and so is one that comes with a new revision
    (the new version's health path, which the old replicas cannot be expected to answer)."""
    from fake_http import json_server

    def answer(path: str, _query: dict) -> tuple[int, object]:
        return (200, {"status": "ok"}) if path in ("/health", "/ready") else (404, {"error": "no such path"})

    with json_server(answer) as one, json_server(answer) as two, watcher_for(spec_file, tmp_path) as w:
        assert w.controller is not None
        state = w.controller.state
        for rid, base in (("r-0001", one), ("r-0002", two)):
            state.replicas[rid] = record(rid, base, revision=replica_revision(w.spec, "local"))
        rewrite(spec_file, "run:", "readiness_probe: {path: /helth}\nrun:")
        w._check_spec()
        line = notes(w)[-1]
        refused = f"spec reload refused: {spec_file}: readiness_probe: none of the 2 READY"
        assert line.startswith(refused), line
        assert "(r-0001: HTTP 404)" in line and line.endswith("; keeping the running spec")
        assert w.spec.readiness_probe.path == "/health" and w.last_reload_outcome == "refused"
        rewrite(spec_file, "path: /helth", "path: /ready")  # one they pass: taken
        w._check_spec()
        assert w.spec.readiness_probe.path == "/ready", notes(w)[-1]
        rewrite(spec_file, 'path: /ready}\nrun: {command: "true"}', 'path: /v2/up}\nrun: {command: "v2"}')
        w._check_spec()  # a new version with its own health path: the rolling update's to judge
        assert w.spec.readiness_probe.path == "/v2/up", notes(w)[-1]


@pytest.mark.parametrize("case", ["outdated fail it", "outdated pass it"])
def test_a_probe_edit_mid_rolling_update_is_judged_by_the_replicas_it_will_probe(spec_file, tmp_path, case):
    """Mid-rolling-update, the outdated replicas keep the probe they were launched under
    (`earlier_probes`): a probe-only edit is the current revision's replicas' alone, and only they
    can say whether it is passable. Judged by every READY replica, an edit was refused because
    the outdated ones (the old version, without the new health path) failed a probe they are
    never probed with, and nothing retried it once the update was done; and a typo that every
    current replica fails was taken because an outdated one answered it (then the current ones
    went NOT_READY, FAILED and were replaced by replicas failing it alike)."""
    from fake_http import json_server

    def old_version(path: str, _query: dict) -> tuple[int, object]:
        return (200, {}) if case == "outdated pass it" or path == "/health" else (404, {})

    def new_version(path: str, _query: dict) -> tuple[int, object]:
        return (200, {}) if path == "/v2/health" else (404, {})

    rewrite(spec_file, 'run: {command: "true"}', 'readiness_probe: {path: /v2/health}\nrun: {command: "v2"}')
    with contextlib.ExitStack() as servers:
        old, new = (servers.enter_context(json_server(h)) for h in (old_version, new_version))
        with watcher_for(spec_file, tmp_path) as w:
            assert w.controller is not None
            state = w.controller.state
            state.replicas["r-0001"] = record("r-0001", old, revision="0ld0ld0ld0ld")
            # the new version's replica: still booting, or READY
            state.replicas["r-0002"] = record(
                "r-0002", new, ready=case != "outdated fail it", revision=replica_revision(w.spec, "local")
            )
            if case == "outdated fail it":  # a longer timeout, for the new version: passable
                rewrite(spec_file, "path: /v2/health}", "path: /v2/health, timeout_seconds: 20}")
                w._check_spec()
                assert w.last_reload_outcome == "taken", notes(w)[-1]
                assert w.spec.readiness_probe.timeout_seconds == 20
            else:  # a typo the new version's replica fails, though the old version answers it
                rewrite(spec_file, "path: /v2/health}", "path: /v2/helth}")
                w._check_spec()
                assert w.last_reload_outcome == "refused", notes(w)[-1]
                said = "none of the 1 READY replica(s) passes the new probe (r-0002: HTTP 404)"
                assert said in notes(w)[-1]
                assert w.spec.readiness_probe.path == "/v2/health"


def test_a_probe_edit_refused_while_the_replicas_could_not_answer_it_is_taken_when_asked_again(
    spec_file, tmp_path
):
    """A refusal is kept for the file as it is (a pass does not probe the replicas again), so an
    edit refused while its only READY replica could not answer it (busy, restarting its server)
    stayed refused with nothing saying how to have it taken: the line names `skyhedge reload`,
    and a reload asked for probes them again."""
    from fake_http import json_server

    answering = {"/health"}

    def answer(path: str, _query: dict) -> tuple[int, object]:
        return (200, {}) if path in answering else (503, {})

    with json_server(answer) as base, watcher_for(spec_file, tmp_path) as w:
        assert w.controller is not None
        w.controller.state.replicas["r-0001"] = record(
            "r-0001", base, revision=replica_revision(w.spec, "local")
        )
        rewrite(spec_file, "run:", "readiness_probe: {path: /ready}\nrun:")
        w._check_spec()
        assert w.last_reload_outcome == "refused"
        assert "`skyhedge reload SPEC` probes them again" in notes(w)[-1]
        answering.add("/ready")  # it answers now
        w._check_spec()
        assert w.spec.readiness_probe.path == "/health"  # the file as it is: not retried
        w.request_reload()
        w._check_spec()
        assert w.spec.readiness_probe.path == "/ready" and w.last_reload_outcome == "taken"


def test_a_refused_spec_shows_in_the_metrics_until_the_file_is_fixed(spec_file, tmp_path, capsys):
    """A refused edit leaves the watcher on its old spec: a deploy that never took effect, which
    only a log line told. `--metrics-port` says it too (`skyhedge_spec_refused`), so Prometheus
    can alert on it, and stops saying it once the file loads again."""
    from skyhedge.cli.watch import _serve_metrics
    from skyhedge.controller.metrics import Metrics, MetricsServer

    def refused(w: Watcher, server: MetricsServer) -> str:
        assert w.controller is not None
        server.metrics.observe(w.controller)  # what the listener does after each pass
        (line,) = [x for x in server.metrics.text().splitlines() if x.startswith("skyhedge_spec_refused ")]
        return line.split()[1]

    with watcher_for(spec_file, tmp_path) as w, MetricsServer(Metrics(), port=0) as server:
        _serve_metrics(server, w, None, "text")
        assert refused(w, server) == "0"
        rewrite(spec_file, "min_replicas: 1", "min_replicas: one")
        w._check_spec()
        assert refused(w, server) == "1"
        w.request_reload()  # asked again, the same bad file: still refused
        w._check_spec()
        assert refused(w, server) == "1"
        rewrite(spec_file, "min_replicas: one", "min_replicas: 2")
        w._check_spec()
        assert w.spec.replica_policy.min_replicas == 2 and refused(w, server) == "0"


def test_event_sources_are_rebuilt_only_when_the_locations_change(spec_file, tmp_path):
    with watcher_for(spec_file, tmp_path) as w:
        assert w.controller is not None
        (source,) = w.controller.sources
        rewrite(spec_file, "min_replicas: 1", "min_replicas: 2")
        w._check_spec()
        assert w.controller.sources == [source]  # kept, with whatever it holds
        rewrite(spec_file, "zones: [local-a, local-b]", "zones: [local-a, local-b, local-c]")
        w._check_spec()
        (rebuilt,) = w.controller.sources
        assert rebuilt is not source
        assert "local-c" in rebuilt.region_of
        assert notes(w)[-1].endswith(": placement.zones: +local-c")


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1])
def test_without_reload_on_change_only_a_request_reads_the_file(spec_file, tmp_path, signum):
    with watcher_for(spec_file, tmp_path, reload_on_change=False) as w, w._signals(True):
        rewrite(spec_file, "min_replicas: 1", "min_replicas: 3")
        w._check_spec()
        assert w.spec.replica_policy.min_replicas == 1
        os.kill(os.getpid(), signum)  # the handler hands the request to a thread
        deadline = time.monotonic() + 5
        while not w._reload_asks and time.monotonic() < deadline:
            time.sleep(0.01)
        w._check_spec()
        assert w.spec.replica_policy.min_replicas == 3
        w.request_reload()  # a SIGHUP with nothing changed says so
        w._check_spec()
        assert notes(w)[-1] == f"spec {spec_file} re-read: no change from the running spec"


@needs_nginx
def test_a_router_port_that_is_taken_is_refused_before_anything_switches(spec_file, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with watcher_for(spec_file, tmp_path, route=True) as w:
            assert w.controller is not None
            router = w.controller.router
            rewrite(spec_file, f"port: {ROUTER_PORT}", f"port: {taken}")
            w._check_spec()
            assert f"service.port {taken} on 127.0.0.1 is not available" in notes(w)[-1]
            assert w.spec.service.port == ROUTER_PORT
            assert router.router.spec.service.port == ROUTER_PORT  # type: ignore[union-attr]


def test_spec_changes_name_each_field_and_hide_values_that_may_be_secret(write_spec):
    old = load_spec(write_spec(LOCAL))
    new = load_spec(
        write_spec(
            LOCAL.replace("min_replicas: 1", "min_replicas: 2, availability_target: 0.999")
            .replace('command: "true"', 'command: "true", env: {TOKEN: abc}')
            .replace(f"port: {ROUTER_PORT}", f"port: {ROUTER_PORT}, router: {{read_timeout: 900}}")
            + "readiness_probe: {headers: {Authorization: Bearer xyz}}\n",
            name="other.yaml",
        )
    )
    assert spec_changes(old, new) == [
        "replica_policy.min_replicas: 1 -> 2",
        "replica_policy.availability_target: unset -> 0.999",
        "readiness_probe.headers changed",
        "service.router.read_timeout: 600 -> 900",
        "run.env changed",
    ]
    assert spec_changes(old, old) == []


def test_spec_changes_name_the_fields_of_a_section_set_or_unset(write_spec, tmp_path):
    # turning HTTPS on or off under a running watcher: its log says which files, not a repr
    old = load_spec(write_spec(LOCAL))
    tls = ", tls: {certfile: /etc/tls/cert.pem, keyfile: /etc/tls/key.pem}}"
    new = load_spec(
        write_spec(LOCAL.replace(f"port: {ROUTER_PORT}}}", f"port: {ROUTER_PORT}{tls}"), name="t.yaml")
    )
    assert spec_changes(old, new) == [
        "service.tls.certfile: unset -> /etc/tls/cert.pem",
        "service.tls.keyfile: unset -> /etc/tls/key.pem",
    ]
    assert spec_changes(new, old) == [
        "service.tls.certfile: /etc/tls/cert.pem -> unset",
        "service.tls.keyfile: /etc/tls/key.pem -> unset",
    ]


def test_a_rejected_header_value_is_not_echoed_into_the_log(spec_file, tmp_path):
    # a rotated token pasted as a YAML block scalar ends in a line break, which no header takes
    with watcher_for(spec_file, tmp_path) as w:
        pasted = "readiness_probe:\n  headers:\n    Authorization: |\n      Bearer s3cret\nrun:"
        rewrite(spec_file, "run:", pasted)
        w._check_spec()
        (line,) = notes(w)
        assert "readiness_probe.headers.Authorization" in line and "at character 14" in line
        assert "s3cret" not in line


def test_what_a_replaced_event_source_caught_between_passes_still_reaches_the_state(spec_file, tmp_path):
    # a zone holding a spot replica of ours runs out of capacity, and before the next pass a zone
    # is added to the placement: the local source is rebuilt, and the old one, polled once more,
    # still reports the lost zone
    with watcher_for(spec_file, tmp_path) as w:
        assert w.controller is not None
        rewrite(spec_file, "min_replicas: 1", "min_replicas: 0")
        w._tick()  # (no replica: nothing to launch)
        # a launch Terraform has not confirmed yet (no process to judge): the zone is held
        state = w.controller.state
        state.replicas["r-0001"] = ReplicaRecord(
            id="r-0001", cloud="local", region="local", zone="local-a", market="spot", launched_at=time.time()
        )
        capacity.mark_preempted(runtime_dir(tmp_path / "state"), "local-a")
        rewrite(spec_file, "zones: [local-a, local-b]", "zones: [local-a, local-b, local-c]")
        (old,) = w.controller.sources
        w._tick()
        assert [s for s in w.controller.sources if s is old] == [] and w.controller.retiring == []
        lost = [h for h in w.controller.state.history if h.get("event") == "preempted"]
        assert [h["location"] for h in lost] == ["local/local/local-a"], w.controller.state.history


@needs_nginx
def test_a_host_change_on_the_same_port_needs_a_router_restart_and_says_so(spec_file, tmp_path):
    with watcher_for(spec_file, tmp_path, route=True) as w:
        router = Router(w.spec, tmp_path / "state")
        try:
            router.up([])
            rewrite(spec_file, f"port: {ROUTER_PORT}", f"port: {ROUTER_PORT}, host: 0.0.0.0")
            w._check_spec()
            assert f"service.host: the router listens on 127.0.0.1:{ROUTER_PORT}" in notes(w)[-1]
            assert "restart the router" in notes(w)[-1] and w.spec.service.host == "127.0.0.1"
            # the remedy works under this watcher: `routing down` alone is refused, the lock held
            # by the watcher (it was told "`skyhedge routing down SPEC`, then `up`")
            assert (
                "(stop the watcher, `skyhedge routing down SPEC`, then start the watcher again)"
                in (notes(w)[-1])
            )
        finally:
            router.down(timeout=5)


@needs_nginx
def test_a_router_that_refuses_the_new_config_keeps_the_old_spec_and_closes_what_was_built(
    spec_file, tmp_path, monkeypatch
):
    with watcher_for(spec_file, tmp_path, route=True) as w:
        assert w.controller is not None
        router = Router(w.spec, tmp_path / "state")
        try:
            router.up([])
            (source,) = w.controller.sources

            def refuse(self, upstreams):
                raise RoutingError("nginx did not apply the new configuration (kept the old one)")

            monkeypatch.setattr(Router, "up", refuse)
            rewrite(spec_file, "zones: [local-a, local-b]", "zones: [local-a, local-c]")
            rewrite(spec_file, f"port: {ROUTER_PORT}", f"port: {ROUTER_PORT}, router: {{read_timeout: 900}}")
            w._check_spec()
            assert "spec reload refused: nginx did not apply the new configuration" in notes(w)[-1]
            assert w.controller.sources == [source] and w.spec.service.router.read_timeout == 600
        finally:
            monkeypatch.undo()
            router.down(timeout=5)


# -- `skyhedge reload` and `status`: the running watcher's record --------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "skyhedge", *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.fixture
def running_watcher(tmp_path: Path):
    """`skyhedge watch` as a real process (no replica, no router), stopped however the test ends."""
    spec = tmp_path / "service.yaml"
    spec.write_text(LOCAL.replace("min_replicas: 1", "min_replicas: 0"))
    state = tmp_path / "state"
    log = open(tmp_path / "watch.log", "wb")  # noqa: SIM115 (closed by the child's exit)
    proc = subprocess.Popen(
        [sys.executable, "-m", "skyhedge", "watch", str(spec), "--state-dir", str(state), "--no-routing"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    try:
        deadline = time.monotonic() + 60
        while presence.read(state) is None:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "watch.log").read_text()
            time.sleep(0.1)
        yield proc, spec, state
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_reload_asks_the_running_watcher_and_prints_its_answer(running_watcher):
    proc, spec, state = running_watcher
    shown = json.loads(_cli("status", str(spec), "--state-dir", str(state), "--json").stdout)["watcher"]
    assert shown["pid"] == proc.pid and shown["reload"] == "on change and on request"
    assert shown["spec"] == str(spec.resolve()) and shown["last_reload"] is None

    done = _cli("reload", str(spec), "--state-dir", str(state))
    assert done.returncode == 0 and f"spec {spec} re-read: no change from the running spec" in done.stdout, (
        done
    )

    # a spec that loads but that the watcher refuses (its plug-in policy does not import): exit 1
    rewrite(spec, "policy: spothedge", "policy: 'nosuchmodule:Hedge'")
    done = _cli("reload", str(spec), "--state-dir", str(state))
    assert done.returncode == 1 and done.stderr.startswith("error: spec reload refused: "), done
    assert "nosuchmodule" in done.stderr and done.stderr.count("\n") == 1

    # one that does not load is refused here, without asking the watcher
    rewrite(spec, "min_replicas: 0", "min_replicas: many")
    done = _cli("reload", str(spec), "--state-dir", str(state))
    assert done.returncode == 1 and done.stderr.startswith(f"error: spec reload refused: {spec}: "), done
    assert "replica_policy.min_replicas" in done.stderr and done.stderr.count("\n") == 1

    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert not (state / presence.WATCHER_FILE).exists()
    spec.write_text(LOCAL)
    assert "Watcher: not running" in _cli("status", str(spec), "--state-dir", str(state)).stdout


def test_reload_refuses_when_no_watcher_would_hear_it(spec_file, tmp_path):
    state = tmp_path / "state"
    done = _cli("reload", str(spec_file), "--state-dir", str(state))
    assert done.returncode == 1 and done.stderr.startswith("error: no watcher is running for svc"), done
    mine = presence.WatcherRecord(
        pid=os.getpid(),
        started_at=time.time(),
        spec=str(spec_file.resolve()),
        mode="apply",
        reload=presence.RELOAD_OFF,
        process_start=presence.process_start(os.getpid()),
    )
    state.mkdir()
    presence.write(state, mine)  # (this test process stands in for a watcher: no signal may reach it)
    done = _cli("reload", str(spec_file), "--state-dir", str(state))
    assert done.returncode == 1 and "does not re-read its spec on request" in done.stderr, done
    other = tmp_path / "other.yaml"
    other.write_text(LOCAL)
    done = _cli("reload", str(other), "--state-dir", str(state))
    assert done.returncode == 1 and f"reads {spec_file.resolve()}, not {other}" in done.stderr, done


def test_a_record_left_by_a_killed_watcher_is_stale(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = presence.WatcherRecord(dead.pid, time.time(), "/x.yaml", "apply", presence.RELOAD_ON_CHANGE)
    presence.write(tmp_path, record)
    assert presence.read(tmp_path) is None  # its pid is gone
    recycled = presence.WatcherRecord(os.getpid(), time.time(), "/x.yaml", "apply", "off", process_start="1")
    presence.write(tmp_path, recycled)
    assert presence.read(tmp_path) is None  # its pid belongs to another process now
    presence.write(tmp_path, replace(recycled, process_start=presence.process_start(os.getpid())))
    assert presence.read(tmp_path) is not None
    presence.remove(tmp_path, os.getpid() + 1)  # another process's: kept
    assert presence.read(tmp_path) is not None
    presence.remove(tmp_path, os.getpid())
    assert presence.read(tmp_path) is None


def test_reload_never_signals_a_pid_it_cannot_prove_is_the_watcher(spec_file, tmp_path):
    # SIGUSR1 kills a process that does not handle it: a record whose start time is unknown (or
    # from a watcher that hears no requests, e.g. run off the main thread) is not signalled
    state = tmp_path / "state"
    state.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        unknown = presence.WatcherRecord(
            sleeper.pid, time.time(), str(spec_file), "apply", presence.RELOAD_ON_CHANGE, process_start=None
        )
        presence.write(state, unknown)
        done = _cli("reload", str(spec_file), "--state-dir", str(state))
        assert done.returncode == 1 and "not signalling it" in done.stderr, done
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_watcher_that_hears_no_requests_says_so_and_ignores_a_late_sigusr1(spec_file, tmp_path):
    with watcher_for(spec_file, tmp_path) as w:
        w._announce(on_request=False)  # what run() records off the main thread
        assert presence.read(tmp_path / "state").reload == presence.RELOAD_FILE_ONLY  # type: ignore[union-attr]
        w._retract()
        old = signal.getsignal(signal.SIGUSR1)
        try:
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)
            with w._signals(True) as heard:
                assert heard
            assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN  # not the default: it kills
        finally:
            signal.signal(signal.SIGUSR1, old)


def test_an_answer_counts_the_requests_so_reload_waits_for_its_own(spec_file, tmp_path):
    with watcher_for(spec_file, tmp_path) as w:
        w._announce(on_request=True)
        rewrite(spec_file, "min_replicas: 1", "min_replicas: 2")
        w._check_spec()  # taken because the file changed: no request answered
        assert w._record is not None and w._record.last_reload["requests"] == 0  # type: ignore[index]
        w.request_reload()
        w._check_spec()
        record = presence.read(tmp_path / "state")
        assert record is not None and record.last_reload is not None
        # the request raced the pass that took the edit: its answer is that edit, not "no change"
        assert record.last_reload["requests"] == 1 and record.last_reload["outcome"] == "taken"
        assert "replica_policy.min_replicas: 1 -> 2" in record.last_reload["text"]
        # the log told the operator once, at the pass that took it: the answer is for the requester
        assert [n for n in notes(w) if "min_replicas: 1 -> 2" in n] == [
            f"spec reloaded from {spec_file}: replica_policy.min_replicas: 1 -> 2"
        ]
        w.request_reload()  # asked again, nothing new: "no change"
        w._check_spec()
        record = presence.read(tmp_path / "state")
        assert record is not None and record.last_reload is not None
        assert record.last_reload["requests"] == 2 and record.last_reload["outcome"] == "unchanged"


def test_reload_finds_the_watcher_through_a_symlink_that_moved(tmp_path):
    from skyhedge.cli.watch import _same_file

    for version in ("v1", "v2"):
        (tmp_path / version).mkdir()
        (tmp_path / version / "service.yaml").write_text(LOCAL)
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "v1")
    recorded = os.path.abspath(current / "service.yaml")
    current.unlink()
    current.symlink_to(tmp_path / "v2")
    assert _same_file(recorded, current / "service.yaml")
    assert not _same_file(recorded, tmp_path / "v1" / "service.yaml")


def test_changing_one_clouds_locations_rebuilds_only_that_clouds_source(write_spec):
    from skyhedge.controller.runner import source_keys
    from skyhedge.service import resolve_placement

    text = """
    name: llm
    resources: {{instance_type: {{aws: g5.xlarge}}}}
    placement: {{clouds: [aws, local], regions: [us-east-1, local], zones: {zones}}}
    run: {{command: serve}}
    """
    aws_zones = "use1-az1, use1-az2"
    one = load_spec(write_spec(text.format(zones=f"[{aws_zones}, local-a]"), "a.yaml"))
    two = load_spec(write_spec(text.format(zones=f"[{aws_zones}, local-a, local-b]"), "b.yaml"))
    keys_one, keys_two = source_keys(one, resolve_placement(one)), source_keys(two, resolve_placement(two))
    assert set(keys_one) == {"aws", "local"}
    assert keys_one["aws"] == keys_two["aws"] and keys_one["local"] != keys_two["local"]


def test_reload_of_a_renamed_service_reaches_the_watcher_of_the_old_name(tmp_path):
    # the state dir is found from the spec's name, which the edit changed: the watcher that reads
    # this file is found by its record instead, and it answers (it refuses renames)
    spec = tmp_path / "service.yaml"
    spec.write_text(LOCAL.replace("min_replicas: 1", "min_replicas: 0"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "skyhedge", "watch", str(spec), "--no-routing"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        state = tmp_path / ".skyhedge" / "svc"
        deadline = time.monotonic() + 60
        while presence.read(state) is None:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        rewrite(spec, "name: svc", "name: renamed")
        done = subprocess.run(
            [sys.executable, "-m", "skyhedge", "reload", str(spec)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )
        assert done.returncode == 1 and "spec reload refused" in done.stderr, done
        assert "'renamed'" in done.stderr
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_followers_hear_of_a_taken_spec_and_cannot_undo_it(spec_file, tmp_path):
    heard = []

    def broken(spec, placement):
        raise OSError("disk full")

    with watcher_for(spec_file, tmp_path) as w:
        w.on_reload(
            lambda spec, placement: heard.append(sorted(c.location.zone for c in placement.candidates))
        )
        w.on_reload(broken)
        rewrite(spec_file, "zones: [local-a, local-b]", "zones: [local-b, local-c]")
        w._check_spec()
        assert heard == [["local-b", "local-c"]]
        assert notes(w)[-1].startswith("spec reloaded from")  # taken, whatever a follower did
        rewrite(spec_file, "min_replicas: 1", "min_replicas: many")
        w._check_spec()
        assert len(heard) == 1  # a refused spec is nobody's news


def test_an_edit_wakes_the_watcher_rather_than_waiting_for_the_next_pass(spec_file, tmp_path):
    # a 60 s interval: without the file poll the edit would wait up to a minute
    spec_file.write_text(LOCAL.replace("min_replicas: 1", "min_replicas: 0"))
    from skyhedge.controller.loop import ControllerOptions

    with watcher_for(spec_file, tmp_path, options=ControllerOptions(interval=60.0)) as w:
        runner = threading.Thread(target=w.run, kwargs={"handle_signals": False}, daemon=True)
        runner.start()
        try:
            deadline = time.monotonic() + 30
            while w.supervisor.ticks < 1 and time.monotonic() < deadline:  # type: ignore[union-attr]
                time.sleep(0.05)
            time.sleep(0.5)
            rewrite(spec_file, "min_replicas: 0", "min_replicas: 0, availability_target: 0.995")
            edited = time.monotonic()
            while w.spec.replica_policy.availability_target is None and time.monotonic() < edited + 10:
                time.sleep(0.05)
            assert w.spec.replica_policy.availability_target == 0.995
            assert time.monotonic() - edited < 5
        finally:
            w.stop()
            runner.join(timeout=30)
        assert not runner.is_alive()


def test_replicas_left_where_the_spec_no_longer_allows_are_still_watched(spec_file, tmp_path):
    """Dropping a cloud (or a zone) from the placement moves its replicas one at a time; until
    then they serve and can be preempted, so their cloud keeps an event source."""
    from moto import mock_aws

    from skyhedge.controller.runner import event_sources
    from skyhedge.service import resolve_placement
    from skyhedge.state import ReplicaRecord

    spec = load_spec(spec_file)
    left = [
        ReplicaRecord("r-0001", "aws", "us-east-1", "use1-az1", "spot", launched_at=0.0),
        ReplicaRecord("r-0002", "local", "local", "local-f", "spot", launched_at=0.0),
    ]
    with mock_aws():
        sources = event_sources(spec, tmp_path / "state", resolve_placement(spec), live=left)
        try:
            by_name = {s.name: s for s in sources}
            assert sorted(by_name) == ["aws", "local"]
            assert list(by_name["aws"].regions) == ["us-east-1"]  # type: ignore[attr-defined]
            assert by_name["local"].region_of["local-f"] == "local"  # type: ignore[attr-defined]
        finally:
            for source in sources:
                source.close()
    assert [s.name for s in event_sources(spec, tmp_path / "state", resolve_placement(spec))] == ["local"]


def test_a_restart_that_kept_the_earlier_probe_checks_the_specs_again_when_asked(spec_file, tmp_path):
    """A watcher restarted with a probe edit that no READY replica passes keeps probing them with
    the probe they had (`Controller._check_restart_probe`). The spec file is unchanged since the
    restart, so `skyhedge reload SPEC` read it as "no change" and nothing could have it taken: a
    request checks it again, refused while they fail it and taken once they pass it."""
    from fake_http import json_server

    answering = {"/health"}

    def answer(path: str, _query: dict) -> tuple[int, object]:
        return (200, {}) if path in answering else (404, {})

    with json_server(answer) as base:
        with watcher_for(spec_file, tmp_path) as w:
            assert w.controller is not None
            w.controller.state.replicas["r-0001"] = record(
                "r-0001", base, revision=replica_revision(w.spec, "local")
            )
            w.controller.save(now=True)  # probed with the default /health until the restart
        rewrite(spec_file, "run:", "readiness_probe: {path: /ready}\nrun:")
        with watcher_for(spec_file, tmp_path) as w:
            ctl = w.controller
            assert ctl is not None
            ctl._probe(w.clock())
            assert "none of the 1 READY replica(s) passes it (r-0001: HTTP 404)" in notes(w)[-1]
            assert ctl.held_probe is not None and ctl.held_probe["path"] == "/health"
            assert ctl.state.replicas["r-0001"].not_ready_since is None  # probed with /health still
            w.request_reload()
            w._check_spec()
            assert w.last_reload_outcome == "refused", notes(w)[-1]
            assert "none of the 1 READY replica(s) passes the new probe" in notes(w)[-1]
            answering.add("/ready")  # the new version answers it now
            w.request_reload()
            w._check_spec()
            assert w.last_reload_outcome == "taken", notes(w)[-1]
            assert ctl.held_probe is None and w.spec.readiness_probe.path == "/ready"


def test_a_restart_that_kept_the_earlier_probe_shows_in_status_and_the_metrics_until_a_reload_takes_one(
    spec_file, tmp_path, monkeypatch
):
    """A restart that does not take the spec's probe runs on one that is not the file's, as a
    refused reload does; only one warning line said so, while `status` and
    `skyhedge_spec_refused` said nothing was refused (0) for as long as it ran. Now it is recorded
    as a refused reload until a reload takes a probe."""
    from fake_http import json_server

    from skyhedge.cli.watch import _serve_metrics
    from skyhedge.controller.metrics import Metrics, MetricsServer

    answering = {"/health"}

    def answer(path: str, _query: dict) -> tuple[int, object]:
        return (200, {}) if path in answering else (404, {})

    def refused(w: Watcher, server: MetricsServer) -> str:
        assert w.controller is not None
        server.metrics.observe(w.controller)
        (line,) = [x for x in server.metrics.text().splitlines() if x.startswith("skyhedge_spec_refused ")]
        return line.split()[1]

    with json_server(answer) as base:
        with watcher_for(spec_file, tmp_path) as w:
            assert w.controller is not None
            w.controller.state.replicas["r-0001"] = record(
                "r-0001", base, revision=replica_revision(w.spec, "local")
            )
            w.controller.save(now=True)
        rewrite(spec_file, "run:", "readiness_probe: {path: /ready}\nrun:")
        with watcher_for(spec_file, tmp_path) as w, MetricsServer(Metrics(), port=0) as server:
            _serve_metrics(server, w, None, "text")
            ctl = w.controller
            assert ctl is not None

            def a_pass() -> float:  # (its probe is all this test needs of a pass)
                ctl._probe(w.clock())
                return 1.0

            monkeypatch.setattr(ctl, "tick", a_pass)
            w._tick()
            assert ctl.held_probe is not None
            assert w.last_reload_outcome == "refused" and refused(w, server) == "1"
            w._tick()  # and at later passes
            assert refused(w, server) == "1"
            answering.add("/ready")
            w.request_reload()
            w._tick()
            assert ctl.held_probe is None and w.last_reload_outcome == "taken" and refused(w, server) == "0"
