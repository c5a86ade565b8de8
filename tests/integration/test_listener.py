"""The listener against what goes wrong around it (issue 10): PgBouncer in transaction pooling, a LISTEN refused,
stray NOTIFY payloads by the thousand, odd rows in the log, a full NOTIFY queue. Real Postgres, real PgBouncer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hlf_actors import replay, status
from hlf_actors.listener import QUEUE_USAGE_WARNING, queue_usage_change
from hlf_actors.testing.fake_portal import FakePortal
from hlf_actors.testing.harness import eventually, running_service, sync_state
from hlf_actors.testing.pgbouncer import PgBouncer
from hlf_actors.testing.seed import add_mentor, set_status

pytestmark = pytest.mark.anyio


def all_in_sync(conn: psycopg.Connection[Any], mentors: list[UUID]) -> bool:
    return all(sync_state(conn, m) == "in_sync" for m in mentors)


async def test_behind_pgbouncer_in_transaction_pooling_the_service_polls_and_syncs_everything(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, tmp_path: Path, org: UUID
) -> None:
    added = [add_mentor(conn, org, portal=portal) for _ in range(5)]
    mentors = [m for m, _ in added]
    with PgBouncer(db_url, tmp_path / "pgbouncer") as bouncer:
        env = {"HLF_POLL_INTERVAL": "200ms"}
        async with running_service(bouncer.url, portal, env=env) as service:
            await eventually(lambda: service.state.listening, what="the listener")
            assert service.state.polling, "LISTEN through transaction pooling must be detected"
            assert service.health().notifications == "polling"
            await eventually(lambda: all_in_sync(conn, mentors), timeout=20, what="the first sync")
            for round_ in range(3):
                status_ = "paused" if round_ % 2 == 0 else "active"
                for mentor in mentors:
                    set_status(conn, mentor, status_)
                await eventually(
                    lambda s=status_: (
                        all(portal.listed(r) is (s == "active") for _, r in added) and all_in_sync(conn, mentors)
                    ),
                    timeout=20,
                    what=f"round {round_} on the portal",
                )


async def test_a_direct_connection_is_detected_as_listening(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal
) -> None:
    async with running_service(db_url, portal) as service:
        await eventually(lambda: service.state.listening, what="the listener")
        assert not service.state.polling
        assert service.health().notifications == "listen"


async def test_a_listen_refused_during_recovery_is_retried_and_nothing_is_lost(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    mentor, record = add_mentor(conn, org, portal=portal)
    refusals = 0

    async def connect(url: str) -> psycopg.AsyncConnection[Any]:
        nonlocal refusals
        if refusals < 3:  # what a standby just promoted, or still in recovery, answers (the first: the start-up check)
            refusals += 1
            raise psycopg.errors.FeatureNotSupported("cannot execute LISTEN during recovery")
        return await psycopg.AsyncConnection.connect(url, autocommit=True)

    connect_: Callable[[str], Awaitable[psycopg.AsyncConnection[Any]]] = connect
    async with running_service(db_url, portal, connect=connect_) as service:
        assert refusals == 3 and service.state.reconnects == 2
        await eventually(lambda: sync_state(conn, mentor) == "in_sync", what="the first sync")
        set_status(conn, mentor, "paused")
        await eventually(lambda: portal.listed(record) is False, what="the removal")


async def test_stray_notify_payloads_of_any_shape_are_counted_and_syncing_goes_on(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    mentor, record = add_mentor(conn, org, portal=portal)
    payloads = st.one_of(
        st.text(max_size=200),
        st.text(min_size=7000, max_size=7900, alphabet="xyz{}\"'\\"),
        st.builds(str, st.dictionaries(st.text(max_size=10), st.integers() | st.none() | st.text(max_size=10))),
        st.sampled_from(['{"kind": "status_changed"}', '{"seq": "NaN"}', "[]", "null", "wake2", "WAKE", "\u2603"]),
    ).filter(lambda p: p not in ("", "wake") and "\x00" not in p)
    sent: list[str] = []

    async with running_service(db_url, portal) as service:
        await eventually(lambda: sync_state(conn, mentor) == "in_sync", what="the first sync")

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(payload=payloads)
        def fire(payload: str) -> None:
            conn.execute("SELECT pg_notify('hlf_events', %s)", (payload,))
            sent.append(payload)

        await anyio.to_thread.run_sync(fire)
        await eventually(
            lambda: service.state.malformed_notifications >= len(sent), timeout=15, what="every stray payload counted"
        )
        set_status(conn, mentor, "paused")
        await eventually(lambda: portal.listed(record) is False, what="a change after the fuzz")
    assert len(sent) >= 30
    assert service.state.malformed_notifications == len(sent)


async def test_an_event_of_an_unknown_kind_in_the_log_is_shown_and_replayed_around(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    mentor, record = add_mentor(conn, org, portal=portal)
    async with running_service(db_url, portal):
        await eventually(lambda: sync_state(conn, mentor) == "in_sync", what="the first sync")
        conn.execute("SELECT hlf_append_event(%s, 'from_a_newer_release', '{\"x\": [1, 2]}'::jsonb)", (mentor,))
        conn.execute(
            "INSERT INTO event_log (mentor_id, kind, data) VALUES (%s, 'status_changed', %s::jsonb)",
            (mentor, '{"cause": 42, "status": [1]}'),
        )
        set_status(conn, mentor, "paused")
        await eventually(lambda: portal.listed(record) is False, what="the removal after the odd rows")
        await eventually(lambda: sync_state(conn, mentor) == "in_sync", what="in sync again")
    story = status.mentor_story(conn, mentor)
    assert story is not None
    kinds = [e["kind"] for e in story.events]
    assert "from_a_newer_release" in kinds
    report = await anyio.to_thread.run_sync(lambda: replay.replay(db_url, verify=True))
    assert report.differences == 0


async def test_the_notify_queue_warning_crosses_once_each_way(db_url: str, conn: psycopg.Connection[Any]) -> None:
    row = conn.execute("SELECT pg_notification_queue_usage()").fetchone()
    assert row is not None and 0.0 <= float(row[0]) < QUEUE_USAGE_WARNING  # the real reading, on an idle server
    assert queue_usage_change(0.0, float(row[0])) is None
    assert queue_usage_change(0.1, 0.51) == "high"
    assert queue_usage_change(0.51, 0.9) is None  # still high: no second line
    assert queue_usage_change(0.9, 0.2) == "normal"
    assert queue_usage_change(0.2, 0.3) is None
