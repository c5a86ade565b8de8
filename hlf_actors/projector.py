"""The projector: drains hlf_inbox into the projections and wakes the actor of every mentor left open.

    wake flag (a NOTIFY, a poll) ──▶ drain hlf_inbox → fold into projections (one tx a batch) → wake their actors
    catch up (every (re)connect, every sweep) ──▶ drain, then wake the actor of every mentor left pending/retrying

It runs on pool connections, only while this process leads. A NOTIFY only sets the wake flag: the inbox, not the
notification, says what changed, so a lost notification costs nothing but the wait for the next catch-up.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import suppress
from typing import Any
from uuid import UUID

import anyio
import psycopg
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from . import db, projections, writer
from .actor import Work, work_from_drain, work_from_row
from .clock import Clock
from .config import Config
from .dispatcher import Dispatcher
from .events import Event, StatusChanged, SyncRequested
from .leadership import Leadership
from .listener import queue_usage_change
from .metrics import Metrics, ServiceState

__all__ = ["Projector"]

_DRAIN_BATCH = 1000
_OPEN_LETTERS_AND_QUEUE_USAGE = (
    "SELECT (SELECT count(*) FROM dead_letters WHERE requeued_at IS NULL AND resolved_at IS NULL), "
    "pg_notification_queue_usage()"
)


class Projector:
    """The drain loop; ``wake`` and ``catch_up`` are how the listener and the sweep start it."""

    def __init__(
        self, config: Config, clock: Clock, leadership: Leadership, state: ServiceState, metrics: Metrics
    ) -> None:
        self._config = config
        self._clock = clock
        self._leadership = leadership
        self._state = state
        self._metrics = metrics
        self._wake = anyio.Event()
        self._catch_up = True

    def wake(self) -> None:
        """Drain the inbox."""
        self._wake.set()

    def catch_up(self) -> None:
        """Drain the inbox, then re-read every open mentor (what a NOTIFY may never have told us about)."""
        self._catch_up = True
        self._wake.set()

    async def drain_forever(self, pool: AsyncConnectionPool[Any], dispatcher: Dispatcher) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            await self._leadership.wait()
            try:
                await self._drain(pool, dispatcher)
                if self._catch_up:
                    self._catch_up = False
                    await self._dispatch_open(pool, dispatcher)
                self._state.database_ok = True
                failures = 0
            except psycopg.Error as err:
                failures += 1
                self._state.database_ok = False
                delay = min(5.0, 0.05 * 2**failures)
                logger.warning(
                    "projector could not reach the database ({}); retrying in {:.2f}s", str(err).strip()[:160], delay
                )
                self._catch_up = True
                if isinstance(err, psycopg.OperationalError):
                    # The pool would hand out the other connections the outage broke, one failed try each.
                    with suppress(psycopg.Error):
                        await pool.check()
                await anyio.sleep(delay)
                self._wake.set()

    async def _drain(self, pool: AsyncConnectionPool[Any], dispatcher: Dispatcher) -> None:
        # Wake actors only once the inbox is empty: on a backlog, an actor that starts before its mentor's later
        # events are projected would race the projector. In steady state the inbox empties in one batch anyway.
        # Each wake-up carries the mentor's work, built from the fold and the facts the drain read with its events,
        # so the actor goes straight to the portal instead of reading it again. The last batch wakes its actors
        # before its COMMIT's round trip: their PATCH is computed from committed rows either way, and their outcome
        # waits for the drain's row locks (were the COMMIT to fail, the events stay in the inbox and are folded again,
        # with the outcome after them, exactly as replay would).
        dispatcher.forget_retired()
        today = self._clock.today(self._config.zone)
        to_wake: dict[UUID, Work | None] = {}
        while True:
            # Pipeline mode: two round trips a batch (lock + take + load + facts; write + COMMIT).
            async with pool.connection() as conn, conn.pipeline(), conn.transaction():
                drained = await writer.drain_inbox(conn, _DRAIN_BATCH, on_events=self._count_changes, today=today)
                read_at = time.perf_counter()
                for mentor_id, projection in drained.projected.items():
                    to_wake.pop(mentor_id, None)
                    if projection.sync is not None and projection.sync.state in projections.OPEN_STATES:
                        facts = drained.facts.get(mentor_id)
                        to_wake[mentor_id] = work_from_drain(projection, facts, read_at) if facts else None
                last = drained.taken < _DRAIN_BATCH
                if last:
                    for mentor_id, work in to_wake.items():
                        dispatcher.wake(mentor_id, work)
            self._state.events_projected += drained.taken
            if last:
                break

    def _count_changes(self, events: Sequence[Event]) -> None:
        self._metrics.changes_seen.inc(sum(1 for e in events if isinstance(e.payload, StatusChanged | SyncRequested)))

    async def _dispatch_open(self, pool: AsyncConnectionPool[Any], dispatcher: Dispatcher) -> None:
        async with pool.connection() as conn:
            cur = await conn.execute(db.query("open_mentors"))
            rows = await cur.fetchall()
            cur = await conn.execute(_OPEN_LETTERS_AND_QUEUE_USAGE)
            checks = await cur.fetchone()
        self._metrics.open_dead_letters.set(checks[0] if checks else 0)
        usage = float(checks[1]) if checks else 0.0
        self._metrics.notify_queue_usage.set(usage)
        change = queue_usage_change(self._state.notify_queue_usage, usage)
        self._state.notify_queue_usage = usage
        if change == "high":
            logger.warning(
                "Postgres's NOTIFY queue is {:.0%} full: a listener somewhere is not reading (when it fills, every "
                "NOTIFY, and so every mentor update, fails); find it in pg_stat_activity (LISTEN, idle in transaction)",
                usage,
            )
        elif change == "normal":
            logger.info("Postgres's NOTIFY queue is back to {:.0%}", usage)
        # Read their work in batches and hand it over: after a restart a thousand actors each reading for themselves
        # flooded the pool and the event loop, and the first PATCH left half a second late.
        idle = [mentor_id for (mentor_id,) in rows if not dispatcher.has_actor(mentor_id)]
        today = self._clock.today(self._config.zone)
        woken = 0
        for start in range(0, len(idle), _DRAIN_BATCH):
            chunk = idle[start : start + _DRAIN_BATCH]
            async with pool.connection() as conn:
                cur = await conn.execute(db.query("mentor_work"), (today, chunk))
                found = await cur.fetchall()
            read_at = time.perf_counter()
            works = dict(work_from_row(row, read_at) for row in found)
            for mentor_id in chunk:  # oldest first, as open_mentors orders them
                if mentor_id in works and not dispatcher.has_actor(mentor_id):
                    dispatcher.wake(mentor_id, works[mentor_id])
                    woken += 1
        if woken:
            logger.info("caught up: {} mentor(s) with unfinished syncs picked up", woken)
