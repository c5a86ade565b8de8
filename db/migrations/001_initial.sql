-- The mentor app's tables, the service's event log and projections, and the triggers that turn every
-- relevant change into a durable event plus a wake-up.
--
-- How a change travels:
--   UPDATE mentors ...  ──trigger──▶  event_log row (status_changed)      the truth, append-only
--                                     hlf_inbox row  (its seq)             "not projected yet": the pending set
--                                     NOTIFY hlf_events, 'wake'            a wake-up only, folded per transaction
--   the service drains hlf_inbox, folds the events into sync_status / dead_letters, and wakes the mentor's actor.
--
-- Why an inbox and not a high-water mark on seq: sequence values are handed out at INSERT but become visible at
-- COMMIT, so a lower seq can appear after a higher one was read. Rows in hlf_inbox are visible exactly when their
-- transaction commits, whatever their seq, and the service deletes them in the same transaction that projects them.

-- The mentor app's tables (contract: shared/INTERFACE.md).
CREATE TABLE organisations (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name          text NOT NULL,
    reminder_days int[] NOT NULL DEFAULT '{30,14,7}',
    alert_topic   text NULL
);

CREATE TABLE mentors (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organisation_id  uuid NOT NULL REFERENCES organisations (id),
    full_name        text NOT NULL,
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused', 'expired_cert')),
    portal_record_id uuid NULL
);
CREATE INDEX mentors_organisation_idx ON mentors (organisation_id);

CREATE TABLE certifications (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    mentor_id  uuid NOT NULL REFERENCES mentors (id) ON DELETE CASCADE,
    expires_on date NOT NULL
);
CREATE INDEX certifications_mentor_idx ON certifications (mentor_id, expires_on);

CREATE TABLE coordinator_devices (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organisation_id uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    fcm_token       text NOT NULL,
    UNIQUE (organisation_id, fcm_token)
);

-- The truth. `version` is the schema version of `data` for that kind, so old events keep replaying.
CREATE TABLE event_log (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    mentor_id   uuid NULL,
    kind        text NOT NULL CHECK (kind ~ '^[a-z][a-z_]*$'),
    version     smallint NOT NULL DEFAULT 1,
    data        jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(data) = 'object'),
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    xid         xid8 NOT NULL DEFAULT pg_current_xact_id()   -- the writing transaction: see sync_status.uncovered_xids
);
CREATE INDEX event_log_mentor_idx ON event_log (mentor_id, seq) WHERE mentor_id IS NOT NULL;

CREATE FUNCTION hlf_event_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'event_log is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER event_log_append_only_rows BEFORE UPDATE OR DELETE ON event_log
    FOR EACH ROW EXECUTE FUNCTION hlf_event_log_is_append_only();
CREATE TRIGGER event_log_append_only_truncate BEFORE TRUNCATE ON event_log
    FOR EACH STATEMENT EXECUTE FUNCTION hlf_event_log_is_append_only();

-- Events written by SQL (triggers, functions, the CLI) wait here until the service has projected them.
CREATE TABLE hlf_inbox (
    seq bigint PRIMARY KEY
);

-- Projections of event_log, written only by the service's projector (hlf_actors/projections.py).
CREATE TABLE sync_status (
    mentor_id        uuid PRIMARY KEY,
    operation        text NULL CHECK (operation IN ('remove', 'restore')),
    state            text NOT NULL CHECK (state IN ('pending', 'retrying', 'in_sync', 'dead_lettered')),
    attempts         int NOT NULL DEFAULT 0,
    last_error       text NULL,
    updated_at       timestamptz NOT NULL,
    portal_record_id uuid NULL,         -- last record id the log told us about (a deleted mentor still needs removing)
    listed           boolean NULL,      -- what the portal was last successfully set to
    change_seq       bigint NOT NULL,   -- the newest event that asked for a sync
    uncovered_xids   bigint[] NOT NULL DEFAULT '{}', -- transactions whose changes no PATCH has answered yet
    next_attempt_at  timestamptz NULL,  -- when a retrying mentor's next attempt is due
    last_seq         bigint NOT NULL    -- the newest event folded into this row
);
CREATE INDEX sync_status_open_idx ON sync_status (updated_at) WHERE state IN ('pending', 'retrying');

CREATE TABLE dead_letters (
    id               bigint PRIMARY KEY,   -- the seq of its dead_lettered event
    mentor_id        uuid NOT NULL,
    operation        text NOT NULL,
    attempts         int NOT NULL,
    last_error       text NULL,
    dead_lettered_at timestamptz NOT NULL,
    requeued_at      timestamptz NULL
);
CREATE INDEX dead_letters_mentor_idx ON dead_letters (mentor_id);
CREATE INDEX dead_letters_open_idx ON dead_letters (dead_lettered_at) WHERE requeued_at IS NULL;

CREATE TABLE cert_expiry_reminders (
    mentor_id                 uuid NOT NULL,
    threshold_day             int NOT NULL,
    certification_expiry_date date NOT NULL,
    sent_at                   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (mentor_id, threshold_day, certification_expiry_date)
);

-- The one way SQL appends an event: log row, inbox row, wake-up. The payload is constant so that Postgres
-- folds a transaction's notifications into one, however many rows it changed.
CREATE FUNCTION hlf_append_event(p_mentor uuid, p_kind text, p_data jsonb, p_version smallint DEFAULT 1)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    new_seq bigint;
BEGIN
    INSERT INTO event_log (mentor_id, kind, version, data)
    VALUES (p_mentor, p_kind, p_version, coalesce(p_data, '{}'))
    RETURNING seq INTO new_seq;
    INSERT INTO hlf_inbox (seq) VALUES (new_seq);
    PERFORM pg_notify('hlf_events', 'wake');
    RETURN new_seq;
END;
$$;

-- Eligibility, written once: listed iff active and some certification is still valid on `today`.
CREATE FUNCTION hlf_is_eligible(p_mentor uuid, p_today date) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM mentors m
        WHERE m.id = p_mentor
          AND m.status = 'active'
          AND EXISTS (SELECT 1 FROM certifications c WHERE c.mentor_id = m.id AND c.expires_on >= p_today)
    );
$$;

CREATE FUNCTION hlf_mentor_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM hlf_append_event(OLD.id, 'status_changed', jsonb_build_object(
            'cause', 'mentor_deleted', 'status', NULL, 'previous_status', OLD.status,
            'portal_record_id', OLD.portal_record_id));
        RETURN OLD;
    END IF;
    PERFORM hlf_append_event(NEW.id, 'status_changed', jsonb_build_object(
        'cause', CASE WHEN TG_OP = 'INSERT' THEN 'mentor_created' ELSE 'mentor_updated' END,
        'status', NEW.status,
        'previous_status', CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END,
        'portal_record_id', NEW.portal_record_id));
    RETURN NEW;
END;
$$;
CREATE TRIGGER mentors_changed_insert AFTER INSERT ON mentors
    FOR EACH ROW EXECUTE FUNCTION hlf_mentor_changed();
CREATE TRIGGER mentors_changed_update AFTER UPDATE OF status, portal_record_id ON mentors
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.portal_record_id IS DISTINCT FROM NEW.portal_record_id)
    EXECUTE FUNCTION hlf_mentor_changed();
CREATE TRIGGER mentors_changed_delete AFTER DELETE ON mentors
    FOR EACH ROW EXECUTE FUNCTION hlf_mentor_changed();

CREATE FUNCTION hlf_certification_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND EXISTS (SELECT 1 FROM mentors WHERE id = OLD.mentor_id) THEN
        PERFORM hlf_append_event(OLD.mentor_id, 'status_changed', jsonb_build_object(
            'cause', 'certification_' || lower(TG_OP), 'certification_id', OLD.id,
            'expires_on', CASE WHEN TG_OP = 'UPDATE' THEN NEW.expires_on ELSE OLD.expires_on END));
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.mentor_id IS DISTINCT FROM OLD.mentor_id) THEN
        PERFORM hlf_append_event(NEW.mentor_id, 'status_changed', jsonb_build_object(
            'cause', 'certification_' || lower(TG_OP), 'certification_id', NEW.id, 'expires_on', NEW.expires_on));
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER certifications_changed_insert AFTER INSERT ON certifications
    FOR EACH ROW EXECUTE FUNCTION hlf_certification_changed();
CREATE TRIGGER certifications_changed_update AFTER UPDATE OF expires_on, mentor_id ON certifications
    FOR EACH ROW
    WHEN (OLD.expires_on IS DISTINCT FROM NEW.expires_on OR OLD.mentor_id IS DISTINCT FROM NEW.mentor_id)
    EXECUTE FUNCTION hlf_certification_changed();
CREATE TRIGGER certifications_changed_delete AFTER DELETE ON certifications
    FOR EACH ROW EXECUTE FUNCTION hlf_certification_changed();

-- Force sync: re-send the mentor's current state even if the service believes the portal agrees.
CREATE FUNCTION hlf_force_sync(p_mentor uuid) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM mentors WHERE id = p_mentor) THEN
        RAISE EXCEPTION 'no mentor with id %', p_mentor USING ERRCODE = 'no_data_found';
    END IF;
    RETURN hlf_append_event(p_mentor, 'sync_requested', jsonb_build_object('reason', 'force_sync'));
END;
$$;

-- Re-queue a dead letter: the mentor's actor runs the operation again from attempt 1.
CREATE FUNCTION hlf_requeue_dead_letter(p_id bigint) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    dl dead_letters%ROWTYPE;
BEGIN
    SELECT * INTO dl FROM dead_letters WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no dead letter with id %', p_id USING ERRCODE = 'no_data_found';
    END IF;
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
