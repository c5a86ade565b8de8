"""Retries, dead letters, re-queue and push alerts: the portal and FCM misbehave, every mentor still ends up right."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

import anyio
import psycopg
import pytest

from hlf_actors.fcm import FirebaseAlertSender
from hlf_actors.testing.fake_fcm import FakeFCM
from hlf_actors.testing.fake_portal import FakePortal, Reply
from hlf_actors.testing.harness import eventually, running_service, sync_state
from hlf_actors.testing.seed import add_device, add_mentor, add_organisation, set_status

pytestmark = pytest.mark.anyio

DEVICE = "coordinator-phone-registration-token-0001"


def events(conn: psycopg.Connection[Any], mentor_id: UUID, kind: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT data FROM event_log WHERE mentor_id = %s AND kind = %s ORDER BY seq", (mentor_id, kind)
    ).fetchall()
    return [r[0] for r in rows]


def paused_mentor(conn: psycopg.Connection[Any], portal: FakePortal, **org: Any) -> tuple[UUID, UUID, UUID]:
    """An organisation with one coordinator phone and a mentor already synced as paused, ready to be changed."""
    org_id = add_organisation(conn, **org)
    add_device(conn, org_id, DEVICE)
    mentor, record = add_mentor(conn, org_id, portal=portal, status="paused")
    assert record is not None
    return org_id, mentor, record


async def activate_once_synced(
    conn: psycopg.Connection[Any], portal: FakePortal, mentor: UUID, script: Callable[[], object]
) -> None:
    """Wait for the paused mentor's first sync, forget the requests so far, ``script`` the portal, then activate the
    mentor: the PATCHes that follow meet the script."""
    await eventually(lambda: sync_state(conn, mentor) == "in_sync")
    portal.clear_requests()
    script()
    set_status(conn, mentor, "active")


async def test_always_503_dead_letters_after_max_attempts_and_alerts_once(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, fcm: FakeFCM, sender: FirebaseAlertSender
) -> None:
    _, mentor, record = paused_mentor(conn, portal)
    async with running_service(db_url, portal, sender=sender, env={"HLF_MAX_ATTEMPTS": "4"}):
        await activate_once_synced(conn, portal, mentor, lambda: portal.always(Reply(status=503), record_id=record))
        await eventually(lambda: sync_state(conn, mentor) == "dead_lettered", what="the dead letter")
        await eventually(lambda: len(fcm.messages()) == 1, what="the push alert")
        await anyio.sleep(0.2)  # nothing more may arrive
    patches = portal.patches(record)
    assert len(patches) == 4
    failed = events(conn, mentor, "attempt_failed")
    assert [(f["attempt"], f["http_status"], f["retryable"], f["delay_ms"]) for f in failed] == [
        (1, 503, True, 10),
        (2, 503, True, 20),
        (3, 503, True, 40),
        (4, 503, True, None),
    ]
    gaps = [b.at - a.at for a, b in itertools.pairwise(patches)]
    assert all(gap >= expected / 1000 for gap, expected in zip(gaps, (10, 20, 40), strict=True))
    letters = conn.execute(
        "SELECT operation, attempts, requeued_at FROM dead_letters WHERE mentor_id = %s", (mentor,)
    ).fetchall()
    assert letters == [("restore", 4, None)]
    assert fcm.data_messages() == [{"type": "hlf_sync_failure", "mentor_id": str(mentor), "operation": "restore"}]
    assert fcm.messages()[0].message["token"] == DEVICE
    sent = events(conn, mentor, "alert_sent")
    assert len(sent) == 1 and sent[0]["alert"] == "hlf_sync_failure" and DEVICE not in sent[0]["target"]
    first_503_to_alert = fcm.messages()[0].at.timestamp() - patches[0].at
    print(f"\nfirst 503 → push alert: {first_503_to_alert * 1000:.0f} ms (HLF_BACKOFF_BASE_MS=10, 4 attempts)")


async def test_fail_twice_then_succeed_retries_without_alert(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, fcm: FakeFCM, sender: FirebaseAlertSender
) -> None:
    _, mentor, record = paused_mentor(conn, portal)
    async with running_service(db_url, portal, sender=sender):
        await activate_once_synced(
            conn, portal, mentor, lambda: portal.fail_then_succeed(record, failures=2, status=503)
        )
        await eventually(lambda: portal.listed(record) is True and sync_state(conn, mentor) == "in_sync")
        await anyio.sleep(0.2)
    assert [p.status for p in portal.patches(record)] == [503, 503, 204]
    assert events(conn, mentor, "attempt_succeeded")[-1]["attempt"] == 3
    assert fcm.messages() == []
    assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)


async def test_403_is_dead_lettered_at_once(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, fcm: FakeFCM, sender: FirebaseAlertSender
) -> None:
    _, mentor, record = paused_mentor(conn, portal)
    async with running_service(db_url, portal, sender=sender):
        await activate_once_synced(conn, portal, mentor, lambda: portal.always(Reply(status=403), record_id=record))
        await eventually(lambda: sync_state(conn, mentor) == "dead_lettered")
        await eventually(lambda: len(fcm.messages()) == 1)
    assert len(portal.patches(record)) == 1
    failed = events(conn, mentor, "attempt_failed")
    assert [(f["attempt"], f["http_status"], f["retryable"]) for f in failed] == [(1, 403, False)]


async def test_a_portal_error_with_a_nul_byte_is_recorded_not_resent_forever(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, fcm: FakeFCM, sender: FirebaseAlertSender
) -> None:
    # jsonb refuses \u0000: before errors were cleaned, this failure could not be written and the actor re-sent
    # the PATCH every few seconds, never dead-lettering it.
    _, mentor, record = paused_mentor(conn, portal)
    body = b'{"error": {"code": "0x0", "message": "bad\\u0000record"}}'
    refusal = Reply(status=400, body=body, headers={"Content-Type": "application/json"})
    async with running_service(db_url, portal, sender=sender):
        await activate_once_synced(conn, portal, mentor, lambda: portal.always(refusal, record_id=record))
        await eventually(lambda: sync_state(conn, mentor) == "dead_lettered")
        await anyio.sleep(0.3)
    assert len(portal.patches(record)) == 1
    [failed] = events(conn, mentor, "attempt_failed")
    assert "bad\\0record" in failed["error"]


async def test_429_retry_after_is_honoured_without_spending_an_attempt(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal
) -> None:
    _, mentor, record = paused_mentor(conn, portal)
    async with running_service(db_url, portal, env={"HLF_MAX_ATTEMPTS": "1"}):
        await activate_once_synced(conn, portal, mentor, lambda: portal.throttle(record, retry_after_s=1, times=2))
        await eventually(lambda: portal.listed(record) is True, timeout=10, what="the PATCH after throttling")
        await eventually(lambda: sync_state(conn, mentor) == "in_sync")
    patches = portal.patches(record)
    assert [p.status for p in patches] == [429, 429, 204]
    assert patches[1].at - patches[0].at >= 1.0 and patches[2].at - patches[1].at >= 1.0
    throttled = events(conn, mentor, "attempt_failed")
    assert [(f["attempt"], f["throttled"], f["delay_ms"]) for f in throttled] == [(1, True, 1000), (1, True, 1000)]
    assert events(conn, mentor, "attempt_succeeded")[-1]["attempt"] == 1  # HLF_MAX_ATTEMPTS=1 was not spent


async def test_401_fetches_a_fresh_token_once_and_succeeds(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal
) -> None:
    _, mentor, record = paused_mentor(conn, portal)
    async with running_service(db_url, portal):
        await eventually(lambda: sync_state(conn, mentor) == "in_sync")
        # The start-up tenant check fetches a brand-new token of its own: let it finish before revoking, or the
        # PATCH below may use that token and never see a 401.
        checked = "SELECT count(*) FROM event_log WHERE kind = 'credential_check'"
        await eventually(lambda: conn.execute(checked).fetchone() != (0,), what="the start-up tenant check")
        portal.revoke_tokens()
        portal.clear_requests()
        set_status(conn, mentor, "active")
        await eventually(lambda: portal.listed(record) is True and sync_state(conn, mentor) == "in_sync")
    assert [p.status for p in portal.patches(record)] == [401, 204]
    assert len(portal.token_requests()) == 1  # the one refresh the 401 asked for
    assert events(conn, mentor, "attempt_succeeded")[-1]["attempt"] == 1


async def test_one_mentors_failure_never_delays_another(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, fcm: FakeFCM, sender: FirebaseAlertSender
) -> None:
    org, refused, refused_rec = paused_mentor(conn, portal)
    fine, fine_rec = add_mentor(conn, org, portal=portal, status="paused")
    async with running_service(db_url, portal, sender=sender):
        await eventually(lambda: sync_state(conn, refused) == "in_sync" and sync_state(conn, fine) == "in_sync")
        portal.always(Reply(status=403, delay_s=0.5), record_id=refused_rec)
        started = time.perf_counter()
        with conn.transaction():
            set_status(conn, refused, "active")
            set_status(conn, fine, "active")
        await eventually(lambda: portal.listed(fine_rec) is True, timeout=0.4, what="the healthy mentor first")
        fine_took = time.perf_counter() - started
        await eventually(lambda: sync_state(conn, refused) == "dead_lettered")
        await eventually(lambda: sync_state(conn, fine) == "in_sync")
        await eventually(lambda: len(fcm.messages()) == 1, what="the refused mentor's alert")
    assert fine_took < 0.4
    assert fcm.data_messages() == [{"type": "hlf_sync_failure", "mentor_id": str(refused), "operation": "restore"}]


async def test_portal_outage_for_many_mentors_opens_the_circuit_not_an_alert_storm(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, fcm: FakeFCM, sender: FirebaseAlertSender
) -> None:
    org = add_organisation(conn, alert_topic="org-coordinators")
    add_device(conn, org, DEVICE)
    mentors = [add_mentor(conn, org, portal=portal, status="paused") for _ in range(200)]
    env = {"HLF_MAX_ATTEMPTS": "3", "HLF_OPS_TOPIC": "ops"}
    async with running_service(db_url, portal, sender=sender, env=env):
        await eventually(lambda: all(sync_state(conn, m) == "in_sync" for m, _ in mentors), timeout=30)
        portal.always(Reply(status=503))
        conn.execute("UPDATE mentors SET status = 'active'")
        await eventually(
            lambda: conn.execute("SELECT count(*) FROM event_log WHERE kind = 'circuit_opened'").fetchone() == (1,),
            what="the circuit to open",
        )
        await anyio.sleep(1.0)  # the outage goes on: nobody may be dead-lettered meanwhile
        assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)
        portal.always(None)
        await eventually(
            lambda: conn.execute("SELECT count(*) FROM sync_status WHERE state = 'in_sync'").fetchone() == (200,),
            timeout=60,
            what="every mentor in sync after the outage",
        )
        await eventually(lambda: len(fcm.messages()) >= 1)
        await anyio.sleep(0.2)
    assert all(portal.listed(r) is True for _, r in mentors)  # valid certificates: every mentor is restored
    assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)
    assert fcm.data_messages() == [{"type": "hlf_portal_outage", "failing_mentors": "5"}]
    assert fcm.messages()[0].message["topic"] == "ops"
    assert conn.execute("SELECT count(*) FROM event_log WHERE kind = 'circuit_closed'").fetchone() == (1,)
    failed = portal.requests("PATCH")
    print(f"\noutage: {sum(1 for r in failed if r.status == 503)} failed PATCHes for 200 mentors, 1 alert")


async def test_requeue_after_the_portal_recovers_reaches_in_sync(
    db_url: str,
    conn: psycopg.Connection[Any],
    portal: FakePortal,
    fcm: FakeFCM,
    sender: FirebaseAlertSender,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from hlf_actors.cli import main

    _, mentor, record = paused_mentor(conn, portal)
    async with running_service(db_url, portal, sender=sender):
        await eventually(lambda: sync_state(conn, mentor) == "in_sync")
        portal.always(Reply(status=404), record_id=record)
        set_status(conn, mentor, "active")
        await eventually(lambda: sync_state(conn, mentor) == "dead_lettered")
        monkeypatch.setenv("HLF_DATABASE_URL", db_url)
        assert await anyio.to_thread.run_sync(main, ["dead-letters", "list"]) == 0
        assert "restore" in capsys.readouterr().out
        portal.always(None, record_id=record)
        assert await anyio.to_thread.run_sync(main, ["dead-letters", "requeue", "--all"]) == 0
        await eventually(lambda: sync_state(conn, mentor) == "in_sync" and portal.listed(record) is True)
        assert await anyio.to_thread.run_sync(main, ["dead-letters", "requeue", "--all"]) == 0
        assert "no open dead letters" in capsys.readouterr().out
    requeued = conn.execute("SELECT requeued_at IS NOT NULL FROM dead_letters WHERE mentor_id = %s", (mentor,))
    assert requeued.fetchall() == [(True,)]
    assert [
        k
        for (k,) in conn.execute(
            "SELECT kind FROM event_log WHERE mentor_id = %s AND seq > (SELECT max(seq) FROM event_log "
            "WHERE mentor_id = %s AND kind = 'dead_lettered') AND kind NOT LIKE 'alert_%%' ORDER BY seq",
            (mentor, mentor),
        ).fetchall()
    ] == ["requeued", "sync_requested", "attempt_succeeded"]


async def test_unregistered_device_is_reported_and_an_fcm_outage_never_blocks_syncing(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, fcm: FakeFCM, sender: FirebaseAlertSender
) -> None:
    org, refused, refused_rec = paused_mentor(conn, portal)
    add_device(conn, org, "uninstalled-app-token-0002")
    other, other_rec = add_mentor(conn, org, portal=portal, status="paused")
    fcm.unregister("uninstalled-app-token-0002")
    async with running_service(db_url, portal, sender=sender, alert_retry_delays_s=(0.05,)):
        await eventually(lambda: sync_state(conn, refused) == "in_sync" and sync_state(conn, other) == "in_sync")
        portal.always(Reply(status=403), record_id=refused_rec)
        set_status(conn, refused, "active")
        await eventually(
            lambda: len(events(conn, refused, "alert_sent")) + len(events(conn, refused, "alert_failed")) == 2,
            what="both deliveries recorded",
        )
        failed = events(conn, refused, "alert_failed")
        assert len(failed) == 1 and failed[0]["unregistered"] is True
        assert "uninstalled-app-token-0002" not in failed[0]["target"]

        fcm.outage(429)
        set_status(conn, refused, "paused")
        await eventually(lambda: len(events(conn, refused, "dead_lettered")) == 2)
        set_status(conn, other, "active")  # syncing goes on while FCM is down
        await eventually(lambda: portal.listed(other_rec) is True and sync_state(conn, other) == "in_sync")
        # The unregistered device is dead now (issue 21): only the live one is tried, and fails with FCM down.
        await eventually(lambda: len(events(conn, refused, "alert_failed")) == 2, what="the failed alerts recorded")
    assert {f["unregistered"] for f in events(conn, refused, "alert_failed")[1:]} == {False}
    assert [r[0] for r in conn.execute("SELECT reason FROM hlf_dead_devices")] == ["UNREGISTERED"]


async def test_a_backlog_is_paced_inside_the_service_protection_limit_without_429s(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    mentors = [add_mentor(conn, org, portal=portal, status="paused", cert_valid_days=None) for _ in range(60)]
    portal.enforce_service_protection(max_requests=25, window_s=1.0, max_concurrent=52)
    started = time.perf_counter()
    async with running_service(db_url, portal, env={"HLF_PORTAL_RATE_LIMIT": "25/1s"}):
        await eventually(lambda: all(sync_state(conn, m) == "in_sync" for m, _ in mentors), timeout=30)
    took = time.perf_counter() - started
    assert portal.throttled_count == 0
    assert len(portal.patches()) == 60
    assert took >= 2.0  # 60 requests at 25 per second cannot be faster than two full windows
