#!/usr/bin/env python3
"""Chaos run of the real `hlf-actors run`: whatever fails, no change is lost, the portal ends up right, no secret leaks.

    .venv/bin/python scripts/chaos.py [--quick] [--minutes M] [--seed S] [--only NAME[,NAME...]] [--load-limit N/W]

Every scenario gets its own scratch database (created and dropped here) on HLF_TEST_DATABASE_URL's server, else
127.0.0.1:5432 as postgres, its own fake portal and fake FCM, and starts `hlf-actors run` as child processes. All
traffic stays on 127.0.0.1. The report is markdown on stdout; progress goes to stderr; the service logs stay in the
work directory the report names.

    crash         SIGKILL `hlf-actors run` at random moments (also during start-up) while a writer streams changes,
                  N rounds; then every mentor's portal record must equal hlf_is_eligible.
    pg-away       the service reaches Postgres through a TCP proxy: every connection severed (and refused for a
                  while), then the service's backends killed with pg_terminate_backend (its own database only).
    standby       two processes on one database: only the leader sends; SIGKILL it, the standby takes over.
    vanish        the leader's host vanishes: its packets are dropped in the kernel, no socket is closed. Needs root
                  (a private network namespace with its own PostgreSQL, since only the kernel's silence makes TCP
                  keepalives and tcp_user_timeout fire; a proxy in user space would keep acknowledging).
    portal-chaos  the fake portal answers a seeded random mix of 204, 429, 5xx, 403, 404, answers slower than the
                  timeout, resets, garbage and truncated bodies; its token endpoint fails sometimes and tokens are
                  revoked; then every mentor is right or dead-lettered with a clear error.
    load          a burst of changes while the portal answers in 20 ms and enforces Dataverse's service-protection
                  limits (requests per sliding window, concurrent requests); the service paces with the same limit.
Secrets: every service runs with a recognisable client secret and FCM private key; at the end the service logs,
event_log, the dead letters and the output of `status`, `status --json`, `dead-letters list` are searched for them.

Exit status 0 when every invariant held, 1 when one failed (the report marks which), 2 on bad arguments or no database.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pwd
import random
import re
import secrets as pysecrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from uuid import UUID

import httpx
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from hlf_actors import db
from hlf_actors.env_values import parse_duration
from hlf_actors.testing.fake_fcm import FakeFCM
from hlf_actors.testing.fake_portal import FakePortal, Reply, chaos_mix, token_chaos_mix
from hlf_actors.testing.http_server import free_port
from hlf_actors.testing.process import LEADER_LINE, ServiceProcess, service_env
from hlf_actors.testing.proxy import TcpProxy

ZONE = "Europe/Oslo"  # the service's default HLF_TIMEZONE: what "today" means for eligibility
UNLIMITED = "1000000/1s"  # HLF_PORTAL_RATE_LIMIT where the scenario is not about the rate limit
DATAVERSE_CONCURRENT = 20  # stricter than the 52 concurrent requests Dataverse documents
SENT_LINE = "sent (attempt"
LOST_LINE = "listener connection lost"
OUTCOME_KINDS = ("attempt_succeeded", "sync_skipped", "dead_lettered")
# A dead letter's last_error must say what happened: the status the portal answered, or what the transport did.
CLEAR_ERROR = re.compile(r"answered \d{3}|timed out|failed: \w+|unreachable|unreadable|refused|no portal_record_id")
CHILD_SECRET_VAR = "CHAOS_CLIENT_SECRET"


@dataclass(frozen=True)
class Plan:
    name: str
    minutes: float
    crash_rounds: int
    crash_mentors: int
    crash_rate: float
    outage_s: float
    outage_mentors: int
    standby_mentors: int
    vanish_variants: tuple[str, ...]
    chaos_mentors: int
    chaos_changes_s: float
    load_changes: int
    load_limit: str


FULL = Plan("full", 12, 6, 400, 40.0, 3.0, 200, 200, ("as configured",), 300, 5.0, 10_000, "6000/60s")
QUICK = Plan("quick", 5, 3, 150, 30.0, 1.5, 100, 100, ("as configured",), 120, 3.0, 2_000, "1200/12s")


# -- the report ----------------------------------------------------------------------------------------------------


@dataclass
class Section:
    name: str
    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, measure: str, value: object) -> None:
        self.rows.append((measure, _fmt(value)))

    def check(self, ok: bool, invariant: str) -> bool:
        self.rows.append((invariant, "ok" if ok else "**FAILED**"))
        if not ok:
            self.failures.append(invariant)
        return ok

    def note(self, text: str) -> None:
        self.notes.append(text)

    def render(self) -> str:
        lines = [f"### {self.name}: {self.title}", "", "| measure | value |", "|---|---|"]
        lines += [f"| {measure} | {value} |" for measure, value in self.rows]
        lines += ["", *[f"- {note}" for note in self.notes]] if self.notes else []
        lines.append(f"\n_{self.seconds:.0f} s_" + (f"; failed: {'; '.join(self.failures)}" if self.failures else ""))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "failures": self.failures, "notes": self.notes}

    def merge_json(self, data: dict[str, Any]) -> None:
        self.rows += [(str(m), str(v)) for m, v in data["rows"]]
        self.failures += [str(f) for f in data["failures"]]
        self.notes += [str(n) for n in data["notes"]]


def _fmt(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _seconds(values: Sequence[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f} s"
    return f"median {statistics.median(values):.2f} s, max {max(values):.2f} s (n={len(values)})"


def progress(scenario: str, text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {scenario}: {text}", file=sys.stderr, flush=True)


# -- secrets -------------------------------------------------------------------------------------------------------


class SecretScan:
    """The recognisable secrets every service runs with, and how often each place showed one."""

    def __init__(self, client_secret: str) -> None:
        self.client_secret = client_secret
        self.needles: dict[str, str] = {client_secret: "client secret"}
        self.hits: Counter[str] = Counter()
        self.scanned: Counter[str] = Counter()

    def add_fcm_key(self, path: Path) -> None:
        """The private key of an FCM service-account file: its id and three lines from the middle of the PEM."""
        account = json.loads(path.read_text())
        body = [line for line in str(account["private_key"]).splitlines() if line and not line.startswith("-----")]
        for line in (body[1], body[len(body) // 2], body[-2]):
            self.needles[line] = "FCM private key"
        self.needles[str(account["private_key_id"])] = "FCM private key id"

    def scan(self, place: str, text: str) -> int:
        found = sum(text.count(needle) for needle in self.needles)
        self.hits[place] += found
        self.scanned[place] += len(text)
        return found

    def scan_database(self, url: str) -> None:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            for place, query in (
                ("event_log", "SELECT coalesce(string_agg(data::text, E'\\n'), '') FROM event_log"),
                ("dead_letters.last_error", "SELECT coalesce(string_agg(last_error, E'\\n'), '') FROM dead_letters"),
                ("sync_status.last_error", "SELECT coalesce(string_agg(last_error, E'\\n'), '') FROM sync_status"),
            ):
                row = conn.execute(query).fetchone()
                self.scan(place, str(row[0]) if row else "")

    def scan_logs(self, folder: Path) -> None:
        for path in sorted(folder.rglob("*.log")):
            self.scan("service logs", path.read_text(errors="replace"))


# -- small helpers -------------------------------------------------------------------------------------------------


def wait_until(check: Callable[[], object], timeout: float, interval: float = 0.02) -> float | None:
    """Seconds until ``check()`` was truthy, or None after ``timeout``."""
    started = time.monotonic()
    while True:
        if check():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            return None
        time.sleep(interval)


def healthz(port: int) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0).status_code
    except httpx.HTTPError:
        return None


def rss_kib(pid: int, field_name: str = "VmRSS") -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def parse_limit(text: str) -> tuple[int, float]:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\S+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected requests/window such as 6000/5m, got {text!r}")
    return int(match.group(1)), parse_duration(match.group(2))


def server_params() -> dict[str, Any]:
    url = os.environ.get("HLF_TEST_DATABASE_URL")
    if url:
        return dict(conninfo_to_dict(url))
    return {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres"}


# -- one scenario's world ------------------------------------------------------------------------------------------


class Writer:
    """The mentor app: random status or certification changes, one transaction each, on its own connection."""

    def __init__(self, url: str, mentors: Sequence[UUID], seed: int, *, cert_share: float = 0.15) -> None:
        self._url = url
        self._mentors = list(mentors)
        self._rng = random.Random(seed)
        self._cert_share = cert_share
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.count = 0
        self.error: BaseException | None = None

    def change(self, conn: psycopg.Connection[Any], mentor: UUID | None = None) -> None:
        mentor = mentor or self._rng.choice(self._mentors)
        if self._rng.random() < self._cert_share:
            conn.execute(
                "UPDATE certifications SET expires_on = CASE WHEN expires_on >= current_date "
                "THEN current_date - 10 ELSE current_date + 180 END WHERE mentor_id = %s",
                (mentor,),
            )
        else:
            conn.execute(
                "UPDATE mentors SET status = CASE WHEN status = 'active' THEN 'paused' ELSE 'active' END WHERE id = %s",
                (mentor,),
            )
        self.count += 1

    def run_for(self, seconds: float, rate: float) -> int:
        """Changes at ``rate`` per second for ``seconds`` (or until stopped), from the calling thread."""
        done = 0
        with psycopg.connect(self._url, autocommit=True) as conn:
            started = time.monotonic()
            while not self._stop.is_set() and time.monotonic() - started < seconds:
                self.change(conn)
                done += 1
                pause = started + done / rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
        return done

    def start(self, rate: float) -> Self:
        def loop() -> None:
            try:
                self.run_for(math.inf, rate)
            except BaseException as err:  # reported by stop(): a writer that died would make the run meaningless
                self.error = err

        self._thread = threading.Thread(target=loop, name="writer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        if self.error is not None:
            raise RuntimeError(f"the writer failed: {self.error}") from self.error
        return self.count


class Bed:
    """One scenario's outside world: a scratch database, the fake portal and FCM, `hlf-actors run` processes."""

    def __init__(
        self,
        name: str,
        server: dict[str, Any],
        workdir: Path,
        scan: SecretScan,
        seed: int,
        **portal_kwargs: Any,
    ) -> None:
        self.name = name
        self.dbname = f"hlf_chaos_{re.sub(r'[^a-z0-9]', '_', name)}_{os.getpid()}"
        self._server = server
        self.workdir = workdir / name
        self.scan = scan
        self.rng = random.Random(seed)
        self.portal = FakePortal(client_secret=scan.client_secret, **portal_kwargs)
        self.fcm = FakeFCM()
        self.processes: list[ServiceProcess] = []
        self._fcm_env: dict[str, str] = {}
        self._conn: psycopg.Connection[Any] | None = None

    def __enter__(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with psycopg.connect(self.url(dbname=self._server.get("dbname", "postgres")), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.dbname)))
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.dbname)))
        with psycopg.connect(self.url()) as conn:
            db.migrate(conn)
            # The bench reads the service's tables unqualified, as the tests do (tests/conftest.py).
            conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET search_path = hlf, public')
        self._conn = psycopg.connect(self.url(), autocommit=True)
        self.portal.start()
        self.fcm.start()
        key_file = self.workdir / "fcm-service-account.json"
        self._fcm_env = self.fcm.env(key_file)
        self.scan.add_fcm_key(key_file)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        started = time.monotonic()
        for process in self.processes:
            process.close(grace_s=3.0)
        stopped = time.monotonic()
        with contextlib.suppress(Exception):
            self.scan_outputs()
        scanned = time.monotonic()
        if self._conn is not None:
            self._conn.close()
        self.portal.stop()
        self.fcm.stop()
        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(self.url(dbname=self._server.get("dbname", "postgres")), autocommit=True) as admin,
        ):
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.dbname)))
        progress(
            self.name,
            f"torn down: services stopped in {stopped - started:.1f} s, outputs searched in "
            f"{scanned - stopped:.1f} s, the rest {time.monotonic() - scanned:.1f} s",
        )

    @property
    def conn(self) -> psycopg.Connection[Any]:
        assert self._conn is not None
        return self._conn

    def url(self, **overrides: Any) -> str:
        params = {**self._server, "dbname": self.dbname, **overrides}
        return make_conninfo(**{k: v for k, v in params.items() if v is not None})

    # -- the mentor app's data -------------------------------------------------------------------------------------

    def seed(
        self, n: int, *, status: str = "active", listed: bool = True, with_events: bool = True
    ) -> list[tuple[UUID, UUID]]:
        """``n`` mentors with a portal record and a certification valid for half a year, in one transaction.
        ``with_events=False`` inserts them as if they had always been there and in sync: without triggers
        (session_replication_role = replica, which needs a superuser), so the service finds nothing to do."""
        with self.conn.transaction():
            if not with_events:
                self.conn.execute("SET LOCAL session_replication_role = replica")
            row = self.conn.execute(
                "INSERT INTO organisations (name, alert_topic) VALUES ('Chaos organisation', 'chaos-coordinators') "
                "RETURNING id"
            ).fetchone()
            assert row is not None
            self.conn.execute(
                "INSERT INTO coordinator_devices (organisation_id, fcm_token) VALUES (%s, %s)",
                (row[0], "chaos-coordinator-phone-registration-token-0001"),
            )
            rows = self.conn.execute(
                "INSERT INTO mentors (organisation_id, full_name, status, portal_record_id) "
                "SELECT %s, 'Chaos mentor ' || g, %s, gen_random_uuid() FROM generate_series(1, %s) g "
                "RETURNING id, portal_record_id",
                (row[0], status, n),
            ).fetchall()
            self.conn.execute(
                "INSERT INTO certifications (mentor_id, expires_on) "
                "SELECT id, current_date + 180 FROM mentors WHERE organisation_id = %s",
                (row[0],),
            )
        mentors = [(UUID(str(m)), UUID(str(r))) for m, r in rows]
        for _, record in mentors:
            self.portal.add_record(record, listed=listed)
        return mentors

    def writer(self, mentors: Sequence[tuple[UUID, UUID]], **kwargs: Any) -> Writer:
        return Writer(self.url(), [m for m, _ in mentors], self.rng.randrange(2**32), **kwargs)

    # -- the service ------------------------------------------------------------------------------------------------

    def start(self, label: str, *, url: str | None = None, wait: str | None = "leader", **env: str) -> ServiceProcess:
        settings = {"HLF_PORTAL_RATE_LIMIT": UNLIMITED, "HLF_HTTP_HOST": "127.0.0.1", **env}
        process = ServiceProcess(
            service_env(url or self.url(), self.portal.env(), self._fcm_env, **settings),
            self.workdir / f"service-{len(self.processes) + 1}-{label}.log",
        )
        self.processes.append(process)
        process.start()
        if wait == "leader":
            process.wait_leader(timeout=60)
        elif wait == "standby":
            process.wait_for_log("standby:", timeout=60)
        return process

    def _cli_process(self, *args: str) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HLF_")}
        env.update({**self.portal.env(), **self._fcm_env, "HLF_DATABASE_URL": self.url(), "HLF_HTTP_PORT": "0"})
        return subprocess.Popen(
            [sys.executable, "-m", "hlf_actors", *args],
            env=env,
            cwd=self.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def cli(self, *args: str, timeout: float = 120) -> tuple[int, str]:
        """An `hlf-actors` command as an operator runs it, configured with the same secrets as the service:
        (exit status, stdout and stderr)."""
        process = self._cli_process(*args)
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output

    def scan_outputs(self) -> None:
        """The database and what operators read from it, searched for the secrets (the commands run at once)."""
        self.scan.scan_database(self.url())
        commands = [("status",), ("status", "--json"), ("dead-letters", "list", "--all")]
        row = self.conn.execute("SELECT mentor_id FROM dead_letters ORDER BY id LIMIT 1").fetchone()
        if row is not None:
            commands.append(("status", str(row[0]), "--json"))
        running = [(args, self._cli_process(*args)) for args in commands]
        for args, process in running:
            output, _ = process.communicate(timeout=120)
            name = " ".join(
                "MENTOR" if i == 1 and len(args) == 3 and args[0] == "status" else a for i, a in enumerate(args)
            )
            self.scan.scan(f"`{name}` output", output)

    # -- what is true now -------------------------------------------------------------------------------------------

    def last_seq(self) -> int:
        row = self.conn.execute("SELECT coalesce(max(seq), 0) FROM event_log").fetchone()
        assert row is not None
        return int(row[0])

    def mentors_now(self) -> list[tuple[UUID, UUID, bool, str | None, str | None]]:
        """(mentor, record, eligible today, sync state, last_error) of every mentor."""
        rows = self.conn.execute(
            "SELECT m.id, m.portal_record_id, hlf_is_eligible(m.id, (now() AT TIME ZONE %s)::date), s.state, "
            "s.last_error FROM mentors m LEFT JOIN sync_status s ON s.mentor_id = m.id",
            (ZONE,),
        ).fetchall()
        return [(UUID(str(r[0])), UUID(str(r[1])), bool(r[2]), r[3], r[4]) for r in rows]

    def wrong(self) -> list[UUID]:
        """Mentors whose portal record differs from their eligibility (dead-lettered ones included)."""
        records = self.portal.records()
        return [m for m, record, eligible, _, _ in self.mentors_now() if records.get(str(record)) is not eligible]

    def open_syncs(self) -> int:
        """Changes not yet projected (still in the inbox) plus syncs pending or retrying."""
        row = self.conn.execute(
            "SELECT (SELECT count(*) FROM hlf_inbox) + "
            "(SELECT count(*) FROM sync_status WHERE state IN ('pending', 'retrying'))"
        ).fetchone()
        return int(row[0]) if row else 0

    def dead_letter_count(self) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM dead_letters WHERE requeued_at IS NULL AND resolved_at IS NULL"
        ).fetchone()
        return int(row[0]) if row else 0

    def right(self) -> bool:
        return self.open_syncs() == 0 and not self.wrong()

    def wait_right(self, timeout: float, what: str) -> float:
        """Seconds until nothing is open and every portal record equals its mentor's eligibility."""
        took = wait_until(self.right, timeout, interval=0.05)
        if took is None:
            raise AssertionError(
                f"{what}: not settled within {timeout:.0f}s ({self.open_syncs()} open, {len(self.wrong())} wrong)"
            )
        return took

    def caught_up(self, mark: int, base: int) -> bool:
        """Every mentor changed in (base, mark] has a final outcome after its last change up to mark."""
        row = self.conn.execute(
            """SELECT count(*) FROM (
                   SELECT mentor_id, max(seq) AS last_change FROM event_log
                   WHERE kind IN ('status_changed', 'sync_requested') AND seq > %(base)s AND seq <= %(mark)s
                     AND mentor_id IS NOT NULL
                   GROUP BY mentor_id) c
               WHERE NOT EXISTS (SELECT 1 FROM event_log e WHERE e.mentor_id = c.mentor_id
                                   AND e.seq > c.last_change AND e.kind = ANY(%(final)s))""",
            {"base": base, "mark": mark, "final": list(OUTCOME_KINDS)},
        ).fetchone()
        return row is not None and row[0] == 0

    def patch_accounting(self, base: int) -> tuple[int, int, int]:
        """(PATCHes the portal received, PATCH outcomes the service recorded, repeats of a record's value)."""
        patches = self.portal.patches()
        row = self.conn.execute(
            "SELECT count(*) FROM event_log WHERE seq > %s AND (kind = 'attempt_succeeded' OR "
            "(kind = 'attempt_failed' AND data->>'http_status' IS NOT NULL))",
            (base,),
        ).fetchone()
        recorded = int(row[0]) if row else 0
        last: dict[str | None, bool] = {}
        repeats = 0
        for patch in patches:
            if patch.status != 204:
                continue
            value = bool(patch.json()[self.portal.listed_field])
            repeats += last.get(patch.record_id) is value
            last[patch.record_id] = value
        return len(patches), recorded, repeats

    def event_count(self, kind: str, base: int = 0) -> int:
        row = self.conn.execute("SELECT count(*) FROM event_log WHERE kind = %s AND seq > %s", (kind, base)).fetchone()
        return int(row[0]) if row else 0


def _sends(process: ServiceProcess) -> int:
    return process.log_text().count(SENT_LINE)


def _account(section: Section, bed: Bed, base: int, *, exact: bool) -> None:
    received, recorded, repeats = bed.patch_accounting(base)
    section.add("PATCHes the portal received", received)
    section.add("PATCH outcomes recorded by the service", recorded)
    unrecorded = received - recorded
    section.add("PATCHes answered but never recorded (the sender died first; re-sent by the next leader)", unrecorded)
    section.add("PATCHes that repeated the record's value (changes that left eligibility as it was)", repeats)
    if exact:
        section.check(unrecorded == 0, "every PATCH has its outcome recorded (no double send)")


def _end_state(section: Section, bed: Bed, *, dead_letters_allowed: bool = False) -> None:
    wrong = bed.wrong()
    section.add("mentors whose portal record differs from hlf_is_eligible (lost)", len(wrong))
    section.check(not wrong, "lost = 0: every mentor's portal record equals its eligibility")
    section.check(bed.open_syncs() == 0, "no sync left pending or retrying")
    if not dead_letters_allowed:
        section.check(bed.dead_letter_count() == 0, "no dead letter (the portal always answered 204)")


# -- crash ---------------------------------------------------------------------------------------------------------


def scenario_crash(bed: Bed, plan: Plan, section: Section) -> None:
    # Some answers take 50 ms, so a kill often finds PATCHes in flight.
    bed.portal.random_replies([(3.0, Reply(204, delay_s=0.002)), (1.0, Reply(204, delay_s=0.05))], seed=1)
    mentors = bed.seed(plan.crash_mentors)
    process = bed.start("initial")
    bed.wait_right(120, "the initial sync")
    base = bed.last_seq()
    bed.portal.clear_requests()
    writer = bed.writer(mentors).start(plan.crash_rate)
    to_leader: list[float] = []
    to_caught_up: list[float] = []
    killed_starting = 0
    spawned_at: float | None = None
    mark = base
    for round_no in range(1, plan.crash_rounds + 1):
        kill_at = time.monotonic() + bed.rng.uniform(0.3, 3.0)
        leader_s = caught_s = None
        while time.monotonic() < kill_at:
            if spawned_at is not None and leader_s is None and LEADER_LINE in process.log_text():
                leader_s = time.monotonic() - spawned_at
            if leader_s is not None and caught_s is None and spawned_at is not None and bed.caught_up(mark, base):
                caught_s = time.monotonic() - spawned_at
            time.sleep(0.02)
        if spawned_at is not None:
            if leader_s is None:
                killed_starting += 1
            else:
                to_leader.append(leader_s)
            if caught_s is not None:
                to_caught_up.append(caught_s)
        process.kill()
        moment = "during start-up" if spawned_at is not None and leader_s is None else "while leading"
        progress(bed.name, f"round {round_no}/{plan.crash_rounds}: SIGKILL {moment}")
        time.sleep(bed.rng.uniform(0.0, 1.0))
        mark = bed.last_seq()
        spawned_at = time.monotonic()
        process = bed.start(f"round-{round_no}", wait=None)
    assert spawned_at is not None
    restarted = spawned_at
    process.wait_leader(timeout=60)
    to_leader.append(time.monotonic() - restarted)
    if wait_until(lambda: bed.caught_up(mark, base), 120, interval=0.05) is not None:
        to_caught_up.append(time.monotonic() - restarted)
    changes = writer.stop()
    settle_s = bed.wait_right(120, "the end state after the last restart")
    section.add("SIGKILL rounds (of which during start-up, before leading)", f"{plan.crash_rounds} ({killed_starting})")
    section.add("changes committed by the writer (one transaction each)", changes)
    section.add("restart → leader", _seconds(to_leader))
    section.add("restart → everything committed before the restart answered (recovery)", _seconds(to_caught_up))
    section.add("writer stopped → every portal record right", f"{settle_s:.2f} s")
    _account(section, bed, base, exact=False)
    section.add("duplicate_detected events", bed.event_count("duplicate_detected", base))
    _end_state(section, bed)


# -- Postgres goes away --------------------------------------------------------------------------------------------


def scenario_pg_away(bed: Bed, plan: Plan, section: Section) -> None:
    server = conninfo_to_dict(bed.url())
    with TcpProxy(str(server.get("host") or "127.0.0.1"), int(server.get("port") or 5432)) as proxy:
        mentors = bed.seed(plan.outage_mentors)
        http_port = free_port()
        process = bed.start("service", url=bed.url(host="127.0.0.1", port=proxy.port), HLF_HTTP_PORT=str(http_port))
        bed.wait_right(60, "the initial sync")
        if wait_until(lambda: healthz(http_port) == 200, 30) is None:
            raise AssertionError("/healthz never answered 200 before the outage")
        writer = bed.writer(mentors)
        base = bed.last_seq()
        bed.portal.clear_requests()

        # 1. Every connection cut, new ones refused for outage_s, while the app keeps committing changes.
        proxy.refuse(True)
        cut = proxy.sever()
        noticed = wait_until(lambda: healthz(http_port) != 200, 15)
        committed = writer.run_for(plan.outage_s, rate=20)
        proxy.refuse(False)
        back = time.monotonic()
        healthy = wait_until(lambda: healthz(http_port) == 200, 60)
        right = bed.wait_right(60, "catch-up after the proxy let connections through again")
        total = time.monotonic() - back
        section.add("proxy: connections severed, then refused for", f"{cut} severed, {plan.outage_s:.1f} s refused")
        section.add("/healthz not ok after the cut", None if noticed is None else f"{noticed:.2f} s")
        section.add("changes committed while the database was away", committed)
        section.add("connections allowed again → /healthz ok", None if healthy is None else f"{healthy:.2f} s")
        section.add("connections allowed again → those changes on the portal", f"{total:.2f} s")
        section.check(healthy is not None, "/healthz ok again after the outage")
        del right

        # 2. The service's backends terminated by an administrator; changes committed right after.
        lost_before = process.log_text().count(LOST_LINE)
        listening_before = process.log_text().count(LEADER_LINE)
        terminated = bed.conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'hlf-actors%%' AND pid <> pg_backend_pid()"
        ).fetchone()
        killed_at = time.monotonic()
        counts: list[int] = []
        stream = threading.Thread(target=lambda: counts.append(writer.run_for(1.0, rate=30)))
        stream.start()
        relisten = wait_until(lambda: process.log_text().count(LEADER_LINE) > listening_before, 60)
        unhealthy = wait_until(lambda: healthz(http_port) != 200, 5)
        healthy = wait_until(lambda: healthz(http_port) == 200, 120)
        healthy_at = time.monotonic() - killed_at
        stream.join()
        bed.wait_right(120, "catch-up after pg_terminate_backend")
        section.add("pg_terminate_backend: service backends terminated", terminated[0] if terminated else 0)
        section.add("changes committed in the second after", counts[0] if counts else 0)
        section.add(
            "terminated → listening again",
            None
            if relisten is None
            else f"{relisten:.2f} s ({process.log_text().count(LOST_LINE) - lost_before} reconnect line(s))",
        )
        section.add(
            "terminated → /healthz not ok / ok again",
            f"{_fmt(unhealthy)} s / " + (f"{healthy_at:.2f} s" if healthy is not None else "never"),
        )
        section.add("terminated → those changes on the portal", f"{time.monotonic() - killed_at:.2f} s")
        section.check(healthy is not None, "/healthz ok again after the backends were terminated")
        section.check(relisten is not None, "the listener re-subscribed after its backend was terminated")
        _account(section, bed, base, exact=False)
        _end_state(section, bed)


# -- two processes -------------------------------------------------------------------------------------------------


def scenario_standby(bed: Bed, plan: Plan, section: Section) -> None:
    mentors = bed.seed(plan.standby_mentors)
    first = bed.start("A")
    bed.wait_right(60, "the initial sync")
    second = bed.start("B", wait="standby")
    base = bed.last_seq()
    bed.portal.clear_requests()
    writer = bed.writer(mentors).start(30.0)
    time.sleep(2.0 + bed.rng.uniform(0.0, 1.0))
    both = writer.count
    sent_by_standby = _sends(second)
    section.add("changes while both ran", both)
    section.check(sent_by_standby == 0, "the standby sent nothing while the leader lived")
    killed_wall = time.time()
    first.kill()
    took = wait_until(lambda: LEADER_LINE in second.log_text(), 60, interval=0.005)
    wait_until(lambda: any(p.at > killed_wall for p in bed.portal.patches()), 60)
    after = [p.at - killed_wall for p in bed.portal.patches() if p.at > killed_wall]
    first_patch = min(after) if after else None
    time.sleep(1.5)
    changes = writer.stop()
    bed.wait_right(60, "the end state after the takeover")
    section.add("SIGKILL of the leader → standby leads (LISTEN)", None if took is None else f"{took:.2f} s")
    section.add(
        "SIGKILL of the leader → first PATCH from the new leader",
        None if first_patch is None else f"{first_patch:.2f} s",
    )
    section.add("changes committed in all", changes)
    section.check(took is not None, "the standby took over")
    _account(section, bed, base, exact=False)
    _end_state(section, bed)


# -- a vanished leader (in a private network namespace) ------------------------------------------------------------

PROXY_PORT = 15432
SOURCE_PORTS = range(15500, 15600)
BLACKHOLE_RULES = (
    f"pref 10 dport {PROXY_PORT} blackhole",  # leader → proxy
    f"pref 11 sport {PROXY_PORT} blackhole",  # proxy → leader
    f"pref 12 sport {SOURCE_PORTS[0]}-{SOURCE_PORTS[-1]} blackhole",  # proxy → postgres, for the leader
    f"pref 13 dport {SOURCE_PORTS[0]}-{SOURCE_PORTS[-1]} blackhole",  # postgres → proxy, for the leader
)


def keepalive_settings() -> dict[str, Any]:
    return {k: v for k, v in db.CONNECT_KWARGS.items() if k.startswith(("keepalives", "tcp_user_timeout"))}


def keepalive_bound_s() -> float:
    """How long a silent peer can hold a connection with the service's settings, plus the standby's poll and slack."""
    k = db.CONNECT_KWARGS
    dead_after = max(
        k["keepalives_idle"] + k["keepalives_interval"] * k["keepalives_count"], k["tcp_user_timeout"] / 1000
    )
    return float(dead_after + k["keepalives_interval"] + 1.0 + 4.0)


def server_keepalive_options() -> str:
    """The same settings for the server's end of the connection (PostgreSQL GUCs a client may set per session)."""
    k = db.CONNECT_KWARGS
    return (
        f"-c tcp_keepalives_idle={k['keepalives_idle']} -c tcp_keepalives_interval={k['keepalives_interval']} "
        f"-c tcp_keepalives_count={k['keepalives_count']} -c tcp_user_timeout={k['tcp_user_timeout']}"
    )


def netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root, for a private network namespace (unshare --net) where packets can be dropped"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"needs `{tool}`"
    if pg_bindir() is None:
        return "needs PostgreSQL server binaries (initdb, postgres) under /usr/lib/postgresql/*/bin"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "needs an OS user `postgres` to run a private PostgreSQL"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        return f"`unshare --net` failed: {probe.stderr.decode(errors='replace').strip()[:120]}"
    return None


def pg_bindir() -> Path | None:
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


def scenario_vanish(plan: Plan, section: Section, workdir: Path, scan: SecretScan, seed: int) -> None:
    k = keepalive_settings()
    section.add("CONNECT_KWARGS (client side, libpq)", ", ".join(f"{n}={v}" for n, v in k.items()))
    section.add("takeover bound derived from them (+ interval, standby poll, slack)", f"{keepalive_bound_s():.0f} s")
    why = netns_unavailable()
    if why is not None:
        section.add("takeover after the leader's host vanished", f"not measured: {why}")
        section.note(
            "TcpProxy.freeze() alone cannot stand in: the proxy's own kernel keeps acknowledging segments "
            "and keepalive probes, so neither side's keepalives would ever fire."
        )
        return
    budget = (keepalive_bound_s() + 60) * len(plan.vanish_variants) + 60
    command = [
        "unshare",
        "--net",
        "--",
        sys.executable,
        str(Path(__file__).resolve()),
        "--netns-child",
        "--workdir",
        str(workdir),
        "--seed",
        str(seed),
        "--variants",
        ",".join(plan.vanish_variants),
        "--quick" if plan is QUICK else "--full",
    ]
    env = {**os.environ, CHILD_SECRET_VAR: scan.client_secret}
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, timeout=budget, check=False)
    result = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else None
    if result is None:
        raise AssertionError(f"the network-namespace child exited {done.returncode} without a result")
    section.merge_json(result["section"])
    for place, count in result["hits"].items():
        scan.hits[place] += int(count)
    for place, count in result["scanned"].items():
        scan.scanned[place] += int(count)


class PrivateCluster:
    """A throwaway PostgreSQL inside the private network namespace, listening on its 127.0.0.1:5432."""

    def __init__(self) -> None:
        bindir = pg_bindir()
        assert bindir is not None
        self._bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="hlf-chaos-pg-"))
        user = pwd.getpwnam("postgres")
        os.chown(self.root, user.pw_uid, user.pw_gid)
        self._process: subprocess.Popen[bytes] | None = None
        self.version = bindir.parent.name

    def start(self) -> dict[str, Any]:
        data = self.root / "data"
        # PostgreSQL refuses to run as root: both run as the postgres user, and the postmaster is our direct child,
        # so a signal to it is a signal to the server (no `runuser` in between to swallow it).
        as_postgres: dict[str, Any] = {"user": "postgres", "group": "postgres", "extra_groups": [], "cwd": self.root}
        subprocess.run(
            [str(self._bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"],
            check=True,
            capture_output=True,
            **as_postgres,
        )
        log = (self.root / "postgres.log").open("wb")
        self._process = subprocess.Popen(
            [
                str(self._bindir / "postgres"),
                "-D",
                str(data),
                "-p",
                "5432",
                "-c",
                "listen_addresses=127.0.0.1",
                "-k",
                str(self.root),
                "-c",
                "fsync=off",
                "-c",
                "max_connections=80",
                "-c",
                "shared_buffers=32MB",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            **as_postgres,
        )
        params = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres"}
        if wait_until(lambda: _connects(params), 60, interval=0.1) is None:
            raise RuntimeError(f"the private PostgreSQL did not start; see {self.root / 'postgres.log'}")
        return params

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.send_signal(signal.SIGQUIT)  # immediate shutdown: the postmaster takes its children
                self._process.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


def _connects(params: dict[str, Any]) -> bool:
    try:
        psycopg.connect(**params, connect_timeout=2).close()
        return True
    except psycopg.Error:
        return False


def _backends(bed: Bed) -> str:
    """The service's backends on the server, by client port (the vanished leader's come from SOURCE_PORTS)."""
    rows = bed.conn.execute(
        "SELECT client_port, state, coalesce(wait_event_type || ':' || wait_event, ''), left(query, 50) "
        "FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'hlf-actors%%' "
        "ORDER BY client_port"
    ).fetchall()
    return "; ".join(f"{'A' if p in SOURCE_PORTS else 'B'} {st} {w} {q!r}" for p, st, w, q in rows)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def netns_child(args: argparse.Namespace) -> int:
    """Runs inside `unshare --net`: lo up, a private PostgreSQL, then each variant of the vanished leader."""
    plan = QUICK if args.quick else FULL
    section = Section("vanish", "")
    scan = SecretScan(os.environ[CHILD_SECRET_VAR])
    _ip("link", "set", "lo", "up")
    # Rules must come before the local table's (preference 0), or packets to local addresses never see them.
    _ip("rule", "add", "pref", "100", "lookup", "local")
    _ip("rule", "del", "pref", "0")
    cluster = PrivateCluster()
    try:
        server = cluster.start()
        section.add("private PostgreSQL for this scenario", f"{cluster.version}, in its own network namespace")
        for number, variant in enumerate(args.variants.split(","), 1):
            with Bed(f"vanish-{number}", server, Path(args.workdir), scan, args.seed + number) as bed:
                vanish_variant(bed, plan, section, variant)
    except Exception as err:
        traceback.print_exc(file=sys.stderr)
        section.failures.append(f"scenario crashed: {type(err).__name__}: {err}")
    finally:
        cluster.stop()
    print(json.dumps({"section": section.to_json(), "hits": dict(scan.hits), "scanned": dict(scan.scanned)}))
    return 0


def vanish_variant(bed: Bed, plan: Plan, section: Section, variant: str) -> None:
    fixed = variant == "server-side keepalives"
    extra = {"options": server_keepalive_options()} if fixed else {}
    progress("vanish", f"variant: {variant}")
    bound = keepalive_bound_s()
    with TcpProxy("127.0.0.1", 5432, port=PROXY_PORT, upstream_source_ports=SOURCE_PORTS) as proxy:
        mentors = bed.seed(plan.standby_mentors)
        leader = bed.start("A-leader", url=bed.url(port=PROXY_PORT, **extra))
        bed.wait_right(60, "the initial sync")
        standby = bed.start("B-standby", url=bed.url(**extra), wait="standby")
        writer = bed.writer(mentors).start(10.0)
        time.sleep(1.0)
        lost_before = leader.log_text().count(LOST_LINE)
        sent_before = _sends(leader)
        for rule in BLACKHOLE_RULES:
            _ip("rule", "add", *rule.split())
        proxy.freeze()
        vanished = time.monotonic()
        noticed: float | None = None
        took: float | None = None
        while time.monotonic() - vanished < bound + 5:
            if noticed is None and leader.log_text().count(LOST_LINE) > lost_before:
                noticed = time.monotonic() - vanished
            if LEADER_LINE in standby.log_text():
                took = time.monotonic() - vanished
                break
            time.sleep(0.05)
        orphans = _backends(bed)
        sent_cut_off = _sends(leader) - sent_before
        for rule in BLACKHOLE_RULES:
            _ip("rule", "del", *rule.split())
        proxy.thaw()
        healed = time.monotonic()
        progress("vanish", f"before the heal: {orphans}")
        label = variant
        if fixed:
            section.note(
                f"[{variant}]: HLF_DATABASE_URL carries options='{server_keepalive_options()}', the "
                "same keepalive settings for the server's end of each connection (a proposed fix, not "
                "what the service does by itself)"
            )
        section.add(
            f"[{label}] the leader noticed its connection was dead", None if noticed is None else f"{noticed:.1f} s"
        )
        section.add(
            f"[{label}] vanished → standby leads",
            f"{took:.1f} s" if took is not None else f"not within {bound + 5:.0f} s",
        )
        if took is None:
            leaders_before = leader.log_text().count(LEADER_LINE)
            back = wait_until(
                lambda: LEADER_LINE in standby.log_text() or leader.log_text().count(LEADER_LINE) > leaders_before,
                120,
                interval=0.05,
            )
            section.add(f"[{label}] network back → some process leads again", None if back is None else f"{back:.1f} s")
        else:
            stepped_down = wait_until(lambda: "taken over by another process" in leader.log_text(), 60)
            section.add(
                f"[{label}] network back → the old leader stands down",
                None if stepped_down is None else f"{stepped_down:.1f} s",
            )
        progress("vanish", f"after the heal: {_backends(bed)}")
        writer.stop()
        progress("vanish", f"writer stopped {time.monotonic() - healed:.1f} s after the heal: {_backends(bed)}")
        bed.wait_right(120, f"the end state ({variant})")
        progress("vanish", f"right {time.monotonic() - healed:.1f} s after the heal")
        section.check(took is not None and took <= bound, f"[{variant}] takeover within {bound:.0f} s")
        section.add(
            f"[{label}] PATCHes the vanished leader completed while cut off (in flight at the cut)", sent_cut_off
        )
        section.check(not bed.wrong() and bed.open_syncs() == 0, f"[{variant}] every portal record right at the end")
        del healed


# -- portal chaos --------------------------------------------------------------------------------------------------


def _dead_letter_reason(error: str) -> str:
    status = re.search(r"answered (\d{3})", error)
    if status:
        return f"{status.group(1)}"
    if "timed out" in error:
        return "timeout"
    if "failed:" in error or "unreachable" in error:
        return "connection"
    return "other"


def scenario_portal_chaos(bed: Bed, plan: Plan, section: Section) -> None:
    timeout_s = 1.0
    mentors = bed.seed(plan.chaos_mentors)
    bed.start("service", HLF_PORTAL_TIMEOUT=f"{timeout_s}s", HLF_MAX_ATTEMPTS="5", HLF_BACKOFF_MAX_MS="1000")
    bed.wait_right(60, "the initial sync")
    base = bed.last_seq()
    bed.portal.clear_requests()
    bed.portal.random_replies(chaos_mix(slow_s=timeout_s + 0.5), seed=bed.rng.randrange(2**32))
    bed.portal.random_token_failures(token_chaos_mix(), seed=bed.rng.randrange(2**32))
    stop_revoking = threading.Event()

    def revoke() -> None:  # now and then every token is revoked: the next PATCH gets a 401 and must fetch another
        while not stop_revoking.wait(2.5):
            bed.portal.revoke_tokens()

    revoker = threading.Thread(target=revoke, daemon=True)
    revoker.start()
    try:
        changes = bed.writer(mentors).run_for(plan.chaos_changes_s, rate=2 * len(mentors) / plan.chaos_changes_s)
        settled = wait_until(lambda: bed.open_syncs() == 0, 120, interval=0.1)
    finally:
        stop_revoking.set()
        revoker.join()
    patches = bed.portal.patches()
    statuses = Counter("reset" if p.status == 0 else str(p.status) for p in patches)
    tokens = Counter("reset" if r.status == 0 else str(r.status) for r in bed.portal.token_requests())
    section.add("mentors / changes committed", f"{len(mentors)} / {changes}")
    section.add(
        "PATCH answers (status: count; 204/200 include slow ones the client gave up on)",
        ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())),
    )
    section.add("token requests (status: count)", ", ".join(f"{s}: {n}" for s, n in sorted(tokens.items())))
    section.add("settled (nothing pending or retrying) after", None if settled is None else f"{settled:.1f} s")
    section.check(settled is not None, "every sync settled")

    records = bed.portal.records()
    outcome: Counter[str] = Counter()
    unclear: list[str] = []
    wrong_in_sync: list[UUID] = []
    for mentor, record, eligible, state, last_error in bed.mentors_now():
        right = records.get(str(record)) is eligible
        if state == "in_sync":
            outcome["in sync, portal right" if right else "in sync, portal WRONG"] += 1
            if not right:
                wrong_in_sync.append(mentor)
        elif state == "dead_lettered":
            error = last_error or ""
            outcome[f"dead-lettered: {_dead_letter_reason(error)}"] += 1
            if not CLEAR_ERROR.search(error):
                unclear.append(error or "(empty)")
        else:
            outcome[f"left {state}"] += 1
    section.add("end state per mentor", ", ".join(f"{k}: {n}" for k, n in sorted(outcome.items())))
    section.add("dead-letter alerts recorded (alert_sent)", bed.event_count("alert_sent", base))
    for error in unclear[:3]:
        section.note(f"unclear dead-letter error: {error[:160]!r}")
    if wrong_in_sync:
        mentor = wrong_in_sync[0]
        story = bed.conn.execute(
            "SELECT kind, data->>'operation', data->>'http_status', data->>'error', recorded_at FROM event_log "
            "WHERE mentor_id = %s AND seq > %s ORDER BY seq",
            (mentor, base),
        ).fetchall()
        section.note(
            f"in sync but wrong on the portal, {mentor}: "
            + "; ".join(f"{k} {op or ''} {st or ''} {(err or '')[:40]}".strip() for k, op, st, err, _ in story)
            + ". A PATCH answered after the client's timeout and applied late can overwrite a newer one; the "
            "periodic reconciliation is what repairs it."
        )
    section.check(not unclear, "every dead letter says clearly what failed")

    # The portal recovers; one reconciliation (what the leader does every HLF_RECONCILE_EVERY) finds what drifted.
    bed.portal.random_replies(None)
    bed.portal.random_token_failures(None)
    returncode, output = bed.cli("reconcile", "--wait", "60")
    bed.scan.scan("`reconcile` output", output)
    still_wrong = [m for m in bed.wrong() if m not in {d for d, *_ in _dead_lettered(bed)}]
    section.add("after the portal recovered: `hlf-actors reconcile` exit status", returncode)
    section.add("mentors not dead-lettered but wrong after the reconcile", len(still_wrong))
    section.check(not still_wrong, "after a reconcile every mentor that can be right is right")


def _dead_lettered(bed: Bed) -> list[tuple[UUID]]:
    rows = bed.conn.execute("SELECT mentor_id FROM sync_status WHERE state = 'dead_lettered'").fetchall()
    return [(UUID(str(r[0])),) for r in rows]


# -- load ----------------------------------------------------------------------------------------------------------


def scenario_load(bed: Bed, plan: Plan, section: Section, limit_text: str) -> None:
    limit, window_s = parse_limit(limit_text)
    real_default = (limit, window_s) == (6000, 300.0)
    n = plan.load_changes
    bed.portal.always(Reply(204, delay_s=0.02))
    try:
        mentors = bed.seed(n, status="paused", listed=False, with_events=False)
    except psycopg.errors.InsufficientPrivilege:
        # Not a superuser: seed the ordinary way and let a first service sync them, unhurried by any limit.
        mentors = bed.seed(n, status="paused", listed=False)
        first = bed.start("initial-sync")
        bed.wait_right(600, "the initial sync")
        first.terminate()
    bed.portal.enforce_service_protection(limit, window_s, max_concurrent=DATAVERSE_CONCURRENT)
    # Bed.start lifts the service's limit for the other scenarios; here it is the limit under test.
    process = bed.start("service", HLF_PORTAL_RATE_LIMIT="6000/5m" if real_default else limit_text)
    baseline = rss_kib(process.pid) or 0
    bed.portal.clear_requests()
    peak_seen = [baseline]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.2):
            peak_seen.append(rss_kib(process.pid) or 0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ids = [m for m, _ in mentors]
    writers = 4
    started = time.monotonic()

    def write(part: Sequence[UUID]) -> None:
        with psycopg.connect(bed.url(), autocommit=True) as conn:
            for mentor in part:
                conn.execute("UPDATE mentors SET status = 'active' WHERE id = %s", (mentor,))

    threads = [threading.Thread(target=write, args=(ids[i::writers],)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    written = time.monotonic() - started
    windows = math.ceil(n / limit)
    budget = (windows - 1) * window_s * 1.1 + n / 50 + 60
    took = wait_until(lambda: sum(bed.portal.records().values()) == n, budget, interval=0.25)
    sampling.set()
    sampler.join()
    peak = rss_kib(process.pid, "VmHWM")
    bed.wait_right(60, "the end state of the burst")
    patches = bed.portal.patches()
    throttled = sum(1 for p in patches if p.status == 429)
    limit_label = f"{limit}/{window_s:g}s" + (
        " (the service's real default HLF_PORTAL_RATE_LIMIT)"
        if real_default
        else " on both sides (HLF_PORTAL_RATE_LIMIT and the fake)"
    )
    section.add("changes in the burst (one transaction each, 4 writers)", f"{n} in {written:.1f} s")
    section.add("limit enforced by the fake portal", f"{limit_label}; {DATAVERSE_CONCURRENT} concurrent; 20 ms answers")
    ideal = (windows - 1) * window_s + (n - (windows - 1) * limit) / 500  # 10 in flight x 20 ms = 500/s
    section.add("burst → all synced", None if took is None else f"{took + written:.1f} s (ideal: {ideal:.0f} s)")
    section.add(
        "PATCHes sent / 429s received",
        f"{len(patches)} / {throttled} (refused by the fake: {bed.portal.throttled_count})",
    )
    section.add(
        "service RSS: at start / peak (VmHWM)", f"{baseline / 1024:.0f} MiB / {(peak or max(peak_seen)) / 1024:.0f} MiB"
    )
    section.check(took is not None, "every change synced")
    section.check(throttled == 0 and bed.portal.throttled_count == 0, "no 429 from the enforcing portal")
    section.check(sum(1 for p in patches if p.status == 204) == n, "one successful PATCH per change")
    _end_state(section, bed)


# -- the run -------------------------------------------------------------------------------------------------------

SCENARIOS = ("crash", "pg-away", "standby", "vanish", "portal-chaos", "load")
TITLES = {
    "crash": "SIGKILL at random moments during a stream of changes",
    "pg-away": "Postgres goes away (connections severed; backends terminated)",
    "standby": "two processes on one database; the leader is killed",
    "vanish": "the leader's host vanishes without closing its sockets",
    "portal-chaos": "the portal answers a random mix of failures",
    "load": "a burst of changes under Dataverse's service-protection limits",
    "secrets": "recognisable secrets searched for everywhere",
}


def run(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    minutes = args.minutes or plan.minutes
    server = server_params()
    try:
        with psycopg.connect(**{**server, "dbname": server.get("dbname", "postgres")}, connect_timeout=5) as c:
            row = c.execute("SHOW server_version").fetchone()
            version = str(row[0]) if row else "?"
    except psycopg.Error as err:
        print(
            f"chaos: cannot reach PostgreSQL at {server.get('host')}:{server.get('port', 5432)}: {err}", file=sys.stderr
        )
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="hlf-chaos-"))
    scan = SecretScan(f"HLF-CHAOS-CLIENT-SECRET-{pysecrets.token_hex(8)}")
    deadline = time.monotonic() + minutes * 60
    chosen = [s for s in SCENARIOS if not args.only or s in args.only]
    sections: list[Section] = []
    for number, name in enumerate(chosen):
        section = Section(name, TITLES[name])
        sections.append(section)
        if time.monotonic() > deadline:
            section.add("not run", f"the {minutes:g}-minute budget was spent")
            section.failures.append("not run within the time budget")
            continue
        progress(name, "starting")
        started = time.monotonic()
        seed = args.seed * 100 + number
        try:
            if name == "vanish":
                scenario_vanish(plan, section, workdir, scan, seed)
            else:
                portal_kwargs = {"token_lifetime_s": 4} if name == "portal-chaos" else {}
                with Bed(name, server, workdir, scan, seed, **portal_kwargs) as bed:
                    if name == "crash":
                        scenario_crash(bed, plan, section)
                    elif name == "pg-away":
                        scenario_pg_away(bed, plan, section)
                    elif name == "standby":
                        scenario_standby(bed, plan, section)
                    elif name == "portal-chaos":
                        scenario_portal_chaos(bed, plan, section)
                    elif name == "load":
                        scenario_load(bed, plan, section, args.load_limit or plan.load_limit)
        except Exception as err:
            traceback.print_exc(file=sys.stderr)
            section.failures.append(f"scenario crashed: {type(err).__name__}: {str(err)[:300]}")
        section.seconds = time.monotonic() - started
        progress(
            name, f"done in {section.seconds:.0f} s" + (f", FAILED: {section.failures}" if section.failures else "")
        )

    secrets_section = Section("secrets", TITLES["secrets"])
    sections.append(secrets_section)
    for key_file in workdir.rglob("fcm-service-account.json"):
        scan.add_fcm_key(key_file)
    scan.scan_logs(workdir)
    control = sum(Path(p).read_text().count(n) for p in workdir.rglob("fcm-service-account.json") for n in scan.needles)
    secrets_section.add(
        "secrets searched for",
        f"client secret, {len(scan.needles) - 1} fragments/ids of "
        f"{len(list(workdir.rglob('fcm-service-account.json')))} FCM private keys",
    )
    secrets_section.add("control: occurrences in the FCM credential files themselves (must be > 0)", control)
    for place in sorted(scan.scanned):
        secrets_section.add(f"occurrences in {place} ({scan.scanned[place]:,} characters searched)", scan.hits[place])
    secrets_section.check(sum(scan.hits.values()) == 0, "no secret anywhere")
    secrets_section.check(control > 0, "the search finds the key where it is")

    failed = [s for s in sections if s.failures]
    print(f"## hlf_actors chaos report ({plan.name}, seed {args.seed}, {os.cpu_count()} cores, PostgreSQL {version})\n")
    print(
        f"Service logs: `{workdir}`. Invariants failed: "
        + (", ".join(f"{s.name} ({len(s.failures)})" for s in failed) if failed else "none")
        + ".\n"
    )
    for section in sections:
        print(section.render() + "\n")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run with smaller numbers (~3.5 minutes, 1.5 of them the vanished leader's keepalive timeouts)",
    )
    parser.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="time budget: scenarios not started by then are reported as not run (default 12, "
        "--quick 5; a run takes about 7 and 3.5 minutes)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of every random choice (default 1)")
    parser.add_argument(
        "--only",
        type=lambda s: set(s.split(",")),
        default=None,
        help=f"comma-separated scenarios: {','.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--load-limit",
        type=str,
        default=None,
        help="service-protection limit of the load scenario on both sides, N/window "
        "(default 6000/60s, --quick 1200/12s; 6000/5m is Dataverse's and the service's own)",
    )
    parser.add_argument("--netns-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variants", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only and not args.only <= set(SCENARIOS):
        parser.error(f"--only: unknown scenario(s) {sorted(args.only - set(SCENARIOS))}; know {','.join(SCENARIOS)}")
    if args.load_limit:
        try:
            parse_limit(args.load_limit)
        except (argparse.ArgumentTypeError, ValueError) as err:
            parser.error(f"--load-limit: {err}")
    if args.netns_child:
        return netns_child(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
