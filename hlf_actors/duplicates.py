"""Duplicate log entries: raising each finding once, the service's periodic scan, and the ops alert.

The rules are in ``duplicate_rules.py`` (``Detector``), run beside the sync fold: the findings are a projection like
``sync_status``, folded by ``projections.fold_mentor`` into a ``DuplicateState`` (what the rules found, and which
findings duplicate_detected events already raised). Raising appends a duplicate_detected event and inserts its
``duplicate_findings`` row in one transaction, under a lock on that table and only for a key not there yet: once per
finding, however many replays or periodic checks find it. The ops alert is sent from that row — ``alerted_at`` is
its outbox — by the live service's leader (``watch``), so a finding raised by ``hlf-actors replay`` is pushed by the
running service within one sweep interval.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from uuid import UUID

import anyio
import psycopg
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from . import db
from .alerts import Alerting
from .duplicate_rules import Finding, FindingRow
from .events import DuplicateDetected, encode_payload
from .history import changed_since, histories, unprojected
from .projections import fold_mentor

__all__ = ["DuplicateScan", "raise_findings", "send_pending_alerts", "watch"]

DETECT_EVERY_S = 600.0
_LIVE_ITERSIZE = 250  # mentors per fetch: small, since the scan runs beside the service


# ---------------------------------------------------------------------------------------------------------------
# Raising findings and alerting ops.

_LOCK_FINDINGS = "LOCK TABLE duplicate_findings IN SHARE ROW EXCLUSIVE MODE"
_EXISTING = "SELECT key FROM duplicate_findings WHERE key = ANY(%s)"
_INSERT_FINDING = (
    "INSERT INTO duplicate_findings (key, rule, mentor_id, seqs, event_seq, detected_at) "
    "VALUES (%s, %s, %s, %s, %s, %s)"
)
_UNALERTED = (
    "SELECT key, rule, mentor_id FROM duplicate_findings WHERE alerted_at IS NULL ORDER BY detected_at, key LIMIT 100"
)
_MARK_ALERTED = "UPDATE duplicate_findings SET alerted_at = now() WHERE key = %s AND alerted_at IS NULL"


def raise_findings(conn: psycopg.Connection[Any], findings: Sequence[Finding]) -> list[FindingRow]:
    """Raise each finding whose key is new: a duplicate_detected event and its duplicate_findings row.

    Runs in the caller's transaction. The table lock (self-conflicting) makes concurrent raisers — a replay and the
    service's periodic check — take turns, so a key is raised once and its event is the only one.
    """
    if not findings:
        return []
    conn.execute(_LOCK_FINDINGS)
    existing = {row[0] for row in conn.execute(_EXISTING, ([f.key for f in findings],)).fetchall()}
    raised: list[FindingRow] = []
    for finding in findings:
        if finding.key in existing:
            continue
        existing.add(finding.key)
        payload = DuplicateDetected(finding=finding.key, rule=finding.rule, seqs=finding.seqs, detail=finding.detail)
        row = conn.execute(
            db.query("insert_event"), (finding.mentor_id, "duplicate_detected", encode_payload(payload).decode())
        ).fetchone()
        assert row is not None
        seq, recorded_at = int(row[0]), row[1]
        conn.execute(
            _INSERT_FINDING,
            (finding.key, finding.rule, finding.mentor_id, list(finding.seqs), seq, recorded_at),
        )
        raised.append(
            FindingRow(
                key=finding.key,
                rule=finding.rule,
                mentor_id=finding.mentor_id,
                seqs=finding.seqs,
                event_seq=seq,
                detected_at=recorded_at,
            )
        )
        logger.bind(mentor_id=str(finding.mentor_id)).warning("duplicate found ({}): {}", finding.rule, finding.detail)
    return raised


async def send_pending_alerts(pool: AsyncConnectionPool[Any], alerting: Alerting) -> int:
    """Push one hlf_duplicate_detected alert to HLF_OPS_TOPIC for every finding not alerted yet.

    ``alerted_at`` is set once the alert was attempted; its outcome is the alert_sent/alert_failed event, as for
    every alert. A process that dies between the push and the mark pushes that one finding again: at least once.
    """
    async with pool.connection() as conn:
        cur = await conn.execute(_UNALERTED)
        rows = await cur.fetchall()
    for key, rule, mentor_id in rows:
        await alerting.ops(
            {"type": "hlf_duplicate_detected", "mentor_id": str(mentor_id), "rule": str(rule), "finding": str(key)}
        )
        async with pool.connection() as conn:
            await conn.execute(_MARK_ALERTED, (key,))
    return len(rows)


async def watch(
    url: str,
    pool: AsyncConnectionPool[Any],
    alerting: Alerting,
    leader: Callable[[], Awaitable[None]],
    alert_every_s: float,
    *,
    detect_every_s: float = DETECT_EVERY_S,
    app_schema: str = "public",
) -> None:
    """The live service's duplicate check, while leader.

    Every ``detect_every_s`` the mentors whose events committed since the last check are folded again (all of them
    on the first check) and new findings are raised; every ``alert_every_s`` findings not alerted yet are pushed —
    whoever raised them, so findings of ``hlf-actors replay`` are alerted by the next tick. The fold runs in a
    worker thread: a first check over a long log is seconds of CPU the event loop must not wait for.
    """
    scan = DuplicateScan(url, app_schema)
    next_detect = 0.0
    while True:
        await leader()
        try:
            if time.monotonic() >= next_detect:
                raised = await _in_thread(scan.run)
                next_detect = time.monotonic() + detect_every_s
                if raised:
                    logger.warning("duplicate check: {} new finding(s) raised", len(raised))
            await send_pending_alerts(pool, alerting)
        except Exception as err:  # a failed check is tried again at the next tick; syncing must go on
            logger.opt(exception=err if not isinstance(err, psycopg.Error) else None).error(
                "duplicate check failed: {}", err
            )
        await anyio.sleep(alert_every_s)


_CURRENT_SNAPSHOT = "SELECT pg_current_snapshot()::text"


class DuplicateScan:
    """Raise the duplicate findings of the mentors whose events committed since the previous scan (all mentors on
    the first). Synchronous: the service runs it in a worker thread. Keeps the snapshot of its last scan."""

    def __init__(self, url: str, app_schema: str = "public") -> None:
        self._url = url
        self._app_schema = app_schema
        self._since: str | None = None
        self._recheck: set[UUID] = set()

    def run(self, stop: threading.Event | None = None) -> list[FindingRow]:
        with db.connect(self._url, app_schema=self._app_schema, application_name="hlf-actors duplicates") as conn:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            found: list[Finding] = []
            with conn.transaction():
                row = conn.execute(_CURRENT_SNAPSHOT).fetchone()
                assert row is not None
                snapshot = str(row[0])
                inbox, inbox_mentors = unprojected(conn)
                mentors: list[UUID] | None = None
                if self._since is not None:
                    changed = changed_since(conn, self._since)
                    mentors = sorted(changed | self._recheck)
                if mentors is None or mentors:
                    # Small fetches, one ahead: this runs beside the live service, whose memory matters more than
                    # the scan's speed, and the first scan reads every mentor (bench/NOTES.md: peak RSS).
                    for mentor_id, start, events in histories(
                        conn, inbox=inbox, mentors=mentors, itersize=_LIVE_ITERSIZE, prefetch=1
                    ):
                        if stop is not None and stop.is_set():
                            return []
                        found.extend(fold_mentor(mentor_id, events, start).duplicates.unraised())
            conn.isolation_level = None
            conn.read_only = None
            with conn.transaction():
                raised = raise_findings(conn, found)
        # Events still in the inbox were left out; their mentors are looked at again once they are drained.
        self._since, self._recheck = snapshot, inbox_mentors
        return raised


async def _in_thread(job: Callable[[threading.Event], list[FindingRow]]) -> list[FindingRow]:
    stop = threading.Event()
    try:
        return await anyio.to_thread.run_sync(job, stop, abandon_on_cancel=True)
    finally:
        stop.set()  # cancelled: the abandoned thread stops at its next mentor and closes its connection
