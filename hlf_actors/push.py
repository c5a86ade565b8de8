"""A push alert, whatever sends it: what is sent (data, and a ``Notice`` a phone shows), to whom (``Target``:
device tokens, then a topic) and what came of each target (``Delivery``), behind the ``AlertSender`` seam.

Senders: ``fcm.FirebaseAlertSender`` (FCM through firebase-admin; its docstring says what each Delivery field
means in FCM's terms), ``UnconfiguredAlertSender`` here (no FCM configured: every delivery fails, said loudly once),
and ``testing.recording.RecordingAlertSender`` for tests. A target is shown as ``token:<first chars>…`` or
``topic:<name>``, never a whole device token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Final, Protocol

import msgspec
from loguru import logger

__all__ = [
    "NOT_CONFIGURED",
    "AlertSender",
    "Delivery",
    "Notice",
    "Target",
    "UnconfiguredAlertSender",
    "log_outcome",
    "plan_targets",
    "topic_name",
]

NOT_CONFIGURED: Final = "FCM is not configured (HLF_FCM_CREDENTIALS)"

_TOPIC = re.compile(r"[a-zA-Z0-9\-_.~%]+")


class Delivery(msgspec.Struct, frozen=True):
    """What happened to one target of one alert."""

    target: str  # "token:<first 8 chars>…" or "topic:<name>"
    ok: bool
    message_id: str | None = None
    error: str | None = None  # short, secret-free, e.g. "UNREGISTERED: Requested entity was not found."
    unregistered: bool = False  # UNREGISTERED: app uninstalled or token expired
    retryable: bool = False  # FCM unavailable / quota / internal: the caller may try again later
    dead: bool = False  # the device token can never work (UNREGISTERED, SENDER_ID_MISMATCH, bad token)
    code: str | None = None  # FCM's error code, e.g. "UNREGISTERED"


class Notice(msgspec.Struct, frozen=True):
    """What a phone shows: a notification title and body in plain words."""

    title: str
    body: str


class AlertSender(Protocol):
    async def send(
        self,
        data: Mapping[str, str],
        *,
        tokens: Sequence[str] = (),
        topic: str | None = None,
        notice: Notice | None = None,
    ) -> list[Delivery]: ...

    async def aclose(self) -> None: ...


def _token_target(token: str) -> str:
    # A short test token must not be shown whole either, so show at most half of it.
    return f"token:{token[: min(8, len(token) // 2)]}…"


def topic_name(topic: str) -> str:
    return topic.removeprefix("/topics/")


class Target(msgspec.Struct, frozen=True):
    label: str
    token: str | None = None
    topic: str | None = None
    problem: str | None = None  # set when the target cannot be sent to at all


def plan_targets(
    data: Mapping[str, str], tokens: Sequence[str], topic: str | None
) -> tuple[dict[str, str], list[Target]]:
    """Check the arguments the way FCM will, so that a bad target fails alone instead of the whole call.

    Non-string data or tokens are a bug in the caller and raise TypeError; FCM would reject them anyway.
    """
    if isinstance(tokens, str):
        raise TypeError("tokens must be a sequence of device tokens, not one string")
    payload = dict(data)
    for key, value in payload.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"FCM data values must all be strings; {key!r} is {type(value).__name__}")
    targets: list[Target] = []
    for token in tokens:
        if not isinstance(token, str):
            raise TypeError(f"device tokens must be strings, not {type(token).__name__}")
        if token.strip():
            targets.append(Target(_token_target(token), token=token))
        else:
            targets.append(Target("token:(empty)", problem="INVALID_ARGUMENT: empty device token"))
    if topic:  # an empty topic means none, as for the callers that build it from a nullable column
        name = topic_name(topic)
        if _TOPIC.fullmatch(name):
            targets.append(Target(f"topic:{name}", topic=name))
        else:
            targets.append(Target(f"topic:{name[:40]}", problem="INVALID_ARGUMENT: malformed topic name"))
    return payload, targets


def log_outcome(payload: Mapping[str, str], deliveries: Sequence[Delivery]) -> None:
    """One line per send; the caller records each delivery itself."""
    if not deliveries:
        return
    failed = [f"{d.target} {(d.error or '').split(':')[0]}" for d in deliveries if not d.ok]
    log = logger.bind(alert_type=payload.get("type"), targets=len(deliveries), failed=len(failed)).opt(capture=False)
    if failed:
        log.warning(
            "FCM alert {kind}: {ok}/{n} delivered; failed: {failed}",
            kind=payload.get("type", "?"),
            ok=len(deliveries) - len(failed),
            n=len(deliveries),
            failed=", ".join(failed),
        )
    else:
        log.info("FCM alert {kind}: {n}/{n} delivered", kind=payload.get("type", "?"), n=len(deliveries))


class UnconfiguredAlertSender:
    """Stands in when HLF_FCM_CREDENTIALS is unset: alerts fail visibly; the service still runs."""

    def __init__(self) -> None:
        logger.warning("{why}: alerts will be recorded as failed, not delivered", why=NOT_CONFIGURED)

    def __repr__(self) -> str:
        return "UnconfiguredAlertSender()"

    async def send(
        self,
        data: Mapping[str, str],
        *,
        tokens: Sequence[str] = (),
        topic: str | None = None,
        notice: Notice | None = None,
    ) -> list[Delivery]:
        _, targets = plan_targets(data, tokens, topic)
        return [Delivery(t.label, ok=False, error=t.problem or NOT_CONFIGURED) for t in targets]

    async def aclose(self) -> None:
        pass
