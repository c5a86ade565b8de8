-- Issue 19: what an adversarial run found.

-- A dead letter closes itself once a later attempt for the same mentor succeeds and leaves the mentor in sync
-- (projections.MentorFold._succeeded); resolved_seq is the seq of that attempt_succeeded event. Open means neither
-- re-queued nor resolved.
ALTER TABLE dead_letters
    ADD COLUMN resolved_at  timestamptz NULL,
    ADD COLUMN resolved_seq bigint NULL;

DROP INDEX dead_letters_open_idx;
CREATE INDEX dead_letters_open_idx ON dead_letters (dead_lettered_at)
    WHERE requeued_at IS NULL AND resolved_at IS NULL;

-- Letters already resolved by what the log holds: the projection as the fold computes it, so that replay --verify
-- finds nothing to correct. The fold resolves a letter at the first success after it that leaves the mentor in sync
-- and that comes before any re-queue of the letter; sync_status.state = 'in_sync' now is the cheap stand-in for
-- "in sync after that success" (a mentor still open is re-folded on its next event anyway, and replay settles any
-- remaining difference).
UPDATE dead_letters d
SET resolved_at = s.recorded_at, resolved_seq = s.seq
FROM (
    SELECT DISTINCT ON (d2.id) d2.id, e.seq, e.recorded_at
    FROM dead_letters d2
    JOIN sync_status st ON st.mentor_id = d2.mentor_id AND st.state = 'in_sync'
    JOIN event_log e ON e.mentor_id = d2.mentor_id AND e.kind = 'attempt_succeeded' AND e.seq > d2.id
    WHERE NOT EXISTS (
        SELECT 1 FROM event_log r
        WHERE r.mentor_id = d2.mentor_id AND r.kind = 'requeued' AND r.seq < e.seq
          AND (r.data ->> 'dead_letter_id')::bigint = d2.id)
    ORDER BY d2.id, e.seq
) s
WHERE d.id = s.id;

-- The leader's heartbeat (service.py, "leadership"). The session advisory lock says who leads, but a frozen
-- process (SIGSTOP, a hung event loop) keeps its connection, and so the lock, healthy in PostgreSQL's eyes forever.
-- The leader proves it is alive by moving beat_at from its event loop every HLF_LEADER_TIMEOUT / 5; a standby that
-- finds beat_at older than HLF_LEADER_TIMEOUT bumps term (the old leader's next heartbeat then finds nothing to
-- update and it demotes itself) and terminates the old leader's sessions, which frees the lock.
CREATE TABLE hlf_leader (
    id          int PRIMARY KEY DEFAULT 1 CHECK (id = 1),  -- one row: there is one leader
    term        bigint NOT NULL,       -- +1 at every takeover and every fencing
    backend_pid int NOT NULL,          -- the leader's listener session, which holds the leadership lock
    session_tag text NOT NULL,         -- application_name of the leader's other sessions (its pool)
    host        text NOT NULL,         -- where the leader runs, and its process id: for operators
    os_pid      int NOT NULL,
    since       timestamptz NOT NULL,
    beat_at     timestamptz NOT NULL
);
