"""The fake portal every system PATCHes: a small asyncio HTTP/1.1 server in its own process.

Why not ``hlf_actors.testing.fake_portal``: that one is a thread-per-connection server with scripted failures,
made for correctness tests; here the portal must cost as little CPU as possible (it shares two cores with the
system under test) and be the same for every system. It answers::

    POST .../token                       200 {"access_token": "bench", "expires_in": 3600}
    GET  .../WhoAmI                      200 {"UserId": ...}            (hlf_actors' credential check)
    GET  .../{set}?...                   200 {"value": []}              (a listing, should anyone read it)
    PATCH .../{set}({guid})              204 after --delay-ms; records (guid, time.monotonic()) on arrival
    GET  /_bench/count                   {"total": n}
    GET  /_bench/arrivals?from=k         {"total": n, "arrivals": [[guid, t], ...]}   arrivals k..n-1
    POST /_bench/reset?delay_ms=d        forget the arrivals, answer PATCHes after d ms from now on

Arrival times are ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for every process on a Linux machine) taken
as soon as the request's headers are read, so the bench can subtract them from the writer's commit times.

    python -m bench.peers.portal [--port 0]      prints "listening <port>" on stdout, serves until SIGTERM
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["PortalProcess"]

_ENTITY = re.compile(rb"\(([0-9a-fA-F-]{36})\)")
_TOKEN = json.dumps({"access_token": "bench", "token_type": "Bearer", "expires_in": 3600}).encode()
_WHOAMI = json.dumps(
    {
        "BusinessUnitId": "00000000-0000-4000-8000-000000000001",
        "UserId": "00000000-0000-4000-8000-000000000002",
        "OrganizationId": "00000000-0000-4000-8000-000000000003",
    }
).encode()
_EMPTY_LISTING = b'{"value": []}'
_MAX_HEADER = 64 * 1024


class _State:
    def __init__(self) -> None:
        self.arrivals: list[tuple[str, float]] = []
        self.delay_s = 0.0


def _response(status: int, body: bytes = b"", content_type: str = "application/json") -> bytes:
    reason = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found"}.get(status, "OK")
    head = f"HTTP/1.1 {status} {reason}\r\nOData-Version: 4.0\r\n"
    if status != 204:
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


_NO_CONTENT = _response(204)


async def _serve_connection(state: _State, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            except asyncio.LimitOverrunError:
                return
            arrived = time.monotonic()
            line_end = head.find(b"\r\n")
            parts = head[:line_end].split(b" ")
            if len(parts) < 3:
                return
            method, target = parts[0], parts[1]
            length = 0
            close = False
            for raw in head[line_end + 2 :].split(b"\r\n"):
                name, _, value = raw.partition(b":")
                lowered = name.strip().lower()
                if lowered == b"content-length":
                    length = int(value.strip() or b"0")
                elif lowered == b"connection" and value.strip().lower() == b"close":
                    close = True
            if length:
                try:
                    await reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the client died mid-request (the crash test kills it): nothing arrived
            writer.write(await _answer(state, method, target, arrived))
            if close:
                await writer.drain()
                return
    finally:
        writer.close()


async def _answer(state: _State, method: bytes, target: bytes, arrived: float) -> bytes:
    if method == b"PATCH":
        match = _ENTITY.search(target)
        if match is None:
            return _response(400, b'{"error": "no record id"}')
        state.arrivals.append((match.group(1).decode().lower(), arrived))
        if state.delay_s:
            await asyncio.sleep(state.delay_s)
        return _NO_CONTENT
    if target.startswith(b"/_bench/"):
        return _control(state, method, target.decode())
    if method == b"POST" and b"/token" in target:
        return _response(200, _TOKEN)
    if method == b"GET" and b"/WhoAmI" in target:
        return _response(200, _WHOAMI)
    if method == b"GET":
        return _response(200, _EMPTY_LISTING)
    return _response(404, b'{"error": "not found"}')


def _control(state: _State, method: bytes, target: str) -> bytes:
    url = urlsplit(target)
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    if url.path == "/_bench/count":
        return _response(200, json.dumps({"total": len(state.arrivals)}).encode())
    if url.path == "/_bench/arrivals":
        first = int(query.get("from", "0"))
        body = {"total": len(state.arrivals), "arrivals": state.arrivals[first:]}
        return _response(200, json.dumps(body).encode())
    if url.path == "/_bench/reset" and method == b"POST":
        state.arrivals = []
        state.delay_s = float(query.get("delay_ms", "0")) / 1000
        return _response(200, b"{}")
    return _response(404, b'{"error": "unknown control"}')


async def _main(port: int) -> None:
    state = _State()
    server = await asyncio.start_server(
        lambda r, w: _serve_connection(state, r, w), "127.0.0.1", port, limit=_MAX_HEADER, backlog=256
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sock_port = server.sockets[0].getsockname()[1]
    print(f"listening {sock_port}", flush=True)
    async with server:
        await stop.wait()


def _run() -> None:
    parser = argparse.ArgumentParser(description="the benchmark's fake portal")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop  # the portal should cost as little CPU as it can; uvloop comes with the bench's deps

        uvloop.run(_main(args.port))
    except ImportError:
        asyncio.run(_main(args.port))


class PortalProcess:
    """The portal as a child process, and the bench's handle on it (plain urllib: no event loop needed)."""

    entity_set = "hlf_mentorlistings"
    listed_field = "hlf_publiclisting"

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self) -> PortalProcess:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.peers.portal"], stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.startswith("listening "):
            self.close()
            raise RuntimeError(f"the fake portal did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> PortalProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def env(self) -> dict[str, str]:
        """The hlf_actors variables that point the service here."""
        return {
            "HLF_DYNAMICS_URL": self.url,
            "HLF_DYNAMICS_TOKEN_URL": f"{self.url}/tenant/oauth2/v2.0/token",
            "HLF_DYNAMICS_CLIENT_ID": "bench",
            "HLF_DYNAMICS_CLIENT_SECRET": "bench-secret",
            "HLF_DYNAMICS_ENTITY_SET": self.entity_set,
            "HLF_DYNAMICS_LISTED_FIELD": self.listed_field,
        }

    def reset(self, delay_ms: float) -> None:
        self._call("POST", f"/_bench/reset?delay_ms={delay_ms}")

    def count(self) -> int:
        return int(self._call("GET", "/_bench/count")["total"])

    def arrivals(self) -> list[tuple[str, float]]:
        body = self._call("GET", "/_bench/arrivals?from=0")
        return [(str(r), float(t)) for r, t in body["arrivals"]]

    def wait_count(self, count: int, timeout_s: float, poll_s: float = 0.02) -> bool:
        """Wait until at least ``count`` PATCHes have arrived since the last reset; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.count() < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(poll_s)
        return True

    def _call(self, method: str, path: str) -> Any:
        request = urllib.request.Request(self.url + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"{}")


if __name__ == "__main__":
    _run()
