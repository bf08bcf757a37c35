"""GitOps commits are reproducible, land only on the checked-out branch, say what changed since
the last commit that landed, and fail in one line (bug-bash 3, findings 1, 2, 5-10; and 12's
probe-path message).

The repositories are real (`git init` under tmp_path); the controller runs over a fake event
source, or the whole `watch --gitops --once` command runs, as a cron job or CI step would.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from controller_fakes import Clock, FakeSource, edit_spec
from test_controller_gitops import REGIONS as GITOPS_REGIONS
from test_controller_gitops import SPEC as GITOPS_SPEC

from skyhedge.cli import main
from skyhedge.controller.gitops import GitOpsExecutor
from skyhedge.controller.loop import Controller, ControllerOptions
from skyhedge.errors import SpecError, StateError
from skyhedge.events import PreemptionEvent, Signal
from skyhedge.policy.types import Location
from skyhedge.spec import load_spec

REPO_ROOT = Path(__file__).resolve().parent.parent

LOCAL = GITOPS_SPEC.lstrip("\n")  # the GitOps tests' local service

#: No local paths in its tree: a clone renders it byte for byte (the local cloud's roots name
#: the working directory and the state dir, see docs/terraform.md).
AWS = GITOPS_REGIONS.lstrip("\n")


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with one commit on `main` (the user's own: a README)."""
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    (path / "README.md").write_text("ops\n")
    git(path, "add", "README.md")
    git(path, "commit", "-qm", "init")
    return path


def messages(repo: Path) -> list[str]:
    """Commit messages, newest first."""
    out = git(repo, "log", "--format=%B%x00")
    return [m.strip() for m in out.split("\0") if m.strip()]


def controller(spec_path: Path, repo: Path, clock: Clock, state_dir: Path | None = None) -> Controller:
    spec = load_spec(spec_path)
    sdir = state_dir or repo / "state"
    return Controller(
        spec,
        sdir,
        executor=GitOpsExecutor(spec, sdir, repo, clock=clock),
        sources=[FakeSource()],
        clock=clock,
        options=ControllerOptions(assume_ready=True),
    )


def preempt(ctl: Controller, zone: str) -> str:
    """Queue the preemption of `zone`'s replica, a minute after whatever came before."""
    ctl.clock.advance(60)  # type: ignore[attr-defined]
    victim = next(r for r in ctl.state.live() if r.zone == zone)
    ctl.sources[0].queue.append(  # type: ignore[attr-defined]
        PreemptionEvent(Signal.GONE, ctl.clock(), "fake", replica_id=victim.id, reason="preempted")
    )
    return victim.id


def plus_minus(message: str) -> tuple[list[str], list[str]]:
    lines = message.splitlines()
    return (
        [x.split()[1] for x in lines if x.startswith("  + ")],
        [x.split()[1] for x in lines if x.startswith("  - ")],
    )


def fail_commits(repo: Path, why: str = "hook: rejected") -> Path:
    hook = repo / ".git" / "hooks" / "pre-commit"
    hook.write_text(f"#!/bin/sh\necho '{why}' >&2\necho 'more hook output' >&2\nexit 1\n")
    hook.chmod(0o755)
    return hook


# --- 1: the commit carries the spec it was rendered from --------------------------------------


def test_an_uncommitted_spec_edit_goes_into_the_commit_so_a_clone_renders_the_committed_tree(tmp_path, repo):
    spec = repo / "service.yaml"
    spec.write_text(AWS)
    git(repo, "add", "service.yaml")
    git(repo, "commit", "-qm", "spec")
    clock = Clock(1_700_000_000.0)
    controller(spec, repo, clock).tick()
    spec.write_text(AWS.replace("min_replicas: 2", "min_replicas: 3"))  # edited, not committed
    clock.advance(30)
    controller(spec, repo, clock).tick()  # the watcher runs with the edit (as after a reload)
    assert "service.yaml" in git(repo, "show", "--name-only", "--format=", "HEAD").split()
    assert git(repo, "status", "--porcelain") == ""
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    out = CliRunner().invoke(
        main,
        [
            "render",
            str(clone / "service.yaml"),
            "--state-dir",
            str(clone / "state"),
            "--out",
            str(tmp_path / "ci"),
        ],
    )
    assert out.exit_code == 0, out.output
    committed = {
        p.relative_to(clone / "infra"): p.read_bytes() for p in (clone / "infra").rglob("*") if p.is_file()
    }
    again = {
        p.relative_to(tmp_path / "ci"): p.read_bytes() for p in (tmp_path / "ci").rglob("*") if p.is_file()
    }
    assert committed == again
    manifest = json.loads((clone / "infra" / "skyhedge-tree.json").read_text())
    assert sum(len(r["replicas"]) for r in manifest["roots"]) == 3


def test_a_spec_file_that_differs_from_the_running_spec_is_left_out_and_the_message_says_so(repo):
    spec = repo / "service.yaml"
    spec.write_text(LOCAL)
    clock = Clock(1_700_000_000.0)
    ctl = controller(spec, repo, clock)
    spec.write_text(LOCAL.replace("min_replicas: 2", "min_replicas: 5"))  # not taken by this watcher
    ctl.tick()
    files = git(repo, "show", "--name-only", "--format=", "HEAD").split()
    assert "service.yaml" not in files and "infra/skyhedge-tree.json" in files
    assert (
        "Spec: service.yaml is not in this commit: it differs from the spec the watcher runs"
        in (messages(repo)[0])
    )


# --- 2: only onto the checked-out branch, never into a rebase or merge ------------------------


def test_no_commit_while_head_is_detached_then_the_owed_commit_lands_on_the_branch(repo, write_spec):
    clock = Clock(1_700_000_000.0)
    ctl = controller(write_spec(LOCAL), repo, clock)
    ctl.tick()
    tip = git(repo, "rev-parse", "main").strip()
    tree_before = (repo / "infra" / "skyhedge-tree.json").read_bytes()
    git(repo, "checkout", "-q", "--detach")  # what `git pull --rebase` does while it waits
    victim = preempt(ctl, "local-b")
    clock.advance(5)
    ctl.tick()
    assert git(repo, "rev-parse", "HEAD").strip() == tip == git(repo, "rev-parse", "main").strip()
    assert (repo / "infra" / "skyhedge-tree.json").read_bytes() == tree_before  # not even written
    assert ctl.notes[-1].text.startswith(f"gitops: no commit in {repo} while HEAD is detached;")
    git(repo, "checkout", "-q", "main")
    clock.advance(5)
    ctl.tick()
    assert git(repo, "rev-parse", "main").strip() != tip
    assert messages(repo)[0].startswith(f"skyhedge: svc: replace preempted {victim}")
    created, deleted = plus_minus(messages(repo)[0])
    assert deleted == [victim] and len(created) == 1
    assert git(repo, "status", "--porcelain") == ""


def test_a_merge_in_progress_keeps_the_watcher_off_the_conflicted_tree(repo, write_spec):
    clock = Clock(1_700_000_000.0)
    ctl = controller(write_spec(LOCAL), repo, clock)
    ctl.tick()
    tip = git(repo, "rev-parse", "HEAD").strip()
    conflicted = repo / "infra" / "skyhedge-tree.json"
    conflicted.write_text("<<<<<<< ours\n")  # the user is resolving it
    (repo / ".git" / "MERGE_HEAD").write_text(tip + "\n")
    preempt(ctl, "local-a")
    clock.advance(5)
    ctl.tick()
    assert git(repo, "rev-parse", "HEAD").strip() == tip
    assert conflicted.read_text() == "<<<<<<< ours\n"
    assert "while a merge is in progress" in ctl.notes[-1].text
    (repo / ".git" / "MERGE_HEAD").unlink()
    clock.advance(5)
    ctl.tick()
    assert messages(repo)[0].startswith("skyhedge: svc: replace preempted")
    assert json.loads(conflicted.read_text())["service"] == "svc"


def test_a_merge_in_progress_is_refused_at_start(tmp_path, repo, write_spec):
    (repo / ".git" / "MERGE_HEAD").write_text(git(repo, "rev-parse", "HEAD"))
    with pytest.raises(StateError, match="a merge is in progress; finish or abort it first"):
        GitOpsExecutor(load_spec(write_spec(LOCAL)), tmp_path / "state", repo)


# --- 5: one line, never the commit message ----------------------------------------------------


def test_a_commit_refused_by_a_hook_is_one_line_naming_the_subcommand_and_the_hooks_words(
    tmp_path, repo, write_spec
):
    fail_commits(repo)
    args = ["watch", str(write_spec(LOCAL)), "--state-dir", str(tmp_path / "st"), "--gitops", str(repo)]
    out = CliRunner().invoke(main, [*args, "--once"])
    assert out.exit_code == 1
    last = out.output.strip().splitlines()[-1]
    assert last == f"error: gitops: git commit in {repo} failed: hook: rejected"
    assert "New layout" not in out.output and "more hook output" not in out.output


def test_a_locked_index_is_one_line_without_gits_advice(tmp_path, repo, write_spec):
    (repo / ".git" / "index.lock").write_text("")
    args = ["watch", str(write_spec(LOCAL)), "--state-dir", str(tmp_path / "st"), "--gitops", str(repo)]
    out = CliRunner().invoke(main, [*args, "--once"])
    assert out.exit_code == 1
    last = out.output.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"error: apply failed: gitops: git add in {re.escape(str(repo))} failed: Unable to create .*", last
    )
    assert "Another git process" not in out.output


# --- 6: a failed commit is retried with everything since the last one that landed --------------


@pytest.mark.parametrize("retried_by", ["the same watcher", "a restarted watcher"])
def test_a_retried_commit_keeps_the_replicas_created_and_removed_and_the_cost_before(
    repo, write_spec, retried_by
):
    clock = Clock(1_700_000_000.0)
    spec = write_spec(AWS)
    ctl = controller(spec, repo, clock)
    ctl.tick()
    first_cost = re.search(r"^Cost: (\$[0-9.]+/h)", messages(repo)[0], re.MULTILINE)
    assert first_cost is not None
    hook = fail_commits(repo)
    victim = preempt(ctl, "use1-az1")
    clock.advance(5)
    with pytest.raises(StateError, match="hook: rejected"):
        ctl.tick()
    assert len(messages(repo)) == 2  # the user's and the first
    hook.unlink()
    if retried_by == "a restarted watcher":
        ctl = controller(spec, repo, clock)
    clock.advance(5)
    ctl.tick()
    msg = messages(repo)[0]
    assert msg.startswith(f"skyhedge: svc: replace preempted {victim}")
    created, deleted = plus_minus(msg)
    assert deleted == [victim] and len(created) == 1
    assert f"Cost: {first_cost[1]} -> " in msg
    assert git(repo, "status", "--porcelain") == ""


def test_a_removal_whose_commit_failed_is_committed_as_that_removal(tmp_path, repo, write_spec):
    clock = Clock(1_700_000_000.0)
    spec = write_spec(LOCAL)
    ctl = controller(spec, repo, clock)
    ctl.tick()
    (repo / ".git" / "index.lock").write_text("")
    ctl = controller(write_spec(LOCAL.replace("min_replicas: 2", "min_replicas: 1")), repo, clock)
    clock.advance(5)
    ctl.tick()  # the apply's `git add` fails: counted as a failed apply, retried
    assert ctl.last_apply is not None and ctl.last_apply.errors
    (repo / ".git" / "index.lock").unlink()
    clock.advance(5)
    ctl.tick()
    msg = messages(repo)[0]
    created, deleted = plus_minus(msg)
    assert msg.startswith(f"skyhedge: svc: remove {deleted[0]}") and created == [] and len(deleted) == 1


# --- 7: the subject follows the plan; zone events and spec reloads go to the body -------------


def test_a_spec_edit_after_a_zone_event_is_not_a_move_off_the_zone(tmp_path, repo, write_spec):
    from skyhedge.controller.runner import Watcher

    path = write_spec(LOCAL)
    with Watcher(load_spec(path), tmp_path / "state", gitops=repo, spec_path=path) as w:
        assert w.controller is not None
        w._tick()
        fake = FakeSource()
        w.controller.sources.append(fake)
        fake.queue.append(
            PreemptionEvent(
                Signal.ZONE_LOST, w.clock(), "fake", location=Location.parse("local/local/local-a")
            )
        )
        w._tick()
        assert len(messages(repo)) == 2  # the zone event alone changed no replica: no commit
        edit_spec(path, "min_replicas: 2", "min_replicas: 3")
        w._tick()
        msg = messages(repo)[0]
        assert msg.startswith("skyhedge: svc: scale to 4 replicas"), msg
        assert "Spec reloaded: replica_policy.min_replicas: 2 -> 3" in msg
        assert "zone in local/local/local-a (preempted at" in msg
        created, deleted = plus_minus(msg)
        assert len(created) == 1 and deleted == []
        edit_spec(path, "min_replicas: 3", "min_replicas: 2")
        w._tick()
        msg = messages(repo)[0]
        created, deleted = plus_minus(msg)
        assert msg.startswith(f"skyhedge: svc: remove {deleted[0]}"), msg
        assert "Spec reloaded: replica_policy.min_replicas: 3 -> 2" in msg and created == []
        assert "Preempted:" not in msg  # the zone event was in the last commit


# --- 8: watcher.json is machine-specific and documented as ignored ----------------------------


def documented_gitignore() -> str:
    readme = (REPO_ROOT / "examples" / "gitops" / "README.md").read_text()
    block = readme.split("A `.gitignore`", 1)[1].split("```", 2)[1]
    return block.strip() + "\n"


def test_with_the_documented_gitignore_the_working_copy_is_clean_while_the_watcher_runs(repo, write_spec):
    from skyhedge.controller.runner import Watcher

    (repo / ".gitignore").write_text(documented_gitignore())
    git(repo, "add", ".gitignore")
    git(repo, "commit", "-qm", "ignore")
    seen: list[str] = []

    def look() -> bool:
        assert (repo / "state" / "watcher.json").is_file()
        seen.append(git(repo, "status", "--porcelain", "--untracked-files=all"))
        return True

    path = write_spec(LOCAL)
    with Watcher(load_spec(path), repo / "state", gitops=repo, spec_path=path) as w:
        w.run(until=look, handle_signals=False)
    assert seen == [""]


def test_the_refusal_of_an_ignored_state_dir_names_watcher_json_among_what_to_ignore(repo, write_spec):
    (repo / ".gitignore").write_text("state/\n")
    with pytest.raises(StateError, match=r"ignore only state\.lock, watcher\.json, tf/, local/ and router/"):
        GitOpsExecutor(load_spec(write_spec(LOCAL)), repo / "state", repo)


# --- 9: a tree file the repository ignores is refused, not left out ---------------------------


def _watch_once_ignoring(rule: str, tmp_path: Path, repo: Path, write_spec) -> str:
    """`watch --gitops --once` in a repository whose .gitignore holds `rule`: refused (exit 1),
    nothing committed and nothing left staged (a commit of the user's own would take a tree CI
    cannot apply); returns the error line."""
    (repo / ".gitignore").write_text(f"{rule}\n")
    git(repo, "add", ".gitignore")
    git(repo, "commit", "-qm", "ignore some of the tree")
    args = ["watch", str(write_spec(LOCAL)), "--state-dir", str(tmp_path / "st"), "--gitops", str(repo)]
    out = CliRunner().invoke(main, [*args, "--once"])
    assert out.exit_code == 1
    assert len(messages(repo)) == 2  # nothing committed
    assert git(repo, "diff", "--cached", "--name-only").strip() == ""
    return out.output.strip().splitlines()[-1]


def test_a_repository_ignoring_the_trees_files_is_refused_in_one_line(tmp_path, repo, write_spec):
    last = _watch_once_ignoring("*.json", tmp_path, repo, write_spec)
    assert (
        last.startswith("error: gitops: infra/") and "is ignored by git (.gitignore line 1: *.json)" in last
    )
    assert "stop ignoring the tree's files in .gitignore" in last


@pytest.mark.parametrize("rule", ["infra/", "infra"])
def test_a_repository_ignoring_the_trees_folder_names_the_file_and_the_rule(tmp_path, repo, write_spec, rule):
    """Ignoring the whole folder made `git add` fail first, and the one line said only "The
    following paths are ignored by one of your .gitignore files:" (found by an audit)."""
    last = _watch_once_ignoring(rule, tmp_path, repo, write_spec)
    assert last.startswith("error: apply failed: gitops: infra/"), last
    assert f"is ignored by git (.gitignore line 1: {rule})" in last


# --- 10: a --gitops-path the tree cannot own is refused at start --------------------------------


def test_gitops_path_without_gitops_is_a_usage_error_not_an_apply(tmp_path, write_spec):
    """Forgetting `--gitops` once ran the watcher in apply mode on the GitOps state: it launched
    the committed replicas itself and turned GitOps mode off (found by an audit)."""
    state, spec = tmp_path / "st", write_spec(LOCAL)
    args = ["watch", str(spec), "--state-dir", str(state), "--gitops-path", "infra", "--once"]
    try:
        out = CliRunner().invoke(main, args)
    finally:  # before the fix it applied: leave no replica or nginx behind
        if state.exists():
            CliRunner().invoke(main, ["destroy", str(spec), "--state-dir", str(state), "--auto-approve"])
    assert out.exit_code == 1
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: --gitops-path is where --gitops writes the tree: give --gitops REPO_DIR")
    assert not state.exists()  # nothing planned, launched or recorded


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("service.yaml", "is a file, not a folder"),
        ("state", "the state dir"),
        ("docs", "is not empty and holds no skyhedge-rendered tree"),
        ("infra", "holds a git repository (.git), which replacing the tree would delete"),
    ],
)
def test_a_gitops_path_the_tree_cannot_own_is_refused_at_start_in_one_line(repo, path, says):
    (repo / "service.yaml").write_text(LOCAL)
    (repo / "docs").mkdir()
    (repo / "docs" / "runbook.md").write_text("x\n")
    (repo / "infra").mkdir()  # a rendered tree made a submodule: its .git is a file
    (repo / "infra" / "skyhedge-tree.json").write_text("{}\n")
    (repo / "infra" / ".git").write_text("gitdir: ../.git/modules/infra\n")
    args = ["watch", str(repo / "service.yaml"), "--state-dir", str(repo / "state"), "--gitops", str(repo)]
    out = CliRunner().invoke(main, [*args, "--gitops-path", path, "--once"])
    assert out.exit_code == 1
    (line,) = out.output.strip().splitlines()
    assert line.startswith(f"error: --gitops-path {path}: ") and says in line
    assert not (repo / "state").exists()  # refused before the state dir was taken, no plan recorded


# --- 12: the probe path's whitespace is named as what it is -----------------------------------


@pytest.mark.parametrize(("char", "name"), [("\n", "a newline"), ("\t", "a tab"), (" ", "a space")])
def test_whitespace_in_the_probe_path_is_named_as_what_it_is(write_spec, char, name):
    text = LOCAL + f"readiness_probe: {{path: {json.dumps('/health' + char + 'x')}}}\n"
    with pytest.raises(SpecError, match=f"got {name} at character 8"):
        load_spec(write_spec(text))
