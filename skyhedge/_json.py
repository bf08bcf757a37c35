"""What `json.loads` refuses besides a syntax error, for the loaders of user files.

`json` raises a plain `ValueError` (not `JSONDecodeError`) on an integer of more than 4300 digits
and a `RecursionError` on arrays or objects nested past the recursion limit, and it accepts a
lone UTF-16 surrogate escape (`"\\ud800"`) that no UTF-8 output can print. Each loader (state,
catalog, prices, traces) names its file in one line for these, as for a syntax error.
"""

from __future__ import annotations

import json
import math
from typing import Any

#: Catch these after `json.JSONDecodeError` (a subclass of ValueError) when loading a user file.
JSON_LIMITS = (ValueError, RecursionError)


def json_limit(exc: BaseException) -> str:
    """The limit `exc` (one of JSON_LIMITS) stands for, in words (not Python's own advice)."""
    return "nested too deeply" if isinstance(exc, RecursionError) else "a number with too many digits"


def has_lone_surrogate(data: Any) -> bool:
    """Parsed JSON holds a string no UTF-8 output can show (a lone `\\ud800` escape)."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def finite(data: Any) -> Any:
    """`data` (a JSON value) with every number that is not finite (NaN, Infinity) as null.

    What `--json` prints must be JSON, which has no such numbers: `json.dumps` writes them as
    `NaN` and `Infinity` by default, and a strict parser (jq, Go's encoding/json, JavaScript's
    JSON.parse) then refuses the whole document. They reached `status --json` from a state or
    capacity file edited by hand (`1e999` reads as Infinity), where null (unknown, none) is
    what a script can take."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(value) for value in data]
    return data


def dumps(data: Any, **options: Any) -> str:
    """`data` as strict JSON text (`finite`: NaN and Infinity as null), for `--json` outputs."""
    return json.dumps(finite(data), allow_nan=False, **options)
