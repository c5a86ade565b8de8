"""Leadership as the actors see it: whether this process may send now.

The listener gains and suspends it (``service.py``); the actors wait on it before every attempt, so a process that
lost its listener connection, or was frozen past its lease, never sends beside the standby that took over.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio

__all__ = ["Leadership"]


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
