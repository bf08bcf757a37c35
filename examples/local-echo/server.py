#!/usr/bin/env python3
"""local-echo: a tiny OpenAI-compatible model server, standard library only.

It is what skyhedge's `local` cloud runs on each replica, so the whole loop (Terraform launches,
readiness probes, nginx routing, drains, preemptions) can be exercised on one machine with a real
OpenAI client. The "model" is a word-level Markov chain (order 2, backing off to order 1) over the
bundled `corpus.txt`; the same prompt, seed and parameters always give the same text.

Endpoints:
    POST /v1/completions   OpenAI completions; `stream: true` sends SSE `data: {...}` chunks and
                           ends with `data: [DONE]`
    GET  /v1/models        the one model served
    GET  /health           200 {"status": "ok", "replica_id": ...}; 503 while loading or stopping

Environment: PORT (default 8000), HOST (default 127.0.0.1; use 0.0.0.0 on a cloud VM),
SKYHEDGE_REPLICA_ID (reported by /health and in the X-Replica-Id header of every response),
ECHO_MODEL_NAME (default "local-echo"), ECHO_MODEL_SEED (default seed, 0),
ECHO_TOKEN_DELAY (seconds per generated token, default 0: simulates a slow model),
ECHO_STARTUP_DELAY (seconds /health answers 503 "loading", default 0),
ECHO_DRAIN_SECONDS (on SIGTERM, how long in-flight requests may finish, default 10),
ECHO_ACCESS_LOG (1 to log every request to stderr; a line the disk refuses is dropped).

SIGTERM/SIGINT: stop accepting, let in-flight requests finish (bounded), exit 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).resolve().parent / "corpus.txt"
TOKEN_RE = re.compile(r"[A-Za-z0-9']+|[.,;:!?]")
PUNCT = set(".,;:!?")
MAX_TOKENS_LIMIT = 4096


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        sys.exit(f"local-echo: {name} must be a number, got {os.environ[name]!r}")


def say(line: str) -> None:
    """A line on stderr, or none where it cannot be written (its disk full): a lost log line must
    not stop the server, nor make a clean stop exit non-zero."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)


def tokenize(text: str) -> list[str]:
    return TOKEN_RE.findall(text)


class MarkovModel:
    """Order-2 word chain with order-1 back-off; sentence starts seed prompts it does not know."""

    def __init__(self, text: str) -> None:
        tokens = tokenize(text)
        if len(tokens) < 3:
            raise ValueError("corpus too small")
        self.order2: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        self.order1: dict[str, Counter[str]] = defaultdict(Counter)
        self.starts: list[tuple[str, str]] = []
        for i in range(len(tokens) - 2):
            a, b, c = tokens[i], tokens[i + 1], tokens[i + 2]
            self.order2[(a.lower(), b.lower())][c] += 1
            self.order1[b.lower()][c] += 1
            if a == "." and b not in PUNCT:
                self.starts.append((a, b))
        self.order1[tokens[0].lower()][tokens[1]] += 1
        self.starts = sorted(set(self.starts)) or [(tokens[0], tokens[1])]

    def _next(self, state: tuple[str, str], rng: random.Random, temperature: float) -> str | None:
        counts = self.order2.get((state[0].lower(), state[1].lower())) or self.order1.get(state[1].lower())
        if not counts:
            return None
        words = sorted(counts)
        if temperature <= 0:
            return max(words, key=lambda w: (counts[w], w))
        weights = [counts[w] ** (1.0 / temperature) for w in words]
        return rng.choices(words, weights)[0]

    def generate(self, prompt: str, *, max_tokens: int, seed: int, temperature: float) -> list[str]:
        """Token texts as they would be streamed (each carries its own leading space). Greedy
        (temperature 0) is one text per prompt, whatever the seed: the restarts from a sentence
        start that an unknown word needs are then drawn as if the seed were 0, so `n` choices and
        every request agree, as they do with a real model at temperature 0."""
        rng = random.Random(f"{0 if temperature <= 0 else seed}\x00{prompt}")
        known = tokenize(prompt)
        if len(known) >= 2:
            state = (known[-2], known[-1])
        elif known:
            state = ("", known[-1])  # order 2 misses, order 1 answers
        else:
            state = rng.choice(self.starts)
        out: list[str] = []
        while len(out) < max_tokens:
            word = self._next(state, rng, temperature)
            if word is None:
                state = rng.choice(self.starts)
                continue
            spacer = "" if word in PUNCT else " "
            out.append(spacer + word)
            state = (state[1], word)
        return out


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _stop_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(s, str) for s in value) and len(value) <= 4:
        return [s for s in value if s]
    raise BadRequest("stop must be a string or a list of at most 4 strings", "stop")


def _int_param(body: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"{name} must be an integer in [{lo}, {hi}]", name)
    return value


def _apply_stop(tokens: list[str], stops: list[str], max_tokens: int) -> tuple[list[str], str]:
    """Cut the token list where a stop sequence begins; the stop text itself is not returned."""
    text = ""
    for i, tok in enumerate(tokens):
        combined = text + tok
        cut = min((combined.find(s) for s in stops if s in combined), default=-1)
        if cut >= 0:
            head = combined[:cut][len(text) :]
            return tokens[:i] + ([head] if head else []), "stop"
        text = combined
    return tokens, "length" if len(tokens) >= max_tokens else "stop"


class EchoServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], model: MarkovModel) -> None:
        super().__init__(address, EchoHandler)
        self.model = model
        self.model_name = os.environ.get("ECHO_MODEL_NAME", "local-echo")
        self.default_seed = int(_env_float("ECHO_MODEL_SEED", 0))
        self.token_delay = _env_float("ECHO_TOKEN_DELAY", 0.0)
        self.replica_id = os.environ.get("SKYHEDGE_REPLICA_ID") or None
        self.started = time.time()
        self.ready_at = self.started + _env_float("ECHO_STARTUP_DELAY", 0.0)
        self.access_log = os.environ.get("ECHO_ACCESS_LOG") == "1"
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._idle = threading.Condition(self._lock)

    def enter(self) -> None:
        with self._lock:
            self._in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout=timeout)


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: EchoServer
    server_version = "local-echo/1"

    # -- plumbing -----------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        if self.server.access_log:
            # stderr is the replica's log on the state dir's disk: on a full disk the write raised
            # and every request went unanswered, for a log line
            with contextlib.suppress(OSError):
                super().log_message(format, *args)

    def _common_headers(self) -> None:
        if self.server.replica_id:
            self.send_header("X-Replica-Id", self.server.replica_id)
        if self.server.stopping.is_set():
            self.close_connection = True
            self.send_header("Connection", "close")

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self._common_headers()
        self.end_headers()
        self.wfile.write(body)

    def _error(
        self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error"
    ) -> None:
        self._json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    def _read_json(self) -> dict[str, Any]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise BadRequest("chunked request bodies are not supported; send Content-Length")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    def _dispatch(self, routes: dict[str, Any]) -> None:
        self.server.enter()
        try:
            handler = routes.get(self.path.split("?", 1)[0])
            if handler is None:
                if self.command == "POST":
                    self._drain_body()
                self._error(404, f"no route {self.command} {self.path}", kind="not_found")
                return
            handler()
        except BadRequest as exc:
            self._error(400, str(exc), param=exc.param)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self.server.leave()

    def _drain_body(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)

    def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
        self._dispatch({"/health": self._health, "/v1/models": self._models})

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch({"/v1/completions": self._completions})

    # -- endpoints ----------------------------------------------------------------------------

    def _health(self) -> None:
        srv = self.server
        status = "ok"
        if srv.stopping.is_set():
            status = "shutting_down"
        elif time.time() < srv.ready_at:
            status = "loading"
        self._json(
            200 if status == "ok" else 503,
            {
                "status": status,
                "replica_id": srv.replica_id,
                "model": srv.model_name,
                "uptime_seconds": round(time.time() - srv.started, 3),
            },
        )

    def _models(self) -> None:
        srv = self.server
        model = {"id": srv.model_name, "object": "model", "created": int(srv.started), "owned_by": "skyhedge"}
        self._json(200, {"object": "list", "data": [model]})

    def _completions(self) -> None:
        srv = self.server
        body = self._read_json()
        prompt = body.get("prompt", "")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise BadRequest("prompt must be a string or a non-empty list of strings", "prompt")
        max_tokens = _int_param(body, "max_tokens", 16, 0, MAX_TOKENS_LIMIT)
        n = _int_param(body, "n", 1, 1, 16)
        seed = _int_param(body, "seed", srv.default_seed, -(2**63), 2**63 - 1)
        temperature = body.get("temperature", 1.0)
        if temperature is None:
            temperature = 1.0
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not 0 <= temperature <= 2
        ):
            raise BadRequest("temperature must be a number in [0, 2]", "temperature")
        stops = _stop_list(body.get("stop"))
        echo = bool(body.get("echo", False))

        choices: list[tuple[int, str, list[str], str]] = []  # index, prefix, tokens, finish_reason
        for p_index, text in enumerate(prompts):
            for k in range(n):
                tokens = srv.model.generate(
                    text, max_tokens=max_tokens, seed=seed + k, temperature=float(temperature)
                )
                tokens, finish = _apply_stop(tokens, stops, max_tokens)
                choices.append((p_index * n + k, text if echo else "", tokens, finish))
        usage = {
            "prompt_tokens": sum(len(tokenize(p)) for p in prompts),
            "completion_tokens": sum(len(c[2]) for c in choices),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        base = {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": srv.model_name,
        }
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            self._stream(base, choices, usage if include_usage else None)
            return
        if srv.token_delay:
            time.sleep(srv.token_delay * max((len(c[2]) for c in choices), default=0))
        self._json(
            200,
            {
                **base,
                "choices": [
                    {
                        "text": prefix + "".join(tokens),
                        "index": index,
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                    for index, prefix, tokens, finish in choices
                ],
                "usage": usage,
            },
        )

    def _stream(
        self,
        base: dict[str, Any],
        choices: list[tuple[int, str, list[str], str]],
        usage: dict[str, int] | None,
    ) -> None:
        chunked = self.request_version == "HTTP/1.1"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
            self.send_header("Connection", "close")
        self._common_headers()
        self.end_headers()

        def send(data: str) -> None:
            raw = f"data: {data}\n\n".encode()
            self.wfile.write(b"%x\r\n%b\r\n" % (len(raw), raw) if chunked else raw)

        def chunk(index: int, text: str, finish: str | None) -> str:
            choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
            return json.dumps({**base, "choices": [choice]})

        for index, prefix, tokens, finish in choices:
            if prefix:
                send(chunk(index, prefix, None))
            for tok in tokens:
                if self.server.token_delay:
                    time.sleep(self.server.token_delay)
                send(chunk(index, tok, None))
            send(chunk(index, "", finish))
        if usage is not None:
            send(json.dumps({**base, "choices": [], "usage": usage}))
        send("[DONE]")
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


def main() -> int:
    host = os.environ.get("HOST", "127.0.0.1")
    try:
        port = int(os.environ.get("PORT", "8000"))
    except ValueError:
        print(f"local-echo: PORT must be an integer, got {os.environ['PORT']!r}", file=sys.stderr)
        return 2
    model = MarkovModel(CORPUS.read_text(encoding="utf-8"))
    httpd = EchoServer((host, port), model)
    drain_seconds = _env_float("ECHO_DRAIN_SECONDS", 10.0)

    def stop(signum: int, _frame: Any) -> None:
        if not httpd.stopping.is_set():
            httpd.stopping.set()
            # shutdown() waits for serve_forever() to return, so it cannot run on the serving thread.
            threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    say(
        f"local-echo: serving {httpd.model_name} on http://{host}:{port} "
        f"(replica {httpd.replica_id or '-'}, pid {os.getpid()})"
    )
    httpd.serve_forever(poll_interval=0.2)
    httpd.socket.close()  # refuse new connections at once while in-flight requests finish
    finished = httpd.wait_idle(drain_seconds)
    httpd.server_close()
    say(f"local-echo: stopped ({'drained' if finished else 'drain timed out'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
