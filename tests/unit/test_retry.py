"""The backoff planner, asserted exactly: no sleeping, jitter injected."""

from __future__ import annotations

import pytest

from hlf_actors.retry import plan_delay_ms, throttle_delay_ms

NO_JITTER = 0.0
MOST_JITTER = 0.999  # the largest fraction random.random can give, near enough


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        (10, [10, 20, 40, 80, 160, 320, 640, 1280]),
        (2000, [2000, 4000, 8000, 16_000, 32_000, 64_000, 128_000, 256_000]),
    ],
)
def test_schedule_doubles_from_base(base: int, expected: list[int]) -> None:
    planned = [plan_delay_ms(n, base_ms=base, cap_ms=10**9) for n in range(1, 9)]
    assert planned == expected
    assert planned == [base * 2 ** (n - 1) for n in range(1, 9)]


def test_the_cap_holds_every_delay() -> None:
    planned = [plan_delay_ms(n, base_ms=2000, cap_ms=300_000) for n in range(1, 12)]
    assert planned == [2000, 4000, 8000, 16_000, 32_000, 64_000, 128_000, 256_000, 300_000, 300_000, 300_000]
    assert plan_delay_ms(1000, base_ms=2000, cap_ms=300_000) == 300_000  # no overflow for huge retry numbers
    assert plan_delay_ms(3, base_ms=10, cap_ms=25) == 25


def test_retry_after_is_a_floor_in_milliseconds() -> None:
    # longer than the backoff: wins, seconds → ms
    assert plan_delay_ms(1, base_ms=10, cap_ms=1000, retry_after_s=7) == 7000
    assert plan_delay_ms(1, base_ms=10, cap_ms=1000, retry_after_s=1.5) == 1500
    # shorter than the backoff: the backoff stays
    assert plan_delay_ms(4, base_ms=2000, cap_ms=300_000, retry_after_s=1) == 16_000
    # a floor even above the cap: the portal said not before then
    assert plan_delay_ms(9, base_ms=2000, cap_ms=300_000, retry_after_s=600) == 600_000
    assert plan_delay_ms(1, base_ms=10, cap_ms=1000, retry_after_s=0) == 10


@pytest.mark.parametrize("retry_after_s", [None, 0.05, 3, 900])
def test_jitter_adds_at_most_a_quarter_and_never_subtracts(retry_after_s: float | None) -> None:
    for retry in range(1, 11):
        plain = plan_delay_ms(retry, base_ms=2000, cap_ms=300_000, retry_after_s=retry_after_s)
        low = plan_delay_ms(retry, base_ms=2000, cap_ms=300_000, retry_after_s=retry_after_s, jitter=lambda: NO_JITTER)
        high = plan_delay_ms(
            retry, base_ms=2000, cap_ms=300_000, retry_after_s=retry_after_s, jitter=lambda: MOST_JITTER
        )
        assert low == plain, retry
        assert plain < high <= plain * 1.25, retry
        if retry_after_s is not None:
            assert high >= retry_after_s * 1000  # jitter never undercuts the portal's floor


def test_jitter_is_a_fraction_of_the_delay() -> None:
    assert plan_delay_ms(2, base_ms=1000, cap_ms=10_000, jitter=lambda: 0.5) == 2000 + 250


def test_retry_numbers_start_at_one() -> None:
    for retry in (0, -1):
        with pytest.raises(ValueError):
            plan_delay_ms(retry, base_ms=10, cap_ms=1000)


def test_throttle_waits_out_retry_after_or_one_base() -> None:
    assert throttle_delay_ms(7, base_ms=2000, jitter=None) == 7000
    assert throttle_delay_ms(0.25, base_ms=10, jitter=None) == 250
    assert throttle_delay_ms(None, base_ms=2000, jitter=None) == 2000


def test_throttle_does_not_grow_with_attempts() -> None:
    # Its own schedule: the same answer every time, whatever the mentor's attempt count.
    assert {throttle_delay_ms(3, base_ms=10, jitter=None) for _ in range(5)} == {3000}


@pytest.mark.parametrize(("retry_after_s", "base"), [(None, 2000), (7, 2000), (60, 10), (2, 2000)])
def test_throttle_jitter_adds_at_most_a_quarter(retry_after_s: float | None, base: int) -> None:
    plain = throttle_delay_ms(retry_after_s, base_ms=base, jitter=None)
    assert throttle_delay_ms(retry_after_s, base_ms=base, jitter=lambda: NO_JITTER) == plain
    high = throttle_delay_ms(retry_after_s, base_ms=base, jitter=lambda: MOST_JITTER)
    assert plain < high <= plain * 1.25


def test_throttle_with_retry_after_zero_still_spreads_by_base() -> None:
    # Retry-After: 0 for everyone would send every mentor again in lock-step; jitter spreads them over base/4.
    assert throttle_delay_ms(0, base_ms=2000, jitter=lambda: NO_JITTER) == 0
    assert 0 < throttle_delay_ms(0, base_ms=2000, jitter=lambda: MOST_JITTER) <= 500
