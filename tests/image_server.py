"""A small real HTTP image server for tests: a thread on a free port of 127.0.0.1, with a request log.

Each path answers one scripted `Reply` (a PNG, a redirect, an HTML page, a body too big, a body that stalls, ...);
any other path is a 404. Every request is logged (method, path, Host header) as it arrives, so a test can show
which downloads the service made, and that none was made.
"""

from __future__ import annotations

import contextlib
import struct
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self


def png_bytes() -> bytes:
    """A real 1x1 RGBA PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00\xff")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@dataclass(frozen=True)
class Reply:
    """What one path answers."""

    body: bytes = b""
    status: int = 200
    content_type: str | None = "image/png"
    location: str | None = None  # a redirect's target
    sized: bool = True  # send Content-Length (else the body ends when the connection closes)
    stall_after: int | None = None  # send this many body bytes, then nothing until the server stops


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    host: str | None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection, closed after the reply
    server: _Server

    def do_GET(self) -> None:
        self.server.record(Request("GET", self.path, self.headers.get("Host")))
        reply = self.server.routes.get(self.path, Reply(b"not found", status=404, content_type="text/plain"))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the service gave up on the download
            self._send(reply)

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        if reply.content_type is not None:
            self.send_header("Content-Type", reply.content_type)
        if reply.location is not None:
            self.send_header("Location", reply.location)
        if reply.sized:
            self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if reply.stall_after is None:
            self.wfile.write(reply.body)
            return
        self.wfile.write(reply.body[: reply.stall_after])
        self.wfile.flush()
        self.server.stopping.wait()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is `ImageServer.requests()`


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, routes: Mapping[str, Reply]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes = dict(routes)
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._requests: list[Request] = []

    def record(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)

    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def forget(self) -> None:
        with self._lock:
            self._requests.clear()


class ImageServer:
    """Serves `routes` (path -> reply) on 127.0.0.1 from a background thread until `stop()`."""

    def __init__(self, routes: Mapping[str, Reply]) -> None:
        self._server = _Server(routes)
        self._thread = threading.Thread(target=self._server.serve_forever, name="image-server", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.stopping.set()  # releases the stalled replies
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def requests(self) -> list[Request]:
        """Every request received since the last `reset()`, in arrival order."""
        return self._server.requests()

    def paths(self) -> list[str]:
        return [r.path for r in self.requests()]

    def reset(self) -> None:
        self._server.forget()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
