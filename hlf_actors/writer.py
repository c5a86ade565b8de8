"""The SQL side of the projections: append events and write what ``projections`` folds from them.

Every function here runs inside the caller's transaction. ``append`` is how the service writes its own events
(attempt outcomes, alerts, checks); ``drain_inbox`` is how the projector folds the events SQL wrote (the triggers'
``hlf_inbox``). Both load the mentors' rows FOR UPDATE before writing, which is what replay's table locks rely on
(``replay.py``). The rules themselves are in ``projections.py``; this module only reads and writes rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from datetime import date, datetime
from typing import Any, NamedTuple
from uuid import UUID

import msgspec
import psycopg
from psycopg import sql

from . import db
from .event_codec import decode_event
from .events import AttemptSucceeded, DeadLettered, Event, NewEvent, Requeued, encode_payload
from .projections import PROJECTED_KINDS, DeadLetterRow, MentorProjection, SyncRow, fold, is_projected

__all__ = ["DRAIN_LOCK", "Drained", "MentorFacts", "append", "drain_inbox", "sync_row_from_db"]

# Only one transaction at a time creates projection rows; rows that exist are locked with FOR UPDATE.
DRAIN_LOCK = 0x484C_465F_4452_4149  # "HLF_DRAI"

_SYNC_COLUMNS = tuple(SyncRow.__struct_fields__)
_DL_COLUMNS = tuple(DeadLetterRow.__struct_fields__)


def _upsert(table: str, columns: tuple[str, ...], key: str) -> str:
    """INSERT … ON CONFLICT DO UPDATE of every column: the columns are the row struct's fields, so the statement
    follows the struct. Composed once, at import, into plain text (no per-call composition on the hot path)."""
    return (
        sql.SQL("INSERT INTO {table} ({columns}) VALUES ({values}) ON CONFLICT ({key}) DO UPDATE SET {updates}")
        .format(
            table=sql.Identifier(table),
            columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
            values=sql.SQL(", ").join(sql.Placeholder() * len(columns)),
            key=sql.Identifier(key),
            updates=sql.SQL(", ").join(
                sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in columns if c != key
            ),
        )
        .as_string(None)
    )


_UPSERT_SYNC = _upsert("sync_status", _SYNC_COLUMNS, "mentor_id")
_UPSERT_DL = _upsert("dead_letters", _DL_COLUMNS, "id")


def _events_from_rows(rows: Iterable[Sequence[Any]]) -> list[Event]:
    return [decode_event(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]


async def _load(
    conn: psycopg.AsyncConnection[Any], mentor_ids: Sequence[UUID], *, lock: bool, letters: bool = True
) -> dict[UUID, MentorProjection]:
    """Current projections of the mentors; ``lock`` takes their rows FOR UPDATE. Without ``letters`` the dead
    letters are left out: only safe when no event about to be folded creates or changes one."""
    pending = await _send_load(conn, mentor_ids, lock=lock, letters=letters)
    return await pending.collect()


class _PendingLoad:
    """A load whose statements are sent but whose rows are not read yet: in pipeline mode, what is sent after it
    travels in the same round trip."""

    def __init__(
        self,
        ids: list[UUID],
        syncs: psycopg.AsyncCursor[Any],
        letters: psycopg.AsyncCursor[Any] | None,
    ) -> None:
        self._ids, self._syncs, self._letters = ids, syncs, letters

    async def collect(self) -> dict[UUID, MentorProjection]:
        syncs = {row[0]: sync_row_from_db(row) for row in await self._syncs.fetchall()}
        found: dict[UUID, list[DeadLetterRow]] = defaultdict(list)
        if self._letters is not None:
            for row in await self._letters.fetchall():
                letter = DeadLetterRow(**dict(zip(_DL_COLUMNS, row, strict=True)))
                found[letter.mentor_id].append(letter)
        return {
            m: MentorProjection(mentor_id=m, sync=syncs.get(m), dead_letters=tuple(found.get(m, ()))) for m in self._ids
        }


async def _send_load(
    conn: psycopg.AsyncConnection[Any], mentor_ids: Sequence[UUID], *, lock: bool, letters: bool
) -> _PendingLoad:
    ids = sorted(set(mentor_ids))
    syncs = conn.cursor()
    await syncs.execute(db.query("load_sync_rows_for_update" if lock else "load_sync_rows"), (ids,))
    found = None
    if letters:
        found = conn.cursor()
        await found.execute(db.query("load_dead_letters"), (ids,))
    return _PendingLoad(ids, syncs, found)


_DELETE_LETTERS = "DELETE FROM dead_letters WHERE id = ANY(%s)"


async def _write(
    conn: psycopg.AsyncConnection[Any], changes: Iterable[tuple[MentorProjection, MentorProjection]]
) -> None:
    sync_rows: list[tuple[Any, ...]] = []
    letter_rows: list[tuple[Any, ...]] = []
    gone: list[int] = []
    for old, new in changes:
        if new.sync is not None and new.sync != old.sync:
            sync_rows.append(tuple(list(v) if isinstance(v, tuple) else v for v in msgspec.structs.astuple(new.sync)))
        old_letters = {dl.id: dl for dl in old.dead_letters}
        new_ids = set()
        for letter in new.dead_letters:
            new_ids.add(letter.id)
            if old_letters.get(letter.id) != letter:
                letter_rows.append(msgspec.structs.astuple(letter))
        gone.extend(i for i in old_letters if i not in new_ids)
    async with conn.cursor() as cur:
        if sync_rows:
            await cur.executemany(_UPSERT_SYNC, sync_rows)
        if letter_rows:
            await cur.executemany(_UPSERT_DL, letter_rows)
        if gone:
            await cur.execute(_DELETE_LETTERS, (gone,))


async def _refold(conn: psycopg.AsyncConnection[Any], mentor_ids: Sequence[UUID]) -> dict[UUID, MentorProjection]:
    """Fold mentors again from every projected event of theirs, in seq order: what replay would compute. A mentor
    whose oldest events were archived starts from their state at the cut, with the events after it
    (hlf_actors/archival.py)."""
    cur = await conn.execute(_ARCHIVE_SNAPSHOTS, (list(mentor_ids),))
    starts = {row[0]: (row[1], msgspec.json.decode(row[2], type=MentorProjection)) for row in await cur.fetchall()}
    cur = await conn.execute(db.query("projected_events_of_mentors"), (list(mentor_ids), list(PROJECTED_KINDS)))
    by_mentor: dict[UUID, list[Event]] = defaultdict(list)
    for event in _events_from_rows(await cur.fetchall()):
        assert event.mentor_id is not None
        if event.mentor_id not in starts or event.seq > starts[event.mentor_id][0]:
            by_mentor[event.mentor_id].append(event)
    return {m: fold(m, by_mentor.get(m, ()), start=starts[m][1] if m in starts else None) for m in mentor_ids}


_ARCHIVE_SNAPSHOTS = "SELECT mentor_id, cut_seq, projection::text FROM projection_snapshots WHERE mentor_id = ANY(%s)"


# The events whose fold may create or change a dead letter (a success resolves the open ones).
_LETTER_TYPES = (DeadLettered, Requeued, AttemptSucceeded)


def _touches_letters(events: Iterable[Event | NewEvent]) -> bool:
    return any(isinstance(e.payload, _LETTER_TYPES) for e in events)


async def _project(
    conn: psycopg.AsyncConnection[Any],
    events: Sequence[Event],
    current: dict[UUID, MentorProjection] | None = None,
) -> dict[UUID, MentorProjection]:
    """Fold events into the projections of their mentors; ``current`` is what the caller already loaded and
    locked, else the rows are loaded and locked here."""
    by_mentor: dict[UUID, list[Event]] = defaultdict(list)
    for event in events:
        if is_projected(event):
            assert event.mentor_id is not None
            by_mentor[event.mentor_id].append(event)
    if not by_mentor:
        return {}
    if current is None:
        current = await _load(conn, list(by_mentor), lock=True, letters=_touches_letters(events))
    changes: list[tuple[MentorProjection, MentorProjection]] = []
    late: list[UUID] = []
    for mentor_id, mentor_events in by_mentor.items():
        old = current[mentor_id]
        mentor_events.sort(key=lambda e: e.seq)
        if old.sync is not None and mentor_events[0].seq <= old.sync.last_seq:
            # A transaction committed after a later one was already folded: fold the mentor again by seq.
            late.append(mentor_id)
        else:
            changes.append((old, fold(mentor_id, mentor_events, start=old)))
    if late:
        olds = await _load(conn, late, lock=False)
        news = await _refold(conn, late)
        changes.extend((olds[m], news[m]) for m in late)
    await _write(conn, changes)
    return {new.mentor_id: new for _, new in changes}


_TAKE_DRAIN_LOCK = "SELECT pg_advisory_xact_lock(%s)"


async def append(
    conn: psycopg.AsyncConnection[Any], events: Sequence[NewEvent]
) -> tuple[list[Event], dict[UUID, MentorProjection]]:
    """Append events and fold them into the projections, in the caller's transaction.

    Used for the service's own events (attempt outcomes, alerts). The rows of the mentors concerned are locked
    FOR UPDATE and the events inserted in the same flight of statements (one round trip when the caller's
    connection is in pipeline mode); an event whose seq turns out to be below what its row already folded is
    handled like any late event, by re-folding the mentor from the log.
    """
    mentors = sorted({e.mentor_id for e in events if e.mentor_id is not None and is_projected(e)})
    letters = _touches_letters(events)
    load = await _send_load(conn, mentors, lock=True, letters=letters) if mentors else None
    inserts: list[psycopg.AsyncCursor[Any]] = []
    for new in events:
        cur = conn.cursor()
        await cur.execute(db.query("insert_event"), (new.mentor_id, new.kind, encode_payload(new.payload).decode()))
        inserts.append(cur)
    current = await load.collect() if load is not None else None
    rows: list[tuple[int, datetime, int]] = []
    for cur in inserts:
        row = await cur.fetchone()
        assert row is not None
        rows.append((row[0], row[1], row[2]))
    appended = [
        Event(seq=seq, mentor_id=new.mentor_id, kind=new.kind, version=1, recorded_at=at, payload=new.payload, xid=xid)
        for (seq, at, xid), new in zip(rows, events, strict=True)
    ]
    if current is None:
        return appended, {}
    if any(p.sync is None for p in current.values()):
        # New projection rows are only ever created under the drain lock.
        await conn.execute(_TAKE_DRAIN_LOCK, (DRAIN_LOCK,))
        current = await _load(conn, mentors, lock=True, letters=letters)
    return appended, await _project(conn, appended, current)


class MentorFacts(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What a drain read about a mentor beside its events (the ``drain_take`` query): together with the mentor's
    folded projection, everything ``mentor_work`` would read, so the drain can hand the actor its work."""

    mentor_exists: bool
    portal_record_id: UUID | None
    eligible: bool
    snapshot: str
    newest_change_seq: int | None
    change_age_s: float | None
    db_now: datetime


class Drained(NamedTuple):
    taken: int  # events taken from the inbox
    projected: dict[UUID, MentorProjection]  # the new projection of every mentor touched
    facts: dict[UUID, MentorFacts]  # for every mentor with events in the batch


async def drain_inbox(
    conn: psycopg.AsyncConnection[Any],
    limit: int = 1000,
    *,
    on_events: Callable[[Sequence[Event]], None] | None = None,
    today: date | None = None,
) -> Drained:
    """Project up to ``limit`` events written by SQL, oldest first, and remove them from the inbox.

    Must run inside a transaction. Taking the events, locking their mentors' rows and reading the mentors' facts
    (eligibility on ``today``, default the host's date) is one statement; the fold's writes are sent, and in
    pipeline mode not yet waited for, when this returns. ``on_events`` sees the events taken (for metrics).
    """
    await conn.execute(_TAKE_DRAIN_LOCK, (DRAIN_LOCK,))
    cur = await conn.execute(db.query("drain_take"), {"limit": limit, "today": today or date.today()})
    rows = await cur.fetchall()
    if not rows:
        return Drained(0, {}, {})
    events = _events_from_rows(rows)
    if on_events is not None:
        on_events(events)
    current: dict[UUID, MentorProjection] = {}
    facts: dict[UUID, MentorFacts] = {}
    for row in rows:
        mentor_id = row[1]
        if mentor_id is None or mentor_id in facts:
            continue
        sync = sync_row_from_db(row[7:19]) if row[7] is not None else None
        current[mentor_id] = MentorProjection(mentor_id=mentor_id, sync=sync)
        exists, record_id, eligible, snapshot, change_seq, age, now = row[19:]
        facts[mentor_id] = MentorFacts(
            mentor_exists=exists,
            portal_record_id=record_id,
            eligible=bool(eligible),
            snapshot=snapshot,
            newest_change_seq=change_seq,
            change_age_s=age,
            db_now=now,
        )
    if _touches_letters(events):  # rare: the fold needs the dead letters too (the rows are locked already)
        current = await _load(conn, list(current), lock=True)
    return Drained(len(events), await _project(conn, events, current), facts)


def sync_row_from_db(row: Sequence[Any]) -> SyncRow:
    values = dict(zip(_SYNC_COLUMNS, row, strict=True))
    values["uncovered_xids"] = tuple(values["uncovered_xids"] or ())
    return SyncRow(**values)
