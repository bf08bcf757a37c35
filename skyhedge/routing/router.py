"""One service's nginx router: up, reload, drain, down, status. The lifecycle, not the config text.

A reload never risks the serving config: the candidate is written next to it, `nginx -t` checks
it, only then it replaces `conf/nginx.conf` (os.replace) and the master gets SIGHUP (what
`nginx -s reload` sends). If nginx refuses the candidate, the old config keeps serving and the
RoutingError carries nginx's own message. nginx runs as the current user with everything (pid,
logs, temp, conf) under `<state_dir>/router/`.

Drain: after a reload the old worker processes finish their in-flight requests and exit; the new
workers do not know the removed replicas. So once every pre-reload worker is gone, no request is
still in flight to a removed replica, and it is safe to destroy it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import grp
import hashlib
import ipaddress
import json
import logging
import os
import pwd
import re
import signal
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from filelock import FileLock, Timeout

from skyhedge.errors import RoutingError
from skyhedge.planner import replica_order
from skyhedge.routing import nginx
from skyhedge.routing.config import (
    RouterOptions,
    RouterPaths,
    Upstream,
    listen_address,
    render_config,
    sorted_upstreams,
)
from skyhedge.spec import ServiceSpec
from skyhedge.state import atomic_write_text

START_TIMEOUT = 10.0
RELOAD_TIMEOUT = 10.0
#: A router log (access.log, error.log) past this size is rotated by `Router.rotate_logs`: renamed
#: `<name>.1` (replacing the one before), and nginx reopens its logs. The access log takes one
#: line (about 130 bytes) per request, so without it a busy router filled the disk, slowly.
LOG_ROTATE_BYTES = 64 * 2**20
_POLL = 0.02
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# The router's own health check over HTTPS (service.tls): it asks its own nginx on this host, by
# address, so the certificate (made out to the service's public name, maybe self-signed) is not
# what is checked; nginx refusing the key or the chain fails the config test before this.
_NO_PROXY_TLS = urllib.request.build_opener(
    urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ssl._create_unverified_context())
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _quitting(pid: int) -> bool:
    return not nginx.alive(pid) or "shutting down" in nginx.cmdline(pid)


def _first_problem(text: str) -> str:
    """nginx's own reason in one line: its first `[emerg]`/`[alert]` line (else its first line),
    without the `nginx: ` prefix, so a one-line refusal still says why."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    serious = [line for line in lines if "[emerg]" in line or "[alert]" in line]
    return (serious or lines or [""])[0].removeprefix("nginx: ")


def workers_alive(pids: Iterable[int]) -> bool:
    """Whether any of these nginx workers (from before a reload) still serves a request."""
    return any(nginx.alive(p) for p in pids)


def _wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)


log = logging.getLogger("skyhedge.routing")


def _router_home(conf: Path) -> Path | None:
    """The state dir whose router `conf` is (`<state dir>/router/conf/nginx.conf`), else None."""
    if conf.name != "nginx.conf" or conf.parent.name != "conf" or conf.parent.parent.name != "router":
        return None
    return conf.parent.parent.parent


def _same_folder(a: Path, b: Path) -> bool:
    """Whether `a` and `b` are one folder (device and inode: a path may be spelled two ways)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _listed_order(entry: Any) -> tuple[int, int, str]:
    """The sort key of one `upstreams` entry of the router's record (`replica_order` of its id)."""
    return replica_order(str(entry.get("id"))) if isinstance(entry, dict) else (2, 0, "")


class Router:
    """The nginx in front of `spec`'s replicas, listening on `spec.service.host:port`."""

    def __init__(
        self,
        spec: ServiceSpec,
        state_dir: str | Path,
        *,
        options: RouterOptions | None = None,
        nginx_bin: str | None = None,
    ) -> None:
        self.spec = spec
        self.options = options or spec.service.router
        self.paths = RouterPaths(Path(state_dir).resolve() / "router")
        self._nginx_bin = nginx_bin
        self._binary: str | None = None

    # -- public surface -------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self.spec.service.url

    def preflight(self, *, restart: str = "`skyhedge routing down SPEC`, then `up`") -> None:
        """Raise RoutingError now if `up` could not work: no nginx, or the service port (or a
        set `service.router.status_port`) held by another process; a running router of ours holds
        its own ports, but not a status port the spec changed since. Why: `apply` launches
        replicas before routing comes up, and a failure found only then leaves them running with
        no router and a failed command. `restart`: how the caller's user restarts the router
        (a running watcher holds the lock `routing down` needs: it must be stopped first)."""
        _ = self.binary
        self._check_tls_files()
        running = self.pid() is not None
        service = self.spec.service
        host = service.host.strip("[]")
        listening = self._listening() if running else None
        wanted = listen_address(self.spec)
        # a running router of ours holds its port, unless the spec moved it (a reloaded spec):
        # nginx binds the new one at its next reload, so it must be free now
        moved = listening is not None and listening != wanted
        if moved and listening.rsplit(":", 1)[1] == str(service.port):
            raise RoutingError(
                f"service.host: the router listens on {listening}; nginx cannot rebind port "
                f"{service.port} to another address by a reload: restart the router "
                f"({restart}), or move the port too"
            )
        ports = [] if running and not moved else [("service.port", host, service.port)]
        status_port = self.options.status_port
        # the status port our running nginx holds: router.json's, else (router.json is written once
        # nginx answers: an `apply` interrupted in between, a SIGTERM or kill, lost it) the serving
        # config's; the port was refused as "not available", held by our own nginx
        held = self._read_meta().get("status_port") if running else None
        if running and held is None:
            held = self._serving_status_port()
        if (
            status_port is not None
            and nginx.has_stub_status(self.binary)
            and (not running or held != status_port)
        ):
            ports.append(("service.router.status_port", "127.0.0.1", status_port))
        # A master killed by `kill -9` leaves its workers serving on its ports: `up` quits them
        # (`_reap`) before it starts nginx again, so ports they hold are not another process's.
        stale = None if running else nginx.read_pid(self.paths.pid)
        orphaned = bool(stale is not None and nginx.leftovers(stale))
        for name, host, port in ports:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((host, port))
                except OSError as exc:
                    if orphaned and exc.errno == errno.EADDRINUSE:
                        continue
                    if not running and exc.errno == errno.EADDRINUSE and self._moved_router() is not None:
                        continue  # this state dir's own router, from before it moved: `_start` replaces it
                    if exc.errno == errno.EACCES:
                        # a port below 1024 for a user: nginx may bind it all the same (setcap)
                        if nginx.binds_low_ports(self.binary):
                            continue
                        raise RoutingError(
                            f"{name} {port} on {host} is not available for the router (Permission "
                            "denied: a port below 1024 takes root, or an nginx allowed to bind it: "
                            f"`sudo setcap cap_net_bind_service=+ep {self.binary}`): choose a port "
                            f"above 1023 for {name}"
                        ) from exc
                    raise RoutingError(
                        f"{name} {port} on {host} is not available for the router "
                        f"({exc.strerror or exc}): free it or choose another {name}"
                    ) from exc

    def _moved_router(self) -> tuple[int, Path] | None:
        """(pid, its state dir) of the router this state dir had before it was moved: the live nginx
        master its pid file names, started from the router folder of another path that no longer
        records it (gone: `mv`; or holding another pid file), listening on our service port. Why:
        that nginx holds the service port with a config at a path that is gone, and could neither
        be reloaded (it re-reads its config from there) nor was recognised: every `up` and watcher
        pass failed on "Address already in use", with the router serving the old upstreams for
        good. It is replaced (`_start`).
        A RoutingError when it is the running router of a state dir this one is a copy of (`cp -a`),
        which must not be touched: the two would route one service."""
        pid = nginx.read_pid(self.paths.pid)
        conf = None if pid is None else nginx.master_conf(pid)
        if pid is None or conf is None or conf == self.paths.conf or (home := _router_home(conf)) is None:
            return None
        if not nginx.listens_on(pid, self.spec.service.port):
            # not in our way, and not ours: a pid our router had, taken since (a `kill -9`, a
            # reboot) by another service's router on its own port. Taken for ours, it had this
            # state dir refused as "a copy" of that one's, or (that one's pid file deleted) stopped
            return None
        if nginx.read_pid(conf.parent.parent / "nginx.pid") == pid:
            raise RoutingError(
                f"service.port {self.spec.service.port} is held by the router of the state dir {home} "
                f"(nginx {pid}), whose pid file this state dir holds too: this one is a copy of it "
                f"(`cp -a`?), and two state dirs must not route one service; use {home}, or, if this "
                f"copy replaces it, stop its watcher and `skyhedge routing down` it first"
            )
        # Where it started says where, not whose: a copy (`cp -a`) of a moved state dir holds the
        # same pid file, and its `routing down` stopped the original's router (its `up` replaced
        # it). The logs nginx holds open are named at their path now: in our `router/logs/`
        # only if it is this state dir's own (moved with it), else in the one it is a copy of.
        held = nginx.held_folders(pid)
        if held is None:
            return None  # (gone meanwhile, or not ours to read: not ours to stop either)
        if not any(_same_folder(folder, self.paths.logs) for folder in held):
            logs = (f for f in held if f.name == "logs" and f.parent.name == "router")
            now = next((f.parent.parent for f in logs), home)
            raise RoutingError(
                f"service.port {self.spec.service.port} is held by the router of the state dir {now} "
                f"(nginx {pid}, started from {home} before it moved), whose pid file this state dir "
                f"holds too: this one is a copy of it (`cp -a`?), and two state dirs must not route "
                f"one service; use {now}, or, if this copy replaces it, stop its watcher and "
                f"`skyhedge routing down` it first"
            )
        return pid, home

    def _check_tls_files(self) -> None:
        """`service.tls`'s files exist and can be read: nginx's own error names neither the field
        nor, for a key, which file; and a router up without them would be a router down."""
        tls = self.spec.service.tls
        if tls is None:
            return
        for what, path in (("certfile", tls.certfile), ("keyfile", tls.keyfile)):
            try:
                with open(path, "rb") as f:
                    head = f.read(4096 if what == "certfile" else 2**20)
            except OSError as exc:
                raise RoutingError(f"service.tls.{what}: {path}: {exc.strerror or exc}") from exc
            if b"-----BEGIN " not in head:
                raise RoutingError(f"service.tls.{what}: {path}: not a PEM file (no -----BEGIN line)")
            if what == "keyfile" and (b"-----BEGIN ENCRYPTED " in head or b"Proc-Type: 4,ENCRYPTED" in head):
                # nginx would ask for the passphrase on the terminal (`nginx -t` waited there for
                # good under `apply` or `up`), and a reload by the watcher has no terminal to ask
                raise RoutingError(
                    f"service.tls.{what}: {path}: the private key is encrypted (nginx would ask for "
                    "its passphrase): give it unencrypted, readable by this user only "
                    "(`openssl pkey -in KEY -out KEY.plain`)"
                )

    def status(self) -> dict[str, Any]:
        """`endpoint`, `pid` (None when not running), `upstreams` ([{id, endpoint}]), `status_url`."""
        pid = self.pid()
        meta = self._read_meta() if pid else {}
        port = meta.get("status_port")
        return {
            "endpoint": self.endpoint,
            "pid": pid,
            # by ID as skyhedge lists replicas (`r-9999` before `r-10000`): the record of a config an
            # earlier release wrote in text order, kept as it runs (`_as_text_ordered`), lists them so
            "upstreams": sorted(meta.get("upstreams", []), key=_listed_order),
            "status_url": f"http://127.0.0.1:{port}/stub_status" if port else None,
        }

    def pid(self) -> int | None:
        """The running master's pid, or None (no pid file, dead, or a recycled pid)."""
        return _master_pid(self.paths)

    def up(self, upstreams: Iterable[Upstream]) -> dict[str, Any]:
        """Start nginx routing to `upstreams`; if it already runs, reload it instead (idempotent)."""
        ups = sorted_upstreams(upstreams)
        with self._locked():
            if self.pid():
                self._reload(ups)
            else:
                self._start(ups)
        return self.status()

    def reload(self, upstreams: Iterable[Upstream]) -> dict[str, Any]:
        """Route to exactly `upstreams` from now on; a config nginx refuses never replaces the old one."""
        ups = sorted_upstreams(upstreams)
        if not self.paths.prefix.is_dir():
            # never started here: refused before `_locked` makes the router folder, so a reload
            # by mistake into a new --state-dir leaves no directory behind (the writer lock
            # removes a state dir that holds only its lock file)
            raise self._not_running()
        with self._locked():
            self._reload(ups)
        return self.status()

    def drain(self, upstreams: Iterable[Upstream], *, timeout: float = 60.0) -> bool:
        """Reload with `upstreams` (the survivors) and wait until requests in flight to the others end.

        Call it before destroying replicas. True when every old worker finished within `timeout`
        seconds; False when some request was still running (the caller may destroy anyway).
        """
        old = self.begin_drain(upstreams)
        return _wait(lambda: not workers_alive(old), timeout)

    def begin_drain(self, upstreams: Iterable[Upstream]) -> list[int]:
        """Reload with `upstreams` (the survivors) without waiting: returns the old workers' pids,
        whose exit (`workers_alive`) says the requests in flight to the others have ended. A
        controller polls that between its passes instead of blocking one for the whole drain."""
        ups = sorted_upstreams(upstreams)
        with self._locked():
            return self._reload(ups)

    def sever(self, endpoints: Iterable[str], *, awaiting_within: float | None = None) -> int:
        """Close nginx's connections to `endpoints` now, without waiting for an answer: call it
        for replicas known gone (preempted, terminated, failed) once a reload took them out.

        `awaiting_within`: close only the connections on which a request was sent less than this
        many seconds ago and nothing came back since (`nginx.awaiting_answer`): those nginx
        retries on another replica. For a replica taken out alive because it stopped answering
        (its probe timed out: hung), whose streams under way must not be cut, and whose other
        requests are either retried now or left to it (too old for nginx to retry: cut, they
        would only fail sooner).

        Why: a cloud VM that vanishes sends no TCP reset, so the requests in flight on it waited
        for `read_timeout` (600 s by default) on the old workers, though the controller knew it
        gone within seconds. Shut down, each such connection ends at once: a request that got no
        byte of its answer yet is retried on another replica (`proxy_next_upstream error`, within
        `next_upstream_timeout` of its start), others end (a 503, or a stream cut short).
        Healthy replicas' connections are not touched, so their long generations go on across
        the reload (nginx's `worker_shutdown_timeout` would cut them all). Returns how many
        connections were closed; RoutingError when nginx's could not be reached (not allowed:
        see docs/routing.md)."""
        pid = self.pid()
        if pid is None or not nginx.CAN_SEE_WORKERS:
            return 0
        endpoints = list(endpoints)
        peers = {peer for endpoint in endpoints for peer in _peers(endpoint)}
        if not peers:
            return 0
        try:
            only = None
            if awaiting_within is not None:
                only = functools.partial(nginx.awaiting_answer, within=awaiting_within)
            return nginx.sever(nginx.workers(pid), peers, only)
        except OSError as exc:
            raise RoutingError(
                f"could not close nginx's connections to {', '.join(endpoints)} "
                f"({exc.strerror or exc}): requests in flight to them end only at "
                "service.router.read_timeout (run skyhedge as the user nginx runs as, with the "
                "right to ptrace it: see docs/routing.md)"
            ) from exc

    def down(self, *, timeout: float = 10.0) -> None:
        """Graceful quit (in-flight requests finish, bounded by `timeout`), then fast, then kill."""
        if not self.paths.prefix.is_dir():
            # never started here, or its folder deleted under a running nginx (`rm -rf` of the
            # state dir, `git clean -fdx`): found by its command line, it is stopped all the same
            # (it went on holding the port while `routing down` said "router down"; no lock: a
            # lock file would make the folder again)
            pid = self.pid()
            if pid is not None:
                self._stop(pid, timeout)
            return
        with self._locked():
            pid = self.pid()
            moved = self._moved_router() if pid is None else None
            if pid is not None:
                self._stop(pid, timeout)
            elif moved is not None:
                # started before the state dir was moved: its pid file moved here, its config is
                # gone with the old path. Only the pid file went (`destroy` said "taking the router
                # down"), and nginx held the service port for good, found by nothing any more
                log.warning(
                    "the router of %s runs from %s, where this state dir was before it moved (nginx %d): "
                    "stopped",
                    self.spec.name,
                    moved[1],
                    moved[0],
                )
                self._stop(moved[0], timeout)
            else:
                stale = nginx.read_pid(self.paths.pid)
                if stale is not None:  # the master crashed: its workers may still hold the port
                    self._reap(stale)
            with contextlib.suppress(FileNotFoundError):
                self.paths.pid.unlink()

    def rotate_logs(self, max_bytes: int | None = None) -> list[Path]:
        """Rotate each log of the router larger than `max_bytes` (default LOG_ROTATE_BYTES): it
        becomes `<name>.1` (one old generation kept, so a log takes at most about twice the cap)
        and the running nginx reopens its logs (SIGUSR1, as logrotate would have it do). Lines
        written between the rename and the reopen land in `<name>.1`: none is lost. Returns the
        logs rotated."""
        max_bytes = LOG_ROTATE_BYTES if max_bytes is None else max_bytes
        logs = (self.paths.access_log, self.paths.error_log)
        if all(nginx.log_size(path) <= max_bytes for path in logs):
            return []
        rotated: list[Path] = []
        with self._locked():  # not while a start or reload reads the error log from a mark
            for path in logs:
                if nginx.log_size(path) <= max_bytes:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path, path.with_name(f"{path.name}.1"))
                    rotated.append(path)
            pid = self.pid()
            if rotated and pid is not None:
                nginx.signal_pid(pid, signal.SIGUSR1)
        return rotated

    def render(self, upstreams: Iterable[Upstream], status_port: int | None) -> str:
        """The config text for `upstreams`; a method so a subclass can change it (tests do)."""
        return self._render(upstreams, status_port)

    def _render(
        self, upstreams: Iterable[Upstream], status_port: int | None, text_order: bool = False
    ) -> str:
        return render_config(
            self.spec,
            upstreams,
            paths=self.paths,
            options=self.options,
            status_port=status_port,
            run_as=self._run_as(),
            tls_digest=self._tls_digest(),
            text_order=text_order,
        )

    def _tls_digest(self) -> str | None:
        """A digest of `service.tls`'s files as they are now, written into the config: a renewed
        certificate changes the config's text, so the next reload (`routing reload`, the watcher's
        next routing pass) makes nginx read it; an unchanged config is never reloaded."""
        tls = self.spec.service.tls
        if tls is None:
            return None
        digest = hashlib.sha256()
        for path in (tls.certfile, tls.keyfile):
            try:
                digest.update(path.read_bytes())
            except OSError:
                digest.update(b"unreadable")  # `_check_tls_files` names it; nginx -t refuses it
        return digest.hexdigest()[:16]

    def outdated(self) -> str | None:
        """Why the running nginx must be reloaded though its upstreams did not change, or None:
        its config file is gone (the router's folder deleted under it), or `service.tls`'s files
        were renewed (`tls_renewed`)."""
        if not self.paths.conf.is_file():
            return "the router's config is gone (its folder deleted?)"
        if self.tls_renewed():
            return "the TLS certificate or key changed"
        return None

    def tls_renewed(self) -> bool:
        """`service.tls`'s files changed since the config nginx runs was written (a certificate
        renewed in place): a reload makes nginx serve them. False without TLS."""
        digest = self._tls_digest()
        if digest is None:
            return False
        try:
            return f"sha256 {digest}" not in self.paths.conf.read_text(encoding="utf-8")
        except OSError:
            return False

    # -- internals ------------------------------------------------------------------------------

    @property
    def binary(self) -> str:
        if self._binary is None:
            self._binary = nginx.find_nginx(self._nginx_bin)
        return self._binary

    @staticmethod
    def _run_as() -> tuple[str, str] | None:
        """As root, keep workers as root: nginx would otherwise drop them to nobody/www-data."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwuid(os.geteuid()).pw_name, grp.getgrgid(os.getegid()).gr_name
        except KeyError:
            return None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One lifecycle change at a time per router (threads and processes alike)."""
        self.paths.prefix.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.paths.lock), timeout=60)
        try:
            lock.acquire()
        except Timeout:
            raise RoutingError(
                f"{self.paths.lock}: another skyhedge process is changing this router"
            ) from None
        try:
            yield
        finally:
            lock.release()

    def _not_running(self) -> RoutingError:
        return RoutingError(
            f"the router of {self.spec.name} is not running (start it with `skyhedge routing up`)"
        )

    def _install(self, text: str) -> None:
        """Write the candidate, `nginx -t` it, then swap it in atomically; keep it aside if refused."""
        nginx.ensure_dirs(self.paths)
        atomic_write_text(self.paths.candidate, text)
        try:
            nginx.check_config(self.binary, self.paths, self.paths.candidate)
        except RoutingError as exc:
            os.replace(self.paths.candidate, self.paths.rejected)
            reason = _first_problem(exc.stderr)
            raise RoutingError(
                f"nginx refused the new configuration (kept as {self.paths.rejected})"
                + (f": {reason}" if reason else ""),
                stderr=exc.stderr,
            ) from exc
        os.replace(self.paths.candidate, self.paths.conf)

    def _status_port(self) -> int | None:
        if not nginx.has_stub_status(self.binary):
            return None
        return self.options.status_port or _free_port()

    def _start(self, ups: list[Upstream]) -> None:
        self._check_tls_files()
        status_port = self._status_port()
        self._install(self.render(ups, status_port))
        if (moved := self._moved_router()) is not None:
            pid, home = moved
            log.warning(
                "the router of %s runs from %s, where this state dir was before it moved (nginx %d): "
                "replaced by one started from here",
                self.spec.name,
                home,
                pid,
            )
            self._stop(pid, 10.0)
        stale = nginx.read_pid(self.paths.pid)
        if stale is not None:  # pid() said no live master owns it: a crash or a reboot
            self._reap(stale)
            with contextlib.suppress(FileNotFoundError):
                self.paths.pid.unlink()
        mark = nginx.log_size(self.paths.error_log)
        nginx.start(self.binary, self.paths)
        if not _wait(lambda: self.pid() is not None and self._healthy(), START_TIMEOUT):
            pid = nginx.read_pid(self.paths.pid)
            if pid and nginx.is_master(pid, self.paths.conf):
                self._stop(pid, 2.0)
            raise RoutingError(
                f"nginx did not come up on {self.endpoint} within {START_TIMEOUT:.0f}s",
                stderr=nginx.log_tail(self.paths.error_log, since=mark),
            )
        self._write_meta(ups, status_port)

    def _reload(self, ups: list[Upstream]) -> set[int]:
        """Apply `ups` to the running nginx; return the workers that must exit before it is drained."""
        pid = self.pid()
        if pid is None:
            raise self._not_running()
        self._check_tls_files()  # a renewal half-done (key gone, not yet replaced): the old config stays
        status_port = self._read_meta().get("status_port")
        if nginx.has_stub_status(self.binary) and self.options.status_port:
            status_port = self.options.status_port
        elif status_port is None and nginx.has_stub_status(self.binary):
            # router.json is written once nginx is up: a kill -9 in between (or the router's
            # folder deleted) lost it, and the config rendered without it dropped the request
            # counter for good (the autoscaler measured nothing until nginx restarted). Keep the
            # port the running config serves it on, else take a free one.
            status_port = self._serving_status_port() or _free_port()
        text = self.render(ups, status_port)
        before = nginx.workers(pid)
        try:
            current = self.paths.conf.read_text(encoding="utf-8")
        except OSError:
            current = None
        if text != current and current is not None and self._as_text_ordered(ups, status_port, current):
            text = current  # (the same upstreams, listed as an earlier release did: not reloaded)
            ups = sorted_upstreams(ups, text_order=True)
        if text == current and self._read_meta() == self._meta(ups, status_port):
            # Nothing changes: no needless worker churn. Workers still finishing an earlier reload
            # may hold requests to replicas removed then, so a drain waits for them.
            return {p for p, title in before.items() if "shutting down" in title}
        if text != current:
            self._install(text)
        # else the config is in place but its reload was never confirmed: the record, written
        # once nginx took a config, says other upstreams (a kill between installing the config
        # and signalling nginx left nginx on the old one, and every later pass, finding the file
        # as it would write it, skipped the reload: removed replicas stayed routed), or is gone
        mark = nginx.log_size(self.paths.error_log)
        os.kill(pid, signal.SIGHUP)
        if nginx.CAN_SEE_WORKERS:  # confirm a new generation of workers took over
            started = _wait(lambda: bool(set(nginx.workers(pid)) - set(before)), RELOAD_TIMEOUT)
            if not started:
                if current is not None:
                    atomic_write_text(self.paths.conf, current)
                raise RoutingError(
                    "nginx did not apply the new configuration (kept the old one)",
                    stderr=nginx.log_tail(self.paths.error_log, since=mark),
                )
            # An old worker renames itself "is shutting down" as it closes its listening sockets:
            # from then on every new connection reaches a worker with the new config.
            _wait(lambda: all(_quitting(p) for p in before), RELOAD_TIMEOUT)
        self._write_meta(ups, status_port)
        if nginx.read_pid(self.paths.pid) != pid:  # nginx writes it at start only
            atomic_write_text(self.paths.pid, f"{pid}\n")
        return set(before)

    def _as_text_ordered(self, ups: list[Upstream], status_port: int | None, current: str) -> bool:
        """Whether nginx runs `ups` already, listed in the text order of their IDs (`r-10000`
        before `r-9999`) as releases before `sorted_upstreams` ordered them by number wrote them:
        reloading it for the order alone would churn its workers (and close kept-alive
        connections) for no change of upstreams."""
        legacy = sorted_upstreams(ups, text_order=True)
        return (
            legacy != ups
            and current == self._render(legacy, status_port, text_order=True)
            and self._read_meta() == self._meta(legacy, status_port)
        )

    def _stop(self, pid: int, timeout: float) -> None:
        """Graceful quit, then fast shutdown, then SIGKILL to the master's whole process group."""
        for sig, wait in ((signal.SIGQUIT, timeout), (signal.SIGTERM, 5.0)):
            nginx.signal_pid(pid, sig)
            if _wait(lambda: not nginx.alive(pid), wait):
                break
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            _wait(lambda: not nginx.alive(pid), 5.0)
        if nginx.alive(pid):
            raise RoutingError(f"nginx master {pid} did not exit")
        self._reap(pid)

    @staticmethod
    def _reap(master: int) -> None:
        """Workers a dead master left behind would keep the port with the old config: quit them.

        SIGQUIT makes a worker close its listening sockets at once and finish its in-flight
        requests; one that does not react within 5 s is killed.
        """
        orphans = nginx.leftovers(master)
        for p in orphans:
            nginx.signal_pid(p, signal.SIGQUIT)
        if not _wait(lambda: all(_quitting(p) for p in orphans), 5.0):
            for p in orphans:
                if not _quitting(p):
                    nginx.signal_pid(p, signal.SIGKILL)

    def _healthy(self) -> bool:
        host = self.spec.service.host.strip("[]")
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        tls = self.spec.service.tls is not None
        scheme = "https" if tls else "http"
        url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{self.spec.service.port}/-/health"
        try:
            with (_NO_PROXY_TLS if tls else _NO_PROXY).open(url, timeout=1.0) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _read_meta(self) -> dict[str, Any]:
        try:
            data = json.loads(self.paths.meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _meta(self, ups: list[Upstream], status_port: int | None) -> dict[str, Any]:
        listen = listen_address(self.spec)
        return {"upstreams": [u.to_json() for u in ups], "status_port": status_port, "listen": listen}

    def _serving_status_port(self) -> int | None:
        """The port of the `stub_status` server in the serving config, or None."""
        try:
            text = self.paths.conf.read_text(encoding="utf-8")
        except OSError:
            return None
        found = re.search(r"listen\s+127\.0\.0\.1:(\d+);[^}]*?location = /stub_status", text)
        return int(found.group(1)) if found else None

    def _listening(self) -> str | None:
        """The address the running nginx serves on (`host:port` as in its `listen`): from the
        meta file, else (written by an older skyhedge) the config's first `listen` line."""
        listen = self._read_meta().get("listen")
        if isinstance(listen, str):
            return listen
        try:
            text = self.paths.conf.read_text(encoding="utf-8")
        except OSError:
            return None
        found = re.search(r"^\s*listen\s+(\S+?)(?:\s+ssl)?;", text, re.MULTILINE)
        return found.group(1) if found else None

    def _write_meta(self, ups: list[Upstream], status_port: int | None) -> None:
        text = json.dumps(self._meta(ups, status_port), indent=2, sort_keys=True) + "\n"
        atomic_write_text(self.paths.meta, text)


def _peers(endpoint: str) -> set[tuple[str, int]]:
    """The (address, port) pairs nginx may connect to for `endpoint` (`http[s]://HOST[:PORT]`): its
    address, or what its host name resolves to now (nothing when it does not resolve)."""
    parts = urlsplit(endpoint)
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port out of range: nginx never connected there
        return set()
    if not host:
        return set()
    try:
        return {(str(ipaddress.ip_address(host)), port)}
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return set()
    return {(str(info[4][0]), port) for info in found}


def _master_pid(paths: RouterPaths) -> int | None:
    pid = nginx.read_pid(paths.pid)
    if pid is not None:
        return pid if nginx.is_master(pid, paths.conf) else None
    # No pid file: never started, or its folder was deleted under a running nginx (`rm -rf
    # router/`), which then held the port with its old upstreams while every start failed on
    # it ("address in use") and new replicas were never routed. Found by its command line, it is
    # reloaded as ours: the reload writes the config, the folders and the pid file again.
    found = nginx.masters_of(paths.conf)
    return found[0] if len(found) == 1 else None


def running_router_pid(state_dir: Path) -> int | None:
    """The pid of the nginx master routing for the service whose state is in `state_dir`, or
    None: no spec needed (`status` works while the spec on disk does not load)."""
    return _master_pid(RouterPaths(Path(state_dir).resolve() / "router"))
