"""Push alerts to coordinators' phones and to FCM topics, through firebase-admin (FCM HTTP v1 data messages).

Why it exists: when a mentor's sync fails, a certificate is about to expire or our own credentials stop
working, a person has to hear about it. This module is the one seam between the service and Firebase Cloud
Messaging: everything else talks to an ``AlertSender`` and gets one ``Delivery`` per target back, device
tokens first (in the order given) and the topic last (``push.py`` defines both). Callers never catch
firebase-admin's exceptions and never see a device token whole.

Senders:
    FirebaseAlertSender       the real one: a named firebase_admin App built from a service-account JSON
    UnconfiguredAlertSender   (push.py) no HLF_FCM_CREDENTIALS: every delivery fails, said loudly once at start-up
    (``testing.recording.RecordingAlertSender`` keeps what it was asked to send, for tests and the harness)

What a Delivery means (``send`` never raises for a delivery failure):
    ok=True                  FCM accepted the message; ``message_id`` is its name
    ok=False, dead           the device token can never work again: UNREGISTERED (app uninstalled or token
                             expired), SENDER_ID_MISMATCH (token of another Firebase project) or INVALID_ARGUMENT
                             about the token itself ("The registration token is not a valid FCM registration
                             token"). The caller marks the device dead and never targets it again.
                             ``unregistered`` is set for UNREGISTERED alone
    ok=False, retryable      UNAVAILABLE, INTERNAL, QUOTA_EXCEEDED, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED,
                             UNKNOWN, or the whole call failed (token endpoint down, ...): try again later
    ok=False, neither        INVALID_ARGUMENT about the message, THIRD_PARTY_AUTH_ERROR, PERMISSION_DENIED,
                             UNAUTHENTICATED, NOT_FOUND: the same message cannot succeed; an operator must act
firebase-admin has already retried 500 and 503 on its own (4 more tries, 0+1+2+4 s apart) before a
retryable delivery reaches us. The codes and their meaning: Firebase, "FCM error codes"
(https://firebase.google.com/docs/cloud-messaging/error-codes) and "ErrorCode"
(https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode): "INVALID_ARGUMENT ... Potential causes include
invalid registration ... Check the format of the registration token", "UNREGISTERED ... the registration token
is no longer valid", "SENDER_ID_MISMATCH ... A registration token is tied to a certain group of senders".

Pushes that show (``send(..., notice=Notice(title, body))``, sync failures and expiry reminders): the message
carries, beside the unchanged data payload,
    notification    {title, body}: firebase-admin ``messaging.Notification(title, body)``
    android         ``AndroidConfig(priority="high")``. Firebase, "Set the priority of a message"
                    (https://firebase.google.com/docs/cloud-messaging/customize-messages/setting-message-priority):
                    "Normal priority ... For backgrounded apps, delivery may be delayed"; "High priority. FCM
                    attempts to deliver high priority messages immediately even if the device is in Doze mode.
                    High priority messages are for time-sensitive, user visible content." Android's own page
                    (https://firebase.google.com/docs/cloud-messaging/android/message-priority) warns that high
                    priority messages which do not result in user-facing notifications get deprioritised: ours
                    always carry the notification.
    apns            ``APNSConfig(headers={"apns-priority": "10", "apns-push-type": "alert"},
                    payload=APNSPayload(aps=Aps(alert=ApsAlert(title, body), sound="default")))``. The same
                    priority page: "When sending data messages to Apple devices, the priority must be set to 5"
                    (an alert may use 10, data-only may not); Apple requires ``apns-push-type`` since iOS 13 and
                    "alert" for a notification the user sees; firebase-admin's ``Aps`` ("Represents the aps
                    dictionary", https://firebase.google.com/docs/reference/admin/node/firebase-admin.messaging.aps)
                    takes ``alert`` as an ``ApsAlert`` with title and body.
Every field name above is firebase-admin 7.x's (``_messaging_utils``: ``AndroidConfig(priority=...)`` "Must be
one of high or normal", ``APNSConfig(headers=..., payload=...)``, ``APNSPayload(aps=...)``,
``Aps(alert=..., sound=...)``, ``ApsAlert(title=..., body=...)``), checked in tests against what reaches the fake.

What ``coordinator_devices.fcm_token`` holds: an FCM *registration token*, the string the mentor app's FCM
client SDK hands out (``FirebaseMessaging.getToken()``); we send it as ``Message(token=...)``. firebase-admin
7.5+ deprecates ``token`` in favour of ``fid`` (a Firebase installation ID): in 7.7.0 ``Message.__init__``
calls ``warnings.warn("Message.token is deprecated. Use Message.fid instead.", DeprecationWarning,
stacklevel=2)`` on *every* construction with a token. A FID is a different identifier, produced only by apps
switched to FCM's installation-ID mode (a per-device, all-or-nothing switch), so sending a registration token
as ``fid`` would not reach the device. We therefore keep ``token=`` and silence exactly that warning message,
only around our own ``Message(token=...)`` call (``_token_message``). When the mentor app moves to FIDs it
should store them in a new column, not in ``fcm_token``, and this module should send those with ``fid=``.

Secrets: the service-account key, the OAuth access token and whole device tokens never appear in a Delivery, a
log line or an exception message made here. Targets read ``token:<first 8 chars>...`` or ``topic:<name>``, and
error texts from FCM are scrubbed of anything token-shaped before they are kept.

Nothing here blocks the event loop: every FCM call goes through firebase-admin's synchronous ``send_each`` in a
worker thread (``anyio.to_thread.run_sync``), so google-auth's synchronous credential refresh (also after a 401)
happens in that thread too; the access token is refreshed ahead of a send in a worker thread as well. The
firebase-admin private attributes this module relies on are listed in ``PRIVATE_ATTRIBUTES`` and checked by
``check_firebase_internals`` (a test calls it, so an upgrade that drops one fails loudly).
"""

from __future__ import annotations

import functools
import re
import types
import warnings
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final

import anyio

from .errors import ConfigError
from .push import AlertSender, Delivery, Notice, Target, UnconfiguredAlertSender, log_outcome, plan_targets


class _OnFirstUse:
    """A module imported when first used: firebase-admin and google-auth (with requests and cryptography) are a
    third of the service's start-up imports and memory, and only a configured FCM (FirebaseAlertSender) uses them."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        import importlib

        return getattr(importlib.import_module(self._name), attribute)


firebase_admin: Any = _OnFirstUse("firebase_admin")
credentials: Any = _OnFirstUse("firebase_admin.credentials")
messaging: Any = _OnFirstUse("firebase_admin.messaging")
_google_auth_requests: Any = _OnFirstUse("google.auth.transport.requests")

__all__ = [
    "PRIVATE_ATTRIBUTES",
    "FirebaseAlertSender",
    "build_alert_sender",
    "check_firebase_internals",
]

# FCM accepts at most 500 messages per send_each call; firebase-admin's send_each starts one thread per message,
# so a smaller batch keeps the thread count sane.
_BATCH: Final = 100
# Per-request timeout of firebase-admin's httpx client (its default is 120 s) and of our token refresh.
_HTTP_TIMEOUT_S: Final = 30
_RETRYABLE: Final = frozenset(
    {"UNAVAILABLE", "INTERNAL", "QUOTA_EXCEEDED", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNKNOWN"}
)


def _fcm_error_names() -> tuple[tuple[type[Exception], str], ...]:
    """FCM's own error codes arrive as these firebase-admin classes; other errors carry a canonical ``code``."""
    return (
        (messaging.UnregisteredError, "UNREGISTERED"),
        (messaging.QuotaExceededError, "QUOTA_EXCEEDED"),
        (messaging.SenderIdMismatchError, "SENDER_ID_MISMATCH"),
        (messaging.ThirdPartyAuthError, "THIRD_PARTY_AUTH_ERROR"),
    )


# A token FCM calls dead for good: never target it again.
_DEAD_CODES: Final = frozenset({"UNREGISTERED", "SENDER_ID_MISMATCH"})
_TOKEN_FIELD = re.compile(r"registration token|message\.token\b", re.IGNORECASE)
# What this module reaches into (firebase-admin 7.7.0, google-auth 2.62.x); see check_firebase_internals.
PRIVATE_ATTRIBUTES: Final = (
    "firebase_admin.messaging._get_messaging_service",
    "firebase_admin.messaging._MessagingService._fcm_url (instance attribute read by send_each)",
    "google.oauth2.service_account.Credentials._set_regional_access_boundary (optional)",
)
# Registration tokens, access tokens, JWTs and PEM lines are long runs of these characters.
_OPAQUE = re.compile(r"[A-Za-z0-9+/=_\-]{40,}")


def _scrub(text: str, secrets: Iterable[str]) -> str:
    """Short, one-line and secret-free: the known secrets, then anything token-shaped, become [redacted]."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = _OPAQUE.sub("[redacted]", " ".join(text.split()))
    return text if len(text) <= 200 else text[:199] + "…"


# -- firebase-admin ------------------------------------------------------------------------------------------


def _showing(notice: Notice | None) -> dict[str, Any]:
    """The fields that make a push show on the phone at once (module docstring: the pages behind each)."""
    if notice is None:
        return {}
    return {
        "notification": messaging.Notification(title=notice.title, body=notice.body),
        "android": messaging.AndroidConfig(priority="high"),
        "apns": messaging.APNSConfig(
            headers={"apns-priority": "10", "apns-push-type": "alert"},
            payload=messaging.APNSPayload(
                aps=messaging.Aps(alert=messaging.ApsAlert(title=notice.title, body=notice.body), sound="default")
            ),
        ),
    }


def _token_message(data: dict[str, str], token: str, notice: Notice | None = None) -> Any:
    # firebase-admin >= 7.5 warns on every Message(token=...); the module docstring says why we still send
    # registration tokens. Silence exactly that message, only here. (catch_warnings swaps the process-wide
    # filter list; nothing awaits inside, so no other task of this loop runs meanwhile.)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Message\.token is deprecated", category=DeprecationWarning)
        return messaging.Message(data=data, token=token, **_showing(notice))


def _names(code: types.CodeType) -> set[str]:
    """The attribute and global names a function uses, its nested functions' included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def check_firebase_internals() -> None:
    """Raise RuntimeError naming what is gone when firebase-admin no longer has the private parts we use."""
    missing: list[str] = []
    if not callable(getattr(messaging, "_get_messaging_service", None)):
        missing.append("messaging._get_messaging_service")
    # _fcm_url is set in __init__ and read by send_each: both must still name it.
    service_cls = getattr(messaging, "_MessagingService", None)
    for method in ("__init__", "send_each"):
        code = getattr(getattr(service_cls, method, None), "__code__", None)
        if code is None or "_fcm_url" not in _names(code):
            missing.append(f"messaging._MessagingService.{method} using _fcm_url")
    if missing:
        raise RuntimeError(
            f"firebase-admin {firebase_admin.__version__} lacks {', '.join(missing)}: HLF_FCM_URL cannot be "
            "honoured (see hlf_actors.fcm.PRIVATE_ATTRIBUTES)"
        )


def _point_at_fcm_url(app: Any, fcm_url: str) -> None:
    """Make the App's messaging service send to ``fcm_url`` (HLF_FCM_URL) instead of Google's endpoint.

    The one place that reaches into firebase-admin's privates; checked against firebase-admin 7.7.0 and
    google-auth 2.62.2.
    - firebase-admin has no option for the FCM endpoint: ``messaging._MessagingService.__init__`` fixes
      ``self._fcm_url = FCM_URL.format(project_id)`` and ``send_each`` reads that instance attribute.
    - google-auth (2.62.2) follows each authorised request with a background "Regional Access Boundary"
      lookup at iamcredentials.googleapis.com that carries our access token. Against a non-Google FCM (a local
      fake) that token was issued by someone else and must not travel to Google, so pin the boundary to
      google-auth's own no-op value ("0x0"), which also stops the lookup.
    """
    service = messaging._get_messaging_service(app)
    if not isinstance(getattr(service, "_fcm_url", None), str):
        raise RuntimeError(
            f"firebase-admin {firebase_admin.__version__} no longer keeps _MessagingService._fcm_url; "
            "HLF_FCM_URL cannot be honoured (see hlf_actors.fcm._point_at_fcm_url)"
        )
    service._fcm_url = fcm_url
    pin = getattr(app.credential.get_credential(), "_set_regional_access_boundary", None)
    if pin is not None:
        pin({"encodedLocations": "0x0", "expiry": datetime.max})


class FirebaseAlertSender:
    """Sends through a named firebase_admin App (never the default app) built from a service-account JSON."""

    def __init__(self, credentials_path: str, *, fcm_url: str | None = None, app_name: str = "hlf-actors") -> None:
        try:
            certificate = credentials.Certificate(credentials_path)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"HLF_FCM_CREDENTIALS: cannot load a service account from {credentials_path}: "
                f"{type(err).__name__}: {_scrub(str(err), ())}"
            ) from None
        self._app = firebase_admin.initialize_app(certificate, options={"httpTimeout": _HTTP_TIMEOUT_S}, name=app_name)
        try:
            if fcm_url is not None:
                _point_at_fcm_url(self._app, fcm_url)
            else:  # without a project id, fail now rather than at the first alert
                messaging._get_messaging_service(self._app)
        except ValueError as err:
            firebase_admin.delete_app(self._app)
            raise ConfigError(f"HLF_FCM_CREDENTIALS: {_scrub(str(err), ())}") from None
        self._credential = certificate.get_credential()
        self._project_id: str | None = certificate.project_id
        self._auth_request = _google_auth_requests.Request()
        self._refresh_lock = anyio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"FirebaseAlertSender(app={self._app.name!r}, project={self._project_id!r})"

    async def send(
        self,
        data: Mapping[str, str],
        *,
        tokens: Sequence[str] = (),
        topic: str | None = None,
        notice: Notice | None = None,
    ) -> list[Delivery]:
        if self._closed:
            raise RuntimeError("FirebaseAlertSender is closed")
        payload, targets = plan_targets(data, tokens, topic)
        secrets = [t.token for t in targets if t.token]
        results: dict[int, Delivery] = {
            i: Delivery(t.label, ok=False, error=t.problem) for i, t in enumerate(targets) if t.problem
        }
        pending = [(i, t) for i, t in enumerate(targets) if not t.problem]
        if pending:
            try:
                await self._ensure_access_token()
            except Exception as err:
                results.update(self._all_failed(pending, err, "OAUTH_FAILED: could not get an access token", secrets))
                pending = []
        for start in range(0, len(pending), _BATCH):
            batch = pending[start : start + _BATCH]
            messages = [
                _token_message(payload, t.token, notice)
                if t.token
                else messaging.Message(data=payload, topic=t.topic, **_showing(notice))
                for _, t in batch
            ]
            try:
                # Synchronous send in a worker thread: a credential refresh inside it cannot block the loop.
                response = await anyio.to_thread.run_sync(
                    functools.partial(messaging.send_each, messages, app=self._app)
                )
            except Exception as err:
                results.update(self._all_failed(batch, err, "UNKNOWN: the FCM call failed", secrets))
                continue
            for (i, t), answer in zip(batch, response.responses, strict=True):
                results[i] = self._delivery(t.label, answer, secrets, token=t.token is not None)
        deliveries = [results[i] for i in range(len(targets))]
        log_outcome(payload, deliveries)
        return deliveries

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # delete_app closes firebase-admin's (unused) async client with asyncio.run(): fine in a worker thread.
        await anyio.to_thread.run_sync(firebase_admin.delete_app, self._app)
        self._auth_request.session.close()

    async def _ensure_access_token(self) -> None:
        # Inside firebase-admin's httpx auth flow, google-auth refreshes synchronously (requests, 120 s
        # timeout, 3 tries), i.e. on the event loop. Refresh in a worker thread first: the loop never waits.
        if self._credential.valid:
            return
        async with self._refresh_lock:
            if not self._credential.valid:
                request = functools.partial(self._auth_request, timeout=_HTTP_TIMEOUT_S)
                await anyio.to_thread.run_sync(self._credential.refresh, request)

    def _delivery(self, label: str, answer: Any, secrets: list[str], *, token: bool) -> Delivery:
        if answer.exception is None:
            if answer.message_id:
                return Delivery(label, ok=True, message_id=str(answer.message_id))
            return Delivery(label, ok=False, error="UNKNOWN: FCM answered without a message name")
        code = _error_code(answer.exception)
        return Delivery(
            label,
            ok=False,
            error=f"{code}: {_scrub(str(answer.exception), self._secrets(secrets))}",
            unregistered=code == "UNREGISTERED",
            retryable=code in _RETRYABLE,
            dead=token and (code in _DEAD_CODES or (code == "INVALID_ARGUMENT" and _about_token(answer.exception))),
            code=code,
        )

    def _all_failed(
        self, targets: Sequence[tuple[int, Target]], err: Exception, what: str, secrets: list[str]
    ) -> dict[int, Delivery]:
        error = f"{what} ({type(err).__name__}: {_scrub(str(err), self._secrets(secrets))})"
        error = error if len(error) <= 240 else error[:239] + "…"
        return {i: Delivery(t.label, ok=False, error=error, retryable=True) for i, t in targets}

    def _secrets(self, tokens: list[str]) -> list[str]:
        access_token = getattr(self._credential, "token", None)
        return [*tokens, access_token] if isinstance(access_token, str) else tokens


def _about_token(err: BaseException) -> bool:
    """Whether an INVALID_ARGUMENT is about the registration token, not the message: FCM says so in the message
    ("The registration token is not a valid FCM registration token") or in a google.rpc.BadRequest field
    violation on ``message.token`` ("FCM error codes", https://firebase.google.com/docs/cloud-messaging/error-codes)."""
    if _TOKEN_FIELD.search(str(err)):
        return True
    response = getattr(err, "http_response", None)
    try:
        details = response.json()["error"]["details"] if response is not None else []
    except (ValueError, KeyError, TypeError):
        return False
    return any(
        isinstance(v, dict) and v.get("field") == "message.token"
        for d in details
        if isinstance(d, dict)
        for v in d.get("fieldViolations", [])
    )


def _error_code(err: BaseException) -> str:
    for cls, name in _fcm_error_names():
        if isinstance(err, cls):
            return name
    code = getattr(err, "code", None)
    return code if isinstance(code, str) and code else "UNKNOWN"


def build_alert_sender(credentials_path: str | None, fcm_url: str | None) -> AlertSender:
    """The sender the configuration asks for: Firebase when credentials are set, else the unconfigured one."""
    if not credentials_path:
        return UnconfiguredAlertSender()
    return FirebaseAlertSender(credentials_path, fcm_url=fcm_url)
