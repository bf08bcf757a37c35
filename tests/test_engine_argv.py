"""The Terraform wrapper's pure parts: argv, environment, event parsing, typed results."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import pytest

from skyhedge.engine import (
    ApplyResult,
    Diagnostic,
    ResourceChange,
    Terraform,
    TerraformRoot,
    capacity_reason,
    parse_event,
    replica_of,
    resolve_binary,
    run_parallel,
    run_timeout,
)
from skyhedge.errors import EngineError, InsufficientCapacity

ROOT = TerraformRoot(
    Path("/work/tree/local/local"), "local/local", Path("/work/data/local-local"), ("path=/s.tfstate",)
)


@pytest.fixture
def embedded(tmp_path, monkeypatch):
    monkeypatch.delenv("SKYHEDGE_TERRAFORM", raising=False)
    return Terraform(home=tmp_path, lock_timeout="30s", parallelism=4)


def test_every_command_is_non_interactive_colourless_and_locked(embedded):
    assert embedded.plan_args() == [
        "plan",
        "-input=false",
        "-no-color",
        "-json",
        "-detailed-exitcode",
        "-lock-timeout=30s",
        "-parallelism=4",
    ]
    assert embedded.plan_args(out="/d/p.tfplan", destroy=True, refresh=False)[-3:] == [
        "-destroy",
        "-refresh=false",
        "-out=/d/p.tfplan",
    ]
    assert embedded.apply_args() == [
        "apply",
        "-input=false",
        "-no-color",
        "-json",
        "-auto-approve",
        "-lock-timeout=30s",
        "-parallelism=4",
    ]
    assert embedded.apply_args(plan_file="/d/p.tfplan")[-1] == "/d/p.tfplan"
    assert embedded.destroy_args()[:5] == ["destroy", "-input=false", "-no-color", "-json", "-auto-approve"]
    assert embedded.output_args() == ["output", "-no-color", "-json"]
    assert embedded.fmt_args(".") == ["fmt", "-no-color", "-list=true", "-recursive", "-check", "."]
    init = embedded.init_args(ROOT)
    assert init[:4] == ["init", "-input=false", "-no-color", "-lock-timeout=30s"]
    assert init[-1] == "-backend-config=path=/s.tfstate"


def test_init_reads_the_rendered_backend_file_when_there_is_one(embedded, tmp_path):
    root = TerraformRoot(tmp_path, "x/y")
    assert not any(a.startswith("-backend-config") for a in embedded.init_args(root))
    (tmp_path / "backend.tfbackend.json").write_text("{}")
    assert "-backend-config=backend.tfbackend.json" in embedded.init_args(root)


def test_the_embedded_engine_and_a_binary_share_argv_after_the_prefix(embedded, tmp_path):
    inv = embedded.invocation(embedded.output_args(), ROOT.path, ROOT)
    assert inv.argv[:3] == (sys.executable, "-m", "skyhedge.engine")
    assert inv.argv[3:] == ("output", "-no-color", "-json")
    assert inv.cwd == ROOT.path
    fake = tmp_path / "tofu"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    binary = Terraform(home=tmp_path, binary=fake)
    assert binary.invocation(["version"], tmp_path).argv == (str(fake.resolve()), "version")


def test_environment_for_automation(embedded, tmp_path, monkeypatch):
    monkeypatch.setenv("TF_CLI_CONFIG_FILE", str(tmp_path / "missing.tfrc"))
    monkeypatch.setenv("TF_DATA_DIR", "/elsewhere")
    env = embedded.environment(ROOT)
    assert env["TF_IN_AUTOMATION"] == "1" and env["TF_INPUT"] == "0" and env["CHECKPOINT_DISABLE"] == "1"
    assert env["TF_DATA_DIR"] == str(ROOT.data_dir)
    rc = Path(env["TF_CLI_CONFIG_FILE"])
    assert rc.is_file() and rc.parent == tmp_path  # a missing user config is replaced by an empty one
    assert str(Path(__file__).resolve().parents[1]) in env["PYTHONPATH"].split(os.pathsep)
    mine = tmp_path / "mirror.tfrc"
    mine.write_text("# provider_installation {}\n")
    monkeypatch.setenv("TF_CLI_CONFIG_FILE", str(mine))
    assert embedded.environment()["TF_CLI_CONFIG_FILE"] == str(mine)  # a real user config is kept
    monkeypatch.delenv("TF_DATA_DIR")
    assert "TF_DATA_DIR" not in embedded.environment(TerraformRoot(tmp_path, "x"))


def test_binary_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("SKYHEDGE_TERRAFORM", raising=False)
    assert resolve_binary(None) is None
    with pytest.raises(EngineError, match="not found"):
        resolve_binary(tmp_path / "nope")
    if shutil.which("terraform"):
        monkeypatch.setenv("SKYHEDGE_TERRAFORM", "terraform")
        assert resolve_binary(None) == shutil.which("terraform")


def test_event_stream_parsing_and_replica_addresses():
    assert parse_event("") is None and parse_event("not json") is None and parse_event("{bad") is None
    assert parse_event('{"type": "version"}') == {"type": "version"}
    assert replica_of('module.replicas.terraform_data.replica["r-0012"]') == "r-0012"
    assert replica_of('module.replicas.aws_instance.replica["r-0003"]') == "r-0003"
    assert replica_of('module.replicas.data.aws_subnet.zone["use1-az1"]') is None
    assert replica_of(None) is None


def _result(*errors: Diagnostic, code: int = 1) -> ApplyResult:
    return ApplyResult(
        "aws/us-east-1", code, completed=(ResourceChange("x", "create"),), errors=errors, stderr="stderr text"
    )


def test_capacity_refusals_raise_insufficient_capacity_with_terraforms_text():
    cap = Diagnostic(
        "error",
        "creating EC2 Instance",
        "InsufficientInstanceCapacity: no g6 in use1-az1",
        'module.replicas.aws_instance.replica["r-0001"]',
    )
    local = Diagnostic(
        "error",
        "local-exec provisioner error",
        "Output: skyhedge-local: InsufficientCapacity: no spot capacity in local zone local-b",
    )
    other = Diagnostic("error", "Unsupported argument", 'An argument named "x" is not expected here.')
    assert cap.capacity and local.capacity and not other.capacity and cap.replica_id == "r-0001"
    with pytest.raises(InsufficientCapacity) as exc:
        _result(cap, local).raise_for_errors()
    assert exc.value.root == "aws/us-east-1" and "InsufficientInstanceCapacity" in exc.value.stderr
    with pytest.raises(EngineError) as exc2:
        _result(cap, other).raise_for_errors()
    assert type(exc2.value) is EngineError and "Unsupported argument" in exc2.value.stderr
    assert "stderr text" in exc2.value.stderr
    _result(code=0).raise_for_errors()


def test_an_errors_one_line_carries_the_first_line_of_terraforms_detail():
    """'Resource precondition failed' alone does not say which: the module's message does."""
    failed = Diagnostic(
        "error",
        "Resource precondition failed",
        "aws.subnets: the subnets of one region must be in one VPC, found vpc-1, vpc-2.\n\n"
        "This was checked by the condition at main.tf:61,7-16.",
    )
    assert failed.headline == (
        "Resource precondition failed: aws.subnets: the subnets of one region must be in one VPC, "
        "found vpc-1, vpc-2."
    )
    with pytest.raises(EngineError, match="in one VPC, found vpc-1, vpc-2.$"):
        _result(failed).raise_for_errors()
    assert (
        Diagnostic("error", "creating EC2 Instance: api error").headline == "creating EC2 Instance: api error"
    )
    long = Diagnostic("error", "local-exec provisioner error", "x" * 1000 + "\nmore")
    assert len(long.headline) < 300 and long.headline.endswith("...")


def test_an_error_at_a_data_source_reading_a_spec_value_names_the_spec_field():
    """Terraform names the address; the user edits the spec: a cloud registers which field an
    address reads (here AWS's `aws.subnets`, registered when its renderer loads)."""
    import skyhedge.clouds.aws.render  # noqa: F401  (registers aws.subnets)

    missing = Diagnostic(
        "error",
        "no matching EC2 Subnet found",
        address='module.replicas.data.aws_subnet.given["use1-az1"]',
    )
    assert missing.headline == "aws.subnets.use1-az1: no matching EC2 Subnet found"
    other = Diagnostic(
        "error", "no matching EC2 VPC found", address="module.replicas.data.aws_vpc.default[0]"
    )
    assert other.headline == "no matching EC2 VPC found"


def test_run_parallel_keeps_order_and_returns_exceptions():
    def work(n: int) -> int:
        if n == 2:
            raise EngineError("boom")
        return n * 10

    out = run_parallel([1, 2, 3], work)
    assert out[0] == 10 and isinstance(out[1], EngineError) and out[2] == 30
    assert run_parallel([], work) == []


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        # GCP's quota refusal (terraform-provider-google's wording): per region, the policy moves on
        ("Error waiting for instance to create: Quota 'PREEMPTIBLE_NVIDIA_L4_GPUS' exceeded. Limit: 1", True),
        ("VcpuLimitExceeded: You have requested more vCPU capacity than your current limit", True),
        ("api error InsufficientInstanceCapacity: there is no capacity", True),
        ("insufficientinstancecapacity", True),  # case does not matter
        ("Error: quota project not set for this request", False),  # "quota" alone is not a refusal
        # GCP's API rate limit is worded like a quota refusal, but says nothing about the zone
        (
            "googleapi: Error 403: Quota exceeded for quota metric 'Queries' and limit 'Queries per "
            "minute' of service 'compute.googleapis.com', rateLimitExceeded",
            False,
        ),
        ("InvalidAMIID.NotFound: The image id does not exist", False),
        # EC2's answer for a zone that does not offer the type (terraform-provider-aws's wording,
        # docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html `Unsupported`)
        (
            "creating EC2 Instance: operation error EC2: RunInstances, https response error StatusCode: "
            "400, RequestID: 88d96f72, api error Unsupported: Your requested instance type (g5.xlarge) is "
            "not supported in your requested Availability Zone (us-east-1e). Please retry your request by "
            "not specifying an Availability Zone or choosing us-east-1a, us-east-1b.",
            True,
        ),
        ("creating EC2 Instance: Unsupported: The requested configuration is currently not supported.", True),
        # ...but Terraform's own "Unsupported" diagnostics, and other calls' `Unsupported`, are not
        ('Unsupported argument: An argument named "spot_type" is not expected here.', False),
        ("Unsupported state file format: This state file uses format version 5", False),
        (
            "modifying EC2 Instance (i-1) attribute: operation error EC2: ModifyInstanceAttribute, "
            "api error Unsupported: not supported",
            False,
        ),
        # Compute Engine's answer for a zone that does not offer the machine type
        (
            "Error creating instance: googleapi: Error 400: Invalid value for field "
            "'resource.machineType': 'zones/us-central1-f/machineTypes/g2-standard-4'. Machine type "
            "with name 'g2-standard-4' does not exist in zone 'us-central1-f'., invalid",
            True,
        ),
    ],
)
def test_which_launch_errors_count_as_a_refusal_the_policy_routes_around(text, refused):
    diag = Diagnostic("error", "creating instance", text, 'module.replicas.x["r-0001"]')
    assert diag.capacity is refused
    if refused:
        assert capacity_reason(diag) == text


def test_a_hung_terraform_is_stopped_after_the_time_limit(tmp_path):
    """A Terraform run that never ends (a provider waiting on a cloud API forever) is killed after
    `timeout` seconds and reported as an EngineError, so the controller's pass goes on."""
    import time

    hung = tmp_path / "terraform"
    hung.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/pid\necho 'starting' >&2\nexec sleep 60\n")
    hung.chmod(0o755)
    engine = Terraform(home=tmp_path, binary=hung, timeout=1)
    started = time.monotonic()
    with pytest.raises(EngineError, match=r"did not finish within 1 s and was stopped") as caught:
        engine.run(engine.invocation(["apply"], tmp_path))
    assert time.monotonic() - started < 10
    assert "SKYHEDGE_TERRAFORM_TIMEOUT" in str(caught.value) and "starting" in caught.value.stderr
    pid = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 5
    while _runs(pid) and time.monotonic() < deadline:  # the binary itself, not only what ran it
        time.sleep(0.05)
    assert not _runs(pid)


def _runs(pid: int) -> bool:
    """Whether `pid` is a process that has not exited (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


# A `terraform` that counts the interrupts it gets, says Terraform's "Interrupt received" at the
# first, and finishes 0.5 s later with one more line: what a graceful stop looks like.
GRACEFUL = """#!{python}
import signal, sys, time
heard = []
signal.signal(signal.SIGINT, lambda *_: heard.append(1) or print("Interrupt received", flush=True))
open({ready!r}, "w").close()  # its handler is installed: the test may interrupt it now
print("started", flush=True)
deadline = time.monotonic() + 20
while not heard and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(0.5)
print(f"interrupts: {{len(heard)}}", flush=True)
"""

RUN_IT = """
import json, signal, sys
from pathlib import Path
from skyhedge.engine import Terraform
signal.signal(signal.SIGINT, lambda *_: None)  # skyhedge waits for Terraform after a Ctrl-C
engine = Terraform(home=Path(sys.argv[1]), binary=sys.argv[2])
done = engine.run(engine.invocation(["apply"], Path(sys.argv[1])))
print(json.dumps([done.exit_code, done.stdout]), flush=True)
"""


def test_a_ctrl_c_reaches_a_terraform_binary_once_and_what_it_says_after_reaches_skyhedge(tmp_path):
    """A `terraform` binary runs under a relay (so that it outlives a killed skyhedge); a Ctrl-C,
    which the terminal sends the whole process group, must still reach it exactly once (a second
    interrupt is Terraform's "exit now", state unwritten), and end neither the relay nor the
    lines Terraform says while it finishes."""
    import json
    import signal
    import subprocess
    import time

    fake = tmp_path / "terraform"
    ready = tmp_path / "handler-installed"
    fake.write_text(GRACEFUL.format(python=sys.executable, ready=str(ready)))
    fake.chmod(0o755)
    driver = subprocess.Popen(
        [sys.executable, "-c", RUN_IT, str(tmp_path), str(fake)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group: the Ctrl-C below reaches it and its children only
    )
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():  # (a fixed wait lost the race under load: SIGINT before the handler)
            assert driver.poll() is None and time.monotonic() < deadline, "terraform never started"
            time.sleep(0.05)
        os.killpg(driver.pid, signal.SIGINT)  # a terminal's Ctrl-C
        out, _ = driver.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    code, said = json.loads(out)
    assert code == 0
    assert said.splitlines() == ["started", "Interrupt received", "interrupts: 1"]


def test_a_terraform_binary_ended_by_a_signal_is_reported_so(tmp_path):
    """The relay a binary runs under ends as the binary did: a signal, not a made-up exit code."""
    fake = tmp_path / "terraform"
    fake.write_text("#!/bin/sh\necho going\nkill -SEGV $$\n")
    fake.chmod(0o755)
    engine = Terraform(home=tmp_path, binary=fake)
    done = engine.run(engine.invocation(["apply"], tmp_path))
    assert (done.exit_code, done.stdout) == (-11, "going\n")


@pytest.mark.parametrize(("raw", "limit"), [("", 3600.0), ("0", 0.0), ("90", 90.0)])
def test_the_time_limit_comes_from_the_environment(raw, limit, monkeypatch):
    monkeypatch.setenv("SKYHEDGE_TERRAFORM_TIMEOUT", raw)
    assert run_timeout() == limit


@pytest.mark.parametrize("raw", ["soon", "-1", "inf", "nan"])
def test_a_bad_time_limit_is_one_error_naming_the_variable(raw, monkeypatch):
    monkeypatch.setenv("SKYHEDGE_TERRAFORM_TIMEOUT", raw)
    with pytest.raises(EngineError, match=r"\$SKYHEDGE_TERRAFORM_TIMEOUT: expected seconds >= 0"):
        run_timeout()


def test_a_state_terraform_could_not_save_heads_the_error(tmp_path):
    """On a full disk Terraform's first error was the cut-short file it read back ("Unsupported
    state file format: ... syntax error at byte offset 4096"), the `apply` error line said only
    that, and the cause (no space left, the state in errored.tfstate) was 20 lines further down.
    The diagnostics below are the ones it printed then, in its order."""
    import json

    said = [
        (
            "Unsupported state file format",
            "The state file could not be parsed as JSON: syntax error at byte offset 4096.",
        ),
        (
            "Failed to write state",
            "An error occured while writing the serialized state: write /s.tfstate: no space left on device.",
        ),
        ("Failed to save state", "Error saving state: 2 problems:"),
        (
            "Failed to persist state to backend",
            "The error shown above has prevented Terraform from writing the updated state to the "
            "configured backend. To allow for recovery, the state has been written to the file "
            '"errored.tfstate" in the current working directory.',
        ),
    ]
    lines = [
        json.dumps({"type": "diagnostic", "diagnostic": {"severity": "error", "summary": s, "detail": d}})
        for s, d in said
    ]
    fake = tmp_path / "terraform"
    fake.write_text(
        f"#!{sys.executable}\nimport sys\nif sys.argv[1] != 'init':\n"
        f"    print({chr(10).join(lines)!r})\n    sys.exit(1)\n"
    )
    fake.chmod(0o755)
    root = TerraformRoot(tmp_path / "root", "local/local", tmp_path / "data")
    root.path.mkdir()
    result = Terraform(home=tmp_path, binary=fake).apply(root, check=False)
    assert [d.summary for d in result.errors] == [
        "Failed to write state",
        "Failed to save state",
        "Failed to persist state to backend",
        "Unsupported state file format",
    ]
    with pytest.raises(EngineError) as exc:
        result.raise_for_errors()
    assert str(exc.value) == (
        "terraform failed in local/local: Failed to write state: An error occured while writing the "
        "serialized state: write /s.tfstate: no space left on device."
    )
