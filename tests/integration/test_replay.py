"""Replay rebuilds every projection from the log alone, live; duplicates are found once; archival keeps it exact."""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import anyio.from_thread
import msgspec
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hlf_actors import archival, events, replay, writer
from hlf_actors.cli import main
from hlf_actors.duplicate_rules import DuplicateState, Finding
from hlf_actors.duplicates import DuplicateScan, raise_findings
from hlf_actors.event_codec import decode_event
from hlf_actors.events import AttemptSucceeded, NewEvent
from hlf_actors.progress import Progress
from hlf_actors.render import render_replay
from hlf_actors.service import Service
from hlf_actors.testing.fake_portal import FakePortal, Reply
from hlf_actors.testing.harness import eventually, running_service, sync_state, until
from hlf_actors.testing.recording import RecordingAlertSender
from hlf_actors.testing.seed import add_mentor, set_status

pytestmark = pytest.mark.anyio

EXPIRY = date(2031, 5, 1)
FAST = {"HLF_SWEEP_INTERVAL": "100ms", "HLF_MAX_ATTEMPTS": "3"}


def quiet() -> Progress:
    return Progress(io.StringIO())


def verify(db_url: str) -> replay.ReplayReport:
    return replay.replay(db_url, verify=True, progress=quiet())


def settled(conn: psycopg.Connection[Any], mentors: list[UUID]) -> bool:
    """Nothing left to do for these mentors: the inbox is empty and every one is in sync or dead-lettered."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM hlf_inbox), "
        "count(*) FILTER (WHERE state IN ('in_sync', 'dead_lettered')) FROM sync_status WHERE mentor_id = ANY(%s)",
        (mentors,),
    ).fetchone()
    return row is not None and row[0] == 0 and row[1] == len(mentors)


def waiting_for_lock(conn: psycopg.Connection[Any], statement: str) -> bool:
    """Whether another session is blocked on a lock while running ``statement``."""
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' "
        "AND query LIKE %s",
        (statement + "%",),
    ).fetchone()
    return row is not None and row[0] > 0


def add_reminder(conn: psycopg.Connection[Any], mentor_id: UUID, threshold: int) -> None:
    """A reminder_sent event written the way the nightly check writes it."""
    data = {
        "threshold_day": threshold,
        "days_left": threshold,
        "certification_expiry_date": EXPIRY.isoformat(),
        "night": (EXPIRY - timedelta(days=threshold)).isoformat(),
        "targets": 1,
        "delivered": 1,
    }
    conn.execute(
        "INSERT INTO event_log (mentor_id, kind, data) VALUES (%s, 'reminder_sent', %s)", (mentor_id, json.dumps(data))
    )


def findings(report: replay.ReplayReport, mentors: list[UUID], rule: str) -> int:
    return sum(1 for f in report.unraised if f.mentor_id in mentors and f.rule == rule)


# -- the property: any history, driven through the real service, replays to the live projections -------------------

Step = tuple[Any, ...]
_mentor = st.integers(0, 2)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("status"), _mentor, st.sampled_from(["active", "paused", "expired_cert"])),
        st.tuples(st.just("cert"), _mentor, st.booleans()),
        st.tuples(st.just("portal"), _mentor, st.sampled_from(["success", "transient", "exhausted", "permanent"])),
        st.tuples(st.just("portal"), _mentor, st.sampled_from(["transient", "permanent"])),
        st.tuples(st.just("force"), _mentor),
        st.tuples(st.just("requeue"), st.just(0)),
        st.tuples(st.just("reminder"), _mentor, st.sampled_from([30, 14, 7])),
        st.tuples(st.just("settle")),
    ),
    min_size=3,
    max_size=12,
)


@pytest.fixture
def live_service(db_url: str, portal: FakePortal) -> Iterator[Service]:
    """The real service on its own event loop thread, so a synchronous (hypothesis) test can drive it."""
    with anyio.from_thread.start_blocking_portal() as loop:
        with loop.wrap_async_context_manager(running_service(db_url, portal, env=FAST)) as service:
            yield service


def test_replay_of_any_history_through_the_real_service_equals_the_live_projections(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, live_service: Service, org: UUID
) -> None:

    @settings(
        max_examples=15,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(history=steps)
    def check(history: list[Step]) -> None:
        # Fresh mentors (and portal records) for every example: earlier examples' scripts cannot leak in.
        mentors = [add_mentor(conn, org, portal=portal) for _ in range(3)]
        ids = [m for m, _ in mentors]
        until(lambda: settled(conn, ids), what="the new mentors to be synced", timeout=15.0)
        reminders: Counter[tuple[int, int]] = Counter()
        for step in history:
            kind, who = step[0], step[1] if len(step) > 1 else 0
            mentor, record = mentors[who]
            if kind == "status":
                set_status(conn, mentor, step[2])
            elif kind == "cert":
                days = 365 + len(history) if step[2] else -1
                conn.execute(
                    "UPDATE certifications SET expires_on = current_date + %s WHERE mentor_id = %s", (days, mentor)
                )
            elif kind == "portal":
                # The next PATCHes of this mentor get these answers; a force sync makes sure there is one.
                replies = {"success": [204], "transient": [503], "exhausted": [503] * 3, "permanent": [403]}[step[2]]
                assert record is not None
                portal.script(record, *(Reply(status=s) for s in replies))
                conn.execute("SELECT hlf_force_sync(%s)", (mentor,))
            elif kind == "force":
                conn.execute("SELECT hlf_force_sync(%s)", (mentor,))
            elif kind == "requeue":
                until(lambda: settled(conn, ids), what="the dead letters to be written", timeout=15.0)
                for (letter,) in conn.execute(  # every open one of the example: this step is rare enough
                    "SELECT id FROM dead_letters WHERE mentor_id = ANY(%s) AND requeued_at IS NULL "
                    "AND resolved_at IS NULL",
                    (ids,),
                ).fetchall():
                    try:
                        conn.execute("SELECT hlf_requeue_dead_letter(%s)", (letter,))
                    except psycopg.errors.UniqueViolation:
                        pass  # already re-queued, waiting in the inbox
            elif kind == "reminder":
                add_reminder(conn, mentor, step[2])
                reminders[(who, step[2])] += 1
            else:
                until(lambda: settled(conn, ids), what="the history to settle", timeout=15.0)
        until(lambda: settled(conn, ids), what="the history to settle", timeout=15.0)

        checked = verify(db_url)
        assert checked.differences == 0, render_replay(checked)
        # A letter closed itself only at a success after it; a mentor in sync has no open letter left.
        assert conn.execute(
            """SELECT count(*) FROM dead_letters d
               LEFT JOIN event_log e ON e.seq = d.resolved_seq
               WHERE d.mentor_id = ANY(%s) AND d.resolved_seq IS NOT NULL
                 AND (e.kind IS DISTINCT FROM 'attempt_succeeded' OR e.mentor_id <> d.mentor_id OR e.seq < d.id)""",
            (ids,),
        ).fetchone() == (0,)
        assert conn.execute(
            """SELECT count(*) FROM dead_letters d JOIN sync_status s USING (mentor_id)
               WHERE d.mentor_id = ANY(%s) AND s.state = 'in_sync' AND d.requeued_at IS NULL
                 AND d.resolved_at IS NULL AND EXISTS (
                     SELECT 1 FROM event_log e WHERE e.mentor_id = d.mentor_id AND e.seq > d.id
                       AND e.kind = 'attempt_succeeded')""",
            (ids,),
        ).fetchone() == (0,)
        expected = sum(n - 1 for n in reminders.values())
        assert findings(checked, ids, "reminder_sent_twice") == expected
        assert findings(checked, ids, "patch_succeeded_twice") == 0  # the service never PATCHes twice for nothing

        rebuilt = replay.replay(db_url, progress=quiet())
        assert rebuilt.differences == 0
        assert sum(1 for f in rebuilt.raised if f.mentor_id in ids) == expected
        assert verify(db_url).unraised == ()

    check()


# -- live safety ------------------------------------------------------------------------------------------------


class _SlowFirstBatch(Progress):
    """Holds the rebuild after its first mentor, so the live traffic certainly writes between snapshot and swap."""

    def __init__(self) -> None:
        super().__init__(io.StringIO())
        self.held = False

    def advance(self, n: int) -> None:
        super().advance(n)
        if not self.held:
            self.held = True
            time.sleep(0.3)


async def test_replay_during_live_traffic_misses_nothing_and_counts_nothing_twice(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    mentors = [add_mentor(conn, org, portal=portal) for _ in range(12)]
    ids = [m for m, _ in mentors]
    final: dict[UUID, str] = {}
    changes = 0

    async with running_service(db_url, portal, env=FAST):
        await eventually(lambda: settled(conn, ids), what="the first sync")
        stop = anyio.Event()

        async def traffic() -> None:
            nonlocal changes
            with psycopg.connect(db_url, autocommit=True) as writer:
                i = 0
                while not stop.is_set():
                    mentor = ids[i % len(ids)]
                    status = "paused" if final.get(mentor, "active") == "active" else "active"
                    set_status(writer, mentor, status)
                    final[mentor] = status
                    changes += 1
                    i += 1
                    await anyio.sleep(0.005)

        reports: list[replay.ReplayReport] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(traffic)
            for _ in range(3):
                reports.append(
                    await anyio.to_thread.run_sync(lambda: replay.replay(db_url, progress=_SlowFirstBatch()))
                )
            stop.set()
        await eventually(lambda: settled(conn, ids), what="the traffic to settle")
        after = await anyio.to_thread.run_sync(lambda: verify(db_url))

    # Every replay, swapped in while changes and PATCHes kept coming, found the live tables right...
    assert [r.differences for r in reports] == [0, 0, 0], [render_replay(r) for r in reports]
    # ...because the mentors changed during each rebuild were folded again under the lock.
    assert all(r.refolded > 0 for r in reports)
    assert after.differences == 0
    assert changes > 20
    # Nothing missed: every change is in the log once, and the portal shows each mentor's last status.
    row = conn.execute(
        "SELECT count(*) FROM event_log WHERE kind = 'status_changed' AND data ->> 'cause' = 'mentor_updated' "
        "AND mentor_id = ANY(%s)",
        (ids,),
    ).fetchone()
    assert row is not None and row[0] == changes
    assert all(r is not None and portal.listed(r) is (final.get(m, "active") == "active") for m, r in mentors)


async def test_the_swap_waits_for_an_append_in_flight_and_folds_it(
    db_url: str, conn: psycopg.Connection[Any], org: UUID
) -> None:
    mentor, _ = add_mentor(conn, org)
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as aconn:
        async with aconn.transaction():
            await writer.drain_inbox(aconn)
        result: dict[str, replay.ReplayReport] = {}
        worker = threading.Thread(target=lambda: result.update(report=replay.replay(db_url, progress=quiet())))
        async with aconn.transaction():
            cur = await aconn.execute("SELECT pg_current_snapshot()::text")
            row = await cur.fetchone()
            assert row is not None
            success = AttemptSucceeded(operation="restore", attempt=1, http_status=204, for_seq=0, snapshot=row[0])
            appended, _ = await writer.append(aconn, [NewEvent(mentor, success)])
            worker.start()
            await eventually(lambda: waiting_for_lock(conn, "LOCK TABLE sync_status"), what="the swap to wait")
        await anyio.to_thread.run_sync(worker.join, 10)
    report = result["report"]
    assert report.differences == 0 and report.refolded >= 1
    live = conn.execute("SELECT state, last_seq FROM sync_status WHERE mentor_id = %s", (mentor,)).fetchone()
    assert live == ("in_sync", appended[0].seq)


# -- repairing a bad deploy's damage ----------------------------------------------------------------------------


async def test_verify_reports_a_corrupted_projection_and_replay_fixes_it(
    db_url: str,
    conn: psycopg.Connection[Any],
    portal: FakePortal,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    org: UUID,
) -> None:
    good, _ = add_mentor(conn, org, portal=portal)
    refused, record = add_mentor(conn, org, portal=portal, status="paused")
    assert record is not None
    async with running_service(db_url, portal, env=FAST):
        await eventually(lambda: settled(conn, [good, refused]))
        portal.always(Reply(status=403), record_id=record)
        set_status(conn, refused, "active")
        await eventually(lambda: sync_state(conn, refused) == "dead_lettered")
    monkeypatch.setenv("HLF_DATABASE_URL", db_url)
    assert main(["replay", "--verify"]) == 0
    capsys.readouterr()

    # A bad deploy: a dead-lettered mentor shown in sync, its dead letter gone, a row for nobody.
    conn.execute("UPDATE sync_status SET state = 'in_sync', attempts = 99 WHERE mentor_id = %s", (refused,))
    conn.execute("DELETE FROM dead_letters WHERE mentor_id = %s", (refused,))
    conn.execute(
        "INSERT INTO sync_status (mentor_id, state, updated_at, change_seq, last_seq) "
        "VALUES ('00000000-0000-0000-0000-00000000dead', 'pending', now(), 1, 1)"
    )
    before = conn.execute("SELECT xmin::text, * FROM sync_status WHERE mentor_id = %s", (good,)).fetchone()

    assert main(["replay", "--verify"]) == 1
    out = capsys.readouterr().out
    assert "sync_status: 2 row(s) differ — 0 missing, 1 extra, 1 different" in out
    assert (
        f"different {refused}: state: live 'in_sync' ≠ replayed 'dead_lettered', attempts: live 99 ≠ replayed 1" in out
    )
    assert "dead_letters: 1 row(s) differ — 1 missing, 0 extra, 0 different" in out
    assert sync_state(conn, refused) == "in_sync"  # verify touched nothing

    assert main(["replay"]) == 0
    assert "sync_status: 2 row(s) corrected" in capsys.readouterr().out
    assert sync_state(conn, refused) == "dead_lettered"
    assert conn.execute("SELECT count(*) FROM dead_letters WHERE mentor_id = %s", (refused,)).fetchone() == (1,)
    assert sync_state(conn, UUID("00000000-0000-0000-0000-00000000dead")) is None
    # Only the rows that differed were written: the good one is the very same row version.
    assert conn.execute("SELECT xmin::text, * FROM sync_status WHERE mentor_id = %s", (good,)).fetchone() == before

    # One at a time: a second replay (or archival) says so instead of racing the first.
    with psycopg.connect(db_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (replay.REPLAY_LOCK,))
        assert main(["replay"]) == 1
    assert "another replay or archival is running" in capsys.readouterr().err

    # The operators' wrapper is the same command.
    wrapper = Path(__file__).parents[2] / "scripts" / "replay.py"
    done = await anyio.run_process(
        [sys.executable, str(wrapper), "--verify"], env={**os.environ, "HLF_DATABASE_URL": db_url}, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    assert "sync_status: same as the log" in done.stdout.decode()


def test_progress_is_one_line_rewritten_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    progress = Progress(screen, every_s=0.0)
    progress.start(1000)
    progress.advance(250)
    progress.advance(250)
    progress.finish()
    lines = screen.getvalue().split("\r")
    assert "replay: 250/~1,000 events" in lines[1] and "events/s" in lines[1] and "ETA" in lines[1]
    assert "replay: 500/~1,000 events" in lines[2]
    assert lines[-1] == "\x1b[K"  # cleared for the summary


# -- versions ---------------------------------------------------------------------------------------------------


async def test_old_and_unknown_event_versions_replay_like_the_live_path(
    db_url: str, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch, org: UUID
) -> None:
    mentor, _ = add_mentor(conn, org)
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as aconn:

        async def drain() -> None:
            async with aconn.transaction():
                await writer.drain_inbox(aconn)

        await drain()
        change = conn.execute("SELECT max(seq) FROM event_log WHERE mentor_id = %s", (mentor,)).fetchone()
        assert change is not None
        # An outcome from before outcomes carried a snapshot: only for_seq says which change it answered.
        old = {"operation": "restore", "attempt": 1, "http_status": 204, "for_seq": change[0]}
        conn.execute("SELECT hlf_append_event(%s, 'attempt_succeeded', %s)", (mentor, json.dumps(old)))
        # A change written by a newer release (version 9): this one does not know it, and ignores it everywhere.
        conn.execute(
            "SELECT hlf_append_event(%s, 'status_changed', %s, 9::smallint)",
            (mentor, json.dumps({"cause": "something_new", "shape": [1, 2]})),
        )
        await drain()
    assert sync_state(conn, mentor) == "in_sync"
    assert verify(db_url).differences == 0

    # A release that bumps sync_requested to version 2 still replays the version-1 rows, through the upgrade.
    conn.execute("SELECT hlf_force_sync(%s)", (mentor,))
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as aconn, aconn.transaction():
        await writer.drain_inbox(aconn)
    monkeypatch.setitem(events.CURRENT_VERSION, "sync_requested", 2)
    monkeypatch.setitem(events.UPGRADES, ("sync_requested", 1), lambda d: {**d, "reason": f"v1:{d['reason']}"})
    row = conn.execute(
        "SELECT seq, mentor_id, kind, version, data::text, recorded_at, xid::text::bigint FROM event_log "
        "WHERE kind = 'sync_requested' AND mentor_id = %s",
        (mentor,),
    ).fetchone()
    assert row is not None and row[3] == 1
    upgraded = decode_event(*row).payload
    assert isinstance(upgraded, events.SyncRequested) and upgraded.reason == "v1:force_sync"
    assert verify(db_url).differences == 0
    assert sync_state(conn, mentor) == "pending"


# -- duplicates -------------------------------------------------------------------------------------------------


async def test_duplicates_are_raised_and_alerted_once_across_replays_and_the_periodic_check(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, org: UUID
) -> None:
    mentor, _ = add_mentor(conn, org, portal=portal)
    other, _ = add_mentor(conn, org, portal=portal)
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as aconn:
        async with aconn.transaction():
            await writer.drain_inbox(aconn)
        for _ in range(2):  # two senders answering the same change
            async with aconn.transaction():
                cur = await aconn.execute("SELECT pg_current_snapshot()::text")
                snap = await cur.fetchone()
                assert snap is not None
                success = AttemptSucceeded(operation="restore", attempt=1, http_status=204, for_seq=0, snapshot=snap[0])
                await writer.append(aconn, [NewEvent(mentor, success)])
        transition = {"from": "active", "to": "expired_cert", "today": "2031-05-02"}
        transition["certification_expiry_date"] = EXPIRY.isoformat()
        for _ in range(2):
            conn.execute("SELECT hlf_append_event(%s, 'auto_transitioned', %s)", (mentor, json.dumps(transition)))
        async with aconn.transaction():
            await writer.drain_inbox(aconn)
    add_reminder(conn, mentor, 30)
    add_reminder(conn, mentor, 30)
    add_reminder(conn, mentor, 14)
    add_reminder(conn, other, 30)  # another mentor's reminder is no duplicate

    first = replay.replay(db_url, progress=quiet())
    assert sorted(f.rule for f in first.raised) == [
        "auto_transitioned_twice",
        "patch_succeeded_twice",
        "reminder_sent_twice",
    ]
    assert all(f.mentor_id == mentor for f in first.raised)
    assert replay.replay(db_url, progress=quiet()).raised == ()
    checked = verify(db_url)
    assert checked.differences == 0 and checked.unraised == ()

    add_reminder(conn, mentor, 30)  # a third one: one more finding, (first, third)
    sender = RecordingAlertSender()
    async with running_service(db_url, portal, sender=sender, env=FAST):

        def ops_alerts() -> list[dict[str, str]]:
            return [dict(s.data) for s in sender.sent() if s.data.get("type") == "hlf_duplicate_detected"]

        await eventually(lambda: len(ops_alerts()) == 4, what="one ops alert per finding")
        await anyio.sleep(0.4)  # several more ticks of the check: nothing is raised or pushed again
        again = await anyio.to_thread.run_sync(lambda: replay.replay(db_url, progress=quiet()))
        await anyio.sleep(0.3)
        alerts = ops_alerts()
    assert again.raised == ()
    assert len(alerts) == 4
    assert all(s.topic == "hlf-ops" for s in sender.sent() if s.data.get("type") == "hlf_duplicate_detected")
    assert {a["mentor_id"] for a in alerts} == {str(mentor)}
    assert Counter(a["rule"] for a in alerts) == {
        "reminder_sent_twice": 2,
        "auto_transitioned_twice": 1,
        "patch_succeeded_twice": 1,
    }
    keys = {row[0] for row in conn.execute("SELECT key FROM duplicate_findings").fetchall()}
    assert {a["finding"] for a in alerts} == keys
    counted = conn.execute(
        "SELECT count(*) FILTER (WHERE kind = 'duplicate_detected'), "
        "count(*) FILTER (WHERE kind = 'alert_sent' AND data ->> 'alert' = 'hlf_duplicate_detected') FROM event_log"
    ).fetchone()
    assert counted == (4, 4)
    assert conn.execute("SELECT count(*) FROM duplicate_findings WHERE alerted_at IS NULL").fetchone() == (0,)


def test_the_periodic_check_looks_again_only_at_mentors_that_changed(
    db_url: str, conn: psycopg.Connection[Any], org: UUID
) -> None:
    mentor, _ = add_mentor(conn, org)
    add_reminder(conn, mentor, 7)
    scan = DuplicateScan(db_url)
    assert scan.run() == []
    add_reminder(conn, mentor, 7)
    raised = scan.run()
    assert [f.rule for f in raised] == ["reminder_sent_twice"]
    assert scan.run() == []
    # A finding whose row was lost is not raised twice: the duplicate_detected event remembers it.
    conn.execute("DELETE FROM duplicate_findings")
    assert DuplicateScan(db_url).run() == []
    assert verify(db_url).tables[2].missing == 1


def test_two_raisers_racing_for_one_finding_raise_it_once(
    db_url: str, conn: psycopg.Connection[Any], org: UUID
) -> None:
    mentor, _ = add_mentor(conn, org)
    finding = Finding(
        key=f"reminder_sent_twice:{mentor}:30/{EXPIRY}:1:2",
        rule="reminder_sent_twice",
        mentor_id=mentor,
        seqs=(1, 2),
        detail="test",
    )
    second: list[list[Any]] = []
    with psycopg.connect(db_url) as first:
        assert len(raise_findings(first, [finding, finding])) == 1  # holds the table lock until commit
        racer = threading.Thread(
            target=lambda: second.append(_raise_in_own_transaction(db_url, finding)), name="second raiser"
        )
        racer.start()
        until(
            lambda: waiting_for_lock(conn, "LOCK TABLE duplicate_findings"),
            what="the second raiser to wait",
            timeout=15.0,
        )
        first.commit()
    racer.join(10)
    assert second == [[]]
    assert conn.execute("SELECT count(*) FROM event_log WHERE kind = 'duplicate_detected'").fetchone() == (1,)


def _raise_in_own_transaction(db_url: str, finding: Finding) -> list[Any]:
    with psycopg.connect(db_url) as c:
        return list(raise_findings(c, [finding]))


# -- archival ---------------------------------------------------------------------------------------------------


async def test_archival_keeps_replay_exact_and_the_log_append_only(
    db_url: str,
    conn: psycopg.Connection[Any],
    portal: FakePortal,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    org: UUID,
) -> None:
    mentors = [add_mentor(conn, org, portal=portal) for _ in range(4)]
    ids = [m for m, _ in mentors]
    refused = mentors[3][1]
    assert refused is not None
    async with running_service(db_url, portal, env=FAST):
        await eventually(lambda: settled(conn, ids))
        portal.script(refused, Reply(status=403))
        for m in ids:
            set_status(conn, m, "paused")
        add_reminder(conn, ids[0], 30)
        await eventually(lambda: settled(conn, ids))
        cut_at = conn.execute("SELECT clock_timestamp()").fetchone()
        assert cut_at is not None
        await anyio.sleep(0.3)
        for m in ids[:2]:
            set_status(conn, m, "active")
        add_reminder(conn, ids[0], 30)  # duplicates the reminder before the cut
        await eventually(lambda: settled(conn, ids))

        row = conn.execute("SELECT clock_timestamp() - %s", (cut_at[0],)).fetchone()
        assert row is not None
        archived = await anyio.to_thread.run_sync(lambda: archival.archive(db_url, older_than=row[0], progress=quiet()))
        assert archived.cut_seq is not None and archived.archived > 0 and archived.snapshots == 4
        kept = conn.execute("SELECT min(seq), (SELECT count(*) FROM event_log_archive) FROM event_log").fetchone()
        assert kept is not None and kept[0] > archived.cut_seq and kept[1] == archived.archived

        after = await anyio.to_thread.run_sync(lambda: verify(db_url))
        assert after.differences == 0, render_replay(after)
        assert [f.rule for f in after.unraised] == ["reminder_sent_twice"]  # found across the cut

        # Stopped after storing the snapshots and before deleting the rows: the rows are still there, and every
        # reader still folds each event once. A second run deletes them.
        conn.execute(
            "INSERT INTO event_log (seq, mentor_id, kind, version, data, recorded_at, xid) OVERRIDING SYSTEM VALUE "
            "SELECT seq, mentor_id, kind, version, data, recorded_at, xid FROM event_log_archive"
        )
        assert (await anyio.to_thread.run_sync(lambda: verify(db_url))).differences == 0
        row = conn.execute("SELECT clock_timestamp() - %s", (cut_at[0],)).fetchone()
        assert row is not None
        again = await anyio.to_thread.run_sync(lambda: archival.archive(db_url, older_than=row[0], progress=quiet()))
        assert again.cut_seq == archived.cut_seq
        left = conn.execute("SELECT count(*) FROM event_log WHERE seq <= %s", (archived.cut_seq,)).fetchone()
        assert left == (0,)

        # A late commit after the cut makes the live path fold an archived mentor again - from their snapshot, or
        # the dead letter from before the cut would vanish from the live table.
        mentor, record = mentors[3]
        assert record is not None
        sent = len(portal.patches(record))
        with psycopg.connect(db_url) as slow:
            slow.execute("UPDATE certifications SET expires_on = current_date - 1 WHERE mentor_id = %s", (mentor,))
            conn.execute("SELECT hlf_force_sync(%s)", (mentor,))
            await eventually(lambda: len(portal.patches(record)) == sent + 1, what="the forced PATCH")
            await eventually(lambda: sync_state(conn, mentor) == "in_sync")
            slow.commit()
        await eventually(lambda: len(portal.patches(record)) == sent + 2, what="the PATCH after the late commit")
        await eventually(lambda: settled(conn, ids))
        assert conn.execute("SELECT count(*) FROM dead_letters WHERE mentor_id = %s", (mentor,)).fetchone() == (1,)
        assert (await anyio.to_thread.run_sync(lambda: verify(db_url))).differences == 0

    snapshot = conn.execute("SELECT duplicates FROM projection_snapshots WHERE mentor_id = %s", (ids[0],)).fetchone()
    assert snapshot is not None and msgspec.convert(snapshot[0], DuplicateState).reminders  # detection state kept
    newest = conn.execute("SELECT max(seq) FROM event_log").fetchone()
    assert newest is not None
    for statement, params in (
        ("DELETE FROM event_log WHERE seq = %s", (newest[0],)),
        ("UPDATE event_log_archive SET kind = 'x' WHERE seq = %s", (archived.cut_seq,)),
        ("DELETE FROM event_log_archive", None),
        ("TRUNCATE event_log", None),
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute(statement, params)
    with conn.transaction(), pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
        # The archival switch alone is not enough: the row must be in the archive and under a snapshot.
        conn.execute("SET LOCAL hlf.archiving = 'on'")
        conn.execute("DELETE FROM event_log WHERE seq = %s", (newest[0],))

    monkeypatch.setenv("HLF_DATABASE_URL", db_url)
    assert main(["replay", "--archive-before", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("archive: no event old enough\nreplayed ") and "sync_status: same as the log" in out


def test_replay_help_says_what_archiving_keeps(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["replay", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--archive-before DAYS" in text and "event_log_archive" in text
    assert "projected state at the cut" in text and "projection_snapshots" in text
