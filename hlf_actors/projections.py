"""The pure rules of the projections of the event log: ``sync_status`` and ``dead_letters`` (``MentorFold``), and
``fold_mentor``, which runs them with the duplicate rules (``duplicate_rules.Detector``) in one pass; one fold per
mentor, no clock and no I/O.

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

The duplicate rules (``Detector``) live in ``duplicate_rules.py``; ``fold_mentor`` runs them beside the sync fold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal
from uuid import UUID

import msgspec

from .duplicate_rules import Detector, DuplicateState
from .events import (
    AttemptFailed,
    AttemptSucceeded,
    DeadLettered,
    Event,
    NewEvent,
    Operation,
    Payload,
    Requeued,
    StatusChanged,
    SyncRequested,
    SyncSkipped,
    not_visible_in,
)

__all__ = [
    "OPEN_STATES",
    "PROJECTED_KINDS",
    "DeadLetterRow",
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
