-- The nightly certification-expiry check (hlf_actors/expiry.py): reminder thresholds as validated data, the record
-- of what each reminder row became, the record of which nights ran, and the set-based auto-transition.

-- organisations.reminder_days: a non-empty list of distinct positive day counts, e.g. {30,14,7} or {60,10}.
-- A trigger rather than a CHECK so that the app gets one clear sentence instead of a constraint name.
CREATE FUNCTION hlf_check_reminder_days() RETURNS trigger LANGUAGE plpgsql AS $$
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
CREATE TRIGGER organisations_reminder_days_valid BEFORE INSERT OR UPDATE OF reminder_days ON organisations
    FOR EACH ROW EXECUTE FUNCTION hlf_check_reminder_days();

-- What became of each reminder row. `superseded`: a larger threshold crossed on the same night as a smaller one
-- (a missed night) is marked done without a push, so the mentor gets one reminder, the most urgent. `pushed_at`:
-- the push was attempted (its outcome is in the reminder_sent event); a row claimed but never pushed (the process
-- died in between) is pushed by the next run of the check, so a crash loses no reminder.
ALTER TABLE cert_expiry_reminders
    ADD COLUMN superseded boolean NOT NULL DEFAULT false,
    ADD COLUMN pushed_at timestamptz NULL;
UPDATE cert_expiry_reminders SET pushed_at = sent_at;  -- rows from before this migration were sent already
CREATE INDEX cert_expiry_reminders_unpushed_idx ON cert_expiry_reminders (mentor_id)
    WHERE pushed_at IS NULL AND NOT superseded;

-- Which scheduled runs happened: one row per (job, run_key), e.g. ('cert_expiry', '2025-03-11'), the local date
-- of the night. A process that was down at the scheduled time finds its row missing (or not 'ok') and runs it.
CREATE TABLE hlf_job_runs (
    job         text NOT NULL,
    run_key     text NOT NULL,
    owner       text NOT NULL,                  -- who ran it: "scheduler host:pid" or "check-expiry host:pid"
    started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz NULL,               -- NULL: running, or the runner died (its advisory lock is gone)
    outcome     text NULL CHECK (outcome IN ('ok', 'failed')),
    attempts    int NOT NULL DEFAULT 1,
    detail      jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(detail) = 'object'),
    PRIMARY KEY (job, run_key)
);

-- Move every active mentor without a certification valid on p_today to expired_cert, and say why in the log.
-- Set-based: one UPDATE. It fires the mentors trigger, which appends status_changed and wakes the service, so the
-- mentor is removed from the portal at once. Only mentors still 'active' change (paused ones stay paused), so a
-- second call finds nothing to do. Returns how many mentors changed.
CREATE FUNCTION hlf_expire_certifications(p_today date) RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    changed int;
BEGIN
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
