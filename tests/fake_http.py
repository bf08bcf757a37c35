"""A local HTTP server answering GETs (and, for `json_methods_server`, DELETEs) with JSON: the
shape of Google's REST APIs in tests (Compute's zone operations and instances, a serial port),
on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

#: handle(path, query) -> (HTTP status, JSON body)
Handle = Callable[[str, dict[str, list[str]]], tuple[int, Any]]
#: handle(method, path, query) -> (HTTP status, JSON body)
MethodHandle = Callable[[str, str, dict[str, list[str]]], tuple[int, Any]]


@contextlib.contextmanager
def json_server(handle: Handle, *, indent: int | None = None) -> Iterator[str]:
    """Serve `handle`'s answers to GETs until the block ends; yields `http://127.0.0.1:PORT`.
    `indent`: pretty-printed replies (Google's are)."""
    with json_methods_server(lambda _method, path, query: handle(path, query), indent=indent) as base:
        yield base


@contextlib.contextmanager
def json_methods_server(handle: MethodHandle, *, indent: int | None = None) -> Iterator[str]:
    """As `json_server`, for GET and DELETE, `handle` told which."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.answer("GET")

        def do_DELETE(self):  # noqa: N802
            self.answer("DELETE")

        def answer(self, method: str) -> None:
            url = urlsplit(self.path)
            code, body = handle(method, url.path, parse_qs(url.query))
            data = json.dumps(body, indent=indent).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
