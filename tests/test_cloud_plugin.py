"""Adding a cloud is adding a folder: a cloud that skyhedge has never heard of, written whole into a
temp folder by this test (its Python package, Terraform module, provider template and catalog)
and made known by the one documented call, `skyhedge.clouds.register_cloud`, is planned,
rendered, applied, watched, has its logs read and is destroyed, without a line of skyhedge
changed (DESIGN.md, "Adding a cloud").

The `fake` cloud launches nothing: one `terraform_data` per replica (built into Terraform, so the
embedded engine applies it offline), each replica answering at the endpoint the spec gives it, a
server this test runs on 127.0.0.1.
"""

from __future__ import annotations

import json
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from skyhedge import leftovers
from skyhedge.apply import apply_service, destroy_service
from skyhedge.cli import main
from skyhedge.clouds import builtin_clouds, cloud_names, register_cloud, unregister_cloud
from skyhedge.controller.runner import event_sources
from skyhedge.errors import SpecError
from skyhedge.service import resolve_placement
from skyhedge.spec import load_spec
from skyhedge.state import load_state

RENDER_PY = '''
"""Terraform inputs of one fake root: the service, its replicas, where they answer."""

from typing import Any


class FakeCloud:
    name = "fake"
    module_name = "fake-replicas"
    variables = (
        ("service", "The skyhedge service name."),
        ("replicas", "Replicas by stable ID: zone and market."),
        ("endpoint", "Where every replica answers."),
    )
    nullable: frozenset[str] = frozenset()

    def root_inputs(self, spec, replicas, region, *, instance_type, context) -> dict[str, Any]:
        return {
            "service": spec.name,
            "replicas": {
                r.id: {"zone": r.location.zone, "market": r.market.value}
                for r in sorted(replicas, key=lambda r: r.id)
            },
            "endpoint": spec.run.env["FAKE_ENDPOINT"],
        }


CLOUD = FakeCloud()
'''

EVENTS_PY = '''
"""The fake cloud's watcher source: it never sees a preemption."""

from skyhedge.events import EventSource


class FakeSource(EventSource):
    name = "fake-events"

    def poll(self, now, live):
        return []


def event_source(spec, state_dir, watched):
    return FakeSource()
'''

LOGS_PY = '''
"""The fake cloud's replica log: one line naming the replica."""

from skyhedge.replica_logs import LogChunk


def read_log(spec, state_dir, record, start=None):
    return LogChunk(text=f"fake console of {record.id}\\n", next=None, source="the fake console")
'''

MAIN_TF = """
variable "service" {
  type = string
}

variable "replicas" {
  type = map(object({ zone = string, market = string }))
}

variable "endpoint" {
  type = string
}

resource "terraform_data" "replica" {
  for_each = var.replicas
  input    = each.value
}

output "replicas" {
  value = {
    for id, r in terraform_data.replica : id => {
      endpoint = var.endpoint
      cloud_id = r.id
      zone     = r.input.zone
      market   = r.input.market
    }
  }
}
"""

PROVIDER_TF_J2 = """{# terraform_data needs no provider plugin. #}
{% macro required_providers() %}{% endmacro %}
{% macro configure() %}{% endmacro %}
"""

ZONES = ("fake-1a", "fake-1b")


@dataclass
class FakeCloudFolder:
    root: Path
    package: str


@pytest.fixture
def fake_cloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCloudFolder]:
    """The `fake` cloud, written into a temp folder and registered; forgotten again afterwards."""
    folder = tmp_path / "fake-cloud"
    package = f"skyhedge_test_fake_cloud_{uuid.uuid4().hex[:8]}"
    (folder / package).mkdir(parents=True)
    (folder / package / "__init__.py").write_text('"""A cloud outside skyhedge."""\n', encoding="utf-8")
    (folder / package / "render.py").write_text(RENDER_PY, encoding="utf-8")
    (folder / package / "events.py").write_text(EVENTS_PY, encoding="utf-8")
    (folder / package / "logs.py").write_text(LOGS_PY, encoding="utf-8")
    (folder / "module").mkdir()
    (folder / "module" / "main.tf").write_text(MAIN_TF.lstrip(), encoding="utf-8")
    (folder / "provider.tf.j2").write_text(PROVIDER_TF_J2, encoding="utf-8")
    catalog = {
        "format": 1,
        "cloud": "fake",
        "source": "a test",
        "taken_at": "a test",
        "instance_types": {
            "fake.small": {"accelerator": None, "accelerator_count": 0, "vcpus": 1, "memory_gib": 1}
        },
        "offers": [
            {
                "instance_type": "fake.small",
                "region": "fake-1",
                "zone": z,
                "ondemand_price": 1.0,
                "spot_price": 0.25,
            }
            for z in ZONES
        ],
    }
    (folder / "catalog.json").write_text(json.dumps(catalog), encoding="utf-8")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delenv("SKYHEDGE_CATALOG_DIR", raising=False)  # the bundled catalog: the one registered
    register_cloud(
        "fake",
        package,
        module_dir=folder / "module",
        provider_template=folder / "provider.tf.j2",
        catalog=folder / "catalog.json",
    )
    yield FakeCloudFolder(folder, package)
    unregister_cloud("fake")
    leftovers._WITHOUT_LEFTOVERS.discard("fake")
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[name]


@pytest.fixture
def health_server() -> Iterator[tuple[str, list[str]]]:
    """A replica's server on 127.0.0.1: /health answers 200; the paths asked are recorded."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", asked
    server.shutdown()
    server.server_close()
    thread.join(5)


def write_spec(path: Path, endpoint: str) -> Path:
    spec = {
        "name": "fakesvc",
        "placement": {"clouds": ["fake"]},
        "resources": {"instance_type": {"fake": "fake.small"}},
        "replica_policy": {
            "min_replicas": 2,
            "num_overprovision": 0,
            "dynamic_ondemand_fallback": False,
            "policy": "spothedge",
        },
        "readiness_probe": {"path": "/health", "initial_delay_seconds": 60, "timeout_seconds": 2},
        "run": {"command": "serve", "env": {"FAKE_ENDPOINT": endpoint}},
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_a_cloud_in_a_temp_folder_is_planned_rendered_applied_watched_and_destroyed(
    fake_cloud, health_server, tmp_path
):
    endpoint, asked = health_server
    spec_path = write_spec(tmp_path / "service.yaml", endpoint)
    state_dir = tmp_path / "state"
    assert "fake" in cloud_names() and "fake" not in builtin_clouds()

    planned = cli("plan", str(spec_path), "--state-dir", str(state_dir), "--json")
    assert planned.exit_code == 0, planned.output
    rows = json.loads(planned.output)["replicas"]
    assert sorted((r["cloud"], r["zone"]) for r in rows) == [("fake", z) for z in ZONES]

    out = tmp_path / "tree"
    rendered = cli("render", str(spec_path), "--state-dir", str(state_dir), "--out", str(out))
    assert rendered.exit_code == 0, rendered.output
    assert (out / "modules" / "fake-replicas" / "main.tf").read_text(encoding="utf-8") == MAIN_TF.lstrip()
    tfvars = json.loads((out / "fake" / "fake-1" / "skyhedge.auto.tfvars.json").read_text(encoding="utf-8"))
    assert tfvars["endpoint"] == endpoint
    assert sorted(v["zone"] for v in tfvars["replicas"].values()) == list(ZONES)

    spec = load_spec(spec_path)
    report = apply_service(spec, state_dir, route=False)
    assert report.ok, report.errors
    live = sorted(load_state(state_dir, "fakesvc").live(), key=lambda r: r.id)
    assert [(r.cloud, r.zone, r.endpoint, r.ready_at is not None) for r in live] == [
        ("fake", z, endpoint, True) for z in ZONES
    ]
    assert "/health" in asked  # READY because the replica answered its probe

    sources = event_sources(spec, state_dir, resolve_placement(spec), live=live)
    assert [s.name for s in sources] == ["fake-events"]

    logs = cli("logs", str(spec_path), live[0].id, "--state-dir", str(state_dir))
    assert logs.exit_code == 0, logs.output
    assert f"fake console of {live[0].id}" in logs.output

    destroyed = destroy_service(spec, state_dir, route=False)
    assert destroyed.ok, destroyed.errors
    assert load_state(state_dir, "fakesvc").live() == []


def test_a_cloud_is_unknown_until_registered(fake_cloud, tmp_path):
    spec_path = write_spec(tmp_path / "service.yaml", "http://127.0.0.1:9")
    unregister_cloud("fake")
    with pytest.raises(
        SpecError, match=r"resources\.instance_type\.fake: unknown field \(allowed: aws, gcp, local\)"
    ):
        load_spec(spec_path)


@pytest.mark.parametrize("name", ["aws", "local"])
def test_a_builtin_cloud_cannot_be_registered_again(name):
    with pytest.raises(ValueError, match=f"cloud {name!r} is built into skyhedge"):
        register_cloud(name, "elsewhere")
    assert name in builtin_clouds()


def test_the_builtin_clouds_are_the_cloud_folders():
    """A folder of skyhedge/clouds/ with a render.py is a cloud: nothing else lists them."""
    folders = Path(__file__).resolve().parents[1] / "skyhedge" / "clouds"
    assert builtin_clouds() == tuple(sorted(p.parent.name for p in folders.glob("*/render.py")))
