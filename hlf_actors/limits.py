"""Dataverse's service-protection limits, on our side: the request budget and the Retry-After answer.

Dataverse answers 429 when an application user sends too many requests in a sliding window; ``RequestBudget`` paces
our requests to stay inside that window, and ``parse_retry_after`` reads the wait a 429 (or a 503) asks for. The
client (``dynamics.py``) uses both; they know nothing of HTTP clients or of the portal's records.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import anyio

__all__ = ["TRANSIENT_STATUSES", "RequestBudget", "parse_retry_after"]

# Answers that say "not now" rather than "no": the same request may succeed later (a timeout, throttling, and the
# 5xx of an overloaded server or a gateway).
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

_RETRY_AFTER_CAP_S = 86_400.0


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date. None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        # A portal asking for more than a day is not asking for anything we should plan around literally.
        return min(float(value), _RETRY_AFTER_CAP_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(_RETRY_AFTER_CAP_S, max(0.0, (when - (now or datetime.now(UTC))).total_seconds()))


class RequestBudget:
    """At most ``limit`` requests reaching the portal in any sliding ``window_s``: Dataverse's service-protection
    limit, kept on our side so that a backlog of thousands is paced instead of answered with 429s.

    The portal counts arrivals, which we cannot see; we count a request from the moment it starts until one window
    after its answer came back, which is always later than its arrival. That bounds arrivals exactly, however late
    a request leaves after it was scheduled (a scheduling margin on start times let a 429 through under load).

    A 429's Retry-After applies to the whole application user, and requests sent during it lengthen it, so
    ``hold`` stops every request of this budget until the longest Retry-After seen has passed.
    """

    def __init__(self, limit: int, window_s: float) -> None:
        self._limit = limit
        self._window_s = window_s
        self._in_flight = 0
        self._answered: deque[float] = deque()  # when each answer came back, oldest first
        self._lock = anyio.Lock()
        self._freed = anyio.Event()
        self._not_before = 0.0

    def _used(self, now: float) -> int:
        while self._answered and now - self._answered[0] >= self._window_s:
            self._answered.popleft()
        return self._in_flight + len(self._answered)

    def hold(self, seconds: float) -> None:
        """No request starts for ``seconds`` from now (or longer, if an earlier hold ends later)."""
        self._not_before = max(self._not_before, time.monotonic() + seconds)

    @property
    def held_for_s(self) -> float:
        return max(0.0, self._not_before - time.monotonic())

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait until one more request fits in the window, and count it until a window after it is answered."""
        async with self._lock:
            while True:
                now = time.monotonic()
                if now < self._not_before:
                    await anyio.sleep(self._not_before - now)
                elif self._used(now) >= self._limit:
                    if self._answered:
                        await anyio.sleep(self._answered[0] + self._window_s - now)
                    else:  # every counted request is still in flight: wait for one to be answered
                        self._freed = anyio.Event()
                        await self._freed.wait()
                else:
                    break
            self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            self._answered.append(time.monotonic())
            self._freed.set()
