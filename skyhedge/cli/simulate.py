"""`skyhedge simulate`: replay spot-capacity traces through policies; cost and availability."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from skyhedge.cli._app import (
    FiniteFloat,
    blamed_on,
    console,
    echo,
    err_console,
    fitted,
    main,
    sigterm_as_interrupt,
)
from skyhedge.errors import SkyhedgeError, TraceError
from skyhedge.simulator import OPTIMAL, SimConfig, load_prices, unmatched_prices
from skyhedge.simulator import simulate as run_simulation
from skyhedge.simulator.bar import Verdict, annotate, judge
from skyhedge.simulator.latency import check_replay, load_arrivals
from skyhedge.simulator.runner import (
    MAX_ONDEMAND_COST_RATIO,
    MAX_REPEATS,
    MIN_ONDEMAND_COST_RATIO,
    check_inputs,
    check_policies,
)
from skyhedge.simulator.traces import TICK_SECONDS, load_traces
from skyhedge.state import check_writable

P = ParamSpec("P")
DEFAULT_POLICIES = "spothedge,skyserve,optimal,ondemand,even,rr,single-region"
_SAME_NAME_HINT = "give their common parent folder instead (each trace is then named by its path in it)"


class TracePath(click.Path):
    """A `click.Path` refusing an empty value: `Path("")` is the current directory, so an unset
    shell variable (`--trace "$DIR"`) would silently simulate whatever traces the cwd holds."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("expected a trace directory or file, got an empty value", param, ctx)
        return super().convert(value, param, ctx)


def _memory_error_is_one_line(command: Callable[P, None]) -> Callable[P, None]:
    """Turn running out of memory into one `error:` line: numpy's "Unable to allocate 7.28 TiB
    for an array ..." is a traceback otherwise, and the bounds on --repeats and trace sizes cannot
    foresee every machine's memory."""

    @wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            command(*args, **kwargs)
        except MemoryError as exc:
            reason = " ".join(str(exc).split()) or "no details"
            raise SkyhedgeError(
                f"out of memory while simulating ({reason}); use fewer or shorter traces, or fewer --repeats"
            ) from exc

    return run


def _ratio_in_range(ctx: click.Context, param: click.Parameter, ratio: float) -> float:
    """`--ondemand-cost-ratio` within bounds: finite extremes (1e-308, 1e308) overflow costs into
    `Infinity` and the optimum's objective into nonsense. Checked after `FiniteFloat`, so `inf`
    still says it is not a finite number."""
    if not MIN_ONDEMAND_COST_RATIO <= ratio <= MAX_ONDEMAND_COST_RATIO:
        raise click.BadParameter(
            f"expected {MIN_ONDEMAND_COST_RATIO:g} to {MAX_ONDEMAND_COST_RATIO:g} "
            f"(on-demand price / spot price), got {ratio:g}",
            param_hint="'--ondemand-cost-ratio'",
        )
    return ratio


def _policy_names(texts: tuple[str, ...]) -> list[str]:
    """`--policy` values (the option may be repeated), each comma-separated; duplicates once."""
    given = texts or (DEFAULT_POLICIES,)
    names = [name.strip() for text in given for name in text.split(",") if name.strip()]
    if not names:
        raise click.BadParameter("expected one or more policy names, comma-separated", param_hint="--policy")
    return list(dict.fromkeys(names))


def _instance_types(values: tuple[str, ...]) -> list[str] | None:
    """`--instance-type` values, each possibly comma-separated; None when not given."""
    kinds = [kind.strip() for value in values for kind in value.split(",") if kind.strip()]
    if values and not kinds:
        raise click.BadParameter("expected one or more instance types", param_hint="--instance-type")
    return list(dict.fromkeys(kinds)) or None


@main.command()
@click.option(
    "--trace",
    "trace_paths",
    multiple=True,
    required=True,
    type=TracePath(path_type=Path),
    help="Trace directory (one JSON per zone), CSV file or one zone's JSON file; repeat for several "
    "traces. A directory "
    "holding several instance types per zone gives one trace per type, named DIR[TYPE]; a folder "
    "of trace directories (../shared/traces) gives every trace below it.",
)
@click.option(
    "--instance-type",
    "instance_type_values",
    multiple=True,
    metavar="TYPE[,TYPE...]",
    help="Keep only the zone files of these instance types (the file name after the zone, e.g. "
    "k80_1), one trace per type; repeatable or comma-separated.",
)
@click.option(
    "--policy",
    "policy_text",
    multiple=True,
    help="Comma-separated policy names (repeatable) [default: "
    + DEFAULT_POLICIES
    + "]; 'optimal' is the omniscient optimum; 'module:Class' loads a plug-in.",
)
@click.option(
    "--repeats",
    default=10,
    show_default=True,
    type=click.IntRange(1, MAX_REPEATS),
    help="Windows per trace.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=click.IntRange(0, 2**32 - 1),
    help="Seed of window offsets and zone order.",
)
@click.option(
    "--target", default=3, show_default=True, type=click.IntRange(1, 1000), help="Ready replicas N."
)
@click.option(
    "--cold-start",
    default=120.0,
    show_default=True,
    type=FiniteFloat(min=0, max=86400.0),
    help="Seconds from launch to READY (rounded up to 30 s ticks; at most a day).",
)
@click.option(
    "--ondemand-cost-ratio",
    default=3.0,
    show_default=True,
    type=FiniteFloat(min=0, min_open=True),
    callback=_ratio_in_range,
    help=f"On-demand price / spot price ({MIN_ONDEMAND_COST_RATIO:g} to {MAX_ONDEMAND_COST_RATIO:g}).",
)
@click.option(
    "--extra",
    default=1,
    show_default=True,
    type=click.IntRange(0, 100),  # as the spec's num_overprovision
    help="Over-provisioned spot replicas.",
)
@click.option(
    "--ticks", default=2880, show_default=True, type=click.IntRange(min=2), help="Window length (30 s)."
)
@click.option(
    "--availability-target",
    type=FiniteFloat(min=0.5, max=1),
    default=None,
    help="Availability objective passed to the policies (replica_policy.availability_target) and "
    "reported as met or not [default: 0.99, the paper's SLO].",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per trace and policy.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a plot; the extension picks the format: .png, .svg, .pdf, .eps or .ps.",
)
@click.option("--latency", is_flag=True, help="Request-level latency: P50/P90/P99 and failure rate.")
@click.option(
    "--arrivals",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Recorded request timestamps (one per line) instead of Poisson; implies --latency.",
)
@click.option(
    "--prices",
    "prices_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help='JSON {"zone": {"spot": $/h, "ondemand": $/h}}: also report dollars.',
)
@_memory_error_is_one_line
def simulate(
    trace_paths: tuple[Path, ...],
    instance_type_values: tuple[str, ...],
    policy_text: tuple[str, ...],
    repeats: int,
    seed: int,
    target: int,
    cold_start: float,
    ondemand_cost_ratio: float,
    extra: int,
    ticks: int,
    availability_target: float | None,
    as_json: bool,
    plot_path: Path | None,
    latency: bool,
    arrivals: Path | None,
    prices_path: Path | None,
) -> None:
    """Replay spot-capacity traces through placement policies: cost and availability per policy."""
    policies = _policy_names(policy_text)
    with blamed_on("--policy"):
        check_policies(policies)
    if plot_path is not None:
        from skyhedge.simulator.plot import plot_format  # matplotlib only when asked

        plot_format(plot_path)  # an extension it cannot honour fails before any work
        check_writable(plot_path, "plot")
    instance_types = _instance_types(instance_type_values)
    traces = []
    named: dict[str, Path] = {}  # results are reported by name: two of one name could not be told apart
    for path in trace_paths:
        for trace in load_traces(path, instance_types=instance_types):
            if (other := named.setdefault(trace.name, path)) is not path:
                hint = "the same trace given twice" if other.resolve() == path.resolve() else _SAME_NAME_HINT
                raise TraceError(f"--trace: {other} and {path} share the name {trace.name!r}; {hint}")
            traces.append(trace)
    config = SimConfig(
        target=target,
        cold_start_seconds=cold_start,
        ondemand_cost_ratio=ondemand_cost_ratio,
        extra=extra,
        ticks=ticks,
        repeats=repeats,
        seed=seed,
        latency=latency or arrivals is not None,
        arrivals=load_arrivals(arrivals) if arrivals is not None else None,
        prices=load_prices(prices_path) if prices_path is not None else None,
        availability_target=availability_target,
        # --ticks given: the user asked for that window, and a trace too short for it is an error
        whole_short_traces=_is_default("ticks"),
    )
    if config.arrivals is not None:  # gaps so short that a window gets millions of requests
        check_replay(config.arrivals, (ticks - config.cold_start_ticks) * TICK_SECONDS, str(arrivals))
    check_inputs(traces, config)  # every trace's window length and prices, before any is simulated
    for trace in traces:
        if config.for_trace(trace) is not config:
            err_console.print(
                escape(
                    f"note: {trace.name}: {trace.ticks} ticks ({trace.hours:.1f} h) of trace, shorter than a "
                    f"window of {config.ticks}: its windows are the whole trace (--ticks refuses it instead)"
                ),
                soft_wrap=True,
            )
    if config.prices is not None and (unmatched := unmatched_prices(config.prices, traces)):
        one = len(unmatched) == 1
        err_console.print(
            escape(
                f"warning: {prices_path}: {len(unmatched)} price "
                f"{'entry names' if one else 'entries name'} no zone of the traces and "
                f"{'is' if one else 'are'} ignored: {', '.join(unmatched)}"
            ),
            soft_wrap=True,
        )
    total = len(traces) * len(policies) * repeats
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    ) as progress:
        task = progress.add_task("simulating", total=total)

        def advance(trace: str, policy: str, window: int) -> None:
            text = escape(f"{trace} {policy} window {window + 1}/{repeats}")  # "aws[k80_1]": no markup
            progress.update(task, advance=1, description=text)

        # a SIGTERM (`kill`, a supervisor, a cancelled job) stops as a Ctrl-C does: the solver
        # processes are stopped with it, and the command says so in one line (exit 143)
        with sigterm_as_interrupt():
            summaries = run_simulation(
                traces, policies, config, progress=advance, keep_timelines_of=0 if plot_path else None
            )

    rows = [summary.to_json() for summary in summaries]
    if as_json:
        echo(json.dumps(annotate(rows), indent=2, allow_nan=False))  # undefined numbers are null
    else:
        verdicts = judge(rows)
        table = _table(rows, verdicts, config)
        console.print(fitted(table, console))
    if plot_path is not None:  # after the results: a plot that fails to write loses nothing else
        from skyhedge.simulator.plot import plot_results  # matplotlib only when asked

        plot_results(summaries, traces, plot_path, target=target)
        err_console.print(escape(f"wrote {plot_path}"))


def _is_default(param: str) -> bool:
    """The option `param` of the running command was not given (its default is in use)."""
    source = click.get_current_context().get_parameter_source(param)
    return source in (None, click.core.ParameterSource.DEFAULT)


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _num(value: float | None, spec: str) -> str:
    """`value` formatted, or "-" when undefined (latency of windows that received no request)."""
    return "-" if value is None else format(value, spec)


def _table(rows: list[dict], verdicts: dict[tuple[str, str], Verdict], config: SimConfig) -> Table:
    windows = f"{config.repeats} window{'' if config.repeats == 1 else 's'}"
    # the windows as simulated: a trace shorter than the default window is played whole
    lengths = {row["trace"]: row["window_ticks"] or config.ticks for row in rows}
    ticks = f"{config.ticks} ticks"
    if len(set(lengths.values())) == 1:
        ticks = f"{next(iter(lengths.values()), config.ticks)} ticks"
    elif short := [f"{name}: {n}" for name, n in lengths.items() if n != config.ticks]:
        ticks += f" ({', '.join(short)}, the whole trace)"
    # the cold start the run used: --cold-start rounded up to whole 30 s ticks
    cold = config.cold_start_ticks * TICK_SECONDS
    table = Table(
        title=(
            f"N={config.target}, extra={config.extra}, cold start {cold:g}s, "
            f"on-demand x{config.ondemand_cost_ratio:g}, {windows} of {ticks}"
        )
    )
    # Where the terminal is narrower than the table, the figures keep their width (a figure is
    # never cut: "100.…" or "…" said nothing) and the trace name folds over lines instead, whole.
    table.add_column("trace", overflow="fold")
    table.add_column("policy", no_wrap=True)

    def figure(name: str) -> None:
        table.add_column(name, justify="right", no_wrap=True)

    figure("avail.")
    figure("worst")
    figure("rel. cost")
    figure("±")
    figure("spot")
    figure("runs")
    latency = config.latency
    dollars = config.prices is not None
    if latency:
        for name in ("P50 s", "P90 s", "P99 s", "failed"):
            figure(name)
    if dollars:
        figure("$/window")
        figure("$ OD only")
    # --availability-target given: whether each policy met it (the JSON's availability_target_met)
    target = config.availability_target
    if target is not None:
        figure(f"target {100 * target:g}%")
    if verdicts:
        table.add_column("vs SpotHedge")  # "missed: avail -0.05 pts, cost +0.004 over" wraps at its words
    for data in rows:
        style = "bold" if data["policy"] == OPTIMAL else None
        row = [
            escape(data["trace"]),  # "aws-10-26-2022[k80_1]" is not rich markup
            escape(data["policy"]),
            _pct(data["availability"], 2),  # the SpotHedge bar is judged in hundredths of a point
            _pct(data["availability_min"], 2),
            _num(data["relative_cost"], ".3f"),
            _num(data["relative_cost_std"], ".3f"),
            _pct(data["spot_share"]),
            str(data["runs"]),
        ]
        if latency:
            row += [_num(data.get(key), ".1f") for key in ("latency_p50", "latency_p90", "latency_p99")]
            row.append(_pct(data.get("failure_rate")))
        if dollars:
            row += [_num(data.get("dollars"), ",.2f"), _num(data.get("ondemand_dollars"), ",.2f")]
        if target is not None:
            row.append("met" if data["availability_target_met"] else "missed")
        if verdicts:
            verdict = verdicts.get((data["trace"], data["policy"]))
            row.append("" if verdict is None else verdict.describe())
        table.add_row(*row, style=style)
    return table
