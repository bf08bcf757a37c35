"""The catalog's values: instance types, per-zone offers and one cloud's catalog.

Frozen so a loaded catalog can be shared by the planner, the controller and the simulator without
anyone changing prices under another's feet. Lookups that name something unknown raise
`CatalogError` naming it, because an unknown zone or instance type in a spec is a user error.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from skyhedge.errors import CatalogError

#: The largest hourly price (USD) the catalog holds. Dollars must stay finite: a price like 1e308
#: passes "a number >= 0" but overflows plan costs to Infinity (and savings to NaN). The simulator
#: has its own cap of the same value; the catalog does not import the simulator.
MAX_PRICE = 1_000_000.0


def is_price(value: float) -> bool:
    """A finite hourly price in [0, MAX_PRICE]; NaN fails the comparison too."""
    return 0.0 <= value <= MAX_PRICE


def read_price(parse: Callable[[], float], refuse: Callable[[], CatalogError]) -> float:
    """`parse()` as a price, or `refuse()` raised: an API answer that does not parse, or parses to
    something no price is (NaN, negative, above MAX_PRICE), blames the answer, not the cache."""
    try:
        price = parse()
    except (TypeError, ValueError):
        price = math.nan
    if not is_price(price):
        raise refuse()
    return price


@dataclass(frozen=True)
class InstanceType:
    """A machine shape. `accelerator` is None for CPU-only types (and the local cloud)."""

    name: str
    accelerator: str | None
    accelerator_count: int
    vcpus: float
    memory_gib: float


@dataclass(frozen=True)
class Offer:
    """One instance type in one zone, with hourly prices in USD.

    `spot_price` is None where spot is not sold. The `*_taken_at`/`*_source` fields are set when that
    price came from somewhere other than the catalog's own `source`/`taken_at` (e.g. a refresh), so
    every price can say when and where it was taken.
    """

    instance_type: str
    region: str
    zone: str
    ondemand_price: float
    spot_price: float | None
    spot_taken_at: str | None = None
    spot_source: str | None = None
    ondemand_taken_at: str | None = None
    ondemand_source: str | None = None


def did_you_mean(name: str, choices: object) -> str:
    """A ` (did you mean 'x'?)` suffix, or '' when nothing is close."""
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=1)  # type: ignore[union-attr]
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class CloudCatalog:
    """The zones, instance types and prices of one cloud, and where the prices came from."""

    cloud: str
    source: str
    taken_at: str
    instance_types: dict[str, InstanceType]
    offers: tuple[Offer, ...]
    path: str | None = field(default=None, compare=False)
    # Documented optional top-level keys kept verbatim (`sources`, `notes`), so refreshes keep them.
    extra: dict[str, object] = field(default_factory=dict, compare=False)

    def __hash__(self) -> int:  # dict field: hash by identity-ish content that is hashable
        return hash((self.cloud, self.source, self.taken_at, self.offers))

    def zones(self) -> set[str]:
        return {o.zone for o in self.offers}

    def regions(self) -> set[str]:
        return {o.region for o in self.offers}

    def region_of(self, zone: str) -> str:
        """The region holding `zone`; CatalogError if the cloud has no such zone."""
        for offer in self.offers:
            if offer.zone == zone:
                return offer.region
        raise CatalogError(
            f"unknown zone {zone!r} for cloud {self.cloud!r}{did_you_mean(zone, self.zones())}"
        )

    def zones_in(self, region: str) -> set[str]:
        zones = {o.zone for o in self.offers if o.region == region}
        if not zones:
            raise CatalogError(
                f"unknown region {region!r} for cloud {self.cloud!r}{did_you_mean(region, self.regions())}"
            )
        return zones

    def instance_type(self, name: str) -> InstanceType:
        """The named instance type; CatalogError with a did-you-mean if unknown."""
        try:
            return self.instance_types[name]
        except KeyError:
            raise CatalogError(
                f"unknown instance type {name!r} for cloud {self.cloud!r}"
                f"{did_you_mean(name, self.instance_types)}"
            ) from None

    def offers_for(self, instance_type: str) -> list[Offer]:
        """Every zone offering `instance_type`, ordered by (region, zone)."""
        self.instance_type(instance_type)
        return sorted(
            (o for o in self.offers if o.instance_type == instance_type), key=lambda o: (o.region, o.zone)
        )

    def offer(self, instance_type: str, zone: str) -> Offer | None:
        """The offer of `instance_type` in `zone`, or None if that zone does not sell it."""
        for o in self.offers:
            if o.instance_type == instance_type and o.zone == zone:
                return o
        return None

    def instance_types_for(self, accelerator: str, count: int) -> list[str]:
        """Names of the types carrying exactly `count` x `accelerator`, cheapest on-demand first.

        The accelerator name matches case-insensitively ('a10g' finds 'A10G'). Types with no
        offer at all sort last; ties break by name so the answer is stable.
        """
        wanted = accelerator.casefold()
        cheapest: dict[str, float] = {}
        for o in self.offers:
            if o.instance_type not in cheapest or o.ondemand_price < cheapest[o.instance_type]:
                cheapest[o.instance_type] = o.ondemand_price
        names = [
            t.name
            for t in self.instance_types.values()
            if t.accelerator is not None
            and t.accelerator.casefold() == wanted
            and t.accelerator_count == count
        ]
        return sorted(names, key=lambda n: (n not in cheapest, cheapest.get(n, 0.0), n))

    def accelerators(self) -> set[str]:
        return {t.accelerator for t in self.instance_types.values() if t.accelerator}
