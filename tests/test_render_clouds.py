"""The AWS and GCP modules as rendered: parsed with python-hcl2 (their providers cannot be downloaded
here, so `terraform validate` runs only where a provider mirror is configured)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import hcl2
import pytest
from terraform_support import MIRROR_ENV, mirror_config

from skyhedge.clouds import RenderContext
from skyhedge.engine import Terraform, TerraformRoot
from skyhedge.planner import CREATE, KEEP, Plan, PlannedReplica
from skyhedge.policy.types import Location, Market
from skyhedge.render import TFVARS_FILE, render_tree, write_tree
from skyhedge.spec import parse_spec

CTX = RenderContext(Path("/srv/state"), Path("/srv/work"), sys.executable, "")


def unq(value: Any) -> Any:
    """python-hcl2 keeps HCL's quotes: `"\\"spot\\""` -> `spot`."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def block(parsed: dict[str, Any], kind: str, *labels: str) -> dict[str, Any]:
    for item in parsed.get(kind, []):
        node: Any = item
        for label in labels:
            node = next((v for k, v in node.items() if unq(k) == label), None)
            if node is None:
                break
        if node is not None:
            return node
    raise KeyError(f"{kind} {' '.join(labels)}")


def dynamic(resource: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [v for d in resource.get("dynamic", []) for k, v in d.items() if unq(k) == name]


def plan(cloud: str, region: str, zones: list[str]) -> Plan:
    replicas = tuple(
        PlannedReplica(
            f"r-{i:04d}",
            Location(cloud, region, z),
            Market.SPOT if i % 2 else Market.ON_DEMAND,
            CREATE if i > 1 else KEEP,
            0.0,
        )
        for i, z in enumerate(zones, start=1)
    )
    return Plan("llm", len(replicas), "test", replicas, 10, 0.0)


def rendered(tmp_path: Path, cloud: str, itype: str, p: Plan, **extra: Any) -> Path:
    spec = parse_spec(
        {
            "name": "llm",
            "placement": {"clouds": [cloud]},
            "resources": {"instance_type": {cloud: itype}, "disk_size": 250, "ports": 8000},
            "run": {
                "image": "vllm/vllm-openai:v0.6.3",
                "command": "vllm serve m --port 8000",
                "env": {"K": "v"},
            },
            "terraform": {"backend": "s3", "config": {"bucket": "state", "region": "us-east-1"}},
            **extra,
        }
    )
    out = tmp_path / "tree"
    write_tree(render_tree(spec, p, context=CTX, instance_types={cloud: itype}), out)
    return out


def load(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return hcl2.load(fh)


def test_aws_module_spot_market_for_each_and_tags(tmp_path):
    out = rendered(
        tmp_path, "aws", "g6.xlarge", plan("aws", "us-east-1", ["use1-az1", "use1-az2", "use1-az4"])
    )
    main = load(out / "modules" / "aws-replicas" / "main.tf")
    inst = block(main, "resource", "aws_instance", "replica")
    assert inst["for_each"] == "${var.replicas}"
    assert "local.replica_subnet[each.key]" in inst["subnet_id"]
    [market] = dynamic(inst, "instance_market_options")
    assert 'each.value.market == "spot"' in market["for_each"]
    [content] = market["content"]
    assert unq(content["market_type"]) == "spot"
    [spot] = content["spot_options"]
    assert unq(spot["spot_instance_type"]) == "one-time"
    assert unq(spot["instance_interruption_behavior"]) == "terminate"
    for key in ('"skyhedge:replica" = each.key', '"skyhedge:market" = each.value.market'):
        assert key in inst["tags"]
    assert '"skyhedge:service" = var.service' in block(main, "locals")["tags"]
    sg = block(main, "resource", "aws_security_group", "replicas")
    assert sg["ingress"][0]["from_port"] == "${var.port}"
    subnet = block(main, "data", "aws_subnet", "zone")
    assert "zone_ids" in subnet["availability_zone"]  # catalog zones are zone IDs, looked up by name
    tfvars = json.loads((out / "aws" / "us-east-1" / TFVARS_FILE).read_text())
    assert sorted(tfvars["replicas"]) == ["r-0001", "r-0002", "r-0003"]
    assert tfvars["replicas"]["r-0001"] == {"zone": "use1-az1", "market": "spot"}
    assert tfvars["replicas"]["r-0002"]["market"] == "on-demand"
    assert (
        tfvars["instance_type"] == "g6.xlarge" and tfvars["disk_size"] == 250 and tfvars["image_id"] is None
    )
    root = load(out / "aws" / "us-east-1" / "main.tf")
    assert unq(block(root, "module", "replicas")["source"]) == "../../modules/aws-replicas"
    assert block(root, "provider", "aws")["region"] == "${var.region}"
    [tf] = root["terraform"]
    assert [unq(k) for b in tf["backend"] for k in b] == ["s3"]
    variables = load(out / "modules" / "aws-replicas" / "variables.tf")
    for item in variables["variable"]:
        for name, body in item.items():
            assert body.get("description"), f"variable {name} has no description"
            assert "type" in body, f"variable {name} has no type"
    outputs = load(out / "modules" / "aws-replicas" / "outputs.tf")
    for item in outputs["output"]:
        for name, body in item.items():
            assert body.get("description") and "try(" in json.dumps(body["value"]), name


def test_aws_replicas_keep_the_subnet_they_were_launched_in_and_private_ingress_routes_privately(tmp_path):
    """A launched replica whose recorded subnet is not the one `aws.subnets` now gives its zone is
    pinned to it (so to its VPC and that VPC's security group); one in its zone's subnet, or on a
    default subnet (which records none), renders as before: no input churn after each launch."""
    from dataclasses import replace

    base = plan("aws", "us-east-1", ["use1-az1", "use1-az2", "use1-az4"])
    recorded = {"r-0001": "subnet-0aaaaaaaa", "r-0002": "subnet-0bbbbbbbb"}  # r-0003: default subnet
    p = replace(base, replicas=tuple(replace(r, subnet_id=recorded.get(r.id)) for r in base.replicas))
    subnets = {"use1-az1": "subnet-0aaaaaaaa", "use1-az2": "subnet-0cccccccc", "use1-az4": "subnet-0dddddddd"}
    out = rendered(tmp_path, "aws", "g6.xlarge", p, aws={"subnets": subnets, "ingress_cidrs": ["10.0.0.0/8"]})
    tfvars = json.loads((out / "aws" / "us-east-1" / TFVARS_FILE).read_text())
    assert tfvars["replicas"]["r-0001"] == {"zone": "use1-az1", "market": "spot"}  # its zone's subnet
    assert tfvars["replicas"]["r-0002"] == {
        "zone": "use1-az2",
        "market": "on-demand",
        "subnet_id": "subnet-0bbbbbbbb",
    }
    assert "subnet_id" not in tfvars["replicas"]["r-0003"]
    assert tfvars["private_endpoint"] is True  # the group admits private ranges only
    public = rendered(tmp_path / "public", "aws", "g6.xlarge", p, aws={"subnets": subnets})
    assert json.loads((public / "aws" / "us-east-1" / TFVARS_FILE).read_text())["private_endpoint"] is False


def test_a_replica_moves_when_aws_subnets_gives_its_zone_another_subnet():
    """Rolled over like an outdated replica (a security group serves one VPC), judged from the
    module's outputs: the subnet it runs in and whether that is its zone's default one."""
    from skyhedge.service import _moved_by_section
    from skyhedge.state import ReplicaRecord

    def rec(**outputs: object) -> ReplicaRecord:
        return ReplicaRecord(
            id="r-0001", cloud="aws", region="us-east-1", zone="use1-az1", market="spot",
            launched_at=0.0, outputs=dict(outputs),
        )  # fmt: skip

    def spec(subnets: dict[str, str] | None):
        data = {"name": "x", "placement": {"clouds": ["aws"]}, "run": {"command": "serve"}}
        return parse_spec({**data, "aws": {"subnets": subnets}} if subnets else data)

    on_default = rec(subnet_id="subnet-0aaaaaaaa", subnet_default=True)
    assert not _moved_by_section(spec(None), on_default)
    assert _moved_by_section(spec({"use1-az1": "subnet-0bbbbbbbb"}), on_default)  # e.g. another VPC
    assert not _moved_by_section(spec({"use1-az1": "subnet-0aaaaaaaa"}), on_default)
    given = rec(subnet_id="subnet-0bbbbbbbb", subnet_default=False)
    assert _moved_by_section(spec(None), given)  # back to the default subnet
    assert not _moved_by_section(spec({"use1-az1": "subnet-0bbbbbbbb"}), given)
    assert not _moved_by_section(spec({"use1-az1": "subnet-0ccccccccc"}), rec())  # recorded before: unknown


def test_aws_boot_script_only_interpolates_the_base64_config():
    script = (
        Path(__file__).resolve().parents[1] / "modules" / "aws-replicas" / "user_data.sh.tftpl"
    ).read_text()
    assert re.findall(r"\$\{[^}]*\}", script) == ["${config}"]
    assert "%{" not in script


def _boot_files(tmp_path: Path, module: str, template: str, config: dict[str, Any]) -> dict[str, str]:
    """Run the boot script's own Python part (what the VM runs before systemd) on `config`, with
    /opt/skyhedge moved under tmp_path; return the files it wrote."""
    script = (Path(__file__).resolve().parents[1] / "modules" / module / template).read_text()
    body = script.split("python3 - <<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    home = tmp_path / module
    home.mkdir(parents=True)
    (home / "replica.json").write_text(json.dumps(config))
    subprocess.run([sys.executable, "-c", body.replace("/opt/skyhedge", str(home))], check=True)
    return {f.name: f.read_text() for f in home.iterdir()}


@pytest.mark.parametrize(
    ("module", "template"), [("aws-replicas", "user_data.sh.tftpl"), ("gcp-replicas", "startup.sh.tftpl")]
)
def test_a_container_gets_the_gpus_only_where_the_replica_has_them(tmp_path, module, template):
    """Docker refuses `--gpus all` without the NVIDIA runtime: a CPU type (a user catalog's) must
    run its container without it. A config from before the flag existed keeps it."""
    config = {
        "replica_id": "r-0001",
        "service": "svc",
        "port": 8000,
        "image": "ghcr.io/o/m:1",
        "env": {"A": "x y"},
    }
    gpu = _boot_files(tmp_path / "gpu", module, template, {**config, "gpu": True})
    cpu = _boot_files(tmp_path / "cpu", module, template, {**config, "gpu": False})
    older = _boot_files(tmp_path / "older", module, template, config)
    assert "--gpus all" in gpu["run.sh"] and "--gpus all" in older["run.sh"]
    assert "--gpus" not in cpu["run.sh"] and "ghcr.io/o/m:1" in cpu["run.sh"]
    assert "export A='x y'" in cpu["env"]


def test_replicas_have_gpus_as_the_catalog_says_else_as_the_spec_asks():
    from skyhedge.clouds.common import has_gpus

    def spec(accelerators: str | None) -> Any:
        resources: dict[str, Any] = {"instance_type": {"aws": "g6.xlarge"}}
        if accelerators:
            resources["accelerators"] = accelerators
        return parse_spec(
            {"name": "svc", "placement": {"clouds": ["aws"]}, "resources": resources, "run": {"image": "x"}},
            source="/tmp/svc.yaml",
        )

    assert has_gpus(spec(None), "aws", "g6.xlarge")  # L4 in the catalog
    assert not has_gpus(spec(None), "aws", "c7i.large")  # unknown to the catalog, no accelerator asked
    assert has_gpus(spec("A10G:1"), "aws", "c7i.large")


def test_gcp_module_spot_scheduling_gpus_and_labels(tmp_path):
    out = rendered(
        tmp_path,
        "gcp",
        "n1-standard-4",
        plan("gcp", "us-central1", ["us-central1-a", "us-central1-b"]),
        gcp={"project": "my-proj"},
    )
    main = load(out / "modules" / "gcp-replicas" / "main.tf")
    inst = block(main, "resource", "google_compute_instance", "replica")
    assert inst["for_each"] == "${var.replicas}"
    spot, standard = dynamic(inst, "scheduling")
    assert 'each.value.market == "spot" ? [each.key] : []' in spot["for_each"]
    [s] = spot["content"]
    assert unq(s["provisioning_model"]) == "SPOT" and s["preemptible"] is True
    assert s["automatic_restart"] is False and unq(s["instance_termination_action"]) == "DELETE"
    assert unq(s["on_host_maintenance"]) == "TERMINATE"
    [o] = standard["content"]
    assert unq(o["provisioning_model"]) == "STANDARD" and "TERMINATE" in o["on_host_maintenance"]
    for key in ('"skyhedge-replica" = each.key', '"skyhedge-market" = each.value.market'):
        assert key in inst["labels"]
    assert '"skyhedge-service" = var.service' in block(main, "locals")["labels"]
    [acc] = dynamic(inst, "guest_accelerator")
    assert "var.accelerator" in acc["for_each"]
    # Deep Learning VM images install the NVIDIA driver only when the metadata asks, GPU VMs only
    assert 'local.gpu ? {install-nvidia-driver = "True"} : {}' in inst["metadata"]
    locals_ = block(main, "locals")
    assert "a2|a3|a4|g2|g4" in locals_["gpu"] and "sha1(local.firewall_full)" in locals_["firewall_name"]
    tfvars = json.loads((out / "gcp" / "us-central1" / TFVARS_FILE).read_text())
    assert tfvars["accelerator"] == {"type": "nvidia-tesla-t4", "count": 1} and tfvars["gpu"] is True
    assert tfvars["project"] == "my-proj" and sorted(tfvars["replicas"]) == ["r-0001", "r-0002"]
    g2 = rendered(tmp_path / "g2", "gcp", "g2-standard-4", plan("gcp", "us-east4", ["us-east4-a"]))
    g2vars = json.loads((g2 / "gcp" / "us-east4" / TFVARS_FILE).read_text())
    assert g2vars["accelerator"] is None and g2vars["gpu"] is True  # g2 carries its L4
    assert (tfvars["network"], tfvars["subnetwork"], tfvars["ingress_cidrs"]) == (
        "default",
        None,
        ["0.0.0.0/0"],
    )
    custom = rendered(
        tmp_path / "custom",
        "gcp",
        "g2-standard-4",
        plan("gcp", "us-east4", ["us-east4-a"]),
        gcp={"network": "prod", "subnetworks": {"us-east4": "serving-e4"}, "ingress_cidrs": ["10.0.0.0/8"]},
    )
    cvars = json.loads((custom / "gcp" / "us-east4" / TFVARS_FILE).read_text())
    assert (cvars["network"], cvars["subnetwork"], cvars["ingress_cidrs"]) == (
        "prod",
        "serving-e4",
        ["10.0.0.0/8"],
    )
    assert cvars["private_endpoint"] is True and tfvars["private_endpoint"] is False  # as on AWS
    nic = inst["network_interface"][0]
    assert nic["subnetwork"] == "${var.subnetwork}"
    assert "network_interface[0].subnetwork" in str(inst["lifecycle"][0]["ignore_changes"])


@pytest.mark.parametrize(
    ("cloud", "itype", "region", "zones"),
    [
        ("aws", "g6.xlarge", "us-east-1", ["use1-az1"]),
        ("gcp", "g2-standard-4", "us-east4", ["us-east4-a"]),
    ],
)
def test_terraform_validate_where_a_provider_mirror_is_configured(tmp_path, cloud, itype, region, zones):
    rc = mirror_config(tmp_path, cloud)
    if rc is None:
        pytest.skip(
            f"no provider mirror: set {MIRROR_ENV} to a filesystem mirror holding the {cloud} provider"
        )
    out = rendered(tmp_path, cloud, itype, plan(cloud, region, zones))
    root = out / cloud / region
    (root / "backend.tfbackend.json").unlink()
    (root / "main.tf").write_text((root / "main.tf").read_text().replace('backend "s3" {}', ""))
    engine = Terraform(home=tmp_path / "home", extra_env={"TF_CLI_CONFIG_FILE": str(rc)})
    diags = engine.validate(TerraformRoot(root, f"{cloud}/{region}", tmp_path / "data"))
    assert [d.text for d in diags if d.severity == "error"] == []


@pytest.mark.parametrize(
    ("machine_type", "accelerators", "expected"),
    [
        # n1 machines take attached GPUs: from the catalog row, else from the spec's ask
        ("n1-standard-4", None, ({"type": "nvidia-tesla-t4", "count": 1}, True)),
        ("n1-highmem-16", "V100:2", ({"type": "nvidia-tesla-v100", "count": 2}, True)),
        ("n1-highmem-16", "P100", ({"type": "nvidia-tesla-p100", "count": 1}, True)),
        # a2/g2 machine types come with their GPUs: nothing to attach, but they are GPU replicas
        ("a2-highgpu-1g", None, (None, True)),
        ("g2-standard-4", None, (None, True)),
        # built-in GPU families the catalog does not list are GPU replicas all the same
        ("a3-megagpu-8g", None, (None, True)),
        ("g4-standard-48", None, (None, True)),
        # no GPU anywhere: a CPU replica
        ("e2-standard-4", None, (None, False)),
    ],
)
def test_gcp_gpus_are_attached_only_to_n1_machine_types(machine_type, accelerators, expected):
    from skyhedge.clouds.gcp.render import accelerator_for

    resources: dict[str, Any] = {"instance_type": {"gcp": machine_type}}
    if accelerators:
        resources["accelerators"] = accelerators
    spec = parse_spec(
        {"name": "svc", "placement": {"clouds": ["gcp"]}, "resources": resources, "run": {"image": "x"}},
        source="/tmp/svc.yaml",
    )
    assert accelerator_for(spec, machine_type) == expected


def test_gcp_an_n1_gpu_with_no_compute_engine_type_is_a_one_line_render_error():
    from skyhedge.clouds.gcp.render import accelerator_for
    from skyhedge.errors import RenderError

    spec = parse_spec(
        {
            "name": "svc",
            "placement": {"clouds": ["gcp"]},
            "resources": {"instance_type": {"gcp": "n1-highmem-16"}, "accelerators": "A10G:1"},
            "run": {"image": "x"},
        },
        source="/tmp/svc.yaml",
    )
    with pytest.raises(RenderError, match=r"^/tmp/svc.yaml: resources.accelerators: .*'A10G'"):
        accelerator_for(spec, "n1-highmem-16")


def test_gcp_a_gpu_that_comes_only_built_in_is_not_attached_to_n1():
    """L4, A100 and H100 come only inside g2/a2/a3 machines: GCE refuses them on n1."""
    from skyhedge.clouds.gcp.render import accelerator_for
    from skyhedge.errors import RenderError

    spec = parse_spec(
        {
            "name": "svc",
            "placement": {"clouds": ["gcp"]},
            "resources": {"instance_type": {"gcp": "n1-highmem-8"}, "accelerators": "L4:1"},
            "run": {"image": "x"},
        },
        source="/tmp/svc.yaml",
    )
    with pytest.raises(
        RenderError, match=r"'L4' cannot be attached to the n1 .* built into g2 machine types"
    ):
        accelerator_for(spec, "n1-highmem-8")


@pytest.mark.parametrize(
    ("accelerators", "message"),
    [
        ("V100:2", r"'V100:2' differs from the 1 x T4 the catalog prices n1-standard-8 with"),
        ("T4:2", r"'T4:2' differs from the 1 x T4"),
        ("A100:1", r"'A100' cannot be attached to the n1 machine type n1-standard-8 .*built into a2"),
    ],
)
def test_gcp_an_n1_type_of_the_catalog_is_not_given_other_gpus_than_asked(accelerators, message):
    """The catalog lists n1-standard-8 with one T4 and prices it so: a spec asking other GPUs of it
    is refused, not launched with a T4 it did not ask for."""
    from skyhedge.clouds.gcp.render import accelerator_for
    from skyhedge.errors import RenderError

    spec = parse_spec(
        {
            "name": "svc",
            "placement": {"clouds": ["gcp"]},
            "resources": {"instance_type": {"gcp": "n1-standard-8"}, "accelerators": accelerators},
            "run": {"image": "x"},
        },
        source="/tmp/svc.yaml",
    )
    with pytest.raises(RenderError, match=rf"^/tmp/svc.yaml: resources.accelerators: {message}"):
        accelerator_for(spec, "n1-standard-8")


def root_vars(out: Path, cloud: str, region: str) -> dict[str, Any]:
    return json.loads((out / cloud / region / TFVARS_FILE).read_text())


def test_replicas_without_public_addresses_render_for_private_routing(tmp_path):
    """`aws.public_ip` reaches the module as `public_ip` (null: the subnet decides) and
    `gcp.external_ip` as `external_ip`; either set false makes endpoints the private IPs, even
    with ingress open to the internet. The GCP module drops the access config (the external IP)
    only then, and a running VM keeps its own (the change rolls replicas over instead)."""
    aws_plan, gcp_plan = plan("aws", "us-east-1", ["use1-az1"]), plan("gcp", "us-east4", ["us-east4-a"])
    default = root_vars(rendered(tmp_path / "a", "aws", "g6.xlarge", aws_plan), "aws", "us-east-1")
    assert default["public_ip"] is None and default["private_endpoint"] is False
    off = rendered(tmp_path / "b", "aws", "g6.xlarge", aws_plan, aws={"public_ip": False})
    assert root_vars(off, "aws", "us-east-1")["public_ip"] is False
    assert root_vars(off, "aws", "us-east-1")["private_endpoint"] is True
    inst = block(load(off / "modules" / "aws-replicas" / "main.tf"), "resource", "aws_instance", "replica")
    assert inst["associate_public_ip_address"] == "${var.public_ip}"
    assert "associate_public_ip_address" in str(inst["lifecycle"][0]["ignore_changes"])

    gdefault = root_vars(rendered(tmp_path / "c", "gcp", "g2-standard-4", gcp_plan), "gcp", "us-east4")
    assert gdefault["external_ip"] is True and gdefault["private_endpoint"] is False
    goff = rendered(tmp_path / "d", "gcp", "g2-standard-4", gcp_plan, gcp={"external_ip": False})
    assert root_vars(goff, "gcp", "us-east4")["external_ip"] is False
    assert root_vars(goff, "gcp", "us-east4")["private_endpoint"] is True
    main = load(goff / "modules" / "gcp-replicas" / "main.tf")
    inst = block(main, "resource", "google_compute_instance", "replica")
    [access] = dynamic(inst["network_interface"][0], "access_config")
    assert access["for_each"] == "${var.external_ip ? [1] : []}"
    assert "network_interface[0].access_config" in str(inst["lifecycle"][0]["ignore_changes"])


@pytest.mark.parametrize(
    ("machine_type", "nic_type", "disk_type"),
    [
        ("n1-standard-4", None, "pd-balanced"),
        ("g2-standard-4", None, "pd-balanced"),
        ("a2-highgpu-1g", None, "pd-balanced"),
        ("a3-highgpu-8g", "GVNIC", "pd-balanced"),  # H100: gVNIC required, Persistent Disk boots
        ("a3-ultragpu-8g", "GVNIC", "hyperdisk-balanced"),  # H200: Hyperdisk only
        ("a4-highgpu-8g", "GVNIC", "hyperdisk-balanced"),  # B200
        ("g4-standard-48", "GVNIC", "hyperdisk-balanced"),  # RTX PRO 6000
    ],
)
def test_gcp_machine_series_get_the_network_interface_and_boot_disk_they_require(
    tmp_path, machine_type, nic_type, disk_type
):
    """A3/A4/G4 refuse a VirtIO interface, and A3 Ultra/A4/G4 a pd-balanced boot disk: launched
    as other series are, every replica of theirs would fail at creation."""
    out = rendered(tmp_path, "gcp", machine_type, plan("gcp", "us-central1", ["us-central1-a"]))
    inputs = root_vars(out, "gcp", "us-central1")
    assert (inputs["nic_type"], inputs["boot_disk_type"]) == (nic_type, disk_type)
    inst = block(
        load(out / "modules" / "gcp-replicas" / "main.tf"), "resource", "google_compute_instance", "replica"
    )
    assert inst["network_interface"][0]["nic_type"] == "${var.nic_type}"
    assert inst["boot_disk"][0]["initialize_params"][0]["type"] == "${var.boot_disk_type}"
    # a series change rolls the replicas over (revision) rather than replacing them all at once
    kept = str(inst["lifecycle"][0]["ignore_changes"])
    assert "network_interface[0].nic_type" in kept and "boot_disk[0].initialize_params[0].type" in kept


@pytest.mark.parametrize(
    ("cloud", "region", "zone", "itype"),
    [
        ("aws", "us-east-1", "use1-az1", "g5g.xlarge"),  # Graviton2 + T4G
        ("aws", "us-east-1", "use1-az1", "p6e-gb200.36xlarge"),  # NVIDIA Grace
        ("gcp", "us-central1", "us-central1-a", "a4x-highgpu-4g"),  # NVIDIA Grace
        ("gcp", "us-central1", "us-central1-a", "c4a-standard-8"),  # Google Axion
    ],
)
def test_an_arm_machine_without_an_arm_image_is_refused_naming_the_field(
    tmp_path, cloud, region, zone, itype
):
    """The modules' default image is an x86_64 Deep Learning image: an Arm machine would fail
    at the cloud, launch after launch. With `resources.image_id` it renders."""
    from skyhedge.errors import SpecError

    with pytest.raises(SpecError, match=rf"resources\.image_id\.{cloud}: {re.escape(itype)} is an Arm"):
        rendered(tmp_path, cloud, itype, plan(cloud, region, [zone]))
    assert not (tmp_path / "tree").exists()
    image = {"aws": "ami-0123456789abcdef0", "gcp": "projects/my-project/global/images/my-arm64-image"}
    resources = {"instance_type": {cloud: itype}, "image_id": {cloud: image[cloud]}, "ports": 8000}
    out = rendered(tmp_path, cloud, itype, plan(cloud, region, [zone]), resources=resources)
    tfvars = json.loads((out / cloud / region / TFVARS_FILE).read_text())
    assert tfvars["image_id" if cloud == "aws" else "image"] == image[cloud]


def test_the_arm_families_are_told_from_the_x86_ones():
    from skyhedge.clouds.aws.render import is_arm

    arm = ["g5g.xlarge", "c7g.large", "c7gn.2xlarge", "m6gd.large", "t4g.micro", "im4gn.large"]
    arm += ["is4gen.xlarge", "a1.large", "x2gd.large", "hpc7g.4xlarge", "p6e-gb200.36xlarge"]
    x86 = ["g4dn.xlarge", "g5.xlarge", "g6e.xlarge", "p4d.24xlarge", "p5en.48xlarge", "inf2.xlarge"]
    x86 += ["trn1.2xlarge", "m5zn.large", "c5n.large", "dl1.24xlarge"]
    assert [t for t in arm if not is_arm(t)] == [] and [t for t in x86 if is_arm(t)] == []


def test_a_state_that_applies_tags_its_aws_machines_with_its_deployment_id_and_a_render_does_not(tmp_path):
    """The tag lets a later apply terminate what an interrupted apply of this state launched and
    Terraform never saved, and nothing else: a tree rendered to be applied elsewhere (`render`,
    GitOps) carries none, so no state's apply can take its machines for its own leftovers."""
    from dataclasses import replace

    p = plan("aws", "us-east-1", ["use1-az1"])
    applied = rendered(tmp_path / "a", "aws", "g6.xlarge", p)
    assert json.loads((applied / "aws" / "us-east-1" / TFVARS_FILE).read_text())["deployment"] is None
    main = load(applied / "modules" / "aws-replicas" / "main.tf")
    assert '"skyhedge:deployment" = var.deployment' in block(main, "locals")["tags"]

    spec = parse_spec(
        {
            "name": "llm",
            "placement": {"clouds": ["aws"]},
            "resources": {"instance_type": {"aws": "g6.xlarge"}},
            "run": {"command": "python3 -m http.server 8000"},
        }
    )
    ctx = replace(CTX, deployment="5f0c2a9d41b7e3c8")
    tree = render_tree(spec, p, context=ctx, instance_types={"aws": "g6.xlarge"})
    write_tree(tree, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "aws" / "us-east-1" / TFVARS_FILE).read_text())["deployment"] == (
        "5f0c2a9d41b7e3c8"
    )


def test_a_state_gets_one_deployment_id_and_keeps_it():
    from skyhedge.leftovers import deployment_id
    from skyhedge.state import ServiceState

    state = ServiceState(service="llm")
    first = deployment_id(state)
    assert re.fullmatch(r"[0-9a-f]{16}", first) and state.extra["deployment"] == first
    assert deployment_id(state) == first
    assert deployment_id(ServiceState(service="llm")) != first  # another state, another ID
    state.extra["deployment"] = "Not; an ID"  # hand-edited: never applied (the module refuses it)
    assert re.fullmatch(r"[0-9a-f]{16}", deployment_id(state))


def test_a_state_that_applies_labels_its_gcp_instances_with_its_deployment_id_and_a_render_does_not(tmp_path):
    """The label lets a later apply delete an instance an interrupted apply of this state launched
    and Terraform never saved, which holds its replica's name (GCE names are unique per zone: its
    create failed with "already exists" at every apply), and nothing else: a tree rendered to be
    applied elsewhere (`render`, GitOps) carries none."""
    from dataclasses import replace

    p = plan("gcp", "us-central1", ["us-central1-a"])
    applied = rendered(tmp_path / "a", "gcp", "g2-standard-4", p, gcp={"project": "my-proj"})
    assert root_vars(applied, "gcp", "us-central1")["deployment"] is None
    main = load(applied / "modules" / "gcp-replicas" / "main.tf")
    assert '"skyhedge-deployment" = var.deployment' in block(main, "locals")["labels"]
    variables = load(applied / "modules" / "gcp-replicas" / "variables.tf")
    [validation] = block(variables, "variable", "deployment")["validation"]
    assert "^[a-z0-9]{8,63}$" in validation["condition"]  # a GCP label value: at most 63 characters
    root_tf = load(applied / "gcp" / "us-central1" / "variables.tf")
    assert block(root_tf, "variable", "deployment")["default"] is None

    spec = parse_spec(
        {
            "name": "llm",
            "placement": {"clouds": ["gcp"]},
            "resources": {"instance_type": {"gcp": "g2-standard-4"}},
            "run": {"command": "python3 -m http.server 8000"},
            "gcp": {"project": "my-proj"},
        }
    )
    ctx = replace(CTX, deployment="5f0c2a9d41b7e3c8")
    write_tree(render_tree(spec, p, context=ctx, instance_types={"gcp": "g2-standard-4"}), tmp_path / "b")
    assert json.loads((tmp_path / "b" / "gcp" / "us-central1" / TFVARS_FILE).read_text())["deployment"] == (
        "5f0c2a9d41b7e3c8"
    )


@pytest.mark.parametrize(
    ("cloud", "region", "zone", "itype", "fits", "too_big", "limit"),
    [
        ("aws", "us-east-1", "use1-az1", "g6.xlarge", 9_000, 13_000, "16384 bytes EC2 takes as user data"),
        (
            "gcp",
            "us-central1",
            "us-central1-a",
            "g2-standard-4",
            150_000,
            200_000,
            "262144 bytes Compute Engine takes as a metadata value",
        ),
    ],
)
def test_a_run_too_large_for_the_clouds_boot_script_is_refused_naming_its_largest_part(
    tmp_path, cloud, region, zone, itype, fits, too_big, limit
):
    """EC2 takes at most 16 KB of user data (before base64) and Compute Engine a metadata value of
    at most 256 KiB; the boot script carries `run` as base64 JSON (a third larger). Past that the
    cloud refuses every launch (moto and the local fakes never do): refused at render instead."""
    from skyhedge.errors import SpecError

    def run(setup: str) -> dict[str, Any]:
        return {"run": {"command": "serve", "setup": setup, "env": {"K": "v"}}}

    p = plan(cloud, region, [zone, zone])  # r-0001 runs (KEEP), r-0002 is launched (CREATE)
    rendered(tmp_path / "ok", cloud, itype, p, **run("x" * fits))
    with pytest.raises(SpecError, match=rf"^<spec>: run\.setup: a {cloud} replica's boot script") as err:
        rendered(tmp_path / "big", cloud, itype, p, **run("x" * too_big))
    assert f"over the {limit}" in str(err.value) and "\n" not in str(err.value)
    # a root left with no replica (all destroyed) renders whatever the spec's run, and so does one
    # whose replicas all run already (`destroy` renders them so, to tear them down): the module
    # ignores a launched replica's boot script, and no launch is asked for
    empty = Plan("llm", 0, "test", (), 10, 0.0)
    rendered(tmp_path / "empty", cloud, itype, empty, **run("x" * too_big))
    running = plan(cloud, region, [zone])
    assert [r.action for r in running.replicas] == [KEEP]
    rendered(tmp_path / "running", cloud, itype, running, **run("x" * too_big))


@pytest.mark.skipif(shutil.which("terraform") is None, reason="no terraform binary")
@pytest.mark.parametrize(
    ("module", "template"), [("aws-replicas", "user_data.sh.tftpl"), ("gcp-replicas", "startup.sh.tftpl")]
)
def test_the_boot_script_size_is_a_close_upper_bound_of_what_terraform_renders(tmp_path, module, template):
    """`boot_script_bytes` against Terraform's own `templatefile(base64encode(jsonencode(...)))`
    (no provider needed): never less, `<`, `>`, `&` and U+2028 escaped as Terraform escapes them."""
    from skyhedge.clouds.common import boot_script_bytes

    config = {
        "replica_id": "r-0001",
        "service": "llm",
        "port": 8000,
        "command": "vllm serve <m> && echo é \u2028 done " + "y" * 3000,
        "image": None,
        "setup": "x\ty\n",
        "env": {"K": "v&w", "Z": "ü"},
        "gpu": True,
    }
    work = tmp_path / "tf"
    work.mkdir()
    (work / template).write_bytes(
        (Path(__file__).resolve().parents[1] / "modules" / module / template).read_bytes()
    )
    (work / "config.json").write_text(json.dumps(config), encoding="utf-8")
    encoded = 'base64encode(jsonencode(jsondecode(file("config.json"))))'
    expr = f'length(templatefile("{template}", {{config = {encoded}}}))'
    out = subprocess.run(
        ["terraform", "console"],
        input=expr,
        cwd=work,
        # no version check: nothing leaves the machine
        env={**os.environ, "CHECKPOINT_DISABLE": "1", "TF_CLI_CONFIG_FILE": str(work / "none.tfrc")},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    actual = int(out.stdout.strip())  # characters, and the rendered script is ASCII: bytes
    estimate = boot_script_bytes(module, template, config)
    assert actual <= estimate <= actual + 8
