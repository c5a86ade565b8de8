"""The channels an operations alert goes to: the FCM topic, a Teams (or Slack-compatible) webhook, e-mail.

Why it exists: an FCM topic alone is a channel nobody may be reading (any app instance can subscribe, and it is
unclear who does). HLF runs Microsoft 365, so a Teams channel is where operators already look; e-mail is the
fallback that needs nothing but an SMTP relay. ``Alerting.ops`` fans every ops alert out to every channel built
here and keeps each failed delivery in its outbox until it goes through.

    channel   configured by                          one delivery is
    fcm       HLF_FCM_CREDENTIALS + HLF_OPS_TOPIC    an FCM message to the topic (data payload + notification)
    webhook   HLF_OPS_WEBHOOK_URL                    one JSON POST; any 2xx is delivered
    email     HLF_OPS_EMAIL_TO / _FROM / _SMTP_*     one message through smtplib, in a worker thread

The webhook body. Microsoft Learn, "Create Incoming Webhooks"
(https://learn.microsoft.com/en-us/microsoftteams/platform/webhooks-and-connectors/how-to/add-incoming-webhook):
Microsoft 365 Connectors are nearing deprecation; "to automatically post to a chat or channel when a webhook
request is received, use the predefined workflow templates" (the Workflows app, trigger "When a Teams webhook
request is received"). Microsoft Learn, "Create and send messages"
(https://learn.microsoft.com/en-us/microsoftteams/platform/webhooks-and-connectors/how-to/connectors-using),
Known issues: "Workflows support Adaptive Cards only". Both Workflows and the older connector webhooks accept a
message whose attachment is an Adaptive Card ("Send Adaptive Cards using an Incoming Webhook", first page):
    {"type": "message",
     "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": null,
                      "content": {"$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                                  "type": "AdaptiveCard", "version": "1.4", "body": [...]}}]}
We add a top-level ``"text"`` so that Slack-compatible hooks (which read ``text``) show the alert too. The same
page limits a message to 28 KB and throttles more than four requests a second (HTTP 429): our bodies are small
and rare, and a 429 is retried by the outbox like any other failure.

Secrets: the webhook URL carries its signature, so it is never logged or put in an error; results name the
channel ("webhook"), not the URL. SMTP passwords likewise.
"""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from email.message import EmailMessage
from typing import Any, Final, Protocol

import anyio
import httpx
import msgspec

from .config import Config, Secret
from .push import AlertSender, Notice, UnconfiguredAlertSender

__all__ = [
    "ChannelResult",
    "EmailChannel",
    "FcmTopicChannel",
    "OpsChannel",
    "WebhookChannel",
    "build_ops_channels",
    "describe",
    "teams_payload",
]

_TIMEOUT_S: Final = 15.0
_ADAPTIVE_CARD: Final = "application/vnd.microsoft.card.adaptive"


class ChannelResult(msgspec.Struct, frozen=True):
    """What happened to one ops alert on one channel."""

    channel: str  # "fcm" | "webhook" | "email"
    target: str  # "topic:hlf-ops", "webhook", "email:2 recipients": never a URL or an address list
    ok: bool
    error: str | None = None  # short, secret-free
    message_id: str | None = None


class OpsChannel(Protocol):
    name: str

    async def send(self, data: Mapping[str, str]) -> ChannelResult: ...

    async def aclose(self) -> None: ...


# -- plain words -----------------------------------------------------------------------------------------------

_TITLES: Final = {
    "hlf_credential_failure": "HLF: the Dynamics credentials are refused",
    "hlf_credential_restored": "HLF: the Dynamics credentials work again",
    "hlf_portal_outage": "HLF: the Dynamics portal is down for every mentor",
    "hlf_duplicate_detected": "HLF: a mentor appears twice",
    "hlf_public_listing_stale": "HLF: the public website still shows the old listing",
    "hlf_alert_test": "HLF: test alert",
}
_BODIES: Final = {
    "hlf_credential_failure": "Syncing to the public listing has stopped until the client secret is fixed.",
    "hlf_credential_restored": "Syncing to the public listing goes on; no action needed.",
    "hlf_portal_outage": "Sending is paused and resumes by itself when the portal answers again.",
    "hlf_duplicate_detected": "Check the mentor database for a duplicate record.",
    "hlf_public_listing_stale": "The website did not show a sync in time; check its cache or the portal.",
    "hlf_alert_test": "Sent by `hlf-actors check-alerts`: this channel reaches you.",
}


def describe(data: Mapping[str, str]) -> Notice:
    """Title and body in plain words for an ops alert; unknown types still say what they are."""
    kind = data.get("type", "unknown")
    title = _TITLES.get(kind, f"HLF operations alert: {kind}")
    details = ", ".join(f"{k}: {v}" for k, v in data.items() if k != "type")
    body = _BODIES.get(kind, "See `hlf-actors status`.")
    return Notice(title=title, body=f"{body} ({details})" if details else body)


def teams_payload(data: Mapping[str, str]) -> dict[str, Any]:
    """The webhook body: an Adaptive Card message for Teams plus ``text`` for Slack-compatible hooks."""
    notice = describe(data)
    card = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": [
            {"type": "TextBlock", "text": notice.title, "weight": "Bolder", "size": "Medium", "wrap": True},
            {"type": "TextBlock", "text": notice.body, "wrap": True},
            {"type": "FactSet", "facts": [{"title": k, "value": v} for k, v in data.items()]},
        ],
    }
    return {
        "type": "message",
        "text": f"{notice.title}: {notice.body}",
        "attachments": [{"contentType": _ADAPTIVE_CARD, "contentUrl": None, "content": card}],
    }


# -- channels --------------------------------------------------------------------------------------------------


class FcmTopicChannel:
    """HLF_OPS_TOPIC through the FCM sender: the data payload of the contract, plus a notification."""

    name = "fcm"

    def __init__(self, sender: AlertSender, topic: str) -> None:
        self._sender = sender
        self._topic = topic

    async def send(self, data: Mapping[str, str]) -> ChannelResult:
        deliveries = await self._sender.send(data, topic=self._topic, notice=describe(data))
        if not deliveries:
            return ChannelResult(self.name, f"topic:{self._topic}", ok=False, error="no target")
        d = deliveries[0]
        return ChannelResult(self.name, d.target, ok=d.ok, error=d.error, message_id=d.message_id)

    async def aclose(self) -> None:
        """The sender belongs to whoever built it."""


class WebhookChannel:
    """HLF_OPS_WEBHOOK_URL: one JSON POST per alert."""

    name = "webhook"

    def __init__(self, url: Secret, *, timeout_s: float = _TIMEOUT_S) -> None:
        self._url = url
        self._client = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)

    def __repr__(self) -> str:
        return "WebhookChannel(url=Secret('********'))"

    async def send(self, data: Mapping[str, str]) -> ChannelResult:
        try:
            response = await self._client.post(self._url.reveal(), json=teams_payload(data))
        except httpx.HTTPError as err:
            # httpx's messages may quote the URL: say only what kind of failure it was.
            return ChannelResult(self.name, "webhook", ok=False, error=f"{type(err).__name__}: request failed")
        if 200 <= response.status_code < 300:
            return ChannelResult(self.name, "webhook", ok=True)
        reason = response.reason_phrase or ""
        return ChannelResult(self.name, "webhook", ok=False, error=f"HTTP {response.status_code} {reason}".strip())

    async def aclose(self) -> None:
        await self._client.aclose()


class EmailChannel:
    """HLF_OPS_EMAIL_*: one plain-text message through SMTP (STARTTLS unless the relay is on loopback, or
    implicit TLS on port 465). smtplib blocks, so it runs in a worker thread."""

    name = "email"

    def __init__(
        self,
        *,
        to: Sequence[str],
        sender: str,
        host: str,
        port: int = 587,
        user: str | None = None,
        password: Secret | None = None,
        timeout_s: float = _TIMEOUT_S,
    ) -> None:
        self._to = tuple(to)
        self._from = sender
        self._host = host
        self._port = port
        self._user = user
        self._password = password
        self._timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"EmailChannel(host={self._host!r}, port={self._port}, recipients={len(self._to)})"

    @property
    def _target(self) -> str:
        return f"email:{len(self._to)} recipient{'s' if len(self._to) != 1 else ''}"

    async def send(self, data: Mapping[str, str]) -> ChannelResult:
        notice = describe(data)
        message = EmailMessage()
        message["Subject"] = notice.title
        message["From"] = self._from
        message["To"] = ", ".join(self._to)
        message.set_content(f"{notice.body}\n\n" + "\n".join(f"{k}: {v}" for k, v in data.items()) + "\n")
        try:
            await anyio.to_thread.run_sync(self._send_blocking, message)
        except (OSError, smtplib.SMTPException) as err:
            error = f"{type(err).__name__}: {getattr(err, 'smtp_code', '')} {_first_line(err)}".replace("  ", " ")
            return ChannelResult(self.name, self._target, ok=False, error=error[:200])
        return ChannelResult(self.name, self._target, ok=True)

    def _send_blocking(self, message: EmailMessage) -> None:
        loopback = self._host in {"localhost", "::1"} or self._host.startswith("127.")
        context = ssl.create_default_context()
        smtp: smtplib.SMTP
        if self._port == 465:
            smtp = smtplib.SMTP_SSL(self._host, self._port, timeout=self._timeout_s, context=context)
        else:
            smtp = smtplib.SMTP(self._host, self._port, timeout=self._timeout_s)
        with smtp:
            if self._port != 465 and not loopback:
                smtp.starttls(context=context)
            if self._user and self._password:
                smtp.login(self._user, self._password.reveal())
            smtp.send_message(message)

    async def aclose(self) -> None:
        pass


def _first_line(err: BaseException) -> str:
    text = getattr(err, "smtp_error", None)
    if isinstance(text, bytes):
        return text.decode(errors="replace").splitlines()[0] if text else ""
    return (str(err).splitlines() or [""])[0]


def build_ops_channels(config: Config, sender: AlertSender) -> list[OpsChannel]:
    """Every ops channel the configuration names, FCM first (unless there is no FCM: no HLF_FCM_CREDENTIALS)."""
    channels: list[OpsChannel] = []
    if not isinstance(sender, UnconfiguredAlertSender):
        channels.append(FcmTopicChannel(sender, config.ops_topic))
    if config.ops_webhook_url:
        channels.append(WebhookChannel(config.ops_webhook_url))
    if config.ops_email_to and config.ops_email_smtp_host and config.ops_email_from:
        channels.append(
            EmailChannel(
                to=config.ops_email_to,
                sender=config.ops_email_from,
                host=config.ops_email_smtp_host,
                port=config.ops_email_smtp_port,
                user=config.ops_email_smtp_user,
                password=config.ops_email_smtp_password,
            )
        )
    return channels


@asynccontextmanager
async def open_ops_channels(config: Config, sender: AlertSender) -> AsyncIterator[list[OpsChannel]]:
    """Every ops channel the configuration names, closed again at the end (also when cancelled)."""
    built = build_ops_channels(config, sender)
    try:
        yield built
    finally:
        with anyio.CancelScope(shield=True):
            for channel in built:
                await channel.aclose()
