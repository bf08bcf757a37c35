"""The checks every spec section is read with: skyhedge's own (skyhedge.spec) and each cloud's
(`skyhedge/clouds/<cloud>/spec.py`, a plug-in cloud's too). Each returns the checked value or
raises `SpecError` naming the spec file and the field (one line, as the house rule says), so that
a cloud's section gives the messages every other section gives.

Kept apart from skyhedge.spec, which imports the built-in clouds' sections (to re-export
`AwsConfig`, `GcpConfig`): a cloud's section importing skyhedge.spec back would be a cycle.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from skyhedge.errors import SpecError

#: A region or zone as `placement` takes it (each cloud checks its own further).
ZONE_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")

#: The IPv4 ranges `ingress_cidrs` may lie in to count as private: IANA's special-purpose ranges,
#: not reached from the internet (RFC 1918's 10/8, 172.16/12 and 192.168/16 among them), as
#: Python 3.11 and 3.12 list them, and RFC 6598's 100.64.0.0/10 (which `is_private` leaves out,
#: but which the internet does not route to either: AWS and GCP networks may be numbered from
#: it). Spelled out rather than read from `ipaddress`'s `is_private`, whose answer depends on the
#: Python release: on 3.10 (CPython gh-82836, fixed in 3.11) `0.0.0.0/0`, the default
#: `ingress_cidrs`, is private, so every default spec routed to the replicas' private IPs, which a
#: router outside the network cannot reach; 3.13 widened 192.0.0.0/29 to 192.0.0.0/24.
PRIVATE_NETWORKS: tuple[ipaddress.IPv4Network, ...] = tuple(
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",  # shared address space (RFC 6598): no internet route; VPCs are numbered from it
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/29",
        "192.0.0.170/31",
        "192.0.2.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "240.0.0.0/4",
        "255.255.255.255/32",
    )
)


def private_only(cidrs: Sequence[str]) -> bool:
    """Whether the replicas' port is open to private address ranges only: the router is then
    inside the network (or a peered one), and a connection to a replica's public IP would come
    from a public address the firewall refuses, so the endpoint is the private IP."""

    def private(cidr: str) -> bool:
        net = ipaddress.ip_network(cidr, strict=False)
        return isinstance(net, ipaddress.IPv4Network) and any(net.subnet_of(p) for p in PRIVATE_NETWORKS)

    return bool(cidrs) and all(private(c) for c in cidrs)


class SpecContext:
    """The spec being read (`file`, shown in every error): `fail(path, message)` is the one-line
    `SpecError` naming the file and the field, which the caller raises."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, path: str, message: str) -> SpecError:
        return SpecError(message, file=self.file, path=display_path(path) or None)


def display_path(path: str) -> str:
    """`path` for a one-line message: a key the user wrote with a line break, a tab or other
    invisible characters in it (or an empty one) is shown quoted, so it is seen and the error
    stays one line."""
    if _plain(path):
        return path
    return ".".join(seg if seg and _plain(seg) else repr(seg) for seg in path.split("."))


def _plain(text: str) -> bool:
    return text.isprintable() and not any(c.isspace() for c in text)


def kind(value: Any) -> str:
    """What a value is, without the value (for fields that may hold secrets)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer (quote it)"
    if isinstance(value, float):
        return "a number (quote it)"
    return type(value).__name__ if isinstance(value, (list, dict)) else "null" if value is None else "a value"


def show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return str(value)
    return type(value).__name__ if isinstance(value, (list, dict)) else repr(value)


def mapping(ctx: SpecContext, path: str, value: Any, allowed: set[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ctx.fail(path, f"expected a mapping, got {show(value)}")
    for key in value:
        if not isinstance(key, str):
            raise ctx.fail(path, f"expected string keys, got {show(key)}")
        if key not in allowed:
            where = f"{path}.{key}" if path else key
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(sorted(allowed))})"
            raise ctx.fail(where, f"unknown field{hint}")
    return dict(value)


def integer(ctx: SpecContext, path: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        bound = _bounds(lo, hi)
        raise ctx.fail(path, f"expected an integer{bound}, got {show(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ctx.fail(path, f"expected an integer{_bounds(lo, hi)}, got {value}")
    return int(value)  # a plain int, not the loader's int that remembers its text


def _bounds(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def number(
    ctx: SpecContext,
    path: str,
    value: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    open_lo: bool = False,
) -> float:
    """A finite int or float within the bounds. Non-finite values are refused first: `.inf` passes
    a lower-only bound (`target_qps_per_replica`) and `.nan` passes every comparison."""
    word = f" > {lo}" if open_lo and hi is None else _bounds(lo, hi)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ctx.fail(path, f"expected a number{word}, got {show(value)}")
    try:
        v = float(value)
    except OverflowError:  # an integer literal too large for a float
        v = math.inf
    if not math.isfinite(v):
        raise ctx.fail(path, f"expected a finite number{word}, got {value}")
    if (lo is not None and (v < lo or (open_lo and v == lo))) or (hi is not None and v > hi):
        raise ctx.fail(path, f"expected a number{word}, got {value}")
    return v


def boolean(ctx: SpecContext, path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ctx.fail(path, f"expected true or false, got {show(value)}")
    return value


def string(ctx: SpecContext, path: str, value: Any, *, nonempty: bool = True) -> str:
    if not isinstance(value, str):
        raise ctx.fail(path, f"expected a string, got {show(value)}")
    if nonempty and not value.strip():
        raise ctx.fail(path, "expected a non-empty string")
    return value


def cidr_check(ctx: SpecContext) -> Callable[[str, str], None]:
    def check(path: str, text: str) -> None:
        # what the security group's cidr_blocks take: IPv4, written as its network address
        try:
            if "/" not in text:
                raise ValueError("no prefix length")
            ipaddress.IPv4Network(text, strict=True)
        except ValueError:
            raise ctx.fail(
                path, f"expected an IPv4 CIDR block (its network address) such as '10.0.0.0/8', got {text!r}"
            ) from None

    return check


def matching(ctx: SpecContext, path: str, value: Any, pattern: re.Pattern[str], what: str) -> str | None:
    """An optional string that must be `what` (`pattern`): cloud names go into API calls."""
    if value is None:
        return None
    text = string(ctx, path, value)
    if not pattern.fullmatch(text):
        raise ctx.fail(path, f"expected {what}, got {show(text)}")
    return text


def choice(ctx: SpecContext, path: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1) if isinstance(value, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ctx.fail(path, f"expected one of {', '.join(choices)}, got {show(value)}{hint}")
    return value


def str_list(
    ctx: SpecContext, path: str, value: Any, check: Callable[[str, str], None] | None = None
) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ctx.fail(path, f"expected a list of strings, got {show(value)}")
    out: list[str] = []
    for i, item in enumerate(value):
        item_path = f"{path}[{i}]"
        s = string(ctx, item_path, item)
        if check:
            check(item_path, s)
        if s in out:
            raise ctx.fail(item_path, f"duplicate entry {s!r}")
        out.append(s)
    return tuple(out)


def str_map(ctx: SpecContext, path: str, value: Any, *, numbers: bool = True) -> dict[str, str]:
    """A mapping of non-empty string keys to strings. With `numbers`, numeric values are taken
    as their text (`PORT: 8000` in `run.env`); without, only strings are (probe headers)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ctx.fail(path, f"expected a mapping of strings, got {show(value)}")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k:
            expected = "non-empty keys" if isinstance(k, str) else "string keys"
            raise ctx.fail(path, f"expected {expected}, got {show(k)}")
        if isinstance(v, bool) or not isinstance(v, (str, int, float) if numbers else str):
            # (the kind only: a probe header's value may be a secret, and errors reach logs)
            got = show(v) if numbers else kind(v)
            raise ctx.fail(f"{path}.{k}", f"expected a string, got {got}")
        # a number as the user wrote it: YAML 1.1 reads 0755 as 493, 1.10 as 1.1 and 1:30 as 90
        out[k] = getattr(v, "yaml_text", None) or str(v)
    return out


# --------------------------------------------------------------------------------------------
