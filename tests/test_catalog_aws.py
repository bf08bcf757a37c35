"""The AWS spot price reader, replaying REAL DescribeSpotPriceHistory responses through botocore's Stubber.

The responses live in ../shared/prices/aws-spot-history-2020/ (2020 data, used only as API shapes
and values to replay, never shipped as prices). The zone name -> zone ID table below is a test
fixture: the real mapping differs per AWS account, which is why the catalog keys zones by ID.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import botocore.session
import pytest
from botocore.exceptions import ClientError
from botocore.stub import ANY, Stubber

from skyhedge.catalog import clear_cache, load_catalog
from skyhedge.catalog.aws import SOURCE, read_spot_prices, refresh_aws, zone_ids
from skyhedge.errors import CatalogError, CloudError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HISTORY = SHARED / "prices" / "aws-spot-history-2020"

pytestmark = pytest.mark.skipif(not HISTORY.is_dir(), reason="../shared/prices is not available")

# Test fixture, not AWS's answer for any real account.
US_EAST_1_ZONES = {
    "us-east-1a": "use1-az6",
    "us-east-1b": "use1-az1",
    "us-east-1c": "use1-az2",
    "us-east-1d": "use1-az4",
    "us-east-1e": "use1-az3",
    "us-east-1f": "use1-az5",
}
NOW = dt.datetime(2020, 3, 24, tzinfo=dt.timezone.utc)


def real(name: str) -> dict:
    return json.loads((HISTORY / name).read_text())


def newest_by_zone(*responses: dict) -> dict[tuple[str, str], tuple[str, float]]:
    """The oracle, computed independently: max Timestamp per (type, zone), ISO strings compare."""
    best: dict[tuple[str, str], tuple[str, float]] = {}
    for response in responses:
        for item in response["SpotPriceHistory"]:
            key = (item["InstanceType"], item["AvailabilityZone"])
            if key not in best or item["Timestamp"] > best[key][0]:
                best[key] = (item["Timestamp"], float(item["SpotPrice"]))
    return best


@pytest.fixture
def ec2() -> Iterator[tuple[object, Stubber]]:
    client = botocore.session.get_session().create_client(
        "ec2", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    with Stubber(client) as stubber:
        yield client, stubber
    client.close()


def history_params(types: list[str], **extra: object) -> dict:
    return {"InstanceTypes": types, "ProductDescriptions": ["Linux/UNIX"], "StartTime": ANY, **extra}


def test_single_page_newest_price_wins(ec2: tuple[object, Stubber]) -> None:
    client, stubber = ec2
    response = real("us-east-1/2020-02-27.p3.2xlarge.json")
    assert len(response["SpotPriceHistory"]) > 4  # several records per zone: the test can fail
    stubber.add_response("describe_spot_price_history", response, history_params(["p3.2xlarge"]))
    quotes = read_spot_prices(client, ["p3.2xlarge"], start_time=NOW)
    stubber.assert_no_pending_responses()
    expected = newest_by_zone(response)
    assert {k: q.price for k, q in quotes.items()} == {k: v[1] for k, v in expected.items()}
    assert {q.zone for q in quotes.values()} == {"us-east-1b", "us-east-1c", "us-east-1d", "us-east-1f"}
    for key, quote in quotes.items():
        assert quote.timestamp == dt.datetime.fromisoformat(expected[key][0].replace("Z", "+00:00"))


def test_paginated_response_follows_next_token(ec2: tuple[object, Stubber]) -> None:
    client, stubber = ec2
    first = real("us-east-1/p2.xlarge.json")  # the one real response that carries a NextToken
    second = real("us-east-1/2020-03-23.p2.xlarge.json")
    assert first["NextToken"] and not second["NextToken"]
    stubber.add_response("describe_spot_price_history", first, history_params(["p2.xlarge"]))
    stubber.add_response(
        "describe_spot_price_history", second, history_params(["p2.xlarge"], NextToken=first["NextToken"])
    )
    quotes = read_spot_prices(client, ["p2.xlarge"], start_time=NOW)
    stubber.assert_no_pending_responses()  # both pages were asked for
    expected = newest_by_zone(first, second)
    assert {k: q.price for k, q in quotes.items()} == {k: v[1] for k, v in expected.items()}
    # The second page is newer for every zone it lists, so it must have won there.
    second_only = newest_by_zone(second)
    for key, (_, price) in second_only.items():
        assert quotes[key].price == price


def test_other_products_are_ignored(ec2: tuple[object, Stubber]) -> None:
    client, stubber = ec2
    response = real("us-east-1/2020-02-27.p3.2xlarge.json")
    windows = dict(response["SpotPriceHistory"][0], ProductDescription="Windows", SpotPrice="99.0")
    windows["Timestamp"] = "2020-03-01T00:00:00.000Z"  # newest of all, but the wrong product
    mixed = {"SpotPriceHistory": [windows, *response["SpotPriceHistory"]], "NextToken": ""}
    stubber.add_response("describe_spot_price_history", mixed, history_params(["p3.2xlarge"]))
    quotes = read_spot_prices(client, ["p3.2xlarge"], start_time=NOW)
    assert all(q.price != 99.0 for q in quotes.values())


def test_client_error_becomes_cloud_error(ec2: tuple[object, Stubber]) -> None:
    client, stubber = ec2
    stubber.add_client_error(
        "describe_spot_price_history", service_error_code="UnauthorizedOperation", http_status_code=403
    )
    with pytest.raises(CloudError, match="DescribeSpotPriceHistory failed") as info:
        read_spot_prices(client, ["p3.2xlarge"], start_time=NOW)
    assert isinstance(info.value.__cause__, ClientError)


def test_malformed_record_is_a_catalog_error(ec2: tuple[object, Stubber]) -> None:
    client, stubber = ec2
    item = dict(real("us-east-1/2020-02-27.p3.2xlarge.json")["SpotPriceHistory"][0])
    del item["InstanceType"]
    stubber.add_response(
        "describe_spot_price_history", {"SpotPriceHistory": [item]}, history_params(["p3.2xlarge"])
    )
    with pytest.raises(CatalogError, match="malformed record"):
        read_spot_prices(client, ["p3.2xlarge"], start_time=NOW)


@pytest.mark.parametrize("price", ["n/a", "NaN", "Infinity", "-inf", "-1.0", "1e308", "1000000.01"])
def test_a_spot_price_that_is_not_a_price_names_the_record(ec2: tuple[object, Stubber], price: str) -> None:
    """Checked where the API answer is read, so the error blames AWS, not the cache file never written."""
    client, stubber = ec2
    good = real("us-east-1/2020-02-27.p3.2xlarge.json")["SpotPriceHistory"][0]
    item = dict(good, AvailabilityZone="us-east-1b", SpotPrice=price)
    stubber.add_response(
        "describe_spot_price_history", {"SpotPriceHistory": [good, item]}, history_params(["p3.2xlarge"])
    )
    with pytest.raises(CatalogError) as info:
        read_spot_prices(client, ["p3.2xlarge"], start_time=NOW)
    assert str(info.value).startswith(
        f"AWS DescribeSpotPriceHistory: p3.2xlarge in us-east-1b: SpotPrice {price!r} is not a price"
    )
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("price", ["0", "0.000001", "1000000"])
def test_spot_prices_from_zero_to_the_cap_are_taken(ec2: tuple[object, Stubber], price: str) -> None:
    client, stubber = ec2
    item = dict(real("us-east-1/2020-02-27.p3.2xlarge.json")["SpotPriceHistory"][0], SpotPrice=price)
    stubber.add_response(
        "describe_spot_price_history", {"SpotPriceHistory": [item]}, history_params(["p3.2xlarge"])
    )
    quotes = read_spot_prices(client, ["p3.2xlarge"], start_time=NOW)
    assert [q.price for q in quotes.values()] == [float(price)]


def zones_response() -> dict:
    return {
        "AvailabilityZones": [
            {"ZoneName": name, "ZoneId": zid, "RegionName": "us-east-1", "State": "available"}
            for name, zid in US_EAST_1_ZONES.items()
        ]
    }


def test_zone_ids(ec2: tuple[object, Stubber]) -> None:
    client, stubber = ec2
    stubber.add_response("describe_availability_zones", zones_response(), {"AllAvailabilityZones": True})
    assert zone_ids(client) == US_EAST_1_ZONES


def test_zone_ids_skips_entries_without_a_name_or_an_id(ec2: tuple[object, Stubber]) -> None:
    """Like an entry without ZoneId, one without ZoneName cannot be mapped: skipped, not a KeyError."""
    client, stubber = ec2
    answer = zones_response()
    answer["AvailabilityZones"] += [
        {"ZoneId": "use1-az9"},
        {"ZoneName": "us-east-1z"},
        {"State": "available"},
    ]
    stubber.add_response("describe_availability_zones", answer, {"AllAvailabilityZones": True})
    assert zone_ids(client) == US_EAST_1_ZONES


def test_refresh_updates_spot_keeps_ondemand(
    ec2: tuple[object, Stubber], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SKYHEDGE_CATALOG_DIR", str(tmp_path))
    clear_cache()
    client, stubber = ec2
    response = real("us-east-1/2020-02-27.p3.2xlarge.json")
    stubber.add_response("describe_availability_zones", zones_response(), {"AllAvailabilityZones": True})
    stubber.add_response("describe_spot_price_history", response, history_params(["p3.2xlarge"]))
    base = load_catalog("aws")
    result = refresh_aws(
        base,
        regions=["us-east-1"],
        instance_types=["p3.2xlarge"],
        client_factory=lambda region: client,
        now=NOW,
    )
    stubber.assert_no_pending_responses()
    expected = newest_by_zone(response)
    by_zone = {o.zone: o for o in result.catalog.offers_for("p3.2xlarge") if o.region == "us-east-1"}
    for (_, zone_name), (stamp, price) in expected.items():
        offer = by_zone[US_EAST_1_ZONES[zone_name]]
        assert offer.spot_price == price
        assert offer.spot_source == SOURCE
        assert offer.spot_taken_at == stamp.replace(".000Z", "Z")
        assert offer.ondemand_price == base.offer("p3.2xlarge", offer.zone).ondemand_price  # type: ignore[union-attr]
    assert result.updated == len(expected) == 4
    assert sorted(result.unpriced) == ["p3.2xlarge@use1-az3", "p3.2xlarge@use1-az6"]
    untouched = [
        o for o in result.catalog.offers if not (o.region == "us-east-1" and o.instance_type == "p3.2xlarge")
    ]
    assert untouched == [
        o for o in base.offers if not (o.region == "us-east-1" and o.instance_type == "p3.2xlarge")
    ]
    clear_cache()


def test_refresh_rejects_unknown_region_and_type() -> None:
    base = load_catalog("aws")
    with pytest.raises(CatalogError, match="unknown region 'us-east-7'"):
        refresh_aws(base, regions=["us-east-7"], client_factory=lambda region: None)
    with pytest.raises(CatalogError, match="unknown instance type 'g5.huge'"):
        refresh_aws(base, instance_types=["g5.huge"], client_factory=lambda region: None)


def test_a_refresh_asks_ec2_with_bounded_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """An EC2 endpoint that accepts and never answers must not hold `catalog refresh` for
    botocore's defaults (60 s per read, legacy retries) in every region: 5 s to connect, 30 s
    per read, 3 retries in standard mode."""
    from skyhedge.catalog.aws import _boto3_client_factory

    for name, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}.items():
        monkeypatch.setenv(name, value)
    config = _boto3_client_factory()("us-east-1").meta.config
    assert (config.connect_timeout, config.read_timeout) == (5, 30)
    assert config.retries["mode"] == "standard" and config.retries["total_max_attempts"] == 4
