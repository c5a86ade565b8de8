"""A recording FCM sender for tests and the in-process harness: keeps every alert and answers like FCM would.

It lives in ``testing/`` because nothing in the running service uses it; ``fcm.py`` holds the real sender,
``push.py`` what every sender takes and returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec
from msgspec.structs import replace

from ..push import Delivery, Notice, Target, log_outcome, plan_targets, topic_name

__all__ = ["RecordingAlertSender", "SentAlert"]


class SentAlert(msgspec.Struct, frozen=True):
    """One call to ``RecordingAlertSender.send``."""

    data: dict[str, str]
    tokens: tuple[str, ...] = ()
    topic: str | None = None
    notice: Notice | None = None


# The scripted failures, as the real sender reports FCM's answers (the target is filled in per delivery).
_UNAVAILABLE = Delivery("", ok=False, error="UNAVAILABLE: The service is currently unavailable.", retryable=True)
_UNREGISTERED = Delivery(
    "",
    ok=False,
    error="UNREGISTERED: Requested entity was not found.",
    unregistered=True,
    dead=True,
    code="UNREGISTERED",
)
_INVALID_TOKEN = Delivery(
    "",
    ok=False,
    error="INVALID_ARGUMENT: The registration token is not a valid FCM registration token",
    dead=True,
    code="INVALID_ARGUMENT",
)


class RecordingAlertSender:
    """Keeps every alert it is asked to send and answers like FCM would, with scripted failures.

    ``unregister(token)`` makes that token answer UNREGISTERED, ``invalid(token)`` INVALID_ARGUMENT about the
    token; ``outage()`` makes every target fail retryably until ``outage(False)``. Every call is recorded,
    failed or not.
    """

    def __init__(self) -> None:
        self._sent: list[SentAlert] = []
        self._unregistered: set[str] = set()
        self._invalid: set[str] = set()
        self._outage = False
        self._next_id = 1
        self.closed = False

    def __repr__(self) -> str:
        return f"RecordingAlertSender(sent={len(self._sent)})"

    def unregister(self, token: str) -> None:
        self._unregistered.add(token)

    def invalid(self, token: str) -> None:
        self._invalid.add(token)

    def outage(self, on: bool = True) -> None:
        self._outage = on

    def sent(self) -> list[SentAlert]:
        return list(self._sent)

    def data_messages(self) -> list[dict[str, str]]:
        return [dict(s.data) for s in self._sent]

    async def send(
        self,
        data: Mapping[str, str],
        *,
        tokens: Sequence[str] = (),
        topic: str | None = None,
        notice: Notice | None = None,
    ) -> list[Delivery]:
        payload, targets = plan_targets(data, tokens, topic)
        self._sent.append(SentAlert(payload, tuple(tokens), topic_name(topic) if topic else None, notice))
        deliveries = [self._answer(t) for t in targets]
        log_outcome(payload, deliveries)
        return deliveries

    def _answer(self, target: Target) -> Delivery:
        if target.problem:
            return Delivery(target.label, ok=False, error=target.problem)
        if self._outage:
            return replace(_UNAVAILABLE, target=target.label)
        if target.token in self._unregistered:
            return replace(_UNREGISTERED, target=target.label)
        if target.token in self._invalid:
            return replace(_INVALID_TOKEN, target=target.label)
        message_id = f"projects/recording/messages/{self._next_id}"
        self._next_id += 1
        return Delivery(target.label, ok=True, message_id=message_id)

    async def aclose(self) -> None:
        self.closed = True
