"""The readiness probes a watcher keeps for its restart (a Controller rebuilt on the same state dir
stands for one), and what a restart does with them.

A probe may carry a token (`readiness_probe.headers`, `post_data`): state.json (0644 under the
usual umask, committed under `watch --gitops`) holds only a keyed digest of it, the probe itself
is in the state dir's private `tf/probes.json` (0600). A restart with a spec whose probe differs
from the one the replicas were probed with checks it as a reload would, and a malformed
`extra.routed` (a hand edit) is one warning line, not a traceback per pass."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from controller_fakes import THREE_ZONE_SPEC as SPEC
from controller_fakes import Clock, FakeProber, FakeRouter, NewProbe
from controller_fakes import clocked_controller as controller
from controller_fakes import run_ticks as run

from skyhedge.controller.loop import EARLIER_PROBES_KEY, PROBE_KEY, Controller
from skyhedge.policy.types import ReplicaStatus
from skyhedge.probe_store import PROBES_FILE, ProbeStore
from skyhedge.spec import load_spec, readiness_probe_json, replica_revision
from skyhedge.state import STATE_FILE, load_state

TOKEN = "s3cret-probe-token"
#: The old version: its probe sends the token its /health asks for.
SPEC_TOKEN = SPEC.replace(
    "readiness_probe: {path: /health, initial_delay_seconds: 30}",
    "readiness_probe: {path: /health, initial_delay_seconds: 30, "
    f"headers: {{Authorization: 'Bearer {TOKEN}'}}, post_data: {{key: '{TOKEN}'}}}}",
)
#: The next version: a new command, its new health path, and a token of its own.
SPEC_V2 = (
    SPEC_TOKEN.replace("/health", "/v2/health").replace(TOKEN, "v2-token").replace('"true"', '"serve v2"')
)


@pytest.fixture
def old_version() -> Iterator[list[str]]:
    """Three replicas of the old version on 127.0.0.1: /health answers 200 only to a request that
    carries the token (header and body), 401 to any other, 404 for any other path."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
            if self.path != "/health":
                code = 404
            elif self.headers.get("Authorization") == f"Bearer {TOKEN}" and TOKEN in body:
                code = 200
            else:
                code = 401
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST  # noqa: N815

        def log_message(self, *args):
            pass

    with contextlib.ExitStack() as stack:
        bases = []
        for _ in range(3):
            server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            stack.callback(server.server_close)
            stack.callback(server.shutdown)
            bases.append(f"http://127.0.0.1:{server.server_address[1]}")
        yield bases


def mid_rolling_update(
    tmp_path: Path, write_spec, old_version: list[str], state_dir: Path | None = None
) -> tuple[Controller, list[str]]:
    """Three READY replicas of the old version (serving on 127.0.0.1), then a reload to v2: they
    keep the token-bearing probe they were launched under (`earlier_probes`)."""
    spec, clock = load_spec(write_spec(SPEC_TOKEN)), Clock()
    ctl = controller(spec, state_dir or tmp_path / "state", clock)
    run(ctl, clock, 3)
    old = sorted(r.id for r in ctl.state.live())
    assert len(old) == 3
    for rid, endpoint in zip(old, old_version, strict=True):
        ctl.state.replicas[rid].endpoint = endpoint
    run(ctl, clock, 1)
    v2 = load_spec(write_spec(SPEC_V2, "v2.yaml"))
    ctl.reconfigure(
        v2, placement=ctl.placement, executor=ctl.executor, router=ctl.router, prober=NewProbe(), sources=[]
    )
    run(ctl, clock, 2)
    return ctl, old


def restart_and_wait(ctl: Controller, write_spec, old: list[str]) -> tuple[Controller, NewProbe]:
    """A watcher restarted under v2; 250 s pass (past NOT_READY_GRACE_SECONDS, v2 still booting)."""
    clock = ctl.clock
    assert isinstance(clock, Clock)
    new_probe = NewProbe()
    v2 = load_spec(write_spec(SPEC_V2, "v2.yaml"))
    ctl = controller(v2, ctl.state_dir, clock, router=ctl.router, executor=ctl.executor, prober=new_probe)
    run(ctl, clock, 50, step=5)
    return ctl, new_probe


def still_ready(ctl: Controller, old: list[str]) -> bool:
    live = {r.id: r for r in ctl.state.live()}
    return set(old) <= set(live) and all(live[rid].fact().status is ReplicaStatus.READY for rid in old)


def test_a_probe_token_stays_out_of_state_json_and_a_restart_still_probes_with_it(
    tmp_path, write_spec, old_version
):
    """state.json is 0644 under the usual umask and committed under GitOps: the earlier probe's
    header and body values (a token) were in it. Now only a digest is, the probe is in the private
    tf/probes.json (0600), and a restarted watcher still probes the outdated replicas with their
    revision's headers and body (their /health answers 401 without them)."""
    ctl, old = mid_rolling_update(tmp_path, write_spec, old_version)
    state_dir = ctl.state_dir
    revision = ctl.state.replicas[old[0]].revision
    assert revision is not None and revision != replica_revision(load_spec(write_spec(SPEC_V2, "v2.yaml")))
    text = (state_dir / STATE_FILE).read_text()
    assert TOKEN not in text and "v2-token" not in text
    kept = json.loads(text)["extra"][EARLIER_PROBES_KEY]
    private = state_dir / "tf" / PROBES_FILE
    assert os.stat(private).st_mode & 0o777 == 0o600
    assert os.stat(private.parent).st_mode & 0o077 == 0
    probes, problem = ProbeStore(state_dir).read()
    assert problem is None
    assert probes[kept[revision]]["headers"] == {"Authorization": f"Bearer {TOKEN}"}

    ctl, new_probe = restart_and_wait(ctl, write_spec, old)
    assert still_ready(ctl, old), "an old replica was failed: probed without its token?"
    assert set(ctl.router.current) >= set(old)
    assert new_probe.seen and not new_probe.seen & set(old)
    assert TOKEN not in (state_dir / STATE_FILE).read_text()


def test_a_state_written_by_the_previous_release_is_read_and_rewritten_without_the_token(
    tmp_path, write_spec, old_version
):
    """The previous release kept the probe itself in state.json: read back as before, and at the
    next write replaced by its digest (the probe moving to tf/probes.json)."""
    ctl, old = mid_rolling_update(tmp_path, write_spec, old_version)
    state_dir = ctl.state_dir
    path = state_dir / STATE_FILE
    data = json.loads(path.read_text())
    revision = ctl.state.replicas[old[0]].revision
    old_probe = readiness_probe_json(load_spec(write_spec(SPEC_TOKEN)).readiness_probe)
    data["extra"][EARLIER_PROBES_KEY] = {revision: old_probe}  # as the previous release wrote it
    del data["extra"][PROBE_KEY]
    path.write_text(json.dumps(data))
    (state_dir / "tf" / PROBES_FILE).unlink()

    ctl, _ = restart_and_wait(ctl, write_spec, old)
    assert still_ready(ctl, old)
    text = path.read_text()
    assert TOKEN not in text
    assert isinstance(json.loads(text)["extra"][EARLIER_PROBES_KEY][revision], str)
    probes, _ = ProbeStore(state_dir).read()
    assert old_probe in probes.values()


@pytest.mark.parametrize("damage", ["missing", "not JSON", "another state's", "edited"])
def test_a_probes_file_missing_or_not_matching_falls_back_to_the_spec_probe_with_one_warning(
    tmp_path, write_spec, old_version, caplog, damage
):
    """What a watcher did before it kept the probes: the outdated replicas are probed with the
    spec's probe. Said in one warning line naming the file; the watcher runs on."""
    ctl, old = mid_rolling_update(tmp_path, write_spec, old_version)
    private = ctl.state_dir / "tf" / PROBES_FILE
    if damage == "missing":
        private.unlink()
    elif damage == "not JSON":
        private.write_text("{")
    elif damage == "another state's":  # the same probes under another key: no digest matches
        data = json.loads(private.read_text())
        data["key"] = "00" * 32
        private.write_text(json.dumps(data))
    else:
        private.write_text(private.read_text().replace("/health", "/elsewhere"))
    with caplog.at_level(logging.WARNING, logger="skyhedge.controller"):
        ctl, new_probe = restart_and_wait(ctl, write_spec, old)
    said = [r.getMessage() for r in caplog.records if PROBES_FILE in r.getMessage()]
    assert len(said) == 1, said
    assert str(private) in said[0] and "probed with the spec's probe" in said[0]
    assert new_probe.seen >= set(old)  # as before the probes were kept
    assert TOKEN not in (ctl.state_dir / STATE_FILE).read_text()


def test_a_probe_token_never_reaches_a_gitops_commit(tmp_path, write_spec, old_version):
    """A state dir inside the GitOps repository: its state.json is committed, tf/ never is."""
    from click.testing import CliRunner

    from skyhedge.cli import main

    repo = tmp_path / "infra-repo"
    repo.mkdir()
    subprocess.run(["git", "-C", str(repo), "init", "-q"], check=True)
    ctl, _ = mid_rolling_update(tmp_path, write_spec, old_version, state_dir=repo / "state")
    assert (repo / "state" / "tf" / PROBES_FILE).exists()
    spec = write_spec(SPEC_V2, "v2.yaml")
    args = ["watch", str(spec), "--state-dir", str(repo / "state"), "--gitops", str(repo), "--once"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    files = subprocess.run(
        ["git", "-C", str(repo), "log", "--name-only", "--format="], capture_output=True, text=True
    )
    assert "state/state.json" in files.stdout.split() and "state/tf" not in files.stdout
    history = subprocess.run(
        ["git", "-C", str(repo), "log", "-p"], capture_output=True, text=True, check=True
    )
    assert TOKEN not in history.stdout and "v2-token" not in history.stdout


# -- a restart with a probe the replicas were not probed with ----------------------------------------


PROBE_EDIT = SPEC_TOKEN.replace("path: /health", "path: /helth")  # a typo; the same revision


def probed_replicas(
    tmp_path: Path, write_spec, old_version: list[str], text: str = SPEC_TOKEN
) -> tuple[Controller, list[str]]:
    """Three READY replicas of the current revision (serving on 127.0.0.1), probed with the
    token-bearing /health probe of spec `text` (by a FakeProber until the restart)."""
    spec, clock = load_spec(write_spec(text)), Clock()
    ctl = controller(spec, tmp_path / "state", clock)
    run(ctl, clock, 3)
    ids = sorted(r.id for r in ctl.state.live())
    for rid, endpoint in zip(ids, old_version, strict=True):
        ctl.state.replicas[rid].endpoint = endpoint
    run(ctl, clock, 1)
    return ctl, ids


def test_a_restart_with_a_probe_no_ready_replica_passes_keeps_the_one_they_had(
    tmp_path, write_spec, old_version, caplog
):
    """A running watcher refuses a probe edit that no READY replica passes; restarted with that
    spec, it took it unchecked: every replica NOT_READY at once, FAILED 180 s later, replaced by
    replicas failing it alike. Now the restart checks it as a reload would and, refused, keeps
    probing them with the probe they had, saying so in one line."""
    ctl, ids = probed_replicas(tmp_path, write_spec, old_version)
    clock, state_dir = ctl.clock, ctl.state_dir
    new_probe = NewProbe()
    with caplog.at_level(logging.INFO, logger="skyhedge.controller"):
        ctl = controller(
            load_spec(write_spec(PROBE_EDIT)),
            state_dir,
            clock,
            router=ctl.router,
            executor=ctl.executor,
            prober=new_probe,
        )
        run(ctl, clock, 50, step=5)
    said = [r.getMessage() for r in caplog.records if "before the restart" in r.getMessage()]
    assert len(said) == 1, said
    assert "none of the 3 READY replica(s) passes it" in said[0] and "skyhedge reload SPEC" in said[0]
    assert still_ready(ctl, ids), "the restart took a probe every READY replica fails"
    assert ctl.held_probe is not None and ctl.held_probe["path"] == "/health"
    # the probe in force is still the earlier one: a second restart checks the spec's again
    assert ctl.state.extra[PROBE_KEY] == load_state(state_dir, "svc").extra[PROBE_KEY]
    probes, _ = ProbeStore(state_dir).read()
    assert probes[ctl.state.extra[PROBE_KEY]]["path"] == "/health"


def test_a_restart_with_a_probe_the_replicas_pass_takes_it_in_one_line(
    tmp_path, write_spec, old_version, caplog
):
    ctl, ids = probed_replicas(tmp_path, write_spec, old_version)
    with caplog.at_level(logging.INFO, logger="skyhedge.controller"):
        ctl = controller(load_spec(write_spec(PROBE_EDIT)), ctl.state_dir, ctl.clock, router=ctl.router)
        run(ctl, ctl.clock, 2)
    said = [r.getMessage() for r in caplog.records if "before the restart" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith(": taken"), said
    assert ctl.held_probe is None
    probes, _ = ProbeStore(ctl.state_dir).read()
    assert probes[load_state(ctl.state_dir, "svc").extra[PROBE_KEY]]["path"] == "/helth"


def test_a_spec_rolled_over_while_the_watcher_was_stopped_keeps_the_old_probe_for_the_old_replicas(
    tmp_path, write_spec, old_version
):
    """`run` and the probe edited together while no watcher ran: as a reload does, the outdated
    replicas keep the probe they were probed with (they were all probed with the new one)."""
    ctl, ids = probed_replicas(tmp_path, write_spec, old_version)
    ctl, new_probe = restart_and_wait(ctl, write_spec, ids)
    assert still_ready(ctl, ids), "an old replica was failed by the new version's probe"
    assert new_probe.seen and not new_probe.seen & set(ids)


def test_a_restart_with_the_same_probe_checks_nothing(tmp_path, write_spec, old_version, caplog):
    ctl, _ = probed_replicas(tmp_path, write_spec, old_version)
    prober = NewProbe()
    with caplog.at_level(logging.INFO, logger="skyhedge.controller"):
        ctl = controller(ctl.spec, ctl.state_dir, ctl.clock, router=ctl.router, prober=prober)
    assert ctl._restart_probe is None
    assert not [r for r in caplog.records if "before the restart" in r.getMessage()]


# -- a malformed extra.routed -------------------------------------------------------------------------


@pytest.mark.parametrize("routed", ["r-0001", [["r-0001"]], [1, 2], [["r-0001", "a", "b"]], {"r-0001": "x"}])
def test_a_malformed_routed_table_is_one_warning_and_taken_as_nothing_routed(
    tmp_path, write_spec, caplog, routed
):
    """A hand-edited `extra.routed` crashed every pass (ValueError: not enough values to unpack)."""
    spec, clock = load_spec(write_spec(SPEC)), Clock()
    state_dir = tmp_path / "state"
    router = FakeRouter()
    ctl = controller(spec, state_dir, clock, router=router)
    run(ctl, clock, 3)
    path = state_dir / STATE_FILE
    data = json.loads(path.read_text())
    data["extra"]["routed"] = routed
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="skyhedge.controller"):
        ctl = controller(spec, state_dir, clock, router=router)
        run(ctl, clock, 2)
    said = [r.getMessage() for r in caplog.records if "extra.routed" in r.getMessage()]
    assert len(said) == 1 and f"{STATE_FILE}: extra.routed: expected a list" in said[0], said
    routed_now = load_state(state_dir, "svc").extra["routed"]
    assert sorted(p[0] for p in routed_now) == sorted(r.id for r in ctl.state.live())
    assert set(router.current) == {r.id for r in ctl.state.live()}


@pytest.mark.parametrize("drain", ["r-0001", [1], 5])
def test_a_malformed_drain_table_is_one_warning_and_taken_as_no_drain(tmp_path, write_spec, caplog, drain):
    """The same for `extra.drain` (AttributeError: 'str' object has no attribute 'pop', every pass)."""
    spec, clock = load_spec(write_spec(SPEC)), Clock()
    state_dir = tmp_path / "state"
    ctl = controller(spec, state_dir, clock)
    run(ctl, clock, 3)
    path = state_dir / STATE_FILE
    data = json.loads(path.read_text())
    data["extra"]["drain"] = drain
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="skyhedge.controller"):
        ctl = controller(spec, state_dir, clock)
        run(ctl, clock, 2)
    said = [r.getMessage() for r in caplog.records if "extra.drain" in r.getMessage()]
    assert len(said) == 1 and "expected an object of replica id -> {since, pids}" in said[0], said
    assert "drain" not in load_state(state_dir, "svc").extra
    assert len(ctl.state.live()) == 3


# -- the initial delay of the probe kept ------------------------------------------------------------


#: The probe the replicas run under allows a model 600 s to load; the edit (a typo no replica
#: passes) would allow 30 s.
SLOW_LOAD = SPEC_TOKEN.replace("initial_delay_seconds: 30", "initial_delay_seconds: 600")
SLOW_LOAD_TYPO = SLOW_LOAD.replace("path: /health", "path: /helth").replace(
    "initial_delay_seconds: 600", "initial_delay_seconds: 30"
)


def test_a_replica_launched_while_the_earlier_probe_is_kept_gets_that_probes_initial_delay(
    tmp_path, write_spec, old_version
):
    """A restart that did not take the spec's probe (no READY replica passes it) probes the
    replicas with the probe they had, but judged a replacement launched meanwhile by the spec's
    `initial_delay_seconds`: a model that loads in minutes was FAILED after 30 s, relaunched,
    FAILED again, a launch loop under a probe edit that was refused. The probe kept is kept
    whole: a replacement has its 600 s."""
    ctl, ids = probed_replicas(tmp_path, write_spec, old_version, SLOW_LOAD)
    clock = ctl.clock
    edit = load_spec(write_spec(SLOW_LOAD_TYPO, "typo.yaml"))
    ctl = controller(edit, ctl.state_dir, clock, router=ctl.router, executor=ctl.executor, prober=NewProbe())
    run(ctl, clock, 2)
    assert ctl.held_probe is not None and ctl.held_probe["initial_delay_seconds"] == 600
    gone = ctl.state.replicas[ids[0]]
    gone.gone_at, gone.reason = clock(), "preempted"
    run(ctl, clock, 2)
    new = [r.id for r in ctl.state.live() if r.id not in ids]  # still loading: nothing answers there
    assert new
    run(ctl, clock, 40, step=5)  # 200 s: past the spec's 30 s, well within the kept probe's 600 s
    failed = [rid for rid, r in ctl.state.replicas.items() if r.reason == "failed"]
    assert failed == [], [n.text for n in ctl.notes if "FAILED" in n.text]
    assert all(ctl.state.replicas[rid].gone_at is None for rid in new)


def test_an_outdated_replica_still_loading_at_a_reload_keeps_its_probes_initial_delay(tmp_path, write_spec):
    """The same for the outdated replicas of a rolling update: one of the old version still
    loading when a reload changed the probe with the version is judged by the probe it runs
    under, 600 s, not the new version's 30 s."""
    spec, clock = load_spec(write_spec(SLOW_LOAD)), Clock()
    prober = FakeProber()
    ctl = controller(spec, tmp_path / "state", clock, prober=prober)
    run(ctl, clock, 3)
    loading = ctl.state.live()[0]  # say a replacement, just provisioned, its model loading
    loading.ready_at, loading.provisioned_at = None, clock()
    prober.down = {loading.id}
    v2 = load_spec(write_spec(SPEC_V2, "v2.yaml"))
    assert v2.readiness_probe.initial_delay_seconds == 30 and loading.revision != replica_revision(v2)
    ctl.reconfigure(
        v2, placement=ctl.placement, executor=ctl.executor, router=ctl.router, prober=NewProbe(), sources=[]
    )
    run(ctl, clock, 20, step=5)  # 100 s
    assert loading.reason != "failed", [n.text for n in ctl.notes if loading.id in n.text]
