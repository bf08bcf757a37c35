"""GCP prices from the Cloud Billing Catalog API: the catalog's own boundary to Google.

GCP does not price a machine type as one SKU: a VM costs (vCPUs x core SKU) + (GiB x RAM SKU)
+ (GPUs x GPU SKU), each SKU per region and per usage type (`OnDemand`, `Preemptible` = spot).
This module lists Compute Engine's SKUs (paged with `pageToken`), keeps the core/RAM SKUs of the
families the bundled catalog uses (n1, a2, a3, g2) and the GPU SKUs (T4, A100, H100 80GB, L4), and prices each
bundled offer from them. GCP sets spot prices per region, so every zone of a region gets the same.

HTTP and auth failures become `CloudError`, answers we cannot read become `CatalogError`, raised
`from` the original.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import requests
from google.auth.exceptions import DefaultCredentialsError, GoogleAuthError

from skyhedge.catalog.model import MAX_PRICE, CloudCatalog, Offer, is_price, read_price
from skyhedge.clouds.gcp import api_error_message
from skyhedge.errors import CatalogError, CloudError

COMPUTE_SERVICE = "6F81-5844-456A"
DEFAULT_ENDPOINT = "https://cloudbilling.googleapis.com"
ENDPOINT_ENV = "SKYHEDGE_GCP_BILLING_ENDPOINT"
SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
SOURCE = "gcp:cloudbilling.services.skus"
TIMEOUT_SECONDS = 60

ONDEMAND = "OnDemand"
SPOT = "Preemptible"

# Instance-type prefix -> the family words in the core/RAM SKU description.
FAMILIES = {"n1": "N1 Predefined", "a2": "A2", "a3": "A3", "g2": "G2"}
# Catalog accelerator name -> GPU name in the SKU description.
# (a2-highgpu carries the 40 GB A100, billed as plain "A100"; a3-highgpu the "H100 80GB", not the
# "H100 80GB Mega" of a3-megagpu.)
GPUS = {"T4": "T4", "A100": "A100", "H100": "H100 80GB", "L4": "L4"}

_CORE_RAM = re.compile(
    r"^(?:Spot Preemptible |Preemptible )?(?P<family>N1 Predefined|A2|A3|G2) Instance (?P<kind>Core|Ram)"
    r" running in .+$"
)
_GPU = re.compile(
    r"^(?:Spot Preemptible |Preemptible )?Nvidia (?:Tesla )?(?P<gpu>T4|A100|H100 80GB|L4) GPU"
    r"(?: attached to Spot Preemptible VMs)? running in .+$"
)
_UNITS = {"Core": "h", "Ram": "GiBy.h", "GPU": "h"}
_UNIT_WORDS = {"h": "hour", "GiBy.h": "GiB-hour"}


@dataclass(frozen=True)
class Rate:
    """One hourly unit price: per vCPU-hour, per GiB-hour or per GPU-hour, in USD."""

    component: str  # "core:<family>", "ram:<family>" or "gpu:<name>"
    usage: str  # ONDEMAND or SPOT
    region: str
    price: float


def endpoint() -> str:
    return os.environ.get(ENDPOINT_ENV, DEFAULT_ENDPOINT).rstrip("/")


def default_session() -> Any:
    """An `AuthorizedSession` with Application Default Credentials."""
    import google.auth
    from google.auth.transport.requests import AuthorizedSession

    try:
        credentials, _project = google.auth.default(scopes=list(SCOPES))
    except DefaultCredentialsError as exc:
        raise CloudError(
            f"no Google credentials ({exc}); run `gcloud auth application-default login` "
            "or set GOOGLE_APPLICATION_CREDENTIALS"
        ) from exc
    return AuthorizedSession(credentials)


def list_skus(session: Any, *, base_url: str | None = None, service: str = COMPUTE_SERVICE) -> Iterator[dict]:
    """Every SKU of `service`, following `nextPageToken` until it is empty."""
    url = f"{base_url or endpoint()}/v1/services/{service}/skus"
    token = ""
    pages = 0
    seen: set[str] = set()
    while True:
        params = {"currencyCode": "USD"}
        if token:
            params["pageToken"] = token
        try:
            response = session.get(url, params=params, timeout=TIMEOUT_SECONDS)
        except requests.RequestException as exc:
            raise CloudError(f"Cloud Billing API request failed: {exc}") from exc
        except GoogleAuthError as exc:  # token refresh failures surface on the request
            raise CloudError(f"Google credentials were refused: {exc}") from exc
        if response.status_code != 200:
            raise CloudError(
                f"Cloud Billing API answered HTTP {response.status_code}: {api_error_message(response)}"
            )
        try:
            body = response.json()
        except ValueError as exc:
            raise CatalogError(f"Cloud Billing API answered with something that is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise CatalogError("Cloud Billing API answer is not a JSON object")
        skus = body.get("skus", [])
        if not isinstance(skus, list):
            raise CatalogError("Cloud Billing API answer: `skus` is not a list")
        yield from skus
        pages += 1
        token = body.get("nextPageToken") or ""
        if not token:
            return
        if token in seen:  # the same page again: following it would never end
            raise CatalogError(f"Cloud Billing API answered page token {token!r} twice; the listing loops")
        seen.add(str(token))
        if pages > 10_000:  # a server repeating tokens forever must not hang a refresh
            raise CatalogError("Cloud Billing API kept returning nextPageToken after 10000 pages")


def unit_price(money: dict) -> float:
    """`{units: "1", nanos: 500000000}` -> 1.5 (units is an int64 sent as a string, nanos an int32).

    Both must be whole numbers: int() would silently truncate a `units` of 0.5 to a price of 0.
    ValueError otherwise (the caller names the SKU).
    """
    return _whole(money.get("units")) + _whole(money.get("nanos")) / 1e9


def _whole(value: object) -> int:
    """An absent field is 0 (proto3 JSON leaves out zeros); ints and integer strings are read as is."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"not a whole number: {value!r}")
    return int(value)


def _short(value: object) -> str:
    """repr() cut to one short line: an error quotes the bad value, not a whole page of JSON."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fail(where: str, path: str, expected: str, got: object) -> NoReturn:
    raise CatalogError(f"{where}: {path}: {expected}, got {_short(got)}")


def _optional(where: str, path: str, value: object, kind: type, expected: str) -> Any:
    """`value` when it is a non-empty `kind`; None when absent or empty (the SKU gives no price,
    skipped as always); CatalogError naming the field when it has another type (a broken answer)."""
    if value is None:
        return None
    if not isinstance(value, kind):
        _fail(where, path, expected, value)
    return value or None


def _component(description: object) -> tuple[str, str] | None:
    """(component, usage unit) of a core/RAM/GPU SKU we price, or None for every other SKU."""
    if not isinstance(description, str):
        return None
    if m := _CORE_RAM.match(description):
        kind = m.group("kind")
        return f"{kind.lower()}:{m.group('family')}", _UNITS[kind]
    if m := _GPU.match(description):
        return f"gpu:{m.group('gpu')}", _UNITS["GPU"]
    return None


def _tier_start(where: str, path: str, tier: object) -> float:
    """A tier's startUsageAmount (absent = 0), so the top tier can be found."""
    if not isinstance(tier, dict):
        _fail(where, path, "expected an object", tier)
    raw = tier.get("startUsageAmount") or 0
    try:
        start = math.nan if isinstance(raw, bool) else float(raw)
    except (TypeError, ValueError):
        start = math.nan
    if not 0 <= start < math.inf:  # NaN fails too
        _fail(where, f"{path}.startUsageAmount", "expected a number >= 0", raw)
    return start


def _top_tier(where: str, sku: dict, unit: str) -> tuple[str, dict] | None:
    """(field path, tier) of the highest-usage tier of the SKU's current price in `unit`, or None
    when the SKU has no such price (no pricingInfo, no tiers, another usage unit)."""
    infos = _optional(where, "pricingInfo", sku.get("pricingInfo"), list, "expected a list")
    if infos is None:
        return None
    path = "pricingInfo[-1]"
    info = _optional(where, path, infos[-1], dict, "expected an object") or {}
    path += ".pricingExpression"
    expression = _optional(where, path, info.get("pricingExpression"), dict, "expected an object")
    if expression is None or expression.get("usageUnit") != unit:
        return None
    path += ".tieredRates"
    tiers = _optional(where, path, expression.get("tieredRates"), list, "expected a list")
    if tiers is None:
        return None
    starts = [_tier_start(where, f"{path}[{i}]", tier) for i, tier in enumerate(tiers)]
    top = starts.index(max(starts))
    return f"{path}[{top}]", tiers[top]


def _tier_price(where: str, path: str, tier: dict, unit: str) -> float:
    """The tier's unitPrice in USD, checked here so a bad price blames the API answer, not the
    catalog file the refresh would have written (and never does)."""
    money = tier.get("unitPrice")
    if money is None:
        money = {}  # proto3 JSON leaves out a zero price
    if not isinstance(money, dict):
        _fail(where, f"{path}.unitPrice", "expected an object", money)
    return read_price(
        lambda: unit_price(money),
        lambda: CatalogError(
            f"{where}: {path}.unitPrice {_short(money)} is not a price "
            f"(expected 0 to {MAX_PRICE:g} $ per {_UNIT_WORDS.get(unit, unit)})"
        ),
    )


def _regions(where: str, sku: dict) -> list[str]:
    """serviceRegions; a string would otherwise be read as one region per character."""
    regions = sku.get("serviceRegions")
    if regions is None:
        return []
    if not isinstance(regions, list) or not all(isinstance(r, str) and r for r in regions):
        _fail(where, "serviceRegions", "expected a list of region names", regions)
    return regions


def sku_rates(sku: Any) -> list[Rate]:
    """The hourly rates one SKU contributes (one per service region), or [] if irrelevant.

    Compute Engine lists thousands of SKUs: one we never price is skipped whatever its shape, so an
    odd SKU elsewhere cannot stop a refresh. One we do price (its description names a core, RAM or
    GPU we use) must be readable: a field of the wrong type or a price that is not a price is one
    CatalogError naming the SKU and the field. An absent or empty field means the SKU gives no
    price and is skipped, as before.
    """
    if not isinstance(sku, dict):
        raise CatalogError(f"Cloud Billing API: expected a SKU object, got {_short(sku)}")
    found = _component(sku.get("description"))
    if found is None:
        return []
    component, unit = found
    where = f"Cloud Billing API: SKU {_short(sku.get('skuId', '?'))} ({' '.join(sku['description'].split())})"
    category = _optional(where, "category", sku.get("category"), dict, "expected an object") or {}
    usage = _optional(where, "category.usageType", category.get("usageType"), str, "expected a string")
    if usage not in (ONDEMAND, SPOT):
        return []
    top = _top_tier(where, sku, unit)
    if top is None:
        return []
    price = _tier_price(where, *top, unit)
    return [Rate(component, usage, region, price) for region in _regions(where, sku)]


def collect_rates(skus: Iterable[dict]) -> dict[tuple[str, str, str], float]:
    """(component, usage, region) -> price. Later SKUs for the same key do not override earlier ones."""
    rates: dict[tuple[str, str, str], float] = {}
    for sku in skus:
        for rate in sku_rates(sku):
            rates.setdefault((rate.component, rate.usage, rate.region), rate.price)
    return rates


@dataclass(frozen=True)
class RefreshResult:
    catalog: CloudCatalog
    updated: int
    unpriced: tuple[str, ...]
    regions: tuple[str, ...]


def price_offer(
    offer: Offer, catalog: CloudCatalog, rates: dict[tuple[str, str, str], float], usage: str
) -> float | None:
    """Hourly price of `offer`'s machine in its region from SKU rates, or None if a rate is missing."""
    itype = catalog.instance_types[offer.instance_type]
    family = FAMILIES.get(offer.instance_type.split("-", 1)[0])
    if family is None:
        return None
    parts = [("core:" + family, itype.vcpus), ("ram:" + family, itype.memory_gib)]
    if itype.accelerator:
        gpu = GPUS.get(itype.accelerator)
        if gpu is None:
            return None
        parts.append(("gpu:" + gpu, itype.accelerator_count))
    total = 0.0
    for component, amount in parts:
        rate = rates.get((component, usage, offer.region))
        if rate is None:
            return None
        total += rate * amount
    total = round(total, 5)
    if not is_price(total):  # each rate is capped, but vCPUs x core + GiB x RAM + GPUs x GPU need not be
        raise CatalogError(
            f"Cloud Billing API: {offer.instance_type} in {offer.region}: {usage} price {total} $/h "
            f"is not a price (expected 0 to {MAX_PRICE:g} $/h from its core, RAM and GPU SKUs)"
        )
    return total


def refresh_gcp(
    base: CloudCatalog,
    *,
    regions: Iterable[str] | None = None,
    instance_types: Iterable[str] | None = None,
    session: Any = None,
    base_url: str | None = None,
    now: dt.datetime | None = None,
) -> RefreshResult:
    """New catalog with on-demand and spot prices of the chosen offers recomputed from SKUs."""
    all_regions = base.regions()
    chosen_regions = sorted(set(regions) if regions else all_regions)
    for region in chosen_regions:
        if region not in all_regions:
            base.zones_in(region)  # CatalogError with a did-you-mean
    chosen_types = set(instance_types) if instance_types else set(base.instance_types)
    for itype in chosen_types:
        base.instance_type(itype)
    rates = collect_rates(list_skus(session or default_session(), base_url=base_url))
    stamp = (
        (now or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    offers: list[Offer] = []
    updated = 0
    unpriced: list[str] = []
    for offer in base.offers:
        if offer.region not in chosen_regions or offer.instance_type not in chosen_types:
            offers.append(offer)
            continue
        ondemand = price_offer(offer, base, rates, ONDEMAND)
        spot = price_offer(offer, base, rates, SPOT)
        if ondemand is None and spot is None:
            unpriced.append(f"{offer.instance_type}@{offer.zone}")
            offers.append(offer)
            continue
        changed = offer
        if ondemand is not None:
            changed = replace(
                changed, ondemand_price=ondemand, ondemand_taken_at=stamp, ondemand_source=SOURCE
            )
        else:
            unpriced.append(f"{offer.instance_type}@{offer.zone} (on-demand)")
        if spot is not None:
            changed = replace(changed, spot_price=spot, spot_taken_at=stamp, spot_source=SOURCE)
        else:
            unpriced.append(f"{offer.instance_type}@{offer.zone} (spot)")
        offers.append(changed)
        updated += 1
    return RefreshResult(
        catalog=replace(base, offers=tuple(offers)),
        updated=updated,
        unpriced=tuple(unpriced),
        regions=tuple(chosen_regions),
    )
