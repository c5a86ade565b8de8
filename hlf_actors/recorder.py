"""The recorder: every actor's outcome is appended and folded in one transaction, shared by the outcomes that wait
together (group commit).

An actor's PATCH is only done once its outcome is in the log, so the write is on every attempt's path; sharing one
transaction among the outcomes that queue while another commits keeps that cost flat under load.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from . import projections, writer
from .events import Event, NewEvent

__all__ = ["Recorder"]


class _Outcome:
    """One actor's events waiting for the recorder, and, once written, what writing them returned."""

    __slots__ = ("appended", "done", "error", "events", "projected")

    def __init__(self, events: list[NewEvent]) -> None:
        self.events = events
        self.done = anyio.Event()
        self.appended: list[Event] = []
        self.projected: dict[UUID, projections.MentorProjection] = {}
        self.error: Exception | None = None


class Recorder:
    """Writes the actors' outcomes, with group commit: the outcomes that queue up while one transaction is in flight
    share the next one (their rows locked in mentor order, their events appended and folded together, one COMMIT).
    A lone outcome is written at once; under load ten actors' outcomes cost about what one did.

    An actor awaits its own outcome, so each mentor's events still go in order. A failed batch is tried again one
    outcome per transaction, so one outcome the database refuses fails alone (an outage fails the batch at once).
    """

    def __init__(self, pool: AsyncConnectionPool[Any], *, max_batch: int = 200) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._queue: list[_Outcome] = []
        self._wake = anyio.Event()

    async def record(self, events: list[NewEvent]) -> tuple[list[Event], dict[UUID, projections.MentorProjection]]:
        """Append ``events`` (one actor's) and fold them; returns the appended events and the new projections."""
        outcome = _Outcome(events)
        self._queue.append(outcome)
        self._wake.set()
        # Shielded: an outcome whose PATCH was sent is written even if the actor is cancelled meanwhile.
        with anyio.CancelScope(shield=True):
            await outcome.done.wait()
        if outcome.error is not None:
            raise outcome.error
        return outcome.appended, outcome.projected

    async def run(self) -> None:
        batch: list[_Outcome] = []
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                while self._queue:
                    batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
                    try:
                        await self._write(batch)
                    except Exception as err:  # the actors see it and retry; the recorder goes on
                        if len(batch) == 1 or isinstance(err, psycopg.OperationalError):  # one outcome, or an outage
                            for outcome in batch:
                                outcome.error = err
                        else:
                            for outcome in batch:
                                try:
                                    await self._write([outcome])
                                except Exception as alone:  # handed to the actor, which logs it
                                    outcome.error = alone
                    for outcome in batch:
                        outcome.done.set()
                    batch = []
        finally:
            # Stopped (the service is shutting down): nobody may wait for an outcome that will not be written.
            for outcome in [*batch, *self._queue]:
                if not outcome.done.is_set():
                    outcome.error = outcome.error or RuntimeError(
                        "the recorder stopped before this outcome was written"
                    )
                    outcome.done.set()

    async def _write(self, batch: list[_Outcome]) -> None:
        # Pipeline mode: BEGIN, the row locks and the inserts travel together, then the projection and COMMIT.
        async with self._pool.connection() as conn, conn.pipeline(), conn.transaction():
            appended, projected = await writer.append(conn, [e for o in batch for e in o.events])
        start = 0
        for outcome in batch:
            outcome.appended = appended[start : start + len(outcome.events)]
            outcome.projected = projected
            start += len(outcome.events)
