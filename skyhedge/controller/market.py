"""Replaying a real spot-capacity trace onto the local cloud's zones, time-accelerated.

`skyhedge up --market-trace DIR --speedup K` maps the trace's zones, in order, onto the spec's local
zones and every 30/K seconds moves one 30 s tick forward: a zone whose capacity drops to 0 is
marked preempted (spot launches refused) and its spot replicas are killed; a zone whose capacity
is n has room for n spot replicas (launches beyond refused) and keeps only n of its spot replicas
(the rest reported preempted); a zone back above 0 is open again. Spec zones beyond the trace's
have no spot capacity while the replay runs: the replayed market is the trace's zones, as in
`simulate` (left open, they never dropped, and the policy parked every replica there, so a
replay exercised nothing). The controller
sees exactly what it would see from a real cloud: processes dying and launches refused. The
policy's clock runs at the market's pace (`attach`); the controller's (cold starts, probes,
backoffs) keeps real time.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from skyhedge.clouds.local import runtime_dir
from skyhedge.clouds.local.capacity import end_replay, record_replay
from skyhedge.clouds.local.events import set_zone_capacity
from skyhedge.errors import TraceError
from skyhedge.service import PolicyClock
from skyhedge.simulator.traces import TICK_SECONDS, UNLIMITED, load_traces, trace_dirs

if TYPE_CHECKING:
    from skyhedge.controller.loop import Controller

log = logging.getLogger("skyhedge.controller")

#: The fastest a replay makes the controller decide (real seconds): once a tick up to a speedup
#: of 300. A pass that changes nothing costs about 8 ms (measured: `up` at speedup 300, a pass
#: every 0.1 s, used 3.9 s of CPU in 40 s, start-up included): under a tenth of a core.
MIN_PASS_SECONDS = 0.1


class MarketReplay:
    def __init__(
        self,
        trace_dir: Path,
        zones: Sequence[str],
        state_dir: Path,
        *,
        speedup: float = 60.0,
        start_tick: int = 0,
        instance_type: str | None = None,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        if speedup <= 0:
            raise TraceError(f"--speedup: expected a positive number, got {speedup}")
        if folders := trace_dirs(Path(trace_dir)):  # simulate takes a folder of traces; a replay is one
            names = ", ".join(str(f.relative_to(trace_dir)) for f in folders[:4])
            more = f" and {len(folders) - 4} more" if len(folders) > 4 else ""
            raise TraceError(
                f"{trace_dir}: a folder of {len(folders)} traces; replay one of them: {names}{more}"
            )
        # a directory with several instance types per zone (one spot pool each) replays one of them
        try:
            traces = load_traces(trace_dir, instance_types=[instance_type] if instance_type else None)
        except TraceError as exc:  # (simulate's flag is --instance-type; up's names the trace)
            raise TraceError(str(exc).replace("--instance-type", "--market-instance-type")) from exc
        if len(traces) > 1:
            kinds = ", ".join(t.instance_type or "(none)" for t in traces)
            raise TraceError(
                f"{trace_dir}: holds several instance types per zone ({kinds}); a service runs one: "
                "pick it with --market-instance-type"
            )
        self.trace = traces[0]
        n = min(len(zones), len(self.trace.zones))
        if n == 0:
            raise TraceError(f"{trace_dir}: no zone to replay onto (the spec has no local zone)")
        if not 0 <= start_tick < self.trace.ticks:
            span = self.trace.ticks * TICK_SECONDS
            length = f"{span / 3600:.1f} h" if span >= 3600 else f"{span / 60:.1f} min"
            raise TraceError(
                f"--market-start: tick {start_tick} is not within the trace ({self.trace.ticks} ticks "
                f"of {TICK_SECONDS}s, {length})"
            )
        self.mapping = {zones[i]: i for i in range(n)}
        self.undriven = list(zones[n:])  # beyond the trace's zones: no spot capacity throughout
        self._lock = threading.Lock()  # remap (the watcher's thread) against step (the replay's)
        self.state_dir = state_dir
        self.period = TICK_SECONDS / speedup
        self.tick = start_tick
        self.start_tick = start_tick
        self.on_change = on_change
        self._last: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def attach(self, ctl: Controller) -> None:
        """Run `ctl`'s policy on trace time from now on, as `simulate` does on the same ticks: a
        time-based policy (`skyhedge`: hazard, settle and wave times) on real time would judge a
        market `speedup` times calmer than the trace (measured on 12 h of AWS2 at speedup 36:
        relative cost 0.94 where `simulate` predicts 0.35). Spot replicas that stayed READY report
        their zone SURVIVED once a minute of trace time (SpotHedge's "survived a tick"). The
        controller's own times (cold starts, probes, backoffs) stay real. An idle controller
        decides at least once a tick, as `simulate` does: at the idle pace of 10 s real (6 min of
        trace at speedup 36) timers (settling, the extra's release, a wave's hold) would act up to
        12 ticks late, and `skyhedge` would learn a 300 s decision period where `simulate` teaches
        it 30 s, overestimating the outage an unhedged loss costs (cold start + one period). Not
        faster than MIN_PASS_SECONDS, though: at a speedup of 600 a pass every 50 ms would spend
        a good part of a core on deciding nothing new. Refused launches are retried at that pace
        too (the controller's backoff after failed applies, and its pause of spot launches into
        a zone that refused, are capped at it), as `simulate` retries them every tick."""
        rate = TICK_SECONDS / self.period
        ctl.policy_clock = PolicyClock(origin=ctl.clock(), rate=rate)
        pace = max(self.period, MIN_PASS_SECONDS)
        ctl.options = replace(
            ctl.options,
            survival_period=ctl.options.survival_period / rate,
            interval=min(ctl.options.interval, pace),
            busy_interval=min(ctl.options.busy_interval, pace),
            # refused launches are retried once a tick too, as `simulate` retries them: a backoff of
            # up to 60 s real (72 ticks at speedup 36) withholds every decision meanwhile, and the
            # pass that ends it sees a zone's refusal batched with its later SURVIVED report (the
            # full zone stays ACTIVE, the reopened ones stay PREEMPTED, on-demand stays)
            max_backoff=min(ctl.options.max_backoff, pace),
            # and a zone that refused is asked again a tick later, as `simulate` asks it, not
            # after the watcher's drought pause (30 s doubling to 5 min real: hours of trace)
            spot_retry=min(ctl.options.spot_retry, pace),
            max_spot_retry=min(ctl.options.max_spot_retry, pace),
        )

    def describe(self) -> str:
        pairs = ", ".join(f"{z}<-{self.trace.zones[i].zone}" for z, i in self.mapping.items())
        start = f" from tick {self.start_tick}" if self.start_tick else ""
        rest = (
            f"; {', '.join(self.undriven)} no spot capacity (the trace has {len(self.trace.zones)} "
            f"zone{'s' if len(self.trace.zones) != 1 else ''})"
            if self.undriven
            else ""
        )
        return (
            f"market trace {self.trace.name}: {self.trace.ticks} ticks of {TICK_SECONDS}s{start}, one every "
            f"{self.period:.2f}s ({pairs}{rest})"
        )

    def remap(self, zones: Sequence[str]) -> bool:
        """Drive these local zones from now on (a reloaded spec changed them): the trace's zones
        in order, as at start, the rest closed; a zone no longer in the spec gets its capacity back.
        False: the same zones as before (a reload that left the local zones as they were), nothing
        done."""
        with self._lock:
            n = min(len(zones), len(self.trace.zones))
            mapping = {zones[i]: i for i in range(n)}
            undriven = list(zones[n:])
            if mapping == self.mapping and undriven == self.undriven:
                return False
            dropped = [z for z in self._zones() if z not in zones]
            self.mapping = mapping
            self.undriven = undriven
            self._last = {}  # the next step sets every zone's capacity afresh
            for zone in dropped:
                set_zone_capacity(self.state_dir, zone, 1_000_000)
            if self._thread is not None:
                record_replay(runtime_dir(self.state_dir), self._zones())
            return True

    def _zones(self) -> list[str]:
        """Every local zone the replay holds the capacity of: driven ones, then closed ones."""
        return [*self.mapping, *self.undriven]

    def step(self) -> list[str]:
        """Apply the current tick's capacities (only changes act); advance; return what happened."""
        with self._lock:
            return self._step()

    def _step(self) -> list[str]:
        t = self.tick % self.trace.ticks
        notes = []
        capacities = {zone: int(self.trace.capacity[i, t]) for zone, i in self.mapping.items()}
        capacities.update(dict.fromkeys(self.undriven, 0))
        for zone, cap in capacities.items():
            if self._last.get(zone) == cap:
                continue
            self._last[zone] = cap
            killed = set_zone_capacity(self.state_dir, zone, cap if cap < UNLIMITED else 1_000_000)
            shown = "unlimited" if cap >= UNLIMITED else str(cap)
            text = f"market tick {t}: {zone} capacity {shown}"
            if killed:
                text += f", preempted {', '.join(p.id for p in killed)}"
            notes.append(text)
        self.tick += 1
        for text in notes:
            if self.on_change:
                self.on_change(text)  # the controller's note logs it, once
            else:
                log.info("%s", text)
        return notes

    def start(self) -> None:
        # recorded first: a replay killed before `stop` leaves its zones to be reopened by the next
        # launch or watcher (capacity.recover_abandoned), not closed for good
        record_replay(runtime_dir(self.state_dir), self._zones())
        self._thread = threading.Thread(target=self._run, daemon=True, name="skyhedge-market")
        self._thread.start()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.step()
            except (OSError, ValueError) as exc:
                log.warning("market replay: %s", exc)
            next_at += self.period
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        """Stop replaying and give its zones their capacity back: the trace's marks end
        with the replay (a later plain `up` would otherwise find zones it never preempted closed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        with self._lock:
            restored = True
            for zone in self._zones():
                try:
                    set_zone_capacity(self.state_dir, zone, 1_000_000)
                except (OSError, ValueError) as exc:
                    restored = False
                    log.warning("market replay: %s: capacity not restored: %s", zone, exc)
            if restored and self._thread is not None:
                with contextlib.suppress(OSError, ValueError):
                    end_replay(runtime_dir(self.state_dir))
