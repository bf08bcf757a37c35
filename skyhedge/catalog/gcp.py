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
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import requests
from google.auth.exceptions import DefaultCredentialsError, GoogleAuthError

from skyhedge.catalog.model import CloudCatalog, Offer
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
        if pages > 10_000:  # a server repeating tokens forever must not hang a refresh
            raise CatalogError("Cloud Billing API kept returning nextPageToken after 10000 pages")


def unit_price(money: dict) -> float:
    """`{units: "1", nanos: 500000000}` -> 1.5 (units is an int64 sent as a string)."""
    return int(money.get("units") or 0) + int(money.get("nanos") or 0) / 1e9


def sku_rates(sku: dict) -> list[Rate]:
    """The hourly rates one SKU contributes (one per service region), or [] if irrelevant."""
    category = sku.get("category") or {}
    usage = category.get("usageType")
    if usage not in (ONDEMAND, SPOT):
        return []
    description = sku.get("description") or ""
    if m := _CORE_RAM.match(description):
        kind = m.group("kind")
        component = f"{kind.lower()}:{m.group('family')}"
        unit = _UNITS[kind]
    elif m := _GPU.match(description):
        component = f"gpu:{m.group('gpu')}"
        unit = _UNITS["GPU"]
    else:
        return []
    infos = sku.get("pricingInfo") or []
    if not infos:
        return []
    expression = (infos[-1] or {}).get("pricingExpression") or {}
    if expression.get("usageUnit") != unit:
        return []
    tiers = expression.get("tieredRates") or []
    if not tiers:
        return []
    top = max(tiers, key=lambda t: float(t.get("startUsageAmount") or 0))
    try:
        price = unit_price(top.get("unitPrice") or {})
    except (TypeError, ValueError) as exc:
        raise CatalogError(f"SKU {sku.get('skuId', '?')}: unreadable unitPrice: {exc}") from exc
    return [Rate(component, usage, region, price) for region in sku.get("serviceRegions") or []]


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
    return round(total, 5)


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
