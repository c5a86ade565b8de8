-- Named queries, one block each: `-- name: x` up to the next block. Loaded by hlf_actors.db.query("x").

-- name: insert_event
INSERT INTO event_log (mentor_id, kind, data)
VALUES (%s, %s, %s::jsonb)
RETURNING seq, recorded_at, xid::text::bigint;

-- name: drain_take
-- A drain batch in one statement, so the actors it wakes wait for one round trip, not three: the oldest inbox
-- events (removed from the inbox), and beside each its mentor's
--   * sync_status row, locked FOR UPDATE in mentor order (the load the fold starts from), and
--   * facts, what mentor_work reads (mentor row, eligibility, newest change, this statement's snapshot, the
--     database's clock), from which the drain builds each open mentor's work after folding.
-- MATERIALIZED: `locked` must run as written (FOR UPDATE cannot sit on the nullable side of the join below).
-- `= ANY(ARRAY(…))`, not `IN`/JOIN: the planner sizes the taken set by the LIMIT (1000) and, while the log was small,
-- hash-joined the whole event log for every batch, a cost that grew with the log (bench/NOTES.md); with an array it
-- looks each event up by primary key whatever the sizes.
WITH taken AS (
    DELETE FROM hlf_inbox
    WHERE seq = ANY(ARRAY(SELECT seq FROM hlf_inbox ORDER BY seq LIMIT %(limit)s))
    RETURNING seq
), ev AS MATERIALIZED (
    SELECT e.seq, e.mentor_id, e.kind, e.version, e.data::text AS data, e.recorded_at, e.xid::text::bigint AS xid
    FROM event_log e
    WHERE e.seq = ANY(ARRAY(SELECT seq FROM taken))
), locked AS MATERIALIZED (
    SELECT s.mentor_id, s.operation, s.state, s.attempts, s.last_error, s.updated_at, s.portal_record_id, s.listed,
           s.change_seq, s.uncovered_xids, s.next_attempt_at, s.last_seq
    FROM sync_status s
    WHERE s.mentor_id = ANY(ARRAY(SELECT DISTINCT mentor_id FROM ev WHERE mentor_id IS NOT NULL))
    ORDER BY s.mentor_id
    FOR UPDATE
)
SELECT ev.seq, ev.mentor_id, ev.kind, ev.version, ev.data, ev.recorded_at, ev.xid,
       l.mentor_id, l.operation, l.state, l.attempts, l.last_error, l.updated_at, l.portal_record_id, l.listed,
       l.change_seq, l.uncovered_xids, l.next_attempt_at, l.last_seq,
       m.id IS NOT NULL AS mentor_exists,
       m.portal_record_id,
       hlf_eligible(m.status, cert.until, %(today)s) AS eligible,
       pg_current_snapshot()::text AS snapshot,
       c.seq AS newest_change_seq,
       extract(epoch FROM clock_timestamp() - c.recorded_at)::float8 AS change_age_s,
       clock_timestamp() AS db_now
FROM ev
LEFT JOIN locked l ON l.mentor_id = ev.mentor_id
LEFT JOIN mentors m ON m.id = ev.mentor_id
LEFT JOIN LATERAL (SELECT max(ce.expires_on) AS until FROM certifications ce WHERE ce.mentor_id = m.id) cert ON true
LEFT JOIN LATERAL (
    SELECT e.seq, e.recorded_at FROM event_log e
    WHERE e.mentor_id = ev.mentor_id AND e.kind IN ('status_changed', 'sync_requested')
    ORDER BY e.seq DESC LIMIT 1
) c ON true
ORDER BY ev.seq;

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
SELECT id, mentor_id, operation, attempts, last_error, dead_lettered_at, requeued_at, resolved_at, resolved_seq
FROM dead_letters WHERE mentor_id = ANY(%s)
ORDER BY id;

-- name: open_mentors
-- Mentors whose sync is unfinished: what a fresh leader must pick up before it listens.
SELECT mentor_id FROM sync_status WHERE state IN ('pending', 'retrying') ORDER BY updated_at;

-- name: mentor_work
-- Everything an actor needs to decide its next step, for one mentor (the actor's own read) or for every mentor a
-- drain leaves open (handed to their actors with the wake-up). `wait_s` and `change_age_s` are computed by the
-- database so that a clock difference between this host and the database cannot skew them. `for_seq` is the
-- newest committed event that asks for a sync, projected or not; `snapshot` is this statement's snapshot: a change
-- is answered by the PATCH about to be sent iff its transaction is visible in it. `last_seq` is the newest event
-- the projection has folded: an actor trusts a handed read only if it includes the actor's own last outcome.
SELECT s.mentor_id, s.last_seq, s.state, s.attempts,
       greatest(s.change_seq, coalesce(c.seq, 0)) AS for_seq,
       s.operation,
       greatest(0, extract(epoch FROM s.next_attempt_at - clock_timestamp()))::float8 AS wait_s,
       m.id IS NOT NULL AS mentor_exists,
       coalesce(m.portal_record_id, s.portal_record_id) AS portal_record_id,
       hlf_eligible(m.status, cert.until, %s) AS eligible,
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
LEFT JOIN LATERAL (SELECT max(ce.expires_on) AS until FROM certifications ce WHERE ce.mentor_id = m.id) cert ON true
WHERE s.mentor_id = ANY(%s);

-- name: unalerted_dead_letters
-- Recent dead letters whose push alert was never attempted (no alert_sent/alert_failed names them).
SELECT d.id, d.mentor_id, d.operation
FROM dead_letters d
WHERE d.dead_lettered_at > now() - make_interval(hours => %s)
  AND d.resolved_at IS NULL  -- a letter that closed itself before its alert went out needs none
  AND NOT EXISTS (
      SELECT 1 FROM event_log e
      WHERE e.mentor_id = d.mentor_id AND e.kind IN ('alert_sent', 'alert_failed')
        AND (e.data ->> 'dead_letter_id')::bigint = d.id)
ORDER BY d.id;

-- name: alert_targets
-- Where a mentor's sync-failure alert goes: the organisation's live devices (token and id, in the same order) and
-- topic, and the mentor's name for the notification. A device dead with its current token is left out.
SELECT o.alert_topic,
       coalesce(array_agg(d.fcm_token ORDER BY d.fcm_token) FILTER (WHERE d.fcm_token IS NOT NULL AND x.device_id IS NULL),
                '{}'),
       coalesce(array_agg(d.id::text ORDER BY d.fcm_token) FILTER (WHERE d.fcm_token IS NOT NULL AND x.device_id IS NULL),
                '{}'),
       m.full_name
FROM mentors m
JOIN organisations o ON o.id = m.organisation_id
LEFT JOIN coordinator_devices d ON d.organisation_id = o.id
LEFT JOIN hlf_dead_devices x ON x.device_id = d.id::text AND x.fcm_token = d.fcm_token
WHERE m.id = %s
GROUP BY o.alert_topic, m.full_name;

-- name: event_log_head
SELECT coalesce(max(seq), 0) FROM event_log;

-- name: reconcile_mentors
-- What the database says each mentor with a portal record should be (hlf_actors.reconcile), streamed, and whether
-- its own sync is under way: open, waiting in the inbox, or with an event newer than %(log_head)s.
SELECT m.id, m.portal_record_id, hlf_eligible(m.status, cert.until, %(today)s), s.state,
       coalesce(s.state IN ('pending', 'retrying') OR s.last_seq > %(log_head)s, false) OR waiting.mentor_id IS NOT NULL
FROM mentors m
LEFT JOIN sync_status s ON s.mentor_id = m.id
LEFT JOIN (SELECT DISTINCT e.mentor_id FROM hlf_inbox i JOIN event_log e USING (seq)) waiting
    ON waiting.mentor_id = m.id
LEFT JOIN LATERAL (SELECT max(ce.expires_on) AS until FROM certifications ce WHERE ce.mentor_id = m.id) cert ON true
WHERE m.portal_record_id IS NOT NULL;

-- name: reconcile_request
-- One sync_requested per divergent mentor, a batch in one statement; returns each request's seq.
SELECT t.m, hlf_append_event(t.m, 'sync_requested',
                             jsonb_build_object('reason', 'reconcile', 'portal_listed', t.l, 'expected', t.e))
FROM unnest(%s::uuid[], %s::boolean[], %s::boolean[]) AS t(m, l, e);

-- name: reconcile_outcomes
-- Per requested mentor: 'fixed' (in sync with an outcome answering the request), 'failed' (dead-lettered since),
-- else 'open'; and whether the request still waits in the inbox (nothing has read it).
SELECT t.m,
       CASE WHEN s.change_seq >= t.seq AND s.state = 'in_sync' THEN 'fixed'
            WHEN s.change_seq >= t.seq AND s.state = 'dead_lettered' THEN 'failed'
            ELSE 'open' END,
       EXISTS (SELECT 1 FROM hlf_inbox i WHERE i.seq = t.seq)
FROM unnest(%s::uuid[], %s::bigint[]) AS t(m, seq)
LEFT JOIN sync_status s ON s.mentor_id = t.m;

-- name: latest_credential_verdict
-- Whether a tenant-wide incident is open: the newest tenant check that reached a verdict (ok, cause, error), and
-- when the incident it belongs to began (the newest check that opened one). Partial index from 007_incidents.
SELECT (v.data ->> 'ok')::boolean, v.data ->> 'cause', v.data ->> 'error',
       (SELECT o.recorded_at FROM event_log o
        WHERE o.mentor_id IS NULL AND o.kind = 'credential_check' AND o.data ->> 'transition' = 'failed'
        ORDER BY o.seq DESC LIMIT 1)
FROM event_log v
WHERE v.mentor_id IS NULL AND v.kind = 'credential_check' AND v.data ->> 'ok' IS NOT NULL
ORDER BY v.seq DESC
LIMIT 1;

-- name: latest_reconcile_outcome
-- The kind of the newest reconcile_finished or reconcile_aborted: an abort alerts ops only when it follows a run.
SELECT kind
FROM event_log
WHERE mentor_id IS NULL AND kind IN ('reconcile_finished', 'reconcile_aborted')
ORDER BY seq DESC
LIMIT 1;

-- name: break_glass_all
-- Every mentor break-glass re-syncs with --all: the mentors, and deleted mentors the portal may still list.
SELECT id FROM mentors
UNION
SELECT s.mentor_id FROM sync_status s
WHERE s.portal_record_id IS NOT NULL AND s.listed IS NOT FALSE
  AND NOT EXISTS (SELECT 1 FROM mentors m WHERE m.id = s.mentor_id)
ORDER BY 1;

-- name: break_glass_work
-- Like mentor_work, for a batch of mentors at once (hlf_actors.break_glass): what to send, and the snapshot that
-- says which changes the sends answer. Mentors neither in `mentors` nor in sync_status are left out.
SELECT t.id,
       coalesce(m.portal_record_id, s.portal_record_id) AS portal_record_id,
       hlf_eligible(m.status, cert.until, %s) AS eligible,
       greatest(s.change_seq, c.seq, 0) AS for_seq,
       pg_current_snapshot()::text AS snapshot
FROM unnest(%s::uuid[]) AS t(id)
LEFT JOIN mentors m ON m.id = t.id
LEFT JOIN sync_status s ON s.mentor_id = t.id
LEFT JOIN LATERAL (SELECT max(ce.expires_on) AS until FROM certifications ce WHERE ce.mentor_id = m.id) cert ON true
LEFT JOIN LATERAL (
    SELECT e.seq FROM event_log e
    WHERE e.mentor_id = t.id AND e.kind IN ('status_changed', 'sync_requested')
    ORDER BY e.seq DESC LIMIT 1
) c ON true
WHERE m.id IS NOT NULL OR s.mentor_id IS NOT NULL
ORDER BY t.id;

-- name: claim_leadership
-- Run by the new leader on the connection that holds the leadership lock, right after taking it.
INSERT INTO hlf_leader (id, term, backend_pid, session_tag, host, os_pid, since, beat_at)
VALUES (1, 1, pg_backend_pid(), %(tag)s, %(host)s, %(os_pid)s, clock_timestamp(), clock_timestamp())
ON CONFLICT (id) DO UPDATE SET term = hlf_leader.term + 1, backend_pid = EXCLUDED.backend_pid,
    session_tag = EXCLUDED.session_tag, host = EXCLUDED.host, os_pid = EXCLUDED.os_pid, since = EXCLUDED.since,
    beat_at = EXCLUDED.beat_at
RETURNING term;

-- name: leader_heartbeat
-- Nothing to update once another process took over (or fenced us): the caller demotes itself.
UPDATE hlf_leader SET beat_at = clock_timestamp() WHERE id = 1 AND term = %s RETURNING term;

-- name: fence_stale_leader
-- A standby that could not take the lock: if the leader's heartbeat is older than the timeout, bump the term (the
-- row lock makes a heartbeat in flight wait, then find nothing to update) and terminate the sessions of the leader:
-- the one holding the leadership lock and those of its pool, waiting up to 5 s for each to end. Terminating a
-- session of the same role needs no superuser. Returns the sessions terminated (none while the leader is alive).
WITH holders AS (
    SELECT pid FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND classid = %(lock_hi)s::bigint::oid
      AND objid = %(lock_lo)s::bigint::oid AND objsubid = 1 AND pid <> pg_backend_pid()
), fenced AS (
    -- Only while someone holds the lock: a term bumped with nobody to terminate would demote a leader that then
    -- kept the lock.
    UPDATE hlf_leader SET term = term + 1, beat_at = clock_timestamp()
    WHERE id = 1 AND clock_timestamp() - beat_at > make_interval(secs => %(timeout_s)s)
      AND EXISTS (SELECT 1 FROM holders)
    RETURNING backend_pid, session_tag, host, os_pid
)
SELECT a.pid, f.host, f.os_pid, pg_terminate_backend(a.pid, 5000)
FROM fenced f
JOIN pg_stat_activity a ON a.pid IN (SELECT pid FROM holders) OR a.application_name = f.session_tag
WHERE a.pid <> pg_backend_pid();

-- name: expiry_start
INSERT INTO hlf_job_runs (job, run_key, owner) VALUES (%(job)s, %(key)s, %(owner)s)
ON CONFLICT (job, run_key) DO UPDATE
    SET owner = EXCLUDED.owner, started_at = clock_timestamp(), finished_at = NULL, outcome = NULL,
        attempts = hlf_job_runs.attempts + 1, detail = '{}'
    WHERE hlf_job_runs.outcome IS DISTINCT FROM 'ok' OR %(rerun)s
RETURNING attempts;

-- name: expiry_finish
UPDATE hlf_job_runs SET finished_at = clock_timestamp(), outcome = %s, detail = %s::jsonb
WHERE job = %s AND run_key = %s;

-- name: expiry_running
SELECT run_key, owner, started_at FROM hlf_job_runs
WHERE job = %s AND finished_at IS NULL ORDER BY started_at DESC LIMIT 1;

-- name: expiry_done
SELECT owner, finished_at FROM hlf_job_runs WHERE job = %s AND run_key = %s;

-- name: expiry_claim
-- Claims every reminder due tonight in one statement and returns them as one JSON document:
--   latest   active mentors whose latest expiry is today or later, with their organisation's thresholds
--   crossed  one row per threshold with 0 <= days_left <= threshold (non-positive thresholds ignored, in case
--            rows from before the validating trigger hold them)
--   due      the smallest crossed threshold per mentor: the one reminder that may be sent
--   known    each due reminder with its row in cert_expiry_reminders, if any
--   claimed  for mentors whose due reminder has no row: a row for every crossed threshold, the due one to push, the
--            larger ones superseded (ON CONFLICT: a larger one may have been reminded already)
-- Pushed tonight: the rows claimed for the due threshold, plus due rows an interrupted run claimed but never pushed.
-- (Rows inserted by `claimed` are invisible to the rest of the statement, so the two sets cannot overlap.)
WITH latest AS (
    SELECT m.id AS mentor_id, m.organisation_id, o.reminder_days, max(c.expires_on) AS expiry
    FROM mentors m
    JOIN organisations o ON o.id = m.organisation_id
    JOIN certifications c ON c.mentor_id = m.id
    WHERE m.status = 'active'
      AND (%(org)s::uuid IS NULL OR m.organisation_id = %(org)s::uuid)
      AND (%(mentor)s::uuid IS NULL OR m.id = %(mentor)s::uuid)
    GROUP BY m.id, o.id
    -- 'infinity' never expires, so it is never reminded about (and infinite dates cannot be subtracted).
    HAVING max(c.expires_on) >= %(today)s AND isfinite(max(c.expires_on))
), crossed AS (
    SELECT l.mentor_id, l.organisation_id, l.expiry, l.expiry - %(today)s AS days_left, t.day AS threshold
    FROM latest l CROSS JOIN LATERAL unnest(l.reminder_days) AS t(day)
    WHERE t.day > 0 AND l.expiry - %(today)s <= t.day
), due AS (
    SELECT mentor_id, organisation_id, expiry, days_left, min(threshold) AS threshold
    FROM crossed GROUP BY mentor_id, organisation_id, expiry, days_left
), known AS (
    SELECT d.*, r.mentor_id IS NOT NULL AS on_record, r.pushed_at, coalesce(r.superseded, false) AS superseded
    FROM due d
    LEFT JOIN cert_expiry_reminders r
        ON r.mentor_id = d.mentor_id AND r.threshold_day = d.threshold AND r.certification_expiry_date = d.expiry
), claimed AS (
    INSERT INTO cert_expiry_reminders (mentor_id, threshold_day, certification_expiry_date, superseded)
    SELECT c.mentor_id, c.threshold, c.expiry, c.threshold <> k.threshold
    FROM known k JOIN crossed c ON c.mentor_id = k.mentor_id
    WHERE NOT k.on_record
    ON CONFLICT DO NOTHING
    RETURNING mentor_id, threshold_day, superseded
), to_push AS (
    SELECT k.mentor_id, k.organisation_id, k.threshold, k.days_left, k.expiry
    FROM known k JOIN claimed c ON c.mentor_id = k.mentor_id AND c.threshold_day = k.threshold AND NOT c.superseded
    UNION ALL
    SELECT k.mentor_id, k.organisation_id, k.threshold, k.days_left, k.expiry
    FROM known k WHERE k.on_record AND k.pushed_at IS NULL AND NOT k.superseded
), named AS (
    SELECT p.*, m.full_name FROM to_push p JOIN mentors m ON m.id = p.mentor_id
)
SELECT json_build_object(
    'already', (SELECT count(*) FROM known WHERE on_record AND (pushed_at IS NOT NULL OR superseded)),
    'superseded', (SELECT count(*) FROM claimed WHERE superseded),
    'due', coalesce((SELECT json_agg(p ORDER BY p.organisation_id, p.mentor_id) FROM named p), '[]')
)::text;

-- name: expiry_targets
-- Live devices only: one FCM called dead with its current token is skipped (hlf_dead_devices, alerts.py).
SELECT o.id, o.alert_topic,
       coalesce(array_agg(d.fcm_token ORDER BY d.fcm_token) FILTER (WHERE d.fcm_token IS NOT NULL), '{}'),
       coalesce(array_agg(d.id::text ORDER BY d.fcm_token) FILTER (WHERE d.fcm_token IS NOT NULL), '{}')
FROM organisations o
LEFT JOIN (coordinator_devices d LEFT JOIN hlf_dead_devices x ON x.device_id = d.id::text AND x.fcm_token = d.fcm_token)
    ON d.organisation_id = o.id AND x.device_id IS NULL
WHERE o.id = ANY(%s)
GROUP BY o.id;

-- name: expiry_record_events
-- reminder_sent is not a projected kind: it goes straight to the log, like alert_sent, not through the inbox.
INSERT INTO event_log (mentor_id, kind, data)
SELECT x.mentor_id, x.kind, x.data::jsonb
FROM unnest(%s::uuid[], %s::text[], %s::text[]) AS x(mentor_id, kind, data);

-- name: expiry_mark_pushed
UPDATE cert_expiry_reminders r SET pushed_at = clock_timestamp()
FROM unnest(%s::uuid[], %s::int[], %s::date[]) AS x(mentor_id, threshold_day, expiry)
WHERE r.mentor_id = x.mentor_id AND r.threshold_day = x.threshold_day AND r.certification_expiry_date = x.expiry;
