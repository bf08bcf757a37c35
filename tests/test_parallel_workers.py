"""The suite runs two files at a time, in pytest-xdist workers (README, Development). A test in a
worker must see what it sees in a run without `-n`: the run's own COLUMNS and LINES (not the
80x24 that readline, imported by the controlling process, exports to the workers: four CLI tests
failed on it), and a router port no other worker holds (every worker took the same one)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

#: What each worker writes: its name, COLUMNS and LINES as its tests see them, and its router port.
PROBE = """\
import json, os
from pathlib import Path

from controller_fakes import ROUTER_PORT


def test_probe():
    worker = os.environ["PYTEST_XDIST_WORKER"]
    seen = {"columns": os.environ.get("COLUMNS"), "lines": os.environ.get("LINES"), "port": ROUTER_PORT}
    (Path(__file__).parent / f"seen-{worker}.json").write_text(json.dumps(seen))
"""


def _run_in_two_workers(tmp_path: Path, **env: str) -> dict[str, dict[str, object]]:
    """The probe run by every worker of `pytest -n 2` (with this suite's conftest), under this
    environment less COLUMNS and LINES, plus `env`."""
    pytest.importorskip("xdist")
    shutil.copy2(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(PROBE, encoding="utf-8")
    run_env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    run_env.update(env, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:benchmark"]
        + ["-n", "2", "--dist", "each", "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
        cwd=tmp_path,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {p.stem: json.loads(p.read_text()) for p in sorted(tmp_path.glob("seen-*.json"))}


def test_workers_see_the_runs_own_columns_and_lines_and_each_its_own_router_port(tmp_path):
    """LINES absent from the run: absent in the workers (not readline's 24); COLUMNS given: the
    same in the workers (not readline's 80). One run, as each costs two interpreters' start."""
    seen = _run_in_two_workers(tmp_path, COLUMNS="132")
    assert sorted(seen) == ["seen-gw0", "seen-gw1"]
    assert [(s["columns"], s["lines"]) for s in seen.values()] == [("132", None), ("132", None)]
    assert len({s["port"] for s in seen.values()}) == 2
