"""SkyHedge: SpotHedge's hedge, held only while it buys availability (skyhedge's default policy).

SpotHedge (SkyServe, EuroSys '25) keeps N + N_extra spot replicas spread over the zones it
believes ACTIVE, plus on-demand replicas standing in for every spot replica not READY. The extra
replica is what keeps it available when a zone takes a replica away, but it is paid for every
second while, most seconds, nothing happens. SkyHedge *is* SpotHedge (a subclass: same zone memory,
reset rule, placement and on-demand fallback) with different rules for how many extra replicas to
hold and when to trust a spot replica. Each rule comes from a structure measured on the public
spot traces (`benchmarks/policy_report.py`, docs/policy.md), never from one trace:

1. **Zones age (the Lindy effect).** A zone's chance of losing capacity falls steeply with the time
   since it last had trouble: on every public trace a zone that has been fine for 8 h is 10-30x
   less likely to drop in the next minute than one in its first hour, close to a Lomax hazard
   lambda(a) = 0.7 / (a + 30 min) per second. SkyHedge remembers, per zone, when it last saw
   trouble there: a preemption, an interruption warning, a refused launch in a zone it does not
   hold, or a refusal in a zone now holding *fewer* of its replicas than it did before (capacity
   shrinking; a zone merely full at its usual size is not trouble). Trouble is assumed at start,
   dated PRIOR_AGE_SECONDS (one second) before it: trouble actually *seen* at start-up, a zone
   refusing the first launches, is evidence and the assumption is not, so that zone and its
   region-mates count as less calm than zones nothing was seen in (rules 4 and 6).
2. **The extra replica only while it buys availability.** Without the extra, each held zone z
   exposes the service to an outage of about one cold start plus one decision period (D) at rate
   lambda(age_z). The extra replica is released (never below N READY spot replicas) while
   D * sum_z lambda(age_z) <= 1 - availability_target, and comes back the moment trouble makes a
   held zone young again. `availability_target` (spec: `replica_policy.availability_target`,
   default 0.99) is thus the budget of predicted unhedged unavailability: 0.999 keeps the extra
   for more than a day after any trouble, 0.95 drops it after about an hour.
3. **On-demand until spot replicas settle.** Zones that just had trouble are most likely to have
   it again within minutes (a zone whose capacity shrank drops to zero within 15 minutes a third of
   the time). A READY spot replica counts as serving for the on-demand fallback only once its zone
   has been trouble-free for two cold starts; until then on-demand replicas cover it, so that
   losing the unsettled ones still leaves N. As in SpotHedge, on-demand also stands in for spot
   replicas that are not READY (at most N on-demand replicas, SpotHedge's cap). A rolling
   update's surge (`Observation.surge`) is not part of N, for this cover or for rule 2's hedge:
   the outdated replica it replaces still serves, so it is one spot replica more. Nor are a
   placement move's replacements of replicas outside it that serve meanwhile (also `surge`).
4. **Without the extra, consolidate.** When no extra replica is held, SkyHedge gathers the N
   replicas, one at a time, into the calmest held zone (the *anchor*), which exposes one zone
   instead of several (SpotHedge's layout also exposes one: the zone holding two). This holds in
   both kinds of market. Until a zone is seen holding only part of what was asked (a refusal while
   holding replicas, or a partial preemption), SkyHedge assumes a zone either has room for
   everything or for nothing; there, every zone holding a replica is a zone whose loss is an
   outage, so an extra replica helps only if it lets *every* zone hold one replica (N + 1 zones),
   and none is held otherwise. Once capacity is known to be finite, a consolidated zone is exposed
   only to shrinking below N, where N replicas spread over N zones are exposed to any of them
   emptying: measured on the recombined finite traces, consolidating there too raises availability
   at no extra cost (docs/policy.md). In finite pools the anchor is never a zone that refused a
   launch within HAZARD_SCALE: it may be full.
5. **Interruption warnings** (AWS two-minute notices, rebalance recommendations): the warned
   replica is treated as already lost for planning, so its replacement starts at once; it keeps
   serving until the cloud takes it, and its zone counts as troubled.

6. **Region-mates break ties** between equally calm zones (below).
7. **Finite pools: a zone that refused is not asked again for a while.** Once capacity is known to
   be finite, a zone that refused a launch in the last HAZARD_SCALE (30 min, the age at which the
   fitted hazard halves) gets no new replica while another ACTIVE zone can take it. SpotHedge's
   reset rule makes such a zone ACTIVE again within minutes and retries it over and over, while an
   on-demand replica stands in for the extra spot replica; skipping it stacks the extra in a held
   zone instead: a spot replica hedging a partial shrink, at a third of the price. All-or-nothing
   zones keep SpotHedge's retries (a stacked extra hedges nothing there).
8. **Many all-or-nothing zones: marked zones are asked again when the extra needs them.** While
   the extra replica is wanted but fewer than N + 1 zones are ACTIVE and fewer than half of the
   zones are, the zones marked PREEMPTED that have been calm for HAZARD_SCALE are made ACTIVE
   again, calmest first, as many as the spread needs. SpotHedge's reset waits until fewer than
   two zones are ACTIVE; in a nine-zone market that leaves most zones marked for hours, and
   skyhedge, with no N + 1 distinct zones for its extra (rule 4), held its replicas gathered in
   one zone through the most turbulent hours.

9. **A wave leaves the survivor squeezed.** When preemptions hit two or more zones within
   WAVE_WINDOW_SECONDS (30 s: one observation of the simulator; the watcher observes each zone's
   loss in a pass of its own) and the replicas are left gathered in a single zone, one on-demand
   replica stays for WAVE_HOLD_SECONDS (15 min) however calm that zone looks: when capacity
   vanishes in several zones at once, the zone that survived is where the displaced demand goes
   next, and a pool below its usual size drops again within 15 minutes a third of the time
   (docs/policy.md). On the paper's GCP trace a wave empties three zones and the survivor
   shrinks twice in the next ten minutes; without this rule skyhedge lost a second cold start
   there.

10. **The extra's on-demand stand-in only while the risk pays for it.** When the extra replica is
   wanted but no spot replica holds it (N are READY on spot, the extra is not), SpotHedge buys an
   on-demand replica in its place. It costs on-demand / spot times the spot extra (3x on the
   paper's traces), so skyhedge buys it only while the predicted unhedged risk of rule 2 exceeds
   the budget by that ratio: with the replicas in one zone, for about the first half hour after
   trouble there. On the paper's GCP trace the extra cannot be placed for the hour that a wave
   leaves one zone open, and the stand-in was most of skyhedge's on-demand cost.

Surplus spot replicas go from the most stacked zone (finite capacity, while an extra is held) or
the least stacked one (to consolidate), then the dearest, then the youngest, then the one whose
region-mates have been calm the least; not-ready ones first. Between equally calm zones the
consolidation anchor is likewise the one with the calmest region-mates: zones of one region share
capacity and its waves, so their calm is evidence about each other (this keeps the replicas out of
gcp-04-30-2023's lone us-east1-b zone, which drops once a day). A region is as calm as its least
calm mate, then as their summed calm: a sum alone favours a region for having many zones, troubled
ones included.

SkyServe's on-demand knobs hold as in SpotHedge: `base_ondemand_fallback_replicas` run on-demand
at all times (the rules above then place the other N - base as spot), and with
`dynamic_ondemand_fallback: false` no on-demand replica covers missing or unsettled spot ones.

Budget rules (tests check them): at most N on-demand replicas; spot replicas alive never above
N + N_extra + 1 (plus replacements of warned replicas); never fewer than N replicas asked for.
Pure and deterministic: time is `obs.now`, no I/O, no randomness (the seed is unused).
`snapshot()`/`restore()` carry the memory as JSON. For experiments, `PolicyConfig.extra` may
override `settle_seconds` and `prior_age_seconds` (trouble assumed that long before start-up).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, ClassVar

from skyhedge.errors import PolicyError
from skyhedge.policy.spothedge import SpotHedge, is_ready, live_replicas
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

__all__ = [
    "DEFAULT_TARGET",
    "HAZARD_SCALE",
    "HAZARD_SHAPE",
    "PRIOR_AGE_SECONDS",
    "WAVE_HOLD_SECONDS",
    "SkyHedge",
    "hazard",
]

#: Availability target used when the spec sets none.
DEFAULT_TARGET = 0.99
#: Hazard (per second) of a zone trouble-free for `a` seconds: HAZARD_SHAPE / (a + HAZARD_SCALE).
HAZARD_SHAPE = 0.7
HAZARD_SCALE = 1800.0
DEFAULT_COLD_START = 120.0
DEFAULT_INTERVAL = 30.0
MAX_INTERVAL = 300.0
#: A replica counts for the on-demand fallback once its zone was calm this many cold starts.
SETTLE_COLD_STARTS = 2.0
#: Rule 1: trouble assumed at start-up is dated this long before it, so that trouble seen at
#: start-up (a refused first launch) is younger than the assumption and breaks calm ties.
PRIOR_AGE_SECONDS = 1.0
#: Rule 9: how long one on-demand replica stays after a wave leaves the replicas in one zone.
WAVE_HOLD_SECONDS = 900.0
#: Rule 9: preemptions in several zones closer together than this are one wave. The simulator
#: observes every 30 s, so a wave there is one observation, as before; the watcher runs a pass
#: per event, so the zones of one wave reach it a few seconds apart.
WAVE_WINDOW_SECONDS = 30.0

_TROUBLE = frozenset({EventKind.PREEMPTED, EventKind.LAUNCH_FAILED, EventKind.WARNING})


def hazard(age_seconds: float) -> float:
    """Per-second chance that a zone trouble-free for `age_seconds` loses capacity."""
    return HAZARD_SHAPE / (max(0.0, age_seconds) + HAZARD_SCALE)


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise PolicyError(f"skyhedge: {name} must be a number, got {value!r}")
    return float(value)


class SkyHedge(SpotHedge):
    """SpotHedge with a risk-adaptive hedge (see the module docstring for the rules and why)."""

    name: ClassVar[str] = "skyhedge"
    # the decision clock and the running average of the period move at every pass; losing up to
    # a minute of them after a crash skews the period a restart's pause skews anyway (capped)
    clock_memory: ClassVar[frozenset[str]] = frozenset({"last_now", "interval"})

    def __init__(self, config: PolicyConfig | None = None, *, seed: int = 0) -> None:
        super().__init__(config, seed=seed)
        target = self.config.availability_target
        self.target = DEFAULT_TARGET if target is None else _number(target, "availability_target")
        if not 0.0 < self.target <= 1.0:
            raise PolicyError(f"skyhedge: availability_target must be in (0, 1], got {self.target}")
        extra = self.config.extra
        self._settle = (
            _number(extra["settle_seconds"], "settle_seconds") if "settle_seconds" in extra else None
        )
        self.prior_age = _number(extra.get("prior_age_seconds", PRIOR_AGE_SECONDS), "prior_age_seconds")
        # memory, all JSON-able through snapshot()
        self._start: float | None = None
        self._trouble: dict[Location, float] = {}  # last trouble seen per zone
        self._refused: dict[Location, float] = {}  # last refused launch per zone
        self._most_held: dict[Location, int] = {}  # most replicas a zone held at once
        self._partial = False  # a zone held only part of what was asked: capacity is finite
        self._warned: set[str] = set()
        self._cold = DEFAULT_COLD_START
        self._interval = DEFAULT_INTERVAL
        self._last_now: float | None = None
        self._wave_at: float | None = None  # last time preemptions had hit 2+ zones (rule 9)
        self._lost_at: dict[Location, float] = {}  # last preemption per zone (rule 9's window)

    # -- memory -------------------------------------------------------------------------------

    def _remember(self, obs: Observation, held: dict[Location, int]) -> None:
        now = obs.now
        if self._start is None:
            self._start = now
        if self._last_now is not None and now > self._last_now:
            # the decision period; a long pause (restart, test) is not one
            step = min(now - self._last_now, MAX_INTERVAL)
            self._interval = 0.8 * self._interval + 0.2 * step
        self._last_now = now
        kept: set[Location] = set()
        lost: set[Location] = set()
        for event in obs.events:
            kind = event.kind
            where = event.location
            if kind is EventKind.SURVIVED or kind is EventKind.LAUNCHED:
                kept.add(where)
                continue
            if kind not in _TROUBLE:
                continue
            if kind is EventKind.LAUNCH_FAILED:
                self._refused[where] = max(event.at, self._refused.get(where, event.at))
                if held.get(where):
                    self._partial = True  # keeps ours, refuses one more
                    if held[where] >= self._most_held.get(where, 0):
                        continue  # full at its usual size: not a sign of trouble
            elif kind is EventKind.PREEMPTED:
                lost.add(where)
                self._lost_at[where] = max(event.at, self._lost_at.get(where, event.at))
            elif kind is EventKind.WARNING and event.replica_id is not None:
                self._warned.add(event.replica_id)
            self._trouble[where] = max(event.at, self._trouble.get(where, event.at))
        if lost & kept:
            self._partial = True  # a zone took some of our replicas and left others
        if lost:
            # a wave: several zones lost within the window of the newest loss (rule 9); measured
            # between the losses' own times, not to `now`: the simulator reports a tick's events
            # at the next observation
            newest = max(self._lost_at.values())
            self._lost_at = {z: at for z, at in self._lost_at.items() if newest - at < WAVE_WINDOW_SECONDS}
            if len(self._lost_at) >= 2:
                self._wave_at = now
        for where, count in held.items():
            if count > self._most_held.get(where, 0):
                self._most_held[where] = count
        for replica in obs.replicas:
            if replica.ready_at is not None and replica.ready_at - replica.launched_at > self._cold:
                self._cold = replica.ready_at - replica.launched_at
        if self._warned:
            self._warned &= {r.id for r in obs.replicas}

    def zone_age(self, location: Location, now: float) -> float:
        """Seconds since trouble was last seen in `location` (trouble assumed at start-up)."""
        start = self._start if self._start is not None else now
        return now - self._trouble.get(location, start - self.prior_age)

    @property
    def outage_seconds(self) -> float:
        """Outage after an unhedged loss: a cold start plus one decision period."""
        return self._cold + self._interval

    @property
    def settle_seconds(self) -> float:
        return self._settle if self._settle is not None else SETTLE_COLD_STARTS * self._cold

    def region_calm(
        self, location: Location, candidates: tuple[Candidate, ...], now: float
    ) -> tuple[float, float]:
        """Evidence about `location`'s region: (least calm region-mate's age, summed mates' ages).

        Zones of one region share a capacity pool and its waves, so between two zones equally calm
        themselves, the one whose region-mates are calm too is the safer bet. The *least* calm mate
        comes first: a region where one zone just had trouble is a troubled region, however many
        zones it has (a sum alone would favour a region for having many zones, troubled ones
        included). A zone alone in its region has no such evidence: (0, 0). Only a tie-breaker:
        a zone's own age always comes first.
        """
        return self._region_calms((location,), candidates, now)[location]

    def _region_calms(
        self, zones: Iterable[Location], candidates: tuple[Candidate, ...], now: float
    ) -> dict[Location, tuple[float, float]]:
        """`region_calm` of each of `zones`, with every candidate's age taken once: asked zone by
        zone inside a sort key, each of Z zones walked all C candidates (Z x C ages per pass; per
        victim, in `_surplus`). The mates' ages are summed in candidate order, as one list, so a
        zone's sum is the same float whichever way it is asked for."""
        zones = list(zones)
        regions: dict[tuple[str, str], list[tuple[Location, float]]] = {}
        for zone in zones:  # only the asked zones' regions: their mates' ages, in candidate order
            regions[(zone.cloud, zone.region)] = []
        for c in candidates:
            where = c.location
            mates = regions.get((where.cloud, where.region))
            if mates is not None:
                mates.append((where, self.zone_age(where, now)))
        calms: dict[Location, tuple[float, float]] = {}
        for zone in zones:
            ages = [age for where, age in regions[(zone.cloud, zone.region)] if where != zone]
            calms[zone] = (min(ages), sum(ages)) if ages else (0.0, 0.0)
        return calms

    def unhedged_risk(self, held: set[Location], now: float) -> float:
        """Predicted unavailability without the extra replica: D * sum of held zones' hazards."""
        return self.outage_seconds * sum(hazard(self.zone_age(z, now)) for z in held)

    def extra_replicas(
        self, obs: Observation, spot: list[ReplicaFact], ready_spot: int, *, n: int | None = None
    ) -> int:
        """How many spot replicas beyond N to hold now (rules 2 and 4); N is `obs.target` unless
        `n` says otherwise (the service's own N during a rolling update's surge)."""
        base = max(0, self.config.num_overprovision)
        held = {r.location for r in spot}
        if base == 0 or not held:
            return base
        n = obs.target if n is None else n
        if len(spot) >= n and ready_spot >= n and self.unhedged_risk(held, obs.now) <= 1.0 - self.target:
            return 0
        if not self._partial:
            active = sum(1 for c in obs.candidates if c.location not in self._preempted)
            if active < n + base and not self._reopen(obs, active, n + base - active):
                return 0
        return base

    def _reopen(self, obs: Observation, active: int, wanted: int) -> bool:
        """Rule 8: in a many-zone all-or-nothing market, make `wanted` marked zones ACTIVE again
        for the extra replica (calmest first); False, changing nothing, when it cannot.

        SpotHedge's reset makes every zone ACTIVE only when fewer than two are left: in a market of
        three or four zones that comes soon, in one of nine most zones can stay PREEMPTED for
        hours, and all-or-nothing zones give the extra replica no N + 1 distinct zones to spread
        over (rule 4), so the replicas sat gathered through the most turbulent hours. Only while
        fewer than half of the zones are ACTIVE (at exactly half it cost a seed, docs/policy.md),
        and only zones calm for HAZARD_SCALE since their last trouble: a zone that refuses is
        marked again and its calm starts over.
        """
        if 2 * active >= len(obs.candidates):
            return False
        now = obs.now
        rank = {c.location: (c.spot_price, i) for i, c in enumerate(obs.candidates)}
        calm = sorted(
            (z for z in self._preempted if z in rank and self.zone_age(z, now) >= HAZARD_SCALE),
            key=lambda z: (-self.zone_age(z, now), rank[z]),
        )
        if len(calm) < wanted:
            return False
        self._preempted.difference_update(calm[:wanted])
        return True

    # -- decisions ----------------------------------------------------------------------------

    def decide(self, obs: Observation) -> list[Decision]:
        # `base_ondemand_fallback_replicas` on-demand replicas always run (SkyServe's static floor):
        # the rules below place the other N - base as spot, hedged and covered as usual.
        base = min(max(0, self.config.base_ondemand_fallback_replicas), max(0, obs.target))
        if base:
            obs = replace(obs, target=obs.target - base)
        spot_all, ondemand = live_replicas(obs)
        held_all: dict[Location, int] = {}
        for replica in spot_all:
            held_all[replica.location] = held_all.get(replica.location, 0) + 1
        self._remember(obs, held_all)
        candidates = obs.candidates
        self.observe(obs.events)
        for event in obs.events:  # a warned zone is about to preempt: no new replicas there
            if event.kind is EventKind.WARNING:
                self._preempted.add(event.location)
        self._apply_reset_rule(candidates)
        self._orderings(candidates, obs.ondemand_choices())
        n = obs.target
        if n <= 0 or not candidates:
            if not candidates:
                return [Terminate(r.id) for r in spot_all + ondemand]
            return self._spot_behind(spot_all, ondemand, base) + self._ondemand_to(ondemand, base)
        now = obs.now

        # A rolling update's surge (`Observation.surge`): one spot replica more, placed as any
        # other, but the hedge and the on-demand cover are the service's N's (`served`): the
        # outdated replica it replaces still serves. Judged against N + surge, the extra came back
        # (N + surge spot replicas are never READY while the surge starts) and on-demand replicas
        # covered the surge and the extra, 2 per step (6 per update of N = 3), released again.
        surge = min(max(0, obs.surge), n)
        served = n - surge
        # Warned replicas keep serving but no longer count: their replacements start now.
        spot = [r for r in spot_all if r.id not in self._warned]
        ready_spot = sum(1 for r in spot if is_ready(r))
        want = n + self.extra_replicas(obs, spot, ready_spot, n=served)
        held: dict[Location, int] = {}
        for replica in spot:
            held[replica.location] = held.get(replica.location, 0) + 1
        anchor = self._anchor(obs, held) if want == n else None

        decisions: list[Decision] = []
        if len(spot) < want:
            if anchor is not None:
                decisions.extend(LaunchSpot(anchor) for _ in range(want - len(spot)))
            else:
                decisions.extend(LaunchSpot(z) for z in self._place(want - len(spot), dict(held), now))
        elif len(spot) > want:
            decisions.extend(Terminate(r.id) for r in self._surplus(obs, spot, held, want, ready_spot))
        elif anchor is not None and len(held) > 1 and ready_spot == len(spot):
            decisions.append(LaunchSpot(anchor))  # one step of consolidation; surplus goes later

        dynamic = 0
        if self.config.dynamic_ondemand_fallback:
            settle = self.settle_seconds
            settled = sum(1 for r in spot if is_ready(r) and self._settled(r, now, settle))
            missing = want - surge - ready_spot
            if want > n and ready_spot >= served and not self._stand_in_pays(obs, set(held), now):
                missing = 0  # rule 10: the extra's on-demand stand-in only while risk pays for it
            dynamic = min(served, max(0, missing, served - settled))
            if len(held) == 1 and self._wave_at is not None and 0 <= now - self._wave_at < WAVE_HOLD_SECONDS:
                dynamic = max(dynamic, 1)  # rule 9: the zone that survived a wave holds them all
        # READY spot replicas released as surplus serve on while on-demand replicas that make up
        # the target are not READY yet: the surplus is spot traded for on-demand (a base replica
        # coming back after a rolling update, whose surge was spot, replaced it), and released in
        # the pass that launched its replacement it took N = 2 with a base of 1 to 1 READY for a
        # cold start (as `_spot_behind` does when the base is the whole target)
        spare = base + dynamic - sum(1 for r in ondemand if is_ready(r))
        if spare > 0:
            ready = {r.id: r for r in spot if is_ready(r)}
            going = [d for d in decisions if isinstance(d, Terminate) and d.replica_id in ready]
            going.sort(key=lambda d: (ready[d.replica_id].ready_at or 0.0, ready[d.replica_id].launched_at))
            kept = {d.replica_id for d in going[:spare]}
            decisions = [d for d in decisions if not (isinstance(d, Terminate) and d.replica_id in kept)]
        decisions.extend(self._ondemand_to(ondemand, base + dynamic))
        return decisions

    @staticmethod
    def _spot_behind(spot: list[ReplicaFact], ondemand: list[ReplicaFact], base: int) -> list[Decision]:
        """With the base on-demand replicas the whole target (N <= base), the spot replicas go,
        but a READY one only once READY on-demand replicas stand in for it: the ones left from a
        rolling update's surge and extra, or a base raised to N under spot replicas, were all
        released in the pass that launched their on-demand replacements (a rolling update of N = 1
        on-demand replicas served nothing for a cold start; of N = 3, two). Not-ready and newest
        go first."""
        keep = max(0, base - sum(1 for r in ondemand if is_ready(r)))
        ranked = sorted(spot, key=lambda r: (not is_ready(r), r.ready_at or 0.0, r.launched_at))
        kept = {r.id for r in ranked[:keep] if is_ready(r)}
        return [Terminate(r.id) for r in spot if r.id not in kept]

    def _stand_in_pays(self, obs: Observation, held: set[Location], now: float) -> bool:
        """Rule 10: an on-demand replica standing in for the extra costs `ratio` times the spot
        extra (on-demand over spot price, 3 on the paper's traces), so it is bought only while
        the predicted unhedged risk exceeds the budget by that ratio."""
        spot = min((c.spot_price for c in obs.candidates), default=0.0)
        ondemand = min((c.ondemand_price for c in obs.ondemand_choices()), default=0.0)
        ratio = ondemand / spot if spot > 0 else 1.0
        return self.unhedged_risk(held, now) > (1.0 - self.target) * max(1.0, ratio)

    def _ondemand_to(self, ondemand: list[ReplicaFact], count: int) -> list[Decision]:
        """Launch or release on-demand replicas to `count` (not-ready and newest released first)."""
        if len(ondemand) < count:
            if self._ondemand_best is None:
                return []
            return [LaunchOnDemand(self._ondemand_best) for _ in range(count - len(ondemand))]
        ranked = sorted(ondemand, key=lambda r: (is_ready(r), -r.launched_at))
        return [Terminate(r.id) for r in ranked[: len(ondemand) - count]]

    def _place(self, count: int, holding: dict[Location, int], now: float) -> list[Location]:
        """SpotHedge's placement; in finite pools avoiding zones that refused lately (rule 7)."""
        if not self._partial:
            return self.place_spot(count, holding)
        return self.place_spot(count, holding, avoid=self._refused_lately(now))

    def _refused_lately(self, now: float) -> set[Location]:
        """Zones that refused a launch within HAZARD_SCALE: possibly full (finite pools)."""
        return {z for z, at in self._refused.items() if now - at < HAZARD_SCALE}

    def _settled(self, replica: ReplicaFact, now: float, settle: float) -> bool:
        """Its zone has been trouble-free for `settle` seconds (start-up counts as trouble for the
        replicas launched since, not for ones found running by a freshly started controller)."""
        origin = self._trouble.get(replica.location)
        if origin is None:
            start = self._start if self._start is not None else now
            origin = start - self.prior_age if replica.launched_at >= start else -math.inf
        return now - origin >= settle

    def _anchor(self, obs: Observation, held: dict[Location, int]) -> Location | None:
        """The calmest ACTIVE zone holding replicas: where replicas gather. In finite pools, not
        a zone that refused lately (it may be full; all-or-nothing zones refuse only when empty)."""
        now = obs.now
        usable = [z for z in held if z not in self._preempted]
        if self._partial:
            full = self._refused_lately(now)
            usable = [z for z in usable if z not in full]
        if len(usable) <= 1:  # (the replicas gathered already: nothing to rank)
            return usable[0] if usable else None
        order = {c.location: i for i, c in enumerate(obs.candidates)}
        price = {c.location: c.spot_price for c in obs.candidates}
        calm = self._region_calms(usable, obs.candidates, now)
        return max(
            usable,
            key=lambda z: (
                self.zone_age(z, now),
                *calm[z],
                held[z],
                -price.get(z, 0.0),
                -order.get(z, 0),
            ),
        )

    def _surplus(
        self, obs: Observation, spot: list[ReplicaFact], held: dict[Location, int], want: int, ready_spot: int
    ) -> list[ReplicaFact]:
        """Spot replicas to release, never leaving fewer than `want` READY spot replicas.

        One at a time: from the zone ranked first by (stack * replicas there, price, youth, region
        calm, candidate order; the first such zone in `held`'s order among equals), its not-ready,
        then newest, replica (the first in `spot`'s order among equals). Only the count moves
        between picks, so the rest of each zone's rank is taken once and the zones sit in a heap
        (a scale-down from 1,000 replicas to 100 took 3-12 s ranking every zone afresh per victim,
        each rank walking every candidate, and each pick searched the victims so far)."""
        now = obs.now
        price = {c.location: c.spot_price for c in obs.candidates}
        order = {c.location: i for i, c in enumerate(obs.candidates)}
        # finite capacity with an extra held: unstack; otherwise consolidate (rule 4)
        stack = 1 if self._partial and want > obs.target else -1
        counts = dict(held)
        calm = self._region_calms(counts, obs.candidates, now)
        # each zone's rank negated for a min-heap, and its place in `held` (max() keeps the first
        # of equal ranks): (-stack * count, -price, age, calm..., order, place, zone)
        rest: dict[Location, tuple[Any, ...]] = {}
        heap: list[tuple[Any, ...]] = []
        for place, (zone, count) in enumerate(counts.items()):
            least, total = calm[zone]
            age = self.zone_age(zone, now)
            rest[zone] = (-price.get(zone, 0.0), age, least, total, order.get(zone, 0), place)
            if count > 0:
                heap.append((-stack * count, *rest[zone], zone))
        heapq.heapify(heap)
        # each zone's replicas in the order they go: not-ready first, then newest (stable: among
        # equals, `spot`'s order, as min() over them picked)
        members: dict[Location, list[ReplicaFact]] = {}
        for replica in spot:
            members.setdefault(replica.location, []).append(replica)
        for zone in members:
            members[zone].sort(key=lambda r: (is_ready(r), -r.launched_at))
        taken: dict[Location, int] = {}
        victims: list[ReplicaFact] = []
        gone: set[ReplicaFact] = set()
        ready_left = ready_spot
        for _ in range(len(spot) - want):
            zone = heap[0][-1]  # each zone with replicas left has one entry, of its count now
            queue = members[zone]
            i = taken.get(zone, 0)
            while queue[i] in gone:  # a replica equal to an earlier victim: the same one
                i += 1
            victim = queue[i]
            if is_ready(victim) and ready_left - 1 < want:
                break
            taken[zone] = i + 1
            victims.append(victim)
            gone.add(victim)
            counts[zone] -= 1
            if counts[zone] > 0:
                heapq.heapreplace(heap, (-stack * counts[zone], *rest[zone], zone))
            else:
                heapq.heappop(heap)
            ready_left -= is_ready(victim)
        return victims

    # -- persistence --------------------------------------------------------------------------

    def shift_times(self, jump: float, moved: Callable[[float], bool]) -> int:
        """Move the remembered times (start-up, each zone's last trouble, refusal and loss, the
        last wave, the last decision) with a wall clock jump: zone ages and the decision period
        then read as before it (a +2 h step read as 2 h of calm in every zone and one 2 h
        decision period, and released the hedge)."""
        count = 0

        def shift(t: float | None) -> float | None:
            nonlocal count
            if t is None or not moved(t):
                return t
            count += 1
            return t + jump

        self._start = shift(self._start)
        self._last_now = shift(self._last_now)
        self._wave_at = shift(self._wave_at)
        for table in (self._trouble, self._refused, self._lost_at):
            for zone, at in table.items():
                if moved(at):
                    count += 1
                    table[zone] = at + jump
        return count

    def snapshot(self) -> dict[str, Any]:
        data = super().snapshot()
        data.update(
            {
                "start": self._start,
                "trouble": {z.key: t for z, t in sorted(self._trouble.items())},
                "refused": {z.key: t for z, t in sorted(self._refused.items())},
                "most_held": {z.key: c for z, c in sorted(self._most_held.items())},
                "partial": self._partial,
                "warned": sorted(self._warned),
                "cold_start": self._cold,
                "interval": self._interval,
                "last_now": self._last_now,
                "wave_at": self._wave_at,
                "lost_at": {z.key: t for z, t in sorted(self._lost_at.items())},
            }
        )
        return data

    def restore(self, data: dict[str, Any]) -> None:
        super().restore(data)
        try:
            start, last = data.get("start"), data.get("last_now")
            self._start = None if start is None else float(start)
            self._last_now = None if last is None else float(last)
            trouble = data.get("trouble", {})
            refused = data.get("refused", {})
            most_held = data.get("most_held", {})
            warned = data.get("warned", [])
            if (
                not isinstance(trouble, dict)
                or not isinstance(refused, dict)
                or not isinstance(most_held, dict)
                or not isinstance(warned, list)
            ):
                raise TypeError("'trouble', 'refused' and 'most_held' must be objects, 'warned' a list")
            self._trouble = {Location.parse(str(k)): float(v) for k, v in trouble.items()}
            self._refused = {Location.parse(str(k)): float(v) for k, v in refused.items()}
            self._most_held = {Location.parse(str(k)): int(v) for k, v in most_held.items()}
            self._partial = bool(data.get("partial", False))
            self._warned = {str(x) for x in warned}
            wave = data.get("wave_at")
            self._wave_at = None if wave is None else float(wave)
            lost_at = data.get("lost_at", {})
            if not isinstance(lost_at, dict):
                raise TypeError("'lost_at' must be an object")
            self._lost_at = {Location.parse(str(k)): float(v) for k, v in lost_at.items()}
            self._cold = float(data.get("cold_start", DEFAULT_COLD_START))
            self._interval = float(data.get("interval", DEFAULT_INTERVAL))
        except (ValueError, TypeError) as exc:
            raise PolicyError(f"{self.name}: bad snapshot ({exc})") from exc
