"""httpx's own transport, over connections that remember their socket.

Before each request and after each answer, httpcore asks every pooled connection whether the server has closed it
(``has_expired`` → ``get_extra_info("is_readable")``). Through anyio each question rebuilds a dict of socket
attributes and calls ``getpeername()``; with a dozen pooled connections that was 12% of the service's CPU while
draining a backlog (py-spy), and replacing it cut 19% of the CPU per request in a loop of 3,000 PATCHes ten at a
time (tests/integration/test_hot_path.py checks the transport is in place). The streams here look the socket up
once per connection and delegate everything else to httpcore's anyio backend, so requests, TLS, timeouts and
errors are exactly httpx's.

The pool's bookkeeping, run twice per request (``_assign_requests_to_connections``), asks every connection whether
it is idle once per idle connection: with the dozen pooled connections that was about 350 calls per request, a
third of httpcore's CPU under cProfile. ``_Pool`` makes the same decisions in one pass (see its docstring).

httpx builds the connection pool itself and offers no setting for its network backend, so ``fast_transport``
replaces the pool of an ``httpx.AsyncHTTPTransport`` it has just made. When that is not possible (a future httpx
without ``_pool``) or would change behaviour (an HTTP(S) proxy in the environment, which httpx honours only for its
default transport), it returns None and the client keeps httpx's default.
"""

from __future__ import annotations

import select
import socket
import urllib.request
from typing import Any

import httpcore
import httpx
from httpcore import AnyIOBackend

__all__ = ["fast_transport", "pool_of"]


def _readable(sock: socket.socket | None) -> bool:
    """Whether the peer has sent something or closed: httpcore's test that an idle connection is still usable."""
    fd = -1 if sock is None else sock.fileno()
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class _Stream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._socket: socket.socket | None = inner.get_extra_info("socket")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.start_tls(*args, **kwargs))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            return _readable(self._socket)
        if info == "socket":
            return self._socket
        return self._inner.get_extra_info(info)


class _Backend(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self._inner = AnyIOBackend()

    async def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.connect_tcp(*args, **kwargs))

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.connect_unix_socket(*args, **kwargs))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _Pool(httpcore.AsyncConnectionPool):
    """httpcore 1.0's pool with its ``_assign_requests_to_connections`` in one pass, decision for decision:

    - its surplus-idle test is ``len([c.is_idle() for c in connections]) > max_keepalive``, i.e. the number of
      connections, not of idle ones, built again for every idle connection: here ``len(connections)`` once per
      connection, which is the same number (``is_idle`` only reads state);
    - for each queued request it builds the whole list of available and of idle connections and takes the first:
      here the first found, and the idle one only when it is needed, which is the same connection.

    ``fast_transport`` uses it only on httpcore 1.0.x, the version it was checked against (_OWN_ASSIGN_VERSIONS).
    """

    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        closing: list[httpcore.AsyncConnectionInterface] = []
        for connection in list(self._connections):
            if connection.is_closed():
                self._connections.remove(connection)
            elif connection.has_expired():
                self._connections.remove(connection)
                closing.append(connection)
            elif connection.is_idle() and len(self._connections) > self._max_keepalive_connections:
                self._connections.remove(connection)
                closing.append(connection)
        for pool_request in [request for request in self._requests if request.is_queued()]:
            origin = pool_request.request.url.origin
            available = next((c for c in self._connections if c.can_handle_request(origin) and c.is_available()), None)
            if available is not None:
                pool_request.assign_to_connection(available)
            elif len(self._connections) < self._max_connections:
                connection = self.create_connection(origin)
                self._connections.append(connection)
                pool_request.assign_to_connection(connection)
            else:
                idle = next((c for c in self._connections if c.is_idle()), None)
                if idle is not None:
                    self._connections.remove(idle)
                    closing.append(idle)
                    connection = self.create_connection(origin)
                    self._connections.append(connection)
                    pool_request.assign_to_connection(connection)
        return closing


# httpcore versions whose _assign_requests_to_connections _Pool was checked against, line by line.
_OWN_ASSIGN_VERSIONS = ("1.0.",)


def fast_transport(limits: httpx.Limits) -> httpx.AsyncHTTPTransport | None:
    """An ``httpx.AsyncHTTPTransport`` with ``limits`` whose connections remember their socket, or None where
    httpx's default transport must stay (see the module's docstring)."""
    proxies = urllib.request.getproxies()
    if proxies.get("http") or proxies.get("https") or proxies.get("all"):
        return None
    ssl_context = httpx.create_ssl_context()  # one for both pools: loading the CA bundle is slow
    transport = httpx.AsyncHTTPTransport(verify=ssl_context, limits=limits)
    if not isinstance(getattr(transport, "_pool", None), httpcore.AsyncConnectionPool):
        return None
    own_assign = httpcore.__version__.startswith(_OWN_ASSIGN_VERSIONS)
    transport._pool = (_Pool if own_assign else httpcore.AsyncConnectionPool)(
        ssl_context=ssl_context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=_Backend(),
    )
    return transport


def pool_of(transport: httpx.AsyncHTTPTransport | None) -> httpcore.AsyncConnectionPool | None:
    """The connection pool of a transport ``fast_transport`` made, for the one request that goes to httpcore
    directly (``DynamicsClient._patch``); None for any other transport."""
    pool = getattr(transport, "_pool", None)
    if isinstance(pool, httpcore.AsyncConnectionPool) and isinstance(pool._network_backend, _Backend):
        return pool
    return None
