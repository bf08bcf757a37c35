"""`skyhedge catalog show|refresh` through click's CliRunner with a temporary SKYHEDGE_CATALOG_DIR."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import botocore.session
import pytest
from botocore.stub import ANY, Stubber
from click.testing import CliRunner

import skyhedge.catalog.aws as aws_reader
import skyhedge.catalog.gcp as gcp_reader
from skyhedge.catalog import bundled_path, clear_cache
from skyhedge.cli import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HISTORY = SHARED / "prices" / "aws-spot-history-2020"


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SKYHEDGE_CATALOG_DIR", str(cache))
    clear_cache()
    yield cache
    clear_cache()


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_show_table_lists_zones(cache_dir: Path) -> None:
    code, out, _ = run("catalog", "show", "--cloud", "local")
    assert code == 0
    for letter in "abcdef":
        assert f"local-{letter}" in out
    assert "6 offers, 6 zones" in out


def test_show_json_filters(cache_dir: Path) -> None:
    code, out, _ = run("catalog", "show", "--cloud", "aws", "--instance-type", "g5.xlarge", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["cloud"] == "aws" and data["source"] and data["taken_at"]
    assert set(data["instance_types"]) == {"g5.xlarge"}
    assert data["offers"] and all(o["instance_type"] == "g5.xlarge" for o in data["offers"])
    assert data["path"] == str(bundled_path("aws"))
    code, out, _ = run("catalog", "show", "--cloud", "aws", "--region", "eu-west-1", "--json")
    assert {o["region"] for o in json.loads(out)["offers"]} == {"eu-west-1"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cloud", "azure"], "error: --cloud: unknown cloud 'azure': expected one of aws, gcp, local"),
        (
            ["--cloud", "aws", "--instance-type", "g5.xlarg"],
            "unknown instance type 'g5.xlarg' for cloud 'aws'",
        ),
        (["--cloud", "gcp", "--region", "us-central2"], "unknown region 'us-central2' for cloud 'gcp'"),
    ],
)
def test_show_bad_input_is_one_line(cache_dir: Path, args: list[str], message: str) -> None:
    code, out, err = run("catalog", "show", *args)
    assert code == 1
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert out == ""


def test_user_cache_is_shown(cache_dir: Path) -> None:
    cache_dir.mkdir()
    data = json.loads(bundled_path("local").read_text())
    for offer in data["offers"]:
        offer["ondemand_price"] = 0.5
    (cache_dir / "local.json").write_text(json.dumps(data))
    code, out, _ = run("catalog", "show", "--cloud", "local", "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["path"] == str(cache_dir / "local.json")
    assert {o["ondemand_price"] for o in shown["offers"]} == {0.5}


def test_bad_user_cache_is_one_line(cache_dir: Path) -> None:
    cache_dir.mkdir()
    (cache_dir / "gcp.json").write_text("{}")
    code, _, err = run("catalog", "show", "--cloud", "gcp")
    assert code == 1
    assert err.startswith(f"error: {cache_dir / 'gcp.json'}: format: missing")


def test_refresh_local_is_refused(cache_dir: Path) -> None:
    code, _, err = run("catalog", "refresh", "--cloud", "local")
    assert code == 1
    assert "the local cloud has no price API to refresh from (refresh works for aws, gcp)" in err
    assert not cache_dir.exists()


def test_refresh_of_an_unknown_cloud_names_the_known_ones(cache_dir: Path) -> None:
    code, _, err = run("catalog", "refresh", "--cloud", "azure")
    assert code == 1
    assert (
        err.strip() == "error: --cloud: expected one of aws, gcp (the clouds with a price API), got 'azure'"
    )
    assert not cache_dir.exists()


# --- refresh aws ------------------------------------------------------------------------------


@pytest.fixture
def stubbed_ec2(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stubber]:
    if not HISTORY.is_dir():
        pytest.skip("../shared/prices is not available")
    client = botocore.session.get_session().create_client(
        "ec2", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    stubber = Stubber(client)
    stubber.activate()
    monkeypatch.setattr(aws_reader, "_boto3_client_factory", lambda: lambda region: client)
    yield stubber
    stubber.deactivate()
    client.close()


def _stub_us_east_1(stubber: Stubber, response_file: str) -> None:
    zones = {
        "us-east-1b": "use1-az1",
        "us-east-1c": "use1-az2",
        "us-east-1d": "use1-az4",
        "us-east-1f": "use1-az5",
    }
    stubber.add_response(
        "describe_availability_zones",
        {"AvailabilityZones": [{"ZoneName": n, "ZoneId": z} for n, z in zones.items()]},
        {"AllAvailabilityZones": True},
    )
    stubber.add_response(
        "describe_spot_price_history",
        json.loads((HISTORY / response_file).read_text()),
        {"InstanceTypes": ["p3.2xlarge"], "ProductDescriptions": ["Linux/UNIX"], "StartTime": ANY},
    )


def test_refresh_of_offers_the_catalog_lacks_says_so_without_asking_the_api(cache_dir: Path) -> None:
    """g6 is not sold in eu-west-1: the refresh said "found no prices for the chosen offers",
    pointing at the price API when there was nothing to price (found by an audit)."""
    code, out, err = run(
        "catalog", "refresh", "--cloud", "aws", "--regions", "eu-west-1", "--instance-types", "g6.xlarge"
    )
    assert code == 1 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith(
        "error: the aws catalog has no offer of g6.xlarge in eu-west-1: nothing to refresh"
    )
    assert not (cache_dir / "aws.json").exists()


def test_refresh_aws_writes_user_cache(cache_dir: Path, stubbed_ec2: Stubber) -> None:
    _stub_us_east_1(stubbed_ec2, "us-east-1/2020-02-27.p3.2xlarge.json")
    code, out, err = run(
        "catalog", "refresh", "--cloud", "aws", "--regions", "us-east-1", "--instance-types", "p3.2xlarge"
    )
    assert code == 0, err
    assert f"updated 4 offers in 1 regions from {aws_reader.SOURCE}; wrote" in out
    assert "<module" not in out
    written = cache_dir / "aws.json"
    data = json.loads(written.read_text())
    assert data["sources"][-1]["refresh"] == aws_reader.SOURCE
    assert data["sources"][-1]["regions"] == ["us-east-1"]
    refreshed = [o for o in data["offers"] if o.get("spot_source") == aws_reader.SOURCE]
    assert len(refreshed) == 4
    assert all(o["spot_taken_at"].startswith("2020-02-2") for o in refreshed)
    assert [p.name for p in cache_dir.iterdir()] == ["aws.json"]  # atomic write left no temp file
    code, out, _ = run("catalog", "show", "--cloud", "aws", "--instance-type", "p3.2xlarge", "--json")
    assert json.loads(out)["path"] == str(written)


def test_refresh_aws_unknown_region(cache_dir: Path, stubbed_ec2: Stubber) -> None:
    code, _, err = run("catalog", "refresh", "--cloud", "aws", "--regions", "us-east-1,mars-1")
    assert code == 1
    assert "unknown region 'mars-1'" in err
    assert not (cache_dir / "aws.json").exists()


def test_refresh_aws_cloud_error_writes_nothing(cache_dir: Path, stubbed_ec2: Stubber) -> None:
    stubbed_ec2.add_client_error("describe_availability_zones", "AuthFailure", "AWS was not able to validate")
    code, _, err = run("catalog", "refresh", "--cloud", "aws", "--regions", "us-east-1")
    assert code == 1
    assert err.startswith("error: AWS DescribeAvailabilityZones failed")
    assert not (cache_dir / "aws.json").exists()


def test_refresh_aws_skips_zone_entries_without_a_name(cache_dir: Path, stubbed_ec2: Stubber) -> None:
    """Bug-bash: a DescribeAvailabilityZones entry without ZoneName was a KeyError traceback."""
    stubbed_ec2.add_response(
        "describe_availability_zones",
        {"AvailabilityZones": [{"ZoneId": "use1-az2"}, {"ZoneName": "us-east-1b", "ZoneId": "use1-az1"}]},
        {"AllAvailabilityZones": True},
    )
    item = {
        "InstanceType": "g6.xlarge",
        "AvailabilityZone": "us-east-1b",
        "SpotPrice": "0.3",
        "Timestamp": "2020-01-01T00:00:00Z",
    }
    stubbed_ec2.add_response("describe_spot_price_history", {"SpotPriceHistory": [item]})
    code, out, err = run(
        "catalog", "refresh", "--cloud", "aws", "--regions", "us-east-1", "--instance-types", "g6.xlarge"
    )
    assert code == 0, err
    assert "updated 1 offers in 1 regions" in out
    data = json.loads((cache_dir / "aws.json").read_text())
    (offer,) = [o for o in data["offers"] if o.get("spot_source") == aws_reader.SOURCE]
    assert (offer["instance_type"], offer["zone"], offer["spot_price"]) == ("g6.xlarge", "use1-az1", 0.3)


@pytest.mark.parametrize("price", ["NaN", "Infinity", "-1.0", "1e308"])
def test_refresh_aws_bad_spot_price_blames_the_api_not_the_cache_file(
    cache_dir: Path, stubbed_ec2: Stubber, price: str
) -> None:
    stubbed_ec2.add_response(
        "describe_availability_zones",
        {"AvailabilityZones": [{"ZoneName": "us-east-1b", "ZoneId": "use1-az1"}]},
        {"AllAvailabilityZones": True},
    )
    item = {
        "InstanceType": "g6.xlarge",
        "AvailabilityZone": "us-east-1b",
        "SpotPrice": price,
        "Timestamp": "2020-01-01T00:00:00Z",
    }
    stubbed_ec2.add_response("describe_spot_price_history", {"SpotPriceHistory": [item]})
    code, out, err = run(
        "catalog", "refresh", "--cloud", "aws", "--regions", "us-east-1", "--instance-types", "g6.xlarge"
    )
    assert code == 1
    assert err.startswith(
        f"error: AWS DescribeSpotPriceHistory: g6.xlarge in us-east-1b: SpotPrice {price!r} is not a price"
    )
    assert err.count("\n") == 1 and "aws.json" not in err
    assert not (cache_dir / "aws.json").exists()


# --- refresh gcp ------------------------------------------------------------------------------


def refresh_gcp(region: str, instance_type: str) -> tuple[int, str, str]:
    return run("catalog", "refresh", "--cloud", "gcp", "--regions", region, "--instance-types", instance_type)


def test_refresh_gcp_against_local_server(cache_dir: Path, billing: dict[str, dict]) -> None:
    def sku(description: str, usage: str, price_nanos: int, unit: str) -> dict:
        return {
            "description": description,
            "category": {"usageType": usage},
            "serviceRegions": ["us-east1"],
            "pricingInfo": [
                {
                    "pricingExpression": {
                        "usageUnit": unit,
                        "tieredRates": [{"unitPrice": {"nanos": price_nanos}}],
                    }
                }
            ],
        }

    billing.update(
        {  # test values, two pages
            "": {
                "skus": [
                    sku("G2 Instance Core running in Americas", "OnDemand", 20_000_000, "h"),
                    sku("G2 Instance Ram running in Americas", "OnDemand", 2_000_000, "GiBy.h"),
                ],
                "nextPageToken": "next",
            },
            "next": {"skus": [sku("Nvidia L4 GPU running in Americas", "OnDemand", 500_000_000, "h")]},
        }
    )
    code, out, err = refresh_gcp("us-east1", "g2-standard-8")
    assert code == 0, err
    assert "updated 3 offers in 1 regions" in out
    data = json.loads((cache_dir / "gcp.json").read_text())
    g2 = [o for o in data["offers"] if o["instance_type"] == "g2-standard-8" and o["region"] == "us-east1"]
    assert len(g2) == 3
    for offer in g2:
        assert offer["ondemand_price"] == pytest.approx(8 * 0.02 + 32 * 0.002 + 0.5)
        assert offer["ondemand_source"] == gcp_reader.SOURCE
        assert "spot_source" not in offer  # no Preemptible SKUs served: spot kept from the bundle


def test_catalog_strings_are_shown_as_text_not_markup(cache_dir: Path) -> None:
    code, out, _ = run("catalog", "show", "--cloud", "local", "--json")
    data = json.loads(out)
    data.pop("path")
    data["offers"][0]["zone"] = "[bold red]x[/]"
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / "local.json").write_text(json.dumps(data))
    clear_cache()
    code, out, err = run("catalog", "show", "--cloud", "local")
    assert code == 0, err
    assert "[bold red]x[/]" in out


def test_a_user_catalog_that_is_a_directory_is_refused_not_ignored(cache_dir: Path) -> None:
    (cache_dir / "local.json").mkdir(parents=True)
    clear_cache()
    code, _, err = run("catalog", "show", "--cloud", "local")
    assert code == 1 and "local.json: is a directory, expected a catalog file" in err


def test_a_broken_user_catalog_is_named_not_blamed_on_the_spec(cache_dir: Path, tmp_path: Path) -> None:
    (cache_dir / "local.json").mkdir(parents=True)
    clear_cache()
    spec = tmp_path / "svc.yaml"
    spec.write_text("name: svc\nplacement: {clouds: [local]}\nrun: {command: serve}\n")
    code, _, err = run("plan", str(spec), "--state-dir", str(tmp_path / "st"))
    assert code == 1 and err.startswith("error: ")
    assert "local.json: is a directory, expected a catalog file" in err
    assert "placement.clouds" not in err and "svc.yaml" not in err


@pytest.fixture
def billing(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, dict]]:
    """A local Cloud Billing server: `pageToken` -> the answer the test puts in the dict."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from google.auth.credentials import AnonymousCredentials
    from google.auth.transport.requests import AuthorizedSession

    pages: dict[str, dict] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            token = self.path.partition("pageToken=")[2].split("&")[0]
            body = json.dumps(pages[token]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    session = AuthorizedSession(AnonymousCredentials())
    monkeypatch.setenv("SKYHEDGE_GCP_BILLING_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(gcp_reader, "default_session", lambda: session)
    try:
        yield pages
    finally:
        session.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def billing_pages(billing: dict[str, dict]) -> list[object]:
    """One page holding whatever SKUs the test puts in the list."""
    skus: list[object] = []
    billing[""] = {"skus": skus}
    return skus


def _gcp_sku(description: str, usage: str, unit: str, unit_price: object) -> dict:
    return {
        "skuId": "T",
        "description": description,
        "category": {"usageType": usage},
        "serviceRegions": ["us-central1"],
        "pricingInfo": [
            {
                "pricingExpression": {
                    "usageUnit": unit,
                    "tieredRates": [{"startUsageAmount": 0, "unitPrice": unit_price}],
                }
            }
        ],
    }


def _g2_skus() -> list[dict]:
    return [
        _gcp_sku("G2 Instance Core running in Americas", "OnDemand", "h", {"nanos": 20_000_000}),
        _gcp_sku("G2 Instance Ram running in Americas", "OnDemand", "GiBy.h", {"nanos": 3_000_000}),
        _gcp_sku("Nvidia L4 GPU running in Americas", "OnDemand", "h", {"nanos": 500_000_000}),
    ]


def _with(index: int, **changes: object) -> list[object]:
    skus: list[object] = list(_g2_skus())
    skus[index] = {**skus[index], **changes}  # type: ignore[dict-item]
    return skus


@pytest.mark.parametrize(
    ("skus", "message"),
    [
        (
            _with(0, category="Compute"),
            "error: Cloud Billing API: SKU 'T' (G2 Instance Core running in Americas): category: "
            "expected an object, got 'Compute'",
        ),
        (["x", *_g2_skus()], "error: Cloud Billing API: expected a SKU object, got 'x'"),
        (
            _with(0, pricingInfo={"a": 1}),
            "error: Cloud Billing API: SKU 'T' (G2 Instance Core running in Americas): pricingInfo: "
            "expected a list, got {'a': 1}",
        ),
        (
            _with(
                0,
                pricingInfo=[
                    {"pricingExpression": {"usageUnit": "h", "tieredRates": [{"startUsageAmount": "lots"}]}}
                ],
            ),
            "error: Cloud Billing API: SKU 'T' (G2 Instance Core running in Americas): "
            "pricingInfo[-1].pricingExpression.tieredRates[0].startUsageAmount: "
            "expected a number >= 0, got 'lots'",
        ),
        (
            [
                *_g2_skus()[:2],
                _gcp_sku(
                    "Nvidia L4 GPU running in Americas",
                    "OnDemand",
                    "h",
                    {"units": "0", "nanos": -900_000_000},
                ),
            ],
            "error: Cloud Billing API: SKU 'T' (Nvidia L4 GPU running in Americas): "
            "pricingInfo[-1].pricingExpression.tieredRates[0].unitPrice {'units': '0', 'nanos': -900000000} "
            "is not a price (expected 0 to 1e+06 $ per hour)",
        ),
    ],
)
def test_refresh_gcp_malformed_sku_is_one_line_and_writes_nothing(
    cache_dir: Path, billing_pages: list[object], skus: list[object], message: str
) -> None:
    billing_pages.extend(skus)
    code, _, err = refresh_gcp("us-central1", "g2-standard-4")
    assert code == 1
    assert err.startswith(message), err
    assert err.count("\n") == 1 and "gcp.json" not in err
    assert not (cache_dir / "gcp.json").exists()


def test_refresh_gcp_good_skus_still_price(cache_dir: Path, billing_pages: list[object]) -> None:
    billing_pages.extend(_g2_skus())
    code, out, err = refresh_gcp("us-central1", "g2-standard-4")
    assert code == 0, err
    assert "updated 3 offers in 1 regions" in out


PLAN_SPEC = """
name: echo
placement: {clouds: [local], zones: [local-a, local-b, local-c]}
replica_policy: {min_replicas: 2, policy: spothedge}
run: {command: python3 server.py}
"""


@pytest.mark.parametrize("field", ["ondemand_price", "spot_price"])
def test_plan_refuses_an_absurd_catalog_price_instead_of_printing_infinity(
    cache_dir: Path, tmp_path: Path, field: str
) -> None:
    """Bug-bash: ondemand_price 1e308 was accepted; plan --json then printed Infinity and NaN."""
    data = json.loads(bundled_path("local").read_text())
    data["offers"][1][field] = 1e308
    cache_dir.mkdir()
    (cache_dir / "local.json").write_text(json.dumps(data))
    spec = tmp_path / "service.yaml"
    spec.write_text(PLAN_SPEC)
    code, out, err = run("plan", str(spec), "--state-dir", str(tmp_path / "state"), "--json")
    assert code == 1
    assert "Infinity" not in out and "NaN" not in out
    assert err.startswith("error: ") and err.count("\n") == 1  # plan names the spec field, then the file's
    assert err.endswith(
        f"{cache_dir / 'local.json'}: offers[1].{field}: expected a price <= 1e+06 $/h, got 1e+308\n"
    )


@pytest.mark.parametrize("option", ["--regions", "--instance-types"])
def test_refresh_with_an_empty_list_is_refused_not_taken_as_everything(cache_dir: Path, option: str) -> None:
    """`--regions ,` (or an unset shell variable) meant every region: a refresh of the world."""
    code, out, err = run("catalog", "refresh", "--cloud", "aws", option, " , ")
    assert code == 1 and out == ""
    assert f"Invalid value for '{option}': expected comma-separated names" in err
    assert len(err.strip().splitlines()) == 1
    assert not (cache_dir / "aws.json").exists()


def test_refresh_gcp_names_offers_whose_on_demand_price_it_could_not_take(
    cache_dir: Path, billing_pages: list[object]
) -> None:
    """Only spot SKUs answered: the spot prices are taken, and the on-demand ones, kept from
    before, are listed as unpriced, as a missing spot price is."""
    billing_pages.extend(
        [
            _gcp_sku(
                "Spot Preemptible G2 Instance Core running in Americas",
                "Preemptible",
                "h",
                {"nanos": 8_000_000},
            ),
            _gcp_sku(
                "Spot Preemptible G2 Instance Ram running in Americas",
                "Preemptible",
                "GiBy.h",
                {"nanos": 1_000_000},
            ),
            _gcp_sku(
                "Nvidia L4 GPU attached to Spot Preemptible VMs running in Americas",
                "Preemptible",
                "h",
                {"nanos": 200_000_000},
            ),
        ]
    )
    code, out, err = refresh_gcp("us-central1", "g2-standard-4")
    assert code == 0, err
    assert "g2-standard-4@us-central1-a (on-demand)" in out


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["table", "json"])
def test_a_reader_that_goes_away_ends_show_quietly_with_exit_0(json_flag: list[str], tmp_path: Path) -> None:
    """`skyhedge catalog show --cloud aws | head -1` failed the pipeline under `set -o pipefail`:
    exit 1 (rich's choice for a broken pipe, and click's for its own output) once the output
    outgrew the pipe's buffer, while the shorter `--json` form exited 0. Here the reader is gone
    before the first write, so every write meets the broken pipe."""
    import sys

    code, err = _with_reader_gone(
        [sys.executable, "-m", "skyhedge", "catalog", "show", "--cloud", "aws", *json_flag], tmp_path
    )
    assert code == 0, err
    assert err == ""


def _with_reader_gone(args: list[str], tmp_path: Path, *, stderr_too: bool = False) -> tuple[int, str]:
    """Run `args` with stdout (and stderr: `2>&1 | head`) a pipe whose reader is gone; (exit
    code, stderr)."""
    import os
    import subprocess

    read_end, write_end = os.pipe()
    os.close(read_end)
    err = tmp_path / "stderr"
    try:
        with open(err, "wb") as errfile:
            done = subprocess.run(
                args, stdout=write_end, stderr=write_end if stderr_too else errfile, timeout=60, check=False
            )
    finally:
        os.close(write_end)
    return done.returncode, err.read_text()


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["table", "json"])
def test_a_reader_gone_keeps_the_exit_status_the_command_decided(
    json_flag: list[str], tmp_path: Path
) -> None:
    """`plan --detailed-exitcode | head -c1` must still say "changes present" (2): a reader gone
    only silences the output. Before, it exited 0, which CI reads as "nothing to apply"."""
    import sys

    spec = tmp_path / "service.yaml"
    spec.write_text(
        "name: gone\nplacement:\n  clouds: [local]\n  zones: [local-a]\n"
        "run:\n  command: python3 -m http.server\n"
    )
    args = [sys.executable, "-m", "skyhedge", "plan", str(spec), "--state-dir", str(tmp_path / "st")]
    code, err = _with_reader_gone([*args, "--detailed-exitcode", *json_flag], tmp_path)
    assert (code, err) == (2, "")
    # an error said to a reader gone too (`2>&1 | head -1`): still a failure (it exited 0)
    bad = [sys.executable, "-m", "skyhedge", "catalog", "show", "--cloud", "nope", *json_flag]
    assert _with_reader_gone(bad, tmp_path, stderr_too=True) == (1, "")


def test_a_reader_gone_never_cuts_a_command_short(tmp_path: Path) -> None:
    """What `apply` and `watch` print goes through these consoles, between two rounds or two steps
    of a rolling update: a reader gone (`skyhedge apply ... | head -3`) silences them, and the
    command goes on to its own end and exit status. Before, the print raised SystemExit there
    (rich: exit 1; then exit 0, telling CI an apply it cut short had finished)."""
    import sys

    script = (
        "from skyhedge.cli._app import console, err_console\n"
        "import sys\n"
        "for n in range(2000):\n"
        "    console.print(f'round {n}: ' + 'x' * 60)\n"
        "err_console.print('finished')\n"
        "sys.exit(3)\n"
    )
    assert _with_reader_gone([sys.executable, "-c", script], tmp_path) == (3, "finished\n")


def test_a_broken_pipe_that_is_not_stdout_s_is_a_failure(tmp_path: Path) -> None:
    """EPIPE from a socket or a child's pipe is an error like any other, not a reader gone: it
    used to end the command with exit 0, silently (click's own handling of EPIPE: exit 1)."""
    import subprocess
    import sys

    script = (
        "from skyhedge.cli import main\n"
        "@main.command('boom')\n"
        "def boom():\n"
        "    raise BrokenPipeError(32, 'Broken pipe (a socket)')\n"
        "main(['boom'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
