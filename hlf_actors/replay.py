"""Replay: rebuild every projection from event_log alone, while the service runs, and check or repair the live ones.

The projections are ``sync_status`` and ``dead_letters`` (``projections.MentorFold``, what ``apply`` runs) and
``duplicate_findings`` (``duplicate_rules.Detector``); ``projections.fold_mentor`` runs both over one mentor's events in
one pass, and is the only fold replay knows (it reads the log with ``history.histories``). A mentor's projected
events are those in event_log and not in hlf_inbox, folded in seq order, after the mentor's projection_snapshots row
if their oldest events were archived.

    1. rebuild   REPEATABLE READ snapshot S0; stream event_log by (mentor, seq), one row per mentor, a few
                 thousand rows at a time, so memory stays flat whatever the log's size; fold; COPY the rows into
                 scratch tables (temporary: sync_status_rebuild, dead_letters_rebuild, duplicate_findings_rebuild)
    2. catch up  one transaction: LOCK TABLE sync_status, dead_letters, duplicate_findings IN EXCLUSIVE MODE, then
                 fold again every mentor whose projected events changed since S0 — an event written by a
                 transaction S0 did not see (``xid`` not visible in S0), or one in the inbox at S0 and drained since
    3. compare   rows missing from, extra in, or different in the live tables
       replay:   apply exactly those rows and raise the new duplicate findings, then commit
       verify:   print them and roll back; nothing live is touched

Why the lock makes step 2 exact: every writer of projected events or projection rows goes through a lock on
sync_status first — ``writer.append`` loads its rows FOR UPDATE before appending, the drain loads them before
writing, and duplicate raisers lock duplicate_findings before appending. Once EXCLUSIVE mode is granted, none is in
flight and the next ones wait, so the log we fold is the log the live tables reflect. (A drain may have taken rows
off the inbox and be waiting for its row locks: its transaction has not committed, so to us those events are still
unprojected, and the live rows do not contain them either. After we commit it folds them on top of our rows.)
The projector's DRAIN_LOCK is deliberately not taken: ``append`` takes it *after* its row locks when it creates a
row, so taking it before the table lock would deadlock with such an append.

Why a diff and not TRUNCATE + INSERT: EXCLUSIVE mode still lets readers read, and they see the old rows until the
commit and the new ones after it — never a half-built projection — and a projection that was right is not
rewritten. One replay or archival runs at a time (a session advisory lock).

Archival (``archival.py``) shares the replay lock and folds with the same rule.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager, suppress
from typing import Any, Literal
from uuid import UUID

import msgspec
import psycopg
from psycopg import sql

from . import db
from .duplicate_rules import Finding, FindingRow
from .duplicates import raise_findings
from .errors import ReplayBusy
from .history import changed_since, histories, unprojected
from .progress import Progress
from .projections import DeadLetterRow, MentorState, SyncRow, fold_mentor

__all__ = [
    "REPLAY_LOCK",
    "ReplayBusy",
    "ReplayReport",
    "connect",
    "replay",
    "replay_lock",
]

REPLAY_LOCK = 0x484C_465F_5245_504C  # "HLF_REPL": one replay or archival at a time (session lock)
_WRITE_BATCH = 5_000


# ---------------------------------------------------------------------------------------------------------------
# Scratch tables.


class _Table(msgspec.Struct, frozen=True):
    live: str
    key: str
    columns: tuple[str, ...]  # the projected columns: what is rebuilt and compared
    on_insert: tuple[tuple[str, str], ...] = ()  # (column, expression over the scratch row) for restored rows

    @property
    def scratch(self) -> str:
        return f"{self.live}_rebuild"


_SYNC_COLUMNS = tuple(SyncRow.__struct_fields__)
_TABLES = (
    _Table("sync_status", "mentor_id", _SYNC_COLUMNS),
    _Table("dead_letters", "id", tuple(DeadLetterRow.__struct_fields__)),
    # A finding restored by replay was raised by the live path, which owns its alert: it is not alerted again.
    _Table("duplicate_findings", "key", tuple(FindingRow.__struct_fields__), (("alerted_at", "detected_at"),)),
)
_SYNC, _LETTERS, _FINDINGS = _TABLES


def _create_scratch(conn: psycopg.Connection[Any]) -> None:
    """Empty scratch tables shaped like the live ones, without their indexes: they are filled first and indexed once
    at the end (``_index_scratch``), which costs the server less than keeping eight indexes up to date row by row."""
    for table in _TABLES:
        scratch = sql.Identifier("pg_temp", table.scratch)
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(scratch))
        conn.execute(
            sql.SQL("CREATE TEMP TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)").format(
                sql.Identifier(table.scratch), sql.Identifier(table.live)
            )
        )


def _index_scratch(conn: psycopg.Connection[Any]) -> None:
    """The keys the comparison joins on, and statistics: without them the planner guesses a temp table's size."""
    for table in _TABLES:
        scratch = sql.Identifier("pg_temp", table.scratch)
        conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(scratch, sql.Identifier(table.key)))
        conn.execute(sql.SQL("ANALYZE {}").format(scratch))


_COLUMN_TYPES = (
    "SELECT a.atttypid, t.typcategory = 'A' FROM unnest(%s::text[]) WITH ORDINALITY AS c (name, n) "
    "JOIN pg_attribute a ON a.attrelid = %s::regclass AND a.attname = c.name "
    "JOIN pg_type t ON t.oid = a.atttypid ORDER BY c.n"
)


class _Sink:
    """Rows of the rebuilt projections, written to the scratch tables in batches by binary COPY: the driver formats
    the values in C, and the server reads them without parsing text (JSON through json_populate_recordset cost the
    server three times as much)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self._rows: dict[str, list[msgspec.Struct]] = {t.live: [] for t in _TABLES}
        self._types: dict[str, list[int]] = {}
        self._arrays: dict[str, tuple[int, ...]] = {}  # positions of the array columns: tuples, sent as lists
        for table in _TABLES:
            types = conn.execute(_COLUMN_TYPES, (list(table.columns), table.live)).fetchall()
            self._types[table.live] = [oid for oid, _ in types]
            self._arrays[table.live] = tuple(i for i, (_, array) in enumerate(types) if array)
        self.mentors = 0

    def add(self, state: MentorState) -> None:
        if state.projection.sync is not None:
            self._rows[_SYNC.live].append(state.projection.sync)
            self.mentors += 1
        if state.projection.dead_letters:
            self._rows[_LETTERS.live].extend(state.projection.dead_letters)
        if state.duplicates.raised:
            self._rows[_FINDINGS.live].extend(state.duplicates.raised)
        if len(self._rows[_SYNC.live]) >= _WRITE_BATCH:
            self.flush()

    def flush(self) -> None:
        astuple = msgspec.structs.astuple
        for table in _TABLES:
            rows = self._rows[table.live]
            if not rows:
                continue
            arrays = self._arrays[table.live]
            with self._conn.cursor() as cur, cur.copy(_copy_into(table)) as copy:
                copy.set_types(self._types[table.live])
                for row in rows:
                    values = list(astuple(row))
                    for i in arrays:
                        values[i] = list(values[i])
                    copy.write_row(values)
            rows.clear()


def _copy_into(table: _Table) -> sql.Composed:
    return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        sql.Identifier("pg_temp", table.scratch), sql.SQL(", ").join(map(sql.Identifier, table.columns))
    )


# ---------------------------------------------------------------------------------------------------------------
# Replay and verify.


class RowDiff(msgspec.Struct, frozen=True, kw_only=True):
    table: str
    key: str
    kind: Literal["missing", "extra", "different"]  # missing from the live table / only in it / both, unequal
    columns: dict[str, tuple[Any, Any]]  # column → (live, replayed); only the differing ones for "different"


class TableDiff(msgspec.Struct, frozen=True, kw_only=True):
    table: str
    missing: int
    extra: int
    different: int
    rows: tuple[RowDiff, ...]  # the first few, to print

    @property
    def total(self) -> int:
        return self.missing + self.extra + self.different


class ReplayReport(msgspec.Struct, frozen=True, kw_only=True):
    applied: bool  # False for --verify
    events: int
    mentors: int
    refolded: int  # mentors whose events changed during the rebuild, folded again under the lock
    seconds: float
    tables: tuple[TableDiff, ...]
    raised: tuple[FindingRow, ...]  # findings this replay raised
    unraised: tuple[Finding, ...]  # findings the log shows that nobody raised yet (verify only)

    @property
    def differences(self) -> int:
        return sum(t.total for t in self.tables)

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


class _Built(msgspec.Struct, kw_only=True):
    snapshot: str
    inbox_mentors: set[UUID]
    events: int
    mentors: int
    pending: dict[UUID, list[Finding]]


def connect(url: str, app_schema: str) -> psycopg.Connection[Any]:
    return db.connect(url, app_schema=app_schema, application_name="hlf-actors replay")


_TRY_REPLAY_LOCK = "SELECT pg_try_advisory_lock(%s)"
_REPLAY_UNLOCK = "SELECT pg_advisory_unlock(%s)"


@contextmanager
def replay_lock(conn: psycopg.Connection[Any]) -> Iterator[None]:
    row = conn.execute(_TRY_REPLAY_LOCK, (REPLAY_LOCK,)).fetchone()
    if not row or not row[0]:
        raise ReplayBusy("another replay or archival is running; try again when it has finished")
    try:
        yield
    finally:
        with suppress(psycopg.Error):  # a broken connection has released it already
            conn.execute(_REPLAY_UNLOCK, (REPLAY_LOCK,))


_ESTIMATED_EVENTS = "SELECT reltuples::bigint FROM pg_class WHERE oid = 'event_log'::regclass"


def _estimate(conn: psycopg.Connection[Any]) -> int | None:
    row = conn.execute(_ESTIMATED_EVENTS).fetchone()
    return int(row[0]) if row and row[0] and row[0] > 0 else None


_CURRENT_SNAPSHOT = "SELECT pg_current_snapshot()::text"


def _rebuild(reader: psycopg.Connection[Any], writer: psycopg.Connection[Any], progress: Progress) -> _Built:
    """Step 1: fold the whole log as of one snapshot into the scratch tables."""
    _create_scratch(writer)
    sink = _Sink(writer)
    pending: dict[UUID, list[Finding]] = {}
    progress.start(_estimate(reader))
    reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    reader.read_only = True
    with reader.transaction():
        row = reader.execute(_CURRENT_SNAPSHOT).fetchone()
        assert row is not None
        snapshot = str(row[0])
        inbox, inbox_mentors = unprojected(reader)
        for mentor_id, start, events in histories(reader, inbox=inbox, on_events=progress.advance):
            state = fold_mentor(mentor_id, events, start)
            sink.add(state)
            unraised = state.duplicates.unraised()
            if unraised:
                pending[mentor_id] = unraised
    sink.flush()
    _index_scratch(writer)
    progress.finish()
    return _Built(
        snapshot=snapshot, inbox_mentors=inbox_mentors, events=progress.done, mentors=sink.mentors, pending=pending
    )


def _refold(
    conn: psycopg.Connection[Any], mentors: set[UUID], inbox: AbstractSet[int], pending: dict[UUID, list[Finding]]
) -> None:
    """Step 2: fold the given mentors again from the log as it is now, replacing their scratch rows."""
    ids = sorted(mentors)
    states = [fold_mentor(m, events, start) for m, start, events in histories(conn, inbox=inbox, mentors=ids)]
    for table in _TABLES:
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE mentor_id = ANY(%s)").format(sql.Identifier("pg_temp", table.scratch)),
            (ids,),
        )
    sink = _Sink(conn)
    for m in ids:
        pending.pop(m, None)
    for state in states:
        sink.add(state)
        unraised = state.duplicates.unraised()
        if unraised:
            pending[state.projection.mentor_id] = unraised
    sink.flush()


def _row_tuple(table: _Table, alias: str) -> sql.Composed:
    return sql.SQL("({})").format(sql.SQL(", ").join(sql.Identifier(alias, c) for c in table.columns))


def _differing(table: _Table) -> sql.Composed:
    """FROM … WHERE … of the rows that differ between the live and the scratch table (l: live, r: replayed)."""
    return sql.SQL("FROM {live} l FULL JOIN {scratch} r ON l.{key} = r.{key} WHERE {l} IS DISTINCT FROM {r}").format(
        live=sql.Identifier(table.live),
        scratch=sql.Identifier("pg_temp", table.scratch),
        key=sql.Identifier(table.key),
        l=_row_tuple(table, "l"),
        r=_row_tuple(table, "r"),
    )


def _diff(conn: psycopg.Connection[Any], table: _Table, limit: int) -> TableDiff:
    key = sql.Identifier(table.key)
    counts = conn.execute(
        sql.SQL(
            "SELECT count(*) FILTER (WHERE l.{k} IS NULL), count(*) FILTER (WHERE r.{k} IS NULL), "
            "count(*) FILTER (WHERE l.{k} IS NOT NULL AND r.{k} IS NOT NULL) {d}"
        ).format(k=key, d=_differing(table))
    ).fetchone()
    assert counts is not None
    missing, extra, different = (int(c) for c in counts)
    rows: list[RowDiff] = []
    if missing + extra + different and limit > 0:
        n = len(table.columns)
        cur = conn.execute(
            sql.SQL("SELECT {l}, {r} {d} ORDER BY coalesce(l.{k}, r.{k}) LIMIT %s").format(
                l=sql.SQL(", ").join(sql.Identifier("l", c) for c in table.columns),
                r=sql.SQL(", ").join(sql.Identifier("r", c) for c in table.columns),
                d=_differing(table),
                k=key,
            ),
            (limit,),
        )
        key_index = table.columns.index(table.key)
        for values in cur.fetchall():
            live, replayed = values[:n], values[n:]
            if live[key_index] is None:
                kind: Literal["missing", "extra", "different"] = "missing"
                cols = {c: (None, v) for c, v in zip(table.columns, replayed, strict=True)}
            elif replayed[key_index] is None:
                kind = "extra"
                cols = {c: (v, None) for c, v in zip(table.columns, live, strict=True)}
            else:
                kind = "different"
                cols = {c: (a, b) for c, a, b in zip(table.columns, live, replayed, strict=True) if a != b}
            shown = live[key_index] if live[key_index] is not None else replayed[key_index]
            rows.append(RowDiff(table=table.live, key=str(shown), kind=kind, columns=cols))
    return TableDiff(table=table.live, missing=missing, extra=extra, different=different, rows=tuple(rows))


def _apply(conn: psycopg.Connection[Any], table: _Table) -> None:
    """Make the live table equal the scratch one, writing only the rows that differ."""
    live, scratch, key = sql.Identifier(table.live), sql.Identifier("pg_temp", table.scratch), sql.Identifier(table.key)
    conn.execute(
        sql.SQL("DELETE FROM {live} l WHERE NOT EXISTS (SELECT 1 FROM {scratch} r WHERE r.{key} = l.{key})").format(
            live=live, scratch=scratch, key=key
        )
    )
    insert_cols = [*table.columns, *(c for c, _ in table.on_insert)]
    select = [sql.Identifier("r", c) for c in table.columns] + [sql.Identifier("r", e) for _, e in table.on_insert]
    updates = [sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in table.columns if c != table.key]
    conn.execute(
        sql.SQL(
            "INSERT INTO {live} ({cols}) SELECT {select} FROM {scratch} r LEFT JOIN {live} l ON l.{key} = r.{key} "
            "WHERE {l} IS DISTINCT FROM {r} ON CONFLICT ({key}) DO UPDATE SET {updates}"
        ).format(
            live=live,
            cols=sql.SQL(", ").join(map(sql.Identifier, insert_cols)),
            select=sql.SQL(", ").join(select),
            scratch=scratch,
            key=key,
            l=_row_tuple(table, "l"),
            r=_row_tuple(table, "r"),
            updates=sql.SQL(", ").join(updates),
        )
    )


_LOCK_PROJECTIONS = "LOCK TABLE sync_status, dead_letters, duplicate_findings IN EXCLUSIVE MODE"


def _finish(writer: psycopg.Connection[Any], built: _Built, *, apply_changes: bool, limit: int) -> ReplayReport:
    """Steps 2 and 3, in one transaction under the table locks."""
    writer.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    raised: list[FindingRow] = []
    unraised: list[Finding] = []
    with writer.transaction():
        # LOCK takes no snapshot: the transaction's snapshot is taken by the next statement, after the lock.
        writer.execute(_LOCK_PROJECTIONS)
        changed = changed_since(writer, built.snapshot)
        changed |= built.inbox_mentors
        inbox, _ = unprojected(writer)
        if changed:
            _refold(writer, changed, inbox, built.pending)
        tables = tuple(_diff(writer, t, limit) for t in _TABLES)
        findings = [f for fs in built.pending.values() for f in fs]
        if apply_changes:
            for table, diff in zip(_TABLES, tables, strict=True):
                if diff.total:
                    _apply(writer, table)
            raised = raise_findings(writer, findings)
        else:
            unraised = findings
            raise psycopg.Rollback()  # verify: leave the live tables (and the scratch ones) as they were
    return ReplayReport(
        applied=apply_changes,
        events=built.events,
        mentors=built.mentors,
        refolded=len(changed),
        seconds=0.0,
        tables=tables,
        raised=tuple(raised),
        unraised=tuple(unraised),
    )


def replay(
    url: str,
    *,
    verify: bool = False,
    progress: Progress | None = None,
    detail_limit: int = 20,
    app_schema: str = "public",
) -> ReplayReport:
    """Rebuild every projection from the log; unless ``verify``, make the live tables equal to it."""
    progress = progress if progress is not None else Progress()
    started = time.monotonic()
    with connect(url, app_schema) as writer, connect(url, app_schema) as reader, replay_lock(writer):
        built = _rebuild(reader, writer, progress)
        report = _finish(writer, built, apply_changes=not verify, limit=detail_limit)
    return msgspec.structs.replace(report, seconds=time.monotonic() - started)
