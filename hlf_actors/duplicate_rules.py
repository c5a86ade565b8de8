"""The duplicate rules: what ``duplicate_findings`` projects, as one pure fold per mentor (no clock, no I/O).

"    rule                      two events of one mentor that should have been one
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

``projections.fold_mentor`` runs ``Detector`` beside ``MentorFold``, handing it the sync state after each event.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

import msgspec

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
)

__all__ = ["DETECTED_KINDS", "RULES", "Detector", "DuplicateState", "Finding", "FindingRow"]

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
