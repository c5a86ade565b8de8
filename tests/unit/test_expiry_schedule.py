"""When the nightly expiry check runs: local wall time in HLF_TIMEZONE, across DST changes and midnights."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hlf_actors.expiry import NightReport
from hlf_actors.nightly import last_due_night, next_run_after, scheduled_at

OSLO = ZoneInfo("Europe/Oslo")
TWO = time(2, 0)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize(
    ("night", "at", "expected"),
    [
        (date(2025, 1, 15), TWO, utc(2025, 1, 15, 1, 0)),  # winter, UTC+1
        (date(2025, 7, 15), TWO, utc(2025, 7, 15, 0, 0)),  # summer, UTC+2
        # 30 March 2025: clocks jump 02:00 → 03:00. 02:00 and 02:30 do not exist: the run happens when they would
        # have, at 03:00 and 03:30 local.
        (date(2025, 3, 30), TWO, utc(2025, 3, 30, 1, 0)),
        (date(2025, 3, 30), time(2, 30), utc(2025, 3, 30, 1, 30)),
        # 26 October 2025: clocks go back 03:00 → 02:00. 02:30 happens twice: the run takes the first.
        (date(2025, 10, 26), time(2, 30), utc(2025, 10, 26, 0, 30)),
    ],
)
def test_a_night_runs_at_its_local_wall_time(night: date, at: time, expected: datetime) -> None:
    assert scheduled_at(night, OSLO, at) == expected


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (utc(2025, 3, 11, 0, 59), date(2025, 3, 10)),  # 01:59 local: tonight's run is still ahead
        (utc(2025, 3, 11, 1, 0), date(2025, 3, 11)),  # 02:00 local exactly: due
        (utc(2025, 3, 11, 12, 0), date(2025, 3, 11)),
        (utc(2025, 3, 10, 23, 30), date(2025, 3, 10)),  # 00:30 local on the 11th: the 11th's run is ahead
    ],
)
def test_last_due_night_is_the_most_recent_run_at_or_before_now(now: datetime, expected: date) -> None:
    assert last_due_night(now, OSLO, TWO) == expected


def test_local_midnight_decides_the_date_not_utcs() -> None:
    # 23:20 UTC on the 10th is 00:20 on the 11th in Oslo: a run at 00:15 local belongs to the 11th there.
    now = utc(2025, 3, 10, 23, 20)
    assert last_due_night(now, OSLO, time(0, 15)) == date(2025, 3, 11)
    assert last_due_night(now, ZoneInfo("UTC"), time(0, 15)) == date(2025, 3, 10)


def test_waits_across_dst_are_23_and_25_hours() -> None:
    spring_eve = scheduled_at(date(2025, 3, 29), OSLO, TWO)
    spring = next_run_after(spring_eve, OSLO, TWO)
    assert spring - spring_eve == timedelta(hours=24)  # 02:00 does not exist that night: 03:00 CEST, same instant
    assert next_run_after(spring, OSLO, TWO) - spring == timedelta(hours=23)  # back to 02:00, now CEST
    autumn_eve = scheduled_at(date(2025, 10, 25), OSLO, TWO)
    autumn = next_run_after(autumn_eve, OSLO, TWO)
    assert autumn - autumn_eve == timedelta(hours=24)  # 02:00 CEST, the first of the two
    assert next_run_after(autumn, OSLO, TWO) - autumn == timedelta(hours=25)


def test_next_run_is_strictly_after_now() -> None:
    at_run = utc(2025, 1, 15, 1, 0)
    assert next_run_after(at_run, OSLO, TWO) == utc(2025, 1, 16, 1, 0)
    assert next_run_after(at_run - timedelta(microseconds=1), OSLO, TWO) == at_run


ZONES = st.sampled_from(["Europe/Oslo", "America/New_York", "Australia/Lord_Howe", "Pacific/Chatham", "UTC"])


@given(
    now=st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1), timezones=st.just(UTC)),
    zone=ZONES,
    hour=st.integers(0, 23),
    minute=st.sampled_from([0, 15, 30, 59]),
)
def test_the_due_night_and_the_next_run_bracket_now(now: datetime, zone: str, hour: int, minute: int) -> None:
    tz, at = ZoneInfo(zone), time(hour, minute)
    due = last_due_night(now, tz, at)
    upcoming = next_run_after(now, tz, at)
    assert scheduled_at(due, tz, at) <= now < upcoming
    assert upcoming == scheduled_at(due + timedelta(days=1), tz, at)  # never a night skipped, never one twice


def test_report_lines() -> None:
    night = date(2025, 3, 11)
    done = NightReport(
        night=night,
        outcome="done",
        reminders_sent=3,
        reminders_by_threshold={7: 1, 30: 2},
        transitioned=1,
        skipped_already_done=4,
        duration_s=0.25,
        sql_s=0.125,
        queries=8,
    )
    assert done.describe() == (
        "night of 2025-03-11: 3 reminder(s) sent (30 days: 2, 7 days: 1); 1 mentor(s) moved to expired_cert; "
        "4 already reminded; 0.25 s (0.12 s SQL), 8 queries"
    )
    busy = NightReport(night=night, outcome="already_running", holder="scheduler on host (pid 7)")
    assert busy.describe() == "night of 2025-03-11: already being checked by scheduler on host (pid 7)"
    assert "nothing done" in NightReport(night=night, outcome="already_done").describe()
