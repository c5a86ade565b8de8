"""What `hlf-actors status`, `force-sync` and `dead-letters` read and print. Read-only, synchronous, plain SQL.

Everything shown comes from the projections and the event log, so it is true whether or not `run` is up; events
still waiting in ``hlf_inbox`` (written while the service was down) are counted as "not yet projected".
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
import psycopg

from .errors import TENANT_CAUSES
from .event_codec import decode_event
from .events import AttemptFailed, AttemptSucceeded, DeadLettered, Event, SyncSkipped

__all__ = [
    "DeadLetter",
    "Outcome",
    "Summary",
    "dead_letters",
    "mentor_story",
    "summary",
    "wait_for_outcome",
]


class Summary(msgspec.Struct, frozen=True, kw_only=True):
    states: dict[str, int]
    mentors_known: int
    unprojected_events: int
    oldest_open_change_at: datetime | None
    oldest_open_age_s: float | None
    open_dead_letters: int
    last_event_at: datetime | None
    last_success_at: datetime | None
    circuit_open: bool
    credentials: str = "unknown"  # "ok" / "FAILED since <time>: <error>" / "unknown" (newest check with a verdict)
    credentials_checked_at: datetime | None = None  # the newest check, verdict or not
    # The open tenant-wide incident holding every send (cause, since, error, fix), or None.
    incident: dict[str, Any] | None = None
    last_reconcile_at: datetime | None = None
    last_reconcile: dict[str, Any] | None = None  # the counts of that reconcile_finished event
    # The listing probe over the last 24 h: probe on/off, confirmed/stale counts, exposure and cache delay
    # p50/p95/max in ms, and how many successes are still waiting for a verdict.
    public_listing: dict[str, Any] | None = None
    alerts: str = "on"  # "off" when HLF_ALERTS=off: failures reach no one
    # Per organisation: {"organisation_id", "name", "devices": [coordinator_devices.id, ...]} of devices FCM called
    # dead with their current token (hlf_dead_devices); not targeted until the app writes a new token.
    dead_devices: list[dict[str, Any]] = []


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    mentor_id: UUID
    full_name: str | None
    operation: str
    attempts: int
    last_error: str | None
    dead_lettered_at: datetime
    requeued_at: datetime | None
    resolved_at: datetime | None = None  # a later attempt succeeded: the letter closed itself


class Story(msgspec.Struct, frozen=True, kw_only=True):
    mentor_id: UUID
    full_name: str | None
    status: str | None
    portal_record_id: UUID | None
    sync: dict[str, Any] | None
    events: list[dict[str, Any]]


class Outcome(msgspec.Struct, frozen=True):
    kind: str
    detail: str
    ok: bool

    def describe(self) -> str:
        return f"{self.kind}: {self.detail}"


_STATE_COUNTS = "SELECT state, count(*) FROM sync_status GROUP BY state"
_SUMMARY_COUNTS = """SELECT (SELECT count(*) FROM mentors),
                  (SELECT count(*) FROM hlf_inbox),
                  least((SELECT min(updated_at) FROM sync_status WHERE state IN ('pending', 'retrying')),
                        (SELECT min(e.recorded_at) FROM hlf_inbox i JOIN event_log e USING (seq))),
                  (SELECT count(*) FROM dead_letters WHERE requeued_at IS NULL AND resolved_at IS NULL),
                  (SELECT max(recorded_at) FROM event_log),
                  (SELECT recorded_at FROM event_log WHERE kind = 'attempt_succeeded' ORDER BY seq DESC LIMIT 1),
                  (SELECT kind = 'circuit_opened' FROM event_log
                    WHERE kind IN ('circuit_opened', 'circuit_closed') ORDER BY seq DESC LIMIT 1),
                  clock_timestamp()"""


def summary(
    conn: psycopg.Connection[Any], *, probe_on: bool = False, deadline_s: float = 1200.0, alerts_off: bool = False
) -> Summary:
    states = dict.fromkeys(("pending", "retrying", "in_sync", "dead_lettered"), 0)
    for state, n in conn.execute(_STATE_COUNTS).fetchall():
        states[state] = n
    row = conn.execute(_SUMMARY_COUNTS).fetchone()
    assert row is not None
    oldest, now = row[2], row[7]
    return Summary(
        states=states,
        mentors_known=row[0],
        unprojected_events=row[1],
        oldest_open_change_at=oldest,
        oldest_open_age_s=(now - oldest).total_seconds() if oldest else None,
        open_dead_letters=row[3],
        last_event_at=row[4],
        last_success_at=row[5],
        circuit_open=bool(row[6]),
        public_listing=_public_listing(conn, probe_on, deadline_s),
        alerts="off" if alerts_off else "on",
        dead_devices=_dead_devices(conn),
        **_checks(conn),
    )


_DEAD_DEVICES_EXIST = "SELECT to_regclass('hlf_dead_devices') IS NOT NULL"
_DEAD_DEVICES_BY_ORG = """SELECT o.id, o.name, array_agg(x.device_id ORDER BY x.marked_at, x.device_id)
           FROM hlf_dead_devices x
           JOIN coordinator_devices d ON d.id::text = x.device_id AND d.fcm_token = x.fcm_token
           JOIN organisations o ON o.id = d.organisation_id
           GROUP BY o.id, o.name ORDER BY o.name, o.id"""


def _dead_devices(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Devices dead with the token they still have, per organisation (empty before migration 009)."""
    row = conn.execute(_DEAD_DEVICES_EXIST).fetchone()
    if not (row and row[0]):
        return []
    rows = conn.execute(_DEAD_DEVICES_BY_ORG).fetchall()
    return [{"organisation_id": str(o), "name": name, "devices": [str(d) for d in ids]} for o, name, ids in rows]


_PUBLIC_LISTING_TIMES = """WITH v AS (
               SELECT kind, (data ->> 'exposure_ms')::bigint AS exposure, (data ->> 'delay_ms')::bigint AS website,
                      (data ->> 'exposure_ms')::bigint - (data ->> 'delay_ms')::bigint AS ours,
                      kind = 'public_listing_confirmed' AND data ? 'confirmed_by' AS seen
               FROM event_log
               WHERE kind IN ('public_listing_confirmed', 'public_listing_stale')
                 AND recorded_at > now() - interval '1 day')
           SELECT count(*) FILTER (WHERE kind = 'public_listing_confirmed'),
                  count(*) FILTER (WHERE kind = 'public_listing_stale'),
                  percentile_disc(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY exposure) FILTER (WHERE seen),
                  max(exposure) FILTER (WHERE seen),
                  percentile_disc(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY website) FILTER (WHERE seen),
                  max(website) FILTER (WHERE seen),
                  percentile_disc(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY ours) FILTER (WHERE seen),
                  max(ours) FILTER (WHERE seen),
                  count(*) FILTER (WHERE seen)
           FROM v"""
_UNPROBED_SUCCESSES = """SELECT count(*) FROM event_log s
           WHERE s.kind = 'attempt_succeeded' AND s.recorded_at > now() - make_interval(secs => %s)
             AND NOT EXISTS (
                 SELECT 1 FROM event_log n WHERE n.mentor_id = s.mentor_id AND n.seq > s.seq
                    AND n.kind IN ('attempt_succeeded', 'public_listing_confirmed', 'public_listing_stale'))"""


def _public_listing(conn: psycopg.Connection[Any], probe_on: bool, deadline_s: float) -> dict[str, Any]:
    """What the listing probe observed over the last day: the exposure window coordinators are quoted.

    Exposure (the change → the public seeing it) splits into our own latency (the change → Dataverse's 204) and the
    website's cache (204 → seen). Only confirmations that saw the listing count (``confirmed_by``); those written
    before the probe required proof have none and are left out of the percentiles.
    """
    row = conn.execute(_PUBLIC_LISTING_TIMES).fetchone()
    assert row is not None
    waiting = conn.execute(
        _UNPROBED_SUCCESSES,
        (deadline_s + 60,),
    ).fetchone()
    exposure, website, ours = row[2] or [None, None], row[4] or [None, None], row[6] or [None, None]
    return {
        "probe": "on" if probe_on else "off",
        "confirmed": row[0],
        "stale": row[1],
        "seen": row[8],
        "exposure_ms": {"p50": exposure[0], "p95": exposure[1], "max": row[3]},
        "sync_ms": {"p50": ours[0], "p95": ours[1], "max": row[7]},
        "delay_ms": {"p50": website[0], "p95": website[1], "max": row[5]},
        "waiting": waiting[0] if waiting and probe_on else 0,
    }


_LAST_CHECKS = """SELECT (SELECT recorded_at FROM event_log WHERE mentor_id IS NULL AND kind = 'credential_check'
                    ORDER BY seq DESC LIMIT 1),
                  (SELECT data FROM event_log WHERE mentor_id IS NULL AND kind = 'credential_check'
                      AND data ->> 'ok' IS NOT NULL ORDER BY seq DESC LIMIT 1),
                  (SELECT recorded_at FROM event_log WHERE mentor_id IS NULL AND kind = 'credential_check'
                      AND data ->> 'transition' = 'failed' ORDER BY seq DESC LIMIT 1),
                  (SELECT recorded_at FROM event_log WHERE mentor_id IS NULL AND kind = 'reconcile_finished'
                    ORDER BY seq DESC LIMIT 1),
                  (SELECT data FROM event_log WHERE mentor_id IS NULL AND kind = 'reconcile_finished'
                    ORDER BY seq DESC LIMIT 1)"""


def _checks(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """The credential and reconciliation lines of the summary, from their newest events (mentor-less, indexed)."""
    row = conn.execute(_LAST_CHECKS).fetchone()
    assert row is not None
    checked_at, verdict, failed_since, reconciled_at, counts = row
    incident: dict[str, Any] | None = None
    if verdict is None:
        credentials = "unknown"
    elif verdict.get("ok"):
        credentials = "ok"
    else:
        since = f"{failed_since:%Y-%m-%d %H:%M:%S %Z}" if failed_since else "unknown"
        credentials = f"FAILED since {since}: {verdict.get('error')}"
        cause = verdict.get("cause") or "credentials"
        fix = TENANT_CAUSES.get(cause, "")
        incident = {"cause": cause, "since": failed_since, "error": verdict.get("error"), "fix": fix}
    return {
        "incident": incident,
        "credentials": credentials,
        "credentials_checked_at": checked_at,
        "last_reconcile_at": reconciled_at,
        "last_reconcile": counts,
    }


_DEAD_LETTER_ROWS = """SELECT d.id, d.mentor_id, m.full_name, d.operation, d.attempts, d.last_error, d.dead_lettered_at,
                  d.requeued_at, d.resolved_at
           FROM dead_letters d LEFT JOIN mentors m ON m.id = d.mentor_id
           WHERE %s OR (d.requeued_at IS NULL AND d.resolved_at IS NULL)
           ORDER BY d.id"""


def dead_letters(conn: psycopg.Connection[Any], *, include_requeued: bool) -> list[DeadLetter]:
    rows = conn.execute(
        _DEAD_LETTER_ROWS,
        (include_requeued,),
    ).fetchall()
    return [DeadLetter(**dict(zip(DeadLetter.__struct_fields__, r, strict=True))) for r in rows]


_EVENTS_OF_MENTOR = """SELECT seq, mentor_id, kind, version, data::text, recorded_at, xid::text::bigint FROM event_log
           WHERE mentor_id = %s AND seq > %s ORDER BY seq"""


def _events(conn: psycopg.Connection[Any], mentor_id: UUID, after: int = 0) -> list[Event]:
    rows = conn.execute(
        _EVENTS_OF_MENTOR,
        (mentor_id, after),
    ).fetchall()
    return [decode_event(*r) for r in rows]


_SYNC_ROW_OF_MENTOR = (
    "SELECT state, operation, attempts, last_error, updated_at, next_attempt_at FROM sync_status WHERE mentor_id = %s"
)
_MENTOR_ROW = "SELECT full_name, status, portal_record_id FROM mentors WHERE id = %s"


def mentor_story(conn: psycopg.Connection[Any], mentor_id: UUID) -> Story | None:
    mentor = conn.execute(_MENTOR_ROW, (mentor_id,)).fetchone()
    events = _events(conn, mentor_id)
    if mentor is None and not events:
        return None
    cur = conn.execute(
        _SYNC_ROW_OF_MENTOR,
        (mentor_id,),
    )
    sync_row = cur.fetchone()
    sync = None
    if sync_row is not None:
        assert cur.description is not None
        sync = dict(zip([c.name for c in cur.description], sync_row, strict=True))
    return Story(
        mentor_id=mentor_id,
        full_name=mentor[0] if mentor else None,
        status=mentor[1] if mentor else None,
        portal_record_id=mentor[2] if mentor else None,
        sync=sync,
        events=[
            {"seq": e.seq, "at": e.recorded_at, "kind": e.kind, "data": msgspec.to_builtins(e.payload)} for e in events
        ],
    )


def wait_for_outcome(
    conn: psycopg.Connection[Any], mentor_id: UUID, request_seq: int, *, timeout: float
) -> Outcome | None:
    """Poll the log until the service records a final outcome for the request (or anything newer)."""
    deadline = time.monotonic() + timeout
    seen = request_seq
    while time.monotonic() < deadline:
        for event in _events(conn, mentor_id, seen):
            seen = event.seq
            p = event.payload
            if isinstance(p, AttemptSucceeded) and p.for_seq >= request_seq:
                return Outcome(
                    "succeeded", f"{p.operation} sent to the portal (HTTP {p.http_status}, attempt {p.attempt})", True
                )
            if isinstance(p, SyncSkipped) and p.for_seq >= request_seq:
                return Outcome("skipped", f"{p.operation}: {p.reason}", True)
            if isinstance(p, DeadLettered) and p.for_seq >= request_seq:
                return Outcome(
                    "dead-lettered", f"{p.operation} failed after {p.attempts} attempt(s): {p.last_error}", False
                )
            if isinstance(p, AttemptFailed) and p.for_seq >= request_seq:
                print(
                    f"  attempt {p.attempt} failed: {p.error}"
                    + (f"; retrying in {p.delay_ms} ms" if p.delay_ms is not None else "")
                )
        time.sleep(0.05)
    return None
