"""The operations console: who gets in (and who does not), and what its buttons do, over real HTTP.

The service runs in-process (the harness) with the console on; sign-in goes through a fake Entra ID (a real HTTP
server issuing RS256-signed ID tokens) or the shared-password file. Refusals are checked with httpx; the browser
test (tests/integration/test_console_browser.py) drives Debian's chromium through the same pages.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import httpx
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from hlf_actors.dynamics import DynamicsClient
from hlf_actors.service import Service
from hlf_actors.testing import harness
from hlf_actors.testing.fake_oidc import FakeOidc
from hlf_actors.testing.fake_portal import FakePortal, Reply
from hlf_actors.testing.harness import eventually, running_service, sync_state
from hlf_actors.testing.http_server import free_port
from hlf_actors.testing.proxy import TcpProxy
from hlf_actors.testing.recording import RecordingAlertSender
from hlf_actors.testing.seed import add_mentor, add_organisation

pytestmark = pytest.mark.anyio

GROUP = "6a1d3c52-93f0-4c57-9e2e-hlf-console-ops"


@pytest.fixture
def oidc() -> Iterator[FakeOidc]:
    with FakeOidc() as fake:
        yield fake


def entra_console(oidc: FakeOidc, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """A console on a free port with sign-in through ``oidc``: its base URL and the service's environment."""
    secret = tmp_path / "console-client-secret"
    secret.write_text(oidc.client_secret + "\n")
    port = free_port()
    return f"http://127.0.0.1:{port}", {"HLF_HTTP_PORT": str(port), **oidc.env(str(secret), GROUP)}


def password_console(tmp_path: Path, password_file_text: str, **env: str) -> tuple[str, dict[str, str]]:
    """A console on a free port behind the shared password (the file holds ``password_file_text``): its base URL and
    the service's environment, plus ``env``."""
    secret = tmp_path / "console-password"
    secret.write_text(password_file_text)
    port = free_port()
    return f"http://127.0.0.1:{port}", {"HLF_HTTP_PORT": str(port), "HLF_CONSOLE_PASSWORD_FILE": str(secret), **env}


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "the page has no CSRF field"
    return match.group(1)


async def sign_in_with_entra(http: httpx.AsyncClient, base: str) -> httpx.Response:
    """The browser's dance, by hand: console → fake Entra ID → callback → console."""
    return await http.get(f"{base}/login/entra", follow_redirects=True)


async def sign_in_with_password(http: httpx.AsyncClient, base: str, password: str) -> httpx.Response:
    """The sign-in form, as a browser fills it: fetch it for its CSRF token, then post the password."""
    token = csrf_of((await http.get(f"{base}/login")).text)
    return await http.post(f"{base}/login", data={"password": password, "csrf": token})


async def test_unauthenticated_gets_go_to_sign_in_and_posts_are_refused(
    db_url: str, portal: FakePortal, oidc: FakeOidc, tmp_path: Path
) -> None:
    base, env = entra_console(oidc, tmp_path)
    async with running_service(db_url, portal, env=env), httpx.AsyncClient() as http:
        for path in (
            "/",
            "/mentors",
            "/mentors/00000000-0000-4000-8000-000000000000",
            "/dead-letters",
            "/alerts",
            "/expiry",
            "/actions",
        ):
            answer = await http.get(base + path)
            assert answer.status_code == 303 and answer.headers["location"] == "/login", path
        answer = await http.post(f"{base}/actions/force-sync", data={"mentor_id": "x"})
        assert answer.status_code == 403
        login = await http.get(f"{base}/login")
        assert login.status_code == 200 and 'href="/login/entra"' in login.text
        assert 'name="password"' not in login.text  # no password file: no password form
        csp = login.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "script-src" not in csp
        assert login.headers["x-frame-options"] == "DENY"
        # Health and metrics stay open to the load balancer and Prometheus.
        assert (await http.get(f"{base}/healthz")).status_code == 200
        assert (await http.get(f"{base}/metrics")).status_code == 200


async def test_entra_sign_in_admits_the_group_and_every_post_needs_the_csrf_token(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, oidc: FakeOidc, tmp_path: Path, org: UUID
) -> None:
    mentor, record = add_mentor(conn, org, portal=portal, name="Kari Nordmann")
    base, env = entra_console(oidc, tmp_path)
    oidc.user["groups"] = ["some-other-group", GROUP]
    async with running_service(db_url, portal, env=env), httpx.AsyncClient() as http:
        await eventually(lambda: sync_state(conn, mentor) == "in_sync")
        overview = await sign_in_with_entra(http, base)
        assert overview.status_code == 200 and str(overview.url) == f"{base}/", overview.text[:300]
        assert "ops@hlf.example" in overview.text and 'id="role">leader<' in overview.text
        # The chart's current hour counts the mentor's first sync (SQL's hours and the page's slots agree).
        assert re.search(r"<title>\d\d:00: 1 synced, 0 failed</title>", overview.text), overview.text
        cookie = next(h for k, h in overview.history[-1].headers.multi_items() if k == "set-cookie")
        assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower()
        assert "secure" not in cookie.lower()  # loopback HTTP: a Secure cookie would never come back
        assert oidc.requests[:1] == [("GET", oidc.issuer.removeprefix(oidc.base) + "/.well-known/openid-configuration")]

        before = len(portal.patches(record))
        refused = await http.post(f"{base}/actions/force-sync", data={"mentor_id": str(mentor)})
        assert refused.status_code == 403
        refused = await http.post(f"{base}/actions/force-sync", data={"mentor_id": str(mentor), "csrf": "forged"})
        assert refused.status_code == 403
        page = await http.get(f"{base}/mentors/{mentor}")
        assert "Kari Nordmann" in page.text and "status_changed" in page.text
        done = await http.post(
            f"{base}/actions/force-sync", data={"mentor_id": str(mentor), "csrf": csrf_of(page.text)}
        )
        assert done.status_code == 303
        await eventually(lambda: len(portal.patches(record)) == before + 1, what="the forced PATCH")
        row = conn.execute(
            "SELECT mentor_id, data FROM event_log WHERE kind = 'console_action' ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        assert row is not None and row[0] is None
        assert row[1]["actor"] == "ops@hlf.example" and row[1]["action"] == "force_sync"
        assert row[1]["target"] == f"mentor:{mentor}"
        # Nothing secret on any page.
        for path in ("/", "/actions", f"/mentors/{mentor}", "/alerts", "/expiry", "/dead-letters"):
            text = (await http.get(base + path)).text
            assert oidc.client_secret not in text and portal.client_secret not in text, path


async def test_a_signed_in_user_outside_the_allowed_group_is_refused(
    db_url: str, portal: FakePortal, oidc: FakeOidc, tmp_path: Path
) -> None:
    base, env = entra_console(oidc, tmp_path)
    oidc.user.update(preferred_username="visitor@hlf.example", groups=["everyone"], roles=["Reader"])
    async with running_service(db_url, portal, env=env), httpx.AsyncClient() as http:
        answer = await sign_in_with_entra(http, base)
        assert answer.status_code == 403
        assert "visitor@hlf.example may not use this console" in answer.text
        after = await http.get(f"{base}/")
        assert after.status_code == 303 and after.headers["location"] == "/login"  # no session was given


async def test_an_app_role_admits_too(db_url: str, portal: FakePortal, oidc: FakeOidc, tmp_path: Path) -> None:
    base, env = entra_console(oidc, tmp_path)
    oidc.user.update(groups=[], roles=[GROUP])
    async with running_service(db_url, portal, env=env), httpx.AsyncClient() as http:
        answer = await sign_in_with_entra(http, base)
        assert answer.status_code == 200 and "<h1>Overview</h1>" in answer.text


async def test_a_replayed_or_forged_callback_is_refused(
    db_url: str, portal: FakePortal, oidc: FakeOidc, tmp_path: Path
) -> None:
    base, env = entra_console(oidc, tmp_path)
    oidc.user["groups"] = [GROUP]
    async with running_service(db_url, portal, env=env), httpx.AsyncClient() as http:
        # A callback whose state this browser never sent (CSRF on the sign-in itself).
        forged = await http.get(f"{base}/auth/callback?code=abc&state=not-ours")
        assert forged.status_code == 403
        assert (await http.get(f"{base}/")).status_code == 303
        # A code used twice: the fake refuses it (AADSTS70008), and so does the console.
        start = await http.get(f"{base}/login/entra")
        at_idp = await http.get(start.headers["location"])
        callback = at_idp.headers["location"]
        assert (await http.get(callback)).status_code == 303
        async with httpx.AsyncClient() as other:
            replay = await other.get(callback)
        assert replay.status_code == 403


@pytest.mark.parametrize("tamper", ["signature", "nonce", "audience", "issuer", "expired"])
async def test_an_id_token_that_does_not_check_out_is_refused(
    db_url: str, portal: FakePortal, oidc: FakeOidc, tmp_path: Path, tamper: str
) -> None:
    base, env = entra_console(oidc, tmp_path)
    oidc.user["groups"] = [GROUP]
    oidc.tamper = tamper
    async with running_service(db_url, portal, env=env), httpx.AsyncClient() as http:
        answer = await sign_in_with_entra(http, base)
        assert answer.status_code == 403, tamper
        assert (await http.get(f"{base}/")).status_code == 303
        oidc.tamper = None
        assert (await sign_in_with_entra(http, base)).status_code == 200  # the same flow, untampered, gets in


async def test_password_sign_in_is_rate_limited(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, tmp_path: Path
) -> None:
    password = "correct horse battery staple"
    base, env = password_console(tmp_path, password + "\n")
    async with running_service(db_url, portal, env=env), httpx.AsyncClient() as http:
        login = await http.get(f"{base}/login")
        assert 'name="password"' in login.text and "/login/entra" not in login.text
        token = csrf_of(login.text)
        assert (await http.post(f"{base}/login", data={"password": password})).status_code == 403  # no CSRF token
        for _ in range(5):
            wrong = await http.post(f"{base}/login", data={"password": "guess", "csrf": token})
            assert wrong.status_code == 401
        limited = await http.post(f"{base}/login", data={"password": password, "csrf": token})
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert (await http.get(f"{base}/")).status_code == 303  # even the right password waits
        assert password not in limited.text

    # A fresh process (the limiter is per process), the right password: in.
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env["HLF_HTTP_PORT"] = str(port)
    async with running_service(db_url, portal, env=env), httpx.AsyncClient() as http:
        signed_in = await sign_in_with_password(http, base, password)
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/"
        overview = await http.get(f"{base}/")
        assert overview.status_code == 200 and "<h1>Overview</h1>" in overview.text
        out = await http.post(f"{base}/logout", data={"csrf": csrf_of(overview.text)})
        assert out.status_code == 303
        assert (await http.get(f"{base}/")).status_code == 303


async def test_requeue_all_from_the_console(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, tmp_path: Path
) -> None:
    org = add_organisation(conn)
    stuck = [add_mentor(conn, org, portal=portal, name=f"Stuck {i}") for i in range(2)]
    for _, record in stuck:
        portal.always(Reply(status=403), record_id=record)
    base, env = password_console(tmp_path, "pw-for-the-test", HLF_MAX_ATTEMPTS="1")
    async with running_service(db_url, portal, env=env), httpx.AsyncClient() as http:
        await eventually(lambda: all(sync_state(conn, m) == "dead_lettered" for m, _ in stuck))
        await sign_in_with_password(http, base, "pw-for-the-test")
        page = await http.get(f"{base}/dead-letters")
        assert "Stuck 0" in page.text and "Stuck 1" in page.text and "403" in page.text
        for _, record in stuck:
            portal.always(None, record_id=record)
        answer = await http.post(f"{base}/actions/requeue-all", data={"csrf": csrf_of(page.text)})
        assert answer.status_code == 303
        await eventually(lambda: all(sync_state(conn, m) == "in_sync" for m, _ in stuck))
        page = await http.get(f"{base}/dead-letters")
        assert "No open dead letters" in page.text and "Re-queued 2 dead letter(s)" in page.text
    row = conn.execute("SELECT data FROM event_log WHERE kind = 'console_action'").fetchone()
    assert row is not None and row[0]["actor"] == "password" and row[0]["action"] == "requeue_all"


async def test_the_console_is_off_without_sign_in(db_url: str, portal: FakePortal) -> None:
    port = free_port()
    async with running_service(db_url, portal, env={"HLF_HTTP_PORT": str(port)}), httpx.AsyncClient() as http:
        assert (await http.get(f"http://127.0.0.1:{port}/")).status_code == 404
        assert (await http.get(f"http://127.0.0.1:{port}/login")).status_code == 404
        assert (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200


async def test_a_standby_console_says_so_and_its_actions_reach_the_portal_through_the_leader(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, tmp_path: Path
) -> None:
    org = add_organisation(conn)
    mentor, record = add_mentor(conn, org, portal=portal, name="Solveig Standby")
    orphan_fixed, orphan_record = add_mentor(conn, org, portal=portal, name="Drifted Dag")
    base, standby_env = password_console(tmp_path, "standby-pw")
    async with running_service(db_url, portal):
        await eventually(lambda: sync_state(conn, mentor) == "in_sync" and sync_state(conn, orphan_fixed) == "in_sync")
        config = harness.test_config(db_url, portal, **standby_env)
        client = DynamicsClient(config)
        standby = Service(config, portal=client, alert_sender=RecordingAlertSender(), standby_poll_s=0.05)
        try:
            async with anyio.create_task_group() as tg, httpx.AsyncClient() as http:
                await tg.start(standby.run)
                await eventually(lambda: standby.health().role == "standby", what="the second process to stand by")
                await sign_in_with_password(http, base, "standby-pw")
                overview = await http.get(f"{base}/")
                assert 'id="role">standby<' in overview.text and 'id="standby"' in overview.text

                before = len(portal.patches(record))
                page = await http.get(f"{base}/mentors/{mentor}")
                await http.post(
                    f"{base}/actions/force-sync", data={"mentor_id": str(mentor), "csrf": csrf_of(page.text)}
                )
                await eventually(
                    lambda: len(portal.patches(record)) > before, what="the leader to send the forced PATCH"
                )

                # Reconcile now, from the standby: the portal drifted; the leader fixes what reconcile queued.
                portal.add_record(orphan_record, listed=False)
                actions = await http.get(f"{base}/actions")
                done = await http.post(
                    f"{base}/actions/reconcile", data={"csrf": csrf_of(actions.text)}, follow_redirects=True
                )
                assert "1 sync request(s) queued" in done.text, done.text[-2000:]
                await eventually(lambda: portal.listed(orphan_record) is True, what="the drift fixed by the leader")
                checked = await http.post(
                    f"{base}/actions/check-credentials", data={"csrf": csrf_of(done.text)}, follow_redirects=True
                )
                assert "Credentials OK" in checked.text
                assert "reconcile" in checked.text and "check credentials" in checked.text  # the audit log
                standby.request_stop()
        finally:
            await client.aclose()
    rows = conn.execute("SELECT data ->> 'action' FROM event_log WHERE kind = 'console_action' ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == ["force_sync", "reconcile", "check_credentials"]
    trigger = conn.execute(
        "SELECT data ->> 'trigger' FROM event_log WHERE kind = 'credential_check' ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    assert trigger == ("console",)


async def test_mentor_search_by_name_or_id_and_state_and_an_https_console_url_makes_cookies_secure(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, tmp_path: Path
) -> None:
    org = add_organisation(conn)
    anna, _ = add_mentor(conn, org, portal=portal, name="Anna 100% Berg")
    bjorn, _ = add_mentor(conn, org, portal=portal, name="Bjørn Lie")
    base, env = password_console(tmp_path, "pw")
    async with running_service(db_url, portal, env=env), httpx.AsyncClient() as http:
        await eventually(lambda: sync_state(conn, anna) == "in_sync" and sync_state(conn, bjorn) == "in_sync")
        await sign_in_with_password(http, base, "pw")

        async def names(**params: str) -> list[str]:
            page = await http.get(f"{base}/mentors", params=params)
            return re.findall(r'<a href="/mentors/[0-9a-f-]+">([^<]+)</a>', page.text)

        assert await names() == ["Anna 100% Berg", "Bjørn Lie"]
        assert await names(q="bjørn") == ["Bjørn Lie"]
        assert await names(q="100%") == ["Anna 100% Berg"]
        assert await names(q="0% B") == ["Anna 100% Berg"]
        assert await names(q="%") == ["Anna 100% Berg"]  # a literal %, not a wildcard
        assert await names(q=str(bjorn).upper()) == ["Bjørn Lie"]
        assert await names(state="in_sync") == ["Anna 100% Berg", "Bjørn Lie"]
        assert await names(state="dead_lettered") == []
        assert (await http.get(f"{base}/mentors/not-a-uuid")).status_code == 404

    port = free_port()
    env.update(HLF_HTTP_PORT=str(port), HLF_CONSOLE_URL="https://ops.hlf.example")
    async with running_service(db_url, portal, env=env), httpx.AsyncClient() as http:
        login = await http.get(f"http://127.0.0.1:{port}/login")
        cookie = login.headers["set-cookie"].lower()
        assert "secure" in cookie and "httponly" in cookie and "samesite=lax" in cookie


async def test_pages_say_the_database_is_away_instead_of_failing(
    db_url: str, portal: FakePortal, tmp_path: Path
) -> None:
    params = conninfo_to_dict(db_url)
    with TcpProxy(str(params["host"]), int(params.get("port") or 5432)) as proxy:
        params.update(host="127.0.0.1", port=str(proxy.port))
        base, env = password_console(tmp_path, "pw")
        async with running_service(make_conninfo(**params), portal, env=env), httpx.AsyncClient() as http:
            await sign_in_with_password(http, base, "pw")
            assert (await http.get(f"{base}/")).status_code == 200
            proxy.refuse(True)
            away = await http.get(f"{base}/dead-letters")
            assert away.status_code == 503 and "The database cannot be reached right now" in away.text
            proxy.refuse(False)
            assert (await http.get(f"{base}/dead-letters")).status_code == 200


async def test_check_credentials_now_during_an_incident_asks_the_leaders_own_check(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, tmp_path: Path, org: UUID
) -> None:
    """On the leader, during a tenant-wide incident, the button runs the leader's check at once: the incident heals
    (one held PATCH confirms it) long before the next scheduled check, and no all-clear comes from the console."""
    mentor, record = add_mentor(conn, org, portal=portal, name="Held Helga")
    slow_checks = {"HLF_INCIDENT_CHECK_EVERY": "10m", "HLF_INCIDENT_CHECK_MAX": "10m"}
    base, env = password_console(tmp_path, "leader-pw\n", **slow_checks)
    async with running_service(db_url, portal, env=env) as service, httpx.AsyncClient() as http:
        await eventually(lambda: sync_state(conn, mentor) == "in_sync", what="the first sync")
        portal.remove_app_user()
        conn.execute("UPDATE mentors SET status = 'paused' WHERE id = %s", (mentor,))
        await eventually(lambda: service.health().incident == "app_user_missing", what="the incident to open")
        first_check = "SELECT count(*) FROM event_log WHERE kind = 'credential_check' AND data ->> 'trigger' = %s"
        # The check the incident starts with, at once; the next one is 10 minutes away.
        await eventually(lambda: conn.execute(first_check, ("incident check",)).fetchone() == (1,))
        portal.remove_app_user(False)  # an administrator put the application user back
        await sign_in_with_password(http, base, "leader-pw")
        actions = await http.get(f"{base}/actions")
        checked = await http.post(
            f"{base}/actions/check-credentials", data={"csrf": csrf_of(actions.text)}, follow_redirects=True
        )
        assert "tenant-wide incident (app_user_missing)" in checked.text, checked.text[-2000:]
        assert "the leader checks the tenant again now" in checked.text
        await eventually(lambda: portal.listed(record) is False, what="the held PATCH, well before the 10 min check")
        await eventually(lambda: service.health().incident is None, what="the incident to close")
    verdicts = conn.execute(
        "SELECT data ->> 'transition', data ->> 'trigger' FROM event_log WHERE kind = 'credential_check' "
        "AND data ->> 'transition' IS NOT NULL ORDER BY seq"
    ).fetchall()
    assert verdicts == [("failed", "sync answer"), ("restored", "a held sync succeeded")]
    audit = conn.execute("SELECT data ->> 'action' FROM event_log WHERE kind = 'console_action'").fetchall()
    assert audit == [("check_credentials",)]
