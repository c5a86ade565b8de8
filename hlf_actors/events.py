"""The events in ``event_log``: one frozen msgspec struct per kind, decoded once at the edge.

A row becomes an ``Event`` (envelope) whose ``payload`` is the struct for its kind and version. Projections and
the CLI only ever see these structs, never dicts. A kind this code does not know decodes to ``UnknownPayload``:
projections ignore it and replay goes on, so an old binary never chokes on a newer log.

Versions: every kind starts at version 1. When a payload changes shape, add the new struct, bump
``CURRENT_VERSION`` for the kind and keep an upgrade function for the old version in ``_UPGRADES``, so that old
events still replay to the same projections.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import msgspec

__all__ = [
    "AlertFailed",
    "AlertSent",
    "AttemptFailed",
    "AttemptSucceeded",
    "CircuitClosed",
    "CircuitOpened",
    "DeadLettered",
    "Event",
    "NewEvent",
    "Operation",
    "Payload",
    "Requeued",
    "StatusChanged",
    "SyncRequested",
    "SyncSkipped",
    "UnknownPayload",
    "decode_event",
    "encode_payload",
]

Operation = Literal["remove", "restore"]


class _Payload(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    pass


class StatusChanged(_Payload, frozen=True, kw_only=True):
    """A mentor or certification row changed in a way that may change the mentor's eligibility."""

    cause: str
    status: str | None = None
    previous_status: str | None = None
    portal_record_id: UUID | None = None
    certification_id: UUID | None = None
    expires_on: str | None = None


class SyncRequested(_Payload, frozen=True, kw_only=True):
    """Someone asked for the mentor to be sent again: force sync, dead-letter re-queue, reconciliation."""

    reason: str
    dead_letter_id: int | None = None


class AttemptSucceeded(_Payload, frozen=True, kw_only=True):
    operation: Operation
    attempt: int
    http_status: int
    for_seq: int  # the newest sync-asking event the actor had seen when it read the mentor
    duration_ms: float | None = None
    snapshot: str | None = None  # pg_current_snapshot() of that read: which changes this outcome answers


class AttemptFailed(_Payload, frozen=True, kw_only=True):
    operation: Operation
    attempt: int
    http_status: int | None
    retryable: bool
    delay_ms: int | None  # wait before the next attempt; None when there is none
    error: str
    for_seq: int
    throttled: bool = False  # a 429: waited out without spending an attempt
    snapshot: str | None = None


class SyncSkipped(_Payload, frozen=True, kw_only=True):
    """Nothing to send: e.g. removing a mentor who has no portal record, so is not listed anyway."""

    operation: Operation
    reason: str
    for_seq: int
    snapshot: str | None = None


class DeadLettered(_Payload, frozen=True, kw_only=True):
    operation: Operation
    attempts: int
    last_error: str
    for_seq: int
    snapshot: str | None = None


class Requeued(_Payload, frozen=True, kw_only=True):
    dead_letter_id: int


class AlertSent(_Payload, frozen=True, kw_only=True):
    alert: str  # the payload's "type"
    target: str  # "topic:<name>" or a shortened device token, never a whole one
    message_id: str | None = None
    dead_letter_id: int | None = None  # the dead letter this alert is about, if any


class AlertFailed(_Payload, frozen=True, kw_only=True):
    alert: str
    target: str
    error: str
    unregistered: bool = False
    dead_letter_id: int | None = None


class CircuitOpened(_Payload, frozen=True, kw_only=True):
    """Calls for many mentors failed at once: the portal is down for everyone, sending is paused."""

    failing_mentors: int


class CircuitClosed(_Payload, frozen=True, kw_only=True):
    """The portal answered again after an outage."""


class UnknownPayload(_Payload, frozen=True, kw_only=True):
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
    | UnknownPayload
)

_KINDS: dict[str, type[_Payload]] = {
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
}
_KIND_OF: dict[type[_Payload], str] = {v: k for k, v in _KINDS.items()}

CURRENT_VERSION: dict[str, int] = dict.fromkeys(_KINDS, 1)

# (kind, old version) → function turning an old payload dict into the current one.
_UPGRADES: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {}


class Event(msgspec.Struct, frozen=True, kw_only=True):
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


def decode_event(
    seq: int,
    mentor_id: UUID | None,
    kind: str,
    version: int,
    data: Mapping[str, Any] | str | bytes,
    recorded_at: datetime,
    xid: int = 0,
) -> Event:
    """Turn an event_log row into an Event. Never raises for bad data: it becomes UnknownPayload."""
    raw: dict[str, Any]
    if isinstance(data, str | bytes):
        try:
            decoded = msgspec.json.decode(data)
        except msgspec.DecodeError:
            decoded = {"undecodable": str(data)[:200]}
        raw = decoded if isinstance(decoded, dict) else {"value": decoded}
    else:
        raw = dict(data)
    payload_type = _KINDS.get(kind)
    payload: Payload
    if payload_type is None or version > CURRENT_VERSION[kind]:
        payload = UnknownPayload(raw=raw)
    else:
        body = raw
        for old in range(version, CURRENT_VERSION[kind]):
            body = _UPGRADES[(kind, old)](body)
        try:
            payload = msgspec.convert(body, payload_type, strict=False)  # type: ignore[assignment]
        except msgspec.ValidationError:
            payload = UnknownPayload(raw=raw)
    return Event(
        seq=seq, mentor_id=mentor_id, kind=kind, version=version, recorded_at=recorded_at, payload=payload, xid=xid
    )


def encode_payload(payload: Payload) -> bytes:
    """The JSON stored in event_log.data for a payload."""
    return msgspec.json.encode(payload)


def visible_in(xid: int, snapshot: str) -> bool:
    """Whether transaction ``xid`` had committed in a ``pg_snapshot`` text ('xmin:xmax:xip,xip')."""
    xmin_text, xmax_text, running = snapshot.split(":")
    if xid < int(xmin_text):
        return True
    if xid >= int(xmax_text):
        return False
    return str(xid) not in running.split(",")


def kind_of(payload: Payload) -> str:
    return _KIND_OF[type(payload)]
