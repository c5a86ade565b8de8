"""Takeover time of a frozen leader: SIGSTOP the leader of two real `hlf-actors run` processes and time the standby.

    .venv/bin/python bench/frozen_leader.py [--timeouts 3s,15s] [--rounds 2] [--mentors 50]

For each HLF_LEADER_TIMEOUT and round: a fresh database (HLF_DATABASE_URL's server, else 127.0.0.1:5432 as postgres),
the fake portal and fake FCM on 127.0.0.1, a leader and a standby. The leader is frozen with SIGSTOP, every mentor is
paused in one transaction, and the script prints how long after the SIGSTOP the first and the last PATCH arrived
(all sent by the standby), then continues the old leader and checks that it sent nothing more.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from hlf_actors import db
from hlf_actors.env_values import parse_duration
from hlf_actors.testing.fake_fcm import FakeFCM
from hlf_actors.testing.fake_portal import FakePortal
from hlf_actors.testing.process import ServiceProcess, service_env
from hlf_actors.testing.seed import add_mentor, add_organisation

_DB = "hlf_bench_frozen_leader"


def _database() -> str:
    base = os.environ.get("HLF_DATABASE_URL") or make_conninfo(host="127.0.0.1", user="postgres", dbname="postgres")
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {_DB} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {_DB}")
    params = conninfo_to_dict(base)
    params["dbname"] = _DB
    url = make_conninfo(**params)
    with psycopg.connect(url) as conn:
        db.migrate(conn)
        # The bench reads the service's tables (schema hlf) as well as the app's, on one connection.
        conn.execute(f'ALTER DATABASE "{_DB}" SET search_path = hlf, public')
    return url


def _until(check: object, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.005)


def one_round(timeout: str, mentors: int, workdir: Path, n: int) -> tuple[float, float]:
    url = _database()
    with FakePortal() as portal, FakeFCM() as fcm, psycopg.connect(url, autocommit=True) as conn:
        org = add_organisation(conn)
        records = [add_mentor(conn, org, portal=portal, listed=True)[1] for _ in range(mentors)]
        env = service_env(url, portal.env(), fcm.env(workdir / "fcm.json"), HLF_LEADER_TIMEOUT=timeout)
        with ServiceProcess(env, workdir / f"leader-{timeout}-{n}.log") as leader:
            leader.wait_leader(30)
            with ServiceProcess(env, workdir / f"standby-{timeout}-{n}.log") as standby:
                standby.wait_for_log("standby:", timeout=30)
                _until(
                    lambda: (
                        conn.execute("SELECT count(*) FROM sync_status WHERE state = 'in_sync'").fetchone()
                        == (mentors,)
                    ),
                    "the first sync",
                    30,
                )
                portal.clear_requests()
                os.kill(leader.pid, signal.SIGSTOP)
                stopped = time.time()
                try:
                    conn.execute("UPDATE mentors SET status = 'paused'")
                    _until(lambda: all(portal.listed(r) is False for r in records), "every removal", 120)
                    patches = portal.patches()
                finally:
                    woke = time.time()
                    os.kill(leader.pid, signal.SIGCONT)
                leader.wait_for_log("leadership was taken over", timeout=30)
                time.sleep(1)
                late = [p for p in portal.patches() if p.at >= woke]
                if late:
                    raise SystemExit(f"the old leader sent {len(late)} PATCH(es) after it woke")
                first = min(p.at for p in patches) - stopped
                last = max(p.at for p in patches) - stopped
                return first, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeouts", default="3s,15s")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mentors", type=int, default=50)
    parser.add_argument("--logs", default=None, help="keep the services' logs in this directory")
    args = parser.parse_args()
    print(f"| HLF_LEADER_TIMEOUT | rounds | first PATCH after SIGSTOP (s) | all {args.mentors} sent after (s) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for timeout in args.timeouts.split(","):
            parse_duration(timeout)
            results = [one_round(timeout, args.mentors, Path(args.logs or tmp), n) for n in range(args.rounds)]
            firsts = ", ".join(f"{f:.2f}" for f, _ in results)
            lasts = statistics.median(last for _, last in results)
            print(f"| {timeout} | {args.rounds} | {firsts} | {lasts:.2f} (median) |")


if __name__ == "__main__":
    main()
