"""What the acceptance tests share: the outside world of one test, seen only from where a user stands.

A ``World`` is one test's database (through the mentor app's own connection), fake portal, fake FCM and the real
``hlf-actors run`` processes it starts. It changes data with plain SQL and reads back only what a user can observe:
the requests the portal received, the FCM messages, and the rows of ``event_log``, ``sync_status`` and
``dead_letters``. Waiting is polling that state against a deadline; a timeout says what it waited for and shows the
service's log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg

from hlf_actors.testing.fake_fcm import FakeFCM
from hlf_actors.testing.fake_portal import FakePortal, Reply
from hlf_actors.testing.process import ServiceProcess, service_env
from hlf_actors.testing.seed import add_device, add_mentor, add_organisation

__all__ = ["DEVICES", "FINAL_OUTCOMES", "OUTCOMES", "TOPIC", "Mentor", "PortalScenarios", "World", "digest"]

# Two coordinator phones and a topic: a sync-failure alert must reach all three. Their first eight characters
# differ, so the shortened targets in alert events tell them apart.
DEVICES = ("phone-a1-registration-token-for-tests-0001", "phone-b2-registration-token-for-tests-0002")
TOPIC = "org-coordinators"
# Event kinds that answer a change: the outcome of an attempt to bring the portal in line; the final ones end it.
OUTCOMES = frozenset({"attempt_succeeded", "attempt_failed", "sync_skipped", "dead_lettered"})
FINAL_OUTCOMES = frozenset({"attempt_succeeded", "sync_skipped", "dead_lettered"})


@dataclass(frozen=True)
class Mentor:
    id: UUID
    record: UUID  # the mentor's portal_record_id: the portal record the service PATCHes


class PortalScenarios:
    """The fake portal's common behaviours, by the names the tracker uses. ``record=None`` means every record."""

    def __init__(self, portal: FakePortal) -> None:
        self._portal = portal

    def always_success(self, record: UUID | None = None) -> None:
        self._portal.always(None, record)

    def always_503(self, record: UUID | None = None) -> None:
        self._portal.always(Reply(status=503), record)

    def fail_twice_then_succeed(self, record: UUID) -> None:
        self._portal.fail_then_succeed(record, failures=2, status=503)

    def permanent_403(self, record: UUID, *, delay_s: float = 0.0) -> None:
        self._portal.always(Reply(status=403, delay_s=delay_s), record)

    def throttled(self, record: UUID, *, retry_after_s: int = 1, times: int = 1) -> None:
        """429 with ``Retry-After: retry_after_s`` for the next ``times`` PATCHes, then normal service."""
        self._portal.throttle(record, retry_after_s=retry_after_s, times=times)

    def hanging(self, *, delay_s: float) -> None:
        """Every PATCH hangs ``delay_s`` and is then answered 204 without being applied: requests stay in flight."""
        self._portal.always(Reply(status=204, delay_s=delay_s, apply=False))


def digest(kind: str, data: dict[str, Any]) -> tuple[Any, ...]:
    """The facts of one event that a test pins down, as a short tuple (what `hlf-actors status` would tell)."""
    if kind == "status_changed":
        cause = data["cause"]
        if cause.startswith("certification_"):
            return (kind, cause, data["expires_on"])
        return (kind, cause, data["previous_status"], data["status"])
    if kind == "attempt_succeeded":
        return (kind, data["operation"], data["attempt"], data["http_status"])
    if kind == "attempt_failed":
        return (kind, data["operation"], data["attempt"], data["http_status"], data["retryable"], data["delay_ms"])
    if kind == "dead_lettered":
        return (kind, data["operation"], data["attempts"])
    if kind in ("alert_sent", "alert_failed"):
        return (kind, data["alert"], data["target"])
    return (kind,)


class World:
    """One test's outside world. Every process it starts is stopped when the test ends, pass or fail."""

    def __init__(
        self, db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, fcm: FakeFCM, workdir: Path
    ) -> None:
        self.db_url = db_url
        self.conn = conn
        self.portal = portal
        self.fcm = fcm
        self.scenarios = PortalScenarios(portal)
        self._workdir = workdir
        self._fcm_env = fcm.env(workdir / "fcm-service-account.json")
        self.processes: list[ServiceProcess] = []
        self.org = add_organisation(conn, "Acceptance organisation", alert_topic=TOPIC)
        for token in DEVICES:
            add_device(conn, self.org, token)

    # -- the service -------------------------------------------------------------------------------------------

    def start(self, **env: str) -> ServiceProcess:
        """Start `hlf-actors run` (``env`` overrides the test defaults) and wait until it leads and listens."""
        process = self.spawn(**env)
        process.wait_leader()
        self._wait_for_startup_expiry_check()
        return process

    def spawn(self, **env: str) -> ServiceProcess:
        """Start `hlf-actors run` and return at once: for a standby, or a process expected to fail."""
        log_path = self._workdir / f"service-{len(self.processes) + 1}.log"
        process = ServiceProcess(service_env(self.db_url, self.portal.env(), self._fcm_env, **env), log_path)
        self.processes.append(process)
        return process.start()

    def _wait_for_startup_expiry_check(self) -> None:
        """On start the leader runs the certification-expiry check of the last night it may have missed; it moves
        active mentors without a valid certification to expired_cert. Tests change mentors only once that run is
        recorded (hlf_job_runs), so it never races them. A build without the nightly job has nothing to wait for."""
        found = self.conn.execute("SELECT to_regclass('hlf_job_runs') IS NOT NULL").fetchone()
        if found is None or not found[0]:
            return
        done = "SELECT count(*) FROM hlf_job_runs WHERE job = 'cert_expiry' AND outcome = 'ok'"
        self.wait(lambda: self.conn.execute(done).fetchone() != (0,), "the start-up certification-expiry check")

    def close(self) -> None:
        for process in self.processes:
            process.close()

    def logs(self) -> str:
        return "\n".join(process.log_tail() for process in self.processes) or "(no service was started)"

    # -- the mentor app's side ---------------------------------------------------------------------------------

    def add_mentor(
        self, *, status: str = "active", cert_valid_days: int | None = 365, listed: bool = True, name: str = "Mentor"
    ) -> Mentor:
        mentor_id, record = add_mentor(
            self.conn,
            self.org,
            portal=self.portal,
            name=name,
            status=status,
            cert_valid_days=cert_valid_days,
            listed=listed,
        )
        assert record is not None
        return Mentor(mentor_id, record)

    def set_status(self, status: str, *mentors: Mentor) -> None:
        """One UPDATE statement, one transaction, however many mentors."""
        self.conn.execute("UPDATE mentors SET status = %s WHERE id = ANY(%s)", (status, [m.id for m in mentors]))

    # -- observing ---------------------------------------------------------------------------------------------

    def wait(self, check: Callable[[], object], what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}\n{self.logs()}")
            time.sleep(0.01)

    def state(self, mentor: Mentor) -> str | None:
        row = self.conn.execute("SELECT state FROM sync_status WHERE mentor_id = %s", (mentor.id,)).fetchone()
        return None if row is None else str(row[0])

    def wait_state(self, state: str, *mentors: Mentor, timeout: float = 10.0) -> None:
        self.wait(lambda: all(self.state(m) == state for m in mentors), f"{len(mentors)} mentor(s) {state}", timeout)

    def settle(self, *mentors: Mentor, after: int = 0, timeout: float = 10.0) -> None:
        """Wait until each mentor has a final outcome logged after seq ``after`` and its sync is no longer open."""

        def settled(mentor: Mentor) -> bool:
            final = any(kind in FINAL_OUTCOMES for kind in self.kinds(mentor, after=after))
            return final and self.state(mentor) in ("in_sync", "dead_lettered")

        self.wait(lambda: all(settled(m) for m in mentors), f"{len(mentors)} mentor(s) to settle after seq {after}")

    def settle_and_mark(self, *mentors: Mentor) -> int:
        """Settle ``mentors``, forget the portal's requests so far and return the log's last seq: what the test does
        next is read after it (``settle(..., after=mark)``, ``story(..., after=mark)``)."""
        self.settle(*mentors)
        self.portal.clear_requests()
        return self.last_seq()

    def sync_row(self, mentor: Mentor) -> tuple[Any, ...] | None:
        row = self.conn.execute(
            "SELECT operation, state, attempts, last_error FROM sync_status WHERE mentor_id = %s", (mentor.id,)
        ).fetchone()
        return None if row is None else tuple(row)

    def events(self, mentor: Mentor, *, after: int = 0) -> list[tuple[int, str, dict[str, Any]]]:
        rows = self.conn.execute(
            "SELECT seq, kind, data FROM event_log WHERE mentor_id = %s AND seq > %s ORDER BY seq", (mentor.id, after)
        ).fetchall()
        return [(int(seq), str(kind), dict(data)) for seq, kind, data in rows]

    def story(self, mentor: Mentor, *, after: int = 0) -> list[tuple[Any, ...]]:
        """The mentor's audit log as digests, in seq order."""
        return [digest(kind, data) for _, kind, data in self.events(mentor, after=after)]

    def kinds(self, mentor: Mentor, *, after: int = 0) -> list[str]:
        return [kind for _, kind, _ in self.events(mentor, after=after)]

    def count(self, mentor: Mentor, kind: str) -> int:
        return self.kinds(mentor).count(kind)

    def last_seq(self) -> int:
        row = self.conn.execute("SELECT coalesce(max(seq), 0) FROM event_log").fetchone()
        assert row is not None
        return int(row[0])

    def outages(self) -> list[str]:
        """Portal-wide outage events: none may appear when only one mentor's requests fail."""
        rows = self.conn.execute(
            "SELECT kind FROM event_log WHERE mentor_id IS NULL AND kind IN ('circuit_opened', 'circuit_closed') "
            "ORDER BY seq"
        ).fetchall()
        return [str(kind) for (kind,) in rows]

    def dead_letters(self, mentor: Mentor | None = None) -> list[tuple[Any, ...]]:
        rows = self.conn.execute(
            "SELECT id, mentor_id, operation, attempts, last_error, requeued_at FROM dead_letters "
            "WHERE %s::uuid IS NULL OR mentor_id = %s ORDER BY id",
            (mentor.id if mentor else None, mentor.id if mentor else None),
        ).fetchall()
        return [tuple(r) for r in rows]

    def created(self, mentor: Mentor, status: str = "active") -> list[tuple[Any, ...]]:
        """The story of a mentor inserted as the mentor app does: one status_changed for the mentor row, one for
        each certification inserted with it."""
        rows = self.conn.execute(
            "SELECT expires_on::text FROM certifications WHERE mentor_id = %s ORDER BY expires_on", (mentor.id,)
        ).fetchall()
        return [
            ("status_changed", "mentor_created", None, status),
            *[("status_changed", "certification_insert", expires_on) for (expires_on,) in rows],
        ]

    def bodies(self, mentor: Mentor) -> list[Any]:
        return [p.json() for p in self.portal.patches(mentor.record)]
