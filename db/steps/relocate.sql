-- Before the first migrate of this release on a database of the old layout, where every service object sat in the
-- app's schema: move them into hlf, then let the pending migrations run on top. ALTER ... SET SCHEMA keeps every
-- row, index, constraint, trigger and owned sequence (event_log's identity), so no event is lost and seq goes on.
-- It runs before the pending migrations, not as one of them: a later migration's CREATE OR REPLACE of a function
-- would otherwise make a second copy in hlf beside the old one that the triggers still call.
--
-- The tables are those of migrations 001-006 (the last release of the old layout); functions are every hlf_*
-- function, except those the app may call, which stay where the app calls them.
DO $relocate$
DECLARE
    app  text := current_setting('hlf.app_schema');
    name text;
    fn   regprocedure;
BEGIN
    FOREACH name IN ARRAY ARRAY[
        'hlf_schema_migrations', 'event_log', 'hlf_inbox', 'sync_status', 'dead_letters', 'cert_expiry_reminders',
        'hlf_job_runs', 'duplicate_findings', 'event_log_archive', 'projection_snapshots'] LOOP
        IF to_regclass(format('%I.%I', app, name)) IS NOT NULL THEN
            EXECUTE format('ALTER TABLE %I.%I SET SCHEMA hlf', app, name);
        END IF;
    END LOOP;
    FOR fn IN
        SELECT p.oid::regprocedure FROM pg_proc p
        WHERE p.pronamespace = app::regnamespace AND p.proname LIKE 'hlf\_%'
          AND p.proname <> ALL (string_to_array(current_setting('hlf.app_callable'), ','))
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET SCHEMA hlf', fn);
    END LOOP;
END;
$relocate$;
