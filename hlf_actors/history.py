"""The history reader: every mentor's archive snapshot and projected events, one mentor at a time, with flat memory.

Replay, archival and the service's duplicate scan all fold the log mentor by mentor (``projections.fold_mentor``);
this is how they read it. Rows stream from one plain query while a thread reads a few thousand ahead, so the server
formats and sends while we fold; memory stays flat whatever the size of the log.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from collections.abc import Set as AbstractSet
from contextlib import suppress
from typing import Any
from uuid import UUID

import msgspec
import psycopg
from psycopg import sql

from .duplicate_rules import DETECTED_KINDS, DuplicateState
from .event_codec import decode_events
from .events import Event
from .projections import PROJECTED_KINDS, MentorProjection, MentorState

__all__ = ["History", "changed_since", "histories", "unprojected"]

_ITERSIZE = 2_000  # mentors per fetch (about 20,000 events)
_PREFETCH = 4  # fetches read ahead: on a busy machine the server and we are not always running at the same time
_STREAM_KINDS: tuple[str, ...] = (*PROJECTED_KINDS, *DETECTED_KINDS)

# One row per mentor: their events as one JSON array of [kind, seq, version, recorded_at, xid, data] in seq order
# (``event_codec.decode_events`` decodes it in one call), and their snapshot if they have one. Rows per mentor rather
# than per event, because the client's cost is per row (the driver turning columns into objects). Each event's JSON is
# built by concatenation (`kind` is [a-z_]+, a CHECK; the rest are numbers, JSON and to_json: cheaper than
# json_build_array) below the sort, so that for the whole log the parallel workers scan, format and sort it together.
# That takes a plain query, streamed (``Cursor.stream``), not a server-side cursor, whose plan is never parallel
# (bench/NOTES.md: replay's read). The aggregate takes the events in the order the sorted subquery hands them over (a
# subquery with ORDER BY is never flattened) rather than with ORDER BY seq, which PostgreSQL 15 would sort again mentor
# by mentor; should a plan ever differ, ``decode_events`` puts them back in seq order.
_HISTORIES = sql.SQL(
    "SELECT mentor_id, e.events, s.projection::text, s.duplicates::text, s.cut_seq "
    "FROM (SELECT mentor_id, '[' || string_agg(event, ',') || ']' AS events "
    "      FROM (SELECT mentor_id, '[\"' || kind || '\",' || seq || ',' || version || ',' "
    "            || to_json(recorded_at)::text || ',' || xid::text || ',' || data::text || ']' AS event "
    "            FROM event_log WHERE {events} ORDER BY mentor_id, seq) AS ordered "
    "      GROUP BY mentor_id) AS e "
    "FULL JOIN (SELECT mentor_id, projection, duplicates, cut_seq FROM projection_snapshots {snapshots}) AS s "
    "USING (mentor_id)"
)
_INBOX = "SELECT i.seq, e.mentor_id FROM hlf_inbox i JOIN event_log e USING (seq)"
_CHANGED_SINCE = (
    "SELECT DISTINCT mentor_id FROM event_log "
    "WHERE xid >= pg_snapshot_xmin(%(s)s::pg_snapshot) AND NOT pg_visible_in_snapshot(xid, %(s)s::pg_snapshot) "
    "AND mentor_id IS NOT NULL"
)


_projection_decoder = msgspec.json.Decoder(MentorProjection)
_duplicates_decoder = msgspec.json.Decoder(DuplicateState)

History = tuple[UUID, MentorState | None, list[Event]]


def unprojected(conn: psycopg.Connection[Any]) -> tuple[set[int], set[UUID]]:
    """The unprojected events (seqs) and their mentors, in the caller's snapshot."""
    seqs: set[int] = set()
    mentors: set[UUID] = set()
    for seq, mentor_id in conn.execute(_INBOX).fetchall():
        seqs.add(seq)
        if mentor_id is not None:
            mentors.add(mentor_id)
    return seqs, mentors


def changed_since(conn: psycopg.Connection[Any], snapshot: str) -> set[UUID]:
    """The mentors with an event written by a transaction ``snapshot`` did not see."""
    return {row[0] for row in conn.execute(_CHANGED_SINCE, {"s": snapshot}).fetchall()}


def histories(
    conn: psycopg.Connection[Any],
    *,
    inbox: AbstractSet[int],
    mentors: Sequence[UUID] | None = None,
    kinds: Sequence[str] | None = _STREAM_KINDS,
    upto: int | None = None,
    on_events: Callable[[int], None] | None = None,
    itersize: int = _ITERSIZE,
    prefetch: int = _PREFETCH,
) -> Iterator[History]:
    """Each mentor's snapshot (if any) and projected events, mentor by mentor, in no particular order of mentors.
    ``itersize`` mentors are fetched at a time, ``prefetch`` fetches ahead (memory against speed).

    Must run inside a transaction. Leaving it before the end cancels the query, which aborts that transaction.
    """
    where = [sql.SQL("mentor_id IS NOT NULL")]
    params: dict[str, Any] = {}
    if kinds is not None:
        where.append(sql.SQL("kind = ANY(%(kinds)s)"))
        params["kinds"] = list(kinds)
    if mentors is not None:
        where.append(sql.SQL("mentor_id = ANY(%(mentors)s)"))
        params["mentors"] = list(mentors)
    if upto is not None:
        where.append(sql.SQL("seq <= %(upto)s"))
        params["upto"] = upto
    snap_where = sql.SQL("WHERE mentor_id = ANY(%(mentors)s)") if mentors is not None else sql.SQL("")
    query = _HISTORIES.format(events=sql.SQL(" AND ").join(where), snapshots=snap_where)
    rows = _prefetch(conn.cursor().stream(query, params, size=itersize), itersize=itersize, depth=prefetch)
    try:
        for mentor, events_json, projection, duplicates, cut_seq in rows:
            start: MentorState | None = None
            after = 0  # events up to the archive cut are in the snapshot, whether or not still in the log
            if projection is not None:
                start = MentorState(
                    projection=_projection_decoder.decode(projection), duplicates=_duplicates_decoder.decode(duplicates)
                )
                after = cut_seq
            events: list[Event] = []
            if events_json is not None:
                events = decode_events(mentor, events_json)  # in seq order, whatever the server's plan did
                if on_events is not None:
                    on_events(len(events))
                if after or inbox:
                    events = [e for e in events if e.seq > after and e.seq not in inbox]
            yield mentor, start, events
    finally:
        rows.close()  # stop the fetching thread, and the query with it


def _prefetch(rows: Iterator[Any], *, itersize: int, depth: int) -> Generator[Any, None, None]:
    """The rows, read by a thread a few thousand ahead of the consumer.

    The server sends rows only as fast as we take them, so reading in line would leave the server idle while we
    fold and us idle while it works; this overlaps the two. The driver waits for the network without the GIL.
    """
    batches: queue.Queue[list[Any] | BaseException | None] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def pump() -> None:
        try:
            batch: list[Any] = []
            for row in rows:
                batch.append(row)
                if len(batch) >= itersize:
                    batches.put(batch)
                    batch = []
                    if stop.is_set():
                        return
            batches.put(batch)
            batches.put(None)
        except BaseException as err:  # handed to the consumer, which raises it
            batches.put(err)
        finally:
            if isinstance(rows, Generator):
                rows.close()  # ends the query early if the consumer stopped

    thread = threading.Thread(target=pump, name="hlf-replay-fetch", daemon=True)
    thread.start()
    try:
        while (item := batches.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield from item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a pump waiting to put, then let it end
            with suppress(queue.Empty):
                batches.get(timeout=0.05)
        thread.join()
