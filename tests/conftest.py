"""Shared fixtures: paths, the shared/ data dir (skip cleanly when absent), spec writers."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import network_guard
import pytest
from routing_support import Fleet, free_port, teardown_router

from skyhedge.clouds.local.processes import kill_all

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


#: The variables rich sizes a console by (and a few tests set or clear).
TERMINAL_VARS = ("COLUMNS", "LINES")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """(pytest-xdist, in the controlling process) Hand each worker this run's own COLUMNS and
    LINES. The controller has imported readline, which puts COLUMNS=80 LINES=24 into the C
    environment (off a terminal) without touching `os.environ`: a worker starts with them in
    its `os.environ`, and every console the tests make there is 80 columns wide, where the
    same test run without `-n` sees none."""
    node.workerinput["skyhedge_terminal_env"] = {name: os.environ.get(name) for name in TERMINAL_VARS}


def pytest_configure(config: pytest.Config) -> None:
    """In an xdist worker: put COLUMNS and LINES back as the controller has them (see
    `pytest_configure_node`), before any test module (or skyhedge's CLI console) is imported."""
    terminal = getattr(config, "workerinput", {}).get("skyhedge_terminal_env")
    if terminal is None:
        return
    for name, value in terminal.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


network_guard.install()  # (see its module: no test reaches another machine)
# The cloud SDKs' own look for credentials on a cloud VM's metadata server (169.254.169.254):
# off in every test and every CLI a test runs (they inherit this environment), as a laptop
# without a cloud account has no such server to ask.
os.environ.setdefault("NO_GCE_CHECK", "true")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(autouse=True)
def _no_traffic_off_this_machine() -> Iterator[None]:
    """Fails a test whose process tried to reach another machine (`network_guard`)."""
    yield from network_guard.watch_test()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """What was tried after the last test's check (a session fixture's teardown, a thread still
    running) fails the run: no test is left to fail for it."""
    if tried := network_guard.take():
        print(
            "\nthe test process tried to reach another machine after its last test: " + "; ".join(tried[:5])
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not present (only on the team's machines)")
    return SHARED


@pytest.fixture
def write_spec(tmp_path: Path) -> Callable[[str], Path]:
    """Write a YAML spec (dedented) into a temp dir and return its path."""

    def _write(text: str, name: str = "service.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        return path

    return _write


@pytest.fixture
def runtime(tmp_path: Path):
    """A local cloud runtime dir (`<state>/local`); every replica process started in it is
    stopped at teardown, also when the test fails."""
    rt = (tmp_path / "state" / "local").resolve()
    rt.mkdir(parents=True)
    yield rt
    kill_all(rt)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """Real local-echo replica processes (routing_support.Fleet); every one is killed at teardown."""
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def routers() -> Iterator[list[Any]]:
    """Routers a test starts (appended to the list); each is taken down at teardown."""
    made: list[Any] = []
    yield made
    for router in made:
        teardown_router(router)


#: How many descriptors `high_descriptors` holds: past select()'s FD_SETSIZE (1024).
HELD_DESCRIPTORS = 1100


@pytest.fixture
def high_descriptors() -> Iterator[None]:
    """This process holding HELD_DESCRIPTORS open descriptors, so the next ones it opens (a pidfd)
    are numbered past 1024, as in a watcher with a raised limit and about a thousand open (a pidfd
    per local replica process, a socket per probe in flight). The soft limit is raised for it where
    the hard one allows (skipped where not), and put back after."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = HELD_DESCRIPTORS + 256
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"the hard descriptor limit ({hard}) is under {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    held: list[int] = []
    try:
        held.extend(os.open(os.devnull, os.O_RDONLY) for _ in range(HELD_DESCRIPTORS))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    """A moto server on 127.0.0.1 for a module's tests (moto_support.MotoServer): one, since
    stopping one takes half a second (its HTTP server polls for the shutdown) and its accounts
    are reset per test anyway (`moto_endpoint`)."""
    from moto_support import MotoServer

    server = MotoServer(free_port())
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def moto_endpoint(moto_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The moto server, and the environment that points Terraform's AWS provider (and boto3) at
    it, with providers read from the mirror only. moto keeps its accounts in this process,
    whichever server serves them: they are reset before and after each test, so no test sees
    another's instances, and a test destroys the service only where `destroy` is what it checks
    (each destroy costs the provider's termination waiter, about 14 s)."""
    import requests
    from moto_support import REGION
    from terraform_support import mirror_config

    rc = mirror_config(tmp_path, "aws")
    for name, value in {
        "TF_CLI_CONFIG_FILE": str(rc),
        "AWS_ENDPOINT_URL": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    reset = f"{moto_server}/moto-api/reset"
    requests.post(reset, timeout=30).raise_for_status()
    try:
        yield moto_server
    finally:
        requests.post(reset, timeout=30)
