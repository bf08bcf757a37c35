"""PURE. SkyServe's request-rate autoscaler, fed from the router's cumulative request counter.

SkyServe (`sky/serve/autoscalers.py`, `RequestRateAutoscaler`) computes
    target = ceil(qps / target_qps_per_replica), clipped to [min_replicas, max_replicas]
over a 60 s window of requests, and only adopts a new target after it has wanted it for
`upscale_delay_seconds` (up) or `downscale_delay_seconds` (down) — hysteresis, so a burst does
not buy machines and a lull does not throw away warm replicas. SkyServe counts consecutive
decision periods; our controller ticks on events, not on a fixed period, so the delays here are
measured in seconds since the wish first appeared (the same thing at a fixed period).

The input is nginx's `stub_status` `requests` counter: cumulative, reset when nginx restarts.
A sample lower than the previous one is a reset; the window then starts over.

Two departures from SkyServe, both measured (docs/controller.md, "Autoscaling under load"):

- Downwards, the wish is for as few replicas as serve the rate with `downscale_tolerance` (10 %
  by default) of room (Kubernetes' HPA ignores changes within 10 % too), and more where the count
  is small (`downscale_band`: DOWNSCALE_SIGMAS standard deviations of a Poisson count). With the
  formula alone, a steady load at a threshold (20 req/s at 10 per replica) reads a little above it
  one minute and a little below the next, and each side that outlasted its delay launched or
  released a replica: 56 moves in 2 hours at the example's 10 s / 30 s delays. With a fixed 10 %
  band the same happened at 1 req/s per replica, where 10 % is about one standard deviation.
- A rate is acted on only once its samples span the whole window, and only while the router is
  read. After a start, a watcher restart or an nginx restart the window starts over, and a rate
  over the first seconds (Poisson arrivals at 5 req/s read 11.4 req/s over 1.3 s) started
  wishes, and adopted one saved before the restart at once; a wish no longer measured (the router
  unreadable) was adopted on the last rate read. SkyServe divides the requests of a young window
  by the whole window, which reads low: it does not scale up on a young window either.

No clock, no I/O: `step(state, now, count)` returns the new state; the caller persists it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

QPS_WINDOW_SECONDS = 60.0
#: `AutoscalerState` fields that change with every sample, and that the next samples rebuild: the
#: counter is cumulative, so the rate over the window needs only its first and last sample (a
#: window restored a minute old still spans the requests in between). A watcher writes a state
#: whose only changes are these at most once a minute; a new target or wish is written at once.
MEASUREMENTS = ("samples", "qps")
MIN_SPAN_SECONDS = 1.0  # below this the rate is noise: keep the current target
#: A wish for fewer replicas is for as few as serve the rate with at least this much of their
#: target to spare: the default of `replica_policy.downscale_tolerance` (Kubernetes' HPA ignores
#: changes within 10 % too). `downscale_band` widens it where the count is small.
DOWNSCALE_TOLERANCE = 0.1
#: ... and with at least this many standard deviations of the count the fewer replicas would serve
#: to spare. Chosen by replaying Poisson loads at a threshold (benchmarks/autoscaler_replay.py;
#: docs/controller.md, "Autoscaling under load"): 3 left 1-2 moves an hour at 1.9 times 1-2 req/s
#: per replica with 10 s / 30 s delays; 4 kept half a replica's load at 0.5 req/s per replica on 2
#: replicas for over 40 minutes in 1 run of 10 with 60 s / 300 s delays.
DOWNSCALE_SIGMAS = 3.5
#: The noise never widens the band past this: at 0.1 req/s per replica and short delays a replica
#: serves 9 requests in the 90 s a wish down takes to be adopted, too few to tell anything; the
#: service still scales down once the rate is half what the fewer replicas serve.
MAX_NOISE_BAND = 0.5


@dataclass(frozen=True)
class AutoscalerConfig:
    min_replicas: int
    max_replicas: int | None
    target_qps_per_replica: float | None
    upscale_delay_seconds: float
    downscale_delay_seconds: float
    window_seconds: float = QPS_WINDOW_SECONDS
    downscale_tolerance: float = DOWNSCALE_TOLERANCE

    @property
    def enabled(self) -> bool:
        return self.target_qps_per_replica is not None and self.target_qps_per_replica > 0

    @classmethod
    def from_spec(cls, spec: Any) -> AutoscalerConfig:
        rp = spec.replica_policy
        return cls(
            min_replicas=rp.min_replicas,
            max_replicas=rp.max_replicas,
            target_qps_per_replica=rp.target_qps_per_replica,
            upscale_delay_seconds=float(rp.upscale_delay_seconds),
            downscale_delay_seconds=float(rp.downscale_delay_seconds),
            downscale_tolerance=float(rp.downscale_tolerance),
        )

    def clip(self, n: int) -> int:
        upper = self.max_replicas if self.max_replicas is not None else max(self.min_replicas, n)
        return max(self.min_replicas, min(n, upper))


@dataclass(frozen=True)
class AutoscalerState:
    """The autoscaler's memory: counter samples in the window, the adopted target, the pending wish."""

    samples: tuple[tuple[float, float], ...] = ()
    target: int | None = None
    pending: int | None = None
    pending_since: float | None = None
    qps: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": [list(s) for s in self.samples],
            "target": self.target,
            "pending": self.pending,
            "pending_since": self.pending_since,
            "qps": self.qps,
        }

    @classmethod
    def from_json(cls, data: Any) -> AutoscalerState:
        """The saved memory, or a fresh one when it is not what `to_json` writes. A number that is
        not finite (`Infinity`, `1e999`, `NaN`, or `"nan"` as text, which `float` takes) counts as
        damage too: an infinite target crashed `status` (OverflowError) and every watcher pass,
        and an infinite rate or time reached `status --json` as `Infinity`, which is not JSON."""
        if not isinstance(data, dict):
            return cls()
        try:
            samples = tuple((float(t), float(c)) for t, c in data.get("samples") or ())
            target = data.get("target")
            pending = data.get("pending")
            since = data.get("pending_since")
            qps = data.get("qps")
            state = cls(
                samples=samples,
                target=int(target) if target is not None else None,
                pending=int(pending) if pending is not None else None,
                pending_since=float(since) if since is not None else None,
                qps=float(qps) if qps is not None else None,
            )
        except (TypeError, ValueError, OverflowError):
            return cls()
        numbers = [*(v for sample in state.samples for v in sample), state.pending_since, state.qps]
        if not all(math.isfinite(v) for v in numbers if v is not None):
            return cls()
        return state


def request_rate(samples: tuple[tuple[float, float], ...]) -> float | None:
    """Requests per second over the samples' span, or None when the span is too short to tell."""
    if len(samples) < 2:
        return None
    (t0, c0), (t1, c1) = samples[0], samples[-1]
    span = t1 - t0
    if span < MIN_SPAN_SECONDS:
        return None
    return max(0.0, (c1 - c0) / span)


def raw_target(config: AutoscalerConfig, qps: float) -> int:
    """SkyServe's formula before hysteresis."""
    assert config.target_qps_per_replica
    return config.clip(math.ceil(qps / config.target_qps_per_replica - 1e-9))


def downscale_band(config: AutoscalerConfig, replicas: int, span: float) -> float:
    """The share of their target that `replicas` must have to spare before a wish is for them.

    At least `downscale_tolerance`; wider when the window holds few requests. The rate is a count
    of Poisson arrivals, and a count of k varies by sqrt(k): at 1 req/s per replica, 2 replicas
    serve 120 requests a minute, so a steady load at their threshold read 9 % low one minute in
    six, a fixed 10 % band was crossed by noise alone, and the target moved 7-13 times an hour at
    10 s / 30 s delays. So the rate must also lie DOWNSCALE_SIGMAS standard deviations below what
    they serve over the window and the downscale delay (a wish down is adopted only once every
    sample over the delay wanted it, so the arrivals of both back it). Capped at MAX_NOISE_BAND.
    At 10 req/s per replica and more, two replicas or more, or the default delays, the noise is
    under 10 % and the tolerance decides, as before."""
    assert config.target_qps_per_replica
    served = replicas * config.target_qps_per_replica * (span + config.downscale_delay_seconds)
    noise = DOWNSCALE_SIGMAS / math.sqrt(served) if served > 0 else math.inf
    return max(config.downscale_tolerance, min(MAX_NOISE_BAND, noise))


def wanted_target(config: AutoscalerConfig, qps: float, current: int, span: float | None = None) -> int:
    """The size `qps` (measured over `span` seconds, the window by default) asks for from
    `current`: SkyServe's formula upwards; downwards only as far as serves `qps` with
    `downscale_band` of room (so never below the formula, never above `current`). A band between
    the rate that adds a replica and the one that removes it: the noise of a steady load at a
    threshold crosses the threshold both ways, not the band."""
    wanted = raw_target(config, qps)
    if wanted >= current:
        return wanted
    assert config.target_qps_per_replica
    span = config.window_seconds if span is None else span
    for fewer in range(wanted, current):
        room = fewer * config.target_qps_per_replica * (1.0 - downscale_band(config, fewer, span))
        if qps <= room * (1 + 1e-9):
            return fewer
    return current


def step(
    config: AutoscalerConfig, state: AutoscalerState, now: float, count: float | None
) -> AutoscalerState:
    """Fold one counter sample in (None: the router could not be read) and maybe adopt a new target."""
    current = config.clip(state.target if state.target is not None else config.min_replicas)
    if not config.enabled:
        return AutoscalerState(target=current)
    samples = state.samples
    if count is not None:
        if samples and (count < samples[-1][1] or now < samples[-1][0]):
            samples = ()  # counter reset (router restarted) or clock jump: start the window over
        samples = (*samples, (now, float(count)))
        # Keep one sample at or before the window start so the rate covers the whole window.
        start = now - config.window_seconds
        while len(samples) > 2 and samples[1][0] <= start:
            samples = samples[1:]
    qps = request_rate(samples)
    state = replace(state, samples=samples, target=current, qps=qps)
    young = not samples or samples[-1][0] - samples[0][0] < config.window_seconds - MIN_SPAN_SECONDS
    if qps is None or count is None or young:
        # shown, not acted on: a rate over the first seconds of a window, or one nobody read
        # since; a wish waiting keeps its start, and is adopted once a full window still wants it
        return state
    wanted = wanted_target(config, qps, current, samples[-1][0] - samples[0][0])
    if wanted == current:
        return replace(state, pending=None, pending_since=None)
    same_direction = state.pending is not None and (state.pending > current) == (wanted > current)
    since = state.pending_since if same_direction and state.pending_since is not None else now
    delay = config.upscale_delay_seconds if wanted > current else config.downscale_delay_seconds
    if now - since >= delay:
        return replace(state, target=wanted, pending=None, pending_since=None)
    return replace(state, pending=wanted, pending_since=since)
