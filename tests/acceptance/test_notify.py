"""NOTIFY payloads nobody should send: logged (at most once a minute, with a count), ignored, nothing lost
(issue 8, scenarios 9, 6; issue 19, item 7)."""

from __future__ import annotations

import time

from .support import World

STRAY_PAYLOADS = (
    "hello",  # unknown
    '{"mentor_id": "not-a-uuid", "kind": "status_changed"}',  # well-formed, but not ours to send
    '{"mentor_id": ',  # malformed
)
WARNING = "unexpected NOTIFY payload"


def test_stray_notify_payloads_are_logged_and_ignored_and_no_change_is_lost(world: World) -> None:
    before, during, after = (world.add_mentor(name=name) for name in ("Before", "During", "After"))
    service = world.start()
    world.settle(before, during, after)
    mark = world.last_seq()

    world.set_status("paused", before)
    for payload in STRAY_PAYLOADS:
        world.conn.execute("SELECT pg_notify('hlf_events', %s)", (payload,))
    with world.conn.transaction():  # a stray payload in the same transaction as a real change
        world.set_status("paused", during)
        world.conn.execute("SELECT pg_notify('hlf_events', %s)", ("stray-in-the-same-transaction",))
    service.wait_for_log(WARNING)
    world.set_status("paused", after)  # made after the noise: still reaches the portal
    world.settle(before, during, after, after=mark)

    assert service.running
    # The first stray is reported at once; the rest wait for the next minute's line, with their count.
    warnings = [r for r in service.log_records() if WARNING in r["message"]]
    assert [r["level"]["name"] for r in warnings] == ["WARNING"]
    assert "ignoring 1 unexpected NOTIFY payload(s) on hlf_events (latest: 'hello')" in warnings[0]["message"]
    assert not any("listen-check" in r["message"] for r in service.log_records())

    for mentor in (before, during, after):
        assert world.bodies(mentor) == [{"hlf_publiclisting": True}, {"hlf_publiclisting": False}]
        assert world.portal.listed(mentor.record) is False
        assert world.story(mentor) == [
            *world.created(mentor),
            ("attempt_succeeded", "restore", 1, 204),
            ("status_changed", "mentor_updated", "active", "paused"),
            ("attempt_succeeded", "remove", 1, 204),
        ]
        assert world.sync_row(mentor) == ("remove", "in_sync", 1, None)
    assert world.outages() == []
    about_mentors = "SELECT count(*) FROM event_log WHERE seq > %s AND mentor_id IS NOT NULL"
    assert world.conn.execute(about_mentors, (mark,)).fetchone() == (6,)  # the three changes and their answers
    assert world.dead_letters() == []
    assert world.fcm.messages() == []


def test_a_flood_of_stray_notifies_costs_a_handful_of_log_lines_and_no_change(world: World) -> None:
    mentor = world.add_mentor()
    service = world.start()
    world.settle(mentor)
    lines_before = len(service.log_text().splitlines())
    mark = world.last_seq()

    started = time.monotonic()
    for burst in range(10):  # 10,000 distinct payloads (Postgres folds identical ones within a transaction)
        world.conn.execute(
            "SELECT pg_notify('hlf_events', 'stray-' || %s || '-' || g) FROM generate_series(1, 1000) g", (burst,)
        )
    assert time.monotonic() - started < 10
    world.set_status("paused", mentor)  # a real change behind the flood still reaches the portal
    world.settle(mentor, after=mark, timeout=30)
    time.sleep(1)  # the listener has read the whole flood by now (NOTIFYs arrive in commit order)

    new_lines = service.log_text().splitlines()[lines_before:]
    assert len(new_lines) <= 5, "\n".join(new_lines[:20])
    warnings = [r for r in service.log_records() if WARNING in r["message"]]
    assert len(warnings) == 1
    assert service.running
    assert world.portal.listed(mentor.record) is False
