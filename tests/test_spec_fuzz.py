"""Any spec, however wrong, is either planned or refused with one line naming the file and field.

Property test: start from the shipped examples, then replace one value anywhere in them with
something odd (a wrong type, a huge or negative number, NaN, a control character, an empty
list...), drop a key, or add an unknown one. Parsing, placement, one plan decision and rendering
the Terraform must each either succeed or raise a `SkyhedgeError` whose message is one line
starting with the spec's file name: never a `TypeError`, `KeyError` or other crash that would
reach a user as a traceback.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skyhedge.clouds import RenderContext
from skyhedge.errors import SkyhedgeError
from skyhedge.render import render_tree
from skyhedge.service import compute_plan, resolve_placement
from skyhedge.spec import parse_spec
from skyhedge.state import ServiceState

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "/specs/fuzzed.yaml"
CONTEXT = RenderContext(
    state_dir=Path("/srv/skyhedge/state"), workdir=Path("/srv/skyhedge"), python="python3", pythonpath=""
)


def _example(name: str) -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "examples" / name / "service.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


BASES = [
    _example("local-echo"),
    {**_example("llm-multicloud"), "aws": {"events_queue": "skyhedge-events"}, "gcp": {"project": "p-1"}},
]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key/index path in `node`, inner nodes included (replacing a whole section counts)."""
    out: list[tuple[Any, ...]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append((*prefix, key))
            out.extend(_paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.append((*prefix, i))
            out.extend(_paths(value, (*prefix, i)))
    return out


ODD_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 65536, 10**12, 0.5, -0.0, math.inf, -math.inf, math.nan, 1e308]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", " ", "\n", "a\nb", "${x}", '"; rm -rf /', "us-east-1a", "L4:0", "H100:99", "-1"]),
)
ODD_VALUES = st.recursive(
    ODD_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _set(data: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


def _drop(data: Any, path: tuple[Any, ...]) -> None:
    for key in path[:-1]:
        data = data[key]
    del data[path[-1]]


@st.composite
def fuzzed_specs(draw: st.DrawFn) -> Any:
    data = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(min_value=1, max_value=2))):
        paths = _paths(data)
        action = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
        if action == "add" or not paths:
            parents = [()] + [p for p in paths if isinstance(_get(data, p), dict)]
            parent = draw(st.sampled_from(parents))
            _set(data, (*parent, draw(st.text(max_size=8))), draw(ODD_VALUES))
            continue
        path = draw(st.sampled_from(paths))
        if action == "drop":
            _drop(data, path)
        else:
            _set(data, path, draw(ODD_VALUES))
    return data


def _get(data: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        data = data[key]
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzzed_specs())
def test_a_fuzzed_spec_is_planned_or_refused_in_one_line_naming_the_file(data):
    try:
        spec = parse_spec(data, source=SOURCE)
        placement = resolve_placement(spec)
        plan, _ = compute_plan(spec, ServiceState(service=spec.name), now=0.0, placement=placement)
        render_tree(spec, plan, context=CONTEXT, instance_types=placement.instance_types)
    except SkyhedgeError as exc:
        message = str(exc)
        assert message.startswith(SOURCE), message
        assert "\n" not in message.strip(), message
