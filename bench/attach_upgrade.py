"""Moving an old-layout install into schema hlf, and the coordinators' read model, at size.

    .venv/bin/python bench/attach_upgrade.py [--events 200000] [--mentors 10000]

Creates its own database (`hlf_bench_attach`) on HLF_DATABASE_URL's server, else 127.0.0.1:5432 as postgres; applies
migrations 001-006 the way the last release did (everything in public), fills event_log set-based with EVENTS events
over MENTORS mentors (a status change, a success or a failure per event), projects them with replay, then times
  1. `migrate` (the relocation to hlf, migrations 007+, attach, harden), in one transaction, as writes wait on it,
  2. one call of hlf_mentor_sync_state() (every mentor, as the service's role sees it),
  3. one coordinator's call (the default hook answers per row), filtered to one mentor,
and prints the seconds of each. ALTER … SET SCHEMA is a catalog change, so (1) should not grow with the log.
"""

from __future__ import annotations

import argparse
import os
import time

import psycopg
from loguru import logger
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from hlf_actors import db
from hlf_actors.replay import replay

_DB = "hlf_bench_attach"


def _legacy(url: str, events: int, mentors: int) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(
            "CREATE TABLE hlf_schema_migrations (version int PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for m in db.migrations():
            if m.version <= 6:
                conn.execute(m.sql.encode())
                conn.execute(
                    "INSERT INTO hlf_schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (m.version, m.name, m.checksum),
                )
        conn.execute("SET session_replication_role = replica")  # the seeding's own trigger events are not wanted
        conn.execute("INSERT INTO organisations (id, name) VALUES ('00000000-0000-0000-0000-000000000001', 'Bench')")
        conn.execute(
            "INSERT INTO mentors (id, organisation_id, full_name, portal_record_id)"
            " SELECT md5(i::text)::uuid, '00000000-0000-0000-0000-000000000001', 'M' || i, gen_random_uuid()"
            " FROM generate_series(1, %s) i",
            (mentors,),
        )
        conn.execute(
            "INSERT INTO event_log (mentor_id, kind, data)"
            " SELECT md5((1 + i %% %s)::text)::uuid,"
            "   CASE WHEN i < %s THEN 'status_changed' WHEN i %% 7 = 0 THEN 'attempt_failed'"
            "        ELSE 'attempt_succeeded' END,"
            "   CASE WHEN i < %s THEN jsonb_build_object('cause', 'mentor_created', 'status', 'active')"
            "        WHEN i %% 7 = 0 THEN jsonb_build_object('operation', 'restore', 'attempt', 1, 'http_status', 503,"
            "             'retryable', true, 'delay_ms', 2000, 'error', '503 Service Unavailable', 'for_seq', i)"
            "        ELSE jsonb_build_object('operation', 'restore', 'attempt', 1, 'http_status', 204, 'for_seq', i)"
            "   END"
            " FROM generate_series(0, %s - 1) i",
            (mentors, mentors, mentors, events),
        )
    replay(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE")  # what autovacuum does to a real database; fresh bulk loads mislead the planner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--mentors", type=int, default=10_000)
    args = parser.parse_args()
    logger.remove()  # replay's findings on this synthetic history (repeated successes) are not what is measured
    base = os.environ.get("HLF_DATABASE_URL") or "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    params = conninfo_to_dict(base)
    with psycopg.connect(make_conninfo(**{**params, "dbname": "postgres"}), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {_DB} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {_DB}")
    url = make_conninfo(**{**params, "dbname": _DB})
    try:
        _measure(url, args.events, args.mentors)
    finally:
        with psycopg.connect(make_conninfo(**{**params, "dbname": "postgres"}), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {_DB} WITH (FORCE)")


def _measure(url: str, events: int, mentors: int) -> None:
    started = time.perf_counter()
    _legacy(url, events, mentors)
    print(f"old layout with {events:,} events, {mentors:,} mentors: {time.perf_counter() - started:.1f}s")

    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        applied = db.migrate(conn)
        took = time.perf_counter() - started
    print(f"migrate (relocate + {len(applied)} migration(s) + attach + harden): {took:.2f}s")

    with db.connect(url) as conn:
        started = time.perf_counter()
        rows = conn.execute("SELECT count(*) FROM hlf_mentor_sync_state()").fetchone()
        took = time.perf_counter() - started
        print(f"hlf_mentor_sync_state(), all {rows[0] if rows else 0:,} mentors: {took * 1000:.0f} ms")
        conn.execute("SELECT set_config('role', 'pg_read_all_data', false)")  # a caller the default hook refuses
        started = time.perf_counter()
        conn.execute(
            "SELECT * FROM hlf_mentor_sync_state() WHERE mentor_id = md5('1')::uuid",
        ).fetchall()
        took = time.perf_counter() - started
        print(f"hlf_mentor_sync_state() filtered to one mentor, as a refused caller: {took * 1000:.0f} ms")


if __name__ == "__main__":
    main()
