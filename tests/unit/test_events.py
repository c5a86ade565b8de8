"""``decode_event``: every kind round-trips, and bad rows become ``UnknownPayload`` instead of stopping replay.
``decode_events`` (replay's batch of one mentor's rows) decodes exactly as ``decode_event`` does row by row."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any
from uuid import UUID

import msgspec
import pytest

from hlf_actors.event_codec import decode_event, decode_events
from hlf_actors.events import (
    CURRENT_VERSION,
    AlertFailed,
    AlertSent,
    AttemptFailed,
    AttemptSucceeded,
    AutoTransitioned,
    CircuitClosed,
    CircuitOpened,
    ConsoleAction,
    CredentialCheck,
    DeadLettered,
    DeviceDead,
    DuplicateDetected,
    NewEvent,
    Payload,
    PublicListingConfirmed,
    PublicListingStale,
    ReconcileAborted,
    ReconcileFinished,
    ReminderSent,
    Requeued,
    StatusChanged,
    SyncRequested,
    SyncSkipped,
    UnknownPayload,
    encode_payload,
    not_visible_in,
    visible_in,
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
        cause="credentials",
    ),
    "reconcile_aborted": ReconcileAborted(
        portal_records=6,
        linked_mentors=118,
        missing=112,
        max_missing_share=0.1,
        reason="the listing read lacks 112 of 118 linked mentors' records",
        pages=1,
        duration_ms=40.0,
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
    "public_listing_confirmed": PublicListingConfirmed(
        operation="remove", for_seq=52, delay_ms=412_000, exposure_ms=412_019, fetches=9, confirmed_by="structured"
    ),
    "public_listing_stale": PublicListingStale(
        operation="remove", for_seq=52, waited_ms=1_200_400, reason="the listing still shows the mentor"
    ),
    "device_dead": DeviceDead(
        device_id="5f0c3a52-8f0e-4c59-9d4e-2a1b7c3d9e10",
        organisation_id=UUID("0b6f8d1e-2c4a-4e7b-8f9a-1d2c3b4a5e6f"),
        reason="UNREGISTERED",
        alert="hlf_sync_failure",
    ),
    "console_action": ConsoleAction(
        actor="ops@hlf.example", action="requeue", target="dead_letter:42", detail="re-queued dead letter 42"
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


def test_a_confirmation_written_before_the_probe_needed_proof_reads_as_unverified() -> None:
    old = {"operation": "remove", "for_seq": 7, "delay_ms": 10, "exposure_ms": 20, "fetches": 1}
    for data in (old, msgspec.json.encode(old)):
        event = decode_event(1, MENTOR, "public_listing_confirmed", 1, data, AT)
        assert isinstance(event.payload, PublicListingConfirmed)
        assert event.payload.confirmed_by == "unverified"


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


# -- decode_events: one mentor's rows as replay reads them ------------------------------------------------------


def _row(kind: str, seq: int, data: str, *, version: int = 1, at: str = "2025-03-01T12:00:00.25+01:00") -> str:
    """One row of replay's array: [kind, seq, version, recorded_at, xid, data], as the query builds it."""
    return f'["{kind}",{seq},{version},"{at}",{seq * 10},{data}]'


def _one_by_one(rows: list[str]) -> list[Any]:
    """What decode_event makes of the same rows: the reference."""
    out = []
    for row in rows:
        kind, seq, version, at, xid, data = msgspec.json.decode(row)
        out.append(
            decode_event(seq, MENTOR, kind, version, msgspec.json.encode(data), datetime.fromisoformat(at), xid=xid)
        )
    return out


def test_a_batch_of_every_kind_decodes_as_each_row_does() -> None:
    rows = [_row(kind, seq, encode_payload(EXAMPLES[kind]).decode()) for seq, kind in enumerate(sorted(EXAMPLES), 1)]
    events = decode_events(MENTOR, "[" + ",".join(rows) + "]")

    assert events == _one_by_one(rows)
    assert [type(e.payload) for e in events] == [type(EXAMPLES[k]) for k in sorted(EXAMPLES)]
    assert events[0].recorded_at == datetime(2025, 3, 1, 11, 0, 0, 250000, tzinfo=UTC)


@pytest.mark.parametrize(
    "odd",
    [
        _row("status_changed", 2, '{"cause": "mentor_created"}', version=0),  # an old version
        _row("attempt_failed", 2, encode_payload(EXAMPLES["attempt_failed"]).decode(), version=2),  # a newer one
        _row("teleported", 2, '{"colour": "blue"}'),  # a kind this code does not know
        _row("requeued", 2, '{"dead_letter_id": [1, 2]}'),  # data its struct refuses
    ],
)
def test_a_batch_with_an_odd_row_decodes_every_row_as_decode_event_does(odd: str) -> None:
    rows = [_row("status_changed", 1, '{"cause": "mentor_created"}'), odd, _row("requeued", 3, '{"dead_letter_id": 1}')]
    events = decode_events(MENTOR, "[" + ",".join(rows) + "]")

    assert events == _one_by_one(rows)
    assert isinstance(events[1].payload, UnknownPayload)
    assert events[2].payload == Requeued(dead_letter_id=1)


@pytest.mark.parametrize("odd", [False, True])
def test_a_batch_comes_back_in_seq_order_whatever_order_it_was_sent_in(odd: bool) -> None:
    version = 0 if odd else 1  # through the general path too
    rows = [_row("requeued", seq, f'{{"dead_letter_id": {seq}}}', version=version) for seq in (5, 2, 9, 7)]
    events = decode_events(MENTOR, "[" + ",".join(rows) + "]")

    assert [e.seq for e in events] == [2, 5, 7, 9]
    assert sorted(_one_by_one(rows), key=lambda e: e.seq) == events


# -- which transactions a snapshot saw ----------------------------------------------------------------------------


def _reference_visible(xid: int, snapshot: str) -> bool:
    """pg_visible_in_snapshot, spelled out: below xmin committed, from xmax on not, in between unless running."""
    xmin, xmax, running = snapshot.split(":")
    return xid < int(xmin) or (xid < int(xmax) and str(xid) not in running.split(","))


@pytest.mark.parametrize("snapshot", ["90:90:", "141:141:", "100:120:105,110", "95:130:100,101,120", "5:10:5,7,9"])
def test_not_visible_in_leaves_exactly_the_transactions_a_snapshot_did_not_see(snapshot: str) -> None:
    for xid in range(0, 160):
        assert visible_in(xid, snapshot) == _reference_visible(xid, snapshot), xid
    for xids in [(), (1,), (95,), (100, 105, 121), (4, 5, 6, 7, 8, 9, 10, 11), (89, 90, 91, 140, 141, 142)]:
        assert not_visible_in(xids, snapshot) == tuple(x for x in xids if not _reference_visible(x, snapshot))
