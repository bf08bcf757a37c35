"""Assemble a watcher for a spec: its event sources, executor, router, prober, lock and loop.

    with Watcher(spec, state_dir, spec_path=path) as w:  # takes the service's writer lock
        w.run()                                          # until stop(), SIGTERM or Ctrl-C

The lock is held for the watcher's whole life, so a second `watch`/`up`/`apply` of the same
service fails at once with a clear error instead of fighting over the state.

Given the spec's file, the watcher re-reads it when its content changes (a stat a second wakes
the loop; the pass compares the content) or on request (SIGUSR1, which `skyhedge reload` sends,
or SIGHUP), and carries on under the new spec without a restart: a spec it cannot take (it does
not load, renames the service, moves the router to a taken port, ...) is refused with one line,
and the running spec stays.
The running watcher is recorded in `<state dir>/watcher.json` (`presence.py`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from skyhedge._fds import readable
from skyhedge.clouds import cloud_module, cloud_names
from skyhedge.controller import presence
from skyhedge.controller.loop import Controller, ControllerOptions, apply_cause, probe_refused, with_cause
from skyhedge.controller.supervisor import Supervisor
from skyhedge.errors import (
    EngineError,
    LockHeld,
    RoutingError,
    SkyhedgeError,
    SpecError,
    StateError,
)
from skyhedge.events import EventSource
from skyhedge.service import Placement, compute_plan, resolve_placement
from skyhedge.spec import ServiceSpec, load_spec, readiness_probe_json, replica_revision, spec_changes
from skyhedge.state import HeldLock, ReplicaRecord, writer_lock

if TYPE_CHECKING:
    from skyhedge.controller.gitops import GitOpsExecutor
    from skyhedge.controller.ports import Executor, Prober, RouterPort

log = logging.getLogger("skyhedge.controller")
#: How often a running watcher stats its spec file, to take an edit without waiting for a pass.
SPEC_POLL_SECONDS = 1.0
#: An edit is read once the file has not changed for this long. A writer that rewrites the file
#: in place (truncate, then write in pieces: `cat >`, many config tools) leaves a prefix of the
#: new spec between its writes, and a prefix can be a valid spec (of the example's 1,643 byte
#: prefixes, 26 load, such as one whose `run.command` is `p`): read then, it started a rolling
#: update to it. A `skyhedge reload` (SIGHUP, SIGUSR1) reads at once: the edit is done.
SPEC_SETTLE_SECONDS = 1.0
#: How often the router watch reads which process is the router (a restart makes a new one). Its
#: exit itself wakes the loop at once where the kernel has pidfds (Linux 5.3), else within this.
ROUTER_POLL_SECONDS = 1.0


def event_sources(
    spec: ServiceSpec,
    state_dir: Path,
    placement: Placement,
    *,
    only: Collection[str] | None = None,
    live: Sequence[ReplicaRecord] = (),
) -> list[EventSource]:
    """One source per cloud the spec uses, or that still holds one of the `live` replicas
    (imported lazily: a local-only watcher needs no boto3); `only`: just these clouds' (a reloaded
    spec rebuilds those whose locations changed). If one cannot be built, those built before it
    are closed again."""
    sources: list[EventSource] = []
    try:
        _build_sources(spec, state_dir, _watched(placement, live), sources, only)
    except BaseException:
        for source in sources:
            with contextlib.suppress(Exception):
                source.close()
        raise
    return sources


def _watched(placement: Placement, live: Sequence[ReplicaRecord]) -> dict[str, dict[str, str]]:
    """Per cloud, zone -> region of every location to watch: the placement's, and those of live
    replicas it no longer allows (a cloud, region or zone dropped from the spec), whose replicas
    still serve until they are moved and can still be preempted."""
    where: dict[str, dict[str, str]] = {}
    for c in placement.locations:
        where.setdefault(c.location.cloud, {})[c.location.zone] = c.location.region
    for r in live:
        where.setdefault(r.cloud, {}).setdefault(r.zone, r.region)
    return where


def _build_sources(
    spec: ServiceSpec,
    state_dir: Path,
    watched: dict[str, dict[str, str]],
    sources: list[EventSource],
    only: Collection[str] | None,
) -> None:
    """Each cloud's source comes from its `events.py`'s `event_source(spec, state_dir, watched)`
    (None: nothing to watch); a cloud without one is not watched for preemptions (its replicas
    are still probed)."""
    clouds = set(watched) if only is None else set(watched) & set(only)
    for cloud in sorted(clouds):
        module = cloud_module(cloud, "events")
        make = getattr(module, "event_source", None)
        if make is not None and (source := make(spec, state_dir, watched)) is not None:
            sources.append(source)


def _pidfd(pid: int) -> int | None:
    """A pidfd for `pid` (readable once it exits), or None: gone already, or no pidfds here (an
    old kernel, a sandbox), where its exit is seen by looking again a little later."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def source_keys(
    spec: ServiceSpec, placement: Placement, live: Sequence[ReplicaRecord] = ()
) -> dict[str, tuple[object, ...]]:
    """Per cloud (a source's `name`), what its event source is built from. A reloaded spec keeps
    a cloud's running source, and whatever it holds, unless this changed."""
    return {
        cloud: (tuple(sorted((r, z) for z, r in zones.items())), getattr(spec, cloud, None))
        for cloud, zones in sorted(_watched(placement, live).items())
    }


@contextlib.contextmanager
def _beside(
    target: Callable[[], None], done: threading.Event, name: str, *, join_timeout: float
) -> Iterator[None]:
    """Run `target` in a daemon thread for the `with` block; at its end set `done` (which
    `target` waits on) and give the thread `join_timeout` seconds to finish."""
    thread = threading.Thread(target=target, daemon=True, name=name)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=join_timeout)


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    """A file's stat stamp: any write moves one of them (the size or inode within one mtime tick)."""
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@dataclass
class _SpecFile:
    """The spec file as last read: its stat stamp (cheap to compare every pass) and digest."""

    path: Path
    stamp: tuple[int, int, int] | None = None
    digest: str | None = None

    def peek(self) -> tuple[int, int, int] | None:
        """The file's stat stamp now (None: cannot stat it), without reading it."""
        try:
            return _stamp(os.stat(self.path))
        except OSError:
            return None

    @staticmethod
    def settling(stamp: tuple[int, int, int]) -> bool:
        """Whether the file stamped `stamp` changed less than SPEC_SETTLE_SECONDS ago (a writer
        may be between two of its writes). A time ahead of the clock (a skewed network file
        system) counts as settled: waiting would not end."""
        return 0 <= time.time() - stamp[0] / 1e9 < SPEC_SETTLE_SECONDS

    def changed(self, *, settle: bool = False) -> bytes | None:
        """The file's bytes if they differ from the last read ones, else None (also when the
        file cannot be read now: an editor between unlink and rename; the next pass retries).
        `settle`: None, too, while the file is `settling`. The stamp checked is the one of the
        file read (`fstat` of the descriptor read), and a file that changed while read is read
        again later: checked by one stat and read after another, a writer that truncated the file
        in between (an edit that had stood still, then rewritten in place) had its first piece
        read unchecked, a prefix that can load as a spec."""
        stamp = self.peek()
        if stamp is None or stamp == self.stamp:
            return None
        try:
            with open(self.path, "rb") as fh:
                stamp = _stamp(os.fstat(fh.fileno()))
                if stamp == self.stamp or (settle and self.settling(stamp)):
                    return None
                data = fh.read()
                if _stamp(os.fstat(fh.fileno())) != stamp:
                    return None  # written while read: the file poll wakes the loop for it
        except OSError:
            return None
        self.stamp = stamp
        digest = hashlib.sha256(data).hexdigest()
        if digest == self.digest:
            return None
        self.digest = digest
        return data


def _check_new_probe(
    old: ServiceSpec, new: ServiceSpec, prober: Prober, live: Sequence[ReplicaRecord]
) -> None:
    """Refuse a `readiness_probe` edit that none of the READY replicas passes (SpecError), when the
    edit leaves them current (no new revision to roll over to). Taken, the next probe marks every
    one NOT_READY at once and FAILED 180 s later: they were replaced by replicas of the same
    revision, which failed the same probe, and the service went to 503 for every request (measured
    live: a `readiness_probe.path` typo took 5 READY replicas to 0 routed in 3 minutes). An edit
    that rolls the replicas over (`run` changed too, the new version's new health path) is not
    checked: the old replicas cannot be expected to pass it. Replicas that could not be probed
    from here (`HttpProber` leaves them out) prove nothing either way, and neither do the outdated
    replicas of a rolling update under way: they keep the probe they were launched under
    (`Controller.reconfigure`), so the edit is the current revision's replicas' alone (judged by
    all, an edit was refused for the old version's replicas failing a probe never theirs, and a
    typo every current replica failed was taken because an old one answered it)."""
    clouds = {r.cloud for r in live}
    current = {c: replica_revision(new, c) for c in clouds}
    if any(replica_revision(old, c) != rev for c, rev in current.items()):
        return
    refused = probe_refused(prober, live, current)
    if refused is None:
        return
    count, rid, why = refused
    raise SpecError(
        f"none of the {count} READY replica(s) passes the new probe ({rid}: {why}): "
        "taken, it would mark them all NOT_READY at once and replace them with replicas of the same "
        "revision after 180 s; fix the probe (or change `run` with it, to roll the replicas over to a "
        "version that passes it); if they could not answer it just then, `skyhedge reload SPEC` probes "
        "them again (the file as it is is not retried until it changes)",
        file=new.source,
        path="readiness_probe",
    )


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
        reload_on_request: bool = True,
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
        self._held: HeldLock | None = None
        #: set when the state dir was deleted or replaced under the watcher: it stopped for that
        self.lost: StateError | None = None
        self._gitops_executor: GitOpsExecutor | None = None
        self._spec_file = _SpecFile(Path(spec_path)) if spec_path is not None else None
        if self._spec_file is not None:
            self._spec_file.changed()  # the content loaded as `spec` (reloads compare with it)
        self.reload_on_change = reload_on_change
        self.reload_on_request = reload_on_request and spec_path is not None  # SIGUSR1
        self.reload_on_hangup = reload_on_hangup and self.reload_on_request  # SIGHUP too
        self._reload_asks = 0  # requests so far (a counter: one arriving mid-check is not lost)
        self._reloads_seen = 0
        self._answering = False  # the current re-read answers a request (`skyhedge reload`, a signal)
        #: an edit taken at the watcher's own pass (the file changed) since the last request was
        #: answered: a request racing that pass re-reads an unchanged file, and its answer must
        #: still say what was taken, not "no change"
        self._taken_unasked: str | None = None
        self._spec_missing = 0  # passes in a row that found no spec file (moved, renamed, deleted)
        #: the last spec reload's outcome (taken, unchanged, refused, failed; None before any):
        #: `--metrics-port` shows a refused one, which otherwise only the log and `status` told
        self.last_reload_outcome: str | None = None
        self._record: presence.WatcherRecord | None = None  # <state dir>/watcher.json while running
        self.metrics_url: str | None = None  # announced in watcher.json when metrics are served
        #: the port metrics are served on (`--metrics-port`): a reloaded spec whose local replicas
        #: could one day need it is refused, as the command line refuses it at start
        self.metrics_port: int | None = None
        self._reloaded: list[Callable[[ServiceSpec, Placement], None]] = []
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
            self._held = stack.enter_context(writer_lock(self.state_dir))
        except LockHeld as exc:
            raise LockHeld(
                exc.base,
                exc.state_dir,
                # a running watcher of the service is named by the CLI from its record
                # (`_naming_the_holder`); without one, the holder is a one-off command
                question=(
                    f"is an `apply`, `destroy` or `routing` command of {self.spec.name} running? "
                    "Let it finish, then start watching again"
                ),
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
        self._retract()
        self._flush()
        if self.controller is not None:
            for source in [*self.controller.sources, *self.controller.retiring]:
                with contextlib.suppress(Exception):
                    source.close()
        if self._lock is not None:
            self._lock.close()

    def _flush(self) -> None:
        """Write what the controller held back (its clocks, see `loop.SAVE_EVERY`) before the lock
        goes: a SIGTERM, a Ctrl-C, `--once` or a program's `stop()` all end here. Not into a state
        dir deleted or replaced under the watcher (it stopped for that: `_check_held`), and a
        failure is logged, never raised over the reason the watcher stops."""
        ctl = self.controller
        if ctl is None or self.lost is not None or (self._held is not None and self._held.lost()):
            return
        try:
            ctl.flush()
        except Exception as exc:  # a full disk at shutdown: the next watcher starts a minute behind
            log.warning("%s: saving the state at shutdown failed: %s", self.spec.name, exc)

    def _build(self) -> Controller:
        executor, router, prober = self._parts(self.spec, self.placement)
        ctl = Controller(
            self.spec,
            self.state_dir,
            executor=executor,
            router=router,
            prober=prober,
            sources=[],
            clock=self.clock,
            options=self.options,
            placement=self.placement,
        )
        # built once the state is read: replicas left where the spec no longer allows are watched too
        ctl.sources = event_sources(self.spec, self.state_dir, self.placement, live=ctl.state.live())
        return ctl

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

                executor = GitOpsExecutor(  # a reload: a detached HEAD or a rebase is waited out
                    spec,
                    sdir,
                    self.gitops,
                    subdir=self.gitops_subdir,
                    placement=placement,
                    clock=self.clock,
                    at_start=False,
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
            # a host moved on the same port: this watcher (running: a reload) holds the lock
            # `routing down` needs, so the restart it names stops the watcher first
            restart = "`skyhedge routing down SPEC`, then start the watcher again"
            Router(spec, sdir).preflight(
                restart=restart if running is None else f"stop the watcher, {restart}"
            )
            router = running if isinstance(running, NginxRouter) else NginxRouter(spec, sdir)
        return executor, router, HttpProber(spec)

    # -- reloading the spec -----------------------------------------------------------------------

    def on_reload(self, callback: Callable[[ServiceSpec, Placement], None]) -> None:
        """Call `callback(spec, placement)` whenever a reloaded spec is taken (`up`'s market
        replay follows the local zones)."""
        self._reloaded.append(callback)

    def request_reload(self) -> None:
        """Re-read the spec file before the next pass, even if it looks unchanged (SIGUSR1, SIGHUP)."""
        self._reload_asks += 1
        if self.supervisor is not None:
            self.supervisor.wake()

    def _tick(self) -> float:
        assert self.controller is not None
        self._check_held()
        self._check_spec()
        if self.supervisor is not None:
            self.controller.woken = self.supervisor.woken
        delay = self.controller.tick()
        self._note_held_probe()
        return delay

    def _note_held_probe(self) -> None:
        """A restart that did not take the spec's probe (`Controller.held_probe`: no READY replica
        passes it) runs on a probe that is not the file's, as a refused reload runs on the spec
        read before: recorded as a refused reload, so `status` (`last spec reload`) and
        `skyhedge_spec_refused` say so until a reload takes a probe. Only its one warning line said
        it, and the watcher could run on the earlier probe for weeks unnoticed."""
        ctl = self.controller
        if ctl is None or ctl.held_probe is None or self.last_reload_outcome in ("refused", "failed"):
            return
        self._outcome(
            "refused",
            "readiness_probe: the spec's was not taken at the restart (none of the READY replicas "
            "passes it): they are still probed with the earlier one; fix the probe, or "
            "`skyhedge reload SPEC` to check it again",
            note=False,  # (the controller's warning said it, naming the replica's failure)
        )

    def _check_held(self) -> None:
        """Stop, touching nothing, once the state dir is not the one whose lock this watcher
        holds (`rm -rf .skyhedge`, `git clean -fdx`): with the replicas' pid files and Terraform's
        state gone, a pass read every replica as gone, launched a new set, stopped the serving
        ones as orphans and could not start a router on the port the old nginx still held; and
        another watcher could take the lock on the new file."""
        if self._held is None or not self._held.lost():
            return
        self.lost = StateError(
            f"{self.state_dir}: the state dir was deleted or replaced while this watcher ran (its lock "
            f"file {self._held.path.name} is gone): stopped before acting on a state it no longer holds; "
            "the replicas and the router it ran keep running, no longer recorded: restore the state dir "
            "(from a copy) to manage them again, or stop them before starting the service anew"
        )
        self.stop()
        raise self.lost

    def _check_spec(self) -> None:
        spec_file, ctl = self._spec_file, self.controller
        if spec_file is None or ctl is None:
            return
        if self.reload_on_change or self.reload_on_request:
            self._note_spec_file_gone(spec_file)
        asks = self._reload_asks
        asked, self._reloads_seen = asks != self._reloads_seen, asks
        if asked:
            spec_file.stamp = spec_file.digest = None  # read it whatever its stamp says
        elif not self.reload_on_change:
            return
        # unasked, a file still settling is being written, maybe: the file poll wakes the loop
        # once it is still; asked, the edit is done
        if spec_file.changed(settle=not asked) is None:
            if asked:
                text = f"spec reload: cannot read {spec_file.path}; keeping the running spec"
                self._outcome("failed", text)
            return
        self._answering = asked
        try:
            self.reload(spec_file.path)
        except Exception as exc:  # a bug must not cost the pass: the running spec stays
            log.exception("spec reload failed")
            text = f"spec reload failed: {type(exc).__name__}: {exc}; keeping the running spec"
            self._outcome("failed", text)
        finally:
            self._answering = False

    def _note_spec_file_gone(self, spec_file: _SpecFile) -> None:
        """Say once that the spec file is gone, and once that it is back: the watcher runs on the
        spec it last read, and an edit to the file at a new path (a `git mv`, a rename) never
        reaches it, which it used to keep quiet about. Gone at two passes in a row: an editor's
        save (unlink, then rename) is not worth a warning."""
        assert self.controller is not None
        if spec_file.peek() is not None:
            if self._spec_missing >= 2:
                self.controller.note(f"spec file {spec_file.path} is back")
            self._spec_missing = 0
            return
        self._spec_missing += 1
        if self._spec_missing == 2:
            self.controller.note(
                f"spec file {spec_file.path} is gone (moved, renamed or deleted): running on with the spec "
                "last read, and edits to a file elsewhere are not seen: put it back, or restart the "
                "watcher on the new path",
                level=logging.WARNING,
            )

    def _outcome(self, outcome: str, text: str, *, note: bool = True) -> None:
        """Note a reload's outcome for the operator, and in watcher.json for `skyhedge reload`
        (with the number of requests answered so far: a `reload` waits for its own). `note=False`:
        the operator was already told (an answer repeating an edit the watcher's own pass took)."""
        assert self.controller is not None
        if note:  # a refused or failed reload is a warning (the running spec stays)
            level = logging.INFO if outcome in ("taken", "unchanged") else logging.WARNING
            self.controller.note(text, level=level, repeats=True)  # each answers an edit or a request
        else:
            log.debug("%s", text)
        self._taken_unasked = text if outcome == "taken" and not self._answering else None
        self.last_reload_outcome = outcome
        if self._record is not None:
            self._record = presence.record_reload(
                self.state_dir, self._record, self.clock(), outcome, text, requests=self._reloads_seen
            )

    def reload(self, path: Path) -> bool:
        """Carry on under the spec in `path`; True if it was taken.

        Everything the new spec needs is built and checked first: it loads, keeps the service's
        name and Terraform backend, its locations are in the catalog, its policy loads and plans
        (on a copy of the state), the router's new ports are free, and a running router takes
        the new config (a graceful reload, with the replicas it routes now). Anything failing
        refuses the spec with one note naming the file and field, and the running spec stays
        whole (what was built for the new one is closed again)."""
        ctl = self.controller
        assert ctl is not None
        old = self.spec
        try:
            new = load_spec(path)
            if new.name != old.name:
                raise SpecError(
                    f"the service is named {new.name!r} now, {old.name!r} when this watcher started: "
                    "a watcher keeps its service (stop it and start one for the new name)",
                    file=new.source,
                    path="name",
                )
            if new.terraform != old.terraform:
                raise SpecError(
                    "the Terraform backend of a running service cannot change under its watcher (its "
                    "state would have to move): stop the watcher, migrate the state "
                    "(`terraform init -migrate-state` in each root), then start it again",
                    file=new.source,
                    path="terraform",
                )
            if self.metrics_port is not None:
                from skyhedge.controller.metrics import local_port_conflict, router_port_conflict

                taken = router_port_conflict(new, self.metrics_port)
                if taken is not None:
                    field_name, text = taken
                    raise SpecError(text, file=new.source, path=field_name)
                if local_port_conflict(new, self.metrics_port) is not None:
                    raise SpecError(
                        f"{new.resources.local_base_port} puts the watcher's --metrics-port "
                        f"{self.metrics_port} in the local replicas' port range (base + 1 and up): "
                        f"keep it at {self.metrics_port} or above",
                        file=new.source,
                        path="resources.local_base_port",
                    )
            changes = spec_changes(old, new)
            held = ctl.held_probe  # a restart kept the earlier probe: the spec's was refused
            if (
                held is not None
                and held != readiness_probe_json(new.readiness_probe)
                and not any(c.startswith("readiness_probe.") for c in changes)
            ):
                changes = [*changes, "readiness_probe.* (the spec's, which the restart did not take)"]
            if not changes:
                taken = self._taken_unasked if self._answering else None
                if taken is not None:  # the edit this request is about, taken a moment before it
                    # the log said so at that pass: only the requester needs the answer (a
                    # second "spec reloaded" line read as a second reload)
                    self._outcome(
                        "taken", f"{taken} (taken at the watcher's own pass, before this request)", note=False
                    )
                else:
                    self._outcome("unchanged", f"spec {path} re-read: no change from the running spec")
                return False
            placement = resolve_placement(new)
            compute_plan(  # a policy that does not load or plan: refused now, not every pass
                new,
                copy.deepcopy(ctl.state),
                now=self.clock(),
                policy_name=self.options.policy,
                placement=placement,
            )
            executor, router, prober = self._parts(new, placement, ctl.router)
            if prober is not None and any(c.startswith("readiness_probe.") for c in changes):
                _check_new_probe(old, new, prober, ctl.state.live())
        except SkyhedgeError as exc:
            self._outcome("refused", f"spec reload refused: {exc}; keeping the running spec")
            return False
        live = ctl.state.live()
        old_keys, new_keys = source_keys(old, self.placement, live), source_keys(new, placement, live)
        rebuild = {cloud for cloud, key in new_keys.items() if old_keys.get(cloud) != key}
        kept = [s for s in ctl.sources if s.name in new_keys and s.name not in rebuild]
        built: list[EventSource] = []
        try:
            built = event_sources(new, self.state_dir, placement, only=rebuild, live=live) if rebuild else []
            if router is not None and router.running() and any(c.startswith("service.") for c in changes):
                from skyhedge.routing import Router, Upstream

                routed = ctl.state.extra.get("routed") or []
                Router(new, self.state_dir).up([Upstream(str(rid), str(ep)) for rid, ep in routed])
        except SkyhedgeError as exc:
            for source in built:
                with contextlib.suppress(Exception):
                    source.close()
            self._outcome("refused", f"spec reload refused: {exc}; keeping the running spec")
            return False
        if self._watching and self.supervisor is not None:
            for source in built:
                source.watch(self.supervisor.wake)
        use = getattr(router, "use", None)  # the running NginxRouter: route for the new spec
        if use is not None:
            use(new)
        if self.gitops is not None:
            previous = self._gitops_executor
            if previous is not None and previous is not executor:
                # the commit it owes, and the spec changes the next commit's message names
                executor.take_over(previous)  # type: ignore[attr-defined]
            self._gitops_executor = executor  # type: ignore[assignment]
        self.spec, self.placement = new, placement
        ctl.reconfigure(
            new, placement=placement, executor=executor, router=router, prober=prober, sources=kept + built
        )
        for callback in self._reloaded:
            try:
                callback(new, placement)
            except Exception as exc:  # the spec is taken; a follower failing must not say otherwise
                log.warning("after the spec reload: %s: %s", type(exc).__name__, exc)
        shown = changes if len(changes) <= 6 else [*changes[:5], f"and {len(changes) - 5} more"]
        # per cloud: a new gcp.external_ip rolls over GCP replicas only
        clouds = {r.cloud for r in live} | set(new.placement.clouds or cloud_names())
        roll = any(replica_revision(old, c) != replica_revision(new, c) for c in clouds)
        self._outcome(
            "taken",
            f"spec reloaded from {path}: {'; '.join(shown)}"
            + (" (replicas roll over to the new revision one at a time)" if roll else ""),
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
                raise EngineError(f"apply failed: {with_cause(applied.errors[0], cause)}")
            if self.controller._routing_failed:  # replicas nothing routes to: not a success either
                said = [n.text for n in self.controller.notes if n.text.startswith("routing: ")]
                why = said[-1].removeprefix("routing: ") if said else "the router could not be updated"
                raise RoutingError(f"routing failed: {why}")
            return
        for source in self.controller.sources:
            source.watch(self.supervisor.wake)
        self._watching = True
        with self._signals(handle_signals) as requests_heard, self._watch_spec_file(), self._watch_router():
            # announced once the handlers are in, retracted before they go: `skyhedge reload`
            # never signals a watcher that would die of SIGUSR1's default action
            self._announce(on_request=requests_heard)
            try:
                self.supervisor.run(until=until)
            finally:
                self._retract()
        if self.lost is not None:
            raise self.lost

    @contextlib.contextmanager
    def _watch_spec_file(self) -> Iterator[None]:
        """Wake the loop within a second or two of an edit to the spec file (once it is still:
        SPEC_SETTLE_SECONDS), rather than at the next pass (`--interval`, or a backoff after
        failed applies: the edit may be the fix). A stat a second; the pass itself decides
        whether the content changed."""
        spec_file, supervisor = self._spec_file, self.supervisor
        if spec_file is None or not self.reload_on_change or supervisor is None:
            yield
            return
        done = threading.Event()

        def poll() -> None:
            # woken on a change, and once more when a changed file has stood still for a poll:
            # the pass a change woke may have found it still settling (SPEC_SETTLE_SECONDS)
            seen, still = spec_file.stamp, spec_file.stamp
            while not done.wait(SPEC_POLL_SECONDS):
                stamp = spec_file.peek()
                if stamp is not None and stamp != spec_file.stamp:
                    if stamp != seen:
                        supervisor.wake()
                    elif stamp != still:
                        still = stamp
                        supervisor.wake()
                seen = stamp

        with _beside(poll, done, "skyhedge-spec-file", join_timeout=5):
            yield

    @contextlib.contextmanager
    def _watch_router(self) -> Iterator[None]:
        """Wake the loop as soon as the router's process exits (nginx killed, OOM-killed, crashed):
        the pass starts it again (`Controller._route`). Nothing watched it before, and every
        client was refused until the next pass: up to `--interval` (measured under load at the
        default 10 s: 9.5 s of refused connections, 379 of 607 requests failed). The router is
        looked up at every turn, so a reloaded spec's is followed."""
        ctl, supervisor = self.controller, self.supervisor
        if ctl is None or supervisor is None or not self.route or self.gitops is not None:
            yield
            return
        done = threading.Event()

        def master() -> int | None:
            pid_of = getattr(ctl.router, "pid", None)
            if pid_of is None:
                return None
            try:
                pid = pid_of()
            except OSError:  # its pid file unreadable for a moment: looked at again next turn
                return None
            return pid if isinstance(pid, int) else None

        def watch() -> None:
            watched: int | None = None
            fd: int | None = None
            try:
                while not done.is_set():
                    try:
                        pid = master()
                        if pid != watched:
                            # the process watched is the router no more: woken if it exited (its
                            # pidfd says so; one that exited after the last wait timed out, and
                            # before this look, was missed), or if none runs now and no pidfd tells
                            if watched is not None and (readable([fd], 0) if fd is not None else pid is None):
                                supervisor.wake()
                            if fd is not None:
                                os.close(fd)
                            watched, fd = pid, _pidfd(pid) if pid is not None else None
                        if fd is None:
                            done.wait(ROUTER_POLL_SECONDS)
                            continue
                        if readable([fd], ROUTER_POLL_SECONDS) and not done.is_set():
                            supervisor.wake()
                            os.close(fd)
                            watched = fd = None
                    except Exception as exc:  # never the end of the watch: start over next turn
                        log.debug("watching the router: %s: %s", type(exc).__name__, exc)
                        if fd is not None:
                            with contextlib.suppress(OSError):
                                os.close(fd)
                        watched = fd = None
                        done.wait(ROUTER_POLL_SECONDS)
            finally:
                if fd is not None:
                    os.close(fd)

        with _beside(watch, done, "skyhedge-router-watch", join_timeout=ROUTER_POLL_SECONDS + 5):
            yield

    def _retract(self) -> None:
        if self._record is not None:
            presence.remove(self.state_dir, self._record.pid)
            self._record = None

    def _announce(self, *, on_request: bool) -> None:
        """Write watcher.json (see `presence`): best effort, the watcher runs without it."""
        on_change = self._spec_file is not None and self.reload_on_change
        on_request = self._spec_file is not None and on_request
        how = {
            (True, True): presence.RELOAD_ON_CHANGE,
            (True, False): presence.RELOAD_FILE_ONLY,
            (False, True): presence.RELOAD_ON_REQUEST,
            (False, False): presence.RELOAD_OFF,
        }[(on_change, on_request)]
        pid = os.getpid()
        # absolute, but through any symlink as given (a ConfigMap-style `current/` link may move)
        spec = os.path.abspath(self._spec_file.path) if self._spec_file is not None else self.spec.source
        record = presence.WatcherRecord(
            pid=pid,
            started_at=self.clock(),
            spec=spec,
            mode="gitops" if self.gitops is not None else "apply",
            reload=how,
            process_start=presence.process_start(pid),
            metrics=self.metrics_url,
        )
        try:
            presence.write(self.state_dir, record)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.state_dir / presence.WATCHER_FILE, exc)
            return
        self._record = record

    @contextlib.contextmanager
    def _signals(self, enabled: bool) -> Iterator[bool]:
        """SIGTERM / a first Ctrl-C stop after the current pass; SIGUSR1 (`reload_on_request`)
        and SIGHUP (`reload_on_hangup`) re-read the spec. A handler runs between two bytecodes of
        whatever the main thread was doing, possibly inside a lock (an Event's while it sets or
        clears, logging's, a thread start's): taking one there deadlocks (two SIGTERMs in a row
        did). So a handler only writes the signal's number to a pipe (no lock), and a thread acts
        on it."""
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield False
            return
        interrupted = {"n": 0}
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)

        def relay() -> None:
            while True:
                try:
                    data = os.read(read_end, 64)
                except OSError:
                    return
                if not data:  # the write end closed: the watcher is done
                    return
                for signum in data:
                    if signum in (signal.SIGHUP, signal.SIGUSR1):
                        self.request_reload()
                    else:
                        log.info("stopping after the current tick (signal %d)", signum)
                        self.stop()

        def send(signum: int) -> None:
            with contextlib.suppress(OSError):  # a full pipe: signals enough are on their way
                os.write(write_end, bytes([signum]))

        def on_hangup(signum: int, frame: FrameType | None) -> None:  # SIGHUP, SIGUSR1
            send(signum)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            interrupted["n"] += 1
            if signum == signal.SIGINT and interrupted["n"] > 1:
                raise KeyboardInterrupt
            if interrupted["n"] > 1:
                return  # a repeated SIGTERM: the stop is on its way
            send(signum)

        thread = threading.Thread(target=relay, daemon=True, name="skyhedge-signals")
        thread.start()
        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        if self.reload_on_request:
            old[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, on_hangup)
        if self.reload_on_hangup:
            old[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hangup)
        try:
            yield self.reload_on_request
        finally:
            for s, h in old.items():
                # a late `skyhedge reload` must not kill the process SIGUSR1's default would
                signal.signal(s, signal.SIG_IGN if s == signal.SIGUSR1 and h == signal.SIG_DFL else h)
            os.close(write_end)
            thread.join(timeout=5)
            os.close(read_end)
