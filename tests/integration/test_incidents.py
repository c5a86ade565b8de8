"""Tenant-wide incidents: a failure that hits every mentor is one incident, held, healed without a human.

The real service in-process, the fake Dataverse answering as the real one does when its tenant is misconfigured
(each answer cites its Microsoft Learn page in ``fake_portal.py``), the fake FCM receiving the alerts.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import psycopg
import pytest

from hlf_actors import status
from hlf_actors.fcm import FirebaseAlertSender
from hlf_actors.service import Service
from hlf_actors.testing.fake_fcm import FakeFCM
from hlf_actors.testing.fake_portal import FakePortal, RecordedRequest, Reply
from hlf_actors.testing.harness import eventually, running_service
from hlf_actors.testing.seed import add_device, add_mentor, add_organisation

pytestmark = pytest.mark.anyio

DEVICE = "coordinator-phone-registration-token-incidents"
# Short incident checks so that healing is seen in seconds; the defaults (30 s doubling to 5 min) are in config.
FAST_CHECKS = {"HLF_INCIDENT_CHECK_EVERY": "200ms", "HLF_INCIDENT_CHECK_MAX": "1s", "HLF_OPS_TOPIC": "ops"}


def seed(conn: psycopg.Connection[Any], portal: FakePortal, count: int) -> list[tuple[UUID, UUID]]:
    """``count`` active, listed mentors of one organisation that has a coordinator phone."""
    org = add_organisation(conn)
    add_device(conn, org, DEVICE)
    mentors = []
    for i in range(count):
        mentor, record = add_mentor(conn, org, portal=portal, name=f"Mentor {i}")
        assert record is not None
        mentors.append((mentor, record))
    return mentors


@asynccontextmanager
async def after_first_syncs(
    db_url: str,
    conn: psycopg.Connection[Any],
    portal: FakePortal,
    mentors: list[tuple[UUID, UUID]],
    *,
    timeout: float = 10.0,
    **service: Any,
) -> AsyncIterator[Service]:
    """The service running (``service``: running_service's keywords), once every seeded mentor had its first sync."""
    async with running_service(db_url, portal, **service) as running:
        await eventually(lambda: all_in_sync(conn, mentors), timeout=timeout, what="the first syncs")
        yield running


def states(conn: psycopg.Connection[Any], mentors: list[tuple[UUID, UUID]]) -> dict[str, int]:
    rows = conn.execute(
        "SELECT state, count(*) FROM sync_status WHERE mentor_id = ANY(%s) GROUP BY state",
        ([m for m, _ in mentors],),
    ).fetchall()
    return {state: n for state, n in rows}


def all_in_sync(conn: psycopg.Connection[Any], mentors: list[tuple[UUID, UUID]]) -> bool:
    return states(conn, mentors) == {"in_sync": len(mentors)}


def pause_all(conn: psycopg.Connection[Any], mentors: list[tuple[UUID, UUID]]) -> None:
    conn.execute("UPDATE mentors SET status = 'paused' WHERE id = ANY(%s)", ([m for m, _ in mentors],))


def count(conn: psycopg.Connection[Any], sql: str, *args: Any) -> int:
    row = conn.execute(sql, args).fetchone()
    assert row is not None
    return int(row[0])


def ops_alerts(fcm: FakeFCM) -> list[dict[str, str]]:
    return [m.data for m in fcm.messages() if m.message.get("topic") == "ops"]


def coordinator_pushes(fcm: FakeFCM) -> list[dict[str, str]]:
    return [m.data for m in fcm.messages() if m.message.get("token") == DEVICE]


def all_unlisted(portal: FakePortal, mentors: list[tuple[UUID, UUID]]) -> bool:
    return all(portal.listed(record) is False for _, record in mentors)


def all_removed(conn: psycopg.Connection[Any], portal: FakePortal, mentors: list[tuple[UUID, UUID]]) -> bool:
    """The pause reached the portal for every mentor, and each outcome is recorded."""
    return all_unlisted(portal, mentors) and all_in_sync(conn, mentors)


def assert_held(conn: psycopg.Connection[Any], fcm: FakeFCM, mentors: list[tuple[UUID, UUID]], cause: str) -> None:
    """Held as one incident: nobody dead-lettered or pushed, no attempt counted, last_error names the incident."""
    assert count(conn, "SELECT count(*) FROM dead_letters") == 0
    assert coordinator_pushes(fcm) == []
    rows = conn.execute(
        "SELECT state, attempts, last_error FROM sync_status WHERE mentor_id = ANY(%s)", ([m for m, _ in mentors],)
    ).fetchall()
    assert {state for state, _, _ in rows} <= {"pending", "retrying"}
    assert {attempts for _, attempts, _ in rows} == {0}
    assert all(error and error.startswith("held: ") and f"({cause})" in error for _, _, error in rows), rows[:3]


async def test_a_revoked_secret_is_one_incident_and_a_new_secret_in_the_file_heals_it(
    db_url: str,
    conn: psycopg.Connection[Any],
    portal: FakePortal,
    fcm: FakeFCM,
    sender: FirebaseAlertSender,
    tmp_path: Path,
) -> None:
    secret_file = tmp_path / "dynamics-secret"
    secret_file.write_text(portal.client_secret + "\n")
    env = {
        "HLF_DYNAMICS_CLIENT_SECRET": "",
        "HLF_DYNAMICS_CLIENT_SECRET_FILE": str(secret_file),
        "HLF_OPS_TOPIC": "ops",
    }
    mentors = seed(conn, portal, 50)
    async with running_service(db_url, portal, sender=sender, env=env):
        await eventually(lambda: all_in_sync(conn, mentors), what="the 50 mentors' first syncs")
        portal.rotate_secret("the-new-secret-only-entra-id-knows-so-far")
        portal.revoke_tokens()
        pause_all(conn, mentors)
        await eventually(lambda: ops_alerts(fcm), what="the ops alert")
        # Three times the sum of the backoff delays (10+20+40+80 ms with HLF_MAX_ATTEMPTS 5), with room to spare.
        await anyio.sleep(1.5)
        assert_held(conn, fcm, mentors, "credentials")
        assert [a["type"] for a in ops_alerts(fcm)] == ["hlf_credential_failure"]
        assert "HLF_DYNAMICS_CLIENT_SECRET_FILE" in ops_alerts(fcm)[0]["fix"]
        assert all(portal.listed(record) for _, record in mentors)  # nothing reached the portal
        with psycopg.connect(db_url, autocommit=True) as c:
            summary = status.summary(c)
        assert summary.incident is not None and summary.incident["cause"] == "credentials"

        healing_started = time.monotonic()
        secret_file.write_text("the-new-secret-only-entra-id-knows-so-far\n")  # rotation: no restart, no requeue
        await eventually(
            lambda: all_removed(conn, portal, mentors), timeout=60, what="all 50 removed after the rotation"
        )
        healed_s = time.monotonic() - healing_started
        assert all_unlisted(portal, mentors)
        await eventually(lambda: len(ops_alerts(fcm)) == 2, what="the all-clear")
    assert [a["type"] for a in ops_alerts(fcm)] == ["hlf_credential_failure", "hlf_credential_restored"]
    assert count(conn, "SELECT count(*) FROM dead_letters") == 0
    assert count(conn, "SELECT count(*) FROM event_log WHERE kind = 'requeued'") == 0
    assert coordinator_pushes(fcm) == []
    assert healed_s < 60


def _remove_app_user(portal: FakePortal, broken: bool) -> None:
    portal.remove_app_user(broken)


def _revoke_write(portal: FakePortal, broken: bool) -> None:
    portal.revoke_privilege("write", broken)


def _rename_entity_set(portal: FakePortal, broken: bool) -> None:
    portal.rename_entity_set("hlf_mentorlistings_v2" if broken else "hlf_mentorlistings")


def _rename_column(portal: FakePortal, broken: bool) -> None:
    portal.rename_column("hlf_shownpublicly" if broken else "hlf_publiclisting")


def _sign_in_page(portal: FakePortal, broken: bool) -> None:
    portal.answer_with_sign_in_page(broken)


@pytest.mark.parametrize(
    ("breakage", "cause"),
    [
        (_remove_app_user, "app_user_missing"),
        (_revoke_write, "privilege"),
        (_rename_entity_set, "entity_set"),
        (_rename_column, "property"),
        (_sign_in_page, "not_dataverse"),
    ],
    ids=["app-user-removed", "role-without-write", "entity-set-renamed", "column-renamed", "not-dataverse"],
)
async def test_a_tenant_misconfiguration_is_one_incident_that_heals_once_fixed(
    db_url: str,
    conn: psycopg.Connection[Any],
    portal: FakePortal,
    fcm: FakeFCM,
    sender: FirebaseAlertSender,
    breakage: Callable[[FakePortal, bool], None],
    cause: str,
) -> None:
    mentors = seed(conn, portal, 10)
    async with after_first_syncs(db_url, conn, portal, mentors, sender=sender, env=FAST_CHECKS) as service:
        breakage(portal, True)
        pause_all(conn, mentors)
        await eventually(lambda: ops_alerts(fcm), what="the ops alert")
        await anyio.sleep(1.0)  # several incident checks, all failing
        assert_held(conn, fcm, mentors, cause)
        health = service.health()  # what /healthz's body says
        assert health.incident == cause and health.incident_since and health.incident_fix
        assert f'hlf_tenant_incident_open{{cause="{cause}"}} 1.0'.encode() in service.metrics.render()
        (alert,) = ops_alerts(fcm)
        assert alert["type"] == "hlf_portal_incident" and alert["cause"] == cause and alert["fix"]
        assert not any(portal.listed(record) is False for _, record in mentors)

        breakage(portal, False)
        await eventually(lambda: all_removed(conn, portal, mentors), what="every held mentor removed once fixed")
        await eventually(lambda: len(ops_alerts(fcm)) == 2, what="the all-clear")
        assert service.health().incident is None
        assert b"hlf_tenant_incident_open{" not in service.metrics.render()
    assert [a["type"] for a in ops_alerts(fcm)] == ["hlf_portal_incident", "hlf_portal_incident_resolved"]
    assert ops_alerts(fcm)[1]["cause"] == cause
    assert count(conn, "SELECT count(*) FROM dead_letters") == 0
    transitions = conn.execute(
        "SELECT data ->> 'transition', data ->> 'cause' FROM event_log WHERE kind = 'credential_check' "
        "AND data ->> 'transition' IS NOT NULL ORDER BY seq"
    ).fetchall()
    assert transitions == [("failed", cause), ("restored", None)]


async def test_one_deleted_record_is_that_mentors_problem_alone(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, fcm: FakeFCM, sender: FirebaseAlertSender
) -> None:
    mentors = seed(conn, portal, 5)
    async with after_first_syncs(db_url, conn, portal, mentors, sender=sender, env=FAST_CHECKS):
        gone_mentor, gone_record = mentors[0]
        portal.remove_record(gone_record)
        pause_all(conn, mentors)
        await eventually(lambda: states(conn, mentors) == {"in_sync": 4, "dead_lettered": 1}, what="the outcomes")
        await eventually(lambda: coordinator_pushes(fcm), what="the coordinators' push")
    (letter,) = conn.execute("SELECT mentor_id, attempts FROM dead_letters").fetchall()
    assert letter == (gone_mentor, 1)  # dead-lettered on its first attempt: retrying cannot bring it back
    assert [p["type"] for p in coordinator_pushes(fcm)] == ["hlf_sync_failure"]
    assert ops_alerts(fcm) == []  # no incident
    assert portal.listed(gone_record) is None  # the PATCH sent If-Match: *, so it did not re-create the record
    assert all(r.headers.get("if-match") == "*" for r in portal.patches()), (
        "every PATCH must carry If-Match: *, or Dataverse would upsert"
    )


async def test_an_undecided_refusal_for_one_record_runs_the_tenant_check_once_and_dead_letters_it(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, fcm: FakeFCM, sender: FirebaseAlertSender
) -> None:
    mentors = seed(conn, portal, 3)
    async with after_first_syncs(db_url, conn, portal, mentors, sender=sender, env=FAST_CHECKS):
        portal.always(Reply(403), mentors[0][1])  # a 403 whose words name no cause
        checks_before = len(portal.requests("GET"))
        pause_all(conn, mentors)
        await eventually(lambda: states(conn, mentors) == {"in_sync": 2, "dead_lettered": 1}, what="the outcomes")
    assert len(portal.requests("GET")) == checks_before + 3  # one tenant check: WhoAmI, a read, Write access
    assert ops_alerts(fcm) == []


async def test_undecided_refusals_that_the_tenant_check_explains_open_one_incident(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, fcm: FakeFCM, sender: FirebaseAlertSender
) -> None:
    """A proxy in front of Dataverse answers every PATCH with a bare 403, and the role lost Read as well: the check
    names the cause the answers did not."""
    mentors = seed(conn, portal, 10)
    async with after_first_syncs(db_url, conn, portal, mentors, sender=sender, env=FAST_CHECKS):
        portal.always(Reply(403))
        portal.revoke_privilege("read")
        pause_all(conn, mentors)
        await eventually(lambda: ops_alerts(fcm), what="the ops alert")
        await anyio.sleep(0.5)
        assert_held(conn, fcm, mentors, "privilege")
        portal.always(None)
        portal.revoke_privilege("read", False)
        await eventually(lambda: all_removed(conn, portal, mentors), what="every held mentor removed once fixed")
    assert [a["type"] for a in ops_alerts(fcm)][:1] == ["hlf_portal_incident"]


def _throttle_answers(portal: FakePortal) -> list[RecordedRequest]:
    return [r for r in portal.patches() if r.status == 429]


async def test_a_429_holds_every_sender_until_retry_after_and_spends_no_attempt(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal
) -> None:
    mentors = seed(conn, portal, 20)
    async with after_first_syncs(db_url, conn, portal, mentors, env={"HLF_PORTAL_CONCURRENCY": "20"}):
        portal.clear_requests()
        portal.throttle_for(3.0, grow_s=0.02)  # a request sent during the wait would lengthen it
        pause_all(conn, mentors)
        await eventually(lambda: all_removed(conn, portal, mentors), timeout=20, what="all 20 removed after the wait")
    throttled = _throttle_answers(portal)
    succeeded = [r for r in portal.patches() if r.status == 204]
    assert throttled, "the portal never throttled: the test proves nothing"
    assert len(succeeded) == 20
    assert len({r.record_id for r in throttled}) == len(throttled)  # each mentor was throttled at most once
    assert min(r.at for r in succeeded) - min(r.at for r in throttled) >= 3.0  # nobody sent during Retry-After
    assert (
        count(
            conn, "SELECT count(*) FROM sync_status WHERE attempts > 1 AND mentor_id = ANY(%s)", [m for m, _ in mentors]
        )
        == 0
    )


async def test_fifty_concurrent_401s_cause_one_token_request(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal
) -> None:
    mentors = seed(conn, portal, 50)
    async with after_first_syncs(db_url, conn, portal, mentors, env={"HLF_PORTAL_CONCURRENCY": "50"}):
        before = len(portal.token_requests())
        portal.revoke_tokens()  # every token in use is refused from now on; the secret still works
        pause_all(conn, mentors)
        await eventually(lambda: all_removed(conn, portal, mentors), what="all 50 removed")
    refused = [r for r in portal.patches() if r.status == 401]
    assert len(refused) >= 20, "too few concurrent 401s for the test to mean anything"
    assert len(portal.token_requests()) - before == 1


async def test_an_outage_holds_the_queued_backlog_and_it_drains_after_healing(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal
) -> None:
    """2,000 changes during a 30 s outage: only the requests in flight and a few probes go out while it lasts."""
    mentors = seed(conn, portal, 2000)
    env = {"HLF_PORTAL_RATE_LIMIT": "6000/5m", "HLF_BACKOFF_BASE_MS": "2000", "HLF_BACKOFF_MAX_MS": "300000"}
    async with after_first_syncs(db_url, conn, portal, mentors, timeout=60, env=env):
        portal.clear_requests()
        portal.always(Reply(503))
        pause_all(conn, mentors)
        await anyio.sleep(30)
        during = len(portal.patches())
        portal.always(None)
        healed = time.monotonic()
        await eventually(
            lambda: all_removed(conn, portal, mentors), timeout=120, what="all 2,000 removed after healing"
        )
        drained_s = time.monotonic() - healed
    print(f"outage: {during} PATCHes during 30 s of 503s; all 2,000 in sync {drained_s:.1f} s after healing")
    assert during <= 10 + 6, f"{during} PATCHes went into the dead portal"
    assert drained_s <= 120
    assert all_unlisted(portal, mentors)


async def test_a_listing_read_that_lacks_most_records_is_refused(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, fcm: FakeFCM, sender: FirebaseAlertSender
) -> None:
    mentors = seed(conn, portal, 40)
    owned = {str(record) for _, record in mentors[:2]}  # 5 %: a role with user-level Read sees its own rows only
    env = {**FAST_CHECKS, "HLF_RECONCILE_EVERY": "300ms"}
    async with after_first_syncs(db_url, conn, portal, mentors, sender=sender, env=env):
        portal.restrict_reads_to(owned)
        for _, record in mentors[2:]:  # the portal drifts, but the read cannot show it
            portal.add_record(record, listed=False)
        await eventually(
            lambda: count(conn, "SELECT count(*) FROM event_log WHERE kind = 'reconcile_aborted'") >= 3,
            what="three aborted reconciliations",
        )
        await eventually(lambda: ops_alerts(fcm), what="the ops alert")
    (alert,) = ops_alerts(fcm)  # once, however many runs abort
    assert alert["type"] == "hlf_reconcile_aborted" and alert["missing"] == "38" and alert["linked_mentors"] == "40"
    (aborted,) = conn.execute(
        "SELECT data FROM event_log WHERE kind = 'reconcile_aborted' ORDER BY seq LIMIT 1"
    ).fetchone() or (None,)
    assert aborted["portal_records"] == 2 and aborted["missing"] == 38 and aborted["max_missing_share"] == 0.1
    assert (
        count(
            conn, "SELECT count(*) FROM event_log WHERE kind = 'sync_requested' AND data ->> 'reason' = %s", "reconcile"
        )
        == 0
    )
