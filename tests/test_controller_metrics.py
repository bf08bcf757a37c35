"""The watcher's Prometheus metrics: what they say after real passes of the loop (against the
fakes), that the exposition is valid text format 0.0.4, and the HTTP endpoint's behaviour."""

from __future__ import annotations

import copy
import logging
import random
import re
import socket
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from controller_fakes import THREE_ZONE_SPEC as SPEC
from controller_fakes import (
    TWO_REGION_SPEC,
    TWO_ROOT_SPEC,
    Clock,
    DeadCloud,
    FakeExecutor,
    clocked_controller,
    fake_controller,
    run_for,
)
from rich.console import Console
from routing_support import free_port

from skyhedge.controller.dashboard import render
from skyhedge.controller.loop import SPOT_RETRY_MAX_SECONDS, Controller
from skyhedge.controller.metrics import CONTENT_TYPE, Metrics, MetricsServer, _labels
from skyhedge.errors import SkyhedgeError
from skyhedge.events import PreemptionEvent, Signal
from skyhedge.spec import load_spec
from skyhedge.state import FAILING_ROOTS_KEY, QUOTA_KEY, ServiceState

SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*)\})? (?P<value>-?[0-9.e+-]+|NaN|[+-]Inf)$'
)


#: The quota tests' two regions under `even`, which keeps placing spot in the blocked one.
EVEN_TWO_REGIONS = TWO_REGION_SPEC % ", policy: even"


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Strictly parse the exposition: HELP then TYPE before a family's samples, no family twice,
    every sample line well-formed. Returns {(name, labels): value}."""
    assert text.endswith("\n")
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    typed: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in typed, f"family {name} twice"
            current = name
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name == current and kind in ("counter", "gauge")
            typed[name] = kind
        else:
            m = SAMPLE.match(line)
            assert m, f"malformed sample line: {line!r}"
            assert m["name"] == current, f"{m['name']} outside its family"
            labels = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m["labels"] or ""))
            key = (m["name"], labels)
            assert key not in samples, f"sample {key} twice"
            samples[key] = float(m["value"])
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and set(labels.items()) <= lab)


def send(ctl: Controller, event: PreemptionEvent) -> None:
    """What the controller's (fake) event source reports at its next poll."""
    ctl.sources[0].queue.append(event)  # type: ignore[attr-defined]


@pytest.fixture
def ctl(tmp_path: Path, write_spec) -> Controller:
    return fake_controller(load_spec(write_spec(SPEC)), tmp_path / "state")


def test_before_any_pass_the_metrics_are_valid_and_say_nothing_happened():
    samples = parse(Metrics().text())
    assert value(samples, "skyhedge_passes_total") == 0
    assert value(samples, "skyhedge_observed_seconds_total") == 0


def test_metrics_follow_the_fleet_through_a_preemption(ctl):
    metrics = Metrics()
    metrics.watch(ctl)
    clock = ctl.clock
    for _ in range(3):
        ctl.tick()
        clock.advance(10)  # type: ignore[attr-defined]
    samples = parse(metrics.text())
    live = ctl.state.live()
    assert value(samples, "skyhedge_passes_total") == 3
    assert value(samples, "skyhedge_info", service="svc", policy="spothedge") == 1
    assert value(samples, "skyhedge_target_replicas") == 2
    assert value(samples, "skyhedge_ready_replicas") == 3 == len(live)
    assert value(samples, "skyhedge_serving") == 1
    for rec in live:
        where = {"cloud": "local", "region": "local", "zone": rec.zone, "market": "spot"}
        assert value(samples, "skyhedge_replicas", **where, state="READY") == 1
        assert value(samples, "skyhedge_launches_total", **where) == 1
    # SpotHedge's on-demand fallback ran until the spot replicas were READY: launches, too
    ever = [r for r in ctl.state.replicas.values() if r.provisioned_at is not None]
    assert total(samples, "skyhedge_launches_total", market="spot") == 3
    assert total(samples, "skyhedge_launches_total", market="on-demand") == len(ever) - 3 > 0
    assert value(samples, "skyhedge_applies_total", result="ok") >= 1
    assert total(samples, "skyhedge_preemptions_total") == 0
    assert value(samples, "skyhedge_observed_seconds_total") == 20  # two intervals between passes
    assert value(samples, "skyhedge_serving_seconds_total") == 10  # READY from the second pass on
    assert value(samples, "skyhedge_hourly_cost_dollars") == 0  # the local cloud is free

    victim = next(r for r in live if r.zone == "local-a")
    send(ctl, PreemptionEvent(Signal.GONE, clock(), "fake", replica_id=victim.id, reason="preempted"))
    ctl.tick()
    samples = parse(metrics.text())
    local_a = {"cloud": "local", "region": "local", "zone": "local-a"}
    assert value(samples, "skyhedge_preemptions_total", **local_a, market="spot") == 1
    assert value(samples, "skyhedge_zone_marked_preempted", **local_a) == 1
    local_b = {"cloud": "local", "region": "local", "zone": "local-b"}
    assert value(samples, "skyhedge_zone_marked_preempted", **local_b) == 0
    assert value(samples, "skyhedge_serving") == 1  # two READY spot replicas left: still the target
    replacements = [r for r in ctl.state.live() if r.launched_at == clock()]
    assert {r.market for r in replacements} == {"spot", "on-demand"}  # SpotHedge's fallback too
    assert total(samples, "skyhedge_launches_total") == len(ever) + len(replacements)
    assert total(samples, "skyhedge_launches_total", market="spot") == 4
    ctl.tick()  # nothing new: counters stay, passes go on
    again = parse(metrics.text())
    assert value(again, "skyhedge_preemptions_total", **local_a, market="spot") == 1
    assert value(again, "skyhedge_passes_total") == 5


def test_label_values_are_escaped():
    assert _labels({"a": 'x"y', "b": "c\\d", "n": "1\n2"}) == '{a="x\\"y",b="c\\\\d",n="1\\n2"}'


def _get(url: str) -> tuple[int, str, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_the_endpoint_serves_metrics_404s_elsewhere_and_frees_its_port(ctl):
    metrics = Metrics()
    metrics.watch(ctl)
    ctl.tick()
    port = free_port()
    with MetricsServer(metrics, port=port) as server:
        assert server.address == f"http://127.0.0.1:{port}/metrics"
        status, ctype, body = _get(server.address)
        assert status == 200 and ctype == CONTENT_TYPE
        assert value(parse(body), "skyhedge_passes_total") == 1
        assert _get(f"http://127.0.0.1:{port}/")[0] == 404
    with socket.socket() as s:  # closed: the port can be listened on again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_a_port_in_use_is_one_line_naming_the_flag():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        message = rf"^--metrics-port {port}: cannot listen on 127.0.0.1:{port} "
        with pytest.raises(SkyhedgeError, match=message):
            MetricsServer(Metrics(), port=port)


def test_a_restarted_watcher_counts_from_zero_not_its_predecessors_history(ctl):
    first = Metrics()
    first.watch(ctl)
    for _ in range(3):
        ctl.tick()
    assert total(parse(first.text()), "skyhedge_launches_total") > 0
    again = Metrics()  # a new watcher process over the same state
    again.watch(ctl)
    ctl.tick()
    samples = parse(again.text())
    assert total(samples, "skyhedge_launches_total") == 0
    assert total(samples, "skyhedge_applies_total") == 0
    assert value(samples, "skyhedge_ready_replicas") == 3  # gauges are the state as it is


def _bind_below(sock: socket.socket, limit: int) -> int:
    """Bind `sock` to a free 127.0.0.1 port under `limit` (the local replicas' base port: a
    metrics port above it is refused before any bind is tried) and return it."""
    for port in random.sample(range(10000, limit), 200):
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no free port below {limit}")


@pytest.mark.parametrize("command", [["watch", "--once", "--no-routing"], ["up", "--no-dashboard"]])
def test_watch_with_a_metrics_port_in_use_stops_before_any_pass(tmp_path, write_spec, command):
    from click.testing import CliRunner

    from skyhedge.cli import main

    spec = write_spec(SPEC)
    with socket.socket() as busy:
        port = _bind_below(busy, 18000)  # below the local base: a port replicas never take
        busy.listen()
        result = CliRunner().invoke(
            main,
            [
                command[0],
                str(spec),
                "--state-dir",
                str(tmp_path / "st"),
                *command[1:],
                "--metrics-port",
                str(port),
            ],
        )
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: --metrics-port {port}: cannot listen on 127.0.0.1:{port} (")
    assert len(result.stderr.strip().splitlines()) == 1
    # refused before it wrote anything: no state dir left holding a lock file and `local/`
    # (found by an audit; docs/terraform.md: such a writer removes the directory it made)
    assert not (tmp_path / "st").exists()


def test_refused_launches_are_counted_per_zone(ctl):
    metrics = Metrics()
    metrics.watch(ctl)
    ctl.executor.refuse_zones = {"local-a"}  # type: ignore[attr-defined]
    for _ in range(3):
        ctl.tick()
        ctl.clock.advance(1)  # type: ignore[attr-defined]
    samples = parse(metrics.text())
    local_a = {"cloud": "local", "region": "local", "zone": "local-a"}
    assert value(samples, "skyhedge_launch_failures_total", **local_a) >= 1
    assert total(samples, "skyhedge_launches_total", zone="local-a", market="spot") == 0
    assert value(samples, "skyhedge_zone_marked_preempted", **local_a) == 1


def test_a_failing_listener_does_not_fail_the_pass(ctl, caplog):
    def broken(_ctl: Controller) -> None:
        raise RuntimeError("metrics bug")

    ctl.subscribe(broken)
    metrics = Metrics()
    metrics.watch(ctl)  # subscribed after the broken one: still called
    delay = ctl.tick()
    assert delay > 0 and len(ctl.state.live()) == 5  # 3 spot + SpotHedge's 2 on-demand stand-ins
    assert value(parse(metrics.text()), "skyhedge_passes_total") == 1
    assert "a listener of the reconcile pass failed" in caplog.text


def test_a_failure_counting_an_entry_does_not_fail_the_pass_that_appends_it(ctl, caplog, monkeypatch):
    """The counters take each history entry as the pass appends it, in the middle of the pass: a
    bug there is logged, and the pass goes on (as with a failing listener of the pass)."""
    metrics = Metrics()
    metrics.watch(ctl)

    def broken(_ctl: Controller, _entry: dict) -> None:
        raise RuntimeError("metrics bug")

    monkeypatch.setattr(metrics, "_count", broken)
    delay = ctl.tick()
    assert delay > 0 and len(ctl.state.live()) == 5 and ctl.state.history
    assert value(parse(metrics.text()), "skyhedge_passes_total") == 1
    assert "counting a history entry for the metrics failed" in caplog.text


def test_metrics_host_without_a_port_is_a_usage_error(tmp_path, write_spec):
    from click.testing import CliRunner

    from skyhedge.cli import main

    result = CliRunner().invoke(main, ["watch", str(write_spec(SPEC)), "--metrics-host", "0.0.0.0"])
    assert result.exit_code == 1
    assert "--metrics-host is where --metrics-port listens: give --metrics-port too" in result.stderr


def test_an_ipv6_host_in_brackets_is_served_and_shown_in_brackets():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 here")
    with MetricsServer(Metrics(), host="[::1]", port=0) as server:
        assert re.fullmatch(r"http://\[::1\]:\d+/metrics", server.address)
        assert _get(server.address)[0] == 200


def test_an_interruption_warning_counts_once_as_a_warning_and_once_as_a_preemption(ctl):
    """AWS's two-minute notice: the replica is replaced at once (a preemption for the policy) and
    then taken (gone, ending as planned): one preemption, one warning, never two."""
    metrics = Metrics()
    metrics.watch(ctl)
    for _ in range(3):
        ctl.tick()
        ctl.clock.advance(10)  # type: ignore[attr-defined]
    victim = next(r for r in ctl.state.live() if r.zone == "local-b")
    send(ctl, PreemptionEvent(Signal.WARNING, ctl.clock(), "fake", replica_id=victim.id))
    ctl.tick()
    ctl.clock.advance(60)  # type: ignore[attr-defined]
    send(ctl, PreemptionEvent(Signal.GONE, ctl.clock(), "fake", replica_id=victim.id, reason="preempted"))
    ctl.tick()
    samples = parse(metrics.text())
    local_b = {"cloud": "local", "region": "local", "zone": "local-b"}
    assert value(samples, "skyhedge_preemptions_total", **local_b, market="spot") == 1
    assert value(samples, "skyhedge_interruption_warnings_total", **local_b, kind="interruption") == 1
    assert total(samples, "skyhedge_preemptions_total") == 1


def test_every_zone_shows_every_series_from_the_start(ctl):
    metrics = Metrics()
    metrics.watch(ctl)
    ctl.tick()
    samples = parse(metrics.text())
    for zone in ("local-a", "local-b", "local-c"):
        where = {"cloud": "local", "region": "local", "zone": zone}
        assert value(samples, "skyhedge_preemptions_total", **where, market="spot") == 0
        assert value(samples, "skyhedge_launch_failures_total", **where) == 0
        assert (
            "skyhedge_replicas",
            frozenset({**where, "market": "on-demand", "state": "NOT_READY"}.items()),
        ) in samples
    assert value(samples, "skyhedge_applies_total", result="failed") == 0


def test_a_zone_selling_on_demand_only_has_on_demand_series_and_no_spot_ones(tmp_path, write_spec):
    """use1-az3 sells p3.2xlarge on-demand only: on-demand replicas may run there, so its
    on-demand series are there from the start; spot ones (preemptions, warnings) would be noise."""
    spec = write_spec(
        """
        name: svc
        placement: {clouds: [aws], zones: [use1-az1, use1-az3]}
        resources: {instance_type: {aws: p3.2xlarge}}
        replica_policy: {min_replicas: 1, policy: spothedge}
        run: {command: "true"}
        """
    )
    metrics = Metrics()
    ctl = fake_controller(load_spec(spec), tmp_path / "state")
    metrics.watch(ctl)
    ctl.tick()
    samples = parse(metrics.text())
    az3 = {"cloud": "aws", "region": "us-east-1", "zone": "use1-az3"}
    az1 = {**az3, "zone": "use1-az1"}
    assert value(samples, "skyhedge_launches_total", **az3, market="on-demand") == 0
    assert value(samples, "skyhedge_launches_total", **az1, market="spot") == 2  # N + the extra
    assert value(samples, "skyhedge_interruption_warnings_total", **az1, kind="rebalance") == 0
    in_az3 = [(name, dict(lab)) for (name, lab) in samples if ("zone", "use1-az3") in lab]
    assert in_az3 and not [lab for _, lab in in_az3 if lab.get("market") == "spot"]
    assert not any(("zone", "use1-az3") in lab for (name, lab) in samples if "warning" in name)


# --- bug-bash 3: HEAD, the router's ports, `--once` with routing down, GitOps commits counted ----


def test_head_answers_like_get_without_a_body(ctl):
    metrics = Metrics()
    metrics.watch(ctl)
    ctl.tick()
    with MetricsServer(metrics, port=free_port()) as server:
        request = urllib.request.Request(server.address, method="HEAD")
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == CONTENT_TYPE
            assert int(resp.headers["Content-Length"]) == len(metrics.text().encode())
            assert resp.read() == b""


def _reset(port: int, request: bytes) -> None:
    """Connect, send `request`, and reset the connection (SO_LINGER 0): what a TCP health check,
    a port scanner or a scrape cut short by its timeout does to the endpoint."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if request:
            sock.sendall(request)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_a_client_that_resets_its_connection_leaves_no_traceback_on_stderr(ctl, capfd, caplog):
    """Under `--log-format json` stderr is the log pipeline's: every line must be a JSON record.
    A peer that went away is a debug line of the watcher's log, and the endpoint keeps serving."""
    caplog.set_level(logging.DEBUG, logger="skyhedge.controller")
    metrics = Metrics()
    metrics.watch(ctl)
    ctl.tick()
    with MetricsServer(metrics, port=free_port()) as server:
        port = int(server.address.rsplit(":", 1)[1].split("/")[0])
        for request in (b"", b"GET /metr"):  # a bare TCP check; a request cut short
            _reset(port, request)
        deadline, err = time.monotonic() + 5, ""
        while time.monotonic() < deadline:  # each is handled in a thread of its own
            gone = [r for r in caplog.records if r.getMessage().startswith("metrics: 127.0.0.1: ")]
            err += capfd.readouterr().err
            if len(gone) == 2 or err:
                break
            time.sleep(0.02)
        assert _get(server.address)[0] == 200
    time.sleep(0.1)  # what a failing handler would still print
    err += capfd.readouterr().err
    assert err == ""
    assert len(gone) == 2 and {r.levelno for r in gone} == {logging.DEBUG}


ROUTED = SPEC + "service: {port: 8080, router: {status_port: 17990}}\n"


@pytest.mark.parametrize(("port", "field"), [(8080, "service.port"), (17990, "service.router.status_port")])
def test_a_metrics_port_that_is_the_routers_own_is_refused_at_start_in_one_line(
    tmp_path, write_spec, port, field
):
    from click.testing import CliRunner

    from skyhedge.cli import main

    spec = write_spec(ROUTED)
    args = ["watch", str(spec), "--state-dir", str(tmp_path / "st"), "--once", "--metrics-port", str(port)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: --metrics-port {port} is the router's {field} of svc: nginx could not")
    assert not (tmp_path / "st").exists()


def test_a_spec_reload_moving_the_router_onto_the_metrics_port_is_refused(tmp_path, write_spec):
    from skyhedge.controller.runner import Watcher

    spec = write_spec(ROUTED)
    with Watcher(load_spec(spec), tmp_path / "state", spec_path=spec, route=False) as w:
        w.metrics_port = 9464
        spec.write_text(ROUTED.replace("port: 8080", "port: 9464"))
        assert w.reload(spec) is False
        assert w.spec.service.port == 8080
        assert w.controller is not None
        note = w.controller.notes[-1].text
        assert note.startswith(
            f"spec reload refused: {spec}: service.port: --metrics-port 9464 is the router's"
        )


def test_watch_once_exits_1_when_the_router_could_not_be_started(tmp_path, write_spec):
    from controller_fakes import FakeRouter

    from skyhedge.controller.runner import Watcher
    from skyhedge.errors import RoutingError

    class Refusing(FakeRouter):
        def reload(self, upstreams):
            raise RoutingError("nginx failed to start (exit 1)", stderr="nginx: [emerg] bind() failed")

    def over_fakes(w: Watcher) -> Controller:
        assert w.controller is not None
        for source in w.controller.sources:
            source.close()
        w.controller = fake_controller(spec, tmp_path / "state")
        return w.controller

    spec = load_spec(write_spec(SPEC))
    with Watcher(spec, tmp_path / "state", route=False) as w:
        over_fakes(w).router = Refusing()
        with pytest.raises(RoutingError, match=r"^routing failed: nginx failed to start \(exit 1\)"):
            w.run(once=True, handle_signals=False)
    with Watcher(spec, tmp_path / "state", route=False) as w:  # routing that works: exit 0
        over_fakes(w)
        w.run(once=True, handle_signals=False)


def test_gitops_commits_are_counted_as_applies_and_a_refused_commit_as_failed(tmp_path, write_spec):
    import subprocess

    from controller_fakes import Clock, FakeSource

    from skyhedge.controller.gitops import GitOpsExecutor
    from skyhedge.controller.loop import ControllerOptions
    from skyhedge.errors import StateError

    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "-C", str(repo), "init", "-q"], check=True)
    spec = load_spec(write_spec(SPEC))
    clock = Clock(1_700_000_000.0)
    ctl = Controller(
        spec,
        tmp_path / "state",
        executor=GitOpsExecutor(spec, tmp_path / "state", repo, clock=clock),
        sources=[FakeSource()],
        clock=clock,
        options=ControllerOptions(assume_ready=True),
    )
    metrics = Metrics()
    metrics.watch(ctl)
    ctl.tick()  # the first commit
    clock.advance(10)
    ctl.tick()  # nothing changed: no commit, nothing counted
    samples = parse(metrics.text())
    assert value(samples, "skyhedge_applies_total", result="ok") == 1
    assert value(samples, "skyhedge_applies_total", result="failed") == 0
    hook = repo / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\necho 'hook: rejected' >&2\nexit 1\n")
    hook.chmod(0o755)
    clock.advance(60)
    victim = next(r for r in ctl.state.live() if r.zone == "local-b")
    send(ctl, PreemptionEvent(Signal.GONE, clock(), "fake", replica_id=victim.id, reason="preempted"))
    with pytest.raises(StateError, match="git commit .* failed: hook: rejected"):
        ctl.tick()
    samples = parse(metrics.text())  # the listener saw the failed pass
    assert value(samples, "skyhedge_applies_total", result="failed") == 1
    hook.unlink()
    clock.advance(10)
    ctl.tick()  # the retried commit lands
    samples = parse(metrics.text())
    assert value(samples, "skyhedge_applies_total", result="ok") == 2
    assert value(samples, "skyhedge_applies_total", result="failed") == 1


def test_what_the_counters_remember_per_replica_stays_bounded_by_the_state(ctl):
    """A watcher runs for weeks and a churny spot fleet launches replicas without end: what the
    metrics remember per replica (to count each launch once) must shrink with the state, which
    keeps only the last GONE_KEPT gone replicas, rather than grow by one per replica ever run."""
    metrics = Metrics()
    metrics.watch(ctl)
    clock = ctl.clock
    for _ in range(30):
        for victim in [r for r in ctl.state.live() if r.market == "spot"][:1]:
            send(ctl, PreemptionEvent(Signal.GONE, clock(), "fake", replica_id=victim.id, reason="preempted"))
        for _ in range(2):
            ctl.tick()
            clock.advance(60)  # type: ignore[attr-defined]
        ctl.state.prune_gone(keep=2)  # what `save` does past GONE_KEPT, sooner
    ctl.tick()
    launched = total(parse(metrics.text()), "skyhedge_launches_total")
    assert launched > 20
    assert len(metrics._provisioned) <= len(ctl.state.replicas) < 10
    ctl.tick()
    assert total(parse(metrics.text()), "skyhedge_launches_total") == launched  # nothing counted twice


SIX_REPLICAS = SPEC.replace("min_replicas: 2, num_overprovision: 1", "min_replicas: 6, num_overprovision: 0")


def test_a_pass_appending_more_entries_than_the_history_keeps_loses_no_count(
    tmp_path, write_spec, monkeypatch
):
    """The history keeps its last HISTORY_LIMIT (200) entries; a pass that appends more (a zone of
    100 replicas preempted: their `preempted`, their replacements' `launched`...) pushed the
    preemptions out before the metrics looked for them: here 6 preemptions counted 0 past a cap
    of 3 (the pass's last 3 entries were launches)."""
    ctl = fake_controller(load_spec(write_spec(SIX_REPLICAS)), tmp_path / "state")
    metrics = Metrics()
    metrics.watch(ctl)
    for _ in range(3):
        ctl.tick()
        ctl.clock.advance(60)  # type: ignore[attr-defined]
    spot = [r for r in ctl.state.live() if r.market == "spot"]
    assert len(spot) == 6
    monkeypatch.setattr(ServiceState, "HISTORY_LIMIT", 3)
    for victim in spot:
        send(ctl, PreemptionEvent(Signal.GONE, ctl.clock(), "fake", replica_id=victim.id, reason="preempted"))
    ctl.tick()
    assert len(ctl.state.history) == 3
    samples = parse(metrics.text())
    assert total(samples, "skyhedge_preemptions_total", market="spot") == 6
    assert total(samples, "skyhedge_launches_total", market="spot") == 12  # 6, then 6 replacements
    # a copy of the state (a spec reload's trial plan) neither fails to copy nor counts what it logs
    trial = copy.deepcopy(ctl.state)
    trial.log({"event": "preempted", "replica_id": spot[0].id, "location": spot[0].location.key})
    ctl.tick()
    assert total(parse(metrics.text()), "skyhedge_preemptions_total") == 6


def test_a_wish_of_the_autoscaler_waiting_out_its_delay_is_a_series(tmp_path, write_spec):
    """The target the rate asks for, beside the target: a scrape shows a change coming (it was in
    the log and `status` only), and none at all without autoscaling."""
    spec = SPEC.replace(
        "replica_policy: {min_replicas: 2, num_overprovision: 1, policy: spothedge}",
        "replica_policy: {min_replicas: 1, max_replicas: 4, target_qps_per_replica: 10, "
        "upscale_delay_seconds: 30, num_overprovision: 0, policy: spothedge}",
    )
    ctl = fake_controller(load_spec(write_spec(spec)), tmp_path / "state")
    metrics = Metrics()
    metrics.watch(ctl)
    router = ctl.router
    for _ in range(8):  # a full window at 5 req/s
        ctl.tick()
        ctl.clock.advance(10)  # type: ignore[attr-defined]
        router.count += 50  # type: ignore[union-attr]
    samples = parse(metrics.text())
    assert value(samples, "skyhedge_target_replicas") == 1
    assert value(samples, "skyhedge_autoscaler_wanted_replicas") == 1
    for _ in range(3):  # 35 req/s: 4 replicas wanted, waiting out upscale_delay_seconds
        router.count += 350  # type: ignore[union-attr]
        ctl.clock.advance(10)  # type: ignore[attr-defined]
        ctl.tick()
    samples = parse(metrics.text())
    assert value(samples, "skyhedge_target_replicas") == 1
    assert value(samples, "skyhedge_autoscaler_wanted_replicas") > 1
    plain = fake_controller(load_spec(write_spec(SPEC, "plain.yaml")), tmp_path / "plain")
    metrics = Metrics()
    metrics.watch(plain)
    plain.tick()
    assert "skyhedge_autoscaler_wanted_replicas" not in metrics.text()


def dashboard_text(ctl: Controller) -> str:
    console = Console(record=True, width=160)
    console.print(render(ctl))
    return console.export_text()


def test_a_root_whose_applies_keep_failing_is_a_series_and_a_dashboard_line_until_it_applies_again(
    tmp_path, write_spec
):
    """What `status` said in a `Failing:` line (its cloud's credentials expired): before, no
    series carried it, and on the dashboard it was a warning among the events, scrolled away."""
    clock = Clock()
    ex = DeadCloud(clock)
    ctl = clocked_controller(load_spec(write_spec(TWO_ROOT_SPEC)), tmp_path / "state", clock, executor=ex)
    metrics = Metrics()
    metrics.watch(ctl)
    run_for(ctl, clock, 30)
    samples = parse(metrics.text())
    aws, local = {"cloud": "aws", "region": "us-east-1"}, {"cloud": "local", "region": "local"}
    assert value(samples, "skyhedge_root_failing", **aws) == 0  # every root's series from the start
    assert value(samples, "skyhedge_root_failing", **local) == 0
    assert "failing:" not in dashboard_text(ctl)

    ex.dead["aws/us-east-1"] = "Retrieving AWS account details: api error ExpiredToken: expired"
    aws_replica = next(r for r in ctl.state.live() if r.cloud == "aws")
    ctl.prober.down.add(aws_replica.id)  # type: ignore[union-attr]  # (replaced: the root is applied)
    run_for(ctl, clock, 900)
    failures = ctl.state.extra[FAILING_ROOTS_KEY]["aws/us-east-1"]["failures"]
    samples = parse(metrics.text())
    assert value(samples, "skyhedge_root_failing", **aws) == 1
    assert value(samples, "skyhedge_root_failing", **local) == 0
    assert total(samples, "skyhedge_root_failing") == 1
    [line] = [ln for ln in dashboard_text(ctl).splitlines() if "failing:" in ln]
    assert "aws/us-east-1 applies since" in line and f"{failures} in a row" in line and "ExpiredToken" in line

    del ex.dead["aws/us-east-1"]  # the API answers again
    run_for(ctl, clock, ctl.options.max_root_backoff + 60)
    assert FAILING_ROOTS_KEY not in ctl.state.extra
    samples = parse(metrics.text())
    assert value(samples, "skyhedge_root_failing", **aws) == 0  # back to 0: an alert on it resolves
    assert "failing:" not in dashboard_text(ctl)


def test_a_used_up_quota_is_a_series_per_region_and_market_and_a_dashboard_line_until_it_is_raised(
    tmp_path, write_spec
):
    """What `status` said in a `Quota:` line (a spot quota of 0 in us-west-2): before, no series
    carried it, and on the dashboard it was one warning among the events, said once."""
    clock = Clock()
    ex = FakeExecutor()
    ex.quota = {("us-west-2", "spot"): 0}
    ctl = clocked_controller(load_spec(write_spec(EVEN_TWO_REGIONS)), tmp_path / "state", clock, executor=ex)
    metrics = Metrics()
    metrics.watch(ctl)
    run_for(ctl, clock, 20)
    assert "aws/us-west-2/spot" in ctl.state.extra[QUOTA_KEY]
    samples = parse(metrics.text())
    west = {"cloud": "aws", "region": "us-west-2"}
    east = {"cloud": "aws", "region": "us-east-1"}
    assert value(samples, "skyhedge_quota_exhausted", **west, market="spot") == 1
    assert value(samples, "skyhedge_quota_exhausted", **west, market="on-demand") == 0
    assert value(samples, "skyhedge_quota_exhausted", **east, market="spot") == 0
    assert value(samples, "skyhedge_quota_exhausted", **east, market="on-demand") == 0
    [line] = [ln for ln in dashboard_text(ctl).splitlines() if "quota:" in ln]
    assert "spot in aws/us-west-2 used up since" in line and "All G and VT Spot" in line

    ex.quota = {}  # raised: the next ask there succeeds
    run_for(ctl, clock, SPOT_RETRY_MAX_SECONDS + 10)
    assert QUOTA_KEY not in ctl.state.extra
    samples = parse(metrics.text())
    assert value(samples, "skyhedge_quota_exhausted", **west, market="spot") == 0
    assert "quota:" not in dashboard_text(ctl)


def test_a_quota_across_a_clouds_regions_holds_every_region_of_that_cloud(tmp_path, write_spec):
    """A quota found used up for the whole cloud (`cloud/*/market`, GCP's GPUS_ALL_REGIONS) holds
    the launches of every region there (`Controller._quota_wait`): each region's series says so,
    with no `region="*"` series that could not go back to 0."""
    ctl = fake_controller(load_spec(write_spec(EVEN_TWO_REGIONS)), tmp_path / "state")
    metrics = Metrics()
    metrics.watch(ctl)
    ctl.tick()
    entry = {"reason": "quota used up", "since": 1000.0, "refusals": 1, "at": 1000.0, "next_at": 1030.0}
    ctl.state.extra[QUOTA_KEY] = {"aws/*/on-demand": entry}
    metrics.observe(ctl)
    samples = parse(metrics.text())
    for region in ("us-east-1", "us-west-2"):
        assert value(samples, "skyhedge_quota_exhausted", cloud="aws", region=region, market="on-demand") == 1
        assert value(samples, "skyhedge_quota_exhausted", cloud="aws", region=region, market="spot") == 0
    assert {dict(lab)["region"] for (n, lab) in samples if n == "skyhedge_quota_exhausted"} == {
        "us-east-1",
        "us-west-2",
    }
