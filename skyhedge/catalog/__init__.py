"""Zones and prices per cloud: bundled offline data, user-cache overrides, lookups.

    from skyhedge.catalog import load_catalog
    aws = load_catalog("aws")
    aws.instance_types_for("A10G", 1)     # ['g5.xlarge', ...] cheapest first
    aws.offers_for("g5.xlarge")           # [Offer(..., zone='us-east-1a', spot_price=...), ...]

The file format and where prices come from are documented in docs/catalog.md. Refreshing from the
clouds' APIs lives in `skyhedge.catalog.aws` / `skyhedge.catalog.gcp` (imported on demand, so
loading a catalog never imports boto3 or google-auth).
"""

from __future__ import annotations

from skyhedge.catalog.accelerators import parse_accelerator
from skyhedge.catalog.loader import (
    bundled_path,
    catalog_from_dict,
    catalog_path,
    catalog_to_dict,
    clear_cache,
    load_catalog,
    read_catalog_file,
    user_cache_path,
    write_catalog_file,
)
from skyhedge.catalog.model import MAX_PRICE, CloudCatalog, InstanceType, Offer

__all__ = [
    "MAX_PRICE",
    "CloudCatalog",
    "InstanceType",
    "Offer",
    "bundled_path",
    "catalog_from_dict",
    "catalog_path",
    "catalog_to_dict",
    "clear_cache",
    "load_catalog",
    "parse_accelerator",
    "read_catalog_file",
    "user_cache_path",
    "write_catalog_file",
]
