"""The portal misbehaves; the real `hlf-actors run` retries, dead-letters and alerts (issue 8, scenarios 4-7).

Backoff is HLF_BACKOFF_BASE_MS=10 without jitter, so the planned delays are exact: 10, 20, 40 ms. The audit log
(scenario 6) is asserted whole in every test.
"""

from __future__ import annotations

import itertools

from .support import DEVICES, TOPIC, World


def test_transient_errors_are_retried_with_growing_delays_then_succeed_without_alert(world: World) -> None:
    mentor = world.add_mentor()
    service = world.start()
    mark = world.settle_and_mark(mentor)
    world.scenarios.fail_twice_then_succeed(mentor.record)

    world.set_status("paused", mentor)
    world.settle(mentor, after=mark)
    assert service.terminate() == 0  # from here on nothing can arrive any more

    patches = world.portal.patches(mentor.record)
    assert [(p.status, p.json()) for p in patches] == [(503, {"hlf_publiclisting": False})] * 2 + [
        (204, {"hlf_publiclisting": False})
    ]
    gaps = [b.at - a.at for a, b in itertools.pairwise(patches)]
    assert gaps[0] >= 0.010 and gaps[1] >= 0.020, gaps
    assert world.portal.listed(mentor.record) is False
    assert world.story(mentor) == [
        *world.created(mentor),
        ("attempt_succeeded", "restore", 1, 204),
        ("status_changed", "mentor_updated", "active", "paused"),
        ("attempt_failed", "remove", 1, 503, True, 10),
        ("attempt_failed", "remove", 2, 503, True, 20),
        ("attempt_succeeded", "remove", 3, 204),
    ]
    failures = [data for _, kind, data in world.events(mentor) if kind == "attempt_failed"]
    assert all("503" in data["error"] for data in failures)
    assert world.sync_row(mentor) == ("remove", "in_sync", 3, None)
    assert world.dead_letters() == []
    assert world.fcm.messages() == []
    assert world.outages() == []


def test_429_with_retry_after_is_waited_out_without_spending_an_attempt(world: World) -> None:
    mentor = world.add_mentor()
    world.start()
    mark = world.settle_and_mark(mentor)
    world.scenarios.throttled(mentor.record, retry_after_s=1)

    world.set_status("paused", mentor)
    world.settle(mentor, after=mark)

    patches = world.portal.patches(mentor.record)
    assert [p.status for p in patches] == [429, 204]
    assert patches[1].at - patches[0].at >= 1.0
    assert world.story(mentor) == [
        *world.created(mentor),
        ("attempt_succeeded", "restore", 1, 204),
        ("status_changed", "mentor_updated", "active", "paused"),
        ("attempt_failed", "remove", 1, 429, True, 1000),
        ("attempt_succeeded", "remove", 1, 204),
    ]
    assert world.sync_row(mentor) == ("remove", "in_sync", 1, None)
    assert world.dead_letters() == []
    assert world.fcm.messages() == []


def test_always_503_dead_letters_after_max_attempts_and_alerts_the_organisation_once(world: World) -> None:
    mentor = world.add_mentor()
    service = world.start(HLF_MAX_ATTEMPTS="4")  # not the default 5: the setting is honoured
    mark = world.settle_and_mark(mentor)
    world.scenarios.always_503(mentor.record)

    world.set_status("paused", mentor)
    world.settle(mentor, after=mark)
    world.wait(lambda: world.count(mentor, "alert_sent") == 3, "the alert to both phones and the topic to be logged")
    assert service.terminate() == 0

    assert [(p.status, p.json()) for p in world.portal.patches(mentor.record)] == [
        (503, {"hlf_publiclisting": False})
    ] * 4
    assert world.portal.listed(mentor.record) is True  # nothing was applied: the mentor is still listed
    assert world.story(mentor) == [
        *world.created(mentor),
        ("attempt_succeeded", "restore", 1, 204),
        ("status_changed", "mentor_updated", "active", "paused"),
        ("attempt_failed", "remove", 1, 503, True, 10),
        ("attempt_failed", "remove", 2, 503, True, 20),
        ("attempt_failed", "remove", 3, 503, True, 40),
        ("attempt_failed", "remove", 4, 503, True, None),
        ("dead_lettered", "remove", 4),
        ("alert_sent", "hlf_sync_failure", f"token:{DEVICES[0][:8]}…"),
        ("alert_sent", "hlf_sync_failure", f"token:{DEVICES[1][:8]}…"),
        ("alert_sent", "hlf_sync_failure", f"topic:{TOPIC}"),
    ]
    [letter] = world.dead_letters()
    letter_id, letter_mentor, operation, attempts, last_error, requeued_at = letter
    assert (letter_mentor, operation, attempts, requeued_at) == (mentor.id, "remove", 4, None)
    assert "503" in last_error
    events = world.events(mentor)
    [dead_lettered_seq] = [seq for seq, kind, _ in events if kind == "dead_lettered"]
    assert letter_id == dead_lettered_seq
    assert [data["dead_letter_id"] for _, kind, data in events if kind == "alert_sent"] == [letter_id] * 3
    assert not any(token in str(data) for _, _, data in events for token in DEVICES), "a whole device token leaked"
    assert world.sync_row(mentor) == ("remove", "dead_lettered", 4, last_error)

    payload = {"type": "hlf_sync_failure", "mentor_id": str(mentor.id), "operation": "remove"}
    messages = world.fcm.messages()
    assert [m.data for m in messages] == [payload] * 3
    targets = [m.message.get("token") or f"topic:{m.message.get('topic')}" for m in messages]
    assert sorted(targets) == sorted([*DEVICES, f"topic:{TOPIC}"])
    assert not any(m.validate_only for m in messages)
    assert world.outages() == []


def test_one_mentors_permanent_403_never_holds_up_another(world: World) -> None:
    refused = world.add_mentor(name="Refused")
    fine = world.add_mentor(name="Fine")
    world.start()
    mark = world.settle_and_mark(refused, fine)
    world.scenarios.permanent_403(refused.record, delay_s=1.5)  # slow as well as final: the other must not wait
    world.scenarios.always_success(fine.record)

    world.set_status("paused", refused, fine)  # one transaction: both pending at once
    world.settle(fine, after=mark)
    assert world.state(refused) == "pending", "the healthy mentor had to wait for the refused one"
    world.settle(refused, after=mark)
    world.wait(lambda: world.count(refused, "alert_sent") == 3, "the refused mentor's alert to be logged")

    assert [(p.status, p.json()) for p in world.portal.patches(refused.record)] == [(403, {"hlf_publiclisting": False})]
    assert [(p.status, p.json()) for p in world.portal.patches(fine.record)] == [(204, {"hlf_publiclisting": False})]
    assert world.portal.listed(refused.record) is True
    assert world.portal.listed(fine.record) is False
    assert world.story(refused, after=mark) == [
        ("status_changed", "mentor_updated", "active", "paused"),
        ("attempt_failed", "remove", 1, 403, False, None),
        ("dead_lettered", "remove", 1),
        ("alert_sent", "hlf_sync_failure", f"token:{DEVICES[0][:8]}…"),
        ("alert_sent", "hlf_sync_failure", f"token:{DEVICES[1][:8]}…"),
        ("alert_sent", "hlf_sync_failure", f"topic:{TOPIC}"),
    ]
    assert world.story(fine, after=mark) == [
        ("status_changed", "mentor_updated", "active", "paused"),
        ("attempt_succeeded", "remove", 1, 204),
    ]
    [(fine_done, _, _)] = [e for e in world.events(fine, after=mark) if e[1] == "attempt_succeeded"]
    [(refused_failed, _, _)] = [e for e in world.events(refused, after=mark) if e[1] == "attempt_failed"]
    assert fine_done < refused_failed
    assert world.sync_row(fine) == ("remove", "in_sync", 1, None)
    [letter] = world.dead_letters()
    assert letter[1:4] == (refused.id, "remove", 1) and "403" in letter[4]
    assert world.sync_row(refused) == ("remove", "dead_lettered", 1, letter[4])
    payload = {"type": "hlf_sync_failure", "mentor_id": str(refused.id), "operation": "remove"}
    assert world.fcm.data_messages() == [payload] * 3
    assert world.outages() == []
