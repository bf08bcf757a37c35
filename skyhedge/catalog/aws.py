"""AWS spot prices from EC2 `DescribeSpotPriceHistory`: the catalog's own boundary to AWS.

The bundled catalog keys AWS zones by zone ID (`use1-az1`) because zone names (`us-east-1a`) are
shuffled per account; the API answers with names, so each region's names are mapped to IDs with
`DescribeAvailabilityZones` before prices are merged. Every botocore failure becomes a
`CloudError` (API refused) or `CatalogError` (nothing usable came back), raised `from` the original.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from skyhedge.catalog.model import MAX_PRICE, CloudCatalog, Offer, read_price
from skyhedge.errors import CatalogError, CloudError

PRODUCT = "Linux/UNIX"
SOURCE = "aws:ec2.describe_spot_price_history"


@dataclass(frozen=True)
class SpotQuote:
    """The newest spot price seen for one instance type in one zone (zone as the API names it)."""

    instance_type: str
    zone: str
    price: float
    timestamp: dt.datetime


def as_datetime(value: Any) -> dt.datetime:
    """botocore parses timestamps to aware datetimes; raw JSON (tests, replays) gives ISO strings."""
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    text = str(value).replace("Z", "+00:00")
    parsed = dt.datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def spot_price(item: Mapping[str, Any]) -> float:
    """The record's SpotPrice as a number, checked here so a bad price blames AWS's answer.

    Left to the catalog validator, "NaN" or "-1" would be reported against the cache file that the
    refresh never wrote; "1e308" would pass as a number and overflow plan costs to Infinity.
    """
    text = item["SpotPrice"]
    return read_price(
        lambda: float(text),
        lambda: CatalogError(
            f"AWS DescribeSpotPriceHistory: {item['InstanceType']} in {item['AvailabilityZone']}: "
            f"SpotPrice {text!r} is not a price (expected 0 to {MAX_PRICE:g} $/h)"
        ),
    )


def read_spot_prices(
    client: Any,
    instance_types: Iterable[str],
    *,
    start_time: dt.datetime | None = None,
    product: str = PRODUCT,
) -> dict[tuple[str, str], SpotQuote]:
    """Page through the spot price history; per (instance type, zone) the newest price wins.

    `client` is a boto3 EC2 client for one region. Records for other products are ignored even
    if the API returns them (the filter is also sent, so normally there are none).
    """
    params: dict[str, Any] = {"InstanceTypes": sorted(set(instance_types)), "ProductDescriptions": [product]}
    if start_time is not None:
        params["StartTime"] = start_time
    newest: dict[tuple[str, str], SpotQuote] = {}
    try:
        for page in client.get_paginator("describe_spot_price_history").paginate(**params):
            for item in page.get("SpotPriceHistory", []):
                if item.get("ProductDescription", product) != product:
                    continue
                quote = SpotQuote(
                    instance_type=item["InstanceType"],
                    zone=item["AvailabilityZone"],
                    price=spot_price(item),
                    timestamp=as_datetime(item["Timestamp"]),
                )
                key = (quote.instance_type, quote.zone)
                if key not in newest or quote.timestamp > newest[key].timestamp:
                    newest[key] = quote
    except (BotoCoreError, ClientError) as exc:
        raise CloudError(f"AWS DescribeSpotPriceHistory failed: {exc}") from exc
    except (KeyError, ValueError, TypeError) as exc:
        raise CatalogError(f"AWS spot price history: malformed record: {exc!r}") from exc
    return newest


def zone_ids(client: Any) -> dict[str, str]:
    """Zone name -> zone ID for the client's region (`us-east-1a` -> `use1-az4`, account-specific)."""
    try:
        answer = client.describe_availability_zones(AllAvailabilityZones=True)
    except (BotoCoreError, ClientError) as exc:
        raise CloudError(f"AWS DescribeAvailabilityZones failed: {exc}") from exc
    pairs = (_zone_name_and_id(z) for z in answer.get("AvailabilityZones", []))
    return dict(pair for pair in pairs if pair is not None)


def _zone_name_and_id(zone: Any) -> tuple[str, str] | None:
    """(ZoneName, ZoneId) of one entry, or None when either is missing: that zone cannot be mapped.

    Skipped, not an error, as entries without a ZoneId always were: prices quoted for an unmapped
    zone name match no catalog zone, so those offers are listed as unpriced and keep their price.
    """
    if not isinstance(zone, Mapping):
        return None
    name, zone_id = zone.get("ZoneName"), zone.get("ZoneId")
    if not isinstance(name, str) or not name or not isinstance(zone_id, str) or not zone_id:
        return None
    return name, zone_id


@dataclass(frozen=True)
class RefreshResult:
    """What a refresh changed, for the CLI to report."""

    catalog: CloudCatalog
    updated: int
    unpriced: tuple[str, ...]  # "type@zone" offers for which the API had no price
    regions: tuple[str, ...]


def merge_spot_quotes(
    base: CloudCatalog,
    quotes: Mapping[tuple[str, str], SpotQuote],
    names_to_ids: Mapping[str, str],
    *,
    region: str,
    instance_types: Iterable[str],
) -> tuple[list[Offer], int, list[str]]:
    """Offers of `region` with spot prices replaced by `quotes`; on-demand prices are kept."""
    wanted = set(instance_types)
    by_id: dict[tuple[str, str], SpotQuote] = {}
    for (itype, zone_name), quote in quotes.items():
        by_id[(itype, names_to_ids.get(zone_name, zone_name))] = quote
    out: list[Offer] = []
    updated = 0
    unpriced: list[str] = []
    for offer in base.offers:
        if offer.region != region or offer.instance_type not in wanted:
            out.append(offer)
            continue
        quote = by_id.get((offer.instance_type, offer.zone))
        if quote is None:
            unpriced.append(f"{offer.instance_type}@{offer.zone}")
            out.append(offer)
            continue
        updated += 1
        out.append(
            replace(
                offer,
                spot_price=quote.price,
                spot_taken_at=quote.timestamp.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                spot_source=SOURCE,
            )
        )
    return out, updated, unpriced


def refresh_aws(
    base: CloudCatalog,
    *,
    regions: Iterable[str] | None = None,
    instance_types: Iterable[str] | None = None,
    client_factory: Any = None,
    now: dt.datetime | None = None,
    lookback: dt.timedelta = dt.timedelta(hours=3),
) -> RefreshResult:
    """New catalog with current spot prices for `regions` x `instance_types` (default: all in `base`).

    `client_factory(region)` returns an EC2 client (default: boto3's, with the usual credential
    chain); tests pass clients wired to botocore's Stubber.
    """
    all_regions = base.regions()
    chosen_regions = sorted(set(regions) if regions else all_regions)
    for region in chosen_regions:
        if region not in all_regions:
            base.zones_in(region)  # raises CatalogError with a did-you-mean
    chosen_types = sorted(set(instance_types) if instance_types else base.instance_types)
    for itype in chosen_types:
        base.instance_type(itype)
    if client_factory is None:
        client_factory = _boto3_client_factory()
    start = (now or dt.datetime.now(dt.timezone.utc)) - lookback
    offers = list(base.offers)
    updated = 0
    unpriced: list[str] = []
    for region in chosen_regions:
        types_here = sorted({o.instance_type for o in base.offers if o.region == region} & set(chosen_types))
        if not types_here:
            continue
        client = client_factory(region)
        names = zone_ids(client)
        quotes = read_spot_prices(client, types_here, start_time=start)
        current = replace(base, offers=tuple(offers))
        merged, n, missing = merge_spot_quotes(
            current, quotes, names, region=region, instance_types=types_here
        )
        offers = merged
        updated += n
        unpriced.extend(missing)
    catalog = replace(base, offers=tuple(offers))
    return RefreshResult(
        catalog=catalog, updated=updated, unpriced=tuple(unpriced), regions=tuple(chosen_regions)
    )


def _boto3_client_factory() -> Any:
    """EC2 clients with bounded waits, as the watcher's (`clouds.aws.events`): with botocore's
    defaults (60 s to connect, 60 s per read, legacy retries) an endpoint that accepts and never
    answers held `catalog refresh` for minutes per region."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=30, retries={"mode": "standard", "max_attempts": 3})

    def factory(region: str) -> Any:
        try:
            return boto3.client("ec2", region_name=region, config=config)
        except (BotoCoreError, ClientError) as exc:
            raise CloudError(f"cannot create an EC2 client for {region}: {exc}") from exc

    return factory
