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
    "od_mode": 0.0,
    "beta": 1.0,
    "reprobe": 300.0,  # 0: OD for alive-spot deficit at once; 1: only after spot failed
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
        self._now = 0.0

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

    def _exposure(self, counts: dict[Location, int], total: int, target: int, hz: dict[Location, float]) -> float:
        slack = total - target
        if slack < 0:
            slack = 0
        beta = self.k["beta"]
        return sum(hz[z] * (1.0 + beta * (k - slack - 1)) for z, k in counts.items() if k > slack)

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
            closed_at = self._closed.get(z)
            closed = closed_at is not None and self._now - closed_at < self.k["reprobe"]
            counts[z] = k + 1
            exp = self._exposure(counts, total_other + 1, target, hz)
            counts[z] = k
            key = (closed, exp, k, regions.get(z.region, 0), hz[z], c.spot_price, self._closed.get(z, 0.0), i)
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
        self._now = now
        hz = {c.location: self._hazard(c.location, now) for c in cands}
        spot, od = live_replicas(obs)
        counts: dict[Location, int] = {}
        for r in spot:
            counts[r.location] = counts.get(r.location, 0) + 1
        spot_ready = sum(1 for r in spot if is_ready(r))
        od_ready = sum(1 for r in od if is_ready(r))
        max_extra = int(self.k["max_extra"]) if self.k["max_extra"] >= 0 else self.config.num_overprovision + 1
        budget = (1.0 - self.k["target"]) * self.k["slack"] / (self._cold + self._interval)

        theta = (1.0 - self.k["target"]) * self.k["slack"]
        dur = self._cold + self._interval

        def risk(plan: dict[Location, int], total: int) -> float:
            return dur * self._exposure(plan, total, n, hz)

        plan = dict(counts)
        adds: list[Location] = []
        total = len(spot)
        while total < n:
            z = self._place(plan, total, n, hz, cands)
            if z is None:
                break
            plan[z] = plan.get(z, 0) + 1
            adds.append(z)
            total += 1
        decisions: list[Decision] = []
        base_total = total
        cur_j = risk(plan, total) + theta * max(0, total - n)
        # Options: add up to max_extra - extra replicas, or remove surplus down to n.
        best_j, best_adds, best_victims = cur_j, list(adds), []
        trial = dict(plan)
        trial_adds = list(adds)
        t_total = total
        while t_total - n < max_extra:
            z = self._place(trial, t_total, n, hz, cands)
            if z is None:
                break
            trial[z] = trial.get(z, 0) + 1
            trial_adds.append(z)
            t_total += 1
            j = risk(trial, t_total) + theta * (t_total - n)
            if j < cur_j - theta * self.k["hyst"] and j < best_j:
                best_j, best_adds = j, list(trial_adds)
        if not adds and total > n:
            keep = list(spot)
            cur = dict(plan)
            removed: list[ReplicaFact] = []
            while len(keep) > n:
                best = None
                best_key = None
                for r in keep:
                    cur[r.location] -= 1
                    e = risk(cur, len(keep) - 1)
                    cur[r.location] += 1
                    key = (e, is_ready(r), -r.launched_at)
                    if best_key is None or key < best_key:
                        best, best_key = r, key
                assert best is not None and best_key is not None
                keep.remove(best)
                cur[best.location] -= 1
                removed.append(best)
                j = best_key[0] + theta * (len(keep) - n)
                forced = total - len(removed) - n >= max_extra
                if forced or j < cur_j - theta * self.k["hyst"] and j < best_j:
                    best_j, best_adds, best_victims = j, [], list(removed)
        decisions.extend(LaunchSpot(z) for z in best_adds)
        decisions.extend(Terminate(r.id) for r in best_victims)
        adds = best_adds
        spot_total = base_total - len(best_victims) + len(best_adds) - len(adds[: base_total - len(spot)])
        del spot_total

        # On-demand: only for the spot replicas we do not have (alive), kept while READY ones cover a gap.
        spot_alive = len(spot) - len(best_victims)
        if self.k["od_mode"] >= 0.5:
            spot_alive = min(spot_alive + len(adds), n)
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
