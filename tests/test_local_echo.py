"""examples/local-echo/server.py: the OpenAI-compatible model server the local replicas run."""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from routing_support import ECHO, free_port, request, wait_healthy

pytestmark = pytest.mark.timeout(60)


def load_module():
    spec = importlib.util.spec_from_file_location("local_echo_server", ECHO)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., tuple[str, subprocess.Popen[bytes]]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def _start(
        wait: bool = True, output: str | None = None, **env: str
    ) -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        log = open(output or tmp_path / f"echo-{port}.log", "wb")  # noqa: SIM115
        with log:
            proc = subprocess.Popen(
                [sys.executable, str(ECHO)],
                env={**os.environ, "PORT": str(port), **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        if wait:
            wait_healthy(base, proc=proc)
        return base, proc

    try:
        yield _start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def post(base: str, body: dict[str, object]):
    return request(base, "POST", "/v1/completions", body)


def sse_events(raw: bytes) -> list[str]:
    return [line[len("data: ") :] for line in raw.decode().split("\n\n") if line.startswith("data: ")]


def test_health_models_and_replica_id(start):
    base, _ = start(SKYHEDGE_REPLICA_ID="r-0042")
    health = request(base, "GET", "/health")
    assert health.status == 200
    assert health.json()["status"] == "ok" and health.json()["replica_id"] == "r-0042"
    assert health.headers["x-replica-id"] == "r-0042"
    models = request(base, "GET", "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["local-echo"]
    assert request(base, "GET", "/nope").status == 404


def test_completion_shape_and_determinism(start):
    base, _ = start(ECHO_MODEL_SEED="7")
    body = {"model": "local-echo", "prompt": "The keeper", "max_tokens": 10}
    first = post(base, body).json()
    assert first["object"] == "text_completion" and first["id"].startswith("cmpl-")
    (choice,) = first["choices"]
    assert choice["finish_reason"] == "length" and choice["index"] == 0 and choice["text"].startswith(" ")
    assert first["usage"] == {"prompt_tokens": 2, "completion_tokens": 10, "total_tokens": 12}
    assert post(base, body).json()["choices"][0]["text"] == choice["text"]  # ECHO_MODEL_SEED default
    texts = {post(base, {**body, "seed": s}).json()["choices"][0]["text"] for s in range(6)}
    assert len(texts) > 1  # the seed matters
    assert (
        post(base, {**body, "seed": 3}).json()["choices"][0]["text"]
        == post(base, {**body, "seed": 3}).json()["choices"][0]["text"]
    )


def test_stream_is_sse_and_matches_the_plain_answer(start):
    base, _ = start()
    body = {"prompt": "The sea", "max_tokens": 8, "seed": 1}
    plain = post(base, body).json()["choices"][0]["text"]
    streamed = post(base, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.status == 200 and streamed.headers["content-type"] == "text/event-stream"
    events = sse_events(streamed.body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(texts) == plain
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


def test_stop_echo_n_and_list_prompts(start):
    base, _ = start()
    greedy = post(base, {"prompt": "The keeper", "max_tokens": 6, "temperature": 0}).json()
    assert greedy["choices"][0]["text"] == " watched the sky and the keeper"
    out = post(
        base, {"prompt": "The keeper", "max_tokens": 6, "temperature": 0, "stop": [" sky", "."]}
    ).json()
    assert out["choices"][0] == {
        "text": " watched the",
        "index": 0,
        "logprobs": None,
        "finish_reason": "stop",
    }
    echoed = post(base, {"prompt": "The keeper", "max_tokens": 2, "echo": True}).json()
    assert echoed["choices"][0]["text"].startswith("The keeper ")
    many = post(base, {"prompt": ["The sea", "The light"], "max_tokens": 3, "n": 2}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    assert post(base, {"prompt": "x", "max_tokens": 0}).json()["choices"][0]["text"] == ""


BAD_BODIES = [
    {"prompt": 5},
    {"prompt": []},
    {"prompt": "x", "max_tokens": -1},
    {"prompt": "x", "n": 0},
    {"prompt": "x", "temperature": 9},
    {"prompt": "x", "stop": 3},
    {"prompt": "x", "max_tokens": "5"},
]


def test_bad_requests_are_400_with_openai_error_shape(start):
    base, _ = start()
    for body in BAD_BODIES:
        resp = post(base, body)
        assert resp.status == 400 and resp.json()["error"]["type"] == "invalid_request_error", body


def test_invalid_json_is_400(start):
    base, _ = start()
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request("POST", "/v1/completions", body=b"{nope", headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 400 and "not valid JSON" in json.loads(resp.read())["error"]["message"]
    # The connection stays usable (HTTP/1.1 keep-alive, body fully read).
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()


def test_startup_delay_reports_loading_then_ok(start):
    base, proc = start(wait=False, ECHO_STARTUP_DELAY="0.6")
    deadline = time.monotonic() + 5
    while True:
        try:
            first = request(base, "GET", "/health", timeout=1)
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
    assert first.status == 503 and first.json()["status"] == "loading"
    wait_healthy(base, proc=proc)


def test_sigterm_lets_in_flight_requests_finish_then_exits_zero(start):
    base, proc = start(ECHO_TOKEN_DELAY="0.02")
    result: dict[str, object] = {}

    def slow() -> None:
        resp = post(base, {"prompt": "x", "max_tokens": 25, "stream": True})
        result["status"] = resp.status
        result["events"] = sse_events(resp.body)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.15)  # mid-stream
    proc.send_signal(signal.SIGTERM)
    t.join(timeout=10)
    assert proc.wait(timeout=10) == 0
    assert result["status"] == 200 and result["events"][-1] == "[DONE]"  # type: ignore[index]
    assert len(result["events"]) == 25 + 2  # type: ignore[arg-type]
    with pytest.raises(OSError):
        request(base, "GET", "/health", timeout=1)


def test_a_full_disk_under_its_log_costs_log_lines_never_answers(start):
    """A local replica's output goes to its log in the state dir. Once that disk was full, with
    ECHO_ACCESS_LOG=1 every request went unanswered (the access log line's write raised), and a
    server started there died at its first line (measured on the local example under a watcher:
    1373 of 1838 requests through the router answered 503 until space was freed)."""
    base, proc = start(output="/dev/full", ECHO_ACCESS_LOG="1")  # every write: ENOSPC
    assert post(base, {"prompt": "the", "max_tokens": 4}).status == 200
    assert request(base, "GET", "/health").status == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


def test_markov_model_is_deterministic_and_stays_in_vocabulary():
    mod = load_module()
    model = mod.MarkovModel(mod.CORPUS.read_text())
    a = model.generate("The keeper", max_tokens=30, seed=4, temperature=1.0)
    assert a == model.generate("The keeper", max_tokens=30, seed=4, temperature=1.0)
    assert len(a) == 30
    vocab = set(mod.tokenize(mod.CORPUS.read_text()))
    assert all(tok.strip() in vocab for tok in a)
    greedy = model.generate("unknown words here", max_tokens=5, seed=1, temperature=0)
    assert len(greedy) == 5
    assert model.generate("", max_tokens=3, seed=0, temperature=1.0)


def test_greedy_is_one_text_per_prompt_whatever_the_seed_or_choice(start):
    """temperature 0 is greedy (docs/routing.md): the `n` choices of one prompt, and requests with
    other seeds, all get the same text, also where the prompt ends in a word the corpus lacks."""
    base, _ = start()
    for prompt in ("The keeper", "b", "zzz unknown"):
        body = {"prompt": [prompt, prompt], "n": 3, "temperature": 0, "max_tokens": 12}
        texts = {c["text"] for c in post(base, body).json()["choices"]}
        texts |= {c["text"] for c in post(base, {**body, "seed": 99}).json()["choices"]}
        assert len(texts) == 1, (prompt, texts)
