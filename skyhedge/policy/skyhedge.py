"""SkyHedge (draft v2): a per-decision optimiser of predicted unavailability + theta x cost."""

from __future__ import annotations

from typing import Any, ClassVar

from skyhedge.errors import PolicyError
from skyhedge.policy.base import Policy
from skyhedge.policy.spothedge import is_ready, live_replicas
from skyhedge.policy.types import (
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
    "shape": 0.7,
    "scale": 1800.0,
    "prior_age": 3 * 3600.0,
    "target": 0.99,
    "slack": 1.0,
    "h_add": 0.0,
    "h_rm": 0.5,
    "max_extra": -1.0,
    "beta": 1.0,
    "reprobe": 300.0,
    "full_resets": 1.0,
    "od_hedge": 1.0,
    "insure": 1.0,
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
        self._on_since: dict[Location, float] = {}
        self._closed: dict[Location, float] = {}
        self._cold = 120.0
        self._interval = 30.0
        self._last_now: float | None = None

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
            kind = e.kind
            if kind is EventKind.LAUNCHED:
                if loc in self._closed:
                    del self._closed[loc]
                    if loc not in held or self._on_since.get(loc, -1e18) < e.at:
                        pass
            elif kind is EventKind.PREEMPTED or kind is EventKind.WARNING:
                self._closed[loc] = e.at
                self._on_since[loc] = e.at
            elif kind is EventKind.LAUNCH_FAILED:
                self._closed[loc] = e.at
                if loc not in held or self.k["full_resets"] > 0.5:
                    self._on_since[loc] = e.at

    def _hazard(self, loc: Location, now: float) -> float:
        start = self._start if self._start is not None else now
        origin = self._on_since.get(loc, start - self.k["prior_age"])
        return self.k["shape"] / (max(0.0, now - origin) + self.k["scale"])

    # -- the model ----------------------------------------------------------------------------

    def _risk(self, counts: dict[Location, int], ondemand: int, n: int, hz: dict[Location, float]) -> float:
        """Predicted unavailability rate: P(a zone loses more than the slack) x outage length."""
        slack = sum(counts.values()) + ondemand - n
        if slack < 0:
            return 1e9 * -slack
        beta = self.k["beta"]
        total = 0.0
        for z, k in counts.items():
            if k > slack:
                total += hz[z] * (1.0 + beta * (k - slack - 1))
        return total * (self._cold + self._interval)

    def decide(self, obs: Observation) -> list[Decision]:
        self._observe(obs)
        n = obs.target
        cands = obs.candidates
        spot, od = live_replicas(obs)
        if n <= 0 or not cands:
            return [Terminate(r.id) for r in spot + od]
        now = obs.now
        k = self.k
        hz = {c.location: self._hazard(c.location, now) for c in cands}
        price = {c.location: c.spot_price for c in cands}
        ref = sum(price.values()) / len(price) or 1.0
        od_best = min(cands, key=lambda c: c.ondemand_price)
        w_od = od_best.ondemand_price / ref
        theta = (1.0 - k["target"]) * k["slack"]
        max_extra = int(k["max_extra"]) if k["max_extra"] >= 0 else self.config.num_overprovision + 1
        order = {c.location: i for i, c in enumerate(cands)}

        counts: dict[Location, int] = {}
        for r in spot:
            counts[r.location] = counts.get(r.location, 0) + 1
        spot_ready = sum(1 for r in spot if is_ready(r))
        od_ready = sum(1 for r in od if is_ready(r))

        def is_open(z: Location) -> bool:
            at = self._closed.get(z)
            return at is None or now - at >= k["reprobe"]

        def best_zone(plan: dict[Location, int], n_od: int, allow_closed: bool) -> Location | None:
            best = None
            best_key = None
            regions: dict[str, int] = {}
            for z, c in plan.items():
                if c:
                    regions[z.region] = regions.get(z.region, 0) + c
            for z in order:
                opened = is_open(z)
                if not opened and not allow_closed:
                    continue
                c = plan.get(z, 0)
                plan[z] = c + 1
                risk = self._risk(plan, n_od, n, hz)
                plan[z] = c
                key = (
                    not opened,
                    risk + theta * price[z] / ref,
                    c,
                    regions.get(z.region, 0),
                    hz[z],
                    self._closed.get(z, 0.0),
                    order[z],
                )
                if best_key is None or key < best_key:
                    best, best_key = z, key
            return best

        plan = dict(counts)
        adds: list[Location] = []
        # 1. Base: spot replicas for the missing ones; on-demand insures the ones not confirmed.
        od_need = max(0, n - len(spot)) if k["insure"] > 0.5 else 0
        n_od = max(len(od), od_need)
        total_spot = len(spot)
        while total_spot < n:
            any_open = any(is_open(z) for z in order)
            z = best_zone(plan, n_od, allow_closed=not any_open)
            if z is None:
                break
            plan[z] = plan.get(z, 0) + 1
            adds.append(z)
            total_spot += 1

        # 2. Improve: hedges (spot or on-demand) while they buy more availability than they cost.
        victims: list[ReplicaFact] = []
        live_spot = list(spot)
        od_keep_ready = min(od_ready, max(0, n - spot_ready))
        od_floor = max(od_need, od_keep_ready)
        for _ in range(2 * (n + max_extra) + 2):
            cur = self._risk(plan, n_od, n, hz) + theta * (
                sum(price[z] * c for z, c in plan.items()) / ref + w_od * n_od
            )
            moves: list[tuple[float, str, Any]] = []
            if total_spot - n < max_extra:
                z = best_zone(plan, n_od, allow_closed=False)
                if z is not None:
                    plan[z] = plan.get(z, 0) + 1
                    j = self._risk(plan, n_od, n, hz) + theta * (
                        sum(price[q] * c for q, c in plan.items()) / ref + w_od * n_od
                    )
                    plan[z] -= 1
                    if j < cur - theta * k["h_add"] * price[z] / ref:
                        moves.append((j, "spot+", z))
            if k["od_hedge"] > 0.5 and n_od < n:
                j = self._risk(plan, n_od + 1, n, hz) + theta * (
                    sum(price[q] * c for q, c in plan.items()) / ref + w_od * (n_od + 1)
                )
                if j < cur - theta * k["h_add"] * w_od:
                    moves.append((j, "od+", None))
            if total_spot > n and not adds:
                best_r = None
                best_key = None
                for r in live_spot:
                    if r in victims:
                        continue
                    plan[r.location] -= 1
                    risk = self._risk(plan, n_od, n, hz)
                    plan[r.location] += 1
                    key = (risk - theta * price[r.location] / ref, is_ready(r), -r.launched_at)
                    if best_key is None or key < best_key:
                        best_r, best_key = r, key
                if best_r is not None and best_key is not None:
                    j = cur + best_key[0] - self._risk(plan, n_od, n, hz)
                    if j < cur - theta * k["h_rm"] * price[best_r.location] / ref or total_spot - n > max_extra:
                        moves.append((j, "spot-", best_r))
            if n_od > od_floor and n_od > 0:
                j = self._risk(plan, n_od - 1, n, hz) + theta * (
                    sum(price[q] * c for q, c in plan.items()) / ref + w_od * (n_od - 1)
                )
                if j < cur - theta * k["h_rm"] * w_od:
                    moves.append((j, "od-", None))
            if not moves:
                break
            moves.sort(key=lambda m: m[0])
            _, kind, arg = moves[0]
            if kind == "spot+":
                plan[arg] = plan.get(arg, 0) + 1
                adds.append(arg)
                total_spot += 1
            elif kind == "spot-":
                plan[arg.location] -= 1
                victims.append(arg)
                total_spot -= 1
            elif kind == "od+":
                n_od += 1
            else:
                n_od -= 1

        decisions: list[Decision] = [LaunchSpot(z) for z in adds]
        decisions.extend(Terminate(r.id) for r in victims)
        if len(od) < n_od:
            decisions.extend(LaunchOnDemand(od_best.location) for _ in range(n_od - len(od)))
        elif len(od) > n_od:
            order_od = sorted(od, key=lambda r: (is_ready(r), -r.launched_at))
            decisions.extend(Terminate(r.id) for r in order_od[: len(od) - n_od])
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
        }

    def restore(self, data: dict[str, Any]) -> None:
        try:
            self._start = data.get("start")
            self._on_since = {Location.parse(k): float(v) for k, v in data.get("on_since", {}).items()}
            self._closed = {Location.parse(k): float(v) for k, v in data.get("closed", {}).items()}
            self._cold = float(data.get("cold", 120.0))
            self._interval = float(data.get("interval", 30.0))
            self._last_now = data.get("last_now")
        except (ValueError, TypeError, AttributeError) as exc:
            raise PolicyError(f"{self.name}: bad snapshot ({exc})") from exc
