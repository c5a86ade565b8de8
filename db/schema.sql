ALTER TABLE ONLY hlf.cert_expiry_reminders
    ADD CONSTRAINT cert_expiry_reminders_mentor_id_threshold_day_certification_key UNIQUE (mentor_id, threshold_day, certification_expiry_date);

ALTER TABLE ONLY hlf.dead_letters
    ADD CONSTRAINT dead_letters_pkey PRIMARY KEY (id);

ALTER TABLE ONLY hlf.duplicate_findings
    ADD CONSTRAINT duplicate_findings_pkey PRIMARY KEY (key);

ALTER TABLE ONLY hlf.event_log
    ADD CONSTRAINT event_log_pkey PRIMARY KEY (seq);

ALTER TABLE ONLY hlf.event_log_archive
    ADD CONSTRAINT event_log_archive_pkey PRIMARY KEY (seq);

ALTER TABLE ONLY hlf.hlf_dead_devices
    ADD CONSTRAINT hlf_dead_devices_pkey PRIMARY KEY (device_id, fcm_token);

ALTER TABLE ONLY hlf.hlf_inbox
    ADD CONSTRAINT hlf_inbox_pkey PRIMARY KEY (seq);

ALTER TABLE ONLY hlf.hlf_job_runs
    ADD CONSTRAINT hlf_job_runs_pkey PRIMARY KEY (job, run_key);

ALTER TABLE ONLY hlf.hlf_leader
    ADD CONSTRAINT hlf_leader_pkey PRIMARY KEY (id);

ALTER TABLE ONLY hlf.hlf_ops_outbox
    ADD CONSTRAINT hlf_ops_outbox_alert_id_channel_key UNIQUE (alert_id, channel);

ALTER TABLE ONLY hlf.hlf_ops_outbox
    ADD CONSTRAINT hlf_ops_outbox_pkey PRIMARY KEY (id);

ALTER TABLE ONLY hlf.hlf_schema_migrations
    ADD CONSTRAINT hlf_schema_migrations_pkey PRIMARY KEY (version);

ALTER TABLE ONLY hlf.projection_snapshots
    ADD CONSTRAINT projection_snapshots_pkey PRIMARY KEY (mentor_id);

ALTER TABLE ONLY hlf.sync_status
    ADD CONSTRAINT sync_status_pkey PRIMARY KEY (mentor_id);

ALTER TABLE ONLY public.certifications
    ADD CONSTRAINT certifications_mentor_id_fkey FOREIGN KEY (mentor_id) REFERENCES public.mentors(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.certifications
    ADD CONSTRAINT certifications_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.coordinator_devices
    ADD CONSTRAINT coordinator_devices_organisation_id_fcm_token_key UNIQUE (organisation_id, fcm_token);

ALTER TABLE ONLY public.coordinator_devices
    ADD CONSTRAINT coordinator_devices_organisation_id_fkey FOREIGN KEY (organisation_id) REFERENCES public.organisations(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.coordinator_devices
    ADD CONSTRAINT coordinator_devices_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.mentors
    ADD CONSTRAINT mentors_organisation_id_fkey FOREIGN KEY (organisation_id) REFERENCES public.organisations(id);

ALTER TABLE ONLY public.mentors
    ADD CONSTRAINT mentors_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.organisations
    ADD CONSTRAINT organisations_pkey PRIMARY KEY (id);

ALTER TABLE hlf.cert_expiry_reminders ENABLE ROW LEVEL SECURITY;

ALTER TABLE hlf.dead_letters ENABLE ROW LEVEL SECURITY;

ALTER TABLE hlf.duplicate_findings ENABLE ROW LEVEL SECURITY;

ALTER TABLE hlf.event_log ALTER COLUMN seq ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME hlf.event_log_seq_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

ALTER TABLE hlf.event_log ENABLE ROW LEVEL SECURITY;

ALTER TABLE hlf.event_log_archive ENABLE ROW LEVEL SECURITY;

ALTER TABLE hlf.hlf_dead_devices ENABLE ROW LEVEL SECURITY;

ALTER TABLE hlf.hlf_inbox ENABLE ROW LEVEL SECURITY;

ALTER TABLE hlf.hlf_job_runs ENABLE ROW LEVEL SECURITY;

ALTER TABLE hlf.hlf_leader ENABLE ROW LEVEL SECURITY;

ALTER TABLE hlf.hlf_ops_outbox ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME hlf.hlf_ops_outbox_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

ALTER TABLE hlf.hlf_ops_outbox ENABLE ROW LEVEL SECURITY;

ALTER TABLE hlf.hlf_schema_migrations ENABLE ROW LEVEL SECURITY;

ALTER TABLE hlf.projection_snapshots ENABLE ROW LEVEL SECURITY;

ALTER TABLE hlf.sync_status ENABLE ROW LEVEL SECURITY;

COMMENT ON SCHEMA public IS 'standard public schema';

CREATE FUNCTION hlf.hlf_append_event(p_mentor uuid, p_kind text, p_data jsonb, p_version smallint DEFAULT 1) RETURNS bigint
    LANGUAGE plpgsql
    AS $$
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

CREATE FUNCTION hlf.hlf_authorize(p_caller name, p_action text, p_mentor uuid) RETURNS boolean
    LANGUAGE sql STABLE
    AS $$
    SELECT pg_has_role(p_caller, (SELECT n.nspowner FROM pg_namespace n WHERE n.nspname = 'hlf'), 'USAGE')
$$;

CREATE FUNCTION hlf.hlf_caller() RETURNS name
    LANGUAGE sql STABLE
    AS $$
    SELECT CASE WHEN current_setting('role') = 'none' THEN session_user ELSE current_setting('role')::name END
$$;

CREATE FUNCTION hlf.hlf_certification_changed() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'hlf', 'public', 'pg_temp'
    AS $$
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

CREATE FUNCTION hlf.hlf_check_reminder_days() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'hlf', 'public', 'pg_temp'
    AS $$
BEGIN
    IF NEW.reminder_days IS NULL
       OR cardinality(NEW.reminder_days) = 0
       OR array_ndims(NEW.reminder_days) <> 1
       OR array_position(NEW.reminder_days, NULL) IS NOT NULL
       OR EXISTS (SELECT 1 FROM unnest(NEW.reminder_days) AS d WHERE d <= 0)
       OR (SELECT count(DISTINCT d) FROM unnest(NEW.reminder_days) AS d) <> cardinality(NEW.reminder_days) THEN
        RAISE EXCEPTION 'organisations.reminder_days must be a non-empty list of distinct positive numbers of days '
                        '(e.g. {30,14,7}), got %', coalesce(NEW.reminder_days::text, 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$;

CREATE FUNCTION hlf.hlf_eligible(p_status text, p_certified_until date, p_today date) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
    SELECT coalesce(p_status = 'active' AND p_certified_until >= p_today, false)
$$;

CREATE FUNCTION hlf.hlf_event_log_deleted_only_archived() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'hlf', 'public', 'pg_temp'
    AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM gone g
        WHERE NOT EXISTS (SELECT 1 FROM event_log_archive a WHERE a.seq = g.seq)
           OR (g.mentor_id IS NOT NULL AND NOT EXISTS (
                SELECT 1 FROM projection_snapshots s WHERE s.mentor_id = g.mentor_id AND s.cut_seq >= g.seq))) THEN
        RAISE EXCEPTION 'event_log is append-only: DELETE is allowed only for archived events under a snapshot'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NULL;
END;
$$;

CREATE FUNCTION hlf.hlf_event_log_is_append_only() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'hlf', 'public', 'pg_temp'
    AS $$
BEGIN
    IF TG_TABLE_NAME = 'event_log' AND TG_OP = 'DELETE' AND current_setting('hlf.archiving', true) = 'on' THEN
        RETURN NULL;  -- checked by hlf_event_log_deleted_only_archived once the rows are known
    END IF;
    RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE FUNCTION hlf.hlf_is_eligible(p_mentor uuid, p_today date) RETURNS boolean
    LANGUAGE sql STABLE
    AS $$
    SELECT coalesce((
        SELECT hlf_eligible(m.status, (SELECT max(c.expires_on) FROM certifications c WHERE c.mentor_id = m.id), p_today)
        FROM mentors m WHERE m.id = p_mentor
    ), false);
$$;

CREATE FUNCTION hlf.hlf_mentor_changed() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'hlf', 'public', 'pg_temp'
    AS $$
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

CREATE FUNCTION hlf.hlf_require(p_action text, p_mentor uuid) RETURNS void
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF NOT coalesce(hlf_authorize(hlf_caller(), p_action, p_mentor), false) THEN
        RAISE EXCEPTION 'not allowed: % may not % %', hlf_caller(), replace(p_action, '_', ' '),
                coalesce('for mentor ' || p_mentor, 'here')
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'the authorisation hook hlf.hlf_authorize decides who may; see docs/operations.md';
    END IF;
END;
$$;

CREATE FUNCTION public.hlf_expire_certifications(today date) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'hlf', 'public', 'pg_temp'
    AS $$
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

CREATE FUNCTION public.hlf_force_sync(mentor_id uuid) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'hlf', 'public', 'pg_temp'
    AS $$
BEGIN
    PERFORM hlf_require('force_sync', hlf_force_sync.mentor_id);
    IF NOT EXISTS (SELECT 1 FROM mentors m WHERE m.id = hlf_force_sync.mentor_id) THEN
        RAISE EXCEPTION 'no mentor with id %', hlf_force_sync.mentor_id USING ERRCODE = 'no_data_found';
    END IF;
    RETURN hlf_append_event(hlf_force_sync.mentor_id, 'sync_requested', jsonb_build_object('reason', 'force_sync'));
END;
$$;

CREATE FUNCTION public.hlf_mentor_sync_state() RETURNS TABLE(mentor_id uuid, organisation_id uuid, full_name text, state text, operation text, attempts integer, last_error text, dead_lettered boolean, dead_letter_id bigint, last_synced_at timestamp with time zone, updated_at timestamp with time zone)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'hlf', 'public', 'pg_temp'
    AS $$
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

CREATE FUNCTION public.hlf_requeue_dead_letter(dead_letter_id bigint) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'hlf', 'public', 'pg_temp'
    AS $$
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

CREATE INDEX cert_expiry_reminders_unpushed_idx ON hlf.cert_expiry_reminders USING btree (mentor_id) WHERE ((pushed_at IS NULL) AND (NOT superseded));

CREATE INDEX certifications_mentor_idx ON public.certifications USING btree (mentor_id, expires_on);

CREATE INDEX dead_letters_mentor_idx ON hlf.dead_letters USING btree (mentor_id);

CREATE INDEX dead_letters_open_idx ON hlf.dead_letters USING btree (dead_lettered_at) WHERE ((requeued_at IS NULL) AND (resolved_at IS NULL));

CREATE INDEX duplicate_findings_mentor_idx ON hlf.duplicate_findings USING btree (mentor_id);

CREATE INDEX duplicate_findings_unalerted_idx ON hlf.duplicate_findings USING btree (detected_at) WHERE (alerted_at IS NULL);

CREATE INDEX event_log_archive_mentor_idx ON hlf.event_log_archive USING btree (mentor_id, seq) WHERE (mentor_id IS NOT NULL);

CREATE INDEX event_log_change_idx ON hlf.event_log USING btree (mentor_id, seq) WHERE (kind = ANY (ARRAY['status_changed'::text, 'sync_requested'::text]));

CREATE INDEX event_log_global_kind_idx ON hlf.event_log USING btree (kind, seq) WHERE (mentor_id IS NULL);

CREATE INDEX event_log_mentor_idx ON hlf.event_log USING btree (mentor_id, seq) WHERE (mentor_id IS NOT NULL);

CREATE INDEX event_log_probe_idx ON hlf.event_log USING btree (kind, recorded_at) WHERE (kind = ANY (ARRAY['attempt_succeeded'::text, 'public_listing_confirmed'::text, 'public_listing_stale'::text]));

CREATE INDEX event_log_reconcile_outcomes ON hlf.event_log USING btree (seq) WHERE ((mentor_id IS NULL) AND (kind = ANY (ARRAY['reconcile_finished'::text, 'reconcile_aborted'::text])));

CREATE INDEX event_log_tenant_checks ON hlf.event_log USING btree (seq) WHERE ((mentor_id IS NULL) AND (kind = 'credential_check'::text));

CREATE INDEX event_log_xid_idx ON hlf.event_log USING btree (xid);

CREATE INDEX hlf_ops_outbox_due_idx ON hlf.hlf_ops_outbox USING btree (next_at) WHERE ((delivered_at IS NULL) AND (gave_up_at IS NULL));

CREATE INDEX mentors_organisation_idx ON public.mentors USING btree (organisation_id);

CREATE INDEX sync_status_open_idx ON hlf.sync_status USING btree (updated_at) WHERE (state = ANY (ARRAY['pending'::text, 'retrying'::text]));

CREATE SCHEMA hlf;

CREATE SCHEMA public;

CREATE TABLE hlf.cert_expiry_reminders (
    mentor_id uuid NOT NULL,
    threshold_day integer NOT NULL,
    certification_expiry_date date NOT NULL,
    sent_at timestamp with time zone DEFAULT now() NOT NULL,
    superseded boolean DEFAULT false NOT NULL,
    pushed_at timestamp with time zone
);

CREATE TABLE hlf.dead_letters (
    id bigint NOT NULL,
    mentor_id uuid NOT NULL,
    operation text NOT NULL,
    attempts integer NOT NULL,
    last_error text,
    dead_lettered_at timestamp with time zone NOT NULL,
    requeued_at timestamp with time zone,
    resolved_at timestamp with time zone,
    resolved_seq bigint
);

CREATE TABLE hlf.duplicate_findings (
    key text NOT NULL,
    rule text NOT NULL,
    mentor_id uuid NOT NULL,
    seqs bigint[] NOT NULL,
    event_seq bigint NOT NULL,
    detected_at timestamp with time zone NOT NULL,
    alerted_at timestamp with time zone
);

CREATE TABLE hlf.event_log (
    seq bigint NOT NULL,
    mentor_id uuid,
    kind text NOT NULL,
    version smallint DEFAULT 1 NOT NULL,
    data jsonb DEFAULT '{}'::jsonb NOT NULL,
    recorded_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    xid xid8 DEFAULT pg_current_xact_id() NOT NULL,
    CONSTRAINT event_log_data_check CHECK ((jsonb_typeof(data) = 'object'::text)),
    CONSTRAINT event_log_kind_check CHECK ((kind ~ '^[a-z][a-z_]*$'::text))
);

CREATE TABLE hlf.event_log_archive (
    seq bigint NOT NULL,
    mentor_id uuid,
    kind text NOT NULL,
    version smallint NOT NULL,
    data jsonb NOT NULL,
    recorded_at timestamp with time zone NOT NULL,
    xid xid8 NOT NULL,
    archived_at timestamp with time zone DEFAULT now() NOT NULL
);

CREATE TABLE hlf.hlf_dead_devices (
    device_id text NOT NULL,
    fcm_token text NOT NULL,
    organisation_id uuid NOT NULL,
    reason text NOT NULL,
    marked_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL
);

CREATE TABLE hlf.hlf_inbox (
    seq bigint NOT NULL
);

CREATE TABLE hlf.hlf_job_runs (
    job text NOT NULL,
    run_key text NOT NULL,
    owner text NOT NULL,
    started_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    finished_at timestamp with time zone,
    outcome text,
    attempts integer DEFAULT 1 NOT NULL,
    detail jsonb DEFAULT '{}'::jsonb NOT NULL,
    CONSTRAINT hlf_job_runs_detail_check CHECK ((jsonb_typeof(detail) = 'object'::text)),
    CONSTRAINT hlf_job_runs_outcome_check CHECK ((outcome = ANY (ARRAY['ok'::text, 'failed'::text])))
);

CREATE TABLE hlf.hlf_leader (
    id integer DEFAULT 1 NOT NULL,
    term bigint NOT NULL,
    backend_pid integer NOT NULL,
    session_tag text NOT NULL,
    host text NOT NULL,
    os_pid integer NOT NULL,
    since timestamp with time zone NOT NULL,
    beat_at timestamp with time zone NOT NULL,
    CONSTRAINT hlf_leader_id_check CHECK ((id = 1))
);

CREATE TABLE hlf.hlf_ops_outbox (
    id bigint NOT NULL,
    alert_id uuid NOT NULL,
    channel text NOT NULL,
    data jsonb NOT NULL,
    created_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    next_at timestamp with time zone NOT NULL,
    delivered_at timestamp with time zone,
    gave_up_at timestamp with time zone,
    last_error text,
    CONSTRAINT hlf_ops_outbox_channel_check CHECK ((channel = ANY (ARRAY['fcm'::text, 'webhook'::text, 'email'::text]))),
    CONSTRAINT hlf_ops_outbox_data_check CHECK ((jsonb_typeof(data) = 'object'::text))
);

CREATE TABLE hlf.hlf_schema_migrations (
    version integer NOT NULL,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamp with time zone DEFAULT now() NOT NULL
);

CREATE TABLE hlf.projection_snapshots (
    mentor_id uuid NOT NULL,
    cut_seq bigint NOT NULL,
    projection jsonb NOT NULL,
    duplicates jsonb NOT NULL,
    taken_at timestamp with time zone DEFAULT now() NOT NULL
);

CREATE TABLE hlf.sync_status (
    mentor_id uuid NOT NULL,
    operation text,
    state text NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    last_error text,
    updated_at timestamp with time zone NOT NULL,
    portal_record_id uuid,
    listed boolean,
    change_seq bigint NOT NULL,
    uncovered_xids bigint[] DEFAULT '{}'::bigint[] NOT NULL,
    next_attempt_at timestamp with time zone,
    last_seq bigint NOT NULL,
    CONSTRAINT sync_status_operation_check CHECK ((operation = ANY (ARRAY['remove'::text, 'restore'::text]))),
    CONSTRAINT sync_status_state_check CHECK ((state = ANY (ARRAY['pending'::text, 'retrying'::text, 'in_sync'::text, 'dead_lettered'::text])))
);

CREATE TABLE public.certifications (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    mentor_id uuid NOT NULL,
    expires_on date NOT NULL
);

CREATE TABLE public.coordinator_devices (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    organisation_id uuid NOT NULL,
    fcm_token text NOT NULL
);

CREATE TABLE public.mentors (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    organisation_id uuid NOT NULL,
    full_name text NOT NULL,
    status text DEFAULT 'active'::text NOT NULL,
    portal_record_id uuid,
    CONSTRAINT mentors_status_check CHECK ((status = ANY (ARRAY['active'::text, 'paused'::text, 'expired_cert'::text])))
);

CREATE TABLE public.organisations (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    name text NOT NULL,
    reminder_days integer[] DEFAULT '{30,14,7}'::integer[] NOT NULL,
    alert_topic text
);

CREATE TRIGGER certifications_changed_delete AFTER DELETE ON public.certifications FOR EACH ROW EXECUTE FUNCTION hlf.hlf_certification_changed();

CREATE TRIGGER certifications_changed_insert AFTER INSERT ON public.certifications FOR EACH ROW EXECUTE FUNCTION hlf.hlf_certification_changed();

CREATE TRIGGER certifications_changed_update AFTER UPDATE OF expires_on, mentor_id ON public.certifications FOR EACH ROW WHEN (((old.expires_on IS DISTINCT FROM new.expires_on) OR (old.mentor_id IS DISTINCT FROM new.mentor_id))) EXECUTE FUNCTION hlf.hlf_certification_changed();

CREATE TRIGGER event_log_append_only_delete BEFORE DELETE ON hlf.event_log FOR EACH STATEMENT EXECUTE FUNCTION hlf.hlf_event_log_is_append_only();

CREATE TRIGGER event_log_append_only_truncate BEFORE TRUNCATE ON hlf.event_log FOR EACH STATEMENT EXECUTE FUNCTION hlf.hlf_event_log_is_append_only();

CREATE TRIGGER event_log_append_only_update BEFORE UPDATE ON hlf.event_log FOR EACH STATEMENT EXECUTE FUNCTION hlf.hlf_event_log_is_append_only();

CREATE TRIGGER event_log_archive_append_only BEFORE DELETE OR UPDATE OR TRUNCATE ON hlf.event_log_archive FOR EACH STATEMENT EXECUTE FUNCTION hlf.hlf_event_log_is_append_only();

CREATE TRIGGER event_log_deleted_only_archived AFTER DELETE ON hlf.event_log REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION hlf.hlf_event_log_deleted_only_archived();

CREATE TRIGGER mentors_changed_delete AFTER DELETE ON public.mentors FOR EACH ROW EXECUTE FUNCTION hlf.hlf_mentor_changed();

CREATE TRIGGER mentors_changed_insert AFTER INSERT ON public.mentors FOR EACH ROW EXECUTE FUNCTION hlf.hlf_mentor_changed();

CREATE TRIGGER mentors_changed_update AFTER UPDATE OF status, portal_record_id ON public.mentors FOR EACH ROW WHEN (((old.status IS DISTINCT FROM new.status) OR (old.portal_record_id IS DISTINCT FROM new.portal_record_id))) EXECUTE FUNCTION hlf.hlf_mentor_changed();

CREATE TRIGGER organisations_reminder_days_valid BEFORE INSERT OR UPDATE OF reminder_days ON public.organisations FOR EACH ROW EXECUTE FUNCTION hlf.hlf_check_reminder_days();

REVOKE ALL ON FUNCTION hlf.hlf_append_event(p_mentor uuid, p_kind text, p_data jsonb, p_version smallint) FROM PUBLIC;

REVOKE ALL ON FUNCTION hlf.hlf_authorize(p_caller name, p_action text, p_mentor uuid) FROM PUBLIC;

REVOKE ALL ON FUNCTION hlf.hlf_caller() FROM PUBLIC;

REVOKE ALL ON FUNCTION hlf.hlf_certification_changed() FROM PUBLIC;

REVOKE ALL ON FUNCTION hlf.hlf_check_reminder_days() FROM PUBLIC;

REVOKE ALL ON FUNCTION hlf.hlf_eligible(p_status text, p_certified_until date, p_today date) FROM PUBLIC;

REVOKE ALL ON FUNCTION hlf.hlf_event_log_deleted_only_archived() FROM PUBLIC;

REVOKE ALL ON FUNCTION hlf.hlf_event_log_is_append_only() FROM PUBLIC;

REVOKE ALL ON FUNCTION hlf.hlf_is_eligible(p_mentor uuid, p_today date) FROM PUBLIC;

REVOKE ALL ON FUNCTION hlf.hlf_mentor_changed() FROM PUBLIC;

REVOKE ALL ON FUNCTION hlf.hlf_require(p_action text, p_mentor uuid) FROM PUBLIC;
