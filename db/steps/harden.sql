-- After every migrate: the locks on the service's objects, re-applied so that no migration has to remember them
-- (a CREATE OR REPLACE FUNCTION resets SECURITY DEFINER and SET search_path to the defaults).
--
--   * Trigger functions and the app-callable functions run as their owner, the service's role, with a fixed
--     search_path: an app role that may update mentors needs no grant on hlf, and cannot forge an event either.
--   * Nothing in hlf is granted to anyone but its owner; RLS is enabled with no policy as a second lock, in case a
--     "default privileges" setting or a careless GRANT ever reaches it. The owner is not subject to RLS.
DO $harden$
DECLARE
    app      text := current_setting('hlf.app_schema');
    path     text := format('hlf, %I, pg_temp', current_setting('hlf.app_schema'));
    obj      record;
    grantee  text;
    old_path text := current_setting('search_path');
BEGIN
    PERFORM set_config('search_path', 'pg_catalog', true);
    FOR obj IN
        SELECT p.oid::regprocedure AS sig FROM pg_proc p
        WHERE (p.pronamespace = 'hlf'::regnamespace AND p.prorettype = 'trigger'::regtype)
           OR (p.pronamespace = app::regnamespace
               AND p.proname = ANY (string_to_array(current_setting('hlf.app_callable'), ',')))
    LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = %s', obj.sig, path);
    END LOOP;

    EXECUTE 'REVOKE ALL ON SCHEMA hlf FROM PUBLIC';
    FOR grantee IN
        SELECT DISTINCT a.grantee::regrole::text FROM pg_namespace n, aclexplode(n.nspacl) a
        WHERE n.nspname = 'hlf' AND a.grantee <> 0 AND a.grantee <> n.nspowner
    LOOP
        EXECUTE format('REVOKE ALL ON SCHEMA hlf FROM %s', grantee);
    END LOOP;

    FOR obj IN
        SELECT c.oid::regclass AS rel, c.relkind, c.relowner, c.relacl FROM pg_class c
        WHERE c.relnamespace = 'hlf'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
    LOOP
        IF obj.relkind IN ('r', 'p') THEN
            EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', obj.rel);
        END IF;
        EXECUTE format('REVOKE ALL ON %s FROM PUBLIC', obj.rel);
        FOR grantee IN
            SELECT DISTINCT a.grantee::regrole::text FROM aclexplode(obj.relacl) a
            WHERE a.grantee <> 0 AND a.grantee <> obj.relowner
        LOOP
            EXECUTE format('REVOKE ALL ON %s FROM %s', obj.rel, grantee);
        END LOOP;
    END LOOP;

    FOR obj IN
        SELECT p.oid::regprocedure AS sig, p.proowner, p.proacl FROM pg_proc p
        WHERE p.pronamespace = 'hlf'::regnamespace
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', obj.sig);
        FOR grantee IN
            SELECT DISTINCT a.grantee::regrole::text FROM aclexplode(obj.proacl) a
            WHERE a.grantee <> 0 AND a.grantee <> obj.proowner
        LOOP
            EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %s', obj.sig, grantee);
        END LOOP;
    END LOOP;
    PERFORM set_config('search_path', old_path, true);
END;
$harden$;
