"""How the console's pages show a time: the templates' ``at`` and ``ago`` filters."""

from __future__ import annotations

from datetime import UTC, date, datetime

__all__ = ["ago", "at"]


def at(value: datetime | date | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"
    return f"{value:%Y-%m-%d}"


def ago(value: datetime | None) -> str:
    if value is None:
        return "never"
    seconds = (datetime.now(UTC) - value).total_seconds()
    if seconds < 120:
        span = f"{seconds:.0f} s"
    elif seconds < 7200:
        span = f"{seconds / 60:.0f} min"
    elif seconds < 172800:
        span = f"{seconds / 3600:.1f} h"
    else:
        span = f"{seconds / 86400:.0f} days"
    return f"{at(value)} ({span} ago)"
