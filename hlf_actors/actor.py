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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import anyio
import psycopg
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from . import db, projections, writer
from .circuit import Circuit
from .clock import Clock
from .config import Config
from .dynamics import Portal
from .errors import (
    PermanentPortalError,
    PortalError,
    TenantError,
    ThrottledError,
    TransientPortalError,
    UndecidedRefusal,
)
from .events import (
    DeadLettered,
    Event,
    NewEvent,
    Operation,
    Payload,
    SyncSkipped,
)
from .incidents import Incident, Incidents
from .leadership import Leadership
from .metrics import Metrics
from .outcomes import Answering, Kind, Ladder, decide, held
from .recorder import Recorder

__all__ = [
    "Actor",
    "Mailbox",
    "Runtime",
    "Work",
    "work_from_drain",
    "work_from_row",
]


def work_from_drain(projection: projections.MentorProjection, facts: writer.MentorFacts, read_at: float) -> Work | None:
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


def _answering(work: Work, operation: Operation) -> Answering:
    return Answering(operation, work.change_seq, work.snapshot)


class Actor:
    """The one task that talks to the portal about one mentor."""

    def __init__(
        self,
        mentor_id: UUID,
        runtime: Runtime,
        *,
        recorded_seq: int = 0,
        crowded: Callable[[], bool] = lambda: False,
    ) -> None:
        self.mentor_id = mentor_id
        self._crowded = crowded  # whether mentors wait for an actor slot (the dispatcher's queue)
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
            idle_s = 0.0 if self._crowded() else self._rt.idle_s
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
        await self._record(held(_answering(work, operation), attempt, incident.describe()))
        self._log.info("{} held by the tenant-wide incident ({}); no attempt spent", operation, incident.cause)

    async def _send(
        self, work: Work, operation: Operation, attempt: int, probe: bool, incident_probe: bool = False
    ) -> None:
        assert work.portal_record_id is not None
        rt = self._rt
        started = time.perf_counter()
        try:
            if rt.stopping:  # stop means no new sends: this mentor stays pending for the next process
                return
            with rt.metrics.in_flight.track_inprogress():
                status = await rt.portal.set_listed(work.portal_record_id, operation == "restore")
        except ThrottledError as err:
            rt.metrics.attempts.labels("throttled").inc()
            decision = decide(_answering(work, operation), attempt, err, self._ladder())
            await self._record(*decision.events)
            self._log.info("{} throttled by the portal; waiting {} ms (no attempt spent)", operation, decision.delay_ms)
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
                await self._failure(work, operation, attempt, err, kind="transient")
                return
            if incident_probe:
                await rt.incidents.probe_finished(True)
            await self._failure(work, operation, attempt, err)
            return
        except TransientPortalError as err:
            rt.metrics.attempts.labels("failed").inc()
            outage = probe or rt.circuit.is_open
            await rt.circuit.transient_failure(self.mentor_id)
            await self._failure(work, operation, attempt, err, outage=outage)
            return
        except PermanentPortalError as err:
            rt.metrics.attempts.labels("failed").inc()
            if incident_probe:  # this record's own problem: the tenant answers again
                await rt.incidents.probe_finished(True)
            await self._failure(work, operation, attempt, err)
            return
        await rt.circuit.success()
        if incident_probe:
            await rt.incidents.probe_finished(True)
        rt.metrics.attempts.labels("succeeded").inc()
        if work.change_age_s is not None:
            rt.metrics.latency.observe(work.change_age_s + time.perf_counter() - work.read_at)
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        decision = decide(_answering(work, operation), attempt, status, self._ladder(), duration_ms=duration_ms)
        appended = await self._record(*decision.events)
        rt.on_synced(self.mentor_id, operation, appended[0])
        self._log.info("{} sent (attempt {}, {} ms)", operation, attempt, duration_ms)

    def _ladder(self) -> Ladder:
        cfg = self._rt.config
        return Ladder(cfg.backoff_base_ms, cfg.backoff_max_ms, cfg.max_attempts, self._rt.jitter)

    async def _failure(
        self,
        work: Work,
        operation: Operation,
        attempt: int,
        err: PortalError,
        *,
        kind: Kind | None = None,
        outage: bool = False,
    ) -> None:
        """Record a failed attempt as ``outcomes.decide`` says: a retry planned, an outage waited out, or a dead
        letter (then the coordinators are told)."""
        decision = decide(_answering(work, operation), attempt, err, self._ladder(), kind=kind, outage=outage)
        appended = await self._record(*decision.events)
        if isinstance(decision.events[-1], DeadLettered):
            self._rt.metrics.dead_letters.inc()
            self._log.error("{} dead-lettered after {} attempt(s): {}", operation, attempt, str(err))
            self._rt.on_dead_letter(self.mentor_id, operation, appended[-1].seq)
        elif not outage:
            self._log.warning("{} attempt {} failed ({}); retry in {} ms", operation, attempt, err, decision.delay_ms)

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
        await self._failure(
            work,
            operation,
            attempt,
            PermanentPortalError("mentor has no portal_record_id: link their portal record to list them"),
        )
