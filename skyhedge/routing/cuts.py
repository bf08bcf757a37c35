"""Which of nginx's connections to a replica taken out of the router are cut, and what is said.

Shared by the watcher (`Controller._sever`, `Controller._cut_hung`), `apply` and `routing
reload|up` (`apply.cut_gone_connections`, `cli.routing`): the cut itself is `Router.sever`; this
decides which connections nginx could still retry elsewhere, and words the line so that it says
only what nginx does with them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

from skyhedge.errors import RoutingError

if TYPE_CHECKING:
    from skyhedge.spec import RouterOptions

Say = Callable[[str], None]

#: Seconds kept back from `next_upstream_timeout` for the cut of a hung replica's requests (its
#: reload and `Router.sever` themselves, nginx's clock): a request cut later than that is no longer
#: retried, and would have lost the chance a replica only slow still gave it.
HUNG_CUT_MARGIN = 1.0


def gone_cut_note(closed: int, ids: str, options: RouterOptions | None) -> str:
    """The line said for `closed` connections cut to the gone replicas `ids`: only what nginx does
    with them. Why not "requests retried", as it said: nginx retries only a request of which no
    byte of the answer came yet, within `next_upstream_timeout` of its start and while
    `next_upstream_tries` allows (a request older than that is answered 503, a stream under way
    ends cut short), and a replica known gone has its connections cut whatever their age."""
    head = f"routing: closed {closed} connection(s) to gone {ids}"
    if options is not None and options.next_upstream_tries <= 1:
        return f"{head}: their requests end (503, or a stream cut short: next_upstream_tries 1 retries none)"
    within = "" if options is None else f" ({options.next_upstream_timeout}s)"
    return (
        f"{head}: a request not answered yet is retried on another replica within "
        f"next_upstream_timeout{within} of its start, others end (503, or a stream cut short)"
    )


def retry_targets(before: Collection[str], after: Collection[str], hung: Collection[str]) -> set[str]:
    """The endpoints nginx's old workers could retry a hung replica's requests on: routed before
    the reload (the config those workers keep serving their requests with: they retry only among
    its replicas) and still routed after it (so not one that failed its probe too), none of the
    `hung` ones."""
    return (set(before) & set(after)) - set(hung)


def cut_hung_connections(
    router: Any,
    options: RouterOptions,
    hung: Mapping[str, str],
    say: Say,
    warn: Say,
    *,
    retry_on: Collection[str],
) -> int:
    """Close the router's connections to replicas just taken out because their probe timed out
    (`hung`: endpoint -> replica ID), but only those carrying a request of which nothing came
    back yet that nginx can still retry on another replica (sent within `next_upstream_timeout`,
    less HUNG_CUT_MARGIN: `Router.sever`'s `awaiting_within`); returns how many. The watcher
    (`Controller._cut_hung`) and `routing reload --probe` both cut through it.

    Why: a hung replica (alive, its port open: the kernel completes connections into its
    backlog) answers none of them, and they waited on the old nginx workers until it was FAILED
    180 s later, when nginx no longer retried them (measured: 12 clients on 3 replicas, all 12
    held 189 s, then 503); with no watcher (`routing reload --probe`), until `read_timeout`. A
    replica only slow to answer its probe loses nothing: those requests start over on another
    replica, and its streams under way and older requests are left to it (cut only once it is
    known gone). So nothing is cut when nginx would retry nothing: `next_upstream_tries` 1, a
    `next_upstream_timeout` within the margin (measured with 1 s and 2 s and a 1 s probe: the
    requests it held were past it at the cut, none retryable), or no replica to retry on
    (`retry_on`, `retry_targets`: routed before the reload and after it): a `routing reload
    --probe` that took out a lone replica only slow had its requests cut and answered 503 in
    1.3 s (measured, 2 of 2), where left to it they were answered in full. A router whose `sever`
    takes no `awaiting_within` is not asked (it would cut everything, streams included)."""
    sever = getattr(router, "sever", None)
    if sever is None or not hung or "awaiting_within" not in inspect.signature(sever).parameters:
        return 0
    within = float(options.next_upstream_timeout) - HUNG_CUT_MARGIN
    if options.next_upstream_tries <= 1 or within <= 0 or not set(retry_on) - set(hung):
        return 0
    try:
        closed = int(sever(sorted(hung), awaiting_within=within))
    except (RoutingError, OSError) as exc:
        warn(f"routing: {exc}")
        return 0
    if closed:
        ids = ",".join(sorted(set(hung.values())))
        say(
            f"routing: closed {closed} connection(s) to hung {ids} (its probe timed out): requests it "
            f"had not begun to answer, sent less than {within:g}s ago, retried on another replica"
        )
    return closed
