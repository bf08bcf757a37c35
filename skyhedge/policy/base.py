"""The policy interface and the registry of policies (built-in and plug-ins).

A policy is an object with per-service memory (e.g. which zones are PREEMPTED) that turns one
`Observation` into a list of decisions. It must be pure: the same sequence of observations gives
the same decisions (randomness only from the `seed` it was built with). `snapshot()`/`restore()`
let the controller persist that memory across restarts.

Plug-ins: a package exposes a `Policy` subclass under the `skyhedge.policies` entry point group,
or the user names it as `module:Class` (e.g. `--policy mypkg.policies:Greedy`).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from importlib.metadata import entry_points
from typing import Any, ClassVar

from skyhedge.errors import PolicyError
from skyhedge.policy.types import Decision, Observation, PolicyConfig


class Policy(ABC):
    """Base class of every placement policy."""

    name: ClassVar[str] = "policy"

    def __init__(self, config: PolicyConfig | None = None, *, seed: int = 0) -> None:
        self.config = config or PolicyConfig()
        self.seed = seed

    @abstractmethod
    def decide(self, obs: Observation) -> list[Decision]:
        """Return the decisions for this observation (launches and terminations)."""

    def snapshot(self) -> dict[str, Any]:
        """The policy's memory as JSON-able data (default: none)."""
        return {}

    def restore(self, data: dict[str, Any]) -> None:  # noqa: B027 - optional hook, memoryless by default
        """Load memory saved by `snapshot()`."""


_BUILTINS: dict[str, str] = {}


def register_builtin(name: str, target: str) -> None:
    _BUILTINS[name] = target


def available_policies() -> list[str]:
    names = set(_BUILTINS)
    names.update(ep.name for ep in entry_points(group="skyhedge.policies"))
    return sorted(names)


def _load_target(target: str) -> type[Policy]:
    module_name, _, attr = target.partition(":")
    if not attr:
        raise PolicyError(f"policy {target!r}: expected 'module:Class'")
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise PolicyError(f"policy {target!r}: cannot load ({exc})") from exc
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise PolicyError(f"policy {target!r}: not a skyhedge.policy.Policy subclass")
    return cls


def policy_class(name: str) -> type[Policy]:
    """Resolve a policy by built-in name, entry point name or `module:Class`."""
    if name in _BUILTINS:
        return _load_target(_BUILTINS[name])
    for ep in entry_points(group="skyhedge.policies"):
        if ep.name == name:
            return _load_target(ep.value)
    if ":" in name:
        return _load_target(name)
    raise PolicyError(f"unknown policy {name!r} (available: {', '.join(available_policies())})")


def make_policy(name: str, config: PolicyConfig | None = None, *, seed: int = 0) -> Policy:
    return policy_class(name)(config, seed=seed)
