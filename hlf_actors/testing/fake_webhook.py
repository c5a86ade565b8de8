"""A fake Microsoft Teams webhook (Workflows "Post to a channel when a webhook request is received") on 127.0.0.1.

Why it exists: ops alerts go to ``HLF_OPS_WEBHOOK_URL``; tests need a real HTTP endpoint that answers the way the
Teams/Workflows webhook does, can be told to fail, and keeps what it received. Point the service at it with
``env()`` (the URL carries a secret-looking path, like a real webhook, so tests can check it never leaks).

What it answers, and where that comes from:
- 202 Accepted with an empty body for a valid message: a Workflows webhook is the "When a Teams webhook request is
  received" trigger, a Request trigger; a flow without a Response action answers its caller 202 Accepted at once
  (Microsoft Learn, "Receive and respond to inbound HTTPS calls to workflows in Azure Logic Apps",
  https://learn.microsoft.com/en-us/azure/connectors/connectors-native-reqres).
  ``legacy=True`` answers as the old Office 365 connector webhooks did instead: 200 with the body ``1``.
- 400 for a body that is not a message with an Adaptive Card attachment: "Workflows support Adaptive Cards only"
  (Microsoft Learn, "Create and send messages", Known issues,
  https://learn.microsoft.com/en-us/microsoftteams/platform/webhooks-and-connectors/how-to/connectors-using),
  with the message shape of "Send Adaptive Cards using an Incoming Webhook" (Microsoft Learn, "Create Incoming
  Webhooks", https://learn.microsoft.com/en-us/microsoftteams/platform/webhooks-and-connectors/how-to/add-incoming-webhook):
  ``{"type": "message", "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive", "content":
  {"type": "AdaptiveCard", ...}}]}``.
- 413 for a body over 28 KB ("The message size limit is 28 KB", same page).
- 429 with Retry-After, when told to (``fail(429)``): the same page throttles more than four requests a second.
- 404 for any other path: an unknown or deleted webhook.

Scripted behaviours: ``fail(status)`` until ``fail(None)``, ``stop()`` / ``start()`` (same port). One lock guards
all shared state; handlers run in daemon threads.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from typing import Any

from .http_server import FakeHandler, FakeHTTPServer, LocalServer

__all__ = ["FakeWebhook"]

_ADAPTIVE_CARD = "application/vnd.microsoft.card.adaptive"
_MAX_BYTES = 28 * 1024


class _Handler(FakeHandler["FakeWebhook"]):
    def do_POST(self) -> None:
        status, raw, headers = self.server.fake._handle(self.path, self.headers.get("Content-Type", ""), self._body())
        self._reply(status, raw, headers)


class FakeWebhook(LocalServer):
    _name = "fake-webhook"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, legacy: bool = False) -> None:
        super().__init__(host=host, port=port)
        self._legacy = legacy
        # Shaped like a Workflows URL: the signature in the path is the secret.
        self.path = f"/workflows/{secrets.token_hex(16)}/triggers/manual/paths/invoke?sig={secrets.token_urlsafe(32)}"
        self._received: list[dict[str, Any]] = []
        self._attempts = 0
        self._failing: int | None = None

    def _bind(self) -> FakeHTTPServer[FakeWebhook]:
        return FakeHTTPServer((self._host, self._port), _Handler, self)

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}{self.path}"

    def env(self) -> dict[str, str]:
        return {"HLF_OPS_WEBHOOK_URL": self.url}

    # -- scripted behaviours and observations -------------------------------------------------------------------

    def fail(self, status: int | None = 500) -> None:
        """Every POST answers ``status`` until called with None."""
        with self._lock:
            self._failing = status

    def received(self) -> list[dict[str, Any]]:
        """The bodies of the messages accepted, in order."""
        with self._lock:
            return list(self._received)

    def attempts(self) -> int:
        with self._lock:
            return self._attempts

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"FakeWebhook: condition not met within {timeout}s; {self.attempts()} POST(s)")
            time.sleep(0.005)

    # -- request handling (handler threads) --------------------------------------------------------------------

    def _handle(self, path: str, content_type: str, body: bytes) -> tuple[int, bytes, dict[str, str]]:
        with self._lock:
            self._attempts += 1
            failing = self._failing
        if path != self.path:
            return 404, b"", {}
        if failing is not None:
            headers = {"Retry-After": "1"} if failing == 429 else {}
            return (
                failing,
                json.dumps({"error": {"code": str(failing), "message": "failing on purpose"}}).encode(),
                {
                    "Content-Type": "application/json",
                    **headers,
                },
            )
        if len(body) > _MAX_BYTES:
            return 413, b"", {}
        problem = self._check(content_type, body)
        if problem is not None:
            return (
                400,
                json.dumps({"error": {"code": "InvalidRequestContent", "message": problem}}).encode(),
                {"Content-Type": "application/json"},
            )
        with self._lock:
            self._received.append(json.loads(body))
        if self._legacy:
            return 200, b"1", {"Content-Type": "text/plain"}
        return 202, b"", {}

    @staticmethod
    def _check(content_type: str, body: bytes) -> str | None:
        if "application/json" not in content_type:
            return "The request content type must be application/json."
        try:
            message = json.loads(body)
        except ValueError:
            return "The request body is not valid JSON."
        if not isinstance(message, dict) or message.get("type") != "message":
            return "Expected a message: {'type': 'message', 'attachments': [...]}."
        attachments = message.get("attachments")
        if not isinstance(attachments, list) or not attachments:
            return "A message needs at least one attachment."
        for a in attachments:
            if not isinstance(a, dict) or a.get("contentType") != _ADAPTIVE_CARD:
                return "Workflows support Adaptive Cards only."
            content = a.get("content")
            if not isinstance(content, dict) or content.get("type") != "AdaptiveCard" or "body" not in content:
                return "The attachment content must be an AdaptiveCard with a body."
        return None
