"""Commit → portal latency and sustained rate of the real `hlf-actors run` process.

    .venv/bin/python bench/sync_latency.py [--mentors 2000] [--rate 100] [--seconds 10]

Runs the service as a subprocess against its own database (HLF_DATABASE_URL's server, else 127.0.0.1:5432 as
postgres) and the fake portal on 127.0.0.1, then measures:
  1. paced: one status change per committed transaction at --rate changes/s for --seconds; latency from the
     writer's COMMIT returning to the PATCH arriving at the portal (p50/p90/p99/max);
  2. backlog drain: --mentors changes committed while the service is stopped, then the time until the portal has
     received every PATCH (changes/s);
  3. stream: --mentors changes committed as fast as one writer can, service running: time to drain (changes/s).
Every change must produce exactly one PATCH; losses and duplicates are counted and printed. Bounded in time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from hlf_actors import db
from hlf_actors.testing.fake_portal import FakePortal


def _database() -> str:
    base = os.environ.get("HLF_DATABASE_URL") or make_conninfo(host="127.0.0.1", user="postgres", dbname="postgres")
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS hlf_bench_latency")
        admin.execute("CREATE DATABASE hlf_bench_latency")
    params = conninfo_to_dict(base)
    params["dbname"] = "hlf_bench_latency"
    url = make_conninfo(**params)
    with psycopg.connect(url) as conn:
        db.migrate(conn)
        # The bench reads the service's tables unqualified, as the tests do (tests/conftest.py).
        conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET search_path = hlf, public')
    return url


def _start(url: str, portal: FakePortal, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **portal.env(),
        "HLF_DATABASE_URL": url,
        "HLF_HTTP_PORT": "0",
        "HLF_BACKOFF_JITTER": "off",
        "HLF_ALERTS": "off",  # no alert channel in a benchmark: on purpose
        # Measure the service, not Dataverse's 6000/5m service-protection limit (which caps sustained sends at 20/s).
        "HLF_PORTAL_RATE_LIMIT": "1000000/1s",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "hlf_actors", "run"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 30
    while "leader: listening" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the service did not start; see {log}")
        time.sleep(0.02)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def _wait_for(portal: FakePortal, count: int, timeout: float) -> float:
    started = time.perf_counter()
    while len(portal.patches()) < count:
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"only {len(portal.patches())} of {count} PATCHes arrived within {timeout:.0f}s")
        time.sleep(0.002)
    return time.perf_counter() - started


def _seed(conn: psycopg.Connection[Any], portal: FakePortal, n: int) -> list[Any]:
    org = conn.execute("INSERT INTO organisations (name) VALUES ('bench') RETURNING id").fetchone()
    assert org is not None
    rows = conn.execute(
        """INSERT INTO mentors (organisation_id, full_name, status, portal_record_id)
           SELECT %s, 'Mentor ' || g, 'paused', gen_random_uuid() FROM generate_series(1, %s) g
           RETURNING id, portal_record_id""",
        (org[0], n),
    ).fetchall()
    for _, record in rows:
        portal.add_record(record, listed=False)
    return rows


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mentors", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    url = _database()
    log = Path("/tmp/hlf-bench-latency.log")
    with FakePortal() as portal, psycopg.connect(url, autocommit=True) as conn:
        mentors = _seed(conn, portal, args.mentors)
        proc = _start(url, portal, log)
        try:
            _wait_for(portal, len(mentors), 120)  # the initial sync of every seeded mentor
            portal.clear_requests()

            # 1. paced latency, one change per committed transaction
            n = int(args.rate * args.seconds)
            committed: dict[str, float] = {}
            interval = 1.0 / args.rate
            next_at = time.perf_counter()
            for i in range(n):
                mentor_id, record = mentors[i % len(mentors)]
                status = "active" if (i // len(mentors)) % 2 == 0 else "paused"
                conn.execute("UPDATE mentors SET status = %s WHERE id = %s", (status, mentor_id))
                committed[str(record)] = time.time()
                next_at += interval
                pause = next_at - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
            _wait_for(portal, n, 60)
            time.sleep(0.3)
            patches = portal.patches()
            latencies = [(p.at - committed[p.record_id]) * 1000 for p in patches if p.record_id in committed]
            paced = {
                "changes": n,
                "patches": len(patches),
                "p50_ms": statistics.median(latencies),
                "p90_ms": _percentile(latencies, 0.90),
                "p99_ms": _percentile(latencies, 0.99),
                "max_ms": max(latencies),
            }
        finally:
            _stop(proc)

        # 2. backlog drain: changes committed while the service is down
        portal.clear_requests()
        for mentor_id, _ in mentors:
            conn.execute("UPDATE mentors SET status = 'paused' WHERE id = %s AND status <> 'paused'", (mentor_id,))
            conn.execute("UPDATE mentors SET status = 'active' WHERE id = %s", (mentor_id,))
        proc = _start(url, portal, log)
        try:
            drain_s = _wait_for(portal, len(mentors), 300)
            time.sleep(0.3)
            drained = len(portal.patches())

            # 3. stream: one writer as fast as it can while the service runs
            portal.clear_requests()
            cpu_before = _cpu_s(proc.pid)
            started = time.perf_counter()
            for mentor_id, _ in mentors:
                conn.execute("UPDATE mentors SET status = 'paused' WHERE id = %s", (mentor_id,))
            writer_s = time.perf_counter() - started
            _wait_for(portal, len(mentors), 300)
            stream_total = time.perf_counter() - started
            stream_cpu_ms = (_cpu_s(proc.pid) - cpu_before) * 1000 / len(mentors)
            time.sleep(0.3)
            streamed = len(portal.patches())
        finally:
            _stop(proc)

    print(f"## hlf_actors sync latency (fake portal answering at once, {os.cpu_count()} cores)\n")
    print("| measure | value |\n|---|---|")
    print(f"| paced {args.rate:.0f}/s, {paced['changes']} changes: commit→PATCH p50 | {paced['p50_ms']:.2f} ms |")
    print(f"| p90 / p99 / max | {paced['p90_ms']:.2f} / {paced['p99_ms']:.2f} / {paced['max_ms']:.2f} ms |")
    print(f"| PATCHes for {paced['changes']} changes (must be equal) | {paced['patches']} |")
    print(
        f"| backlog drain of {len(mentors)} (service started after the commits) | "
        f"{len(mentors) / drain_s:.0f} changes/s ({drain_s:.2f} s), {drained} PATCHes |"
    )
    print(
        f"| stream of {len(mentors)} from one writer | {len(mentors) / stream_total:.0f} changes/s "
        f"({stream_total:.2f} s; the writer alone took {writer_s:.2f} s), {streamed} PATCHes |"
    )
    print(f"| service CPU per sync during the stream | {stream_cpu_ms:.2f} ms |")


if __name__ == "__main__":
    main()
