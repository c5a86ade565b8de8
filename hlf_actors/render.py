"""What the command line prints: every report of every command, rendered as text (or JSON where asked).

The modules that compute a report (``status``, ``replay``, ``archival``, ``reconcile``) return structs; the
commands (``cli.py``), the demo and the console print them through here, so the wording lives in one place.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from .archival import ArchiveReport
    from .reconcile import ReconcileReport
    from .replay import ReplayReport
    from .status import DeadLetter, Story, Summary

__all__ = [
    "render_archive",
    "render_dead_letters",
    "render_reconcile",
    "render_replay",
    "render_story",
    "render_story_json",
    "render_summary",
    "render_summary_json",
]


def _ago(at: datetime | None) -> str:
    if at is None:
        return "never"
    seconds = (datetime.now(UTC) - at).total_seconds()
    return f"{at:%Y-%m-%d %H:%M:%S %Z} ({_duration(seconds)} ago)"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def render_summary(s: Summary) -> str:
    lines = [
        "hlf-actors status",
        f"  mentors in the database   {s.mentors_known}",
        "  sync state                " + "  ".join(f"{k} {v}" for k, v in s.states.items()),
        f"  oldest unfinished change  {_ago(s.oldest_open_change_at) if s.oldest_open_change_at else 'none'}",
        f"  not yet projected events  {s.unprojected_events}"
        + ("  (is `hlf-actors run` running?)" if s.unprojected_events and (s.oldest_open_age_s or 0) > 60 else ""),
        f"  open dead letters         {s.open_dead_letters}"
        + ("  (see `hlf-actors dead-letters list`)" if s.open_dead_letters else ""),
        f"  portal                    {'OUTAGE: circuit open, sending paused' if s.circuit_open else 'answering'}",
        f"  tenant-wide incident      {_incident_line(s.incident)}",
        f"  last successful sync      {_ago(s.last_success_at)}",
        f"  credentials               {s.credentials}  (last checked {_ago(s.credentials_checked_at)})",
        f"  last reconciliation       {_ago(s.last_reconcile_at)}" + _reconcile_counts(s.last_reconcile),
        f"  last event                {_ago(s.last_event_at)}",
        f"  public website (24 h)     {_public_listing_line(s.public_listing)}",
        "  alerts                    "
        + ("OFF (HLF_ALERTS=off): sync failures and outages reach no one" if s.alerts == "off" else "on"),
        f"  dead coordinator devices  {sum(len(o['devices']) for o in s.dead_devices) or 'none'}",
    ]
    for org in s.dead_devices:
        lines.append(f"    {org['name']} ({org['organisation_id']}): {', '.join(org['devices'])}")
    return "\n".join(lines)


def _incident_line(incident: dict[str, Any] | None) -> str:
    if incident is None:
        return "none"
    return (
        f"OPEN ({incident['cause']}) since {_ago(incident['since'])}: every send is held; {incident['error']}. "
        f"Fix: {incident['fix']}. It heals by itself once fixed."
    )


def _public_listing_line(p: dict[str, Any] | None) -> str:
    if not p:
        return "unknown"
    if p["probe"] == "off" and not p["confirmed"] and not p["stale"]:
        return "probe off (HLF_PUBLIC_LISTING_URL unset)"

    def ms(value: Any) -> str:
        return "-" if value is None else _duration(value / 1000)

    def three(t: dict[str, Any]) -> str:
        return f"p50 {ms(t['p50'])} / p95 {ms(t['p95'])} / max {ms(t['max'])}"

    line = f"{p['confirmed']} confirmed, {p['stale']} stale"
    if p.get("seen"):
        line += (
            f"; exposure {three(p['exposure_ms'])}"
            f" = our sync (change → 204) {three(p['sync_ms'])}"
            f" + website cache (204 → seen) {three(p['delay_ms'])}"
        )
    if p["waiting"]:
        line += f"; {p['waiting']} waiting"
    return line + ("" if p["probe"] == "on" else " (probe off now)")


def _reconcile_counts(counts: dict[str, Any] | None) -> str:
    if not counts:
        return ""
    shown = ("divergent", "missing", "orphans", "requests")
    return ": " + ", ".join(f"{counts.get(k, 0)} {k}" for k in shown) + f" of {counts.get('mentors_checked', 0)}"


def render_summary_json(s: Summary) -> str:
    return msgspec.json.encode(s).decode()


def render_dead_letters(letters: list[DeadLetter]) -> str:
    if not letters:
        return "no dead letters"
    lines = [f"{'ID':>8}  {'MENTOR':36}  {'OPERATION':9}  {'TRIES':>5}  {'SINCE':19}  ERROR"]
    for d in letters:
        since = f"{d.dead_lettered_at:%Y-%m-%d %H:%M:%S}"
        error = (d.last_error or "")[:80] + ("  [re-queued]" if d.requeued_at else "")
        error += "  [resolved: synced since]" if d.resolved_at else ""
        lines.append(f"{d.id:>8}  {d.mentor_id!s:36}  {d.operation:9}  {d.attempts:>5}  {since:19}  {error}")
    lines.append(f"{len(letters)} dead letter(s); re-queue with `hlf-actors dead-letters requeue ID` or `--all`")
    return "\n".join(lines)


_HIDDEN = frozenset({"raw", "snapshot"})  # kept in --json; noise for a person reading the story


def render_story(story: Story) -> str:
    name = story.full_name or "(mentor row deleted)"
    lines = [f"{name}  {story.mentor_id}", f"  status {story.status}   portal record {story.portal_record_id}"]
    if story.sync:
        s = story.sync
        line = f"  sync   {s['state']}   last operation {s['operation']}   attempts {s['attempts']}"
        if s.get("next_attempt_at"):
            line += f"   next attempt {s['next_attempt_at']:%H:%M:%S}"
        lines.append(line)
        if s.get("last_error"):
            lines.append(f"  error  {s['last_error']}")
    lines.append("  story:")
    for e in story.events:
        detail = ", ".join(f"{k}={v}" for k, v in e["data"].items() if v is not None and k not in _HIDDEN)
        lines.append(f"    {e['seq']:>8}  {e['at']:%Y-%m-%d %H:%M:%S.%f}"[:-3] + f"  {e['kind']:<18} {detail}")
    return "\n".join(lines)


def render_story_json(story: Story) -> str:
    return msgspec.json.encode(story).decode()


def render_replay(report: ReplayReport) -> str:
    lines = [
        f"{'verified' if not report.applied else 'replayed'} {report.events:,} events of {report.mentors:,} "
        f"mentors in {report.seconds:.1f}s ({report.events_per_s:,.0f} events/s); "
        f"{report.refolded} mentor(s) changed meanwhile were folded again under the lock"
    ]
    for table in report.tables:
        if not table.total:
            lines.append(f"{table.table}: same as the log")
            continue
        verb = "corrected" if report.applied else "differ"
        lines.append(
            f"{table.table}: {table.total} row(s) {verb} — {table.missing} missing, {table.extra} extra, "
            f"{table.different} different"
        )
        for row in table.rows:
            if row.kind == "different":
                cols = ", ".join(f"{c}: live {a!r} ≠ replayed {b!r}" for c, (a, b) in row.columns.items())
            elif row.kind == "missing":
                cols = "only in the replay"
            else:
                cols = "only in the live table"
            lines.append(f"  {row.kind:9} {row.key}: {cols}")
        if table.total > len(table.rows):
            lines.append(f"  … and {table.total - len(table.rows)} more")
    if report.raised:
        lines.append(f"duplicates: {len(report.raised)} new finding(s) raised; the running service alerts ops")
        lines.extend(f"  {f.key}" for f in report.raised)
    if report.unraised:
        lines.append(f"duplicates: {len(report.unraised)} finding(s) in the log not raised yet (replay raises them)")
        lines.extend(f"  {f.key}: {f.detail}" for f in report.unraised)
    return "\n".join(lines)


def render_archive(report: ArchiveReport) -> str:
    if report.cut_seq is None:
        return "archive: no event old enough"
    return (
        f"archived {report.archived:,} events up to seq {report.cut_seq} into event_log_archive, "
        f"{report.snapshots:,} mentor snapshot(s) stored at the cut, in {report.seconds:.1f}s"
    )


def _flag(value: bool | None) -> str:
    return "absent" if value is None else ("listed" if value else "unlisted")


def render_reconcile(r: ReconcileReport, *, limit: int = 50) -> str:
    lines = [
        r.summary_line(),
        f"  {'in sync':<36}{r.in_sync:>8}",
        f"  {'divergent (listed flag wrong)':<36}{len(r.divergent):>8}   → sync requested",
        f"  {'missing record, should be listed':<36}{len(r.missing):>8}"
        + (
            "   → sync requested; it will fail (404), be dead-lettered and alert the coordinators:"
            " someone must recreate the portal record"
            if r.missing
            else ""
        ),
        f"  {'absent, as it should be':<36}{r.absent_ok:>8}",
        f"  {'dead-lettered, not requested again':<36}{len(r.dead_lettered):>8}"
        + ("   → see `hlf-actors dead-letters list`" if r.dead_lettered else ""),
        f"  {'differing, its own sync under way':<36}{r.syncing:>8}"
        + ("   → left to its actor; checked again next period" if r.syncing else ""),
        f"  {'orphan records (no mentor owns them)':<36}{len(r.orphans):>8}"
        + ("   → reported only, never touched" if r.orphans else ""),
        f"  {'sync requests queued':<36}{len(r.requested):>8}",
        f"  timings: portal {r.portal_ms:.0f} ms, database {r.database_ms:.0f} ms, queueing {r.queue_ms:.0f} ms",
    ]
    found = r.divergent + r.missing + r.dead_lettered
    if found:
        lines.append(f"{'MENTOR':36}  {'RECORD':36}  {'PORTAL':8}  {'SHOULD BE':9}  SYNC STATE WHEN READ")
        for d in found[:limit]:
            state = d.state or "-"
            lines.append(
                f"{d.mentor_id!s:36}  {d.record_id!s:36}  {_flag(d.portal_listed):8}  {_flag(d.expected):9}  {state}"
            )
        if len(found) > limit:
            lines.append(f"… and {len(found) - limit} more")
    if r.orphans:
        lines.append(f"orphan records (never touched):\n{'RECORD':36}  PORTAL")
        lines.extend(f"{o.record_id!s:36}  {_flag(o.listed)}" for o in r.orphans[:limit])
        if len(r.orphans) > limit:
            lines.append(f"… and {len(r.orphans) - limit} more")
    return "\n".join(lines)
