"""A secret rotation as the tenant's IT does it, measured on the real `hlf-actors run` with the default settings.

    .venv/bin/python bench/secret_rotation.py [--mentors 200] [--hold 90]

Runs the service as a subprocess (defaults everywhere: 2 s backoff base, jitter on, 6000/5m rate limit, 30 s
incident checks) against its own database (HLF_DATABASE_URL's server, else 127.0.0.1:5432 as postgres), the fake
Dataverse and the fake FCM on 127.0.0.1, with the secret in HLF_DYNAMICS_CLIENT_SECRET_FILE. Then:
  1. IT rotates the secret in Entra ID (the old one and its tokens stop working) and --mentors mentors are paused;
  2. the incident is held for --hold seconds (90 s: three times the sum of the default backoff delays, 2+4+8+16 s);
  3. the operator writes the new secret to the file.
Prints the time from revocation to the ops alert, the dead letters, coordinator pushes and attempts counted during
the incident, and the time from the new secret to every mentor in sync. Bounded in time; exits 1 on a broken
promise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from hlf_actors import db
from hlf_actors.testing.fake_fcm import FakeFCM
from hlf_actors.testing.fake_portal import FakePortal
from hlf_actors.testing.seed import add_device, add_mentor, add_organisation

DEVICE = "coordinator-phone-registration-token-bench"


def _database() -> str:
    base = os.environ.get("HLF_DATABASE_URL") or make_conninfo(host="127.0.0.1", user="postgres", dbname="postgres")
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS hlf_bench_rotation")
        admin.execute("CREATE DATABASE hlf_bench_rotation")
    params = conninfo_to_dict(base)
    params["dbname"] = "hlf_bench_rotation"
    url = make_conninfo(**params)
    with psycopg.connect(url) as conn:
        db.migrate(conn)
        # The bench reads the service's tables (schema hlf) as well as the app's, on one connection.
        conn.execute('ALTER DATABASE "hlf_bench_rotation" SET search_path = hlf, public')
    return url


def _wait(check: Callable[[], bool], what: str, timeout: float) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise SystemExit(f"FAILED: timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mentors", type=int, default=200)
    parser.add_argument("--hold", type=float, default=90.0, help="seconds the incident is left open")
    args = parser.parse_args()
    url = _database()
    work = Path(tempfile.mkdtemp(prefix="hlf-rotation-"))
    with FakePortal() as portal, FakeFCM() as fcm, psycopg.connect(url, autocommit=True) as conn:
        org = add_organisation(conn)
        add_device(conn, org, DEVICE)
        mentors: list[tuple[UUID, UUID]] = []
        for i in range(args.mentors):
            mentor, record = add_mentor(conn, org, portal=portal, name=f"Mentor {i}")
            assert record is not None
            mentors.append((mentor, record))
        ids = [m for m, _ in mentors]
        secret_file = work / "dynamics-secret"
        secret_file.write_text(portal.client_secret + "\n")
        env = {
            **os.environ,
            **portal.env(),
            **fcm.env(work / "fcm.json"),
            "HLF_DATABASE_URL": url,
            "HLF_DYNAMICS_CLIENT_SECRET": "",
            "HLF_DYNAMICS_CLIENT_SECRET_FILE": str(secret_file),
            "HLF_HTTP_PORT": "0",
        }
        log = work / "service.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "hlf_actors", "run"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
        )
        try:

            def in_sync() -> bool:
                row = conn.execute(
                    "SELECT count(*) FROM sync_status WHERE state = 'in_sync' AND mentor_id = ANY(%s)", (ids,)
                ).fetchone()
                return row == (len(ids),)

            def removed() -> bool:
                return all(portal.listed(r) is False for _, r in mentors) and in_sync()

            def ops() -> list[str]:
                return [m.data["type"] for m in fcm.messages() if m.message.get("topic") == "hlf-ops"]

            _wait(in_sync, "the first syncs", 120)
            revoked = time.monotonic()
            portal.rotate_secret("the-secret-it-rotated-in-entra-id")
            portal.revoke_tokens()
            conn.execute("UPDATE mentors SET status = 'paused' WHERE id = ANY(%s)", (ids,))
            alert_s = _wait(lambda: "hlf_credential_failure" in ops(), "the ops alert", 60)
            time.sleep(max(0.0, args.hold - (time.monotonic() - revoked)))
            row = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
            dead = row[0] if row else -1
            pushes = sum(1 for m in fcm.messages() if m.message.get("token") == DEVICE)
            attempts = conn.execute(
                "SELECT coalesce(max(attempts), 0) FROM sync_status WHERE mentor_id = ANY(%s)", (ids,)
            ).fetchone()
            token_tries = len(portal.token_requests())
            rotated = time.monotonic()
            secret_file.write_text("the-secret-it-rotated-in-entra-id\n")
            heal_s = _wait(removed, "every mentor in sync after the new secret", 120)
            _wait(lambda: "hlf_credential_restored" in ops(), "the all-clear", 60)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"mentors paused during the incident         {args.mentors}")
    print(f"revocation → ops alert                     {alert_s:.2f} s")
    print(f"incident held for                          {rotated - revoked:.0f} s")
    print(f"dead letters during the incident           {dead}")
    print(f"coordinator pushes during the incident     {pushes}")
    print(f"most attempts counted for one mentor       {attempts[0] if attempts else '?'}")
    print(f"token requests (whole run)                 {token_tries}")
    print(f"new secret in the file → all in sync       {heal_s:.2f} s")
    print(f"ops alerts                                 {', '.join(ops())}")
    broken = dead != 0 or pushes != 0 or heal_s > 60 or ops() != ["hlf_credential_failure", "hlf_credential_restored"]
    print("FAILED: a promise was broken" if broken else "OK: one incident, nothing spent, healed within a minute")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
