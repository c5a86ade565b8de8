"""A fake public website: the mentor listing a Power Pages site would serve, from the fake portal's records, late.

Power Pages shows a Dataverse change when its server-side cache refreshes. This site does the same: it copies the
fake portal's records every ``tick_s`` and serves, at any moment, the copy taken ``cache_delay_s`` ago
(``cache_delay_s=None``: the first copy, forever: a cache that never refreshes). It is a real HTTP server on
127.0.0.1 with ETag / If-None-Match (304), a request counter, and switches to be down (503) or answer garbage.

    with FakePortal() as portal, FakeWebsite(portal, cache_delay_s=2) as site:
        env = {**portal.env(), **site.env()}
"""

from __future__ import annotations

import hashlib
import html
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from .fake_portal import FakePortal

__all__ = ["FakeWebsite"]


class FakeWebsite:
    def __init__(self, portal: FakePortal, *, cache_delay_s: float | None = 0.0, tick_s: float = 0.05) -> None:
        self._portal = portal
        self.cache_delay_s = cache_delay_s
        self._tick_s = tick_s
        self.names: dict[str, str] = {}  # record id → the mentor's name, shown beside it
        self.down = False
        self.garbage = False
        self.requests = 0
        self.not_modified = 0
        self._lock = threading.Lock()
        self._copies: deque[tuple[float, dict[str, bool]]] = deque()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._threads = [
            threading.Thread(target=self._server.serve_forever, daemon=True),
            threading.Thread(target=self._copy_forever, daemon=True),
        ]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/mentors"

    def env(self) -> dict[str, str]:
        return {"HLF_PUBLIC_LISTING_URL": self.url}

    def __enter__(self) -> FakeWebsite:
        self._copy()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def page(self) -> str:
        """The listing as served now."""
        with self._lock:
            now = time.monotonic()
            if self.cache_delay_s is None:
                records = self._copies[0][1]
            else:
                records = self._copies[0][1]
                for taken_at, copy in self._copies:
                    if taken_at <= now - self.cache_delay_s:
                        records = copy
        items = "".join(
            f'<li data-record="{record_id}">{html.escape(self.names.get(record_id, ""))}</li>'
            for record_id, listed in sorted(records.items())
            if listed
        )
        return f"<!doctype html><html><body><h1>Our mentors</h1><ul>{items}</ul></body></html>"

    def _copy(self) -> None:
        copy = self._portal.records()
        with self._lock:
            now = time.monotonic()
            if not self._copies or self._copies[-1][1] != copy:
                self._copies.append((now, copy))
            horizon = now - (self.cache_delay_s or 0.0) - 1.0
            while self.cache_delay_s is not None and len(self._copies) > 1 and self._copies[1][0] < horizon:
                self._copies.popleft()

    def _copy_forever(self) -> None:
        while not self._stop.wait(self._tick_s):
            self._copy()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                site.requests += 1
                if site.down:
                    self._send(503, b"the site is down")
                    return
                if site.garbage:
                    self._send(200, b"\x00\xff not a listing \xfe")
                    return
                body = site.page().encode()
                etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
                if self.headers.get("If-None-Match") == etag:
                    site.not_modified += 1
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._send(200, body, etag=etag)

            def _send(self, status: int, body: bytes, *, etag: str | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                if etag:
                    self.send_header("ETag", etag)
                self.end_headers()
                self.wfile.write(body)

        return Handler
