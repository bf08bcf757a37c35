"""Fakes for the controller's seams (Terraform executor, router, prober, event source, clock).

Each records its calls and can be told to fail, so tests assert what the controller asked for.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from skyhedge.controller.ports import ApplyReport, Present, Root, root_key
from skyhedge.events import EventSource, PreemptionEvent
from skyhedge.planner import Plan
from skyhedge.state import ReplicaRecord


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeExecutor:
    """Keeps a fake Terraform state per root: {root_key: {replica_id: zone}}."""

    def __init__(self) -> None:
        self.tf: dict[str, dict[str, str]] = {}
        self.calls: list[tuple[list[str], list[str]]] = []  # (roots, desired ids)
        self.refuse_zones: set[str] = set()
        self.fail_next: str | None = None
        self.crash_next = False

    def apply(self, plan: Plan, roots: Collection[Root], records: Sequence[ReplicaRecord]) -> ApplyReport:
        keys = [root_key(r) for r in roots]
        self.calls.append((keys, sorted(r.id for r in plan.desired if r.root in set(roots))))
        if self.crash_next:
            self.crash_next = False
            raise KeyboardInterrupt("simulated kill mid-apply")
        if self.fail_next:
            text, self.fail_next = self.fail_next, None
            return ApplyReport(present={}, failed={k: text for k in keys})
        present: dict[str, Present] = {}
        failed: dict[str, str] = {}
        capacity: set[str] = set()
        for root in roots:
            key = root_key(root)
            state = self.tf.setdefault(key, {})
            wanted = {r.id: r.location.zone for r in plan.desired if r.root == root}
            spot = {r.id for r in plan.desired if r.market.value == "spot"}
            for rid in list(state):
                if rid not in wanted:
                    del state[rid]
            for rid, zone in wanted.items():
                if rid in state:
                    continue
                if zone in self.refuse_zones and rid in spot:
                    capacity.add(rid)
                    failed[key] = f"launch of {rid} refused: zone {zone} has no capacity"
                    continue
                state[rid] = zone
            for rid in state:
                port = 20000 + int(rid.split("-")[1])
                present[rid] = Present(rid, endpoint=f"http://127.0.0.1:{port}", cloud_id=f"id-{rid}")
        return ApplyReport(
            present=present,
            applied=frozenset(k for k in keys if k not in failed),
            failed=failed,
            capacity=frozenset(capacity),
        )

    def ids(self) -> set[str]:
        return {rid for root in self.tf.values() for rid in root}


class FakeRouter:
    def __init__(self) -> None:
        self.reloads: list[list[str]] = []
        self.drains = 0
        self.count: int | None = 0

    def reload(self, upstreams: Sequence[tuple[str, str]]) -> None:
        self.reloads.append([rid for rid, _ in upstreams])

    def drain(self, upstreams: Sequence[tuple[str, str]]) -> None:
        self.drains += 1
        self.reload(upstreams)

    def running(self) -> bool:
        return bool(self.reloads)

    def request_count(self) -> int | None:
        return self.count

    @property
    def current(self) -> list[str]:
        return self.reloads[-1] if self.reloads else []


class FakeProber:
    def __init__(self) -> None:
        self.down: set[str] = set()
        self.calls = 0

    def probe(self, records: Sequence[ReplicaRecord]) -> dict[str, tuple[bool, str]]:
        self.calls += 1
        return {r.id: (r.id not in self.down, "down" if r.id in self.down else "200") for r in records}


class FakeSource(EventSource):
    name = "fake"

    def __init__(self) -> None:
        self.queue: list[PreemptionEvent] = []
        self.acked = 0
        self.polls = 0

    def poll(self, now: float, live: Sequence[ReplicaRecord]) -> list[PreemptionEvent]:
        self.polls += 1
        out, self.queue = self.queue, []
        return out

    def ack(self) -> None:
        self.acked += 1
