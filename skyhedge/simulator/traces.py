"""Spot-capacity traces: loading, validation and resampling to the simulator's 30 s ticks.

Two input formats (docs/simulate.md has the user-facing description):

1. A directory with one JSON file per zone (the format of the public traces, see
   `../shared/traces/README.md`): ``{"metadata": {"gap_seconds": G}, "data": [v0, v1, ...],
   "prices": [...]?}``. The file name starts with the zone (``us-east-2a_v100_1.json``).
   ``data[i]`` is the spot capacity of that zone during ``[i*G, (i+1)*G)``; optional ``prices``
   are spot $/h per entry. The rest of the stem after the first ``_`` is the file's instance type
   (``v100_1``); a directory holding several instance types for one zone is split by `load_traces`
   into one trace per type, named ``<dir>[<type>]``: a spot pool is one type in one zone, and a
   service runs one type, so types (which differ in price) are never mixed into one market.
2. A CSV file (or a directory holding exactly one and no JSON): a header
   ``seconds,<zone>,<zone>,...`` and one row per sample: the sample's start in seconds (evenly
   spaced, first row 0 or any start) and each zone's capacity. A zone may be written
   ``cloud/region/zone`` to name it fully.
3. One zone's JSON file alone: a one-zone trace named after the file's stem.

Extensions match in any case (``.JSON``, ``.Csv``); files whose name starts with ``.`` are skipped
in a directory (macOS leaves ``._<name>.json`` AppleDouble files beside copies on FAT/SMB shares).

Resampling: tick t (30 s) takes ``data[floor(t*30/G)]``; zones of one trace start at the same
instant and the shortest decides the length. The whole trace is resampled up front, so a zone may
span at most `MAX_TRACE_SECONDS` (10 years: about 10.5 million ticks, 84 MB per zone); capacities
are integers up to `MAX_CAPACITY`, prices finite numbers up to `MAX_PRICE` $/h; one trace holds at
most `MAX_TRACE_CELLS` zone-ticks. A trace whose values are all 0/1 (every sample of every zone
file, including those past the shortest zone's end) is an availability trace ("could a spot
instance be obtained?"): 1 then means "as many as asked" (`UNLIMITED`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from skyhedge._json import JSON_LIMITS, json_limit
from skyhedge.errors import CatalogError, TraceError
from skyhedge.policy.types import Location

__all__ = [
    "MAX_CAPACITY",
    "MAX_PRICE",
    "MAX_TRACE_CELLS",
    "MAX_TRACE_SECONDS",
    "TICK_SECONDS",
    "UNLIMITED",
    "Trace",
    "instance_type_of",
    "load_trace",
    "load_traces",
    "location_for_zone",
    "resample",
]

TICK_SECONDS = 30
#: Capacity standing for "as many as asked" (a 1 in an availability trace).
UNLIMITED = 1_000_000
#: The longest span a zone trace may cover: 10 years of 365 days. Traces are resampled to 30 s
#: ticks up front, so a few samples with an absurd gap would otherwise allocate terabytes.
MAX_TRACE_SECONDS = 10 * 365 * 86400
MAX_TRACE_DAYS = MAX_TRACE_SECONDS // 86400
#: The most zone-ticks one trace may hold (800 MB of int64 capacity): `MAX_TRACE_SECONDS` bounds
#: each zone, this bounds their sum, so a directory of many one-sample ten-year files is refused
#: before it is resampled rather than allocating 84 MB per file until memory runs out.
MAX_TRACE_CELLS = 100_000_000
#: The largest capacity a trace may hold (the UNLIMITED of availability traces: as many as asked).
MAX_CAPACITY = UNLIMITED
#: The largest price ($/h) a trace or price file may hold: dollars must stay finite.
MAX_PRICE = 1_000_000.0

_AWS_ZONE = re.compile(r"^([a-z]{2}(?:-gov)?-[a-z]+-\d+)[a-z]$")
_GCP_ZONE = re.compile(r"^([a-z]+-[a-z]+\d+)-[a-z]$")
_AZURE_ZONE = re.compile(r"^([a-z]+[a-z0-9]*)-(\d)$")
#: AWS zone IDs (`use1-az1`), skyhedge's own name for AWS zones (docs/catalog.md): the same
#: physical zone in every account, unlike zone names.
_AWS_ZONE_ID = re.compile(r"^([a-z]{2,4}\d+)-az\d+$")
#: Zone ID prefix -> region, for prefixes the bundled catalog does not list (AWS's documented
#: region codes; the catalog wins where it has the prefix).
_AWS_ZONE_ID_PREFIXES: dict[str, str] = {
    "use1": "us-east-1",
    "use2": "us-east-2",
    "usw1": "us-west-1",
    "usw2": "us-west-2",
    "usge1": "us-gov-east-1",
    "usgw1": "us-gov-west-1",
    "cac1": "ca-central-1",
    "caw1": "ca-west-1",
    "sae1": "sa-east-1",
    "euw1": "eu-west-1",
    "euw2": "eu-west-2",
    "euw3": "eu-west-3",
    "euc1": "eu-central-1",
    "euc2": "eu-central-2",
    "eun1": "eu-north-1",
    "eus1": "eu-south-1",
    "eus2": "eu-south-2",
    "aps1": "ap-south-1",
    "aps2": "ap-south-2",
    "ape1": "ap-east-1",
    "apne1": "ap-northeast-1",
    "apne2": "ap-northeast-2",
    "apne3": "ap-northeast-3",
    "apse1": "ap-southeast-1",
    "apse2": "ap-southeast-2",
    "apse3": "ap-southeast-3",
    "apse4": "ap-southeast-4",
    "mes1": "me-south-1",
    "mec1": "me-central-1",
    "afs1": "af-south-1",
    "ilc1": "il-central-1",
}


@dataclass(frozen=True)
class Trace:
    """Per-zone spot capacity on the simulator's tick grid.

    `capacity[z, t]` is zone z's capacity at tick t (`UNLIMITED` for a 1 of an availability
    trace); `spot_prices[z, t]` is the trace's own spot $/h or NaN where it has none.
    """

    name: str
    source: str
    zones: tuple[Location, ...]
    capacity: np.ndarray
    gap_seconds: tuple[float, ...]
    availability_only: bool
    spot_prices: np.ndarray | None = None
    #: the instance type all its files share (`<zone>_<type>.json`), if any
    instance_type: str | None = None

    def price_names(self, location: Location) -> tuple[str, ...]:
        """The names a `--prices` entry may give `location` by, most specific first: the zone's
        file stem (`us-west-2a_v100_8`: one price per instance type), its zone, `cloud/region/zone`."""
        stem = (f"{location.zone}_{self.instance_type}",) if self.instance_type else ()
        return (*stem, location.zone, location.key)

    @property
    def ticks(self) -> int:
        return int(self.capacity.shape[1])

    @property
    def hours(self) -> float:
        return self.ticks * TICK_SECONDS / 3600


def location_for_zone(zone: str) -> Location:
    """A `Location` for a zone name: `cloud/region/zone` as written, else inferred from its shape."""
    if zone.count("/") == 2:
        try:
            return Location.parse(zone)
        except ValueError:
            pass
    if (match := _AWS_ZONE_ID.match(zone)) and (region := _aws_zone_id_regions().get(match.group(1))):
        return Location("aws", region, zone)  # the zone stays the zone ID, as in the catalog
    if match := _AWS_ZONE.match(zone):
        return Location("aws", match.group(1), zone)
    if match := _GCP_ZONE.match(zone):
        return Location("gcp", match.group(1), zone)
    if match := _AZURE_ZONE.match(zone):
        return Location("azure", match.group(1), zone)
    return Location("trace", zone, zone)


@lru_cache(maxsize=1)
def _aws_zone_id_regions() -> Mapping[str, str]:
    """Zone ID prefix -> region: the bundled AWS catalog's zones over the fixed table.

    The bundled file, not the user's refreshed one: a trace's regions must not depend on what
    a user cache happens to hold (or fail to load because of it)."""
    from skyhedge.catalog.loader import bundled_path, read_catalog_file  # only for zone IDs

    regions = dict(_AWS_ZONE_ID_PREFIXES)
    try:
        offers = read_catalog_file(bundled_path("aws"), expect_cloud="aws").offers
    except CatalogError:
        return regions
    for offer in offers:
        if match := _AWS_ZONE_ID.match(offer.zone):
            regions[match.group(1)] = offer.region
    return regions


def resample(
    values: Sequence[float] | np.ndarray, gap_seconds: float, ticks: int | None = None
) -> np.ndarray:
    """Values on the 30 s grid: tick t takes ``values[floor(t*30/gap)]``."""
    values = np.asarray(values)
    if ticks is None:
        ticks = int(math.floor(len(values) * gap_seconds / TICK_SECONDS + 1e-9))
    index = np.floor(np.arange(ticks) * TICK_SECONDS / gap_seconds + 1e-9).astype(np.int64)
    return values[np.minimum(index, len(values) - 1)]


def instance_type_of(file: str | Path) -> str | None:
    """The instance type of a zone file: its stem after the first ``_`` (None when it has none)."""
    _, sep, kind = Path(file).stem.partition("_")
    return kind if sep and kind else None


def load_trace(path: str | Path, *, binary_is_unlimited: bool | None = None) -> Trace:
    """Load a trace directory (JSON per zone, or one CSV), a CSV file or one zone's JSON file;
    raise `TraceError`.

    `binary_is_unlimited`: None follows the README rule (all values 0/1 -> unlimited); True/False
    force it. A directory holding one zone several times (several instance types) is refused:
    `load_traces` splits it.
    """
    path = Path(path)
    jsons = _json_files(path)
    if jsons:
        _check_zones_once(path, jsons)
        trace = _from_json_files(path, jsons, _trace_name(path), str(path), binary_is_unlimited)
        # one zone file alone is one instance type, as its directory holding only it would be
        return replace(trace, instance_type=instance_type_of(path)) if path.is_file() else trace
    if path.is_dir():
        csvs = [p for p in _visible_files(path) if _has_suffix(p, ".csv")]
        if len(csvs) == 1:
            zones, series, gaps, prices = _read_csv(csvs[0])
        elif csvs:
            raise TraceError(f"{path}: holds {len(csvs)} CSV files; point --trace at one of them")
        else:
            raise TraceError(f"{path}: no *.json zone traces or *.csv trace in this directory or below it")
    elif path.is_file() and _has_suffix(path, ".csv"):
        zones, series, gaps, prices = _read_csv(path)
    elif path.exists():
        raise TraceError(f"{path}: expected a trace directory, a .csv file or one zone's .json file")
    elif path.is_symlink():
        raise TraceError(f"{path}: a symbolic link to a missing file or directory ({os.readlink(path)})")
    else:
        raise TraceError(f"{path}: no such trace directory or file")
    return _build(path, zones, series, gaps, prices, binary_is_unlimited, _trace_name(path))


def load_traces(
    path: str | Path,
    *,
    instance_types: Sequence[str] | None = None,
    binary_is_unlimited: bool | None = None,
) -> list[Trace]:
    """The traces of one `--trace` path: one per instance type where a zone has several.

    A directory whose zones each appear once gives exactly `load_trace`'s trace. One where some
    zone appears more than once gives one trace per instance type (sorted; files without a type
    first), each built from that type's files alone, so it is the very trace (capacity, length,
    hence seeded windows) that a directory holding only those files would give; its name is
    ``<dir>[<type>]``. `instance_types` keeps only those types' files, one trace per type; a type
    the directory lacks raises `TraceError` naming the types it has. A trace holding every file
    of its directory keeps the directory's name.
    """
    path = Path(path)
    jsons = _json_files(path)
    wanted = list(dict.fromkeys(instance_types)) if instance_types else None
    if not jsons and (leaves := trace_dirs(path)):
        return _load_tree(path, leaves, wanted, binary_is_unlimited)
    if not jsons:
        trace = load_trace(path, binary_is_unlimited=binary_is_unlimited)  # its errors first
        if wanted:
            raise TraceError(
                f"{path}: no instance type {_quoted(wanted)}: a CSV trace has none (drop --instance-type)"
            )
        return [trace]
    groups: dict[str | None, list[Path]] = {}
    for file in jsons:
        groups.setdefault(instance_type_of(file), []).append(file)
    if wanted:
        unknown = [kind for kind in wanted if kind not in groups]
        if unknown:
            known = sorted(kind for kind in groups if kind is not None)
            has = ", ".join(known) if known else "none (no '_<type>' in its file names)"
            raise TraceError(f"{path}: no instance type {_quoted(unknown)}; its instance types: {has}")
        chosen: list[str | None] = sorted(wanted)
    elif _repeated_zone(jsons) is not None:
        chosen = sorted(groups, key=lambda kind: (kind is not None, kind or ""))
    else:
        kinds = set(groups)
        trace = _from_json_files(path, jsons, _trace_name(path), str(path), binary_is_unlimited)
        return [replace(trace, instance_type=kinds.pop()) if len(kinds) == 1 else trace]
    traces = []
    for kind in chosen:
        files = groups[kind]
        whole = len(files) == len(jsons)
        name = _trace_name(path) if whole or kind is None else f"{_trace_name(path)}[{kind}]"
        source = str(path) if whole else f"{path} (instance type {kind or 'none'})"
        _check_zones_once(path, files)
        trace = _from_json_files(path, files, name, source, binary_is_unlimited)
        traces.append(replace(trace, instance_type=kind))
    return traces


def trace_dirs(path: Path) -> list[Path]:
    """The trace directories below `path` when `path` holds none of a trace's files itself (a
    folder of traces, such as ../shared/traces): every directory with *.json or *.csv files,
    sorted, dot-directories skipped. Empty for anything else.

    Symbolic links to directories are followed: a folder of links to traces kept elsewhere is a
    folder of traces, and skipping them dropped those traces from the comparison without a word.
    A link back to a directory on the way down (a loop) is not followed."""
    if not path.is_dir() or _holds_trace_files(path):
        return []
    found = []
    for directory, subdirs, _files in os.walk(path, followlinks=True):
        here = Path(directory)
        above = {here.resolve(), *((path / parent).resolve() for parent in here.relative_to(path).parents)}
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and (here / d).resolve() not in above)
        if here != path and _holds_trace_files(here):
            found.append(here)
    return found


def _holds_trace_files(directory: Path) -> bool:
    return any(_has_suffix(p, ".json") or _has_suffix(p, ".csv") for p in _visible_files(directory))


def _load_tree(
    path: Path, leaves: list[Path], wanted: list[str] | None, binary_is_unlimited: bool | None
) -> list[Trace]:
    """Every trace of a folder of traces, named by its path below the folder
    (`preemption/1-node/aws-04-22-2023`, `availability/1-node/aws-10-26-2022[k80_1]`), so that
    names stay unique. With `wanted` instance types, only the directories holding one of them,
    each with the wanted types it holds: a folder mixes directories of different types (k80_1
    beside v100_1 only), so asking for both must not fail on the directory lacking one. A wanted
    type that no directory below the folder holds is still refused."""
    traces = []
    held: set[str] = set()
    for leaf in leaves:
        here = None
        if wanted:
            kinds = {instance_type_of(f) for f in _json_files(leaf)}
            here = [kind for kind in wanted if kind in kinds]
            if not here:
                continue
            held.update(here)
        prefix = leaf.relative_to(path).parent.as_posix()
        for trace in load_traces(leaf, instance_types=here, binary_is_unlimited=binary_is_unlimited):
            traces.append(replace(trace, name=trace.name if prefix == "." else f"{prefix}/{trace.name}"))
    missing = [kind for kind in wanted or [] if kind not in held]
    if missing or not traces:
        raise TraceError(f"{path}: no trace directory below it holds instance type {_quoted(missing)}")
    return traces


def _quoted(kinds: Sequence[str]) -> str:
    return ", ".join(repr(kind) for kind in kinds)


def _trace_name(path: Path) -> str:
    """A trace's name: a file's stem, a directory's name. `.` and `..` (and `""`, which `Path`
    reads as `.`) name the directory they stand for, never an empty label in the report."""
    if path.is_file():
        return path.stem
    if path.name in ("", "..", "."):
        resolved = path.resolve()
        return resolved.name or str(resolved)
    return path.name


def _has_suffix(path: Path, suffix: str) -> bool:
    """Extensions in any case: `.JSON` from a Windows share is the same format as `.json`."""
    return path.suffix.lower() == suffix


def _visible_files(path: Path) -> list[Path]:
    """A directory's files, sorted, without dotfiles: `._x.json` is macOS metadata (AppleDouble),
    not a zone, and would otherwise fail the whole directory as unreadable JSON.

    A symbolic link whose target is missing counts as a file (reading it then fails naming it):
    git-annex and DataLad keep data as links into an object store, dangling until fetched, and
    skipping them dropped those zones from the trace without a word."""
    return sorted(
        p
        for p in path.iterdir()
        if not p.name.startswith(".") and (p.is_file() or (p.is_symlink() and not p.exists()))
    )


def _json_files(path: Path) -> list[Path]:
    """The zone files of a trace: a directory's, or a `.json` file itself (a one-zone trace); a
    directory mixing them with a CSV trace is refused (which one was meant is anyone's guess)."""
    if path.is_file():
        return [path] if _has_suffix(path, ".json") else []
    if not path.is_dir():
        return []
    files = _visible_files(path)
    jsons = [p for p in files if _has_suffix(p, ".json")]
    if jsons:
        csvs = [p.name for p in files if _has_suffix(p, ".csv")]
        if csvs:
            raise TraceError(
                f"{path}: mixes *.json zone traces with *.csv ({', '.join(csvs)}); expected one "
                "format per directory (point --trace at a CSV file to use it)"
            )
    return jsons


def _zone_of(file: Path) -> Location:
    return location_for_zone(file.stem.split("_", 1)[0])


def _repeated_zone(files: Sequence[Path]) -> Location | None:
    seen: set[Location] = set()
    for file in files:
        zone = _zone_of(file)
        if zone in seen:
            return zone
        seen.add(zone)
    return None


def _check_zones_once(path: Path, files: Sequence[Path]) -> None:
    """Refuse one zone twice (before reading any file), naming the instance types found."""
    zone = _repeated_zone(files)
    if zone is not None:
        kinds = sorted({kind for kind in map(instance_type_of, files) if kind is not None})
        raise TraceError(
            f"{path}: zone {zone.zone} appears twice (instance types: {', '.join(kinds) or 'none'}); "
            "keep one instance type per trace (skyhedge simulate splits it, --instance-type picks)"
        )


def _from_json_files(
    path: Path, files: Sequence[Path], name: str, source: str, binary_is_unlimited: bool | None
) -> Trace:
    zones, series, gaps, prices = _read_json_dir(list(files))
    return _build(path, zones, series, gaps, prices, binary_is_unlimited, name, source)


def _build(
    path: Path,
    zones: list[Location],
    series: list[np.ndarray],
    gaps: list[float],
    prices: list[np.ndarray | None],
    binary_is_unlimited: bool | None,
    name: str,
    source: str | None = None,
) -> Trace:
    seen: dict[Location, int] = {}
    for i, zone in enumerate(zones):
        if zone in seen:
            raise TraceError(f"{path}: zone {zone.zone} appears twice; keep one instance type per trace")
        seen[zone] = i
    for s, g in zip(series, gaps, strict=True):  # the readers check this per file; a backstop
        if not len(s) * g <= MAX_TRACE_SECONDS:
            raise TraceError(f"{path}: spans more than {MAX_TRACE_DAYS} days (10 years); expected less")
    ticks = min(int(math.floor(len(s) * g / TICK_SECONDS + 1e-9)) for s, g in zip(series, gaps, strict=True))
    if ticks <= 0:
        raise TraceError(f"{path}: the shortest zone trace is shorter than one 30 s tick")
    if len(series) * ticks > MAX_TRACE_CELLS:  # before resampling allocates them
        raise TraceError(
            f"{path}: {len(series)} zones x {ticks} ticks of 30 s is {len(series) * ticks} cells; "
            f"expected at most {MAX_TRACE_CELLS} per trace (split the zones over several traces)"
        )
    # judged on every sample read, not the resampled ticks: a 4 past the shortest zone's end
    # still makes this a capacity trace, whose 1s mean one replica
    binary = all(bool(np.all(s <= 1)) for s in series)
    capacity = np.stack([resample(s, g, ticks) for s, g in zip(series, gaps, strict=True)]).astype(np.int64)
    availability_only = binary if binary_is_unlimited is None else binary_is_unlimited and binary
    if availability_only:
        capacity = np.where(capacity > 0, UNLIMITED, 0).astype(np.int64)
    spot_prices = None
    if any(p is not None for p in prices):
        spot_prices = np.full(capacity.shape, np.nan)
        for z, (p, g) in enumerate(zip(prices, gaps, strict=True)):
            if p is not None:
                spot_prices[z] = resample(p, g, ticks)
    return Trace(
        name=name,
        source=str(path) if source is None else source,
        zones=tuple(zones),
        capacity=capacity,
        gap_seconds=tuple(gaps),
        availability_only=availability_only,
        spot_prices=spot_prices,
    )


def _read_json_dir(
    files: list[Path],
) -> tuple[list[Location], list[np.ndarray], list[float], list[np.ndarray | None]]:
    zones, series, gaps, prices = [], [], [], []
    for file in files:
        if file.is_symlink() and not file.exists():
            raise TraceError(
                f"{file}: a symbolic link to a missing file ({os.readlink(file)}); fetch its data "
                "(git annex get, datalad get) or remove the link"
            )
        try:
            doc = json.loads(file.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TraceError(f"{file}: not a readable JSON trace ({exc})") from exc
        except JSON_LIMITS as exc:  # past json's own limits (skyhedge._json)
            raise TraceError(f"{file}: not a readable JSON trace ({json_limit(exc)})") from exc
        if not isinstance(doc, dict):
            raise TraceError(f"{file}: expected an object with 'metadata' and 'data'")
        gap = _gap(file, doc.get("metadata"))
        data = _numbers(file, "data", doc.get("data"), integral=True)
        _check_span(file, "metadata.gap_seconds", len(data), gap)
        price = doc.get("prices")
        price_arr = None
        if price is not None:
            price_arr = _numbers(file, "prices", price, integral=False)
            # A price feed rarely ends exactly with the capacity samples. Prices are only read with
            # --prices; refusing the trace over them failed every run on it, --prices or not.
            # Samples past the array's end are missing (null), entries past the data's are unused.
            if len(price_arr) < len(data):
                price_arr = np.concatenate([price_arr, np.full(len(data) - len(price_arr), np.nan)])
            price_arr = price_arr[: len(data)]
        zones.append(_zone_of(file))
        series.append(data)
        gaps.append(gap)
        prices.append(price_arr)
    return zones, series, gaps, prices


def _gap(file: Path, metadata: object) -> float:
    gap = metadata.get("gap_seconds") if isinstance(metadata, dict) else None
    if isinstance(gap, bool) or not isinstance(gap, (int, float)) or not gap > 0 or not math.isfinite(gap):
        raise TraceError(f"{file}: metadata.gap_seconds: expected a positive number, got {gap!r}")
    return float(gap)


def _numbers(file: Path, field: str, values: object, *, integral: bool) -> np.ndarray:
    """`values` checked: capacities (`integral`) or prices, where `null` is a missing sample
    (NaN: priced as no price at all, see `Trace.spot_prices`), as price feeds have gaps."""
    if not isinstance(values, list) or not values:
        raise TraceError(f"{file}: {field}: expected a non-empty list of numbers")
    top = MAX_CAPACITY if integral else MAX_PRICE
    if not integral:
        values = [math.nan if value is None else value for value in values]
    for i, value in enumerate(values):
        if not integral and value is math.nan:
            continue
        bad = isinstance(value, bool) or not isinstance(value, (int, float))
        if not bad:
            bad = not 0 <= value <= top or (integral and value != int(value))  # NaN fails too
        if bad:
            kind = f"a non-negative integer <= {MAX_CAPACITY}"
            if not integral:
                kind = f"a number in [0, {top:g}] or null"
            raise TraceError(f"{file}: {field}[{i}]: expected {kind}, got {value!r}")
    return np.asarray(values, dtype=np.int64 if integral else float)


def _check_span(file: Path, field: str, samples: int, gap: float) -> None:
    """Refuse a zone trace spanning more than `MAX_TRACE_SECONDS` (checked before resampling)."""
    span = samples * gap
    if not span <= MAX_TRACE_SECONDS:
        raise TraceError(
            f"{file}: {field}: expected at most {MAX_TRACE_DAYS} days (10 years) of trace, got "
            f"{samples} sample{'s' if samples != 1 else ''} {gap:g} s apart ({span / 86400:.4g} days)"
        )


def _read_csv(file: Path) -> tuple[list[Location], list[np.ndarray], list[float], list[np.ndarray | None]]:
    try:
        with file.open(newline="", encoding="utf-8-sig") as handle:  # Excel writes a BOM
            rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TraceError(f"{file}: not a readable CSV trace ({exc})") from exc
    if len(rows) < 2:
        raise TraceError(f"{file}: expected a header 'seconds,<zone>,...' and at least one row")
    header = [cell.strip() for cell in rows[0]]
    if len(header) < 2 or header[0].lower() not in {"seconds", "time", "t"}:
        raise TraceError(f"{file}: line 1: expected a header 'seconds,<zone>,<zone>,...', got {rows[0]!r}")
    for column, (zone, cell) in enumerate(zip(header[1:], rows[0][1:], strict=True), start=2):
        if not zone:  # `a,,b` or a trailing comma: a zone without a name
            raise TraceError(f"{file}: line 1: column {column}: expected a zone name, got {cell!r}")
    times: list[float] = []
    columns: list[list[int]] = [[] for _ in header[1:]]
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise TraceError(f"{file}: line {line}: expected {len(header)} cells, got {len(row)}")
        try:
            seconds = float(row[0])
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds):
            raise TraceError(f"{file}: line {line}: seconds: expected a finite number, got {row[0]!r}")
        times.append(seconds)
        for z, cell in enumerate(row[1:]):
            try:
                value = float(cell)
            except ValueError:
                value = -1.0
            if not 0 <= value <= MAX_CAPACITY or value != int(value):  # NaN and inf fail too
                raise TraceError(
                    f"{file}: line {line}: {header[z + 1]}: expected a non-negative integer "
                    f"<= {MAX_CAPACITY}, got {cell!r}"
                )
            columns[z].append(int(value))
    if len(times) >= 2:
        with np.errstate(over="ignore", invalid="ignore"):  # -1e308 to 1e308: inf, refused below
            steps = np.diff(np.asarray(times))
            gap = float(steps[0])
            even = gap > 0 and np.allclose(steps, gap, rtol=1e-6, atol=1e-6)
        if not even:
            raise TraceError(f"{file}: seconds: rows must be evenly spaced and increasing")
    else:
        gap = float(TICK_SECONDS)
    _check_span(file, "seconds", len(times), gap)
    zones = [location_for_zone(name) for name in header[1:]]
    series = [np.asarray(column, dtype=np.int64) for column in columns]
    return zones, series, [gap] * len(zones), [None] * len(zones)
