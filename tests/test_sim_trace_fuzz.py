"""Any trace directory, however wrong, is simulated or refused in one line naming the file.

Property test: a small valid directory of zone files in the shared traces' format, with one
value anywhere in one file replaced by something odd (a string, null, NaN, a negative or huge
number, a nested list...), a key dropped or added, or the file replaced by non-JSON. `simulate`
must either run or exit 1 with one `error:` line that names the directory or a file in it:
never a traceback.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_spec_fuzz import _drop, _get, _paths, _set

from skyhedge.cli import main

ZONES = ("us-east-1a", "us-east-1b", "us-west-2a")
BASE: dict[str, dict[str, Any]] = {
    zone: {
        "metadata": {"gap_seconds": 300},
        "data": [(i * (k + 3)) % 5 for i in range(300)],
        "prices": [0.9 + 0.01 * k] * 300,
    }
    for k, zone in enumerate(ZONES)
}

ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 0.5, 1e308, -0.0, math.nan, math.inf, -math.inf, 10**9]),
    st.text(max_size=6),
    st.lists(st.integers(min_value=-3, max_value=3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@st.composite
def damaged_dirs(draw: st.DrawFn) -> tuple[str, Any]:
    """(zone whose file is damaged, its new content: a JSON-able document or raw text)."""
    zone = draw(st.sampled_from(ZONES))
    doc = copy.deepcopy(BASE[zone])
    action = draw(st.sampled_from(["replace", "replace", "replace", "drop", "add", "text"]))
    if action == "text":
        return zone, draw(st.sampled_from(["", "{", "[1, 2]", "null", '{"data": "x"}', "\ufeff{}"]))
    paths = [p for p in _paths(doc) if not (len(p) == 2 and isinstance(p[1], int) and p[1] > 3)]
    path = draw(st.sampled_from(paths))
    if action == "drop":
        _drop(doc, path)
    elif action == "add" and isinstance(_get(doc, path), dict):
        _set(doc, (*path, draw(st.text(max_size=6))), draw(ODD))
    else:
        _set(doc, path, draw(ODD))
    return zone, doc


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damaged_dirs())
def test_a_damaged_trace_is_simulated_or_refused_in_one_line(tmp_path, damage):
    zone, content = damage
    root = tmp_path / "trace"
    root.mkdir(exist_ok=True)
    for z in ZONES:
        doc = content if z == zone else BASE[z]
        text = doc if isinstance(doc, str) else json.dumps(doc, allow_nan=True)
        (root / f"{z}_v100_1.json").write_text(text, encoding="utf-8")
    result = CliRunner().invoke(
        main,
        ["simulate", "--trace", str(root), "--policy", "spothedge,skyhedge", "--repeats", "1", "--json"],
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 1), result.output
    if result.exit_code == 1:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {root}"), result.stderr
    else:
        rows = json.loads(result.stdout)
        assert {r["policy"] for r in rows} == {"spothedge", "skyhedge"}


def test_the_undamaged_directory_simulates(tmp_path):
    """The base case runs, so the property above is not passing on refusals alone."""
    root = tmp_path / "trace"
    root.mkdir()
    for z in ZONES:
        (root / f"{z}_v100_1.json").write_text(json.dumps(BASE[z]))
    result = CliRunner().invoke(
        main, ["simulate", "--trace", str(root), "--policy", "skyhedge", "--repeats", "1", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert Path(root).exists()
