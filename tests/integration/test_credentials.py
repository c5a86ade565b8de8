"""Credential health checks: one ops alert per incident however many checks see it, and one all-clear after."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import anyio
import psycopg
import pytest

from hlf_actors import status
from hlf_actors.cli import main
from hlf_actors.fcm import FirebaseAlertSender
from hlf_actors.testing.fake_fcm import FakeFCM
from hlf_actors.testing.fake_portal import FakePortal
from hlf_actors.testing.harness import eventually, running_service
from hlf_actors.testing.seed import add_mentor, set_status

pytestmark = pytest.mark.anyio


def checks(conn: psycopg.Connection[Any], after: int = 0) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT data FROM event_log WHERE kind = 'credential_check' AND seq > %s ORDER BY seq", (after,)
    ).fetchall()
    return [r[0] for r in rows]


def high_water(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT coalesce(max(seq), 0) FROM event_log").fetchone()
    assert row is not None
    return int(row[0])


async def test_a_revoked_secret_alerts_ops_once_across_scheduler_runs_and_once_when_restored(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, fcm: FakeFCM, sender: FirebaseAlertSender
) -> None:
    original = portal.client_secret
    env = {"HLF_RECONCILE_EVERY": "150ms", "HLF_OPS_TOPIC": "ops"}
    async with running_service(db_url, portal, sender=sender, env=env):
        await eventually(lambda: len(checks(conn)) >= 2, what="the start-up and a scheduled check")
        assert {c["ok"] for c in checks(conn)} == {True}
        assert fcm.messages() == []

        portal.rotate_secret("a-secret-issued-after-the-old-one-was-revoked")
        mark = high_water(conn)
        await eventually(lambda: sum(c["ok"] is False for c in checks(conn, mark)) >= 3, what="three failed checks")
        await eventually(lambda: len(fcm.messages()) >= 1, what="the ops alert")
        with psycopg.connect(db_url, autocommit=True) as sync_conn:
            summary = status.summary(sync_conn)
        assert summary.credentials.startswith("FAILED since ") and "invalid_client" in summary.credentials

        portal.rotate_secret(original)
        mark = high_water(conn)
        await eventually(lambda: sum(c["ok"] is True for c in checks(conn, mark)) >= 3, what="three good checks")
        await eventually(lambda: len(fcm.messages()) >= 2, what="the all-clear")
    messages = fcm.messages()
    assert [m.data["type"] for m in messages] == ["hlf_credential_failure", "hlf_credential_restored"]
    assert all(m.message["topic"] == "ops" for m in messages)
    assert "invalid_client" in messages[0].data["error"]
    assert all(isinstance(v, str) for m in messages for v in m.data.values())
    transitions = [c["transition"] for c in checks(conn) if c["transition"]]
    assert transitions == ["failed", "restored"]
    assert sum(c["ok"] is False for c in checks(conn)) >= 3  # failing checks kept running: one alert for all
    reconciled = conn.execute("SELECT count(*) FROM event_log WHERE kind = 'reconcile_finished'").fetchone()
    assert reconciled is not None and reconciled[0] >= 2  # the good periods reconciled too
    with psycopg.connect(db_url, autocommit=True) as sync_conn:
        assert status.summary(sync_conn).credentials == "ok"


async def test_a_credential_error_during_a_patch_alerts_at_once_not_at_the_next_period(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, fcm: FakeFCM, sender: FirebaseAlertSender, org: UUID
) -> None:
    mentor, _ = add_mentor(conn, org, portal=portal)
    async with running_service(db_url, portal, sender=sender, env={"HLF_OPS_TOPIC": "ops"}):  # period: 15 min
        await eventually(lambda: len(checks(conn)) == 1, what="the start-up check")
        await eventually(
            lambda: (
                conn.execute("SELECT state FROM sync_status WHERE mentor_id = %s", (mentor,)).fetchone() == ("in_sync",)
            )
        )
        portal.revoke_tokens()
        portal.rotate_secret("nobody-told-the-service")
        set_status(conn, mentor, "paused")
        await eventually(lambda: len(fcm.messages()) == 1, timeout=5, what="the credential alert")
        await anyio.sleep(0.3)
        # Held, not spent: the mentor waits for the incident to heal (tests/integration/test_incidents.py).
        row = conn.execute("SELECT state, attempts FROM sync_status WHERE mentor_id = %s", (mentor,)).fetchone()
        assert row == ("retrying", 0)
    assert [m.data["type"] for m in fcm.messages()] == ["hlf_credential_failure"]
    opened = [c for c in checks(conn) if c["transition"] == "failed"]
    assert len(opened) == 1 and opened[0]["trigger"] == "sync answer" and opened[0]["cause"] == "credentials"


async def test_check_credentials_command_prints_the_verdict_and_exits_accordingly(
    db_url: str,
    conn: psycopg.Connection[Any],
    portal: FakePortal,
    cli_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert await anyio.to_thread.run_sync(main, ["check-credentials"]) == 0
    assert capsys.readouterr().out.startswith("credentials OK (token, WhoAmI, read and write access in ")
    assert [r.path for r in portal.requests()][:3] == [
        f"/{portal.tenant}/oauth2/v2.0/token",
        "/api/data/v9.2/WhoAmI",
        f"/api/data/v9.2/{portal.entity_set}",
    ]

    portal.rotate_secret("rotated-by-someone-else")
    assert await anyio.to_thread.run_sync(main, ["check-credentials"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("credentials FAILED (credentials): token endpoint refused the credentials (401)")
    assert "invalid_client" in out and "ops alerted" in out
    assert await anyio.to_thread.run_sync(main, ["check-credentials"]) == 1
    assert "incident already open" in capsys.readouterr().out
    assert [(c["ok"], c["transition"]) for c in checks(conn)] == [(True, None), (False, "failed"), (False, None)]
    alerts = conn.execute("SELECT data ->> 'alert' FROM event_log WHERE kind LIKE 'alert_%'").fetchall()
    assert alerts == [("hlf_credential_failure",)]  # recorded once (as failed: this shell has no FCM configured)
