-- What the sync path reads before each PATCH (mentor_work, drain_take), made cheap.
--
-- Eligibility as an expression the planner inlines. hlf_is_eligible's body holds sub-selects, so PostgreSQL runs it
-- through the SQL-function executor on every call: 0.14 ms a mentor, most of the read an actor's PATCH waits for,
-- and seconds over a 100,000-mentor reconciliation. hlf_eligible has no sub-select and is inlined; queries join the
-- mentor's latest certification themselves and pass it in. The rule stays written once, here, and
-- hlf_is_eligible keeps its signature and its answers for everyone who calls it.
CREATE FUNCTION hlf_eligible(p_status text, p_certified_until date, p_today date) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(p_status = 'active' AND p_certified_until >= p_today, false)
$$;

CREATE OR REPLACE FUNCTION hlf_is_eligible(p_mentor uuid, p_today date) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT coalesce((
        SELECT hlf_eligible(m.status, (SELECT max(c.expires_on) FROM certifications c WHERE c.mentor_id = m.id), p_today)
        FROM mentors m WHERE m.id = p_mentor
    ), false);
$$;

-- Each mentor's newest change: one index entry read backwards, instead of every event of the mentor's history
-- fetched and sorted (31.6 ms → 10.3 ms to read the work of 1,000 mentors with 6 events each; the gap grows with
-- the history). Built without CONCURRENTLY, inside the migration's transaction: on a log of millions of events,
-- run `hlf-actors migrate` at a quiet hour (writes to event_log wait for the build).
CREATE INDEX event_log_change_idx ON event_log (mentor_id, seq) WHERE kind IN ('status_changed', 'sync_requested');
