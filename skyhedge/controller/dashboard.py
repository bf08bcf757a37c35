"""The live dashboard of `skyhedge up`: replicas per zone and market, readiness, cost, events, and
the roots whose applies keep failing and the quotas used up.

`render(controller)` builds one rich renderable from the controller's state (pure: tests render
it to text); `Dashboard` redraws it after every tick inside a `rich.live.Live`. Every cell is a
`Text`, never a markup string: zone names, endpoints and event notes (which quote paths and error
texts) are data, and `[prod]` in one must show as written, not vanish or break the frame.

`fit` sizes the frame to the terminal: `rich.live.Live` crops a frame taller than the screen at
its bottom, which is where the newest events are, so on an 80x24 terminal (or with eight
replicas) a preemption and its replacement never showed. It shows fewer (older) events first,
then fewer replica rows (saying how many more there are), so the newest events stay in view.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from typing import Any

from rich import get_console
from rich.console import Console, ConsoleDimensions, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from skyhedge.controller.loop import Controller
from skyhedge.planner import by_replica_id
from skyhedge.policy.types import ReplicaStatus
from skyhedge.state import FAILING_ROOTS_KEY, QUOTA_KEY

STATUS_STYLE = {
    ReplicaStatus.PROVISIONING: "yellow",
    ReplicaStatus.STARTING: "yellow",
    ReplicaStatus.READY: "green",
    ReplicaStatus.NOT_READY: "red",
    ReplicaStatus.SHUTTING_DOWN: "magenta",
    ReplicaStatus.PREEMPTED: "red",
    ReplicaStatus.FAILED: "red",
    ReplicaStatus.TERMINATED: "dim",
}


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _trouble(state: Any, now: float) -> list[Text]:
    """One line per Terraform root whose applies keep failing and per account quota used up (what
    `status` says in its `Failing:` and `Quota:` lines): both wait for a person (credentials
    renewed, a quota raised), and the dashboard showed them only as a warning among the events,
    scrolled away by the next ten. One line each, cut to the terminal's width (`status` has them
    in full)."""
    lines: list[Text] = []
    roots = state.extra.get(FAILING_ROOTS_KEY)
    for key, outage in sorted(roots.items()) if isinstance(roots, dict) else ():
        since = time.strftime("%H:%M:%S", time.localtime(float(outage["since"])))
        reason = str(outage["reason"]).removeprefix(f"{key}: ")  # (the error line names the root)
        line = Text(f"failing: {key} applies since {since} ({outage['failures']} in a row", style="red")
        if outage.get("idle_since") is not None:  # nothing to apply there: no retry of its own
            line.append(f", idle, tried with the next launch there): {reason}")
        else:
            line.append(f", next try in {_age(float(outage['retry_at']) - now)}): {reason}")
        lines.append(line)
    quota = state.extra.get(QUOTA_KEY)
    for key, entry in sorted(quota.items()) if isinstance(quota, dict) else ():
        cloud, region, market = str(key).split("/")
        where = f"{cloud}/{region}" if region != "*" else f"every {cloud} region"
        since = time.strftime("%H:%M:%S", time.localtime(float(entry["since"])))
        line = Text(f"quota: {market} in {where} used up since {since}", style="yellow")
        line.append(f" ({entry['refusals']} refusal(s)): {entry['reason']}")
        lines.append(line)
    for line in lines:
        line.no_wrap, line.overflow = True, "ellipsis"
    return lines


#: Events shown when the terminal has room; `fit` shows fewer (down to MIN_EVENTS) before it
#: drops replica rows, and fewer still only when a single replica row does not leave room.
MAX_EVENTS = 10
MIN_EVENTS = 3


def render(
    ctl: Controller,
    *,
    endpoint: str | None = None,
    now: float | None = None,
    max_events: int = MAX_EVENTS,
    max_replicas: int | None = None,
) -> Any:
    """The frame: `max_events` newest events, and the first `max_replicas` replicas (all when
    None) followed by a row counting the rest."""
    now = ctl.clock() if now is None else now
    state = ctl.state
    live = sorted(state.live(), key=by_replica_id)
    statuses = Counter(r.fact().status for r in live)
    plan = ctl.last_plan
    summary = plan.summary() if plan is not None else {}
    preempted = set((state.policy_memory.get("memory") or {}).get("preempted") or [])
    scaler = state.extra.get("autoscaler") or {}

    head = Text()
    head.append(f"{ctl.spec.name}", style="bold")
    if endpoint:
        head.append(f"  {endpoint}", style="cyan")
    head.append(f"  target {plan.target if plan else state.target or ctl.spec.replica_policy.min_replicas}")
    head.append(
        f"  ready {statuses.get(ReplicaStatus.READY, 0)}/{len(live)}",
        style="green" if plan and statuses.get(ReplicaStatus.READY, 0) >= plan.target else "yellow",
    )
    if scaler.get("qps") is not None:
        head.append(f"  {scaler['qps']:.1f} req/s")
    if summary:
        head.append(f"  ${summary['hourly_cost']:.4f}/h")
        head.append(
            f" (on-demand only ${summary['ondemand_only_hourly_cost']:.4f}/h, "
            f"saving {summary['savings_pct']:.0f}%)"
        )
    head.append(
        f"  policy {plan.policy if plan else ctl.spec.replica_policy.policy}  tick {ctl.ticks}", style="dim"
    )

    zones = Table(title="zones", expand=True, box=None)
    # the zone keeps its width on a narrow terminal (the counts and headers give way): cut to
    # `local/local/loca…` on every row, it hid which zone was PREEMPTED (its name ends the key)
    longest = max((len(c.location.key) for c in ctl.placement.locations), default=4)
    zones.add_column("zone", no_wrap=True, min_width=min(longest, 40))
    for col in ("spot", "on-demand", "ready", "policy view"):
        zones.add_column(col)
    per_zone: dict[str, Counter[str]] = {}
    for r in live:
        c = per_zone.setdefault(r.location.key, Counter())
        c[r.market] += 1
        if r.fact().ready:
            c["ready"] += 1
    for cand in ctl.placement.locations:
        key = cand.location.key
        c = per_zone.get(key, Counter())
        if not cand.sells_spot:
            view = Text("on-demand only", style="dim")
        elif key in preempted:
            view = Text("PREEMPTED", style="red")
        else:
            view = Text("ACTIVE", style="green")
        zones.add_row(Text(key), Text(str(c["spot"])), Text(str(c["on-demand"])), Text(str(c["ready"])), view)

    reps = Table(title="replicas", expand=True, box=None)
    for col in ("id", "zone", "market", "status", "age", "endpoint"):
        reps.add_column(col)
    shown = live if max_replicas is None else live[: max(0, max_replicas)]
    for r in shown:
        st = r.fact().status
        reps.add_row(
            Text(r.id),
            Text(r.zone),
            Text(r.market),
            Text(st.value, style=STATUS_STYLE.get(st, "")),
            Text(_age(now - r.launched_at)),
            Text(r.endpoint or "-"),
        )
    if len(shown) < len(live):  # a caption: a row's first cell would wrap it in the id column
        reps.caption = Text(f"... {len(live) - len(shown)} more (skyhedge status lists all)", style="dim")

    events = Table(title="recent events", expand=True, box=None, show_header=False)
    events.add_column("at", style="dim", no_wrap=True)
    events.add_column("what", ratio=1)  # the time keeps its width on a wide terminal
    for note in list(ctl.notes)[-max_events:] if max_events > 0 else []:
        events.add_row(Text(time.strftime("%H:%M:%S", time.localtime(note.at))), Text(note.text))
    trouble = _trouble(state, now)
    return Panel(Group(head, *trouble, zones, reps, events), title="skyhedge up", border_style="blue")


def _height(console: Console, renderable: Any, width: int) -> int:
    return len(console.render_lines(renderable, console.options.update(width=width, height=None), pad=False))


def fit(
    ctl: Controller,
    console: Console,
    *,
    width: int,
    height: int,
    endpoint: str | None = None,
    now: float | None = None,
) -> Any:
    """The frame, trimmed to `height` lines of `width` columns (see the module's docstring):
    older events go first (down to MIN_EVENTS), then replica rows, then events down to one."""
    total = len(ctl.state.live())
    events, replicas = MAX_EVENTS, total
    while True:
        rows = None if replicas >= total else replicas
        frame = render(ctl, endpoint=endpoint, now=now, max_events=events, max_replicas=rows)
        over = _height(console, frame, width) - height
        if over <= 0:
            return frame
        if events > MIN_EVENTS:
            events = max(MIN_EVENTS, events - over)
        elif replicas > 1:
            # the "... N more" row takes a line of its own the first time rows are dropped
            replicas = max(1, replicas - over - (1 if replicas >= total else 0))
        elif events > 1:
            events = max(1, events - over)
        else:
            return frame  # no room even for that: rich crops it


def terminal_size(console: Console) -> ConsoleDimensions:
    """The size of the terminal the console draws on, now. rich takes `COLUMNS`/`LINES` from the
    environment once, when they are set, and keeps them: a shell or tool that exported them froze the
    dashboard at that size through every resize. On a terminal, its own size wins, and the console is
    told (`Live` draws at the console's width)."""
    if console.is_terminal:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            size = os.get_terminal_size(console.file.fileno())
            if size.columns > 0 and size.lines > 0:  # a pty nobody sized reports 0x0
                console.size = (size.columns, size.lines)
    return console.size


class Dashboard:
    """Redraws after every tick; `refresh_per_second` keeps ages ticking between ticks. Without an
    `endpoint` it shows the service's address from the controller's spec (a reload may move it)."""

    def __init__(
        self, ctl: Controller, *, endpoint: str | None = None, console: Console | None = None
    ) -> None:
        self.ctl = ctl
        self.endpoint = endpoint
        self.console = console if console is not None else get_console()  # `Live` draws a frame at once
        self._last = render(ctl, endpoint=endpoint or ctl.spec.service.url)
        self.live = Live(self._last, console=console, refresh_per_second=2, get_renderable=self._render)
        ctl.subscribe(lambda _c: self.live.refresh())

    def _render(self) -> Any:
        # Drawn from rich's thread while a tick may be changing the state: keep the last good frame.
        with contextlib.suppress(RuntimeError, KeyError, ValueError):
            console = self.console
            size = terminal_size(console)  # read per frame: a resized terminal (SIGWINCH) is followed
            self._last = fit(
                self.ctl,
                console,
                width=size.width,
                height=size.height,
                endpoint=self.endpoint or self.ctl.spec.service.url,
            )
        return self._last

    def __enter__(self) -> Dashboard:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.__exit__(*exc)  # type: ignore[arg-type]
