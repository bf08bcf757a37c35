"""Assemble a watcher for a spec: its event sources, executor, router, prober, lock and loop.

    with Watcher(spec, state_dir, spec_path=path) as w:  # takes the service's writer lock
        w.run()                                          # until stop(), SIGTERM or Ctrl-C

The lock is held for the watcher's whole life, so a second `watch`/`up`/`apply` of the same
service fails at once with a clear error instead of fighting over the state.

Given the spec's file, the watcher re-reads it when its content changes (checked before every
pass) or on SIGHUP, and carries on under the new spec without a restart: a spec that does not
load, renames the service, or asks for a router port that is taken is refused with one line, and
the previous spec keeps running.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from skyhedge.controller.loop import Controller, ControllerOptions, apply_cause
from skyhedge.controller.supervisor import Supervisor
from skyhedge.errors import CloudError, EngineError, SkyhedgeError, SpecError, StateError
from skyhedge.events import EventSource
from skyhedge.service import Placement, resolve_placement
from skyhedge.spec import ServiceSpec, load_spec, replica_revision, spec_changes
from skyhedge.state import writer_lock

if TYPE_CHECKING:
    from skyhedge.controller.gitops import GitOpsExecutor
    from skyhedge.controller.ports import Executor, Prober, RouterPort

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


def sources_key(spec: ServiceSpec, placement: Placement) -> tuple[object, ...]:
    """What `event_sources` builds from: a reloaded spec keeps its running sources (and the
    events they hold) unless this changes."""
    zones = sorted((c.location.cloud, c.location.region, c.location.zone) for c in placement.candidates)
    return (tuple(zones), spec.aws.events_queue, spec.gcp.project)


@dataclass
class _SpecFile:
    """The spec file as last read: its stat stamp (cheap to compare every pass) and digest."""

    path: Path
    stamp: tuple[int, int, int] | None = None
    digest: str | None = None

    def changed(self) -> bytes | None:
        """The file's bytes if they differ from the last read ones, else None (also when the
        file cannot be read now: an editor between unlink and rename; the next pass retries)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self.stamp:
            return None
        try:
            data = self.path.read_bytes()
        except OSError:
            return None
        self.stamp = stamp
        digest = hashlib.sha256(data).hexdigest()
        if digest == self.digest:
            return None
        self.digest = digest
        return data


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
        spec_path: Path | None = None,
        reload_on_change: bool = True,
        reload_on_hangup: bool = True,
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
        self._spec_file = _SpecFile(Path(spec_path)) if spec_path is not None else None
        if self._spec_file is not None:
            self._spec_file.changed()  # the content loaded as `spec` (reloads compare with it)
        self.reload_on_change = reload_on_change
        self.reload_on_hangup = reload_on_hangup and spec_path is not None
        self._reload_asked = False
        self._watching = False  # sources deliver wake-ups (run() started them)

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
        self.supervisor = Supervisor(self._tick, max_backoff=self.options.max_backoff)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.controller is not None:
            for source in self.controller.sources:
                with contextlib.suppress(Exception):
                    source.close()
        if self._lock is not None:
            self._lock.close()

    def _build(self) -> Controller:
        executor, router, prober = self._parts(self.spec, self.placement)
        return Controller(
            self.spec,
            self.state_dir,
            executor=executor,
            router=router,
            prober=prober,
            sources=event_sources(self.spec, self.state_dir, self.placement),
            clock=self.clock,
            options=self.options,
            placement=self.placement,
        )

    def _parts(
        self, spec: ServiceSpec, placement: Placement, running: RouterPort | None = None
    ) -> tuple[Executor, RouterPort | None, Prober | None]:
        """The executor, router and prober for `spec`. `running`: the router of the spec being
        replaced; it is kept (its request counter too) and switched over by `reload`, once every
        part of the new spec has been built."""
        sdir = self.state_dir
        if self.gitops is not None:
            executor = self._gitops_executor
            if executor is None or executor.spec is not spec:
                from skyhedge.controller.gitops import GitOpsExecutor

                executor = GitOpsExecutor(
                    spec, sdir, self.gitops, subdir=self.gitops_subdir, placement=placement, clock=self.clock
                )
            return executor, None, None
        from skyhedge.controller.adapters import HttpProber, NginxRouter
        from skyhedge.controller.executor import TerraformExecutor
        from skyhedge.routing import Router

        executor = TerraformExecutor(
            spec, sdir, terraform_bin=self.terraform_bin, placement=placement, clock=self.clock
        )
        router = None
        if self.route:
            # no nginx, or a taken port (a moved one, on a reload): one error now, not a banner
            Router(spec, sdir).preflight()
            router = running if isinstance(running, NginxRouter) else NginxRouter(spec, sdir)
        return executor, router, HttpProber(spec)

    # -- reloading the spec -----------------------------------------------------------------------

    def request_reload(self) -> None:
        """Re-read the spec file before the next pass, even if it looks unchanged (SIGHUP)."""
        self._reload_asked = True
        if self.supervisor is not None:
            self.supervisor.wake()

    def _tick(self) -> float:
        assert self.controller is not None
        self._check_spec()
        return self.controller.tick()

    def _check_spec(self) -> None:
        spec_file = self._spec_file
        if spec_file is None:
            return
        asked, self._reload_asked = self._reload_asked, False
        if asked:
            spec_file.stamp = spec_file.digest = None  # read it whatever its stamp says
        elif not self.reload_on_change:
            return
        if spec_file.changed() is None:
            if asked:
                assert self.controller is not None
                self.controller.note(f"spec reload: cannot read {spec_file.path}; keeping the running spec")
            return
        try:
            self.reload(spec_file.path)
        except Exception as exc:  # a bug must not cost the pass: the running spec stays
            log.exception("spec reload failed")
            assert self.controller is not None
            self.controller.note(f"spec reload failed: {type(exc).__name__}: {exc}; keeping the running spec")

    def reload(self, path: Path) -> bool:
        """Carry on under the spec in `path`; True if it was taken. Refused (one note naming the
        file and field; the running spec stays) if it does not load, renames the service, names
        a location the catalog lacks, or moves the router to a port that is taken."""
        ctl = self.controller
        assert ctl is not None
        old = self.spec
        sources: list[EventSource] = ctl.sources
        try:
            new = load_spec(path)
            if new.name != old.name:
                raise SpecError(
                    f"the service is named {new.name!r} now, {old.name!r} when this watcher started: "
                    "a watcher keeps its service (stop it and start one for the new name)",
                    file=new.source,
                    path="name",
                )
            changes = spec_changes(old, new)
            if not changes:
                ctl.note(f"spec {path} re-read: no change")
                return False
            placement = resolve_placement(new)
            executor, router, prober = self._parts(new, placement, ctl.router)
            if sources_key(new, placement) != sources_key(old, self.placement):
                sources = event_sources(new, self.state_dir, placement)
        except SkyhedgeError as exc:
            ctl.note(f"spec reload refused: {exc}; keeping the running spec")
            return False
        for source in ctl.sources:
            if source not in sources:
                with contextlib.suppress(Exception):
                    source.close()
        if self._watching and self.supervisor is not None:
            for source in sources:
                if source not in ctl.sources:
                    source.watch(self.supervisor.wake)
        use = getattr(router, "use", None)  # the running NginxRouter: route for the new spec
        if use is not None:
            use(new)
        if self.gitops is not None:
            self._gitops_executor = executor  # type: ignore[assignment]
        self.spec, self.placement = new, placement
        ctl.reconfigure(
            new, placement=placement, executor=executor, router=router, prober=prober, sources=sources
        )
        shown = changes if len(changes) <= 6 else [*changes[:5], f"and {len(changes) - 5} more"]
        roll = replica_revision(old) != replica_revision(new)
        ctl.note(
            f"spec reloaded from {path}: {'; '.join(shown)}"
            + (" (replicas roll over to the new revision one at a time)" if roll else "")
        )
        return True

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
        self._watching = True
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

        def on_hangup(signum: int, frame: FrameType | None) -> None:
            # (as on_signal: no lock may be taken in a handler, so the wake-up goes to a thread)
            threading.Thread(target=self.request_reload, daemon=True, name="skyhedge-reload").start()

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
        if self.reload_on_hangup:
            old[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hangup)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
