"""The `extra.unrouted` table outside the watcher: `routing reload`/`up` and `apply` record a replica
they took out of the router alive (its probe failed, or it is not READY) instead of cutting its
requests, and cut them once the replica is recorded gone, as the watcher does
(`Controller._sever_gone_unrouted`). The same table, so whichever runs next finds it."""

from __future__ import annotations

from typing import Any

from routing_support import record

from skyhedge import apply as apply_mod
from skyhedge.apply import UNROUTED_KEY, cut_gone_connections, note_unrouted
from skyhedge.controller import loop
from skyhedge.routing import Upstream
from skyhedge.state import ServiceState

A, B, C = "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"


class FakeRouter:
    """What `cut_gone_connections` asks of a router: running, serving `serving`, cutting."""

    def __init__(self, serving: list[str]) -> None:
        self.serving = serving
        self.cut: list[list[str]] = []

    def pid(self) -> int:
        return 1

    def status(self) -> dict[str, Any]:
        return {"upstreams": [{"id": f"x{i}", "endpoint": ep} for i, ep in enumerate(self.serving)]}

    def sever(self, endpoints: list[str]) -> int:
        self.cut.append(list(endpoints))
        return len(endpoints)


def three() -> ServiceState:
    state = ServiceState(service="echo")
    for rid, ep in (("r-1", A), ("r-2", B), ("r-3", C)):
        state.replicas[rid] = record(rid, ep)
    return state


def test_a_replica_taken_out_alive_is_recorded_not_one_gone_or_draining():
    state = three()
    state.replicas["r-2"].gone_at = 5.0  # gone: cut at once, by `served` (not this table)
    state.replicas["r-3"].draining = True  # released: its drain waits for its requests
    served = [("r-1", A), ("r-2", B), ("r-3", C)]
    assert note_unrouted(state, served, []) == ["r-1"]
    assert state.extra[UNROUTED_KEY] == {"r-1": A}


def test_a_replica_routed_again_leaves_the_table():
    state = three()
    note_unrouted(state, [("r-1", A), ("r-2", B)], [Upstream("r-2", B)])
    assert state.extra[UNROUTED_KEY] == {"r-1": A}
    assert note_unrouted(state, [("r-2", B)], [Upstream("r-1", A), Upstream("r-2", B)]) == []
    assert UNROUTED_KEY not in state.extra


def test_a_replica_recreated_under_its_id_at_another_endpoint_has_the_old_machine_cut():
    """Taken out alive, then re-created under its ID on another machine and routed there: the
    machine taken out is gone, so its requests in flight are cut, not forgotten (as the watcher
    does)."""
    state = three()
    note_unrouted(state, [("r-1", A)], [])
    state.replicas["r-1"] = record("r-1", "http://10.0.0.9:8000")
    assert note_unrouted(state, [], [Upstream("r-1", "http://10.0.0.9:8000")]) == []
    assert state.extra[UNROUTED_KEY] == {"r-1": A}
    router = FakeRouter(["http://10.0.0.9:8000"])
    said: list[str] = []
    assert cut_gone_connections(router, state, [], said.append, said.append) == 1
    assert router.cut == [[A]] and UNROUTED_KEY not in state.extra


def test_an_unrouted_replica_is_cut_once_gone_and_only_then():
    """`apply`, `routing reload` and `up` all cut through `cut_gone_connections`."""
    state = three()
    state.extra[UNROUTED_KEY] = {"r-1": A, "r-3": C}
    router = FakeRouter([B])
    said: list[str] = []
    assert cut_gone_connections(router, state, [("r-2", B)], said.append, said.append) == 0
    assert router.cut == [] and state.extra[UNROUTED_KEY] == {"r-1": A, "r-3": C}  # alive: kept

    state.replicas["r-1"].gone_at = 9.0
    assert cut_gone_connections(router, state, [("r-2", B)], said.append, said.append) == 1
    assert router.cut == [[A]]
    assert said == [
        "routing: closed 1 connection(s) to gone r-1: a request not answered yet is retried on another "
        "replica within next_upstream_timeout of its start, others end (503, or a stream cut short)"
    ]
    assert state.extra[UNROUTED_KEY] == {"r-3": C}


def test_an_endpoint_a_live_replica_took_over_is_never_cut():
    """A replica gone whose address and port a new live replica has now: what nginx holds there
    is the new one's (not routed yet, or routed since)."""
    state = three()
    state.extra[UNROUTED_KEY] = {"r-1": A}
    state.replicas["r-1"].gone_at = 9.0
    state.replicas["r-4"] = record("r-4", A)
    router = FakeRouter([B, C])
    assert cut_gone_connections(router, state, [], print, print) == 0
    assert router.cut == [] and UNROUTED_KEY not in state.extra


def test_the_watcher_reads_the_same_table():
    assert loop.UNROUTED_KEY == apply_mod.UNROUTED_KEY == "unrouted"
