"""The sync path's fast lane: the drain hands actors their work, the recorder group-commits outcomes, eligibility
is inlined. Each shortcut must give exactly what the long way gives."""

from __future__ import annotations

import asyncio
import gc
import time
from datetime import date, timedelta
from typing import Any
from uuid import UUID, uuid4

import anyio
import httpx
import psycopg
import pytest

from hlf_actors import db, http_transport, writer
from hlf_actors.actor import Actor, Work, work_from_drain, work_from_row
from hlf_actors.dynamics import DynamicsClient
from hlf_actors.events import AttemptFailed, AttemptSucceeded, NewEvent
from hlf_actors.http_transport import fast_transport
from hlf_actors.recorder import Recorder
from hlf_actors.testing import harness
from hlf_actors.testing.fake_portal import FakePortal
from hlf_actors.testing.seed import add_certification, add_mentor, set_status

pytestmark = pytest.mark.anyio

TODAY = date(2026, 11, 24)


async def _drain(db_url: str) -> writer.Drained:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as aconn:
        async with aconn.pipeline(), aconn.transaction():
            return await writer.drain_inbox(aconn, today=TODAY)


def _mentor_work(conn: psycopg.Connection[Any], mentor_id: UUID) -> Work:
    row = conn.execute(db.query("mentor_work"), (TODAY, [mentor_id])).fetchone()
    assert row is not None
    return work_from_row(row, 0.0)[1]


def _comparable(work: Work) -> tuple[Any, ...]:
    """Everything but when and in which snapshot it was read."""
    return (
        work.last_seq,
        work.state,
        work.attempts,
        work.change_seq,
        round(work.wait_s, 1),
        work.mentor_exists,
        work.portal_record_id,
        work.eligible,
    )


async def test_the_work_a_drain_hands_out_is_what_the_actor_would_read(
    db_url: str, conn: psycopg.Connection[Any], org: UUID
) -> None:
    certified, _ = add_mentor(conn, org, today=TODAY)
    paused, _ = add_mentor(conn, org, today=TODAY)
    lapsed, _ = add_mentor(conn, org, cert_valid_days=-1, today=TODAY)
    unlinked, _ = add_mentor(conn, org, record=False, today=TODAY)
    gone, gone_record = add_mentor(conn, org, today=TODAY)
    await _drain(db_url)  # the inserts
    set_status(conn, paused, "paused")
    add_certification(conn, lapsed, TODAY)  # valid through today: eligible again
    conn.execute("DELETE FROM mentors WHERE id = %s", (gone,))
    conn.execute("SELECT hlf_force_sync(%s)", (certified,))

    drained = await _drain(db_url)

    mentors = {certified, paused, lapsed, gone}
    assert set(drained.facts) >= mentors
    assert unlinked not in drained.projected  # nothing happened to it this time
    for mentor_id in mentors:
        handed = work_from_drain(drained.projected[mentor_id], drained.facts[mentor_id], 0.0)
        assert handed is not None
        assert _comparable(handed) == _comparable(_mentor_work(conn, mentor_id)), mentor_id
    by_id = {m: work_from_drain(drained.projected[m], drained.facts[m], 0.0) for m in mentors}
    assert by_id[certified] is not None and by_id[certified].eligible is True
    assert by_id[paused] is not None and by_id[paused].eligible is False
    assert by_id[lapsed] is not None and by_id[lapsed].eligible is True
    gone_work = by_id[gone]
    assert gone_work is not None and gone_work.mentor_exists is False
    assert gone_work.portal_record_id == gone_record  # remembered by the projection, so the listing can go


async def test_eligibility_is_one_rule_and_the_planner_inlines_it(conn: psycopg.Connection[Any], org: UUID) -> None:
    cases: list[tuple[UUID, bool]] = []
    for status in ("active", "paused", "expired_cert"):
        for certs in ([], [-1], [0], [30], [-400, -1], [-5, 200]):
            mentor, _ = add_mentor(conn, org, status=status, cert_valid_days=None, today=TODAY)
            for days in certs:
                add_certification(conn, mentor, TODAY + timedelta(days=days))
            cases.append((mentor, status == "active" and any(d >= 0 for d in certs)))
    for mentor, expected in cases:
        row = conn.execute(
            "SELECT hlf_is_eligible(%s, %s), (SELECT hlf_eligible(m.status, "
            "(SELECT max(expires_on) FROM certifications WHERE mentor_id = m.id), %s) FROM mentors m WHERE id = %s)",
            (mentor, TODAY, TODAY, mentor),
        ).fetchone()
        assert row == (expected, expected), mentor
    assert conn.execute("SELECT hlf_is_eligible(%s, %s)", (uuid4(), TODAY)).fetchone() == (False,)
    # Inlined: the plan computes the expression itself instead of calling the function once a row.
    plan = "\n".join(
        r[0] for r in conn.execute("EXPLAIN VERBOSE " + db.query("mentor_work"), (TODAY, [cases[0][0]])).fetchall()
    )
    assert "hlf_eligible(" not in plan and "hlf_is_eligible(" not in plan
    assert "'active'::text" in plan


async def test_the_recorder_shares_transactions_and_a_refused_outcome_fails_alone(
    db_url: str, conn: psycopg.Connection[Any], org: UUID
) -> None:
    mentors = [add_mentor(conn, org, today=TODAY)[0] for _ in range(10)]
    await _drain(db_url)
    results: dict[UUID, Any] = {}

    def succeeded() -> AttemptSucceeded:
        return AttemptSucceeded(operation="restore", attempt=1, http_status=204, for_seq=2**40, duration_ms=1.0)

    async with db.pool(db_url, name="test", max_size=3) as pool:
        recorder = Recorder(pool)
        async with anyio.create_task_group() as tg:
            tg.start_soon(recorder.run)

            async def record(mentor_id: UUID, poisoned: bool = False) -> None:
                payload: Any = succeeded()
                if poisoned:  # PostgreSQL's jsonb refuses \u0000: a portal message with a NUL byte in it
                    payload = AttemptFailed(
                        operation="restore",
                        attempt=1,
                        http_status=500,
                        retryable=True,
                        delay_ms=10,
                        error="bad\x00byte",
                        for_seq=0,
                    )
                try:
                    results[mentor_id] = await recorder.record([NewEvent(mentor_id, payload)])
                except psycopg.Error as err:
                    results[mentor_id] = err

            async with anyio.create_task_group() as writers:
                for i, mentor_id in enumerate(mentors):
                    writers.start_soon(record, mentor_id, i == 4)
            tg.cancel_scope.cancel()

    assert isinstance(results[mentors[4]], psycopg.Error)
    for i, mentor_id in enumerate(mentors):
        if i == 4:
            continue
        appended, projected = results[mentor_id]
        assert [e.mentor_id for e in appended] == [mentor_id]
        assert projected[mentor_id].sync.state == "in_sync"
    # Ten outcomes queued at once: the first batch failed on the poisoned one, then each went alone. Recording
    # them again together shows the sharing itself.
    async with db.pool(db_url, name="test", max_size=3) as pool:
        recorder = Recorder(pool)
        async with anyio.create_task_group() as tg:
            tg.start_soon(recorder.run)
            shared: list[Any] = []

            async def again(mentor_id: UUID) -> None:
                shared.append(await recorder.record([NewEvent(mentor_id, succeeded())]))

            async with anyio.create_task_group() as writers:
                for mentor_id in mentors:
                    writers.start_soon(again, mentor_id)
            tg.cancel_scope.cancel()
    assert len(shared) == 10
    assert len({appended[0].xid for appended, _ in shared}) < 10
    rows = conn.execute(
        "SELECT count(*) FROM event_log WHERE kind = 'attempt_succeeded' AND mentor_id = ANY(%s)", (mentors,)
    ).fetchone()
    assert rows == (19,)
    assert conn.execute(
        "SELECT count(*) FROM event_log WHERE kind = 'attempt_failed' AND mentor_id = %s", (mentors[4],)
    ).fetchone() == (0,)


async def test_an_actor_trusts_a_handed_read_only_if_it_includes_its_own_last_outcome(
    db_url: str, conn: psycopg.Connection[Any], org: UUID
) -> None:
    mentor, _ = add_mentor(conn, org, today=TODAY)
    await _drain(db_url)
    fresh = _mentor_work(conn, mentor)
    stale = Work(
        **{**fresh.__dict__, "last_seq": fresh.last_seq - 1, "state": "pending", "read_at": time.perf_counter()}
    )

    class _Runtime:  # what Actor._next and Actor._read use of the runtime
        def __init__(self, pool: Any) -> None:
            self.pool = pool
            self.clock = type("C", (), {"today": staticmethod(lambda zone: TODAY)})()
            self.config = type("Cfg", (), {"zone": None})()

    async with db.pool(db_url, name="test", max_size=2) as pool:
        actor = Actor(mentor, _Runtime(pool), recorded_seq=fresh.last_seq)  # type: ignore[arg-type]
        actor.mailbox.put(stale)
        assert actor.mailbox.take()
        read = await actor._next()
        assert read is not None and read.last_seq == fresh.last_seq and read.state == fresh.state  # read again
        handed = Work(**{**fresh.__dict__, "state": "pending"})
        actor.mailbox.put(handed)
        assert await actor._next() is handed  # current: used as is, no read
        actor.mailbox.put(handed)
        actor.mailbox.put()  # a newer wake-up without work means "read it yourself"
        assert await actor._next() is not handed


async def test_portal_answers_are_freed_at_once_not_left_to_the_cycle_collector(
    db_url: str, portal: FakePortal
) -> None:
    # httpx ties each response to its stream in a reference cycle; left alone, ~43 objects a request wait for the
    # cyclic collector, whose full passes were the service's latency tail.
    client = DynamicsClient(harness.test_config(db_url, portal))
    record = uuid4()
    portal.add_record(record)
    try:
        assert await client.set_listed(record, True) == 204  # the token is fetched here
        gc.collect()
        gc.disable()
        try:
            for i in range(20):
                await client.set_listed(record, i % 2 == 0)
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            left = [type(o).__name__ for o in gc.garbage if isinstance(o, httpx.Response | httpx.Request)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    finally:
        await client.aclose()
    assert len(portal.patches(record)) == 21
    assert left == []


async def test_the_portal_transport_remembers_sockets_and_still_notices_a_closed_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
    transport = fast_transport(limits)
    assert transport is not None and isinstance(transport._pool._network_backend, http_transport._Backend)

    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
        )
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # keep-alive promised, then the server hangs up while the connection is idle

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(3):
                response = await client.patch(f"http://127.0.0.1:{port}/x", content=b"{}")
                assert response.status_code == 204
                await anyio.sleep(0.2)  # long enough for the hang-up to arrive
    finally:
        server.close()
        await server.wait_closed()
    assert connections == 3  # each closed connection was noticed and replaced, none reused dead

    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    assert fast_transport(limits) is None  # httpx honours proxies only for its default transport: keep it
