"""Per-mentor actors: one anyio task per mentor with work, holding that mentor's retry state.

The dispatcher wakes a mentor's actor (spawning it on demand); the actor does what the mentor needs *now*. The actor
is level-triggered: a wake-up carries no command, at most the mentor's current work as the drain just read it, and
the newest wake-up wins, so a pause followed by a reinstatement within a millisecond sends only the final state, and
a late or repeated wake-up is harmless. The actor trusts a handed read only if it already includes the actor's own
last outcome (``recorded_seq``); otherwise, and whenever it wakes without one, it reads the database itself.

    actor loop
      wait for a wake-up ──(idle for idle_s)──▶ retire (the task ends; memory goes with it)
        │
        ▼
      the work handed with the wake-up (read by the drain), else read sync_status + mentor
        │ ──(not pending/retrying)──▶ back to waiting
        │
        ├─(retry not due yet)──▶ sleep until due, or until a newer change wakes us
        ▼
      circuit closed and no tenant-wide incident? (else wait: the portal is down, or refuses everyone, so nobody
        │  spends attempts; asked again once the concurrency slot is ours, so an outage holds the queue too)
        ▼
      PATCH under the global concurrency limit ──▶ append the outcome event + projection, in one transaction
        │                                          (the Recorder's: outcomes that wait together share it)
        │ success → in_sync       transient → retrying (delay planned)       permanent / out of attempts
        │                                                                    → dead_lettered + alert
        ▼ tenant-wide (TenantError, or an undecided refusal the tenant check confirms) → incident: held, no
                                                                    attempt spent (``incidents.py``)

Everything the actor knows is also in the database (attempts, next_attempt_at), so a restarted process carries on
exactly where the killed one stopped.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

import anyio
import psycopg
from anyio.abc import TaskGroup
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from . import db, projections, writer
from .clock import Clock
from .config import Config
from .errors import (
    PermanentPortalError,
    PortalError,
    TenantError,
    ThrottledError,
    TransientPortalError,
    UndecidedRefusal,
)
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
from .incidents import Incident, Incidents
from .metrics import Metrics
from .retry import plan_delay_ms, throttle_delay_ms

__all__ = [
    "Actor",
    "Circuit",
    "Dispatcher",
    "Mailbox",
    "Portal",
    "Recorder",
    "Runtime",
    "Work",
    "work_from_drain",
    "work_from_row",
]


class Portal(Protocol):
    async def set_listed(self, record_id: UUID, listed: bool) -> int: ...


def work_from_drain(
    projection: projections.MentorProjection, facts: writer.MentorFacts, read_at: float
) -> Work | None:
    """The Work ``mentor_work`` would read, from what a drain folded and read (the same columns, the same rules)."""
    sync = projection.sync
    if sync is None:
        return None
    wait_s = (sync.next_attempt_at - facts.db_now).total_seconds() if sync.next_attempt_at is not None else 0.0
    return Work(
        last_seq=sync.last_seq,
        state=sync.state,
        attempts=sync.attempts,
        change_seq=max(sync.change_seq, facts.newest_change_seq or 0),
        wait_s=max(0.0, wait_s),
        mentor_exists=facts.mentor_exists,
        portal_record_id=facts.portal_record_id if facts.portal_record_id is not None else sync.portal_record_id,
        eligible=facts.eligible,
        snapshot=facts.snapshot,
        change_age_s=facts.change_age_s,
        read_at=read_at,
    )


class Mailbox:
    """A coalescing mailbox: any number of wake-ups while the actor is busy become one.

    A wake-up may carry the mentor's work as the projector read it (``Work``), which spares the actor its own read;
    the newest wake-up wins, and one without work means "read it yourself".
    """

    def __init__(self) -> None:
        self._full = False
        self._event = anyio.Event()
        self.work: Work | None = None

    def put(self, work: Work | None = None) -> None:
        self._full = True
        self.work = work
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


@dataclass
class Runtime:
    """What every actor shares: the outside worlds, the limits and the settings."""

    config: Config
    pool: AsyncConnectionPool[Any]
    portal: Portal
    clock: Clock
    limiter: anyio.CapacityLimiter
    recorder: Recorder
    circuit: Circuit
    leadership: Leadership
    incidents: Incidents
    on_dead_letter: Callable[[UUID, Operation, int], None]
    jitter: Callable[[], float] | None
    idle_s: float = 30.0
    stopping: bool = False
    crowded: Callable[[], bool] = lambda: False
    metrics: Metrics = field(default_factory=Metrics)
    # Told of every successful PATCH (the public listing probe); must not block.
    on_synced: Callable[[UUID, Operation, Event], None] = lambda mentor_id, operation, succeeded: None


@dataclass(frozen=True)
class Work:
    """One row of the ``mentor_work`` query: what the mentor needs now."""

    last_seq: int  # the newest event the projection had folded when this was read
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

    def wait_left_s(self) -> float:
        """How long until the planned retry is due, from now."""
        return self.wait_s - (time.perf_counter() - self.read_at) if self.wait_s > 0 else 0.0


def work_from_row(row: Sequence[Any], read_at: float) -> tuple[UUID, Work]:
    """The mentor id and the Work of one ``mentor_work`` row."""
    mentor_id, last_seq, state, attempts, change_seq, _op, wait_s, exists, record_id, eligible, _org, snap, age = row
    work = Work(
        last_seq=last_seq,
        state=state,
        attempts=attempts,
        change_seq=change_seq,
        wait_s=float(wait_s or 0.0),
        mentor_exists=exists,
        portal_record_id=record_id,
        eligible=bool(eligible),
        snapshot=snap,
        change_age_s=age,
        read_at=read_at,
    )
    return mentor_id, work


def _failed(
    work: Work,
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

    def __init__(self, mentor_id: UUID, runtime: Runtime, *, recorded_seq: int = 0) -> None:
        self.mentor_id = mentor_id
        self.mailbox = Mailbox()
        self._rt = runtime
        self._log = logger.bind(mentor_id=str(mentor_id))
        self.cancel_scope = anyio.CancelScope()
        self._open = True  # whether the last outcome recorded left the mentor's sync unfinished
        self.recorded_seq = recorded_seq  # the seq of the last event this mentor's actors appended
        self._held_for: Incident | None = None  # the incident this actor last recorded its mentor as held by

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

    async def _next(self) -> Work | None:
        """What the mentor needs now: the work handed with the wake-up if it already includes this actor's last
        outcome (a read from before it would repeat a settled attempt), else a fresh read."""
        handed, self.mailbox.work = self.mailbox.work, None
        if handed is not None and handed.last_seq >= self.recorded_seq:
            return handed
        return await self._read()

    async def _read(self) -> Work | None:
        today = self._rt.clock.today(self._rt.config.zone)
        async with self._rt.pool.connection() as conn:
            cur = await conn.execute(db.query("mentor_work"), (today, [self.mentor_id]))
            row = await cur.fetchone()
        return None if row is None else work_from_row(row, time.perf_counter())[1]

    async def _work(self) -> None:
        while not self._rt.stopping:
            work = await self._next()
            if work is None or work.state not in projections.OPEN_STATES:
                return
            wait_s = work.wait_left_s()
            if wait_s > 0:
                # Sleep until the retry is due; a newer change wakes us early and is sent at once.
                await self.mailbox.wait(wait_s)
                continue
            await self._rt.leadership.wait()
            if self._rt.stopping:
                return
            self._open = True
            await self._attempt(work)
            if not self._open:
                return  # the outcome settled the mentor; a newer change wakes the mailbox, so no read is needed

    async def _record(self, *payloads: Payload) -> list[Event]:
        appended, projected = await self._rt.recorder.record([NewEvent(self.mentor_id, p) for p in payloads])
        self.recorded_seq = max(self.recorded_seq, appended[-1].seq)
        mine = projected.get(self.mentor_id)
        self._open = mine is None or mine.sync is None or mine.sync.state in projections.OPEN_STATES
        return appended

    async def _attempt(self, work: Work) -> None:
        operation: Operation = "restore" if work.eligible else "remove"
        attempt = work.attempts + 1
        if work.portal_record_id is None:
            await self._no_record(operation, attempt, work)
            return
        rt = self._rt
        if rt.incidents.incident is not None and rt.incidents.incident is not self._held_for:
            await self._held(work, operation, attempt)
        circuit_probe = await rt.circuit.admit()
        incident_probe = False
        try:
            incident_probe = await rt.incidents.admit()
            # The slot is held until the outcome is recorded, not just for the PATCH: a crash then leaves at most
            # HLF_PORTAL_CONCURRENCY PATCHes sent but unrecorded, so at most that many are sent twice after it.
            async with rt.limiter:
                if (rt.circuit.is_open and not circuit_probe) or (rt.incidents.holding and not incident_probe):
                    # An outage or incident began while we queued for the slot: nothing goes out. The caller reads
                    # the mentor again (its work may change while held) and waits at the gate.
                    return
                await self._send(work, operation, attempt, circuit_probe, incident_probe)
        finally:
            if circuit_probe:
                rt.circuit.release_probe()
            if incident_probe:  # settled by _send where it could tell; otherwise another held mentor probes
                await rt.incidents.probe_finished(None)

    async def _held(self, work: Work, operation: Operation, attempt: int) -> None:
        """Record once per incident that this mentor waits for it: no attempt spent, last_error names it."""
        incident = self._rt.incidents.incident
        assert incident is not None
        self._held_for = incident
        await self._record(
            AttemptFailed(
                operation=operation,
                attempt=attempt,
                http_status=None,
                retryable=True,
                delay_ms=None,
                error=f"held: {incident.describe()}",
                for_seq=work.change_seq,
                snapshot=work.snapshot,
                throttled=True,
            )
        )
        self._log.info("{} held by the tenant-wide incident ({}); no attempt spent", operation, incident.cause)

    async def _send(
        self, work: Work, operation: Operation, attempt: int, probe: bool, incident_probe: bool = False
    ) -> None:
        assert work.portal_record_id is not None
        rt = self._rt
        cfg = rt.config
        started = time.perf_counter()
        try:
            if rt.stopping:  # stop means no new sends: this mentor stays pending for the next process
                return
            with rt.metrics.in_flight.track_inprogress():
                status = await rt.portal.set_listed(work.portal_record_id, operation == "restore")
        except ThrottledError as err:
            delay = throttle_delay_ms(err.retry_after, base_ms=cfg.backoff_base_ms, jitter=rt.jitter)
            rt.metrics.attempts.labels("throttled").inc()
            await self._record(_failed(work, operation, attempt, err, delay_ms=delay, throttled=True))
            self._log.info("{} throttled by the portal; waiting {} ms (no attempt spent)", operation, delay)
            return
        except TenantError as err:
            rt.metrics.attempts.labels("held").inc()
            await rt.incidents.report(err)
            await self._held(work, operation, attempt)
            return
        except UndecidedRefusal as err:
            verdict = await rt.incidents.decide(err)
            if verdict == "tenant":
                rt.metrics.attempts.labels("held").inc()
                await self._held(work, operation, attempt)
                return
            rt.metrics.attempts.labels("failed").inc()
            if verdict == "unknown":  # the tenant could not be checked: try again later, as for a timeout
                await self._transient(work, operation, attempt, err, outage=False)
                return
            if incident_probe:
                await rt.incidents.probe_finished(True)
            await self._dead_letter(work, operation, attempt, err)
            return
        except TransientPortalError as err:
            rt.metrics.attempts.labels("failed").inc()
            outage = probe or rt.circuit.is_open
            await rt.circuit.transient_failure(self.mentor_id)
            await self._transient(work, operation, attempt, err, outage=outage)
            return
        except PermanentPortalError as err:
            rt.metrics.attempts.labels("failed").inc()
            if incident_probe:  # this record's own problem: the tenant answers again
                await rt.incidents.probe_finished(True)
            await self._dead_letter(work, operation, attempt, err)
            return
        await rt.circuit.success()
        if incident_probe:
            await rt.incidents.probe_finished(True)
        rt.metrics.attempts.labels("succeeded").inc()
        if work.change_age_s is not None:
            rt.metrics.latency.observe(work.change_age_s + time.perf_counter() - work.read_at)
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
        rt.on_synced(self.mentor_id, operation, appended[0])
        self._log.info("{} sent (attempt {}, {} ms)", operation, attempt, duration_ms)

    async def _transient(
        self, work: Work, operation: Operation, attempt: int, err: PortalError, *, outage: bool
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
        self, work: Work, operation: Operation, attempt: int, err: PortalError, *, retryable: bool = False
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

    async def _no_record(self, operation: Operation, attempt: int, work: Work) -> None:
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
        self._waiting: dict[UUID, Work | None] = {}
        # recorded_seq of actors that retired since the current drain began: a read that drain took before such an
        # actor's last outcome must not be trusted by the mentor's next actor (see forget_retired).
        self._retired: dict[UUID, int] = {}
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

    def wake(self, mentor_id: UUID, work: Work | None = None) -> None:
        """Wake the mentor's actor, spawning it if need be; ``work`` is its work as just read, if known."""
        actor = self._actors.get(mentor_id)
        if actor is not None:
            actor.mailbox.put(work)
        elif len(self._actors) < self._max:
            self._spawn(mentor_id, work)
        else:
            self._waiting[mentor_id] = work  # a mentor already waiting keeps its place, with the newest work

    def forget_retired(self) -> None:
        """Called as a drain begins: every read it hands out is taken after the retirements so far, so it includes
        those actors' last outcomes."""
        self._retired.clear()

    def _spawn(self, mentor_id: UUID, work: Work | None = None) -> None:
        actor = Actor(mentor_id, self._rt, recorded_seq=self._retired.pop(mentor_id, 0))
        actor.mailbox.put(work)
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
            if actor.recorded_seq:
                self._retired[actor.mentor_id] = actor.recorded_seq
            if not self._actors:
                self._all_done.set()
            if actor.mailbox.take() and not self._rt.stopping:
                self._spawn(actor.mentor_id, actor.mailbox.work)
            while self._waiting and len(self._actors) < self._max and not self._rt.stopping:
                next_id = next(iter(self._waiting))
                self._spawn(next_id, self._waiting.pop(next_id))

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
