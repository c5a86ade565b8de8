"""Chaos in CI, kept to seconds: a portal answering a seeded random mix of failures, a burst under Dataverse's
service-protection limits, a proxy that goes silent. ``scripts/chaos.py`` runs the long versions and reports figures.
"""

from __future__ import annotations

import io
import json
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import anyio
import psycopg
import pytest
from loguru import logger
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from hlf_actors.fcm import FirebaseAlertSender
from hlf_actors.logs import setup_logging
from hlf_actors.testing.fake_fcm import FakeFCM
from hlf_actors.testing.fake_portal import FakePortal, Reply, chaos_mix, token_chaos_mix
from hlf_actors.testing.harness import eventually, running_service, sync_state
from hlf_actors.testing.proxy import TcpProxy
from hlf_actors.testing.seed import add_device, add_mentor, add_organisation

pytestmark = pytest.mark.anyio

SECRET = "HLF-CI-CHAOS-CLIENT-SECRET-3c1f9a"
TIMEOUT_S = 0.5
SLOW_S = TIMEOUT_S + 0.3
# What a dead letter's last_error must say: the status the portal answered, or what the transport did.
CLEAR_ERROR = re.compile(r"answered \d{3}|timed out|failed: \w+|unreachable|unreadable|refused")


def key_fragments(service_account: Path) -> list[str]:
    """Pieces of the FCM private key that must never appear anywhere: its id and lines of the PEM."""
    account = json.loads(service_account.read_text())
    body = [line for line in account["private_key"].splitlines() if line and not line.startswith("-----")]
    return [account["private_key_id"], body[1], body[len(body) // 2], body[-2]]


def _to_current_stderr(message: Any) -> None:
    sys.stderr.write(message)  # whatever stderr is when the line is written: pytest swaps it per test


def open_syncs(conn: psycopg.Connection[Any]) -> int:
    """Changes not yet projected (still in the inbox) plus syncs pending or retrying: 0 once all have settled."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM hlf_inbox) + "
        "(SELECT count(*) FROM sync_status WHERE state IN ('pending', 'retrying'))"
    ).fetchone()
    return int(row[0]) if row else -1


async def test_a_random_mix_of_portal_failures_leaves_every_mentor_right_or_clearly_dead_lettered(
    db_url: str, conn: psycopg.Connection[Any], fcm: FakeFCM, tmp_path: Path
) -> None:
    env_fcm = fcm.env(tmp_path / "service-account.json")
    secrets = [SECRET, *key_fragments(tmp_path / "service-account.json")]
    credentials, fcm_url = env_fcm["HLF_FCM_CREDENTIALS"], env_fcm["HLF_FCM_URL"]
    sender = FirebaseAlertSender(credentials, fcm_url=fcm_url, app_name=f"chaos-{uuid4()}")
    settings = {"HLF_PORTAL_TIMEOUT": f"{TIMEOUT_S}s", "HLF_MAX_ATTEMPTS": "4", "HLF_BACKOFF_MAX_MS": "200"}
    captured = io.StringIO()
    with FakePortal(client_secret=SECRET, token_lifetime_s=3) as portal:
        org = add_organisation(conn, alert_topic="chaos-coordinators")
        add_device(conn, org, "coordinator-phone-registration-token-chaos-0001")
        mentors = [add_mentor(conn, org, portal=portal, name=f"Mentor {i}") for i in range(40)]
        setup_logging(stream=captured, json=True, level="DEBUG", secrets=[SECRET])  # what `run` sets up
        try:
            async with running_service(db_url, portal, sender=sender, env=settings):
                await eventually(lambda: all(sync_state(conn, m) == "in_sync" for m, _ in mentors), timeout=30)
                portal.clear_requests()
                portal.random_replies(chaos_mix(SLOW_S), seed=20240611)
                portal.random_token_failures(token_chaos_mix(), seed=7)
                # Two rounds, each a change of every mentor in its own transaction; between them the late answers
                # land, so a PATCH applied after its client gave up never overwrites the next round's.
                for status in ("paused", "active"):
                    portal.revoke_tokens()  # the next PATCH gets a 401 and must fetch a token from a flaky endpoint
                    for mentor, _ in mentors:
                        conn.execute("UPDATE mentors SET status = %s WHERE id = %s", (status, mentor))
                    await eventually(lambda: open_syncs(conn) == 0, timeout=45, what="every sync to settle")
                    await anyio.sleep(SLOW_S)
        finally:
            logger.remove()
            logger.add(_to_current_stderr, level="INFO")
        statuses = {p.status for p in portal.patches()}
        records = portal.records()

    # The mix really played: throttling, server errors, resets and permanent refusals all reached the service.
    assert {429, 0} <= statuses and statuses & {500, 502, 503, 504} and statuses & {403, 404}, statuses
    rows = conn.execute(
        "SELECT m.id, m.portal_record_id, hlf_is_eligible(m.id, (now() AT TIME ZONE 'Europe/Oslo')::date), "
        "s.state, s.last_error, (SELECT count(*) FROM dead_letters d WHERE d.mentor_id = m.id "
        "AND d.requeued_at IS NULL) FROM mentors m JOIN sync_status s ON s.mentor_id = m.id"
    ).fetchall()
    assert len(rows) == len(mentors)
    right = 0
    for mentor, record, eligible, state, last_error, letters in rows:
        assert state in ("in_sync", "dead_lettered"), (mentor, state)
        if state == "in_sync":
            assert records[str(record)] is eligible, f"mentor {mentor} is in sync but wrong on the portal"
            right += 1
        else:
            assert letters >= 1, f"mentor {mentor} is dead-lettered without a dead letter"
            assert last_error and CLEAR_ERROR.search(last_error), (mentor, last_error)
    assert right >= len(mentors) // 2, f"only {right} of {len(mentors)} mentors made it through"
    dump = conn.execute(
        "SELECT coalesce(string_agg(data::text, ' '), '') || (SELECT coalesce(string_agg(last_error, ' '), '') "
        "FROM dead_letters) FROM event_log"
    ).fetchone()
    assert dump is not None
    log_text = captured.getvalue()
    assert "throttled by the portal" in log_text  # the log was captured: its search below means something
    for secret in secrets:
        assert secret not in log_text and secret not in dump[0], "a secret leaked into the log or the database"


async def test_a_burst_is_paced_inside_the_portals_service_protection_limits(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    mentors: list[UUID] = []
    for i in range(200):
        mentor, _ = add_mentor(conn, org, portal=portal, status="paused", listed=False, name=f"Mentor {i}")
        mentors.append(mentor)
    async with running_service(db_url, portal, env={"HLF_PORTAL_RATE_LIMIT": "100/2s"}):
        await eventually(lambda: all(sync_state(conn, m) == "in_sync" for m in mentors), timeout=30)
        # Dataverse's limits, scaled: at most 100 requests in any 2 s, 20 in flight; every answer takes 20 ms.
        portal.always(Reply(204, delay_s=0.02))
        portal.enforce_service_protection(max_requests=100, window_s=2.0, max_concurrent=20)
        portal.clear_requests()
        started = time.perf_counter()
        for mentor in mentors:  # 200 changes, one transaction each, as fast as one writer goes
            conn.execute("UPDATE mentors SET status = 'active' WHERE id = %s", (mentor,))
        await eventually(lambda: sum(portal.records().values()) == len(mentors), timeout=30, what="all listed")
        took = time.perf_counter() - started
        await eventually(lambda: all(sync_state(conn, m) == "in_sync" for m in mentors), timeout=10)
    patches = portal.patches()
    assert [p.status for p in patches if p.status != 204] == []  # not a single 429
    assert portal.throttled_count == 0
    assert len(patches) == len(mentors)
    assert took >= 2.0, f"{len(mentors)} requests at 100 per 2 s took only {took:.2f} s"


def test_a_frozen_proxy_holds_traffic_without_closing_and_thaw_delivers_it(db_url: str) -> None:
    server = conninfo_to_dict(db_url)
    with TcpProxy(str(server["host"]), int(server.get("port") or 5432)) as proxy:
        url = make_conninfo(db_url, host="127.0.0.1", port=str(proxy.port))
        with psycopg.connect(url, autocommit=True) as through:
            assert through.execute("SELECT 1").fetchone() == (1,)
            proxy.freeze()
            answers: list[Any] = []
            query = threading.Thread(target=lambda: answers.append(through.execute("SELECT 2").fetchone()))
            query.start()
            query.join(0.5)
            assert query.is_alive() and answers == [] and not through.closed  # silent, not closed
            late: list[Exception] = []

            def connect_while_frozen() -> None:
                try:
                    psycopg.connect(url, connect_timeout=1).close()
                except psycopg.OperationalError as err:
                    late.append(err)

            newcomer = threading.Thread(target=connect_while_frozen)
            newcomer.start()
            newcomer.join(3)
            assert late and "timeout" in str(late[0]).lower()  # new connections hang as well
            proxy.thaw()
            query.join(5)
            assert answers == [(2,)]
            assert through.execute("SELECT 3").fetchone() == (3,)
