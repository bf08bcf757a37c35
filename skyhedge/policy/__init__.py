"""Pure placement policies. Nothing in this package does I/O (see DESIGN.md, "Walls")."""

from skyhedge.policy.base import Policy, available_policies, make_policy, policy_class, register_builtin
from skyhedge.policy.types import (
    Candidate,
    Decision,
    EventKind,
    LaunchOnDemand,
    LaunchSpot,
    Location,
    Market,
    Observation,
    PolicyConfig,
    ReplicaFact,
    ReplicaStatus,
    Terminate,
    ZoneEvent,
)

for _name, _target in {
    "spothedge": "skyhedge.policy.spothedge:SpotHedge",
    "skyserve": "skyhedge.policy.spothedge:SkyServe",
    "ondemand": "skyhedge.policy.baselines:OnDemandOnly",
    "even": "skyhedge.policy.baselines:EvenSpread",
    "rr": "skyhedge.policy.baselines:RoundRobin",
    "single-region": "skyhedge.policy.baselines:SingleRegion",
    "skyhedge": "skyhedge.policy.skyhedge:SkyHedge",
}.items():
    register_builtin(_name, _target)

__all__ = [
    "Candidate",
    "Decision",
    "EventKind",
    "LaunchOnDemand",
    "LaunchSpot",
    "Location",
    "Market",
    "Observation",
    "Policy",
    "PolicyConfig",
    "ReplicaFact",
    "ReplicaStatus",
    "Terminate",
    "ZoneEvent",
    "available_policies",
    "make_policy",
    "policy_class",
]
