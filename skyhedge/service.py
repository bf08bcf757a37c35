"""Glue between a spec, the catalog, the persisted state and the pure policy/planner.

`plan`, `apply` and `watch` all call `compute_plan`, so they can never disagree about the layout.
This module reads the catalog (bundled files) but does no cloud or Terraform I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from skyhedge.catalog import load_catalog, parse_accelerator
from skyhedge.catalog.model import Offer, did_you_mean
from skyhedge.clouds import CloudConfig, cloud_spec_section
from skyhedge.clouds.local import local_port
from skyhedge.clouds.local.launcher import port_in_use
from skyhedge.errors import CatalogError, PolicyError, SpecError, StateError
from skyhedge.planner import Plan, make_plan, replica_number, replica_order
from skyhedge.policy import Candidate, Location, Market, Observation, ReplicaFact, Terminate, make_policy
from skyhedge.spec import MAX_PORT, ServiceSpec, revision_digests
from skyhedge.state import ReplicaRecord, ServiceState

#: `state.extra` key of GitOps mode (`watch --gitops`): commits that CI applies later, not applies
#: the watcher sees, advance the state (`active`; see `compute_plan`).
GITOPS_KEY = "gitops"
#: `state.extra` key of what Terraform holds per root, as far as skyhedge knows (`apply`).
TERRAFORM_KEY = "terraform"
#: `state.extra` key: when the policy last decided (its memory is as of then).
DECIDED_AT_KEY = "decided_at"


def is_gitops(state: ServiceState) -> bool:
    """The state is advanced by GitOps commits (`watch --gitops`), not by applies."""
    info = state.extra.get(GITOPS_KEY)
    return isinstance(info, dict) and info.get("active") is True


def set_gitops(state: ServiceState, active: bool) -> None:
    """Mark who advances the state: GitOps commits (`watch --gitops`) or applies (the rest). It
    is kept in the state, so `plan` and `render` in CI judge a committed state as the watcher did.

    Leaving GitOps hands the committed roots to the applies: each becomes a root Terraform may
    still hold replicas in (no applied digest yet), rendered and applied until an apply records
    what it holds, then dropped when empty, like any root (`apply.roots_with_resources`)."""
    info = state.extra.get(GITOPS_KEY)
    if active:
        if not isinstance(info, dict):
            info = state.extra[GITOPS_KEY] = {}
        info["active"] = True
    elif isinstance(info, dict):
        info["active"] = False
        committed = info.pop("roots", None)
        if isinstance(committed, dict) and committed:
            applied = state.extra.setdefault(TERRAFORM_KEY, {}).setdefault("roots", {})
            for path in committed:
                applied.setdefault(path, {})


def decided_at(state: ServiceState) -> float | None:
    """When the policy last decided for this state (None: never); `render` plans as of then, so
    that re-rendering a committed state gives the committed tree whenever it runs."""
    value = state.extra.get(DECIDED_AT_KEY)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class PolicyClock:
    """How fast the policy's time runs against the controller's: `rate` policy seconds per
    second, counted from `origin`. `up --market-trace --speedup K` runs the market K times as fast
    as real time; the policy's timers (the `skyhedge` policy's hazard, settle and wave times) must
    run as fast, or a replay judges the policy on a market 36x calmer than the trace (measured on
    12 h of AWS2 at speedup 36: relative cost 0.94 where `simulate` predicts 0.35). Every time the
    policy sees (`now`, event and replica times) is mapped, so to the policy the replay is the
    trace; the state keeps real times."""

    origin: float
    rate: float = 1.0

    def at(self, t: float) -> float:
        return self.origin + (t - self.origin) * self.rate

    def wall(self, t: float) -> float:
        """The controller's time at which the policy's clock reads `t` (`at` undone)."""
        return self.origin + (t - self.origin) / self.rate if self.rate else t

    def key(self) -> list[float]:
        """Saved beside the policy's memory: memory kept on one clock is not read on another."""
        return [self.origin, self.rate]

    def observe(self, obs: Observation) -> Observation:
        def fact(f: ReplicaFact) -> ReplicaFact:
            at = self.at
            return replace(
                f,
                launched_at=at(f.launched_at),
                provisioned_at=None if f.provisioned_at is None else at(f.provisioned_at),
                ready_at=None if f.ready_at is None else at(f.ready_at),
                not_ready_since=None if f.not_ready_since is None else at(f.not_ready_since),
                gone_at=None if f.gone_at is None else at(f.gone_at),
            )

        return replace(
            obs,
            now=self.at(obs.now),
            replicas=tuple(fact(f) for f in obs.replicas),
            events=tuple(replace(e, at=self.at(e.at)) for e in obs.events),
        )


def remember_decision(state: ServiceState, memory: dict[str, Any], now: float) -> None:
    """Keep the policy's memory after deciding at `now` (whether or not the plan changed)."""
    state.policy_memory = memory
    state.extra[DECIDED_AT_KEY] = now


def shift_policy_memory(
    spec: ServiceSpec,
    state: ServiceState,
    jump: float,
    moved: Callable[[float], bool],
    *,
    policy_name: str | None = None,
    clock: PolicyClock | None = None,
) -> int:
    """Move the times of the policy's saved memory with a wall clock jump (`Policy.shift_times`),
    as `facts.shift_times` moves the state's; returns how many moved. The policy is pure: it
    measures every age from `obs.now`, so only the memory it keeps between decisions needs moving.
    Memory `compute_plan` would not read (another policy's, another clock's) is left alone, and
    so is one the policy cannot load (the next plan says why). Under a market replay the memory
    holds the replay's times (`PolicyClock`): `moved` is asked about the controller's time of
    each, and the jump moves them `rate` times as far."""
    name = spec.replica_policy.policy if policy_name is None else policy_name
    saved = state.policy_memory
    memory = saved.get("memory")
    clock_key = None if clock is None else clock.key()
    if saved.get("policy") != name or saved.get("clock") != clock_key or not isinstance(memory, dict):
        return 0
    try:
        policy = make_policy(name, spec.replica_policy.policy_config(), seed=0)
        policy.restore(memory)
    except PolicyError:  # memory it cannot load: the next plan says why
        return 0
    # a policy that fails to move its memory raises `PolicyError` to the caller, which says so:
    # swallowed, a plug-in's broken `shift_times` left its memory aged by the jump, unannounced
    if clock is None:
        count = policy.shift_times(jump, moved)
    else:
        count = policy.shift_times(jump * clock.rate, lambda t: moved(clock.wall(t)))
    if count:
        state.policy_memory = {**saved, "memory": policy.snapshot()}
    return count


@dataclass(frozen=True)
class Placement:
    """The spec joined with the catalog: where replicas may go and what they cost there."""

    candidates: tuple[Candidate, ...]  # zones selling the type on spot, cheapest spot first
    instance_types: dict[str, str]  # cloud -> instance type
    #: allowed zones that sell the type on-demand only (spot_price inf): on-demand replicas only
    ondemand_only: tuple[Candidate, ...] = ()

    @property
    def locations(self) -> tuple[Candidate, ...]:
        """Every allowed zone, spot-selling ones first: where replicas may run and events come from."""
        return self.candidates + self.ondemand_only

    def prices(self) -> dict[tuple[Location, Market], float]:
        out: dict[tuple[Location, Market], float] = {}
        for c in self.locations:
            if c.sells_spot:
                out[(c.location, Market.SPOT)] = c.spot_price
            out[(c.location, Market.ON_DEMAND)] = c.ondemand_price
        return out

    def zones(self, cloud: str, *, spot: bool = False) -> list[str]:
        """The zones of `cloud` where replicas may run, spot-selling ones first (`spot`: only
        those, e.g. for a spot-market replay: an on-demand-only zone has no spot to lose)."""
        return [
            c.location.zone
            for c in (self.candidates if spot else self.locations)
            if c.location.cloud == cloud
        ]

    def allows(self, location: Location, market: Market) -> bool:
        """May a replica of `market` run in `location`: spot only where spot is sold."""
        zones = self.candidates if market is Market.SPOT else self.locations
        return any(c.location == location for c in zones)

    @property
    def cheapest_ondemand(self) -> float:
        return min(c.ondemand_price for c in self.locations)


def _instance_type(spec: ServiceSpec, cloud: str, allowed: Callable[[Offer], bool], policy: str) -> str:
    """The cloud's instance type: the one the spec names, else the cheapest (on-demand) type
    carrying its accelerators that the placement can run, i.e. sold in an `allowed` zone: on spot
    there first, unless the policy is `ondemand`. A cheaper type sold only outside the placement
    (or only on-demand inside it) must not make a spec fail that another type would serve."""
    catalog = load_catalog(cloud)
    explicit = spec.resources.instance_type.get(cloud)
    if explicit:
        try:
            catalog.instance_type(explicit)
        except CatalogError as exc:
            raise SpecError(str(exc), file=spec.source, path=f"resources.instance_type.{cloud}") from None
        return explicit
    if cloud == "local":
        return next(iter(sorted(catalog.instance_types)))
    if spec.resources.accelerators:
        try:
            name, count = parse_accelerator(spec.resources.accelerators)
        except CatalogError as exc:
            raise SpecError(str(exc), file=spec.source, path="resources.accelerators") from None
        types = [t for t in catalog.instance_types_for(name, count) if catalog.offers_for(t)]
        if not types:
            raise SpecError(
                f"no {cloud} instance type carries {count} x {name} in the catalog",
                file=spec.source,
                path="resources.accelerators",
            )
        spot_first = policy != "ondemand"
        for need_spot in (True, False) if spot_first else (False,):
            for itype in types:
                offers = (o for o in catalog.offers_for(itype) if allowed(o))
                if any(o.spot_price is not None or not need_spot for o in offers):
                    return itype
        return types[0]  # sold nowhere the placement allows: resolve_placement says so
    raise SpecError(
        f"cloud {cloud!r} needs resources.accelerators or resources.instance_type.{cloud}",
        file=spec.source,
        path="resources",
    )


def resolve_placement(spec: ServiceSpec, policy: str | None = None) -> Placement:
    """Candidates = allowed zones of every allowed cloud that sell the instance type on spot; the
    allowed zones that sell it on-demand only are kept apart (`ondemand_only`) for on-demand
    replicas. A spec none of whose zones sells spot is refused unless its policy (`policy`, a
    command line's choice, else the spec's) is `ondemand`.

    `placement.regions` / `placement.zones` filter a cloud only when they name at least one of that
    cloud's regions/zones, so one list can serve a multi-cloud spec. A name no selected cloud knows
    is an error naming it.
    """
    p = spec.placement
    policy = spec.replica_policy.policy if policy is None else policy
    catalogs = {}
    for cloud in p.clouds:
        # a catalog file that does not load is that file's error (it names itself and its field),
        # not the spec's: `placement.clouds` only names clouds the spec check already accepted
        catalogs[cloud] = load_catalog(cloud)
    all_regions = {r for c in catalogs.values() for r in c.regions()}
    all_zones = {z for c in catalogs.values() for z in c.zones()}
    for field, names, known, what in (
        ("regions", p.regions, all_regions, "region"),
        ("zones", p.zones, all_zones, "zone"),
        ("exclude_zones", p.exclude_zones, all_zones, "zone"),
    ):
        for i, name in enumerate(names):
            if name not in known:
                hint = did_you_mean(name, known)
                if not hint and what == "zone":  # how a cloud's zones are written (AWS: zone IDs)
                    hints = (getattr(cloud_spec_section(c), "zone_hint", "") for c in p.clouds)
                    hint = next((h for h in hints if h), "")
                raise SpecError(
                    f"unknown {what} {name!r} for clouds {', '.join(p.clouds)}{hint}",
                    file=spec.source,
                    path=f"placement.{field}[{i}]",
                )
    _check_subnet_zones(spec, catalogs)
    candidates: list[Candidate] = []
    ondemand_only: list[Candidate] = []
    types: dict[str, str] = {}
    disjoint: list[str] = []
    for cloud, catalog in catalogs.items():
        regions = set(p.regions) & catalog.regions()
        zones = set(p.zones) & catalog.zones()
        if regions and zones and not any(catalog.region_of(z) in regions for z in zones):
            disjoint.append(cloud)

        # with aws.subnets / gcp.subnetworks, replicas go only where the network reaches
        network = spec.network(cloud)

        def allowed(
            offer: Offer,
            regions: set[str] = regions,
            zones: set[str] = zones,
            network: CloudConfig | None = network,
        ) -> bool:
            return (
                (not regions or offer.region in regions)
                and (not zones or offer.zone in zones)
                and offer.zone not in p.exclude_zones
                and (network is None or network.confines(offer.region, offer.zone))
            )

        itype = _instance_type(spec, cloud, allowed, policy)
        types[cloud] = itype
        for offer in catalog.offers_for(itype):
            if not allowed(offer):
                continue
            where = Location(cloud, offer.region, offer.zone)
            if offer.spot_price is None:
                ondemand_only.append(Candidate(where, math.inf, float(offer.ondemand_price)))
            else:
                candidates.append(Candidate(where, float(offer.spot_price), float(offer.ondemand_price)))
    if not candidates and not ondemand_only and disjoint:
        raise SpecError(
            f"names no zone in placement.regions ({', '.join(disjoint)}): a zone must lie in an "
            "allowed region; drop one of the lists or make them agree",
            file=spec.source,
            path="placement.zones",
        )
    if not candidates and not (ondemand_only and policy == "ondemand"):
        sold = ", ".join(f"{c}: {t}" for c, t in types.items())
        for cloud in types:
            network = spec.network(cloud)
            if network is not None and network.confined:
                sold += f"; {network.confinement}"
        how = " on spot" if ondemand_only else ""  # not sold there at all, else on-demand only
        if ondemand_only:
            sold += "; sold there on-demand only, which replica_policy.policy 'ondemand' runs"
        raise SpecError(
            f"no allowed zone sells the instance type{how} ({sold}); widen clouds/regions/zones",
            file=spec.source,
            path="placement",
        )
    candidates.sort(key=lambda c: (c.spot_price, c.location))
    ondemand_only.sort(key=lambda c: (c.ondemand_price, c.location))
    return Placement(tuple(candidates), types, tuple(ondemand_only))


def _check_subnet_zones(spec: ServiceSpec, catalogs: dict[str, Any]) -> None:
    """`aws.subnets` keys must be AWS zone IDs the catalog knows, `gcp.subnetworks` keys GCP
    regions it knows (a typo would silently drop a zone or region). Unused without the cloud,
    like gcp.project."""
    for cloud, catalog in catalogs.items():
        network = spec.network(cloud)
        if network is None or not network.confined:
            continue
        known = getattr(catalog, network.confining_level)()
        for key in network.confining_keys():
            if key not in known:
                raise SpecError(
                    f"unknown {network.confining_kind} {key!r}{did_you_mean(key, known)}",
                    file=spec.source,
                    path=f"{network.confining_field}.{key}",
                )


def check_cloud_sections(spec: ServiceSpec, state: ServiceState, *, destroying: bool) -> None:
    """Each cloud's own spec section refuses what the live replicas cannot follow
    (`CloudConfig.check_state`: `aws.subnets` dropping a zone AWS replicas still run in, a new
    `gcp.network` under running GCP replicas), before a plan (`destroying` False) or a destroy
    acts on the spec."""
    for config in spec.cloud_sections.values():
        if isinstance(config, CloudConfig):
            config.check_state(spec, state, destroying=destroying)


def service_target(spec: ServiceSpec, state: ServiceState) -> int:
    """The number of READY replicas wanted now: the autoscaler's last word, else min_replicas.
    A spec without autoscaling (no `target_qps_per_replica`) wants min_replicas whatever an
    earlier spec's autoscaler chose: turning it off must not pin the last size it picked."""
    rp = spec.replica_policy
    autoscaled = rp.target_qps_per_replica is not None and rp.target_qps_per_replica > 0
    target = state.target if state.target is not None and autoscaled else rp.min_replicas
    upper = rp.max_replicas if rp.max_replicas is not None else max(rp.min_replicas, target)
    return max(rp.min_replicas, min(target, upper))


def _taken_port_numbers(spec: ServiceSpec, state: ServiceState, *, probe: bool = True) -> frozenset[int]:
    """Replica numbers whose local port (resources.local_base_port + N) is already taken: those
    IDs are skipped, so a replacement never fails for a port its own service holds.

    - The router's ports: IDs grow for ever, so a router port above the base is reached one day
      (`spec` refuses only the first plan's range). The running router's status port counts too:
      a spec that stops naming one leaves nginx on the port it had (the state records it).
    - Running local replicas' ports: a replica keeps the port it was launched on when
      `local_base_port` changes, so after the base is lowered, new IDs would land on the ports
      of the outdated replicas still serving until their replacements are READY."""
    if "local" not in spec.placement.clouds:
        return frozenset()
    base = spec.resources.local_base_port
    ports = {spec.service.port, spec.service.router.status_port, _recorded_status_port(state)}
    ports |= {_launched_port(rec) for rec in state.live() if rec.cloud == "local"}
    start = _first_fresh_number(state)
    # the numbers from `start` on whose port is taken: ports wrap past MAX_PORT (`local_port`),
    # so each taken port is one number in every span of IDs; the next two cover any plan
    span = MAX_PORT - base
    taken: set[int] = set()
    for port in ports:
        if port is not None and base < port <= MAX_PORT:
            first = start + (port - base - 1 - (start - 1)) % span
            taken |= {first, first + span}
    return frozenset(taken | (_busy_numbers(spec, state, base, taken) if probe else set()))


def _first_fresh_number(state: ServiceState) -> int:
    """The number the next new replica ID gets (the planner's counter starts there)."""
    return max([state.next_id, *(replica_number(r.id) + 1 for r in state.live())])


def _busy_numbers(spec: ServiceSpec, state: ServiceState, base: int, taken: set[int]) -> set[int]:
    """The next fresh IDs whose port another process holds (a user's dev server, a stray
    replica): skipped too. Their launch would fail ("already in use") three times before the ID
    was given up, and `apply` would stop on it, with nothing the user could change in the spec."""
    rp = spec.replica_policy
    wanted = 2 * max(rp.min_replicas, rp.max_replicas or 0) + max(0, rp.num_overprovision) + 1
    number = _first_fresh_number(state)
    busy: set[int] = set()
    for _ in range(MAX_PORT - base):  # every port of the range once at most: all busy ends it
        if wanted <= 0:
            break
        if number not in taken:
            if port_in_use(local_port(base, number, MAX_PORT)):
                busy.add(number)
            else:
                wanted -= 1
        number += 1
    return busy


def _recorded_status_port(state: ServiceState) -> int | None:
    url = (state.router or {}).get("status_url")
    try:
        return urlsplit(url).port if isinstance(url, str) else None
    except ValueError:  # a state file edited by hand: no port to avoid
        return None


def compute_plan(
    spec: ServiceSpec,
    state: ServiceState,
    *,
    now: float,
    policy_name: str | None = None,
    placement: Placement | None = None,
    probe_ports: bool = True,
    clock: PolicyClock | None = None,
) -> tuple[Plan, dict[str, Any]]:
    """One decision: observation from state -> policy -> planner. Returns the plan and the
    policy's memory after deciding (the caller persists it only if it acts on the plan).
    `clock`: the policy's time, when it runs faster than the state's (a market replay)."""
    placement = placement or resolve_placement(spec, policy_name)
    check_cloud_sections(spec, state, destroying=False)
    facts = state.facts()
    # Replicas where the spec no longer allows them (placement narrowed, or a zone that stopped
    # selling spot under a spot replica) are moved like outdated ones: the policy, which sees only
    # the others, places their replacements, and they are released one at a time while more than
    # the target stay READY, never all at once.
    outside = {f.id for f in facts if not placement.allows(f.location, f.market)}
    inside = tuple(f for f in facts if f.id not in outside)
    target = service_target(spec, state)
    name = spec.replica_policy.policy if policy_name is None else policy_name  # "" is no name
    config = spec.replica_policy.policy_config()
    gitops = is_gitops(state)
    if gitops:
        # Committed replicas count as READY (the watcher cannot see CI's apply), so on-demand
        # fallback, which covers spot replicas until they are READY, would only be committed and
        # withdrawn again; `base_ondemand_fallback_replicas` still runs.
        config = replace(config, dynamic_ondemand_fallback=False)
    try:
        policy = make_policy(name, config, seed=0)
    except PolicyError as exc:
        if policy_name is not None:  # named on the command line: the message says which
            raise
        raise SpecError(str(exc), file=spec.source, path="replica_policy.policy") from exc
    # memory kept on another clock (a replay's, or real time after one) is not read: its times
    # would lie hours off; the policy starts afresh, as after a change of policy
    clock_key = None if clock is None else clock.key()
    if state.policy_memory.get("policy") == name and state.policy_memory.get("clock") == clock_key:
        try:
            policy.restore(state.policy_memory.get("memory", {}))
        except PolicyError as exc:
            where = state.source or "the state"
            raise StateError(
                f"{where}: policy_memory.memory: {exc} (remove policy_memory to start the policy afresh)"
            ) from exc
    live = {r.id: r for r in state.live()}
    outdated = set(outdated_replicas(spec, state)) - outside
    # A rolling update: while replicas of an older spec run, the policy is asked for one replica
    # more (the surge); once that many are READY, the oldest outdated replica is released. So N
    # stay READY throughout, and the update costs one replica more for a few cold starts. The
    # policy is told which one is the surge (`Observation.surge`): asked for N + 1 as if the
    # service needed them, it covered the starting surge with an on-demand replica (SpotHedge's
    # fallback; the `skyhedge` policy also took its released extra back, with its cover: two
    # spot and two on-demand launches per step where one spot replica was needed) while the
    # outdated replica it replaces served throughout. One
    # already released (draining: the policy no longer counts it) needs no surge: asking for one
    # more while the last of them drains launched a replica (and its on-demand cover) that was
    # released again as soon as the drain ended.
    rolling = {rid for rid in outdated if not live[rid].draining}
    # GitOps: a committed replica counts as READY only once the readiness probe's initial delay
    # (the time a replica is given to come up) has passed since its commit, for the roll-over and
    # for the policy alike, so that every commit keeps N replicas that have had time to boot. The
    # policy saw a committed replica READY at once, and a move (skyhedge gathering its replicas
    # into one zone) launched the new ones and released the old in one commit: CI applying it
    # left fewer than N serving until the new ones booted (found by an audit).
    grace = float(spec.readiness_probe.initial_delay_seconds) if gitops else 0.0
    if grace > 0:
        inside = tuple(
            replace(f, ready_at=None) if f.ready_at is not None and now - f.ready_at < grace else f
            for f in inside
        )
    surge = 1 if rolling and target > 0 else 0
    # A move (placement narrowed): the policy sees none of the replicas outside, so it places N
    # inside, but the ones outside still serve until those are READY (`_next_to_retire`). Their
    # replacements are surge too (`Observation.surge`: no on-demand cover for capacity that
    # serves). Told nothing, the policy took a move out of the zone holding the service for an
    # outage: N = 3 gathered replicas' move bought 3 on-demand replicas for a cold start while
    # the 3 outside served throughout. Only READY ones count (one that is not serves nothing),
    # and under GitOps only those READY for the grace, as for the policy's own.
    serving_outside = sum(
        1
        for f in facts
        if f.id in outside
        and not live[f.id].draining
        and f.ready_at is not None
        and f.not_ready_since is None
        and now - f.ready_at >= grace
    )
    obs = Observation(
        now=now,
        target=target + surge,
        surge=min(surge + serving_outside, target + surge),
        candidates=placement.candidates,
        replicas=inside,
        events=state.events(),
        ondemand_only=placement.ondemand_only,
    )
    decisions = policy.decide(obs if clock is None else clock.observe(obs))
    retire = _next_to_retire(
        live,
        outdated | outside,
        decisions,
        target,
        now=now,
        grace=grace,
        kept={f.id for f in inside},
        surge=obs.target - target,
    )
    if retire is not None:
        decisions.append(Terminate(retire))
    plan = make_plan(
        service=spec.name,
        target=target,
        policy=name,
        current=facts,
        decisions=decisions,
        next_id=state.next_id,
        prices=_prices_with_outside(placement, facts, outside),
        ondemand_price=placement.cheapest_ondemand,
        base_ondemand=spec.replica_policy.base_ondemand_fallback_replicas,
        # ports other processes hold are probed only where this machine launches the replicas:
        # not for `render` (same spec and state -> same tree, on any machine) nor under GitOps
        skip_numbers=_taken_port_numbers(spec, state, probe=probe_ports and not gitops),
    )
    revision = revision_digests(spec)
    plan = replace(
        plan,
        replicas=tuple(
            replace(
                r,
                revision=(live[r.id].revision if r.id in live else None) or revision(r.location.cloud),
                port=_launched_port(live[r.id]) if r.id in live else None,
                # pinned only where the spec has moved it (else inputs churn after every launch)
                subnet_id=_launched_subnet(live[r.id])
                if r.id in live and _moved_by_section(spec, live[r.id])
                else None,
                outdated=r.id in outdated or r.id in outside,
            )
            for r in plan.replicas
        ),
    )
    memory: dict[str, Any] = {"policy": name, "memory": policy.snapshot()}
    if clock_key is not None:
        memory["clock"] = clock_key
    return plan, memory


def _prices_with_outside(
    placement: Placement, facts: Sequence[ReplicaFact], outside: set[str]
) -> dict[tuple[Location, Market], float]:
    """The placement's prices, plus the catalog's for replicas in zones it no longer allows
    (excluded, or a region dropped): they still bill until they are moved, so `plan` counts them.
    A zone the catalog no longer lists keeps price 0 (unknown)."""
    prices = placement.prices()
    for fact in facts:
        key = (fact.location, fact.market)
        itype = placement.instance_types.get(fact.location.cloud)
        if fact.id not in outside or key in prices or itype is None:
            continue
        try:
            offer = load_catalog(fact.location.cloud).offer(itype, fact.location.zone)
        except CatalogError:
            continue
        price = (
            None
            if offer is None
            else offer.spot_price
            if fact.market is Market.SPOT
            else offer.ondemand_price
        )
        if price is not None:
            prices[key] = float(price)
    return prices


def outdated_replicas(
    spec: ServiceSpec, state: ServiceState, placement: Placement | None = None
) -> list[str]:
    """IDs of the live replicas launched under another revision of `spec` (rolling update pending)
    and, given the placement, those in a location it no longer allows (moved the same way).
    Replicas recorded before revisions existed count as current (until `apply.record_plan` gives
    them the revision their root is rendered with)."""
    revision = revision_digests(spec)
    return sorted(
        (
            r.id
            for r in state.live()
            if (r.revision is not None and r.revision != revision(r.cloud))
            or (placement is not None and not placement.allows(r.location, Market(r.market)))
            or _moved_by_section(spec, r)
        ),
        key=replica_order,
    )


def _moved_by_section(spec: ServiceSpec, rec: ReplicaRecord) -> bool:
    """Whether its cloud's own spec section says live replica `rec` must move like an outdated one
    (`CloudConfig.moved`: an AWS replica whose zone `aws.subnets` now gives another subnet)."""
    config = spec.network(rec.cloud)
    return config is not None and config.moved(rec)


def _next_to_retire(
    live: dict[str, ReplicaRecord],
    outdated: set[str],
    decisions: list[Any],
    target: int,
    *,
    now: float,
    grace: float = 0.0,
    kept: set[str] | None = None,
    surge: int = 0,
) -> str | None:
    """The outdated replica to release in this pass, if any, the oldest first: only while more
    than `target` READY replicas would remain (not counting ones already being released, nor ones
    READY for less than `grace` seconds), and a READY one only once every replica the policy wants
    is READY but for the `surge` it was asked for (`kept`: the replicas the policy saw). Counting
    against the target alone released the overprovisioned and on-demand replicas' worth of outdated ones
    at once, before any replacement was READY: a revision whose replicas never got READY took a
    local-echo service from 5 READY replicas to 2 within 3 s, for as long as it stayed (measured,
    `benchmarks/traffic_bench.py --scenarios rollout`)."""
    if not outdated:
        return None
    leaving = {d.replica_id for d in decisions if isinstance(d, Terminate)}
    if outdated & leaving:
        return None  # one is already on its way out
    ready = [
        r
        for r in live.values()
        if r.ready_at is not None
        and r.not_ready_since is None
        and not r.draining
        and r.id not in leaving
        and now - r.ready_at >= grace
    ]
    if len(ready) <= target:
        return None
    candidates = [live[rid] for rid in outdated if not live[rid].draining]
    if not candidates:
        return None
    # replicas launched together (one apply) share `launched_at`: the lower ID is the older
    oldest = min(candidates, key=lambda r: (r.ready_at is not None, r.launched_at, replica_order(r.id)))
    if oldest.id not in {r.id for r in ready}:
        return oldest.id  # it serves nothing: releasing it costs no READY replica
    # what the policy keeps and launches: its replicas not released (draining ones it no longer
    # counts) and the ones it asks for; all of them but the surge must be READY first
    wanted = sum(1 for rid in kept or () if rid in live and not live[rid].draining and rid not in leaving)
    wanted += sum(1 for d in decisions if not isinstance(d, Terminate))
    return oldest.id if len(ready) > wanted - surge else None


def _launched_subnet(rec: ReplicaRecord) -> str | None:
    """The subnet a launched AWS replica runs in, from its Terraform outputs (None: not known)."""
    value = rec.outputs.get("subnet_id") if isinstance(rec.outputs, dict) else None
    return value if isinstance(value, str) and value else None


def _launched_port(rec: ReplicaRecord) -> int | None:
    """The port a running replica listens on, from its endpoint (kept when the spec's ports move)."""
    if not rec.endpoint:
        return None
    try:
        return urlsplit(rec.endpoint).port
    except ValueError:
        return None
