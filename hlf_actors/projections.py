"""The pure rules of every projection of the event log: ``sync_status`` and ``dead_letters`` (``MentorFold``) and
``duplicate_findings`` (``Detector``), one fold per mentor, no clock and no I/O.

Each rule lives here and nowhere else: the live path runs ``MentorFold`` through ``apply`` and ``fold``
(``writer.py`` holds the SQL that appends events and writes the folded rows); replay, archival and the duplicate
scan run both rules in one pass with ``fold_mentor``.

    sync_status.state
                      status_changed / sync_requested
        (none) ─────────────────────────────────────────▶ pending ◀──────────────┐
                                                           │  │                  │ a newer change or a
                          attempt_succeeded / sync_skipped │  │ attempt_failed   │ re-queue
                                                           ▼  ▼ (retryable)      │
                                                     in_sync  retrying ──────────┤
                                                                 │ dead_lettered │
                                                                 ▼               │
                                                           dead_lettered ────────┘

Which changes an outcome answers: every change event adds its transaction id to ``uncovered_xids``; an outcome
carries the snapshot of the read its PATCH was computed from, and removes the transactions visible in it. The mentor
is in sync only when none is left: a change whose transaction committed after that read (whatever its seq) keeps
the mentor ``pending`` and the actor sends again. (Outcomes written before snapshots existed compare ``for_seq``.)

Live folding is incremental while events arrive in ``seq`` order. When an event arrives whose ``seq`` is below what
the row already folded (its transaction committed late), the mentor is re-folded from the log in ``seq`` order, so
the live projection always equals what replay computes: fold(all projected events of the mentor, by seq).

The duplicate rules (``Detector``), two events of one mentor that should have been one:

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
certification date (the mentor never had one) has no period and is not compared. Raising a finding is
``duplicates.py``'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal
from uuid import UUID

import msgspec

from .events import (
    AttemptFailed,
    AttemptSucceeded,
    AutoTransitioned,
    DeadLettered,
    DuplicateDetected,
    Event,
    NewEvent,
    Operation,
    Payload,
    ReminderSent,
    Requeued,
    StatusChanged,
    SyncRequested,
    SyncSkipped,
    UnknownPayload,
    not_visible_in,
)

__all__ = [
    "DETECTED_KINDS",
    "OPEN_STATES",
    "PROJECTED_KINDS",
    "RULES",
    "DeadLetterRow",
    "Detector",
    "DuplicateState",
    "Finding",
    "FindingRow",
    "MentorFold",
    "MentorProjection",
    "MentorState",
    "SyncRow",
    "apply",
    "fold",
    "fold_mentor",
]

State = Literal["pending", "retrying", "in_sync", "dead_lettered"]
OPEN_STATES: frozenset[str] = frozenset({"pending", "retrying"})
PROJECTED_KINDS: tuple[str, ...] = (
    "status_changed",
    "sync_requested",
    "attempt_succeeded",
    "attempt_failed",
    "sync_skipped",
    "dead_lettered",
    "requeued",
)
_PROJECTED_TYPES = (
    StatusChanged,
    SyncRequested,
    AttemptSucceeded,
    AttemptFailed,
    SyncSkipped,
    DeadLettered,
    Requeued,
)


# gc=False: immutable values only, never in a reference cycle; not tracked by the cycle collector (events.py).
class SyncRow(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    mentor_id: UUID
    operation: Operation | None
    state: State
    attempts: int
    last_error: str | None
    updated_at: datetime
    portal_record_id: UUID | None
    listed: bool | None
    change_seq: int
    uncovered_xids: tuple[int, ...]  # transactions whose changes no outcome has answered yet
    next_attempt_at: datetime | None
    last_seq: int


class DeadLetterRow(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    id: int
    mentor_id: UUID
    operation: str
    attempts: int
    last_error: str | None
    dead_lettered_at: datetime
    requeued_at: datetime | None
    # Set when a later attempt for the mentor succeeded and left it in sync: the letter closed itself. (Defaults:
    # archive snapshots written before the columns existed decode as "not resolved".)
    resolved_at: datetime | None = None
    resolved_seq: int | None = None

    @property
    def open(self) -> bool:
        return self.requeued_at is None and self.resolved_at is None


class MentorProjection(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    mentor_id: UUID
    sync: SyncRow | None = None
    dead_letters: tuple[DeadLetterRow, ...] = ()


def is_projected(event: Event | NewEvent) -> bool:
    return event.mentor_id is not None and isinstance(event.payload, _PROJECTED_TYPES)


def apply(state: MentorProjection, event: Event) -> MentorProjection:
    """Fold one event into a mentor's projection. Pure: same inputs, same output, no clock, no I/O."""
    folding = MentorFold(state.mentor_id, state)
    folding.step(event)
    return folding.projection()


def fold(mentor_id: UUID, events: Iterable[Event], start: MentorProjection | None = None) -> MentorProjection:
    folding = MentorFold(mentor_id, start)
    step = folding.step
    for event in events:
        step(event)
    return folding.projection()


class MentorFold:
    """Folds one mentor's events, in seq order, into its projection: the rule itself, which ``apply`` and ``fold``
    wrap and ``fold_mentor`` runs beside the duplicate rules.

    Pure: no clock, no I/O. Mutable inside for speed: replay folds millions of events, and rebuilding the frozen
    rows after each one would dominate its cost. ``projection()`` hands out the frozen result; ``state`` is the sync
    state so far (None until the first change).
    """

    __slots__ = (
        "_changed",
        "_dead_letters",
        "_start",
        "attempts",
        "change_seq",
        "last_error",
        "last_seq",
        "listed",
        "mentor_id",
        "next_attempt_at",
        "operation",
        "portal_record_id",
        "state",
        "uncovered_xids",
        "updated_at",
    )

    def __init__(self, mentor_id: UUID, start: MentorProjection | None = None) -> None:
        self._start = start
        self._changed = False
        self.mentor_id = start.mentor_id if start is not None else mentor_id
        self._dead_letters = list(start.dead_letters) if start is not None else []
        sync = start.sync if start is not None else None
        self.state: State | None = sync.state if sync is not None else None
        self.operation: Operation | None = sync.operation if sync is not None else None
        self.attempts = sync.attempts if sync is not None else 0
        self.last_error = sync.last_error if sync is not None else None
        self.updated_at: datetime | None = sync.updated_at if sync is not None else None
        self.portal_record_id = sync.portal_record_id if sync is not None else None
        self.listed = sync.listed if sync is not None else None
        self.change_seq = sync.change_seq if sync is not None else 0
        self.uncovered_xids: tuple[int, ...] = sync.uncovered_xids if sync is not None else ()
        self.next_attempt_at = sync.next_attempt_at if sync is not None else None
        self.last_seq = sync.last_seq if sync is not None else 0

    def step(self, event: Event) -> None:
        """Fold the next event (by seq)."""
        payload = event.payload
        handler = _HANDLERS.get(type(payload))
        if handler is None or event.mentor_id is None:
            return  # not projected (alerts, reminders, …): the projection is left as it was
        if self.state is None and not isinstance(payload, StatusChanged | SyncRequested):
            return  # an outcome with no change before it cannot happen live; a trimmed log may start like this
        handler(self, event, payload)
        self.updated_at = event.recorded_at
        self.last_seq = event.seq
        self._changed = True

    def projection(self) -> MentorProjection:
        if not self._changed:
            return self._start if self._start is not None else MentorProjection(mentor_id=self.mentor_id)
        sync = None
        if self.state is not None:
            assert self.updated_at is not None
            sync = SyncRow(
                mentor_id=self.mentor_id,
                operation=self.operation,
                state=self.state,
                attempts=self.attempts,
                last_error=self.last_error,
                updated_at=self.updated_at,
                portal_record_id=self.portal_record_id,
                listed=self.listed,
                change_seq=self.change_seq,
                uncovered_xids=self.uncovered_xids,
                next_attempt_at=self.next_attempt_at,
                last_seq=self.last_seq,
            )
        return MentorProjection(mentor_id=self.mentor_id, sync=sync, dead_letters=tuple(self._dead_letters))

    def _change(self, event: Event, payload: StatusChanged | SyncRequested) -> None:
        if type(payload) is StatusChanged and payload.cause.startswith("mentor_"):
            self.portal_record_id = payload.portal_record_id
        self.state = "pending"
        self.attempts = 0
        self.change_seq = event.seq
        xids = self.uncovered_xids
        self.uncovered_xids = tuple(sorted({*xids, event.xid})) if xids else (event.xid,)
        self.next_attempt_at = None

    def _answered(self, payload: AttemptSucceeded | AttemptFailed | SyncSkipped | DeadLettered) -> bool:
        """Take the changes the outcome answered off ``uncovered_xids``; whether none is left. (Callers skip the call
        when none was left before it.)"""
        xids = self.uncovered_xids
        if payload.snapshot is not None:
            xids = self.uncovered_xids = not_visible_in(xids, payload.snapshot)
        elif payload.for_seq >= self.change_seq:
            xids = self.uncovered_xids = ()
        return not xids

    def _succeeded(self, event: Event, payload: AttemptSucceeded) -> None:
        current = not self.uncovered_xids or self._answered(payload)
        self.operation = payload.operation
        self.state = "in_sync" if current else "pending"
        self.attempts = payload.attempt
        self.last_error = None
        self.listed = payload.operation == "restore"
        self.next_attempt_at = None
        if current:
            # The portal now agrees with the mentor's latest state: whatever an open dead letter failed to send is
            # moot, and re-queueing it would only send a redundant PATCH.
            letters = self._dead_letters
            for i, letter in enumerate(letters):
                if letter.open:
                    letters[i] = msgspec.structs.replace(letter, resolved_at=event.recorded_at, resolved_seq=event.seq)

    def _skipped(self, event: Event, payload: SyncSkipped) -> None:
        current = not self.uncovered_xids or self._answered(payload)
        self.operation = payload.operation
        self.state = "in_sync" if current else "pending"
        self.last_error = None
        self.next_attempt_at = None

    def _failed(self, event: Event, payload: AttemptFailed) -> None:
        current = not self.uncovered_xids or self._answered(payload)
        self.operation = payload.operation
        if not current:
            self.state = "pending"
        elif payload.retryable:
            self.state = "retrying"
        self.attempts = payload.attempt - 1 if payload.throttled else payload.attempt
        self.last_error = payload.error
        delay_ms = payload.delay_ms
        self.next_attempt_at = (
            event.recorded_at + timedelta(milliseconds=delay_ms) if current and delay_ms is not None else None
        )

    def _dead_lettered(self, event: Event, payload: DeadLettered) -> None:
        current = not self.uncovered_xids or self._answered(payload)
        self._dead_letters.append(
            DeadLetterRow(
                id=event.seq,
                mentor_id=self.mentor_id,
                operation=payload.operation,
                attempts=payload.attempts,
                last_error=payload.last_error,
                dead_lettered_at=event.recorded_at,
                requeued_at=None,
            )
        )
        self.operation = payload.operation
        self.state = "dead_lettered" if current else "pending"
        self.attempts = payload.attempts
        self.last_error = payload.last_error
        self.next_attempt_at = None

    def _requeued(self, event: Event, payload: Requeued) -> None:
        letters = self._dead_letters
        for i, letter in enumerate(letters):
            if letter.id == payload.dead_letter_id and letter.requeued_at is None:
                letters[i] = msgspec.structs.replace(letter, requeued_at=event.recorded_at)


# The projected payload types and what each does, looked up by type: one dict lookup per event instead of a chain
# of isinstance checks (replay's profile).
_HANDLERS: dict[type[Payload], Callable[[MentorFold, Event, Any], None]] = {
    StatusChanged: MentorFold._change,
    SyncRequested: MentorFold._change,
    AttemptSucceeded: MentorFold._succeeded,
    AttemptFailed: MentorFold._failed,
    SyncSkipped: MentorFold._skipped,
    DeadLettered: MentorFold._dead_lettered,
    Requeued: MentorFold._requeued,
}
assert set(_HANDLERS) == set(_PROJECTED_TYPES)


# ---------------------------------------------------------------------------------------------------------------
# The duplicate rules: what ``duplicate_findings`` projects.

Rule = Literal["reminder_sent_twice", "auto_transitioned_twice", "patch_succeeded_twice"]
RULES: tuple[Rule, ...] = ("reminder_sent_twice", "auto_transitioned_twice", "patch_succeeded_twice")
# Kinds the detector reads besides the projected ones (those it needs for the third rule).
DETECTED_KINDS: tuple[str, ...] = ("reminder_sent", "auto_transitioned", "duplicate_detected")



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
        """Fold one event; ``sync_state`` is the mentor's sync state *after* it (``MentorFold``)."""
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
# Every projection of one mentor, in one pass.

class MentorState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Everything the log projects for one mentor; what projection_snapshots stores at an archive cut."""

    projection: MentorProjection
    duplicates: DuplicateState


def fold_mentor(mentor_id: UUID, events: Sequence[Event], start: MentorState | None = None) -> MentorState:
    """Fold a mentor's events (in seq order) into every projection. Pure; the live path folds with the same
    ``MentorFold`` (through ``apply``), and the duplicate rules see the sync state after each event."""
    folding = MentorFold(mentor_id, start.projection if start is not None else None)
    detector = Detector(mentor_id, start.duplicates if start is not None else None)
    step, detect = folding.step, detector.step
    for event in events:
        step(event)
        detect(event, folding.state)
    return MentorState(projection=folding.projection(), duplicates=detector.state())
