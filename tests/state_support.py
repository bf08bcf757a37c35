"""A service's first plan recorded in its state dir, as an apply records it before Terraform runs:
what the killed-apply tests of each cloud (moto_support, test_leftovers_gcp) start from."""

from __future__ import annotations

import time
from pathlib import Path

from skyhedge.apply import record_plan
from skyhedge.leftovers import deployment_id
from skyhedge.service import compute_plan, resolve_placement
from skyhedge.spec import ServiceSpec
from skyhedge.state import ServiceState, save_state


def first_plan_recorded(spec: ServiceSpec, state_dir: Path) -> tuple[ServiceState, str]:
    """Plan `spec` from nothing, record the plan and save the state in `state_dir`; returns the
    state and its deployment ID (what the modules tag or label the replicas' machines with)."""
    state = ServiceState(service=spec.name)
    now = time.time()
    placement = resolve_placement(spec)
    plan, memory = compute_plan(spec, state, now=now, placement=placement)
    record_plan(state, plan, memory, placement, now)
    deployment = deployment_id(state)  # made at its first ask, kept in the state: before saving it
    save_state(state_dir, state)
    return state, deployment
