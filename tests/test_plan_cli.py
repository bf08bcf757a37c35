"""`skyhedge plan`: the table, the documented --json shape and Terraform-like exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from skyhedge.cli import main
from skyhedge.errors import SpecError
from skyhedge.state import ReplicaRecord, ServiceState, load_state, save_state

REPO = Path(__file__).resolve().parents[1]
MULTICLOUD = REPO / "examples/llm-multicloud/service.yaml"

# The documented shape of `plan --json` (README, "plan --json"); extra fields are allowed.
PLAN_SCHEMA = {
    "type": "object",
    "required": ["service", "target", "replicas", "summary"],
    "properties": {
        "service": {"type": "string"},
        "target": {"type": "integer", "minimum": 0},
        "replicas": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "cloud", "region", "zone", "market", "action", "price_per_hour"],
                "properties": {
                    "id": {"type": "string", "pattern": "^r-[0-9]{4,}$"},
                    "cloud": {"enum": ["aws", "gcp", "local"]},
                    "region": {"type": "string"},
                    "zone": {"type": "string"},
                    "market": {"enum": ["spot", "on-demand"]},
                    "action": {"enum": ["create", "keep", "delete"]},
                    "price_per_hour": {"type": "number", "minimum": 0},
                },
            },
        },
        "summary": {
            "type": "object",
            "required": ["spot", "on_demand", "hourly_cost", "ondemand_only_hourly_cost", "zones_used"],
            "properties": {
                "spot": {"type": "integer"},
                "on_demand": {"type": "integer"},
                "hourly_cost": {"type": "number"},
                "ondemand_only_hourly_cost": {"type": "number"},
                "zones_used": {"type": "integer"},
            },
        },
    },
}

LOCAL = """
name: echo
placement: {clouds: [local], zones: [local-a, local-b, local-c]}
replica_policy: {min_replicas: 2, policy: spothedge}
run: {command: python3 server.py}
"""


def save_ready_spot(state_dir: Path, service: str, cloud: str, region: str, zones: list[str]) -> None:
    """A saved state holding one READY spot replica per zone given, r-0001 onwards."""
    state = ServiceState(service=service, next_id=len(zones) + 1)
    for i, zone in enumerate(zones, start=1):
        state.replicas[f"r-{i:04d}"] = ReplicaRecord(
            f"r-{i:04d}", cloud, region, zone, "spot", launched_at=0.0, provisioned_at=1.0, ready_at=2.0
        )
    save_state(state_dir, state)


def run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("policy", ["spothedge", "skyhedge", "ondemand"])
def test_multicloud_example_json_matches_the_documented_shape(tmp_path, policy):
    result = run("plan", str(MULTICLOUD), "--state-dir", str(tmp_path), "--json", "--policy", policy)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    jsonschema.validate(data, PLAN_SCHEMA)
    assert data["service"] == "llama-8b" and data["target"] == 3
    spot = [r for r in data["replicas"] if r["market"] == "spot"]
    if policy == "ondemand":
        assert not spot
    else:
        zones = [(r["cloud"], r["zone"]) for r in spot]
        assert len(zones) == len(set(zones)), "spot replicas must sit in distinct zones while zones remain"
    assert not tmp_path.joinpath("state.json").exists(), "plan never writes state"


def test_table_shows_costs_and_change_counts(tmp_path):
    result = run("plan", str(MULTICLOUD), "--state-dir", str(tmp_path), "--policy", "spothedge")
    assert result.exit_code == 0, result.output
    assert "on-demand only" in result.output and "when spot is READY" in result.output
    assert "Plan: 7 to create, 0 to keep, 0 to delete." in result.output


def test_detailed_exitcode_is_2_with_changes_and_0_without(tmp_path, write_spec):
    spec = write_spec(LOCAL)
    state_dir = tmp_path / "state"
    assert run("plan", str(spec), "--state-dir", str(state_dir), "--detailed-exitcode").exit_code == 2
    assert run("plan", str(spec), "--state-dir", str(state_dir)).exit_code == 0
    # Converged state: 3 ready spot replicas in 3 zones (target 2 + 1 extra), nothing to change.
    state = ServiceState(service="echo", next_id=4)
    for i, zone in enumerate(["local-a", "local-b", "local-c"], start=1):
        state.replicas[f"r-000{i}"] = ReplicaRecord(
            f"r-000{i}", "local", "local", zone, "spot", launched_at=0.0, provisioned_at=1.0, ready_at=2.0
        )
    save_state(state_dir, state)
    result = run("plan", str(spec), "--state-dir", str(state_dir), "--json", "--detailed-exitcode")
    assert result.exit_code == 0, result.output
    assert {r["action"] for r in json.loads(result.output)["replicas"]} == {"keep"}


def test_preempted_replica_is_replaced_without_renaming_the_others(tmp_path, write_spec):
    spec = write_spec(LOCAL)
    state_dir = tmp_path / "state"
    state = ServiceState(service="echo", next_id=4)
    for i, zone in enumerate(["local-a", "local-b", "local-c"], start=1):
        state.replicas[f"r-000{i}"] = ReplicaRecord(
            f"r-000{i}", "local", "local", zone, "spot", launched_at=0.0, provisioned_at=1.0, ready_at=2.0
        )
    state.replicas["r-0002"].gone_at = 10.0
    state.replicas["r-0002"].reason = "preempted"
    save_state(state_dir, state)
    result = run("plan", str(spec), "--state-dir", str(state_dir), "--json", "--detailed-exitcode")
    assert result.exit_code == 2
    actions = {r["id"]: r["action"] for r in json.loads(result.output)["replicas"]}
    assert actions["r-0001"] == actions["r-0003"] == "keep"
    assert "r-0002" not in actions
    assert any(rid >= "r-0004" and a == "create" for rid, a in actions.items())
    assert load_state(state_dir, "echo").replicas["r-0002"].reason == "preempted"  # untouched


def test_state_of_another_service_is_refused(tmp_path, write_spec):
    spec = write_spec(LOCAL)
    save_state(tmp_path, ServiceState(service="other"))
    result = run("plan", str(spec), "--state-dir", str(tmp_path))
    assert result.exit_code == 1
    assert "holds service 'other', not 'echo'" in result.output


def test_corrupt_state_is_one_line(tmp_path, write_spec):
    spec = write_spec(LOCAL)
    (tmp_path / "state.json").write_text("{not json")
    result = run("plan", str(spec), "--state-dir", str(tmp_path))
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {tmp_path / 'state.json'}: not valid JSON")


def _converged(state_dir: Path, revision: str | None) -> None:
    state = ServiceState(service="echo", next_id=4)
    for i, zone in enumerate(["local-a", "local-b", "local-c"], start=1):
        state.replicas[f"r-000{i}"] = ReplicaRecord(
            f"r-000{i}",
            "local",
            "local",
            zone,
            "spot",
            launched_at=float(i),
            provisioned_at=10.0,
            ready_at=20.0,
            endpoint=f"http://127.0.0.1:{18000 + i}",
            revision=revision,
        )
    save_state(state_dir, state)


def test_a_changed_run_is_a_rolling_update_not_an_in_place_restart(tmp_path, write_spec):
    """Replicas launched under another `run` are outdated: the plan says so (exit 2), asks for one
    replica more, and releases an outdated one only while more than N others are READY."""
    from skyhedge.service import compute_plan
    from skyhedge.spec import load_spec, replica_revision

    spec_path = write_spec(LOCAL)
    state_dir = tmp_path / "state"
    old_revision = replica_revision(load_spec(spec_path))
    _converged(state_dir, old_revision)
    assert run("plan", str(spec_path), "--state-dir", str(state_dir), "--detailed-exitcode").exit_code == 0

    changed = write_spec(
        LOCAL.replace("run: {command: python3 server.py}", "run: {command: python3 server.py, env: {A: '1'}}")
    )
    result = run("plan", str(changed), "--state-dir", str(state_dir), "--json", "--detailed-exitcode")
    assert result.exit_code == 2, result.output
    data = json.loads(result.output)
    assert data["summary"]["outdated"] == 3  # none goes before the surge is READY
    # all three kept; one more spot replica launched (the surge): the 3 READY are N + 1, the
    # policy's extra included, so none is released until the surge is READY too (releasing the
    # oldest in this pass left N, the extra gone for the whole update)
    actions = {r["id"]: (r["action"], r["outdated"]) for r in data["replicas"]}
    assert actions["r-0001"] == actions["r-0002"] == actions["r-0003"] == ("keep", True)
    new = [r for r in data["replicas"] if r["id"] >= "r-0004"]
    assert all(r["action"] == "create" and not r["outdated"] for r in new)
    assert [r["market"] for r in new if r["market"] == "spot"] == [
        "spot"
    ]  # (+ on-demand cover while it starts)
    table = run("plan", str(changed), "--state-dir", str(state_dir))
    assert "~ outdated" in table.output and "rolling update" in table.output

    # with only N READY (one not ready yet), nothing outdated is released
    state = load_state(state_dir, "echo")
    state.replicas["r-0003"].ready_at = None
    plan, _ = compute_plan(load_spec(changed), state, now=100.0)
    assert not [r for r in plan.replicas if r.action == "delete"]
    # the kept replicas keep their launch revision and port in the rendered inputs
    kept = {r.id: r for r in plan.replicas if r.action == "keep"}
    assert kept["r-0001"].revision == old_revision and kept["r-0001"].port == 18001
    assert all(
        r.revision == replica_revision(load_spec(changed)) for r in plan.replicas if r.action == "create"
    )


def test_replicas_from_before_revisions_are_not_rolled(tmp_path, write_spec):
    spec_path = write_spec(LOCAL)
    state_dir = tmp_path / "state"
    _converged(state_dir, None)  # a state written before revisions were recorded
    result = run("plan", str(spec_path), "--state-dir", str(state_dir), "--json", "--detailed-exitcode")
    assert result.exit_code == 0 and json.loads(result.output)["summary"]["outdated"] == 0


def test_replicas_from_before_revisions_keep_the_revision_of_their_first_apply(tmp_path, write_spec):
    """Rendered with the spec's revision of the day, a replica recorded before revisions took
    every later `run` change into the local module's replacement triggers: Terraform restarted
    all such replicas at once while the plan kept them (measured after an upgrade: 1,844 of 2,158
    requests failed). The first plan an apply or watcher records pins the revision it rendered,
    so the next change is a rolling update like any other."""
    from skyhedge.apply import record_plan
    from skyhedge.service import compute_plan, resolve_placement
    from skyhedge.spec import load_spec, replica_revision

    spec = load_spec(write_spec(LOCAL))
    state_dir = tmp_path / "state"
    _converged(state_dir, None)
    state = load_state(state_dir, "echo")
    plan, memory = compute_plan(spec, state, now=100.0)
    record_plan(state, plan, memory, resolve_placement(spec), 100.0)
    assert {r.id: r.revision for r in state.live()} == dict.fromkeys(
        ["r-0001", "r-0002", "r-0003"], replica_revision(spec)
    )

    changed = load_spec(
        write_spec(
            LOCAL.replace(
                "run: {command: python3 server.py}", "run: {command: python3 server.py, env: {A: '1'}}"
            )
        )
    )
    later, _ = compute_plan(changed, state, now=200.0)
    kept = {r.id: r for r in later.replicas if r.action == "keep"}
    assert kept and all(r.revision == replica_revision(spec) and r.outdated for r in kept.values())


def test_steady_state_counts_on_demand_replicas_that_stand_in_for_no_spot_replica(tmp_path):
    """The `ondemand` policy runs N on-demand replicas for good: its steady state is what it
    costs now, with no savings, not the spot-only cost of a fallback that will go away."""
    spec = REPO / "examples" / "llm-multicloud" / "service.yaml"
    result = CliRunner().invoke(
        main, ["plan", str(spec), "--state-dir", str(tmp_path / "st"), "--policy", "ondemand", "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["summary"]
    assert summary["spot"] == 0 and summary["on_demand"] == 3
    assert summary["steady_state_hourly_cost"] == summary["hourly_cost"] > 0
    assert summary["steady_state_savings_pct"] == 0.0


ONDEMAND_ONLY_ZONES = """
name: trainer
placement: {clouds: [aws], zones: [%s]}
resources: {instance_type: {aws: p3.2xlarge}}
replica_policy: {min_replicas: 2, policy: %s}
run: {command: python3 server.py}
"""


def test_ondemand_policy_runs_in_zones_that_sell_the_type_on_demand_only(tmp_path, write_spec):
    """use1-az3 and use1-az4 sell p3.2xlarge on-demand but not on spot (the catalog has no spot
    price there): the `ondemand` policy needs no spot, so the spec is not refused, and its
    replicas land there and render."""
    spec = write_spec(ONDEMAND_ONLY_ZONES % ("use1-az3, use1-az4", "ondemand"))
    result = run("plan", str(spec), "--state-dir", str(tmp_path / "st"), "--json")
    assert result.exit_code == 0, result.output
    replicas = json.loads(result.stdout)["replicas"]
    assert [(r["zone"], r["market"], r["price_per_hour"]) for r in replicas] == [
        ("use1-az3", "on-demand", 3.06),
        ("use1-az3", "on-demand", 3.06),
    ]
    result = run("render", str(spec), "--state-dir", str(tmp_path / "st"), "--out", str(tmp_path / "tf"))
    assert result.exit_code == 0, result.output
    tfvars = json.loads((tmp_path / "tf/aws/us-east-1/skyhedge.auto.tfvars.json").read_text())
    assert tfvars["replicas"] == {
        "r-0001": {"market": "on-demand", "zone": "use1-az3"},
        "r-0002": {"market": "on-demand", "zone": "use1-az3"},
    }


def test_a_spot_policy_where_no_zone_sells_spot_is_refused_naming_the_way_out(tmp_path, write_spec):
    spec = write_spec(ONDEMAND_ONLY_ZONES % ("use1-az3, use1-az4", "skyhedge"))
    result = run("plan", str(spec), "--state-dir", str(tmp_path / "st"))
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert "placement: no allowed zone sells the instance type on spot" in result.output
    assert "on-demand only, which replica_policy.policy 'ondemand' runs" in result.output
    assert not (tmp_path / "st").exists()
    # the policy chosen on the command line counts as the spec's would
    result = run("plan", str(spec), "--state-dir", str(tmp_path / "st"), "--policy", "ondemand", "--json")
    assert result.exit_code == 0, result.output
    assert {r["market"] for r in json.loads(result.stdout)["replicas"]} == {"on-demand"}


@pytest.mark.parametrize("policy", ["spothedge", "skyhedge", "even", "rr"])
def test_spot_replicas_never_go_to_a_zone_that_sells_on_demand_only(tmp_path, write_spec, policy):
    """With one spot zone (use1-az1) and one on-demand-only zone (use1-az3) allowed, every spot
    replica goes to use1-az1, the extra one included."""
    spec = write_spec(ONDEMAND_ONLY_ZONES % ("use1-az1, use1-az3", policy))
    result = run("plan", str(spec), "--state-dir", str(tmp_path / "st"), "--json")
    assert result.exit_code == 0, result.output
    replicas = json.loads(result.stdout)["replicas"]
    spot = [r["zone"] for r in replicas if r["market"] == "spot"]
    assert spot and set(spot) == {"use1-az1"}


def test_a_replica_in_a_zone_the_spec_no_longer_allows_is_priced_until_it_moves(tmp_path, write_spec):
    """Dropping a zone from the placement moves its replicas one at a time; until then they bill,
    so the plan prices them from the catalog rather than at 0."""
    spec = write_spec(ONDEMAND_ONLY_ZONES % ("use1-az1, use1-az2", "spothedge"))
    state_dir = tmp_path / "state"
    save_ready_spot(state_dir, "trainer", "aws", "us-east-1", ["use1-az1", "use1-az5"])
    result = run("plan", str(spec), "--state-dir", str(state_dir), "--json")
    assert result.exit_code == 0, result.output
    moved = next(r for r in json.loads(result.output)["replicas"] if r["id"] == "r-0002")
    assert moved["zone"] == "use1-az5" and moved["action"] == "keep"
    assert moved["price_per_hour"] == 0.7031  # p3.2xlarge spot in use1-az5, bundled catalog


def test_a_spot_replica_in_a_zone_that_stopped_selling_spot_is_moved_not_kept(tmp_path, monkeypatch):
    """After a catalog refresh a zone may sell the type on-demand only: a spot replica there is
    outside the placement (outdated, moved one at a time), and the spot replica in a zone that
    still sells spot is kept."""
    from skyhedge.catalog import bundled_path, clear_cache

    catalog = json.loads(bundled_path("local").read_text())
    for offer in catalog["offers"]:
        if offer["zone"] == "local-a":
            offer["spot_price"] = None
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "local.json").write_text(json.dumps(catalog))
    monkeypatch.setenv("SKYHEDGE_CATALOG_DIR", str(tmp_path / "cat"))
    clear_cache()
    spec = tmp_path / "svc.yaml"
    spec.write_text(LOCAL.replace("min_replicas: 2, policy: spothedge", "min_replicas: 2, policy: skyhedge"))
    state_dir = tmp_path / "state"
    save_ready_spot(state_dir, "echo", "local", "local", ["local-a", "local-b"])
    try:
        result = run("plan", str(spec), "--state-dir", str(state_dir), "--json")
    finally:
        clear_cache()
    assert result.exit_code == 0, result.output
    replicas = {r["id"]: r for r in json.loads(result.output)["replicas"]}
    assert replicas["r-0001"]["outdated"] is True  # spot where only on-demand is sold now
    assert replicas["r-0002"]["action"] == "keep" and replicas["r-0002"]["outdated"] is False
    assert all(
        r["zone"] != "local-a" for r in replicas.values() if r["market"] == "spot" and r["action"] == "create"
    )


AWS_SUBNETS = """
name: llm
placement: {clouds: [aws], regions: [us-east-1]}
resources: {instance_type: {aws: g6.xlarge}}
replica_policy: {min_replicas: 1, num_overprovision: 0, policy: spothedge}
run: {command: serve}
aws: {subnets: {%s}%s}
"""


def test_dropping_the_subnet_of_a_zone_replicas_still_run_in_is_refused_with_the_way_out(
    tmp_path, write_spec
):
    """Terraform evaluates every replica's subnet, the ones being moved or destroyed too: a zone's
    subnet removed under running replicas would fail each apply and destroy of that region."""
    from skyhedge.apply import destroy_service
    from skyhedge.spec import load_spec

    spec = write_spec(AWS_SUBNETS % ("use1-az2: subnet-0123abcd", ""))
    save_ready_spot(tmp_path / "st", "llm", "aws", "us-east-1", ["use1-az1"])
    result = run("plan", str(spec), "--state-dir", str(tmp_path / "st"))
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "aws.subnets: no subnet for use1-az1, where r-0001 still run: keep its subnet" in result.output
    with pytest.raises(SpecError, match="no subnet for use1-az1"):
        destroy_service(load_spec(spec), tmp_path / "st", route=False)
    # the order that works: subnet kept, zone excluded; the replica is moved
    moving = write_spec(
        AWS_SUBNETS.replace("regions: [us-east-1]", "regions: [us-east-1], exclude_zones: [use1-az1]")
        % ("use1-az1: subnet-0aaaaaaa, use1-az2: subnet-0123abcd", ""),
        name="moving.yaml",
    )
    result = run("plan", str(moving), "--state-dir", str(tmp_path / "st"), "--json")
    assert result.exit_code == 0, result.output
    planned = {r["id"]: r for r in json.loads(result.output)["replicas"]}
    assert planned["r-0001"]["outdated"] is True and any(r["zone"] == "use1-az2" for r in planned.values())


def test_a_new_key_pair_rolls_the_replicas_over(tmp_path, write_spec):
    """Terraform would replace every instance at once for a new key pair: the key is part of the
    replicas' revision, so they roll over one at a time (the module ignores the change in place)."""
    from skyhedge.spec import load_spec, replica_revision

    plain = load_spec(write_spec(AWS_SUBNETS % ("use1-az1: subnet-0123abcd", "")))
    keyed = load_spec(
        write_spec(AWS_SUBNETS % ("use1-az1: subnet-0123abcd", ", key_name: ops"), name="k.yaml")
    )
    other = load_spec(
        write_spec(AWS_SUBNETS % ("use1-az1: subnet-0123abcd", ", key_name: other"), name="o.yaml")
    )
    no_aws = load_spec(write_spec(AWS_SUBNETS.replace("aws: {subnets: {%s}%s}\n", ""), name="n.yaml"))
    assert replica_revision(plain) == replica_revision(no_aws)  # no key: the digest as before
    assert len({replica_revision(plain), replica_revision(keyed), replica_revision(other)}) == 3


GCP_NETWORK = """
name: llm
placement: {clouds: [gcp], regions: [us-east4]}
resources: {instance_type: {gcp: g2-standard-4}}
replica_policy: {min_replicas: 1, num_overprovision: 0, policy: spothedge}
run: {command: serve}
gcp: {network: %s}
"""


def test_a_new_gcp_network_under_running_replicas_is_refused_with_the_way_out(tmp_path, write_spec):
    """The firewall rule opening the replicas' port belongs to one network: moving it to a new one
    would cut the router off from the replicas still running in the old one."""
    save_ready_spot(tmp_path / "st", "llm", "gcp", "us-east4", ["us-east4-a"])
    state = load_state(tmp_path / "st", "llm")
    state.replicas["r-0001"].outputs = {
        "network": "https://www.googleapis.com/compute/v1/projects/p-123456/global/networks/default"
    }
    save_state(tmp_path / "st", state)
    moved = write_spec(GCP_NETWORK % "prod")
    result = run("plan", str(moved), "--state-dir", str(tmp_path / "st"))
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "gcp.network: r-0001 run in network default, not prod" in result.output
    assert "keep gcp.network default until they are gone" in result.output
    same = write_spec(GCP_NETWORK % "projects/p-123456/global/networks/default", name="same.yaml")
    assert run("plan", str(same), "--state-dir", str(tmp_path / "st")).exit_code == 0


# `plan --json` marks the replicas (and roots) a failed or interrupted apply left undone
# (README, "plan --json"): the documented shape above, extended, never renamed.
_REPLICA_SCHEMA = PLAN_SCHEMA["properties"]["replicas"]["items"]
_REPLICA_SCHEMA["required"] += ["pending", "releasing"]
_REPLICA_SCHEMA["properties"]["pending"] = {"type": "boolean"}
_REPLICA_SCHEMA["properties"]["releasing"] = {"type": "boolean"}
PLAN_SCHEMA["required"].append("pending_roots")
PLAN_SCHEMA["properties"]["pending_roots"] = {
    "type": "array",
    "items": {"type": "string", "pattern": "^[^/]+/[^/]+$"},
}
PLAN_SCHEMA["properties"]["summary"]["required"] += ["pending", "releasing"]
PLAN_SCHEMA["properties"]["summary"]["properties"]["pending"] = {"type": "integer", "minimum": 0}
PLAN_SCHEMA["properties"]["summary"]["properties"]["releasing"] = {"type": "integer", "minimum": 0}


def test_a_recorded_replica_never_created_is_pending_not_kept(tmp_path, write_spec):
    """A replica recorded by an apply that failed before creating it (no cloud ID, never
    provisioned) is still to be created: `plan` says so, and --detailed-exitcode exits 2."""
    spec = write_spec(LOCAL)
    state_dir = tmp_path / "state"
    _converged(state_dir, None)
    state = load_state(state_dir, "echo")
    state.replicas["r-0002"].provisioned_at = state.replicas["r-0002"].ready_at = None
    state.replicas["r-0002"].endpoint = None
    save_state(state_dir, state)
    result = run("plan", str(spec), "--state-dir", str(state_dir), "--json", "--detailed-exitcode")
    assert result.exit_code == 2, result.output
    data = json.loads(result.output)
    jsonschema.validate(data, PLAN_SCHEMA)
    kept = [r for r in data["replicas"] if r["action"] == "keep"]
    assert {r["id"]: r["pending"] for r in kept} == {
        "r-0001": False,
        "r-0002": True,
        "r-0003": False,
    }
    assert not any(r["pending"] for r in data["replicas"] if r["action"] == "create")
    assert data["summary"]["pending"] == 1 and data["pending_roots"] == []
    table = run("plan", str(spec), "--state-dir", str(state_dir)).output
    assert "+ create (pending)" in table and "1 of them pending creation" in table


def _ready_pair(tmp_path: Path, write_spec) -> tuple[Path, ServiceState]:
    """A one-replica spothedge service with READY spot replicas recorded in local-a and local-b
    (state dir `tmp_path / "st"`): the spec's path and the state, to mark up and save."""
    spec = write_spec(
        "name: svc\nplacement: {clouds: [local], zones: [local-a, local-b]}\n"
        "replica_policy: {min_replicas: 1, num_overprovision: 0, policy: spothedge}\nrun: {command: serve}\n"
    )
    save_ready_spot(tmp_path / "st", "svc", "local", "local", ["local-a", "local-b"])
    return spec, load_state(tmp_path / "st", "svc")


def test_a_replica_a_watcher_is_releasing_is_a_pending_delete(tmp_path, write_spec, monkeypatch):
    """Out of the router, running until its requests end (up to read_timeout): `plan` must not
    call it kept, and `--detailed-exitcode` says a change is still to come."""
    from skyhedge.spec import load_spec

    # the records stand for running processes this test does not start
    monkeypatch.setattr("skyhedge.cli.plan.notice_gone_replicas", lambda *args: ([], []))

    spec, state = _ready_pair(tmp_path, write_spec)
    state.replicas["r-0002"].draining = True
    state.replicas["r-0002"].cloud_id = state.replicas["r-0001"].cloud_id = "id"
    save_state(tmp_path / "st", state)
    assert load_spec(spec).name == "svc"
    data = json.loads(run("plan", str(spec), "--state-dir", str(tmp_path / "st"), "--json").output)
    jsonschema.validate(data, PLAN_SCHEMA)
    releasing = {r["id"]: r["releasing"] for r in data["replicas"]}
    assert releasing == {"r-0001": False, "r-0002": True} and data["summary"]["releasing"] == 1
    table = run("plan", str(spec), "--state-dir", str(tmp_path / "st"), "--detailed-exitcode")
    assert table.exit_code == 2
    assert "- delete (draining)" in table.output and "1 replica(s) being released (r-0002)" in table.output


def test_plan_sees_a_dead_local_replica_as_apply_does(tmp_path, write_spec):
    """`apply` first records local replicas whose process died (no pid file, or one that exited)
    as gone; `plan` must show the same, not "keep" (and --detailed-exitcode 0) for them."""
    spec = write_spec(
        "name: svc\nplacement: {clouds: [local], zones: [local-a, local-b]}\n"
        "replica_policy: {min_replicas: 1, num_overprovision: 0, policy: spothedge}\n"
        "run: {command: serve}\n"
    )
    save_ready_spot(tmp_path / "st", "svc", "local", "local", ["local-a"])
    state = load_state(tmp_path / "st", "svc")
    state.replicas["r-0001"].cloud_id = "id"  # launched by Terraform; no process runs
    save_state(tmp_path / "st", state)
    result = run("plan", str(spec), "--state-dir", str(tmp_path / "st"), "--detailed-exitcode")
    assert result.exit_code == 2, result.output
    assert "gone r-0001" in result.output
    # --json says so too (found by an audit: it showed the replacement with no sign of r-0001)
    shown = json.loads(run("plan", str(spec), "--state-dir", str(tmp_path / "st"), "--json").output)
    assert shown["gone"] == [
        {
            "id": "r-0001",
            "cloud": "local",
            "region": "local",
            "zone": "local-a",
            "market": "spot",
            "reason": "failed",
        }
    ]
    assert {r["action"] for r in shown["replicas"]} == {"create"}  # its replacement (and cover)
    assert "r-0001" not in {r["id"] for r in shown["replicas"]}
    assert load_state(tmp_path / "st", "svc").replicas["r-0001"].gone_at is None  # plan writes nothing


def test_fresh_local_ids_skip_ports_another_process_holds(tmp_path, write_spec):
    """A local replica listens on local_base_port + its number: a port some other process holds
    (a dev server, a stray replica) would fail that replica's launch until its ID was given up,
    so the plan hands out the next free numbers instead."""
    import socket

    from local_support import free_base_port

    base = free_base_port(12)
    held = []
    try:
        for number in (1, 3):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", base + number))
            sock.listen()
            held.append(sock)
        spec = write_spec(
            "name: svc\nplacement: {clouds: [local], zones: [local-a, local-b]}\n"
            f"resources: {{local_base_port: {base}}}\n"
            "replica_policy: {min_replicas: 2, num_overprovision: 0, policy: spothedge}\n"
            "run: {command: serve}\n"
        )
        result = run("plan", str(spec), "--state-dir", str(tmp_path / "st"), "--json")
        assert result.exit_code == 0, result.output
        created = sorted(r["id"] for r in json.loads(result.output)["replicas"] if r["action"] == "create")
        assert created and not {"r-0001", "r-0003"} & set(created)
        assert created[0] == "r-0002"
        # `render` does not look: the same spec and state give the same tree on any machine
        out = tmp_path / "tree"
        rendered = run("render", str(spec), "--state-dir", str(tmp_path / "st"), "--out", str(out))
        assert rendered.exit_code == 0, rendered.output
        tfvars = json.loads((out / "local" / "local" / "skyhedge.auto.tfvars.json").read_text())
        assert "r-0001" in tfvars["replicas"]
    finally:
        for sock in held:
            sock.close()


def test_apply_asks_with_the_pending_and_releasing_replicas_marked_as_plan_shows_them(
    tmp_path, write_spec, monkeypatch
):
    """`apply`'s confirmation showed "keep" for a replica a failed apply never created (Terraform
    creates it) and for one its cloud warned of an interruption, where `plan` says `+ create
    (pending)` and `- delete (draining)`."""
    # the records stand for running processes this test does not start
    monkeypatch.setattr("skyhedge.apply.notice_dead_local_replicas", lambda *args: [])
    monkeypatch.setattr("skyhedge.apply.notice_gone_replicas", lambda *args: ([], []))
    monkeypatch.setattr("skyhedge.cli.plan.notice_gone_replicas", lambda *args: ([], []))
    spec, state = _ready_pair(tmp_path, write_spec)
    state.replicas["r-0001"].draining = True  # warned of its interruption: apply keeps the mark
    state.replicas["r-0001"].cloud_id = "id"
    state.extra["warned"] = {"r-0001": 0.0}
    state.replicas["r-0002"].provisioned_at = state.replicas["r-0002"].ready_at = None
    state.replicas["r-0002"].endpoint = None
    save_state(tmp_path / "st", state)
    args = (str(spec), "--state-dir", str(tmp_path / "st"), "--no-routing", "--no-wait")
    asked = CliRunner().invoke(main, ["apply", *args], input="n\n")
    assert asked.exit_code == 1 and "Apply cancelled" in asked.output, asked.output
    planned = run("plan", str(spec), "--state-dir", str(tmp_path / "st"))
    for shown in (asked.output, planned.output):
        assert "+ create (pending)" in shown and "- delete (draining)" in shown, shown
        assert "  keep " not in shown, shown


# -- the rolling update's release rule (`service._next_to_retire`) ------------------------------


def _rolling(tmp_path: Path, write_spec, replicas: dict[str, dict]) -> list[str]:
    """The IDs `compute_plan` deletes for the `LOCAL` service (N = 2, spothedge) after its `run`
    changed, given spot replicas r-0001 onwards (zones local-a, -b, -c in turn), each READY since
    t=20 and launched at its number unless `replicas[id]` says otherwise (`outdated`: launched
    under the old `run`; other keys are `ReplicaRecord` fields)."""
    from skyhedge.service import compute_plan
    from skyhedge.spec import load_spec, replica_revision

    old = replica_revision(load_spec(write_spec(LOCAL, "old.yaml")))
    spec = load_spec(write_spec(LOCAL.replace("python3 server.py", "python3 server.py --v2"), "new.yaml"))
    state = ServiceState(service="echo", next_id=len(replicas) + 1)
    for i, (rid, fields) in enumerate(replicas.items(), start=1):
        fields = dict(fields)
        revision = old if fields.pop("outdated", False) else replica_revision(spec)
        record = {"launched_at": float(i), "provisioned_at": 10.0, "ready_at": 20.0, **fields}
        zone = ["local-a", "local-b", "local-c"][(i - 1) % 3]
        state.replicas[rid] = ReplicaRecord(rid, "local", "local", zone, "spot", revision=revision, **record)
    plan, _ = compute_plan(spec, state, now=100.0, probe_ports=False)
    return sorted(r.id for r in plan.replicas if r.action == "delete")


def test_a_rolling_update_releases_an_outdated_replica_that_is_not_ready_before_serving_ones(
    tmp_path, write_spec
):
    """It serves nothing: releasing it first keeps every READY one serving (the oldest outdated
    READY replica goes in a later pass)."""
    outdated = {"outdated": True}
    replicas = {f"r-000{i}": outdated for i in range(1, 4)}
    replicas["r-0004"] = {"outdated": True, "ready_at": None}
    assert _rolling(tmp_path, write_spec, replicas) == ["r-0004"]


def test_a_rolling_update_releases_one_outdated_replica_per_pass_even_when_the_policy_releases_one(
    tmp_path, write_spec
):
    """Five READY outdated spot replicas against N + surge + extra = 4: the policy releases one
    (the newest); that is this pass's release, however many READY replicas would remain."""
    replicas = {f"r-000{i}": {"outdated": True} for i in range(1, 6)}
    assert _rolling(tmp_path, write_spec, replicas) == ["r-0005"]


def test_a_rolling_update_never_counts_a_replica_being_released_as_ready(tmp_path, write_spec):
    """Two current replicas READY, one of them draining: only one still serves after the drain,
    so the outdated replica stays until a replacement is READY (releasing it left one of N = 2)."""
    replicas = {"r-0001": {"outdated": True}, "r-0002": {}, "r-0003": {"draining": True}}
    assert _rolling(tmp_path, write_spec, replicas) == []


def test_a_rolling_update_never_deletes_an_outdated_replica_that_is_already_draining(tmp_path, write_spec):
    """Draining, it runs until its requests end (deleting it now would cut them off); the next
    outdated replica is the one released while more than N READY replicas remain."""
    replicas = {"r-0001": {"outdated": True, "draining": True}, "r-0002": {"outdated": True}, "r-0003": {}}
    replicas["r-0004"] = replicas["r-0005"] = {}
    assert _rolling(tmp_path, write_spec, replicas) == ["r-0002"]


def test_a_rolling_update_releases_no_ready_replica_before_its_replacement_is_ready(tmp_path, write_spec):
    """N = 2 plus the policy's extra: three READY outdated replicas and the surge, launched under
    the new `run`, not READY yet. Releasing one against N alone (3 READY > 2) dropped the extra
    before anything replaced it, and a new revision whose replicas never get READY (a bad command)
    released outdated ones down to N and kept the service there (measured through `skyhedge up`:
    5 READY -> 2 within 3 s). Now they stay until the surge is READY, then go one at a time."""
    replicas = {f"r-000{i}": {"outdated": True} for i in range(1, 4)}
    replicas["r-0004"] = {"ready_at": None, "launched_at": 50.0}
    assert _rolling(tmp_path, write_spec, replicas) == []
    replicas["r-0004"] = {"launched_at": 50.0}  # the surge READY: the oldest goes
    assert _rolling(tmp_path, write_spec, replicas) == ["r-0001"]


AUTOSCALED = LOCAL.replace(
    "{min_replicas: 2, policy: spothedge}",
    "{min_replicas: 3, max_replicas: 6, target_qps_per_replica: 5, policy: spothedge}",
)


@pytest.mark.parametrize(
    ("spec_text", "autoscaled_to", "target"),
    [
        (AUTOSCALED, 1, 3),  # min_replicas raised above the autoscaler's last word: the floor holds
        (AUTOSCALED, 9, 6),  # max_replicas lowered below it: the ceiling holds
        (AUTOSCALED, 4, 4),  # within the bounds: the autoscaler's word
        (LOCAL, 4, 2),  # autoscaling turned off: min_replicas, not the last autoscaled size
    ],
)
def test_plan_targets_the_autoscalers_last_word_within_the_specs_bounds(
    tmp_path, write_spec, spec_text, autoscaled_to, target
):
    spec = write_spec(spec_text)
    save_state(tmp_path / "st", ServiceState(service="echo", target=autoscaled_to))
    result = run("plan", str(spec), "--state-dir", str(tmp_path / "st"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["target"] == target
