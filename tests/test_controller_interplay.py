"""The watcher's pacing mechanisms together, as a bad day brings them: one AWS region's API gone
(per-root backoff), the other region's spot quota used up (the region's quota pause), a local zone
in a spot drought (its zone pause), with preemptions all along, a rolling update begun in the
middle, a watcher restart, a spec reload that drops the failing region, then each cause ending in
turn. Each mechanism has its own tests; these check what a user expects of them combined: the
service keeps its N READY replicas while any market can serve, the loop stays paced (passes,
Terraform runs and replica IDs per hour bounded), every pause or hold ends once its cause does,
state.json reads back as the state in memory, and `status` names each cause once. Over the
controller fakes, on a fake clock, passes paced as the watcher paces them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from controller_fakes import (
    Clock,
    DeadCloud,
    FakeProber,
    FakeRouter,
    FakeSource,
    clocked_controller,
    reconfigured,
)

from skyhedge.controller.loop import SPOT_PAUSES_KEY, Controller
from skyhedge.events import PreemptionEvent, Signal
from skyhedge.policy.types import ReplicaStatus
from skyhedge.spec import load_spec
from skyhedge.state import FAILING_ROOTS_KEY, LAUNCH_HOLD_KEY, QUOTA_KEY, ROLLOUT_KEY, load_state

#: Two AWS regions of two zones each and two local zones; N = 4 (and the policy's extra one).
SPEC = """
name: svc
resources: {instance_type: {aws: g5.xlarge}}
placement: {clouds: [aws, local], zones: [use1-az1, use1-az2, usw2-az1, usw2-az2, local-a, local-b]}
replica_policy: {min_replicas: 4%s}
run: {command: %s}
"""
N = 4
EAST, WEST = "aws/us-east-1", "us-west-2"
EXPIRED = "api error ExpiredToken: The security token included in the request is expired"
#: The longest a service may be short of N READY while some market can serve it: a cold start
#: (the fakes' replicas start at once; a pass or two to plan, launch and probe)
COLD_START = 30.0


class Day:
    """The service under the watcher, with what its passes did, hour by hour."""

    def __init__(self, tmp_path: Path, write_spec, policy: str) -> None:
        self.write_spec, self.policy = write_spec, policy
        self.clock = Clock()
        self.ex, self.source = DeadCloud(self.clock, run_seconds=7.0), FakeSource()
        self.router, self.prober = FakeRouter(), FakeProber()
        self.ctl = self._watcher(self.spec("serve"), tmp_path / "state")
        self.passes = 0
        self.short_since: float | None = None
        self.longest_short = 0.0

    def spec(self, command: str, drop: str = ""):
        return load_spec(self.write_spec((SPEC % (self.policy, command)).replace(drop, "")))

    def _watcher(self, spec, state_dir: Path) -> Controller:
        return clocked_controller(
            spec,
            state_dir,
            self.clock,
            executor=self.ex,
            sources=[self.source],
            router=self.router,
            prober=self.prober,
        )

    def ready(self) -> int:
        return sum(1 for r in self.ctl.state.live() if r.fact().status is ReplicaStatus.READY)

    def run(self, seconds: float) -> dict[str, float]:
        """Passes for `seconds`, as the watcher paces them: per hour, the passes, Terraform runs
        and replica IDs handed out."""
        end = self.clock() + seconds
        passes, runs, next_id = self.passes, len(self.ex.calls), self.ctl.state.next_id
        while self.clock() < end:
            delay = self.ctl.tick()
            self.passes += 1
            self.ctl.woken = False
            if self.ready() < N:
                self.short_since = self.clock() if self.short_since is None else self.short_since
                self.longest_short = max(self.longest_short, self.clock() - self.short_since)
            else:
                self.short_since = None
            self.clock.advance(max(0.05, delay))
        hours = seconds / 3600
        self.assert_state_reads_back()
        return {
            "passes": (self.passes - passes) / hours,
            "runs": (len(self.ex.calls) - runs) / hours,
            "ids": (self.ctl.state.next_id - next_id) / hours,
        }

    def preempt(self, count: int) -> None:
        """The `count` oldest local replicas preempted (the cloud ones are left alone: a lost AWS
        replica is looked for with the AWS API, which these tests do not have)."""
        local = sorted((r for r in self.ctl.state.live() if r.cloud == "local"), key=lambda r: r.id)
        for rec in local[:count]:
            self.source.queue.append(PreemptionEvent(Signal.GONE, self.clock(), "fake", replica_id=rec.id))
        self.ctl.woken = True

    def restart(self) -> None:
        self.ctl.flush()
        self.ctl = self._watcher(self.ctl.spec, self.ctl.state_dir)

    def assert_state_reads_back(self) -> None:
        self.ctl.flush()
        kept = load_state(self.ctl.state_dir, "svc")
        assert kept.next_id == self.ctl.state.next_id
        assert json.dumps(kept.extra, sort_keys=True) == json.dumps(self.ctl.state.extra, sort_keys=True)
        assert {rid: r.gone_at for rid, r in kept.replicas.items()} == {
            rid: r.gone_at for rid, r in self.ctl.state.replicas.items()
        }

    def status(self) -> list[str]:
        from click.testing import CliRunner

        from skyhedge.cli import main

        self.ctl.flush()
        spec = self.write_spec(SPEC % (self.policy, "serve"), name="status.yaml")
        args = ["status", str(spec), "--state-dir", str(self.ctl.state_dir)]
        out = CliRunner().invoke(main, args, env={"COLUMNS": "250"})
        assert out.exit_code == 0, out.output
        return out.output.splitlines()


@pytest.mark.parametrize("policy", ["", ", policy: spothedge"])
def test_an_outage_a_quota_and_a_drought_at_once_through_an_update_a_restart_and_a_reload(
    tmp_path: Path, write_spec, policy: str
):
    """Measured, both policies: never short of N READY; in any phase at most 396 passes, 84
    Terraform runs and 80 replica IDs an hour (an idle watcher: 360 passes, none of the others),
    every pause, hold and outage gone once its cause is. Before the reload forgot them, the
    dropped region's zones kept their spot pauses in `state.json` for good."""
    day = Day(tmp_path, write_spec, policy)
    rates = [day.run(600)]
    assert day.ready() >= N
    day.ex.dead[EAST] = EXPIRED  # us-east-1's API gone
    day.ex.quota[(WEST, "spot")] = 0  # us-west-2's spot quota used up
    day.ex.refuse_zones = {"local-a"}  # local-a out of spot
    for _ in range(3):
        day.preempt(2)
        rates.append(day.run(600))
    assert QUOTA_KEY in day.ctl.state.extra
    lines = day.status()
    assert len([ln for ln in lines if ln.startswith("Quota: ")]) == 1, lines
    assert len([ln for ln in lines if ln.startswith("Failing: ")]) <= 1, lines
    reconfigured(day.ctl, day.spec("serve --v2"))  # a rolling update, in all that
    day.preempt(1)
    rates.append(day.run(900))
    day.restart()
    rates.append(day.run(900))
    reconfigured(day.ctl, day.spec("serve --v2", drop="use1-az1, use1-az2, "))  # the failing region dropped
    day.preempt(2)
    rates.append(day.run(900))
    day.ex.refuse_zones = set()
    day.preempt(2)
    rates.append(day.run(900))
    day.ex.quota.clear()
    day.ex.dead.clear()
    for _ in range(4):
        day.preempt(2)
        rates.append(day.run(450))
    rates.append(day.run(1800))

    assert day.longest_short <= COLD_START, day.longest_short
    assert max(r["passes"] for r in rates) <= 450, rates  # idle: 360 an hour
    assert max(r["runs"] for r in rates) <= 90, rates
    assert max(r["ids"] for r in rates) <= 100, rates
    assert rates[-1]["runs"] <= 4 and rates[-1]["ids"] == 0, rates  # quiet again
    extra = day.ctl.state.extra
    for key in (FAILING_ROOTS_KEY, LAUNCH_HOLD_KEY, ROLLOUT_KEY, QUOTA_KEY):
        assert key not in extra, (key, extra[key])
    # no pause outlives its cause, nor the zones the spec places spot replicas in
    zones = {f"local/local/{z}" for z in ("local-a", "local-b")} | {
        f"aws/{WEST}/{z}" for z in ("usw2-az1", "usw2-az2")
    }
    assert set(extra.get(SPOT_PAUSES_KEY, {})) <= zones, extra.get(SPOT_PAUSES_KEY)
    assert all(r.revision == day.ctl.state.live()[0].revision for r in day.ctl.state.live())
    lines = day.status()
    assert not [ln for ln in lines if ln.startswith(("Failing: ", "Rolling update: ", "Launches held"))], (
        lines
    )


def test_a_reload_to_another_instance_type_forgets_that_clouds_spot_pauses(tmp_path: Path, write_spec):
    """A stock-out is one instance type's: another type is asked for at once (as a quota is)."""
    day = Day(tmp_path, write_spec, "")
    day.ex.refuse_zones = {"usw2-az1", "usw2-az2", "local-a"}
    day.run(120)
    paused = {loc.key for loc in day.ctl._spot_refused}
    assert {"aws/us-west-2/usw2-az1", "local/local/local-a"} <= paused, paused
    reconfigured(day.ctl, load_spec(write_spec((SPEC % ("", "serve")).replace("g5.xlarge", "g6.xlarge"))))
    assert {loc.key for loc in day.ctl._spot_refused} == {k for k in paused if k.startswith("local/")}
