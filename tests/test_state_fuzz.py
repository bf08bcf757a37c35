"""A damaged state file gets one line naming it, from every command that reads it.

Property test: a realistic state (a watcher's, after a preemption: live, gone and on-demand
replicas, policy memory, pending events, Terraform bookkeeping) with one value anywhere replaced
by something odd, a key dropped or an unknown one added. `plan --json` and `status --json` must
either work or exit 1 with one `error:` line: never a traceback (a `TypeError` deep in the
policy's restore, say), and never a rewritten state file.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_spec_fuzz import ODD_VALUES, _drop, _get, _paths, _set

from skyhedge.cli import main
from skyhedge.errors import StateError
from skyhedge.state import ServiceState, state_text

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_795_941_370.0


def _replica(
    rid: str, zone: str, market: str, *, gone: float | None = None, reason: str | None = None
) -> dict:
    return {
        "cloud": "local",
        "cloud_id": f"id-{rid}",
        "draining": False,
        "endpoint": f"http://127.0.0.1:{18000 + int(rid[2:])}",
        "gone_at": gone,
        "id": rid,
        "instance_type": "local",
        "launched_at": T0,
        "market": market,
        "not_ready_since": None,
        "outputs": {},
        "provisioned_at": T0 + 1.1,
        "ready_at": T0 + 1.6,
        "reason": reason,
        "region": "local",
        "revision": "e63aec1e49d6",
        "zone": zone,
    }


STATE: dict[str, Any] = {
    "version": 1,
    "service": "local-echo",
    "next_id": 7,
    "target": 2,
    "router": {"pid": 999_999_999, "endpoint": "http://127.0.0.1:8080"},
    "replicas": {
        "r-0001": _replica("r-0001", "local-a", "spot", gone=T0 + 87.8, reason="preempted"),
        "r-0002": _replica("r-0002", "local-b", "spot"),
        "r-0003": _replica("r-0003", "local-c", "spot"),
        "r-0004": _replica("r-0004", "local-a", "on-demand"),
        "r-0006": _replica("r-0006", "local-d", "spot"),
    },
    "pending_events": [
        {"kind": "preempted", "location": "local/local/local-a", "at": T0 + 87.8, "replica_id": "r-0001"}
    ],
    "policy_memory": {
        "policy": "skyhedge",
        "memory": {
            "cold_start": 120.0,
            "interval": 9.2,
            "last_now": T0 + 280.0,
            "most_held": {"local/local/local-a": 1, "local/local/local-b": 1},
            "partial": False,
            "preempted": ["local/local/local-a"],
            "refused": {},
            "start": T0,
            "trouble": {"local/local/local-a": T0 + 87.8},
            "warned": [],
            "wave_at": None,
        },
    },
    "history": [{"at": T0, "event": "plan", "create": ["r-0001"], "delete": [], "policy": "skyhedge"}],
    "extra": {
        "decided_at": T0 + 280.0,
        "launch_failures": 0,
        "survival_at": T0 + 250.0,
        "terraform": {"roots": {}},
        "warned": {},
        "given_up": {},
    },
}


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("svc")
    shutil.copytree(ROOT / "examples" / "local-echo", root / "local-echo")
    return root / "local-echo" / "service.yaml"


def test_the_unfuzzed_state_plans_and_shows(spec_file, tmp_path):
    """The base case works, so the property below is not passing on errors alone."""
    (tmp_path / "state.json").write_text(json.dumps(STATE))
    runner = CliRunner()
    for args in (["plan", "--json"], ["status", "--json"]):
        result = runner.invoke(main, [*args, str(spec_file), "--state-dir", str(tmp_path)])
        assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["replicas"]
    assert sorted(r["id"] for r in rows) == ["r-0002", "r-0003", "r-0004", "r-0006"]


def strict_json(text: str) -> Any:
    """`text` parsed as JSON proper: `NaN` and `Infinity`, which Python's json reads and writes by
    default, are refused, as jq, Go and JavaScript refuse them."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    "autoscaler",
    [
        {"qps": math.inf, "samples": [[T0, 1.0], [T0 + 60, 100.0]]},
        {"qps": "nan"},  # float() takes it
        {"target": math.inf},  # int(inf): OverflowError, a traceback from `status`
        {"pending": 3, "pending_since": math.nan, "samples": [[T0, 1.0], [math.inf, 5.0]]},
    ],
)
def test_status_json_is_json_whatever_the_autoscaler_memory_holds(spec_file, tmp_path, autoscaler):
    """A hand-edited memory (`1e999` reads as Infinity) reached `status --json` as `Infinity` or
    `NaN`, which no strict JSON parser reads: a damaged memory is a fresh one, as any other."""
    data = copy.deepcopy(STATE)
    data["extra"]["autoscaler"] = autoscaler
    (tmp_path / "state.json").write_text(json.dumps(data, allow_nan=True))
    for args in (["status", "--json"], ["status"], ["plan", "--json"]):
        result = CliRunner().invoke(main, [*args, str(spec_file), "--state-dir", str(tmp_path)])
        assert result.exit_code == 0, (args, repr(result.exception), result.output)
        if "--json" in args:
            strict_json(result.stdout)
    scaler = strict_json(
        CliRunner().invoke(main, ["status", "--json", str(spec_file), "--state-dir", str(tmp_path)]).stdout
    )["autoscaler"]
    assert (scaler["target"], scaler["qps"], scaler["pending"]) == (2, None, None)  # min_replicas


def test_status_json_is_json_whatever_the_capacity_file_holds(spec_file, tmp_path):
    """`skyhedge preempt` writes the local capacity file; a hand edit may put `1e999` (Infinity:
    "for good") or NaN in it, which `status --json` passed through as is."""
    (tmp_path / "state.json").write_text(json.dumps(STATE))
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "capacity.json").write_text(
        '{"version": 1, "preempted": {"local-a": 1e999}, "replay": {"speed": NaN}}'
    )
    result = CliRunner().invoke(main, ["status", "--json", str(spec_file), "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    held = strict_json(result.stdout)["local_capacity"]
    assert held["preempted"] == {"local-a": None}  # null: no end, as the file's own null says
    assert held["replay"] == {"speed": None}


def test_policy_memory_the_policy_refuses_names_the_file_and_the_way_out(spec_file, tmp_path):
    data = copy.deepcopy(STATE)
    data["policy_memory"]["memory"]["trouble"] = "x"
    (tmp_path / "state.json").write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["plan", str(spec_file), "--state-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {tmp_path / 'state.json'}: policy_memory.memory: skyhedge: bad snapshot ('trouble', "
        "'refused' and 'most_held' must be objects, 'warned' a list) (remove policy_memory to start "
        "the policy afresh)\n"
    )


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("warned", None, "an object of replica id -> time, got null"),
        ("warned", {"r-0002": "soon"}, "an object of replica id -> time, got {'r-0002': 'soon'}"),
        ("terraform", "x", "an object, got 'x'"),
        ("launch_failures", "x", "a non-negative integer, got 'x'"),
        ("launch_failures", -1, "a non-negative integer, got -1"),
        ("survival_at", [], "a finite number or null, got []"),
    ],
)
def test_controller_bookkeeping_in_extra_is_checked_when_read(spec_file, tmp_path, key, value, expected):
    """`apply` and `watch` read these back as their types: a bad one used to crash them with a
    traceback (AssertionError, AttributeError, TypeError) after `plan` had accepted the file."""
    data = copy.deepcopy(STATE)
    data["extra"][key] = value
    (tmp_path / "state.json").write_text(json.dumps(data))
    for command in ("plan", "apply", "destroy"):
        result = CliRunner().invoke(main, [command, str(spec_file), "--state-dir", str(tmp_path)])
        assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit)
        assert result.stderr == (
            f"error: {tmp_path / 'state.json'}: malformed state (extra.{key}: expected {expected})\n"
        ), (command, result.stderr)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("id", "r-0009\x1b]0;owned\x07", "a replica ID such as 'r-0007', got 'r-0009\\x1b]0;owned\\x07'"),
        ("id", "r-1/../../x", "a replica ID such as 'r-0007', got 'r-1/../../x'"),
        ("id", "replica-9", "a replica ID such as 'r-0007', got 'replica-9'"),
        ("zone", "local-a\x1b[2J", "a string of lowercase letters, digits and '-', got 'local-a\\x1b[2J'"),
        ("region", "../local", "a string of lowercase letters, digits and '-', got '../local'"),
    ],
)
def test_a_replica_whose_id_or_location_skyhedge_never_writes_is_refused_in_one_line(
    spec_file, tmp_path, field, value, expected
):
    """A hand edit (or a GitOps pull request to the committed state.json) cannot slip a replica
    ID or location past the loader that crashes `plan` with a traceback (`int()` of the ID),
    names files outside the state dir, or puts escape sequences into `status`'s table: one line
    naming the file and the field, from every command that reads the state."""
    data = copy.deepcopy(STATE)
    record = data["replicas"].pop("r-0004")
    record[field] = value
    key = record["id"]
    data["replicas"][key] = record
    (tmp_path / "state.json").write_text(json.dumps(data))
    shown = repr(key) if not key.isprintable() or "." in key else key
    for command in (["plan"], ["status"], ["render", "--out", str(tmp_path / "tree")]):
        result = CliRunner().invoke(main, [*command, str(spec_file), "--state-dir", str(tmp_path)])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (command, result.output)
        assert result.stderr == (
            f"error: {tmp_path / 'state.json'}: malformed state (replicas.{shown}.{field}: "
            f"expected {expected})\n"
        ), command
        assert "\x1b" not in result.output


@st.composite
def fuzzed_states(draw: st.DrawFn) -> Any:
    data = copy.deepcopy(STATE)
    paths = _paths(data)
    path = draw(st.sampled_from(paths))
    action = draw(st.sampled_from(["replace", "replace", "replace", "drop", "add"]))
    if action == "drop":
        _drop(data, path)
    elif action == "add" and isinstance(_get(data, path), dict):
        _set(data, (*path, draw(st.text(max_size=8))), draw(ODD_VALUES))
    else:
        _set(data, path, draw(ODD_VALUES))
    return data


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fuzzed_states())
def test_a_damaged_state_is_read_or_refused_in_one_line(spec_file, tmp_path, data):
    sdir = tmp_path / "state"
    shutil.rmtree(sdir, ignore_errors=True)
    sdir.mkdir()
    text = json.dumps(data, allow_nan=True)
    (sdir / "state.json").write_text(text)
    runner = CliRunner()
    for args in (["plan", "--json"], ["status", "--json"]):
        result = runner.invoke(main, [*args, str(spec_file), "--state-dir", str(sdir)])
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            args,
            repr(result.exception),
        )
        assert result.exit_code in (0, 1), (args, result.output)
        if result.exit_code == 0:
            strict_json(result.stdout)
        if result.exit_code == 1:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
        assert (sdir / "state.json").read_text() == text  # read-only commands never rewrite it


@settings(max_examples=120, deadline=None)
@given(fuzzed_states())
def test_the_state_is_written_as_to_json_has_it(data):
    """`save_state` serialises a view sharing the state's objects (`ServiceState.json_view`: the
    watcher serialises every pass to tell whether to write), not `to_json`'s deep copies: the same
    text, whatever a loadable state holds."""
    try:
        state = ServiceState.from_json(copy.deepcopy(data), where="state.json")
    except StateError:
        return
    assert state_text(state) == json.dumps(state.to_json(), indent=2, sort_keys=True) + "\n"
