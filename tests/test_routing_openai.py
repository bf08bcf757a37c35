"""A real OpenAI client talks to the local-echo replicas through nginx, streamed and not."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from routing_support import Fleet, free_port, make_spec, needs_nginx, teardown_router

from skyhedge.routing import Router

openai = pytest.importorskip("openai")

pytestmark = [needs_nginx, pytest.mark.timeout(60)]


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[str]:
    fleet = Fleet(tmp_path)
    router = Router(make_spec(free_port()), tmp_path / "state")
    try:
        fleet.start(2, env={"ECHO_TOKEN_DELAY": "0.005"})
        router.up(fleet.upstreams())
        yield router.endpoint
    finally:
        teardown_router(router)
        fleet.close()


def client(endpoint: str):
    return openai.OpenAI(base_url=f"{endpoint}/v1", api_key="dummy", max_retries=0, timeout=20)


def test_openai_completions_through_the_router(endpoint):
    api = client(endpoint)
    assert [m.id for m in api.models.list().data] == ["local-echo"]

    first = api.completions.create(model="local-echo", prompt="The keeper", max_tokens=12, seed=5)
    again = api.completions.create(model="local-echo", prompt="The keeper", max_tokens=12, seed=5)
    assert first.object == "text_completion" and first.model == "local-echo"
    assert first.choices[0].text.strip() and first.choices[0].finish_reason == "length"
    assert first.usage is not None and first.usage.completion_tokens == 12 and first.usage.prompt_tokens == 2
    # Deterministic given the seed, whichever replica answers.
    assert {
        api.completions.create(model="local-echo", prompt="The keeper", max_tokens=12, seed=5).choices[0].text
        for _ in range(4)
    } == {first.choices[0].text}
    assert again.choices[0].text == first.choices[0].text


def test_openai_streaming_through_the_router(endpoint):
    api = client(endpoint)
    plain = api.completions.create(model="local-echo", prompt="The sea", max_tokens=20, seed=2)
    stream = api.completions.create(
        model="local-echo",
        prompt="The sea",
        max_tokens=20,
        seed=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    finish = None
    usage = None
    arrivals: list[float] = []
    for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.text)
            finish = choice.finish_reason or finish
    assert len([p for p in pieces if p]) == 20
    # Chunks reach the client as they are generated (5 ms apart), not all at the end.
    assert arrivals[-1] - arrivals[0] > 0.05
    assert "".join(pieces) == plain.choices[0].text
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 20


def test_openai_client_sees_api_errors_from_the_replica(endpoint):
    api = client(endpoint)
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model="local-echo", prompt="x", max_tokens=-1)


def test_openai_clients_see_no_failure_across_reloads_and_a_drained_scale_down(tmp_path):
    """Keep-alive clients: nginx closes old workers' idle connections on reload; the SDK retries those."""
    fleet = Fleet(tmp_path)
    router = Router(make_spec(free_port()), tmp_path / "state")
    errors: list[str] = []
    served: list[str] = []
    stop = threading.Event()

    def loop() -> None:
        # The SDK's default retries (2) are what a real client has; they cover the closed connections.
        api = openai.OpenAI(base_url=f"{router.endpoint}/v1", api_key="dummy", timeout=20)
        while not stop.is_set():
            try:
                api.completions.create(model="local-echo", prompt="The keeper", max_tokens=3)
                served.append("ok")
            except openai.OpenAIError as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(2)]
    try:
        replicas = fleet.start(3)
        router.up(fleet.upstreams())
        for t in threads:
            t.start()
        for i in range(6):
            time.sleep(0.05)
            router.reload([r.upstream for r in replicas[: 2 + i % 2]])
        router.reload(fleet.upstreams())
        assert router.drain([r.upstream for r in replicas[:2]], timeout=10) is True
        fleet.kill(replicas[2].id, signal.SIGTERM)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=20)
        teardown_router(router)
        fleet.close()
    assert errors == []
    assert len(served) > 50
