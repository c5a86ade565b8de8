"""The portal-wide circuit breaker: when the portal is down for everyone, nobody spends attempts on it.

Actors report each transient failure and each success; once ``threshold`` distinct mentors fail in a row the circuit
opens, and while it is open one request at a time probes the portal, with a growing pause between probes. The
first success closes it. ``on_change`` tells the service (the outage alert and its event).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from uuid import UUID

import anyio
from loguru import logger

__all__ = ["Circuit"]


class Circuit:
    """Portal-wide outage detection: when ``threshold`` distinct mentors fail transiently with no success between
    them, the portal is down for everyone. While open, one request at a time probes it; no mentor spends attempts.
    """

    def __init__(
        self,
        *,
        threshold: int,
        probe_base_s: float,
        probe_cap_s: float,
        on_change: Callable[[bool, int], Awaitable[None]] | None = None,
    ) -> None:
        self._threshold = threshold
        self._probe_base_s = probe_base_s
        self._probe_cap_s = probe_cap_s
        self._failing: set[UUID] = set()
        self._open = False
        self._probes = 0
        self._probe_lock = anyio.Lock()
        self._on_change = on_change
        self.opened_count = 0

    @property
    def is_open(self) -> bool:
        return self._open

    async def admit(self) -> bool:
        """Wait until this caller may send. Returns True when the caller is the probe of an open circuit.

        The caller must then call ``release_probe`` after recording its outcome.
        """
        if not self._open:
            return False
        await self._probe_lock.acquire()
        if not self._open:
            self._probe_lock.release()
            return False
        delay = min(self._probe_cap_s, self._probe_base_s * 2 ** min(self._probes, 20))
        self._probes += 1
        await anyio.sleep(delay)
        return True

    def release_probe(self) -> None:
        self._probe_lock.release()

    async def success(self) -> None:
        self._failing.clear()
        if self._open:
            self._open = False
            self._probes = 0
            logger.info("portal answers again: circuit closed")
            if self._on_change:
                await self._on_change(False, 0)

    async def transient_failure(self, mentor_id: UUID) -> None:
        self._failing.add(mentor_id)
        if not self._open and len(self._failing) >= self._threshold:
            self._open = True
            self.opened_count += 1
            logger.warning(
                "{} mentors failed transiently in a row: the portal is down, circuit open", len(self._failing)
            )
            if self._on_change:
                await self._on_change(True, len(self._failing))
