"""`skyhedge routing up|reload|down SPEC`: upstreams from the state, `state.router` recorded."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from routing_support import Fleet, complete, free_port, needs_nginx, record, teardown_router

from skyhedge.cli import main
from skyhedge.routing import Router
from skyhedge.spec import load_spec
from skyhedge.state import ServiceState, load_state, save_state

pytestmark = [needs_nginx, pytest.mark.timeout(60)]


@pytest.fixture
def setup(tmp_path: Path, write_spec) -> Iterator[tuple[Path, Path, Fleet]]:
    port = free_port()
    spec_path = write_spec(
        f"""
        name: echo
        placement: {{clouds: [local]}}
        run: {{command: python3 examples/local-echo/server.py}}
        readiness_probe: {{path: /health, timeout_seconds: 2}}
        service: {{host: 127.0.0.1, port: {port}}}
        """
    )
    state_dir = tmp_path / "state"
    fleet = Fleet(tmp_path)
    try:
        yield spec_path, state_dir, fleet
    finally:
        teardown_router(Router(load_spec(spec_path), state_dir))
        fleet.close()


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_up_reload_down_from_the_state(setup):
    spec_path, state_dir, fleet = setup
    r1, r2, r3, r4 = fleet.start(4)
    state = ServiceState(service="echo")
    state.replicas = {
        "r-0001": record("r-0001", r1.endpoint),
        "r-0002": record("r-0002", r2.endpoint),
        "r-0003": record("r-0003", r3.endpoint, ready=False),  # STARTING: not routed yet
        "r-0004": record("r-0004", r4.endpoint, draining=True),  # SHUTTING_DOWN: not routed
        "r-0005": record("r-0005", "http://127.0.0.1:1", gone_at=time.time(), reason="preempted"),
    }
    save_state(state_dir, state)

    result = run("routing", "up", str(spec_path), "--state-dir", str(state_dir), "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    saved = load_state(state_dir, "echo").router
    assert saved == shown
    assert [u["id"] for u in saved["upstreams"]] == ["r-0001", "r-0002"]
    assert saved["pid"] and saved["endpoint"].endswith(f":{load_spec(spec_path).service.port}")
    assert {complete(saved["endpoint"]).replica for _ in range(12)} == {"r-0001", "r-0002"}

    # --probe: route to whatever answers now (r-0003 became ready, r-0002 died, r-0004 is draining).
    fleet.kill("r-0002")
    result = run("routing", "reload", str(spec_path), "--state-dir", str(state_dir), "--probe")
    assert result.exit_code == 0, result.output
    assert "r-0002" in result.output and "not ready" in result.output
    saved = load_state(state_dir, "echo").router
    assert [u["id"] for u in saved["upstreams"]] == ["r-0001", "r-0003"]
    assert {complete(saved["endpoint"]).replica for _ in range(12)} == {"r-0001", "r-0003"}

    result = run("routing", "down", str(spec_path), "--state-dir", str(state_dir))
    assert result.exit_code == 0, result.output
    assert load_state(state_dir, "echo").router is None
    assert Router(load_spec(spec_path), state_dir).status()["pid"] is None


def test_a_local_replica_whose_process_died_is_not_routed_even_without_probe(setup):
    """The state still says READY, but the launcher's process is gone (killed behind skyhedge's
    back): `routing up` records it gone, as `apply` would, instead of routing to a dead port."""
    spec_path, state_dir, fleet = setup
    [r1] = fleet.start(1)
    state = ServiceState(service="echo")
    state.replicas = {
        "r-0001": record("r-0001", r1.endpoint),
        "r-0002": record("r-0002", "http://127.0.0.1:1", cloud_id="tf-r-0002"),  # launched; no process
    }
    save_state(state_dir, state)
    result = run("routing", "up", str(spec_path), "--state-dir", str(state_dir))
    assert result.exit_code == 0, result.output
    assert "gone r-0002" in result.output
    saved = load_state(state_dir, "echo")
    assert [u["id"] for u in saved.router["upstreams"]] == ["r-0001"]
    assert saved.replicas["r-0002"].gone_at is not None
    assert run("routing", "down", str(spec_path), "--state-dir", str(state_dir)).exit_code == 0


def test_reload_when_not_running_is_one_clear_error(setup):
    spec_path, state_dir, _ = setup
    result = CliRunner().invoke(main, ["routing", "reload", str(spec_path), "--state-dir", str(state_dir)])
    assert result.exit_code == 1
    assert "not running" in result.output and "Traceback" not in result.output


def test_reload_when_never_started_leaves_no_state_dir_behind(setup):
    """A failed first command leaves no directory holding only lock files (docs/terraform.md):
    `routing reload` into a new --state-dir made router/router.lock before it found no router."""
    spec_path, state_dir, _ = setup
    result = CliRunner().invoke(main, ["routing", "reload", str(spec_path), "--state-dir", str(state_dir)])
    assert result.exit_code == 1 and "not running" in result.output
    assert not state_dir.exists(), sorted(p.name for p in state_dir.rglob("*"))


def test_up_refused_on_a_new_state_dir_leaves_no_state_dir_behind(setup, monkeypatch):
    """The same for `routing up` (README: errors never leave state or configs behind): with no
    nginx, or its port held by another process, it left state.lock and router/ (a config,
    logs, temp dirs, a pid file) in a state dir it had just made. Checked before, as `apply` does."""
    import socket

    spec_path, state_dir, _ = setup
    args = ["routing", "up", str(spec_path), "--state-dir", str(state_dir)]
    monkeypatch.setenv("SKYHEDGE_NGINX", str(state_dir.parent / "no-nginx-here"))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "not found" in result.output, result.output
    assert not state_dir.exists(), sorted(str(p) for p in state_dir.rglob("*"))

    monkeypatch.delenv("SKYHEDGE_NGINX")
    port = load_spec(spec_path).service.port
    with socket.socket() as holder:  # another process's server on service.port
        holder.bind(("127.0.0.1", port))
        holder.listen()
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert f"service.port {port} on 127.0.0.1 is not available" in " ".join(result.output.split())
    assert not state_dir.exists(), sorted(str(p) for p in state_dir.rglob("*"))


def test_status_shows_the_router_only_while_its_nginx_runs(setup):
    import os
    import signal

    spec_path, state_dir, fleet = setup
    [r1] = fleet.start(1)
    state = ServiceState(service="echo")
    state.replicas = {"r-0001": record("r-0001", r1.endpoint)}
    save_state(state_dir, state)
    assert run("routing", "up", str(spec_path), "--state-dir", str(state_dir)).exit_code == 0
    pid = load_state(state_dir, "echo").router["pid"]
    shown = json.loads(run("status", str(spec_path), "--state-dir", str(state_dir), "--json").output)
    assert shown["router"]["pid"] == pid

    assert os.getpgid(pid) != os.getpgid(0)  # nginx runs in its own process group
    os.killpg(os.getpgid(pid), signal.SIGKILL)  # killed from outside: the record stays behind
    deadline = time.monotonic() + 10
    while Router(load_spec(spec_path), state_dir).pid() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert load_state(state_dir, "echo").router is not None
    shown = json.loads(run("status", str(spec_path), "--state-dir", str(state_dir), "--json").output)
    recorded = load_state(state_dir, "echo").router
    assert shown["router"] == {**recorded, "pid": None}  # as documented: pid null when not running
    assert shown["router"]["endpoint"] and "upstreams" in shown["router"]
    table = run("status", str(spec_path), "--state-dir", str(state_dir)).output
    assert f"Router: not running (nginx pid {pid} is gone" in table
