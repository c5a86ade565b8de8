"""`infinity`, `-infinity` and year-9999 certificates are data, not crashes (issue 19, item 2).

One `infinity` certificate used to stop the nightly expiry check for every mentor ("cannot subtract infinite
dates"). Here each odd date sits beside an ordinary mentor due for a reminder, and every command that reads
certifications runs over them: the expiry check, status, reconcile, replay, and the service's eligibility rule.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest

from hlf_actors.testing.fake_fcm import FakeFCM
from hlf_actors.testing.fake_portal import FakePortal
from hlf_actors.testing.harness import eventually, running_service
from hlf_actors.testing.seed import add_device, add_mentor, add_organisation

pytestmark = pytest.mark.anyio

DEVICE = "coordinator-phone-registration-token-0001"


@pytest.fixture
def fcm() -> Any:
    with FakeFCM() as fake:
        yield fake


def _mentor(conn: psycopg.Connection[Any], org: UUID, portal: FakePortal, *expires_on: str) -> tuple[UUID, UUID]:
    mentor_id, record = add_mentor(conn, org, portal=portal, cert_valid_days=None, listed=False)
    assert record is not None
    for text in expires_on:
        conn.execute("INSERT INTO certifications (mentor_id, expires_on) VALUES (%s, %s::date)", (mentor_id, text))
    return mentor_id, record


def _cli(db_url: str, workdir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HLF_", "GOOGLE_APPLICATION_CREDENTIALS"))}
    environment.update({"HLF_DATABASE_URL": db_url, **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "hlf_actors", *args],
        env=environment,
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


async def test_infinite_and_far_future_certificates_pass_through_every_command(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, fcm: FakeFCM, tmp_path: Path, org: UUID
) -> None:
    add_device(conn, org, DEVICE)
    today = date.today()
    forever, _ = _mentor(conn, org, portal, "infinity")
    far, _ = _mentor(conn, org, portal, "9999-12-31", "2001-01-01")
    never, never_record = _mentor(conn, org, portal, "-infinity")
    due, due_record = _mentor(conn, org, portal, (today + timedelta(days=7)).isoformat())

    # The expiry check of tomorrow night: the others' reminders go out, -infinity is expired, nothing crashes.
    fcm_env = fcm.env(tmp_path / "service-account.json")
    night = _cli(db_url, tmp_path, "check-expiry", "--date", (today + timedelta(days=1)).isoformat(), env=fcm_env)
    assert night.returncode == 0, night.stderr
    assert night.stdout.startswith(f"night of {today + timedelta(days=1)}: 1 reminder(s) sent (7 days: 1); 1 mentor(s)")
    assert fcm.data_messages() == [{"type": "cert_expiry_reminder", "mentor_id": str(due), "days_left": "6"}]
    status = dict(conn.execute("SELECT id, status FROM mentors").fetchall())
    assert status == {forever: "active", far: "active", never: "expired_cert", due: "active"}

    async with running_service(db_url, portal) as service:
        await eventually(lambda: service.state.leader, what="leadership")
        # Eligibility: infinity and 9999-12-31 are valid forever; -infinity never was.
        states = "SELECT count(*) FROM sync_status WHERE state = 'in_sync'"
        await eventually(lambda: conn.execute(states).fetchone() == (4,), timeout=15, what="four mentors in sync")
        listed = dict(conn.execute("SELECT mentor_id, listed FROM sync_status").fetchall())
        assert listed == {forever: True, far: True, never: False, due: True}
    assert portal.listed(never_record) is False and portal.listed(due_record) is True

    summary = _cli(db_url, tmp_path, "status", "--json")
    assert summary.returncode == 0, summary.stderr
    assert json.loads(summary.stdout)["mentors_known"] == 4
    for mentor_id in (forever, far, never):
        story = _cli(db_url, tmp_path, "status", str(mentor_id))
        assert story.returncode == 0, story.stderr
    assert "infinity" in _cli(db_url, tmp_path, "status", str(forever)).stdout

    reconciled = _cli(db_url, tmp_path, "reconcile", "--wait", "0", env=portal.env())
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr

    verify = _cli(db_url, tmp_path, "replay", "--verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr


async def test_a_mentor_whose_reminder_cannot_be_claimed_is_skipped_recorded_and_alerted_once(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, fcm: FakeFCM, tmp_path: Path
) -> None:
    org, other_org = add_organisation(conn, "Broken row"), add_organisation(conn, "Fine")
    add_device(conn, org, DEVICE)
    add_device(conn, other_org, DEVICE + "-other")
    today = date.today()
    broken, _ = _mentor(conn, org, portal, (today + timedelta(days=7)).isoformat())
    neighbour, _ = _mentor(conn, org, portal, (today + timedelta(days=14)).isoformat())
    elsewhere, _ = _mentor(conn, other_org, portal, (today + timedelta(days=30)).isoformat())
    # A row the database refuses, as some future constraint or a hand-edited row might: the claim of the whole
    # night fails on it, as the infinity certificate's did.
    conn.execute(
        f"""CREATE FUNCTION refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.mentor_id = '{broken}' THEN RAISE EXCEPTION 'a row this night cannot hold'; END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_one BEFORE INSERT ON cert_expiry_reminders
                FOR EACH ROW EXECUTE FUNCTION refuse_one();"""
    )

    fcm_env = fcm.env(tmp_path / "service-account.json")
    night = _cli(db_url, tmp_path, "check-expiry", "--date", today.isoformat(), env={**fcm_env, "HLF_OPS_TOPIC": "ops"})

    assert night.returncode == 0, night.stderr
    assert "2 reminder(s) sent" in night.stdout
    assert f"SKIPPED 1: mentor {broken} of organisation {org}: a row this night cannot hold" in night.stdout
    reminded = sorted(m["mentor_id"] for m in fcm.data_messages() if m["type"] == "cert_expiry_reminder")
    assert reminded == sorted([str(neighbour), str(elsewhere)])
    assert [m for m in fcm.data_messages() if m["type"] == "hlf_expiry_check_incomplete"] == [
        {"type": "hlf_expiry_check_incomplete", "night": today.isoformat(), "skipped": "1"}
    ]
    (detail,) = conn.execute("SELECT detail FROM hlf_job_runs WHERE job = 'cert_expiry'").fetchone() or ()
    assert detail["skipped"] == [f"mentor {broken} of organisation {org}: a row this night cannot hold"]
