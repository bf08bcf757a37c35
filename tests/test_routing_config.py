"""nginx config generation: what the text says, that nginx -t accepts it, and that values are checked."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from routing_support import free_port, make_spec, needs_nginx

from skyhedge.errors import RoutingError
from skyhedge.routing import RouterOptions, Upstream, parse_stub_status, render_config
from skyhedge.routing.config import RouterPaths, listen_address
from skyhedge.routing.nginx import find_nginx
from skyhedge.spec import parse_spec

UPS = [Upstream(f"r-000{i}", f"http://127.0.0.1:1800{i}") for i in (3, 1, 2)]


def render(
    tmp_path: Path, upstreams=UPS, *, lb: str = "least_load", status_port: int | None = 9913, **kw
) -> str:
    paths = RouterPaths(tmp_path / "router")
    return render_config(make_spec(8080, lb=lb), upstreams, paths=paths, status_port=status_port, **kw)


def test_full_config_has_every_piece_issue_4_asks_for(tmp_path):
    text = render(tmp_path)
    assert "upstream skyhedge_replicas {" in text
    assert "zone skyhedge_replicas 64k;" in text
    assert "least_conn;" in text
    servers = [line.strip() for line in text.splitlines() if line.strip().startswith("server 127.")]
    assert servers == [
        "server 127.0.0.1:18001 max_fails=1 fail_timeout=10s;  # r-0001",
        "server 127.0.0.1:18002 max_fails=1 fail_timeout=10s;  # r-0002",
        "server 127.0.0.1:18003 max_fails=1 fail_timeout=10s;  # r-0003",
        # the group retrying a replica's 500: never counted against a replica
        "server 127.0.0.1:18001 max_fails=0;  # r-0001",
        "server 127.0.0.1:18002 max_fails=0;  # r-0002",
        "server 127.0.0.1:18003 max_fails=0;  # r-0003",
    ]
    for line in (
        "keepalive 32;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_next_upstream error timeout http_502 http_503 non_idempotent;",
        "proxy_intercept_errors on;",
        "error_page 500 = @retry_500;",
        "proxy_next_upstream error timeout http_500 http_502 http_503 http_504 non_idempotent;",
        "proxy_next_upstream_tries 3;",
        "proxy_next_upstream_timeout 30s;",
        "proxy_read_timeout 600s;",
        "proxy_buffering off;",
        "location = /-/health {",
        "listen 127.0.0.1:8080;",
        "listen 127.0.0.1:9913;",
        "stub_status;",
        f'pid "{tmp_path}/router/nginx.pid";',
        f'error_log "{tmp_path}/router/logs/error.log" warn;',
        f'proxy_temp_path "{tmp_path}/router/temp/proxy";',
    ):
        assert line in text, line
    assert "/var/log/nginx" not in text and "/var/lib/nginx" not in text
    # least_conn must come before keepalive in the upstream block (nginx requirement).
    assert text.index("least_conn;") < text.index("keepalive 32;")


def test_without_retries_a_replicas_500_is_not_retried_either(tmp_path):
    text = render(tmp_path, options=RouterOptions(next_upstream_tries=1))
    assert "location @retry_500" not in text and "proxy_intercept_errors" not in text
    assert "skyhedge_replicas_retry" not in text


def test_round_robin_is_nginx_default_and_options_flow_through(tmp_path):
    opts = RouterOptions(max_fails=3, fail_timeout=20, keepalive=8, next_upstream_tries=2, read_timeout=900)
    text = render(tmp_path, lb="round_robin", options=opts)
    assert "least_conn" not in text
    assert "max_fails=3 fail_timeout=20s;" in text
    assert "keepalive 8;" in text and "proxy_next_upstream_tries 2;" in text
    assert "proxy_read_timeout 900s;" in text


def test_empty_upstream_answers_503_without_an_upstream_block(tmp_path):
    text = render(tmp_path, [])
    assert "upstream skyhedge_replicas" not in text and "proxy_pass" not in text
    assert "return 503" in text
    assert "location = /-/health {" in text


def test_no_status_port_leaves_out_stub_status_and_root_gets_a_user_line(tmp_path):
    text = render(tmp_path, status_port=None, run_as=("root", "root"))
    assert "stub_status" not in text
    assert "user root root;" in text
    assert "user " not in render(tmp_path, run_as=None)


def test_rendering_is_deterministic_and_order_independent(tmp_path):
    assert render(tmp_path, UPS) == render(tmp_path, list(reversed(UPS)))


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://127.0.0.1:8000",
        "127.0.0.1:8000",
        "http://127.0.0.1:8000/v1",
        "http://127.0.0.1:8000?x=1",
        "http://127.0.0.1:99999",
        "http://127.0.0.1:0",  # not "no port": nginx was told 127.0.0.1:80, another server
        "http://127.0.0.1:8000;evil",
        "http://user@127.0.0.1:8000",
        "http://bad_host$x:8000",
        "http://10.0.0.1:80 max_fails=0",
        "http://:8000",
    ],
)
def test_bad_endpoints_are_refused_before_reaching_nginx(endpoint):
    with pytest.raises(RoutingError, match="upstream r-0001"):
        Upstream("r-0001", endpoint)


@pytest.mark.parametrize("rid", ["", "r 1", "r;1", "-x", "a" * 65, "r\n1"])
def test_bad_ids_are_refused(rid):
    with pytest.raises(RoutingError, match="upstream id"):
        Upstream(rid, "http://127.0.0.1:8000")


def test_good_endpoints_and_their_server_lines():
    assert Upstream("r-0001", "http://10.0.0.5:8000").server == "10.0.0.5:8000"
    assert Upstream("r-0001", "http://10.0.0.5").server == "10.0.0.5:80"
    assert Upstream("r-0001", "http://[fd00::1]:8000/").server == "[fd00::1]:8000"
    assert (
        Upstream("r-0001", "http://ip-10-0-0-5.ec2.internal:8000").server == "ip-10-0-0-5.ec2.internal:8000"
    )


def test_duplicates_are_refused(tmp_path):
    with pytest.raises(RoutingError, match="listed twice"):
        render(tmp_path, [UPS[0], UPS[0]])
    with pytest.raises(RoutingError, match="share the endpoint"):
        render(tmp_path, [UPS[0], Upstream("r-0009", UPS[0].endpoint)])


def test_listen_address_and_unsafe_prefix():
    assert listen_address(make_spec(8080)) == "127.0.0.1:8080"
    spec = make_spec(8080)
    v6 = type(spec.service)(host="::1", port=9000)
    assert listen_address(type(spec)(**{**spec.__dict__, "service": v6})) == "[::1]:9000"
    with pytest.raises(RoutingError, match="characters"):
        RouterPaths(Path('/tmp/a"b'))
    with pytest.raises(RoutingError, match="characters"):
        RouterPaths(Path("/tmp/$x"))
    with pytest.raises(RoutingError, match="absolute"):
        RouterPaths(Path("relative"))


@pytest.mark.parametrize(
    "kw",
    [
        {"max_fails": 0},
        {"keepalive": -1},
        {"read_timeout": True},
        {"worker_processes": "lots"},
        {"client_max_body_size": "1 0m"},
        {"status_port": 70000},
    ],
)
def test_bad_options_are_refused(kw):
    with pytest.raises(RoutingError, match="router option"):
        RouterOptions(**kw)


def test_stub_status_parser():
    page = (
        "Active connections: 2 \n"
        "server accepts handled requests\n"
        " 16 16 31 \n"
        "Reading: 0 Writing: 1 Waiting: 1 \n"
    )
    assert parse_stub_status(page) == {
        "active": 2,
        "accepts": 16,
        "handled": 16,
        "requests": 31,
        "reading": 0,
        "writing": 1,
        "waiting": 1,
    }
    with pytest.raises(RoutingError, match="not an nginx stub_status page"):
        parse_stub_status("<html>hello</html>")


@needs_nginx
@pytest.mark.parametrize("case", ["full", "empty", "round_robin", "no_status", "ipv6_upstream"])
def test_nginx_accepts_every_generated_variant(tmp_path, case):
    ups = {"empty": [], "ipv6_upstream": [Upstream("r-0001", "http://[::1]:18001")]}.get(case, UPS)
    text = render(
        tmp_path,
        ups,
        lb="round_robin" if case == "round_robin" else "least_load",
        status_port=None if case == "no_status" else 9913,
    )
    paths = RouterPaths(tmp_path / "router")
    for d in (paths.conf.parent, paths.logs, paths.temp):
        d.mkdir(parents=True)
    paths.conf.write_text(text)
    nginx = find_nginx()
    out = subprocess.run(
        [nginx, "-t", "-q", "-p", f"{paths.prefix}/", "-c", str(paths.conf), "-e", str(paths.error_log)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == ""  # not even a warning


@needs_nginx
def test_an_ipv4_mapped_ipv6_host_is_listened_on_as_the_ipv4_address_it_stands_for(tmp_path):
    """`service.host: ::ffff:127.0.0.1` passed the spec, but nginx listens on IPv6 only
    (ipv6only=on), where binding such an address fails: `bind() to [::ffff:127.0.0.1]:PORT
    failed (22: Invalid argument)`, and the router never came up. An upstream so written is the
    IPv4 address too."""
    port = free_port()
    spec = parse_spec(
        {
            "name": "echo",
            "placement": {"clouds": ["aws"]},
            "run": {"command": "x"},
            "service": {"host": "::ffff:127.0.0.1", "port": port},
        }
    )
    assert listen_address(spec) == f"127.0.0.1:{port}"
    assert Upstream("r-0001", "http://[::ffff:10.0.0.5]:8000").server == "10.0.0.5:8000"
    paths = RouterPaths(tmp_path / "router")
    for d in (paths.conf.parent, paths.logs, paths.temp):
        d.mkdir(parents=True)
    paths.conf.write_text(render_config(spec, UPS, paths=paths, status_port=None))
    out = subprocess.run(
        [
            find_nginx(),
            "-t",
            "-q",
            "-p",
            f"{paths.prefix}/",
            "-c",
            str(paths.conf),
            "-e",
            str(paths.error_log),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
