"""A Ctrl-C (or SIGTERM) stops any command in one line with a shell's exit status, leaves no
half-swapped tree or stray temp file behind, and stops `simulate`'s solver processes with it.

Found by walking the README as a new user would, Ctrl-C'ing every command:
- `render`, `plan`, `simulate` answered click's bare "Aborted!" and exit 1 (a failure's status);
- 400 Ctrl-Cs at random moments of a tree swap left `.tree.old-*` (75), `.skyhedge-probe-*` (7)
  and `.tree.*.tmp` (2) beside the tree, deleted the old tree's `.terraform` (3), and turned the
  Ctrl-C into "cannot write the rendered tree (Bad file descriptor)" (2);
- a `simulate` stopped by a SIGTERM sent to it alone (`kill PID`), or killed, left its solver
  processes waiting for work for ever (10 minutes and counting, 130 MB each), holding the
  caller's pipes open; a terminal's Ctrl-C printed a traceback per solver process.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import process as process_module
from pathlib import Path

import pytest
from click.testing import CliRunner

import skyhedge.render.tree as tree_module
from skyhedge.cli import main
from skyhedge.cli._app import Terminated
from skyhedge.clouds import RenderContext
from skyhedge.planner import CREATE, Plan, PlannedReplica
from skyhedge.policy.types import Location, Market
from skyhedge.render import TREE_MANIFEST, render_tree, write_tree
from skyhedge.simulator.runner import _stop_workers
from skyhedge.spec import parse_spec
from skyhedge.state import probe_new_file

REPO = Path(__file__).resolve().parents[1]


# --- the one line ------------------------------------------------------------------------------


@pytest.fixture
def spec_file(write_spec) -> Path:
    return write_spec(
        """
        name: ctrl-c
        placement: {clouds: [local]}
        resources: {local_base_port: 31000}
        run: {command: sleep 60}
        """
    )


@pytest.mark.parametrize(
    ("stop", "by", "code"), [(KeyboardInterrupt, "Ctrl-C", 130), (Terminated, "SIGTERM", 143)]
)
def test_a_ctrl_c_during_render_is_one_line_and_a_shells_exit_status(
    spec_file, tmp_path, monkeypatch, stop, by, code
):
    def interrupted(*args: object, **kwargs: object) -> None:
        raise stop

    monkeypatch.setattr("skyhedge.cli.render.write_tree", interrupted)
    result = CliRunner().invoke(main, ["render", str(spec_file), "--out", str(tmp_path / "tree")])
    assert result.exit_code == code, result.output
    assert result.output.strip().splitlines() == [f"error: render interrupted by {by}"]
    assert "Aborted" not in result.output


def test_a_subcommand_of_a_group_is_named_whole(monkeypatch):
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("skyhedge.cli.catalog.load_catalog", interrupted)
    result = CliRunner().invoke(main, ["catalog", "show", "--cloud", "local"])
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines() == ["error: catalog show interrupted by Ctrl-C"]


# --- nothing half-written ------------------------------------------------------------------------


def _tree(command: str):
    spec = parse_spec(
        {
            "name": "swap",
            "placement": {"clouds": ["local"]},
            "resources": {"local_base_port": 31000},
            "run": {"command": command},
        },
        source="/tmp/specs/service.yaml",
    )
    replica = PlannedReplica("r-0001", Location("local", "local", "local-a"), Market.SPOT, CREATE, 0.0)
    context = RenderContext(Path("/srv/state"), Path("/srv/work"), sys.executable, "/opt/skyhedge")
    return render_tree(spec, Plan("swap", 1, "test", (replica,), 100, 0.0), context=context)


def test_a_ctrl_c_during_the_tree_swap_is_taken_once_the_tree_is_whole(tmp_path, monkeypatch):
    """The swap exchanges the two directories, renames the old tree aside, moves Terraform's
    folders back and removes the old tree: cut between the exchange and the rename, the clean-up
    deleted the old tree, workspace state and all."""
    out = tmp_path / "infra"
    write_tree(_tree("sleep 1"), out)
    workspace_state = out / "local/local/terraform.tfstate.d/blue/terraform.tfstate"
    workspace_state.parent.mkdir(parents=True)
    workspace_state.write_text('{"version": 4}', encoding="utf-8")
    (out / "local/local/.terraform/providers").mkdir(parents=True)
    real_exchange = tree_module._exchange

    def exchange_then_ctrl_c(a: Path, b: Path) -> bool:
        done = real_exchange(a, b)
        signal.raise_signal(signal.SIGINT)  # as a terminal's, right after the exchange
        return done

    monkeypatch.setattr(tree_module, "_exchange", exchange_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        write_tree(_tree("sleep 2"), out)
    assert workspace_state.read_text(encoding="utf-8") == '{"version": 4}'
    assert (out / "local/local/.terraform/providers").is_dir()
    assert "sleep 2" in (out / "local/local/skyhedge.auto.tfvars.json").read_text(encoding="utf-8")
    assert (out / TREE_MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["infra"]  # no .infra.old-*, no .tmp
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_while_probing_a_directory_leaves_no_probe_file(tmp_path, monkeypatch):
    import tempfile

    real_mkstemp = tempfile.mkstemp

    def mkstemp_then_ctrl_c(*args: object, **kwargs: object) -> tuple[int, str]:
        made = real_mkstemp(*args, **kwargs)  # type: ignore[call-overload]
        signal.raise_signal(signal.SIGINT)
        return made

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        probe_new_file(tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- simulate's solver processes ---------------------------------------------------------------


@pytest.fixture
def binding_trace(tmp_path: Path) -> Path:
    """Pools smaller than N = 3: the optimum needs the integer program, solved in processes."""
    directory = tmp_path / "tiny"
    directory.mkdir()
    patterns = {
        "us-east-1a": [2, 2, 0, 0, 1, 2, 2, 2, 0, 1] * 4,
        "us-east-2b": [1, 1, 1, 2, 2, 0, 0, 1, 1, 1] * 4,
        "us-west-2c": [0, 1, 2, 2, 2, 2, 1, 0, 0, 2] * 4,
    }
    for name, data in patterns.items():
        (directory / f"{name}.json").write_text(json.dumps({"metadata": {"gap_seconds": 60}, "data": data}))
    return directory


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by init, is not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def simulating(tmp_path: Path, binding_trace: Path) -> Iterator[tuple[subprocess.Popen[str], list[int]]]:
    """A process simulating `optimal` with two solver processes, stopped after its first window
    (its progress callback sleeps): the process and its solvers' pids. Everything is killed at
    teardown, also when the test fails."""
    script = tmp_path / "simulating.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, multiprocessing, sys, time
            from skyhedge.simulator.runner import SimConfig, simulate
            from skyhedge.simulator.traces import load_traces

            def stalled(trace, policy, window):
                print(json.dumps([p.pid for p in multiprocessing.active_children()]), flush=True)
                time.sleep(600)

            if __name__ == "__main__":  # not again in each spawned solver process
                config = SimConfig(ticks=30, repeats=4, cold_start_seconds=60)
                traces = load_traces({str(binding_trace)!r})
                simulate(traces, ["optimal"], config, progress=stalled, workers=2)
            """
        ),
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    workers: list[int] = []
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.communicate()
        workers.extend(json.loads(line))
        assert len(workers) == 2
        yield proc, workers
    finally:
        _kill(proc.pid, *workers)
        proc.communicate()


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (alive := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def test_solver_processes_ignore_a_terminals_ctrl_c_and_end_with_a_killed_simulation(simulating):
    """A terminal's Ctrl-C reaches every process of the job: the simulating process stops its
    solvers; they print nothing of their own. Killed outright, it leaves them to end alone."""
    proc, workers = simulating
    for pid in workers:
        os.kill(pid, signal.SIGINT)
    time.sleep(0.5)
    assert [pid for pid in workers if _alive(pid)] == workers, "a solver died of the Ctrl-C"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _gone_within(workers, 10) == [], "solver processes outlived the killed simulation"
    _out, err = proc.communicate()
    assert "Traceback" not in err


def test_a_sigterm_to_simulate_alone_stops_it_in_one_line_with_its_solvers(binding_trace, tmp_path):
    """`kill PID` (or a supervisor stopping its child) signals the simulating process alone."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "skyhedge",
            "simulate",
            "--trace",
            str(binding_trace),
            "--policy",
            "optimal",
            "--ticks",
            "30",
            "--cold-start",
            "60",
            "--repeats",
            "100000",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    children: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not children and time.monotonic() < deadline:
            children = _children(proc.pid)
            time.sleep(0.05)
        if not children:
            pytest.skip("one usable CPU: the optimum is solved in the simulating process itself")
        time.sleep(0.5)
        children = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 143, err
        assert err.strip().splitlines() == ["error: simulate interrupted by SIGTERM"]
        assert out == ""
        assert _gone_within(children, 10) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        _kill(*children)


def test_stopping_the_solvers_waits_for_the_pool_thread_that_closes_their_pipe():
    """`_stop_workers` returns only once the pool's manager thread has closed its wake-up pipe.
    Still running, it closed that pipe while the interpreter's exit hook (concurrent.futures'
    `_python_exit`) was writing to it: 4 of 25 SIGTERM'd runs of `simulate` ended with CPython's
    "Exception ignored in: <module 'threading'> ... Bad file descriptor" after our one line."""
    pool = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = [pool.submit(time.sleep, 30) for _ in range(4)]
        while not any(future.running() for future in futures):
            time.sleep(0.01)
        manager = pool._executor_manager_thread
        assert manager is not None
        _stop_workers(pool)
        assert not manager.is_alive()
        assert process_module._threads_wakeups.get(manager) is None or (
            process_module._threads_wakeups[manager]._closed
        )
    finally:
        _stop_workers(pool)  # again, when the test failed before it: no solver left running


def _kill(*pids: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="utf-8")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found
