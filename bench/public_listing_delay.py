"""Does the listing probe measure the website's cache? A known cache delay, measured back through the real service.

    .venv/bin/python bench/public_listing_delay.py [--cache-delay 3] [--mentors 10] [--min-interval 0.25]

Runs `hlf-actors run` as a subprocess against its own database (HLF_DATABASE_URL's server, else 127.0.0.1:5432 as
postgres), the fake portal and a fake Power Pages site whose server-side cache serves Dataverse's data
``--cache-delay`` seconds late, read by the probe in structured mode (the portals Web API query, paged). It pauses
``--mentors`` mentors one a second, waits for every `public_listing_confirmed`, and prints each one's terms (our
sync: change → 204; the website: 204 → seen), their spread, and the `hlf-actors status` line. Exit 1 when a
measured website term is off the set delay by more than ±1 s, or a removal is not confirmed within a minute.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from hlf_actors import db
from hlf_actors.testing.fake_portal import FakePortal
from hlf_actors.testing.fake_website import FakeWebsite
from hlf_actors.testing.seed import add_mentor, add_organisation


def _database() -> str:
    base = os.environ.get("HLF_DATABASE_URL") or make_conninfo(host="127.0.0.1", user="postgres", dbname="postgres")
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS hlf_bench_listing")
        admin.execute("CREATE DATABASE hlf_bench_listing")
    params = conninfo_to_dict(base)
    params["dbname"] = "hlf_bench_listing"
    url = make_conninfo(**params)
    with psycopg.connect(url) as conn:
        db.migrate(conn)
        # The bench reads the service's tables (schema hlf) as well as the app's, on one connection.
        conn.execute('ALTER DATABASE "hlf_bench_listing" SET search_path = hlf, public')
    return url


def _confirmed(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT data FROM event_log WHERE kind = 'public_listing_confirmed' AND data ->> 'operation' = 'remove' "
        "ORDER BY seq"
    ).fetchall()
    return [dict(r[0]) for r in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-delay", type=float, default=3.0, help="the fake site's cache delay, seconds")
    parser.add_argument("--mentors", type=int, default=10)
    parser.add_argument("--min-interval", type=float, default=0.25, help="HLF_PUBLIC_LISTING_MIN_INTERVAL, s")
    args = parser.parse_args()

    url = _database()
    workdir = Path(tempfile.mkdtemp(prefix="hlf-listing-"))
    log = workdir / "service.log"
    with psycopg.connect(url, autocommit=True) as conn, FakePortal() as portal:
        org = add_organisation(conn)
        mentors = [add_mentor(conn, org, portal=portal, name=f"Mentor {i}")[0] for i in range(args.mentors)]
        with FakeWebsite(portal, cache_delay_s=args.cache_delay, page_size=max(1, args.mentors // 3)) as site:
            env = {
                **os.environ,
                **portal.env(),
                **site.env("api"),
                "HLF_DATABASE_URL": url,
                "HLF_HTTP_PORT": "0",
                "HLF_ALERTS": "off",  # this bench measures the probe; nothing here is alerted
                "HLF_PUBLIC_LISTING_MIN_INTERVAL": f"{args.min_interval}s",
                "HLF_PUBLIC_LISTING_DEADLINE": "2m",
            }
            proc = subprocess.Popen(
                [sys.executable, "-m", "hlf_actors", "run"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
            )
            try:
                deadline = time.monotonic() + 30
                while "leader: listening" not in log.read_text(errors="replace"):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the service did not start; see {log}")
                    time.sleep(0.02)
                time.sleep(args.cache_delay + 1)  # the creations' own syncs and confirmations settle first
                for mentor in mentors:
                    conn.execute("UPDATE mentors SET status = 'paused' WHERE id = %s", (mentor,))
                    time.sleep(1.0)
                deadline = time.monotonic() + 60
                while len(_confirmed(conn)) < len(mentors):
                    if time.monotonic() > deadline:
                        print(f"only {len(_confirmed(conn))} of {len(mentors)} removals confirmed; see {log}")
                        return 1
                    time.sleep(0.1)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            status = subprocess.run(
                [sys.executable, "-m", "hlf_actors", "status"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                cwd=workdir,
                check=False,
            )
            requests = site.requests
        confirmed = _confirmed(conn)

    website = [c["delay_ms"] / 1000 for c in confirmed]
    ours = [(c["exposure_ms"] - c["delay_ms"]) / 1000 for c in confirmed]
    print(f"fake site cache delay {args.cache_delay:.1f} s, probe interval {args.min_interval:.2f} s, structured mode")
    print(f"{'mentor':>6}  {'confirmed_by':<12}  {'our sync':>9}  {'website':>8}  {'fetches':>7}")
    for i, c in enumerate(confirmed):
        print(f"{i:>6}  {c['confirmed_by']:<12}  {ours[i] * 1000:>6.0f} ms  {website[i]:>6.2f} s  {c['fetches']:>7}")
    print(
        f"website term: min {min(website):.2f} s, median {statistics.median(website):.2f} s, max {max(website):.2f} s"
        f"  (set: {args.cache_delay:.2f} s); our sync: median {statistics.median(ours) * 1000:.0f} ms"
    )
    print(f"site requests: {requests}")
    print(next((line.strip() for line in status.stdout.splitlines() if "public website" in line), status.stderr))
    off = [w for w in website if abs(w - args.cache_delay) > 1.0]
    if off or any(c["confirmed_by"] != "structured" for c in confirmed):
        print(f"FAIL: {len(off)} website term(s) off the set delay by more than 1 s")
        return 1
    print("OK: every website term within ±1 s of the set cache delay")
    return 0


if __name__ == "__main__":
    sys.exit(main())
