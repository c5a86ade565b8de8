"""A fake Firebase Cloud Messaging backend that is a real HTTP server on 127.0.0.1.

Why it exists: the alert path must be tested through the real ``firebase-admin`` and ``google-auth`` code
(token grant, Bearer header, FCM v1 JSON, error shapes) without reaching Google. Code under test is pointed
here with the two variables of the outside contract, ``HLF_FCM_CREDENTIALS`` and ``HLF_FCM_URL``; see ``env``.

It speaks just enough of two Google endpoints:

    POST {url}/token                               OAuth 2.0 JWT-bearer grant as google-auth sends it for a
                                                   service account; the assertion's RS256 signature is checked
                                                   against the key made by ``write_service_account``
    POST {url}/v1/projects/{project}/messages:send FCM HTTP v1 send; needs a Bearer token issued above (else
                                                   401); 200 {"name": "projects/<p>/messages/<id>"}

Scripted behaviours: ``unregister(token)`` (404 UNREGISTERED in the real FcmError shape), ``invalid(token)``
(400 INVALID_ARGUMENT "The registration token is not a valid FCM registration token"), ``mismatch(token)``
(403 SENDER_ID_MISMATCH), ``outage(status)`` (every send answers that status), ``stop()`` (open connections are
cut, new ones refused) and ``start()`` again (back on the same port). Everything it receives is kept for
assertions. One lock guards all shared state; handlers run in daemon threads.

Where each answer comes from (Firebase documentation):
- "FCM error codes", https://firebase.google.com/docs/cloud-messaging/error-codes: the error body
  ``{"error": {"code", "message", "status", "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.
  FcmError", "errorCode": ...}]}}``, and its example 2 for an invalid registration token (400,
  "The registration token is not a valid FCM registration token", status and errorCode INVALID_ARGUMENT).
- "ErrorCode", https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode: UNREGISTERED is HTTP 404,
  SENDER_ID_MISMATCH HTTP 403, INVALID_ARGUMENT HTTP 400, UNAVAILABLE 503, INTERNAL 500, QUOTA_EXCEEDED 429.
- "Set the priority of a message", https://firebase.google.com/docs/cloud-messaging/customize-messages/
  setting-message-priority, and the v1 Message resource: ``android.priority`` is "normal" or "high" (anything else
  is an INVALID_ARGUMENT), APNs headers are strings, and a data-only message to Apple devices with
  ``apns-priority: 10`` is rejected with INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .http_server import FakeHandler, FakeHTTPServer, LocalServer

__all__ = ["FakeFCM", "ReceivedMessage"]

_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_TARGETS = ("token", "topic", "condition", "fid")
_JSON = {"Content-Type": "application/json; charset=UTF-8"}
# The canonical status name and a message like Google's for each status ``outage`` may be asked to answer.
_STATUS_NAMES = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", "Request had invalid authentication credentials."),
    403: ("PERMISSION_DENIED", "The caller does not have permission."),
    404: ("NOT_FOUND", "Requested entity was not found."),
    429: ("RESOURCE_EXHAUSTED", "Quota exceeded for the project."),
    500: ("INTERNAL", "Internal error encountered."),
    503: ("UNAVAILABLE", "The service is currently unavailable."),
    504: ("DEADLINE_EXCEEDED", "The deadline was exceeded."),
}


class ReceivedMessage(msgspec.Struct, frozen=True):
    """One send the fake accepted: the decoded FCM v1 ``message`` object and how it came."""

    message: dict[str, Any]
    validate_only: bool
    headers: dict[str, str]
    at: datetime

    @property
    def data(self) -> dict[str, str]:
        data: dict[str, str] = self.message.get("data", {})
        return data


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _google_error(status: int, message: str | None = None, fcm_code: str | None = None) -> dict[str, Any]:
    name, default_message = _STATUS_NAMES.get(status, ("UNKNOWN", "Unknown error."))
    error: dict[str, Any] = {"code": status, "message": message or default_message, "status": name}
    if fcm_code is not None:
        error["details"] = [{"@type": _FCM_ERROR_TYPE, "errorCode": fcm_code}]
    return {"error": error}


class _Handler(FakeHandler["FakeFCM"]):
    track_connections = True

    def do_POST(self) -> None:
        status, payload = self.server.fake._handle_post(self.path, dict(self.headers.items()), self._body())
        self._reply(status, json.dumps(payload).encode(), _JSON)

    def do_GET(self) -> None:
        self._reply(404, json.dumps(_google_error(404)).encode(), _JSON)


class FakeFCM(LocalServer):
    """The FCM v1 send endpoint and a Google OAuth token endpoint, on one local port."""

    _name = "fake-fcm"

    def __init__(self, *, project_id: str = "hlf-test", host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host=host, port=port)
        self.project_id = project_id
        # Shared state, under self._lock.
        self._public_keys: dict[str, rsa.RSAPublicKey] = {}
        self._access_tokens: set[str] = set()
        self._messages: list[ReceivedMessage] = []
        self._unregistered: set[str] = set()
        self._invalid: set[str] = set()
        self._mismatched: set[str] = set()
        self._outage: int | None = None
        self._held: dict[str, threading.Event] = {}
        self._token_requests = 0
        self._send_attempts = 0
        self._next_id = 1

    def _bind(self) -> FakeHTTPServer[FakeFCM]:
        return FakeHTTPServer((self._host, self._port), _Handler, self)

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeFCM is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def send_url(self) -> str:
        return f"{self.url}/v1/projects/{self.project_id}/messages:send"

    # -- configuration for the code under test ---------------------------------------------------------

    def write_service_account(self, path: Path) -> Path:
        """Write a service-account JSON with a fresh RSA key whose token_uri is this fake."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        client_email = f"hlf-alerts-{secrets.token_hex(4)}@{self.project_id}.iam.gserviceaccount.com"
        with self._lock:
            self._public_keys[client_email] = key.public_key()
        info = {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": secrets.token_hex(20),
            "private_key": pem,
            "client_email": client_email,
            "client_id": str(secrets.randbelow(10**20)),
            "auth_uri": f"{self.url}/auth",
            "token_uri": f"{self.url}/token",
        }
        path.write_text(json.dumps(info, indent=2))
        return path

    def env(self, path: Path) -> dict[str, str]:
        """Write the service account to ``path`` and return the variables that point the service here."""
        self.write_service_account(path)
        return {"HLF_FCM_CREDENTIALS": str(path), "HLF_FCM_URL": self.send_url}

    # -- scripted behaviours -------------------------------------------------------------------------

    def unregister(self, token: str) -> None:
        """From now on, sends to ``token`` answer 404 UNREGISTERED, as FCM does for an uninstalled app."""
        with self._lock:
            self._unregistered.add(token)

    def invalid(self, token: str) -> None:
        """From now on, sends to ``token`` answer 400 INVALID_ARGUMENT about the token (a malformed token)."""
        with self._lock:
            self._invalid.add(token)

    def mismatch(self, token: str) -> None:
        """From now on, sends to ``token`` answer 403 SENDER_ID_MISMATCH (a token of another sender)."""
        with self._lock:
            self._mismatched.add(token)

    def revoke_access_tokens(self) -> None:
        """Forget every access token issued: the next send with one answers 401, as for a revoked token."""
        with self._lock:
            self._access_tokens.clear()

    def hold(self, endpoint: str) -> threading.Event:
        """Requests to ``endpoint`` ("send" or "token") wait, arrived but unanswered, until the returned event is set
        (at most 30 s): shows whether the client's event loop goes on meanwhile."""
        release = threading.Event()
        with self._lock:
            self._held[endpoint] = release
        return release

    def outage(self, status: int | None = 503) -> None:
        """Every send answers ``status`` (with Google's error body) until called with None."""
        with self._lock:
            self._outage = status

    # -- observations --------------------------------------------------------------------------------

    def messages(self) -> list[ReceivedMessage]:
        with self._lock:
            return list(self._messages)

    def data_messages(self) -> list[dict[str, str]]:
        return [m.data for m in self.messages()]

    def token_requests(self) -> int:
        with self._lock:
            return self._token_requests

    def send_attempts(self) -> int:
        """Every POST to the send endpoint, answered or refused — shows retries the client made on its own."""
        with self._lock:
            return self._send_attempts

    def issued_tokens(self) -> set[str]:
        """Access tokens handed out, so tests can check they never leak into logs or results."""
        with self._lock:
            return set(self._access_tokens)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"FakeFCM: condition not met within {timeout}s; received {len(self.messages())} "
                    f"message(s), {self.send_attempts()} send attempt(s), {self.token_requests()} token "
                    "request(s)"
                )
            time.sleep(0.005)

    # -- request handling (handler threads) ----------------------------------------------------------

    def _handle_post(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        if path == "/token":
            return self._handle_token(body)
        if path == f"/v1/projects/{self.project_id}/messages:send":
            return self._handle_send(headers, body)
        return 404, _google_error(404)

    def _handle_token(self, body: bytes) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self._token_requests += 1
            held = self._held.get("token")
        if held is not None:
            held.wait(30)
        form = parse_qs(body.decode(errors="replace"))
        if form.get("grant_type") != [_JWT_BEARER] or len(form.get("assertion", [])) != 1:
            return 400, {
                "error": "unsupported_grant_type",
                "error_description": "expected a JWT-bearer grant",
            }
        problem = self._check_assertion(form["assertion"][0])
        if problem is not None:
            return 400, {"error": "invalid_grant", "error_description": problem}
        access_token = "ya29.fake-" + secrets.token_urlsafe(32)
        with self._lock:
            self._access_tokens.add(access_token)
        return 200, {"access_token": access_token, "expires_in": 3600, "token_type": "Bearer"}

    def _check_assertion(self, assertion: str) -> str | None:
        try:
            header_b64, claims_b64, signature_b64 = assertion.split(".")
            header = json.loads(_b64url_decode(header_b64))
            claims = json.loads(_b64url_decode(claims_b64))
            signature = _b64url_decode(signature_b64)
        except ValueError:
            return "Malformed JWT."
        if header.get("alg") != "RS256":
            return "Unsupported JWT algorithm."
        with self._lock:
            public_key = self._public_keys.get(claims.get("iss", ""))
        if public_key is None:
            return "Invalid issuer: unknown service account."
        try:
            public_key.verify(signature, f"{header_b64}.{claims_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return "Invalid JWT Signature."
        if not isinstance(claims.get("exp"), int) or claims["exp"] < time.time():
            return "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe."
        if not claims.get("scope"):
            return "Invalid JWT: no scope."
        return None

    def _handle_send(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        auth = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
        with self._lock:
            self._send_attempts += 1
            authorised = auth.startswith("Bearer ") and auth[len("Bearer ") :] in self._access_tokens
            outage = self._outage
            held = self._held.get("send")
        if held is not None:
            held.wait(30)
        if not authorised:
            return 401, _google_error(401)
        if outage is not None:
            return outage, _google_error(outage, fcm_code="QUOTA_EXCEEDED" if outage == 429 else None)
        try:
            request = json.loads(body)
        except ValueError:
            return 400, _google_error(400, "Invalid JSON payload received.")
        message = request.get("message") if isinstance(request, dict) else None
        problem = self._check_message(message)
        if problem is not None:
            return 400, _google_error(400, problem, fcm_code="INVALID_ARGUMENT")
        assert isinstance(message, dict)
        with self._lock:
            if "token" in message and message["token"] in self._unregistered:
                return 404, _google_error(404, fcm_code="UNREGISTERED")
            if "token" in message and message["token"] in self._invalid:
                return 400, _google_error(
                    400, "The registration token is not a valid FCM registration token", fcm_code="INVALID_ARGUMENT"
                )
            if "token" in message and message["token"] in self._mismatched:
                return 403, _google_error(403, "SenderId mismatch", fcm_code="SENDER_ID_MISMATCH")
            message_id = f"0:{int(time.time() * 1000)}%{self._next_id:016x}"
            self._next_id += 1
            self._messages.append(
                ReceivedMessage(
                    message=message,
                    validate_only=bool(request.get("validate_only", False)),
                    headers=dict(headers),
                    at=datetime.now(UTC),
                )
            )
        return 200, {"name": f"projects/{self.project_id}/messages/{message_id}"}

    @staticmethod
    def _check_message(message: object) -> str | None:
        if not isinstance(message, dict):
            return "Invalid value at 'message': expected an object."
        targets = [t for t in _TARGETS if t in message]
        if len(targets) != 1:
            return f"Exactly one of {', '.join(_TARGETS)} must be set; got {targets or 'none'}."
        target = message[targets[0]]
        if not isinstance(target, str) or not target:
            return f"Invalid value at 'message.{targets[0]}'."
        data = message.get("data", {})
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            return "Invalid value at 'message.data': every key and value must be a string."
        android = message.get("android", {})
        if "priority" in android and android["priority"] not in ("normal", "high", "NORMAL", "HIGH"):
            return f"Invalid value at 'message.android.priority' ({android['priority']!r})."
        apns = message.get("apns", {})
        headers = apns.get("headers", {})
        if not all(isinstance(v, str) for v in headers.values()):
            return "Invalid value at 'message.apns.headers': every value must be a string."
        aps = apns.get("payload", {}).get("aps", {})
        if headers.get("apns-priority") == "10" and "alert" not in aps and "notification" not in message:
            return "Data messages to Apple devices must use apns-priority 5."
        return None
