"""The HTTP plumbing the vendor emulators share: routing, JSON, injected faults, a server on a free port.

Each vendor module (`emulator/runpod.py`, `emulator/replicate.py`) subclasses `JsonApi` and registers its
paths with `route`. Tests start one with `serve(api)` on 127.0.0.1 and point the SDK's base-URL variable at it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class ApiError(Exception):
    """Raised by a handler: becomes an error response in the vendor's error shape."""

    def __init__(self, status: int, detail: str, errors: list[str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors or []


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    body: object
    headers: dict[str, str]
    raw: bytes = b""
    query_all: dict[str, list[str]] = field(default_factory=dict)  # every value of a repeated query parameter


@dataclass
class Response:
    status: int = 200
    body: object = None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    stream: Iterator[bytes] | None = None  # for Server-Sent Events


@dataclass
class Fault:
    """An injected failure: the next `count` requests matching method/path get `status` (or hang `delay` s).

    `after_work`: the server does the work first, then the answer is lost: `status` replaces it, or, with
    status 0, the connection closes with no answer at all (a reset after the server accepted the request)."""

    status: int
    count: int = 1
    method: str | None = None
    path_prefix: str = ""
    delay: float = 0.0
    retry_after: str | None = None
    after_work: bool = False


Handler = Callable[[Request], Response | object]


class JsonApi:
    """Routes `(METHOD, /path/{param})` to handlers; records every request; injects faults on demand."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self._faults: list[Fault] = []
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []

    def route(self, method: str, template: str, handler: Handler) -> None:
        pattern = re.sub(r"\{(\w+):path\}", r"(?P<\1>.+)", template)  # {name:path}: may hold slashes
        pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern)
        self._routes.append((method, re.compile(f"^{pattern}$"), handler))

    def inject(self, fault: Fault) -> None:
        with self.lock:
            self._faults.append(fault)

    def error_body(self, status: int, detail: str, errors: list[str]) -> object:
        """The vendor's error shape; RunPod's (RFC 7807-like) by default, overridden per vendor."""
        titles = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 409: "Conflict",
                  422: "Unprocessable Entity", 429: "Too Many Requests", 500: "Internal Server Error",
                  503: "Service Unavailable"}
        body = {"title": titles.get(status, "Error"), "status": status, "detail": detail}
        if errors:
            body["errors"] = errors
        return body

    def authorize(self, request: Request) -> None:
        """Override to check credentials; raise ApiError(401) when they are missing."""

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self._faults:
                if (fault.method in (None, method)) and path.startswith(fault.path_prefix):
                    fault.count -= 1
                    if fault.count <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def dispatch(self, request: Request) -> Response:
        with self.lock:
            self.requests.append((request.method, request.path))
        fault = self._take_fault(request.method, request.path)
        if fault is not None and fault.after_work:
            self._handle(request)
            if fault.delay:
                time.sleep(fault.delay)
            return Response(fault.status, self.error_body(fault.status, "injected fault", []) if fault.status else None)
        if fault is not None:
            if fault.delay:
                time.sleep(fault.delay)
            if fault.status:
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                return Response(fault.status, self.error_body(fault.status, "injected fault", []), headers)
        return self._handle(request)

    def _handle(self, request: Request) -> Response:
        for method, pattern, handler in self._routes:
            match = pattern.match(request.path)
            if match and method == request.method:
                request.params = match.groupdict()
                try:
                    self.authorize(request)
                    result = handler(request)
                except ApiError as error:
                    return Response(error.status, self.error_body(error.status, error.detail, error.errors))
                return result if isinstance(result, Response) else Response(200, result)
        return Response(404, self.error_body(404, f"no route for {request.method} {request.path}", []))


def _make_handler(api: JsonApi) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def _handle(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body: object = None
            content_type = self.headers.get("Content-Type") or ""
            if raw and "json" in content_type and "ndjson" not in content_type:  # NDJSON stays in `raw`
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    self._send(Response(400, api.error_body(400, "body is not valid JSON", [])))
                    return
            request = Request(
                method=self.command,
                path=parts.path,
                params={},
                query={k: v[-1] for k, v in parse_qs(parts.query).items()},
                body=body,
                headers={k.lower(): v for k, v in self.headers.items()},
                raw=raw,
                query_all=parse_qs(parts.query),
            )
            self._send(api.dispatch(request))

        def _send(self, response: Response) -> None:
            if response.status == 0:  # a lost answer (Fault.after_work): close without a word
                self.close_connection = True
                return
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            if response.stream is not None:
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                for chunk in response.stream:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                self.close_connection = True
                return
            if isinstance(response.body, bytes):  # a file's content, as is
                payload = response.body
            else:
                payload = b"" if response.body is None else json.dumps(response.body).encode()
            if response.status >= 400 and response.content_type == "application/json":
                response.content_type = "application/problem+json"
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if payload and self.command != "HEAD":
                self.wfile.write(payload)

        do_HEAD = do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle

    return _Handler


@contextmanager
def serve(api: JsonApi, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `api` on a free port in a background thread; yields its base URL."""
    server = ThreadingHTTPServer((host, port), _make_handler(api))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="emulator", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
