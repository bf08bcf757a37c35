"""The local cloud end to end with the real (embedded) Terraform engine: processes start, change,
stop and refuse launches exactly as the plan and the capacity file say."""

from __future__ import annotations

import json
import time

import pytest
from local_support import get, make_service

from skyhedge.apply import apply_service, destroy_service
from skyhedge.clouds.local import capacity
from skyhedge.clouds.local.processes import find_processes
from skyhedge.policy.types import EventKind
from skyhedge.spec import load_spec
from skyhedge.state import load_state


@pytest.fixture
def svc(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # local replicas run in the directory skyhedge runs in
    service = make_service(tmp_path, "e2e")
    yield service
    service.cleanup()


def apply(svc, **spec_overrides):
    svc.write(**spec_overrides)
    spec = load_spec(svc.spec_path)
    return spec, apply_service(spec, svc.state_dir, route=False)


def test_three_replicas_change_the_target_then_destroy(svc):
    spec, report = apply(svc, replicas=3)
    assert report.ok, report.errors
    state = load_state(svc.state_dir, "e2e")
    live = sorted(state.live(), key=lambda r: r.id)
    assert [(r.id, r.zone) for r in live] == [
        ("r-0001", "local-a"),
        ("r-0002", "local-b"),
        ("r-0003", "local-c"),
    ]
    for rec in live:
        assert rec.endpoint == f"http://127.0.0.1:{svc.port(rec.id)}"
        assert rec.ready_at is not None and rec.cloud_id and rec.provisioned_at
        status, body = get(f"{rec.endpoint}/health")
        assert status == 200 and body == {"replica": rec.id}
    before = svc.pids()
    assert sorted(before) == ["r-0001", "r-0002", "r-0003"]

    _, grow = apply(svc, replicas=4)
    assert grow.ok and grow.created == ["r-0004"] and grow.deleted == []
    after_grow = svc.pids()
    assert {k: after_grow[k] for k in before} == before  # the others were not touched
    assert get(f"http://127.0.0.1:{svc.port('r-0004')}/health")[0] == 200

    _, shrink = apply(svc, replicas=2)
    assert shrink.ok and shrink.created == [] and len(shrink.deleted) == 2
    after_shrink = svc.pids()
    assert len(after_shrink) == 2
    assert all(after_grow[k] == pid for k, pid in after_shrink.items())
    state = load_state(svc.state_dir, "e2e")
    for rid in shrink.deleted:
        assert state.replicas[rid].reason == "terminated" and state.replicas[rid].gone_at is not None
    assert sorted(find_processes(svc.runtime)) == sorted(after_shrink.values())

    again = apply_service(load_spec(svc.spec_path), svc.state_dir, route=False)
    assert again.ok and again.applied_roots == [] and svc.pids() == after_shrink  # converged: no-op

    gone = destroy_service(load_spec(svc.spec_path), svc.state_dir, route=False)
    assert gone.ok and sorted(gone.destroyed) == sorted(after_shrink)
    assert find_processes(svc.runtime) == [] and svc.pids() == {}
    assert load_state(svc.state_dir, "e2e").live() == []


def test_injection_attempts_come_out_inert(svc):
    evil = (
        "a \"quoted\" 'single' ${path.module} %{if true}x%{endif} $(touch pwned) `touch pwned2`\nline two\\"
    )
    spec, report = apply(svc, replicas=1, env={"EVIL": evil, "SECOND": "${var.service}"})
    assert report.ok, report.errors
    port = svc.port("r-0001")
    assert get(f"http://127.0.0.1:{port}/env/EVIL")[1] == evil
    assert get(f"http://127.0.0.1:{port}/env/SECOND")[1] == "${var.service}"
    assert not (svc.root / "pwned").exists() and not (svc.root / "pwned2").exists()
    tree = svc.state_dir / "tf" / "tree"
    for tf in tree.rglob("*.tf"):
        assert "pwned" not in tf.read_text() and "EVIL" not in tf.read_text()
    tfvars = json.loads((tree / "local" / "local" / "skyhedge.auto.tfvars.json").read_text())
    assert tfvars["run"]["env"]["EVIL"] == evil


def test_a_launch_into_a_preempted_zone_fails_clearly_and_orphans_nothing(svc):
    capacity.mark_preempted(svc.runtime, "local-b")
    spec, report = apply(svc, replicas=2)
    # r-0002 went to local-b and was refused; the re-plan put its replacement elsewhere.
    assert [f.replica_id for f in report.launch_failures] == ["r-0002"]
    failure = report.launch_failures[0]
    assert failure.location.zone == "local-b" and failure.market == "spot"
    assert "InsufficientCapacity" in failure.message and "local-b" in failure.message
    assert report.ok and report.rounds == 2
    state = load_state(svc.state_dir, "e2e")
    rec = state.replicas["r-0002"]
    assert rec.gone_at is not None and rec.reason == "failed" and rec.fact().status.value == "FAILED"
    assert any(
        e["kind"] == EventKind.LAUNCH_FAILED.value and e["location"].endswith("local-b")
        for e in state.history
        if e.get("event") == "launch_failed"
    )
    zones = {r.zone for r in state.live()}
    assert "local-b" not in zones and len(state.live()) == 2
    assert "r-0002" not in svc.pids()
    assert len(find_processes(svc.runtime)) == 2
    # nothing left in Terraform for the refused launch (its tainted resource was destroyed)
    tfstate = json.loads((svc.state_dir / "tf" / "state" / "local-local.tfstate").read_text())
    keys = {i["index_key"] for r in tfstate["resources"] for i in r["instances"]}
    assert keys == {r.id for r in state.live()}
    destroy_service(spec, svc.state_dir, route=False)
    assert find_processes(svc.runtime) == []


def test_a_single_zone_that_stays_preempted_leaves_a_consistent_state_that_converges(svc):
    capacity.mark_preempted(svc.runtime, "local-a")
    spec, report = apply(svc, replicas=1, zones=("local-a",))
    assert len(report.launch_failures) == 3 and report.rounds == 3  # tried, re-planned, gave up
    assert find_processes(svc.runtime) == []
    state = load_state(svc.state_dir, "e2e")
    assert state.live() == [] and all(r.reason == "failed" for r in state.replicas.values())
    capacity.clear(svc.runtime)
    started = time.monotonic()
    report = apply_service(spec, svc.state_dir, route=False)
    assert report.ok and not report.launch_failures
    state = load_state(svc.state_dir, "e2e")
    assert len(state.live()) == 1 and state.live()[0].ready_at is not None
    assert time.monotonic() - started < 30


def test_an_apply_after_a_spec_change_rolls_every_replica_over(svc):
    """`apply` takes the whole rolling update, one replica at a time, each released once its
    replacement is READY; `--no-rollout` (rollout=False) stops after the first step."""
    _, first = apply(svc, replicas=2, env={"MARK": "1"})
    assert first.ok
    old = sorted(svc.pids())
    svc.write(replicas=2, env={"MARK": "2"})
    step = apply_service(load_spec(svc.spec_path), svc.state_dir, route=False, rollout=False)
    assert step.ok and step.rollout_steps == 1 and len(step.created) == 1 and step.deleted == []
    assert any("still run an older spec" in n for n in step.notes)
    whole = apply_service(load_spec(svc.spec_path), svc.state_dir, route=False)
    assert whole.ok and not whole.notes, whole.notes
    assert whole.rollout_steps == 3  # each step launching or releasing one replica
    state = load_state(svc.state_dir, "e2e")
    live = state.live()
    assert len(live) == 2 and not {r.id for r in live} & set(old)
    assert sorted(whole.deleted) == old
    for rec in live:  # the new processes carry the new environment
        assert get(f"{rec.endpoint}/env/MARK") == (200, "2")
    assert sorted(svc.pids()) == sorted(r.id for r in live)


def test_a_rollout_asks_before_the_first_step_that_changes_something(svc):
    # a surge launched by an earlier `--no-wait` apply: the next apply's first step changes
    # nothing (the surge is not READY yet), so the question comes with the step that releases
    apply(svc, replicas=2, env={"MARK": "1"})
    svc.write(replicas=2, env={"MARK": "2"})
    apply_service(load_spec(svc.spec_path), svc.state_dir, route=False, wait=False, rollout=False)
    asked = []

    def confirm(plan, roots, previews):
        asked.append(sorted(r.id for r in plan.replicas if r.action == "delete"))
        return True

    report = apply_service(load_spec(svc.spec_path), svc.state_dir, route=False, confirm=confirm)
    assert report.ok and not report.notes and len(asked) == 1 and asked[0], asked


def test_a_rollout_takes_one_step_without_routing_while_a_router_runs(svc, monkeypatch):
    # the router would not be reloaded, and would keep sending requests to released replicas
    class LiveRouter:
        def pid(self):
            return 4242

    import skyhedge.apply as apply_mod

    apply(svc, replicas=2, env={"MARK": "1"})
    svc.write(replicas=2, env={"MARK": "2"})
    monkeypatch.setattr(apply_mod, "_router", lambda spec, state_dir: LiveRouter())
    report = apply_service(load_spec(svc.spec_path), svc.state_dir, route=False)
    assert report.ok and report.rollout_steps == 1 and report.rollout_stopped is None
    assert any("one step only: --no-routing while the router runs" in n for n in report.notes)


def test_a_rollout_that_stops_short_fails_the_command(svc, monkeypatch):
    from click.testing import CliRunner

    import skyhedge.apply as apply_mod
    from skyhedge.cli import main

    apply(svc, replicas=2, env={"MARK": "1"})
    svc.write(replicas=2, env={"MARK": "2"})
    monkeypatch.setattr(apply_mod, "_not_answering", lambda spec, state, earlier: ["r-0001"])
    args = ["apply", str(svc.spec_path), "--state-dir", str(svc.state_dir), "--no-routing"]
    asked = CliRunner().invoke(main, args, input="n\n")
    assert "Then the rolling update goes on: r-0001" in asked.output and "cancelled" in asked.output
    done = CliRunner().invoke(main, [*args, "--auto-approve"])
    assert done.exit_code == 1, done.output
    assert "error: the rolling update stopped short: r-0001 no longer answer(s)" in done.output
    assert "still run an older spec" in done.output


def test_replicas_launched_by_another_install_of_skyhedge_are_still_destroyed(svc):
    """Terraform runs a replica's stop step with the Python path recorded when it was launched:
    after `pip install --upgrade` (or a switch between a wheel and an editable install) that
    directory may be gone. The stop step must still find skyhedge, or `destroy` fails and leaves
    the replica running."""
    _, report = apply(svc, replicas=1)
    assert report.ok, report.errors
    (tfstate,) = [p for p in svc.state_dir.rglob("*.tfstate") if "resources" in json.loads(p.read_text())]
    state = json.loads(tfstate.read_text())
    for resource in state["resources"]:
        for instance in resource["instances"]:
            recorded = instance["attributes"]["input"]["value"]
            recorded["pythonpath"] = str(svc.state_dir / "an-uninstalled-skyhedge")
    tfstate.write_text(json.dumps(state))
    gone = destroy_service(load_spec(svc.spec_path), svc.state_dir, route=False)
    assert gone.ok, gone.errors
    assert find_processes(svc.runtime) == [] and svc.pids() == {}


def test_replicas_launched_from_a_venv_since_removed_are_still_destroyed(svc):
    """Terraform runs a replica's stop step with the interpreter recorded when it was launched: a
    venv replaced by one at another path (an upgrade into a fresh venv, the old one deleted) left
    `destroy` failing with `fork/exec /old/venv/bin/python3: no such file or directory`, and the
    replicas running, un-routed. The stop step falls back to the interpreter skyhedge runs under."""
    _, report = apply(svc, replicas=2)
    assert report.ok, report.errors
    (tfstate,) = [p for p in svc.state_dir.rglob("*.tfstate") if "resources" in json.loads(p.read_text())]
    state = json.loads(tfstate.read_text())
    removed = svc.root / "old-venv" / "bin" / "python3"
    for resource in state["resources"]:
        for instance in resource["instances"]:
            instance["attributes"]["input"]["value"]["python"] = str(removed)
    tfstate.write_text(json.dumps(state))
    gone = destroy_service(load_spec(svc.spec_path), svc.state_dir, route=False)
    assert gone.ok, gone.errors
    assert find_processes(svc.runtime) == [] and svc.pids() == {}


def test_a_clean_destroy_leaves_no_kept_probe_and_a_tree_without_the_destroyed_replicas(svc):
    """A destroy left `tf/probes.json` (the probe replicas were probed with: its headers or
    `post_data` may hold a token) named by `state.json`, and the state's tree `tf/tree`, whose
    tfvars still listed the destroyed replicas (a `terraform apply` by hand there launched them
    again); nothing read either until the next apply replaced them. A clean destroy removes the
    probes (and the local runtime dir's `paths.json`) and renders the tree with no replica; what
    the docs say stays, stays, and the next apply records its probe again."""
    spec, report = apply(svc, replicas=2)
    assert report.ok, report.errors
    tf = svc.state_dir / "tf"
    assert (tf / "probes.json").is_file() and (tf / "tree").is_dir()
    assert load_state(svc.state_dir, "e2e").extra.get("probe")
    assert destroy_service(spec, svc.state_dir, route=False).ok
    assert not (tf / "probes.json").exists()  # was: left, with the probe
    tfvars = json.loads((tf / "tree" / "local" / "local" / "skyhedge.auto.tfvars.json").read_text())
    assert tfvars["replicas"] == {}  # was: r-0001, r-0002, which `terraform apply` there relaunched
    assert not (svc.runtime / "paths.json").exists()
    state = load_state(svc.state_dir, "e2e")
    assert "probe" not in state.extra and "earlier_probes" not in state.extra
    assert state.live() == [] and state.next_id == 3  # IDs are never reused
    assert (tf / "state" / "local-local.tfstate").is_file()  # Terraform's (empty) state stays
    assert sorted(p.name for p in (svc.runtime / "replicas").iterdir()) == ["r-0001.log", "r-0002.log"]
    spec, again = apply(svc, replicas=1)
    assert again.ok and again.created == ["r-0003"]
    assert (tf / "probes.json").is_file() and load_state(svc.state_dir, "e2e").extra.get("probe")
    assert destroy_service(spec, svc.state_dir, route=False).ok
