"""Leadership as the actors see it: whether this process may send now.

The listener gains and suspends it (``listener.py``), the heartbeat renews it (``election.py``); the actors wait on it
before every attempt, so a process that lost its listener connection, or was frozen past its lease, never sends
beside the standby that took over. ``LeaderOnly`` is the portal as the actors see it, waiting on it at every PATCH.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from uuid import UUID

import anyio

from .dynamics import ListingRow, Portal

__all__ = ["LeaderOnly", "Leadership"]


class Leadership:
    """Whether this process may send. Actors hold new attempts while leadership is uncertain (a lost listener
    connection), so a standby that takes over never races them.

    Leadership may also be a lease: ``gain(lease_s=…)`` and each ``renew`` (a heartbeat the database accepted) make
    it valid until ``lease_s`` after the heartbeat was *sent*, by this process's monotonic clock. A process that
    was frozen (SIGSTOP, a hung event loop) wakes up with its lease expired and holds every send until a fresh
    heartbeat is accepted, which never happens once a standby has fenced it: the standby waits for the whole
    HLF_LEADER_TIMEOUT, longer than the lease, so the two never send at the same time. A renewal extends the lease
    only: leadership the listener suspended stays suspended until it is gained again.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._event = anyio.Event()
        self._renewed = anyio.Event()
        self._clock = clock
        self._until = float("inf")

    @property
    def held(self) -> bool:
        return self._event.is_set() and self._clock() < self._until

    def gain(self, *, lease_s: float | None = None, sent_at: float | None = None) -> None:
        if lease_s is None:
            self._until = float("inf")
        else:
            until = (sent_at if sent_at is not None else self._clock()) + lease_s
            # A heartbeat accepted since the claim may have extended the lease already.
            self._until = until if self._until == float("inf") else max(until, self._until)
        self._event.set()

    def renew(self, *, lease_s: float, sent_at: float) -> None:
        """A heartbeat sent at ``sent_at`` (this clock) was accepted: the lease runs until ``sent_at + lease_s``."""
        self._until = sent_at + lease_s
        self._renewed.set()

    def suspend(self) -> None:
        if self._event.is_set():
            self._event = anyio.Event()

    async def wait(self) -> None:
        """Return once leadership is held and its lease (if any) has not lapsed; checked at the moment of return,
        so a caller that sends right after this never sends on a lease that expired while it waited."""
        while True:
            await self._event.wait()
            if self._clock() < self._until:
                return
            if self._renewed.is_set():
                self._renewed = anyio.Event()
            await self._renewed.wait()  # lapsed: wait for the next accepted heartbeat, then look again


class LeaderOnly:
    """The portal as the actors see it: every PATCH first checks, at that very moment, that this process still
    leads and its lease is fresh. A process frozen with actors queued for the concurrency limit would otherwise send
    their PATCHes the instant it wakes, before anything has told it that a standby took over."""

    def __init__(self, portal: Portal, leadership: Leadership) -> None:
        self._portal = portal
        self._leadership = leadership

    async def set_listed(self, record_id: UUID, listed: bool) -> int:
        await self._leadership.wait()
        return await self._portal.set_listed(record_id, listed)

    async def tenant_check(self) -> None:  # reads only: no leadership needed
        await self._portal.tenant_check()

    def listing(self, page_size: int = 5000) -> AsyncIterator[list[ListingRow]]:
        return self._portal.listing(page_size)
