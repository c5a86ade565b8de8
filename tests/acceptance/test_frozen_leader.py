"""A frozen leader loses leadership (issue 19, item 1).

SIGSTOP freezes the leader with its connection, and so the leadership lock, healthy in PostgreSQL's eyes. The
standby must notice the missing heartbeat, fence the old leader and send within HLF_LEADER_TIMEOUT + 5 s; the old
leader, continued, must send nothing more and say it is a standby. Nothing is lost.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from typing import Any

from hlf_actors.testing.fake_portal import Reply

from .support import World

TIMEOUT_S = 3.0
SENT = "sent (attempt"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _healthz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_frozen_leader_is_fenced_and_replaced_and_sends_nothing_after_it_wakes(world: World) -> None:
    mentors = [world.add_mentor(name=f"Mentor {i}") for i in range(20)]
    port = _free_port()
    env = {"HLF_LEADER_TIMEOUT": f"{TIMEOUT_S:g}s", "HLF_HTTP_HOST": "127.0.0.1"}
    leader = world.start(HLF_HTTP_PORT=str(port), **env)
    world.settle(*mentors)
    standby = world.spawn(HLF_HTTP_PORT=str(_free_port()), **env)
    standby.wait_for_log("standby: another hlf-actors process is the leader")
    assert _healthz(port)[0] == 200
    world.portal.clear_requests()

    os.kill(leader.pid, signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        mark = world.last_seq()
        world.set_status("paused", *mentors)
        world.wait(lambda: len(world.portal.patches()) > 0, "a PATCH from the standby", timeout=TIMEOUT_S + 5)
        takeover_s = time.monotonic() - stopped_at
        world.settle(*mentors, after=mark, timeout=15)
        print(
            f"frozen leader (HLF_LEADER_TIMEOUT={TIMEOUT_S:g}s) replaced: first PATCH {takeover_s:.2f}s after SIGSTOP"
        )
        assert "fenced it" in standby.log_text()
        sent_before_wake = leader.log_text().count(SENT)
    finally:
        os.kill(leader.pid, signal.SIGCONT)

    woke_at = time.time()
    leader.wait_for_log("standby: another hlf-actors process is the leader", count=2, timeout=15)
    status, health = _healthz(port)
    assert (status, health["role"]) == (503, "standby")
    time.sleep(1)
    # The new leader had settled everything before the wake-up: any PATCH since would be the old leader's.
    assert [p for p in world.portal.patches() if p.at >= woke_at] == []

    # A change after the wake-up: the new leader sends it, the old one nothing.
    mark = world.last_seq()
    world.set_status("active", *mentors)
    world.settle(*mentors, after=mark, timeout=15)
    time.sleep(TIMEOUT_S)  # time enough for a stray send from the old leader to show
    assert leader.log_text().count(SENT) == sent_before_wake, leader.log_tail()
    assert leader.running and standby.running

    # 0 lost, and nothing sent twice: the leader froze while idle, so nothing was in flight.
    for mentor in mentors:
        assert world.portal.listed(mentor.record) is True
        assert world.bodies(mentor) == [{"hlf_publiclisting": False}, {"hlf_publiclisting": True}]
        assert world.state(mentor) == "in_sync"


def test_a_leader_frozen_with_patches_in_flight_sends_none_of_its_queue_after_it_wakes(world: World) -> None:
    concurrency = 5
    mentors = [world.add_mentor(name=f"Mentor {i}") for i in range(20)]
    env = {"HLF_LEADER_TIMEOUT": f"{TIMEOUT_S:g}s"}
    leader = world.start(HLF_PORTAL_CONCURRENCY=str(concurrency), **env)
    world.settle(*mentors)
    standby = world.spawn(**env)
    standby.wait_for_log("standby: another hlf-actors process is the leader")
    world.portal.clear_requests()

    world.portal.always(Reply(status=204, delay_s=1.5))  # slow but working: requests stay in flight a while
    mark = world.last_seq()
    world.set_status("paused", *mentors)
    world.wait(lambda: len(world.portal.patches()) >= concurrency, f"{concurrency} PATCHes in flight")
    os.kill(leader.pid, signal.SIGSTOP)
    try:
        in_flight = len(world.portal.patches())
        world.settle(*mentors, after=mark, timeout=TIMEOUT_S + 15)
    finally:
        woke_at = time.time()
        os.kill(leader.pid, signal.SIGCONT)
    leader.wait_for_log("standby: another hlf-actors process is the leader", count=2, timeout=15)
    time.sleep(2)  # the old leader's queued actors had every chance to send

    assert in_flight == concurrency
    assert [p for p in world.portal.patches() if p.at >= woke_at] == []
    # 0 lost; sent twice at most what was in flight when the leader froze.
    removals = [len(world.bodies(m)) for m in mentors]
    assert all(n in (1, 2) for n in removals), removals
    assert sum(removals) - len(mentors) <= in_flight
    assert all(world.portal.listed(m.record) is False and world.state(m) == "in_sync" for m in mentors)
    assert standby.running and leader.running
