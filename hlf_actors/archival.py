"""Archival: move events older than N days to event_log_archive while replay stays exact.

Events older than N days are folded into projection_snapshots and copied to event_log_archive; the snapshots are
stored under replay's table locks, and then the archived rows are deleted from event_log in small transactions.
Every reader — replay, the periodic duplicate check and the live re-fold of a late commit — folds a mentor's
snapshot and only the events after its cut, so it is exact before, during and after the delete. The append-only
triggers allow exactly that delete: rows already in the archive, of mentors whose snapshot covers them, with
``hlf.archiving`` set. One replay or archival runs at a time (``replay.REPLAY_LOCK``).
"""

from __future__ import annotations

import time
from datetime import timedelta

import msgspec
import psycopg
from psycopg import sql

from .errors import ArchiveRaced
from .history import histories
from .progress import Progress
from .projections import fold_mentor
from .replay import connect, replay_lock

__all__ = ["ArchiveRaced", "ArchiveReport", "archive"]


class ArchiveReport(msgspec.Struct, frozen=True, kw_only=True):
    cut_seq: int | None  # the newest archived event; None when nothing was old enough
    archived: int
    snapshots: int
    seconds: float


_SNAPSHOT_COLUMNS = ("mentor_id", "cut_seq", "projection", "duplicates")
_CUT = (
    "SELECT max(seq) FROM event_log WHERE recorded_at < now() - %s::interval",
    "SELECT min(seq) FROM hlf_inbox",
)
_COUNT_UPTO = (
    "SELECT count(*), (SELECT count(*) FROM hlf_inbox WHERE seq <= %(cut)s) FROM event_log WHERE seq <= %(cut)s"
)
# A snapshot never moves back: an archival with a shorter reach than an earlier one leaves those mentors as they were.
_STORE_SNAPSHOTS = (
    "INSERT INTO projection_snapshots AS s (mentor_id, cut_seq, projection, duplicates) "
    "SELECT mentor_id, cut_seq, projection, duplicates FROM pg_temp.projection_snapshots_new "
    "ON CONFLICT (mentor_id) DO UPDATE SET cut_seq = EXCLUDED.cut_seq, projection = EXCLUDED.projection, "
    "duplicates = EXCLUDED.duplicates, taken_at = now() WHERE s.cut_seq < EXCLUDED.cut_seq"
)
_COPY_TO_ARCHIVE = (
    "INSERT INTO event_log_archive (seq, mentor_id, kind, version, data, recorded_at, xid) "
    "SELECT seq, mentor_id, kind, version, data, recorded_at, xid FROM event_log WHERE seq <= %(cut)s "
    "ON CONFLICT (seq) DO NOTHING"
)
_DELETE_ARCHIVED = (
    "SET LOCAL hlf.archiving = 'on'",
    "DELETE FROM event_log WHERE seq > %(low)s AND seq <= %(high)s",
)
_DELETE_CHUNK = 50_000  # seqs per delete transaction


_DROP_NEW_SNAPSHOTS = "DROP TABLE IF EXISTS pg_temp.projection_snapshots_new"
_CREATE_NEW_SNAPSHOTS = "CREATE TEMP TABLE projection_snapshots_new (LIKE projection_snapshots INCLUDING DEFAULTS)"
_LOCK_PROJECTIONS = "LOCK TABLE sync_status, dead_letters, duplicate_findings IN EXCLUSIVE MODE"
_OLDEST_SEQ = "SELECT min(seq) FROM event_log"


def archive(
    url: str, *, older_than: timedelta, progress: Progress | None = None, app_schema: str = "public"
) -> ArchiveReport:
    """Move events older than ``older_than`` to event_log_archive, keeping replay exact.

    The cut is a seq: every event up to it is archived, and it stays below anything still in the inbox. Each
    mentor's state at the cut is folded and the events are copied to the archive outside any lock (archived events
    never change); the snapshots are stored in one transaction under the replay's table locks, so a live re-fold
    (which holds its mentor's row lock) sees either the old snapshot and every event or the new one and the events
    after it; then the archived events are deleted in chunks. A rerun after a crash carries on where it stopped.
    """
    progress = progress if progress is not None else Progress(label="archive")
    started = time.monotonic()
    with connect(url, app_schema) as writer, connect(url, app_schema) as reader, replay_lock(writer):
        reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        reader.read_only = True
        writer.execute(_DROP_NEW_SNAPSHOTS)
        writer.execute(_CREATE_NEW_SNAPSHOTS)
        snapshots = 0
        with reader.transaction():
            newest = reader.execute(_CUT[0], (older_than,)).fetchone()
            oldest_unprojected = reader.execute(_CUT[1]).fetchone()
            cut: int | None = newest[0] if newest else None
            if cut is not None and oldest_unprojected and oldest_unprojected[0] is not None:
                cut = min(cut, int(oldest_unprojected[0]) - 1)
            if cut is None or cut < 1:
                return ArchiveReport(cut_seq=None, archived=0, snapshots=0, seconds=time.monotonic() - started)
            counted = reader.execute(_COUNT_UPTO, {"cut": cut}).fetchone()
            assert counted is not None
            progress.start(int(counted[0]))
            statement = sql.SQL("COPY pg_temp.projection_snapshots_new ({}) FROM STDIN").format(
                sql.SQL(", ").join(map(sql.Identifier, _SNAPSHOT_COLUMNS))
            )
            with writer.cursor() as cur, cur.copy(statement) as copy:
                for mentor_id, start, events in histories(
                    reader, inbox=frozenset(), kinds=None, upto=cut, on_events=progress.advance
                ):
                    state = fold_mentor(mentor_id, events, start)
                    copy.write_row(
                        (
                            mentor_id,
                            cut,
                            msgspec.json.encode(state.projection).decode(),
                            msgspec.json.encode(state.duplicates).decode(),
                        )
                    )
                    snapshots += 1
        progress.finish()
        # Copies first, outside the locks: harmless on their own (replay reads event_log), and kept on a retry.
        writer.execute(_COPY_TO_ARCHIVE, {"cut": cut})
        with writer.transaction():
            writer.execute(_LOCK_PROJECTIONS)
            now = writer.execute(_COUNT_UPTO, {"cut": cut}).fetchone()
            assert now is not None
            if int(now[0]) != int(counted[0]) or int(now[1]) != 0:
                raise ArchiveRaced(
                    f"an event at or below seq {cut} committed while archiving; nothing was deleted, run it again"
                )
            writer.execute(_STORE_SNAPSHOTS)
        # From here on every reader folds a mentor's snapshot and only the events after its cut, so the archived
        # rows can leave the log in small transactions, without the locks.
        first = writer.execute(_OLDEST_SEQ).fetchone()
        low = int(first[0]) - 1 if first and first[0] is not None else cut
        while low < cut:
            high = min(low + _DELETE_CHUNK, cut)
            with writer.transaction():
                writer.execute(_DELETE_ARCHIVED[0])
                writer.execute(_DELETE_ARCHIVED[1], {"low": low, "high": high})
            low = high
    return ArchiveReport(cut_seq=cut, archived=int(counted[0]), snapshots=snapshots, seconds=time.monotonic() - started)
