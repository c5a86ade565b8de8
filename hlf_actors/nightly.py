"""The nightly scheduler of the expiry check: when each night's run is due, and the loop that runs it while leading.

The check itself is ``expiry.run_night``; this module only decides *when*, in the configured zone and wall time,
across DST changes, a suspended host and a restart (the last night that should have run is run on start unless
``hlf_job_runs`` says it did).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from .alerts import Alerting
from .clock import Clock
from .config import Config
from .expiry import default_owner, run_night

__all__ = ["last_due_night", "next_run_after", "nightly_forever", "scheduled_at"]

# The longest single sleep of the scheduler: a suspended host or a stepped clock costs at most this much lateness.
_MAX_NAP_S = 900.0


def scheduled_at(night: date, zone: ZoneInfo, at: time) -> datetime:
    """The instant (UTC) of the run for ``night``: its local wall time ``at`` in ``zone``.

    DST: a wall time that does not exist that night (02:30 when clocks jump from 02:00 to 03:00) runs at the
    instant it would have been, 03:30 local; one that happens twice (clocks going back) runs the first time.
    """
    return datetime.combine(night, at, tzinfo=zone).astimezone(UTC)


def last_due_night(now: datetime, zone: ZoneInfo, at: time) -> date:
    """The most recent night whose scheduled run is at or before ``now``: the one that should have run by now."""
    night = now.astimezone(zone).date()
    if scheduled_at(night, zone, at) > now:
        night -= timedelta(days=1)
    return night


def next_run_after(now: datetime, zone: ZoneInfo, at: time) -> datetime:
    """The first scheduled run strictly after ``now`` (UTC)."""
    night = now.astimezone(zone).date()
    when = scheduled_at(night, zone, at)
    while when <= now:
        night += timedelta(days=1)
        when = scheduled_at(night, zone, at)
    return when


async def _sleep_until(clock: Clock, when: datetime) -> None:
    while (left := (when - clock.now()).total_seconds()) > 0:
        await clock.sleep(min(left, _MAX_NAP_S))


async def nightly_forever(
    pool: AsyncConnectionPool[Any],
    alerting: Alerting,
    config: Config,
    clock: Clock,
    leadership_wait: Callable[[], Awaitable[None]],
    *,
    owner: str | None = None,
    retry_s: float = 300.0,
    busy_poll_s: float = 60.0,
) -> None:
    """Run the expiry check every night at ``config.nightly_at`` in ``config.zone``, while this process leads.

    On start (and after each sleep) it runs the most recent night that should have run, unless hlf_job_runs says
    it did. A failed night is tried again after ``retry_s``; a night another process is running is looked at again
    after ``busy_poll_s`` (if that process dies, its lock goes and this one runs the night).
    """
    owner = owner or default_owner("scheduler")
    zone, at = config.zone, config.nightly_at
    logger.info("expiry check scheduled every night at {:%H:%M} {}", at, config.timezone)
    while True:
        await leadership_wait()
        night = last_due_night(clock.now(), zone, at)
        try:
            report = await run_night(pool, alerting, today=night, job_lock_owner=owner)
        except Exception as err:  # the sync path must go on; the night is tried again
            logger.opt(exception=err).error("expiry check of {} failed: {}; again in {:.0f}s", night, err, retry_s)
            await clock.sleep(retry_s)
            continue
        if report.outcome == "already_running":
            logger.info("expiry check: {}", report.describe())
            await clock.sleep(busy_poll_s)
            continue
        await _sleep_until(clock, next_run_after(clock.now(), zone, at))
