"""Duplicate log entries: the rules, their projection, raising each finding once, and the ops alert.

    rule                      two events of one mentor that should have been one
    reminder_sent_twice       reminder_sent with the same (threshold_day, certification_expiry_date)
    auto_transitioned_twice   auto_transitioned with the same certification_expiry_date (the certification period)
    patch_succeeded_twice     attempt_succeeded of the same operation, when the first had left the mentor in sync
                              and no status_changed or sync_requested came between them (by seq)

What a legitimate second PATCH looks like, so the third rule leaves it alone: it answers something. A change writes
status_changed; a force sync, a dead-letter re-queue and reconciliation write sync_requested — any of these between
two successes makes the second one legitimate. A retry after an ambiguous timeout is not reported either: the
timed-out attempt is an attempt_failed, so there is one success. Nor is the second PATCH after a change that
committed late (a lower seq than the first success): the fold leaves that first success ``pending`` — it did not
answer the late change — so the rule only arms on a success that left the mentor ``in_sync``. What remains is two
senders answering the same change: a standby that did not stand by, or a bug. An auto_transitioned without a
certification date (the mentor never had one) has no period and is not compared.

The findings are a projection like ``sync_status``: ``Detector`` folds a mentor's events into a ``DuplicateState``
(what the rules found, and which findings duplicate_detected events already raised), beside
``projections.MentorFold`` in the same pass (``hlf_actors.replay.fold_mentor``). Raising appends a
duplicate_detected event and inserts its ``duplicate_findings`` row in one transaction, under a lock on that table
and only for a key not there yet: once per finding, however many replays or periodic checks find it. The ops
alert is sent from that row — ``alerted_at`` is its outbox — by the live service's leader (``watch``), so a finding
raised by ``hlf-actors replay`` is pushed by the running service within one sweep interval.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import anyio
import msgspec
import psycopg
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from . import db
from .alerting import Alerting
from .events import (
    AttemptFailed,
    AttemptSucceeded,
    AutoTransitioned,
    DeadLettered,
    DuplicateDetected,
    Event,
    ReminderSent,
    Requeued,
    StatusChanged,
    SyncRequested,
    SyncSkipped,
    UnknownPayload,
    encode_payload,
)

__all__ = [
    "DETECTED_KINDS",
    "RULES",
    "Detector",
    "DuplicateState",
    "Finding",
    "FindingRow",
    "raise_findings",
    "send_pending_alerts",
    "watch",
]

Rule = Literal["reminder_sent_twice", "auto_transitioned_twice", "patch_succeeded_twice"]
RULES: tuple[Rule, ...] = ("reminder_sent_twice", "auto_transitioned_twice", "patch_succeeded_twice")
# Kinds the detector reads besides the projected ones (those it needs for the third rule).
DETECTED_KINDS: tuple[str, ...] = ("reminder_sent", "auto_transitioned", "duplicate_detected")

DETECT_EVERY_S = 600.0


class Finding(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What a rule found: the key is deterministic, so the same duplicate is the same finding on every run."""

    key: str
    rule: Rule
    mentor_id: UUID
    seqs: tuple[int, ...]
    detail: str


class FindingRow(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A ``duplicate_findings`` row as its duplicate_detected event defines it (``alerted_at`` is not projected)."""

    key: str
    rule: str
    mentor_id: UUID
    seqs: tuple[int, ...]
    event_seq: int
    detected_at: datetime


class DuplicateState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One mentor's duplicate detection, folded up to some event; stored in projection_snapshots at an archive cut."""

    reminders: dict[str, int] = {}  # "threshold_day/expiry" → seq of the first reminder
    transitions: dict[str, int] = {}  # expiry → seq of the first auto_transitioned
    armed_seq: int | None = None  # the last success, if it left the mentor in sync and nothing asked since
    armed_operation: str | None = None
    found: tuple[Finding, ...] = ()
    raised: tuple[FindingRow, ...] = ()

    def unraised(self) -> list[Finding]:
        if not self.found:
            return []
        done = {row.key for row in self.raised}
        return [f for f in self.found if f.key not in done]


_OTHER_PROJECTED = frozenset({AttemptFailed, DeadLettered, Requeued, SyncSkipped})


class Detector:
    """Folds one mentor's events, in seq order, into a DuplicateState. Pure: no clock, no I/O.

    Mutable inside for speed (replay runs it over millions of events); ``state()`` hands out the frozen result.
    """

    __slots__ = ("_armed_op", "_armed_seq", "_found", "_mentor", "_raised", "_reminders", "_transitions")

    def __init__(self, mentor_id: UUID, start: DuplicateState | None = None) -> None:
        self._mentor = mentor_id
        if start is None:  # most of replay's mentors: no copies to make
            self._reminders: dict[str, int] = {}
            self._transitions: dict[str, int] = {}
            self._armed_seq: int | None = None
            self._armed_op: str | None = None
            self._found: list[Finding] = []
            self._raised: list[FindingRow] = []
            return
        self._reminders = dict(start.reminders)
        self._transitions = dict(start.transitions)
        self._armed_seq = start.armed_seq
        self._armed_op = start.armed_operation
        self._found = list(start.found)
        self._raised = list(start.raised)

    def step(self, event: Event, sync_state: str | None) -> None:
        """Fold one event; ``sync_state`` is the mentor's sync state *after* it (``projections.MentorFold``)."""
        # Exact type checks, not isinstance: payload classes have no subclasses, and isinstance against a msgspec
        # Struct class that is not the object's own goes through the metaclass, once per event of replay.
        payload = event.payload
        cls = type(payload)
        if cls in _OTHER_PROJECTED:
            return  # nothing for these rules
        if type(payload) is AttemptSucceeded:
            if self._armed_seq is not None and self._armed_op == payload.operation:
                self._find(
                    "patch_succeeded_twice",
                    payload.operation,
                    self._armed_seq,
                    event.seq,
                    f"{payload.operation} PATCH succeeded twice with no change or sync request between",
                )
            if sync_state == "in_sync":
                self._armed_seq, self._armed_op = event.seq, payload.operation
            else:
                self._armed_seq = self._armed_op = None
        elif cls is StatusChanged or cls is SyncRequested:
            self._armed_seq = self._armed_op = None
        elif event.kind == "reminder_sent":
            threshold = _field(payload, "threshold_day")
            expiry = _field(payload, "certification_expiry_date")
            if threshold is not None and expiry is not None:
                natural = f"{threshold}/{expiry}"
                first = self._reminders.setdefault(natural, event.seq)
                if first != event.seq:
                    self._find(
                        "reminder_sent_twice",
                        natural,
                        first,
                        event.seq,
                        f"{threshold}-day reminder for the certification expiring {expiry} sent twice",
                    )
        elif event.kind == "auto_transitioned":
            expiry = _field(payload, "certification_expiry_date")
            if expiry is not None:
                first = self._transitions.setdefault(expiry, event.seq)
                if first != event.seq:
                    self._find(
                        "auto_transitioned_twice",
                        expiry,
                        first,
                        event.seq,
                        f"auto-transitioned twice for the certification expiring {expiry}",
                    )
        elif type(payload) is DuplicateDetected:
            self._raised.append(
                FindingRow(
                    key=payload.finding,
                    rule=payload.rule,
                    mentor_id=self._mentor,
                    seqs=payload.seqs,
                    event_seq=event.seq,
                    detected_at=event.recorded_at,
                )
            )

    def _find(self, rule: Rule, natural: str, first: int, second: int, detail: str) -> None:
        key = f"{rule}:{self._mentor}:{natural}:{first}:{second}"
        detail = f"{detail} (events {first} and {second})"
        self._found.append(Finding(key=key, rule=rule, mentor_id=self._mentor, seqs=(first, second), detail=detail))

    def state(self) -> DuplicateState:
        return DuplicateState(
            reminders=dict(self._reminders) if self._reminders else {},
            transitions=dict(self._transitions) if self._transitions else {},
            armed_seq=self._armed_seq,
            armed_operation=self._armed_op,
            found=tuple(self._found) if self._found else (),
            raised=tuple(self._raised) if self._raised else (),
        )


def _field(payload: object, name: str) -> str | None:
    """A payload field as text, from the struct or, for a payload that did not decode (an older or newer shape),
    from its raw data — so a reminder the current struct cannot read is still compared."""
    if isinstance(payload, ReminderSent | AutoTransitioned):
        value = getattr(payload, name, None)
    elif isinstance(payload, UnknownPayload):
        value = payload.raw.get(name)
    else:
        return None
    return None if value is None else str(value)


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
    from .replay import DuplicateScan  # replay builds on this module

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


async def _in_thread(job: Callable[[threading.Event], list[FindingRow]]) -> list[FindingRow]:
    stop = threading.Event()
    try:
        return await anyio.to_thread.run_sync(job, stop, abandon_on_cancel=True)
    finally:
        stop.set()  # cancelled: the abandoned thread stops at its next mentor and closes its connection
