"""When to try again: the backoff planner, pure so that tests assert its exact answers.

Delay before retry n (n = 1 after the first failure) is ``base · 2^(n−1)``, capped at ``cap``. Jitter, when on,
adds up to a quarter of the delay on top, so that mentors failing together do not retry in lock-step. A
``Retry-After`` from the portal is a floor: the delay is never shorter, and jitter only ever adds to it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["plan_delay_ms", "throttle_delay_ms"]


def plan_delay_ms(
    retry: int,
    *,
    base_ms: int,
    cap_ms: int,
    retry_after_s: float | None = None,
    jitter: Callable[[], float] | None = None,
) -> int:
    """Milliseconds to wait before retry number ``retry`` (1-based).

    ``jitter`` returns a fraction in [0, 1); None means no jitter. Pass ``random.random`` in production.
    """
    if retry < 1:
        raise ValueError("retry numbers start at 1")
    delay = min(cap_ms, base_ms * 2 ** min(retry - 1, 62))
    if retry_after_s is not None:
        delay = max(delay, round(retry_after_s * 1000))
    if jitter is not None:
        delay += round(delay * 0.25 * jitter())
    return int(delay)


def throttle_delay_ms(retry_after_s: float | None, *, base_ms: int, jitter: Callable[[], float] | None) -> int:
    """How long to wait out a 429. Its own schedule: a throttled portal does not grow the mentor's backoff."""
    delay = round(retry_after_s * 1000) if retry_after_s is not None else base_ms
    if jitter is not None:
        delay += round(max(delay, base_ms) * 0.25 * jitter())
    return int(delay)


default_jitter: Callable[[], float] = random.random
