"""Rendering: deterministic bytes, fmt-clean HCL, spec values only in JSON, atomic tree writes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from skyhedge.clouds import RenderContext
from skyhedge.clouds.local.render import replica_port
from skyhedge.engine import Terraform
from skyhedge.errors import RenderError, SpecError
from skyhedge.planner import CREATE, DELETE, KEEP, Plan, PlannedReplica
from skyhedge.policy.types import Location, Market
from skyhedge.render import BACKEND_FILE, TFVARS_FILE, TREE_MANIFEST, backend_config, render_tree, write_tree
from skyhedge.service import compute_plan, resolve_placement
from skyhedge.spec import parse_spec, replica_revision
from skyhedge.state import ServiceState

TERRAFORM_BIN = shutil.which("terraform")
EVIL = "q\"uote 's ${path.module} %{if true}x%{endif} $(id) `id`\nnext line \\ end"


def spec_of(clouds=("local",), **extra):
    data = {
        "name": "render-test",
        "placement": {"clouds": list(clouds)},
        "resources": {
            "local_base_port": 30000,
            "instance_type": {"aws": "g6.xlarge", "gcp": "g2-standard-4"},
        },
        "run": {"command": f"python3 server.py --flag '{EVIL}'", "env": {"EVIL": EVIL, "A": "1"}},
        **extra,
    }
    if "local" in clouds and len(clouds) == 1:
        del data["resources"]["instance_type"]
    return parse_spec(data, source="/tmp/specs/service.yaml")


def plan_of(*rows: tuple[str, str, str, str, str, str]) -> Plan:
    replicas = tuple(
        PlannedReplica(rid, Location(cloud, region, zone), Market(market), action, 0.0)
        for rid, cloud, region, zone, market, action in rows
    )
    return Plan("render-test", len(replicas), "test", replicas, 100, 0.0)


CTX = RenderContext(Path("/srv/state").resolve(), Path("/srv/work"), sys.executable, "/opt/skyhedge")
TYPES = {"aws": "g6.xlarge", "gcp": "g2-standard-4", "local": "local"}

MULTI = plan_of(
    ("r-0001", "aws", "us-east-1", "use1-az1", "spot", CREATE),
    ("r-0002", "aws", "us-east-1", "use1-az2", "on-demand", KEEP),
    ("r-0003", "aws", "us-west-2", "usw2-az1", "spot", CREATE),
    ("r-0004", "gcp", "us-central1", "us-central1-a", "spot", CREATE),
    ("r-0005", "aws", "eu-west-1", "euw1-az1", "spot", DELETE),
)
LOCAL = plan_of(
    ("r-0001", "local", "local", "local-a", "spot", CREATE),
    ("r-0002", "local", "local", "local-b", "spot", CREATE),
    ("r-0003", "local", "local", "local-c", "on-demand", KEEP),
)


def files_of(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_rendering_twice_gives_byte_identical_trees(tmp_path):
    spec = spec_of(("aws", "gcp"))
    first = render_tree(spec, MULTI, context=CTX, instance_types=TYPES)
    second = render_tree(spec, MULTI, context=CTX, instance_types=TYPES)
    assert first == second
    write_tree(first, tmp_path / "a")
    write_tree(second, tmp_path / "b")
    write_tree(second, tmp_path / "b")  # re-rendering over itself changes nothing
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    assert [r.path for r in first.roots] == [
        "aws/eu-west-1",
        "aws/us-east-1",
        "aws/us-west-2",
        "gcp/us-central1",
    ]
    # a root whose replicas are all deleted is still rendered, empty, so applying it destroys them
    assert first.root("aws", "eu-west-1").replicas == ()
    tfvars = json.loads((tmp_path / "a" / "aws" / "us-east-1" / TFVARS_FILE).read_text())
    assert tfvars["replicas"] == {
        "r-0001": {"zone": "use1-az1", "market": "spot"},
        "r-0002": {"zone": "use1-az2", "market": "on-demand"},
    }
    manifest = json.loads((tmp_path / "a" / TREE_MANIFEST).read_text())
    assert [r["path"] for r in manifest["roots"]] == [r.path for r in first.roots]
    assert (tmp_path / "a" / "modules" / "aws-replicas" / "main.tf").is_file()
    assert (tmp_path / "a" / "modules" / "gcp-replicas" / "main.tf").is_file()
    assert not (tmp_path / "a" / "modules" / "local-replicas").exists()


@pytest.mark.parametrize(
    "binary", [None, TERRAFORM_BIN] if TERRAFORM_BIN else [None], ids=["embedded", "binary"][:2]
)
def test_the_rendered_tree_is_terraform_fmt_clean(tmp_path, binary):
    out = tmp_path / "tree"
    tree = render_tree(spec_of(("aws", "gcp")), MULTI, context=CTX, instance_types=TYPES)
    write_tree(tree, out)
    local = tmp_path / "local-tree"
    write_tree(render_tree(spec_of(), LOCAL, context=CTX, instance_types=TYPES), local)
    engine = Terraform(home=tmp_path / "home", binary=binary)
    assert engine.fmt_check(out) == []
    assert engine.fmt_check(local) == []
    (out / "aws" / "us-east-1" / "main.tf").write_text('terraform {\nrequired_version="1"\n}\n')
    assert engine.fmt_check(out) == ["aws/us-east-1/main.tf"]  # the check can fail


def test_spec_values_reach_terraform_only_as_json(tmp_path):
    out = tmp_path / "tree"
    for spec, plan in ((spec_of(), LOCAL), (spec_of(("aws", "gcp")), MULTI)):
        tree = render_tree(spec, plan, context=CTX, instance_types=TYPES)
        write_tree(tree, out)
        for path in out.rglob("*.tf"):
            text = path.read_text()
            for needle in ("server.py", "EVIL", "render-test", "usw2-az1", "$(id)"):
                assert needle not in text, f"{needle!r} spliced into {path}"
        for root in tree.roots:
            tfvars = json.loads((out / root.path / TFVARS_FILE).read_text())
            assert tfvars["run"]["env"]["EVIL"] == EVIL
            assert tfvars["run"]["command"] == f"python3 server.py --flag '{EVIL}'"
            assert tfvars["service"] == "render-test"


def test_local_inputs_carry_ports_runtime_and_launcher():
    tree = render_tree(spec_of(), LOCAL, context=CTX, instance_types=TYPES)
    tfvars = json.loads(dict(tree.files)[f"local/local/{TFVARS_FILE}"])
    assert tfvars["replicas"]["r-0002"] == {
        "zone": "local-b",
        "market": "spot",
        "port": 30002,
        "revision": replica_revision(spec_of()),
    }
    assert tfvars["runtime_dir"] == str(CTX.state_dir / "local")
    assert tfvars["run"]["workdir"] == "/srv/work"
    assert tfvars["launcher"] == {"python": sys.executable, "pythonpath": "/opt/skyhedge"}


def test_local_cloud_needs_a_command_and_ports_wrap_past_the_highest():
    with pytest.raises(SpecError, match="run.command"):  # refused when read, before any plan
        parse_spec({"name": "x", "placement": {"clouds": ["local"]}, "run": {"image": "nginx"}})
    big = parse_spec(
        {
            "name": "x",
            "placement": {"clouds": ["local"]},
            "resources": {"local_base_port": 60000},
            "run": {"command": "true"},
        }
    )
    # IDs grow for ever: past the highest port they wrap to the bottom of the range (a service
    # used to stop launching for good there: "would listen on port 65536")
    assert replica_port(big, "r-5535") == 65535 and replica_port(big, "r-5536") == 60001
    tree = render_tree(big, plan_of(("r-9000", "local", "local", "local-a", "spot", CREATE)), context=CTX)
    tfvars = json.loads(dict(tree.files)[f"local/local/{TFVARS_FILE}"])
    assert tfvars["replicas"]["r-9000"]["port"] == 60000 + 1 + (9000 - 1) % 5535 == 63465


def test_root_digests_change_only_where_the_inputs_do():
    spec = spec_of(("aws", "gcp"))
    before = render_tree(spec, MULTI, context=CTX, instance_types=TYPES)
    moved = plan_of(
        ("r-0001", "aws", "us-east-1", "use1-az1", "spot", KEEP),
        ("r-0002", "aws", "us-east-1", "use1-az2", "on-demand", KEEP),
        ("r-0003", "aws", "us-west-2", "usw2-az1", "spot", DELETE),
        ("r-0006", "aws", "us-west-2", "usw2-az2", "spot", CREATE),
        ("r-0004", "gcp", "us-central1", "us-central1-a", "spot", KEEP),
    )
    after = render_tree(spec, moved, context=CTX, instance_types=TYPES)
    changed = {r.path for r in after.roots if before.root(r.cloud, r.region).digest != r.digest}
    assert changed == {"aws/us-west-2"}
    edited = render_tree(
        spec_of(("aws", "gcp"), run={"command": "other"}), moved, context=CTX, instance_types=TYPES
    )
    assert all(edited.root(r.cloud, r.region).digest != r.digest for r in after.roots)


def test_backend_settings_give_every_root_its_own_state():
    s3 = spec_of(terraform={"backend": "s3", "config": {"bucket": "b", "region": "us-east-1", "key": "svc/"}})
    assert backend_config(s3, "aws", "us-west-2") == {
        "bucket": "b",
        "region": "us-east-1",
        "key": "svc/aws/us-west-2/terraform.tfstate",
        "use_lockfile": True,
        "encrypt": True,
    }
    gcs = spec_of(terraform={"backend": "gcs", "config": {"bucket": "b"}})
    assert backend_config(gcs, "gcp", "us-east4") == {
        "bucket": "b",
        "prefix": "skyhedge/render-test/gcp/us-east4",
    }
    local = spec_of(terraform={"backend": "local", "config": {"path": "tfstate"}})
    assert backend_config(local, "local", "local") == {"path": "/tmp/specs/tfstate/local-local.tfstate"}
    tree = render_tree(s3, LOCAL, context=CTX, instance_types=TYPES)
    files = dict(tree.files)
    assert b'backend "s3" {}' in files["local/local/main.tf"]
    assert json.loads(files[f"local/local/{BACKEND_FILE}"])["use_lockfile"] is True


def test_write_tree_is_atomic_and_keeps_terraform_working_files(tmp_path):
    out = tmp_path / "infra"
    tree = render_tree(spec_of(), LOCAL, context=CTX, instance_types=TYPES)
    write_tree(tree, out)
    root = out / "local" / "local"
    (root / ".terraform.lock.hcl").write_text("lock")
    (root / "terraform.tfstate").write_text('{"version": 4}')
    (root / ".terraform" / "modules").mkdir(parents=True)
    (root / ".terraform" / "modules" / "modules.json").write_text("{}")
    (root / "stray.tf").write_text("# not rendered: goes away from the state's own tree")
    write_tree(tree, out, strict=False)
    assert (root / ".terraform.lock.hcl").read_text() == "lock"
    assert (root / "terraform.tfstate").read_text() == '{"version": 4}'
    assert (root / ".terraform" / "modules" / "modules.json").is_file()
    assert not (root / "stray.tf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["infra"]  # no temp or backup dirs left
    _render_without_the_local_root_is_refused(out)
    assert (root / "terraform.tfstate").is_file()


def test_a_file_a_user_added_to_the_tree_is_refused_in_one_line_never_deleted(tmp_path):
    """The swap replaced every file the plan does not render: a note, a script or an `override.tf`
    a team added to its GitOps tree was gone after the next `skyhedge render`, without a word
    (found by the GitOps audit). It is refused instead, naming it; Terraform's scratch files and
    the roots the plan dropped still go."""
    out = tmp_path / "infra"
    write_tree(render_tree(spec_of(("aws", "gcp")), MULTI, context=CTX, instance_types=TYPES), out)
    (out / "NOTES.md").write_text("ours")
    (out / "extra").mkdir()
    (out / "extra" / "a.tf").write_text("# ours")
    (out / "aws" / "us-east-1" / "override.tf").write_text("# ours")
    (out / "aws" / "us-east-1" / "crash.log").write_text("Terraform's")
    (out / "aws" / "us-west-2" / "old.tfplan").write_text("Terraform's")
    before = files_of(out)
    fewer = plan_of(("r-0001", "aws", "us-east-1", "use1-az1", "spot", CREATE))
    tree = render_tree(spec_of(("aws",)), fewer, context=CTX, instance_types=TYPES)
    with pytest.raises(RenderError) as refused:
        write_tree(tree, out)
    assert str(refused.value) == (
        f"{out}/NOTES.md (and 2 more: aws/us-east-1/override.tf, extra/a.tf): not a file skyhedge "
        "renders, and the re-rendered tree would replace it; move it out of the tree (or delete it) "
        "and render again"
    )
    assert files_of(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["infra"]
    for name in ("NOTES.md", "extra/a.tf", "aws/us-east-1/override.tf"):
        (out / name).unlink()
    write_tree(tree, out)
    assert sorted(files_of(out)) == sorted(name for name, _ in tree.files)  # dropped roots: gone
    assert not (out / "aws" / "us-west-2").exists() and not (out / "gcp").exists()


#: What an operating system or an editor leaves in a tree someone browsed or edited (`is_litter`).
LITTER = (
    ".DS_Store",
    "aws/us-east-1/.main.tf.swp",
    "aws/us-east-1/.variables.tf.swo",
    "aws/us-east-1/main.tf~",
    "aws/us-east-1/4913",
    "modules/aws-replicas/Thumbs.db",
    "gcp/us-central1/.DS_Store",  # in a root the next plan drops
)


def test_litter_of_an_os_or_editor_neither_blocks_a_render_nor_is_deleted(tmp_path):
    """A `.DS_Store` Finder left, a vim swap file of an edit in progress or an emacs lock in the
    tree was refused as a file skyhedge does not render: every render (and every `--gitops` pass)
    failed until it was deleted by hand. It is kept where it is, as it is (an emacs lock as the
    dangling link it is, in a root the plan dropped too), while a real foreign file is still
    refused, alone."""
    out = tmp_path / "infra"
    write_tree(render_tree(spec_of(("aws", "gcp")), MULTI, context=CTX, instance_types=TYPES), out)
    for n, name in enumerate(LITTER):
        (out / name).write_bytes(f"litter {n}".encode())
    (out / "aws" / "us-east-1" / ".#main.tf").symlink_to("me@laptop.4242:1764547200")
    fewer = plan_of(("r-0001", "aws", "us-east-1", "use1-az1", "spot", CREATE))
    tree = render_tree(spec_of(("aws",)), fewer, context=CTX, instance_types=TYPES)
    (out / "NOTES.md").write_text("ours")
    with pytest.raises(RenderError) as refused:
        write_tree(tree, out)
    assert str(refused.value).startswith(f"{out}/NOTES.md: not a file skyhedge renders, and")
    (out / "NOTES.md").unlink()
    write_tree(tree, out)
    for n, name in enumerate(LITTER):
        assert (out / name).read_bytes() == f"litter {n}".encode(), name
    assert os.readlink(out / "aws" / "us-east-1" / ".#main.tf") == "me@laptop.4242:1764547200"
    rendered = {name for name, _ in tree.files}
    assert set(files_of(out)) == rendered | set(LITTER)  # the dropped roots' own files: gone
    assert not (out / "aws" / "us-west-2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["infra"]
    write_tree(tree, out)  # and again: the litter stays
    assert set(files_of(out)) == rendered | set(LITTER)
    gitignore = files_of(out)[".gitignore"].decode()
    for pattern in (".DS_Store", "Thumbs.db", ".*.sw[a-p]", "*~", ".#*", "4913"):
        assert pattern in gitignore.splitlines()


def test_a_new_folder_holding_only_litter_takes_a_tree(tmp_path):
    """A folder made for the tree and opened in Finder first (a `.DS_Store`) was refused as "not
    empty and not a skyhedge-rendered tree"; a folder with a file of someone's still is."""
    out = tmp_path / "infra"
    out.mkdir()
    (out / ".DS_Store").write_bytes(b"finder")
    tree = render_tree(spec_of(), LOCAL, context=CTX, instance_types=TYPES)
    write_tree(tree, out)
    assert (out / ".DS_Store").read_bytes() == b"finder" and (out / TREE_MANIFEST).is_file()
    other = tmp_path / "other"
    other.mkdir()
    (other / ".DS_Store").write_bytes(b"finder")
    (other / "notes.txt").write_text("ours")
    with pytest.raises(RenderError, match="not empty and not a skyhedge-rendered tree"):
        write_tree(tree, other)


def test_an_override_file_added_to_a_module_copy_is_refused_too(tmp_path):
    """A file in a module folder skyhedge ships is taken as an older release's and swapped away;
    an `override.tf` there went too, without a word, although Terraform reads it (a team's
    patch of the copied module: tags, a lifecycle rule) and no skyhedge module ever had one."""
    out = tmp_path / "infra"
    tree = render_tree(spec_of(), LOCAL, context=CTX, instance_types=TYPES)
    write_tree(tree, out)
    module = out / "modules" / "local-replicas"
    for name in ("override.tf", "tags_override.tf.json"):
        (module / name).write_text("# ours")
    with pytest.raises(RenderError, match=r"modules/local-replicas/override.tf \(and 1 more: "):
        write_tree(tree, out)
    assert (module / "override.tf").read_text() == "# ours"
    (module / "override.tf").unlink()
    (module / "tags_override.tf.json").unlink()
    write_tree(tree, out)


def test_render_refuses_a_link_a_user_added_to_the_tree(tmp_path):
    out = tmp_path / "infra"
    tree = render_tree(spec_of(), LOCAL, context=CTX, instance_types=TYPES)
    write_tree(tree, out)
    (out / "docs").symlink_to(tmp_path)
    with pytest.raises(RenderError, match=r"infra/docs: not a file skyhedge renders"):
        write_tree(tree, out)
    assert (out / "docs").is_symlink()


def _render_without_the_local_root_is_refused(out: Path) -> None:
    other = plan_of(("r-0001", "aws", "us-east-1", "use1-az1", "spot", CREATE))
    with pytest.raises(RenderError, match="holds Terraform state"):
        write_tree(render_tree(spec_of(("aws",)), other, context=CTX, instance_types=TYPES), out)


def test_a_root_holding_a_workspaces_state_is_not_dropped_either(tmp_path):
    out = tmp_path / "infra"
    write_tree(render_tree(spec_of(), LOCAL, context=CTX, instance_types=TYPES), out)
    workspace = out / "local" / "local" / "terraform.tfstate.d" / "prod"
    workspace.mkdir(parents=True)
    (workspace / "terraform.tfstate").write_text('{"version": 4, "resources": [{}]}')
    _render_without_the_local_root_is_refused(out)
    assert (workspace / "terraform.tfstate").is_file()


def test_state_in_a_folder_the_manifest_does_not_list_is_not_dropped_either(tmp_path):
    """Only the roots the old manifest listed were checked: state copied into another folder of
    the tree (by hand, or kept from an edited manifest) was deleted by the swap without a word
    (found by an audit)."""
    out = tmp_path / "infra"
    write_tree(render_tree(spec_of(), LOCAL, context=CTX, instance_types=TYPES), out)
    stray = out / "aws" / "us-east-1"
    stray.mkdir(parents=True)
    (stray / "terraform.tfstate").write_text('{"version": 4, "resources": [{}]}')
    with pytest.raises(RenderError, match=r"infra/aws/us-east-1: holds Terraform state but the plan has no"):
        write_tree(render_tree(spec_of(), LOCAL, context=CTX, instance_types=TYPES), out)
    assert (stray / "terraform.tfstate").is_file()


def test_a_root_whose_state_a_killed_run_left_only_in_its_backup_is_not_dropped(tmp_path):
    """`kill -9` while Terraform rewrites its state leaves terraform.tfstate empty and the real
    state in terraform.tfstate.backup (engine.restore_cut_short_state puts it back): dropping that
    root would lose the only record of live instances."""
    out = tmp_path / "infra"
    write_tree(render_tree(spec_of(), LOCAL, context=CTX, instance_types=TYPES), out)
    root = out / "local" / "local"
    (root / "terraform.tfstate").write_text("")
    (root / "terraform.tfstate.backup").write_text('{"version": 4, "resources": [{}]}')
    _render_without_the_local_root_is_refused(out)
    assert (root / "terraform.tfstate.backup").is_file()


def test_the_state_terraform_could_not_save_survives_a_re_render(tmp_path):
    """Terraform that cannot write its state (a full disk) leaves it whole in `errored.tfstate`
    in its working directory, the root's folder, and nowhere else: the next render's swap
    deleted it, with the only record of what that apply launched (engine.restore_errored_state
    puts it back), and a root dropped from the plan must not take it away either."""
    out = tmp_path / "infra"
    tree = render_tree(spec_of(), LOCAL, context=CTX, instance_types=TYPES)
    write_tree(tree, out)
    errored = out / "local" / "local" / "errored.tfstate"
    errored.write_text('{"version": 4, "serial": 3, "lineage": "l", "resources": [{}]}')
    write_tree(tree, out)
    assert errored.read_text() == '{"version": 4, "serial": 3, "lineage": "l", "resources": [{}]}'
    _render_without_the_local_root_is_refused(out)
    assert errored.is_file()


def test_write_tree_refuses_the_tree_of_another_service(tmp_path):
    # two services rendered into one directory (e.g. both `--gitops-path infra`) would silently
    # take over each other's roots and state keys
    out = tmp_path / "infra"
    write_tree(render_tree(spec_of(), LOCAL, context=CTX, instance_types=TYPES), out)
    before = files_of(out)
    other = dataclasses.replace(spec_of(), name="another-service")
    with pytest.raises(RenderError, match="holds the tree of service 'render-test', not 'another-service'"):
        write_tree(render_tree(other, LOCAL, context=CTX, instance_types=TYPES), out)
    assert files_of(out) == before


def test_the_swap_never_leaves_the_directory_missing(tmp_path):
    import threading

    from skyhedge.render import tree as tree_module

    if tree_module._renameat2() is None:
        pytest.skip("no renameat2 here: the swap is two renames")
    out = tmp_path / "infra"
    tree = render_tree(spec_of(), LOCAL, context=CTX, instance_types=TYPES)
    write_tree(tree, out)
    missing, done = [], threading.Event()

    def reader() -> None:
        while not done.is_set():
            if not (out / TREE_MANIFEST).is_file():
                missing.append(1)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(40):
            write_tree(tree, out)
    finally:
        done.set()
        thread.join()
    assert missing == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["infra"]


def test_write_tree_refuses_to_replace_a_directory_it_did_not_render(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(RenderError, match="not a skyhedge-rendered tree"):
        write_tree(render_tree(spec_of(), LOCAL, context=CTX), out)
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.parametrize("dot_git", ["folder", "file"])
def test_write_tree_refuses_a_rendered_tree_that_became_a_git_repository(tmp_path, dot_git):
    """A tree rendered once and then `git init`ed in place (or made a submodule or worktree,
    whose `.git` is a file) lost its repository, history and all, at the next render: the swap
    replaces every file the plan does not render. It is refused in one line, nothing touched."""
    out = tmp_path / "infra"
    tree = render_tree(spec_of(), LOCAL, context=CTX, instance_types=TYPES)
    write_tree(tree, out)
    if dot_git == "folder":
        (out / ".git" / "objects").mkdir(parents=True)
        (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    else:
        (out / ".git").write_text("gitdir: ../.git/modules/infra\n")
    before = files_of(out)
    with pytest.raises(RenderError, match=r"infra: holds a git repository \(\.git\), which replacing") as err:
        write_tree(tree, out)
    assert len(str(err.value).splitlines()) == 1
    assert files_of(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["infra"]


def test_write_tree_refuses_a_git_repository_nested_in_a_root_but_not_in_terraforms_own_folders(tmp_path):
    """A root `git init`ed in place went the same way as the whole tree. A git-sourced module
    keeps its `.git` under the root's `.terraform/`, which is carried over: no refusal there."""
    out = tmp_path / "infra"
    tree = render_tree(spec_of(), LOCAL, context=CTX, instance_types=TYPES)
    write_tree(tree, out)
    root = out / tree.roots[0].path
    (root / ".terraform" / "modules" / "m" / ".git").mkdir(parents=True)
    write_tree(tree, out)  # carried over as before
    assert (root / ".terraform" / "modules" / "m" / ".git").is_dir()
    (root / ".git").mkdir()
    with pytest.raises(RenderError, match=rf"infra: holds a git repository \({root}/\.git\)"):
        write_tree(tree, out)
    assert (root / ".git").is_dir()


def test_write_tree_writes_through_a_symlink_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "real"
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    write_tree(render_tree(spec_of(), LOCAL, context=CTX, instance_types=TYPES), link)
    write_tree(render_tree(spec_of(), LOCAL, context=CTX, instance_types=TYPES), link)
    assert link.is_symlink() and (target / TREE_MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


@pytest.mark.parametrize("below", ["", "infra"])
@pytest.mark.parametrize("python", ["this", "3.13"])
def test_write_tree_refuses_a_symlink_loop_in_one_line(tmp_path, monkeypatch, below, python):
    """Also as Python 3.13's `Path.resolve` treats a loop: it returns the path with the looping link
    left in it (os.path.realpath's answer) where 3.10-3.12 raise RuntimeError."""
    if python == "3.13":
        real_resolve = Path.resolve

        def resolve_as_313(self: Path, strict: bool = False) -> Path:
            return real_resolve(self, strict=True) if strict else Path(os.path.realpath(self))

        monkeypatch.setattr(Path, "resolve", resolve_as_313)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    out = loop / below if below else loop
    with pytest.raises(RenderError, match=rf"^{out}: cannot resolve the path \("):
        write_tree(render_tree(spec_of(), LOCAL, context=CTX, instance_types=TYPES), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop"]


@pytest.mark.parametrize(("where", "given"), [("infra", "."), ("infra", "abs"), ("infra/local", "abs")])
def test_write_tree_refuses_the_directory_the_shell_is_in(tmp_path, monkeypatch, where, given):
    out = tmp_path / "infra"
    tree = render_tree(spec_of(), LOCAL, context=CTX, instance_types=TYPES)
    write_tree(tree, out)
    before = files_of(out)
    monkeypatch.chdir(tmp_path / where)
    with pytest.raises(RenderError, match="is the current directory"):
        write_tree(tree, Path(".") if given == "." else out)
    assert files_of(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["infra"]


def test_cli_render_writes_the_tree_and_never_the_state(tmp_path, monkeypatch):
    from skyhedge.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "service.yaml").write_text(
        "name: cli-render\nplacement: {clouds: [local], zones: [local-a, local-b]}\n"
        "replica_policy: {min_replicas: 2, num_overprovision: 0, dynamic_ondemand_fallback: false,\n"
        "  policy: spothedge}\n"
        "run: {command: 'python3 -m http.server $PORT'}\n"
    )
    runner = CliRunner()
    args = ["render", "service.yaml", "--out", "infra", "--state-dir", "st"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    snapshot = files_of(tmp_path / "infra")
    assert runner.invoke(main, args).exit_code == 0
    assert files_of(tmp_path / "infra") == snapshot
    assert not (tmp_path / "st").exists()
    assert json.loads(snapshot[f"local/local/{TFVARS_FILE}"])["replicas"].keys() == {"r-0001", "r-0002"}
    (tmp_path / "infra" / "NOTES.md").write_text("ours")
    kept = runner.invoke(main, args)
    assert kept.exit_code == 1 and kept.output.count("\n") == 1, kept.output
    assert kept.output.startswith(f"error: {tmp_path}/infra/NOTES.md: not a file skyhedge renders")
    assert (tmp_path / "infra" / "NOTES.md").read_text() == "ours"
    bad = runner.invoke(main, ["render", "missing.yaml", "--out", "x"])
    assert bad.exit_code == 1 and "missing.yaml" in bad.output and not (tmp_path / "x").exists()


def test_the_gitops_example_renders_fmt_clean_and_its_ci_runs_the_checks(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "gitops"
    spec = parse_spec(
        __import__("yaml").safe_load((example / "service.yaml").read_text()), source="service.yaml"
    )
    placement = resolve_placement(spec)
    plan, _ = compute_plan(spec, ServiceState(service=spec.name), now=0.0, placement=placement)
    write_tree(
        render_tree(spec, plan, context=CTX, instance_types=placement.instance_types), tmp_path / "infra"
    )
    engine = Terraform(home=tmp_path / "home", binary=TERRAFORM_BIN)
    assert engine.fmt_check(tmp_path / "infra") == []
    backend = json.loads(next((tmp_path / "infra").glob(f"aws/*/{BACKEND_FILE}")).read_text())
    assert backend["use_lockfile"] is True and backend["key"].startswith("skyhedge/chat-llm/aws/")
    workflow = (example / ".github" / "workflows" / "skyhedge.yml").read_text()
    for step in (
        "skyhedge render",
        "terraform fmt -check -recursive",
        "skyhedge plan",
        "--detailed-exitcode",
        "terraform apply",
        "-backend-config=backend.tfbackend.json",
        "refs/heads/main",
    ):
        assert step in workflow


def test_a_local_setup_is_given_the_probes_initial_delay_to_finish():
    """A hanging `run.setup` held the apply for good (found by an audit): the launcher stops it
    after `setup_timeout`, which is the time a replica is given to come up."""
    run = {"command": "python3 server.py", "setup": "pip install -r req.txt"}
    spec = spec_of(run=run, readiness_probe={"path": "/health", "initial_delay_seconds": 600})
    tree = render_tree(spec, LOCAL, context=CTX, instance_types=TYPES)
    tfvars = json.loads(dict(tree.files)[f"local/local/{TFVARS_FILE}"])
    assert tfvars["run"]["setup"] == "pip install -r req.txt" and tfvars["run"]["setup_timeout"] == 600
    plain = render_tree(spec_of(), LOCAL, context=CTX, instance_types=TYPES)
    assert "setup_timeout" not in json.loads(dict(plain.files)[f"local/local/{TFVARS_FILE}"])["run"]
