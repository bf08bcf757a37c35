"""SkyHedge: SpotHedge's hedge, held only while it buys availability (draft under measurement)."""

from __future__ import annotations

from typing import Any, ClassVar

from skyhedge.errors import PolicyError
from skyhedge.policy.base import Policy
from skyhedge.policy.spothedge import is_ready, live_replicas
from skyhedge.policy.types import (
    Candidate,
    Decision,
    EventKind,
    LaunchOnDemand,
    LaunchSpot,
    Location,
    Observation,
    PolicyConfig,
    ReplicaFact,
    Terminate,
)

__all__ = ["SkyHedge"]

_DEFAULTS: dict[str, float] = {
    "shape": 0.7,  # hazard lambda(age) = shape / (age + scale)
    "scale": 1800.0,
    "prior_age": 3 * 3600.0,
    "target": 0.99,
    "slack": 1.0,
    "hyst": 0.5,
    "max_extra": -1.0,  # -1: num_overprovision + 1
    "od_mode": 0.0,  # 0: OD for alive-spot deficit at once; 1: only after spot failed
}


class SkyHedge(Policy):
    name: ClassVar[str] = "skyhedge"

    def __init__(self, config: PolicyConfig | None = None, *, seed: int = 0) -> None:
        super().__init__(config, seed=seed)
        knobs = dict(_DEFAULTS)
        for key, value in self.config.extra.items():
            if key in knobs:
                knobs[key] = float(value)  # type: ignore[arg-type]
        if self.config.availability_target is not None:
            knobs["target"] = float(self.config.availability_target)
        self.k = knobs
        self._start: float | None = None
        self._on_since: dict[Location, float] = {}  # zone opened (age origin)
        self._closed: dict[Location, float] = {}  # zone refused/preempted at, not reopened
        self._cold = 120.0
        self._interval = 30.0
        self._last_now: float | None = None
        self._extra = 0

    # -- memory -------------------------------------------------------------------------------

    def _observe(self, obs: Observation) -> None:
        now = obs.now
        if self._start is None:
            self._start = now
        if self._last_now is not None and now > self._last_now:
            self._interval = 0.8 * self._interval + 0.2 * (now - self._last_now)
        self._last_now = now
        held: set[Location] = set()
        for r in obs.replicas:
            if r.is_spot and r.gone_at is None:
                held.add(r.location)
            if r.ready_at is not None and r.ready_at - r.launched_at > self._cold:
                self._cold = r.ready_at - r.launched_at
        for e in obs.events:
            loc = e.location
            if e.kind is EventKind.LAUNCHED:
                if loc in self._closed:
                    del self._closed[loc]
                    self._on_since[loc] = e.at
            elif e.kind is EventKind.PREEMPTED or e.kind is EventKind.WARNING:
                self._closed[loc] = e.at
                self._on_since[loc] = e.at
            elif e.kind is EventKind.LAUNCH_FAILED:
                self._closed[loc] = e.at
                if loc not in held:
                    self._on_since[loc] = e.at

    def _hazard(self, loc: Location, now: float) -> float:
        start = self._start if self._start is not None else now
        origin = self._on_since.get(loc, start - self.k["prior_age"])
        return self.k["shape"] / (max(0.0, now - origin) + self.k["scale"])

    # -- planning -----------------------------------------------------------------------------

    @staticmethod
    def _exposure(counts: dict[Location, int], total: int, target: int, hz: dict[Location, float]) -> float:
        return sum(hz[z] for z, k in counts.items() if k and total - k < target)

    def _place(
        self, counts: dict[Location, int], total_other: int, target: int, hz: dict[Location, float],
        cands: tuple[Candidate, ...],
    ) -> Location | None:
        best = None
        best_key = None
        regions: dict[str, int] = {}
        for z, k in counts.items():
            if k:
                regions[z.region] = regions.get(z.region, 0) + k
        for i, c in enumerate(cands):
            z = c.location
            k = counts.get(z, 0)
            closed = z in self._closed
            key = (closed, k, regions.get(z.region, 0), hz[z], c.spot_price, self._closed.get(z, 0.0), i)
            if best_key is None or key < best_key:
                best, best_key = z, key
        return best

    def decide(self, obs: Observation) -> list[Decision]:
        self._observe(obs)
        n = obs.target
        cands = obs.candidates
        if n <= 0 or not cands:
            spot, od = live_replicas(obs)
            return [Terminate(r.id) for r in spot + od]
        now = obs.now
        hz = {c.location: self._hazard(c.location, now) for c in cands}
        spot, od = live_replicas(obs)
        counts: dict[Location, int] = {}
        for r in spot:
            counts[r.location] = counts.get(r.location, 0) + 1
        spot_ready = sum(1 for r in spot if is_ready(r))
        od_ready = sum(1 for r in od if is_ready(r))
        max_extra = int(self.k["max_extra"]) if self.k["max_extra"] >= 0 else self.config.num_overprovision + 1
        budget = (1.0 - self.k["target"]) * self.k["slack"] / (self._cold + self._interval)

        # Plan: greedily add replicas (to a hypothetical copy) until exposure is within budget.
        plan = dict(counts)
        adds: list[Location] = []
        total = len(spot)
        extra = 0
        while True:
            need_base = total < n
            exp = self._exposure(plan, total, n, hz)
            limit = budget if extra >= self._extra else budget * self.k["hyst"]
            if not need_base and (exp <= budget or extra >= max_extra):
                break
            z = self._place(plan, total, n, hz, cands)
            if z is None:
                break
            plan[z] = plan.get(z, 0) + 1
            adds.append(z)
            total += 1
            if total > n:
                extra += 1
            del limit
        decisions: list[Decision] = [LaunchSpot(z) for z in adds]
        # Drop surplus spot replicas (extra no longer needed, with hysteresis).
        if not adds and len(spot) > n:
            keep = list(spot)
            while len(keep) > n:
                cur = {}
                for r in keep:
                    cur[r.location] = cur.get(r.location, 0) + 1
                best = None
                best_key = None
                for r in keep:
                    after = dict(cur)
                    after[r.location] -= 1
                    e = self._exposure(after, len(keep) - 1, n, hz)
                    key = (e, is_ready(r), -r.launched_at)
                    if best_key is None or key < best_key:
                        best, best_key = r, key
                assert best is not None and best_key is not None
                if best_key[0] > budget * self.k["hyst"]:
                    break
                keep.remove(best)
                decisions.append(Terminate(best.id))
            spot_total = len(keep)
        else:
            spot_total = len(spot) + len(adds)
        self._extra = max(0, spot_total - n)

        # On-demand: only for the spot replicas we do not have (alive), kept while READY ones cover a gap.
        spot_alive = len(spot) if self.k["od_mode"] < 0.5 else min(len(spot) + len(adds), n)
        od_target = max(0, n - spot_alive)
        od_keep = max(od_target, min(od_ready, max(0, n - spot_ready)))
        od_keep = min(od_keep, n)
        if len(od) < od_target:
            best_od = min(cands, key=lambda c: c.ondemand_price).location
            decisions.extend(LaunchOnDemand(best_od) for _ in range(od_target - len(od)))
        elif len(od) > od_keep:
            order = sorted(od, key=lambda r: (is_ready(r), -r.launched_at))
            decisions.extend(Terminate(r.id) for r in order[: len(od) - od_keep])
        return decisions

    # -- persistence --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "start": self._start,
            "on_since": {z.key: t for z, t in sorted(self._on_since.items())},
            "closed": {z.key: t for z, t in sorted(self._closed.items())},
            "cold": self._cold,
            "interval": self._interval,
            "last_now": self._last_now,
            "extra": self._extra,
        }

    def restore(self, data: dict[str, Any]) -> None:
        try:
            self._start = data.get("start")
            self._on_since = {Location.parse(k): float(v) for k, v in data.get("on_since", {}).items()}
            self._closed = {Location.parse(k): float(v) for k, v in data.get("closed", {}).items()}
            self._cold = float(data.get("cold", 120.0))
            self._interval = float(data.get("interval", 30.0))
            self._last_now = data.get("last_now")
            self._extra = int(data.get("extra", 0))
        except (ValueError, TypeError, AttributeError) as exc:
            raise PolicyError(f"{self.name}: bad snapshot ({exc})") from exc


def _unused(_: ReplicaFact) -> None:  # pragma: no cover - keeps imports honest in the draft
    return None
