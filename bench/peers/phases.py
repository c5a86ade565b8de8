"""The measurements: one system's run on its own scratch database, and the floors.

One system run (``run_system``), on a fresh database dropped afterwards::

    for each portal delay (0 ms, 20 ms):
        start the worker, 20 warm-up changes
        paced    rate changes/s for `seconds`: commit → PATCH arrival p50/p90/p99/max; CPU over the phase
        stream   N changes from one writer as fast as it commits: N / (first commit → last arrival); CPU per sync
        stop the worker (SIGTERM); peak RSS read just before
        backlog  N changes committed while it is down, then start it: N / (first → last arrival)      [durable only]
    crash        2,000 changes committed while it is down; start; SIGKILL the tree when half have arrived;
                 restart at once; every change delivered? duplicates? restart → all delivered; restart → idle
                                                                                                   [durable only]

A phase is over when the portal has every PATCH, the system has written every outcome and its own tables hold
no work (``System.idle``), or at its time limit (then the missing changes count as lost). Duplicates are PATCHes
beyond the first for a change; every phase changes each mentor at most once, so each change must produce exactly
one PATCH. Times are ``time.monotonic()`` in every process (CLOCK_MONOTONIC is one clock system-wide on Linux).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import psycopg
from psycopg.conninfo import make_conninfo

from .portal import PortalProcess
from .procs import Worker
from .systems import System

__all__ = ["Settings", "run_httpx_alone", "run_listen_notify", "run_memory", "run_system", "scratch_database"]

WARM_UP = 20
_POLL_S = 0.02


@dataclass(frozen=True)
class Settings:
    admin_url: str  # a maintenance database on the server the scratch databases are made on
    mentors: int
    rate: float
    seconds: float
    delays_ms: tuple[float, ...]
    crash_changes: int
    crash_timeout_s: float
    logs: Path


# -- plumbing ---------------------------------------------------------------------------------------------------


@contextmanager
def scratch_database(admin_url: str, name: str) -> Iterator[str]:
    """A fresh database ``name`` on the admin URL's server, dropped (connections and all) afterwards."""
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(admin_url, dbname=name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class _Mentors:
    """The seeded mentors, what status each has now, and the changes that flip it."""

    rows: list[tuple[UUID, UUID]]  # (mentor id, portal record id)
    status: list[str] = field(default_factory=list)

    @classmethod
    def make(cls, n: int) -> _Mentors:
        rows = [(uuid4(), uuid4()) for _ in range(n)]
        return cls(rows, ["active"] * n)

    def flip(self, indices: Sequence[int]) -> tuple[list[tuple[UUID, str]], list[str]]:
        """A change of status for each mentor; the changes and the record ids whose PATCH they must cause."""
        changes: list[tuple[UUID, str]] = []
        records: list[str] = []
        for i in indices:
            self.status[i] = "paused" if self.status[i] == "active" else "active"
            changes.append((self.rows[i][0], self.status[i]))
            records.append(str(self.rows[i][1]))
        return changes, records


async def _write_async(system: System, url: str, changes: Sequence[tuple[UUID, str]], rate: float) -> list[float]:
    commits: list[float] = []
    async with system.writer(url) as change:
        interval = 1.0 / rate if rate else 0.0
        next_at = time.monotonic()
        for mentor_id, status in changes:
            await change(mentor_id, status)
            commits.append(time.monotonic())
            if interval:
                next_at += interval
                pause = next_at - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
    return commits


def _write(system: System, url: str, changes: Sequence[tuple[UUID, str]], rate: float = 0.0) -> list[float]:
    """Commit the changes, one transaction each, paced at ``rate``/s (0: as fast as one writer can); commit times."""
    return asyncio.run(_write_async(system, url, changes, rate))


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _tally(expected: Sequence[str], arrivals: Sequence[tuple[str, float]]) -> dict[str, int]:
    counts = Counter(record for record, _ in arrivals)
    wanted = set(expected)
    lost = sum(1 for r in wanted if counts[r] == 0)
    duplicates = sum(c - 1 for r, c in counts.items() if r in wanted and c > 1)
    duplicates += sum(c for r, c in counts.items() if r not in wanted)
    return {"patches": len(arrivals), "lost": lost, "duplicates": duplicates}


def _wait_done(
    system: System, conn: psycopg.Connection[Any], portal: PortalProcess, patches: int, outcomes: int, timeout_s: float
) -> tuple[bool, float]:
    """Wait until the portal has ``patches`` PATCHes, ``outcomes`` outcomes are written and the system is idle."""
    deadline = time.monotonic() + timeout_s
    if not portal.wait_count(patches, timeout_s):
        return False, time.monotonic()
    while not (system.outcomes(conn) >= outcomes and system.idle(conn)):
        if time.monotonic() > deadline:
            return False, time.monotonic()
        time.sleep(_POLL_S)
    return True, time.monotonic()


def _drain_timeout(n: int) -> float:
    return max(60.0, n / 20)


# -- one system -------------------------------------------------------------------------------------------------


class _Run:
    """One system on one scratch database: the worker processes it started and what they measured."""

    def __init__(self, system: System, url: str, portal: PortalProcess, settings: Settings, tag: str) -> None:
        self.system = system
        self.url = url
        self.portal = portal
        self.settings = settings
        self.tag = tag
        self.conn = psycopg.connect(url, autocommit=True)
        self.mentors = _Mentors.make(settings.mentors + WARM_UP)
        self.peak_rss_mb = 0.0
        self.delay_ms = 0.0  # the portal's answer delay in the current phase
        self._starts = 0

    def close(self) -> None:
        self.conn.close()

    def start(self) -> Worker:
        self._starts += 1
        log = self.settings.logs / f"{self.tag}-{self.system.name}-{self._starts}.log"
        return self.system.worker(self.url, self.portal, log).start()

    def stop(self, worker: Worker) -> None:
        worker.stop()
        self.peak_rss_mb = max(self.peak_rss_mb, worker.peak_rss_mb)

    def outcomes(self) -> int:
        return self.system.outcomes(self.conn)

    def warm_up(self) -> None:
        changes, _ = self.mentors.flip(range(self.settings.mentors, self.settings.mentors + WARM_UP))
        base, done = self.outcomes(), self.portal.count()
        _write(self.system, self.url, changes)
        ok, _ = _wait_done(self.system, self.conn, self.portal, done + WARM_UP, base + WARM_UP, 60)
        if not ok:
            raise RuntimeError(f"{self.system.name}: the warm-up changes were not synced within 60 s")

    def paced(self, worker: Worker) -> dict[str, Any]:
        s = self.settings
        n = min(int(s.rate * s.seconds), s.mentors)
        changes, records = self.mentors.flip(range(n))
        self.portal.reset(self.delay_ms)
        base = self.outcomes()
        cpu0 = worker.cpu_s()
        commits = _write(self.system, self.url, changes, s.rate)
        complete, _ = _wait_done(self.system, self.conn, self.portal, n, base + n, 30 + n / 50)
        cpu = worker.cpu_s() - cpu0
        time.sleep(0.2)  # a late duplicate has a moment to show
        arrivals = self.portal.arrivals()
        committed = dict(zip(records, commits, strict=True))
        first: dict[str, float] = {}
        for record, at in arrivals:
            first.setdefault(record, at)
        latencies = [(first[r] - committed[r]) * 1000 for r in records if r in first]
        return {
            "changes": n,
            "complete": complete,
            **_tally(records, arrivals),
            "p50_ms": statistics.median(latencies) if latencies else None,
            "p90_ms": _percentile(latencies, 0.90) if latencies else None,
            "p99_ms": _percentile(latencies, 0.99) if latencies else None,
            "max_ms": max(latencies) if latencies else None,
            "cpu_ms_per_sync": cpu * 1000 / n,
        }

    def stream(self, worker: Worker) -> dict[str, Any]:
        n = self.settings.mentors
        changes, records = self.mentors.flip(range(n))
        self.portal.reset(self.delay_ms)
        base = self.outcomes()
        cpu0 = worker.cpu_s()
        started = time.monotonic()
        commits = _write(self.system, self.url, changes)
        complete, done_at = _wait_done(self.system, self.conn, self.portal, n, base + n, _drain_timeout(n))
        cpu = worker.cpu_s() - cpu0
        time.sleep(0.2)
        arrivals = self.portal.arrivals()
        last = max((at for _, at in arrivals), default=done_at)
        return {
            "changes": n,
            "complete": complete,
            **_tally(records, arrivals),
            "seconds": last - started,
            "per_s": n / (last - started),
            "writer_s": commits[-1] - started,
            "cpu_ms_per_sync": cpu * 1000 / n,
        }

    def backlog(self) -> dict[str, Any]:
        n = self.settings.mentors
        changes, records = self.mentors.flip(range(n))
        base = self.outcomes()
        _write(self.system, self.url, changes)
        self.portal.reset(self.delay_ms)
        worker = self.start()
        try:
            complete, done_at = _wait_done(self.system, self.conn, self.portal, n, base + n, _drain_timeout(n))
            cpu = worker.cpu_s()
            time.sleep(0.2)
            arrivals = self.portal.arrivals()
        finally:
            self.stop(worker)
        times = sorted(at for _, at in arrivals)
        span = (times[-1] - times[0]) if len(times) > 1 else float("nan")
        return {
            "changes": n,
            "complete": complete,
            **_tally(records, arrivals),
            "seconds": span,
            "per_s": n / span if span and span == span else None,
            "start_to_done_s": done_at - worker.started_at,
            "cpu_ms_per_sync_with_start": cpu * 1000 / n,
        }

    def crash(self, drain_per_s: float | None) -> dict[str, Any]:
        s = self.settings
        n = min(s.crash_changes, s.mentors)
        changes, records = self.mentors.flip(range(n))
        _write(self.system, self.url, changes)
        self.portal.reset(0)
        first = self.start()
        reached_half = self.portal.wait_count(n // 2, _drain_timeout(n))
        first.kill()
        self.peak_rss_mb = max(self.peak_rss_mb, first.peak_rss_mb)
        at_kill = self.portal.arrivals()
        delivered_at_kill = len({r for r, _ in at_kill})
        second = self.start()
        restarted = second.started_at
        deadline = restarted + s.crash_timeout_s
        wanted = set(records)
        all_at: float | None = None
        idle_at: float | None = None
        try:
            while time.monotonic() < deadline:
                if all_at is None and self.portal.count() >= n:
                    first_seen: dict[str, float] = {}
                    for record, at in self.portal.arrivals():
                        first_seen.setdefault(record, at)
                    if wanted <= first_seen.keys():
                        all_at = max(first_seen[r] for r in wanted)
                if all_at is not None and self.system.idle(self.conn):
                    idle_at = time.monotonic()
                    break
                time.sleep(0.05)
            time.sleep(0.3)
            arrivals = self.portal.arrivals()
        finally:
            self.stop(second)
        after = sorted(at for _, at in arrivals if at >= restarted)
        remaining = n - delivered_at_kill
        first_after = (after[0] - restarted) if after else None
        recovery = (all_at - restarted) if all_at is not None else None
        stuck = None
        if recovery is not None and first_after is not None and drain_per_s:
            stuck = max(0.0, recovery - first_after - remaining / drain_per_s)
        return {
            "changes": n,
            "killed_at_half": reached_half,
            "delivered_at_kill": delivered_at_kill,
            **_tally(records, arrivals),
            "restart_to_first_patch_s": first_after,
            "restart_to_all_delivered_s": recovery,
            "restart_to_idle_s": (idle_at - restarted) if idle_at is not None else None,
            "stuck_wait_s": stuck,
            "timeout_s": s.crash_timeout_s,
        }


def run_system(system: System, portal: PortalProcess, settings: Settings, tag: str) -> dict[str, Any]:
    """Every phase of one system on its own scratch database; a dict of figures per phase and delay."""
    name = f"bench_peers_{system.name}_{tag}"
    result: dict[str, Any] = {"system": system.name, "phases": {}}
    with scratch_database(settings.admin_url, name) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            system.install(conn)
        asyncio.run(system.install_async(url))
        run = _Run(system, url, portal, settings, tag)
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                system.seed(conn, run.mentors.rows)
            drain_0: float | None = None
            for delay in settings.delays_ms:
                key = f"{delay:g}ms"
                run.delay_ms = delay
                portal.reset(delay)
                worker = run.start()
                try:
                    worker.wait_ready()
                    run.warm_up()
                    paced = run.paced(worker)
                    stream = run.stream(worker)
                finally:
                    run.stop(worker)
                result["phases"][key] = {"paced": paced, "stream": stream}
                if system.durable:
                    backlog = run.backlog()
                    result["phases"][key]["backlog"] = backlog
                    if delay == 0:
                        drain_0 = backlog["per_s"]
            if system.durable and settings.crash_changes:
                run.delay_ms = 0.0
                result["crash"] = run.crash(drain_0)
            result["peak_rss_mb"] = run.peak_rss_mb
        finally:
            run.close()
    return result


# -- memory at many known mentors -------------------------------------------------------------------------------

_HISTORY = """
INSERT INTO event_log (mentor_id, kind, data)
SELECT id, 'status_changed', jsonb_build_object('cause', 'mentor_created', 'status', status,
                                                 'previous_status', NULL, 'portal_record_id', portal_record_id)
FROM mentors ORDER BY id;
INSERT INTO event_log (mentor_id, kind, data)
SELECT e.mentor_id, 'attempt_succeeded',
       jsonb_build_object('operation', 'restore', 'attempt', 1, 'http_status', 204, 'for_seq', e.seq,
                          'duration_ms', 40.0, 'snapshot', s.snap)
FROM event_log e,
     LATERAL (SELECT (pg_current_xact_id()::text::bigint + 1)::text || ':'
                     || (pg_current_xact_id()::text::bigint + 1)::text || ':' AS snap) AS s
WHERE e.kind = 'status_changed'
ORDER BY e.seq;
"""


def _known_history(url: str) -> dict[str, Any]:
    """Give hlf_actors a past with every mentor: created, then synced; the projection rebuilt by ``replay``."""
    from hlf_actors import replay

    with psycopg.connect(url) as conn:
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(_HISTORY)
    report = replay.replay(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        rows = conn.execute("SELECT state, count(*) FROM sync_status GROUP BY state").fetchall()
    return {"replayed_events": report.events, "sync_status": {str(k): int(v) for k, v in rows}}


def run_memory(
    system: System, portal: PortalProcess, settings: Settings, tag: str, known: int, active: int
) -> dict[str, Any]:
    """RSS of the worker with ``known`` mentors in the database and ``active`` of them changed once."""
    name = f"bench_peers_mem_{system.name}_{tag}"
    with scratch_database(settings.admin_url, name) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            system.install(conn)
        asyncio.run(system.install_async(url))
        sized = Settings(**{**settings.__dict__, "mentors": known - WARM_UP})
        run = _Run(system, url, portal, sized, f"mem-{tag}")
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                system.seed(conn, run.mentors.rows)
            result: dict[str, Any] = {"known": len(run.mentors.rows), "active": active}
            if system.kind == "ours":
                result.update(_known_history(url))
                if set(result["sync_status"]) != {"in_sync"}:
                    result["error"] = "the seeded history did not leave every mentor in_sync; not measured"
                    return result
            portal.reset(0)
            worker = run.start()
            try:
                worker.wait_ready()
                time.sleep(0.5)
                result["rss_ready_mb"] = worker.rss_mb()
                changes, records = run.mentors.flip(range(0, known, max(1, known // active))[:active])
                base = run.outcomes()
                _write(system, url, changes)
                complete, _ = _wait_done(system, run.conn, portal, len(changes), base + len(changes), 120)
                result.update(complete=complete, **_tally(records, portal.arrivals()))
                result["rss_after_mb"] = worker.rss_mb()
                result["peak_rss_mb"] = worker.sample_peak()
            finally:
                run.stop(worker)
        finally:
            run.close()
    return result


# -- floors -----------------------------------------------------------------------------------------------------


def _floor_worker(module: str, args: list[str], log: Path) -> Worker:
    import os
    import sys

    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return Worker([sys.executable, "-m", f"bench.peers.workers.{module}", *args], env, log, "ready")


def _last_json(worker: Worker, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while worker.running and time.monotonic() < deadline:
        time.sleep(0.02)
    if worker.running:
        worker.kill()
        raise RuntimeError(f"{worker.argv[2]} did not finish within {timeout_s:.0f}s:\n{worker.log_tail()}")
    for line in reversed(worker.log_path.read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{worker.argv[2]} printed no result:\n{worker.log_tail()}")


async def _notify_paced(url: str, n: int, rate: float) -> list[float]:
    commits: list[float] = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        next_at = time.monotonic()
        for i in range(n):
            await conn.execute("SELECT pg_notify('bench_rtt', %s)", (str(i),))
            commits.append(time.monotonic())
            next_at += 1.0 / rate
            pause = next_at - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
        await conn.execute("SELECT pg_notify('bench_rtt', 'stop')")
    return commits


def run_listen_notify(settings: Settings, tag: str) -> dict[str, Any]:
    """Commit of a NOTIFY (one statement, one transaction) → a LISTENing process has it, paced like ``paced``."""
    n = int(settings.rate * settings.seconds)
    with scratch_database(settings.admin_url, f"bench_peers_notify_{tag}") as url:
        listener = _floor_worker("notify_listener", ["--dsn", url], settings.logs / f"{tag}-listen_notify.log")
        listener.start().wait_ready()
        try:
            commits = asyncio.run(_notify_paced(url, n, settings.rate))
            seen = _last_json(listener, 30)
        finally:
            listener.kill()
    latencies = [(seen[str(i)] - commits[i]) * 1000 for i in range(n) if str(i) in seen]
    return {
        "changes": n,
        "lost": n - len(latencies),
        "p50_ms": statistics.median(latencies),
        "p90_ms": _percentile(latencies, 0.90),
        "p99_ms": _percentile(latencies, 0.99),
        "max_ms": max(latencies),
    }


def run_httpx_alone(portal: PortalProcess, settings: Settings, tag: str) -> dict[str, Any]:
    """The client alone: ``mentors`` PATCHes, ten in flight, at each portal delay: requests/s and CPU ms/request."""
    result: dict[str, Any] = {}
    for delay in settings.delays_ms:
        portal.reset(delay)
        log = settings.logs / f"{tag}-httpx-{delay:g}ms.log"
        worker = _floor_worker("httpx_alone", ["--portal", portal.url, "--requests", str(settings.mentors)], log)
        worker.start()
        out = _last_json(worker, _drain_timeout(settings.mentors))
        result[f"{delay:g}ms"] = {
            "requests": out["requests"],
            "per_s": out["requests"] / out["seconds"],
            "cpu_ms_per_request": out["cpu_s"] * 1000 / out["requests"],
        }
    return result
