"""Assemble a watcher for a spec: its event sources, executor, router, prober, lock and loop.

    with Watcher(spec, state_dir) as w:     # takes the service's writer lock (one watcher)
        w.run()                             # until stop(), SIGTERM or Ctrl-C

The lock is held for the watcher's whole life, so a second `watch`/`up`/`apply` of the same
service fails at once with a clear error instead of fighting over the state.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from skyhedge.controller.loop import Controller, ControllerOptions, apply_cause
from skyhedge.controller.supervisor import Supervisor
from skyhedge.errors import CloudError, EngineError, StateError
from skyhedge.events import EventSource
from skyhedge.service import Placement, resolve_placement
from skyhedge.spec import ServiceSpec
from skyhedge.state import writer_lock

if TYPE_CHECKING:
    from skyhedge.controller.gitops import GitOpsExecutor
    from skyhedge.controller.ports import Executor

log = logging.getLogger("skyhedge.controller")


def event_sources(spec: ServiceSpec, state_dir: Path, placement: Placement) -> list[EventSource]:
    """One source per cloud the spec uses (imported lazily: a local-only watcher needs no boto3)."""
    region_of = {c.location.zone: c.location.region for c in placement.candidates}
    clouds = {c.location.cloud for c in placement.candidates}
    sources: list[EventSource] = []
    if "local" in clouds:
        from skyhedge.clouds.local.events import LocalEventSource

        sources.append(LocalEventSource(state_dir, region_of))
    if "aws" in clouds:
        from skyhedge.clouds.aws.events import AwsEventSource

        regions = sorted({c.location.region for c in placement.candidates if c.location.cloud == "aws"})
        sources.append(AwsEventSource(spec.name, regions, queue_name=spec.aws.events_queue))
    if "gcp" in clouds:
        from skyhedge.clouds.gcp import PROJECT_ENV, resolve_project
        from skyhedge.clouds.gcp.events import GcpEventSource

        project = resolve_project(spec.gcp.project)
        if not project:
            raise CloudError(
                f"gcp: no project to watch: set gcp.project in {spec.source} "
                f"or ${PROJECT_ENV[0]} (as for apply)"
            )
        gcp_zones = {
            z: r
            for z, r in region_of.items()
            if any(c.location.zone == z and c.location.cloud == "gcp" for c in placement.candidates)
        }
        sources.append(GcpEventSource(spec.name, project, gcp_zones))
    return sources


class Watcher:
    """The `watch` process: lock, controller, supervisor, wake-ups, clean shutdown."""

    def __init__(
        self,
        spec: ServiceSpec,
        state_dir: Path,
        *,
        options: ControllerOptions | None = None,
        gitops: Path | None = None,
        gitops_subdir: str | None = None,
        terraform_bin: str | None = None,
        route: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spec = spec
        self.state_dir = Path(state_dir)
        self.gitops = gitops
        self.gitops_subdir = gitops_subdir
        self.terraform_bin = terraform_bin
        self.route = route
        self.clock = clock
        self.options = options or ControllerOptions()
        if gitops is not None:
            self.options = ControllerOptions(**{**self.options.__dict__, "assume_ready": True})
        self.placement = resolve_placement(spec)
        self.controller: Controller | None = None
        self.supervisor: Supervisor | None = None
        self._lock: contextlib.ExitStack | None = None
        self._gitops_executor: GitOpsExecutor | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Watcher:
        if self.gitops is not None:
            # refused (not a repository, detached HEAD, ...) before the lock creates the state dir
            from skyhedge.controller.gitops import GitOpsExecutor

            self._gitops_executor = GitOpsExecutor(
                self.spec,
                self.state_dir,
                self.gitops,
                subdir=self.gitops_subdir,
                placement=self.placement,
                clock=self.clock,
            )
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(writer_lock(self.state_dir))
        except StateError as exc:
            if "holds the lock" not in str(exc):
                raise
            raise StateError(
                f"{exc} (is `skyhedge watch` or `up` already running for {self.spec.name}?)"
            ) from None
        self._lock = stack
        try:
            self.controller = self._build()
        except BaseException:
            stack.close()
            raise
        self.supervisor = Supervisor(self.controller.tick, max_backoff=self.options.max_backoff)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.controller is not None:
            for source in self.controller.sources:
                with contextlib.suppress(Exception):
                    source.close()
        if self._lock is not None:
            self._lock.close()

    def _build(self) -> Controller:
        spec, sdir = self.spec, self.state_dir
        sources = event_sources(spec, sdir, self.placement)
        router = prober = None
        executor: Executor
        if self._gitops_executor is not None:
            executor = self._gitops_executor
        else:
            from skyhedge.controller.adapters import HttpProber, NginxRouter
            from skyhedge.controller.executor import TerraformExecutor

            executor = TerraformExecutor(
                spec, sdir, terraform_bin=self.terraform_bin, placement=self.placement, clock=self.clock
            )
            prober = HttpProber(spec)
            if self.route:
                router = NginxRouter(spec, sdir)
                router.router.preflight()  # no nginx or a taken port: one error now, not a banner
        return Controller(
            spec,
            sdir,
            executor=executor,
            router=router,
            prober=prober,
            sources=sources,
            clock=self.clock,
            options=self.options,
            placement=self.placement,
        )

    # -- running --------------------------------------------------------------------------------

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()

    def run(
        self, *, once: bool = False, until: Callable[[], bool] | None = None, handle_signals: bool = True
    ) -> None:
        """Tick until stopped (SIGTERM, or a first Ctrl-C: the current tick finishes first)."""
        assert self.controller is not None and self.supervisor is not None
        if once:
            self.supervisor.run(max_ticks=1)
            if self.supervisor.last_error is not None and self.supervisor.failures:
                raise self.supervisor.last_error
            applied = self.controller.last_apply
            if applied is not None and applied.errors:  # a check for CI or cron: say it failed
                cause = apply_cause(applied.detail)
                raise EngineError(f"apply failed: {applied.errors[0]}" + (f" ({cause})" if cause else ""))
            return
        for source in self.controller.sources:
            source.watch(self.supervisor.wake)
        with self._signals(handle_signals):
            self.supervisor.run(until=until)

    @contextlib.contextmanager
    def _signals(self, enabled: bool) -> Iterator[None]:
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return
        interrupted = {"n": 0}

        def stop_requested(signum: int) -> None:
            log.info("stopping after the current tick (signal %d)", signum)
            self.stop()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            interrupted["n"] += 1
            if signum == signal.SIGINT and interrupted["n"] > 1:
                raise KeyboardInterrupt
            if interrupted["n"] > 1:
                return  # a repeated SIGTERM: the stop is on its way
            # A handler runs between two bytecodes of whatever the main thread was doing, possibly
            # inside a lock (an Event's while it sets or clears, logging's): taking that lock here
            # deadlocks (two SIGTERMs in a row did). The stop and its log line go to a thread.
            threading.Thread(target=stop_requested, args=(signum,), daemon=True, name="skyhedge-stop").start()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
