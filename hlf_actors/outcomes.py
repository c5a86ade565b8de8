"""What one PATCH's outcome means: the events to record and when to try again, decided in one pure function.

Both senders use it — the actors (``actor.py``) and break-glass (``break_glass.py``) — so a failure folds the same
way whoever sent the PATCH. The senders differ only in their ``Ladder``: the actor dead-letters a mentor out of
attempts, break-glass leaves it ``retrying`` for the service.

    outcome                     events                                       delay
    an HTTP status (success)    attempt_succeeded                            none
    ThrottledError (429)        attempt_failed, throttled: no attempt spent  the throttle's wait (none: give up)
    transient, portal outage    attempt_failed, throttled ("portal outage")  the throttle's wait
    transient, attempts left    attempt_failed, retryable                    the backoff plan (``retry.py``)
    transient, out of attempts  attempt_failed (+ dead_lettered: actor)      none
    permanent                   attempt_failed, not retryable + dead_lettered
    tenant-wide                 attempt_failed, retryable                    none (the sender stops or holds)

Pure: no clock, no I/O; the jitter is the ladder's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import msgspec

from .errors import PortalError, TenantError, ThrottledError, TransientPortalError
from .events import AttemptFailed, AttemptSucceeded, DeadLettered, Operation, Payload
from .retry import plan_delay_ms, throttle_delay_ms

__all__ = ["Answering", "Decision", "Kind", "Ladder", "decide", "held", "kind_of"]

Kind = Literal["throttled", "transient", "permanent", "tenant"]


class Answering(msgspec.Struct, frozen=True):
    """What a PATCH answers: its operation, the newest change the read behind it saw, and that read's snapshot."""

    operation: Operation
    for_seq: int
    snapshot: str


@dataclass(frozen=True)
class Ladder:
    """How a sender retries: the backoff, how many attempts a mentor gets, and what running out of them means."""

    base_ms: int
    cap_ms: int
    max_attempts: int
    jitter: Callable[[], float] | None = None
    dead_letter_when_exhausted: bool = True


class Decision(NamedTuple):
    events: tuple[Payload, ...]
    delay_ms: int | None  # wait before the next attempt; None when there is none


def kind_of(err: PortalError) -> Kind:
    if isinstance(err, ThrottledError):
        return "throttled"
    if isinstance(err, TransientPortalError):
        return "transient"
    if isinstance(err, TenantError):
        return "tenant"
    return "permanent"


def decide(
    answering: Answering,
    attempt: int,
    outcome: int | PortalError,
    ladder: Ladder,
    *,
    kind: Kind | None = None,
    outage: bool = False,
    give_up: bool = False,
    duration_ms: float | None = None,
) -> Decision:
    """The events and the delay for ``outcome`` (an HTTP status when the PATCH succeeded) of attempt ``attempt``.

    ``kind`` overrides ``kind_of`` where the sender learnt more (an undecided refusal the tenant check could not
    settle is transient); ``outage`` says the portal is down for everyone; ``give_up`` stops waiting out 429s.
    """
    a = answering
    if isinstance(outcome, int):
        succeeded = AttemptSucceeded(
            operation=a.operation,
            attempt=attempt,
            http_status=outcome,
            for_seq=a.for_seq,
            snapshot=a.snapshot,
            duration_ms=duration_ms,
        )
        return Decision((succeeded,), None)
    err = outcome
    kind = kind if kind is not None else kind_of(err)
    retry_after = err.retry_after if isinstance(err, TransientPortalError) else None
    if kind == "throttled":
        delay = None if give_up else throttle_delay_ms(retry_after, base_ms=ladder.base_ms, jitter=ladder.jitter)
        return Decision((_failed(a, attempt, err, delay_ms=delay, throttled=True),), delay)
    if kind == "tenant":
        return Decision((_failed(a, attempt, err, delay_ms=None),), None)
    if kind == "transient":
        if outage:
            # Down for everyone: wait like a throttle, spend nothing, keep the backoff where it was.
            delay = throttle_delay_ms(retry_after, base_ms=ladder.base_ms, jitter=ladder.jitter)
            failed = _failed(a, attempt, err, delay_ms=delay, throttled=True, error=f"portal outage: {err}")
            return Decision((failed,), delay)
        if attempt >= ladder.max_attempts:
            if ladder.dead_letter_when_exhausted:
                return Decision(_dead_letter(a, attempt, err, retryable=True), None)
            # Left `retrying` with no delay: the service picks the mentor up when it runs.
            return Decision((_failed(a, attempt, err, delay_ms=None),), None)
        delay = plan_delay_ms(
            attempt, base_ms=ladder.base_ms, cap_ms=ladder.cap_ms, retry_after_s=retry_after, jitter=ladder.jitter
        )
        return Decision((_failed(a, attempt, err, delay_ms=delay),), delay)
    return Decision(_dead_letter(a, attempt, err, retryable=False), None)


def held(answering: Answering, attempt: int, incident: str) -> AttemptFailed:
    """A mentor waiting for a tenant-wide incident: no attempt spent, ``last_error`` names the incident."""
    return AttemptFailed(
        operation=answering.operation,
        attempt=attempt,
        http_status=None,
        retryable=True,
        delay_ms=None,
        error=f"held: {incident}",
        for_seq=answering.for_seq,
        snapshot=answering.snapshot,
        throttled=True,
    )


def _dead_letter(a: Answering, attempt: int, err: PortalError, *, retryable: bool) -> tuple[Payload, ...]:
    letter = DeadLettered(
        operation=a.operation, attempts=attempt, last_error=str(err), for_seq=a.for_seq, snapshot=a.snapshot
    )
    return (_failed(a, attempt, err, delay_ms=None, retryable=retryable), letter)


def _failed(
    a: Answering,
    attempt: int,
    err: PortalError,
    *,
    delay_ms: int | None,
    retryable: bool = True,
    throttled: bool = False,
    error: str | None = None,
) -> AttemptFailed:
    return AttemptFailed(
        operation=a.operation,
        attempt=attempt,
        http_status=err.http_status,
        retryable=retryable,
        delay_ms=delay_ms,
        error=error if error is not None else str(err),
        for_seq=a.for_seq,
        snapshot=a.snapshot,
        throttled=throttled,
    )
