"""Replay of a 1,000,000-event log: events/s and peak RSS (targets: ≥ 100,000 events/s, < 200 MB).

    .venv/bin/python bench/replay_1m.py [--events 1000000] [--per-mentor 10] [--keep] [--database NAME]

Creates its own database (`hlf_bench_replay`, or NAME: keep one per log size with --keep while iterating) on
HLF_DATABASE_URL's server, else 127.0.0.1:5432 as postgres, and fills event_log set-based (INSERT … SELECT
generate_series) with a realistic history: each mentor is created, certified, synced, paused, removed after a 503
and a retry, reinstated, restored; one in ten is refused with a 403 and dead-lettered (and re-queued, half of them),
one in ten gets a reminder and a force sync. A mentor's events are spread over the whole log, as they are in a real
one (event k of mentor m has seq ≈ k·mentors + m), so the replay cannot lean on locality. Every tenth of the log is
written in its own transaction, so outcomes carry snapshots.

Then, in this process, it times
  1. replay into empty live tables (what a first replay after a disaster does: every row is "missing"),
  2. replay again (the everyday case: the rebuilt projection equals the live one, nothing is written),
  3. replay --verify,
and prints events/s for each and the process's peak RSS (ru_maxrss). The server does half the work (formatting and
sorting the log, in parallel workers; the COPY into the scratch tables), so on a shared machine compare runs made
one after the other. Run it under py-spy to see where the client's time goes (-g: only samples holding the GIL):
    .venv/bin/py-spy record -g -o /tmp/replay.svg -- .venv/bin/python bench/replay_1m.py --keep
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from hlf_actors import db, replay
from hlf_actors.progress import Progress

_DB = "hlf_bench_replay"

# One event per (mentor m, step k); g runs over the log in seq order: k = g / mentors, m = g % mentors.
# Columns of each step: kind and data. `snap` makes the outcome answer every change written before it.
_GENERATE = """
INSERT INTO event_log (mentor_id, kind, data)
SELECT md5('mentor' || m)::uuid,
       CASE k
           WHEN 0 THEN 'status_changed' WHEN 1 THEN 'status_changed' WHEN 2 THEN 'attempt_succeeded'
           WHEN 3 THEN 'status_changed' WHEN 4 THEN 'attempt_failed' WHEN 5 THEN 'attempt_succeeded'
           WHEN 6 THEN 'status_changed'
           WHEN 7 THEN CASE WHEN mod(m, 10) = 0 THEN 'attempt_failed' ELSE 'attempt_succeeded' END
           WHEN 8 THEN CASE WHEN mod(m, 10) = 0 THEN 'dead_lettered' WHEN mod(m, 10) = 1 THEN 'reminder_sent'
                            ELSE 'alert_sent' END
           ELSE CASE WHEN mod(m, 20) = 0 THEN 'requeued' WHEN mod(m, 10) = 1 THEN 'sync_requested' ELSE 'alert_sent' END
       END,
       CASE k
           WHEN 0 THEN jsonb_build_object('cause', 'mentor_created', 'status', 'active', 'previous_status', NULL,
                                          'portal_record_id', md5('record' || m)::uuid)
           WHEN 1 THEN jsonb_build_object('cause', 'certification_insert', 'certification_id', md5('cert' || m)::uuid,
                                          'expires_on', '2027-03-01')
           WHEN 3 THEN jsonb_build_object('cause', 'mentor_updated', 'status', 'paused', 'previous_status', 'active',
                                          'portal_record_id', md5('record' || m)::uuid)
           WHEN 6 THEN jsonb_build_object('cause', 'mentor_updated', 'status', 'active', 'previous_status', 'paused',
                                          'portal_record_id', md5('record' || m)::uuid)
           WHEN 2 THEN jsonb_build_object('operation', 'restore', 'attempt', 1, 'http_status', 204, 'for_seq', g,
                                          'duration_ms', 41.7, 'snapshot', snap)
           WHEN 4 THEN jsonb_build_object('operation', 'remove', 'attempt', 1, 'http_status', 503, 'retryable', true,
                                          'delay_ms', 2000, 'error', 'portal answered 503: Service Unavailable',
                                          'for_seq', g, 'snapshot', snap)
           WHEN 5 THEN jsonb_build_object('operation', 'remove', 'attempt', 2, 'http_status', 204, 'for_seq', g,
                                          'duration_ms', 38.2, 'snapshot', snap)
           WHEN 7 THEN CASE WHEN mod(m, 10) = 0
                   THEN jsonb_build_object('operation', 'restore', 'attempt', 1, 'http_status', 403,
                                           'retryable', false, 'delay_ms', NULL,
                                           'error', 'portal refused (403): principal lacks privilege', 'for_seq', g,
                                           'snapshot', snap)
                   ELSE jsonb_build_object('operation', 'restore', 'attempt', 1, 'http_status', 204, 'for_seq', g,
                                           'duration_ms', 40.1, 'snapshot', snap) END
           WHEN 8 THEN CASE WHEN mod(m, 10) = 0
                   THEN jsonb_build_object('operation', 'restore', 'attempts', 1, 'for_seq', g, 'snapshot', snap,
                                           'last_error', 'portal refused (403): principal lacks privilege')
                   WHEN mod(m, 10) = 1
                   THEN jsonb_build_object('threshold_day', 30, 'days_left', 30, 'certification_expiry_date',
                                           '2027-03-01', 'night', '2027-01-30', 'targets', 2, 'delivered', 2)
                   ELSE jsonb_build_object('alert', 'cert_expiry_reminder', 'target', 'topic:org-alerts',
                                           'message_id', 'projects/hlf/messages/' || g) END
           ELSE CASE WHEN mod(m, 20) = 0 THEN jsonb_build_object('dead_letter_id', g - %(mentors)s::bigint + 1)
                     WHEN mod(m, 10) = 1 THEN jsonb_build_object('reason', 'force_sync')
                     ELSE jsonb_build_object('alert', 'hlf_sync_failure', 'target', 'topic:org-alerts',
                                             'message_id', 'projects/hlf/messages/' || g) END
       END
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g,
     LATERAL (SELECT g / %(mentors)s::bigint AS k, mod(g, %(mentors)s::bigint) AS m) AS step,
     LATERAL (SELECT (pg_current_xact_id()::text::bigint + 1)::text || ':'
                     || (pg_current_xact_id()::text::bigint + 1)::text || ':' AS snap) AS s
ORDER BY g
"""


def _database(name: str, keep: bool) -> tuple[str, bool]:
    base = os.environ.get("HLF_DATABASE_URL") or make_conninfo(host="127.0.0.1", user="postgres", dbname="postgres")
    url = make_conninfo(base, dbname=name)
    with psycopg.connect(base, autocommit=True) as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None
        if exists and keep:
            return url, False
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with psycopg.connect(url) as conn:
        db.migrate(conn)
        # The bench reads the service's tables unqualified, as the tests do (tests/conftest.py).
        conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET search_path = hlf, public')
    return url, True


def _fill(url: str, events: int, per_mentor: int) -> None:
    mentors = events // per_mentor
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        for first in range(0, events, mentors):
            conn.execute(_GENERATE, {"first": first, "last": min(first + mentors, events) - 1, "mentors": mentors})
            print(f"\rgenerating: {min(first + mentors, events):,} events", end="", file=sys.stderr, flush=True)
        conn.execute("VACUUM ANALYZE event_log")
    print(
        f"\rgenerated {events:,} events for {mentors:,} mentors in {time.perf_counter() - started:.1f}s",
        file=sys.stderr,
    )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--per-mentor", type=int, default=10, choices=[10])
    parser.add_argument("--keep", action="store_true", help="reuse the database of a previous run if it is there")
    parser.add_argument("--database", default=_DB, help=f"name of the benchmark's database (default {_DB})")
    args = parser.parse_args()
    url, fresh = _database(args.database, args.keep)
    if fresh:
        _fill(url, args.events, args.per_mentor)
    else:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("TRUNCATE sync_status, dead_letters, duplicate_findings")
    print(f"python {sys.version.split()[0]}, peak RSS before replaying: {_peak_rss_mb():.0f} MB")
    results = []
    for label, verify in (("replay into empty tables", False), ("replay again", False), ("replay --verify", True)):
        report = replay.replay(url, verify=verify, progress=Progress(label=label))
        changed = sum(t.total for t in report.tables)
        # Two rates: the log's events per second (replay reads the log; the server skips the alert and reconcile
        # kinds no projection reads), and the events actually decoded and folded per second.
        log_rate = args.events / report.seconds
        results.append(log_rate)
        print(
            f"{label:26} {report.seconds:6.2f}s  {log_rate:>9,.0f} log events/s  "
            f"({report.events:,} folded: {report.events_per_s:,.0f}/s)  rows differing {changed:,}  "
            f"peak RSS {_peak_rss_mb():.0f} MB"
        )
    peak = _peak_rss_mb()
    slowest = min(results)
    ok = slowest >= 100_000 and peak < 200
    verdict = "OK" if ok else "MISSED"
    print(f"slowest {slowest:,.0f} log events/s (target ≥ 100,000), peak RSS {peak:.0f} MB (target < 200): {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
