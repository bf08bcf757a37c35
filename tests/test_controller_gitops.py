"""GitOps mode: the re-rendered tree is committed to a git working copy instead of applied.

A preemption produces one commit whose message names what was preempted, the new layout and the
cost change; a tick whose plan changes nothing makes no commit.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from controller_fakes import Clock, FakeSource

from skyhedge.cli import main
from skyhedge.controller.gitops import GitOpsExecutor
from skyhedge.controller.loop import Controller, ControllerOptions
from skyhedge.errors import StateError
from skyhedge.events import PreemptionEvent, Signal
from skyhedge.spec import load_spec

SPEC = """
name: svc
placement:
  clouds: [local]
  zones: [local-a, local-b, local-c]
replica_policy:
  min_replicas: 2
  num_overprovision: 1
  policy: spothedge
run:
  command: python3 server.py
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "infra-repo"
    path.mkdir()
    git(path, "init", "-q")
    return path


def commits(repo: Path) -> list[str]:
    out = subprocess.run(["git", "-C", str(repo), "log", "--format=%B%x00"], capture_output=True, text=True)
    return [m.strip() for m in out.stdout.split("\0") if m.strip()] if out.returncode == 0 else []


def tfvars_replicas(repo: Path) -> dict[str, dict]:
    return json.loads((repo / "infra" / "local" / "local" / "skyhedge.auto.tfvars.json").read_text())[
        "replicas"
    ]


def make(tmp_path: Path, repo: Path, write_spec, source: FakeSource, clock: Clock) -> Controller:
    spec = load_spec(write_spec(SPEC))
    sdir = tmp_path / "state"
    return Controller(
        spec,
        sdir,
        executor=GitOpsExecutor(spec, sdir, repo, clock=clock),
        sources=[source],
        clock=clock,
        options=ControllerOptions(assume_ready=True),
    )


def test_preemption_makes_one_commit_and_no_change_makes_none(tmp_path, repo, write_spec):
    clock, source = Clock(1_700_000_000.0), FakeSource()
    ctl = make(tmp_path, repo, write_spec, source, clock)
    ctl.tick()
    log = commits(repo)
    assert len(log) == 1 and log[0].startswith("skyhedge: svc: scale to 3 replicas")
    reps = tfvars_replicas(repo)
    assert sorted(r["zone"] for r in reps.values()) == ["local-a", "local-b", "local-c"]
    assert {r["market"] for r in reps.values()} == {"spot"}  # no fallback churn committed
    for _ in range(3):
        clock.advance(5)
        ctl.tick()
    assert len(commits(repo)) == 1
    victim = next(r for r in ctl.state.live() if r.zone == "local-b")
    source.queue.append(
        PreemptionEvent(Signal.GONE, clock(), "fake", replica_id=victim.id, reason="preempted")
    )
    clock.advance(5)
    ctl.tick()
    log = commits(repo)
    assert len(log) == 2
    msg = log[0]
    assert msg.startswith(f"skyhedge: svc: replace preempted {victim.id}")
    assert f"{victim.id} in local/local/local-b (preempted at" in msg
    assert "New layout (3 spot, 0 on-demand" in msg and "Cost: $0.0000/h -> $0.0000/h" in msg
    reps = tfvars_replicas(repo)
    assert victim.id not in reps and len(reps) == 3
    assert git(repo, "status", "--porcelain") == ""


def test_not_a_repository_is_a_clear_error(tmp_path, write_spec):
    spec = load_spec(write_spec(SPEC))
    (tmp_path / "plain").mkdir()
    with pytest.raises(StateError, match="expects a git working copy"):
        GitOpsExecutor(spec, tmp_path / "state", tmp_path / "plain")


def test_watch_gitops_once_from_the_cli(tmp_path, repo, write_spec):
    spec = write_spec(SPEC)
    args = ["watch", str(spec), "--state-dir", str(tmp_path / "state"), "--gitops", str(repo), "--once"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    assert len(commits(repo)) == 1
    assert (repo / "infra" / "skyhedge-tree.json").is_file()


def test_state_inside_the_repo_is_committed_with_the_tree(repo, write_spec):
    spec = write_spec(SPEC)
    args = ["watch", str(spec), "--state-dir", str(repo / "state"), "--gitops", str(repo), "--once"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    files = set(git(repo, "show", "--name-only", "--format=", "HEAD").split())
    assert "state/state.json" in files and "infra/skyhedge-tree.json" in files
    assert not any(f.startswith("state/tf") or f.endswith(".lock") for f in files)
    committed = json.loads(git(repo, "show", "HEAD:state/state.json"))
    live = sorted(rid for rid, r in committed["replicas"].items() if r["gone_at"] is None)
    assert live == sorted(tfvars_replicas(repo))
