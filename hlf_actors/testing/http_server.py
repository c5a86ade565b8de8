"""The plumbing every local fake shares: a threaded server on 127.0.0.1 that a test starts, stops and restarts.

Why it exists: the fakes in ``testing/`` (the portal, FCM, the OIDC provider, the Teams webhook, the SMTP relay, the
Power Pages site) are real servers, each serving from a daemon thread, so that the code under test meets real
sockets. What differs between them is what they answer; how they bind, serve, stop, come back on the same port and
let go of kept-alive connections is the same, and lives here once:

    Running             ``with`` calls start() and stop(); PgBouncer (a child process, not a thread) uses just this
    LocalServer         start() binds (``_bind``) and serves from a daemon thread; a start() after stop() comes back
                        on the same port; stop() shuts down, severs the connections handlers tracked, joins the
                        thread; ``with`` does both. ``_lock`` is there for the fake's own shared state too.
    FakeHTTPServer[F]   a ThreadingHTTPServer with daemon handler threads, no FQDN lookup, and ``fake`` (an F)
    FakeHandler[F]      HTTP/1.1, silent, ``_body()`` reads the request body and ``_reply()`` writes a whole answer;
                        ``track_connections = True`` registers each connection with the fake so stop() can cut it
    free_port()         a port nothing listens on right now, for a server the test starts itself (the console)
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar, Generic, Self, TypeVar

__all__ = ["FakeHTTPServer", "FakeHandler", "LocalServer", "Running", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Running:
    """Something a test starts and must stop again: ``with`` does both, whatever happens in the block."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class LocalServer(Running):
    """A server of a fake's: ``_bind`` makes it, this class runs it. Subclasses name their thread with ``_name``."""

    _name: ClassVar[str] = "fake-server"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._server: socketserver.TCPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    def _bind(self) -> socketserver.TCPServer:
        """A new server bound to (self._host, self._port), not yet serving."""
        raise NotImplementedError

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> Self:
        if self._server is not None:
            return self
        server = self._bind()
        self._server = server
        self._port = int(server.server_address[1])  # a start() after stop() comes back on the same port
        # A short poll interval makes stop() prompt; serve_forever checks for shutdown only between polls.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.01}, name=f"{self._name}:{self._port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every tracked connection, so kept-alive clients see the server go away too."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join(timeout=5)

    # -- connections (handler threads) ---------------------------------------------------------------------

    def _track(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)

    def _untrack(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)


F = TypeVar("F", bound=LocalServer)


class FakeHTTPServer(ThreadingHTTPServer, Generic[F]):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for keep-alive connections that clients never close

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], fake: F) -> None:
        self.fake = fake
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall on DNS; only the port matters here.
        socketserver.TCPServer.server_bind(self)
        host, port = self.socket.getsockname()[:2]
        self.server_name, self.server_port = str(host), int(port)


class FakeHandler(BaseHTTPRequestHandler, Generic[F]):
    protocol_version = "HTTP/1.1"
    track_connections: ClassVar[bool] = False
    server: FakeHTTPServer[F]

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: test output is for assertions, not access logs."""

    def setup(self) -> None:
        super().setup()
        if self.track_connections:
            self.server.fake._track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self.track_connections:
                self.server.fake._untrack(self.connection)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
