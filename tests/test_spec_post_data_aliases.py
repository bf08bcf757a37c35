"""A probe body built from YAML aliases is refused in one line, at once.

An alias inside its own anchor (`post_data: &a {x: *a}`) made the JSON check recurse until a
RecursionError traceback; a few lines of nested aliases ("billion laughs") stood for 10^7 values
and took 5 s and 330 MB to check (10^8: minutes and gigabytes), then were sent at every probe.
Found by an input audit (fuzzing the spec's text).
"""

from __future__ import annotations

import time

import pytest

from skyhedge.errors import SpecError
from skyhedge.spec import load_spec

HEAD = """\
name: echo
placement: {clouds: [local]}
run: {command: "python3 server.py"}
readiness_probe:
  post_data:
"""

LAUGHS = "".join(
    f"    {name}: &{name} [{', '.join([f'*{prev}' if prev else 'x'] * 10)}]\n"
    for prev, name in zip(["", *"abcdefg"], "abcdefgh", strict=True)
)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (
            "    a: &a {x: *a}\n",
            "nested at most 100 levels deep, got deeper (a YAML alias inside its own anchor",
        ),
        ("    a: &a [1, {b: *a}]\n", "nested at most 100 levels deep"),
        (LAUGHS, "expected at most 100000 values, got more (YAML aliases repeat"),
    ],
)
def test_an_alias_bomb_or_cycle_is_refused_in_one_line(write_spec, body, needle):
    path = write_spec(HEAD + body)
    start = time.monotonic()
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert time.monotonic() - start < 5
    assert str(err.value).startswith(f"{path}: readiness_probe.post_data: "), err.value
    assert needle in str(err.value)


def test_a_body_using_aliases_within_the_limits_loads(write_spec):
    spec = load_spec(write_spec(HEAD + "    a: &a {model: m, n: [1, 2]}\n    b: *a\n"))
    assert spec.readiness_probe.post_data == {
        "a": {"model": "m", "n": [1, 2]},
        "b": {"model": "m", "n": [1, 2]},
    }
