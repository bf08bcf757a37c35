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
from collections.abc import Callable
from typing import Any, ClassVar

from skyhedge._entry_points import declared
from skyhedge.errors import PolicyError
from skyhedge.policy.types import Decision, LaunchSpot, Observation, PolicyConfig


class Policy(ABC):
    """Base class of every placement policy."""

    name: ClassVar[str] = "policy"
    #: Keys of `snapshot()` that move at every decision whatever happens (a decision clock, a
    #: running average of the period between decisions) and cost little to lose: after a crash
    #: the policy restarts from values up to a minute old. A watcher writes a state whose only
    #: changes are these at most once a minute (`Controller.save`), instead of every pass;
    #: every other change of the memory is written at once.
    clock_memory: ClassVar[frozenset[str]] = frozenset()

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

    def shift_times(self, jump: float, moved: Callable[[float], bool]) -> int:
        """Move by `jump` seconds every time the memory holds (each one `moved` is asked about)
        that `moved` says was stamped before the wall clock jumped; returns how many moved.

        The controller calls it when the wall clock is stepped (NTP, an operator: see
        `Controller._follow_clock`), after moving the state's own times: a policy that measures
        ages from remembered times (the `skyhedge` policy's zone calm, its decision period) would
        otherwise read a clock set forward 2 h as 2 h without trouble everywhere, and release the
        hedge that trouble a minute earlier made it hold. Default: a memory holding no times."""
        return 0


_BUILTINS: dict[str, str] = {}


def register_builtin(name: str, target: str) -> None:
    _BUILTINS[name] = target


#: The entry point group of policy plug-ins (README, "Plug-in policies").
ENTRY_POINT_GROUP = "skyhedge.policies"


def available_policies(*, fresh: bool = False) -> list[str]:
    """The built-in policies and the installed plug-ins' names. The plug-ins are read once per
    process while the path is unchanged (`skyhedge._entry_points.declared`), which the watcher's
    spec loads (every pass) rely on; `fresh` reads them again: a name not found before is looked
    for once more so, so a plug-in installed while a watcher runs is found however it was."""
    names = set(_BUILTINS)
    names.update(ep.name for ep in declared(ENTRY_POINT_GROUP, "policy plug-ins", fresh=fresh))
    return sorted(names)


def _load_target(target: str) -> type[Policy]:
    """The class `module:Class` names; `PolicyError` for anything that keeps it from loading.

    Importing runs the plug-in's module code, which may raise anything (a KeyError at import,
    a SyntaxError): each becomes one line naming the policy, like any other bad input, with
    the original chained for SKYHEDGE_DEBUG."""
    module_name, _, attr = target.partition(":")
    if not module_name.strip() or not attr.strip():
        raise PolicyError(f"policy {target!r}: expected 'module:Class'")
    if module_name.startswith("."):  # nothing for a relative import to be relative to
        raise PolicyError(f"policy {target!r}: expected an absolute module name, not a relative one")
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, attr)
    except (Exception, SystemExit) as exc:  # sys.exit() at import is a plug-in bug, not an exit
        raise PolicyError(f"policy {target!r}: cannot load ({type(exc).__name__}: {exc})") from exc
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise PolicyError(f"policy {target!r}: not a skyhedge.policy.Policy subclass")
    return cls


def policy_class(name: str) -> type[Policy]:
    """Resolve a policy by built-in name, entry point name or `module:Class`."""
    if name in _BUILTINS:
        return _load_target(_BUILTINS[name])
    # not found among the entry points kept: read them again, but for a `module:Class` name (the
    # spec takes one as such, never as an entry point), which `compute_plan` asks for at every
    # watcher pass: each pass read every distribution for it, the scan kept entry points save
    for fresh in (False, True) if ":" not in name else (False,):
        for ep in declared(ENTRY_POINT_GROUP, "policy plug-ins", fresh=fresh):
            if ep.name == name:
                return _load_target(ep.value)
    if ":" in name:
        return _load_target(name)
    raise PolicyError(
        f"unknown policy {name!r} (available: {', '.join(available_policies())} or 'module:Class')"
    )


def clock_memory(name: str) -> frozenset[str]:
    """`clock_memory` of the policy called `name`; none for a policy that does not load, or whose
    `clock_memory` is no collection of strings (a plug-in's mistake: its every change is written)."""
    try:
        keys = getattr(policy_class(name), "clock_memory", frozenset())
    except PolicyError:
        return frozenset()
    if not isinstance(keys, (frozenset, set, tuple, list)) or not all(isinstance(k, str) for k in keys):
        return frozenset()
    return frozenset(keys)


class GuardedPolicy(Policy):
    """A plug-in policy behind skyhedge's error boundary.

    A plug-in's bug (an exception, or decisions that are not a list of `Decision`) becomes one
    `PolicyError` naming the policy and the method, which `plan`, `watch` and `simulate` report
    as one line like any bad input; the original exception stays chained as its cause (the CLI
    prints it with SKYHEDGE_DEBUG=1). Built-in policies are not wrapped.
    """

    def __init__(
        self, inner: Policy, label: str, config: PolicyConfig | None = None, *, seed: int = 0
    ) -> None:
        # config and seed as given to the plug-in: one that never calls Policy.__init__ lacks them
        super().__init__(config, seed=seed)
        self.inner = inner
        self.label = label

    def decide(self, obs: Observation) -> list[Decision]:
        decisions = self._call("decide", obs)
        if not isinstance(decisions, list) or not all(isinstance(d, Decision) for d in decisions):
            raise PolicyError(
                f"policy {self.label!r}: decide() must return a list of Decision "
                f"(LaunchSpot, LaunchOnDemand, Terminate), got {decisions!r:.80}"
            )
        spot = {c.location for c in obs.candidates}
        anywhere = spot | {c.location for c in obs.ondemand_only}
        for d in decisions:
            where = getattr(d, "location", None)
            if where is not None and where not in anywhere:
                raise PolicyError(
                    f"policy {self.label!r}: decide() launched in {where.key}, which is not one of the "
                    "observation's candidates (the spec's placement)"
                )
            if isinstance(d, LaunchSpot) and where not in spot:
                raise PolicyError(
                    f"policy {self.label!r}: decide() launched spot in {where.key}, "
                    "which sells on-demand only"
                )
        return decisions

    def snapshot(self) -> dict[str, Any]:
        memory = self._call("snapshot")
        if not isinstance(memory, dict):
            raise PolicyError(f"policy {self.label!r}: snapshot() must return a dict, got {memory!r:.80}")
        return memory

    def restore(self, data: dict[str, Any]) -> None:
        self._call("restore", data)

    def shift_times(self, jump: float, moved: Callable[[float], bool]) -> int:
        count = self._call("shift_times", jump, moved)
        if isinstance(count, bool) or not isinstance(count, int):
            raise PolicyError(f"policy {self.label!r}: shift_times() must return an int, got {count!r:.80}")
        return count

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.inner, method)(*args)
        except PolicyError:
            raise
        except (Exception, SystemExit) as exc:  # sys.exit() in a plug-in is a bug too, not an exit
            raised = f"{type(exc).__name__}: {exc}"
            raise PolicyError(f"policy {self.label!r}: {method}() raised {raised}") from exc


def make_policy(name: str, config: PolicyConfig | None = None, *, seed: int = 0) -> Policy:
    """A fresh policy by name; plug-ins (entry points, `module:Class`) come guarded."""
    cls = policy_class(name)
    if name in _BUILTINS:
        return cls(config, seed=seed)
    try:
        policy = cls(config, seed=seed)
    except PolicyError:
        raise
    except Exception as exc:
        raise PolicyError(f"policy {name!r}: could not be created: {type(exc).__name__}: {exc}") from exc
    return GuardedPolicy(policy, name, config, seed=seed)
