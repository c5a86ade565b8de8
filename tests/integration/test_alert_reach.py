"""Alerts that reach a person (issue 21): dead devices pruned, pushes that show, ops channels with a durable
outbox, no silent "alerts off", and ``check-alerts``.

Real parts only: the real firebase-admin against FakeFCM, the webhook against FakeWebhook, a real PostgreSQL,
and the real ``hlf-actors`` process where start-up is what is tested.
"""

from __future__ import annotations

import functools
import json
import secrets
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from hlf_actors import render, status
from hlf_actors.alerts import Alerting
from hlf_actors.cli import main
from hlf_actors.config import load_config
from hlf_actors.expiry import run_night
from hlf_actors.fcm import PRIVATE_ATTRIBUTES, FirebaseAlertSender, check_firebase_internals
from hlf_actors.ops_channels import build_ops_channels, teams_payload
from hlf_actors.push import UnconfiguredAlertSender
from hlf_actors.testing.fake_fcm import FakeFCM
from hlf_actors.testing.fake_portal import FakePortal
from hlf_actors.testing.fake_smtp import FakeSMTP
from hlf_actors.testing.fake_webhook import FakeWebhook
from hlf_actors.testing.harness import eventually, running_service
from hlf_actors.testing.process import LEADER_LINE, ServiceProcess, service_env
from hlf_actors.testing.seed import add_certification, add_mentor, add_organisation

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def webhook() -> Iterator[FakeWebhook]:
    with FakeWebhook() as fake:
        yield fake


@pytest.fixture
async def sender(fcm_env: dict[str, str]) -> AsyncIterator[FirebaseAlertSender]:
    alerts = FirebaseAlertSender(fcm_env["HLF_FCM_CREDENTIALS"], fcm_url=fcm_env["HLF_FCM_URL"], app_name="reach")
    yield alerts
    await alerts.aclose()


def token() -> str:
    return f"{secrets.token_urlsafe(16)}:APA91b{secrets.token_urlsafe(105)}"


def add_device(conn: psycopg.Connection[Any], org: UUID, fcm_token: str) -> UUID:
    row = conn.execute(
        "INSERT INTO coordinator_devices (organisation_id, fcm_token) VALUES (%s, %s) RETURNING id", (org, fcm_token)
    ).fetchone()
    assert row is not None
    return UUID(str(row[0]))


def targeted(fcm: FakeFCM, since: int = 0) -> set[str]:
    """The device tokens the fake accepted a message for (topics left out), after the first ``since``."""
    return {m.message["token"] for m in fcm.messages()[since:] if "token" in m.message}


def events(conn: psycopg.Connection[Any], kind: str) -> list[dict[str, Any]]:
    return [r[0] for r in conn.execute("SELECT data FROM event_log WHERE kind = %s ORDER BY seq", (kind,))]


# -- dead devices ------------------------------------------------------------------------------------------------


async def test_dead_devices_are_never_targeted_again_until_the_app_writes_a_new_token(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any], fcm: FakeFCM, sender: FirebaseAlertSender
) -> None:
    org = add_organisation(conn, "HLF Oslo")
    mentor, _ = add_mentor(conn, org, name="Kari Nordmann")
    a, b, c, d = token(), token(), token(), token()
    ids = {t: add_device(conn, org, t) for t in (a, b, c, d)}
    fcm.unregister(a)  # app uninstalled
    fcm.invalid(b)  # malformed token: INVALID_ARGUMENT about the token
    fcm.mismatch(d)  # a token of another Firebase project
    alerting = Alerting(pool, sender, ops_topic="ops", retry_delays_s=(0.01,))

    await alerting.sync_failure(mentor, "remove", dead_letter_id=1)
    assert targeted(fcm) == {c}
    dead = events(conn, "device_dead")
    assert {(e["device_id"], e["reason"]) for e in dead} == {
        (str(ids[a]), "UNREGISTERED"),
        (str(ids[b]), "INVALID_ARGUMENT"),
        (str(ids[d]), "SENDER_ID_MISMATCH"),
    }
    assert {e["organisation_id"] for e in dead} == {str(org)}
    attempts_after_first = fcm.send_attempts()

    before = len(fcm.messages())
    await alerting.sync_failure(mentor, "remove", dead_letter_id=2)
    assert targeted(fcm, before) == {c}
    assert fcm.send_attempts() - attempts_after_first == 1  # only C: the dead ones were not even tried
    assert len(events(conn, "device_dead")) == 3  # nothing new

    summary = status.summary(conn)
    assert [(o["organisation_id"], o["name"]) for o in summary.dead_devices] == [(str(org), "HLF Oslo")]
    assert set(summary.dead_devices[0]["devices"]) == {str(ids[a]), str(ids[b]), str(ids[d])}
    assert "dead coordinator devices  3" in render.render_summary(summary)

    # The app re-registers A: a new token on the same row makes it live again.
    a2 = token()
    conn.execute("UPDATE coordinator_devices SET fcm_token = %s WHERE id = %s", (a2, ids[a]))
    before = len(fcm.messages())
    await alerting.sync_failure(mentor, "remove", dead_letter_id=3)
    assert targeted(fcm, before) == {a2, c}
    assert {x for o in status.summary(conn).dead_devices for x in o["devices"]} == {str(ids[b]), str(ids[d])}


async def test_expiry_reminders_skip_dead_devices_and_show_a_notification(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any], fcm: FakeFCM, sender: FirebaseAlertSender
) -> None:
    night = date(2025, 3, 11)
    org = add_organisation(conn)
    mentor, _ = add_mentor(conn, org, name="Ola Hansen", cert_valid_days=None)
    add_certification(conn, mentor, night + timedelta(days=7))
    dead, live = token(), token()
    dead_id = add_device(conn, org, dead)
    add_device(conn, org, live)
    conn.execute(
        "INSERT INTO hlf_dead_devices (device_id, fcm_token, organisation_id, reason) VALUES (%s, %s, %s, 'X')",
        (dead_id, dead, org),
    )
    alerting = Alerting(pool, sender, ops_topic="ops", retry_delays_s=(0.01,))

    report = await run_night(pool, alerting, today=night, job_lock_owner="test")

    assert report.reminders_sent == 1
    assert targeted(fcm) == {live}
    (message,) = [m.message for m in fcm.messages()]
    assert message["data"] == {"type": "cert_expiry_reminder", "mentor_id": str(mentor), "days_left": "7"}
    assert message["notification"]["title"] == "Ola Hansen's certification expires in 7 days"
    assert message["android"] == {"priority": "high"}
    assert message["apns"]["headers"] == {"apns-priority": "10", "apns-push-type": "alert"}


# -- pushes that show ------------------------------------------------------------------------------------------


async def test_a_sync_failure_push_shows_on_android_and_ios_and_keeps_the_exact_data(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any], fcm: FakeFCM, sender: FirebaseAlertSender
) -> None:
    org = add_organisation(conn, alert_topic="oslo-coordinators")
    mentor, _ = add_mentor(conn, org, name="Kari Nordmann")
    phone = token()
    add_device(conn, org, phone)
    alerting = Alerting(pool, sender, ops_topic="ops", retry_delays_s=(0.01,))

    await alerting.sync_failure(mentor, "remove", dead_letter_id=7)

    by_target = {m.message.get("token") or m.message["topic"]: m.message for m in fcm.messages()}
    assert set(by_target) == {phone, "oslo-coordinators"}
    title = "Could not remove Kari Nordmann from the public listing"
    for message in by_target.values():
        assert message["data"] == {"type": "hlf_sync_failure", "mentor_id": str(mentor), "operation": "remove"}
        assert message["notification"]["title"] == title
        assert message["notification"]["body"]
        assert message["android"] == {"priority": "high"}
        assert message["apns"] == {
            "headers": {"apns-priority": "10", "apns-push-type": "alert"},
            "payload": {
                "aps": {"alert": {"title": title, "body": message["notification"]["body"]}, "sound": "default"}
            },
        }
    assert [e["target"] for e in events(conn, "alert_sent")] == [f"token:{phone[:8]}…", "topic:oslo-coordinators"]


@pytest.mark.parametrize("endpoint", ["token", "send", "token after a 401"])
async def test_neither_a_credential_refresh_nor_an_fcm_call_blocks_the_event_loop(
    fcm: FakeFCM, fcm_env: dict[str, str], endpoint: str
) -> None:
    """FCM holds the request (the token grant, the send, or the refresh google-auth makes after a 401) unanswered;
    the loop must go on meanwhile. Were the call made on the loop, the loop could only notice the request after the
    fake let go by itself (5 s)."""
    alerts = FirebaseAlertSender(fcm_env["HLF_FCM_CREDENTIALS"], fcm_url=fcm_env["HLF_FCM_URL"], app_name="held")
    if endpoint == "token after a 401":
        await alerts.send({"type": "warm-up"}, topic="warm-up")  # a valid-looking access token in hand
        fcm.revoke_access_tokens()
        endpoint, before = "token", fcm.token_requests()
    else:
        before = 0
    release = fcm.hold(endpoint)
    timer = threading.Timer(5.0, release.set)  # so that a blocking client fails the test instead of hanging it
    timer.start()
    seen_while_held: list[bool] = []
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(alerts.send, {"type": "hlf_alert_test"}, topic="hlf-ops"))
            arrived = fcm.token_requests if endpoint == "token" else fcm.send_attempts
            await eventually(lambda: arrived() > before, what=f"the {endpoint} request at the fake")
            seen_while_held.append(not release.is_set())
            release.set()
    finally:
        timer.cancel()
        await alerts.aclose()
    assert seen_while_held == [True]
    assert [m.data for m in fcm.messages() if m.data["type"] != "warm-up"] == [{"type": "hlf_alert_test"}]


def test_the_private_firebase_admin_parts_we_use_are_still_there() -> None:
    check_firebase_internals()  # raises, naming what is gone, after an upgrade that drops one
    assert PRIVATE_ATTRIBUTES


# -- ops channels and the outbox -----------------------------------------------------------------------------


def test_the_webhook_body_is_an_adaptive_card_message_with_text() -> None:
    body = teams_payload({"type": "hlf_credential_failure", "error": "AADSTS7000215: Invalid client secret"})
    assert body["type"] == "message"
    assert body["text"].startswith("HLF: the Dynamics credentials are refused")
    (attachment,) = body["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    assert card["type"] == "AdaptiveCard" and card["version"] == "1.4"
    assert {"title": "error", "value": "AADSTS7000215: Invalid client secret"} in card["body"][2]["facts"]


async def test_an_ops_alert_reaches_the_webhook_at_once_and_the_topic_once_fcm_is_back_across_a_restart(
    db_url: str,
    conn: psycopg.Connection[Any],
    pool: AsyncConnectionPool[Any],
    portal: FakePortal,
    fcm: FakeFCM,
    fcm_env: dict[str, str],
    webhook: FakeWebhook,
) -> None:
    env = {**fcm_env, **webhook.env(), "HLF_OPS_TOPIC": "hlf-ops"}
    config = load_config({"HLF_DATABASE_URL": db_url, **env}, dotenv=None)
    alert = {"type": "hlf_credential_failure", "error": "AADSTS7000215"}

    # The first process: FCM is down (not even listening) when the alert is raised.
    first = FirebaseAlertSender(fcm_env["HLF_FCM_CREDENTIALS"], fcm_url=fcm_env["HLF_FCM_URL"], app_name="first")
    await first.send({"type": "warm-up"}, topic="warm-up")  # an access token in hand, as a running service has
    fcm.stop()
    channels = build_ops_channels(config, first)
    assert [c.name for c in channels] == ["fcm", "webhook"]
    alerting = Alerting(pool, first, ops_topic="hlf-ops", ops_channels=channels, outbox_backoff_s=(0.05, 0.2))
    with anyio.fail_after(20):
        await alerting.ops(alert)
    assert [m["attachments"][0]["content"]["body"][2]["facts"][0]["value"] for m in webhook.received()] == [
        "hlf_credential_failure"
    ]  # at once
    failed = events(conn, "alert_failed")
    assert [(e["target"], e["will_retry"]) for e in failed] == [("topic:hlf-ops", True)]
    # It keeps trying while it runs; FCM stays down.
    async with anyio.create_task_group() as tg:

        async def leader() -> None:
            return None

        tg.start_soon(alerting.drain_outbox_forever, leader, 0.05)
        await eventually(lambda: len(events(conn, "alert_failed")) >= 3, what="retries during the outage")
        tg.cancel_scope.cancel()
    for channel in channels:
        await channel.aclose()
    await first.aclose()  # the first process is gone
    assert conn.execute(
        "SELECT channel, delivered_at IS NOT NULL, gave_up_at IS NULL FROM hlf_ops_outbox ORDER BY channel"
    ).fetchall() == [("fcm", False, True), ("webhook", True, True)]

    # FCM is back; a new process leads and drains what the first one left.
    fcm.start()
    second = FirebaseAlertSender(fcm_env["HLF_FCM_CREDENTIALS"], fcm_url=fcm_env["HLF_FCM_URL"], app_name="second")
    try:
        async with running_service(
            db_url, portal, sender=second, env=env, outbox_every_s=0.05, outbox_backoff_s=(0.05, 0.2)
        ):
            await eventually(
                lambda: any(m.message.get("topic") == "hlf-ops" for m in fcm.messages()), what="the ops topic"
            )
            await anyio.sleep(0.5)  # several more drain rounds: nothing may be sent twice
    finally:
        await second.aclose()
    topic_messages = [m.message for m in fcm.messages() if m.message.get("topic") == "hlf-ops"]
    assert [m["data"] for m in topic_messages] == [alert]
    assert topic_messages[0]["notification"]["title"] == "HLF: the Dynamics credentials are refused"
    assert len(webhook.received()) == 1
    assert conn.execute("SELECT count(*) FROM hlf_ops_outbox WHERE delivered_at IS NULL").fetchone() == (0,)
    assert [e["target"] for e in events(conn, "alert_sent")] == ["webhook", "topic:hlf-ops"]


async def test_an_outbox_row_older_than_a_day_is_given_up(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any], webhook: FakeWebhook, db_url: str
) -> None:
    config = load_config({"HLF_DATABASE_URL": db_url, **webhook.env()}, dotenv=None)
    channels = build_ops_channels(config, UnconfiguredAlertSender())
    alerting = Alerting(pool, UnconfiguredAlertSender(), ops_topic="ops", ops_channels=channels)
    webhook.fail(503)
    await alerting.ops({"type": "hlf_portal_outage", "failing_mentors": "12"})
    conn.execute("UPDATE hlf_ops_outbox SET created_at = now() - interval '25 hours', next_at = now()")
    webhook.fail(None)

    assert await alerting.drain_outbox() == 1

    assert webhook.received() == []  # too old to matter now: not sent
    assert conn.execute("SELECT gave_up_at IS NOT NULL, delivered_at FROM hlf_ops_outbox").fetchone() == (True, None)
    last = events(conn, "alert_failed")[-1]
    assert last["will_retry"] is False and "gave up" in last["error"]
    for channel in channels:
        await channel.aclose()


# -- no silent "off" ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_run_without_any_alert_channel_exits_2_with_one_line(db_url: str, portal: FakePortal, tmp_path: Path) -> None:
    env = {**service_env(db_url, portal.env()), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "hlf_actors", "run"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "HLF_ALERTS" in lines[0] and "HLF_OPS_WEBHOOK_URL" in lines[0]


def test_with_alerts_off_run_starts_and_status_and_healthz_say_so(
    db_url: str, portal: FakePortal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = _free_port()
    env = service_env(db_url, portal.env(), HLF_ALERTS="off", HLF_HTTP_PORT=str(port), HLF_HTTP_HOST="127.0.0.1")
    with ServiceProcess(env, tmp_path / "service.log") as service:
        service.wait_for_log(LEADER_LINE, timeout=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            health = json.loads(answer.read())
        assert health["alerts"] == "off"
        monkeypatch.setenv("HLF_DATABASE_URL", db_url)
        monkeypatch.setenv("HLF_ALERTS", "off")
        assert main(["status"]) == 0
        assert "alerts                    OFF (HLF_ALERTS=off)" in capsys.readouterr().out
        assert main(["status", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["alerts"] == "off"


# -- check-alerts ----------------------------------------------------------------------------------------------


def test_check_alerts_reports_every_channel_and_exits_1_when_one_fails(
    fcm: FakeFCM,
    fcm_env: dict[str, str],
    webhook: FakeWebhook,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in {**fcm_env, **webhook.env(), "HLF_OPS_TOPIC": "hlf-ops"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)

    assert main(["check-alerts"]) == 0
    out = capsys.readouterr().out
    assert "fcm      topic:hlf-ops: ok" in out and "webhook  webhook: ok" in out
    assert [m.data["type"] for m in fcm.messages()] == ["hlf_alert_test"]

    fcm.outage(403)  # PERMISSION_DENIED: the service account may not send
    assert main(["check-alerts"]) == 1
    out = capsys.readouterr().out
    assert "fcm      topic:hlf-ops: FAILED: PERMISSION_DENIED" in out
    assert "webhook  webhook: ok" in out
    assert "1 of 2 channel(s) delivered the test alert" in out
    assert webhook.path not in out and len(webhook.received()) == 2

    fcm.outage(None)
    webhook.fail(500)
    assert main(["check-alerts"]) == 1
    out = capsys.readouterr().out
    assert "fcm      topic:hlf-ops: ok" in out and "webhook  webhook: FAILED: HTTP 500" in out


def test_check_alerts_without_any_channel_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("HLF_FCM_CREDENTIALS", "GOOGLE_APPLICATION_CREDENTIALS", "HLF_OPS_WEBHOOK_URL", "HLF_OPS_EMAIL_TO"):
        monkeypatch.delenv(name, raising=False)
    assert main(["check-alerts"]) == 2
    assert "no alert channel configured" in capsys.readouterr().err


# -- e-mail ------------------------------------------------------------------------------------------------------


async def test_ops_alerts_go_by_email_too_and_a_failed_mail_waits_in_the_outbox(
    db_url: str, conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any]
) -> None:
    with FakeSMTP() as smtp:
        config = load_config(
            {"HLF_DATABASE_URL": db_url, **smtp.env("ops@hlf.example,oncall@hlf.example")}, dotenv=None
        )
        channels = build_ops_channels(config, UnconfiguredAlertSender())
        assert [c.name for c in channels] == ["email"]
        alerting = Alerting(
            pool, UnconfiguredAlertSender(), ops_topic="ops", ops_channels=channels, outbox_backoff_s=(0.01, 0.01)
        )
        smtp.fail(451)
        await alerting.ops({"type": "hlf_credential_failure", "error": "AADSTS7000215"})
        assert smtp.messages() == []
        assert [(e["target"], e["will_retry"]) for e in events(conn, "alert_failed")] == [("email:2 recipients", True)]
        assert "451" in events(conn, "alert_failed")[0]["error"]

        smtp.fail(None)
        await anyio.sleep(0.05)
        assert await alerting.drain_outbox() == 1
        ((sender, recipients, message),) = smtp.messages()
        assert sender == "<hlf-actors@hlf.example>"
        assert recipients == ["<ops@hlf.example>", "<oncall@hlf.example>"]
        assert message["Subject"] == "HLF: the Dynamics credentials are refused"
        assert "error: AADSTS7000215" in message.get_payload()
        assert [e["target"] for e in events(conn, "alert_sent")] == ["email:2 recipients"]
        assert await alerting.drain_outbox() == 0  # delivered: never again
