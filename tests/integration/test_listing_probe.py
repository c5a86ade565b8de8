"""The public listing probe (issue 12), through the real service, the fake portal and a fake public website.

The website serves the portal's records late (``cache_delay_s``), as Power Pages' cache does; the probe must report
the delay it saw, give up with one ops alert at the deadline, fetch once per poll for everyone, keep out of the way of
syncing when the website is down, and pick up after a restart from the log.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import anyio
import psycopg
import pytest

from hlf_actors import status
from hlf_actors.alerts import RecordingAlertSender
from hlf_actors.testing.fake_portal import FakePortal
from hlf_actors.testing.fake_website import FakeWebsite
from hlf_actors.testing.harness import eventually, running_service, sync_state
from hlf_actors.testing.seed import add_mentor, add_organisation, set_status

pytestmark = pytest.mark.anyio

CONFIRMED = "public_listing_confirmed"
STALE = "public_listing_stale"


def verdicts(
    conn: psycopg.Connection[Any], kind: str, mentor_id: UUID | None = None, *, operation: str | None
) -> list[dict[str, Any]]:
    """The probe's verdicts of one kind on one operation (``None``: on any).

    Creating a mentor is itself a change (``mentor_created``): the service may sync it, and the probe confirm it,
    before or together with the change a test makes. Each test therefore asks about the operation it drove.
    """
    rows = conn.execute(
        "SELECT data FROM event_log WHERE kind = %s AND (%s::uuid IS NULL OR mentor_id = %s) "
        "AND (%s::text IS NULL OR data->>'operation' = %s) ORDER BY seq",
        (kind, mentor_id, mentor_id, operation, operation),
    ).fetchall()
    return [dict(r[0]) for r in rows]


def probe_env(site: FakeWebsite, **extra: str) -> dict[str, str]:
    return {**site.env(), "HLF_PUBLIC_LISTING_DEADLINE": "60s", **extra}


async def test_a_removal_is_confirmed_with_the_website_cache_delay(
    conn: psycopg.Connection[Any], db_url: str, portal: FakePortal
) -> None:
    org = add_organisation(conn)
    mentor, record = add_mentor(conn, org, portal=portal)
    with FakeWebsite(portal, cache_delay_s=2.0) as site:
        async with running_service(db_url, portal, env=probe_env(site)):
            set_status(conn, mentor, "paused")
            await eventually(
                lambda: verdicts(conn, CONFIRMED, mentor, operation="remove"), timeout=15, what="confirmed"
            )
            assert portal.records()[str(record)] is False
    (confirmed,) = verdicts(conn, CONFIRMED, mentor, operation="remove")
    assert 1900 <= confirmed["delay_ms"] <= 3600, confirmed
    assert confirmed["exposure_ms"] >= confirmed["delay_ms"]
    assert confirmed["fetches"] >= 2  # the first fetch still saw the mentor
    assert not verdicts(conn, STALE, operation=None)
    succeeded = conn.execute(
        "SELECT max(seq) FROM event_log WHERE mentor_id = %s AND kind = 'attempt_succeeded'", (mentor,)
    ).fetchone()
    assert succeeded is not None and confirmed["for_seq"] == succeeded[0]


async def test_a_website_that_never_refreshes_gives_one_stale_verdict_and_one_alert(
    conn: psycopg.Connection[Any], db_url: str, portal: FakePortal
) -> None:
    org = add_organisation(conn)
    mentor, _ = add_mentor(conn, org, portal=portal)
    sender = RecordingAlertSender()
    with FakeWebsite(portal, cache_delay_s=None) as site:
        env = probe_env(site, HLF_PUBLIC_LISTING_DEADLINE="1s")
        async with running_service(db_url, portal, sender=sender, env=env):
            set_status(conn, mentor, "paused")
            await eventually(lambda: verdicts(conn, STALE, mentor, operation="remove"), timeout=10, what="stale")
            await anyio.sleep(2.5)  # nothing more may come of it
    (stale,) = verdicts(conn, STALE, mentor, operation="remove")
    assert stale["waited_ms"] >= 1000
    assert "still shows the mentor" in stale["reason"]
    (alert,) = [a for a in sender.data_messages() if a["type"] == "hlf_public_listing_stale"]
    assert alert["mentor_id"] == str(mentor) and alert["operation"] == "remove" and int(alert["waited_s"]) >= 1
    assert sorted(alert) == ["mentor_id", "operation", "type", "waited_s"]
    assert not verdicts(conn, CONFIRMED, operation="remove")


async def test_with_the_probe_off_the_website_is_never_asked(
    conn: psycopg.Connection[Any], db_url: str, portal: FakePortal
) -> None:
    org = add_organisation(conn)
    mentor, _ = add_mentor(conn, org, portal=portal)
    with FakeWebsite(portal) as site:
        async with running_service(db_url, portal) as service:
            set_status(conn, mentor, "paused")
            await eventually(lambda: sync_state(conn, mentor) == "in_sync", what="the sync")
            await anyio.sleep(1.0)
            assert service.probe is None
        assert site.requests == 0


async def test_many_mentors_changed_at_once_share_each_fetch(
    conn: psycopg.Connection[Any], db_url: str, portal: FakePortal
) -> None:
    org = add_organisation(conn)
    mentors = [add_mentor(conn, org, portal=portal, name=f"Mentor {i}")[0] for i in range(50)]
    with FakeWebsite(portal, cache_delay_s=1.5) as site:
        async with running_service(db_url, portal, env=probe_env(site)):
            before = site.requests  # the mentors' creation may have been synced and confirmed already
            conn.execute("UPDATE mentors SET status = 'paused' WHERE id = ANY(%s)", (mentors,))
            await eventually(
                lambda: len(verdicts(conn, CONFIRMED, operation="remove")) == 50, timeout=20, what="50 confirmations"
            )
            spent = site.requests - before
    fetches = max(v["fetches"] for v in verdicts(conn, CONFIRMED, operation="remove"))
    assert spent <= 15, f"{spent} fetches for 50 mentors"
    assert fetches <= spent


async def test_the_website_down_never_holds_up_syncing_and_is_confirmed_once_back(
    conn: psycopg.Connection[Any], db_url: str, portal: FakePortal, capsys: pytest.CaptureFixture[str]
) -> None:
    org = add_organisation(conn)
    mentors = [add_mentor(conn, org, portal=portal, name=f"Mentor {i}")[0] for i in range(5)]
    with FakeWebsite(portal, cache_delay_s=0.0) as site:
        site.down = True
        async with running_service(db_url, portal, env=probe_env(site)):
            conn.execute("UPDATE mentors SET status = 'paused' WHERE id = ANY(%s)", (mentors,))
            await eventually(lambda: all(sync_state(conn, m) == "in_sync" for m in mentors), what="all synced")
            await eventually(lambda: site.requests >= 2, what="the probe trying the website")
            assert not verdicts(conn, CONFIRMED, operation=None)
            site.down = False
            await eventually(
                lambda: len(verdicts(conn, CONFIRMED, operation="remove")) == 5, timeout=15, what="confirmations"
            )
    assert not verdicts(conn, STALE, operation=None)


async def test_a_new_leader_resumes_the_watches_a_stopped_one_left(
    conn: psycopg.Connection[Any], db_url: str, portal: FakePortal
) -> None:
    org = add_organisation(conn)
    mentor, _ = add_mentor(conn, org, portal=portal)
    with FakeWebsite(portal, cache_delay_s=3.0) as site:
        async with running_service(db_url, portal, env=probe_env(site)):
            set_status(conn, mentor, "paused")
            await eventually(lambda: sync_state(conn, mentor) == "in_sync", what="the sync")
        assert not verdicts(conn, CONFIRMED, operation="remove")  # stopped before the website's cache refreshed
        async with running_service(db_url, portal, env=probe_env(site)):
            await eventually(
                lambda: verdicts(conn, CONFIRMED, mentor, operation="remove"), timeout=15, what="confirmed"
            )
            await anyio.sleep(1.0)
    (confirmed,) = verdicts(conn, CONFIRMED, mentor, operation="remove")
    assert confirmed["delay_ms"] >= 2900


async def test_matching_by_name_reads_the_escaped_name_and_status_shows_the_window(
    conn: psycopg.Connection[Any], db_url: str, portal: FakePortal
) -> None:
    org = add_organisation(conn)
    mentor, record = add_mentor(conn, org, portal=portal, name="Siobhán O'Brien & Co", status="paused", listed=False)
    with FakeWebsite(portal, cache_delay_s=0.5) as site:
        site.names[str(record)] = "Siobhán O'Brien & Co"
        env = probe_env(site, HLF_PUBLIC_LISTING_MATCH="full_name")
        async with running_service(db_url, portal, env=env):
            # the mentor's creation (a remove: it is paused) is synced and confirmed first, so both are counted
            await eventually(lambda: verdicts(conn, CONFIRMED, mentor, operation="remove"), timeout=15, what="created")
            set_status(conn, mentor, "active")
            await eventually(lambda: verdicts(conn, CONFIRMED, mentor, operation="restore"), timeout=15, what="restore")
        assert "O&#x27;Brien &amp; Co" in site.page() or "O&#39;Brien &amp; Co" in site.page()
    (confirmed,) = verdicts(conn, CONFIRMED, mentor, operation="restore")
    assert confirmed["delay_ms"] >= 400
    both = verdicts(conn, CONFIRMED, operation=None)
    summary = status.summary(conn, probe_on=True)
    assert summary.public_listing is not None
    assert summary.public_listing["confirmed"] == len(both) == 2 and summary.public_listing["stale"] == 0
    assert summary.public_listing["exposure_ms"]["max"] == max(v["exposure_ms"] for v in both)
    text = status.render_summary(summary)
    assert "public website (24 h)     2 confirmed, 0 stale; exposure p50" in text
