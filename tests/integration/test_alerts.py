"""Alerts through the real firebase-admin and google-auth, against FakeFCM on 127.0.0.1.

Nothing of firebase-admin is patched here; the only redirection is ``HLF_FCM_URL`` as ``hlf_actors.fcm``
honours it. A guard fails any test in which something tried to resolve a host other than the loopback, so these
tests also prove that neither library reaches Google.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from hlf_actors.errors import ConfigError
from hlf_actors.fcm import FirebaseAlertSender, build_alert_sender
from hlf_actors.push import NOT_CONFIGURED, Delivery, UnconfiguredAlertSender
from hlf_actors.testing.fake_fcm import FakeFCM
from hlf_actors.testing.recording import RecordingAlertSender

pytestmark = [pytest.mark.anyio, pytest.mark.filterwarnings("error::DeprecationWarning")]

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # firebase-admin's async path is asyncio-only


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Refuse, and remember, every name lookup that is not the loopback: no traffic may leave this machine."""
    attempts: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in _LOOPBACK:
            attempts.append(name)
            raise socket.gaierror(socket.EAI_NONAME, f"test guard: no network beyond 127.0.0.1 ({name})")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    lookups = [t for t in threading.enumerate() if "RegionalAccessBoundary" in type(t).__name__]
    assert not lookups, "google-auth started a Regional Access Boundary lookup (to iamcredentials.googleapis.com)"
    assert attempts == [], f"something tried to reach the network: {attempts}"


@pytest.fixture
def log() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG", format="{level} {message} {extra}")
    yield lines
    logger.remove(sink)


@pytest.fixture
def fake(fcm: FakeFCM) -> FakeFCM:  # the shared fake FCM (tests/conftest.py), by the name this file uses
    return fcm


@pytest.fixture
def service_account(fcm_env: dict[str, str]) -> dict[str, str]:
    return fcm_env


@pytest.fixture
async def sender(service_account: dict[str, str]) -> AsyncIterator[FirebaseAlertSender]:
    alerts = FirebaseAlertSender(service_account["HLF_FCM_CREDENTIALS"], fcm_url=service_account["HLF_FCM_URL"])
    yield alerts
    await alerts.aclose()


def device_token() -> str:
    """Shaped like a real registration token: an instance id, a colon, a long opaque part."""
    return f"{secrets.token_urlsafe(16)}:APA91b{secrets.token_urlsafe(105)}"


def sync_failure() -> dict[str, str]:
    return {"type": "hlf_sync_failure", "mentor_id": str(uuid.uuid4()), "operation": "remove"}


def assert_secret_free(text: str, fake: FakeFCM, service_account: dict[str, str], tokens: list[str]) -> None:
    private_key = json.loads(Path(service_account["HLF_FCM_CREDENTIALS"]).read_text())["private_key"]
    key_lines = [line for line in private_key.splitlines() if line and not line.startswith("-----")]
    for secret in [private_key, *key_lines, *fake.issued_tokens(), *tokens]:
        assert secret not in text


async def test_data_message_reaches_two_tokens_and_a_topic(
    fake: FakeFCM, sender: FirebaseAlertSender, service_account: dict[str, str], log: list[str]
) -> None:
    tokens = [device_token(), device_token()]
    data = sync_failure()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deliveries = await sender.send(data, tokens=tokens, topic="org-coordinators")

    assert [d.ok for d in deliveries] == [True, True, True]
    assert [d.target for d in deliveries] == [
        f"token:{tokens[0][:8]}…",
        f"token:{tokens[1][:8]}…",
        "topic:org-coordinators",
    ]
    assert all(d.message_id and d.message_id.startswith("projects/hlf-test/messages/") for d in deliveries)
    assert fake.data_messages() == [data, data, data]
    received = fake.messages()  # firebase-admin sends concurrently: arrival order is not fixed
    assert sorted(m.message.get("token") or "topic:" + m.message["topic"] for m in received) == sorted(
        [*tokens, "topic:org-coordinators"]
    )
    assert not any(m.validate_only for m in received)
    assert [w for w in caught if issubclass(w.category, DeprecationWarning | PendingDeprecationWarning)] == []
    assert fake.token_requests() == 1
    assert_secret_free(repr(deliveries) + repr(sender) + "\n".join(log), fake, service_account, tokens)


async def test_access_token_is_fetched_once_and_reused(fake: FakeFCM, sender: FirebaseAlertSender) -> None:
    for _ in range(3):
        assert all(d.ok for d in await sender.send(sync_failure(), tokens=[device_token()], topic="ops"))
    assert fake.token_requests() == 1
    assert len(fake.messages()) == 6


async def test_unregistered_token_is_reported_and_the_others_still_arrive(
    fake: FakeFCM, sender: FirebaseAlertSender, service_account: dict[str, str], log: list[str]
) -> None:
    alive, dead = device_token(), device_token()
    fake.unregister(dead)

    deliveries = await sender.send(sync_failure(), tokens=[alive, dead], topic="org-coordinators")

    assert deliveries[0].ok and deliveries[2].ok
    assert deliveries[1] == Delivery(
        target=f"token:{dead[:8]}…",
        ok=False,
        error="UNREGISTERED: Requested entity was not found.",
        unregistered=True,
        retryable=False,
        dead=True,
        code="UNREGISTERED",
    )
    assert {m.message.get("token", m.message.get("topic")) for m in fake.messages()} == {alive, "org-coordinators"}
    assert_secret_free(repr(deliveries) + "\n".join(log), fake, service_account, [alive, dead])


async def test_service_unavailable_is_retryable_after_firebase_admins_own_retries(
    fake: FakeFCM, sender: FirebaseAlertSender
) -> None:
    fake.outage(503)

    deliveries = await sender.send(sync_failure(), topic="ops")

    assert len(deliveries) == 1
    assert not deliveries[0].ok and deliveries[0].retryable and not deliveries[0].unregistered
    assert (deliveries[0].error or "").startswith("UNAVAILABLE: ")
    # firebase-admin retries 500/503 four times on its own (0 + 1 + 2 + 4 s) before giving up.
    assert fake.send_attempts() == 5
    assert fake.messages() == []


async def test_quota_outage_fails_every_target_retryably_then_recovers(
    fake: FakeFCM, sender: FirebaseAlertSender, service_account: dict[str, str], log: list[str]
) -> None:
    tokens = [device_token(), device_token()]
    fake.outage(429)

    deliveries = await sender.send(sync_failure(), tokens=tokens, topic="ops")

    assert [(d.ok, d.retryable, (d.error or "").split(":")[0]) for d in deliveries] == [
        (False, True, "QUOTA_EXCEEDED")
    ] * 3
    assert fake.send_attempts() == 3  # 429 is not among firebase-admin's own retries
    assert_secret_free(repr(deliveries) + "\n".join(log), fake, service_account, tokens)

    fake.outage(None)
    assert all(d.ok for d in await sender.send(sync_failure(), tokens=tokens, topic="ops"))


async def test_token_endpoint_down_fails_every_target_retryably_without_raising(
    fake: FakeFCM, sender: FirebaseAlertSender, service_account: dict[str, str], log: list[str]
) -> None:
    tokens = [device_token(), device_token()]
    fake.stop()

    deliveries = await sender.send(sync_failure(), tokens=tokens, topic="ops")

    assert [(d.ok, d.retryable, d.unregistered) for d in deliveries] == [(False, True, False)] * 3
    assert all((d.error or "").startswith("OAUTH_FAILED: ") for d in deliveries)
    assert deliveries[0].target == f"token:{tokens[0][:8]}…"
    assert_secret_free(repr(deliveries) + "\n".join(log), fake, service_account, tokens)


async def test_a_bad_target_fails_alone(fake: FakeFCM, sender: FirebaseAlertSender) -> None:
    good = device_token()

    deliveries = await sender.send(sync_failure(), tokens=[good, ""], topic="no spaces allowed")

    assert [d.ok for d in deliveries] == [True, False, False]
    assert deliveries[1].error == "INVALID_ARGUMENT: empty device token"
    assert deliveries[2].error == "INVALID_ARGUMENT: malformed topic name"
    assert [m.message.get("token") for m in fake.messages()] == [good]


async def test_non_string_data_is_a_caller_bug(sender: FirebaseAlertSender) -> None:
    with pytest.raises(TypeError, match="days_left"):
        await sender.send({"type": "cert_expiry_reminder", "days_left": 30}, topic="ops")  # type: ignore[dict-item]


async def test_unconfigured_sender_fails_every_target_without_raising(log: list[str]) -> None:
    alerts = build_alert_sender(None, None)
    assert isinstance(alerts, UnconfiguredAlertSender)
    assert [line for line in log if line.startswith("WARNING")] == [
        line for line in log if "HLF_FCM_CREDENTIALS" in line
    ]
    assert len(log) == 1

    deliveries = await alerts.send(sync_failure(), tokens=[device_token()], topic="ops")

    assert [(d.ok, d.error, d.retryable) for d in deliveries] == [(False, NOT_CONFIGURED, False)] * 2
    assert len(log) == 1  # warned once, at construction
    await alerts.aclose()


async def test_build_alert_sender_reads_the_credentials(service_account: dict[str, str], tmp_path: Path) -> None:
    alerts = build_alert_sender(service_account["HLF_FCM_CREDENTIALS"], service_account["HLF_FCM_URL"])
    try:
        assert isinstance(alerts, FirebaseAlertSender)
        assert all(d.ok for d in await alerts.send(sync_failure(), topic="ops"))
    finally:
        await alerts.aclose()

    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=r"^HLF_FCM_CREDENTIALS: "):
        build_alert_sender(str(missing), None)
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"type": "authorized_user"}')
    with pytest.raises(ConfigError, match=r"^HLF_FCM_CREDENTIALS: "):
        build_alert_sender(str(garbage), None)


async def test_recording_sender_keeps_what_it_was_asked_and_scripts_failures() -> None:
    alerts = RecordingAlertSender()
    alive, dead = device_token(), device_token()
    alerts.unregister(dead)
    data = sync_failure()

    deliveries = await alerts.send(data, tokens=[alive, dead], topic="/topics/ops")
    alerts.outage()
    during_outage = await alerts.send(data, topic="ops")

    assert [(d.ok, d.unregistered) for d in deliveries] == [(True, False), (False, True), (True, False)]
    assert deliveries[2].target == "topic:ops"
    assert [(d.ok, d.retryable) for d in during_outage] == [(False, True)]
    assert alerts.data_messages() == [data, data]
    assert alerts.sent()[0].tokens == (alive, dead)
    await alerts.aclose()
    assert alerts.closed
