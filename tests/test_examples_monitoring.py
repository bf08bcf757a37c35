"""examples/monitoring stays true: the alert rules use only metrics the watcher serves, and the
systemd unit's command line is one `skyhedge watch` accepts."""

from __future__ import annotations

import configparser
import re
import shlex
import time
from pathlib import Path

import yaml
from controller_fakes import fake_controller

from skyhedge.cli import main
from skyhedge.controller.metrics import Metrics
from skyhedge.spec import load_spec

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "monitoring"
AWS_SPEC = """
name: svc
placement: {clouds: [aws], regions: [us-east-1]}
resources: {accelerators: "L4:1"}
replica_policy: {min_replicas: 2}
run: {image: "vllm/vllm-openai:v0.6.3"}
"""


def served_families(tmp_path: Path, write_spec) -> set[str]:
    """The metric families a watcher of an AWS service serves after a pass."""
    ctl = fake_controller(load_spec(write_spec(AWS_SPEC)), tmp_path / "state")
    metrics = Metrics()
    metrics.watch(ctl, lambda: None)  # as `watch --metrics-port` does, with its reload outcome
    ctl.tick()
    return set(re.findall(r"^# TYPE (\S+) ", metrics.text(), flags=re.M))


def test_every_metric_an_alert_uses_is_served(tmp_path, write_spec):
    rules = yaml.safe_load((EXAMPLE / "alerts.yml").read_text())["groups"][0]["rules"]
    assert len(rules) >= 5
    served = served_families(tmp_path, write_spec)
    for rule in rules:
        assert rule["alert"].startswith("Skyhedge") and rule["annotations"]["summary"]
        # only skyhedge_info carries the service's name: the others are told apart by instance
        assert "$labels.service" not in rule["annotations"]["summary"], rule["alert"]
        used = set(re.findall(r"\bskyhedge_[a-z_]+\b", rule["expr"]))
        assert used <= served, (rule["alert"], used - served)
    assert {"skyhedge_serving", "skyhedge_last_pass_timestamp_seconds"} <= {
        m for rule in rules for m in re.findall(r"\bskyhedge_[a-z_]+\b", rule["expr"])
    }


def test_the_scrape_config_loads_the_rules_and_targets_the_units_port():
    config = yaml.safe_load((EXAMPLE / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    [job] = config["scrape_configs"]
    assert job["job_name"] == "skyhedge"  # the name SkyhedgeWatcherDown selects
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9464"]
    assert 'up{job="skyhedge"}' in (EXAMPLE / "alerts.yml").read_text()


def test_the_systemd_units_command_is_one_skyhedge_watch_accepts():
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((EXAMPLE / "skyhedge-watch.service").read_text())
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert Path(argv[0]).name == "skyhedge" and argv[1] == "watch"
    command = main.commands["watch"]  # type: ignore[attr-defined]
    ctx = command.make_context("watch", argv[2:], resilient_parsing=False)
    assert ctx.params["metrics_port"] == 9464
    assert ctx.params["state_dir"] == Path("/srv/skyhedge/state")
    assert unit["Service"]["KillMode"] == "process"  # the router outlives a restart
    assert unit["Service"]["ExecReload"] == "/bin/kill -HUP $MAINPID"


#: PromQL's aggregation operators, with the `by (...)` clause written before the parenthesis
AGGREGATION = re.compile(
    r"\b(sum|count|avg|min|max|group|stddev|stdvar|topk|bottomk|quantile|count_values)\s*"
    r"(?:by\s*\(([^)]*)\))?\s*\("
)


def test_every_alert_fires_per_watcher_and_names_it():
    """One Prometheus scrapes several watchers (a unit per service): an aggregation that drops
    `instance` mixes their series (one zone lost by each of two watchers fired a wave "in 2
    zones"; two scrapes of one watcher, one zone lost: the same) and the alert cannot say which
    watcher it is about."""
    rules = yaml.safe_load((EXAMPLE / "alerts.yml").read_text())["groups"][0]["rules"]
    for rule in rules:
        for m in AGGREGATION.finditer(rule["expr"]):
            kept = {label.strip() for label in (m[2] or "").split(",")}
            assert {"job", "instance"} <= kept, (rule["alert"], m[0])
        assert "$labels.instance" in rule["annotations"]["summary"], rule["alert"]


def test_every_label_a_summary_names_is_one_the_rules_series_carry(tmp_path, write_spec):
    """A summary naming a label its series lack renders it empty ("applies to / have failed"): the
    labels of the metrics a rule uses as served, or those its outermost aggregation keeps."""
    rules = yaml.safe_load((EXAMPLE / "alerts.yml").read_text())["groups"][0]["rules"]
    ctl = fake_controller(load_spec(write_spec(AWS_SPEC)), tmp_path / "state")
    metrics = Metrics()
    metrics.watch(ctl, lambda: None)
    ctl.tick()
    carried: dict[str, set[str]] = {}
    for name, labels in re.findall(r"^(skyhedge_[a-z_]+)\{([^}]*)\}", metrics.text(), flags=re.M):
        carried.setdefault(name, set()).update(re.findall(r'([a-z_]+)="', labels))
    for rule in rules:
        named = set(re.findall(r"\$labels\.([a-z_]+)", rule["annotations"]["summary"]))
        outermost = AGGREGATION.search(rule["expr"])
        if outermost is not None:
            kept = {label.strip() for label in (outermost[2] or "").split(",")}
        else:
            used = re.findall(r"\bskyhedge_[a-z_]+\b", rule["expr"])
            kept = {"job", "instance"} | set.intersection(*(carried.get(m, set()) for m in used or [""]))
        assert named <= kept, (rule["alert"], named - kept)
    names = {rule["alert"] for rule in rules}
    assert {"SkyhedgeRootFailing", "SkyhedgeQuotaExhausted"} <= names


def test_the_stalled_watcher_alert_has_a_series_before_the_first_pass_ends():
    # the last pass's time is served only once a pass has ended: a first pass that hung (a
    # Terraform run that never returns) left SkyhedgeWatcherStalled with no series to fire on
    rules = yaml.safe_load((EXAMPLE / "alerts.yml").read_text())["groups"][0]["rules"]
    [stalled] = [r for r in rules if r["alert"] == "SkyhedgeWatcherStalled"]
    before_any_pass = set(re.findall(r"^# TYPE (\S+) ", Metrics().text(), flags=re.M))
    used = set(re.findall(r"\bskyhedge_[a-z_]+\b", stalled["expr"]))
    assert used & before_any_pass, (used, before_any_pass)
    started = re.search(r"^skyhedge_watcher_start_timestamp_seconds (\S+)$", Metrics().text(), flags=re.M)
    assert started is not None and abs(float(started.group(1)) - time.time()) < 60
