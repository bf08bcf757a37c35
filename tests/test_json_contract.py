"""The CLI as a machine contract: what a script reading `--json` and exit statuses can rely on.

A platform team polls `status --json` from a dashboard and diffs `plan --json` in CI. Two runs on
the same state must print the same document (the lists in one order, the replicas' everywhere),
and a command stopped by a Ctrl-C says so in one `error:` line and exits 130 (README, "Commands"),
whenever the Ctrl-C comes: also during start-up, which is most of a `status --json` poll's life.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from routing_support import Fleet, free_port, needs_nginx, record, teardown_router

from skyhedge.cli import main
from skyhedge.planner import replica_order
from skyhedge.routing import Router
from skyhedge.spec import load_spec
from skyhedge.state import ServiceState, save_state

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def routed_past_r9999(tmp_path: Path, write_spec) -> Iterator[tuple[Path, Path]]:
    """A spec and a state whose READY replicas straddle r-9999 (r-9998 .. r-10001), with real
    replica processes; the router of that state is stopped and the processes killed afterwards."""
    spec_path = write_spec(
        f"""
        name: echo
        placement: {{clouds: [local]}}
        run: {{command: python3 examples/local-echo/server.py}}
        service: {{host: 127.0.0.1, port: {free_port()}}}
        """
    )
    state_dir = tmp_path / "state"
    fleet = Fleet(tmp_path)
    try:
        replicas = fleet.start(4, first=9998)
        state = ServiceState(service="echo", next_id=10002)
        state.replicas = {r.id: record(r.id, r.endpoint) for r in replicas}
        save_state(state_dir, state)
        yield spec_path, state_dir
    finally:
        teardown_router(Router(load_spec(spec_path), state_dir))
        fleet.close()


@needs_nginx
@pytest.mark.timeout(60)
def test_router_upstreams_are_listed_by_number_as_the_replicas_are(routed_past_r9999):
    """`r-9999` before `r-10000` in `routing up --json`, `routing reload --json` and `status
    --json`'s `router.upstreams`, as in its `replicas`: as text, the upstreams came r-10000 first,
    so the two lists of one document disagreed past r-9999."""
    spec_path, state_dir = routed_past_r9999
    by_number = ["r-9998", "r-9999", "r-10000", "r-10001"]
    assert sorted(by_number, key=replica_order) == by_number
    args = [str(spec_path), "--state-dir", str(state_dir), "--json"]
    for verb in ("up", "reload"):
        result = CliRunner().invoke(main, ["routing", verb, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert [u["id"] for u in json.loads(result.stdout)["upstreams"]] == by_number, verb
    status = CliRunner().invoke(main, ["status", *args], catch_exceptions=False)
    assert status.exit_code == 0, status.output
    shown = json.loads(status.stdout)
    assert [r["id"] for r in shown["replicas"]] == by_number
    assert [u["id"] for u in shown["router"]["upstreams"]] == by_number
    again = CliRunner().invoke(main, ["status", *args], catch_exceptions=False)
    assert again.stdout == status.stdout  # a dashboard's diff of two polls is empty


def _interrupted_at_import(tmp_path: Path, module: str) -> subprocess.CompletedProcess[str]:
    """`skyhedge status SPEC --json` whose start-up is cut by a Ctrl-C while it imports `module`
    (a deterministic stand-in for the signal landing there: `import skyhedge.cli` takes about
    half a second, most of a `status --json` run)."""
    program = textwrap.dedent(
        f"""
        import importlib, sys
        real = importlib.import_module
        def interrupted(name, *args):
            if name == {module!r}:
                raise KeyboardInterrupt
            return real(name, *args)
        importlib.import_module = interrupted
        sys.argv = ["skyhedge", "status", "svc.yaml", "--json"]
        from skyhedge.cli import main
        main()
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("module", ["skyhedge.cli.plan", "skyhedge.cli.watch"])
def test_a_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path, module):
    """Before, a Python traceback (10 to 30 lines) and death by the signal, not the documented
    `error: ... interrupted by Ctrl-C` line and exit status 130."""
    done = _interrupted_at_import(tmp_path, module)
    assert done.returncode == 130, done.stderr
    assert done.stdout == ""
    assert done.stderr == "error: skyhedge interrupted by Ctrl-C\n"


@pytest.mark.timeout(120)
def test_a_real_ctrl_c_at_any_moment_of_a_status_json_poll_is_one_line_or_the_whole_document(
    tmp_path, write_spec
):
    """SIGINT sent to `skyhedge status SPEC --json` at several moments of its run: the command
    either finished (stdout one whole document) or says it was interrupted in one line; never a
    traceback, never part of a document."""
    spec_path = write_spec(
        """
        name: svc
        placement: {clouds: [local]}
        run: {command: "true"}
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "skyhedge", "status", str(spec_path), "--json"]
    seen: list[str] = []
    for delay in (0.1, 0.2, 0.3, 0.4, 0.5, 0.7):
        proc = subprocess.Popen(
            argv,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # a shell's background job ignores SIGINT; this one must take it as a terminal's Ctrl-C
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if "init_import_site" in err:
            continue  # Python's own start-up (a site-packages .pth file), before any of skyhedge runs
        assert "Traceback" not in err, (delay, err)
        if proc.returncode == 0:
            assert json.loads(out)["service"] == "svc" and err == ""
            seen.append("done")
        else:
            # 130: said in one line; -SIGINT: before Python took the signal, or after its output
            assert proc.returncode in (130, -signal.SIGINT), (delay, proc.returncode, err)
            said = ("", "error: skyhedge interrupted by Ctrl-C\n", "error: status interrupted by Ctrl-C\n")
            assert err in said, (delay, err)
            assert out == "" or json.loads(out)["service"] == "svc", (delay, out)
            seen.append(str(proc.returncode))
    assert seen  # (what each moment gave is in the assertion messages above)


def test_a_ctrl_c_while_the_command_line_is_parsed_is_the_same_line_not_clicks_aborted(monkeypatch):
    """click's own answer there is `Aborted!` and exit 1, a failure a script cannot tell from a
    bad spec."""
    import click

    def interrupted(self, ctx, args):
        raise KeyboardInterrupt

    monkeypatch.setattr(click.Group, "parse_args", interrupted)
    result = CliRunner().invoke(main, ["status", "svc.yaml", "--json"])
    assert (result.exit_code, result.stdout) == (130, "")
    assert result.stderr == "error: skyhedge interrupted by Ctrl-C\n"
