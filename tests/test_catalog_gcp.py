"""The GCP price reader against a local HTTP server answering in the Cloud Billing Catalog API's shape.

SKU prices below are test values (round numbers), not Google's: the test checks paging, parsing
and the vCPU x core + GiB x RAM + GPUs x GPU arithmetic, not the market.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession

from skyhedge.catalog import load_catalog
from skyhedge.catalog.gcp import (
    COMPUTE_SERVICE,
    ONDEMAND,
    SOURCE,
    collect_rates,
    list_skus,
    price_offer,
    refresh_gcp,
    sku_rates,
    unit_price,
)
from skyhedge.errors import CatalogError, CloudError


def money(price: float) -> dict:
    units = int(price)
    return {"currencyCode": "USD", "units": str(units), "nanos": round((price - units) * 1e9)}


def sku(
    description: str, usage: str, regions: list[str], price: float, unit: str = "h", **extra: object
) -> dict:
    return {
        "name": f"services/{COMPUTE_SERVICE}/skus/TEST-{abs(hash((description, usage))) % 10**8}",
        "skuId": "TEST",
        "description": description,
        "category": {
            "serviceDisplayName": "Compute Engine",
            "resourceFamily": "Compute",
            "resourceGroup": "GPU" if "GPU" in description else "CPU",
            "usageType": usage,
        },
        "serviceRegions": regions,
        "pricingInfo": [
            {
                "effectiveTime": "2024-01-01T00:00:00Z",
                "summary": "",
                "pricingExpression": {
                    "usageUnit": unit,
                    "displayQuantity": 1,
                    "tieredRates": [{"startUsageAmount": 0, "unitPrice": money(price)}],
                },
            }
        ],
        "serviceProviderName": "Google",
        **extra,
    }


US = ["us-central1", "us-east1", "us-west1"]
SKUS = [
    sku("G2 Instance Core running in Americas", "OnDemand", US, 0.02),
    sku("G2 Instance Ram running in Americas", "OnDemand", US, 0.002, unit="GiBy.h"),
    sku("Spot Preemptible G2 Instance Core running in Americas", "Preemptible", US, 0.01),
    sku("Spot Preemptible G2 Instance Ram running in Americas", "Preemptible", US, 0.001, unit="GiBy.h"),
    sku("Nvidia L4 GPU running in Americas", "OnDemand", US, 0.5),
    sku("Spot Preemptible Nvidia L4 GPU running in Americas", "Preemptible", US, 0.25),
    sku("N1 Predefined Instance Core running in Americas", "OnDemand", US, 0.03),
    sku("N1 Predefined Instance Ram running in Americas", "OnDemand", US, 0.004, unit="GiBy.h"),
    sku("Nvidia Tesla T4 GPU running in Americas", "OnDemand", US, 0.35),
    sku("A3 Instance Core running in Americas", "OnDemand", US, 0.03),
    sku("A3 Instance Ram running in Americas", "OnDemand", US, 0.003, unit="GiBy.h"),
    sku("Spot Preemptible A3 Instance Core running in Americas", "Preemptible", US, 0.012),
    sku("Spot Preemptible A3 Instance Ram running in Americas", "Preemptible", US, 0.0012, unit="GiBy.h"),
    sku("Nvidia H100 80GB GPU running in Americas", "OnDemand", US, 5.0),
    sku("Spot Preemptible Nvidia H100 80GB GPU running in Americas", "Preemptible", US, 2.0),
    # Noise the reader must skip: commitments, custom shapes, other GPUs, wrong units.
    sku("Commitment v1: G2 Cpu in Americas for 1 Year", "Commit1Yr", US, 0.001),
    sku("N1 Custom Instance Core running in Americas", "OnDemand", US, 9.0),
    sku("Nvidia Tesla A100 80GB GPU running in Americas", "OnDemand", US, 9.0),
    sku("Nvidia H100 80GB Mega GPU running in Americas", "OnDemand", US, 9.0),  # a3-megagpu's
    sku("DWS Defined Duration Nvidia H100 80GB GPU running in Americas", "OnDemand", US, 9.0),
    sku("Nvidia L4 GPU running in Americas", "OnDemand", ["europe-west4"], 0.6, unit="GiBy.mo"),
]


@dataclass
class FakeBilling:
    """Serves SKUS over `pages` pages; records every request's query."""

    skus: list[dict]
    pages: int = 3
    status: int = 200
    raw_body: bytes | None = None
    requests: list[dict[str, list[str]]] = field(default_factory=list)

    def page(self, token: str) -> dict:
        index = int(token or "0")
        size = -(-len(self.skus) // self.pages)
        chunk = self.skus[index * size : (index + 1) * size]
        nxt = str(index + 1) if (index + 1) * size < len(self.skus) else ""
        return {"skus": chunk, "nextPageToken": nxt}


@pytest.fixture
def billing() -> Iterator[tuple[FakeBilling, str]]:
    state = FakeBilling(skus=list(SKUS))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urlparse(self.path)
            query = parse_qs(url.query)
            state.requests.append(query)
            if url.path != f"/v1/services/{COMPUTE_SERVICE}/skus":
                self._send(404, json.dumps({"error": {"code": 404, "message": "no such service"}}).encode())
            elif state.raw_body is not None:
                self._send(state.status, state.raw_body)
            elif state.status != 200:
                body = {"error": {"code": state.status, "message": "The caller does not have permission"}}
                self._send(state.status, json.dumps(body).encode())
            else:
                token = query.get("pageToken", [""])[0]
                self._send(200, json.dumps(state.page(token)).encode())

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def session() -> Iterator[AuthorizedSession]:
    s = AuthorizedSession(AnonymousCredentials())
    yield s
    s.close()


def test_unit_price() -> None:
    assert unit_price({"units": "1", "nanos": 500_000_000}) == 1.5
    assert unit_price({"nanos": 35_000_000}) == pytest.approx(0.035)
    assert unit_price({}) == 0.0


def test_list_skus_follows_page_tokens(billing: tuple[FakeBilling, str], session: AuthorizedSession) -> None:
    state, url = billing
    got = list(list_skus(session, base_url=url))
    assert got == SKUS
    assert [q.get("pageToken", [""])[0] for q in state.requests] == ["", "1", "2"]
    assert all(q["currencyCode"] == ["USD"] for q in state.requests)


def test_a_listing_that_repeats_a_page_token_is_an_error_not_a_hang(
    billing: tuple[FakeBilling, str], session: AuthorizedSession
) -> None:
    state, url = billing
    state.raw_body = json.dumps({"skus": SKUS[:1], "nextPageToken": "again"}).encode()
    with pytest.raises(CatalogError, match="page token 'again' twice"):
        list(list_skus(session, base_url=url))
    assert len(state.requests) == 2


def test_endpoint_from_env(
    billing: tuple[FakeBilling, str], session: AuthorizedSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    _state, url = billing
    monkeypatch.setenv("SKYHEDGE_GCP_BILLING_ENDPOINT", url + "/")
    assert len(list(list_skus(session))) == len(SKUS)


def test_sku_parsing_skips_noise() -> None:
    rates = collect_rates(SKUS)
    assert rates[("core:G2", "OnDemand", "us-central1")] == pytest.approx(0.02)
    assert rates[("ram:G2", "Preemptible", "us-east1")] == pytest.approx(0.001)
    assert rates[("gpu:L4", "Preemptible", "us-west1")] == pytest.approx(0.25)
    assert rates[("gpu:T4", "OnDemand", "us-central1")] == pytest.approx(0.35)
    assert ("gpu:L4", "OnDemand", "europe-west4") not in rates  # wrong usage unit
    assert rates[("gpu:H100 80GB", "Preemptible", "us-east1")] == pytest.approx(2.0)
    assert all(price < 9.0 for price in rates.values())  # custom / A100 80GB / H100 Mega / DWS not taken
    assert not any(k[1] == "Commit1Yr" for k in rates)
    assert sku_rates({"description": "x"}) == []


def test_refresh_prices_offers(billing: tuple[FakeBilling, str], session: AuthorizedSession) -> None:
    _state, url = billing
    base = load_catalog("gcp")
    result = refresh_gcp(base, regions=["us-central1"], session=session, base_url=url)
    g2 = result.catalog.offer("g2-standard-4", "us-central1-a")
    assert g2 is not None
    # 4 vCPU, 16 GiB, 1 L4: on-demand 4*0.02 + 16*0.002 + 0.5 ; spot 4*0.01 + 16*0.001 + 0.25
    assert g2.ondemand_price == pytest.approx(0.612)
    assert g2.spot_price == pytest.approx(0.306)
    assert g2.spot_source == g2.ondemand_source == SOURCE
    n1 = result.catalog.offer("n1-standard-8", "us-central1-a")
    assert n1 is not None
    assert n1.ondemand_price == pytest.approx(8 * 0.03 + 30 * 0.004 + 0.35)
    base_n1 = base.offer("n1-standard-8", "us-central1-a")
    assert n1.spot_price == base_n1.spot_price  # type: ignore[union-attr]  # no spot N1/T4 SKU served
    assert n1.spot_source is None
    a3 = result.catalog.offer("a3-highgpu-8g", "us-central1-a")
    assert a3 is not None  # 208 vCPU, 1872 GiB, 8 H100 80GB
    assert a3.ondemand_price == pytest.approx(208 * 0.03 + 1872 * 0.003 + 8 * 5.0)
    assert a3.spot_price == pytest.approx(208 * 0.012 + 1872 * 0.0012 + 8 * 2.0)
    a2 = result.catalog.offer("a2-highgpu-1g", "us-central1-a")
    assert a2 == base.offer("a2-highgpu-1g", "us-central1-a")  # no A2/A100 SKUs served: unchanged
    assert "a2-highgpu-1g@us-central1-a" in result.unpriced
    other = [o for o in result.catalog.offers if o.region != "us-central1"]
    assert other == [o for o in base.offers if o.region != "us-central1"]
    assert result.regions == ("us-central1",)


def test_http_error_becomes_cloud_error(billing: tuple[FakeBilling, str], session: AuthorizedSession) -> None:
    state, url = billing
    state.status = 403
    with pytest.raises(CloudError, match="HTTP 403: The caller does not have permission"):
        list(list_skus(session, base_url=url))


def test_not_json_is_a_catalog_error(billing: tuple[FakeBilling, str], session: AuthorizedSession) -> None:
    state, url = billing
    state.raw_body = b"<html>oops</html>"
    with pytest.raises(CatalogError, match="not JSON"):
        list(list_skus(session, base_url=url))


def test_unreachable_server_is_a_cloud_error(session: AuthorizedSession) -> None:
    import socket

    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(CloudError, match="request failed") as info:
        list(list_skus(session, base_url=f"http://127.0.0.1:{port}"))
    assert info.value.__cause__ is not None


def test_unknown_region_is_named() -> None:
    with pytest.raises(CatalogError, match="unknown region 'us-central9'"):
        refresh_gcp(load_catalog("gcp"), regions=["us-central9"], session=object())


# --- malformed SKUs: one line naming the SKU and the field, never a traceback ---------------------

L4 = "Nvidia L4 GPU running in Americas"


def broken(path: str, value: object, base: dict | None = None) -> dict:
    """A copy of the on-demand L4 SKU (or `base`) with the dotted `path` set to `value`."""
    out = copy.deepcopy(base or sku(L4, "OnDemand", US, 0.5))
    node: object = out
    *parents, last = path.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]  # type: ignore[index]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value  # type: ignore[index]
    return out


MALFORMED = [
    (broken("category", "Compute"), r"category: expected an object, got 'Compute'"),
    (broken("category.usageType", 7), r"category.usageType: expected a string, got 7"),
    (broken("pricingInfo", {"a": 1}), r"pricingInfo: expected a list, got \{'a': 1\}"),
    (broken("pricingInfo.0", "x"), r"pricingInfo\[-1\]: expected an object, got 'x'"),
    (broken("pricingInfo.0.pricingExpression", []), r"pricingExpression: expected an object, got \[\]"),
    (broken("pricingInfo.0.pricingExpression.tieredRates", "0.5"), r"tieredRates: expected a list"),
    (broken("pricingInfo.0.pricingExpression.tieredRates.0", 3), r"tieredRates\[0\]: expected an object"),
    (
        broken("pricingInfo.0.pricingExpression.tieredRates.0.startUsageAmount", "lots"),
        r"tieredRates\[0\].startUsageAmount: expected a number >= 0, got 'lots'",
    ),
    (
        broken("pricingInfo.0.pricingExpression.tieredRates.0.startUsageAmount", float("nan")),
        r"startUsageAmount: expected a number >= 0, got nan",
    ),
    (
        broken("pricingInfo.0.pricingExpression.tieredRates.0.unitPrice", "0.5"),
        r"unitPrice: expected an object",
    ),
    (
        broken(
            "pricingInfo.0.pricingExpression.tieredRates.0.unitPrice", {"units": "0", "nanos": -900000000}
        ),
        r"unitPrice \{'units': '0', 'nanos': -900000000\} is not a price",
    ),
    (
        broken("pricingInfo.0.pricingExpression.tieredRates.0.unitPrice", {"units": 0.5}),
        r"unitPrice \{'units': 0.5\} is not a price",
    ),
    (
        broken("pricingInfo.0.pricingExpression.tieredRates.0.unitPrice", {"units": "1000001"}),
        r"unitPrice \{'units': '1000001'\} is not a price",
    ),
    (broken("serviceRegions", "us-central1"), r"serviceRegions: expected a list of region names"),
    (broken("serviceRegions", ["us-central1", None]), r"serviceRegions: expected a list of region names"),
]


@pytest.mark.parametrize(("bad", "message"), MALFORMED)
def test_a_malformed_sku_we_use_is_one_line_naming_sku_and_field(bad: dict, message: str) -> None:
    with pytest.raises(CatalogError, match=message) as info:
        collect_rates([*SKUS[:4], bad, *SKUS[4:]])
    text = str(info.value)
    assert text.startswith(f"Cloud Billing API: SKU 'TEST' ({L4}): ")
    assert "\n" not in text


def test_a_sku_that_is_not_an_object_is_one_line() -> None:
    with pytest.raises(CatalogError, match=r"^Cloud Billing API: expected a SKU object, got 'x'$"):
        collect_rates(["x", *SKUS])  # type: ignore[list-item]


def test_skus_we_do_not_use_are_skipped_whatever_their_shape() -> None:
    """Compute Engine lists thousands of SKUs; an odd one we never price must not stop a refresh."""
    noise = [
        {"description": "Cloud SQL for MySQL: Zonal - vCPU", "category": "x", "pricingInfo": {}},
        {"description": 7, "category": {"usageType": "OnDemand"}},
        {"skuId": "no description"},
        broken(
            "category.usageType",
            "Commit1Yr",
            sku("G2 Instance Core running in Americas", "OnDemand", US, 1.0),
        ),
    ]
    assert all(sku_rates(n) == [] for n in noise)
    assert collect_rates([*noise, *SKUS]) == collect_rates(SKUS)


def test_missing_price_fields_are_still_skipped() -> None:
    """An absent or empty pricingInfo / tieredRates is a SKU without a price, as before (not malformed)."""
    for path, value in [
        ("pricingInfo", []),
        ("pricingInfo", None),
        ("pricingInfo.0.pricingExpression.tieredRates", []),
        ("category", None),
    ]:
        assert sku_rates(broken(path, value)) == [], path


def test_the_top_tier_wins() -> None:
    tiered = broken(
        "pricingInfo.0.pricingExpression.tieredRates",
        [
            {"startUsageAmount": 0, "unitPrice": money(0.9)},
            {"startUsageAmount": "100", "unitPrice": money(0.4)},
            {"unitPrice": money(0.7)},
        ],
    )
    assert [r.price for r in sku_rates(tiered)] == [pytest.approx(0.4)] * len(US)


def test_refresh_with_a_malformed_sku_is_a_catalog_error(
    billing: tuple[FakeBilling, str], session: AuthorizedSession
) -> None:
    state, url = billing
    state.skus = [*SKUS, broken("pricingInfo", {"a": 1})]
    with pytest.raises(CatalogError, match=r"SKU 'TEST' \(Nvidia L4 GPU running in Americas\): pricingInfo"):
        refresh_gcp(load_catalog("gcp"), regions=["us-central1"], session=session, base_url=url)


def test_a_computed_price_above_the_cap_names_the_offer() -> None:
    """Each rate may be sane while vCPUs x core + GiB x RAM is not: checked before the file is."""
    base = load_catalog("gcp")
    offer = base.offer("g2-standard-4", "us-central1-a")
    assert offer is not None
    rates = collect_rates(
        [
            sku("G2 Instance Core running in Americas", "OnDemand", US, 1_000_000.0),
            sku("G2 Instance Ram running in Americas", "OnDemand", US, 0.002, unit="GiBy.h"),
            sku(L4, "OnDemand", US, 0.5),
        ]
    )
    with pytest.raises(CatalogError) as info:
        price_offer(offer, base, rates, ONDEMAND)
    assert str(info.value).startswith(
        "Cloud Billing API: g2-standard-4 in us-central1: OnDemand price 4000000.532 $/h is not a price"
    )
