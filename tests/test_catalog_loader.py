"""Catalog loading, lookups, user-cache override and bad files."""

from __future__ import annotations

import gc
import json
import os
import weakref
from pathlib import Path

import pytest

from skyhedge.catalog import (
    MAX_PRICE,
    bundled_path,
    catalog_from_dict,
    catalog_path,
    catalog_to_dict,
    clear_cache,
    load_catalog,
    parse_accelerator,
    read_catalog_file,
    user_cache_path,
    write_catalog_file,
)
from skyhedge.clouds import builtin_clouds
from skyhedge.errors import CatalogError


@pytest.fixture(autouse=True)
def empty_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test sees an empty user cache (never the real ~/.cache) and a fresh parse cache."""
    cache = tmp_path / "catalog-cache"
    cache.mkdir()
    monkeypatch.setenv("SKYHEDGE_CATALOG_DIR", str(cache))
    clear_cache()
    yield cache
    clear_cache()


def minimal(cloud: str = "local", **override: object) -> dict:
    data = {
        "format": 1,
        "cloud": cloud,
        "source": "test fixture",
        "taken_at": "2024-01-01",
        "instance_types": {"m": {"accelerator": None, "accelerator_count": 0, "vcpus": 2, "memory_gib": 4}},
        "offers": [
            {"instance_type": "m", "region": "r1", "zone": "r1-a", "ondemand_price": 1.0, "spot_price": 0.5},
            {"instance_type": "m", "region": "r1", "zone": "r1-b", "ondemand_price": 1.0, "spot_price": None},
        ],
    }
    data.update(override)
    return data


# --- bundled data -----------------------------------------------------------------------------


@pytest.mark.parametrize("cloud", builtin_clouds())
def test_bundled_catalogs_load_and_round_trip(cloud: str) -> None:
    catalog = load_catalog(cloud)
    assert catalog.cloud == cloud
    assert catalog.source and catalog.taken_at
    assert catalog.zones() and catalog.regions()
    assert catalog_path(cloud) == bundled_path(cloud)
    assert catalog_to_dict(catalog) == json.loads(bundled_path(cloud).read_text())


def test_local_cloud_defaults() -> None:
    local = load_catalog("local")
    assert local.regions() == {"local"}
    assert local.zones() == {f"local-{c}" for c in "abcdef"}
    assert set(local.instance_types) == {"local"}
    assert local.instance_types["local"].accelerator is None
    assert all(o.ondemand_price == 0.0 and o.spot_price == 0.0 for o in local.offers)


def test_aws_bundled_covers_the_promised_families_and_regions() -> None:
    aws = load_catalog("aws")
    families = {name.split(".")[0] for name in aws.instance_types}
    assert {"g5", "g6", "p3", "p4d"} <= families
    assert {"us-east-1", "us-east-2", "us-west-2", "eu-west-1", "eu-central-1"} <= aws.regions()
    assert aws.extra["sources"][0]["commit"]  # where the prices were taken
    for offer in aws.offers:
        assert offer.ondemand_price > 0
        assert offer.spot_price is None or 0 < offer.spot_price <= offer.ondemand_price * 1.0001
        # zone IDs, which name the same physical zone in every AWS account
        assert offer.zone.split("-az")[0] in {"use1", "use2", "usw2", "euw1", "euc1"}


def test_gcp_bundled_prices_include_the_gpu() -> None:
    gcp = load_catalog("gcp")
    assert {"a2-highgpu-1g", "g2-standard-4", "n1-standard-8"} <= set(gcp.instance_types)
    assert gcp.instance_types["n1-standard-8"].accelerator == "T4"
    g2 = gcp.offer("g2-standard-4", "us-central1-a")
    assert g2 is not None
    # g2-standard-4 host VM row (0.14679) + one L4 GPU row (0.56004) from skypilot-catalog.
    assert g2.ondemand_price == pytest.approx(0.14679 + 0.56004)
    assert g2.spot_price == pytest.approx(0.05874 + 0.2231)


# --- lookups ------------------------------------------------------------------------------------


def test_instance_types_for_is_cheapest_first_and_case_insensitive() -> None:
    aws = load_catalog("aws")
    names = aws.instance_types_for("a10g", 1)
    assert names[0] == "g5.xlarge"
    cheapest = [min(o.ondemand_price for o in aws.offers_for(n)) for n in names]
    assert cheapest == sorted(cheapest)
    assert all(aws.instance_types[n].accelerator_count == 1 for n in names)
    assert aws.instance_types_for("A10G", 3) == []
    assert aws.instance_types_for("H100", 8) == ["p5.48xlarge"]
    assert aws.instance_types_for("h100", 1) == []
    assert aws.instance_types_for("l40s", 4) == ["g6e.12xlarge", "g6e.24xlarge"]


def test_offers_for_and_unknown_names() -> None:
    aws = load_catalog("aws")
    offers = aws.offers_for("p4d.24xlarge")
    assert offers == sorted(offers, key=lambda o: (o.region, o.zone))
    assert {o.instance_type for o in offers} == {"p4d.24xlarge"}
    with pytest.raises(CatalogError, match=r"unknown instance type 'g5.xlarg'.*did you mean 'g5.xlarge'"):
        aws.offers_for("g5.xlarg")
    with pytest.raises(CatalogError, match="unknown zone 'use1-az9'"):
        aws.region_of("use1-az9")
    assert aws.region_of("use1-az1") == "us-east-1"
    with pytest.raises(CatalogError, match="unknown region 'us-east-9'"):
        aws.zones_in("us-east-9")


def test_unknown_cloud_is_named() -> None:
    with pytest.raises(CatalogError, match="unknown cloud 'azure'"):
        load_catalog("azure")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("A10G:1", ("A10G", 1)), ("T4", ("T4", 1)), ("A100-80GB:8", ("A100-80GB", 8)), (" L4:2 ", ("L4", 2))],
)
def test_parse_accelerator(text: str, expected: tuple[str, int]) -> None:
    assert parse_accelerator(text) == expected


@pytest.mark.parametrize(
    "text", ["", ":1", "A10G:", "A10G:0", "A10G:-1", "A10G:1.5", "A10G:x", "A:1:2", "A 10G"]
)
def test_parse_accelerator_rejects(text: str) -> None:
    with pytest.raises(CatalogError, match="accelerator"):
        parse_accelerator(text)


# --- user cache ---------------------------------------------------------------------------------


def test_user_cache_overrides_bundled(empty_cache_dir: Path) -> None:
    data = minimal("local")
    data["offers"][0]["ondemand_price"] = 0.25
    (empty_cache_dir / "local.json").write_text(json.dumps(data))
    local = load_catalog("local")
    assert local.path == str(empty_cache_dir / "local.json")
    assert local.zones() == {"r1-a", "r1-b"}
    assert local.offer("m", "r1-a").ondemand_price == 0.25  # type: ignore[union-attr]
    assert load_catalog("aws").path == str(bundled_path("aws"))  # other clouds unaffected


def test_home_cache_used_without_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SKYHEDGE_CATALOG_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    target = tmp_path / "home" / ".cache" / "skyhedge" / "catalog" / "local.json"
    assert user_cache_path("local") == target
    assert load_catalog("local").path == str(bundled_path("local"))
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps(minimal("local")))
    assert load_catalog("local").path == str(target)


@pytest.mark.parametrize("xdg", ["absolute", "relative"])
def test_the_user_catalog_lives_under_xdg_cache_home_when_that_is_an_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, xdg: str
) -> None:
    """XDG_CACHE_HOME was ignored: a refresh went to ~/.cache whatever it said. A relative value
    is ignored, as the XDG base directory spec asks."""
    monkeypatch.delenv("SKYHEDGE_CATALOG_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg") if xdg == "absolute" else "xdg")
    base = tmp_path / "xdg" if xdg == "absolute" else tmp_path / "home" / ".cache"
    target = base / "skyhedge" / "catalog" / "local.json"
    assert user_cache_path("local") == target
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps(minimal("local")))
    assert load_catalog("local").path == str(target)


def test_a_refresh_from_before_xdg_cache_home_was_read_is_still_used_until_one_is_written_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SKYHEDGE_CATALOG_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    earlier = tmp_path / "home" / ".cache" / "skyhedge" / "catalog" / "local.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text(json.dumps(minimal("local")))
    assert load_catalog("local").path == str(earlier)  # not silently the bundled prices
    assert load_catalog("aws").path == str(bundled_path("aws"))
    now = tmp_path / "xdg" / "skyhedge" / "catalog" / "local.json"
    now.parent.mkdir(parents=True)
    now.write_text(json.dumps(minimal("local")))
    assert load_catalog("local").path == str(now)


def test_parse_cache_sees_a_rewritten_file(empty_cache_dir: Path) -> None:
    path = empty_cache_dir / "local.json"
    path.write_text(json.dumps(minimal("local")))
    first = load_catalog("local")
    assert load_catalog("local") is first  # cached
    data = minimal("local")
    data["offers"][0]["spot_price"] = 0.125
    path.write_text(json.dumps(data, indent=2))
    later = path.stat().st_mtime_ns + 10_000_000  # make the change visible even on coarse clocks
    os.utime(path, ns=(later, later))
    assert load_catalog("local").offer("m", "r1-a").spot_price == 0.125  # type: ignore[union-attr]


def test_a_long_running_process_keeps_one_parsed_catalog_however_often_it_is_refreshed(
    empty_cache_dir: Path,
) -> None:
    """A watcher runs for months while `catalog refresh` rewrites the user catalog (a daily cron,
    say), and loads the catalog again after each (a spec reload, a render looking up a GPU or a
    subnet). Every version it parsed was kept, keyed by the file's stamp: one parsed catalog more
    per refresh (174 kB for the bundled AWS one) for the process's life. Only the current one may
    stay alive."""
    path = empty_cache_dir / "local.json"
    seen: list[weakref.ref] = []
    for i in range(20):
        data = minimal("local")
        data["offers"][0]["spot_price"] = 0.5 + i / 100
        path.write_text(json.dumps(data))
        stamp = 1_700_000_000_000_000_000 + i * 1_000_000_000  # each refresh a second later
        os.utime(path, ns=(stamp, stamp))
        catalog = load_catalog("local")
        assert catalog.offer("m", "r1-a").spot_price == 0.5 + i / 100  # type: ignore[union-attr]
        seen.append(weakref.ref(catalog))
    del catalog
    gc.collect()
    assert [ref() is not None for ref in seen] == [False] * 19 + [True]


def test_write_is_atomic_and_round_trips(tmp_path: Path) -> None:
    catalog = catalog_from_dict(minimal("local"), origin="fixture")
    target = tmp_path / "nested" / "local.json"
    write_catalog_file(catalog, target)
    assert read_catalog_file(target) == catalog
    assert [p.name for p in target.parent.iterdir()] == ["local.json"]  # no temp file left


def test_write_refuses_an_invalid_catalog(tmp_path: Path) -> None:
    catalog = catalog_from_dict(minimal("local"), origin="fixture")
    from dataclasses import replace

    broken = replace(catalog, offers=(replace(catalog.offers[0], ondemand_price=-1.0),))
    target = tmp_path / "local.json"
    with pytest.raises(CatalogError, match="ondemand_price"):
        write_catalog_file(broken, target)
    assert not target.exists()


def test_prices_up_to_the_cap_are_accepted(empty_cache_dir: Path) -> None:
    data = minimal("local")
    data["offers"][0].update(ondemand_price=MAX_PRICE, spot_price=MAX_PRICE)  # type: ignore[index]
    (empty_cache_dir / "local.json").write_text(json.dumps(data))
    offer = load_catalog("local").offer("m", "r1-a")
    assert offer is not None and offer.ondemand_price == offer.spot_price == 1_000_000.0


def test_write_refuses_a_price_above_the_cap(tmp_path: Path) -> None:
    """A price that would make plan costs overflow to Infinity never reaches a file."""
    from dataclasses import replace

    catalog = catalog_from_dict(minimal("local"), origin="fixture")
    broken = replace(catalog, offers=(replace(catalog.offers[0], spot_price=1e308), *catalog.offers[1:]))
    target = tmp_path / "local.json"
    with pytest.raises(CatalogError, match=r"offers\[0\].spot_price: expected a price <= 1e\+06"):
        write_catalog_file(broken, target)
    assert not target.exists()


# --- bad files ----------------------------------------------------------------------------------


def _bad(**changes: object) -> dict:
    data = minimal("local")
    for dotted, value in changes.items():
        node: object = data
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]  # type: ignore[index]
        if value is KeyError:
            del node[last]  # type: ignore[arg-type]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value  # type: ignore[index]
    return data


BAD_FILES = [
    (_bad(format=2), "format: expected 1"),
    (_bad(cloud="azure"), "cloud: expected one of"),
    (_bad(cloud="aws"), "cloud: expected 'local'"),
    (_bad(source=KeyError), "source: missing"),
    (_bad(taken_at=""), "taken_at: expected a non-empty string"),
    (_bad(offers=[]), "offers: expected a non-empty list"),
    (_bad(instance_types={}), "instance_types: expected a non-empty object"),
    (_bad(offers__0__ondemand_price=-1), r"offers\[0\].ondemand_price: expected a number >= 0"),
    (_bad(offers__0__spot_price="cheap"), r"offers\[0\].spot_price: expected a number >= 0 or null"),
    (_bad(offers__0__ondemand_price=True), r"offers\[0\].ondemand_price"),
    (_bad(offers__0__ondemand_price=1e308), r"offers\[0\].ondemand_price: expected a price <= 1e\+06 \$/h"),
    (_bad(offers__1__spot_price=1_000_000.5), r"offers\[1\].spot_price: expected a price <= 1e\+06 \$/h"),
    (
        _bad(offers__1__instance_type="n"),
        r"offers\[1\].instance_type: expected a name listed in instance_types",
    ),
    (_bad(offers__1__zone="r1-a"), r"offers\[1\]: expected one offer per \(instance_type, zone\)"),
    (_bad(offers__1__zone="r1-a", offers__1__region="r2"), r"offers\[1\].region: expected 'r1'"),
    (
        _bad(offers__0__spot_prise=0.1),
        r"offers\[0\].spot_prise: unknown field \(did you mean 'spot_price'\?\)",
    ),
    (_bad(offers__0__zone=KeyError), r"offers\[0\].zone: missing"),
    (_bad(instance_types__m__accelerator="T4"), "accelerator_count: expected an integer >= 1"),
    (_bad(instance_types__m__vcpus="two"), "instance_types.m.vcpus: expected a number"),
    (_bad(instance_types__m__gpus=1), "instance_types.m.gpus: unknown field"),
    (_bad(extra_field=1), "extra_field: unknown field"),
    (_bad(sources="x"), "sources: expected a list"),
    (["not", "an", "object"], "expected an object"),
]


@pytest.mark.parametrize(("data", "message"), BAD_FILES)
def test_bad_files_fail_with_one_line_naming_file_and_field(
    data: object, message: str, empty_cache_dir: Path
) -> None:
    path = empty_cache_dir / "local.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CatalogError, match=message) as info:
        load_catalog("local")
    text = str(info.value)
    assert text.startswith(str(path))
    assert "\n" not in text


def test_invalid_json_names_line(empty_cache_dir: Path) -> None:
    (empty_cache_dir / "local.json").write_text('{"format": 1,\n "cloud": }')
    with pytest.raises(CatalogError, match=r"local.json: not valid JSON: .* line 2"):
        load_catalog("local")


def test_unreadable_file(empty_cache_dir: Path) -> None:
    (empty_cache_dir / "local.json").mkdir()  # meant to override the bundled one: refused, not ignored
    with pytest.raises(CatalogError, match="local.json: is a directory, expected a catalog file"):
        load_catalog("local")
    with pytest.raises(CatalogError, match="cannot read catalog"):
        read_catalog_file(empty_cache_dir / "missing.json")


def test_a_file_that_is_not_utf8_is_one_error_naming_it(empty_cache_dir: Path) -> None:
    """An editor's UTF-16 save (found by an audit: a UnicodeDecodeError traceback from every
    command that loads the catalog)."""
    (empty_cache_dir / "local.json").write_bytes('{"format": 1}'.encode("utf-16"))
    with pytest.raises(CatalogError, match=r"local.json: not UTF-8 text \(byte 0: b'\\xff'\)"):
        load_catalog("local")


def test_an_overlong_text_field_is_refused_naming_it(empty_cache_dir: Path) -> None:
    """Found by an input audit: a `taken_at` of 100,000 characters made `catalog show` take a
    minute of CPU (rich laying out one unbroken word); no real name, source or time is that long."""
    data = json.loads(bundled_path("local").read_text())
    data["taken_at"] = "x" * 100_000
    (empty_cache_dir / "local.json").write_text(json.dumps(data))
    with pytest.raises(
        CatalogError,
        match=r"local.json: taken_at: expected at most 1000 characters, got '100000 characters'$",
    ):
        load_catalog("local")
