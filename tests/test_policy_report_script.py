"""`benchmarks/policy_report.py` : it never shows one trace's rows under
another's name, exits 1 when a simulation failed, and refuses an unwritable --json path before it
runs. `skyhedge simulate` is replaced by canned answers: these are specifications of the report,
not of the simulator."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "policy_report.py"


@pytest.fixture
def report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("policy_report_under_test", REPORT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows_for(trace: str) -> list[dict]:
    """What `simulate --json` prints for the report's three policies (skyhedge meets the bar)."""
    rows = [
        {
            "trace": trace,
            "policy": policy,
            "availability": avail,
            "availability_min": avail,
            "relative_cost": cost,
        }
        for policy, avail, cost in (
            ("spothedge", 0.99, 0.5),
            ("skyhedge", 0.995, 0.44),
            ("optimal", 1.0, 0.4),
        )
    ]
    rows[1]["vs_spothedge"] = {"cost_limit": 0.45, "availability_ok": True, "cost_ok": True}
    return rows


def fake_simulate(monkeypatch, report: ModuleType, answer) -> list[list[str]]:
    """Replace the `skyhedge simulate` subprocess with `answer(trace_name)`: (returncode, stdout,
    stderr). Returns the commands run."""
    calls: list[list[str]] = []

    def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        code, out, err = answer(Path(cmd[cmd.index("--trace") + 1]).name)
        return subprocess.CompletedProcess(cmd, code, out, err)

    monkeypatch.setattr(report.subprocess, "run", run)
    return calls


def run_main(monkeypatch, report: ModuleType, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["policy_report.py", *args])
    return report.main()


def trace_dirs(tmp_path: Path, *parts: str) -> list[str]:
    paths = []
    for part in parts:
        (tmp_path / part).mkdir(parents=True)
        paths += ["--trace", str(tmp_path / part)]
    return paths


def test_two_traces_with_the_same_name_are_refused_before_any_runs(tmp_path, monkeypatch, capsys, report):
    """Rows are keyed by trace name: the second AWS1 would silently replace the first's rows."""
    calls = fake_simulate(monkeypatch, report, lambda name: (0, json.dumps(rows_for(name)), ""))
    args = trace_dirs(tmp_path, "a/AWS1", "b/AWS1")
    assert run_main(monkeypatch, report, *args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --trace: ") and "share the name 'AWS1'" in err[0]
    assert calls == []


def test_a_failed_simulation_exits_1_with_its_error_once(tmp_path, monkeypatch, capsys, report):
    def answer(name: str) -> tuple[int, str, str]:
        if name == "bad":
            return 1, "", "error: Invalid value for '--repeats': 0 is not in the range x>=1.\n"
        return 0, json.dumps(rows_for(name)), ""

    fake_simulate(monkeypatch, report, answer)
    assert run_main(monkeypatch, report, *trace_dirs(tmp_path, "good", "bad")) == 1
    out = capsys.readouterr()
    assert "error: Invalid value for '--repeats'" in out.out and "error: error:" not in out.out
    assert "bar met on 1/1 traces" in out.out
    assert out.err.strip() == "error: 1 of 2 traces failed to simulate"


def test_every_simulation_succeeding_exits_0_and_writes_the_json(tmp_path, monkeypatch, report):
    fake_simulate(monkeypatch, report, lambda name: (0, json.dumps(rows_for(name)), ""))
    target = tmp_path / "out" / "report.json"
    assert run_main(monkeypatch, report, *trace_dirs(tmp_path, "AWS1", "AWS2"), "--json", str(target)) == 0
    doc = json.loads(target.read_text())
    assert [row["trace"] for row in doc["rows"]] == ["AWS1", "AWS2"]
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]  # no temp file left behind


def test_an_unwritable_json_path_is_refused_before_any_runs(tmp_path, monkeypatch, capsys, report):
    calls = fake_simulate(monkeypatch, report, lambda name: (0, json.dumps(rows_for(name)), ""))
    (tmp_path / "a-file").write_text("")
    target = tmp_path / "a-file" / "report.json"
    assert run_main(monkeypatch, report, *trace_dirs(tmp_path, "AWS1"), "--json", str(target)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --json: {target}: cannot write the report")
    assert calls == []
