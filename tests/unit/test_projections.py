"""``apply``/``fold``: the one rule that turns a mentor's events into ``sync_status`` and ``dead_letters``.

Events are built by hand; nothing here touches a database.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID

from hypothesis import given, settings
from hypothesis import strategies as st

from hlf_actors.events import (
    AlertSent,
    AttemptFailed,
    AttemptSucceeded,
    CircuitOpened,
    DeadLettered,
    Event,
    NewEvent,
    Operation,
    Payload,
    Requeued,
    StatusChanged,
    SyncRequested,
    SyncSkipped,
)
from hlf_actors.projections import DeadLetterRow, MentorProjection, apply, fold

MENTOR = UUID("0b5e7c1a-0000-4000-8000-000000000001")
RECORD = UUID("0b5e7c1a-0000-4000-8000-0000000000a1")
OTHER_RECORD = UUID("0b5e7c1a-0000-4000-8000-0000000000a2")
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def ev(seq: int, payload: Payload, *, xid: int | None = None, mentor: UUID | None = MENTOR) -> Event:
    """An event as the log would hand it over: recorded one second per seq after T0."""
    return Event(
        seq=seq,
        mentor_id=mentor,
        kind=NewEvent(mentor, payload).kind,
        version=1,
        recorded_at=T0 + timedelta(seconds=seq),
        payload=payload,
        xid=seq * 10 if xid is None else xid,
    )


def changed(cause: str = "mentor_updated", record: UUID | None = RECORD) -> StatusChanged:
    return StatusChanged(cause=cause, status="active", portal_record_id=record)


def succeeded(for_seq: int, operation: Operation = "restore", attempt: int = 1) -> AttemptSucceeded:
    return AttemptSucceeded(operation=operation, attempt=attempt, http_status=204, for_seq=for_seq)


def failed(
    for_seq: int, attempt: int, *, retryable: bool = True, delay_ms: int | None = 2000, throttled: bool = False
) -> AttemptFailed:
    return AttemptFailed(
        operation="remove",
        attempt=attempt,
        http_status=503 if retryable else 403,
        retryable=retryable,
        delay_ms=delay_ms,
        error=f"PATCH answered {503 if retryable else 403}",
        for_seq=for_seq,
        throttled=throttled,
    )


def project(*events: Event) -> MentorProjection:
    return fold(MENTOR, events)


# -- state changes ----------------------------------------------------------------------------------------------


def test_status_changed_makes_the_mentor_pending() -> None:
    result = project(ev(1, changed("mentor_created")))
    sync = result.sync
    assert sync is not None
    assert sync.mentor_id == MENTOR
    assert sync.state == "pending"
    assert sync.attempts == 0
    assert sync.change_seq == 1
    assert sync.last_seq == 1
    assert sync.updated_at == T0 + timedelta(seconds=1)
    assert sync.portal_record_id == RECORD
    assert sync.next_attempt_at is None
    assert result.dead_letters == ()


def test_a_new_change_resets_attempts_and_moves_change_seq() -> None:
    before = project(ev(1, changed()), ev(2, failed(for_seq=1, attempt=1)), ev(3, failed(for_seq=1, attempt=2)))
    assert before.sync is not None and before.sync.attempts == 2 and before.sync.state == "retrying"

    after = apply(before, ev(4, SyncRequested(reason="force")))
    assert after.sync is not None
    assert after.sync.state == "pending"
    assert after.sync.attempts == 0
    assert after.sync.change_seq == 4
    assert after.sync.next_attempt_at is None
    assert after.sync.last_seq == 4


def test_success_answering_the_latest_change_is_in_sync() -> None:
    cases: tuple[tuple[Operation, bool], ...] = (("restore", True), ("remove", False))
    for operation, listed in cases:
        result = project(ev(1, changed()), ev(2, succeeded(for_seq=1, operation=operation, attempt=1)))
        assert result.sync is not None
        assert result.sync.state == "in_sync"
        assert result.sync.operation == operation
        assert result.sync.listed is listed
        assert result.sync.attempts == 1
        assert result.sync.last_error is None
        assert result.sync.last_seq == 2
        assert result.sync.uncovered_xids == ()


def test_success_for_a_later_seq_also_counts() -> None:
    result = project(ev(1, changed()), ev(5, succeeded(for_seq=3)))
    assert result.sync is not None and result.sync.state == "in_sync"


def test_success_answering_an_older_change_stays_pending() -> None:
    result = project(ev(1, changed()), ev(2, changed()), ev(3, succeeded(for_seq=1, operation="remove")))
    assert result.sync is not None
    assert result.sync.state == "pending"
    assert result.sync.change_seq == 2
    assert result.sync.listed is False  # what the portal now shows is still recorded
    assert result.sync.uncovered_xids == (10, 20)


def test_a_snapshot_decides_which_changes_an_outcome_answers() -> None:
    first, second = ev(1, changed(), xid=100), ev(2, changed(), xid=101)

    def answered(for_seq: int, snapshot: str) -> MentorProjection:
        """Both changes, then a success for ``for_seq`` read under ``snapshot``."""
        success = AttemptSucceeded(operation="restore", attempt=1, http_status=204, for_seq=for_seq, snapshot=snapshot)
        return project(first, second, ev(3, success))

    # xid 100 committed before the read (below xmax, not running); 101 was still running.
    answered_first = answered(for_seq=2, snapshot="100:102:101")
    assert answered_first.sync is not None
    assert answered_first.sync.state == "pending"
    assert answered_first.sync.uncovered_xids == (101,)
    # Both visible: in sync, whatever for_seq says.
    answered_both = answered(for_seq=0, snapshot="102:102:")
    assert answered_both.sync is not None
    assert answered_both.sync.state == "in_sync"


def test_retryable_failure_is_retrying_with_the_next_attempt_planned() -> None:
    result = project(ev(1, changed()), ev(2, failed(for_seq=1, attempt=1, delay_ms=2500)))
    sync = result.sync
    assert sync is not None
    assert sync.state == "retrying"
    assert sync.attempts == 1
    assert sync.operation == "remove"
    assert sync.last_error == "PATCH answered 503"
    assert sync.next_attempt_at == T0 + timedelta(seconds=2) + timedelta(milliseconds=2500)


def test_a_throttled_failure_spends_no_attempt() -> None:
    result = project(
        ev(1, changed()),
        ev(2, failed(for_seq=1, attempt=1, delay_ms=20)),
        ev(3, failed(for_seq=1, attempt=2, delay_ms=7000, throttled=True)),
    )
    sync = result.sync
    assert sync is not None
    assert sync.attempts == 1  # still one spent: the 429 did not count
    assert sync.state == "retrying"
    assert sync.next_attempt_at == T0 + timedelta(seconds=3, milliseconds=7000)


def test_a_permanent_failure_then_dead_letter() -> None:
    events = [
        ev(1, changed()),
        ev(2, failed(for_seq=1, attempt=1, retryable=False, delay_ms=None)),
        ev(3, DeadLettered(operation="remove", attempts=1, last_error="PATCH answered 403", for_seq=1)),
    ]
    after_failure = project(*events[:2])
    assert after_failure.sync is not None
    assert after_failure.sync.state == "pending"  # not retrying: nothing will be tried again
    assert after_failure.sync.next_attempt_at is None

    result = project(*events)
    assert result.sync is not None
    assert result.sync.state == "dead_lettered"
    assert result.sync.attempts == 1
    assert result.sync.last_error == "PATCH answered 403"
    assert result.dead_letters == (
        DeadLetterRow(
            id=3,
            mentor_id=MENTOR,
            operation="remove",
            attempts=1,
            last_error="PATCH answered 403",
            dead_lettered_at=T0 + timedelta(seconds=3),
            requeued_at=None,
        ),
    )


def _two_dead_letters() -> MentorProjection:
    return project(
        ev(1, changed()),
        ev(2, DeadLettered(operation="remove", attempts=5, last_error="first", for_seq=1)),
        ev(3, changed()),
        ev(4, DeadLettered(operation="restore", attempts=5, last_error="second", for_seq=3)),
    )


def test_requeue_marks_only_the_matching_letter() -> None:
    before = _two_dead_letters()
    assert [dl.id for dl in before.dead_letters] == [2, 4]

    after = apply(before, ev(5, Requeued(dead_letter_id=2)))
    first, second = after.dead_letters
    assert first.requeued_at == T0 + timedelta(seconds=5)
    assert second == before.dead_letters[1]
    assert second.requeued_at is None

    # A second requeue of the same letter keeps the first time; an unknown id touches nothing.
    again = apply(after, ev(6, Requeued(dead_letter_id=2)))
    assert again.dead_letters == after.dead_letters
    unknown = apply(before, ev(7, Requeued(dead_letter_id=99)))
    assert unknown.dead_letters == before.dead_letters


def test_a_later_success_that_leaves_the_mentor_in_sync_resolves_the_open_letters() -> None:
    before = _two_dead_letters()
    requeued = apply(before, ev(5, Requeued(dead_letter_id=2)))

    # A success answering an older change leaves the mentor pending: the letters stay open.
    newer = apply(requeued, ev(6, changed()))
    early = apply(newer, ev(7, succeeded(for_seq=3)))
    assert early.sync is not None and early.sync.state == "pending"
    assert [dl.open for dl in early.dead_letters] == [False, True]
    assert all(dl.resolved_at is None for dl in early.dead_letters)

    settled = apply(early, ev(8, succeeded(for_seq=6)))
    first, second = settled.dead_letters
    assert settled.sync is not None and settled.sync.state == "in_sync"
    assert first == requeued.dead_letters[0]  # re-queued already: closed, not resolved again
    assert (second.resolved_at, second.resolved_seq, second.open) == (T0 + timedelta(seconds=8), 8, False)

    # A later success keeps the first resolution; a new dead letter after it is open.
    again = apply(settled, ev(9, succeeded(for_seq=6)))
    assert again.dead_letters == settled.dead_letters
    later = apply(
        apply(again, ev(10, changed())),
        ev(11, DeadLettered(operation="remove", attempts=1, last_error="403", for_seq=10)),
    )
    assert [dl.open for dl in later.dead_letters] == [False, False, True]


def test_alerts_and_circuit_events_leave_the_projection_untouched() -> None:
    before = project(ev(1, changed()), ev(2, failed(for_seq=1, attempt=1)))
    for event in (
        ev(3, AlertSent(alert="hlf_sync_failure", target="topic:org", dead_letter_id=2)),
        ev(4, CircuitOpened(failing_mentors=30)),
        ev(5, CircuitOpened(failing_mentors=30), mentor=None),
    ):
        after = apply(before, event)
        assert after == before
        assert after.sync is not None and after.sync.last_seq == 2


def test_an_outcome_before_any_change_is_ignored() -> None:
    empty = MentorProjection(mentor_id=MENTOR)
    assert apply(empty, ev(1, succeeded(for_seq=0))) == empty


def test_mentor_deleted_keeps_the_portal_record_from_the_event() -> None:
    # The mentor row is gone; only the event still knows which portal record to remove.
    deleted = project(ev(1, changed("mentor_deleted", record=RECORD)))
    assert deleted.sync is not None and deleted.sync.portal_record_id == RECORD

    result = project(
        ev(1, changed("mentor_created", record=RECORD)),
        ev(2, StatusChanged(cause="certification_expired", portal_record_id=None)),
        ev(3, changed("mentor_deleted", record=OTHER_RECORD)),
    )
    assert result.sync is not None and result.sync.portal_record_id == OTHER_RECORD

    # A certification change carries no record: the one already known stays.
    kept = project(ev(1, changed("mentor_created")), ev(2, StatusChanged(cause="certification_expired")))
    assert kept.sync is not None and kept.sync.portal_record_id == RECORD


# -- incremental = batch ----------------------------------------------------------------------------------------

# Payloads are drawn from per-kind pools built by hand (one draw each): drawing every field with st.builds made
# generation alone cost most of the test folder's time budget.
_OPS: tuple[Operation, ...] = ("remove", "restore")
_FOR_SEQS = (0, 4, 12)
# pg_snapshot texts ('xmin:xmax:running') over the xids the histories use (90..140): some see every change,
# some none, some a part.
_SNAPSHOTS = (None, "90:90:", "141:141:", "100:120:105,110", "95:130:100,101,120", "90:141:")
_POOLS: list[list[Payload]] = [
    [
        StatusChanged(cause=cause, portal_record_id=record)
        for cause in ("mentor_created", "mentor_updated", "mentor_deleted", "certification_expired")
        for record in (None, RECORD, OTHER_RECORD)
    ],
    [SyncRequested(reason="force"), SyncRequested(reason="requeue", dead_letter_id=3)],
    [
        AttemptSucceeded(operation=op, attempt=attempt, http_status=204, for_seq=for_seq, snapshot=snapshot)
        for op in _OPS
        for attempt in (1, 3)
        for for_seq in _FOR_SEQS
        for snapshot in _SNAPSHOTS
    ],
    [
        AttemptFailed(
            operation=op,
            attempt=attempt,
            http_status=503 if retryable else 403,
            retryable=retryable,
            delay_ms=delay_ms,
            error="503" if retryable else "403",
            for_seq=for_seq,
            throttled=throttled,
            snapshot=snapshot,
        )
        for op in _OPS
        for attempt in (1, 4)
        for retryable in (True, False)
        for delay_ms in (None, 0, 2500)
        for for_seq in _FOR_SEQS
        for throttled in (False, True)
        for snapshot in _SNAPSHOTS[:3]
    ],
    [
        SyncSkipped(operation=op, reason="no record", for_seq=for_seq, snapshot=snapshot)
        for op in _OPS
        for for_seq in _FOR_SEQS
        for snapshot in _SNAPSHOTS[:3]
    ],
    [
        DeadLettered(operation=op, attempts=5, last_error="gave up", for_seq=for_seq, snapshot=snapshot)
        for op in _OPS
        for for_seq in _FOR_SEQS
        for snapshot in _SNAPSHOTS[:3]
    ],
    [Requeued(dead_letter_id=i) for i in range(13)],
    [AlertSent(alert="hlf_sync_failure", target="topic:org"), CircuitOpened(failing_mentors=30)],
]
_payloads: st.SearchStrategy[Payload] = st.one_of([st.sampled_from(pool) for pool in _POOLS])


# (seq gap, milliseconds gap) between two events of the mentor: gaps in seq are other mentors' events.
_GAPS = st.sampled_from([(1, 0), (1, 1000), (2, 0), (3, 2500)])


@st.composite
def _histories(draw: st.DrawFn) -> list[Event]:
    """One mentor's events in seq order, with gaps in seq and arbitrary xids (transactions commit in any order)."""
    steps = draw(st.lists(st.tuples(_payloads, _GAPS, st.integers(90, 140)), max_size=10))
    events: list[Event] = []
    seq = 0
    at = T0
    letters: list[int] = []
    for payload, (seq_gap, ms_gap), xid in steps:
        seq += seq_gap
        if isinstance(payload, DeadLettered):
            letters.append(seq)
        elif isinstance(payload, Requeued) and letters and draw(st.booleans()):
            payload = Requeued(dead_letter_id=draw(st.sampled_from(letters)))  # most re-queues name a real letter
        at += timedelta(milliseconds=ms_gap)
        events.append(
            Event(
                seq=seq,
                mentor_id=MENTOR,
                kind=NewEvent(MENTOR, payload).kind,
                version=1,
                recorded_at=at,
                payload=payload,
                xid=xid,
            )
        )
    return events


@settings(max_examples=200, deadline=None, database=None)
@given(events=_histories(), cut=st.integers(min_value=0, max_value=10))
def test_folding_incrementally_equals_folding_in_one_go(events: list[Event], cut: int) -> None:
    cut = min(cut, len(events))
    batch = fold(MENTOR, events)
    prefix = fold(MENTOR, events[:cut])
    incremental = fold(MENTOR, events[cut:], start=prefix)
    assert incremental == batch

    # Events the projections do not read change nothing, wherever they fall.
    projected = [e for e in events if not isinstance(e.payload, AlertSent | CircuitOpened)]
    assert fold(MENTOR, projected) == batch
    if batch.sync is not None:
        assert batch.sync.last_seq == projected[-1].seq
        assert batch.sync.updated_at == projected[-1].recorded_at
    # One dead letter per dead_lettered event after the first change (outcomes before it are ignored), keyed by seq.
    first_change = next((e.seq for e in events if isinstance(e.payload, StatusChanged | SyncRequested)), None)
    letters = [e.seq for e in events if isinstance(e.payload, DeadLettered) and first_change and e.seq > first_change]
    assert [dl.id for dl in batch.dead_letters] == letters
    # A letter is resolved only by a success after it, and then only if that success left the mentor in sync.
    for letter in batch.dead_letters:
        if letter.resolved_seq is not None:
            resolving = next(e for e in events if e.seq == letter.resolved_seq)
            assert isinstance(resolving.payload, AttemptSucceeded) and resolving.seq > letter.id


@settings(max_examples=200, deadline=None, database=None)
@given(events=_histories())
def test_applying_one_event_at_a_time_equals_folding_them_all(events: list[Event]) -> None:
    # The live path folds a few events at a time onto the row it loaded; replay folds a mentor's whole history in one
    # MentorFold. Every prefix goes through the frozen projection and back here.
    state = MentorProjection(mentor_id=MENTOR)
    for event in events:
        state = apply(state, event)
    assert state == fold(MENTOR, events)
