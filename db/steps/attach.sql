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
    missing  text;
    old_path text := current_setting('search_path');
BEGIN
    -- pg_get_triggerdef and regprocedure qualify names only when they are not visible: make nothing visible.
    PERFORM set_config('search_path', 'pg_catalog', true);
    FOREACH tbl IN ARRAY ARRAY['organisations', 'mentors', 'certifications', 'coordinator_devices'] LOOP
        CONTINUE WHEN to_regclass(format('hlf.%I', tbl)) IS NULL;
        IF to_regclass(format('%I.%I', app, tbl)) IS NULL THEN
            EXECUTE format('ALTER TABLE hlf.%I SET SCHEMA %I', tbl, app);
        ELSE
            -- A migration that added a column to an app table added it to the copy in hlf: the app's own table
            -- lacks it, and the service would fail at its first use. Say so now, and change nothing.
            missing := (
                SELECT string_agg(format('%I.%I.%I', app, tbl, a.attname), ', ' ORDER BY a.attnum)
                FROM pg_attribute a
                WHERE a.attrelid = format('hlf.%I', tbl)::regclass AND a.attnum > 0 AND NOT a.attisdropped
                  AND NOT EXISTS (SELECT 1 FROM pg_attribute b
                                  WHERE b.attrelid = format('%I.%I', app, tbl)::regclass AND b.attname = a.attname
                                    AND NOT b.attisdropped));
            IF missing IS NOT NULL THEN
                RAISE EXCEPTION 'the app''s table lacks column(s) the service''s migrations define: %', missing
                    USING HINT = 'add them to the app''s table, or keep service state in schema hlf';
            END IF;
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
