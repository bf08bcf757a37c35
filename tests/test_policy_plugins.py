"""Plug-in policies sit behind an error boundary: their bugs are one `PolicyError` line, not a
traceback through skyhedge; built-in policies are not wrapped."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from skyhedge.cli import main
from skyhedge.errors import PolicyError
from skyhedge.policy import Candidate, LaunchOnDemand, LaunchSpot, Location, Observation, Policy, make_policy
from skyhedge.policy.base import GuardedPolicy
from skyhedge.policy.spothedge import SpotHedge

REPO = Path(__file__).resolve().parents[1]
PLUGIN = textwrap.dedent(
    """
    from skyhedge.policy import LaunchSpot, Location, Policy

    class Broken(Policy):
        def decide(self, obs):
            raise RuntimeError("boom")

    class Junk(Policy):
        def decide(self, obs):
            return ["launch"]

    class BadInit(Policy):
        def __init__(self, config=None, *, seed=0):
            raise ValueError("no config for me")

        def decide(self, obs):
            return []

    class BadMemory(Policy):
        def decide(self, obs):
            return [LaunchSpot(Location("local", "local", "local-a"))]

        def snapshot(self):
            return ["not", "a", "dict"]

    class Fine(Policy):
        def decide(self, obs):
            return [LaunchSpot(Location("local", "local", "local-a"))]

    class Outside(Policy):
        def decide(self, obs):
            return [LaunchSpot(Location("gcp", "europe-west4", "europe-west4-a"))]

    class Exits(Policy):
        def decide(self, obs):
            raise SystemExit(3)

    class Clocked(Fine):
        clock_memory = frozenset({"tick"})

    class BadClocks(Fine):
        clock_memory = "tick"  # a string, not a collection of keys

    class OwnInit(Policy):
        def __init__(self, config=None, *, seed=0):
            self.zone = Location("local", "local", "local-b")  # never calls Policy.__init__

        def decide(self, obs):
            return [LaunchSpot(self.zone)]
    """
)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """An importable module `shplug` holding the plug-ins above (removed again afterwards)."""
    (tmp_path / "shplug.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "shplug"
    sys.modules.pop("shplug", None)


def observation() -> Observation:
    zones = [Location("local", "local", f"local-{x}") for x in "ab"]
    return Observation(
        now=0.0, target=1, candidates=tuple(Candidate(z, 1.0, 3.0) for z in zones), replicas=(), events=()
    )


@pytest.mark.parametrize(
    ("cls", "call", "message"),
    [
        ("Broken", "decide", "policy 'shplug:Broken': decide() raised RuntimeError: boom"),
        ("Junk", "decide", "policy 'shplug:Junk': decide() must return a list of Decision"),
        ("BadMemory", "snapshot", "policy 'shplug:BadMemory': snapshot() must return a dict"),
        # a launch outside the spec's placement would be priced at $0 and rendered, excluded
        # zones included; sys.exit() would end `plan` with a bare exit code and no message
        ("Outside", "decide", "policy 'shplug:Outside': decide() launched in gcp/europe-west4/"),
        ("Exits", "decide", "policy 'shplug:Exits': decide() raised SystemExit: 3"),
    ],
)
def test_a_plugins_bug_is_one_policy_error_naming_it(plugin, cls, call, message):
    policy = make_policy(f"{plugin}:{cls}")
    with pytest.raises(PolicyError) as caught:
        policy.decide(observation()) if call == "decide" else policy.snapshot()
    assert str(caught.value).startswith(message)


def test_a_plugin_that_cannot_be_built_is_a_policy_error(plugin):
    with pytest.raises(
        PolicyError, match=r"policy 'shplug:BadInit': could not be created: ValueError: no config"
    ):
        make_policy(f"{plugin}:BadInit")


def test_a_working_plugin_passes_through_and_builtins_are_not_wrapped(plugin):
    policy = make_policy(f"{plugin}:Fine")
    assert isinstance(policy, GuardedPolicy)
    assert policy.decide(observation()) == [LaunchSpot(Location("local", "local", "local-a"))]
    assert policy.snapshot() == {}
    assert type(make_policy("spothedge")) is SpotHedge


def test_a_plugin_with_its_own_init_is_wrapped_with_the_config_and_seed_it_was_given(plugin):
    from skyhedge.policy import PolicyConfig

    config = PolicyConfig(num_overprovision=2)
    policy = make_policy(f"{plugin}:OwnInit", config, seed=7)
    assert policy.config is config and policy.seed == 7
    assert policy.decide(observation()) == [LaunchSpot(Location("local", "local", "local-b"))]


def test_plan_reports_a_broken_plugin_in_one_line(plugin, tmp_path, monkeypatch):
    monkeypatch.delenv("SKYHEDGE_DEBUG", raising=False)
    spec = REPO / "examples/local-echo/service.yaml"
    args = ["plan", str(spec), "--state-dir", str(tmp_path / "state"), "--policy", f"{plugin}:Broken"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert result.output.strip() == "error: policy 'shplug:Broken': decide() raised RuntimeError: boom"


def test_an_empty_policy_name_on_the_command_line_is_refused_not_ignored(tmp_path, monkeypatch):
    monkeypatch.delenv("SKYHEDGE_DEBUG", raising=False)
    spec = REPO / "examples/local-echo/service.yaml"
    args = ["plan", str(spec), "--state-dir", str(tmp_path / "state"), "--policy", ""]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert result.output.startswith("error: --policy: unknown policy '' (available:")


def test_skyhedge_debug_shows_the_plugins_traceback(plugin, tmp_path, monkeypatch):
    monkeypatch.setenv("SKYHEDGE_DEBUG", "1")
    spec = REPO / "examples/local-echo/service.yaml"
    args = ["plan", str(spec), "--state-dir", str(tmp_path / "state"), "--policy", f"{plugin}:Broken"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "Traceback" in result.output and 'raise RuntimeError("boom")' in result.output


def test_a_plugin_launching_spot_where_only_on_demand_is_sold_is_one_clear_error():
    """Locations in `Observation.ondemand_only` take on-demand replicas only: the guard refuses a
    plug-in's spot launch there, and lets its on-demand launch through."""
    spot_zone = Location("aws", "us-east-1", "use1-az1")
    od_zone = Location("aws", "us-east-1", "use1-az3")

    class Launches(Policy):
        def __init__(self, decision):
            super().__init__()
            self.decision = decision

        def decide(self, obs):
            return [self.decision]

    obs = Observation(
        now=0.0,
        target=1,
        candidates=(Candidate(spot_zone, 1.0, 3.0),),
        ondemand_only=(Candidate(od_zone, math.inf, 3.0),),
    )
    assert GuardedPolicy(Launches(LaunchOnDemand(od_zone)), "p").decide(obs) == [LaunchOnDemand(od_zone)]
    with pytest.raises(PolicyError, match=r"spot in aws/us-east-1/use1-az3, which sells on-demand only"):
        GuardedPolicy(Launches(LaunchSpot(od_zone)), "p").decide(obs)


@pytest.mark.parametrize("entry", ["skyhedge", "skyhedge.cli"])
def test_python_m_imports_no_plugin_from_the_current_directory(tmp_path, entry):
    """`python -m` puts the directory it runs in first on Python's path (the console script does
    not): a `.py` file lying there, e.g. one a pull request added to a GitOps checkout, was
    imported as the spec's `module:Class` policy, running its code with the watcher's cloud
    credentials. It is taken off the path as `python -m pip` does; PYTHONPATH still works."""
    (tmp_path / "cwdplug.py").write_text(
        "import pathlib\npathlib.Path('IMPORTED').write_text('x')\n"
        "from skyhedge.policy.spothedge import SpotHedge as P\n"
    )
    spec = REPO / "examples/local-echo/service.yaml"
    argv = [sys.executable, "-m", entry, "plan", str(spec), "--state-dir", str(tmp_path / "state")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [*argv, "--policy", "cwdplug:P"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 1 and "No module named 'cwdplug'" in run.stderr, run.stderr
    assert not (tmp_path / "IMPORTED").exists()
    env["PYTHONPATH"] = str(tmp_path)  # asked for: taken
    run = subprocess.run(
        [*argv, "--policy", "cwdplug:P"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "IMPORTED").exists()


def test_a_plugins_clock_memory_is_held_back_like_the_builtin_ones_and_a_bad_one_ignored(plugin):
    """`Policy.clock_memory`: memory keys a watcher writes at most once a minute (loop.SAVE_EVERY).
    A plug-in declaring something other than a collection of keys gets its every change written,
    not a crash in the watcher's save."""
    from skyhedge.policy.base import clock_memory

    assert clock_memory("skyhedge") == {"last_now", "interval"}
    assert clock_memory("spothedge") == frozenset()
    assert clock_memory(f"{plugin}:Clocked") == {"tick"}
    assert clock_memory(f"{plugin}:BadClocks") == frozenset()
    assert clock_memory("no-such-policy") == frozenset()


def _dist(site: Path, name: str, entry_points: str) -> None:
    """`name` 1.0 "installed" into `site` (a `*.dist-info` folder on the path) with `entry_points`."""
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)


def test_an_unrelated_distribution_whose_entry_points_do_not_parse_breaks_no_plan(
    plugin, tmp_path, monkeypatch
):
    """importlib.metadata's `entry_points()` raises for every distribution when one
    entry_points.txt has a line without `=`: `plan` ended in a traceback (`TypeError:
    Pair.__new__()`) for every spec, as the policy registry reads the entry points. Now the other
    distributions' policies are still found, and a broken file that declares none says nothing."""
    site = tmp_path / "site"
    _dist(site, "unrelated-tool", "[console_scripts]\nno-equals-sign-here\n")
    _dist(site, "shplug-policies", f"[skyhedge.policies]\nfine = {plugin}:Fine\n")
    monkeypatch.syspath_prepend(str(site))
    spec = REPO / "examples/local-echo/service.yaml"
    for policy in ("skyhedge", "fine"):
        args = ["plan", str(spec), "--state-dir", str(tmp_path / "state"), "--policy", policy]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert "warning" not in result.output and "Traceback" not in result.output


SPEC_NAMING = """
name: svc
placement: {{clouds: [local]}}
replica_policy: {{min_replicas: 1, policy: {policy}}}
run: {{command: "true"}}
"""


@pytest.fixture
def entry_point_reads(monkeypatch):
    """How many times the installed distributions' entry points are scanned (each scan read every
    `entry_points.txt` on the path: 4.5-13 ms, at every spec load). The kept entry points are
    forgotten before and after, and a folder changed a moment ago is trusted at once (the test's
    own folders are all new)."""
    import importlib.metadata

    from skyhedge import _entry_points

    real = importlib.metadata.entry_points
    reads: list[str] = []

    def counted(**kw):
        reads.append(kw.get("group", ""))
        return real(**kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", counted)
    monkeypatch.setattr(_entry_points, "_SETTLE_SECONDS", 0.0, raising=False)
    forget = getattr(_entry_points, "forget_declared", lambda: None)
    forget()
    yield reads
    forget()


def test_a_watchers_spec_loads_read_the_plugins_once_and_still_see_one_installed_meanwhile(
    plugin, tmp_path, entry_point_reads
):
    """The watcher loads its spec at every pass, and each load scanned every distribution for
    policy plug-ins (`benchmarks/spec_load_bench.py`: load_spec 8.3-10.1 ms median, 0.8-1.2 ms with
    them kept). Kept, a plug-in installed while the watcher runs must still be found."""
    from skyhedge.spec import load_spec

    site = tmp_path / "site"
    site.mkdir()
    spec = tmp_path / "svc.yaml"
    spec.write_text(SPEC_NAMING.format(policy="skyhedge"))
    import sys as _sys

    _sys.path.insert(0, str(site))
    try:
        for _ in range(5):
            load_spec(spec)
        assert entry_point_reads.count("skyhedge.policies") == 1  # was 5
        # installed meanwhile: a new *.dist-info folder (pip's way) changes its folder's time
        _dist(site, "shplug-new", f"[skyhedge.policies]\nfresh-one = {plugin}:Fine\n")
        spec.write_text(SPEC_NAMING.format(policy="fresh-one"))
        assert load_spec(spec).replica_policy.policy == "fresh-one"
        # an entry point added in place (no folder's time changes): a name not found reads again
        (site / "shplug_new-1.0.dist-info" / "entry_points.txt").write_text(
            f"[skyhedge.policies]\nfresh-one = {plugin}:Fine\nin-place = {plugin}:Fine\n"
        )
        spec.write_text(SPEC_NAMING.format(policy="in-place"))
        assert load_spec(spec).replica_policy.policy == "in-place"
        from skyhedge.policy import policy_class

        assert policy_class("in-place").__name__ == "Fine"
        reads = entry_point_reads.count("skyhedge.policies")
        spec.write_text(SPEC_NAMING.format(policy="no-such-policy"))
        for _ in range(2):  # a typo is still one line naming the field, read afresh each time
            with pytest.raises(Exception, match="unknown policy 'no-such-policy'"):
                load_spec(spec)
        assert entry_point_reads.count("skyhedge.policies") == reads + 2
    finally:
        _sys.path.remove(str(site))


def test_a_module_class_policy_chosen_at_every_pass_reads_the_plugins_at_most_once(plugin, entry_point_reads):
    """`compute_plan` builds the policy at every watcher pass (`make_policy`). A `module:Class`
    name is no entry point, so it was never among the ones kept, and each pass read every
    distribution again for it (`fresh`): the scan the kept entry points save at each spec load,
    paid at each plan. An entry point of that name is still found among the kept ones."""
    from skyhedge.policy import make_policy

    for _ in range(5):
        make_policy(f"{plugin}:Fine")
    assert entry_point_reads.count("skyhedge.policies") <= 1  # was 6: one per pass, and the first
