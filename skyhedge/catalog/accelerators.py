"""Parsing SkyPilot-style accelerator strings ("A10G:1", "T4", "A100-80GB:8")."""

from __future__ import annotations

import re

from skyhedge.errors import CatalogError

_ACCELERATOR = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]*)(?::(?P<count>[^:]*))?$")


def parse_accelerator(text: str) -> tuple[str, int]:
    """`"A10G:1"` -> `("A10G", 1)`; a bare name means one (SkyPilot's convention).

    The name is returned as written: catalog lookups match it case-insensitively. Fractional or
    zero counts are refused because skyhedge places whole machines.
    """
    if not isinstance(text, str):
        raise CatalogError(f"accelerator: expected a string like 'A10G:1', got {text!r}")
    m = _ACCELERATOR.match(text.strip())
    if m is None:
        raise CatalogError(f"accelerator: expected NAME or NAME:COUNT like 'A10G:1', got {text!r}")
    count_text = m.group("count")
    if count_text is None:
        return m.group("name"), 1
    if not count_text.isdigit() or int(count_text) < 1:
        raise CatalogError(f"accelerator {text!r}: expected a whole count >= 1 after ':', got {count_text!r}")
    return m.group("name"), int(count_text)
