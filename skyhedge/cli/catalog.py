"""`skyhedge catalog show|refresh`: look at zones and prices, refresh spot prices into the user cache."""

from __future__ import annotations

import datetime as dt
import importlib
from dataclasses import replace
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from skyhedge._json import dumps as strict_json
from skyhedge.catalog import (
    CloudCatalog,
    bundled_path,
    catalog_to_dict,
    load_catalog,
    read_catalog_file,
    user_cache_path,
    write_catalog_file,
)
from skyhedge.catalog.loader import PRICE_APIS, check_cloud
from skyhedge.cli._app import console, echo, fitted, main
from skyhedge.errors import CatalogError

_MAX_LISTED = 10


def _split(value: str | None, option: str = "") -> list[str] | None:
    """A comma-separated option; None when not given. Given but naming nothing (`--regions ,`,
    an unset shell variable) is refused: taken as "not given" it meant *every* region."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise click.BadParameter(f"expected comma-separated names, got {value!r}", param_hint=option or None)
    return items


@main.group("catalog")
def catalog_group() -> None:
    """Zones and prices per cloud (bundled data, or your refreshed user cache)."""


@catalog_group.command("show")
@click.option("--cloud", required=True, help="aws, gcp or local.")
@click.option("--instance-type", "instance_type", default=None, help="Only this instance type.")
@click.option("--region", default=None, help="Only this region.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the catalog file format).")
def show(cloud: str, instance_type: str | None, region: str | None, as_json: bool) -> None:
    """List zones with on-demand and spot prices, and where the prices come from."""
    try:
        check_cloud(cloud)
    except CatalogError as exc:
        raise CatalogError(f"--cloud: {exc}") from None  # the flag's value, not a catalog file
    catalog = load_catalog(cloud)
    offers = list(catalog.offers_for(instance_type)) if instance_type else list(catalog.offers)
    if region:
        catalog.zones_in(region)
        offers = [o for o in offers if o.region == region]
    if as_json:
        data = catalog_to_dict(catalog)
        keep = set(offers)
        kept_types = {o.instance_type for o in offers}
        data["instance_types"] = {k: v for k, v in data["instance_types"].items() if k in kept_types}
        data["offers"] = [row for row, o in zip(data["offers"], catalog.offers, strict=True) if o in keep]
        data["path"] = catalog.path
        echo(strict_json(data, indent=2))
        return
    # catalog strings are data, not Rich markup (a user catalog file may hold anything)
    console.print(f"[bold]{escape(catalog.cloud)}[/] catalog: {escape(str(catalog.path))}")
    console.print(f"source: {escape(str(catalog.source))}  (taken {escape(str(catalog.taken_at))})")
    table = Table(show_lines=False)
    for header in (
        "instance type",
        "accelerator",
        "region",
        "zone",
        "on-demand $/h",
        "spot $/h",
        "spot taken",
    ):
        # prices never cut to "…"; names fold over lines, whole, where the terminal is narrow
        if "$" in header:
            table.add_column(header, justify="right", no_wrap=True)
        else:
            table.add_column(header, overflow="fold")
    for o in sorted(offers, key=lambda o: (o.instance_type, o.region, o.zone)):
        itype = catalog.instance_types[o.instance_type]
        acc = f"{itype.accelerator}:{itype.accelerator_count}" if itype.accelerator else "-"
        spot = "-" if o.spot_price is None else f"{o.spot_price:.4f}"
        table.add_row(
            *(
                escape(str(cell))
                for cell in (
                    o.instance_type,
                    acc,
                    o.region,
                    o.zone,
                    f"{o.ondemand_price:.4f}",
                    spot,
                    o.spot_taken_at or catalog.taken_at,
                )
            )
        )
    console.print(fitted(table, console))
    console.print(f"{len(offers)} offers, {len({o.zone for o in offers})} zones")


@catalog_group.command("refresh")
@click.option("--cloud", required=True, help="aws or gcp.")
@click.option(
    "--regions", default=None, help="Comma-separated regions (default: every region in the catalog)."
)
@click.option(
    "--instance-types", "instance_types", default=None, help="Comma-separated instance types (default: all)."
)
@click.option(
    "--reset", is_flag=True, help="Start from the bundled catalog instead of the current user cache."
)
def refresh(cloud: str, regions: str | None, instance_types: str | None, reset: bool) -> None:
    """Fetch current prices from the cloud's API into the user cache (aws: spot; gcp: spot + on-demand)."""
    if cloud not in PRICE_APIS:
        try:
            target = user_cache_path(cloud)  # a known cloud without a price API
        except CatalogError:
            raise CatalogError(
                f"--cloud: expected one of {', '.join(PRICE_APIS)} (the clouds with a price API), "
                f"got {cloud!r}"
            ) from None
        raise CatalogError(
            f"the {cloud} cloud has no price API to refresh from (refresh works for "
            f"{', '.join(PRICE_APIS)}); write prices into {target} (see docs/catalog.md)"
        )
    target = user_cache_path(cloud)
    base = read_catalog_file(bundled_path(cloud), expect_cloud=cloud) if reset else load_catalog(cloud)
    region_list = _split(regions, "'--regions'")
    type_list = _split(instance_types, "'--instance-types'")
    chosen = [
        o
        for o in base.offers
        if (not region_list or o.region in region_list) and (not type_list or o.instance_type in type_list)
    ]
    if not chosen:  # not the API's doing: said before asking it, naming what was chosen
        types = ", ".join(type_list) if type_list else "any instance type"
        where = ", ".join(region_list) if region_list else "any region"
        raise CatalogError(
            f"the {cloud} catalog has no offer of {types} in {where}: nothing to refresh "
            f"(`skyhedge catalog show --cloud {cloud}` lists its offers); {target} left unchanged"
        )
    now = dt.datetime.now(dt.timezone.utc)
    module_name, function = PRICE_APIS[cloud]
    api = importlib.import_module(module_name)  # boto3 / google-auth only when refreshing that cloud
    result: Any = getattr(api, function)(base, regions=region_list, instance_types=type_list, now=now)
    if result.updated == 0:
        raise CatalogError(f"{cloud} refresh found no prices for the chosen offers; {target} left unchanged")
    refreshed: CloudCatalog = result.catalog
    record = {
        "refresh": api.SOURCE,
        "at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "regions": list(result.regions),
        "instance_types": type_list or "all",
        "offers_updated": result.updated,
    }
    sources = list(refreshed.extra.get("sources", []))  # type: ignore[call-overload]
    refreshed = _with_sources(refreshed, [*sources, record])
    write_catalog_file(refreshed, target)
    console.print(
        f"updated {result.updated} offers in {len({o.region for o in chosen})} regions from "
        f"{escape(str(api.SOURCE))}; "
        f"wrote {escape(str(target))}"
    )
    if result.unpriced:
        shown = ", ".join(result.unpriced[:_MAX_LISTED])
        more = f" and {len(result.unpriced) - _MAX_LISTED} more" if len(result.unpriced) > _MAX_LISTED else ""
        console.print(
            f"no current price for {len(result.unpriced)} offers (kept as they were): {escape(shown)}{more}"
        )


def _with_sources(catalog: CloudCatalog, sources: list[Any]) -> CloudCatalog:
    return replace(catalog, extra={**catalog.extra, "sources": sources})
