"""NOTIFY payloads nobody should send: logged, ignored, nothing lost (issue 8, scenarios 9, 6)."""

from __future__ import annotations

from .support import World

STRAY_PAYLOADS = (
    "hello",  # unknown
    '{"mentor_id": "not-a-uuid", "kind": "status_changed"}',  # well-formed, but not ours to send
    '{"mentor_id": ',  # malformed
)
WARNING = "ignoring unexpected NOTIFY payload"


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
    service.wait_for_log(WARNING, count=len(STRAY_PAYLOADS) + 1)
    world.set_status("paused", after)  # made after the noise: still reaches the portal
    world.settle(before, during, after, after=mark)

    assert service.running
    warnings = [r for r in service.log_records() if WARNING in r["message"]]
    assert [r["level"]["name"] for r in warnings] == ["WARNING"] * (len(STRAY_PAYLOADS) + 1)
    for payload in (*STRAY_PAYLOADS, "stray-in-the-same-transaction"):
        assert sum(repr(payload) in r["message"] for r in warnings) == 1, payload

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
