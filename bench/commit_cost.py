"""What the hlf triggers cost the mentor app: commits/s of single-row mentor updates, triggers installed vs dropped.

    .venv/bin/python bench/commit_cost.py [--mentors 5000] [--writers 1,10,50] [--seconds 5] [--repeats 3]
                                          [--variants installed,dropped] [--breakdown]

On a scratch database (HLF_DATABASE_URL's server, else 127.0.0.1:5432 as postgres; created, migrated, seeded and
dropped here) each writer is a thread with its own connection that commits one `UPDATE mentors SET status` of one
of its own mentors per transaction (no row is shared, so no writer waits for another's row lock) as fast as it can
for --seconds, while one more connection LISTENs on hlf_events and consumes the notifications, as the service does.
Each configuration is measured --repeats times, in alternating order, and the median is reported.

Configurations (--variants; --breakdown adds the four in the middle):
    installed        the triggers as migrated: event_log row + hlf_inbox row + NOTIFY hlf_events per transaction
    no_notify        the same without pg_notify (the service would have to poll hlf_inbox)
    no_inbox         the same without the hlf_inbox row
    event_only       only the event_log row
    notify_if_idle   a proposal: NOTIFY only when no other committed inbox row can be locked FOR KEY SHARE (a busy
                     service will drain again anyway; the lock keeps that drain from finishing before this commit)
    dropped          no trigger on mentors or certifications at all: the baseline
Why NOTIFY matters: at commit, a transaction that notified takes a cluster-wide lock (PreCommit_Notify) and holds it
until its commit record is flushed, so notifying commits cannot share a WAL flush (group commit) with each other.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from hlf_actors import db

DBNAME = "hlf_bench_commit_cost"
TABLES = ("mentors", "certifications")
ALL_VARIANTS = ("installed", "no_notify", "no_inbox", "event_only", "notify_if_idle", "dropped")
NOTIFY_LINE = "PERFORM pg_notify('hlf_events', 'wake');"
INBOX_LINE = "INSERT INTO hlf_inbox (seq) VALUES (new_seq);"
# Skip the wake-up when another transaction's unprojected row is there to hold: while we hold it, the drain that
# deletes it cannot commit, and the service drains once more after any drain that found rows, seeing our row.
NOTIFY_IF_IDLE = """PERFORM 1 FROM hlf_inbox WHERE seq < new_seq ORDER BY seq DESC LIMIT 1 FOR KEY SHARE SKIP LOCKED;
    IF NOT FOUND THEN
        PERFORM pg_notify('hlf_events', 'wake');
    END IF;"""


def _urls() -> tuple[str, str]:
    base = os.environ.get("HLF_DATABASE_URL") or make_conninfo(host="127.0.0.1", user="postgres", dbname="postgres")
    params = {key: value for key, value in conninfo_to_dict(base).items() if value is not None}
    params["dbname"] = DBNAME
    return base, make_conninfo("", **params)


class Schema:
    """Switches the scratch database between configurations, from the definitions the migrations created."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        rows = conn.execute(
            "SELECT pg_get_triggerdef(t.oid) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "WHERE c.relname = ANY(%s) AND NOT t.tgisinternal ORDER BY t.tgname",
            (list(TABLES),),
        ).fetchall()
        self._triggers = [str(r[0]) for r in rows]
        names = conn.execute(
            "SELECT t.tgname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "WHERE c.relname = ANY(%s) AND NOT t.tgisinternal",
            (list(TABLES),),
        ).fetchall()
        self._names = [(str(n), str(t)) for n, t in names]
        row = conn.execute("SELECT pg_get_functiondef('hlf_append_event'::regproc)").fetchone()
        assert row is not None
        self._function = str(row[0])
        for line in (NOTIFY_LINE, INBOX_LINE):
            if line not in self._function:
                raise SystemExit(f"hlf_append_event no longer contains {line!r}: update bench/commit_cost.py")
        self.current = "installed"

    def use(self, variant: str) -> None:
        with self._conn.transaction():
            for name, table in self._names:
                self._conn.execute(
                    sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), sql.Identifier(table))
                )
            function = self._function
            if variant in ("no_notify", "event_only"):
                function = function.replace(NOTIFY_LINE, "")
            if variant == "notify_if_idle":
                function = function.replace(NOTIFY_LINE, NOTIFY_IF_IDLE)
            if variant in ("no_inbox", "event_only"):
                function = function.replace(INBOX_LINE, "")
            self._conn.execute(function.encode())
            if variant != "dropped":
                for definition in self._triggers:
                    self._conn.execute(definition.encode())
        self.current = variant


def _seed(conn: psycopg.Connection[Any], n: int) -> list[Any]:
    org = conn.execute("INSERT INTO organisations (name) VALUES ('bench') RETURNING id").fetchone()
    assert org is not None
    rows = conn.execute(
        "INSERT INTO mentors (organisation_id, full_name, status, portal_record_id) "
        "SELECT %s, 'Mentor ' || g, 'active', gen_random_uuid() FROM generate_series(1, %s) g RETURNING id",
        (org[0], n),
    ).fetchall()
    conn.execute("INSERT INTO certifications (mentor_id, expires_on) SELECT id, current_date + 365 FROM mentors")
    return [r[0] for r in rows]


def _listen(url: str, stop: threading.Event, ready: threading.Event, count: list[int]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("LISTEN hlf_events")
        ready.set()
        while not stop.is_set():
            for _ in conn.notifies(timeout=0.2):
                count[0] += 1


def measure(url: str, mentors: list[Any], writers: int, seconds: float) -> float:
    """Commits per second of ``writers`` concurrent single-row-update transactions."""
    parts = [mentors[i::writers] for i in range(writers)]
    connections = [psycopg.connect(url, autocommit=True) for _ in range(writers)]
    start = threading.Barrier(writers + 1)
    deadline = [0.0]
    commits = [0] * writers
    errors: list[BaseException] = []

    def write(index: int) -> None:
        conn, mine = connections[index], parts[index]
        status = ["paused", "active"]
        done = 0
        try:
            start.wait()
            while time.perf_counter() < deadline[0]:
                conn.execute("UPDATE mentors SET status = %s WHERE id = %s", (status[done % 2], mine[done % len(mine)]))
                done += 1
        except BaseException as err:  # surfaced below: a failed writer would make the figure meaningless
            errors.append(err)
        commits[index] = done

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + seconds
    began = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    took = time.perf_counter() - began
    for conn in connections:
        conn.close()
    if errors:
        raise SystemExit(f"a writer failed: {errors[0]}")
    return sum(commits) / took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mentors", type=int, default=5000)
    parser.add_argument("--writers", default="1,10,50")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="installed,dropped")
    parser.add_argument("--breakdown", action="store_true", help="also measure no_notify, no_inbox, event_only")
    args = parser.parse_args()
    writer_counts = [int(w) for w in args.writers.split(",")]
    variants = args.variants.split(",")
    if args.breakdown:
        variants = [v for v in ALL_VARIANTS if v in variants or v not in ("installed", "dropped")]
    unknown = set(variants) - set(ALL_VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {','.join(ALL_VARIANTS)}")
    base, url = _urls()
    with psycopg.connect(base, autocommit=True) as admin:
        settings: dict[str, str] = dict(
            admin.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN ('server_version', 'fsync', 'synchronous_commit', "
                "'wal_sync_method', 'commit_delay', 'max_connections')"
            ).fetchall()
        )
        used = admin.execute("SELECT count(*) FROM pg_stat_activity").fetchone()
        free = int(settings["max_connections"]) - (int(used[0]) if used else 0)
        if max(writer_counts) + 5 > free:
            raise SystemExit(f"only {free} free connections on the server; {max(writer_counts) + 5} are needed")
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DBNAME)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DBNAME)))
    try:
        with psycopg.connect(url) as conn:
            db.migrate(conn)
            # The bench reads the service's tables unqualified, as the tests do (tests/conftest.py).
            conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET search_path = hlf, public')
        with psycopg.connect(url, autocommit=True) as conn:
            mentors = _seed(conn, args.mentors)
            schema = Schema(conn)
            stop, ready, notified = threading.Event(), threading.Event(), [0]
            listener = threading.Thread(target=_listen, args=(url, stop, ready, notified), daemon=True)
            listener.start()
            ready.wait(10)
            results: dict[tuple[str, int], list[float]] = {}
            measure(url, mentors, 4, 1.0)  # warm-up: caches, prepared statements, the WAL
            for repeat in range(args.repeats):
                order = variants if repeat % 2 == 0 else list(reversed(variants))
                for variant in order:
                    schema.use(variant)
                    for writers in writer_counts:
                        conn.execute("TRUNCATE hlf_inbox")  # the service would have drained it
                        rate = measure(url, mentors, writers, args.seconds)
                        results.setdefault((variant, writers), []).append(rate)
                        print(
                            f"repeat {repeat + 1}: {variant:<10} {writers:>3} writer(s): {rate:8.0f} commits/s",
                            file=sys.stderr,
                            flush=True,
                        )
            schema.use("installed")
            stop.set()
            listener.join(5)
    finally:
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DBNAME)))

    median = {key: statistics.median(values) for key, values in results.items()}
    print(
        f"## Commit cost of the hlf triggers (PostgreSQL {settings['server_version']}, fsync={settings['fsync']}, "
        f"synchronous_commit={settings['synchronous_commit']}, wal_sync_method={settings['wal_sync_method']}, "
        f"commit_delay={settings['commit_delay']}; {os.cpu_count()} cores)\n"
    )
    print(
        f"{args.mentors} mentors; one UPDATE of status per transaction; median of {args.repeats} run(s) of "
        f"{args.seconds:g} s each, alternating order; one listener consuming NOTIFYs "
        f"({notified[0]} received).\n"
    )
    baseline = "dropped" if "dropped" in variants else None
    header = "| writers | " + " | ".join(f"{v} (commits/s)" for v in variants)
    rule = "|---:|" + "---:|" * len(variants)
    if baseline:
        others = [v for v in variants if v != baseline]
        header += " | " + " | ".join(f"{v} / dropped" for v in others)
        rule += "---:|" * len(others)
    print(header + " |")
    print(rule)
    for writers in writer_counts:
        cells = [f"{median[(v, writers)]:.0f}" for v in variants]
        if baseline:
            for v in others:
                ratio = median[(v, writers)] / median[(baseline, writers)]
                cells.append(f"{ratio:.2f} ({(1 - ratio) * 100:+.0f}% cost)")
        print(f"| {writers} | " + " | ".join(cells) + " |")
    spread = (
        max((max(v) - min(v)) / statistics.median(v) for v in results.values() if len(v) > 1)
        if args.repeats > 1
        else 0.0
    )
    print(
        f"\nLargest spread between repeats of one cell: {spread * 100:.0f}% of its median. "
        "The issue allows the trigger at most 15% (installed / dropped >= 0.85)."
    )


if __name__ == "__main__":
    main()
