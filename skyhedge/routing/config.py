"""nginx config generation: upstreams and options in, the text of one nginx.conf out. No I/O but
reading the template.

Every value is validated here before it reaches `templates/nginx/nginx.conf.j2` (addresses, ports,
ids, paths), so the template never needs escaping and a replica endpoint cannot inject directives.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import jinja2

from skyhedge._resources import templates_dir
from skyhedge.errors import RoutingError
from skyhedge.planner import replica_order
from skyhedge.spec import UNSAFE_NGINX_PATH_CHARS as _UNSAFE_PATH_CHARS
from skyhedge.spec import RouterOptions, ServiceSpec, nginx_host

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _host_port(host: str, port: int, *, what: str) -> str:
    """`host:port` as nginx wants it (`[v6]:port`), or RoutingError naming `what`."""
    address = nginx_host(host)
    if address is None:
        raise RoutingError(f"{what}: {host!r} is not an IP address or host name")
    return f"{address}:{port}"


@dataclass(frozen=True)
class Upstream:
    """One READY replica the router may send requests to: its stable id and `http://host:port`."""

    id: str
    endpoint: str

    def __post_init__(self) -> None:
        if not _ID_RE.fullmatch(self.id):
            raise RoutingError(f"upstream id {self.id!r}: expected letters, digits, '.', '_' or '-'")
        self.server  # noqa: B018 (validates the endpoint now rather than at render time)

    @property
    def server(self) -> str:
        """The `host:port` of nginx's `server` line."""
        parts = urlsplit(self.endpoint)
        try:
            # an explicit port 0 is refused below, not taken for "no port" (80): another server
            port = 80 if parts.port is None else parts.port
        except ValueError:
            port = -1
        if (
            parts.scheme != "http"
            or not parts.hostname
            or parts.path not in ("", "/")
            or parts.query
            or parts.username
            or not 0 < port < 65536
        ):
            raise RoutingError(
                f"upstream {self.id}: endpoint {self.endpoint!r} is not of the form http://HOST:PORT"
            )
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        return _host_port(host, port, what=f"upstream {self.id}")

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "endpoint": self.endpoint}


@dataclass(frozen=True)
class RouterPaths:
    """Everything nginx reads or writes, under one prefix (`<state_dir>/router/`)."""

    prefix: Path

    def __post_init__(self) -> None:
        if not self.prefix.is_absolute():
            raise RoutingError(f"router prefix {self.prefix}: must be an absolute path")
        if _UNSAFE_PATH_CHARS.search(str(self.prefix)):
            raise RoutingError(
                f"router prefix {self.prefix}: contains characters nginx cannot take in a path "
                "(quote, backslash, '$' or control characters)"
            )

    @property
    def conf(self) -> Path:
        return self.prefix / "conf" / "nginx.conf"

    @property
    def candidate(self) -> Path:
        return self.prefix / "conf" / "nginx.conf.candidate"

    @property
    def rejected(self) -> Path:
        return self.prefix / "conf" / "nginx.conf.rejected"

    @property
    def pid(self) -> Path:
        return self.prefix / "nginx.pid"

    @property
    def logs(self) -> Path:
        return self.prefix / "logs"

    @property
    def error_log(self) -> Path:
        return self.logs / "error.log"

    @property
    def access_log(self) -> Path:
        return self.logs / "access.log"

    @property
    def temp(self) -> Path:
        return self.prefix / "temp"

    @property
    def meta(self) -> Path:
        """What the running nginx was last given (upstreams, status port), for `Router.status()`."""
        return self.prefix / "router.json"

    @property
    def lock(self) -> Path:
        return self.prefix / "router.lock"


def listen_address(spec: ServiceSpec) -> str:
    return _host_port(spec.service.host, spec.service.port, what="service.host")


def sorted_upstreams(upstreams: Iterable[Upstream], *, text_order: bool = False) -> list[Upstream]:
    """Sorted by id (stable config text) in the order replica IDs were handed out
    (`replica_order`: `r-9999` before `r-10000`, which text order put after it), as the `upstreams`
    lists of `routing --json` and `status --json` show them next to the replicas, and checked for
    duplicate ids or endpoints. `text_order`: as releases before that sorted them (to tell a
    running config that differs by the order alone: `Router._as_text_ordered`)."""
    out = sorted(upstreams, key=(lambda u: u.id) if text_order else (lambda u: replica_order(u.id)))
    ids: set[str] = set()
    servers: dict[str, str] = {}
    for u in out:
        if u.id in ids:
            raise RoutingError(f"upstream {u.id} is listed twice")
        if u.server in servers:
            raise RoutingError(f"upstreams {servers[u.server]} and {u.id} share the endpoint {u.endpoint}")
        ids.add(u.id)
        servers[u.server] = u.id
    return out


@functools.lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir() / "nginx")),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    return env.get_template("nginx.conf.j2")


def upstream_zone_kb(count: int) -> int:
    """Size of the upstream group's shared memory zone for `count` peers, in KiB.

    nginx keeps each peer in it (about 1 KiB each: a 64 KiB zone holds 63 and refuses the config
    at 64). Sized with a quarter to spare and rounded up to 64 KiB steps, so most reloads keep the
    size; nginx reallocates the zone on a reload that changes it."""
    return 64 * math.ceil((32 + 1.25 * max(0, count)) / 64)


def render_config(
    spec: ServiceSpec,
    upstreams: Iterable[Upstream],
    *,
    paths: RouterPaths,
    options: RouterOptions | None = None,
    status_port: int | None = None,
    run_as: tuple[str, str] | None = None,
    tls_digest: str | None = None,
    text_order: bool = False,
) -> str:
    """The nginx.conf text routing `spec`'s service address to `upstreams` (READY replicas only).

    `options` None takes the spec's (`service.router`). `status_port` None leaves out the
    stub_status server. `run_as` (user, group) emits nginx's `user` directive, needed only when
    the master runs as root. `tls_digest` (of `service.tls`'s files, read by the caller) goes
    into the config as a comment: a renewed certificate changes the text, so a reload takes it.
    `text_order`: the upstreams listed as releases before ID order did (`sorted_upstreams`).
    """
    ups = sorted_upstreams(upstreams, text_order=text_order)
    tls = spec.service.tls
    if tls is not None:
        for what, path in (("certfile", tls.certfile), ("keyfile", tls.keyfile)):
            if not path.is_absolute() or _UNSAFE_PATH_CHARS.search(str(path)):
                raise RoutingError(f"service.tls.{what}: {str(path)!r} is not a path nginx can read")
    try:
        return _template().render(
            service=spec.name,
            upstreams=[{"id": u.id, "server": u.server} for u in ups],
            zone_kb=upstream_zone_kb(len(ups)),
            least_conn=spec.service.load_balancing_policy == "least_load",
            # a replica's 500 is retried on the replicas, unless retries are off
            retry_500=(options or spec.service.router).next_upstream_tries > 1,
            listen=listen_address(spec),
            tls={"cert": tls.certfile, "key": tls.keyfile, "digest": tls_digest} if tls is not None else None,
            status_listen=f"127.0.0.1:{status_port}" if status_port else None,
            user=run_as[0] if run_as else None,
            group=run_as[1] if run_as else None,
            o=options or spec.service.router,
            paths={
                "pid": paths.pid,
                "error_log": paths.error_log,
                "access_log": paths.access_log,
                "temp": paths.temp,
            },
        )
    except jinja2.TemplateError as exc:
        raise RoutingError(f"cannot render the nginx template: {exc}") from exc
