-- Named queries, one block each: `-- name: x` up to the next block. Loaded by hlf_actors.db.query("x").

-- name: insert_event
INSERT INTO event_log (mentor_id, kind, data)
VALUES (%s, %s, %s::jsonb)
RETURNING seq, recorded_at, xid::text::bigint;

-- name: take_inbox
-- The oldest unprojected events, removed from the inbox in the caller's transaction.
WITH taken AS (
    DELETE FROM hlf_inbox
    WHERE seq IN (SELECT seq FROM hlf_inbox ORDER BY seq LIMIT %s)
    RETURNING seq
)
SELECT e.seq, e.mentor_id, e.kind, e.version, e.data::text, e.recorded_at, e.xid::text::bigint
FROM event_log e JOIN taken USING (seq)
ORDER BY e.seq;

-- name: projected_events_of_mentors
SELECT e.seq, e.mentor_id, e.kind, e.version, e.data::text, e.recorded_at, e.xid::text::bigint
FROM event_log e
WHERE e.mentor_id = ANY(%s) AND e.kind = ANY(%s)
  AND NOT EXISTS (SELECT 1 FROM hlf_inbox i WHERE i.seq = e.seq)
ORDER BY e.seq;

-- name: load_sync_rows
SELECT mentor_id, operation, state, attempts, last_error, updated_at, portal_record_id, listed,
       change_seq, uncovered_xids, next_attempt_at, last_seq
FROM sync_status WHERE mentor_id = ANY(%s);

-- name: load_sync_rows_for_update
SELECT mentor_id, operation, state, attempts, last_error, updated_at, portal_record_id, listed,
       change_seq, uncovered_xids, next_attempt_at, last_seq
FROM sync_status WHERE mentor_id = ANY(%s)
ORDER BY mentor_id
FOR UPDATE;

-- name: lock_sync_rows
SELECT mentor_id FROM sync_status WHERE mentor_id = ANY(%s) ORDER BY mentor_id FOR UPDATE;

-- name: load_dead_letters
SELECT id, mentor_id, operation, attempts, last_error, dead_lettered_at, requeued_at
FROM dead_letters WHERE mentor_id = ANY(%s)
ORDER BY id;

-- name: open_mentors
-- Mentors whose sync is unfinished: what a fresh leader must pick up before it listens.
SELECT mentor_id FROM sync_status WHERE state IN ('pending', 'retrying') ORDER BY updated_at;

-- name: mentor_work
-- Everything an actor needs to decide its next step, read in one round trip. `wait_s` and `change_age_s` are
-- computed by the database so that a clock difference between this host and the database cannot skew them.
-- `for_seq` is the newest committed event that asks for a sync, projected or not; `snapshot` is this statement's
-- snapshot: a change is answered by the PATCH about to be sent iff its transaction is visible in it.
SELECT s.state, s.attempts,
       greatest(s.change_seq, coalesce(c.seq, 0)) AS for_seq,
       s.operation,
       greatest(0, extract(epoch FROM s.next_attempt_at - clock_timestamp()))::float8 AS wait_s,
       m.id IS NOT NULL AS mentor_exists,
       coalesce(m.portal_record_id, s.portal_record_id) AS portal_record_id,
       hlf_is_eligible(s.mentor_id, %s) AS eligible,
       m.organisation_id,
       pg_current_snapshot()::text AS snapshot,
       extract(epoch FROM clock_timestamp() - c.recorded_at)::float8 AS change_age_s
FROM sync_status s
LEFT JOIN mentors m ON m.id = s.mentor_id
LEFT JOIN LATERAL (
    SELECT e.seq, e.recorded_at FROM event_log e
    WHERE e.mentor_id = s.mentor_id AND e.kind IN ('status_changed', 'sync_requested')
    ORDER BY e.seq DESC LIMIT 1
) c ON true
WHERE s.mentor_id = %s;

-- name: unalerted_dead_letters
-- Recent dead letters whose push alert was never attempted (no alert_sent/alert_failed names them).
SELECT d.id, d.mentor_id, d.operation
FROM dead_letters d
WHERE d.dead_lettered_at > now() - make_interval(hours => %s)
  AND NOT EXISTS (
      SELECT 1 FROM event_log e
      WHERE e.mentor_id = d.mentor_id AND e.kind IN ('alert_sent', 'alert_failed')
        AND (e.data ->> 'dead_letter_id')::bigint = d.id)
ORDER BY d.id;

-- name: alert_targets
-- Where a mentor's sync-failure alert goes: the organisation's devices and topic.
SELECT o.alert_topic, coalesce(array_agg(d.fcm_token) FILTER (WHERE d.fcm_token IS NOT NULL), '{}')
FROM mentors m
JOIN organisations o ON o.id = m.organisation_id
LEFT JOIN coordinator_devices d ON d.organisation_id = o.id
WHERE m.id = %s
GROUP BY o.alert_topic;
