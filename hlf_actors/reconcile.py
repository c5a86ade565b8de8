"""Reconciliation: compare the portal's listing with what the database says, and queue a sync for each mentor that
differs.

Why: the sync path is durable for every change the database sees, but the portal can drift without one: a record
flipped by hand in Dynamics, a PATCH answered 204 but never applied, a record deleted behind our back. So every
HLF_RECONCILE_EVERY the leader reads the whole listing (``GET …?$select=key,listed`` 5,000 rows a page, following
@odata.nextLink; 100,000 records are 20 requests, paced by the client's service-protection budget) and the database
in one streamed, set-based query, compares them in memory, and appends one ``sync_requested`` per divergent mentor.
It sends nothing itself: the actors fix each mentor like any other change, with the usual retries, dead letters
and alerts.

Decision table, for every mentor with a portal_record_id (expected = hlf_is_eligible(mentor, today)):

    portal record               expected  verdict                  action
    present, listed == expected any       in sync                  nothing
    present, listed != expected any       divergent                sync_requested
    missing                     True      missing                  sync_requested: its PATCH will 404 and be
                                                                   dead-lettered, and the coordinators alerted;
                                                                   someone must recreate the portal record
    missing                     False     absent, as it should be  nothing
    present, owned by no mentor           orphan                   reported, never touched

A mentor whose own sync is under way is left to its actor, which sends the state it reads *then*, so a request
would only add a second PATCH. "Under way" is decided after the portal was read: the mentor is pending or
retrying, has an event waiting in the inbox, or has any event newer than the log's head as it stood just before the
listing was read (its PATCH may have landed after the listing showed the old value). Such a mentor is counted as
"syncing now"; if the portal has truly drifted, the next period finds it settled and requests it. Dead-lettered
mentors are not requested again: their coordinators were alerted already, and a request every period would push the
same alert every 15 minutes; they are counted, and `hlf-actors dead-letters requeue` retries them.

A read of the listing is trusted only if it looks whole. An application user whose role grants user-level Read sees
only the rows it owns, and every other mentor would look "missing" and be re-requested. So when the read lacks more
than HLF_RECONCILE_MAX_MISSING (default 10 %) of the linked mentors' records, or returns no rows at all while
mentors are linked, nothing is requested: a ``reconcile_aborted`` event records the counts, and ops are alerted once
(not again while the following runs abort too).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import date
from typing import Any
from uuid import UUID

import msgspec
import psycopg
from loguru import logger

from . import db, writer
from .actor import Runtime
from .alerts import Alerting
from .dynamics import Portal
from .events import NewEvent, ReconcileAborted, ReconcileFinished

__all__ = [
    "Divergence",
    "Orphan",
    "ReconcileReport",
    "RequestsOutcome",
    "alert_aborted",
    "reconcile",
    "reconcile_forever",
    "wait_for_requests",
]

PAGE_SIZE = 5000  # Dataverse's largest page
_BATCH = 5000  # rows fetched, and sync requests appended, per round trip


class Divergence(msgspec.Struct, frozen=True):
    mentor_id: UUID
    record_id: UUID
    portal_listed: bool | None  # None: the portal has no such record
    expected: bool
    state: str | None  # the mentor's sync_status.state when read


class Orphan(msgspec.Struct, frozen=True):
    record_id: UUID
    listed: bool | None


class ReconcileReport(msgspec.Struct, frozen=True, kw_only=True):
    portal_records: int
    mentors_checked: int
    in_sync: int
    divergent: list[Divergence]  # record present, listed flag wrong: requested
    missing: list[Divergence]  # record gone, mentor should be listed: requested (will dead-letter)
    absent_ok: int  # record gone, mentor should not be listed anyway
    dead_lettered: list[Divergence]  # divergent or missing but dead-lettered: not requested again
    syncing: int  # divergent or missing while its own sync was under way: left to its actor
    orphans: list[Orphan]
    requested: dict[UUID, int]  # mentor → seq of its sync_requested event
    pages: int
    portal_ms: float
    database_ms: float
    queue_ms: float
    duration_ms: float
    lacking: int = 0  # linked mentors whose record the read did not return
    aborted: str | None = None  # why the read was not trusted: nothing was requested
    first_abort: bool = False  # the previous run was not aborted: ops are alerted on this one

    def aborted_event(self, max_missing: float) -> ReconcileAborted:
        assert self.aborted is not None
        return ReconcileAborted(
            portal_records=self.portal_records,
            linked_mentors=self.mentors_checked,
            missing=self.lacking,
            max_missing_share=max_missing,
            reason=self.aborted,
            pages=self.pages,
            duration_ms=self.duration_ms,
        )

    def finished(self) -> ReconcileFinished:
        return ReconcileFinished(
            portal_records=self.portal_records,
            mentors_checked=self.mentors_checked,
            divergent=len(self.divergent),
            missing=len(self.missing),
            orphans=len(self.orphans),
            requests=len(self.requested),
            pages=self.pages,
            duration_ms=self.duration_ms,
            absent_ok=self.absent_ok,
            dead_lettered=len(self.dead_lettered),
            syncing=self.syncing,
        )

    def summary_line(self) -> str:
        r = self
        return (
            f"reconciled {r.portal_records} portal record(s) ({r.pages} page(s)) against {r.mentors_checked} mentor(s) "
            f"in {r.duration_ms:.0f} ms: {len(r.divergent)} divergent, {len(r.missing)} missing, "
            f"{len(r.orphans)} orphan(s); {len(r.requested)} sync(s) requested"
        )


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 3)


def _untrusted(listing_rows: int, linked: int, lacking: int, max_missing: float) -> str | None:
    """Why a listing read cannot be trusted, or None."""
    if linked and not listing_rows:
        return f"the listing read returned no rows while {linked} mentor(s) are linked to portal records"
    if linked and lacking / linked > max_missing:
        return (
            f"the listing read lacks {lacking} of {linked} linked mentors' records ({lacking / linked:.0%}, more than "
            f"HLF_RECONCILE_MAX_MISSING {max_missing:.0%}): does the application user's role grant organisation-level "
            "Read on the table?"
        )
    return None


async def reconcile(
    conn: psycopg.AsyncConnection[Any],
    portal: Portal,
    *,
    today: date,
    page_size: int = PAGE_SIZE,
    max_missing: float = 0.10,
) -> ReconcileReport:
    """One reconciliation: read both sides, queue the fixes, record a reconcile_finished event (or, for a read that
    cannot be trusted, request nothing and record reconcile_aborted)."""
    started = time.perf_counter()
    # Any event appended after this read gets a higher seq: a mentor with one is syncing while we look.
    head = await conn.execute(db.query("event_log_head"))
    (log_head,) = await head.fetchone() or (0,)
    listing: dict[UUID, bool | None] = {}
    pages = 0
    async for page in portal.listing(page_size):
        pages += 1
        for row in page:
            listing[row.record_id] = row.listed
    portal_ms = _ms(started)

    db_started = time.perf_counter()
    owned: set[UUID] = set()
    divergent: list[Divergence] = []
    missing: list[Divergence] = []
    dead: list[Divergence] = []
    checked = in_sync = absent_ok = syncing = lacking = 0
    async with conn.transaction(), conn.cursor(name="hlf_reconcile") as cur:
        await cur.execute(db.query("reconcile_mentors"), {"today": today, "log_head": log_head})
        while rows := await cur.fetchmany(_BATCH):
            for mentor_id, record_id, eligible, state, busy in rows:
                checked += 1
                owned.add(record_id)
                expected = bool(eligible)
                present = record_id in listing
                lacking += not present
                listed = listing.get(record_id)
                if present and listed == expected:
                    in_sync += 1
                elif not present and not expected:
                    absent_ok += 1
                else:
                    found = Divergence(mentor_id, record_id, listed if present else None, expected, state)
                    if busy:
                        syncing += 1
                    elif state == "dead_lettered":
                        dead.append(found)
                    elif present:
                        divergent.append(found)
                    else:
                        missing.append(found)
    orphans = [Orphan(record_id, listed) for record_id, listed in listing.items() if record_id not in owned]
    database_ms = _ms(db_started)

    untrusted = _untrusted(len(listing), checked, lacking, max_missing)
    if untrusted is not None:
        divergent, missing = [], []  # nothing is requested on a read we cannot trust
    queue_started = time.perf_counter()
    requested: dict[UUID, int] = {}
    wanted = divergent + missing
    for i in range(0, len(wanted), _BATCH):
        batch = wanted[i : i + _BATCH]
        # One statement per batch: hlf_append_event puts each request in the inbox, and the batch's NOTIFYs fold
        # into one wake-up for the running service.
        cur2 = await conn.execute(
            db.query("reconcile_request"),
            ([d.mentor_id for d in batch], [d.portal_listed for d in batch], [d.expected for d in batch]),
        )
        requested.update({row[0]: row[1] for row in await cur2.fetchall()})
    queue_ms = _ms(queue_started)

    report = ReconcileReport(
        portal_records=len(listing),
        mentors_checked=checked,
        in_sync=in_sync,
        divergent=divergent,
        missing=missing,
        absent_ok=absent_ok,
        dead_lettered=dead,
        syncing=syncing,
        orphans=orphans,
        requested=requested,
        pages=pages,
        portal_ms=portal_ms,
        database_ms=database_ms,
        queue_ms=queue_ms,
        duration_ms=_ms(started),
        lacking=lacking,
        aborted=untrusted,
    )
    async with conn.transaction():
        if untrusted is None:
            await writer.append(conn, [NewEvent(None, report.finished())])
            return report
        cur3 = await conn.execute(db.query("latest_reconcile_outcome"))
        previous = await cur3.fetchone()
        await writer.append(conn, [NewEvent(None, report.aborted_event(max_missing))])
    return msgspec.structs.replace(report, first_abort=previous is None or previous[0] != "reconcile_aborted")


async def alert_aborted(alerting: Alerting, report: ReconcileReport) -> None:
    """One ops alert per run of aborted reconciliations (the first of them)."""
    if report.aborted is None or not report.first_abort:
        return
    logger.error("reconciliation aborted, nothing requested: {}", report.aborted)
    await alerting.ops(
        {
            "type": "hlf_reconcile_aborted",
            "portal_records": str(report.portal_records),
            "linked_mentors": str(report.mentors_checked),
            "missing": str(report.lacking),
            "reason": report.aborted[:200],
        }
    )


async def reconcile_forever(runtime: Runtime, alerting: Alerting, portal: Portal) -> None:
    """The leader's periodic job: a tenant check at start-up, then every HLF_RECONCILE_EVERY a tenant check followed
    by a reconciliation. A failed run logs one line and waits for the next period."""
    config = runtime.config
    incidents = runtime.incidents
    await runtime.leadership.wait()
    try:
        await incidents.check("start-up")
    except Exception as err:  # the database may be away; the next period tries again
        logger.error("tenant check at start-up failed: {}: {}", type(err).__name__, str(err)[:200])
    while True:
        await runtime.clock.sleep(config.reconcile_every_s)
        await runtime.leadership.wait()
        if runtime.stopping:
            continue
        try:
            ok, error = await incidents.check("scheduled")
            if not ok:
                logger.warning("reconciliation skipped: {}", error)
                continue
            async with runtime.pool.connection() as conn:
                report = await reconcile(
                    conn,
                    portal,
                    today=runtime.clock.today(config.zone),
                    max_missing=config.reconcile_max_missing,
                )
            if report.aborted is not None:
                await alert_aborted(alerting, report)
                continue
            logger.info(report.summary_line())
            for d in report.missing:
                logger.bind(mentor_id=str(d.mentor_id)).warning(
                    "portal record {} is gone but the mentor should be listed: recreate it", d.record_id
                )
        except Exception as err:  # one line, then the next period
            logger.error("reconciliation failed: {}: {}", type(err).__name__, str(err)[:200])


# -- the command line ---------------------------------------------------------------------------------------------


class RequestsOutcome(msgspec.Struct, frozen=True, kw_only=True):
    fixed: list[UUID]
    failed: list[UUID]  # dead-lettered after the request
    open: list[UUID]
    unprojected: int  # requests still in the inbox: nothing has even read them


def wait_for_requests(
    conn: psycopg.Connection[Any], requested: Mapping[UUID, int], *, timeout: float, poll_s: float = 0.1
) -> RequestsOutcome:
    """Poll sync_status until every requested mentor has an outcome that answers its request, or ``timeout``."""
    mentors = list(requested)
    seqs = [requested[m] for m in mentors]
    deadline = time.monotonic() + timeout
    while True:
        rows = conn.execute(db.query("reconcile_outcomes"), (mentors, seqs)).fetchall()
        fixed = [m for m, verdict, _ in rows if verdict == "fixed"]
        failed = [m for m, verdict, _ in rows if verdict == "failed"]
        still = [m for m, verdict, _ in rows if verdict == "open"]
        if not still or time.monotonic() >= deadline:
            return RequestsOutcome(fixed=fixed, failed=failed, open=still, unprojected=sum(1 for r in rows if r[2]))
        time.sleep(poll_s)
