"""The sync path end to end: a status change in Postgres reaches the fake portal, through the real service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import anyio
import psycopg
import pytest

from hlf_actors.testing.fake_portal import FakePortal
from hlf_actors.testing.harness import eventually, running_service, sync_state
from hlf_actors.testing.seed import add_mentor, set_status

pytestmark = pytest.mark.anyio


def kinds(conn: psycopg.Connection[Any], mentor_id: UUID) -> list[str]:
    rows = conn.execute("SELECT kind FROM event_log WHERE mentor_id = %s ORDER BY seq", (mentor_id,)).fetchall()
    return [r[0] for r in rows]


def bodies(portal: FakePortal, record_id: UUID | None) -> list[Any]:
    return [r.json() for r in portal.patches(record_id)]


async def settled(conn: psycopg.Connection[Any], mentor_id: UUID) -> None:
    await eventually(
        lambda: sync_state(conn, mentor_id) in ("in_sync", "dead_lettered"), what=f"mentor {mentor_id} to settle"
    )


@asynccontextmanager
async def running_settled(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, *mentors: UUID
) -> AsyncIterator[None]:
    """The service running, once each of ``mentors`` has settled (their first syncs are in)."""
    async with running_service(db_url, portal):
        for mentor in mentors:
            await settled(conn, mentor)
        yield


async def test_pause_removes_the_mentor_from_the_portal(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    mentor, record = add_mentor(conn, org, portal=portal)
    async with running_settled(db_url, conn, portal, mentor):  # the insert itself is synced: listed
        portal.clear_requests()
        set_status(conn, mentor, "paused")
        await eventually(lambda: portal.listed(record) is False, what="the removal PATCH")
        await settled(conn, mentor)
    patch = portal.patches(record)[0]
    assert patch.method == "PATCH"
    assert patch.path == f"/api/data/v9.2/hlf_mentorlistings({record})"
    assert patch.headers["if-match"] == "*"
    assert patch.headers["authorization"].startswith("Bearer ")
    assert patch.headers["odata-version"] == "4.0"
    assert patch.json() == {"hlf_publiclisting": False}
    assert kinds(conn, mentor)[-3:] == ["attempt_succeeded", "status_changed", "attempt_succeeded"]
    row = conn.execute(
        "SELECT operation, state, attempts, last_error FROM sync_status WHERE mentor_id = %s", (mentor,)
    ).fetchone()
    assert row == ("remove", "in_sync", 1, None)


async def test_expired_certificate_status_removes(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    mentor, record = add_mentor(conn, org, portal=portal)
    async with running_settled(db_url, conn, portal, mentor):
        set_status(conn, mentor, "expired_cert")
        await eventually(lambda: portal.listed(record) is False, what="the removal")
    assert bodies(portal, record)[-1] == {"hlf_publiclisting": False}


async def test_reinstated_with_valid_certificate_is_restored(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    mentor, record = add_mentor(conn, org, portal=portal, status="paused", listed=True)
    async with running_service(db_url, portal):
        await eventually(lambda: portal.listed(record) is False, what="the initial removal")
        await settled(conn, mentor)
        set_status(conn, mentor, "active")
        await eventually(lambda: portal.listed(record) is True, what="the restoration")
        await settled(conn, mentor)
    assert bodies(portal, record) == [{"hlf_publiclisting": False}, {"hlf_publiclisting": True}]


async def test_reinstated_without_valid_certificate_stays_removed(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    mentor, record = add_mentor(conn, org, portal=portal, status="paused", cert_valid_days=-1)
    async with running_settled(db_url, conn, portal, mentor):
        set_status(conn, mentor, "active")
        await eventually(lambda: len(portal.patches(record)) == 2, what="the second PATCH")
        await settled(conn, mentor)
    assert bodies(portal, record) == [{"hlf_publiclisting": False}, {"hlf_publiclisting": False}]
    assert portal.listed(record) is False


async def test_mentor_without_portal_record_gets_a_recorded_outcome(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    paused, _ = add_mentor(conn, org, status="paused", record=False, name="Paused no record")
    active, _ = add_mentor(conn, org, status="active", record=False, name="Active no record")
    async with running_service(db_url, portal):
        await settled(conn, paused)
        await settled(conn, active)
    assert portal.patches() == []
    assert sync_state(conn, paused) == "in_sync"
    assert kinds(conn, paused)[-1] == "sync_skipped"
    assert sync_state(conn, active) == "dead_lettered"
    letter = conn.execute("SELECT operation, last_error FROM dead_letters WHERE mentor_id = %s", (active,)).fetchone()
    assert letter is not None and letter[0] == "restore" and "portal_record_id" in letter[1]


async def test_notify_from_another_connection_and_malformed_payload(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    async with running_service(db_url, portal) as service:
        conn.execute("NOTIFY hlf_events, '{not json at all'")
        conn.execute("SELECT pg_notify('hlf_events', repeat('x', 7000))")
        await eventually(lambda: service.state.malformed_notifications == 2, what="both stray payloads")
        # A change committed with its NOTIFY suppressed is still found: wake the service by hand.
        with conn.transaction():
            _, record = add_mentor(conn, org, portal=portal, status="paused")
        conn.execute("NOTIFY hlf_events")
        await eventually(lambda: portal.listed(record) is False, what="the removal after a hand-made NOTIFY")
        assert service.state.leader


async def test_pause_then_reinstate_within_a_moment_sends_only_the_final_state(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    mentor, record = add_mentor(conn, org, portal=portal)
    async with running_settled(db_url, conn, portal, mentor):
        portal.clear_requests()
        with conn.transaction():
            set_status(conn, mentor, "paused")
            set_status(conn, mentor, "active")
        await settled(conn, mentor)
        await anyio.sleep(0.1)
    assert bodies(portal, record) == [{"hlf_publiclisting": True}]


async def test_two_mentors_in_parallel_do_not_wait_for_each_other(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    slow, slow_record = add_mentor(conn, org, portal=portal)
    fast, fast_record = add_mentor(conn, org, portal=portal)
    async with running_settled(db_url, conn, portal, slow, fast):
        from hlf_actors.testing.fake_portal import Reply

        portal.script(slow_record, Reply(status=204, delay_s=1.5))
        with conn.transaction():
            set_status(conn, slow, "paused")
            set_status(conn, fast, "paused")
        await eventually(
            lambda: portal.listed(fast_record) is False,
            timeout=1.0,
            what="the fast mentor, while the slow one's PATCH hangs",
        )
        assert portal.listed(slow_record) is True
        await eventually(lambda: portal.listed(slow_record) is False, what="the slow mentor")


async def test_ten_thousand_row_update_is_one_notification_and_every_mentor_synced(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    n = 10_000
    rows = conn.execute(
        """INSERT INTO mentors (organisation_id, full_name, status, portal_record_id)
           SELECT %s, 'Mentor ' || g, 'paused', gen_random_uuid() FROM generate_series(1, %s) g
           RETURNING id, portal_record_id""",
        (org, n),
    ).fetchall()
    for _, record in rows:
        portal.add_record(record, listed=False)
    # Count the notifications one UPDATE of every row sends, from a listener of our own.
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN hlf_events")
        conn.execute("UPDATE mentors SET status = 'active'")
        notes = list(listener.notifies(timeout=1.0))
    assert len(notes) == 1
    async with running_service(db_url, portal, env={"HLF_PORTAL_CONCURRENCY": "20"}):
        await eventually(
            lambda: conn.execute("SELECT count(*) FROM sync_status WHERE state = 'in_sync'").fetchone() == (n,),
            timeout=240,
            what="every mentor in sync",
        )
    # Active without a certification: every one is sent as a removal, once.
    assert len(portal.patches()) == n
    assert {r.json()["hlf_publiclisting"] for r in portal.patches()} == {False}
