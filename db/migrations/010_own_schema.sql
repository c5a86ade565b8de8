-- The coordinators' app may act and read, behind one authorisation hook (issue 22).
--
-- Runs, like every migration, with search_path = hlf, <app schema>: what it creates lands in hlf, and migrate then
-- moves the app-callable functions (hlf_force_sync, hlf_expire_certifications, hlf_requeue_dead_letter,
-- hlf_mentor_sync_state) to the app schema and makes them SECURITY DEFINER with a fixed search_path (db/steps/).
--
--   app role ──RPC──▶ hlf_force_sync(mentor)            SECURITY DEFINER, owned by the service's role
--                        └─ hlf_authorize(hlf_caller(), 'force_sync', mentor)   the hook: may this caller?
--                        └─ hlf_append_event(...)       the same path as the CLI's force-sync

-- Who called: inside a SECURITY DEFINER function current_user is the owner, but the `role` setting still holds the
-- role the caller switched to (PostgREST switches to `authenticated` / `anon` for each request with it).
-- Setting `role` checks membership exactly as SET ROLE does, so a caller cannot claim a role it does not have.
CREATE FUNCTION hlf_caller() RETURNS name LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN current_setting('role') = 'none' THEN session_user ELSE current_setting('role')::name END
$$;

-- The authorisation hook: may p_caller do p_action ('force_sync', 'read', 'requeue', 'expire_certifications') for
-- p_mentor (NULL when the action concerns no one mentor)? A deployment replaces this function with its own rule
-- (docs/operations.md shows the Supabase one: a coordinator of the mentor's organisation, via auth.uid()). The
-- default: the service's role (the owner of schema hlf), its members, and superusers.
CREATE FUNCTION hlf_authorize(p_caller name, p_action text, p_mentor uuid) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT pg_has_role(p_caller, (SELECT n.nspowner FROM pg_namespace n WHERE n.nspname = 'hlf'), 'USAGE')
$$;

CREATE FUNCTION hlf_require(p_action text, p_mentor uuid) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF NOT coalesce(hlf_authorize(hlf_caller(), p_action, p_mentor), false) THEN
        RAISE EXCEPTION 'not allowed: % may not % %', hlf_caller(), replace(p_action, '_', ' '),
                coalesce('for mentor ' || p_mentor, 'here')
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'the authorisation hook hlf.hlf_authorize decides who may; see docs/operations.md';
    END IF;
END;
$$;

-- The app calls these through the Data API with named arguments ({"mentor_id": …}), so they take the contract's
-- parameter names (shared/INTERFACE.md); a parameter cannot be renamed in place, hence DROP and CREATE. Unqualified,
-- the DROP finds the one definition there is: in hlf on a first install, in the app schema on an old-layout one.
DROP FUNCTION hlf_force_sync(uuid);
DROP FUNCTION hlf_requeue_dead_letter(bigint);
DROP FUNCTION hlf_expire_certifications(date);

-- Force sync: re-send the mentor's current state even if the service believes the portal agrees.
CREATE FUNCTION hlf_force_sync(mentor_id uuid) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    PERFORM hlf_require('force_sync', hlf_force_sync.mentor_id);
    IF NOT EXISTS (SELECT 1 FROM mentors m WHERE m.id = hlf_force_sync.mentor_id) THEN
        RAISE EXCEPTION 'no mentor with id %', hlf_force_sync.mentor_id USING ERRCODE = 'no_data_found';
    END IF;
    RETURN hlf_append_event(hlf_force_sync.mentor_id, 'sync_requested', jsonb_build_object('reason', 'force_sync'));
END;
$$;

-- Re-queue a dead letter: the mentor's actor runs the operation again from attempt 1.
CREATE FUNCTION hlf_requeue_dead_letter(dead_letter_id bigint) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    p_id bigint := hlf_requeue_dead_letter.dead_letter_id;
    dl   dead_letters%ROWTYPE;
BEGIN
    SELECT * INTO dl FROM dead_letters WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no dead letter with id %', p_id USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM hlf_require('requeue', dl.mentor_id);
    IF dl.requeued_at IS NOT NULL OR EXISTS (
        SELECT 1 FROM hlf_inbox i JOIN event_log e USING (seq)
        WHERE e.kind = 'requeued' AND (e.data ->> 'dead_letter_id')::bigint = p_id) THEN
        RAISE EXCEPTION 'dead letter % was already re-queued', p_id USING ERRCODE = 'unique_violation';
    END IF;
    PERFORM hlf_append_event(dl.mentor_id, 'requeued', jsonb_build_object('dead_letter_id', p_id));
    RETURN hlf_append_event(dl.mentor_id, 'sync_requested',
        jsonb_build_object('reason', 'requeue', 'dead_letter_id', p_id));
END;
$$;

-- The nightly expiry, as 002 wrote it, behind the hook (the service's role passes the default one).
CREATE FUNCTION hlf_expire_certifications(today date) RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    p_today date := hlf_expire_certifications.today;
    changed int;
BEGIN
    PERFORM hlf_require('expire_certifications', NULL);
    IF p_today IS NULL THEN
        RAISE EXCEPTION 'hlf_expire_certifications: today must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- A certification committed while the UPDATE runs would be invisible to its NOT EXISTS (READ COMMITTED
    -- re-checks only the mentor row), and a just-renewed mentor would be expired by mistake. SHARE mode waits for
    -- certification writes in flight and holds new ones off until this transaction ends: milliseconds, once a night.
    LOCK TABLE certifications IN SHARE MODE;
    WITH expired AS (
        UPDATE mentors m SET status = 'expired_cert'
        WHERE m.status = 'active'
          AND NOT EXISTS (SELECT 1 FROM certifications c WHERE c.mentor_id = m.id AND c.expires_on >= p_today)
        RETURNING m.id
    )
    SELECT count(hlf_append_event(e.id, 'auto_transitioned', jsonb_build_object(
               'from', 'active', 'to', 'expired_cert', 'today', p_today,
               'certification_expiry_date',
               (SELECT max(c.expires_on) FROM certifications c WHERE c.mentor_id = e.id))))::int
    INTO changed
    FROM expired e;
    RETURN changed;
END;
$$;

-- The read model the coordinators' app shows: one row per mentor the caller may read (the hook, action 'read').
-- A function rather than a view: a view runs with its owner's rights on every row, and PostgREST exposes a
-- set-returning function as GET /rpc/hlf_mentor_sync_state with the same filters a table gets.
CREATE FUNCTION hlf_mentor_sync_state() RETURNS TABLE (
    mentor_id       uuid,
    organisation_id uuid,
    full_name       text,
    state           text,          -- pending, retrying, in_sync, dead_lettered; 'unknown' before its first event
    operation       text,          -- remove or restore: what the portal was last asked to do
    attempts        int,
    last_error      text,          -- the portal's answer in words, NULL when the last attempt succeeded
    dead_lettered   boolean,
    dead_letter_id  bigint,        -- the open dead letter, for hlf_requeue_dead_letter
    last_synced_at  timestamptz,   -- when the portal last accepted a change for this mentor
    updated_at      timestamptz
) LANGUAGE sql STABLE AS $$
    SELECT m.id, m.organisation_id, m.full_name, coalesce(s.state, 'unknown'), s.operation,
           coalesce(s.attempts, 0), s.last_error, coalesce(s.state = 'dead_lettered', false),
           CASE WHEN s.state = 'dead_lettered' THEN dl.id END, ok.recorded_at, s.updated_at
    FROM mentors m
    LEFT JOIN sync_status s ON s.mentor_id = m.id
    LEFT JOIN LATERAL (
        SELECT d.id FROM dead_letters d WHERE d.mentor_id = m.id AND d.requeued_at IS NULL
        ORDER BY d.id DESC LIMIT 1) dl ON true
    LEFT JOIN LATERAL (
        SELECT e.recorded_at FROM event_log e WHERE e.mentor_id = m.id AND e.kind = 'attempt_succeeded'
        ORDER BY e.seq DESC LIMIT 1) ok ON true
    WHERE hlf_authorize(hlf_caller(), 'read', m.id)
$$;
