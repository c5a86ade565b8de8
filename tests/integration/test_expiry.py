"""The nightly certification-expiry check: reminders once per threshold, the move to expired_cert, the scheduler.

Time never passes for real here: nights are run for a given date, and the scheduler is driven by a clock the test
moves.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

import anyio
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from hlf_actors.alerts import Alerting
from hlf_actors.config import Config, load_config
from hlf_actors.expiry import NightReport, run_night
from hlf_actors.fcm import FirebaseAlertSender
from hlf_actors.nightly import nightly_forever
from hlf_actors.push import AlertSender, Delivery
from hlf_actors.testing.fake_fcm import FakeFCM
from hlf_actors.testing.fake_portal import FakePortal
from hlf_actors.testing.harness import eventually, running_service
from hlf_actors.testing.recording import RecordingAlertSender
from hlf_actors.testing.seed import add_certification, add_device, add_mentor, add_organisation

pytestmark = pytest.mark.anyio

NIGHT = date(2025, 3, 11)
OSLO = ZoneInfo("Europe/Oslo")
DEVICE = "coordinator-phone-registration-token-0001"
OTHER_DEVICE = "coordinator-phone-registration-token-0002"


# -- fixtures and helpers ---------------------------------------------------------------------------------------


@pytest.fixture
def recorder() -> RecordingAlertSender:
    return RecordingAlertSender()


@pytest.fixture
def alerting(pool: AsyncConnectionPool[Any], recorder: RecordingAlertSender) -> Alerting:
    return Alerting(pool, recorder, ops_topic="ops", retry_delays_s=(0.01,))


async def night(alerting: Alerting, pool: AsyncConnectionPool[Any], day: date, **kwargs: Any) -> NightReport:
    return await run_night(pool, alerting, today=day, job_lock_owner="test", **kwargs)


def mentor(conn: psycopg.Connection[Any], org: UUID, expires_on: date | None, **kwargs: Any) -> UUID:
    """An active mentor (unless told otherwise) whose one certification expires on ``expires_on``."""
    mentor_id, _ = add_mentor(conn, org, cert_valid_days=None, **kwargs)
    if expires_on is not None:
        add_certification(conn, mentor_id, expires_on)
    return mentor_id


def reminded(conn: psycopg.Connection[Any], mentor_id: UUID) -> list[tuple[int, int, str, str]]:
    """The mentor's reminder_sent events: (threshold_day, days_left, certification_expiry_date, night)."""
    rows = conn.execute(
        "SELECT data FROM event_log WHERE mentor_id = %s AND kind = 'reminder_sent' ORDER BY seq", (mentor_id,)
    ).fetchall()
    return [(d["threshold_day"], d["days_left"], d["certification_expiry_date"], d["night"]) for (d,) in rows]


def events(conn: psycopg.Connection[Any], mentor_id: UUID, kind: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT data FROM event_log WHERE mentor_id = %s AND kind = %s ORDER BY seq", (mentor_id, kind)
    ).fetchall()
    return [r[0] for r in rows]


def status(conn: psycopg.Connection[Any], mentor_id: UUID) -> str:
    row = conn.execute("SELECT status FROM mentors WHERE id = %s", (mentor_id,)).fetchone()
    assert row is not None
    return str(row[0])


def reminder_rows(conn: psycopg.Connection[Any], mentor_id: UUID) -> list[tuple[int, date, bool, bool]]:
    """(threshold_day, certification_expiry_date, superseded, pushed) of the mentor's cert_expiry_reminders."""
    rows = conn.execute(
        "SELECT threshold_day, certification_expiry_date, superseded, pushed_at IS NOT NULL "
        "FROM cert_expiry_reminders WHERE mentor_id = %s ORDER BY certification_expiry_date, threshold_day DESC",
        (mentor_id,),
    ).fetchall()
    return [tuple(r) for r in rows]


def pushes(recorder: RecordingAlertSender) -> list[tuple[str, str]]:
    return [(m["mentor_id"], m["days_left"]) for m in recorder.data_messages() if m["type"] == "cert_expiry_reminder"]


def config(db_url: str, **env: str) -> Config:
    return load_config({"HLF_DATABASE_URL": db_url, **env}, dotenv=None)


class SteppedClock:
    """A clock whose time moves only when the test says: ``sleep`` returns once the test has moved past its end.

    ``advance_to`` moves it; with ``auto=True`` every sleep moves it itself (time flies), until ``stop_at``, where
    sleeps park for good and ``parked`` is set.
    """

    def __init__(self, now: datetime, *, auto: bool = False, stop_at: datetime | None = None) -> None:
        self._now = now
        self._auto = auto
        self._stop_at = stop_at
        self._moved = anyio.Event()
        self.parked = anyio.Event()
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        return self._now

    def today(self, zone: ZoneInfo) -> date:
        return self._now.astimezone(zone).date()

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        until = self._now + timedelta(seconds=seconds)
        if self._auto and (self._stop_at is None or until <= self._stop_at):
            self.advance_to(until)
            await anyio.lowlevel.checkpoint()
            return
        if self._stop_at is not None and until > self._stop_at:
            self.parked.set()
        while self._now < until:
            await self._moved.wait()

    def advance_to(self, when: datetime) -> None:
        self._now = when
        moved, self._moved = self._moved, anyio.Event()
        moved.set()


async def always_leader() -> None:
    return None


# -- the rules ------------------------------------------------------------------------------------------------


async def test_reminders_at_30_14_7_and_at_an_organisations_own_60_10(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any], fcm: FakeFCM, fcm_env: dict[str, str]
) -> None:
    default_org = add_organisation(conn, "Default thresholds")
    add_device(conn, default_org, DEVICE)
    custom_org = add_organisation(conn, "Own thresholds", reminder_days=[60, 10], alert_topic="custom-coordinators")
    add_device(conn, custom_org, OTHER_DEVICE)
    expiry = NIGHT + timedelta(days=65)
    a = mentor(conn, default_org, expiry, name="Default")
    b = mentor(conn, custom_org, expiry, name="Custom")
    sender = FirebaseAlertSender(
        fcm_env["HLF_FCM_CREDENTIALS"], fcm_url=fcm_env["HLF_FCM_URL"], app_name=f"t-{uuid4()}"
    )
    alerting = Alerting(pool, sender, ops_topic="ops", retry_delays_s=(0.01,))
    try:
        # Every night from 65 days before the expiry to the day after it.
        reports = [await night(alerting, pool, NIGHT + timedelta(days=i)) for i in range(67)]
    finally:
        await sender.aclose()

    def on(days_left: int) -> str:
        return (expiry - timedelta(days=days_left)).isoformat()

    assert reminded(conn, a) == [(t, t, expiry.isoformat(), on(t)) for t in (30, 14, 7)]
    assert reminded(conn, b) == [(t, t, expiry.isoformat(), on(t)) for t in (60, 10)]
    to_default = [m.data for m in fcm.messages() if m.message.get("token") == DEVICE]
    assert to_default == [
        {"type": "cert_expiry_reminder", "mentor_id": str(a), "days_left": d} for d in ("30", "14", "7")
    ]
    to_custom = [m.data for m in fcm.messages() if m.message.get("token") == OTHER_DEVICE]
    assert to_custom == [{"type": "cert_expiry_reminder", "mentor_id": str(b), "days_left": d} for d in ("60", "10")]
    assert [m.data["days_left"] for m in fcm.messages() if m.message.get("topic") == "custom-coordinators"] == [
        "60",
        "10",
    ]
    assert len(events(conn, a, "alert_sent")) == 3 and len(events(conn, b, "alert_sent")) == 4  # device + topic
    assert sum(r.reminders_sent for r in reports) == 5
    # Valid through the expiry date; the night after, both move to expired_cert, once.
    assert [r.transitioned for r in reports[-2:]] == [0, 2]
    assert status(conn, a) == status(conn, b) == "expired_cert"
    [transition] = events(conn, a, "auto_transitioned")
    assert transition == {
        "from": "active",
        "to": "expired_cert",
        "today": (expiry + timedelta(days=1)).isoformat(),
        "certification_expiry_date": expiry.isoformat(),
    }


async def test_running_a_night_three_times_reminds_once_and_transitions_once(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any], alerting: Alerting, recorder: RecordingAlertSender
) -> None:
    org = add_organisation(conn)
    add_device(conn, org, DEVICE)
    due = mentor(conn, org, NIGHT + timedelta(days=14))
    lapsed = mentor(conn, org, NIGHT - timedelta(days=1))
    paused_lapsed = mentor(conn, org, NIGHT - timedelta(days=3), status="paused")
    paused_due = mentor(conn, org, NIGHT + timedelta(days=7), status="paused")

    first, second, third = [await night(alerting, pool, NIGHT) for _ in range(3)]
    again = await night(alerting, pool, NIGHT, rerun=True)  # past the "already done" record: the SQL is idempotent

    assert (first.outcome, first.reminders_sent, first.transitioned) == ("done", 1, 1)
    assert first.reminders_by_threshold == {14: 1}
    assert (second.outcome, third.outcome) == ("already_done", "already_done")
    assert "by test at" in (second.holder or "")
    assert (again.outcome, again.reminders_sent, again.transitioned, again.skipped_already_done) == ("done", 0, 0, 1)
    assert pushes(recorder) == [(str(due), "14")]
    assert reminded(conn, due) == [(14, 14, (NIGHT + timedelta(days=14)).isoformat(), NIGHT.isoformat())]
    assert reminder_rows(conn, due) == [
        (30, NIGHT + timedelta(days=14), True, False),
        (14, NIGHT + timedelta(days=14), False, True),
    ]
    assert status(conn, lapsed) == "expired_cert"
    assert len(events(conn, lapsed, "auto_transitioned")) == 1
    changes = [(e["cause"], e.get("status")) for e in events(conn, lapsed, "status_changed")]
    assert changes == [("mentor_created", "active"), ("certification_insert", None), ("mentor_updated", "expired_cert")]
    assert (status(conn, paused_lapsed), status(conn, paused_due)) == ("paused", "paused")  # paused stays paused
    assert reminded(conn, paused_due) == [] and events(conn, paused_lapsed, "auto_transitioned") == []
    assert conn.execute("SELECT hlf_expire_certifications(%s)", (NIGHT,)).fetchone() == (0,)
    runs = conn.execute("SELECT run_key, outcome, attempts, owner FROM hlf_job_runs").fetchall()
    assert runs == [(NIGHT.isoformat(), "ok", 2, "test")]


async def test_a_missed_night_sends_the_most_urgent_reminder_once(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any], alerting: Alerting, recorder: RecordingAlertSender
) -> None:
    org = add_organisation(conn)
    add_device(conn, org, DEVICE)
    never = mentor(conn, org, NIGHT + timedelta(days=6), name="Never reminded")
    late = mentor(conn, org, NIGHT + timedelta(days=30), name="Reminded at 30, then nights missed")
    await night(alerting, pool, NIGHT)  # `late` gets the 30-day one on time; `never` is found at 6 days left

    # The service was down for 20 nights: `late` is now at 10 days left, past 14 but not 7.
    later = NIGHT + timedelta(days=20)
    for day in range(6):
        await night(alerting, pool, later + timedelta(days=day))

    assert reminded(conn, never) == [(7, 6, (NIGHT + timedelta(days=6)).isoformat(), NIGHT.isoformat())]
    assert [(t, s, p) for t, _, s, p in reminder_rows(conn, never)] == [
        (30, True, False),
        (14, True, False),
        (7, False, True),
    ]
    assert [(t, d) for t, d, _, _ in reminded(conn, late)] == [(30, 30), (14, 10), (7, 7)]
    first_night, later_nights = pushes(recorder)[:2], pushes(recorder)[2:]  # one night's pushes run concurrently
    assert sorted(first_night) == sorted([(str(never), "6"), (str(late), "30")])
    assert later_nights == [(str(late), "10"), (str(late), "7")]


async def test_a_renewed_certificate_starts_a_fresh_set_and_is_not_expired(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any], alerting: Alerting, recorder: RecordingAlertSender
) -> None:
    org = add_organisation(conn)
    add_device(conn, org, DEVICE)
    old_expiry = NIGHT + timedelta(days=7)
    renewing = mentor(conn, org, old_expiry)
    await night(alerting, pool, NIGHT)
    new_expiry = old_expiry + timedelta(days=365)
    add_certification(conn, renewing, new_expiry)

    for day in (NIGHT + timedelta(days=1), old_expiry + timedelta(days=1), new_expiry - timedelta(days=30)):
        await night(alerting, pool, day)

    assert status(conn, renewing) == "active"
    assert [(t, d, e) for t, d, e, _ in reminded(conn, renewing)] == [
        (7, 7, old_expiry.isoformat()),
        (30, 30, new_expiry.isoformat()),
    ]
    assert pushes(recorder) == [(str(renewing), "7"), (str(renewing), "30")]


async def test_reminder_days_must_be_distinct_positive_and_not_empty(conn: psycopg.Connection[Any]) -> None:
    for bad in ([], [30, 30], [0, 7], [-1], [14, None]):
        with pytest.raises(psycopg.errors.CheckViolation) as caught:
            add_organisation(conn, reminder_days=bad)  # type: ignore[arg-type]
        assert "reminder_days must be a non-empty list of distinct positive numbers of days" in str(caught.value)
    org = add_organisation(conn, reminder_days=[60, 10])
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE organisations SET reminder_days = '{10,10}' WHERE id = %s", (org,))
    assert conn.execute("SELECT reminder_days FROM organisations WHERE id = %s", (org,)).fetchone() == ([60, 10],)


async def test_queries_do_not_grow_with_the_number_of_mentors(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any], alerting: Alerting, recorder: RecordingAlertSender
) -> None:
    org = add_organisation(conn)
    add_device(conn, org, DEVICE)
    mentor(conn, org, NIGHT + timedelta(days=7))
    mentor(conn, org, NIGHT - timedelta(days=1))
    one = await night(alerting, pool, NIGHT)
    # 300 more mentors, one more night: 100 due a reminder, 100 lapsed, 100 not due.
    conn.execute(
        "WITH m AS (INSERT INTO mentors (organisation_id, full_name) "
        "  SELECT %s, 'Bulk ' || i FROM generate_series(1, 300) i RETURNING id, full_name) "
        "INSERT INTO certifications (mentor_id, expires_on) "
        "SELECT id, %s::date + (ARRAY[6, -1, 45])[1 + split_part(full_name, ' ', 2)::int %% 3] FROM m",
        (org, NIGHT + timedelta(days=1)),
    )
    many = await night(alerting, pool, NIGHT + timedelta(days=1))
    assert (one.reminders_sent, one.transitioned) == (1, 1)
    assert (many.reminders_sent, many.transitioned) == (100, 100)
    assert many.queries == one.queries
    assert len(pushes(recorder)) == 101


# -- crashes and concurrency ----------------------------------------------------------------------------------


class BrokenOnce:
    """A sender whose first send raises, as if the process died mid-push; then a working one."""

    def __init__(self, then: AlertSender) -> None:
        self._then = then
        self.broke = False

    async def send(
        self, data: Mapping[str, str], *, tokens: Sequence[str] = (), topic: str | None = None, notice: Any = None
    ) -> list[Delivery]:
        if not self.broke:
            self.broke = True
            raise RuntimeError("the process died here")
        return await self._then.send(data, tokens=tokens, topic=topic, notice=notice)

    async def aclose(self) -> None:
        await self._then.aclose()


async def test_a_night_that_failed_half_way_is_finished_by_the_next_run_without_repeats(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any], recorder: RecordingAlertSender, org: UUID
) -> None:
    add_device(conn, org, DEVICE)
    due = mentor(conn, org, NIGHT + timedelta(days=14))
    alerting = Alerting(pool, BrokenOnce(recorder), ops_topic="ops")

    with pytest.raises(BaseException) as failed:
        await night(alerting, pool, NIGHT)
    assert "the process died here" in repr(failed.value)
    assert conn.execute("SELECT outcome FROM hlf_job_runs").fetchone() == ("failed",)
    assert reminder_rows(conn, due)[-1] == (14, NIGHT + timedelta(days=14), False, False)  # claimed, not pushed

    retried = await night(alerting, pool, NIGHT)
    once_more = await night(alerting, pool, NIGHT + timedelta(days=1))

    assert (retried.outcome, retried.reminders_sent, once_more.reminders_sent) == ("done", 1, 0)
    assert pushes(recorder) == [(str(due), "14")]
    assert len(reminded(conn, due)) == 1
    assert conn.execute(
        "SELECT outcome, attempts FROM hlf_job_runs WHERE run_key = %s", (NIGHT.isoformat(),)
    ).fetchone() == ("ok", 2)


class HeldSender(RecordingAlertSender):
    """Records like RecordingAlertSender, but every send waits until the test lets go."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = anyio.Event()
        self.release = anyio.Event()

    async def send(
        self, data: Mapping[str, str], *, tokens: Sequence[str] = (), topic: str | None = None, notice: Any = None
    ) -> list[Delivery]:
        self.entered.set()
        await self.release.wait()
        return await super().send(data, tokens=tokens, topic=topic, notice=notice)


async def test_two_concurrent_runs_and_a_manual_one_never_run_a_night_twice(
    db_url: str, conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any], tmp_path: Path, org: UUID
) -> None:
    add_device(conn, org, DEVICE)
    due = mentor(conn, org, NIGHT + timedelta(days=7))
    held = HeldSender()
    alerting = Alerting(pool, held, ops_topic="ops")
    results: list[NightReport] = []

    async with anyio.create_task_group() as tg:

        async def scheduled() -> None:
            results.append(await run_night(pool, alerting, today=NIGHT, job_lock_owner="scheduler A"))

        tg.start_soon(scheduled)
        with anyio.fail_after(10):
            await held.entered.wait()  # the first run is pushing, its lock held
        other_process = await run_night(pool, alerting, today=NIGHT, job_lock_owner="scheduler B")
        other_night = await run_night(pool, alerting, today=NIGHT + timedelta(days=1), job_lock_owner="scheduler B")
        manual = await check_expiry(db_url, tmp_path, "--date", NIGHT.isoformat())
        held.release.set()

    assert other_process.outcome == other_night.outcome == "already_running"
    assert "scheduler A, night of 2025-03-11" in (other_process.holder or "")
    assert manual.returncode == 1
    [line] = manual.stderr.decode().strip().splitlines()
    assert line.startswith("hlf-actors check-expiry: night of 2025-03-11: already being checked by scheduler A, ")
    assert [r.outcome for r in results] == ["done"] and results[0].reminders_sent == 1
    assert len(held.sent()) == 1 and len(reminded(conn, due)) == 1
    after = await run_night(pool, alerting, today=NIGHT, job_lock_owner="scheduler B")
    assert after.outcome == "already_done"


async def check_expiry(db_url: str, workdir: Path, *args: str, env: Mapping[str, str] | None = None) -> Any:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HLF_", "GOOGLE_APPLICATION_CREDENTIALS"))}
    environment.update({"HLF_DATABASE_URL": db_url, "HLF_TIMEZONE": "Europe/Oslo", **(env or {})})
    return await anyio.run_process(
        [sys.executable, "-m", "hlf_actors", "check-expiry", *args], env=environment, cwd=workdir, check=False
    )


async def test_check_expiry_command(
    db_url: str, conn: psycopg.Connection[Any], fcm: FakeFCM, fcm_env: dict[str, str], tmp_path: Path, org: UUID
) -> None:
    add_device(conn, org, DEVICE)
    due = mentor(conn, org, NIGHT + timedelta(days=30))
    lapsed = mentor(conn, org, NIGHT - timedelta(days=1))

    first = await check_expiry(db_url, tmp_path, "--date", NIGHT.isoformat(), env=fcm_env)
    second = await check_expiry(db_url, tmp_path, "--date", NIGHT.isoformat(), env=fcm_env)
    bad = await check_expiry(db_url, tmp_path, "--date", "11.03.2025")

    assert first.returncode == 0, first.stderr.decode()
    assert first.stdout.decode().startswith(
        "night of 2025-03-11: 1 reminder(s) sent (30 days: 1); 1 mentor(s) moved to expired_cert; 0 already reminded;"
    )
    assert fcm.data_messages() == [{"type": "cert_expiry_reminder", "mentor_id": str(due), "days_left": "30"}]
    assert status(conn, lapsed) == "expired_cert"
    assert second.returncode == 0
    assert second.stdout.decode().startswith("night of 2025-03-11: already checked (by check-expiry on ")
    assert len(fcm.messages()) == 1
    assert bad.returncode == 2 and "not a date (YYYY-MM-DD): '11.03.2025'" in bad.stderr.decode()


# -- the scheduler ----------------------------------------------------------------------------------------------


async def test_scheduler_runs_a_missed_night_on_start_then_each_night_and_not_again_after_a_restart(
    db_url: str,
    conn: psycopg.Connection[Any],
    pool: AsyncConnectionPool[Any],
    alerting: Alerting,
    recorder: RecordingAlertSender,
    org: UUID,
) -> None:
    add_device(conn, org, DEVICE)
    due = mentor(conn, org, NIGHT + timedelta(days=31))  # 31 days left on the 11th, 30 on the 12th
    cfg = config(db_url, HLF_TIMEZONE="Europe/Oslo", HLF_NIGHTLY_AT="02:00")
    start = datetime(2025, 3, 11, 9, 0, tzinfo=OSLO)  # down at 02:00 today: the night was missed
    clock = SteppedClock(start, auto=True, stop_at=datetime(2025, 3, 12, 2, 10, tzinfo=OSLO))
    leader = anyio.Event()

    async with anyio.create_task_group() as tg:
        tg.start_soon(nightly_forever, pool, alerting, cfg, clock, leader.wait)
        await anyio.sleep(0.05)
        assert conn.execute("SELECT count(*) FROM hlf_job_runs").fetchone() == (0,)  # a standby does nothing
        leader.set()
        with anyio.fail_after(10):
            await clock.parked.wait()
        tg.cancel_scope.cancel()

    runs = conn.execute("SELECT run_key, outcome, attempts FROM hlf_job_runs ORDER BY run_key").fetchall()
    assert runs == [("2025-03-11", "ok", 1), ("2025-03-12", "ok", 1)]
    assert sum(clock.sleeps[:-1]) == timedelta(hours=17).total_seconds()  # 09:00 → 02:00 the next night, then park
    assert max(clock.sleeps) <= 900
    assert reminded(conn, due) == [(30, 30, (NIGHT + timedelta(days=31)).isoformat(), "2025-03-12")]

    # A restart later that morning: the night is done, nothing runs until the next one.
    restart = SteppedClock(
        datetime(2025, 3, 12, 10, 0, tzinfo=OSLO), auto=True, stop_at=datetime(2025, 3, 13, 1, 0, tzinfo=OSLO)
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(nightly_forever, pool, alerting, cfg, restart, always_leader)
        with anyio.fail_after(10):
            await restart.parked.wait()
        tg.cancel_scope.cancel()
    assert conn.execute("SELECT count(*), max(attempts) FROM hlf_job_runs").fetchone() == (2, 1)
    assert len(pushes(recorder)) == 1


@pytest.mark.parametrize(
    ("zone", "night_of", "lapsed_status"),
    [("Europe/Oslo", "2025-03-11", "expired_cert"), ("UTC", "2025-03-10", "active")],
)
async def test_the_local_date_decides_when_a_certification_has_expired(
    db_url: str,
    conn: psycopg.Connection[Any],
    pool: AsyncConnectionPool[Any],
    alerting: Alerting,
    recorder: RecordingAlertSender,
    zone: str,
    night_of: str,
    lapsed_status: str,
    org: UUID,
) -> None:
    add_device(conn, org, DEVICE)
    lapsing = mentor(conn, org, date(2025, 3, 10))  # valid through the 10th
    last_day = mentor(conn, org, date(2025, 3, 11))
    cfg = config(db_url, HLF_TIMEZONE=zone, HLF_NIGHTLY_AT="00:15")
    # 23:20 UTC on the 10th: already 00:20 on the 11th in Oslo, past that night's run.
    now = datetime(2025, 3, 10, 23, 20, tzinfo=UTC)
    clock = SteppedClock(now, stop_at=now)

    async with anyio.create_task_group() as tg:
        tg.start_soon(nightly_forever, pool, alerting, cfg, clock, always_leader)
        with anyio.fail_after(10):
            await clock.parked.wait()
        tg.cancel_scope.cancel()

    assert conn.execute("SELECT run_key FROM hlf_job_runs").fetchall() == [(night_of,)]
    assert status(conn, lapsing) == lapsed_status
    days_left = (date(2025, 3, 11) - date.fromisoformat(night_of)).days
    assert (str(last_day), str(days_left)) in pushes(recorder)


# -- end to end -------------------------------------------------------------------------------------------------


async def test_the_nightly_transition_reaches_the_portal_as_a_removal(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    lapsing, record = add_mentor(conn, org, portal=portal, cert_valid_days=None)
    add_certification(conn, lapsing, date(2025, 3, 10))
    staying, staying_record = add_mentor(conn, org, portal=portal, cert_valid_days=None)
    add_certification(conn, staying, date(2026, 3, 10))
    assert record is not None and staying_record is not None
    clock = SteppedClock(datetime(2025, 3, 10, 21, 0, tzinfo=OSLO))  # the evening before the certificate lapses
    # The stepped clock jumps five hours: keep the reconciliation out of it. A reconcile that reads the database
    # before the night's transition commits would rightly ask for the removal too (by date the certificate has
    # lapsed), and this test counts the PATCHes the nightly job causes.
    env = {"HLF_TIMEZONE": "Europe/Oslo", "HLF_NIGHTLY_AT": "02:00", "HLF_RECONCILE_EVERY": "24h"}

    async with running_service(db_url, portal, env=env, clock=clock):
        await eventually(lambda: conn.execute("SELECT count(*) FROM hlf_job_runs").fetchone() == (1,))
        # Both creations settled: each mentor's insert and its certificate's insert are two changes, so "both in
        # sync" counts only once nothing waits in the inbox either.
        settled = "SELECT (SELECT count(*) FROM sync_status WHERE state = 'in_sync'), (SELECT count(*) FROM hlf_inbox)"
        await eventually(lambda: conn.execute(settled).fetchone() == (2, 0), what="both creations synced")
        assert portal.listed(record) is True and status(conn, lapsing) == "active"  # valid through the 10th
        portal.clear_requests()
        # The scheduler must be asleep until 02:00 before the clock jumps there: one that reads the clock after the
        # jump plans the night after next and never runs the 11th.
        # (It naps at most 15 minutes at a time: any sleep that short is its nap towards 02:00.)
        await eventually(lambda: any(s <= 900 for s in clock.sleeps), what="the scheduler asleep until 02:00")

        clock.advance_to(datetime(2025, 3, 11, 2, 0, tzinfo=OSLO))
        await eventually(lambda: portal.listed(record) is False, what="the removal PATCH")
        await eventually(
            lambda: (
                conn.execute("SELECT state FROM sync_status WHERE mentor_id = %s", (lapsing,)).fetchone()
                == ("in_sync",)
            )
        )

    assert status(conn, lapsing) == "expired_cert" and status(conn, staying) == "active"
    assert [p.json() for p in portal.patches(record)] == [{"hlf_publiclisting": False}]
    assert portal.patches(staying_record) == []
    kinds = [
        k
        for (k,) in conn.execute(
            "SELECT kind FROM event_log WHERE mentor_id = %s AND kind IN ('auto_transitioned', 'status_changed', "
            "'attempt_succeeded') ORDER BY seq",
            (lapsing,),
        ).fetchall()
    ]
    assert kinds[-3:] == ["auto_transitioned", "status_changed", "attempt_succeeded"]
    assert events(conn, lapsing, "attempt_succeeded")[-1]["operation"] == "remove"
    assert conn.execute("SELECT run_key FROM hlf_job_runs ORDER BY run_key").fetchall() == [
        ("2025-03-10",),
        ("2025-03-11",),
    ]
