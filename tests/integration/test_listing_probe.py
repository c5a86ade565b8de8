"""The public listing probe (issues 12 and 23), through the real service, the fake portal and a fake Power Pages site.

The site serves the portal's records late (``cache_delay_s``), as Power Pages' server-side cache does, through the
views a real site has: the portals Web API, a server-rendered paged list, a stock list whose rows the browser loads,
a sign-in redirect, a firewall block page. The probe must confirm only what a read actually showed (the rows of the
structured listing, or an HTML page proven to be the listing), report the delay it saw, give up with one ops alert
and a named reason at the deadline, ask the site at most once per interval for everyone, and pick up after a
restart from the log with exactly one verdict per success.
"""

from __future__ import annotations

import math
from typing import Any
from uuid import UUID

import anyio
import psycopg
import pytest
from loguru import logger

from hlf_actors import render, status
from hlf_actors.service import Service
from hlf_actors.testing.fake_portal import FakePortal
from hlf_actors.testing.fake_website import FakeWebsite, View
from hlf_actors.testing.harness import eventually, running_service, sync_state
from hlf_actors.testing.recording import RecordingAlertSender
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


def probe_env(site: FakeWebsite, view: View = "api", **extra: str) -> dict[str, str]:
    return {**site.env(view), "HLF_PUBLIC_LISTING_DEADLINE": "60s", "HLF_PUBLIC_LISTING_MIN_INTERVAL": "200ms", **extra}


def unrecognised_reads(service: Service) -> float:
    value = service.metrics.registry.get_sample_value("hlf_public_listing_unrecognised_total")
    return value or 0.0


async def test_a_removal_is_confirmed_from_the_web_api_with_the_website_cache_delay(
    conn: psycopg.Connection[Any], db_url: str, portal: FakePortal, org: UUID
) -> None:
    mentor, record = add_mentor(conn, org, portal=portal)
    with FakeWebsite(portal, cache_delay_s=2.0) as site:
        async with running_service(db_url, portal, env=probe_env(site)):
            set_status(conn, mentor, "paused")
            await eventually(
                lambda: verdicts(conn, CONFIRMED, mentor, operation="remove"), timeout=15, what="confirmed"
            )
            assert portal.records()[str(record)] is False
        assert any(p.startswith("/_api/hlf_mentorlistings?$select=hlf_mentorlistingid&") for p in site.paths)
    (confirmed,) = verdicts(conn, CONFIRMED, mentor, operation="remove")
    assert confirmed["confirmed_by"] == "structured"
    assert 1900 <= confirmed["delay_ms"] <= 3600, confirmed
    assert confirmed["exposure_ms"] >= confirmed["delay_ms"]
    assert confirmed["fetches"] >= 2  # the first fetch still saw the mentor
    assert not verdicts(conn, STALE, operation=None)
    succeeded = conn.execute(
        "SELECT max(seq) FROM event_log WHERE mentor_id = %s AND kind = 'attempt_succeeded'", (mentor,)
    ).fetchone()
    assert succeeded is not None and confirmed["for_seq"] == succeeded[0]


async def test_a_paged_web_api_listing_confirms_only_once_the_mentor_left_page_three(
    conn: psycopg.Connection[Any], db_url: str, portal: FakePortal, org: UUID
) -> None:
    mentors = dict(add_mentor(conn, org, portal=portal, name=f"Mentor {i}") for i in range(8))
    last = max(mentors, key=lambda m: str(mentors[m]))  # the listing is ordered by record id: 3 + 3 + 2 rows
    with FakeWebsite(portal, cache_delay_s=2.0, page_size=3) as site:
        async with running_service(db_url, portal, env=probe_env(site)):
            await eventually(
                lambda: len(verdicts(conn, CONFIRMED, operation="restore")) == 8, timeout=15, what="creations"
            )
            before = len(site.paths)
            set_status(conn, last, "paused")
            await eventually(lambda: verdicts(conn, CONFIRMED, last, operation="remove"), timeout=15, what="removal")
            pages = site.paths[before:]
    (confirmed,) = verdicts(conn, CONFIRMED, last, operation="remove")
    assert confirmed["confirmed_by"] == "structured"
    assert confirmed["delay_ms"] >= 1900, "confirmed before the site's cache refreshed"
    assert confirmed["fetches"] >= 2
    assert any("$skiptoken=6" in p for p in pages), "page 3 was never read"
    assert not verdicts(conn, STALE, operation=None)


@pytest.mark.parametrize(
    ("view", "switch", "reason"),
    [
        ("list", None, "not recognisably the listing: no mentor known to be listed"),
        ("signin", None, "redirected to /SignIn"),
        ("api", "waf", "GET answered 403 (The request is blocked.)"),
        ("api", "web_api_forbidden", "GET answered 403 (90040101 Attribute hlf_mentorlistingid"),
    ],
    ids=["client-rendered-list", "sign-in-redirect", "firewall-page", "web-api-not-enabled"],
)
async def test_a_page_that_is_not_the_listing_never_confirms_a_removal(
    conn: psycopg.Connection[Any],
    db_url: str,
    portal: FakePortal,
    view: View,
    switch: str | None,
    reason: str,
    org: UUID,
) -> None:
    add_mentor(conn, org, portal=portal, name="Listed Control")  # a listed mentor: the page would show them
    mentor, _ = add_mentor(conn, org, portal=portal, name="Leaving Mentor")
    sender = RecordingAlertSender()
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO", format="{message}")
    with FakeWebsite(portal, cache_delay_s=0.0) as site:
        if switch:
            setattr(site, switch, True)
        env = probe_env(site, view, HLF_PUBLIC_LISTING_DEADLINE="1500ms")
        async with running_service(db_url, portal, sender=sender, env=env) as service:
            await eventually(lambda: sync_state(conn, mentor) == "in_sync", what="the creation")
            set_status(conn, mentor, "paused")
            await eventually(lambda: verdicts(conn, STALE, mentor, operation="remove"), timeout=15, what="stale")
            await anyio.sleep(0.5)
            reads = unrecognised_reads(service)
    logger.remove(sink)
    assert reads >= 5, "every unrecognised read is counted"
    episode = [line for line in lines if "the public listing proves nothing" in line]
    assert len(episode) == 1, episode  # logged once per episode, not once per read
    assert not verdicts(conn, CONFIRMED, operation=None), "a page that is not the listing confirmed something"
    (stale,) = verdicts(conn, STALE, mentor, operation="remove")
    assert stale["reason"].startswith("public listing unrecognised: ")
    assert reason in stale["reason"], stale["reason"]
    summary = status.summary(conn, probe_on=True)
    assert summary.public_listing is not None
    assert summary.public_listing["exposure_ms"] == {"p50": None, "p95": None, "max": None}
    alerts = [a for a in sender.data_messages() if a["type"] == "hlf_public_listing_stale"]
    assert [a for a in alerts if a["mentor_id"] == str(mentor) and a["operation"] == "remove"] != []
    assert len([a for a in alerts if a["mentor_id"] == str(mentor) and a["operation"] == "remove"]) == 1


@pytest.mark.parametrize("paging", ["rel-next", "page-param"])
async def test_a_paged_html_list_with_a_listed_mentor_on_it_confirms_a_removal_from_its_last_page(
    conn: psycopg.Connection[Any], db_url: str, portal: FakePortal, paging: str, org: UUID
) -> None:
    mentors = dict(add_mentor(conn, org, portal=portal, name=f"Mentor {i}") for i in range(5))
    last = max(mentors, key=lambda m: str(mentors[m]))  # on page 3 of 2 rows a page
    extra = {"HLF_PUBLIC_LISTING_PAGE_PARAM": "page"} if paging == "page-param" else {}
    with FakeWebsite(portal, cache_delay_s=1.0, page_size=2) as site:
        async with running_service(db_url, portal, env=probe_env(site, "paged", **extra)):
            await eventually(
                lambda: len(verdicts(conn, CONFIRMED, operation="restore")) == 5, timeout=15, what="creations"
            )
            set_status(conn, last, "paused")
            await eventually(lambda: verdicts(conn, CONFIRMED, last, operation="remove"), timeout=15, what="removal")
        assert any(p.endswith("page=3") for p in site.paths)
    (confirmed,) = verdicts(conn, CONFIRMED, last, operation="remove")
    assert confirmed["confirmed_by"] == "html+control"
    assert confirmed["delay_ms"] >= 900
    assert not verdicts(conn, STALE, operation=None)


async def test_name_matching_is_whole_word_ann_is_not_found_in_anna(
    conn: psycopg.Connection[Any], db_url: str, portal: FakePortal, org: UUID
) -> None:
    _anna, anna_record = add_mentor(conn, org, portal=portal, name="Anna")
    ann, ann_record = add_mentor(conn, org, portal=portal, name="Ann", status="paused", listed=False)
    # A cache that never refreshes: the site shows Anna and not Ann, whatever happens next.
    with FakeWebsite(portal, cache_delay_s=None) as site:
        site.names.update({str(anna_record): "Anna", str(ann_record): "Ann"})
        env = probe_env(site, "paged", HLF_PUBLIC_LISTING_MATCH="full_name", HLF_PUBLIC_LISTING_DEADLINE="2s")
        async with running_service(db_url, portal, env=env):
            # Ann's creation (a remove): Anna on the page proves it is the listing, and "Ann" is not in "Anna".
            await eventually(lambda: verdicts(conn, CONFIRMED, ann, operation="remove"), timeout=15, what="absent")
            set_status(conn, ann, "active")
            await eventually(lambda: verdicts(conn, STALE, ann, operation="restore"), timeout=15, what="stale")
    assert not verdicts(conn, CONFIRMED, ann, operation="restore"), "Ann was found inside Anna"
    (stale,) = verdicts(conn, STALE, ann, operation="restore")
    assert stale["reason"] == "the mentor is missing"
    (absent,) = verdicts(conn, CONFIRMED, ann, operation="remove")
    assert absent["confirmed_by"] == "html+control"


async def test_two_hundred_syncs_in_ten_seconds_cost_at_most_one_fetch_per_interval(
    conn: psycopg.Connection[Any], db_url: str, portal: FakePortal
) -> None:
    min_interval_s, window_s = 2.0, 10.0
    org = add_organisation(conn)
    mentors = [add_mentor(conn, org, portal=portal, name=f"Mentor {i}")[0] for i in range(200)]
    with FakeWebsite(portal, cache_delay_s=0.0) as site:
        env = probe_env(site, HLF_PUBLIC_LISTING_MIN_INTERVAL=f"{min_interval_s}s")
        async with running_service(db_url, portal, env=env):
            await eventually(
                lambda: len(verdicts(conn, CONFIRMED, operation="restore")) == 200, timeout=30, what="creations"
            )
            before = site.requests
            started = anyio.current_time()
            for i in range(0, 200, 10):  # 10 mentors every 0.5 s: 200 syncs spread over 10 s
                conn.execute("UPDATE mentors SET status = 'paused' WHERE id = ANY(%s)", (mentors[i : i + 10],))
                await anyio.sleep_until(started + (i + 10) / 200 * window_s)
            spent = site.requests - before
            await eventually(
                lambda: len(verdicts(conn, CONFIRMED, operation="remove")) == 200, timeout=30, what="confirmations"
            )
    assert all(sync_state(conn, m) == "in_sync" for m in mentors)
    assert spent <= math.ceil(window_s / min_interval_s) + 1, f"{spent} fetches in {window_s:.0f} s"


async def test_a_website_that_never_refreshes_gives_one_stale_verdict_and_one_alert(
    conn: psycopg.Connection[Any], db_url: str, portal: FakePortal, org: UUID
) -> None:
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
    assert stale["reason"] == "the listing still shows the mentor"
    (alert,) = [a for a in sender.data_messages() if a["type"] == "hlf_public_listing_stale"]
    assert alert["mentor_id"] == str(mentor) and alert["operation"] == "remove" and int(alert["waited_s"]) >= 1
    assert sorted(alert) == ["mentor_id", "operation", "type", "waited_s"]
    assert not verdicts(conn, CONFIRMED, operation="remove")


async def test_with_the_probe_off_the_website_is_never_asked(
    conn: psycopg.Connection[Any], db_url: str, portal: FakePortal, org: UUID
) -> None:
    mentor, _ = add_mentor(conn, org, portal=portal)
    with FakeWebsite(portal) as site:
        async with running_service(db_url, portal) as service:
            set_status(conn, mentor, "paused")
            await eventually(lambda: sync_state(conn, mentor) == "in_sync", what="the sync")
            await anyio.sleep(1.0)
            assert service.probe is None
        assert site.requests == 0


async def test_the_website_down_never_holds_up_syncing_and_is_confirmed_once_back(
    conn: psycopg.Connection[Any], db_url: str, portal: FakePortal, org: UUID
) -> None:
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


async def test_a_new_leader_resumes_the_watches_a_stopped_one_left_with_exactly_one_verdict(
    conn: psycopg.Connection[Any], db_url: str, portal: FakePortal, org: UUID
) -> None:
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
        async with running_service(db_url, portal, env=probe_env(site)):
            await anyio.sleep(1.0)  # a third leader finds nothing left to watch
    (confirmed,) = verdicts(conn, CONFIRMED, mentor, operation="remove")
    assert confirmed["delay_ms"] >= 2900
    assert not verdicts(conn, STALE, mentor, operation=None)


async def test_matching_by_name_reads_the_escaped_name_and_status_splits_the_exposure(
    conn: psycopg.Connection[Any], db_url: str, portal: FakePortal, org: UUID
) -> None:
    control, control_record = add_mentor(conn, org, portal=portal, name="Kari Nordmann")
    mentor, record = add_mentor(conn, org, portal=portal, name="Siobhán O'Brien & Co", status="paused", listed=False)
    with FakeWebsite(portal, cache_delay_s=0.5) as site:
        site.names.update({str(record): "Siobhán O'Brien & Co", str(control_record): "Kari Nordmann"})
        env = probe_env(site, "paged", HLF_PUBLIC_LISTING_MATCH="full_name")
        async with running_service(db_url, portal, env=env):
            await eventually(lambda: verdicts(conn, CONFIRMED, mentor, operation="remove"), timeout=15, what="created")
            await eventually(lambda: verdicts(conn, CONFIRMED, control, operation="restore"), timeout=15, what="ctl")
            set_status(conn, mentor, "active")
            await eventually(lambda: verdicts(conn, CONFIRMED, mentor, operation="restore"), timeout=15, what="restore")
        assert "O&#x27;Brien &amp; Co" in site.page() or "O&#39;Brien &amp; Co" in site.page()
    (confirmed,) = verdicts(conn, CONFIRMED, mentor, operation="restore")
    assert confirmed["delay_ms"] >= 400 and confirmed["confirmed_by"] == "html+control"
    everything = verdicts(conn, CONFIRMED, operation=None)
    summary = status.summary(conn, probe_on=True)
    p = summary.public_listing
    assert p is not None
    assert p["confirmed"] == p["seen"] == len(everything) == 3 and p["stale"] == 0
    assert p["exposure_ms"]["max"] == max(v["exposure_ms"] for v in everything)
    assert p["delay_ms"]["max"] == max(v["delay_ms"] for v in everything)
    assert p["sync_ms"]["max"] == max(v["exposure_ms"] - v["delay_ms"] for v in everything)
    text = render.render_summary(summary)
    assert "public website (24 h)     3 confirmed, 0 stale; exposure p50" in text
    assert "= our sync (change → 204) p50" in text and "+ website cache (204 → seen) p50" in text
