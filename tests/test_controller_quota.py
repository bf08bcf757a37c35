"""At a quota: an account's quota used up in one region (a new AWS account's spot quota of 0,
a GCP project's PREEMPTIBLE_NVIDIA_L4_GPUS limit of 0) refuses every launch of its market there
until a person raises it. The watcher treats the whole region as refused after one answer, says
so once with the quota's name and where to raise it (the log, `status`, `status --json`), asks
again on the drought's schedule (30 s doubling to 5 min), and takes a raised quota at the next
ask. Over the controller fakes, on a fake clock, passes paced as the watcher paces them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from controller_fakes import TWO_REGION_SPEC, Clock, FakeExecutor, clocked_controller, reconfigured, run_for

from skyhedge.clouds import quota_refusal
from skyhedge.controller.loop import SPOT_RETRY_MAX_SECONDS, Controller
from skyhedge.planner import CREATE, Plan
from skyhedge.policy.types import ReplicaStatus
from skyhedge.spec import load_spec
from skyhedge.state import ServiceState

SPEC = TWO_REGION_SPEC  # (us-west-2: the region whose quota is used up)
BLOCKED = "us-west-2"
SPOT_QUOTA = "'All G and VT Spot Instance Requests'"


class Recording(FakeExecutor):
    """A fake Terraform that also records every launch it is asked for: (when, region, market)."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: list[tuple[float, str, str]] = []

    def apply(self, state: ServiceState, plan: Plan, now: float):  # type: ignore[override]
        for r in plan.replicas:
            if r.action == CREATE:
                self.launches.append((now, r.location.region, r.market.value))
        return super().apply(state, plan, now)

    def asked(self, region: str, market: str, since: float = 0.0) -> list[float]:
        return [at for at, reg, m in self.launches if (reg, m) == (region, market) and at >= since]


def _controller(
    tmp_path: Path, write_spec, policy: str = "", quota=None
) -> tuple[Controller, Clock, Recording]:
    clock, ex = Clock(), Recording()
    ex.quota = dict(quota if quota is not None else {(BLOCKED, "spot"): 0})
    spec = load_spec(write_spec(SPEC % policy))
    return clocked_controller(spec, tmp_path / "state", clock, executor=ex), clock, ex


def ready(ctl: Controller) -> list[str]:
    return [r.id for r in ctl.state.live() if r.fact().status is ReplicaStatus.READY]


def said(caplog: pytest.LogCaptureFixture, word: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if word in r.getMessage()]


@pytest.mark.parametrize("policy", ["", ", policy: even", ", policy: single-region"])
def test_a_regions_spot_quota_is_asked_on_the_droughts_schedule_not_at_every_apply(
    tmp_path: Path, write_spec, policy: str
):
    """Measured before, spot quota 0 in us-west-2 for an hour: a spot-only policy that keeps
    placing there (`even`: 129 refused launches in 64 applies; `single-region`: 193 in 64) asked
    at every apply after the 1 s-to-60 s backoff, the quota read as a zone's stock-out; the
    default policy moved to us-east-1 after its first apply (3 refused) and still does."""
    ctl, clock, ex = _controller(tmp_path, write_spec, policy)
    run_for(ctl, clock, 3600)
    asks = sorted(set(ex.asked(BLOCKED, "spot")))
    gaps = [later - earlier for earlier, later in zip(asks, asks[1:], strict=False)]
    assert len(asks) <= 16, asks  # one ask per pause: 30, 60, 120, 240, then every 300 s
    assert all(g >= 30.0 - 1e-6 for g in gaps), gaps
    assert len(ex.asked(BLOCKED, "spot")) <= 4 * 16  # (N + 1 launches an ask, at most)


def test_the_quota_is_said_once_naming_it_the_region_and_where_to_raise_it(
    tmp_path: Path, write_spec, caplog: pytest.LogCaptureFixture
):
    """Before: "launch of r-0001 refused in usw2-az2: no spot capacity, re-planning", a line per
    replica and zone at every refused apply, "quota" never said (0 lines of 334 in an hour)."""
    caplog.set_level(logging.INFO)
    ctl, clock, ex = _controller(tmp_path, write_spec, ", policy: even")
    run_for(ctl, clock, 3600)
    assert len(ex.asked(BLOCKED, "spot")) > 3  # asked again and again: said once all the same
    lines = said(caplog, "quota")
    assert len(lines) == 1, lines
    line = lines[0]
    assert SPOT_QUOTA in line and BLOCKED in line and "Service Quotas" in line, line
    assert "\n" not in line
    assert said(caplog, "no spot capacity") == []
    assert [r.levelno for r in caplog.records if "quota" in r.getMessage()] == [logging.WARNING]


def test_status_and_status_json_name_the_quota_until_a_launch_there_succeeds(tmp_path: Path, write_spec):
    from click.testing import CliRunner

    from skyhedge.cli import main

    ctl, clock, ex = _controller(tmp_path, write_spec, ", policy: even")  # (it keeps asking there)
    run_for(ctl, clock, 20)
    ctl.flush()
    spec = tmp_path / "service.yaml"
    args = ["status", str(spec), "--state-dir", str(ctl.state_dir)]
    out = CliRunner().invoke(main, [*args, "--json"])
    assert out.exit_code == 0, out.output
    (entry,) = json.loads(out.output)["quota"]
    assert {k: entry[k] for k in ("cloud", "region", "market", "refusals")} == {
        "cloud": "aws",
        "region": BLOCKED,
        "market": "spot",
        "refusals": 1,
    }
    assert SPOT_QUOTA in entry["reason"] and entry["next_at"] == entry["at"] + 30.0
    text = CliRunner().invoke(main, args, env={"COLUMNS": "200"})
    assert text.exit_code == 0
    (line,) = [ln for ln in text.output.splitlines() if ln.startswith("Quota: ")]
    assert SPOT_QUOTA in line and "Service Quotas" in line and "no watcher runs" in line, line
    # a quota raised: the next launch there succeeds and the entry goes
    ex.quota = {}
    run_for(ctl, clock, SPOT_RETRY_MAX_SECONDS + 10)
    ctl.flush()
    out = CliRunner().invoke(main, [*args, "--json"])
    assert json.loads(out.output)["quota"] is None


def test_a_raised_quota_is_taken_within_the_longest_pause(tmp_path: Path, write_spec, caplog):
    caplog.set_level(logging.INFO)
    ctl, clock, ex = _controller(tmp_path, write_spec, ", policy: even")
    run_for(ctl, clock, 3600)
    assert len(ready(ctl)) < 3  # `even` keeps its replicas in us-west-2: short all along
    ex.quota = {}
    raised = clock()
    run_for(ctl, clock, SPOT_RETRY_MAX_SECONDS + 10)
    first = ex.asked(BLOCKED, "spot", since=raised)
    assert first and first[0] - raised <= SPOT_RETRY_MAX_SECONDS + 1.0
    assert len(ready(ctl)) >= 3
    assert ctl._quota == {} and said(caplog, "quota raised")


def test_an_on_demand_quota_is_paced_and_not_called_a_spot_stock_out(
    tmp_path: Path, write_spec, caplog: pytest.LogCaptureFixture
):
    """Before, on-demand quota 0 in us-west-2: the policy's on-demand cover there was refused in
    8 applies (24 launches) in the first 3 minutes, each logged "no spot capacity"."""
    caplog.set_level(logging.INFO)
    ctl, clock, ex = _controller(tmp_path, write_spec, quota={(BLOCKED, "on-demand"): 0})
    run_for(ctl, clock, 3600)
    assert len(ready(ctl)) >= 3
    assert len(set(ex.asked(BLOCKED, "on-demand"))) <= 4  # was 8
    assert said(caplog, "no spot capacity") == []
    (line,) = said(caplog, "quota")
    assert "'Running On-Demand G and VT instances'" in line and BLOCKED in line


def test_a_quota_that_lets_one_replica_run_keeps_it_and_asks_for_more_once_a_pause(
    tmp_path: Path, write_spec
):
    ctl, clock, ex = _controller(tmp_path, write_spec, ", policy: even", quota={(BLOCKED, "spot"): 1})
    run_for(ctl, clock, 600)
    running = [r for r in ctl.state.live() if r.region == BLOCKED and r.provisioned_at is not None]
    assert len(running) <= 1
    asks = sorted(set(ex.asked(BLOCKED, "spot")))
    assert len(asks) <= 5, asks  # at 0, 30, 90, 210 and 450 s (was every apply: 14 in 10 min)


def test_a_restarted_watcher_keeps_the_quota_and_its_pause(tmp_path: Path, write_spec):
    ctl, clock, ex = _controller(tmp_path, write_spec, ", policy: even")
    run_for(ctl, clock, 3600)
    kept = json.loads(json.dumps(ctl._quota))
    last = max(ex.asked(BLOCKED, "spot"))
    ctl.flush()
    restart = clock()
    ctl = clocked_controller(ctl.spec, ctl.state_dir, clock, executor=ex, sources=ctl.sources)
    assert ctl._quota == kept
    run_for(ctl, clock, 60)
    assert all(at >= last + SPOT_RETRY_MAX_SECONDS - 1.0 for at in ex.asked(BLOCKED, "spot", since=restart))


def test_a_broken_quota_table_in_the_state_is_refused_in_one_line(tmp_path: Path):
    from skyhedge.errors import StateError
    from skyhedge.state import QUOTA_KEY, load_state, save_state

    state = load_state(tmp_path, "svc")
    state.extra[QUOTA_KEY] = {
        "aws/us-west-2/spot": {"reason": "x", "refusals": 0, "since": 1, "at": 1, "next_at": 1}
    }
    save_state(tmp_path, state)
    with pytest.raises(StateError) as exc:
        load_state(tmp_path, "svc")
    assert f"extra.{QUOTA_KEY}" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("cloud", "text", "market", "scope", "words"),
    [
        ("aws", "api error MaxSpotInstanceCountExceeded: Max spot instance count exceeded", "spot", "region",
         [SPOT_QUOTA, "us-west-2", "Service Quotas"]),
        ("aws", "api error VcpuLimitExceeded: You have requested more vCPU capacity", "on-demand", "region",
         ["'Running On-Demand G and VT instances'", "us-west-2"]),
        ("gcp", "Quota 'PREEMPTIBLE_NVIDIA_L4_GPUS' exceeded. Limit: 0.0 in region us-central1.", "spot",
         "region", ["PREEMPTIBLE_NVIDIA_L4_GPUS", "us-central1", "iam-admin/quotas"]),
        ("gcp", "Quota 'GPUS_ALL_REGIONS' exceeded. Limit: 0.0 globally.", "spot", "cloud",
         ["GPUS_ALL_REGIONS", "every region"]),
    ],
)  # fmt: skip
def test_each_cloud_names_its_quota_and_where_to_raise_it(cloud, text, market, scope, words):
    region = "us-west-2" if cloud == "aws" else "us-central1"
    found = quota_refusal(cloud, text, region=region, market=market, instance_type="g5.xlarge")
    assert found is not None and found.scope == scope
    assert all(w in found.reason for w in words), found.reason


@pytest.mark.parametrize(
    ("cloud", "text"),
    [
        ("aws", "api error InsufficientInstanceCapacity: We currently do not have sufficient capacity"),
        ("gcp", "ZONE_RESOURCE_POOL_EXHAUSTED: The zone does not have enough resources available"),
        ("local", "InsufficientCapacity: no spot capacity in local zone local-a for r-0001"),
    ],
)
def test_a_zones_stock_out_is_no_quota(cloud, text):
    assert quota_refusal(cloud, text, region="r", market="spot") is None


def test_terraforms_quota_error_reaches_the_watcher_as_the_quota_not_a_stock_out():
    """The real executor's path: Terraform's diagnostic for a replica, read by `absorb_result`
    (the one `apply` and `watch` share), carries the cloud's reading of it; a stock-out none."""
    from skyhedge.apply import absorb_result
    from skyhedge.engine import ApplyResult, Diagnostic
    from skyhedge.render.tree import RenderedRoot
    from skyhedge.state import ReplicaRecord

    state = ServiceState(service="svc")
    for rid, zone in (("r-0001", "usw2-az1"), ("r-0002", "usw2-az2")):
        state.replicas[rid] = ReplicaRecord(rid, "aws", BLOCKED, zone, "spot", 1.0, instance_type="g5.xlarge")
    address = 'module.replicas.aws_instance.replica["{}"]'
    errors = (
        Diagnostic("error", "creating EC2 Instance", "api error MaxSpotInstanceCountExceeded: Max spot "
                   "instance count exceeded", address.format("r-0001")),
        Diagnostic("error", "creating EC2 Instance", "api error InsufficientInstanceCapacity: no g5",
                   address.format("r-0002")),
    )  # fmt: skip
    root = RenderedRoot("aws", BLOCKED, "aws", ("r-0001", "r-0002"), (), "digest")
    failures = absorb_result(state, root, ApplyResult(root.path, 1, errors=errors), 2.0, revision="rev")
    by_id = {f.replica_id: f for f in failures}
    assert set(by_id) == {"r-0001", "r-0002"}
    quota = by_id["r-0001"].quota
    assert quota is not None and SPOT_QUOTA in quota.reason and quota.scope == "region"
    assert by_id["r-0002"].quota is None


@pytest.mark.parametrize(
    ("instance_type", "spot", "on_demand"),
    [
        ("p3.2xlarge", "All P4, P3 and P2 Spot Instance Requests", "Running On-Demand P instances"),
        ("p4d.24xlarge", "All P4, P3 and P2 Spot Instance Requests", "Running On-Demand P instances"),
        ("p5.48xlarge", "All P5 Spot Instance Requests", "Running On-Demand P instances"),
        ("g6e.xlarge", "All G and VT Spot Instance Requests", "Running On-Demand G and VT instances"),
    ],
)
def test_aws_names_the_p_familys_spot_quota_by_its_generation(instance_type, spot, on_demand):
    """EC2 has no "All P Spot Instance Requests": P2 to P4 spot count against "All P4, P3 and P2
    Spot Instance Requests", P5 against "All P5 Spot Instance Requests" (their on-demand quota is
    one). Before, p3, p4d and p5 (the catalog's P types) were all told to raise the first, which
    the Service Quotas console does not list."""
    said = "api error MaxSpotInstanceCountExceeded: Max spot instance count exceeded"
    found = quota_refusal("aws", said, region="us-east-1", market="spot", instance_type=instance_type)
    assert found is not None and f"'{spot}'" in found.reason, found
    said = "api error VcpuLimitExceeded: You have requested more vCPU capacity"
    found = quota_refusal("aws", said, region="us-east-1", market="on-demand", instance_type=instance_type)
    assert found is not None and f"'{on_demand}'" in found.reason, found


def test_a_reload_that_leaves_the_quotas_region_or_instance_type_forgets_the_quota(
    tmp_path: Path, write_spec, caplog: pytest.LogCaptureFixture
):
    """Before, the entry outlived the region: no launch was asked there any more, so none could
    succeed to lift it, and `status` named the quota ("asked again at" a time past) for good."""
    from skyhedge.state import QUOTA_KEY

    caplog.set_level(logging.INFO)
    ctl, clock, _ = _controller(tmp_path, write_spec, ", policy: even")
    run_for(ctl, clock, 20)
    assert set(ctl._quota) == {f"aws/{BLOCKED}/spot"}
    reconfigured(ctl, load_spec(write_spec(SPEC.replace("usw2-az3", "use1-az6") % ", policy: even")))
    assert set(ctl._quota) == {f"aws/{BLOCKED}/spot"}  # still placed there: kept
    reconfigured(
        ctl, load_spec(write_spec(SPEC.replace(", usw2-az1, usw2-az2, usw2-az3", "") % ", policy: even"))
    )
    assert ctl._quota == {} and QUOTA_KEY not in ctl.state.extra
    assert said(caplog, f"aws/{BLOCKED}/spot no longer followed: the spec no longer places")

    (tmp_path / "again").mkdir()
    ctl, clock, _ = _controller(tmp_path / "again", write_spec, ", policy: even")
    run_for(ctl, clock, 20)
    assert set(ctl._quota) == {f"aws/{BLOCKED}/spot"}
    reconfigured(ctl, load_spec(write_spec(SPEC.replace("g5.xlarge", "p4d.24xlarge") % ", policy: even")))
    assert ctl._quota == {}  # another machine, another quota: asked for, not paused


def test_a_restarted_watcher_forgets_the_quotas_of_places_its_spec_no_longer_has(tmp_path: Path, write_spec):
    from skyhedge.state import QUOTA_KEY, load_state, save_state

    entry = {"reason": "x", "since": 1.0, "refusals": 2, "at": 1.0, "next_at": 61.0}
    state = load_state(tmp_path / "state", "svc")
    state.extra[QUOTA_KEY] = {
        f"aws/{BLOCKED}/spot": dict(entry),
        "aws/eu-west-1/spot": dict(entry),  # a region the spec dropped while no watcher ran
        "gcp/*/spot": dict(entry),  # a cloud the spec no longer has
    }
    save_state(tmp_path / "state", state)
    ctl, _, _ = _controller(tmp_path, write_spec, ", policy: even")
    assert set(ctl._quota) == {f"aws/{BLOCKED}/spot"}
    assert set(ctl.state.extra[QUOTA_KEY]) == {f"aws/{BLOCKED}/spot"}


def test_an_apply_that_launches_where_a_quota_refused_lifts_it_for_that_market_only():
    """`apply` and the watcher share `absorb_result`: a launch it reports done there lifts the
    quota of its region and market (its market's cloud-wide one too), not the other market's.
    Before, only the watcher's own launches did: after an `apply` that launched there, `status`
    still named the quota as used up, and a watcher started later paused the region again."""
    from skyhedge.apply import absorb_result
    from skyhedge.engine import ApplyResult, ResourceChange
    from skyhedge.render.tree import RenderedRoot
    from skyhedge.state import QUOTA_KEY, ReplicaRecord

    state = ServiceState(service="svc")
    state.replicas["r-0001"] = ReplicaRecord(
        "r-0001", "aws", BLOCKED, "usw2-az1", "spot", 1.0, instance_type="g5.xlarge"
    )
    entry = {"reason": "x", "since": 1.0, "refusals": 2, "at": 1.0, "next_at": 61.0}
    state.extra[QUOTA_KEY] = {
        f"aws/{BLOCKED}/spot": dict(entry),
        f"aws/{BLOCKED}/on-demand": dict(entry),
        "aws/*/spot": dict(entry),
        "aws/us-east-1/spot": dict(entry),
    }
    root = RenderedRoot("aws", BLOCKED, "aws", ("r-0001",), (), "digest")
    address = 'module.replicas.aws_instance.replica["r-0001"]'
    done = ApplyResult(
        root.path,
        0,
        completed=(ResourceChange(address, "create"),),
        outputs={"replicas": {"r-0001": {"cloud_id": "i-1", "endpoint": "http://10.0.0.1:8000"}}},
    )
    assert absorb_result(state, root, done, 2.0, revision="rev") == []
    assert state.replicas["r-0001"].provisioned_at == 2.0
    assert set(state.extra[QUOTA_KEY]) == {f"aws/{BLOCKED}/on-demand", "aws/us-east-1/spot"}


def test_a_clean_destroy_forgets_the_quotas(tmp_path: Path, write_spec):
    """Nothing of the service runs after it: before, `status` went on naming the quotas."""
    from skyhedge.apply import destroy_service
    from skyhedge.state import QUOTA_KEY, load_state, save_state

    spec = write_spec("""
        name: svc
        placement: {clouds: [local], zones: [local-a]}
        replica_policy: {min_replicas: 1}
        run: {command: "true"}
    """)
    state = load_state(tmp_path / "state", "svc")
    state.extra[QUOTA_KEY] = {
        "aws/us-west-2/spot": {"reason": "x", "since": 1, "refusals": 1, "at": 1, "next_at": 31}
    }
    save_state(tmp_path / "state", state)
    report = destroy_service(load_spec(spec), tmp_path / "state", route=False)
    assert report.ok
    assert QUOTA_KEY not in load_state(tmp_path / "state", "svc").extra


def test_the_quota_line_says_asked_again_at_a_time_only_while_a_watcher_will_ask_then():
    """Before: "asked again at 10:17:00" with no watcher running, or at 12:00 for an ask due at
    10:17 that never came (the policy placing elsewhere)."""
    from skyhedge.cli.apply import _describe_quota, clock_time

    entry = {"reason": "aws: quota 'q' used up", "market": "spot", "since": 1000.0, "refusals": 3}
    entry |= {"at": 1090.0, "next_at": 1210.0}
    ahead = _describe_quota(entry, watching=True, now=1100.0)
    assert f"asked again at {clock_time(1210.0)}" in ahead
    past = _describe_quota(entry, watching=True, now=5000.0)
    assert "asked again at the next launch placed there" in past and clock_time(1210.0) not in past
    alone = _describe_quota(entry, watching=False, now=1100.0)
    assert "no watcher runs" in alone and clock_time(1210.0) not in alone


def test_a_quota_beside_a_stock_out_runs_terraform_no_more_than_the_stock_out_would(
    tmp_path: Path, write_spec
):
    """Spot quota of 1 in us-west-2, us-east-1 out of spot, an hour (on-demand serves): the
    region's pause and the zones' pauses fall on different passes, and each refused apply's
    retry ran Terraform with every launch held: 100 Terraform runs, 42 asking nothing (60 when
    the quota was taken for a stock-out). The retry now goes with the launches at the pause's
    end: 53, each asking something, the service's READY replicas as before."""
    ctl, clock, ex = _controller(tmp_path, write_spec, quota={(BLOCKED, "spot"): 1})
    ex.refuse_zones = {"use1-az1", "use1-az2", "use1-az4"}
    asked: list[int] = []
    apply = ex.apply

    def counting(state, plan, now):
        asked.append(sum(1 for r in plan.replicas if r.action == CREATE))
        return apply(state, plan, now)

    ex.apply = counting  # type: ignore[method-assign]
    run_for(ctl, clock, 3600)
    assert len(ready(ctl)) >= 3
    assert len(asked) <= 60, len(asked)
    assert asked.count(0) <= 1, asked  # (the first pass's reconcile at most)
