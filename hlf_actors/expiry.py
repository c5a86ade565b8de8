"""The nightly certification-expiry check: reminders to coordinators, and the move to ``expired_cert``.

Why it exists: a certificate that runs out must take its mentor off the public listing, and the coordinators should
hear about it weeks before. Every night at HLF_NIGHTLY_AT (local time in HLF_TIMEZONE) the leader runs ``run_night``
for that local date; ``hlf-actors check-expiry [--date D]`` runs the same thing by hand.

    run_night(today)
      ├─ one runner at a time: a session advisory lock; a second runner answers "already running"
      ├─ hlf_job_runs ('cert_expiry', today) already 'ok'? answer "already done"
      ├─ hlf_expire_certifications(today)     one UPDATE: active mentors without a certification valid today become
      │                                       expired_cert (+ auto_transitioned); the mentors trigger appends
      │                                       status_changed, so the service removes them from the portal at once
      ├─ claim the reminders due              one INSERT … SELECT … ON CONFLICT DO NOTHING RETURNING
      ├─ push each claimed reminder           Alerting.deliver: alert_sent / alert_failed for every target
      └─ after each batch of pushes           reminder_sent events and cert_expiry_reminders.pushed_at, set-based

The rules:
- A mentor's expiry is the latest ``expires_on`` of their certifications, valid through that day (the eligibility
  rule: listed iff active and some ``expires_on >= today``); ``days_left = expiry − today``.
- Thresholds are data: the organisation's ``reminder_days`` (default {30,14,7}; a trigger keeps them positive,
  distinct and non-empty). A threshold ``t`` is crossed when ``0 <= days_left <= t``.
- The reminder due is the smallest crossed threshold. It is sent once per (mentor, threshold, expiry): its row in
  ``cert_expiry_reminders`` (unique on those three) is inserted first, and only a row this run inserted is pushed.
- A missed night never skips a threshold and never sends a burst: a mentor found at 6 days left who got neither the
  30-, 14- nor 7-day reminder gets one push (threshold 7, ``days_left`` 6), the most urgent, and 30 and 14 are
  recorded as ``superseded`` so that later nights do not send them either.
- A renewed certificate has a new expiry date, so its thresholds start afresh.
- Only active mentors are reminded or expired. Paused mentors stay paused; an active mentor with no certification at
  all is expired too (they are not eligible to be listed).
- Out of scope: grace periods, and telling certification types apart (any certification counts).

Crash safety: a row is claimed before its push and marked ``pushed_at`` after it, and the night is recorded 'ok' in
``hlf_job_runs`` only at the end. A process that dies in between leaves the night unfinished; the next run (the
scheduler re-runs an unfinished night on start) pushes the claimed-but-unpushed reminders. The worst case is a
second push of the few reminders of the batch that was in flight, never a lost one.

The scheduler (``nightly.py``) keeps no state in memory: on start, and after every sleep, it asks the database
whether the most recent night that should have run did, and runs it if not. So a process that was down at 02:00
runs the missed night when it starts, and a standby that takes over does not run a night twice.
"""

from __future__ import annotations

import os
import socket
import time as _time
from collections.abc import Sequence
from datetime import date
from typing import Any, Literal
from uuid import UUID

import anyio
import msgspec
import psycopg
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from .alerts import Alerting
from .db import query as _query
from .events import ReminderSent, encode_payload
from .push import Delivery, Notice

__all__ = [
    "JOB",
    "NightReport",
    "default_owner",
    "run_night",
]

JOB = "cert_expiry"
# One expiry check at a time, whatever the night: two nights run at once could each remind the same mentor.
_LOCK = 0x484C_465F_4558_5059  # "HLF_EXPY"
# Pushes are recorded (reminder_sent, pushed_at) after each batch: a crash repeats at most one batch.
_BATCH = 500

Outcome = Literal["done", "already_done", "already_running"]


class NightReport(msgspec.Struct, frozen=True, kw_only=True):
    """What one run of the nightly check did."""

    night: date
    outcome: Outcome
    reminders_sent: int = 0  # reminders pushed (to however many targets answered)
    reminders_by_threshold: dict[int, int] = {}
    reminders_undelivered: int = 0  # of those, pushes no target accepted (no devices, no topic, or all failed)
    transitioned: int = 0  # mentors moved from active to expired_cert
    skipped_already_done: int = 0  # mentors whose due reminder an earlier run already sent or superseded
    superseded: int = 0  # larger thresholds marked done without a push because a smaller one was due (missed nights)
    duration_s: float = 0.0
    sql_s: float = 0.0  # of which in run_night's own statements; the rest is pushing (and Alerting's records of it)
    queries: int = 0  # SQL statements run_night issued itself (each push's alert record is Alerting's, not counted)
    holder: str | None = None  # for already_running / already_done: who ran it, and when
    # Organisations or mentors whose reminders could not be claimed ("organisation <id>: <error>"); the rest of the
    # night went on without them, and ops were alerted once.
    skipped: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.outcome == "already_running":
            return f"night of {self.night}: already being checked by {self.holder or 'another process'}"
        if self.outcome == "already_done":
            return f"night of {self.night}: already checked ({self.holder or 'earlier'}); nothing done"
        by = ", ".join(f"{t} days: {n}" for t, n in sorted(self.reminders_by_threshold.items(), reverse=True))
        undelivered = f", {self.reminders_undelivered} undelivered" if self.reminders_undelivered else ""
        return (
            f"night of {self.night}: {self.reminders_sent} reminder(s) sent"
            f"{f' ({by})' if by else ''}{undelivered}; {self.transitioned} mentor(s) moved to expired_cert; "
            f"{self.skipped_already_done} already reminded; {self.duration_s:.2f} s ({self.sql_s:.2f} s SQL), "
            f"{self.queries} queries"
            + (f"; SKIPPED {len(self.skipped)}: {'; '.join(self.skipped)[:300]}" if self.skipped else "")
        )


class _Due(msgspec.Struct, frozen=True):
    mentor_id: UUID
    organisation_id: UUID
    threshold: int
    days_left: int
    expiry: date
    full_name: str | None = None  # for the notification's words


class _Claim(msgspec.Struct, frozen=True):
    already: int
    superseded: int
    due: list[_Due]


class _Targets(msgspec.Struct, frozen=True):
    topic: str | None
    tokens: tuple[str, ...]
    devices: tuple[UUID, ...] = ()  # coordinator_devices.id of each token, in order


# -- SQL: named blocks in db/queries.sql ----------------------------------------------------------------------

_START = _query("expiry_start")
_FINISH = _query("expiry_finish")
_RUNNING = _query("expiry_running")
_DONE = _query("expiry_done")
_CLAIM = _query("expiry_claim")
_TARGETS = _query("expiry_targets")
_RECORD_EVENTS = _query("expiry_record_events")
_MARK_PUSHED = _query("expiry_mark_pushed")


# -- one night ------------------------------------------------------------------------------------------------


class _Counted:
    """The connection run_night talks through, counting the statements it sends."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn
        self.queries = 0
        self.seconds = 0.0

    async def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> psycopg.AsyncCursor[Any]:
        self.queries += 1
        started = _time.perf_counter()
        try:
            return await self.conn.execute(sql.encode(), params)
        finally:
            self.seconds += _time.perf_counter() - started


def default_owner(role: str) -> str:
    """Who holds a run, as hlf_job_runs.owner and the "already running" message show it."""
    return f"{role} on {socket.gethostname()} (pid {os.getpid()})"


_TRY_JOB_LOCK = "SELECT pg_try_advisory_lock(%s)"
_JOB_UNLOCK = "SELECT pg_advisory_unlock(%s)"


async def run_night(
    pool: AsyncConnectionPool[Any],
    alerting: Alerting,
    *,
    today: date,
    job_lock_owner: str,
    rerun: bool = False,
    push_concurrency: int = 8,
) -> NightReport:
    """Run the expiry check for the night of ``today`` (a local date): expire, then remind. Idempotent.

    Returns ``already_running`` if another process is running the check, ``already_done`` if this night was
    recorded 'ok' (unless ``rerun``: a rerun does only what is still missing). The pool must hand out autocommit
    connections and have room for one more than ``push_concurrency`` (alert records use their own).
    """
    started = _time.perf_counter()
    key = today.isoformat()
    async with pool.connection() as raw:
        db = _Counted(raw)
        row = await (await db.execute(_TRY_JOB_LOCK, (_LOCK,))).fetchone()
        if not (row and row[0]):
            running = await (await db.execute(_RUNNING, (JOB,))).fetchone()
            holder = f"{running[1]}, night of {running[0]}, since {running[2]:%Y-%m-%d %H:%M:%S%z}" if running else None
            return NightReport(night=today, outcome="already_running", holder=holder, queries=db.queries)
        try:
            params = {"job": JOB, "key": key, "owner": job_lock_owner, "rerun": rerun}
            if await (await db.execute(_START, params)).fetchone() is None:
                done = await (await db.execute(_DONE, (JOB, key))).fetchone()
                holder = f"by {done[0]} at {done[1]:%Y-%m-%d %H:%M:%S%z}" if done else None
                return NightReport(night=today, outcome="already_done", holder=holder, queries=db.queries)
            try:
                report = await _night(db, alerting, today, push_concurrency, started)
            except BaseException as err:
                with anyio.CancelScope(shield=True):
                    await _record_failure(db, key, err)
                raise
            await db.execute(_FINISH, ("ok", msgspec.json.encode(report).decode(), JOB, key))
            report = msgspec.structs.replace(report, queries=db.queries, sql_s=round(db.seconds, 3))
            logger.bind(night=key).info("expiry check: {}", report.describe())
            return report
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await raw.execute(_JOB_UNLOCK, (_LOCK,))
                except psycopg.Error:  # a broken connection has dropped the lock with it
                    pass


async def _record_failure(db: _Counted, key: str, err: BaseException) -> None:
    detail = msgspec.json.encode({"error": f"{type(err).__name__}: {err}"[:500]}).decode()
    try:
        await db.execute(_FINISH, ("failed", detail, JOB, key))
    except psycopg.Error:
        pass  # the row stays unfinished, which the scheduler treats the same way


_EXPIRE_CERTIFICATIONS = "SELECT hlf_expire_certifications(%s)"


async def _night(db: _Counted, alerting: Alerting, today: date, concurrency: int, started: float) -> NightReport:
    log = logger.bind(night=today.isoformat())
    # Expire first: the removals reach the portal while the reminders go out. The two sets cannot overlap (an
    # expired mentor has no expiry >= today to be reminded about).
    row = await (await db.execute(_EXPIRE_CERTIFICATIONS, (today,))).fetchone()
    transitioned = int(row[0]) if row else 0
    if transitioned:
        log.info("{} mentor(s) with no valid certification moved to expired_cert", transitioned)

    claim, skipped = await _claim_isolated(db, today)
    if skipped:
        log.error("expiry check skipped {} organisation(s)/mentor(s): {}", len(skipped), "; ".join(skipped)[:500])
        try:
            await alerting.ops(
                {"type": "hlf_expiry_check_incomplete", "night": today.isoformat(), "skipped": str(len(skipped))}
            )
        except Exception as err:  # the reminders that could be claimed still go out
            log.opt(exception=err).error("could not alert ops about the skipped expiry checks: {}", err)
    targets: dict[UUID, _Targets] = {}
    if claim.due:
        orgs = sorted({d.organisation_id for d in claim.due})
        for org_id, topic, tokens, devices in await (await db.execute(_TARGETS, (orgs,))).fetchall():
            targets[org_id] = _Targets(topic=topic or None, tokens=tuple(tokens), devices=tuple(devices))
    unreachable = sorted({o for o, t in targets.items() if not t.tokens and not t.topic})
    for org_id in unreachable:
        log.warning("organisation {} has no coordinator devices and no alert_topic: its reminders reach no one", org_id)

    by_threshold: dict[int, int] = {}
    undelivered = 0
    limiter = anyio.CapacityLimiter(max(1, concurrency))
    for start in range(0, len(claim.due), _BATCH):
        batch = claim.due[start : start + _BATCH]
        outcomes = await _push(alerting, batch, targets, limiter)
        events = [
            encode_payload(
                ReminderSent(
                    threshold_day=due.threshold,
                    days_left=due.days_left,
                    certification_expiry_date=due.expiry,
                    night=today,
                    targets=len(deliveries),
                    delivered=sum(1 for d in deliveries if d.ok),
                )
            ).decode()
            for due, deliveries in zip(batch, outcomes, strict=True)
        ]
        # The reminders and every delivery of their pushes, in one statement (none of these kinds is projected).
        rows = [(due.mentor_id, "reminder_sent", e) for due, e in zip(batch, events, strict=True)]
        for due, deliveries in zip(batch, outcomes, strict=True):
            data = _reminder_data(due)
            rows.extend(
                (due.mentor_id, ev.kind, encode_payload(ev.payload).decode())
                for ev in Alerting.events(due.mentor_id, deliveries, data)
            )
        async with db.conn.transaction():
            await db.execute(_RECORD_EVENTS, ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]))
            await db.execute(
                _MARK_PUSHED, ([d.mentor_id for d in batch], [d.threshold for d in batch], [d.expiry for d in batch])
            )
        for due, deliveries in zip(batch, outcomes, strict=True):
            by_threshold[due.threshold] = by_threshold.get(due.threshold, 0) + 1
            undelivered += not any(d.ok for d in deliveries)
    report = NightReport(
        night=today,
        outcome="done",
        reminders_sent=len(claim.due),
        reminders_by_threshold=by_threshold,
        reminders_undelivered=undelivered,
        transitioned=transitioned,
        skipped_already_done=claim.already,
        superseded=claim.superseded,
        duration_s=round(_time.perf_counter() - started, 3),
        sql_s=round(db.seconds, 3),
        queries=db.queries,
        skipped=tuple(skipped),
    )
    return report


async def _claim(db: _Counted, today: date, *, org: UUID | None = None, mentor: UUID | None = None) -> _Claim:
    # Its own transaction (a savepoint if the caller has one): a failed claim leaves no partial rows behind.
    async with db.conn.transaction():
        row = await (await db.execute(_CLAIM, {"today": today, "org": org, "mentor": mentor})).fetchone()
    return msgspec.json.decode(row[0] if row else '{"already":0,"superseded":0,"due":[]}', type=_Claim)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:160]


async def _claim_isolated(db: _Counted, today: date) -> tuple[_Claim, list[str]]:
    """Tonight's reminders, claimed in one statement; if that fails on some row's data, organisation by
    organisation, and within a failing organisation mentor by mentor, so one bad row costs one mentor its
    reminder instead of costing everyone theirs. Returns the claims and what was skipped. A lost connection is
    not data: it ends the night as before (the scheduler runs it again)."""
    try:
        return await _claim(db, today), []
    except psycopg.OperationalError:
        raise
    except psycopg.Error as err:
        logger.warning("expiry check: claiming every reminder at once failed ({}); isolating", _first_line(err))
    claims: list[_Claim] = []
    skipped: list[str] = []
    active = "SELECT DISTINCT organisation_id FROM mentors WHERE status = 'active' ORDER BY 1"
    for (org,) in await (await db.execute(active)).fetchall():
        try:
            claims.append(await _claim(db, today, org=org))
            continue
        except psycopg.OperationalError:
            raise
        except psycopg.Error:
            pass
        members = "SELECT id FROM mentors WHERE status = 'active' AND organisation_id = %s ORDER BY id"
        for (mentor,) in await (await db.execute(members, (org,))).fetchall():
            try:
                claims.append(await _claim(db, today, org=org, mentor=mentor))
            except psycopg.OperationalError:
                raise
            except psycopg.Error as err:
                skipped.append(f"mentor {mentor} of organisation {org}: {_first_line(err)}")
    merged = _Claim(
        already=sum(c.already for c in claims),
        superseded=sum(c.superseded for c in claims),
        due=sorted((d for c in claims for d in c.due), key=lambda d: (str(d.organisation_id), str(d.mentor_id))),
    )
    return merged, skipped


def _reminder_data(due: _Due) -> dict[str, str]:
    """The push payload of a reminder (INTERFACE.md): every value a string."""
    return {"type": "cert_expiry_reminder", "mentor_id": str(due.mentor_id), "days_left": str(due.days_left)}


def _reminder_notice(due: _Due) -> Notice:
    """What the coordinator's phone shows for a reminder, in plain words."""
    name = due.full_name or "A mentor"
    days = "today" if due.days_left == 0 else f"in {due.days_left} day{'s' if due.days_left != 1 else ''}"
    return Notice(
        title=f"{name}'s certification expires {days}",
        body=f"Renew it by {due.expiry:%d.%m.%Y} to keep {due.full_name or 'them'} on the public listing.",
    )


async def _push(
    alerting: Alerting, batch: Sequence[_Due], targets: dict[UUID, _Targets], limiter: anyio.CapacityLimiter
) -> list[list[Delivery]]:
    """One push per reminder to its organisation's coordinators; answers the deliveries in ``batch`` order."""
    outcomes: list[list[Delivery]] = [[] for _ in batch]

    async def one(i: int, due: _Due) -> None:
        to = targets.get(due.organisation_id, _Targets(topic=None, tokens=()))
        if not to.tokens and not to.topic:
            return  # no one to tell: reminder_sent records targets=0
        async with limiter:
            outcomes[i] = await alerting.deliver(
                _reminder_data(due),
                tokens=to.tokens,
                devices=to.devices,
                topic=to.topic,
                mentor_id=due.mentor_id,
                record=False,
                notice=_reminder_notice(due),
            )

    async with anyio.create_task_group() as tg:
        for i, due in enumerate(batch):
            tg.start_soon(one, i, due)
    return outcomes


# -- when ----------------------------------------------------------------------------------------------------------
