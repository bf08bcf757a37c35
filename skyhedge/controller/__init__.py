"""The controller behind `skyhedge watch` and `skyhedge up`: it closes the loop.

    events (clouds) -> facts (state) -> plan (policy) -> apply changed roots -> probes -> routing

Modules, one job each:
    loop.py        `Controller.tick() -> next_delay`: the reconcile pass
    facts.py       events, probe results -> facts in the state
    supervisor.py  runs ticks, wakes on events, backs off on errors
    runner.py      `Watcher`: lock + sources + executor + router + supervisor for one spec;
                   re-reads the spec between passes
    presence.py    <state dir>/watcher.json: the running watcher, for `status` and `reload`
    ports.py       the seams (Executor, RouterPort, Prober) the loop is written against
    executor.py    Terraform executor (skyhedge.apply's steps); gitops.py: commit instead
    adapters.py    nginx router and HTTP readiness probes
    market.py      replay a spot-capacity trace onto local zones
    dashboard.py   the live view of `skyhedge up`
"""

from skyhedge.controller.loop import Controller, ControllerOptions
from skyhedge.controller.runner import Watcher, event_sources
from skyhedge.controller.supervisor import Supervisor

__all__ = ["Controller", "ControllerOptions", "Supervisor", "Watcher", "event_sources"]
