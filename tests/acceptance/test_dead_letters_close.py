"""A dead letter closes itself once a later attempt for its mentor succeeds (issue 19, item 5).

The adversarial run's case: a mentor dead-lettered on a 400, then reinstated and paused again (both 204), was
``in_sync`` yet counted as an open dead letter, and ``requeue --all`` sent a redundant PATCH.
"""

from __future__ import annotations

import json
import subprocess
import sys

from hlf_actors.testing.fake_portal import Reply

from .support import World


def _cli(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HLF_DATABASE_URL": world.db_url, "HLF_DYNAMICS_URL": world.portal.url}
    return subprocess.run(
        [sys.executable, "-m", "hlf_actors", *args], env=env, capture_output=True, text=True, check=False, timeout=60
    )


def test_a_dead_letter_closes_when_the_mentor_later_syncs_and_requeue_all_skips_it(world: World) -> None:
    mentor, other = world.add_mentor(name="Resolved"), world.add_mentor(name="Still failing")
    world.start()
    world.settle(mentor, other)
    mark = world.last_seq()

    world.portal.always(Reply(status=400), mentor.record)
    world.portal.always(Reply(status=400), other.record)
    world.set_status("paused", mentor, other)
    world.wait_state("dead_lettered", mentor, other)
    assert len(world.dead_letters(mentor)) == 1

    world.portal.always(None, mentor.record)  # the portal accepts this mentor's PATCHes again
    world.set_status("active", mentor)
    world.settle(mentor, after=world.last_seq())
    world.set_status("paused", mentor)
    world.settle(mentor, after=world.last_seq())
    assert world.state(mentor) == "in_sync"

    (letter,) = world.conn.execute(
        "SELECT requeued_at, resolved_at IS NOT NULL, resolved_seq FROM dead_letters WHERE mentor_id = %s",
        (mentor.id,),
    ).fetchall()
    assert letter[0] is None and letter[1] is True
    assert world.events(mentor, after=mark)[-1][0] > letter[2]  # resolved by the first success, not the last

    summary = _cli(world, "status", "--json")
    assert summary.returncode == 0, summary.stderr
    assert json.loads(summary.stdout)["open_dead_letters"] == 1  # the other mentor's, still failing

    patches_before = len(world.portal.patches(mentor.record))
    requeue = _cli(world, "dead-letters", "requeue", "--all")
    assert requeue.returncode == 0, requeue.stderr
    assert requeue.stdout.count("re-queued dead letter") == 1
    world.wait(lambda: len(world.dead_letters(other)) == 2, "the other mentor's re-queued letter to fail again")
    assert len(world.portal.patches(mentor.record)) == patches_before  # nothing re-sent for the resolved letter

    verify = _cli(world, "replay", "--verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
