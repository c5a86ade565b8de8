"""The events in ``event_log``: one frozen msgspec struct per kind, decoded once at the edge.

A row becomes an ``Event`` (envelope) whose ``payload`` is the struct for its kind and version (``event_codec.py``
decodes rows). Projections and
the CLI only ever see these structs, never dicts. A kind this code does not know decodes to ``UnknownPayload``:
projections ignore it and replay goes on, so an old binary never chokes on a newer log.

Versions: every kind starts at version 1. When a payload changes shape, add the new struct, bump
``CURRENT_VERSION`` for the kind and keep an upgrade function for the old version in ``UPGRADES``, so that old
events still replay to the same projections.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime
from typing import Any, Literal
from uuid import UUID

import msgspec

__all__ = [
    "CURRENT_VERSION",
    "KINDS",
    "UPGRADES",
    "AlertFailed",
    "AlertSent",
    "AttemptFailed",
    "AttemptSucceeded",
    "AutoTransitioned",
    "BasePayload",
    "CircuitClosed",
    "CircuitOpened",
    "ConsoleAction",
    "CredentialCheck",
    "DeadLettered",
    "DeviceDead",
    "DuplicateDetected",
    "Event",
    "NewEvent",
    "Operation",
    "Payload",
    "PublicListingConfirmed",
    "PublicListingStale",
    "ReconcileAborted",
    "ReconcileFinished",
    "ReminderSent",
    "Requeued",
    "StatusChanged",
    "SyncRequested",
    "SyncSkipped",
    "UnknownPayload",
    "encode_payload",
]

Operation = Literal["remove", "restore"]


# gc=False here and on Event: frozen structs of immutable values can never be part of a reference cycle, so the
# cycle collector need not track the millions of them replay makes (bench/NOTES.md). UnknownPayload
# holds a dict, and is tracked.
class BasePayload(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False, gc=False):
    pass


class StatusChanged(BasePayload, frozen=True, kw_only=True):
    """A mentor or certification row changed in a way that may change the mentor's eligibility."""

    cause: str
    status: str | None = None
    previous_status: str | None = None
    portal_record_id: UUID | None = None
    certification_id: UUID | None = None
    expires_on: str | None = None


class SyncRequested(BasePayload, frozen=True, kw_only=True):
    """Someone asked for the mentor to be sent again: force sync, dead-letter re-queue, reconciliation."""

    reason: str
    dead_letter_id: int | None = None
    portal_listed: bool | None = None  # reconcile: what the portal said (None: no such record)
    expected: bool | None = None  # reconcile: what the database says it should be


class AttemptSucceeded(BasePayload, frozen=True, kw_only=True):
    operation: Operation
    attempt: int
    http_status: int
    for_seq: int  # the newest sync-asking event the actor had seen when it read the mentor
    duration_ms: float | None = None
    snapshot: str | None = None  # pg_current_snapshot() of that read: which changes this outcome answers


class AttemptFailed(BasePayload, frozen=True, kw_only=True):
    operation: Operation
    attempt: int
    http_status: int | None
    retryable: bool
    delay_ms: int | None  # wait before the next attempt; None when there is none
    error: str
    for_seq: int
    throttled: bool = False  # a 429: waited out without spending an attempt
    snapshot: str | None = None


class SyncSkipped(BasePayload, frozen=True, kw_only=True):
    """Nothing to send: e.g. removing a mentor who has no portal record, so is not listed anyway."""

    operation: Operation
    reason: str
    for_seq: int
    snapshot: str | None = None


class DeadLettered(BasePayload, frozen=True, kw_only=True):
    operation: Operation
    attempts: int
    last_error: str
    for_seq: int
    snapshot: str | None = None


class Requeued(BasePayload, frozen=True, kw_only=True):
    dead_letter_id: int


class AlertSent(BasePayload, frozen=True, kw_only=True):
    alert: str  # the payload's "type"
    target: str  # "topic:<name>" or a shortened device token, never a whole one
    message_id: str | None = None
    dead_letter_id: int | None = None  # the dead letter this alert is about, if any


class AlertFailed(BasePayload, frozen=True, kw_only=True):
    alert: str
    target: str
    error: str
    unregistered: bool = False
    dead_letter_id: int | None = None
    will_retry: bool = False  # an ops alert kept in hlf_ops_outbox: sent again with backoff for up to 24 h


class DeviceDead(BasePayload, frozen=True, kw_only=True):
    """FCM called a coordinator device's token dead: the device is not targeted again until the app writes a new
    token for it (``hlf_dead_devices``)."""

    device_id: str  # coordinator_devices.id, as text (the app's id may be a uuid or an integer)
    organisation_id: UUID
    reason: str  # UNREGISTERED, INVALID_ARGUMENT or SENDER_ID_MISMATCH
    alert: str  # the payload type whose push found it dead


class CircuitOpened(BasePayload, frozen=True, kw_only=True):
    """Calls for many mentors failed at once: the portal is down for everyone, sending is paused."""

    failing_mentors: int


class CircuitClosed(BasePayload, frozen=True, kw_only=True):
    """The portal answered again after an outage."""


class ReminderSent(BasePayload, frozen=True, kw_only=True):
    """A certification-expiry reminder was pushed to the mentor's organisation (``hlf_actors.expiry``)."""

    threshold_day: int  # the organisation's threshold this reminder answers (reminder_days)
    days_left: int  # expiry minus the night's date; below threshold_day when a night was missed
    certification_expiry_date: date
    night: date  # the local date of the nightly check that sent it
    targets: int  # coordinator devices plus the alert topic; 0 when the organisation has neither
    delivered: int


class AutoTransitioned(BasePayload, frozen=True, kw_only=True):
    """The nightly check moved an active mentor whose certifications have all expired to ``expired_cert``."""

    from_: str = msgspec.field(name="from")
    to: str
    today: date
    certification_expiry_date: date | None = None  # the latest expiry; None when the mentor had no certification


class ReconcileFinished(BasePayload, frozen=True, kw_only=True):
    """One reconciliation of the portal's listing against the database (``hlf_actors.reconcile``). Not projected."""

    portal_records: int
    mentors_checked: int
    divergent: int  # record present, listed flag wrong
    missing: int  # record gone although the mentor should be listed
    orphans: int  # records no mentor owns: reported, never touched
    requests: int  # sync_requested events queued
    pages: int
    duration_ms: float
    absent_ok: int = 0  # record gone and the mentor should not be listed anyway
    dead_lettered: int = 0  # divergent but dead-lettered: not re-requested (the coordinators were alerted)
    syncing: int = 0  # divergent while its own sync was under way: left to its actor


class CredentialCheck(BasePayload, frozen=True, kw_only=True):
    """A tenant check (``hlf_actors.credentials``), or a sync answer that named a tenant-wide cause: ok True/False,
    or None when the portal was unreachable (no verdict). ``transition`` marks the start and the end of an incident;
    ``cause`` (a key of ``errors.TENANT_CAUSES``) says what is wrong; None on checks recorded before causes existed
    means ``credentials``. Not projected."""

    ok: bool | None
    error: str | None = None
    transition: Literal["failed", "restored"] | None = None
    trigger: str = "scheduled"
    duration_ms: float | None = None
    cause: str | None = None


class ReconcileAborted(BasePayload, frozen=True, kw_only=True):
    """A reconciliation that requested nothing because the listing it read cannot be trusted: it lacked more of the
    linked mentors' records than HLF_RECONCILE_MAX_MISSING allows (e.g. a role with user-level Read sees only the
    rows it owns). Not projected."""

    portal_records: int  # rows the read returned
    linked_mentors: int  # mentors with a portal_record_id
    missing: int  # linked mentors whose record the read lacked
    max_missing_share: float
    reason: str
    pages: int = 0
    duration_ms: float | None = None


class DuplicateDetected(BasePayload, frozen=True, kw_only=True):
    """Two log entries that should have been one (``hlf_actors.duplicates``): raised once per finding, for ops."""

    finding: str  # the finding's key: rule, mentor, natural key and the seqs involved; raising it is idempotent
    rule: str
    seqs: tuple[int, ...]  # the events that duplicate each other, first one first
    detail: str = ""


class PublicListingConfirmed(BasePayload, frozen=True, kw_only=True):
    """The public website agrees with a successful sync (``hlf_actors.listing_probe``). Not projected."""

    operation: Operation
    for_seq: int  # the attempt_succeeded it confirms
    delay_ms: int  # from that success to the first fetch of the listing that agreed: the website's cache
    exposure_ms: int  # from the change the sync answered to that fetch: what the public actually saw
    fetches: int  # listing fetches made while waiting
    # What the agreeing fetch was: the site's own data ("structured"), or an HTML page proven to be the listing
    # ("html+control"). Events written before the probe required proof have neither and read as "unverified".
    confirmed_by: Literal["structured", "html+control", "unverified"] = "unverified"


class PublicListingStale(BasePayload, frozen=True, kw_only=True):
    """The public website still disagreed with a successful sync at HLF_PUBLIC_LISTING_DEADLINE. Not projected."""

    operation: Operation
    for_seq: int
    waited_ms: int
    reason: str


class ConsoleAction(BasePayload, frozen=True, kw_only=True):
    """Someone did something from the operations console (``hlf_actors.console``): the audit log shows humans too.
    Not projected: the action's own events (``sync_requested``, ``requeued``, ``credential_check``…) do the work."""

    actor: str  # who: the signed-in account (Entra ID's preferred_username or oid), or "password" for the shared one
    action: Literal["force_sync", "requeue", "requeue_all", "reconcile", "check_credentials"]
    target: str | None = None  # the mentor or dead letter acted on, when there is one
    detail: str = ""  # how it went, in one line


class UnknownPayload(BasePayload, frozen=True, kw_only=True, gc=True):
    """A kind (or version) this code does not know. Kept so the log can be shown, ignored by projections."""

    raw: dict[str, Any] = {}


Payload = (
    StatusChanged
    | SyncRequested
    | AttemptSucceeded
    | AttemptFailed
    | SyncSkipped
    | DeadLettered
    | Requeued
    | AlertSent
    | AlertFailed
    | CircuitOpened
    | CircuitClosed
    | ReminderSent
    | AutoTransitioned
    | ReconcileFinished
    | CredentialCheck
    | ReconcileAborted
    | DuplicateDetected
    | PublicListingConfirmed
    | PublicListingStale
    | DeviceDead
    | ConsoleAction
    | UnknownPayload
)

KINDS: dict[str, type[BasePayload]] = {
    "status_changed": StatusChanged,
    "sync_requested": SyncRequested,
    "attempt_succeeded": AttemptSucceeded,
    "attempt_failed": AttemptFailed,
    "sync_skipped": SyncSkipped,
    "dead_lettered": DeadLettered,
    "requeued": Requeued,
    "alert_sent": AlertSent,
    "alert_failed": AlertFailed,
    "circuit_opened": CircuitOpened,
    "circuit_closed": CircuitClosed,
    "reconcile_finished": ReconcileFinished,
    "credential_check": CredentialCheck,
    "reconcile_aborted": ReconcileAborted,
    "reminder_sent": ReminderSent,
    "auto_transitioned": AutoTransitioned,
    "duplicate_detected": DuplicateDetected,
    "public_listing_confirmed": PublicListingConfirmed,
    "public_listing_stale": PublicListingStale,
    "device_dead": DeviceDead,
    "console_action": ConsoleAction,
}
_KIND_OF: dict[type[BasePayload], str] = {v: k for k, v in KINDS.items()}

CURRENT_VERSION: dict[str, int] = dict.fromkeys(KINDS, 1)

# (kind, old version) → function turning an old payload dict into the current one (``event_codec`` applies them).
UPGRADES: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {}


class Event(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One row of event_log, decoded."""

    seq: int
    mentor_id: UUID | None
    kind: str
    version: int
    recorded_at: datetime
    payload: Payload
    xid: int = 0  # the transaction that wrote it (xid8)


class NewEvent(msgspec.Struct, frozen=True):
    """An event about to be appended: the database gives it its seq and recorded_at."""

    mentor_id: UUID | None
    payload: Payload

    @property
    def kind(self) -> str:
        return _KIND_OF[type(self.payload)]


def encode_payload(payload: Payload) -> bytes:
    """The JSON stored in event_log.data for a payload."""
    return msgspec.json.encode(payload)


def visible_in(xid: int, snapshot: str) -> bool:
    """Whether transaction ``xid`` had committed in a ``pg_snapshot`` text ('xmin:xmax:xip,xip')."""
    return not not_visible_in((xid,), snapshot)


def not_visible_in(xids: tuple[int, ...], snapshot: str) -> tuple[int, ...]:
    """The transactions of ``xids`` that had not committed in a ``pg_snapshot`` text ('xmin:xmax:xip,xip'): those
    from xmax on, and those listed as running. (Once per outcome in replay, so it parses the text once.)"""
    xmin_text, _, rest = snapshot.partition(":")
    xmin = int(xmin_text)
    for x in xids:
        if x >= xmin:
            break
    else:
        return ()  # all finished before the snapshot was taken: the common case, kept cheap
    xmax_text, _, running = rest.partition(":")
    xmax = int(xmax_text)
    listed = running.split(",")
    return tuple(x for x in xids if x >= xmin and (x >= xmax or str(x) in listed))
