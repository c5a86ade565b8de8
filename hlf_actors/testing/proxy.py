"""A TCP proxy between the service and PostgreSQL that a test can cut, to make the database "go away" for real.

``sever()`` closes every open connection at once (the service sees a dead socket, as when a database restarts or
a network drops); ``refuse(True)`` makes new connections fail until ``refuse(False)``; ``freeze()`` stops moving
bytes in both directions without closing anything (a peer that went silent: nothing answers, nothing is reset)
until ``thaw()``. Threads, standard library.

A frozen proxy is silent only to the programs on either side: its own kernel still acknowledges every segment and
keepalive probe, so TCP keepalives and ``tcp_user_timeout`` never fire against it. To make a host vanish at the
TCP level, drop the packets of the proxy's ports in the kernel as well; ``upstream_source_ports`` binds the proxy's
connections to the database to known ports so that a rule can single them out (``scripts/chaos.py`` does this in a
private network namespace).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
from collections.abc import Sequence
from typing import Self

__all__ = ["TcpProxy"]


class TcpProxy:
    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        port: int = 0,
        upstream_source_ports: Sequence[int] = (),
    ) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server = socket.create_server(("127.0.0.1", port))
        self.port: int = self._server.getsockname()[1]
        self._source_ports = tuple(upstream_source_ports)
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._refusing = False
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_forever, name="tcp-proxy", daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def refuse(self, refusing: bool) -> None:
        with self._lock:
            self._refusing = refusing

    def freeze(self) -> None:
        """Stop forwarding in both directions, closing nothing: bytes already read are held, the rest wait in the
        kernel's buffers, and new connections are accepted but not connected upstream until ``thaw()``."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Forward again, held bytes first."""
        self._flowing.set()

    @property
    def frozen(self) -> bool:
        return not self._flowing.is_set()

    def sever(self) -> int:
        """Cut every connection now; returns how many sockets were cut."""
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        return len(sockets)

    def close(self) -> None:
        self._closed = True
        self._server.close()
        self.sever()
        self._flowing.set()  # frozen threads wake up, find their sockets closed and end

    def _accept_forever(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                refusing = self._refusing
                if not refusing:
                    self._open.add(client)
            if refusing:
                client.close()
                continue
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._flowing.wait()
        try:
            upstream = self._connect_upstream()
        except OSError:
            self._discard(client)
            client.close()
            return
        with self._lock:
            if client not in self._open:  # severed while it waited
                upstream.close()
                return
            self._open.add(upstream)
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _connect_upstream(self) -> socket.socket:
        host, port = self._upstream
        if host.startswith("/"):  # a Unix-socket directory, as libpq understands it
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(f"{host}/.s.PGSQL.{port}")
            return sock
        if not self._source_ports:
            sock = socket.create_connection((host, port), timeout=5)
            sock.settimeout(None)
            return sock
        for source_port in self._source_ports:
            try:
                sock = socket.create_connection((host, port), timeout=5, source_address=("127.0.0.1", source_port))
            except OSError as err:
                if err.errno == errno.EADDRINUSE:  # a connection of ours still holds it (or its TIME_WAIT): next
                    continue
                raise
            sock.settimeout(None)
            return sock
        raise OSError(f"every upstream source port in {self._source_ports[0]}..{self._source_ports[-1]} is in use")

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                self._flowing.wait()
                chunk = src.recv(65536)
                if not chunk:
                    break
                self._flowing.wait()  # a chunk read just before a freeze is held, not delivered
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._discard(src, dst)

    def _discard(self, *sockets: socket.socket) -> None:
        with self._lock:
            for sock in sockets:
                self._open.discard(sock)
