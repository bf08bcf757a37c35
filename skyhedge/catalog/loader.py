"""Reading and writing catalog files (one JSON format for every cloud, see docs/catalog.md).

Where a cloud's catalog comes from, first match wins:
  1. `$SKYHEDGE_CATALOG_DIR/<cloud>.json` when that variable is set (tests, CI, air-gapped hosts);
  2. `$XDG_CACHE_HOME/skyhedge/catalog/<cloud>.json` (default `~/.cache/...`) when present (written
     by `skyhedge catalog refresh`; with XDG_CACHE_HOME set and no file there, the one in
     `~/.cache/skyhedge/catalog`, where refreshes went before skyhedge read the variable);
  3. the bundled `skyhedge/catalog/data/<cloud>.json`.
A user file replaces the bundled one whole, so what `catalog show` prints is exactly what plans use.
Parsed catalogs are cached per process, keyed by the file's path and mtime so a refresh is seen.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any

from skyhedge._json import JSON_LIMITS, has_lone_surrogate, json_limit
from skyhedge.catalog.model import MAX_PRICE, CloudCatalog, InstanceType, Offer, did_you_mean
from skyhedge.clouds import cloud_names, cloud_package
from skyhedge.errors import CatalogError
from skyhedge.state import atomic_write_text

# Clouds whose prices `catalog refresh` fetches: (module, function(base, *, regions, instance_types,
# now) -> RefreshResult). Named, not imported, so loading a catalog never imports a cloud SDK.
PRICE_APIS: dict[str, tuple[str, str]] = {
    "aws": ("skyhedge.catalog.aws", "refresh_aws"),
    "gcp": ("skyhedge.catalog.gcp", "refresh_gcp"),
}
FORMAT_VERSION = 1
TOP_KEYS = frozenset(
    {"format", "cloud", "source", "taken_at", "sources", "notes", "instance_types", "offers"}
)
TYPE_KEYS = frozenset({"accelerator", "accelerator_count", "vcpus", "memory_gib"})
OFFER_KEYS = frozenset(
    {
        "instance_type",
        "region",
        "zone",
        "ondemand_price",
        "spot_price",
        "spot_taken_at",
        "spot_source",
        "ondemand_taken_at",
        "ondemand_source",
    }
)
ENV_DIR = "SKYHEDGE_CATALOG_DIR"

_DATA_DIR = Path(__file__).resolve().parent / "data"
#: Parsed catalogs, one per cloud: (path, mtime_ns, size) of the file it was read from, and the
#: catalog. One per cloud, not one per version of the file: keyed by the file's stamp and never
#: dropped, every `catalog refresh` a long-running watcher saw added a parsed catalog (174 kB for
#: the bundled AWS one, 3.5 kB for the local one) that nothing read again, for the watcher's life.
_cache: dict[str, tuple[tuple[str, int, int], CloudCatalog]] = {}
_lock = threading.Lock()


def check_cloud(cloud: str) -> str:
    """`cloud` if skyhedge knows it (`clouds.cloud_names`: a cloud folder, or a registered cloud)."""
    known = cloud_names()
    if cloud not in known:
        raise CatalogError(
            f"unknown cloud {cloud!r}: expected one of {', '.join(known)}{did_you_mean(cloud, known)}"
        )
    return cloud


def bundled_path(cloud: str) -> Path:
    """The catalog shipped with the cloud: skyhedge's `data/<cloud>.json`, or the file a cloud
    registered from outside skyhedge named (`clouds.register_cloud(catalog=...)`)."""
    return cloud_package(check_cloud(cloud)).catalog or _DATA_DIR / f"{cloud}.json"


def _user_cache_dir_or_none() -> Path | None:
    env = os.environ.get(ENV_DIR)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    try:
        if env:
            return Path(env).expanduser()
        if os.path.isabs(xdg):  # the XDG base directory spec: a relative value is to be ignored
            return Path(xdg) / "skyhedge" / "catalog"
        return _home_cache_dir()
    except RuntimeError:  # HOME unset and no passwd entry (a container's arbitrary uid): no home
        return None


def _home_cache_dir() -> Path:
    return Path.home() / ".cache" / "skyhedge" / "catalog"


def _earlier_refresh(cloud: str) -> Path | None:
    """A refresh written to `~/.cache/skyhedge/catalog` by a skyhedge that did not read
    XDG_CACHE_HOME yet: still read where the variable's directory holds none, so setting the
    variable (or upgrading with it set) does not silently fall back to the bundled prices."""
    if os.environ.get(ENV_DIR) or not os.path.isabs(os.environ.get("XDG_CACHE_HOME", "")):
        return None
    try:
        path = _home_cache_dir() / f"{check_cloud(cloud)}.json"
    except RuntimeError:
        return None
    return path if path.is_file() else None


def user_cache_dir() -> Path:
    """Where refreshes are written and user catalogs are read from."""
    found = _user_cache_dir_or_none()
    if found is None:
        raise CatalogError(
            f"no home directory for the user catalog (HOME is unset and uid {os.getuid()} has no "
            f"passwd entry): set HOME or ${ENV_DIR}"
        )
    return found


def user_cache_path(cloud: str) -> Path:
    return user_cache_dir() / f"{check_cloud(cloud)}.json"


def catalog_path(cloud: str) -> Path:
    """The file `load_catalog(cloud)` reads: the user cache if present, else the bundled file."""
    if _user_cache_dir_or_none() is None:  # no home directory: no user catalog to read
        return bundled_path(cloud)
    user = user_cache_path(cloud)
    try:
        if user.is_dir():  # not silently the bundled catalog: the user meant to override it
            raise CatalogError(f"{user}: is a directory, expected a catalog file (or nothing)")
        if user.is_file():
            return user
        return _earlier_refresh(cloud) or bundled_path(cloud)
    except OSError as exc:
        # a user whose HOME (or XDG_CACHE_HOME) still names root's (`sudo -E -u`): one line,
        # not a traceback, from every command that plans
        where = Path(exc.filename) if exc.filename else user
        raise CatalogError(
            f"{where}: cannot look for a user catalog there ({exc.strerror or exc}): is HOME "
            f"(or XDG_CACHE_HOME) yours? ${ENV_DIR} names another folder"
        ) from exc


def load_catalog(cloud: str) -> CloudCatalog:
    """The catalog of `cloud` (a name `clouds.cloud_names` lists); CatalogError for an unknown cloud
    or a bad file."""
    path = catalog_path(cloud)
    try:
        st = path.stat()
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read catalog: {exc.strerror or exc}") from exc
    stamp = (str(path), st.st_mtime_ns, st.st_size)
    with _lock:
        hit = _cache.get(cloud)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    catalog = read_catalog_file(path, expect_cloud=cloud)
    with _lock:
        _cache[cloud] = (stamp, catalog)  # (the file's earlier version is dropped)
    return catalog


def clear_cache() -> None:
    """Forget parsed catalogs (tests; a long-lived process after a refresh sees mtimes anyway)."""
    with _lock:
        _cache.clear()


def read_catalog_file(path: Path, *, expect_cloud: str | None = None) -> CloudCatalog:
    """Parse and validate one catalog file; every problem is one CatalogError naming file and field."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read catalog: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        # a user file saved by an editor as UTF-16 or Latin-1 is bad input like any other: one
        # line naming the file, not a traceback from `plan`, `watch` or `catalog show`
        raise CatalogError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start : exc.start + 1]!r}); "
            "save the catalog as UTF-8 JSON"
        ) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogError(
            f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except JSON_LIMITS as exc:  # past json's own limits (skyhedge._json)
        raise CatalogError(f"{path}: not valid JSON: {json_limit(exc)}") from exc
    if has_lone_surrogate(data):
        raise CatalogError(
            f"{path}: not valid JSON: a \\u escape of a lone UTF-16 surrogate, which is no text"
        )
    return catalog_from_dict(data, origin=str(path), expect_cloud=expect_cloud)


#: The longest text a catalog field may hold (names, sources, times): found by an input audit, a
#: hand-edited `taken_at` of 100,000 characters made `catalog show` take a minute to lay out.
MAX_TEXT = 1000


class _Fields:
    """Typed access to one JSON object with errors that name `origin: field.path`."""

    def __init__(self, origin: str, path: str, data: Any) -> None:
        self.origin = origin
        self.path = path
        if not isinstance(data, dict):
            self.fail(path, "expected an object", data)
        self.data: dict[str, Any] = data

    def only(self, allowed: frozenset[str]) -> None:
        """Unknown keys are errors: a typo (`spot_prise`) must not silently drop a price."""
        for key in self.data:
            if key not in allowed:
                hint = did_you_mean(key, sorted(allowed))
                where = self._sub(key)
                raise CatalogError(f"{self.origin}: {where}: unknown field{hint}")

    def fail(self, path: str, expected: str, got: Any) -> None:
        where = f"{self.origin}: {path}" if path else self.origin
        raise CatalogError(f"{where}: {expected}, got {got!r}")

    def _sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str, required: bool) -> Any:
        if key not in self.data and required:
            raise CatalogError(f"{self.origin}: {self._sub(key)}: missing")
        return self.data.get(key)

    def str(self, key: str, *, required: bool = True) -> str | None:
        """A non-empty string; with required=False a missing key or null gives None."""
        value = self._get(key, required)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            self.fail(self._sub(key), "expected a non-empty string", value)
        if len(value) > MAX_TEXT:  # rich wrapped a 100,000-character word for a minute (`catalog show`)
            self.fail(self._sub(key), f"expected at most {MAX_TEXT} characters", f"{len(value)} characters")
        return value

    def number(self, key: str, *, nullable: bool = False, minimum: float = 0.0) -> float | None:
        value = self._get(key, required=not nullable)
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(
                self._sub(key), f"expected a number >= {minimum:g}" + (" or null" if nullable else ""), value
            )
        if value < minimum:
            self.fail(self._sub(key), f"expected a number >= {minimum:g}", value)
        return float(value)

    def price(self, key: str, *, nullable: bool = False) -> float | None:
        """An hourly price: a number >= 0 and at most MAX_PRICE, so plan costs stay finite."""
        value = self.number(key, nullable=nullable)
        if value is not None and value > MAX_PRICE:
            self.fail(self._sub(key), f"expected a price <= {MAX_PRICE:g} $/h", value)
        return value

    def int(self, key: str, *, minimum: int = 0) -> int:
        value = self._get(key, required=True)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(self._sub(key), f"expected an integer >= {minimum}", value)
        return value


def catalog_from_dict(data: Any, *, origin: str, expect_cloud: str | None = None) -> CloudCatalog:
    """Build a validated `CloudCatalog` from the documented JSON shape."""
    top = _Fields(origin, "", data)
    top.only(TOP_KEYS)
    version = top.int("format", minimum=1)
    if version != FORMAT_VERSION:
        top.fail("format", f"expected {FORMAT_VERSION}", version)
    cloud = top.str("cloud")
    assert cloud is not None
    if cloud not in cloud_names():
        top.fail("cloud", f"expected one of {', '.join(cloud_names())}", cloud)
    if expect_cloud is not None and cloud != expect_cloud:
        top.fail("cloud", f"expected {expect_cloud!r} (file is for another cloud)", cloud)
    source = top.str("source")
    taken_at = top.str("taken_at")

    raw_types = top.data.get("instance_types")
    if not isinstance(raw_types, dict) or not raw_types:
        top.fail("instance_types", "expected a non-empty object of name -> instance type", raw_types)
    types: dict[str, InstanceType] = {}
    for name, raw in raw_types.items():
        f = _Fields(origin, f"instance_types.{name}", raw)
        f.only(TYPE_KEYS)
        accelerator = f.str("accelerator", required=False)
        count = f.int("accelerator_count", minimum=0) if "accelerator_count" in f.data else 0
        if accelerator is not None and count < 1:
            f.fail(f"{f.path}.accelerator_count", "expected an integer >= 1 with an accelerator", count)
        if accelerator is None and count != 0:
            f.fail(f"{f.path}.accelerator_count", "expected 0 without an accelerator", count)
        vcpus = f.number("vcpus")
        memory = f.number("memory_gib")
        assert vcpus is not None and memory is not None
        types[name] = InstanceType(name, accelerator, count, vcpus, memory)

    raw_offers = top.data.get("offers")
    if not isinstance(raw_offers, list) or not raw_offers:
        top.fail("offers", "expected a non-empty list of offers", raw_offers)
    offers: list[Offer] = []
    seen: set[tuple[str, str]] = set()
    zone_region: dict[str, str] = {}
    for i, raw in enumerate(raw_offers):
        f = _Fields(origin, f"offers[{i}]", raw)
        f.only(OFFER_KEYS)
        itype = f.str("instance_type")
        region = f.str("region")
        zone = f.str("zone")
        assert itype is not None and region is not None and zone is not None
        if itype not in types:
            f.fail(f"{f.path}.instance_type", "expected a name listed in instance_types", itype)
        if zone_region.setdefault(zone, region) != region:
            f.fail(
                f"{f.path}.region", f"expected {zone_region[zone]!r} (zone {zone!r} is listed there)", region
            )
        if (itype, zone) in seen:
            f.fail(f.path, "expected one offer per (instance_type, zone)", f"{itype} in {zone} again")
        seen.add((itype, zone))
        ondemand = f.price("ondemand_price")
        spot = f.price("spot_price", nullable=True)
        assert ondemand is not None
        offers.append(
            Offer(
                instance_type=itype,
                region=region,
                zone=zone,
                ondemand_price=ondemand,
                spot_price=spot,
                spot_taken_at=f.str("spot_taken_at", required=False),
                spot_source=f.str("spot_source", required=False),
                ondemand_taken_at=f.str("ondemand_taken_at", required=False),
                ondemand_source=f.str("ondemand_source", required=False),
            )
        )
    extra: dict[str, object] = {}
    if "sources" in top.data:
        if not isinstance(top.data["sources"], list):
            top.fail("sources", "expected a list", top.data["sources"])
        extra["sources"] = top.data["sources"]
    if "notes" in top.data:
        top.str("notes")
        extra["notes"] = top.data["notes"]
    return CloudCatalog(
        cloud=cloud,
        source=source or "",
        taken_at=taken_at or "",
        instance_types=types,
        offers=tuple(offers),
        path=origin,
        extra=extra,
    )


def catalog_to_dict(catalog: CloudCatalog) -> dict[str, Any]:
    """The documented JSON shape of `catalog` (round-trips through `catalog_from_dict`)."""
    out: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "cloud": catalog.cloud,
        "source": catalog.source,
        "taken_at": catalog.taken_at,
    }
    for key in ("notes", "sources"):
        if key in catalog.extra:
            out[key] = catalog.extra[key]
    out["instance_types"] = {
        t.name: {
            "accelerator": t.accelerator,
            "accelerator_count": t.accelerator_count,
            "vcpus": t.vcpus,
            "memory_gib": t.memory_gib,
        }
        for t in catalog.instance_types.values()
    }
    offers = []
    for o in catalog.offers:
        row: dict[str, Any] = {
            "instance_type": o.instance_type,
            "region": o.region,
            "zone": o.zone,
            "ondemand_price": o.ondemand_price,
            "spot_price": o.spot_price,
        }
        for key in ("spot_taken_at", "spot_source", "ondemand_taken_at", "ondemand_source"):
            value = getattr(o, key)
            if value is not None:
                row[key] = value
        offers.append(row)
    out["offers"] = offers
    return out


def write_catalog_file(catalog: CloudCatalog, path: Path) -> None:
    """Write `catalog` to `path` atomically (temp file in the same directory + os.replace)."""
    data = catalog_to_dict(catalog)
    # Validate what we are about to write so a bad refresh never leaves a file plans cannot read.
    catalog_from_dict(data, origin=str(path), expect_cloud=catalog.cloud)
    text = json.dumps(data, indent=1) + "\n"
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise CatalogError(f"{path}: cannot write catalog: {exc.strerror or exc}") from exc
