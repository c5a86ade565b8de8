"""kill -9 with changes in flight, changes while down, a new process: nothing is lost (issue 8, scenarios 8, 6)."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from .support import OUTCOMES, Mentor, World

CONCURRENCY = 10  # HLF_PORTAL_CONCURRENCY: this many PATCHes hang in flight, the other changes queue behind them


def eligible(world: World, mentor: Mentor) -> bool:
    """The contract's rule, computed by the test from the rows: active and a certification valid today."""
    row = world.conn.execute(
        "SELECT m.status = 'active' AND EXISTS (SELECT 1 FROM certifications c "
        "WHERE c.mentor_id = m.id AND c.expires_on >= %s) FROM mentors m WHERE m.id = %s",
        (date.today(), mentor.id),
    ).fetchone()
    assert row is not None
    return bool(row[0])


def test_killed_with_changes_in_flight_a_new_process_finishes_every_change(world: World) -> None:
    changed = [world.add_mentor(name=f"Changed {i}") for i in range(20)]
    extra = [world.add_mentor(name=f"Extra {i}") for i in range(4)]
    everyone = changed + extra
    first = world.start(HLF_PORTAL_CONCURRENCY=str(CONCURRENCY))
    world.settle(*everyone)
    assert all(world.portal.listed(m.record) is True for m in everyone)
    synced = world.last_seq()

    # The portal hangs: requests arrive but are neither answered nor applied before the process dies.
    world.portal.clear_requests()
    world.scenarios.hanging(delay_s=30.0)
    for mentor in changed:  # twenty changes, each its own transaction, as the mentor app makes them
        world.set_status("paused", mentor)
    world.wait(lambda: len(world.portal.patches()) == CONCURRENCY, f"{CONCURRENCY} PATCHes in flight")
    assert first.kill() == -9
    killed_at = world.last_seq()
    in_flight = {p.record_id for p in world.portal.patches()}
    flying = [m for m in changed if str(m.record) in in_flight]
    queued = [m for m in changed if str(m.record) not in in_flight]
    assert len(flying) == CONCURRENCY and len(queued) == len(changed) - CONCURRENCY

    # Changes while no service runs: some undo an in-flight change, some are new.
    reinstated = [flying[0], flying[1], queued[0]]
    for mentor in reinstated:
        world.set_status("active", mentor)
    world.set_status("paused", extra[0], extra[1])
    world.conn.execute(
        "UPDATE certifications SET expires_on = %s WHERE mentor_id = %s",
        (date.today() - timedelta(days=1), extra[2].id),
    )
    untouched = extra[3]
    touched = changed + extra[:3]
    down_until = world.last_seq()

    world.scenarios.always_success()
    world.portal.clear_requests()
    world.start(HLF_PORTAL_CONCURRENCY=str(CONCURRENCY))
    world.settle(*touched, after=down_until)

    # The portal: every record equals its mentor's eligibility, reached with exactly one PATCH after the restart.
    for mentor in everyone:
        assert world.portal.listed(mentor.record) is eligible(world, mentor), mentor
    for mentor in touched:
        assert world.bodies(mentor) == [{"hlf_publiclisting": eligible(world, mentor)}], mentor
    assert world.portal.patches(untouched.record) == []
    assert {m.id for m in everyone if eligible(world, m)} == {m.id for m in reinstated} | {untouched.id}

    # The log: every change before the kill has no outcome until the restart, then exactly one, the right one.
    def after_sync(mentor: Mentor) -> list[tuple[int, str, dict[str, Any]]]:
        return world.events(mentor, after=synced)

    for mentor in touched:
        events = after_sync(mentor)
        before_restart = [kind for seq, kind, _ in events if seq <= down_until]
        after_restart = [(kind, data) for seq, kind, data in events if seq > down_until]
        operation = "restore" if eligible(world, mentor) else "remove"
        assert not any(kind in OUTCOMES for kind in before_restart), (mentor, before_restart)
        assert [(kind, data["operation"], data["attempt"]) for kind, data in after_restart] == [
            ("attempt_succeeded", operation, 1)
        ], mentor
        assert world.sync_row(mentor) == (operation, "in_sync", 1, None), mentor
    for mentor in changed:
        expected = [("status_changed", "mentor_updated", "active", "paused")]
        if mentor in reinstated:
            expected.append(("status_changed", "mentor_updated", "paused", "active"))
        operation = "restore" if mentor in reinstated else "remove"
        assert world.story(mentor, after=synced) == [*expected, ("attempt_succeeded", operation, 1, 204)], mentor
        [pause_seq] = [seq for seq, _, data in after_sync(mentor) if data.get("status") == "paused"]
        assert pause_seq <= killed_at  # changed before the kill, answered only after the restart
    assert world.story(extra[2], after=synced) == [
        ("status_changed", "certification_update", str(date.today() - timedelta(days=1))),
        ("attempt_succeeded", "remove", 1, 204),
    ]
    assert world.events(untouched, after=synced) == []
    assert world.dead_letters() == []
    assert world.fcm.messages() == []
