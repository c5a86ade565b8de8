"""Operable from day one: /healthz and /metrics, status --json, graceful stop, and no secret in any output."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest
from loguru import logger
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from hlf_actors.cli import main
from hlf_actors.logs import setup_logging
from hlf_actors.testing.fake_portal import FakePortal, Reply
from hlf_actors.testing.harness import eventually, running_service, sync_state
from hlf_actors.testing.http_server import free_port
from hlf_actors.testing.proxy import TcpProxy
from hlf_actors.testing.seed import add_mentor, add_organisation, set_status

pytestmark = pytest.mark.anyio


@pytest.fixture
def proxied_url(db_url: str) -> Iterator[tuple[str, TcpProxy]]:
    params = conninfo_to_dict(db_url)
    with TcpProxy(str(params["host"]), int(params.get("port") or 5432)) as proxy:
        params.update(host="127.0.0.1", port=str(proxy.port))
        yield make_conninfo(**params), proxy


async def test_healthz_flips_when_the_database_goes_away_and_back(
    proxied_url: tuple[str, TcpProxy], conn: psycopg.Connection[Any], portal: FakePortal
) -> None:
    url, proxy = proxied_url
    org = add_organisation(conn)
    mentor, record = add_mentor(conn, org, portal=portal)
    port = free_port()
    env = {"HLF_HTTP_PORT": str(port)}
    async with running_service(url, portal, env=env) as service, httpx.AsyncClient() as http:
        health = f"http://127.0.0.1:{port}/healthz"
        await eventually(lambda: sync_state(conn, mentor) == "in_sync")
        answer = await http.get(health)
        assert answer.status_code == 200 and answer.json()["role"] == "leader"
        proxy.refuse(True)
        assert proxy.sever() > 0
        await eventually(lambda: not service.state.listening, what="the listener to notice")
        answer = await http.get(health)
        assert answer.status_code == 503
        assert answer.json()["listening"] is False
        set_status(conn, mentor, "paused")  # committed while the service cannot see the database
        proxy.refuse(False)
        await eventually(lambda: service.state.listening and service.state.database_ok, timeout=15)
        assert (await http.get(health)).status_code == 200
        await eventually(lambda: portal.listed(record) is False, timeout=15, what="the catch-up after the outage")
        assert service.state.reconnects >= 1


async def test_metrics_count_a_sync_and_its_latency(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    mentor, _ = add_mentor(conn, org, portal=portal)
    port = free_port()
    async with running_service(db_url, portal, env={"HLF_HTTP_PORT": str(port)}), httpx.AsyncClient() as http:
        await eventually(lambda: sync_state(conn, mentor) == "in_sync")
        set_status(conn, mentor, "paused")
        await eventually(lambda: sync_state(conn, mentor) == "in_sync" and len(portal.patches()) == 2)
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        assert (await http.get(f"http://127.0.0.1:{port}/nope")).status_code == 404
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line[:1] != "#"}
    assert samples['hlf_patch_attempts_total{outcome="succeeded"}'] == 2.0
    assert samples["hlf_commit_to_portal_seconds_count"] == 2.0
    assert 0 < samples["hlf_commit_to_portal_seconds_sum"] < 5
    assert samples["hlf_changes_seen_total"] == 3.0  # mentor insert, certificate insert, pause
    assert samples["hlf_leader"] == 1.0
    assert samples["hlf_listener_reconnects_total"] == 0.0


async def test_status_json_has_the_operators_fields(
    db_url: str,
    conn: psycopg.Connection[Any],
    portal: FakePortal,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    org: UUID,
) -> None:
    mentor, _ = add_mentor(conn, org, portal=portal, name="Robert'); DROP TABLE mentors;--")
    monkeypatch.setenv("HLF_DATABASE_URL", db_url)
    assert main(["status", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["unprojected_events"] == 2  # nothing ran yet: both events wait in the inbox
    assert summary["states"] == {"pending": 0, "retrying": 0, "in_sync": 0, "dead_lettered": 0}
    assert summary["mentors_known"] == 1 and summary["open_dead_letters"] == 0
    async with running_service(db_url, portal):
        await eventually(lambda: sync_state(conn, mentor) == "in_sync")
    assert main(["status", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["states"]["in_sync"] == 1 and summary["unprojected_events"] == 0
    assert summary["last_success_at"] is not None and summary["circuit_open"] is False
    assert main(["status", str(mentor), "--json"]) == 0
    story = json.loads(capsys.readouterr().out)
    assert story["full_name"] == "Robert'); DROP TABLE mentors;--"
    assert [e["kind"] for e in story["events"]] == ["status_changed", "status_changed", "attempt_succeeded"]
    assert main(["status", "00000000-0000-0000-0000-000000000000"]) == 1


async def test_stop_lets_the_in_flight_patch_finish_and_leaves_the_rest_pending(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    first, first_rec = add_mentor(conn, org, portal=portal)
    second, second_rec = add_mentor(conn, org, portal=portal)
    env = {"HLF_PORTAL_CONCURRENCY": "1"}
    async with running_service(db_url, portal, env=env) as service:
        await eventually(lambda: sync_state(conn, first) == "in_sync" and sync_state(conn, second) == "in_sync")
        portal.script(first_rec, Reply(status=204, delay_s=1.0))
        portal.script(second_rec, Reply(status=204, delay_s=1.0))
        with conn.transaction():
            set_status(conn, first, "paused")
            set_status(conn, second, "paused")
        await eventually(lambda: len(portal.patches()) == 3, what="one PATCH in flight")
        service.request_stop()
    states = {sync_state(conn, first), sync_state(conn, second)}
    assert states == {"in_sync", "pending"}  # the in-flight one finished and was recorded; the other waits
    assert len(portal.patches()) == 3
    async with running_service(db_url, portal):
        await eventually(lambda: sync_state(conn, first) == "in_sync" and sync_state(conn, second) == "in_sync")
    assert portal.listed(first_rec) is False and portal.listed(second_rec) is False


async def test_no_secret_reaches_logs_events_or_status(
    db_url: str, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "S3CRET-hlf-do-not-leak-7f3a"
    with FakePortal(client_secret=secret) as portal:
        org = add_organisation(conn)
        mentor, record = add_mentor(conn, org, portal=portal)
        captured = io.StringIO()
        setup_logging(stream=captured, json=True, level="DEBUG", secrets=[secret])
        try:
            env = {"HLF_MAX_ATTEMPTS": "2", "HLF_INCIDENT_CHECK_EVERY": "100ms"}
            async with running_service(db_url, portal, env=env):
                await eventually(lambda: sync_state(conn, mentor) == "in_sync")
                portal.revoke_tokens()
                portal.rotate_secret("a-new-secret-the-service-does-not-know")  # 401s, then invalid_client
                set_status(conn, mentor, "paused")
                held = "SELECT last_error LIKE 'held: %%' FROM sync_status WHERE mentor_id = %s"
                await eventually(lambda: conn.execute(held, (mentor,)).fetchone() == (True,), what="the held sync")
                portal.rotate_secret(secret)  # the incident heals by itself
                await eventually(lambda: sync_state(conn, mentor) == "in_sync" and portal.listed(record) is False)
                # A portal that echoes our own secret back in an error body: it must not reach the log either.
                echo = b'{"error":{"message":"echo ' + secret.encode() + b'"}}'
                portal.always(Reply(status=400, body=echo), record_id=record)
                set_status(conn, mentor, "active")
                await eventually(
                    lambda: conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (1,),
                    timeout=15,
                    what="the dead letter, from the echoing portal",
                )
                assert portal.patches(record)[-1].status == 400
        finally:
            logger.remove()
            logger.add(lambda message: sys.stderr.write(message), level="INFO")  # whatever stderr is then
        monkeypatch.setenv("HLF_DATABASE_URL", db_url)
        monkeypatch.setenv("HLF_DYNAMICS_CLIENT_SECRET", secret)
        assert main(["status"]) == 0
        assert main(["status", str(mentor), "--json"]) == 0
        out = capsys.readouterr()
    log_text = captured.getvalue()
    assert "invalid_client" in log_text or "refused the credentials" in log_text  # the failure was logged...
    assert secret not in log_text  # ...without the secret
    assert secret not in out.out and secret not in out.err
    dump = conn.execute("SELECT string_agg(data::text, ' ') FROM event_log").fetchone()
    assert dump is not None and secret not in dump[0]
    letters = conn.execute("SELECT string_agg(last_error, ' ') FROM dead_letters").fetchone()
    assert letters is not None and letters[0] and secret not in letters[0]
