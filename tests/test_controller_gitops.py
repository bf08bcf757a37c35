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
from controller_fakes import Clock, FakeSource, edit_spec

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
    # one pass and done: "Ctrl-C stops the watcher" read as a watcher left running
    assert "watching svc (gitops into" in first.output
    assert "Ctrl-C" not in first.output and "keeps running" not in first.output


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


def controller(spec_path: Path, state_dir: Path, repo: Path, clock: Clock, **kw) -> Controller:
    spec = load_spec(spec_path)
    return Controller(
        spec,
        state_dir,
        executor=GitOpsExecutor(spec, state_dir, repo, clock=clock, **kw),
        sources=[FakeSource()],
        clock=clock,
        options=ControllerOptions(assume_ready=True),
    )


def commit_ops(repo: Path) -> list[tuple[list[str], list[str]]]:
    """(created, deleted) replica IDs per commit, newest first, from the commit messages."""
    out = []
    for msg in commits(repo):
        lines = msg.splitlines()
        out.append(
            (
                [x.split()[1] for x in lines if x.startswith("  + ")],
                [x.split()[1] for x in lines if x.startswith("  - ")],
            )
        )
    return out


ROLLING = (
    SPEC
    + """
readiness_probe:
  initial_delay_seconds: 600
"""
)


def test_a_spec_change_rolls_over_keeping_n_booted_replicas_at_every_commit(tmp_path, repo, write_spec):
    # CI applies a commit as one Terraform apply: retiring every outdated replica in one commit
    # would destroy them all while their replacements boot. The watcher cannot see CI's apply, so
    # a replacement counts for the roll-over once the probe's initial delay has passed.
    clock = Clock(1_700_000_000.0)
    sdir = repo / "state"
    ctl = controller(write_spec(ROLLING), sdir, repo, clock)
    ctl.tick()
    old = sorted(r.id for r in ctl.state.live())
    assert len(old) == 3
    clock.advance(3600)  # the fleet has long been up when the spec changes
    changed = write_spec(ROLLING.replace("command: python3 server.py", "command: python3 server.py --v2"))
    ctl = controller(changed, sdir, repo, clock)
    for _ in range(80):  # 40 minutes of passes
        clock.advance(30)
        before = len(commits(repo))
        ctl.tick()
        if len(commits(repo)) > before:
            assert git(repo, "status", "--porcelain") == ""  # the commit holds the pass's state
            created, deleted = commit_ops(repo)[0]
            # N = 2 stay up: replicas committed at least the initial delay ago (booted by now)
            up = [r for r in ctl.state.live() if r.ready_at is not None and r.ready_at <= clock() - 600]
            assert len(up) >= 2, (created, deleted)
    retired = [rid for _, deleted in commit_ops(repo) for rid in deleted]
    assert sorted(retired) == old  # every outdated replica went, over several commits
    live = ctl.state.live()
    assert len(live) == 3 and not any(r.id in old for r in live)


REGIONS = """
name: svc
resources: {instance_type: {aws: g6.xlarge}}
placement: {clouds: [aws], regions: [us-east-1, us-east-2], zones: [use1-az1, use2-az1]}
replica_policy: {min_replicas: 2, num_overprovision: 0, policy: spothedge}
terraform: {backend: s3, config: {bucket: b, region: us-east-1}}
run: {command: serve}
"""


def test_the_working_copy_is_clean_after_each_commit_and_ci_rerenders_the_committed_tree(
    tmp_path, repo, write_spec
):
    # the state committed is the one the pass ended with, and `render` plans as of the state's
    # last decision, so re-rendering a committed state later gives the committed tree
    clock = Clock(1_700_000_000.0)
    spec = write_spec(REGIONS.replace("policy: spothedge", "policy: skyhedge"))
    ctl = controller(spec, repo / "state", repo, clock)
    ctl.tick()
    assert git(repo, "status", "--porcelain") == ""
    manifest = json.loads((repo / "infra" / "skyhedge-tree.json").read_text())
    ids = [rid for root in manifest["roots"] for rid in root["replicas"]]
    assert len(ids) == 2  # spot only: no on-demand fallback committed and withdrawn again
    ci = tmp_path / "ci"
    git(tmp_path, "clone", "-q", str(repo), str(ci))
    args = ["render", str(spec), "--state-dir", str(ci / "state"), "--out", str(tmp_path / "again")]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    files = sorted(p.relative_to(repo / "infra") for p in (repo / "infra").rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file()
    )
    for name in files:
        assert (tmp_path / "again" / name).read_bytes() == (repo / "infra" / name).read_bytes(), name


def test_idle_passes_after_a_commit_leave_the_committed_state_file_as_committed(tmp_path, repo, write_spec):
    """A commit writes state.json whole (`finish`) after the pass's own save: the watcher must
    count that as its last write. It did not, so the very next idle pass rewrote state.json for
    its clocks alone (one write more per commit, and the working copy dirty one pass after every
    commit, not SAVE_EVERY later)."""
    from skyhedge.controller.loop import SAVE_EVERY

    clock, sdir = Clock(1_700_000_000.0), repo / "state"
    spec = load_spec(write_spec(SPEC.replace("policy: spothedge", "policy: skyhedge")))
    ctl = Controller(
        spec,
        sdir,
        executor=GitOpsExecutor(spec, sdir, repo, clock=clock),
        sources=[FakeSource()],
        clock=clock,
        options=ControllerOptions(assume_ready=True, survival_period=3600),
    )
    ctl.tick()
    assert len(commits(repo)) == 1 and git(repo, "status", "--porcelain") == ""
    committed = (sdir / "state.json").read_bytes()
    committed_at = clock()
    while clock() + 10 - committed_at < SAVE_EVERY:  # idle passes: only their clocks move
        clock.advance(10)
        ctl.tick()
        assert git(repo, "status", "--porcelain") == ""
        assert (sdir / "state.json").read_bytes() == committed
    assert len(commits(repo)) == 1
    clock.advance(10)
    ctl.tick()  # SAVE_EVERY after the commit: the clocks are written (the next commit carries them)
    assert git(repo, "status", "--porcelain").split() == ["M", "state/state.json"]
    disk = json.loads((sdir / "state.json").read_text())
    assert disk["extra"]["decided_at"] == ctl.state.extra["decided_at"] == clock()


def test_an_emptied_region_stays_rendered_empty_so_ci_destroys_what_ran_there(tmp_path, repo, write_spec):
    clock = Clock(1_700_000_000.0)
    sdir = repo / "state"
    ctl = controller(write_spec(REGIONS), sdir, repo, clock)
    ctl.tick()
    roots = {r["path"] for r in json.loads((repo / "infra" / "skyhedge-tree.json").read_text())["roots"]}
    assert roots == {"aws/us-east-1", "aws/us-east-2"}
    narrowed = REGIONS.replace("us-east-1, us-east-2], zones: [use1-az1, use2-az1]", "us-east-2]")
    ctl = controller(write_spec(narrowed), sdir, repo, clock)
    clock.advance(30)
    ctl.tick()  # the replacement in us-east-2 is committed; us-east-1's replica keeps serving
    clock.advance(1300)  # the probe's initial delay (1200 s by default) later, it is released
    ctl.tick()
    ctl = controller(write_spec(narrowed), sdir, repo, clock)  # a restarted watcher re-renders
    clock.advance(30)
    ctl.tick()
    manifest = json.loads((repo / "infra" / "skyhedge-tree.json").read_text())
    by_path = {r["path"]: r["replicas"] for r in manifest["roots"]}
    assert by_path["aws/us-east-1"] == [] and len(by_path["aws/us-east-2"]) == 2
    # a week on, the next commit (here: after a preemption) drops the empty root
    clock.advance(8 * 24 * 3600)
    victim = ctl.state.live()[0]
    ctl.sources[0].queue.append(
        PreemptionEvent(Signal.GONE, clock(), "fake", replica_id=victim.id, reason="preempted")
    )
    ctl.tick()
    roots = {r["path"] for r in json.loads((repo / "infra" / "skyhedge-tree.json").read_text())["roots"]}
    assert roots == {"aws/us-east-2"}


def test_moving_to_another_cloud_keeps_the_old_clouds_root_with_its_recorded_instance_type(
    tmp_path, repo, write_spec
):
    clock = Clock(1_700_000_000.0)
    sdir = repo / "state"
    ctl = controller(write_spec(REGIONS), sdir, repo, clock)
    ctl.tick()
    moved = REGIONS.replace(
        "clouds: [aws], regions: [us-east-1, us-east-2], zones: [use1-az1, use2-az1]",
        "clouds: [gcp], regions: [us-east4]",
    )
    moved = moved.replace("{aws: g6.xlarge}", "{gcp: g2-standard-4}")
    ctl = controller(write_spec(moved), sdir, repo, clock)
    clock.advance(30)
    ctl.tick()  # gcp replicas committed; the aws ones serve on, rendered with their instance type
    assert ctl.last_apply is not None and not ctl.last_apply.errors
    clock.advance(1300)  # once the gcp ones have had time to boot, the aws ones go
    for _ in range(3):
        clock.advance(30)
        ctl.tick()
    assert ctl.last_apply is not None and not ctl.last_apply.errors
    by_path = {
        r["path"]: r["replicas"]
        for r in json.loads((repo / "infra" / "skyhedge-tree.json").read_text())["roots"]
    }
    assert by_path["aws/us-east-1"] == [] and by_path["aws/us-east-2"] == []
    assert len(by_path["gcp/us-east4"]) == 2


@pytest.mark.parametrize("path", ["../outside", "ABSOLUTE", ".git/sub"])
def test_gitops_path_outside_the_repository_is_refused_before_anything_is_written(
    tmp_path, repo, write_spec, path
):
    path = str(tmp_path / "abs-out") if path == "ABSOLUTE" else path
    spec = write_spec(SPEC)
    args = ["watch", str(spec), "--state-dir", str(tmp_path / "st"), "--gitops", str(repo)]
    out = CliRunner().invoke(main, [*args, "--gitops-path", path, "--once"])
    assert out.exit_code == 1
    assert "--gitops-path" in out.output and "inside the repository" in out.output
    assert len(out.output.strip().splitlines()) == 1
    assert not (tmp_path / "outside").exists() and not (tmp_path / "abs-out").exists()
    assert not (repo / ".git" / "sub").exists()


def test_a_detached_head_is_refused(tmp_path, repo, write_spec):
    (repo / "f").write_text("x")
    git(repo, "add", "f")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@x", "commit", "-qm", "init")
    git(repo, "checkout", "-q", "--detach")
    with pytest.raises(StateError, match="HEAD is detached"):
        GitOpsExecutor(load_spec(write_spec(SPEC)), tmp_path / "state", repo)


def test_an_ignored_state_dir_inside_the_repository_is_refused(repo, write_spec):
    (repo / ".gitignore").write_text("state/\n")
    with pytest.raises(StateError, match="ignored by git"):
        GitOpsExecutor(load_spec(write_spec(SPEC)), repo / "state", repo)


def test_a_configured_author_name_is_kept_when_only_the_email_is_missing(
    tmp_path, repo, write_spec, monkeypatch
):
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "no-global-gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    git(repo, "config", "user.name", "Platform Bot")
    clock = Clock(1_700_000_000.0)
    ctl = controller(write_spec(SPEC), tmp_path / "state", repo, clock)
    ctl.tick()
    assert git(repo, "log", "-1", "--format=%an <%ae>").strip() == "Platform Bot <skyhedge@localhost>"


def test_leaving_gitops_hands_the_committed_roots_to_apply_once(tmp_path, repo, write_spec):
    # an emptied root committed but maybe never applied by CI stays rendered until an apply has
    # run it, then goes like any emptied root; before, it was kept (and applied) forever
    from skyhedge.apply import roots_with_resources
    from skyhedge.service import set_gitops

    clock = Clock(1_700_000_000.0)
    sdir = repo / "state"
    ctl = controller(write_spec(REGIONS), sdir, repo, clock)
    ctl.tick()
    state = ctl.state
    assert {("aws", "us-east-1"), ("aws", "us-east-2")} <= roots_with_resources(state)
    set_gitops(state, False)
    assert "roots" not in state.extra["gitops"]
    tracked = state.extra["terraform"]["roots"]
    assert set(tracked) == {"aws/us-east-1", "aws/us-east-2"} and all(v == {} for v in tracked.values())
    assert {("aws", "us-east-1"), ("aws", "us-east-2")} <= roots_with_resources(state)
    tracked["aws/us-east-1"] = {"replicas": [], "digest": "x"}  # an apply emptied it
    assert ("aws", "us-east-1") not in roots_with_resources(state)


def test_a_refused_gitops_watch_leaves_no_state_dir_behind(tmp_path, repo, write_spec):
    (repo / ".gitignore").write_text("state/\n")
    spec = write_spec(SPEC)
    args = ["watch", str(spec), "--state-dir", str(repo / "state"), "--gitops", str(repo), "--once"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 1 and "ignored by git" in out.output
    assert not (repo / "state").exists()


def test_a_reloaded_spec_is_committed_by_the_same_watcher(tmp_path, repo, write_spec):
    # `watch --gitops` re-reads its spec like any watcher: the next commit carries the new layout
    from skyhedge.controller.runner import Watcher

    path = write_spec(SPEC)
    sdir = tmp_path / "state"
    with Watcher(load_spec(path), sdir, gitops=repo, spec_path=path) as w:
        assert w.controller is not None
        w._tick()
        assert len(tfvars_replicas(repo)) == 3 and len(commits(repo)) == 1
        first = w.controller.executor
        edit_spec(path, "min_replicas: 2", "min_replicas: 3")
        w._tick()
        assert w.controller.executor is not first and w.controller.executor.spec is w.spec
        assert len(tfvars_replicas(repo)) == 4 and len(commits(repo)) == 2
        assert any(n.text.endswith(": replica_policy.min_replicas: 2 -> 3") for n in w.controller.notes)
        assert git(repo, "status", "--porcelain") == ""


def test_a_spec_edited_while_head_is_detached_is_taken_and_committed_once_back_on_the_branch(
    tmp_path, repo, write_spec
):
    """`git pull --rebase` detaches HEAD while it works: an edit it brought in was refused
    ("HEAD is detached ...; keeping the running spec") and, the file not changing again, never
    taken after the rebase (found by an audit)."""
    from skyhedge.controller.runner import Watcher

    path = write_spec(SPEC)
    with Watcher(load_spec(path), tmp_path / "state", gitops=repo, spec_path=path) as w:
        assert w.controller is not None
        w._tick()
        assert len(commits(repo)) == 1
        branch = git(repo, "symbolic-ref", "--short", "HEAD").strip()
        git(repo, "checkout", "-q", "--detach")
        edit_spec(path, "min_replicas: 2", "min_replicas: 3")
        w._tick()
        assert w.spec.replica_policy.min_replicas == 3  # taken, not refused
        assert len(commits(repo)) == 1  # but no commit while HEAD is detached
        assert "while HEAD is detached" in w.controller.notes[-1].text
        git(repo, "checkout", "-q", branch)
        w._tick()
        assert len(commits(repo)) == 2 and len(tfvars_replicas(repo)) == 4
        assert "Spec reloaded: replica_policy.min_replicas: 2 -> 3" in commits(repo)[0]


GATHERING = """
name: svc
placement:
  clouds: [local]
  zones: [local-a, local-b, local-c, local-d]
replica_policy:
  min_replicas: 3
  num_overprovision: 1
  policy: skyhedge
readiness_probe: {path: /health, initial_delay_seconds: 900}
run:
  command: python3 server.py
"""


def test_a_policy_move_keeps_n_booted_replicas_in_every_commit(tmp_path, repo, write_spec):
    """Committed replicas counted as READY at once, so a move (skyhedge gathering its replicas
    into one zone after min_replicas 3 -> 4 left too few zones for an extra) launched three
    replicas and released two in one commit: CI applying it left two of four serving while the
    new ones booted (found by an audit). A committed replica now counts for the policy only once
    `initial_delay_seconds` has passed since its commit, as a rolling update's replacement does."""
    from skyhedge.controller.runner import Watcher

    path, clock = write_spec(GATHERING), Clock(1_700_000_000.0)
    with Watcher(load_spec(path), tmp_path / "state", gitops=repo, spec_path=path, clock=clock) as w:
        assert w.controller is not None
        w._tick()
        clock.advance(1000)  # the four have booted
        w._tick()
        edit_spec(path, "min_replicas: 3", "min_replicas: 4")
        shown = len(commits(repo))
        for _ in range(80):
            w._tick()
            booted = [
                r for r in w.controller.state.live() if r.ready_at is not None and clock() - r.ready_at >= 900
            ]
            assert len(booted) >= 4, [(r.id, r.zone, r.ready_at) for r in w.controller.state.live()]
            clock.advance(60)
        zones = {r.zone for r in w.controller.state.live()}
        messages = commits(repo)[: len(commits(repo)) - shown]
    assert len(zones) == 1 and len(w.controller.state.live()) == 4  # gathered, one step a commit
    assert len(messages) >= 4 and not any("replace r-0002, r-0003" in m for m in messages)


def test_litter_of_an_os_or_editor_in_the_tree_is_kept_and_never_committed(tmp_path, repo, write_spec):
    """A `.DS_Store` or a vim swap file in `infra/` stopped every `--gitops` pass as a file skyhedge
    does not render (exit 1, no commit, for as long as Finder or the editor kept it there). The pass
    commits now, and neither the litter nor a folder of it ends up in the commit; a folder made
    for the tree that Finder had been in (only a `.DS_Store`) is taken as new."""
    spec = write_spec(SPEC)
    (repo / "infra").mkdir()
    (repo / "infra" / ".DS_Store").write_bytes(b"finder")
    args = ["watch", str(spec), "--state-dir", str(tmp_path / "state"), "--gitops", str(repo), "--once"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    (repo / "infra" / "local" / "local" / ".main.tf.swp").write_bytes(b"vim")
    (repo / "infra" / "local" / "local" / "main.tf~").write_bytes(b"backup")
    spec.write_text(SPEC.replace("min_replicas: 2", "min_replicas: 3"))
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    assert len(commits(repo)) == 2 and len(tfvars_replicas(repo)) == 4
    tracked = git(repo, "ls-files").split()
    assert not [name for name in tracked if name.endswith(("DS_Store", ".swp", "~"))], tracked
    assert (repo / "infra" / ".DS_Store").read_bytes() == b"finder"
    assert (repo / "infra" / "local" / "local" / ".main.tf.swp").read_bytes() == b"vim"
    assert git(repo, "status", "--porcelain", "--", "infra") == ""  # ignored: nothing to commit


def test_a_file_someone_added_to_the_tree_stops_the_commit_in_one_line_and_is_kept(
    tmp_path, repo, write_spec
):
    """The watcher's re-render swapped the whole of `infra/` and deleted a file a team had put
    there (notes, an `override.tf`), then committed its deletion (found by the GitOps audit)."""
    spec = write_spec(SPEC)
    args = ["watch", str(spec), "--state-dir", str(tmp_path / "state"), "--gitops", str(repo), "--once"]
    assert CliRunner().invoke(main, args).exit_code == 0
    (repo / "infra" / "NOTES.md").write_text("ours")
    spec.write_text(SPEC.replace("min_replicas: 2", "min_replicas: 3"))
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1, refused.output
    assert f"{repo}/infra/NOTES.md: not a file skyhedge renders" in refused.output
    assert (repo / "infra" / "NOTES.md").read_text() == "ours" and len(commits(repo)) == 1
    (repo / "infra" / "NOTES.md").unlink()
    assert CliRunner().invoke(main, args).exit_code == 0 and len(commits(repo)) == 2
