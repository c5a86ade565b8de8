"""The nightly certification-expiry check over 100,000 mentors: wall time, reminders, transitions, SQL statements.

    .venv/bin/python bench/expiry_night.py [--mentors 100000] [--organisations 20] [--push-concurrency 8] [--keep]

Builds its own database (hlf_bench_expiry) on HLF_DATABASE_URL's server (else 127.0.0.1:5432 as postgres):
--organisations organisations, every fourth with its own thresholds {60,10}, each with two coordinator devices;
--mentors active mentors seeded set-based with triggers off (as a restored dump would be), each with one certification
expiring between 5 days ago and 60 days ahead, spread evenly. Then two nights, each one ``run_night`` call (the call
the scheduler and ``hlf-actors check-expiry`` make) with a RecordingAlertSender:

    night 1   the first check this database ever had: every reminder already due goes out at once (catch-up)
    night 2   the next night: the steady state, only the thresholds crossed overnight

Statements are counted on the server with pg_stat_statements when it is loaded, else by a cursor class on the
benchmark's own pool (BEGIN/COMMIT are not statements there). "own" is what run_night issued itself; the rest are
alert records written outside it (the pushes' alert_sent events now go in run_night's own batches). Bounded: each night
has 600 s; the script then drops its database unless --keep.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import date, timedelta
from typing import Any

import anyio
import psycopg
from loguru import logger
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

from hlf_actors import db
from hlf_actors.alerts import Alerting
from hlf_actors.expiry import NightReport, run_night
from hlf_actors.testing.recording import RecordingAlertSender

_DB = "hlf_bench_expiry"
_TODAY = date(2025, 3, 11)


class _CountingCursor(psycopg.AsyncCursor[Any]):
    statements = 0

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        _CountingCursor.statements += 1
        return await super().execute(*args, **kwargs)


def _urls() -> tuple[str, str]:
    base = os.environ.get("HLF_DATABASE_URL") or make_conninfo(host="127.0.0.1", user="postgres", dbname="postgres")
    return base, make_conninfo(base, dbname=_DB)


def _seed(url: str, mentors: int, organisations: int) -> None:
    with psycopg.connect(url) as conn:
        db.migrate(conn)
        # The bench reads the service's tables unqualified, as the tests do (tests/conftest.py).
        conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET search_path = hlf, public')
        conn.execute("SET search_path = hlf, public")
        conn.execute("SET session_replication_role = replica")  # the seeding's own events are not measured
        conn.execute(
            """INSERT INTO organisations (name, reminder_days)
               SELECT 'Org ' || o, CASE WHEN o %% 4 = 0 THEN '{60,10}' ELSE '{30,14,7}' END::int[]
               FROM generate_series(1, %s) AS o""",
            (organisations,),
        )
        conn.execute(
            """INSERT INTO coordinator_devices (organisation_id, fcm_token)
               SELECT id, 'bench-device-' || d || '-' || id FROM organisations, generate_series(1, 2) AS d"""
        )
        conn.execute(
            """INSERT INTO mentors (organisation_id, full_name)
               SELECT (SELECT array_agg(id ORDER BY name) FROM organisations)[1 + i %% %s], 'Mentor ' || i
               FROM generate_series(1, %s) AS i""",
            (organisations, mentors),
        )
        conn.execute(
            """INSERT INTO certifications (mentor_id, expires_on)
               SELECT id, %s::date - 5 + (row_number() OVER (ORDER BY id))::int %% 66 FROM mentors""",
            (_TODAY,),
        )
        conn.execute("ANALYZE")
        conn.commit()


def _server_counter(conn: psycopg.Connection[Any]) -> bool:
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.execute("SELECT pg_stat_statements_reset()")
        return True
    except psycopg.Error:
        return False


async def _night(pool: AsyncConnectionPool[Any], alerting: Alerting, today: date, concurrency: int) -> NightReport:
    with anyio.fail_after(600):
        return await run_night(pool, alerting, today=today, job_lock_owner="bench", push_concurrency=concurrency)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mentors", type=int, default=100_000)
    parser.add_argument("--organisations", type=int, default=20)
    parser.add_argument("--push-concurrency", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = parser.parse_args()
    logger.remove()  # one log line per push would measure the terminal

    base, url = _urls()
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {_DB}")
        admin.execute(f"CREATE DATABASE {_DB}")
    try:
        started = time.perf_counter()
        _seed(url, args.mentors, args.organisations)
        print(
            f"seeded {args.mentors:,} mentors in {args.organisations} organisations in "
            f"{time.perf_counter() - started:.1f} s"
        )
        with psycopg.connect(url, autocommit=True) as conn:
            on_server = _server_counter(conn)
            print(f"statements counted {'by pg_stat_statements' if on_server else 'by a cursor class on the pool'}")

            async def nights() -> None:
                pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
                    url,
                    min_size=args.push_concurrency + 2,
                    max_size=args.push_concurrency + 2,
                    kwargs={"autocommit": True, "cursor_factory": _CountingCursor},
                    open=False,
                )
                await pool.open(wait=True)
                try:
                    sender = RecordingAlertSender()
                    alerting = Alerting(pool, sender, ops_topic="ops")
                    for label, today in (("night 1 (catch-up)", _TODAY), ("night 2 (steady)", _TODAY + timedelta(1))):
                        if on_server:
                            conn.execute("SELECT pg_stat_statements_reset()")
                        _CountingCursor.statements = 0
                        before = len(sender.sent())
                        report = await _night(pool, alerting, today, args.push_concurrency)
                        if on_server:
                            row = conn.execute(
                                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d "
                                "ON d.oid = s.dbid WHERE d.datname = %s AND query NOT LIKE '%%pg_stat_statements%%'",
                                (_DB,),
                            ).fetchone()
                            statements = int(row[0]) if row else 0
                        else:
                            statements = _CountingCursor.statements
                        pushes = len(sender.sent()) - before
                        print(
                            f"{label}: {report.duration_s:.2f} s wall ({report.sql_s:.2f} s in run_night's own SQL); "
                            f"{report.reminders_sent:,} reminders "
                            f"{dict(sorted(report.reminders_by_threshold.items(), reverse=True))}, "
                            f"{report.superseded:,} superseded, {report.transitioned:,} moved to expired_cert, "
                            f"{report.skipped_already_done:,} already reminded; {pushes:,} pushes; "
                            f"{statements:,} statements ({report.queries} own, {statements - report.queries:,} "
                            "alert records)"
                        )
                finally:
                    await pool.close()

            anyio.run(nights)
            for kind, n in conn.execute("SELECT kind, count(*) FROM event_log GROUP BY kind ORDER BY kind").fetchall():
                print(f"  event_log {kind}: {n:,}")
    finally:
        if not args.keep:
            with psycopg.connect(base, autocommit=True) as admin:
                admin.execute(f"DROP DATABASE IF EXISTS {_DB} WITH (FORCE)")


if __name__ == "__main__":
    main()
