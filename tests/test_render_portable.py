"""A rendered tree leaves the machine that rendered it: GitOps commits it, and CI (or another
clone, another user, another install of skyhedge) applies it, with skyhedge or with the plain
`terraform` binary. So it names no path of the rendering machine: not the interpreter or the
site-packages skyhedge was installed in, not the clone's or the user's directories."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from local_support import SERVER, free_base_port, get, spec_dict

import skyhedge
from skyhedge.clouds import RenderContext
from skyhedge.clouds.local import runtime_dir
from skyhedge.clouds.local.processes import kill_all
from skyhedge.planner import CREATE, Plan, PlannedReplica
from skyhedge.policy.types import Location, Market
from skyhedge.render import BACKEND_FILE, TFVARS_FILE, render_tree, write_tree
from skyhedge.spec import parse_spec

TERRAFORM_BIN = shutil.which("terraform")
CHECKOUT = Path(skyhedge.__file__).resolve().parent.parent


def local_plan() -> Plan:
    replicas = tuple(
        PlannedReplica(rid, Location("local", "local", zone), Market.SPOT, CREATE, 0.0)
        for rid, zone in (("r-0001", "local-a"), ("r-0002", "local-b"))
    )
    return Plan("portable", 2, "test", replicas, 100, 0.0)


def render_in(base: Path, venv: str) -> dict[str, bytes]:
    """Render the local tree of a repository at `base` (spec, state and tree in it), as a
    skyhedge installed in the venv `venv` would."""
    data = {
        "name": "portable",
        "placement": {"clouds": ["local"]},
        # no run.workdir: the replicas run where skyhedge runs (a set one is digested into the
        # replicas' revision as the absolute path it is on this machine)
        "run": {"command": "python3 server.py"},
        "terraform": {"backend": "local", "config": {"path": "tfstate"}},
    }
    base.mkdir(parents=True)
    spec = parse_spec(data, source=str(base / "service.yaml"))
    context = RenderContext(
        state_dir=base / "state",
        workdir=base / "app",
        python=f"{venv}/bin/python",
        pythonpath=f"{venv}/lib/python3.11/site-packages",
        tree_dir=base / "infra",
    )
    out = base / "infra"
    write_tree(render_tree(spec, local_plan(), context=context), out)
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_two_installs_and_two_clones_render_the_same_tree_naming_no_path_of_theirs(tmp_path):
    """The local roots named the interpreter and site-packages of the install that rendered them
    and the clone's absolute directories (found by the GitOps audit): two venvs rendered two trees,
    and a committed tree failed on every other machine (`fork/exec /home/me/venv/bin/python: no
    such file or directory`), or wrote its replicas' pid files into the first clone's folders."""
    one = render_in(tmp_path / "alice" / "repo", "/home/alice/venv")
    other = render_in(tmp_path / "ci" / "work" / "repo", "/opt/ci/venv2")
    assert one == other
    text = b"".join(one.values()).decode()
    for machine in (str(tmp_path), "/home/alice", "/opt/ci", "/site-packages"):
        assert machine not in text
    tfvars = json.loads(one[f"local/local/{TFVARS_FILE}"])
    assert tfvars["runtime_dir"] == "../../../state/local"  # from the root's folder
    assert tfvars["run"]["workdir"] == "../../../app"
    assert tfvars["launcher"] == {"python": "", "pythonpath": ""}  # the applying machine's
    assert json.loads(one[f"local/local/{BACKEND_FILE}"]) == {"path": "../../../tfstate/local-local.tfstate"}


def test_skyhedge_render_writes_no_path_of_its_install_or_of_this_machine(tmp_path, monkeypatch):
    """`skyhedge render` as a CI would run it: the rendered text holds neither the interpreter nor
    the folder skyhedge is imported from, nor any absolute path of the directory it ran in."""
    from skyhedge.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "service.yaml").write_text(
        yaml.safe_dump(spec_dict("portable-cli", 30000, replicas=2, command="python3 -m http.server $PORT"))
    )
    result = CliRunner().invoke(main, ["render", "service.yaml", "--out", "infra", "--state-dir", "state"])
    assert result.exit_code == 0, result.output
    text = "".join(p.read_text() for p in (tmp_path / "infra").rglob("*") if p.is_file())
    for machine in (sys.executable, str(CHECKOUT), sys.prefix, str(tmp_path)):
        assert machine not in text


@pytest.fixture
def clone_dirs(tmp_path):
    """Where the test's replicas may run; whatever still runs there is killed at the end."""
    dirs = [tmp_path / "rendered", tmp_path / "clone"]
    yield dirs
    for base in dirs:
        kill_all(runtime_dir(base / "state"))


@pytest.mark.skipif(TERRAFORM_BIN is None, reason="needs the terraform binary")
def test_a_committed_local_tree_applies_with_plain_terraform_from_another_clone(tmp_path, clone_dirs):
    """The README's `cd <root>; terraform init ...; terraform apply` in a clone of the repository at
    another path, with the rendering clone gone: the replicas start, under the clone's own state
    folder, and `terraform destroy` stops them."""
    from skyhedge.cli import main

    rendered, clone = clone_dirs
    (rendered / "app").mkdir(parents=True)
    (rendered / "app" / "server.py").write_text(SERVER)
    base = free_base_port(4)
    spec = spec_dict("portable-tf", base, replicas=2, command="exec python3 server.py")
    spec["run"]["workdir"] = "app"
    (rendered / "service.yaml").write_text(yaml.safe_dump(spec))
    args = ["render", str(rendered / "service.yaml"), "--out", str(rendered / "infra")]
    result = CliRunner().invoke(main, [*args, "--state-dir", str(rendered / "state")])
    assert result.exit_code == 0, result.output
    shutil.copytree(rendered, clone)
    shutil.rmtree(rendered)
    (tmp_path / "terraformrc").write_text("")
    env = {
        **os.environ,
        "TF_CLI_CONFIG_FILE": str(tmp_path / "terraformrc"),
        "CHECKPOINT_DISABLE": "1",
        "TF_IN_AUTOMATION": "1",
        # the machine applying it names its own launcher (here: this checkout's skyhedge)
        "SKYHEDGE_LAUNCHER_PYTHON": sys.executable,
        "PYTHONPATH": str(CHECKOUT),
    }
    root = clone / "infra" / "local" / "local"

    def terraform(*argv: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [TERRAFORM_BIN, *argv, "-input=false", "-no-color"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    terraform("init", "-backend-config=backend.tfbackend.json")
    terraform("apply", "-auto-approve")
    deadline = time.monotonic() + 20
    while True:
        try:
            answers = [get(f"http://127.0.0.1:{base + n}/health")[1] for n in (1, 2)]
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert answers == [{"replica": "r-0001"}, {"replica": "r-0002"}]
    assert sorted(p.name for p in (clone / "state" / "local" / "replicas").glob("*.json")) == [
        "r-0001.json",
        "r-0002.json",
    ]
    assert not rendered.exists()
    terraform("destroy", "-auto-approve")
    assert kill_all(runtime_dir(clone / "state")) == []


def render_outside(repo: Path, outside: Path) -> dict[str, Any]:
    """The tfvars and backend settings of the local root of a repository at `repo` whose spec
    names a local backend by an absolute path, and whose state dir is not in the repository:
    both under `outside`."""
    data = {
        "name": "portable",
        "placement": {"clouds": ["local"]},
        "run": {"command": "python3 server.py"},
        "terraform": {"backend": "local", "config": {"path": str(outside / "srv" / "tfstate")}},
    }
    (repo / ".git").mkdir(parents=True)
    spec = parse_spec(data, source=str(repo / "service.yaml"))
    context = RenderContext(
        state_dir=outside / "var" / "state",
        workdir=repo / "app",
        python=sys.executable,
        pythonpath=str(CHECKOUT),
        tree_dir=repo / "deploy" / "infra",
    )
    out = repo / "deploy" / "infra"
    write_tree(render_tree(spec, local_plan(), context=context), out)
    return {
        **json.loads((out / "local" / "local" / TFVARS_FILE).read_text()),
        "backend": json.loads((out / "local" / "local" / BACKEND_FILE).read_text()),
    }


def test_a_path_outside_the_repository_stays_absolute_so_a_clone_at_another_depth_finds_it(tmp_path):
    """A local backend the spec names by an absolute path (`path: /srv/tfstate`) and a state dir
    outside the repository were written relative to the root (`../../../../../srv/tfstate/...`):
    the committed tree, applied from a clone at another depth (CI's `/builds/group/job/repo`),
    resolved them to another folder, found no state there and planned every replica anew (`2 to
    add` for the 2 running), their pid files in a folder nobody reads. Paths in the repository
    stay relative."""
    shallow = render_outside(tmp_path / "repo", tmp_path)
    deep = render_outside(tmp_path / "ci" / "builds" / "job" / "repo", tmp_path)
    assert shallow == deep
    assert shallow["backend"] == {"path": str(tmp_path / "srv" / "tfstate" / "local-local.tfstate")}
    assert shallow["runtime_dir"] == str(runtime_dir(tmp_path / "var" / "state"))
    assert shallow["run"]["workdir"] == "../../../../app"  # in the repository: relative
