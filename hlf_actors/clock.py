"""Time, injected: the service asks a Clock for "now", "today" and to sleep, so tests can replace it.

``SystemClock`` is the real one. Tests of retry timing use the pure planner in ``retry.py`` and assert its delays
exactly; tests that need a different "today" (expiry checks) use ``FixedDateClock``.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Protocol
from zoneinfo import ZoneInfo

import anyio

__all__ = ["Clock", "FixedDateClock", "SystemClock"]


class Clock(Protocol):
    def now(self) -> datetime: ...
    def today(self, zone: ZoneInfo) -> date: ...
    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def today(self, zone: ZoneInfo) -> date:
        return datetime.now(zone).date()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


class FixedDateClock(SystemClock):
    """Real time, but "today" is a given date: for running the nightly checks as of another day."""

    def __init__(self, today: date) -> None:
        self._today = today

    def today(self, zone: ZoneInfo) -> date:
        return self._today
