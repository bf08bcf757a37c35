"""Prometheus metrics of a running watcher (`skyhedge watch|up --metrics-port PORT`).

Platform teams watch fleets with Prometheus, not with a terminal dashboard, so the watcher can
serve `GET /metrics` in Prometheus' text exposition format (0.0.4): what runs where (replicas
per zone, market and state), whether the service is serving (READY >= target), what it costs,
which clouds' applies keep failing and which quotas are used up (what `status` says in its
`Failing:` and `Quota:` lines, where only someone looking saw it), and counters of what
happened (preemptions, launches, refused launches, interruption warnings, applies). The
numbers come from the same state the dashboard and `status` read.

Threading: the exposition is built in the controller's thread after every pass (a `subscribe`
listener) and only handed over to the HTTP thread as a finished string, so a scrape never reads
the state while a pass changes it. Counters are kept here, in memory, from the history entries
as each pass appends them (not read back from the history, which keeps only its last 200): they
start at zero when the watcher starts, as Prometheus counters may.
"""

from __future__ import annotations

import http.server
import logging
import math
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from skyhedge.controller.loop import Controller
from skyhedge.errors import SkyhedgeError
from skyhedge.policy.types import Location, ReplicaStatus
from skyhedge.spec import MAX_PORT
from skyhedge.state import FAILING_ROOTS_KEY, QUOTA_KEY

if TYPE_CHECKING:
    from skyhedge.spec import ServiceSpec

log = logging.getLogger("skyhedge.controller")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: The counters: name -> (help, label names). Every series a placement zone can have is shown
#: from the start at 0, so `increase()` sees the first event in a zone too.
_COUNTERS = {
    "skyhedge_launches_total": (
        "Replicas the cloud provisioned, by location and market.",
        ("cloud", "region", "zone", "market"),
    ),
    "skyhedge_preemptions_total": (
        "Spot replicas the cloud took back or warned it would take, by location.",
        ("cloud", "region", "zone", "market"),
    ),
    "skyhedge_launch_failures_total": (
        "Spot launches a zone refused (no capacity, quota), by location.",
        ("cloud", "region", "zone"),
    ),
    "skyhedge_interruption_warnings_total": (
        "AWS interruption warnings (kind=interruption) and rebalance recommendations (kind=rebalance).",
        ("cloud", "region", "zone", "kind"),
    ),
    "skyhedge_applies_total": (
        "Terraform applies (GitOps: commits) that changed something, by result (failed: an error "
        "other than a refused launch).",
        ("result",),
    ),
}
#: The live replica states `skyhedge_replicas` shows (0 included).
_LIVE_STATES = (
    ReplicaStatus.PROVISIONING,
    ReplicaStatus.STARTING,
    ReplicaStatus.READY,
    ReplicaStatus.NOT_READY,
    ReplicaStatus.SHUTTING_DOWN,
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


class _Family:
    """One metric: HELP, TYPE and its samples."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name = name
        self.kind = kind
        self.help = help_text
        self.samples: list[tuple[dict[str, str], float]] = []

    def add(self, value: float, **labels: str) -> None:
        self.samples.append((labels, value))

    def text(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        lines += [f"{self.name}{_labels(lab)} {_number(v)}" for lab, v in self.samples]
        return "\n".join(lines)


def _series(name: str, labels: Mapping[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple((k, labels[k]) for k in _COUNTERS[name][1])


def _zero_series(ctl: Controller) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """The counter series every placement zone has from the start (at 0)."""
    out = [_series("skyhedge_applies_total", {"result": r}) for r in ("ok", "failed")]
    for cand in ctl.placement.locations:
        where = {"cloud": cand.location.cloud, "region": cand.location.region, "zone": cand.location.zone}
        out.append(_series("skyhedge_launches_total", {**where, "market": "on-demand"}))
        out.append(_series("skyhedge_launch_failures_total", where))
        if not cand.sells_spot:  # on-demand only: no spot launch, preemption or warning there
            continue
        out.append(_series("skyhedge_launches_total", {**where, "market": "spot"}))
        out.append(_series("skyhedge_preemptions_total", {**where, "market": "spot"}))
        if cand.location.cloud == "aws":  # the only cloud that sends them
            out += [
                _series("skyhedge_interruption_warnings_total", {**where, "kind": k})
                for k in ("interruption", "rebalance")
            ]
    return out


def _warned_ids(ctl: Controller) -> list[str]:
    table = ctl.state.extra.get("warned")
    return [str(k) for k in table] if isinstance(table, dict) else []


def _failing_roots(ctl: Controller) -> dict[tuple[str, str], int]:
    """(cloud, region) -> 1 for each Terraform root whose applies the watcher sees failing
    (`loop.RootOutage`, kept in `state.extra`), 0 for every other root of the placement: a series
    from the start, back to 0 when the root applies again, so an alert on it resolves."""
    out = {(c.location.cloud, c.location.region): 0 for c in ctl.placement.locations}
    table = ctl.state.extra.get(FAILING_ROOTS_KEY)
    for key in table if isinstance(table, dict) else ():
        cloud, _, region = str(key).partition("/")
        out[(cloud, region)] = 1
    return out


def _quota_exhausted(ctl: Controller) -> dict[tuple[str, str, str], int]:
    """(cloud, region, market) -> 1 while launches of that market into the region wait on an
    account quota found used up (`state.extra["quota"]`, dropped at the first launch there that
    succeeds), 0 for every other region and market of the placement. A quota across a cloud's
    regions (`cloud/*/market`, GCP's GPUS_ALL_REGIONS) holds every region of that cloud, as
    `Controller._quota_wait` reads it: each is 1, so the labels stay the placement's own."""
    out: dict[tuple[str, str, str], int] = {}
    for cand in ctl.placement.locations:
        loc = cand.location
        for market in ("spot", "on-demand") if cand.sells_spot else ("on-demand",):
            out[(loc.cloud, loc.region, market)] = 0
    table = ctl.state.extra.get(QUOTA_KEY)
    for key in table if isinstance(table, dict) else ():
        cloud, region, market = (str(key).split("/") + ["", ""])[:3]
        regions = {r for c, r, _ in out if c == cloud} if region == "*" else {region}
        for reg in regions:
            out[(cloud, reg, market)] = 1
    return out


def _where(key: str | None) -> dict[str, str]:
    try:
        loc = Location.parse(str(key))
    except ValueError:
        return {"cloud": "", "region": "", "zone": ""}
    return {"cloud": loc.cloud, "region": loc.region, "zone": loc.zone}


class Metrics:
    """The watcher's metrics: counters fed from the history entries as a pass appends them (in
    the controller's thread), gauges read from the state at the end of each pass. `observe(ctl)`
    after a pass; `text()` any time."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        self._last_apply: object | None = None
        self._provisioned: set[str] = set()  # replica IDs whose launch was counted (or predates us)
        self._warned: set[str] = set()  # replica IDs whose interruption warning was counted
        self._last_pass: float | None = None
        self._serving_now = False
        self._reload_outcome: Callable[[], str | None] | None = None
        self.serving_seconds = 0.0
        self.observed_seconds = 0.0
        # when this watcher started, served from the first scrape: the last pass's time appears
        # only once a pass has ended, so a first pass that hung (a Terraform run that never
        # returns) left the stalled-watcher alert nothing to fire on
        self.started_at = time.time()
        self._text = self._render(None)
        self._lock = threading.Lock()

    # -- from the controller's thread --------------------------------------------------------

    def watch(self, ctl: Controller, reload_outcome: Callable[[], str | None] | None = None) -> None:
        """Follow `ctl` from now on: what its state already holds (a restarted watcher's
        replicas and history) is where the counters start, not something that happened.
        `reload_outcome`: the watcher's last spec reload outcome (`Watcher.last_reload_outcome`),
        shown as `skyhedge_spec_refused`."""
        self._reload_outcome = reload_outcome
        # each entry as it is appended: the history is capped, and one pass may append more
        # entries than it keeps (`ServiceState.on_log`)
        ctl.state.on_log(lambda entry: self._heard(ctl, entry))
        self._provisioned = {r.id for r in ctl.state.replicas.values() if r.provisioned_at is not None}
        self._warned = set(_warned_ids(ctl))
        self._last_apply = ctl.last_apply
        ctl.subscribe(self.observe)

    def observe(self, ctl: Controller) -> None:
        """Take in one finished pass (a `Controller.subscribe` listener)."""
        now = ctl.clock()
        for rec in ctl.state.replicas.values():
            if rec.provisioned_at is not None and rec.id not in self._provisioned:
                self._provisioned.add(rec.id)
                self._add(
                    "skyhedge_launches_total",
                    cloud=rec.cloud,
                    region=rec.region,
                    zone=rec.zone,
                    market=rec.market,
                )
        for rid in _warned_ids(ctl):
            rec = ctl.state.replicas.get(rid)
            if rid not in self._warned and rec is not None:
                self._warned.add(rid)
                self._add(
                    "skyhedge_interruption_warnings_total",
                    cloud=rec.cloud,
                    region=rec.region,
                    zone=rec.zone,
                    kind="interruption",
                )
        # IDs are never reused, so those the state forgot (`prune_gone`) cannot come back:
        # remembering them grew these sets by one ID per replica ever launched
        self._provisioned &= ctl.state.replicas.keys()
        self._warned &= ctl.state.replicas.keys()
        applied = ctl.last_apply  # kept until the next apply: a new object is a new apply
        if applied is not None and applied is not self._last_apply and (applied.applied or applied.errors):
            self._add("skyhedge_applies_total", result="failed" if applied.errors else "ok")
        self._last_apply = applied
        if self._last_pass is not None and now > self._last_pass:
            # the time since the last pass counts as what that pass found: serving or not
            self.observed_seconds += now - self._last_pass
            if self._serving_now:
                self.serving_seconds += now - self._last_pass
        self._last_pass = now
        target = self._target(ctl)
        ready = sum(1 for r in ctl.state.live() if r.fact().status is ReplicaStatus.READY)
        self._serving_now = target > 0 and ready >= target
        text = self._render(ctl)
        with self._lock:
            self._text = text

    def _add(self, name: str, **labels: str) -> None:
        self._counts[_series(name, labels)] += 1

    def _heard(self, ctl: Controller, entry: dict[str, Any]) -> None:
        """`_count` of an entry as it is appended, in the middle of a pass: a metrics bug must
        not cost the pass its result (as for the listeners of the pass, `Controller.subscribe`)."""
        try:
            self._count(ctl, entry)
        except Exception:
            log.exception("%s: counting a history entry for the metrics failed", ctl.spec.name)

    def _count(self, ctl: Controller, entry: dict[str, Any]) -> None:
        """Counters from a zone event as the pass records it: exactly one `preempted` event with
        a replica ID per replica taken (at its warning, or when it went without one), one
        `launch_failed` per refused launch, one `warning` per rebalance recommendation."""
        event, rid = entry.get("event"), entry.get("replica_id")
        where = _where(entry.get("location"))
        if event == "preempted" and rid is not None:
            rec = ctl.state.replicas.get(str(rid))
            self._add("skyhedge_preemptions_total", **where, market=rec.market if rec is not None else "spot")
        elif event == "launch_failed":
            self._add("skyhedge_launch_failures_total", **where)
        elif event == "warning":
            self._add("skyhedge_interruption_warnings_total", **where, kind="rebalance")

    @staticmethod
    def _target(ctl: Controller) -> int:
        plan = ctl.last_plan
        if plan is not None:
            return plan.target
        return ctl.state.target if ctl.state.target is not None else ctl.spec.replica_policy.min_replicas

    # -- rendering ---------------------------------------------------------------------------

    def _render(self, ctl: Controller | None) -> str:
        families: list[_Family] = []

        def family(name: str, kind: str, help_text: str) -> _Family:
            fam = _Family(name, kind, help_text)
            families.append(fam)
            return fam

        passes = family("skyhedge_passes_total", "counter", "Reconcile passes since the watcher started.")
        passes.add(ctl.ticks if ctl is not None else 0)
        family("skyhedge_watcher_start_timestamp_seconds", "gauge", "When this watcher process started.").add(
            self.started_at
        )
        if ctl is not None:
            state = ctl.state
            plan = ctl.last_plan
            info = family("skyhedge_info", "gauge", "The watched service and its policy (always 1).")
            info.add(
                1,
                service=ctl.spec.name,
                policy=plan.policy if plan is not None else ctl.spec.replica_policy.policy,
            )
            last = family(
                "skyhedge_last_pass_timestamp_seconds", "gauge", "When the last reconcile pass ended."
            )
            last.add(ctl.clock())
            replicas = family(
                "skyhedge_replicas",
                "gauge",
                "Live replicas by location, market and state (PROVISIONING, STARTING, READY...).",
            )
            per: Counter[tuple[str, str, str, str, str]] = Counter()
            for cand in ctl.placement.locations:  # every zone, market and state, 0 included
                loc = cand.location
                for market in ("spot", "on-demand") if cand.sells_spot else ("on-demand",):
                    for status in _LIVE_STATES:
                        per[(loc.cloud, loc.region, loc.zone, market, status.value)] += 0
            for rec in state.live():
                per[(rec.cloud, rec.region, rec.zone, rec.market, rec.fact().status.value)] += 1
            for (cloud, region, zone, market, status), n in sorted(per.items()):
                replicas.add(n, cloud=cloud, region=region, zone=zone, market=market, state=status)
            target = self._target(ctl)
            family("skyhedge_target_replicas", "gauge", "Replicas the service must have READY.").add(target)
            ready = sum(n for key, n in per.items() if key[4] == ReplicaStatus.READY.value)
            family("skyhedge_ready_replicas", "gauge", "Live replicas that are READY.").add(ready)
            family(
                "skyhedge_serving", "gauge", "1 while at least the target number of replicas is READY."
            ).add(1 if target > 0 and ready >= target else 0)
            if plan is not None:
                summary = plan.summary()
                family(
                    "skyhedge_hourly_cost_dollars", "gauge", "What the planned replicas cost per hour."
                ).add(float(summary["hourly_cost"]))  # type: ignore[arg-type]
                family(
                    "skyhedge_ondemand_only_hourly_cost_dollars",
                    "gauge",
                    "What as many replicas would cost per hour on on-demand only.",
                ).add(float(summary["ondemand_only_hourly_cost"]))  # type: ignore[arg-type]
            if self._reload_outcome is not None:
                # a refused edit leaves the watcher on the spec it read before, which only a log
                # line and `status` said: a deploy that never took effect could go unnoticed
                family(
                    "skyhedge_spec_refused",
                    "gauge",
                    "1 while the spec file's last reload was refused or failed (the watcher runs the "
                    "spec it read before).",
                ).add(1 if self._reload_outcome() in ("refused", "failed") else 0)
            scaler = state.extra.get("autoscaler") or {}
            qps = scaler.get("qps")
            if isinstance(qps, (int, float)) and not isinstance(qps, bool):
                family(
                    "skyhedge_requests_per_second", "gauge", "Client requests per second through the router."
                ).add(float(qps))
            if ctl.scaler.enabled:
                # a wish waiting out its delay (up to downscale_delay_seconds: 20 minutes by
                # default) was in the log and `status` only: a dashboard saw the target move
                # without warning, and could not tell a target held at max_replicas from one at rest
                pending = scaler.get("pending")
                wanted = pending if isinstance(pending, int) and not isinstance(pending, bool) else target
                family(
                    "skyhedge_autoscaler_wanted_replicas",
                    "gauge",
                    "The target the request rate asks for; differs from skyhedge_target_replicas while "
                    "the change waits out upscale_delay_seconds or downscale_delay_seconds.",
                ).add(wanted)
            marked = {str(k) for k in ((state.policy_memory.get("memory") or {}).get("preempted") or [])}
            zones = family(
                "skyhedge_zone_marked_preempted",
                "gauge",
                "1 for a zone the policy currently avoids for spot (it lost capacity lately).",
            )
            for cand in ctl.placement.candidates:
                loc = cand.location
                zones.add(1 if loc.key in marked else 0, cloud=loc.cloud, region=loc.region, zone=loc.zone)
            failing = family(
                "skyhedge_root_failing",
                "gauge",
                "1 while the Terraform root of a cloud region fails its applies for a reason of its own "
                "(credentials expired, endpoint unreachable, throttled): held back, retried with a backoff.",
            )
            for (cloud, region), on in sorted(_failing_roots(ctl).items()):
                failing.add(on, cloud=cloud, region=region)
            quota = family(
                "skyhedge_quota_exhausted",
                "gauge",
                "1 while an account quota of a market in a region is used up: it refused a launch there "
                "and none has succeeded since (launches there wait until a person raises it).",
            )
            for (cloud, region, market), on in sorted(_quota_exhausted(ctl).items()):
                quota.add(on, cloud=cloud, region=region, market=market)
        serving = family(
            "skyhedge_serving_seconds_total",
            "counter",
            "Seconds the service was serving (READY >= target), as seen at passes.",
        )
        serving.add(self.serving_seconds)
        observed = family(
            "skyhedge_observed_seconds_total",
            "counter",
            "Seconds watched: availability = rate(serving_seconds) / rate(observed_seconds).",
        )
        observed.add(self.observed_seconds)
        counts = Counter(self._counts)
        for key in _zero_series(ctl) if ctl is not None else ():
            counts[key] += 0
        for name, (help_text, _) in _COUNTERS.items():
            fam = family(name, "counter", help_text)
            for (metric, labels), n in sorted(counts.items()):
                if metric == name:
                    fam.add(n, **dict(labels))
        return "\n".join(f.text() for f in families) + "\n"

    def text(self) -> str:
        """The exposition as of the last pass (thread-safe)."""
        with self._lock:
            return self._text


def local_port_conflict(spec: ServiceSpec, port: int) -> str | None:
    """Why `port` cannot be the metrics port of `spec`'s watcher (one line naming the flag and
    the range), or None if it can.

    Local replica r-N listens on `resources.local_base_port + N`, and N keeps growing as replicas
    are replaced (up to MAX_PORT); a metrics listener on one of those ports made that replica's
    launch fail three times ("port ... already in use") before the ID was given up, delaying
    every recovery that reached it. The router's ports are skipped when IDs are handed out, but
    the watcher's own listener is not known to the planner: refusing the port is the simple rule.
    """
    if "local" not in spec.placement.clouds:
        return None
    base = spec.resources.local_base_port
    if base < port <= MAX_PORT:
        return (
            f"--metrics-port {port} is in the local replicas' port range {base + 1}-{MAX_PORT} "
            f"(r-N listens on resources.local_base_port {base} + N): choose a port up to {base}"
        )
    return None


def router_port_conflict(spec: ServiceSpec, port: int) -> tuple[str, str] | None:
    """The spec field whose port `port` is and why it cannot be the metrics port (one line naming
    the flag and the field), or None if it is neither of the router's ports.

    The watcher binds its metrics listener before its first pass, so on the router's own port
    (`service.port`) or its status port nginx could never bind: replicas were launched that
    nothing routed to. Refused whatever the cloud, the host or `--no-routing`: the router is the
    service's, whoever runs it."""
    for field_name, taken in (
        ("service.port", spec.service.port),
        ("service.router.status_port", spec.service.router.status_port),
    ):
        if taken == port:
            return field_name, (
                f"--metrics-port {port} is the router's {field_name} of {spec.name}: nginx could not "
                "listen there; choose another port"
            )
    return None


class MetricsServer:
    """`GET /metrics` (and HEAD) on `host:port`, from a daemon thread; `close()` stops it and frees the port.
    Binding happens in the constructor, so a port in use is refused before the watcher starts."""

    def __init__(self, metrics: Metrics, *, host: str = "127.0.0.1", port: int) -> None:
        self.metrics = metrics

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self, head: bool = False) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?", 1)[0] != "/metrics":
                    self._send(404, b"not found: try /metrics\n", "text/plain; charset=utf-8", head)
                    return
                self._send(200, metrics.text().encode("utf-8"), CONTENT_TYPE, head)

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
                """What GET answers, without the body: health checkers probe with HEAD."""
                self.do_GET(head=True)

            def _send(self, status: int, body: bytes, ctype: str, head: bool = False) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            timeout = 10  # a client that connects and says nothing does not hold a thread for ever

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base's name
                log.debug("metrics: " + format, *args)

        bare = host.strip("[]")  # "[::1]" as in a URL

        class Server(http.server.ThreadingHTTPServer):
            address_family = socket.AF_INET

            def handle_error(self, request: Any, client_address: Any) -> None:
                """A request that failed, in the watcher's log: socketserver's own printed a
                20-line traceback on stderr, past the log (JSON or not), for every client that
                reset its connection, as TCP health checks and port scanners do (measured: one
                bare connect and reset, 19 lines that were not JSON amid `--log-format json`)."""
                exc = sys.exc_info()[1]
                peer = client_address[0] if isinstance(client_address, tuple) else client_address
                if isinstance(exc, (ConnectionError, TimeoutError)):  # the client went away
                    log.debug("metrics: %s: %s", peer, exc)
                else:
                    log.warning("metrics: a request from %s failed: %s", peer, exc, exc_info=True)

        try:  # the address family of what the host names (an IPv6 address or an IPv6-only name)
            found = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            Server.address_family = found[0][0]
            self.server = Server((bare, port), Handler)
        except OSError as exc:
            raise SkyhedgeError(
                f"--metrics-port {port}: cannot listen on {host}:{port} ({exc.strerror or exc})"
            ) from exc
        self.server.daemon_threads = True
        shown = f"[{bare}]" if ":" in bare else bare
        self.address = f"http://{shown}:{self.server.server_address[1]}/metrics"
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="skyhedge-metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
