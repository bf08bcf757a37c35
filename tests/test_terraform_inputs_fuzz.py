"""What skyhedge hands Terraform, at the edges of what a spec accepts, reaches Terraform (and through
it the replica) exactly as the spec says it.

- Property (pure Python, many specs): a valid spec with values at the edges (names of 1 and 40
  characters, env values with quotes, backslashes, line breaks, `${`, `%{`, U+2028, emoji,
  decomposed accents, ports 1 and 65535, several zones) renders for local, aws and gcp to strict
  JSON, keeps its values out of the HCL, puts them in the tfvars as written, and holds no string
  that Terraform would change; a spec holding one (Terraform converts every string to Unicode
  NFC: a decomposed `é` arrived composed) is refused, naming the field.
- Terraform itself (a handful of runs, the embedded engine): the trees are `fmt`-clean; Terraform
  reads `run` back byte for byte; the AWS and GCP boot scripts, rendered by Terraform's own
  `templatefile` as the modules do, give the replica's shell every env value exactly.
- A state dir whose name is not NFC is refused in one line naming the root input, before
  Terraform made a twin of it for the replicas' files and every local launch failed.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from local_support import free_base_port, spec_dict

from skyhedge._resources import modules_dir
from skyhedge.catalog import load_catalog
from skyhedge.cli import main
from skyhedge.clouds import RenderContext
from skyhedge.engine import Terraform, TerraformRoot
from skyhedge.errors import SpecError
from skyhedge.render import TFVARS_FILE, render_tree, write_tree
from skyhedge.service import compute_plan, resolve_placement
from skyhedge.spec import ServiceSpec, nfc_change, parse_spec
from skyhedge.state import ServiceState

SOURCE = "/specs/edge.yaml"
CTX = RenderContext(Path("/srv/skyhedge/state"), Path("/srv/skyhedge"), sys.executable, "/srv/py")
TYPES = {"aws": "g6.xlarge", "gcp": "g2-standard-4"}
ZONES = {
    cloud: sorted(o.zone for o in load_catalog(cloud).offers_for(TYPES[cloud]) if o.spot_price is not None)
    for cloud in ("aws", "gcp")
}
ZONES["local"] = sorted(load_catalog("local").zones())

#: Pieces a shell, HCL, a heredoc, JSON or a docker env file could take for syntax, and text
#: that Unicode normalisation changes (the last two).
TRICKY = [
    "${HOME}",
    "$${x}",
    "%{ if true }y%{ endif }",
    "\\",
    '"',
    "'",
    "`id`",
    "$(id)",
    "\n",
    "\r\n",
    "\t",
    "\u2028\u2029",
    "<>&",
    "\ufeff",
    "\x7f\x1b\x08\x0c",
    "😀",
    "é",
    "EOF\nPY\nUNIT\n",
    "#",
    " ",
    "cafe\u0301",
    "\u212b",
]
TEXT = st.lists(
    st.one_of(
        st.sampled_from(TRICKY), st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"))
    ),
    max_size=4,
).map("".join)
NAMES = st.one_of(
    st.sampled_from(["a", "a" + "b" * 38 + "c"]), st.from_regex(r"\A[a-z]([a-z0-9-]{0,38}[a-z0-9])?\Z")
)
ENV_NAMES = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,15}\Z")


@st.composite
def edge_specs(draw: st.DrawFn) -> dict[str, Any]:
    cloud = draw(st.sampled_from(["local", "aws", "gcp"]))
    env = draw(st.dictionaries(ENV_NAMES, TEXT, max_size=5))
    run: dict[str, Any] = {"command": draw(TEXT.filter(str.strip)), "env": env}
    if draw(st.booleans()):
        run["setup"] = draw(TEXT.filter(str.strip))
    if cloud != "local" and draw(st.booleans()):  # a container: no line break in its env
        run["image"] = draw(TEXT.filter(lambda s: s.strip() and "\n" not in s))
        run["env"] = {k: re.sub(r"[\r\n]", " ", v) for k, v in env.items()}
    zones = draw(st.lists(st.sampled_from(ZONES[cloud]), min_size=1, unique=True))
    data: dict[str, Any] = {
        "name": draw(NAMES),
        "placement": {"clouds": [cloud], "zones": zones},
        "replica_policy": {
            "min_replicas": draw(st.integers(0, 5)),
            "num_overprovision": draw(st.integers(0, 2)),
        },
        "run": run,
    }
    if cloud == "local":
        data["resources"] = {"local_base_port": draw(st.sampled_from([1024, 18000, 60000 - 20]))}
    else:
        data["resources"] = {
            "instance_type": {cloud: TYPES[cloud]},
            "ports": draw(st.sampled_from([1, 8000, 65535])),
            "disk_size": draw(st.sampled_from([10, 65536])),
        }
    if cloud == "gcp":
        data["gcp"] = {"project": "example.com:my-project"}
    return data


def strict_json(data: bytes) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(data, parse_constant=refuse)


def strings(value: Any) -> list[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def run_texts(run: dict[str, Any]) -> list[str]:
    return [v for k, v in run.items() if k != "env"] + list(run.get("env", {}).values())


def tree_of(spec: ServiceSpec):
    placement = resolve_placement(spec)
    plan, _ = compute_plan(spec, ServiceState(service=spec.name), now=0.0, placement=placement)
    return render_tree(spec, plan, context=CTX, instance_types=placement.instance_types)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edge_specs())
@example(
    {
        "name": "a",
        "placement": {"clouds": ["local"]},
        "run": {"command": "x", "env": {"K": "cafe\u0301"}},
    }
)
def test_a_spec_at_the_edges_reaches_terraform_as_written_or_is_refused_naming_the_field(data):
    try:
        spec = parse_spec(data, source=SOURCE)
    except SpecError as exc:
        # the one refusal these specs meet: text that Terraform would change on its way
        assert "Unicode NFC" in str(exc), str(exc)
        assert any(nfc_change(t) is not None for t in run_texts(data["run"])), str(exc)
        return
    tree = tree_of(spec)
    files = dict(tree.files)
    for name, content in files.items():
        if name.endswith(".json"):
            for text in strings(strict_json(content)):
                # what Terraform reads is what skyhedge wrote (it converts every string to NFC)
                assert unicodedata.is_normalized("NFC", text), (name, ascii(text))
        elif name.endswith(".tf") and not name.startswith("modules/"):
            hcl = content.decode()
            for text in run_texts(data["run"]):
                assert len(text) < 8 or text not in hcl, f"{text!r} spliced into {name}"
    for root in tree.roots:
        run = strict_json(files[f"{root.path}/{TFVARS_FILE}"])["run"]
        assert run["env"] == spec.run.env
        assert (run["command"], run.get("setup"), run.get("image")) == (
            spec.run.command,
            spec.run.setup,
            spec.run.image,
        )


# -- Terraform itself ---------------------------------------------------------------------------

#: Every piece above at once, in every `run` field a VM takes (a line break only where a
#: container is not used), at a size that still fits EC2's user data.
EDGE_ENV = {
    "QUOTES": "a\"b'c`$(id)${HOME}$${x}%{ if true }y%{ endif }\\n\\\\",
    "LINES": "one\ntwo\r\nthree\tfour\u2028five\u2029",
    "ODD": "<>&\ufeff\x7f\x1b\x08\x0c😀é",
    "HEREDOCS": "EOF\nPY\nUNIT\n'\n",
    "EMPTY": "",
    "SPACES": "  both ends  ",
    "LONG": "x" * 2000,
}
EDGE_RUN = {
    "command": "echo ${HOME} %{x} \\ \"q\" 'q' $(id)",
    "setup": "EOF\n%{ for x in y }",
    "env": EDGE_ENV,
}


def _probe_outputs(root: Path) -> None:
    """Outputs that show what Terraform read: `run` as JSON, and the AWS and GCP boot scripts
    rendered from it by `templatefile`, as modules/*-replicas do (base64: byte for byte)."""
    config = "{config = base64encode(jsonencode(var.run))}"
    lines = ['output "probe_run" {\n  value = base64encode(jsonencode(var.run))\n}\n']
    for cloud, template in (
        ("aws", "aws-replicas/user_data.sh.tftpl"),
        ("gcp", "gcp-replicas/startup.sh.tftpl"),
    ):
        path = json.dumps(str(modules_dir() / template))
        lines.append(
            f'output "probe_{cloud}" {{\n  value = base64encode(templatefile({path}, {config}))\n}}\n'
        )
    (root / "zz_probe.tf").write_text("\n".join(lines))


def _replica_env(script: str, config: dict[str, Any], sandbox: Path) -> dict[str, str]:
    """The environment the replica's command gets from the boot script: its Python part run on
    `config` (paths moved into `sandbox`), then its env file sourced by bash, as the unit does."""
    python = script.split("python3 - <<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    sandbox.mkdir()
    (sandbox / "replica.json").write_text(json.dumps({**config, "port": 8000, "replica_id": "r-0001"}))
    subprocess.run([sys.executable, "-c", python.replace("/opt/skyhedge/", f"{sandbox}/")], check=True)
    dump = "import json, os; print(json.dumps(dict(os.environ)))"
    done = subprocess.run(
        ["bash", "-c", f'. "{sandbox}/env" && exec "{sys.executable}" -c "{dump}"'],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    return json.loads(done.stdout)


def test_terraform_reads_the_edge_values_back_exactly_and_the_boot_scripts_hand_them_on(tmp_path):
    engine = Terraform(home=tmp_path / "home")
    local = parse_spec(
        {
            "name": "a" + "b" * 38 + "c",
            "placement": {"clouds": ["local"], "zones": ZONES["local"]},
            "resources": {"local_base_port": 60000 - 30},
            "replica_policy": {"min_replicas": 10, "num_overprovision": 5},
            "run": EDGE_RUN,
        },
        source=SOURCE,
    )
    vms = parse_spec(
        {
            "name": "e",
            "placement": {"clouds": ["aws", "gcp"]},
            "resources": {"instance_type": TYPES, "ports": 65535},
            "run": {**EDGE_RUN, "env": {k: v for k, v in EDGE_ENV.items() if k != "LONG"}},
            "gcp": {"project": "example.com:my-project"},
        },
        source=SOURCE,
    )
    for name, spec in (("local", local), ("vms", vms)):
        write_tree(tree_of(spec), tmp_path / name)
        assert engine.fmt_check(tmp_path / name) == []

    root = tmp_path / "local" / "local" / "local"
    tfvars = strict_json((root / TFVARS_FILE).read_bytes())
    (root / "main.tf").write_text(re.sub(r'backend "local" \{\}', "", (root / "main.tf").read_text()))
    _probe_outputs(root)
    target = TerraformRoot(root, "local/local", tmp_path / "data")
    assert [d.text for d in engine.validate(target) if d.severity == "error"] == []
    engine.plan(target, out="probe.plan")  # variable validation included; nothing is launched
    shown = engine.run(engine.invocation(["show", "-json", "probe.plan"], root, target))
    planned = strict_json(shown.stdout)["planned_values"]["outputs"]
    outputs = {k: v["value"] for k, v in planned.items() if k.startswith("probe_")}  # (`replicas`: unknown)

    assert json.loads(base64.b64decode(outputs["probe_run"])) == tfvars["run"]
    for cloud in ("aws", "gcp"):
        script = base64.b64decode(outputs[f"probe_{cloud}"]).decode()
        encoded = re.search(r"echo '([A-Za-z0-9+/=]+)' \| base64 -d", script)
        assert encoded, script[:400]
        config = json.loads(base64.b64decode(encoded[1]))
        assert config == tfvars["run"]
        env = _replica_env(script, {**config, "service": local.name}, tmp_path / f"boot-{cloud}")
        assert {k: env.get(k) for k in EDGE_ENV} == EDGE_ENV


def test_a_state_dir_whose_name_terraform_would_change_is_refused_in_one_line(tmp_path, monkeypatch):
    """Terraform read the launcher's paths composed (NFC), created that twin of the state dir for
    the replicas' pid and log files, and the local replicas failed to start (measured: `python3:
    can't open file '/.../nfd-café/server.py'`). Refused at render, naming the root's input."""
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "service.yaml"
    spec.write_text(yaml.safe_dump(spec_dict("nfc", free_base_port(4), replicas=1, command="sleep 60")))
    state, out = tmp_path / "state-cafe\u0301", tmp_path / "tree"
    result = CliRunner().invoke(main, ["render", str(spec), "--state-dir", str(state), "--out", str(out)])
    assert result.exit_code == 1, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith("error: local/local: runtime_dir: ")
    assert "is not in Unicode NFC (U+0301 at character" in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["service.yaml"]


@pytest.mark.parametrize("text", ["caf\u00e9", "x\u0323\u0302", "plain"])
def test_text_already_in_nfc_is_left_alone(text):
    assert nfc_change(text) is None
