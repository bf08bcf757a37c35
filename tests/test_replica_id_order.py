"""Replica IDs past r-9999: ordered by number everywhere, never as text.

IDs are never reused, so a long-lived service with preemption churn hands out r-10000 one day (a
soak reached r-4000 in 30 minutes), and as text "r-10000" sorts before "r-9999". Where the order
decides something (which replica a policy releases, which outdated one a rolling update releases
first) or is shown (status, the dashboard, plan lines, commit messages), it is the order the IDs
were handed out in; below r-10000 that is the text order, so nothing there changed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from controller_fakes import Clock, FakeExecutor, FakeProber, FakeRouter, FakeSource, clocked_controller

from skyhedge.apply import live_rows
from skyhedge.controller.gitops import commit_message
from skyhedge.errors import StateError
from skyhedge.events import PreemptionEvent, Signal
from skyhedge.planner import DELETE, by_replica_id, replica_id, replica_order
from skyhedge.service import compute_plan
from skyhedge.spec import load_spec
from skyhedge.state import ReplicaRecord, ServiceState, load_state, save_state, state_text

ONE_ZONE = """
name: svc
placement: {{clouds: [local], zones: [local-a]}}
replica_policy:
  {{min_replicas: {n}, num_overprovision: 0, policy: {policy}, dynamic_ondemand_fallback: false}}
run: {{command: "true"}}
"""


def _ready(n: int, *, launched_at: float = 100.0, revision: str | None = None) -> ReplicaRecord:
    rid = replica_id(n)
    return ReplicaRecord(
        rid,
        "local",
        "local",
        "local-a",
        "spot",
        launched_at=launched_at,
        provisioned_at=launched_at + 1,
        ready_at=launched_at + 50,
        endpoint=f"http://127.0.0.1:{20000 + n}",
        revision=revision,
    )


def _state(*records: ReplicaRecord) -> ServiceState:
    st = ServiceState(service="svc")
    for rec in records:
        st.replicas[rec.id] = rec
    st.next_id = max(int(r.id[2:]) for r in records) + 1
    return st


def _reloaded(st: ServiceState) -> ServiceState:
    """`st` as the next command (or a restarted watcher) reads it back from state.json."""
    return ServiceState.from_json(json.loads(state_text(st)), where="state.json")


def test_the_sort_key_orders_ids_by_number_and_keeps_four_digit_ids_in_text_order():
    ids = ["r-10001", "r-9999", "r-0007", "r-10000", "r-9998", "r-123456"]
    assert sorted(ids, key=replica_order) == ["r-0007", "r-9998", "r-9999", "r-10000", "r-10001", "r-123456"]
    four = [replica_id(n) for n in (9999, 7, 1000, 42, 999)]
    assert sorted(four, key=replica_order) == sorted(four)  # below r-10000: as before
    # anything not shaped like an ID (never made by skyhedge) comes last, as text, without raising
    assert sorted(["x", "r-", "r-0002", "r-1a"], key=replica_order) == ["r-0002", "r-", "r-1a", "x"]
    assert sorted([_ready(10000), _ready(9999)], key=by_replica_id)[0].id == "r-9999"


def test_a_state_read_back_lists_its_replicas_in_the_order_they_were_handed_out():
    st = _state(*(_ready(n) for n in range(9998, 10002)))
    assert [r.id for r in _reloaded(st).live()] == ["r-9998", "r-9999", "r-10000", "r-10001"]
    # state.json itself is as it was: its keys in text order (json's sort_keys), byte for byte
    on_disk = list(json.loads(state_text(st))["replicas"])
    assert on_disk == ["r-10000", "r-10001", "r-9998", "r-9999"]
    assert state_text(_reloaded(st)) == state_text(st)


def test_spothedge_releases_the_newest_replica_whether_or_not_the_state_was_read_back(write_spec):
    # four READY spot replicas launched together (one apply: one `launched_at`), one too many:
    # SpotHedge releases the newest, and among equals the last it is shown. Read back from
    # state.json, the state showed r-9999 last and it went, where the state in memory released
    # r-10001: a watcher restart, or `apply` after `watch`, chose another replica
    spec = load_spec(write_spec(ONE_ZONE.format(n=3, policy="spothedge")))
    st = _state(*(_ready(n) for n in range(9998, 10002)))
    chosen = []
    for state in (st, _reloaded(st)):
        plan, _ = compute_plan(spec, state, now=1000.0, probe_ports=False)
        chosen.append([r.id for r in plan.replicas if r.action == DELETE])
    assert chosen == [["r-10001"], ["r-10001"]]


def test_both_policies_decide_alike_on_a_state_read_back_past_r9999(write_spec):
    st = _state(*(_ready(n) for n in range(9997, 10003)))
    for policy in ("spothedge", "skyhedge"):
        spec = load_spec(write_spec(ONE_ZONE.format(n=4, policy=policy)))
        memory, back = (compute_plan(spec, s, now=1000.0, probe_ports=False)[0] for s in (st, _reloaded(st)))
        pairs = [[(r.id, r.action) for r in plan.replicas] for plan in (memory, back)]
        assert pairs[0] == pairs[1], policy


def test_a_rolling_update_releases_the_lowest_id_first_among_replicas_launched_together(write_spec):
    # three outdated replicas launched by one apply, and their surge replacement READY: the
    # oldest outdated one goes first; among equal launch times the lowest ID (before: r-10000,
    # as text the lowest)
    spec = load_spec(write_spec(ONE_ZONE.format(n=3, policy="spothedge")))
    outdated = [_ready(n, revision="an-older-spec") for n in (9998, 9999, 10000)]
    st = _state(*outdated, _ready(10001, launched_at=500.0))
    plan, _ = compute_plan(spec, st, now=1000.0, probe_ports=False)
    assert [r.id for r in plan.replicas if r.action == DELETE] == ["r-9998"]
    assert [r.id for r in plan.replicas] == ["r-9998", "r-9999", "r-10000", "r-10001"]


def test_status_rows_list_replicas_by_number():
    st = _state(*(_ready(n) for n in (10001, 9999, 10000, 9998)))
    assert [row["id"] for row in live_rows(st)] == ["r-9998", "r-9999", "r-10000", "r-10001"]
    assert [row["id"] for row in live_rows(_reloaded(st), include_gone=True)] == [
        "r-9998",
        "r-9999",
        "r-10000",
        "r-10001",
    ]


def test_a_gitops_commit_message_lists_created_and_removed_replicas_by_number(write_spec):
    spec = load_spec(write_spec(ONE_ZONE.format(n=2, policy="spothedge")))
    st = _state(_ready(9998), _ready(9999), _ready(10000), _ready(10001))
    plan, _ = compute_plan(spec, st, now=1000.0, probe_ports=False)
    committed = {"r-9990": ["local/local/local-a", "spot"], "r-10002": ["local/local/local-a", "spot"]}
    body = commit_message("svc", plan, st, None, None, committed=committed)
    lines = [line.split()[1] for line in body.splitlines() if line.startswith(("  + ", "  - "))]
    kept = [r.id for r in plan.desired]
    assert lines == [*kept, "r-9990", "r-10002"]
    assert kept == sorted(kept, key=replica_order)


def test_a_watcher_that_crosses_r9999_shows_and_reloads_its_replicas_in_launch_order(
    tmp_path: Path, write_spec
):
    """A watcher of a state whose next ID is 9998: launches and replacements cross into r-10000;
    its status, and a restarted watcher's view of the same state, list them by number."""
    spec = load_spec(write_spec(ONE_ZONE.format(n=3, policy="spothedge")))
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    save_state(state_dir, ServiceState(service="svc", next_id=9998))
    clock, src = Clock(), FakeSource()

    def controller():
        parts = {"executor": FakeExecutor(), "router": FakeRouter(), "prober": FakeProber()}
        return clocked_controller(spec, state_dir, clock, sources=[src], **parts)

    ctl = controller()
    for _ in range(3):
        ctl.tick()
        clock.advance(1)
    for _ in range(2):  # preempt the newest live replica, twice: r-9998 and r-9999 stay
        victim = max(ctl.state.live(), key=by_replica_id)
        gone = PreemptionEvent(Signal.GONE, clock(), "fake", replica_id=victim.id, reason="preempted")
        src.queue.append(gone)
        for _ in range(3):
            ctl.tick()
            clock.advance(1)
    live = [r.id for r in ctl.replicas()]
    assert any(len(rid) > 6 for rid in live) and ctl.state.next_id > 10000, live
    assert live == sorted(live, key=replica_order)
    in_memory = [r.id for r in ctl.state.live()]
    again = controller()
    assert [r.id for r in again.state.live()] == in_memory == live
    assert [r.id for r in again.replicas()] == live
    assert [row["id"] for row in live_rows(load_state(state_dir, "svc"))] == live


def test_a_rolling_update_past_r9999_is_shown_in_launch_order(tmp_path: Path, write_spec):
    """`status`'s `Rolling update:` line and the watcher's stall warning list the replicas it
    replaces (`state.extra["rollout"]["replicas"]`) by number, as the crash hold's line does."""
    spec = load_spec(write_spec(ONE_ZONE.format(n=2, policy="spothedge")))
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    save_state(state_dir, _state(_ready(9999, revision="old"), _ready(10000, revision="old")))
    ctl = clocked_controller(spec, state_dir, Clock(), prober=FakeProber())
    ctl.tick()
    assert ctl.state.extra["rollout"]["replicas"] == ["r-9999", "r-10000"]


def test_an_apply_keeps_the_rolling_updates_replicas_in_launch_order(write_spec):
    """`apply` narrows the watcher's `rollout` record to the replicas its plan still replaces
    (`record_plan`): it wrote them back as text ("r-10000" before "r-9999"), so `status` listed
    them out of launch order after any `apply`, where the watcher lists them by number."""
    from skyhedge.apply import record_plan
    from skyhedge.service import resolve_placement

    spec = load_spec(write_spec(ONE_ZONE.format(n=2, policy="spothedge")))
    st = _state(_ready(9999, revision="old"), _ready(10000, revision="old"))
    st.extra["rollout"] = {"replicas": ["r-9999", "r-10000"], "since": 100.0, "refused": {}}
    plan, memory = compute_plan(spec, st, now=200.0)
    record_plan(st, plan, memory, resolve_placement(spec), 200.0)
    assert st.extra["rollout"]["replicas"] == ["r-9999", "r-10000"]


def test_a_hand_edited_id_padded_past_four_digits_is_refused_in_one_line():
    """`r-00010000` beside `r-10000` is two IDs of one number: one local port (base + N) for two
    replicas. Only IDs as skyhedge writes them are read back, each bad one in one line naming it."""
    data = json.loads(state_text(_state(_ready(10000))))
    record = dict(data["replicas"]["r-10000"], id="r-00010000")
    data["replicas"]["r-00010000"] = record
    with pytest.raises(StateError) as refused:
        ServiceState.from_json(data, where="state.json")
    assert "r-00010000" in str(refused.value) and "replica ID such as 'r-0007'" in str(refused.value)
    assert "\n" not in str(refused.value)
    for good in ("r-0007", "r-9999", "r-10000"):
        data = json.loads(state_text(_state(_ready(int(good[2:])))))
        assert [r.id for r in ServiceState.from_json(data, where="state.json").live()] == [good]


# -- what users read: the Terraform inputs and nginx's upstream block ----------------------------

CROSSING = ("r-9998", "r-9999", "r-10000", "r-10001")


def _local_tree(ids: tuple[str, ...]):
    """The rendered tree of a local service whose replicas are `ids` (kept, all in one root)."""
    import sys

    from skyhedge.clouds import RenderContext
    from skyhedge.planner import KEEP, Plan, PlannedReplica
    from skyhedge.policy.types import Location, Market
    from skyhedge.render import render_tree
    from skyhedge.spec import parse_spec

    spec = parse_spec(
        {"name": "svc", "placement": {"clouds": ["local"]}, "run": {"command": "true"}}, source="svc.yaml"
    )
    replicas = tuple(
        PlannedReplica(rid, Location("local", "local", "local-a"), Market.SPOT, KEEP, 0.0) for rid in ids
    )
    ctx = RenderContext(Path("/srv/state").resolve(), Path("/srv/work"), sys.executable, "/opt/skyhedge")
    return render_tree(spec, Plan("svc", len(ids), "test", replicas, 10002, 0.0), context=ctx)


def _as_an_earlier_release_wrote(data: bytes) -> bytes:
    """A tree JSON file as releases before ID order wrote it: every key, and the manifest's
    replica lists, in text order (r-10000 before r-9998)."""

    def text_order(value):
        if isinstance(value, dict):
            return {k: text_order(v) for k, v in value.items()}
        if isinstance(value, list):
            items = [text_order(v) for v in value]
            return (
                sorted(items)
                if items and all(isinstance(v, str) and v.startswith("r-") for v in items)
                else items
            )
        return value

    value = text_order(json.loads(data))
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def test_the_terraform_inputs_and_the_trees_manifest_list_replicas_by_number(tmp_path: Path):
    from skyhedge.render import TFVARS_FILE, TREE_MANIFEST, write_tree

    tree = _local_tree(CROSSING)
    write_tree(tree, tmp_path / "tree")
    tfvars = (tmp_path / "tree" / "local" / "local" / TFVARS_FILE).read_text()
    assert list(json.loads(tfvars)["replicas"]) == list(CROSSING)  # the file's order: was r-10000 first
    manifest = json.loads((tmp_path / "tree" / TREE_MANIFEST).read_text())
    assert manifest["roots"][0]["replicas"] == list(CROSSING)


def test_a_tree_an_earlier_release_wrote_in_text_order_is_neither_applied_again_nor_rewritten(tmp_path: Path):
    """An existing deployment past r-9999: its root's digest (what `apply` and the watcher compare
    with the one last applied) is the one the earlier release recorded, so no Terraform run; and
    `write_tree` leaves its files as they are, so a GitOps repository gets no commit that only
    reorders lines. Its next real change (a replica added) writes the inputs in ID order."""
    import hashlib

    from skyhedge.render import TFVARS_FILE, TREE_MANIFEST, write_tree
    from skyhedge.render.tree import module_files

    out = tmp_path / "tree"
    tree = _local_tree(CROSSING)
    write_tree(tree, out)
    legacy = {}
    for name in (f"local/local/{TFVARS_FILE}", TREE_MANIFEST):
        legacy[name] = _as_an_earlier_release_wrote((out / name).read_bytes())
        assert legacy[name] != (out / name).read_bytes()
        (out / name).write_bytes(legacy[name])
    # the digest as the earlier release took it: over the files it wrote, then the module's
    root = tree.root("local", "local")
    digest = hashlib.sha256()
    files = [(n, legacy.get(n, data)) for n, data in root.files]
    for name, data in (*files, *(("modules/" + n, b) for n, b in module_files("local", root.module))):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    assert root.digest == digest.hexdigest()  # the same inputs: nothing to apply
    write_tree(_local_tree(CROSSING), out)
    for name, data in legacy.items():
        assert (out / name).read_bytes() == data, name  # no diff
    write_tree(_local_tree((*CROSSING, "r-10002")), out)
    tfvars = json.loads((out / "local" / "local" / TFVARS_FILE).read_text())
    assert list(tfvars["replicas"]) == [*CROSSING, "r-10002"]


@pytest.mark.parametrize(
    ("old", "rendered"),
    [
        # a number where the inputs now hold a bool: Python's `==` says 0 == False, Terraform
        # refuses a number for a bool variable
        ({"replicas": {}, "spot": 0}, {"replicas": {}, "spot": False}),
        # a plug-in's list under `count`: its order is a change to Terraform (see the test below)
        ({"order": ["r-0002", "r-0001"], "replicas": {}}, {"order": ["r-0001", "r-0002"], "replicas": {}}),
        # the same values, reformatted by hand (the tree's README: a diff here is a real change)
        ({"replicas": {"r-0001": {"zone": "a"}}}, {"replicas": {"r-0001": {"zone": "a"}}}),
    ],
    ids=["number-for-bool", "ordered-list", "reformatted"],
)
def test_a_tree_file_kept_as_written_is_only_one_an_earlier_release_wrote_for_the_same_values(
    tmp_path: Path, old, rendered
):
    """Only the exact bytes of the text-ordered file are kept: a file whose values differ, or that
    is formatted otherwise, is written as rendered, so Terraform reads what the digest was taken
    over. Compared as parsed values (and lists of IDs as sets), each of these was kept."""
    from skyhedge.render import TFVARS_FILE
    from skyhedge.render.tree import RenderedTree, _kept_as_written

    name = f"local/local/{TFVARS_FILE}"
    data = (json.dumps(rendered, indent=2, sort_keys=True) + "\n").encode()
    (tmp_path / "local" / "local").mkdir(parents=True)
    (tmp_path / name).write_text(json.dumps(old, separators=(",", ":"), sort_keys=True))
    kept = _kept_as_written(RenderedTree(service="svc", roots=(), files=((name, data),)), tmp_path)
    assert kept.files == ((name, data),)


@pytest.mark.skipif(not __import__("shutil").which("terraform"), reason="no terraform binary")
def test_terraform_sees_no_change_in_a_map_reordered_but_would_in_a_list(tmp_path: Path):
    """Why the inputs may be reordered: every module takes `replicas` as a map and `for_each`es
    over it, and Terraform keys a map's instances by key, so the order in the file is no change
    (a list under `count` would be: every instance after the first moved index)."""
    import os
    import re
    import subprocess

    for module in ("aws-replicas", "gcp-replicas", "local-replicas"):
        text = (Path(__file__).resolve().parents[1] / "modules" / module / "variables.tf").read_text()
        assert re.search(r'variable "replicas" \{[^}]*type = map\(object', text, re.S), module
    env = {**os.environ, "TF_IN_AUTOMATION": "1", "TF_CLI_CONFIG_FILE": os.devnull, "CHECKPOINT_DISABLE": "1"}

    def terraform(*args: str, cwd: Path) -> int:
        return subprocess.run(
            ["terraform", *args, "-input=false", "-no-color"],
            cwd=cwd,
            env=env,
            capture_output=True,
            timeout=60,
        ).returncode

    def plan_after_reorder(main: str, first: dict, second: dict) -> int:
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        root.mkdir()
        (root / "main.tf").write_text(main)
        (root / "x.auto.tfvars.json").write_text(json.dumps(first))
        assert terraform("init", cwd=root) == 0
        assert terraform("apply", "-auto-approve", cwd=root) == 0
        (root / "x.auto.tfvars.json").write_text(json.dumps(second))
        return terraform("plan", "-detailed-exitcode", cwd=root)  # 0: no changes, 2: changes

    as_map = """variable "replicas" { type = map(object({ zone = string })) }
resource "terraform_data" "replica" {
  for_each = var.replicas
  input    = each.value.zone
}
"""
    text = {rid: {"zone": f"z{i}"} for i, rid in enumerate(sorted(CROSSING))}
    number = {rid: text[rid] for rid in CROSSING}
    assert plan_after_reorder(as_map, {"replicas": text}, {"replicas": number}) == 0
    as_list = """variable "replicas" { type = list(string) }
resource "terraform_data" "replica" {
  count = length(var.replicas)
  input = var.replicas[count.index]
}
"""
    assert plan_after_reorder(as_list, {"replicas": sorted(CROSSING)}, {"replicas": list(CROSSING)}) == 2


def _crossing_upstreams():
    from skyhedge.routing import Upstream

    return [Upstream(rid, f"http://127.0.0.1:{20000 + i}") for i, rid in enumerate(CROSSING)]  # never dialled


def test_nginx_upstream_blocks_list_replicas_by_number():
    from skyhedge.routing.config import sorted_upstreams

    assert [u.id for u in sorted_upstreams(reversed(_crossing_upstreams()))] == list(CROSSING)


@pytest.fixture
def router(tmp_path: Path):
    from routing_support import free_port, make_spec, teardown_router

    from skyhedge.routing import Router

    made = Router(make_spec(free_port()), tmp_path / "state")
    try:
        yield made
    finally:
        teardown_router(made)


def test_a_router_an_earlier_release_started_in_text_order_is_not_reloaded_for_the_order_alone(
    router, monkeypatch: pytest.MonkeyPatch
):
    """`routing reload`, `apply` and a restarted watcher reload the router with the upstreams it
    runs: the order alone must not churn nginx's workers (each reload closes their kept-alive
    connections). Its next real change writes the block in ID order."""
    from routing_support import have_nginx

    import skyhedge.routing.router as router_module
    from skyhedge.routing import nginx as nginx_proc

    if not have_nginx():
        pytest.skip("nginx is not installed")
    ups = _crossing_upstreams()
    from skyhedge.routing import config

    real = config.sorted_upstreams
    with monkeypatch.context() as m:  # the earlier release: text order
        for module in (config, router_module):
            m.setattr(module, "sorted_upstreams", lambda u, text_order=False: real(u, text_order=True))
        pid = router.up(ups)["pid"]
    written = router.paths.conf.read_bytes()
    assert written.index(b"# r-10000") < written.index(b"# r-9998")
    workers = set(nginx_proc.workers(pid))
    assert workers
    shown = [router.reload(ups), router.up(ups), router.status()]
    assert set(nginx_proc.workers(pid)) == workers  # no reload
    assert router.paths.conf.read_bytes() == written
    # what `routing --json` and `status --json` (its `router`) say, beside replicas listed by ID
    for said in shown:
        assert [u["id"] for u in said["upstreams"]] == list(CROSSING)  # was r-10000 first
    router.reload(ups[1:])  # r-9998 released: a real change
    text = router.paths.conf.read_text()
    assert "# r-9998" not in text and text.index("# r-9999") < text.index("# r-10000")
    assert [u["id"] for u in router.status()["upstreams"]] == list(CROSSING[1:])
