"""apply/destroy orchestration: failures leave a consistent state that the next apply converges
from, confirmation, the writer lock, routing hooks, and the CLI commands."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from disk_support import small_fs
from local_support import get, make_service

from skyhedge import apply as apply_mod
from skyhedge.apply import apply_service, destroy_service
from skyhedge.cli import main
from skyhedge.errors import StateError
from skyhedge.policy.types import EventKind, Location, ZoneEvent
from skyhedge.spec import load_spec
from skyhedge.state import STATE_FILE, ReplicaRecord, ServiceState, load_state, save_state, writer_lock

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def svc(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    service = make_service(tmp_path, "applied")
    yield service
    service.cleanup()


def test_a_failed_launch_leaves_a_consistent_state_and_the_next_apply_converges(svc):
    # while the file exists, r-0002's command exits at once: its launch fails (not a capacity error).
    # (A port another process holds no longer makes one fail: the plan skips that ID.)
    fail = svc.root / "fail-r-0002"
    spec = load_spec(svc.write(replicas=3, command=svc.failing_command("r-0002", fail, "refused: no GPU")))
    fail.touch()
    report = apply_service(spec, svc.state_dir, route=False)
    fail.unlink()
    assert not report.ok and not report.launch_failures
    [err] = report.errors
    assert "local/local" in str(err) and "r-0002" in str(err)
    assert "refused: no GPU" in err.stderr
    state = load_state(svc.state_dir, "applied")
    recs = {r.id: r for r in state.live()}
    assert sorted(recs) == ["r-0001", "r-0002", "r-0003"]
    assert recs["r-0002"].provisioned_at is None and recs["r-0002"].fact().status.value == "PROVISIONING"
    assert recs["r-0001"].provisioned_at is not None and recs["r-0003"].provisioned_at is not None
    # the replicas created beside the refused one got their endpoints from the same pass
    for rid in ("r-0001", "r-0003"):
        assert recs[rid].endpoint == f"http://127.0.0.1:{svc.port(rid)}" and recs[rid].cloud_id
    assert recs["r-0002"].endpoint is None
    assert state.extra["terraform"]["roots"]["local/local"]["digest"] is None  # retried next time
    before = svc.pids()
    assert sorted(before) == ["r-0001", "r-0003"]

    again = apply_service(spec, svc.state_dir, route=False)
    assert again.ok and again.applied_roots == ["local/local"]
    state = load_state(svc.state_dir, "applied")
    assert all(r.ready_at is not None and r.endpoint for r in state.live())
    after = svc.pids()
    assert sorted(after) == ["r-0001", "r-0002", "r-0003"]
    assert after["r-0001"] == before["r-0001"] and after["r-0003"] == before["r-0003"]
    assert get(f"http://127.0.0.1:{svc.port('r-0002')}/health")[0] == 200


def test_an_engine_that_cannot_run_records_nothing_as_running(svc, tmp_path):
    spec = load_spec(svc.write(replicas=1))
    broken = tmp_path / "terraform"
    broken.write_text("#!/bin/sh\necho 'Error: this terraform is broken' >&2\nexit 1\n")
    broken.chmod(0o755)
    report = apply_service(spec, svc.state_dir, route=False, terraform_bin=str(broken))
    assert not report.ok and "init failed" in str(report.errors[0])
    assert "this terraform is broken" in report.errors[0].stderr
    state = load_state(svc.state_dir, "applied")
    [rec] = state.live()
    assert rec.provisioned_at is None and rec.endpoint is None and svc.pids() == {}
    assert state.policy_memory.get("policy") == "spothedge"
    fixed = apply_service(spec, svc.state_dir, route=False)
    assert fixed.ok and [r.id for r in load_state(svc.state_dir, "applied").live()] == [rec.id]


def test_declining_the_confirmation_changes_nothing(svc):
    spec = load_spec(svc.write(replicas=2))
    seen: list[Any] = []

    def decline(plan, roots, previews):
        seen.append(
            (plan.summary()["create"], [r.path for r in roots], {k: v.add for k, v in previews.items()})
        )
        return False

    report = apply_service(spec, svc.state_dir, route=False, confirm=decline)
    assert report.cancelled and seen == [(2, ["local/local"], {"local/local": 2})]
    assert not (svc.state_dir / STATE_FILE).exists() and svc.pids() == {}
    accepted = apply_service(spec, svc.state_dir, route=False, confirm=lambda *a: True)
    assert accepted.ok and sorted(svc.pids()) == ["r-0001", "r-0002"]  # applied the previewed plan files


def test_one_writer_at_a_time(svc):
    spec = load_spec(svc.write(replicas=1))
    with writer_lock(svc.state_dir), pytest.raises(StateError, match="holds the lock"):
        apply_service(spec, svc.state_dir, route=False)


class FakeRouter:
    calls: list[tuple[str, Any]] = []

    def __init__(self, spec, state_dir) -> None:
        self.running = bool(FakeRouter.calls)

    def pid(self) -> int | None:
        return 4242 if any(c[0] == "up" for c in FakeRouter.calls) else None

    def preflight(self) -> None:
        pass

    def up(self, upstreams):
        FakeRouter.calls.append(("up", sorted(u.id for u in upstreams)))
        return {"endpoint": "http://127.0.0.1:1", "pid": 4242, "upstreams": [u.id for u in upstreams]}

    def drain(self, upstreams, *, timeout: float = 60.0) -> bool:
        FakeRouter.calls.append(("drain", sorted(u.id for u in upstreams)))
        return True

    def sever(self, endpoints) -> int:
        FakeRouter.calls.append(("sever", sorted(endpoints)))
        return 0

    def down(self, *, timeout: float = 10.0) -> None:
        FakeRouter.calls.append(("down", None))

    def status(self) -> dict[str, Any]:
        return {"endpoint": "http://127.0.0.1:1", "pid": 4242, "upstreams": []}


def test_routing_goes_up_after_readiness_drains_before_destroy_and_goes_down(svc, monkeypatch):
    FakeRouter.calls = []
    monkeypatch.setattr(apply_mod, "_router", lambda spec, state_dir: FakeRouter(spec, state_dir))
    report = apply_service(load_spec(svc.write(replicas=3)), svc.state_dir)
    assert report.ok and FakeRouter.calls == [("up", ["r-0001", "r-0002", "r-0003"])]
    state = load_state(svc.state_dir, "applied")
    assert state.router["pid"] == 4242
    # recorded as the watcher records it: a watcher's first pass diffs against what is served
    assert [pair[0] for pair in state.extra["routed"]] == ["r-0001", "r-0002", "r-0003"]
    endpoints = {r.id: r.endpoint for r in load_state(svc.state_dir, "applied").live()}
    shrink = apply_service(load_spec(svc.write(replicas=2)), svc.state_dir)
    [victim] = shrink.deleted
    survivors = sorted({"r-0001", "r-0002", "r-0003"} - {victim})
    # once Terraform destroyed it, what may still wait on it is cut (a cloud VM sends no reset:
    # its requests past the drain's 30 s waited for read_timeout), before the readiness wait
    assert FakeRouter.calls[1:] == [("drain", survivors), ("sever", [endpoints[victim]]), ("up", survivors)]
    gone = destroy_service(load_spec(svc.spec_path), svc.state_dir)
    assert gone.ok and FakeRouter.calls[-1] == ("down", None)
    assert load_state(svc.state_dir, "applied").router is None


def test_apply_routes_only_replicas_that_are_ready_now():
    """The router `apply` brings up (and drains to) gets the READY replicas: not one failing its
    probes since (a watcher recorded it NOT_READY), nor one being released, nor one starting."""
    state = ServiceState(service="svc")
    kinds = {
        "r-0001": {},
        "r-0002": {"not_ready_since": 30.0},
        "r-0003": {"draining": True},
        "r-0004": {"ready_at": None},
    }
    for i, (rid, fields) in enumerate(kinds.items(), start=1):
        record = {"ready_at": 20.0, "endpoint": f"http://127.0.0.1:{18000 + i}", **fields}
        state.replicas[rid] = ReplicaRecord(rid, "local", "local", "local-a", "spot", 0.0, **record)
    assert [u.id for u in apply_mod._upstreams(state)] == ["r-0001"]


def test_apply_notices_a_local_replica_that_died_and_replaces_it(svc):
    """Without a watcher nothing else notices: Terraform's refresh cannot see a dead process, so
    apply said "No changes" and kept routing to it."""
    import os
    import signal
    import time

    spec = load_spec(svc.write(replicas=2))
    assert apply_service(spec, svc.state_dir, route=False).ok
    pid = svc.pids()["r-0001"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline:  # until it is gone (reaped: the launcher detached it)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    said: list[str] = []
    again = apply_service(spec, svc.state_dir, route=False, say=said.append)
    assert again.ok and again.created, said
    assert any("r-0001" in line for line in said)
    state = load_state(svc.state_dir, "applied")
    assert state.replicas["r-0001"].gone_at is not None and "r-0001" not in {r.id for r in state.live()}
    assert len(state.live()) == 2 and all(r.ready_at is not None for r in state.live())


def test_an_apply_after_a_killed_launch_replaces_the_replica_terraform_kept_but_never_started(svc):
    """`kill -9` of an apply's process group (a runner cancelled, systemd) while a replica's
    launcher ran: Terraform's state keeps that replica as created (its provisioner cut short),
    skyhedge's as PROVISIONING, and no process runs it (measured: 3 of 7 replicas so). The next
    apply found nothing to change, read the replica's endpoint back and waited the whole
    `initial_delay_seconds` (1200 s by default) for it, failed with "not ready" naming a log that
    did not exist, and only a second apply replaced it. It is now replaced in the same apply."""
    import signal

    spec = load_spec(svc.write(replicas=2))
    assert apply_service(spec, svc.state_dir, route=False).ok
    victim = "r-0002"
    pid = svc.pids()[victim]
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    (svc.runtime / "replicas" / f"{victim}.json").unlink()  # its launcher never wrote one
    state = load_state(svc.state_dir, "applied")
    rec = state.replicas[victim]
    rec.cloud_id = rec.endpoint = rec.provisioned_at = rec.ready_at = None
    rec.outputs = {}
    state.extra["terraform"]["roots"]["local/local"]["digest"] = None  # the killed run's root
    save_state(svc.state_dir, state)

    said: list[str] = []
    started = time.monotonic()
    report = apply_service(spec, svc.state_dir, route=False, say=said.append)
    took = time.monotonic() - started
    assert report.ok and not report.not_ready, (report.errors, report.not_ready, said)
    assert took < spec.readiness_probe.initial_delay_seconds, (took, said)
    assert any(victim in line and "no pid file" in line for line in said), said
    after = load_state(svc.state_dir, "applied")
    assert after.replicas[victim].gone_at is not None
    live = after.live()
    assert len(live) == 2 and all(r.ready_at is not None for r in live)
    assert sorted(svc.pids()) == sorted(r.id for r in live)


def test_an_apply_after_terraform_could_not_save_its_state_keeps_every_replica_it_launched(svc, caplog):
    """A full disk under the state dir (measured: a 16 KiB tmpfs on tf/state): Terraform launched
    every replica but could not write its state, cut the file at 4096 bytes, and wrote the whole
    state to `errored.tfstate` in the root's folder. The next apply's render swapped the tree
    and deleted that file; every apply after failed on the cut-short one ("restore it from
    .backup": there was none), and removing it launched every replica again."""
    spec = load_spec(svc.write(replicas=2))
    assert apply_service(spec, svc.state_dir, route=False).ok
    pids = svc.pids()
    # what the failed save left: the state whole in the root's folder only, and skyhedge's records
    # without what a refresh would have read back
    tfstate = svc.state_dir / "tf" / "state" / "local-local.tfstate"
    root = svc.state_dir / "tf" / "tree" / "local" / "local"
    (root / "errored.tfstate").write_bytes(tfstate.read_bytes())
    tfstate.write_bytes(tfstate.read_bytes()[:1000])
    state = load_state(svc.state_dir, "applied")
    for rec in state.live():
        rec.endpoint = rec.cloud_id = rec.ready_at = None
        rec.outputs = {}
    state.extra["terraform"]["roots"]["local/local"]["digest"] = None
    save_state(svc.state_dir, state)

    report = apply_service(spec, svc.state_dir, route=False)
    assert report.ok and not report.created and sorted(report.ready) == ["r-0001", "r-0002"], report.errors
    assert svc.pids() == pids  # the same processes: none launched again
    assert "restored" in caplog.text and "errored.tfstate" in caplog.text
    assert destroy_service(spec, svc.state_dir).ok and not svc.processes()


def test_a_disk_that_fills_during_a_first_apply_loses_no_replica_that_apply_launched(svc, tmp_path, caplog):
    """The state dir's disk filled during a new root's first apply (here by the replicas, once
    both are launched): Terraform could write neither its state nor errored.tfstate and printed
    the state on stdout, which skyhedge dropped. Measured before: no Terraform state left at all;
    the next apply launched both replicas again (new pids; on AWS or GCP, new machines beside
    the old ones, recorded nowhere), and `destroy` ended the processes only as strays."""
    once = tmp_path / "fill-once"
    once.touch()
    with small_fs(svc.state_dir, size="16m") as disk:
        try:
            replicas = svc.runtime / "replicas"
            fill = (
                f'i=0; while [ "$(ls {replicas} | grep -c "json$")" -lt 2 ] && [ $i -lt 200 ]; '
                f"do sleep 0.05; i=$((i+1)); done; "
                f"[ -e {once} ] && dd if=/dev/zero of={disk}/.filler-$SKYHEDGE_REPLICA_ID bs=4k 2>/dev/null; "
                f"exec {sys.executable} {svc.server}"
            )
            spec = load_spec(svc.write(replicas=2, command=fill))
            report = apply_service(spec, svc.state_dir, route=False)
            assert not report.ok and "no space left on device" in str(report.errors[0])
            pids = svc.pids()
            assert sorted(pids) == ["r-0001", "r-0002"]
            once.unlink()
            for filler in disk.glob(".filler-*"):  # room again
                filler.unlink()

            report = apply_service(spec, svc.state_dir, route=False)
            assert report.ok and not report.created, report.errors
            assert svc.pids() == pids  # the same processes: none launched again
            destroyed = destroy_service(spec, svc.state_dir)
            assert destroyed.ok and sorted(destroyed.destroyed) == ["r-0001", "r-0002"]
            assert destroyed.strays == []  # Terraform stopped them: it knew them
            assert not svc.processes()
            assert "skyhedge wrote it to" in caplog.text
        finally:
            svc.cleanup()  # while the disk holding the pid files is still mounted


def _broken_terraform(tmp_path: Path) -> str:
    broken = tmp_path / "terraform"
    broken.write_text("#!/bin/sh\necho 'Error: Backend configuration changed' >&2\nexit 1\n")
    broken.chmod(0o755)
    return str(broken)


def test_a_failed_apply_routes_again_to_the_replicas_it_drained_but_did_not_delete(
    svc, monkeypatch, tmp_path
):
    """The drain comes before Terraform runs; when the apply then fails, the replica still runs
    and serves: leaving it out of nginx would silently lose its capacity."""
    FakeRouter.calls = []
    monkeypatch.setattr(apply_mod, "_router", lambda spec, state_dir: FakeRouter(spec, state_dir))
    assert apply_service(load_spec(svc.write(replicas=3)), svc.state_dir).ok
    failed = apply_service(
        load_spec(svc.write(replicas=2)), svc.state_dir, terraform_bin=_broken_terraform(tmp_path)
    )
    assert not failed.ok and not failed.deleted
    everyone = ["r-0001", "r-0002", "r-0003"]
    assert FakeRouter.calls[1][0] == "drain" and FakeRouter.calls[-1] == ("up", everyone)
    state = load_state(svc.state_dir, "applied")
    assert not any(r.draining for r in state.live()) and state.router["upstreams"] == everyone


def test_destroy_keeps_the_router_up_when_terraform_cannot_even_initialise(svc, monkeypatch, tmp_path):
    """A changed backend (or any init failure) would fail every root after the router went down:
    the service down, nothing destroyed. Every root initialises first."""
    FakeRouter.calls = []
    monkeypatch.setattr(apply_mod, "_router", lambda spec, state_dir: FakeRouter(spec, state_dir))
    assert apply_service(load_spec(svc.write(replicas=2)), svc.state_dir).ok
    spec = load_spec(svc.spec_path)
    failed = destroy_service(spec, svc.state_dir, terraform_bin=_broken_terraform(tmp_path))
    assert not failed.ok and "init failed" in str(failed.errors[0]) and not failed.destroyed
    assert ("down", None) not in FakeRouter.calls and sorted(svc.pids()) == ["r-0001", "r-0002"]
    assert load_state(svc.state_dir, "applied").router is not None
    assert destroy_service(spec, svc.state_dir).ok and FakeRouter.calls[-1] == ("down", None)


def test_a_router_that_cannot_start_fails_the_apply_before_any_replica_is_launched(svc, monkeypatch):
    from skyhedge.errors import RoutingError

    class PortTaken(FakeRouter):
        def preflight(self) -> None:
            raise RoutingError("service.port 8080 on 127.0.0.1 is not available for the router")

    monkeypatch.setattr(apply_mod, "_router", lambda spec, state_dir: PortTaken(spec, state_dir))
    spec = load_spec(svc.write(replicas=2))
    with pytest.raises(RoutingError, match="not available"):
        apply_service(spec, svc.state_dir)
    assert svc.pids() == {} and load_state(svc.state_dir, "applied").live() == []
    assert apply_service(spec, svc.state_dir, route=False).ok  # --no-routing does not ask


def run_cli(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def _tree_files(tree: Path) -> dict[str, bytes]:
    return {p.relative_to(tree).as_posix(): p.read_bytes() for p in sorted(tree.rglob("*")) if p.is_file()}


def test_a_declined_apply_leaves_the_tree_and_no_saved_plan_as_they_were(svc):
    """The preview is rendered into the state's tree and planned with `-out`; a "no" left both
    holding the declined plan, which a `terraform apply` run by hand there would carry out
    (found by an audit), while the command said "nothing changed"."""
    spec, sd = str(svc.write(replicas=1)), str(svc.state_dir)
    assert run_cli("apply", spec, "--state-dir", sd, "--no-routing", "--auto-approve").exit_code == 0
    tree, data = svc.state_dir / "tf" / "tree", svc.state_dir / "tf" / "data"
    before = _tree_files(tree)
    spec = str(svc.write(replicas=3))
    no = run_cli("apply", spec, "--state-dir", sd, "--no-routing", input="n\n")
    assert no.exit_code == 1 and "Apply cancelled; nothing changed." in no.output
    assert "+2 ~0 -0" in no.output  # the preview was made (and shown)
    assert _tree_files(tree) == before
    assert not list(data.rglob(apply_mod.PLAN_FILE))
    assert sorted(svc.pids()) == ["r-0001"]
    fresh = svc.root / "fresh-state"  # a first apply declined: no tree is left at all
    no = run_cli("apply", spec, "--state-dir", str(fresh), "--no-routing", input="n\n")
    assert no.exit_code == 1 and not (fresh / "tf" / "tree").exists()


def test_a_declined_first_apply_leaves_no_state_dir_behind(svc):
    """A first apply declined, or unanswered in CI, says "Apply cancelled; nothing changed." but
    left `<state dir>/` holding the lock file and Terraform's init data (found by an audit). Only
    what that apply made goes."""
    spec, fresh = str(svc.write(replicas=1)), svc.state_dir  # (the fixture stops what runs there)
    assert not fresh.exists()
    no = run_cli("apply", spec, "--state-dir", str(fresh), "--no-routing", input="n\n")
    assert no.exit_code == 1 and "Apply cancelled; nothing changed." in no.output
    assert not fresh.exists() and svc.pids() == {}
    # a state dir that already held Terraform's files keeps them (they may hold its state)
    kept = svc.root / "kept"
    (kept / "tf" / "state").mkdir(parents=True)
    (kept / "tf" / "state" / "local-local.tfstate").write_text("{}")
    no = run_cli("apply", spec, "--state-dir", str(kept), "--no-routing", input="n\n")
    assert no.exit_code == 1 and (kept / "tf" / "state" / "local-local.tfstate").read_text() == "{}"
    yes = run_cli("apply", spec, "--state-dir", str(fresh), "--no-routing", input="y\n")
    assert yes.exit_code == 0, yes.output
    assert (fresh / STATE_FILE).exists() and sorted(svc.pids()) == ["r-0001"]


def test_cli_apply_status_destroy(svc):
    spec = str(svc.write(replicas=2))
    sd = str(svc.state_dir)
    no = run_cli("apply", spec, "--state-dir", sd, "--no-routing", input="n\n")
    assert no.exit_code == 1 and "Apply these changes?" in no.output and svc.pids() == {}
    eof = run_cli("apply", spec, "--state-dir", sd, "--no-routing", input="")  # no answer at all
    assert eof.exit_code == 1 and "Apply cancelled; nothing changed." in eof.output
    assert "Aborted!" not in eof.output and svc.pids() == {}
    yes = run_cli("apply", spec, "--state-dir", sd, "--no-routing", input="y\n")
    assert yes.exit_code == 0, yes.output
    assert "local/local: +2 ~0 -0" in yes.output and "Ready: r-0001, r-0002" in yes.output
    status = run_cli("status", spec, "--state-dir", sd, "--json")
    data = json.loads(status.output)
    assert data["router"] is None
    assert [
        {k: r[k] for k in ("id", "cloud", "region", "zone", "market", "state")} for r in data["replicas"]
    ] == [
        {
            "id": "r-0001",
            "cloud": "local",
            "region": "local",
            "zone": "local-a",
            "market": "spot",
            "state": "READY",
        },
        {
            "id": "r-0002",
            "cloud": "local",
            "region": "local",
            "zone": "local-b",
            "market": "spot",
            "state": "READY",
        },
    ]
    assert data["replicas"][0]["endpoint"] == f"http://127.0.0.1:{svc.port('r-0001')}"
    table = run_cli("status", spec, "--state-dir", sd)
    assert "r-0002" in table.output and "READY" in table.output
    noop = run_cli("apply", spec, "--state-dir", sd, "--no-routing", "--auto-approve")
    assert noop.exit_code == 0 and "No changes" in noop.output
    gone = run_cli("destroy", spec, "--state-dir", sd, "--auto-approve")
    assert gone.exit_code == 0 and "Destroyed 2 replica(s)" in gone.output
    assert svc.processes() == []
    assert json.loads(run_cli("status", spec, "--state-dir", sd, "--json").output)["replicas"] == []


def test_destroy_stops_what_a_deleted_state_dir_still_runs(svc):
    """The state dir deleted under a running service (`rm -rf .skyhedge`, `git clean -fdx`):
    `destroy` said "Nothing to destroy." and exited 0 while every replica served on, and no
    command could stop them. They are found by the runtime dir in their environment (the router,
    by its command line: test_routing_nginx), stopped once confirmed, and nothing is made on disk."""
    spec = str(svc.write(replicas=2))
    sd = str(svc.state_dir)
    assert run_cli("apply", spec, "--state-dir", sd, "--no-routing", "--auto-approve").exit_code == 0
    assert len(svc.pids()) == 2
    shutil.rmtree(svc.state_dir)
    no = run_cli("destroy", spec, "--state-dir", sd, input="n\n")
    assert no.exit_code == 1 and "Stop them?" in no.output and len(svc.processes()) >= 2
    out = run_cli("destroy", spec, "--state-dir", sd, "--auto-approve")
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[0] == (
        f"Nothing recorded (the state dir {svc.state_dir} is gone); stopped what it still ran: "
        "2 local replica(s) (r-0001, r-0002)."
    )
    assert svc.processes() == [] and not svc.state_dir.exists()


def test_cli_reports_a_failed_apply_in_one_line_plus_terraforms_text(svc):
    spec = str(svc.write(replicas=1, command="exit 9"))
    out = run_cli("apply", spec, "--state-dir", str(svc.state_dir), "--no-routing", "--auto-approve")
    assert out.exit_code == 1
    assert "error: terraform apply failed in local/local" in out.output
    assert "exited at once with 9" in out.output
    assert svc.pids() == {}


def test_destroy_names_replicas_recorded_gone_that_terraform_still_held(svc):
    """A watcher killed between recording a replica failed and the apply that drops it leaves
    the replica's process (on a cloud, its machine) in Terraform's root: `destroy` stops it, and
    said "Destroyed 1 replica(s)" as if there had been one (found by an audit)."""
    spec, sd = str(svc.write(replicas=2)), str(svc.state_dir)
    assert run_cli("apply", spec, "--state-dir", sd, "--no-routing", "--auto-approve").exit_code == 0
    state = load_state(svc.state_dir, "applied")
    state.replicas["r-0001"].gone_at, state.replicas["r-0001"].reason = 1.0, "failed"
    save_state(svc.state_dir, state)
    assert sorted(svc.pids()) == ["r-0001", "r-0002"]  # it still runs
    out = run_cli("destroy", spec, "--state-dir", sd, "--auto-approve")
    assert out.exit_code == 0, out.output
    said = " ".join(out.output.split())
    assert "Destroyed 1 replica(s) in local/local; also 1 already recorded gone" in said
    assert "that Terraform still held (r-0001)." in said
    assert svc.pids() == {} and svc.processes() == []


def test_a_local_setup_that_hangs_fails_the_apply_after_the_probes_initial_delay(svc):
    """Through the real module and engine: the setup's time limit reaches the launcher, and a
    setup that hangs fails that launch in one named line instead of holding the apply for good."""
    import yaml

    data = yaml.safe_load(svc.write(replicas=1).read_text())
    data["run"]["setup"] = "sleep 600"
    data["readiness_probe"]["initial_delay_seconds"] = 2
    svc.spec_path.write_text(yaml.safe_dump(data))
    out = run_cli(
        "apply", str(svc.spec_path), "--state-dir", str(svc.state_dir), "--no-routing", "--auto-approve"
    )
    assert out.exit_code == 1
    assert "run.setup did not finish within 2s (readiness_probe.initial_delay_seconds)" in out.output
    assert svc.pids() == {} and svc.processes() == []


def test_status_of_a_service_never_applied(tmp_path: Path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: idle\nplacement: {clouds: [local]}\nrun: {command: 'true'}\n")
    out = run_cli("status", str(spec), "--state-dir", str(tmp_path / "st"), "--json")
    assert json.loads(out.output) == {
        "service": "idle",
        "replicas": [],
        "router": None,
        "watcher": None,
        "local_capacity": None,
        "launch_hold": None,
        "autoscaler": None,
        "rollout": None,
        "failing_roots": None,
        "quota": None,
    }


def test_status_says_what_the_autoscaler_decided_and_why(tmp_path: Path):
    """Under load a user asks why there are 4 replicas and when they go back to 2: status showed
    neither the target nor the rate nor the wish waiting out its delay (found by an audit: the
    answers were only in state.json's `extra`)."""
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "name: busy\nplacement: {clouds: [local]}\nrun: {command: 'true'}\n"
        "replica_policy: {min_replicas: 2, max_replicas: 4, target_qps_per_replica: 20,\n"
        "  upscale_delay_seconds: 10, downscale_delay_seconds: 30}\n"
    )
    scaler = {"samples": [], "target": 4, "pending": 3, "pending_since": 1000.0, "qps": 51.5}
    save_state(tmp_path / "st", ServiceState(service="busy", target=4, extra={"autoscaler": scaler}))
    out = run_cli("status", str(spec), "--state-dir", str(tmp_path / "st"), "--json")
    assert json.loads(out.output)["autoscaler"] == {
        "target": 4,
        "min_replicas": 2,
        "max_replicas": 4,
        "target_qps_per_replica": 20.0,
        "qps": 51.5,
        "qps_at": None,  # no samples: when it was measured is not known
        "window_seconds": 60.0,
        "pending": 3,
        "pending_since": 1000.0,
        "adopt_at": 1030.0,  # a wish down waits downscale_delay_seconds
    }
    text = " ".join(run_cli("status", str(spec), "--state-dir", str(tmp_path / "st")).output.split())
    when = time.strftime("%H:%M:%S", time.localtime(1030.0))
    assert (
        "Autoscaler: target 4 (51.5 req/s over the last 60 s, 20 req/s per replica, 2-4 replicas); "
        f"wants 3, adopted at {when} if the rate holds"
    ) in text
    # a running watcher writes its samples once a minute (loop.SAVE_EVERY): the rate says when
    # it was measured, not "the last 60 s" of a file that may be a minute old
    scaler["samples"] = [[940.0, 0.0], [1000.0, 3090.0]]
    save_state(tmp_path / "st", ServiceState(service="busy", target=4, extra={"autoscaler": scaler}))
    out = run_cli("status", str(spec), "--state-dir", str(tmp_path / "st"), "--json")
    assert json.loads(out.output)["autoscaler"]["qps_at"] == 1000.0
    text = " ".join(run_cli("status", str(spec), "--state-dir", str(tmp_path / "st")).output.split())
    at = time.strftime("%H:%M:%S", time.localtime(1000.0))
    assert f"Autoscaler: target 4 (51.5 req/s over the 60 s to {at}, 20 req/s per replica" in text
    # a fresh service: min_replicas, no rate yet; a spec without target_qps_per_replica: null
    save_state(tmp_path / "st", ServiceState(service="busy"))
    scaled = json.loads(run_cli("status", str(spec), "--state-dir", str(tmp_path / "st"), "--json").output)
    assert scaled["autoscaler"]["target"] == 2 and scaled["autoscaler"]["qps"] is None
    spec.write_text("name: busy\nplacement: {clouds: [local]}\nrun: {command: 'true'}\n")
    assert (
        json.loads(run_cli("status", str(spec), "--state-dir", str(tmp_path / "st"), "--json").output)[
            "autoscaler"
        ]
        is None
    )


def test_status_shows_times_no_clock_can_show_instead_of_dying_on_them(tmp_path: Path):
    """`status` now prints when the rate was measured (`qps_at`, the last sample's time): a state
    whose times no local clock can show (written under a clock far in the future, or edited by
    hand; the loader checks only that they are numbers) made the text end in an OverflowError
    traceback, and so did a wish's `adopt_at` and a launch hold's `until`. It shows them as the
    numbers they are, and the rest of the state with them."""
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "name: busy\nplacement: {clouds: [local]}\nrun: {command: 'true'}\n"
        "replica_policy: {min_replicas: 2, max_replicas: 4, target_qps_per_replica: 20}\n"
    )
    far = 1e20
    scaler = {"samples": [[0.0, 0.0], [far, 3090.0]], "target": 4, "pending": 3, "pending_since": far}
    hold = {"until": far, "reason": "crash loop"}
    extra = {"autoscaler": {**scaler, "qps": 51.5}, "launch_hold": hold}
    save_state(tmp_path / "st", ServiceState(service="busy", target=4, extra=extra))
    out = run_cli("status", str(spec), "--state-dir", str(tmp_path / "st"))
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert "51.5 req/s over the 60 s to 1e+20 (not a time)" in text
    assert "wants 3, adopted at 1e+20 (not a time) if the rate holds" in text
    assert "Launches held until 1e+20 (not a time): crash loop" in text


def test_status_shows_a_rollout_only_while_a_replica_it_names_is_live_and_a_broken_one_is_refused(
    tmp_path: Path,
):
    """The watcher's `rollout` record (a stalled rolling update) is shown while a replica it
    names still runs; one an `apply` finished after the watcher stopped is not (the update is
    over). A hand edit that breaks it is refused in one line naming the field."""
    spec = tmp_path / "s.yaml"
    spec.write_text("name: busy\nplacement: {clouds: [local]}\nrun: {command: 'true'}\n")
    rec = ReplicaRecord("r-0001", "local", "local", "local-a", "spot", 0.0)
    rollout = {"replicas": ["r-0001"], "since": 0.0, "refused": {"local-b": 61}, "refused_since": 0.0}
    rollout["stalled_since"] = 300.0
    save_state(
        tmp_path / "st", ServiceState(service="busy", replicas={"r-0001": rec}, extra={"rollout": rollout})
    )
    text = " ".join(run_cli("status", str(spec), "--state-dir", str(tmp_path / "st")).output.split())
    assert "Rolling update: r-0001 (of an earlier spec, or outside the placement)" in text
    assert "STALLED since" in text and "(local-b 61x: no spot capacity)" in text
    rec.gone_at = 400.0
    save_state(
        tmp_path / "st", ServiceState(service="busy", replicas={"r-0001": rec}, extra={"rollout": rollout})
    )
    out = run_cli("status", str(spec), "--state-dir", str(tmp_path / "st"), "--json")
    assert "Rolling update" not in out.output and json.loads(out.output)["rollout"] is None
    state_file = tmp_path / "st" / "state.json"
    data = json.loads(state_file.read_text())
    data["extra"]["rollout"] = {"replicas": "r-0001", "since": 0.0}
    state_file.write_text(json.dumps(data))
    with pytest.raises(StateError, match=r"extra\.rollout: expected an object with replicas"):
        load_state(tmp_path / "st", "busy")


def test_status_shows_what_the_local_capacity_file_holds_back(tmp_path: Path):
    """A zone `skyhedge preempt` closed, a market replay's finite pool and the replay itself: a
    user wondering why launches are refused sees why (status --json and the text alike)."""
    from skyhedge.clouds.local import capacity, runtime_dir

    spec = tmp_path / "s.yaml"
    spec.write_text("name: idle\nplacement: {clouds: [local]}\nrun: {command: 'true'}\n")
    runtime = runtime_dir(tmp_path / "st")
    capacity.mark_preempted(runtime, "local-a")
    capacity.set_limit(runtime, "local-b", 2)
    capacity.set_limit(runtime, "local-a", 3)  # a pool's size is not shown while its zone is out
    capacity.record_replay(runtime, ["local-b"])
    out = run_cli("status", str(spec), "--state-dir", str(tmp_path / "st"), "--json")
    held = json.loads(out.output)["local_capacity"]
    assert held["preempted"] == {"local-a": None} and held["limits"] == {"local-a": 3, "local-b": 2}
    assert held["replay"]["zones"] == ["local-b"] and held["replay"]["pid"] == os.getpid()
    text = " ".join(run_cli("status", str(spec), "--state-dir", str(tmp_path / "st")).output.split())
    assert (
        "Local capacity: local-a out of spot capacity until cleared; local-b has room for 2 spot replica(s) "
        f"(a market replay, pid {os.getpid()}, drives local-b)"
    ) in text
    capacity.clear(runtime)
    capacity.end_replay(runtime)
    assert (
        json.loads(run_cli("status", str(spec), "--state-dir", str(tmp_path / "st"), "--json").output)[
            "local_capacity"
        ]
        is None
    )


def test_status_still_shows_the_service_when_the_capacity_file_is_damaged(tmp_path: Path):
    """A capacity file cut short (`kill -9` or a power loss mid-write; it is written without
    fsync) stopped `status`, the one command to look with, at `error: ...capacity.json: cannot
    read the local capacity file (...)`, exit 1, without saying what to do; the launches it
    refused under `apply` and `watch` did not say either. `status` now shows the replicas and
    warns, and every command's message names the way out."""
    from skyhedge.clouds.local import capacity, runtime_dir

    spec = tmp_path / "s.yaml"
    spec.write_text("name: idle\nplacement: {clouds: [local]}\nrun: {command: 'true'}\n")
    sdir = tmp_path / "st"
    state = ServiceState(service="idle")
    state.replicas["r-0001"] = ReplicaRecord(
        id="r-0001", cloud="local", region="local", zone="local-a", market="spot", launched_at=1.0
    )
    save_state(sdir, state)
    runtime = runtime_dir(sdir)
    capacity.mark_preempted(runtime, "local-a")
    path = capacity.capacity_path(runtime)
    path.write_bytes(path.read_bytes()[:20])  # as a write cut short leaves it
    for args in ((), ("--json",)):
        out = CliRunner().invoke(main, ["status", str(spec), "--state-dir", str(sdir), *args])
        assert out.exit_code == 0, out.output
        warnings = [line for line in out.output.splitlines() if line.startswith("warning: ")]
        assert len(warnings) == 1, out.output
        assert f"{path}: cannot read the local capacity file" in warnings[0]
        assert warnings[0].endswith("fix it or delete it (every local zone then has its spot capacity)")
        assert "r-0001" in out.output
    with pytest.raises(capacity.CapacityFileError, match="fix it or delete it"):
        capacity.preempted(runtime, "local-a", 0.0)  # what a spot launch asks (its error says it too)


def test_status_says_when_a_dead_masters_workers_still_answer(tmp_path: Path):
    """`kill -9` of the nginx master alone leaves its workers serving the port with the last
    config (docs/routing.md, "Crashes"); "not running" alone sent the operator after a router that
    still answered (found by an audit)."""
    import socket

    spec = tmp_path / "s.yaml"
    spec.write_text("name: idle\nplacement: {clouds: [local]}\nrun: {command: 'true'}\n")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        save_state(tmp_path / "st", ServiceState(service="idle", router={"endpoint": endpoint, "pid": 4242}))
        text = " ".join(run_cli("status", str(spec), "--state-dir", str(tmp_path / "st")).output.split())
        assert "Router: not running (nginx pid 4242 is gone; its workers still answer on the port" in text
    text = " ".join(run_cli("status", str(spec), "--state-dir", str(tmp_path / "st")).output.split())
    assert "Router: not running (nginx pid 4242 is gone; `skyhedge routing up" in text  # port closed


def test_status_still_shows_the_state_while_the_spec_on_disk_does_not_load(tmp_path: Path):
    """An edit in progress, or a typo the running watcher refused: the service goes on, and so
    must `status`. It warns in one line and shows what the state records."""
    spec = tmp_path / "s.yaml"
    state_dir = tmp_path / "st"
    state = ServiceState(service="idle", next_id=2)
    state.replicas["r-0001"] = ReplicaRecord(
        id="r-0001", cloud="local", region="local", zone="local-a", market="spot", launched_at=1.0
    )
    state_dir.mkdir()
    (state_dir / STATE_FILE).write_text(json.dumps(state.to_json()))
    spec.write_text("name: idle\nplacement: {clouds: [local]}\nrun: {command: 'true'}\nreplica_polcy: {}\n")
    out = CliRunner().invoke(main, ["status", str(spec), "--state-dir", str(state_dir), "--json"])
    assert out.exit_code == 0, out.output
    assert out.stderr.startswith(f"warning: {spec}: replica_polcy: unknown field")
    assert out.stderr.strip().endswith("(showing idle's recorded state)")
    assert [r["id"] for r in json.loads(out.stdout)["replicas"]] == ["r-0001"]
    # half written, not even YAML yet: its `name:` line still finds the state
    spec.write_text("name: idle\nplacement: {clouds: [local\nrun: {command: 'true'}\n")
    out = CliRunner().invoke(main, ["status", str(spec), "--state-dir", str(state_dir), "--json"])
    assert out.exit_code == 0, out.output
    assert out.stderr.startswith(f"warning: {spec}: ") and out.stderr.count("\n") == 1
    assert [r["id"] for r in json.loads(out.stdout)["replicas"]] == ["r-0001"]
    # no name to go by: the spec's own error, as before
    spec.write_text("name: [not, a, name]\n")
    out = CliRunner().invoke(main, ["status", str(spec), "--state-dir", str(state_dir)])
    assert out.exit_code == 1 and out.stderr.startswith(f"error: {spec}: name: ")


# ------------------------------------------------------------------------------------------------
# A hand-edited or corrupt state.json is one `StateError` at load time, naming the file and the field

IDLE_SPEC = "name: idle\nplacement: {clouds: [local]}\nrun: {command: 'true'}\n"
DELETE = object()


def written_state() -> dict[str, Any]:
    """state.json as skyhedge writes it: one live replica and one pending zone event."""
    state = ServiceState(service="idle", next_id=2)
    state.replicas["r-0001"] = ReplicaRecord("r-0001", "local", "local", "local-a", "spot", launched_at=1.0)
    state.record_event(ZoneEvent(EventKind.PREEMPTED, Location.parse("local/local/local-b"), 2.0, "r-0000"))
    return json.loads(json.dumps(state.to_json()))


def edit(data: dict[str, Any], where: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    *parents, last = where
    node: Any = data
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


R1 = ("replicas", "r-0001")
EV0 = ("pending_events", 0)
KINDS = "preempted, launch_failed, launched, survived, warning"

CORRUPT_STATES = [
    # (where to edit, the value put there, the field path and problem the error must state)
    (R1, "x", "replicas.r-0001: expected an object, got 'x'"),
    ((*R1, "market"), "weird", "replicas.r-0001.market: expected one of spot, on-demand, got 'weird'"),
    (
        (*R1, "launched_at"),
        "yesterday",
        "replicas.r-0001.launched_at: expected a finite number, got 'yesterday'",
    ),
    ((*R1, "launched_at"), float("nan"), "replicas.r-0001.launched_at: expected a finite number, got nan"),
    ((*R1, "ready_at"), True, "replicas.r-0001.ready_at: expected a finite number or null, got true"),
    (
        (*R1, "zone"),
        DELETE,
        "replicas.r-0001.zone: expected a string of lowercase letters, digits and '-', "
        "got nothing (the field is missing)",
    ),
    ((*R1, "cloud"), 7, "replicas.r-0001.cloud: expected one of aws, gcp, local, got 7"),
    ((*R1, "cloud"), "azure", "replicas.r-0001.cloud: expected one of aws, gcp, local, got 'azure'"),
    ((*R1, "revision"), 5, "replicas.r-0001.revision: expected a string or null, got 5"),
    ((*R1, "id"), "r-0009", "replicas.r-0001.id: expected the record's key 'r-0001', got 'r-0009'"),
    ((*R1, "draining"), "no", "replicas.r-0001.draining: expected true or false, got 'no'"),
    ((*R1, "outputs"), [], "replicas.r-0001.outputs: expected an object, got []"),
    ((*R1, "endpoint"), 8080, "replicas.r-0001.endpoint: expected a string or null, got 8080"),
    (
        EV0,
        {"kind": "nope", "location": "x", "at": 1},
        f"pending_events[0].kind: expected one of {KINDS}, got 'nope'",
    ),
    ((*EV0, "location"), "x", "pending_events[0].location: expected a location 'cloud/region/zone', got 'x'"),
    ((*EV0, "at"), "1", "pending_events[0].at: expected a finite number, got '1'"),
    ((*EV0, "replica_id"), 7, "pending_events[0].replica_id: expected a string or null, got 7"),
    (EV0, "preempted", "pending_events[0]: expected an object, got 'preempted'"),
    (("replicas",), [], "replicas: expected an object, got []"),
    (("pending_events",), {}, "pending_events: expected a list, got {}"),
    (("next_id",), 0, "next_id: expected a positive integer, got 0"),
    (("next_id",), "2", "next_id: expected a positive integer, got '2'"),
    (("policy_memory",), [], "policy_memory: expected an object, got []"),
    (("policy_memory",), {"policy": 3}, "policy_memory.policy: expected a string, got 3"),
    (("policy_memory",), {"memory": None}, "policy_memory.memory: expected an object, got null"),
    (
        ("policy_memory",),
        {"clock": [1.0, "36"]},
        "policy_memory.clock: expected a list [origin, rate] of numbers, got [1.0, '36']",
    ),
    (("history",), "log", "history: expected a list, got 'log'"),
    (("router",), "up", "router: expected an object or null, got 'up'"),
    (("target",), 2.5, "target: expected an integer or null, got 2.5"),
    (("extra",), 1, "extra: expected an object, got 1"),
]


@pytest.mark.parametrize(
    ("where", "value", "problem"), CORRUPT_STATES, ids=[p.split(":")[0] for _, _, p in CORRUPT_STATES]
)
def test_a_corrupt_state_file_is_one_state_error_naming_the_file_and_the_field(
    tmp_path, where, value, problem
):
    path = tmp_path / STATE_FILE
    path.write_text(json.dumps(edit(written_state(), where, value)))
    with pytest.raises(StateError) as exc:
        load_state(tmp_path, "idle")
    assert str(exc.value) == f"{path}: malformed state ({problem})"


@pytest.mark.parametrize("version", [2, 0, True, "1", None])
def test_a_state_file_of_another_version_is_refused_naming_the_version(tmp_path, version):
    """A state written by a newer skyhedge may mean other things by its fields: refused in one
    line, never read as version 1 (`true` is not 1 here either)."""
    path = tmp_path / STATE_FILE
    path.write_text(json.dumps({**written_state(), "version": version}))
    with pytest.raises(StateError) as exc:
        load_state(tmp_path, "idle")
    assert str(exc.value) == f"{path}: state version {version!r} is not supported (expected 1)"


def test_a_state_file_skyhedge_wrote_still_loads_with_unknown_replica_fields_and_null_lists(tmp_path):
    written = written_state()
    newer = edit(json.loads(json.dumps(written)), (*R1, "added_by_a_newer_skyhedge"), 1)
    newer["history"] = None
    (tmp_path / STATE_FILE).write_text(json.dumps(newer))
    state = load_state(tmp_path, "idle")
    assert state.to_json() == {**written, "history": []}
    [fact] = state.facts()
    assert fact.market.value == "spot" and [e.kind for e in state.events()] == [EventKind.PREEMPTED]


@pytest.mark.parametrize("command", ["plan", "status"])
def test_cli_reports_a_corrupt_state_file_as_one_error_line_without_a_traceback(tmp_path, command):
    spec = tmp_path / "s.yaml"
    spec.write_text(IDLE_SPEC)
    state_file = tmp_path / "st" / STATE_FILE
    state_file.parent.mkdir()
    state_file.write_text('{"version": 1, "service": "idle", "replicas": {"r-0001": "x"}}')
    out = run_cli(command, str(spec), "--state-dir", str(state_file.parent))  # any other exception escapes
    assert out.exit_code == 1
    assert out.stderr.splitlines() == [
        f"error: {state_file}: malformed state (replicas.r-0001: expected an object, got 'x')"
    ]
    assert "Traceback" not in out.output


def test_only_the_newest_gone_replicas_are_kept():
    """The state keeps at most GONE_KEPT gone replicas (history), the most recently gone; live
    ones and the ID counter are untouched, so no ID is ever reused."""
    from skyhedge.state import GONE_KEPT

    state = ServiceState(service="svc", next_id=GONE_KEPT + 104)
    for i in range(1, GONE_KEPT + 101):
        rec = ReplicaRecord(f"r-{i:04d}", "local", "local", "local-a", "spot", launched_at=float(i))
        rec.gone_at, rec.reason = float(i), "preempted"
        state.replicas[rec.id] = rec
    for i in range(GONE_KEPT + 101, GONE_KEPT + 104):
        state.replicas[f"r-{i:04d}"] = ReplicaRecord(f"r-{i:04d}", "local", "local", "local-b", "spot", 0.0)
    assert state.prune_gone() == 100
    gone = sorted(r.id for r in state.replicas.values() if r.gone_at is not None)
    assert len(gone) == GONE_KEPT and gone[0] == "r-0101"  # the oldest hundred went
    assert len(state.live()) == 3 and state.next_id == GONE_KEPT + 104
    assert state.prune_gone() == 0


def test_pruning_keeps_the_most_recently_gone_replicas_whatever_their_ids():
    """IDs do not say when a replica went (a long-lived r-0001 goes after many newer ones), and a
    loaded state holds its records in ID order: the history kept is the latest to go."""
    state = ServiceState(service="svc", next_id=6)
    for i, gone_at in enumerate([50.0, 10.0, 40.0, 20.0, 30.0], start=1):
        rec = ReplicaRecord(f"r-{i:04d}", "local", "local", "local-a", "spot", launched_at=0.0)
        rec.gone_at, rec.reason = gone_at, "preempted"
        state.replicas[rec.id] = rec
    assert state.prune_gone(keep=2) == 3
    assert sorted(state.replicas) == ["r-0001", "r-0003"]  # gone at 50 and 40


def test_the_state_history_keeps_only_its_newest_entries():
    """Every pass may log; the state file is rewritten after each, so the log is bounded."""
    state = ServiceState(service="svc")
    limit = ServiceState.HISTORY_LIMIT
    for n in range(limit + 50):
        state.log({"event": "note", "n": n})
    assert [entry["n"] for entry in state.history] == list(range(50, limit + 50))


def test_survival_reports_of_a_zone_with_nothing_else_between_are_one_history_entry():
    """SURVIVED says nothing changed: a run of them per zone is one entry (first `at`, `last_at`,
    `count`), broken by anything else recorded about the zone; the policy still gets each one."""
    from skyhedge.policy.types import EventKind, Location, ZoneEvent

    state = ServiceState(service="svc")
    a, b = Location("local", "local", "local-a"), Location("local", "local", "local-b")
    for t in range(10):
        state.record_event(ZoneEvent(EventKind.SURVIVED, a, 100.0 + t, "r-0001"))
        state.record_event(ZoneEvent(EventKind.SURVIVED, b, 100.0 + t, "r-0002"))
    state.record_event(ZoneEvent(EventKind.PREEMPTED, a, 120.0, "r-0001"))
    state.record_event(ZoneEvent(EventKind.SURVIVED, a, 130.0, "r-0003"))
    state.record_event(ZoneEvent(EventKind.SURVIVED, b, 130.0, "r-0002"))
    assert len(state.pending_events) == 23
    rows = [
        (h["event"], h["location"][-7:], h["at"], h.get("last_at"), h.get("count")) for h in state.history
    ]
    assert rows == [
        ("survived", "local-a", 100.0, 109.0, 10),
        ("survived", "local-b", 100.0, 130.0, 11),
        ("preempted", "local-a", 120.0, None, None),
        ("survived", "local-a", 130.0, None, None),
    ]


def test_destroy_forgets_the_autoscalers_target_so_the_next_apply_starts_from_min_replicas(svc):
    from skyhedge.service import service_target
    from skyhedge.state import save_state

    spec = load_spec(svc.write(replicas=1))
    state = ServiceState(service="applied", target=4)
    state.extra["autoscaler"] = {"target": 4, "qps": 93.45}
    save_state(svc.state_dir, state)
    report = destroy_service(spec, svc.state_dir, route=False)
    assert report.ok
    state = load_state(svc.state_dir, "applied")
    assert state.target is None and "autoscaler" not in state.extra
    assert service_target(spec, state) == spec.replica_policy.min_replicas


def test_a_state_file_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / STATE_FILE).write_bytes(b"\xff\xfe{")
    with pytest.raises(StateError, match=r"state.json: cannot read \('utf-8' codec"):
        load_state(tmp_path, "svc")


def test_a_state_dir_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with (
        pytest.raises(StateError, match=r"file/state: cannot write the state dir \(Not a directory\)"),
        writer_lock(blocker / "state"),
    ):
        pass


def test_watch_once_exits_1_when_the_apply_fails_and_says_why(svc):
    """`watch --once` is a check for CI or cron: a failed apply is exit 1, with the launcher's
    reason rather than Terraform's "local-exec provisioner error" alone."""
    from click.testing import CliRunner

    from skyhedge.cli import main

    spec = svc.write(replicas=1, command="echo boom >&2; exit 3")
    result = CliRunner().invoke(
        main, ["watch", str(spec), "--state-dir", str(svc.state_dir), "--once", "--no-routing"]
    )
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: apply failed: local/local:")
    assert "run.command exited at once with 3" in last and "r-0001.log" in last


def test_watch_logs_one_json_object_per_line_with_log_format_json(svc):
    """For a log pipeline: every log line is a JSON object, the watcher's own notices included;
    the command's final error stays its one `error:` line."""
    from click.testing import CliRunner

    from skyhedge.cli import main

    spec = svc.write(replicas=1, command="echo boom >&2; exit 3")
    args = ["watch", str(spec), "--state-dir", str(svc.state_dir), "--once", "--no-routing"]
    result = CliRunner().invoke(main, [*args, "--log-format", "json"])
    assert result.exit_code == 1, result.output
    *logged, last = result.stderr.strip().splitlines()
    assert last.startswith("error: apply failed: local/local:")
    records = [json.loads(line) for line in logged]
    assert records and all(set(r) >= {"time", "level", "logger", "message"} for r in records)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["time"]) for r in records)
    assert records[0]["message"].startswith("watching ") and records[0]["level"] == "info"
    assert any("apply failed" in r["message"] for r in records)


def test_destroying_a_service_never_applied_writes_nothing(tmp_path):
    from click.testing import CliRunner

    sdir = tmp_path / "never"
    spec = REPO / "examples/llm-multicloud/service.yaml"
    result = CliRunner().invoke(main, ["destroy", str(spec), "--state-dir", str(sdir), "--auto-approve"])
    assert result.exit_code == 0 and "Nothing to destroy." in result.output
    assert not sdir.exists()


def test_a_corrupt_terraform_state_is_named_not_reported_as_a_lock(svc):
    """Terraform reports a state file it cannot parse as "Error acquiring the state lock" and
    advises force-unlock; the real cause and the way out come first instead."""
    spec = load_spec(svc.write(replicas=1))
    report = apply_service(spec, svc.state_dir, route=False)
    assert report.ok, report.errors
    [tfstate] = (svc.state_dir / "tf" / "state").glob("*.tfstate")
    tfstate.write_text("{not json", encoding="utf-8")
    result = CliRunner().invoke(
        main, ["destroy", str(svc.spec_path), "--state-dir", str(svc.state_dir), "--auto-approve"]
    )
    assert result.exit_code == 1
    first = result.output.strip().splitlines()[-1]
    assert "is not valid JSON" in first
    if tfstate.with_name(f"{tfstate.name}.backup").exists():
        assert f"restore it from {tfstate}.backup" in first
    else:  # one apply: Terraform kept no backup, and none is named to restore
        assert f"there is no {tfstate.name}.backup to restore it from" in first
    assert "state lock" not in result.output


def test_a_delete_a_killed_run_left_unfinished_is_decided_again(svc):
    """Deletes are recorded (draining) before Terraform runs. A run killed in between left the
    mark, and neither the policy nor the rolling update looks at a draining replica: it stayed
    SHUTTING_DOWN, out of the router, for good. The next run clears such marks (not those of
    interruption warnings: that replica serves until the cloud takes it) and plans again."""
    from skyhedge.apply import reopen_unfinished_deletes

    spec = load_spec(svc.write(replicas=2))
    assert apply_service(spec, svc.state_dir, route=False).ok
    state = load_state(svc.state_dir, spec.name)
    left, warned = sorted(r.id for r in state.live() if r.market == "spot")[:2]
    for rid in (left, warned):
        state.replicas[rid].draining = True  # as a run killed mid-delete leaves them
    state.extra["warned"] = {warned: 1.0}
    assert reopen_unfinished_deletes(state) == [left]
    assert not state.replicas[left].draining and state.replicas[warned].draining
    state.replicas[left].draining = True
    state.extra.pop("warned")
    (svc.state_dir / STATE_FILE).write_text(json.dumps(state.to_json()))
    said: list[str] = []
    report = apply_service(spec, svc.state_dir, route=False, say=said.append)
    assert report.ok, report.errors
    assert (
        f"{', '.join(sorted([left, warned]))}: deletes a killed run left unfinished; the plan decides again"
        in said
    )
    after = load_state(svc.state_dir, spec.name)
    assert not any(r.draining for r in after.live())


def test_a_failed_apply_says_nothing_was_applied_and_destroy_does_not_claim_what_never_ran(svc, tmp_path):
    """'Applied local/local: 0 created' before the error, and 'Destroyed 2 replica(s)' for
    replicas that never existed, were both untrue."""
    broken = _broken_terraform(tmp_path)
    svc.write(replicas=2)
    failed = run_cli("apply", str(svc.spec_path), "--auto-approve", "--no-routing", "--terraform-bin", broken)
    assert failed.exit_code == 1 and "Applied" not in failed.output
    gone = run_cli("destroy", str(svc.spec_path), "--auto-approve")
    assert gone.exit_code == 0, gone.output
    assert (
        "Destroyed 0 replica(s) in local/local; 2 recorded but never created, forgotten (r-0001, r-0002)."
        in (" ".join(gone.output.split()))
    )


def test_the_replicas_terraform_saved_are_read_from_its_state_not_from_its_outputs(svc):
    """`held_replicas` tells `clear_before_apply` which replicas Terraform saved (a machine of
    one it saved is read back by the apply, never removed). Terraform saves each resource as it
    is created, its root outputs only once the whole apply is done: a state as a kill -9 mid-apply
    leaves it (outputs as before) still holds the replica."""
    spec = load_spec(svc.write(replicas=2))
    ws = apply_mod.Workspace(spec, svc.state_dir)
    engine, root = ws.engine(None), ws.root("local", "local")
    assert apply_service(spec, svc.state_dir, route=False, wait=False).ok
    assert engine.held_replicas(root) == {"r-0001", "r-0002"}
    tfstate = svc.state_dir / "tf" / "state" / "local-local.tfstate"
    doc = json.loads(tfstate.read_text())
    doc["outputs"] = {}
    tfstate.write_text(json.dumps(doc))
    assert engine.output(root) == {}  # what `terraform output` would say
    assert engine.held_replicas(root) == {"r-0001", "r-0002"}
    # and the machine each holds, by its cloud ID (what tells a replica's machine from one an
    # interrupted re-create of it launched): the IDs the replicas recorded
    recorded = {r.id: {r.cloud_id} for r in load_state(svc.state_dir, spec.name).live()}
    assert engine.held_instances(root, "terraform_data", "id") == recorded
    assert engine.held_instances(root, "aws_instance", "id") == {}
    assert destroy_service(spec, svc.state_dir, route=False).ok
    assert engine.held_replicas(root) == set()
    assert engine.held_instances(root, "terraform_data") == {}


def test_a_state_dir_another_account_owns_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    # What the state dir holds is run (Terraform roots, pid files a stop signals): a state dir
    # another account made first let that account run commands as the user who applies it.
    sdir = tmp_path / "svc"
    sdir.mkdir()
    owner = os.stat(sdir).st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 4242)  # as if someone else made it
    if owner == 0:
        monkeypatch.setattr(os, "stat", _owned_by(sdir, 4243, os.stat))
    refused = pytest.raises(StateError, match=r"svc: owned by another account .*use a state dir of your own")
    with refused, writer_lock(sdir):
        pass
    assert list(sdir.iterdir()) == []  # no lock file left in it


def test_a_state_dir_under_a_directory_every_account_may_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    refused = pytest.raises(StateError, match=r"shared: writable by every account \(mode 0777\)")
    with refused, writer_lock(shared / "svc"):
        pass
    assert not (shared / "svc").exists()  # refused before it was made
    shared.chmod(0o1777)  # sticky, as /tmp: others cannot rename or remove what is ours
    with writer_lock(shared / "svc"):
        pass


def test_a_state_dir_of_ones_own_in_a_group_writable_directory_is_used(tmp_path):
    # umask 002 with per-user groups makes every directory group-writable: not refused
    parent = tmp_path / "proj"
    parent.mkdir()
    parent.chmod(0o775)
    with writer_lock(parent / "svc"):
        pass


def _owned_by(path, uid, real_stat):
    """os.stat, reporting `path` as owned by `uid` (a root test run cannot be another account)."""

    def fake(p, *args, **kwargs):
        st = real_stat(p, *args, **kwargs)
        if os.path.realpath(p) != os.path.realpath(path):
            return st
        fields = list(st)
        fields[4] = uid
        return os.stat_result(fields)

    return fake


def test_an_apply_that_leaves_nothing_to_roll_over_ends_the_rollout_status_shows(svc):
    """A watcher stopped while its rolling update was stalled left `rollout` naming the replicas
    it was replacing; the spec reverted and applied, nothing is left to roll over, but those
    replicas stay live, so `status` said for as long as they ran that they were being replaced
    and the update STALLED. `apply` keeps the record in step with its plan, as the watcher does."""
    spec = svc.write(replicas=2)
    first = run_cli("apply", str(spec), "--state-dir", str(svc.state_dir), "--no-routing", "--auto-approve")
    assert first.exit_code == 0, first.output
    state = load_state(svc.state_dir, "applied")
    ids = sorted(r.id for r in state.live())
    state.extra["rollout"] = {
        "replicas": ids,
        "since": 1000.0,
        "refused": {"local-b": 61},
        "refused_since": 1000.0,
        "stalled_since": 1300.0,
    }
    save_state(svc.state_dir, state)
    shown = run_cli("status", str(spec), "--state-dir", str(svc.state_dir))
    assert "Rolling update:" in shown.output  # (the record as the watcher left it)
    again = run_cli("apply", str(spec), "--state-dir", str(svc.state_dir), "--no-routing", "--auto-approve")
    assert again.exit_code == 0, again.output
    assert sorted(r.id for r in load_state(svc.state_dir, "applied").live()) == ids  # nothing rolled
    shown = run_cli("status", str(spec), "--state-dir", str(svc.state_dir))
    assert "Rolling update" not in shown.output and "STALLED" not in shown.output, shown.output
    out = run_cli("status", str(spec), "--state-dir", str(svc.state_dir), "--json")
    assert json.loads(out.output)["rollout"] is None
