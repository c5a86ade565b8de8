"""What the console's pages read: one function per page, each given a short-lived synchronous connection.

The console runs these in a worker thread (``Console._read``), so a slow page never holds a connection the actors
need; the mentor's story, the summary and the dead letters come from ``status.py``, as the CLI shows them.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg

from . import status
from .config import Config
from .console_chart import chart

__all__ = ["alerts", "audit", "expiry", "mentor", "mentors", "overview"]

_CHART_SQL = """
SELECT to_timestamp(floor(extract(epoch FROM recorded_at) / 3600) * 3600) AS hour,  -- UTC hours, whatever TimeZone
       count(*) FILTER (WHERE kind = 'attempt_succeeded'),
       count(*) FILTER (WHERE kind IN ('attempt_failed', 'dead_lettered')),
       max((data ->> 'exposure_ms')::bigint) FILTER (WHERE kind = 'public_listing_confirmed')
FROM event_log
WHERE recorded_at > %s
  AND kind IN ('attempt_succeeded', 'attempt_failed', 'dead_lettered', 'public_listing_confirmed')
GROUP BY 1"""

_NIGHT_SQL = """
SELECT run_key, owner, started_at, finished_at, outcome, attempts, detail
FROM hlf_job_runs WHERE job = 'cert_expiry' ORDER BY run_key DESC LIMIT 1"""

_MENTORS_SQL = """
SELECT m.id, m.full_name, m.status, o.name, s.state, s.attempts, s.last_error, s.updated_at
FROM mentors m
JOIN organisations o ON o.id = m.organisation_id
LEFT JOIN sync_status s ON s.mentor_id = m.id
WHERE (%(q)s::text IS NULL OR m.full_name ILIKE %(like)s OR m.id::text = lower(%(q)s))
  AND (%(state)s::text IS NULL OR s.state = %(state)s)
ORDER BY m.full_name, m.id
LIMIT 200"""

_RECENT_ALERTS_SQL = """
SELECT e.recorded_at, e.kind, e.data ->> 'alert', e.data ->> 'target', e.data ->> 'error',
       coalesce((e.data ->> 'unregistered')::boolean, false), e.mentor_id, m.full_name, o.name
FROM event_log e
LEFT JOIN mentors m ON m.id = e.mentor_id
LEFT JOIN organisations o ON o.id = m.organisation_id
WHERE e.kind IN ('alert_sent', 'alert_failed')
ORDER BY e.seq DESC
LIMIT 100"""

_ALERTS_PER_ORG_SQL = """
SELECT coalesce(o.name, '(operations)'),
       count(*) FILTER (WHERE e.kind = 'alert_sent'),
       count(*) FILTER (WHERE e.kind = 'alert_failed'),
       count(*) FILTER (WHERE (e.data ->> 'unregistered')::boolean)
FROM event_log e
LEFT JOIN mentors m ON m.id = e.mentor_id
LEFT JOIN organisations o ON o.id = m.organisation_id
WHERE e.kind IN ('alert_sent', 'alert_failed') AND e.recorded_at > now() - interval '7 days'
GROUP BY 1 ORDER BY 1"""

_REMINDERS_SQL = """
SELECT r.sent_at, r.mentor_id, m.full_name, o.name, r.threshold_day, r.certification_expiry_date, r.pushed_at,
       r.superseded
FROM cert_expiry_reminders r
JOIN mentors m ON m.id = r.mentor_id
JOIN organisations o ON o.id = m.organisation_id
ORDER BY r.sent_at DESC
LIMIT 100"""

_UPCOMING_SQL = """
WITH latest AS (SELECT mentor_id, max(expires_on) AS expires_on FROM certifications GROUP BY mentor_id)
SELECT o.name, m.id, m.full_name, l.expires_on, l.expires_on - %(today)s::date
FROM latest l
JOIN mentors m ON m.id = l.mentor_id
JOIN organisations o ON o.id = m.organisation_id
WHERE m.status = 'active' AND l.expires_on BETWEEN %(today)s::date AND %(today)s::date + 60
ORDER BY o.name, l.expires_on, m.full_name
LIMIT 500"""

_AUDIT_SQL = """
SELECT recorded_at, data FROM event_log
WHERE mentor_id IS NULL AND kind = 'console_action' AND (%s::text IS NULL OR data ->> 'target' = %s)
ORDER BY seq DESC LIMIT 50"""


def overview(conn: psycopg.Connection[Any], cfg: Config) -> dict[str, Any]:
    now = datetime.now(UTC)
    rows = conn.execute(_CHART_SQL, (now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=23),))
    return {
        "summary": status.summary(
            conn, probe_on=cfg.public_listing_url is not None, deadline_s=cfg.public_listing_deadline_s
        ),
        "chart": chart(rows.fetchall(), now, cfg.zone),
        "night": conn.execute(_NIGHT_SQL).fetchone(),
    }


def mentors(conn: psycopg.Connection[Any], q: str | None, state: str | None) -> list[Any]:
    like = "%" + _escape_like(q) + "%" if q else None
    return conn.execute(_MENTORS_SQL, {"q": q, "like": like, "state": state}).fetchall()


def mentor(conn: psycopg.Connection[Any], mentor_id: UUID) -> tuple[Any, list[Any]]:
    target = f"mentor:{mentor_id}"
    return status.mentor_story(conn, mentor_id), conn.execute(_AUDIT_SQL, (target, target)).fetchall()


def alerts(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    return {
        "recent": conn.execute(_RECENT_ALERTS_SQL).fetchall(),
        "per_org": conn.execute(_ALERTS_PER_ORG_SQL).fetchall(),
    }


def expiry(conn: psycopg.Connection[Any], today: date) -> dict[str, Any]:
    upcoming: dict[str, list[Any]] = {}
    for row in conn.execute(_UPCOMING_SQL, {"today": today}).fetchall():
        upcoming.setdefault(row[0], []).append(row)
    return {
        "night": conn.execute(_NIGHT_SQL).fetchone(),
        "reminders": conn.execute(_REMINDERS_SQL).fetchall(),
        "upcoming": upcoming,
    }


def audit(conn: psycopg.Connection[Any]) -> list[Any]:
    """The console's audit log: its last 50 actions, newest first."""
    return conn.execute(_AUDIT_SQL, (None, None)).fetchall()


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
