"""A TCP proxy between the service and PostgreSQL that a test can cut, to make the database "go away" for real.

``sever()`` closes every open connection at once (the service sees a dead socket, as when a database restarts or
a network drops); ``refuse(True)`` makes new connections fail until ``refuse(False)``. Threads, standard library.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Self

__all__ = ["TcpProxy"]


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._refusing = False
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

    def _accept_forever(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                refusing = self._refusing
            if refusing:
                client.close()
                continue
            try:
                upstream = self._connect_upstream()
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _connect_upstream(self) -> socket.socket:
        host, port = self._upstream
        if host.startswith("/"):  # a Unix-socket directory, as libpq understands it
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(f"{host}/.s.PGSQL.{port}")
            return sock
        sock = socket.create_connection((host, port), timeout=5)
        sock.settimeout(None)
        return sock

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
