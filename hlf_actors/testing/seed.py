"""Seeding mentors the way the mentor app would: plain SQL from the app's own connection.

Used by the tests, the demo and the benchmarks, so each mentor created here also gets a record in the fake portal.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any
from uuid import UUID, uuid4

import psycopg

from .fake_portal import FakePortal

__all__ = ["add_certification", "add_device", "add_mentor", "add_organisation", "set_status"]


_INSERT_ORGANISATION = (
    "INSERT INTO organisations (name, alert_topic, reminder_days) "
    "VALUES (%s, %s, coalesce(%s::int[], '{30,14,7}')) RETURNING id"
)


def add_organisation(
    conn: psycopg.Connection[Any],
    name: str = "Test organisation",
    *,
    alert_topic: str | None = None,
    reminder_days: list[int] | None = None,
) -> UUID:
    row = conn.execute(
        _INSERT_ORGANISATION,
        (name, alert_topic, reminder_days),
    ).fetchone()
    assert row is not None
    return UUID(str(row[0]))


_INSERT_DEVICE = "INSERT INTO coordinator_devices (organisation_id, fcm_token) VALUES (%s, %s)"


def add_device(conn: psycopg.Connection[Any], organisation_id: UUID, token: str) -> None:
    conn.execute(_INSERT_DEVICE, (organisation_id, token))


_INSERT_CERTIFICATION = "INSERT INTO certifications (mentor_id, expires_on) VALUES (%s, %s)"
_INSERT_MENTOR = (
    "INSERT INTO mentors (organisation_id, full_name, status, portal_record_id) VALUES (%s, %s, %s, %s) RETURNING id"
)


def add_mentor(
    conn: psycopg.Connection[Any],
    organisation_id: UUID,
    *,
    portal: FakePortal | None = None,
    name: str = "Test Mentor",
    status: str = "active",
    cert_valid_days: int | None = 365,
    record: bool = True,
    listed: bool = True,
    today: date | None = None,
) -> tuple[UUID, UUID | None]:
    """A mentor (and a certification expiring in ``cert_valid_days``), in one transaction like the app would.

    Returns (mentor id, portal record id). The portal record starts as ``listed``.
    """
    record_id = uuid4() if record else None
    if portal is not None and record_id is not None:
        portal.add_record(record_id, listed=listed)
    with conn.transaction():
        row = conn.execute(
            _INSERT_MENTOR,
            (organisation_id, name, status, record_id),
        ).fetchone()
        assert row is not None
        mentor_id = UUID(str(row[0]))
        if cert_valid_days is not None:
            expires = (today or date.today()) + timedelta(days=cert_valid_days)
            conn.execute(_INSERT_CERTIFICATION, (mentor_id, expires))
    return mentor_id, record_id


_SET_STATUS = "UPDATE mentors SET status = %s WHERE id = %s"


def set_status(conn: psycopg.Connection[Any], mentor_id: UUID, status: str) -> None:
    conn.execute(_SET_STATUS, (status, mentor_id))


_INSERT_CERTIFICATION_RETURNING = "INSERT INTO certifications (mentor_id, expires_on) VALUES (%s, %s) RETURNING id"


def add_certification(conn: psycopg.Connection[Any], mentor_id: UUID, expires_on: date) -> UUID:
    """Another certification for a mentor, e.g. a renewal with a later expiry."""
    row = conn.execute(_INSERT_CERTIFICATION_RETURNING, (mentor_id, expires_on)).fetchone()
    assert row is not None
    return UUID(str(row[0]))
