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

import contextlib
import importlib
import io
import json
import os
import subprocess
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
from skyhedge.clouds import (
    builtin_clouds,
    cloud_names,
    cloud_package,
    forget_plugins,
    register_cloud,
    unregister_cloud,
)
from skyhedge.controller.runner import event_sources
from skyhedge.errors import CloudError, SpecError
from skyhedge.service import resolve_placement
from skyhedge.spec import load_spec, parse_spec, replica_revision, spec_changes
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

SPEC_PY = '''
"""The fake cloud's own top-level spec section, `fake:`: which of its zones replicas may use, and
a tag that makes up its machines."""

from dataclasses import dataclass

from skyhedge.clouds import CloudConfig, CloudSpecSection
from skyhedge.spec_fields import str_list, string


@dataclass(frozen=True)
class FakeConfig(CloudConfig):
    zones: tuple[str, ...] = ()
    tag: str | None = None

    confinement = "fake zones are those of fake.zones"
    confining_field, confining_kind, confining_level = "fake.zones", "fake zone", "zones"

    def confines(self, region, zone):
        return not self.zones or zone in self.zones

    @property
    def confined(self):
        return bool(self.zones)

    def confining_keys(self):
        return self.zones

    def revision(self, cloud):
        return {"fake_tag": self.tag} if self.tag is not None and cloud in (None, "fake") else {}


class FakeSection(CloudSpecSection):
    key = "fake"
    config = FakeConfig
    zone_hint = " (fake zones are IDs such as 'fake-1a')"

    def parse(self, ctx, d):
        tag = string(ctx, "fake.tag", d["tag"]) if d.get("tag") is not None else None
        return FakeConfig(zones=str_list(ctx, "fake.zones", d.get("zones")), tag=tag)

    def zone_problem(self, zone):
        return f"{zone!r} is a fake zone name; give its ID" if zone.startswith("name-") else None


SECTION = FakeSection()
'''

ZONES = ("fake-1a", "fake-1b")


@dataclass
class FakeCloudFolder:
    root: Path
    package: str


def write_fake_cloud(root: Path, package: str, *, section: bool = False) -> Path:
    """The `fake` cloud's every part, written into the Python package `root/package` (its code,
    its Terraform module, provider template and catalog beside it; with `section`, its own spec
    section `fake:` too); returns the package's folder."""
    folder = root / package
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text('"""A cloud outside skyhedge."""\n', encoding="utf-8")
    (folder / "render.py").write_text(RENDER_PY, encoding="utf-8")
    if section:
        (folder / "spec.py").write_text(SPEC_PY, encoding="utf-8")
    (folder / "events.py").write_text(EVENTS_PY, encoding="utf-8")
    (folder / "logs.py").write_text(LOGS_PY, encoding="utf-8")
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
    return folder


def forget_modules(package: str) -> None:
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[name]


@pytest.fixture
def fake_cloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCloudFolder]:
    """The `fake` cloud, written into a temp folder and registered; forgotten again afterwards."""
    root = tmp_path / "fake-cloud"
    package = f"skyhedge_test_fake_cloud_{uuid.uuid4().hex[:8]}"
    folder = write_fake_cloud(root, package)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv("SKYHEDGE_CATALOG_DIR", raising=False)  # the bundled catalog: the one registered
    register_cloud(
        "fake",
        package,
        module_dir=folder / "module",
        provider_template=folder / "provider.tf.j2",
        catalog=folder / "catalog.json",
    )
    yield FakeCloudFolder(root, package)
    unregister_cloud("fake")
    leftovers._WITHOUT_LEFTOVERS.discard("fake")
    forget_modules(package)


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


# -- A cloud's own top-level spec section (its `spec.py`) ---------------------------------------


@pytest.fixture
def sectioned_cloud(fake_cloud: FakeCloudFolder) -> FakeCloudFolder:
    """The registered `fake` cloud with its own spec section, `fake:` (its package's `spec.py`)."""
    (fake_cloud.root / fake_cloud.package / "spec.py").write_text(SPEC_PY, encoding="utf-8")
    importlib.invalidate_caches()  # the package's folder was listed before the file was there
    return fake_cloud


def with_section(path: Path, section: object, **placement: object) -> Path:
    """The spec at `path` with the top-level `fake:` section `section` (and `placement` fields)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["fake"] = section
    data["placement"].update(placement)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_a_cloud_owns_its_top_level_spec_section_from_its_own_folder(sectioned_cloud, tmp_path):
    """No line of skyhedge names `fake:`: the spec takes it because the fake cloud's `spec.py` says
    so, checks it with the cloud's own code, and the core asks it where replicas may go."""
    spec_path = with_section(
        write_spec(tmp_path / "service.yaml", "http://127.0.0.1:9"), {"zones": ["fake-1b"]}
    )
    spec = load_spec(spec_path)
    assert type(spec.fake).__name__ == "FakeConfig" and spec.fake.zones == ("fake-1b",)
    assert spec.network("fake") is spec.fake and spec.aws.subnets == ()  # the built-in sections as ever
    placement = resolve_placement(spec)
    assert {c.location.zone for c in placement.candidates} == {"fake-1b"}  # `confines` asked

    planned = cli("plan", str(spec_path), "--state-dir", str(tmp_path / "st"), "--json")
    assert planned.exit_code == 0, planned.output
    assert {r["zone"] for r in json.loads(planned.output)["replicas"]} == {"fake-1b"}


@pytest.mark.parametrize(
    ("section", "placement", "message"),
    [
        ({"zone": ["fake-1a"]}, {}, r"fake\.zone: unknown field \(did you mean 'zones'\?\)"),
        ({"tag": 5}, {}, r"fake\.tag: expected a string, got 5"),
        ([], {}, r"fake: expected a mapping, got list"),
        ({}, {"zones": ["name-1a"]}, r"placement\.zones\[0\]: 'name-1a' is a fake zone name; give its ID"),
    ],
    ids=["unknown-field", "its-own-check", "not-a-mapping", "its-zone-check"],
)
def test_a_cloud_sections_errors_are_one_line_naming_the_field(
    sectioned_cloud, tmp_path, section, placement, message
):
    spec_path = with_section(
        write_spec(tmp_path / "service.yaml", "http://127.0.0.1:9"), section, **placement
    )
    with pytest.raises(SpecError, match=message):
        load_spec(spec_path)


def test_a_cloud_sections_zones_are_checked_against_its_catalog(sectioned_cloud, tmp_path):
    spec_path = with_section(
        write_spec(tmp_path / "service.yaml", "http://127.0.0.1:9"), {"zones": ["fake-9z"]}
    )
    with pytest.raises(SpecError, match=r"fake\.zones\.fake-9z: unknown fake zone 'fake-9z'"):
        resolve_placement(load_spec(spec_path))
    spec_path = write_spec(tmp_path / "other.yaml", "http://127.0.0.1:9")
    with_section(spec_path, {}, zones=["zz-9"])  # no close name: the cloud's own hint
    with pytest.raises(
        SpecError, match=r"unknown zone 'zz-9' for clouds fake \(fake zones are IDs such as 'fake-1a'\)$"
    ):
        resolve_placement(load_spec(spec_path))


def test_a_cloud_sections_revision_rolls_its_replicas_and_its_changes_are_named(sectioned_cloud, tmp_path):
    base = write_spec(tmp_path / "service.yaml", "http://127.0.0.1:9")
    plain = load_spec(base)
    v1 = load_spec(with_section(write_spec(tmp_path / "v1.yaml", "http://127.0.0.1:9"), {"tag": "v1"}))
    v2 = load_spec(with_section(write_spec(tmp_path / "v2.yaml", "http://127.0.0.1:9"), {"tag": "v2"}))
    assert replica_revision(v1, "fake") != replica_revision(v2, "fake") != replica_revision(plain, "fake")
    assert replica_revision(v1, "local") == replica_revision(plain, "local")  # its own replicas only
    assert spec_changes(v1, v2) == ["fake.tag: v1 -> v2"]


def test_a_cloud_sections_key_is_unknown_once_the_cloud_is(sectioned_cloud, tmp_path):
    spec_path = with_section(write_spec(tmp_path / "service.yaml", "http://127.0.0.1:9"), {"tag": "v1"})
    data = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    data["placement"]["clouds"] = ["local"]
    data["resources"] = {}
    unregister_cloud("fake")
    with pytest.raises(
        SpecError,
        match=r"<spec>: fake: unknown field \(allowed: aws, gcp, name, placement, readiness_probe, "
        r"replica_policy, resources, run, service, terraform\)$",
    ):
        parse_spec(data)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('key = "fake"', 'key = "other"'), r"SECTION\.key is 'other'; a cloud owns the key 'fake'"),
        (
            ("SECTION = FakeSection()", "SECTION = None"),
            r"defines no SECTION \(a CloudSpecSection\), got none",
        ),
    ],
    ids=["another-key", "no-section"],
)
def test_a_cloud_section_that_is_not_its_own_is_one_line_naming_the_file(
    sectioned_cloud, tmp_path, edit, message
):
    spec_py = sectioned_cloud.root / sectioned_cloud.package / "spec.py"
    spec_py.write_text(SPEC_PY.replace(*edit), encoding="utf-8")
    with pytest.raises(CloudError, match=rf"cloud 'fake': {sectioned_cloud.package}/spec\.py.*{message}"):
        load_spec(write_spec(tmp_path / "service.yaml", "http://127.0.0.1:9"))


def local_only(spec_path: Path, **extra: object) -> dict[str, object]:
    """The spec at `spec_path` placed on the local cloud only (plus top-level `extra`)."""
    data = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    data["placement"] = {"clouds": ["local"], "zones": ["local-a"]}
    data["resources"] = {}
    return {**data, **extra}


@pytest.mark.parametrize(
    ("spec_py", "message"),
    [
        ("import skyhedge_test_no_such_dependency\n", r"cannot be imported \(ModuleNotFoundError: .*"),
        ("raise RuntimeError('half installed')\n", r"cannot be imported \(RuntimeError: half installed\)"),
        (SPEC_PY.replace("SECTION = FakeSection()", "SECTION = None"), r"defines no SECTION .*got none"),
    ],
    ids=["missing-dependency", "raises-at-import", "no-section"],
)
def test_a_cloud_whose_section_cannot_be_had_fails_only_the_specs_that_use_it_in_one_line(
    sectioned_cloud, tmp_path, spec_py, message
):
    """A plug-in cloud whose `spec.py` does not import (a dependency missing) or is no section:
    every spec was refused with a traceback out of `cloud_module` (the section of every known
    cloud is asked for at every read), a local-only one as well. Only a spec placing on that
    cloud or writing its key is refused, in one line naming the file."""
    (sectioned_cloud.root / sectioned_cloud.package / "spec.py").write_text(spec_py, encoding="utf-8")
    spec_path = write_spec(tmp_path / "service.yaml", "http://127.0.0.1:9")
    assert parse_spec(local_only(spec_path)).clouds == ("local",)
    one_line = rf"^cloud 'fake': {sectioned_cloud.package}/spec\.py:? {message}$"
    with pytest.raises(CloudError, match=one_line):
        load_spec(spec_path)
    with pytest.raises(CloudError, match=one_line):
        parse_spec(local_only(spec_path, fake={"tag": "v1"}))
    done = cli("plan", str(spec_path), "--state-dir", str(tmp_path / "st"))
    assert done.exit_code == 1 and len(done.output.strip().splitlines()) == 1, done.output
    assert done.output.startswith("error: cloud 'fake'"), done.output


def test_a_cloud_sections_parse_that_crashes_is_one_line_naming_the_file(sectioned_cloud, tmp_path):
    """A plug-in's `parse` raising anything but a SpecError (its own bug, on a value it did not
    expect) was a traceback out of `load_spec`."""
    spec_py = sectioned_cloud.root / sectioned_cloud.package / "spec.py"
    spec_py.write_text(SPEC_PY.replace("tag = string(", "tag = int(d['tag']) or string("), encoding="utf-8")
    spec_path = with_section(write_spec(tmp_path / "service.yaml", "http://127.0.0.1:9"), {"tag": "v1"})
    with pytest.raises(
        CloudError,
        match=rf"^cloud 'fake': {sectioned_cloud.package}/spec\.py: SECTION\.parse failed on the "
        r"spec's 'fake:' \(ValueError: invalid literal for int\(\) with base 10: 'v1'\)$",
    ):
        load_spec(spec_path)


def test_a_cloud_named_like_a_core_key_cannot_own_a_section(sectioned_cloud, tmp_path):
    """A plug-in cloud `run` with a section would make the spec's `run:` mean two things."""
    folder = write_fake_cloud(sectioned_cloud.root, f"{sectioned_cloud.package}_run", section=True)
    (folder / "spec.py").write_text(SPEC_PY.replace('key = "fake"', 'key = "run"'), encoding="utf-8")
    register_cloud("run", folder.name, catalog=folder / "catalog.json")
    try:
        with pytest.raises(
            CloudError, match=r"^cloud 'run': its spec section would take the spec's own key 'run'$"
        ):
            load_spec(write_spec(tmp_path / "service.yaml", "http://127.0.0.1:9"))
    finally:
        unregister_cloud("run")
        forget_modules(folder.name)


# -- Installed plug-ins: the `skyhedge.clouds` entry point group -------------------------------
#
# A distribution is "installed" the way pip leaves one: a `<name>-<version>.dist-info` folder with
# METADATA and entry_points.txt, in a folder on the path, beside its package.

REPO = Path(__file__).resolve().parents[1]

ENTRY_MODULE = """
'''What the entry point names: where the fake cloud's parts are, as one CloudPackage.'''

from pathlib import Path

from skyhedge.clouds import CloudPackage

HERE = Path(__file__).resolve().parent
CLOUD = CloudPackage(
    "fake",
    __package__,
    module_dir=HERE / "module",
    provider_template=HERE / "provider.tf.j2",
    catalog=HERE / "catalog.json",
)
"""


@dataclass
class Site:
    """A folder on sys.path that distributions are "installed" into (`install`)."""

    root: Path
    packages: list[str]

    def install(
        self,
        dist: str,
        entry_points: str,
        *,
        module: str = ENTRY_MODULE,
        metadata: bytes | None = None,
        section: bool = False,
    ) -> str:
        """Install distribution `dist` 1.0: the fake cloud in a package of its own (with its spec
        section `fake:` if `section`), whose `skyhedge_cloud.py` holds `module`, declaring
        `entry_points` (lines of the `[skyhedge.clouds]` section unless it starts a section of its
        own, `{pkg}` standing for its package), with the METADATA `metadata` if given; returns the
        package."""
        package = f"skyhedge_test_cloud_{uuid.uuid4().hex[:8]}"
        folder = write_fake_cloud(self.root, package, section=section)
        (folder / "skyhedge_cloud.py").write_text(module, encoding="utf-8")
        info = self.root / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_bytes(
            metadata or f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n".encode()
        )
        section = "" if entry_points.startswith("[") else "[skyhedge.clouds]\n"
        (info / "entry_points.txt").write_text(
            section + entry_points.format(pkg=package) + "\n", encoding="utf-8"
        )
        self.packages.append(package)
        return package


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    """An empty site folder on sys.path; the plug-ins are read again with it, and again without."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv("SKYHEDGE_CATALOG_DIR", raising=False)  # each cloud's own catalog
    forget_plugins()
    made = Site(root, [])
    yield made
    forget_plugins()
    leftovers._WITHOUT_LEFTOVERS.discard("fake")
    for package in made.packages:
        forget_modules(package)


def plan_in_process(spec_path: Path, state_dir: Path):
    return CliRunner().invoke(main, ["plan", str(spec_path), "--state-dir", str(state_dir), "--json"])


def warnings_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def test_an_installed_plugin_cloud_is_planned_by_the_cli_with_no_registration_call(site, tmp_path):
    """`python -m skyhedge plan` in a process of its own: nothing but the installed distribution
    (on PYTHONPATH) makes `fake` known, and it says no warning."""
    site.install("skyhedge-fake-cloud", "fake = {pkg}.skyhedge_cloud:CLOUD")
    spec_path = write_spec(tmp_path / "service.yaml", "http://127.0.0.1:9")
    env = {k: v for k, v in os.environ.items() if k != "SKYHEDGE_CATALOG_DIR"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(site.root)])
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "skyhedge",
            "plan",
            str(spec_path),
            "--state-dir",
            str(tmp_path / "st"),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert warnings_of(done.stderr) == []
    rows = json.loads(done.stdout)["replicas"]
    assert sorted((r["cloud"], r["zone"]) for r in rows) == [("fake", z) for z in ZONES]


def test_an_installed_plugin_cloud_is_rendered_from_its_own_files(site, tmp_path):
    package = site.install("skyhedge-fake-cloud", "fake = {pkg}.skyhedge_cloud:CLOUD")
    assert "fake" in cloud_names() and "fake" not in builtin_clouds()
    assert cloud_package("fake").package == package
    spec_path = write_spec(tmp_path / "service.yaml", "http://127.0.0.1:9")
    out = tmp_path / "tree"
    rendered = cli("render", str(spec_path), "--state-dir", str(tmp_path / "st"), "--out", str(out))
    assert rendered.exit_code == 0, rendered.output
    assert (out / "modules" / "fake-replicas" / "main.tf").read_text(encoding="utf-8") == MAIN_TF.lstrip()


NOT_A_CLOUD = "CLOUD = {'name': 'fake'}\n"
BROKEN_IMPORT = "import skyhedge_no_such_module_anywhere\n"
EXITS = "raise SystemExit(3)\n"
MISNAMED = ENTRY_MODULE.replace('"fake",', '"other",')
RELATIVE = ENTRY_MODULE.replace('catalog=HERE / "catalog.json"', 'catalog=Path("catalog.json")')


@pytest.mark.parametrize(
    ("entry", "module", "why"),
    [
        (
            "fake = {pkg}.skyhedge_cloud:CLOUD",
            BROKEN_IMPORT,
            "cannot load (ModuleNotFoundError: No module named",
        ),
        ("fake = {pkg}.skyhedge_cloud:CLOUD", EXITS, "cannot load (SystemExit: 3)"),
        ("fake = {pkg}.skyhedge_cloud:NOPE", ENTRY_MODULE, "cannot load (AttributeError:"),
        (
            "fake = {pkg}.skyhedge_cloud:CLOUD",
            NOT_A_CLOUD,
            "names a dict, expected a skyhedge.clouds.CloudPackage",
        ),
        ("fake = {pkg}.skyhedge_cloud:CLOUD", MISNAMED, "its CloudPackage is named 'other', not 'fake'"),
        (
            "fake = {pkg}.skyhedge_cloud:CLOUD",
            RELATIVE,
            "its CloudPackage.catalog PosixPath('catalog.json') is not",
        ),
        ("Fake = {pkg}.skyhedge_cloud:CLOUD", ENTRY_MODULE, "cloud name 'Fake': expected lowercase letters"),
    ],
    ids=["import-error", "exits", "no-such-object", "wrong-type", "wrong-name", "relative-path", "bad-name"],
)
def test_a_broken_plugin_is_one_warning_line_and_its_cloud_stays_unknown(site, tmp_path, entry, module, why):
    site.install("skyhedge-broken-cloud", entry, module=module)
    spec_path = write_spec(tmp_path / "service.yaml", "http://127.0.0.1:9")
    planned = plan_in_process(spec_path, tmp_path / "st")
    lines = warnings_of(planned.stderr)
    assert len(lines) == 1, planned.stderr
    assert lines[0].startswith(f"warning: cloud plug-in '{entry.split(' =')[0]} = ") and why in lines[0]
    assert "of skyhedge-broken-cloud 1.0 skipped: " in lines[0]
    assert planned.exit_code == 1 and "Traceback" not in planned.output
    assert "fake: unknown field (allowed: aws, gcp, local)" in planned.stderr
    assert "fake" not in cloud_names()


def test_a_plugin_named_like_a_builtin_cloud_is_skipped_and_the_builtin_kept(site):
    site.install("skyhedge-shadow", "aws = {pkg}.skyhedge_cloud:CLOUD\nfake = {pkg}.skyhedge_cloud:CLOUD")
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        assert "fake" in cloud_names()  # the good entry point of the same distribution is taken
    assert warnings_of(captured.getvalue()) == [
        f"warning: cloud plug-in 'aws = {site.packages[0]}.skyhedge_cloud:CLOUD' of skyhedge-shadow 1.0 "
        "skipped: cloud 'aws' is built into skyhedge (skyhedge/clouds/aws/)"
    ]
    assert cloud_package("aws").package == "skyhedge.clouds.aws"


def test_a_cloud_two_distributions_declare_is_one_warning_line_and_neither_is_used(site, tmp_path):
    first = site.install("skyhedge-cloud-one", "fake = {pkg}.skyhedge_cloud:CLOUD")
    second = site.install("skyhedge-cloud-two", "fake = {pkg}.skyhedge_cloud:CLOUD")
    spec_path = write_spec(tmp_path / "service.yaml", "http://127.0.0.1:9")
    planned = plan_in_process(spec_path, tmp_path / "st")
    lines = warnings_of(planned.stderr)
    assert len(lines) == 1, planned.stderr
    assert f"'fake = {first}.skyhedge_cloud:CLOUD' of skyhedge-cloud-one 1.0" in lines[0]
    assert f"'fake = {second}.skyhedge_cloud:CLOUD' of skyhedge-cloud-two 1.0" in lines[0]
    assert lines[0].endswith("skipped: each declares cloud 'fake' (uninstall all but one)")
    assert planned.exit_code == 1 and "fake: unknown field (allowed: aws, gcp, local)" in planned.stderr


def test_a_distribution_whose_entry_points_do_not_parse_costs_only_its_own_clouds(site):
    """importlib.metadata's `entry_points()` raises for every distribution when one
    entry_points.txt has a line without `=`: the others' clouds are still taken, and only a
    broken file that declares clouds is a warning."""
    good = site.install("skyhedge-fake-cloud", "fake = {pkg}.skyhedge_cloud:CLOUD")
    site.install("skyhedge-broken-cloud", "[skyhedge.clouds]\nother {pkg}.skyhedge_cloud:CLOUD")
    site.install("unrelated-tool", "[console_scripts]\nno-equals-sign-here")
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        assert "fake" in cloud_names() and "other" not in cloud_names()
    assert cloud_package("fake").package == good
    lines = warnings_of(captured.getvalue())
    assert len(lines) == 1, captured.getvalue()
    assert lines[0].startswith(
        f"warning: cloud plug-ins of {site.root / 'skyhedge_broken_cloud-1.0.dist-info'} "
    )
    assert "skipped: cannot read it (" in lines[0]


def test_a_plugin_whose_metadata_does_not_decode_is_named_by_its_folder(site):
    site.install(
        "skyhedge-fake-cloud",
        "fake = {pkg}.skyhedge_cloud:NOPE",
        metadata=b"Metadata-Version: 2.1\nName: skyhedge-fake-cloud\nSummary: \xff\xfe\n",
    )
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        assert "fake" not in cloud_names()
    lines = warnings_of(captured.getvalue())
    assert len(lines) == 1, captured.getvalue()
    assert (
        f"of {site.root / 'skyhedge_fake_cloud-1.0.dist-info'} skipped: cannot load (AttributeError"
        in lines[0]
    )


def test_the_plugins_are_read_once_per_process(site):
    site.install("skyhedge-broken-cloud", "fake = {pkg}.skyhedge_cloud:CLOUD", module=NOT_A_CLOUD)
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        for _ in range(3):
            assert "fake" not in cloud_names()
    assert len(warnings_of(captured.getvalue())) == 1


def test_a_registered_cloud_wins_over_a_plugin_of_its_name(site, fake_cloud):
    site.install("skyhedge-fake-cloud", "fake = {pkg}.skyhedge_cloud:CLOUD")
    assert cloud_package("fake").package == fake_cloud.package


PROBE = """
import sys
import skyhedge.clouds.local.launcher
from skyhedge.clouds import cloud_names, cloud_package
print(cloud_package("local").package, {package!r} in sys.modules, "importlib.metadata" in sys.modules)
print("fake" in cloud_names(), {package!r} + ".skyhedge_cloud" in sys.modules)
"""


def test_the_plugins_are_read_when_a_cloud_list_is_needed_not_at_import(site, tmp_path):
    """The local launcher imports skyhedge.clouds per replica launch: importing it (and asking
    for a built-in cloud) reads no entry point and imports no plug-in."""
    package = site.install("skyhedge-fake-cloud", "fake = {pkg}.skyhedge_cloud:CLOUD")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(site.root)]))
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(package=package)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["skyhedge.clouds.local False False", "True True"]


def test_an_installed_plugin_cloud_owns_its_top_level_spec_section(site, tmp_path):
    """The section comes with the distribution's package (`<package>/spec.py`), found through the
    entry point as the renderer is: a spec with `fake:` plans with no registration call."""
    site.install("skyhedge-fake-cloud", "fake = {pkg}.skyhedge_cloud:CLOUD", section=True)
    spec_path = with_section(
        write_spec(tmp_path / "service.yaml", "http://127.0.0.1:9"), {"zones": ["fake-1a"]}
    )
    planned = plan_in_process(spec_path, tmp_path / "st")
    assert planned.exit_code == 0, planned.output
    assert {r["zone"] for r in json.loads(planned.output)["replicas"]} == {"fake-1a"}
