"""Tables on a terminal narrower than they are (80 columns, or `COLUMNS=80` in a CI job): no figure,
zone or instance type is cut to `…`. rich shrank every column alike to fit: the README's
`simulate --trace ../shared/traces` showed no availability or cost at all at 120 columns, a
europe-west4 plan lost its prices at 80, and `catalog show` its instance types and zones."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

import skyhedge.cli.apply as apply_cli
import skyhedge.cli.catalog as catalog_cli
import skyhedge.cli.plan as plan_cli
import skyhedge.cli.simulate as simulate_cli
from skyhedge.cli import main
from skyhedge.state import ReplicaRecord, ServiceState, save_state

#: A trace name as long as the shared ones (`cant-be-late/availability/1-node/aws-10-26-2022[k80_1]`).
LONG_TRACE = "cant-be-late-availability-1-node-aws-10-26-2022-k80_1"

EU_SPEC = """\
name: eu-svc
resources: {accelerators: A100:1}
placement: {clouds: [gcp], regions: [europe-west4]}
replica_policy: {min_replicas: 2}
run: {command: "vllm serve x"}
"""


def run(*args: str):
    return CliRunner().invoke(main, list(args), prog_name="skyhedge", catch_exceptions=False)


def column_text(output: str, label: str, next_label: str) -> str:
    """What the column headed `label` (up to the one headed `next_label`) holds below its header,
    its lines joined: a name folded over lines reads whole again."""
    lines = output.splitlines()
    at = next(i for i, line in enumerate(lines) if label in line and next_label in line)
    start, end = lines[at].index(label), lines[at].index(next_label)
    return "".join(line[start:end].strip() for line in lines[at + 1 :])


def on_width(monkeypatch, width: int, *modules) -> None:
    """The commands of `modules` print on a console `width` columns wide (a terminal's)."""
    for module in modules:
        monkeypatch.setattr(module, "console", Console(width=width))


def simulated_on(monkeypatch, width: int, args: list[str]) -> tuple[list[dict], str]:
    """`simulate ARGS`'s JSON rows, and its table as printed `width` columns wide: uncut (no `…`)
    and no wider than the terminal."""
    rows = json.loads(run(*args, "--json").output)
    on_width(monkeypatch, width, simulate_cli)
    table = run(*args)
    assert table.exit_code == 0, table.output
    assert "…" not in table.output, table.output
    assert max(len(line) for line in table.output.splitlines()) <= width
    return rows, table.output


@pytest.fixture
def long_trace(tmp_path: Path) -> Path:
    path = tmp_path / f"{LONG_TRACE}.csv"
    rows = ["seconds,us-east-1a,us-east-1b,us-west-2a"]
    rows += [f"{i * 300},{2 if i % 7 else 0},{1 if i % 5 else 0},3" for i in range(360)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("width", [80, 120])
def test_simulate_table_keeps_every_figure_on_a_narrow_terminal(monkeypatch, long_trace, width):
    args = [
        "simulate",
        "--trace",
        str(long_trace),
        "--policy",
        "spothedge,skyhedge,optimal",
        "--repeats",
        "2",
    ]
    rows, output = simulated_on(monkeypatch, width, args)
    for row in rows:
        assert f"{100 * row['availability']:.2f}%" in output
        assert f"{row['relative_cost']:.3f}" in output
    assert "met" in output  # skyhedge's verdict against SpotHedge


@pytest.mark.parametrize("width", [80, 100])
def test_a_simulate_table_too_wide_for_whole_figures_folds_them_rather_than_cut_them(
    monkeypatch, long_trace, tmp_path, width
):
    """`--latency --prices` make 14 columns: their figures alone do not fit 80 or 100 columns.
    rich cut every one ("100.…", "89.1…") and squeezed the trace column out altogether."""
    prices = tmp_path / "prices.json"
    zones = ("us-east-1a", "us-east-1b", "us-west-2a")
    prices.write_text(json.dumps({z: {"spot": 1.0, "ondemand": 3.0} for z in zones}), encoding="utf-8")
    args = ["simulate", "--trace", str(long_trace), "--policy", "spothedge,skyhedge,optimal"]
    args += ["--repeats", "2", "--latency", "--prices", str(prices)]
    rows, output = simulated_on(monkeypatch, width, args)
    lines = output.splitlines()
    below = lines[next(i for i, line in enumerate(lines) if line.startswith("─")) + 1 :]
    first = [line.split()[0] for line in below if line.strip()]
    assert "".join(first).startswith(LONG_TRACE)  # the trace's name, folded down its column
    if width == 100:  # room for a cost on one line (at 80 it folds too, whole, over two)
        flat = "".join("".join(line.split()) for line in below)
        for row in rows:
            assert f"{row['relative_cost']:.3f}" in flat


def test_simulate_table_keeps_its_frame_where_it_fits(monkeypatch, long_trace):
    on_width(monkeypatch, 240, simulate_cli)
    table = run("simulate", "--trace", str(long_trace), "--policy", "spothedge,optimal", "--repeats", "1")
    assert table.exit_code == 0 and "┏" in table.output and LONG_TRACE in table.output


def test_plan_table_keeps_locations_and_prices_at_80_columns(monkeypatch, tmp_path):
    spec = tmp_path / "eu.yaml"
    spec.write_text(EU_SPEC, encoding="utf-8")
    on_width(monkeypatch, 80, plan_cli)
    result = run("plan", str(spec), "--state-dir", str(tmp_path / "never"))
    assert result.exit_code == 0, result.output
    assert "…" not in result.output, result.output
    plan = json.loads(run("plan", str(spec), "--state-dir", str(tmp_path / "never"), "--json").output)
    for replica in plan["replicas"]:
        assert f"gcp/europe-west4/{replica['zone']}" in result.output
        assert f"{replica['price_per_hour']:.4f}" in result.output
    assert f"{plan['summary']['hourly_cost']:.4f}" in result.output


def test_catalog_table_keeps_prices_and_whole_names_at_80_columns(monkeypatch):
    on_width(monkeypatch, 80, catalog_cli)
    result = run("catalog", "show", "--cloud", "gcp", "--region", "europe-west4")
    assert result.exit_code == 0, result.output
    assert "…" not in result.output, result.output
    data = json.loads(run("catalog", "show", "--cloud", "gcp", "--region", "europe-west4", "--json").output)
    for offer in data["offers"]:
        assert f"{offer['ondemand_price']:.4f}" in result.output
    zones = column_text(result.output, "zone", "on-demand")  # folded over lines, still all there
    assert "europe-west4-aeurope-west4-b" in zones


def test_status_table_keeps_ids_and_endpoints_at_80_columns(monkeypatch, tmp_path):
    spec = tmp_path / "eu.yaml"
    spec.write_text(EU_SPEC, encoding="utf-8")
    sdir = tmp_path / "state"
    sdir.mkdir()
    state = ServiceState(service="eu-svc")
    now = time.time()
    for n, zone in ((1, "europe-west4-a"), (2, "europe-west4-b")):
        rid = f"r-000{n}"
        state.replicas[rid] = ReplicaRecord(
            id=rid,
            cloud="gcp",
            region="europe-west4",
            zone=zone,
            market="on-demand",
            launched_at=now,
            provisioned_at=now,
            ready_at=now,
            endpoint=f"http://34.141.200.12{n}:8000",
            cloud_id=f"projects/p/zones/{zone}/instances/eu-svc-{rid}",
        )
    save_state(sdir, state)
    on_width(monkeypatch, 80, apply_cli)
    result = run("status", str(spec), "--state-dir", str(sdir))
    assert result.exit_code == 0, result.output
    assert "…" not in result.output, result.output
    for n in (1, 2):
        assert f"r-000{n}" in result.output and f"http://34.141.200.12{n}:8000" in result.output
    where = column_text(result.output, "cloud/region/zone", "market")
    assert "gcp/europe-west4/europe-west4-agcp/europe-west4/europe-west4-b" in where
