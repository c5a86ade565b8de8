"""Per-mentor actors: one anyio task per mentor with work, holding that mentor's retry state.

The dispatcher wakes a mentor's actor (spawning it on demand); the actor reads what the mentor needs *now* from the
database and does it. Wake-ups carry no data — the actor is level-triggered, so a pause followed by a reinstatement
within a millisecond sends only the final state, and a late or repeated wake-up is harmless.

    actor loop
      wait for a wake-up ──(idle for idle_s)──▶ retire (the task ends; memory goes with it)
        │
        ▼
      read sync_status + mentor ──(not pending/retrying)──▶ back to waiting
        │
        ├─(retry not due yet)──▶ sleep until due, or until a newer change wakes us
        ▼
      circuit closed? (else wait: the portal is down for everyone, so nobody spends attempts)
        ▼
      PATCH under the global concurrency limit ──▶ append the outcome event + projection, in one transaction
        │ success → in_sync       transient → retrying (delay planned)       permanent / out of attempts
        ▼                                                                    → dead_lettered + alert

Everything the actor knows is also in the database (attempts, next_attempt_at), so a restarted process carries on
exactly where the killed one stopped.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

import anyio
import psycopg
from anyio.abc import TaskGroup
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from . import db, projections
from .clock import Clock
from .config import Config
from .errors import CredentialError, PermanentPortalError, PortalError, ThrottledError, TransientPortalError
from .events import (
    AttemptFailed,
    AttemptSucceeded,
    DeadLettered,
    Event,
    NewEvent,
    Operation,
    Payload,
    SyncSkipped,
)
from .metrics import Metrics
from .retry import plan_delay_ms, throttle_delay_ms

__all__ = ["Actor", "Circuit", "Dispatcher", "Mailbox", "Portal", "Runtime"]


class Portal(Protocol):
    async def set_listed(self, record_id: UUID, listed: bool) -> int: ...


class Mailbox:
    """A coalescing mailbox: any number of wake-ups while the actor is busy become one."""

    def __init__(self) -> None:
        self._full = False
        self._event = anyio.Event()

    def put(self) -> None:
        self._full = True
        self._event.set()

    def take(self) -> bool:
        """Take the wake-up if there is one. Never waits."""
        if not self._full:
            return False
        self._full = False
        self._event = anyio.Event()
        return True

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a wake-up; True if one was taken."""
        if not self._full:
            with anyio.move_on_after(timeout):
                await self._event.wait()
        return self.take()


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


class Leadership:
    """Whether this process may send. Actors hold new attempts while leadership is uncertain (a lost listener
    connection), so a standby that takes over never races them."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    @property
    def held(self) -> bool:
        return self._event.is_set()

    def gain(self) -> None:
        self._event.set()

    def suspend(self) -> None:
        if self._event.is_set():
            self._event = anyio.Event()

    async def wait(self) -> None:
        await self._event.wait()


@dataclass
class Runtime:
    """What every actor shares: the outside worlds, the limits and the settings."""

    config: Config
    pool: AsyncConnectionPool[Any]
    portal: Portal
    clock: Clock
    limiter: anyio.CapacityLimiter
    circuit: Circuit
    leadership: Leadership
    on_dead_letter: Callable[[UUID, Operation, int], None]
    jitter: Callable[[], float] | None
    idle_s: float = 30.0
    stopping: bool = False
    crowded: Callable[[], bool] = lambda: False
    metrics: Metrics = field(default_factory=Metrics)
    on_credential_error: Callable[[], None] = lambda: None  # asks for a credential check soon (debounced)
    # Told of every successful PATCH (the public listing probe); must not block.
    on_synced: Callable[[UUID, Operation, Event], None] = lambda mentor_id, operation, succeeded: None


@dataclass(frozen=True)
class _Work:
    state: str
    attempts: int
    change_seq: int
    wait_s: float
    mentor_exists: bool
    portal_record_id: UUID | None
    eligible: bool
    snapshot: str
    change_age_s: float | None
    read_at: float  # perf_counter() when it was read


def _failed(
    work: _Work,
    operation: Operation,
    attempt: int,
    err: PortalError,
    *,
    delay_ms: int | None,
    retryable: bool = True,
    throttled: bool = False,
    error: str | None = None,
) -> AttemptFailed:
    """The attempt_failed event for a failure of the PATCH computed from ``work``."""
    return AttemptFailed(
        operation=operation,
        attempt=attempt,
        http_status=err.http_status,
        retryable=retryable,
        delay_ms=delay_ms,
        error=error if error is not None else str(err),
        for_seq=work.change_seq,
        snapshot=work.snapshot,
        throttled=throttled,
    )


class Actor:
    """The one task that talks to the portal about one mentor."""

    def __init__(self, mentor_id: UUID, runtime: Runtime) -> None:
        self.mentor_id = mentor_id
        self.mailbox = Mailbox()
        self._rt = runtime
        self._log = logger.bind(mentor_id=str(mentor_id))
        self.cancel_scope = anyio.CancelScope()
        self._open = True  # whether the last outcome recorded left the mentor's sync unfinished

    async def run(self) -> None:
        """Serve wake-ups until idle. Any error is logged and retried later: it never ends the service."""
        failures = 0
        while not self._rt.stopping:
            # Idle actors linger a while (a mentor changed once is often changed again), but not while other
            # mentors queue for a slot.
            idle_s = 0.0 if self._rt.crowded() else self._rt.idle_s
            if not self.mailbox.take() and not await self.mailbox.wait(idle_s):
                return
            try:
                await self._work()
                failures = 0
            except Exception as err:  # the loop must survive anything one mentor's work throws
                failures += 1
                delay = min(5.0, 0.1 * 2**failures)  # mostly a database outage: be back soon after it ends
                self._log.opt(exception=err if not isinstance(err, psycopg.Error) else None).error(
                    "sync step failed ({}: {}); trying again in {:.1f}s", type(err).__name__, err, delay
                )
                self.mailbox.put()
                await anyio.sleep(delay)

    async def _read(self) -> _Work | None:
        today = self._rt.clock.today(self._rt.config.zone)
        async with self._rt.pool.connection() as conn:
            cur = await conn.execute(db.query("mentor_work"), (today, self.mentor_id))
            row = await cur.fetchone()
        if row is None:
            return None
        state, attempts, change_seq, _op, wait_s, exists, record_id, eligible, _org, snapshot, age = row
        return _Work(
            state,
            attempts,
            change_seq,
            float(wait_s or 0.0),
            exists,
            record_id,
            bool(eligible),
            snapshot,
            age,
            time.perf_counter(),
        )

    async def _work(self) -> None:
        while not self._rt.stopping:
            work = await self._read()
            if work is None or work.state not in projections.OPEN_STATES:
                return
            if work.wait_s > 0:
                # Sleep until the retry is due; a newer change wakes us early and is sent at once.
                await self.mailbox.wait(work.wait_s)
                continue
            await self._rt.leadership.wait()
            if self._rt.stopping:
                return
            self._open = True
            await self._attempt(work)
            if not self._open:
                return  # the outcome settled the mentor; a newer change wakes the mailbox, so no read is needed

    async def _record(self, *payloads: Payload) -> list[Event]:
        # Pipeline mode: BEGIN, the row lock and the inserts travel together, then the projection and COMMIT.
        async with self._rt.pool.connection() as conn, conn.pipeline(), conn.transaction():
            appended, projected = await projections.append(conn, [NewEvent(self.mentor_id, p) for p in payloads])
        mine = projected.get(self.mentor_id)
        self._open = mine is None or mine.sync is None or mine.sync.state in projections.OPEN_STATES
        return appended

    async def _attempt(self, work: _Work) -> None:
        operation: Operation = "restore" if work.eligible else "remove"
        attempt = work.attempts + 1
        if work.portal_record_id is None:
            await self._no_record(operation, attempt, work)
            return
        probe = await self._rt.circuit.admit()
        try:
            # The slot is held until the outcome is recorded, not just for the PATCH: a crash then leaves at most
            # HLF_PORTAL_CONCURRENCY PATCHes sent but unrecorded, so at most that many are sent twice after it.
            async with self._rt.limiter:
                await self._send(work, operation, attempt, probe)
        finally:
            if probe:
                self._rt.circuit.release_probe()

    async def _send(self, work: _Work, operation: Operation, attempt: int, probe: bool) -> None:
        assert work.portal_record_id is not None
        cfg = self._rt.config
        started = time.perf_counter()
        try:
            if self._rt.stopping:  # stop means no new sends: this mentor stays pending for the next process
                return
            with self._rt.metrics.in_flight.track_inprogress():
                status = await self._rt.portal.set_listed(work.portal_record_id, operation == "restore")
        except ThrottledError as err:
            delay = throttle_delay_ms(err.retry_after, base_ms=cfg.backoff_base_ms, jitter=self._rt.jitter)
            self._rt.metrics.attempts.labels("throttled").inc()
            await self._record(_failed(work, operation, attempt, err, delay_ms=delay, throttled=True))
            self._log.info("{} throttled by the portal; waiting {} ms (no attempt spent)", operation, delay)
            return
        except (TransientPortalError, CredentialError) as err:
            if isinstance(err, CredentialError):
                self._rt.on_credential_error()
            self._rt.metrics.attempts.labels("failed").inc()
            outage = probe or self._rt.circuit.is_open
            await self._rt.circuit.transient_failure(self.mentor_id)
            await self._transient(work, operation, attempt, err, outage=outage)
            return
        except PermanentPortalError as err:
            self._rt.metrics.attempts.labels("failed").inc()
            await self._dead_letter(work, operation, attempt, err)
            return
        await self._rt.circuit.success()
        self._rt.metrics.attempts.labels("succeeded").inc()
        if work.change_age_s is not None:
            self._rt.metrics.latency.observe(work.change_age_s + time.perf_counter() - work.read_at)
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        appended = await self._record(
            AttemptSucceeded(
                operation=operation,
                attempt=attempt,
                http_status=status,
                for_seq=work.change_seq,
                snapshot=work.snapshot,
                duration_ms=duration_ms,
            )
        )
        self._rt.on_synced(self.mentor_id, operation, appended[0])
        self._log.info("{} sent (attempt {}, {} ms)", operation, attempt, duration_ms)

    async def _transient(
        self, work: _Work, operation: Operation, attempt: int, err: PortalError, *, outage: bool
    ) -> None:
        cfg = self._rt.config
        retry_after = err.retry_after if isinstance(err, TransientPortalError) else None
        if outage:
            # The portal is down for everyone: wait like a throttle, spend nothing, keep the backoff where it was.
            delay = throttle_delay_ms(retry_after, base_ms=cfg.backoff_base_ms, jitter=self._rt.jitter)
            await self._record(
                _failed(work, operation, attempt, err, delay_ms=delay, throttled=True, error=f"portal outage: {err}")
            )
            return
        if attempt >= cfg.max_attempts:
            await self._dead_letter(work, operation, attempt, err, retryable=True)
            return
        delay = plan_delay_ms(
            attempt,
            base_ms=cfg.backoff_base_ms,
            cap_ms=cfg.backoff_max_ms,
            retry_after_s=retry_after,
            jitter=self._rt.jitter,
        )
        await self._record(_failed(work, operation, attempt, err, delay_ms=delay))
        self._log.warning("{} attempt {} failed ({}); retry in {} ms", operation, attempt, err, delay)

    async def _dead_letter(
        self, work: _Work, operation: Operation, attempt: int, err: PortalError, *, retryable: bool = False
    ) -> None:
        error = str(err)
        appended = await self._record(
            _failed(work, operation, attempt, err, delay_ms=None, retryable=retryable),
            DeadLettered(
                operation=operation,
                attempts=attempt,
                last_error=error,
                for_seq=work.change_seq,
                snapshot=work.snapshot,
            ),
        )
        self._rt.metrics.dead_letters.inc()
        self._log.error("{} dead-lettered after {} attempt(s): {}", operation, attempt, error)
        self._rt.on_dead_letter(self.mentor_id, operation, appended[-1].seq)

    async def _no_record(self, operation: Operation, attempt: int, work: _Work) -> None:
        if operation == "remove":
            await self._record(
                SyncSkipped(
                    operation="remove",
                    reason="mentor has no portal_record_id, so nothing is listed to remove",
                    for_seq=work.change_seq,
                    snapshot=work.snapshot,
                )
            )
            self._log.info("remove skipped: the mentor has no portal record")
            return
        await self._dead_letter(
            work,
            operation,
            attempt,
            PermanentPortalError("mentor has no portal_record_id: link their portal record to list them"),
        )


class Dispatcher:
    """Routes wake-ups to actors, spawning them on demand. At most ``max_actors`` live at once; wake-ups for
    further mentors wait in arrival order (the portal could not serve them any sooner anyway)."""

    def __init__(self, runtime: Runtime, task_group: TaskGroup, *, max_actors: int = 2000) -> None:
        self._rt = runtime
        self._tg = task_group
        self._max = max_actors
        self._actors: dict[UUID, Actor] = {}
        self._waiting: dict[UUID, None] = {}
        self.spawned = 0
        self._all_done = anyio.Event()
        runtime.crowded = lambda: bool(self._waiting)

    @property
    def alive(self) -> int:
        return len(self._actors)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def has_actor(self, mentor_id: UUID) -> bool:
        return mentor_id in self._actors

    def wake(self, mentor_id: UUID) -> None:
        actor = self._actors.get(mentor_id)
        if actor is not None:
            actor.mailbox.put()
        elif len(self._actors) < self._max:
            self._spawn(mentor_id)
        else:
            self._waiting[mentor_id] = None

    def _spawn(self, mentor_id: UUID) -> None:
        actor = Actor(mentor_id, self._rt)
        actor.mailbox.put()
        self._actors[mentor_id] = actor
        self.spawned += 1
        self._tg.start_soon(self._host, actor, name=f"actor-{mentor_id}")

    async def _host(self, actor: Actor) -> None:
        try:
            with actor.cancel_scope:
                await actor.run()
        finally:
            # No await between the actor's last look at its mailbox and this: a wake-up cannot slip in between.
            del self._actors[actor.mentor_id]
            if not self._actors:
                self._all_done.set()
            if actor.mailbox.take() and not self._rt.stopping:
                self._spawn(actor.mentor_id)
            while self._waiting and len(self._actors) < self._max and not self._rt.stopping:
                next_id = next(iter(self._waiting))
                del self._waiting[next_id]
                self._spawn(next_id)

    def wake_all(self) -> None:
        for actor in self._actors.values():
            actor.mailbox.put()

    def cancel_all(self) -> None:
        self._waiting.clear()
        for actor in list(self._actors.values()):
            actor.cancel_scope.cancel()

    async def drained(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for every actor to finish; True if they all did."""
        with anyio.move_on_after(timeout):
            while self._actors:
                self._all_done = anyio.Event()
                await self._all_done.wait()
        return not self._actors
