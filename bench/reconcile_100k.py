"""One reconciliation of 100,000 mentors against the fake portal: wall time, requests, rows, peak RSS.

    .venv/bin/python bench/reconcile_100k.py [--mentors 100000] [--page-size 5000] [--keep]

Builds its own database on HLF_DATABASE_URL's server (else 127.0.0.1:5432 as postgres): --mentors mentors (90%
active, 10% paused, every one with a valid certification and a portal record), seeded set-based with triggers off,
as a restored dump would be. The fake portal runs in a subprocess, so this process's peak RSS is the reconciliation's
own, and holds one record per mentor with 1% of them flipped, 0.2% deleted and 100 orphans. Then one
`hlf_actors.reconcile.reconcile` run (the same call the service and `hlf-actors reconcile` make), checked against
the drift that was planted. Bounded: the portal is given 60 s to start and the run 300 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import subprocess
import sys
import time
from datetime import date
from typing import Any

import anyio
import psycopg
from psycopg.conninfo import make_conninfo

from hlf_actors import db
from hlf_actors.config import load_config
from hlf_actors.dynamics import DynamicsClient
from hlf_actors.reconcile import reconcile

_DB = "hlf_bench_reconcile"
_ORPHANS = 100

# The fake portal's process: the same drift rules as the seeding below, by mentor number i (1-based).
#   eligible  ⇔ i % 10 != 0        flipped ⇔ i % 100 == 7        deleted ⇔ i % 1000 in (1, 10)
_PORTAL = r"""
import json, sys
from hlf_actors.testing.fake_portal import FakePortal
n, orphans = int(sys.argv[1]), int(sys.argv[2])
portal = FakePortal().start()
for i in range(1, n + 1):
    if i % 1000 in (1, 10):
        continue
    portal.add_record(f"abcd0000-0000-4000-8000-{i:012x}", listed=(i % 10 != 0) != (i % 100 == 7))
for i in range(1, orphans + 1):
    portal.add_record(f"abcd0001-0000-4000-8000-{i:012x}", listed=True)
print(json.dumps(portal.env()), flush=True)
for line in sys.stdin:
    if line.strip() == "stats":
        gets = portal.requests("GET")
        print(json.dumps({"get": len(gets), "token": len(portal.token_requests()),
                          "pages": sum(1 for r in gets if r.path.endswith(portal.entity_set))}), flush=True)
    elif line.strip() == "quit":
        break
"""


def _database(n: int) -> str:
    base = os.environ.get("HLF_DATABASE_URL") or make_conninfo(host="127.0.0.1", user="postgres", dbname="postgres")
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS hlf_bench_reconcile")
        admin.execute("CREATE DATABASE hlf_bench_reconcile")
    url = make_conninfo(base, dbname=_DB)
    with psycopg.connect(url) as conn:
        db.migrate(conn)
        # The bench reads the service's tables unqualified, as the tests do (tests/conftest.py).
        conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET search_path = hlf, public')
        conn.execute("SET search_path = hlf, public")
        # Triggers off while seeding: the log's 200,000 status_changed events are not what is measured here.
        conn.execute("SET session_replication_role = replica")
        org = conn.execute("INSERT INTO organisations (name) VALUES ('Bench') RETURNING id").fetchone()
        assert org is not None
        conn.execute(
            """INSERT INTO mentors (organisation_id, full_name, status, portal_record_id)
               SELECT %s, 'Mentor ' || i, CASE WHEN i %% 10 = 0 THEN 'paused' ELSE 'active' END,
                      ('abcd0000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid
               FROM generate_series(1, %s) AS i""",
            (org[0], n),
        )
        conn.execute("INSERT INTO certifications (mentor_id, expires_on) SELECT id, current_date + 365 FROM mentors")
        conn.commit()
        conn.execute("ANALYZE")
    return url


def _expected(n: int) -> dict[str, int]:
    divergent = missing = absent = 0
    for i in range(1, n + 1):
        eligible = i % 10 != 0
        if i % 1000 in (1, 10):
            missing += eligible
            absent += not eligible
        elif i % 100 == 7:
            divergent += 1
    return {"divergent": divergent, "missing": missing, "absent_ok": absent, "orphans": _ORPHANS}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mentors", type=int, default=100_000)
    parser.add_argument("--page-size", type=int, default=5000)
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database afterwards")
    args = parser.parse_args()
    n = args.mentors

    t0 = time.perf_counter()
    url = _database(n)
    print(f"seeded {n} mentors in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    portal = subprocess.Popen(
        [sys.executable, "-c", _PORTAL, str(n), str(_ORPHANS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert portal.stdin is not None and portal.stdout is not None
    try:
        if not select.select([portal.stdout], [], [], 60)[0]:
            raise SystemExit("the fake portal did not start within 60 s")
        portal_env: dict[str, str] = json.loads(portal.stdout.readline())
        print(f"fake portal with {n - 2 * (n // 1000) + _ORPHANS} records up in {time.perf_counter() - t0:.1f}s")
        config = load_config({**portal_env, "HLF_DATABASE_URL": url, "HLF_PORTAL_RATE_LIMIT": "6000/5m"}, dotenv=None)

        async def run() -> Any:
            client = DynamicsClient(config)
            try:
                with anyio.fail_after(300):
                    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                        return await reconcile(conn, client, today=date.today(), page_size=args.page_size)
            finally:
                await client.aclose()

        rss_before = _rss_mb()
        started = time.perf_counter()
        report = anyio.run(run)
        wall = time.perf_counter() - started
        rss_after = _rss_mb()
        portal.stdin.write("stats\n")
        portal.stdin.flush()
        stats = json.loads(portal.stdout.readline())
    finally:
        if portal.stdin is not None and not portal.stdin.closed:
            portal.stdin.write("quit\n")
            portal.stdin.close()
        portal.wait(timeout=30)

    found = {
        "divergent": len(report.divergent),
        "missing": len(report.missing),
        "absent_ok": report.absent_ok,
        "orphans": len(report.orphans),
    }
    expected = _expected(n)
    print(f"reconcile of {n} mentors against {report.portal_records} portal records")
    print(
        f"  wall time          {wall:.2f} s  (portal {report.portal_ms / 1000:.2f} s, database "
        f"{report.database_ms / 1000:.2f} s, queueing {report.queue_ms / 1000:.2f} s)"
    )
    print(
        f"  requests           {stats['get']} GET ({stats['pages']} listing pages of {args.page_size}, "
        f"{stats['get'] - stats['pages']} WhoAmI) + {stats['token']} token"
    )
    print(f"  rows               {report.mentors_checked} mentors read, {report.portal_records} records read")
    print(f"  found              {found}")
    print(f"  sync requests      {len(report.requested)} queued in one statement per 5,000")
    print(
        f"  peak RSS           {rss_after:.0f} MiB (before the run {rss_before:.0f} MiB, "
        f"+{rss_after - rss_before:.0f} MiB)"
    )
    if found != expected:
        raise SystemExit(f"WRONG: expected {expected}")
    print("  drift found exactly as planted")
    if not args.keep:
        with psycopg.connect(make_conninfo(url, dbname="postgres"), autocommit=True) as admin:
            admin.execute("DROP DATABASE IF EXISTS hlf_bench_reconcile")


if __name__ == "__main__":
    main()
