"""Leadership as a lease (issue 19, item 1): a process that froze wakes up with its lease expired and sends nothing
until a heartbeat is accepted again. The clock is injected, so nothing here sleeps for real."""

from __future__ import annotations

import anyio
import pytest

from hlf_actors.leadership import Leadership

pytestmark = pytest.mark.anyio


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_lapsed_lease_holds_every_wait_until_the_next_accepted_heartbeat() -> None:
    clock = _Clock()
    leadership = Leadership(clock)
    assert not leadership.held
    leadership.gain(lease_s=1.5, sent_at=99.9)
    assert leadership.held
    await leadership.wait()  # valid: returns at once

    clock.now = 101.5  # frozen past the lease (sent at 99.9, valid until 101.4)
    assert not leadership.held
    passed: list[float] = []

    async def sender() -> None:
        await leadership.wait()
        passed.append(clock.now)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sender)
        await anyio.wait_all_tasks_blocked()
        assert passed == []  # woke up with a lapsed lease: holds
        leadership.renew(lease_s=1.5, sent_at=101.4)  # a heartbeat sent before "now" and accepted
        await anyio.wait_all_tasks_blocked()
    assert passed == [101.5]


async def test_a_suspended_leadership_holds_whatever_the_lease_says() -> None:
    clock = _Clock()
    leadership = Leadership(clock)
    leadership.gain(lease_s=1.0, sent_at=100.0)
    leadership.suspend()  # the listener lost its connection: no sending whatever the lease says
    assert not leadership.held
    with anyio.move_on_after(0.05):
        await leadership.wait()
        raise AssertionError("wait() returned while suspended")


def test_without_a_lease_leadership_is_held_until_suspended() -> None:
    clock = _Clock()
    leadership = Leadership(clock)
    leadership.gain()
    clock.now += 10_000
    assert leadership.held
    leadership.suspend()
    assert not leadership.held


async def test_a_renewal_does_not_revive_leadership_the_listener_suspended() -> None:
    clock = _Clock()
    leadership = Leadership(clock)
    leadership.gain(lease_s=1.0, sent_at=100.0)
    leadership.suspend()
    leadership.renew(lease_s=1.0, sent_at=100.5)  # a heartbeat through the pool while the listener reconnects
    assert not leadership.held
    leadership.gain(lease_s=1.0, sent_at=100.6)
    assert leadership.held
