"""The overview's chart of the last 24 hours: syncs and failures per hour, and the public listing's exposure window.

The console works without JavaScript and the host has no internet, so the chart is inline SVG whose geometry is
computed here, on the server; the template only draws what ``chart`` placed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

__all__ = ["Chart", "ChartHour", "chart"]


@dataclass(frozen=True)
class ChartHour:
    """One hour of the overview's chart, with its bars already placed (SVG user units)."""

    label: str
    x: float
    synced: int
    failed: int
    synced_y: float
    synced_h: float
    failed_y: float
    failed_h: float
    exposure_s: float | None


@dataclass(frozen=True)
class Chart:
    hours: list[ChartHour]
    width: int
    height: int
    bar: float
    peak: int
    exposure_points: str  # an SVG polyline's points; empty when the probe confirmed nothing
    exposure_peak_s: float


def chart(rows: list[tuple[datetime, int, int, int | None]], now: datetime, zone: tzinfo = UTC) -> Chart:
    """Place 24 hourly bars (successes up, failures stacked on top) and the exposure line; hours are labelled in
    ``zone`` (HLF_TIMEZONE). Pure."""
    width, height, top = 720, 180, 10
    bar = width / 24
    end = now.replace(minute=0, second=0, microsecond=0)
    by_hour = {r[0]: r for r in rows}
    slots = [end - timedelta(hours=23 - i) for i in range(24)]
    peak = max([1] + [(by_hour[h][1] + by_hour[h][2]) for h in slots if h in by_hour])
    exposure_peak_ms = max([0] + [by_hour[h][3] or 0 for h in slots if h in by_hour])
    scale = (height - top) / peak
    hours: list[ChartHour] = []
    points: list[str] = []
    for i, h in enumerate(slots):
        _, synced, failed, exposure = by_hour.get(h, (h, 0, 0, None))
        synced_h, failed_h = synced * scale, failed * scale
        x = i * bar
        hours.append(
            ChartHour(
                label=f"{h.astimezone(zone):%H:%M}",
                x=round(x + 2, 1),
                synced=synced,
                failed=failed,
                synced_y=round(height - synced_h, 1),
                synced_h=round(synced_h, 1),
                failed_y=round(height - synced_h - failed_h, 1),
                failed_h=round(failed_h, 1),
                exposure_s=None if exposure is None else exposure / 1000,
            )
        )
        if exposure is not None and exposure_peak_ms:
            points.append(f"{x + bar / 2:.1f},{height - (height - top) * exposure / exposure_peak_ms:.1f}")
    return Chart(
        hours=hours,
        width=width,
        height=height,
        bar=round(bar - 4, 1),
        peak=peak,
        exposure_points=" ".join(points),
        exposure_peak_s=exposure_peak_ms / 1000,
    )
