"""Nothing is lost: out-of-order commits, restarts, a killed listener, a second process, an append-only log."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import anyio
import psycopg
import pytest

from hlf_actors.event_codec import decode_event
from hlf_actors.projections import PROJECTED_KINDS, fold
from hlf_actors.testing.fake_portal import FakePortal, Reply
from hlf_actors.testing.harness import eventually, running_service, sync_state
from hlf_actors.testing.seed import add_mentor, set_status
from hlf_actors.writer import sync_row_from_db

pytestmark = pytest.mark.anyio


def replayed_equals_live(conn: psycopg.Connection[Any], mentor_id: UUID) -> None:
    """The live projection row equals the fold of the mentor's projected events, by seq."""
    rows = conn.execute(
        """SELECT seq, mentor_id, kind, version, data::text, recorded_at, xid::text::bigint FROM event_log e
           WHERE mentor_id = %s AND kind = ANY(%s)
             AND NOT EXISTS (SELECT 1 FROM hlf_inbox i WHERE i.seq = e.seq) ORDER BY seq""",
        (mentor_id, list(PROJECTED_KINDS)),
    ).fetchall()
    replayed = fold(mentor_id, [decode_event(*r) for r in rows])
    live = conn.execute(
        """SELECT mentor_id, operation, state, attempts, last_error, updated_at, portal_record_id, listed,
                  change_seq, uncovered_xids, next_attempt_at, last_seq FROM sync_status WHERE mentor_id = %s""",
        (mentor_id,),
    ).fetchone()
    assert live is not None
    assert replayed.sync == sync_row_from_db(live)


async def test_transactions_committing_out_of_seq_order_are_both_delivered(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    first, first_rec = add_mentor(conn, org, portal=portal)
    second, second_rec = add_mentor(conn, org, portal=portal)
    async with running_service(db_url, portal):
        await eventually(lambda: sync_state(conn, first) == "in_sync" and sync_state(conn, second) == "in_sync")
        with psycopg.connect(db_url) as slow:
            # The slow transaction takes the lower seq, then commits after the fast one.
            slow.execute("UPDATE mentors SET status = 'paused' WHERE id = %s", (first,))
            low = slow.execute("SELECT max(seq) FROM event_log").fetchone()
            set_status(conn, second, "paused")
            await eventually(lambda: portal.listed(second_rec) is False, what="the fast transaction's removal")
            high = conn.execute("SELECT max(seq) FROM event_log WHERE kind = 'status_changed'").fetchone()
            assert low is not None and high is not None and low[0] < high[0]
            assert portal.listed(first_rec) is True
            slow.commit()
        await eventually(lambda: portal.listed(first_rec) is False, what="the late transaction's removal")
        await eventually(lambda: sync_state(conn, first) == "in_sync")
    replayed_equals_live(conn, first)
    replayed_equals_live(conn, second)


async def test_a_late_commit_for_a_mentor_already_synced_is_refolded_and_sent(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    mentor, record = add_mentor(conn, org, portal=portal)
    async with running_service(db_url, portal):
        await eventually(lambda: sync_state(conn, mentor) == "in_sync")
        with psycopg.connect(db_url) as slow:
            slow.execute("UPDATE certifications SET expires_on = current_date - 1 WHERE mentor_id = %s", (mentor,))
            conn.execute("SELECT hlf_force_sync(%s)", (mentor,))  # a later seq, committed first
            await eventually(lambda: len(portal.patches(record)) == 2, what="the forced PATCH")
            await eventually(lambda: sync_state(conn, mentor) == "in_sync")
            assert portal.listed(record) is True
            slow.commit()
        await eventually(lambda: portal.listed(record) is False, what="the removal after the late commit")
        await eventually(lambda: sync_state(conn, mentor) == "in_sync")
    replayed_equals_live(conn, mentor)


async def test_changes_made_while_the_service_is_down_are_caught_up(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    mentors = [add_mentor(conn, org, portal=portal) for _ in range(5)]
    for mentor, _ in mentors[:3]:
        set_status(conn, mentor, "paused")
    async with running_service(db_url, portal):
        await eventually(
            lambda: all(sync_state(conn, m) == "in_sync" for m, _ in mentors), what="every mentor caught up"
        )
    assert [portal.listed(r) for _, r in mentors] == [False, False, False, True, True]
    assert len(portal.patches()) == 5


async def test_killed_mid_patch_the_next_process_finishes_the_work(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    mentors = [add_mentor(conn, org, portal=portal) for _ in range(4)]
    async with running_service(db_url, portal):
        await eventually(lambda: all(sync_state(conn, m) == "in_sync" for m, _ in mentors))
    for _, record in mentors:
        portal.script(record, Reply(status=204, delay_s=30.0, apply=False))
    with anyio.CancelScope() as scope:
        async with running_service(db_url, portal):
            for mentor, _ in mentors:
                set_status(conn, mentor, "paused")
            await eventually(lambda: len(portal.patches()) == 8, what="four PATCHes in flight")
            scope.cancel()  # the process dies: no outcome is recorded for the hanging PATCHes
    assert all(sync_state(conn, m) == "pending" for m, _ in mentors)
    async with running_service(db_url, portal):
        await eventually(lambda: all(sync_state(conn, m) == "in_sync" for m, _ in mentors), what="the catch-up")
    assert all(portal.listed(r) is False for _, r in mentors)


async def test_listener_backend_terminated_reconnects_and_catches_up(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    mentor, record = add_mentor(conn, org, portal=portal)
    async with running_service(db_url, portal, standby_poll_s=0.05) as service:
        await eventually(lambda: sync_state(conn, mentor) == "in_sync")
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'hlf-actors listener'"
        ).fetchall()
        assert killed == [(True,)]
        set_status(conn, mentor, "paused")  # its NOTIFY may be lost: the catch-up must find it
        await eventually(lambda: service.state.reconnects >= 1, what="the reconnect")
        await eventually(lambda: portal.listed(record) is False, what="the removal after reconnecting")
        await eventually(lambda: service.state.listening, what="listening again")
        set_status(conn, mentor, "active")
        await eventually(lambda: portal.listed(record) is True, what="a change after the reconnect")


async def test_a_second_process_waits_as_standby_and_takes_over(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    mentors = [add_mentor(conn, org, portal=portal) for _ in range(6)]
    async with running_service(db_url, portal, standby_poll_s=0.05) as leader:
        await eventually(lambda: all(sync_state(conn, m) == "in_sync" for m, _ in mentors))
        from hlf_actors.dynamics import DynamicsClient
        from hlf_actors.service import Service
        from hlf_actors.testing.harness import test_config
        from hlf_actors.testing.recording import RecordingAlertSender

        config = test_config(db_url, portal)
        client = DynamicsClient(config)
        standby = Service(config, portal=client, alert_sender=RecordingAlertSender(), standby_poll_s=0.05)
        async with anyio.create_task_group() as tg:
            await tg.start(standby.run)
            await anyio.sleep(0.3)
            assert standby.state.leader is False
            portal.clear_requests()
            for mentor, _ in mentors[:3]:
                set_status(conn, mentor, "paused")
            await eventually(lambda: all(sync_state(conn, m) == "in_sync" for m, _ in mentors[:3]))
            await anyio.sleep(0.2)
            assert len(portal.patches()) == 3  # no double sends
            leader.request_stop()
            await eventually(lambda: standby.state.leader, what="the standby to take over")
            for mentor, _ in mentors[3:]:
                set_status(conn, mentor, "paused")
            await eventually(lambda: all(portal.listed(r) is False for _, r in mentors), what="the new leader")
            assert len(portal.patches()) == 6
            standby.request_stop()
        await client.aclose()


async def test_event_log_rejects_update_delete_and_truncate(conn: psycopg.Connection[Any], org: UUID) -> None:
    add_mentor(conn, org)
    for statement in ("UPDATE event_log SET kind = 'x'", "DELETE FROM event_log", "TRUNCATE event_log"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute(statement)
    row = conn.execute("SELECT count(*) FROM event_log").fetchone()
    assert row is not None and row[0] == 2


async def test_migrate_is_idempotent_and_refuses_edited_migrations(conn: psycopg.Connection[Any]) -> None:
    from hlf_actors import db
    from hlf_actors.errors import MigrationError

    assert db.migrate(conn) == []
    conn.execute("UPDATE hlf_schema_migrations SET checksum = 'edited' WHERE version = 1")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        db.migrate(conn)
