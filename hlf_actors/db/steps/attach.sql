-- After the migrations: put the app's tables and the functions the app may call in the app's schema.
--
-- Migrations are written with unqualified names and run with search_path = hlf, <app schema>, so whatever they
-- create lands in hlf, including migration 001's four app tables on a first install. Here:
--   greenfield (the app schema lacks the table):  the new table moves to the app schema, triggers and all;
--   brownfield (the app already has it):          its triggers are re-created on the app's table (same names,
--                                                 same functions), and the empty copy in hlf is dropped.
-- The app-callable functions (re)defined by a migration move to the app schema, replacing the old definition.
DO $attach$
DECLARE
    app      text := current_setting('hlf.app_schema');
    tbl      text;
    trig     record;
    fn       record;
    old_path text := current_setting('search_path');
BEGIN
    -- pg_get_triggerdef and regprocedure qualify names only when they are not visible: make nothing visible.
    PERFORM set_config('search_path', 'pg_catalog', true);
    FOREACH tbl IN ARRAY ARRAY['organisations', 'mentors', 'certifications', 'coordinator_devices'] LOOP
        CONTINUE WHEN to_regclass(format('hlf.%I', tbl)) IS NULL;
        IF to_regclass(format('%I.%I', app, tbl)) IS NULL THEN
            EXECUTE format('ALTER TABLE hlf.%I SET SCHEMA %I', tbl, app);
        ELSE
            FOR trig IN
                SELECT pg_get_triggerdef(t.oid) AS def FROM pg_trigger t
                WHERE t.tgrelid = format('hlf.%I', tbl)::regclass AND NOT t.tgisinternal ORDER BY t.tgname
            LOOP
                EXECUTE replace(trig.def, format(' ON hlf.%I ', tbl), format(' ON %I.%I ', app, tbl));
            END LOOP;
        END IF;
    END LOOP;
    DROP TABLE IF EXISTS hlf.coordinator_devices, hlf.certifications, hlf.mentors, hlf.organisations;

    FOR fn IN
        SELECT p.oid::regprocedure AS sig, p.proname, pg_get_function_identity_arguments(p.oid) AS args
        FROM pg_proc p
        WHERE p.pronamespace = 'hlf'::regnamespace
          AND p.proname = ANY (string_to_array(current_setting('hlf.app_callable'), ','))
    LOOP
        EXECUTE format('DROP FUNCTION IF EXISTS %I.%I(%s)', app, fn.proname, fn.args);
        EXECUTE format('ALTER FUNCTION %s SET SCHEMA %I', fn.sig, app);
    END LOOP;
    PERFORM set_config('search_path', old_path, true);
END;
$attach$;
