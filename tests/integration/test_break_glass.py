"""Break-glass: new credentials, the service down, every mentor put right straight to the portal — and recorded."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import psycopg
import pytest

from hlf_actors.break_glass import main
from hlf_actors.testing.fake_portal import FakePortal
from hlf_actors.testing.harness import eventually, running_service, sync_state
from hlf_actors.testing.seed import add_mentor, set_status

pytestmark = pytest.mark.anyio

NEW_SECRET = "brand-new-secret-7c1d-do-not-leak"


def linked(conn: psycopg.Connection[Any], org: UUID, portal: FakePortal, **kwargs: Any) -> tuple[UUID, UUID]:
    """A mentor with a portal record."""
    mentor, record = add_mentor(conn, org, portal=portal, **kwargs)
    assert record is not None
    return mentor, record


def event_count(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM event_log").fetchone()
    assert row is not None
    return int(row[0])


async def break_glass(argv: list[str], env: dict[str, str], **kwargs: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await anyio.to_thread.run_sync(lambda: main(argv, env=env, out=out, err=err, **kwargs))
    return code, out.getvalue(), err.getvalue()


async def test_break_glass_with_new_credentials_repairs_every_mentor_and_keeps_projections_true(
    db_url: str,
    conn: psycopg.Connection[Any],
    portal: FakePortal,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    org: UUID,
) -> None:
    active = [linked(conn, org, portal) for _ in range(4)]
    paused = [linked(conn, org, portal, status="paused", listed=False) for _ in range(2)]
    unlinked, _ = add_mentor(conn, org, status="paused", record=False)
    async with running_service(db_url, portal):
        await eventually(lambda: all(sync_state(conn, m) == "in_sync" for m, _ in active + paused + [(unlinked, None)]))
    # The service is down. Changes pile up in the inbox, the portal drifts, and the old secret is revoked.
    set_status(conn, active[0][0], "paused")
    set_status(conn, paused[0][0], "active")
    portal.add_record(active[1][1], listed=False)
    service_env = {"HLF_DATABASE_URL": db_url, **portal.env(), "HLF_BACKOFF_BASE_MS": "10"}
    portal.rotate_secret(NEW_SECRET)
    portal.revoke_tokens()
    portal.clear_requests()
    expected = {active[0][1]: False, paused[0][1]: True, active[1][1]: True, active[2][1]: True}
    expected |= {active[3][1]: True, paused[1][1]: False}

    before = event_count(conn)
    code, out, err = await break_glass(["--all", "--dry-run"], service_env)
    assert code == 0, err
    assert portal.requests() == [] and event_count(conn) == before  # sends nothing, records nothing
    assert "would send 6 PATCH(es): 4 restore, 2 remove; 1 mentor(s) without a portal record" in out
    assert f"{active[0][0]!s:36}  {active[0][1]!s:36}  remove" in out

    secret_file = tmp_path / "new-secret"
    secret_file.write_text(NEW_SECRET + "\n")
    code, out, err = await break_glass(["--all", "--client-secret-file", str(secret_file)], service_env)
    assert code == 0, err
    assert all(portal.listed(record) is listed for record, listed in expected.items())
    assert sorted(str(p.record_id) for p in portal.patches()) == sorted(str(r) for r in expected)
    assert all(p.status == 204 for p in portal.patches())
    assert err.splitlines()[-1].startswith("[" + "#" * 30 + "] 7/7")  # the unlinked mentor counts as done too
    assert "succeeded                      6" in out and "failed                         0" in out
    assert "no portal record               1" in out
    kinds = conn.execute(
        "SELECT kind, count(*) FROM event_log WHERE seq > %s AND mentor_id IS NOT NULL GROUP BY kind ORDER BY kind",
        (before,),
    ).fetchall()
    assert kinds == [("attempt_succeeded", 6), ("sync_requested", 6)]
    reasons = conn.execute(
        "SELECT DISTINCT data ->> 'reason' FROM event_log WHERE seq > %s AND kind = 'sync_requested'", (before,)
    ).fetchall()
    assert reasons == [("break_glass",)]
    assert all(sync_state(conn, _owner(conn, record)) == "in_sync" for record in expected)

    # The service comes back with the new secret: the projections were true, so it has nothing to send.
    portal.clear_requests()
    async with running_service(db_url, portal):
        await eventually(lambda: conn.execute("SELECT count(*) FROM hlf_inbox").fetchone() == (0,))
        await anyio.sleep(0.3)
    assert portal.patches() == []
    rows = conn.execute("SELECT mentor_id, state, listed FROM sync_status").fetchall()
    assert {m: (s, listed) for m, s, listed in rows if m != unlinked} == {
        _owner(conn, r): ("in_sync", listed) for r, listed in expected.items()
    }

    captured = capsys.readouterr()
    dump = conn.execute("SELECT string_agg(data::text, ' ') FROM event_log").fetchone()
    assert dump is not None
    for text in (out, err, captured.out, captured.err, dump[0]):
        assert NEW_SECRET not in text


def _owner(conn: psycopg.Connection[Any], record: UUID) -> UUID:
    row = conn.execute("SELECT id FROM mentors WHERE portal_record_id = %s", (record,)).fetchone()
    assert row is not None
    return UUID(str(row[0]))


async def test_break_glass_prompts_for_the_secret_and_reports_what_failed(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    fine, fine_record = linked(conn, org, portal, listed=False)
    gone, gone_record = linked(conn, org, portal)
    portal.remove_record(gone_record)  # someone deleted it in the portal
    env = {"HLF_DATABASE_URL": db_url, **portal.env(), "HLF_DYNAMICS_CLIENT_SECRET": "the-old-one"}
    portal.rotate_secret(NEW_SECRET)
    prompts: list[str] = []

    def prompt(text: str) -> str:
        prompts.append(text)
        return NEW_SECRET

    code, out, err = await break_glass([str(fine), str(gone)], env, prompt=prompt)
    assert code == 1
    assert prompts == [f"new client secret for {portal.client_id} (not echoed): "]
    assert portal.listed(fine_record) is True and sync_state(conn, fine) == "in_sync"
    assert sync_state(conn, gone) == "dead_lettered"
    assert "failed                         1" in out and f"FAILED {gone}  restore" in out and "404" in out
    assert NEW_SECRET not in out + err

    def wrong(_: str) -> str:
        return "not-the-new-secret-either"

    before = event_count(conn)
    code, out, err = await break_glass([str(fine)], env, prompt=wrong)
    assert code == 1 and "the new credentials do not work" in err and "invalid_client" in err
    assert event_count(conn) == before  # nothing recorded, nothing sent
    code, _, err = await break_glass(["00000000-0000-0000-0000-000000000000"], env, prompt=prompt)
    assert code == 2 and "no such mentor" in err
