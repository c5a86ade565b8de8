"""``decode_event``: every kind round-trips, and bad rows become ``UnknownPayload`` instead of stopping replay."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any
from uuid import UUID

import msgspec
import pytest

from hlf_actors.events import (
    CURRENT_VERSION,
    AlertFailed,
    AlertSent,
    AttemptFailed,
    AttemptSucceeded,
    AutoTransitioned,
    CircuitClosed,
    CircuitOpened,
    CredentialCheck,
    DeadLettered,
    DuplicateDetected,
    NewEvent,
    Payload,
    ReconcileFinished,
    ReminderSent,
    Requeued,
    StatusChanged,
    SyncRequested,
    SyncSkipped,
    UnknownPayload,
    decode_event,
    encode_payload,
)

MENTOR = UUID("6f1c2b1e-0000-4000-8000-000000000001")
RECORD = UUID("6f1c2b1e-0000-4000-8000-0000000000aa")
CERT = UUID("6f1c2b1e-0000-4000-8000-0000000000cc")
AT = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

# One of each kind, every optional field filled in, so a dropped field shows.
EXAMPLES: dict[str, Payload] = {
    "status_changed": StatusChanged(
        cause="certification_updated",
        status="active",
        previous_status="paused",
        portal_record_id=RECORD,
        certification_id=CERT,
        expires_on="2026-01-31",
    ),
    "sync_requested": SyncRequested(reason="requeue", dead_letter_id=42),
    "attempt_succeeded": AttemptSucceeded(
        operation="restore", attempt=2, http_status=204, for_seq=17, duration_ms=12.5, snapshot="100:105:101,103"
    ),
    "attempt_failed": AttemptFailed(
        operation="remove",
        attempt=3,
        http_status=503,
        retryable=True,
        delay_ms=8000,
        error="PATCH answered 503: busy",
        for_seq=17,
        throttled=True,
        snapshot="100:100:",
    ),
    "sync_skipped": SyncSkipped(operation="remove", reason="no portal record", for_seq=9, snapshot="5:5:"),
    "dead_lettered": DeadLettered(operation="remove", attempts=5, last_error="403", for_seq=18, snapshot="1:2:"),
    "requeued": Requeued(dead_letter_id=18),
    "alert_sent": AlertSent(alert="hlf_sync_failure", target="topic:org-1", message_id="m-1", dead_letter_id=18),
    "alert_failed": AlertFailed(
        alert="hlf_sync_failure", target="device:abc…", error="UNREGISTERED", unregistered=True, dead_letter_id=18
    ),
    "circuit_opened": CircuitOpened(failing_mentors=12),
    "circuit_closed": CircuitClosed(),
    "reminder_sent": ReminderSent(
        threshold_day=14,
        days_left=13,
        certification_expiry_date=date(2025, 3, 14),
        night=date(2025, 3, 1),
        targets=3,
        delivered=2,
    ),
    "credential_check": CredentialCheck(
        ok=False,
        error="token endpoint refused the credentials (401)",
        transition="failed",
        trigger="cli",
        duration_ms=41.5,
    ),
    "reconcile_finished": ReconcileFinished(
        portal_records=120,
        mentors_checked=118,
        divergent=2,
        missing=1,
        orphans=3,
        requests=3,
        pages=2,
        duration_ms=812.25,
        absent_ok=4,
        dead_lettered=1,
    ),
    "duplicate_detected": DuplicateDetected(
        finding="reminder:m-1:14:2025-03-14:40,41", rule="reminder", seqs=(40, 41), detail="sent twice"
    ),
    "auto_transitioned": AutoTransitioned(
        from_="active", to="expired_cert", today=date(2025, 3, 1), certification_expiry_date=date(2025, 2, 28)
    ),
}


def test_every_known_kind_has_an_example() -> None:
    # A guard, not a bug check: a new kind needs an example above so that its round trip is tested.
    assert set(CURRENT_VERSION) - set(EXAMPLES) == set(), "add an example of each new kind to EXAMPLES"
    assert set(EXAMPLES) - set(CURRENT_VERSION) == set()


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_each_kind_round_trips(kind: str) -> None:
    payload = EXAMPLES[kind]
    assert NewEvent(MENTOR, payload).kind == kind
    encoded = encode_payload(payload)
    # As JSON bytes, as JSON text (data::text) and as the dict psycopg makes of jsonb.
    for data in (encoded, encoded.decode(), msgspec.json.decode(encoded)):
        event = decode_event(7, MENTOR, kind, CURRENT_VERSION[kind], data, AT, xid=99)

        assert type(event.payload) is type(payload)
        assert event.payload == payload
        assert (event.seq, event.mentor_id, event.kind, event.version, event.recorded_at, event.xid) == (
            7,
            MENTOR,
            kind,
            1,
            AT,
            99,
        )


def test_missing_optional_fields_take_their_defaults() -> None:
    event = decode_event(1, MENTOR, "status_changed", 1, {"cause": "mentor_created"}, AT)
    assert event.payload == StatusChanged(cause="mentor_created")


def test_unknown_fields_are_ignored_not_fatal() -> None:
    event = decode_event(1, MENTOR, "requeued", 1, {"dead_letter_id": 5, "added_later": True}, AT)
    assert event.payload == Requeued(dead_letter_id=5)


def _decodes_to_unknown(kind: str, version: int, data: Any) -> UnknownPayload:
    event = decode_event(3, MENTOR, kind, version, data, AT)
    assert isinstance(event.payload, UnknownPayload), event.payload
    assert (event.seq, event.kind, event.version) == (3, kind, version)  # the envelope survives for display
    return event.payload


def test_an_unknown_kind_is_kept_raw() -> None:
    data = {"colour": "blue", "n": 3}
    assert _decodes_to_unknown("teleported", 1, data).raw == data
    assert _decodes_to_unknown("teleported", 1, msgspec.json.encode(data)).raw == data


def test_a_version_newer_than_known_is_kept_raw() -> None:
    data = msgspec.json.decode(encode_payload(EXAMPLES["attempt_failed"]))
    payload = _decodes_to_unknown("attempt_failed", CURRENT_VERSION["attempt_failed"] + 1, data)
    assert payload.raw == data


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        (
            "attempt_failed",
            {
                "operation": "remove",
                "attempt": "many",
                "http_status": 503,
                "retryable": True,
                "delay_ms": 10,
                "error": "x",
                "for_seq": 1,
            },
        ),
        ("attempt_succeeded", {"operation": "delete", "attempt": 1, "http_status": 204, "for_seq": 1}),
        ("status_changed", {"cause": "x", "portal_record_id": "not-a-uuid"}),
        ("requeued", {"dead_letter_id": [1, 2]}),
        ("dead_lettered", {"operation": "remove"}),  # required fields missing
        ("sync_requested", '["reason", "force"]'),  # JSON, but not an object
        ("circuit_opened", "17"),
    ],
)
def test_data_of_the_wrong_type_is_kept_raw(kind: str, data: Any) -> None:
    payload = _decodes_to_unknown(kind, 1, data)
    assert payload.raw  # what was there is kept for display


@pytest.mark.parametrize("data", ['{"cause": "mentor_created"', "not json at all", b"\xff\xfe{", ""])
def test_undecodable_json_text_is_kept_raw(data: str | bytes) -> None:
    payload = _decodes_to_unknown("status_changed", 1, data)
    assert "undecodable" in payload.raw


@pytest.mark.parametrize("version", [0, -1])
def test_a_version_older_than_any_known_is_kept_raw(version: int) -> None:
    # event_log.version is a bare smallint (no CHECK >= 1) and hlf_append_event takes it from the caller.
    data = {"cause": "mentor_created"}
    assert _decodes_to_unknown("status_changed", version, data).raw == data
