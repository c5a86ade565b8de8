"""Attaching to the mentor database that already exists (issue 22).

The databases here are built by the tests themselves, not cloned from the migrated template, and carry no
database-wide search_path: the service must find schema hlf on its own, as it does in production.

- A "Supabase-shaped" database: roles anon / authenticated / service_role, ``auth.uid()`` reading the request's JWT
  claims, the app's tables populated with RLS on and the app's policies, default privileges granting everything new
  to anon and authenticated. On it, migrate and the service run as ``hlf_service``, a non-superuser created with the
  SQL of docs/operations.md; the authorisation hook is the Supabase one from the same page.
  The same through a session pooler (PgBouncer in session mode), and a greenfield install in another app schema.
- Brownfield tables that differ from the contract: migrate names every problem, exits 2, changes nothing.
- An upgrade from the old layout (everything in public, migrations 001-006 applied as the last release did).
- Migrations from scratch equal the declared schema (db/schema.sql), and brownfield plus triggers equals
  greenfield for the service's objects.

Roles are cluster-wide and other test runs share the server, so they are created idempotently and never dropped.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from psycopg import errors
from psycopg.conninfo import make_conninfo

from hlf_actors import cli, db
from hlf_actors.replay import replay
from hlf_actors.testing.fake_portal import FakePortal
from hlf_actors.testing.harness import eventually, running_service
from hlf_actors.testing.pgbouncer import PgBouncer
from hlf_actors.testing.schema_dump import dump_schema
from tests.conftest import SERVER

ROOT = Path(__file__).resolve().parents[2]
SERVICE_ROLE = "hlf_service"


def _url(dbname: str, user: str | None = None) -> str:
    params = {k: v for k, v in SERVER.items() if k in ("host", "port", "user", "password") and v is not None}
    if user is not None:
        params["user"] = user
        params.pop("password", None)  # the test server trusts local connections
    return make_conninfo("", **params, dbname=dbname)


def _docs_sql(title: str) -> str:
    """The ```sql block of docs/operations.md whose first line is ``-- hlf: <title>``: the docs are what we run."""
    text = (ROOT / "docs" / "operations.md").read_text()
    for block in re.findall(r"```sql\n(.*?)```", text, flags=re.S):
        if block.startswith(f"-- hlf: {title}\n"):
            return str(block)
    raise AssertionError(f"docs/operations.md has no sql block starting with '-- hlf: {title}'")


def _ensure_roles() -> None:
    """anon, authenticated, service_role (as Supabase has them) and the service's role, created once per cluster."""
    with psycopg.connect(_url(str(SERVER.get("dbname", "postgres"))), autocommit=True) as admin:
        for name, attributes in (
            ("anon", "NOLOGIN NOINHERIT"),
            ("authenticated", "NOLOGIN NOINHERIT"),
            ("service_role", "NOLOGIN NOINHERIT BYPASSRLS"),
            # The attributes of docs/operations.md's CREATE ROLE (the test server trusts local logins: no password).
            (SERVICE_ROLE, "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE BYPASSRLS"),
        ):
            try:
                admin.execute(f"CREATE ROLE {name} {attributes}")
            except (errors.DuplicateObject, errors.UniqueViolation):
                pass  # made by an earlier run, or by another engineer's run at this very moment
        row = admin.execute(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolbypassrls FROM pg_roles WHERE rolname = %s",
            (SERVICE_ROLE,),
        ).fetchone()
        assert row == (False, False, False, True), f"{SERVICE_ROLE} has unexpected attributes {row}"


@pytest.fixture
def empty_db() -> Iterator[str]:
    """A new, empty database (no template, no migrations); its name."""
    name = f"hlf_attach_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin_url = _url(str(SERVER.get("dbname", "postgres")))
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_APP_TABLES = """
CREATE TABLE organisations (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(), name text NOT NULL,
    reminder_days int[] NOT NULL DEFAULT '{30,14,7}', alert_topic text NULL, created_at timestamptz DEFAULT now());
CREATE TABLE mentors (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(), organisation_id uuid NOT NULL REFERENCES organisations (id),
    full_name text NOT NULL, status text NOT NULL DEFAULT 'active', portal_record_id uuid NULL, bio text NULL);
CREATE TABLE certifications (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(), mentor_id uuid NOT NULL REFERENCES mentors (id) ON DELETE CASCADE,
    expires_on date NOT NULL);
CREATE TABLE coordinator_devices (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, organisation_id uuid NOT NULL REFERENCES organisations (id),
    fcm_token text NOT NULL);
"""

# What a Supabase project has around the app's tables.
_SUPABASE = """
CREATE SCHEMA auth;
CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
    SELECT nullif(current_setting('request.jwt.claims', true)::jsonb ->> 'sub', '')::uuid
$$;
GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role;
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
-- and, to be sure migrate's locks hold against it, the same for whatever the service's role creates anywhere
ALTER DEFAULT PRIVILEGES FOR ROLE hlf_service GRANT ALL ON TABLES TO anon, authenticated;
ALTER DEFAULT PRIVILEGES FOR ROLE hlf_service GRANT ALL ON FUNCTIONS TO anon, authenticated;
ALTER DEFAULT PRIVILEGES FOR ROLE hlf_service GRANT ALL ON SEQUENCES TO anon, authenticated;
ALTER DEFAULT PRIVILEGES FOR ROLE hlf_service GRANT ALL ON SCHEMAS TO anon, authenticated;
"""
_SUPABASE_POLICIES = """
-- The app's own mapping of users to the organisations they coordinate.
CREATE TABLE coordinators (user_id uuid PRIMARY KEY, organisation_id uuid NOT NULL REFERENCES organisations (id));
ALTER TABLE organisations ENABLE ROW LEVEL SECURITY;
ALTER TABLE mentors ENABLE ROW LEVEL SECURITY;
ALTER TABLE certifications ENABLE ROW LEVEL SECURITY;
ALTER TABLE coordinator_devices ENABLE ROW LEVEL SECURITY;
ALTER TABLE coordinators ENABLE ROW LEVEL SECURITY;
CREATE POLICY own ON coordinators FOR SELECT TO authenticated USING (user_id = auth.uid());
CREATE POLICY own_org ON organisations FOR SELECT TO authenticated
    USING (id IN (SELECT organisation_id FROM coordinators WHERE user_id = auth.uid()));
CREATE POLICY org_mentors ON mentors FOR ALL TO authenticated
    USING (organisation_id IN (SELECT organisation_id FROM coordinators WHERE user_id = auth.uid()))
    WITH CHECK (organisation_id IN (SELECT organisation_id FROM coordinators WHERE user_id = auth.uid()));
CREATE POLICY org_certifications ON certifications FOR ALL TO authenticated
    USING (mentor_id IN (SELECT m.id FROM mentors m))
    WITH CHECK (mentor_id IN (SELECT m.id FROM mentors m));
CREATE POLICY own_devices ON coordinator_devices FOR ALL TO authenticated
    USING (organisation_id IN (SELECT organisation_id FROM coordinators WHERE user_id = auth.uid()));
"""


class Supabase:
    """The populated Supabase-shaped database: two organisations, each with a coordinator and mentors."""

    def __init__(self, dbname: str, portal: FakePortal) -> None:
        self.dbname = dbname
        self.admin_url = _url(dbname)
        self.service_url = _url(dbname, SERVICE_ROLE)
        self.org_a, self.org_b = uuid4(), uuid4()
        self.user_a, self.user_b = uuid4(), uuid4()
        self.a1, self.a2, self.a_dead, self.b1 = uuid4(), uuid4(), uuid4(), uuid4()
        self.records = {m: uuid4() for m in (self.a1, self.a2, self.a_dead, self.b1)}
        for mentor, record in self.records.items():
            if mentor != self.a_dead:  # its portal record is gone: the portal answers 404, a dead letter
                portal.add_record(record, listed=True)
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(_SUPABASE)
            conn.execute(_APP_TABLES)
            conn.execute(_SUPABASE_POLICIES)
            conn.execute("INSERT INTO organisations (id, name) VALUES (%s, 'A'), (%s, 'B')", (self.org_a, self.org_b))
            conn.execute(
                "INSERT INTO coordinators VALUES (%s, %s), (%s, %s)",
                (self.user_a, self.org_a, self.user_b, self.org_b),
            )
            for mentor, org, name in (
                (self.a1, self.org_a, "Anna"),
                (self.a2, self.org_a, "Arne"),
                (self.a_dead, self.org_a, "Astrid"),
                (self.b1, self.org_b, "Bjørn"),
            ):
                conn.execute(
                    "INSERT INTO mentors (id, organisation_id, full_name, portal_record_id) VALUES (%s, %s, %s, %s)",
                    (mentor, org, name, self.records[mentor]),
                )
                conn.execute(
                    "INSERT INTO certifications (mentor_id, expires_on) VALUES (%s, current_date + 300)", (mentor,)
                )
            conn.execute(
                "INSERT INTO coordinator_devices (organisation_id, fcm_token) VALUES (%s, 'tok-a'), (%s, 'tok-b')",
                (self.org_a, self.org_b),
            )

    def grant(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(_docs_sql("service grants"))
            conn.execute(_docs_sql("Supabase grants for the hook (as postgres)"))

    def app_rows(self) -> dict[str, list[Any]]:
        with psycopg.connect(self.admin_url) as conn:
            return {
                t: [r[0] for r in conn.execute(f"SELECT to_jsonb(t) FROM public.{t} t ORDER BY 1::text")]  # noqa: S608
                for t in ("organisations", "mentors", "certifications", "coordinator_devices", "coordinators")
            }


def _as(conn: psycopg.Connection[Any], role: str, user: UUID | None = None) -> None:
    """Make ``conn`` act as a Data API request would: SET ROLE and the JWT claims PostgREST sets."""
    conn.execute("SELECT set_config('role', %s, false)", (role,))
    claims = f'{{"sub": "{user}", "role": "{role}"}}' if user else f'{{"role": "{role}"}}'
    conn.execute("SELECT set_config('request.jwt.claims', %s, false)", (claims,))


def _migrate(monkeypatch: pytest.MonkeyPatch, url: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    monkeypatch.setenv("HLF_DATABASE_URL", url)
    monkeypatch.chdir(ROOT / "tests")  # no .env there
    code = cli.main(["migrate"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture
def supabase(empty_db: str, portal: FakePortal) -> Supabase:
    _ensure_roles()
    return Supabase(empty_db, portal)


def test_migrate_names_every_missing_privilege_and_changes_nothing(
    supabase: Supabase, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, output = _migrate(monkeypatch, supabase.service_url, capsys)
    assert code == 2, output
    for needed in (
        "CREATE on the database",
        "CREATE on schema public",
        "TRIGGER on public.mentors",
        "TRIGGER on public.certifications",
        "TRIGGER on public.organisations",
        "UPDATE on public.mentors",
        "UPDATE on public.certifications",
        "SELECT on public.coordinator_devices",
    ):
        assert needed in output, f"{needed!r} not named in:\n{output}"
    assert "nothing was changed" in output
    with psycopg.connect(supabase.admin_url) as conn:
        assert conn.execute("SELECT to_regnamespace('hlf')").fetchone() == (None,)


def test_supabase_migrate_keeps_rows_and_locks_hlf(
    supabase: Supabase, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = supabase.app_rows()
    supabase.grant()
    code, output = _migrate(monkeypatch, supabase.service_url, capsys)
    assert code == 0, output
    assert supabase.app_rows() == before
    code, output = _migrate(monkeypatch, supabase.service_url, capsys)
    assert (code, output.strip()) == (0, "database is up to date")

    with psycopg.connect(supabase.admin_url, autocommit=True) as conn:
        relations = [
            str(r[0])
            for r in conn.execute(
                "SELECT c.oid::regclass::text FROM pg_class c WHERE c.relnamespace = 'hlf'::regnamespace"
                " AND c.relkind IN ('r', 'p', 'S')"
            )
        ]
        assert "hlf.event_log" in relations and "hlf.sync_status" in relations
        # Nothing of the service's is left in public but the functions the app may call.
        leftovers = conn.execute(
            "SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'"
            " AND c.relname <> ALL(%s)",
            ([*db.APP_TABLES, "coordinators"],),
        ).fetchall()
        assert leftovers == []
        # RLS on, no policies, no grant to anyone but the owner, however the default privileges are set.
        assert conn.execute(
            "SELECT count(*) FROM pg_class WHERE relnamespace = 'hlf'::regnamespace AND relkind = 'r'"
            " AND NOT relrowsecurity"
        ).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM pg_policies WHERE schemaname = 'hlf'").fetchone() == (0,)
        for role in ("anon", "authenticated", "service_role"):
            assert conn.execute("SELECT has_schema_privilege(%s, 'hlf', 'USAGE')", (role,)).fetchone() == (False,)
            for rel in relations:
                for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE"):
                    kind = "sequence" if rel.endswith("_seq") else "table"
                    if kind == "sequence" and privilege != "SELECT":
                        continue
                    check = f"SELECT has_{kind}_privilege(%s, %s, %s)"
                    assert conn.execute(check, (role, rel, privilege)).fetchone() == (False,), (role, rel, privilege)

        # And for real: as anon and as authenticated, every table in hlf refuses reads and writes.
        for role in ("anon", "authenticated"):
            _as(conn, role, supabase.user_a)
            for rel in relations:
                if rel.endswith("_seq"):
                    continue
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute(f"SELECT * FROM {rel} LIMIT 1")  # noqa: S608 — names from the catalog
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute("INSERT INTO hlf.event_log (kind) VALUES ('status_changed')")
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute("SELECT hlf.hlf_append_event(%s, 'sync_requested', '{}')", (supabase.a1,))
            conn.execute("RESET role")

        # The triggers and the app-callable functions: SECURITY DEFINER, owned by the service's role, fixed path.
        rows = conn.execute(
            "SELECT p.oid::regprocedure::text, p.prosecdef, p.proowner::regrole::text, p.proconfig FROM pg_proc p"
            " WHERE p.proname = ANY(%s) OR p.oid IN (SELECT tgfoid FROM pg_trigger t"
            "   WHERE NOT t.tgisinternal"
            "   AND t.tgrelid = ANY(ARRAY['public.mentors', 'public.certifications', 'public.organisations']"
            "   ::regclass[]))",
            (list(db.APP_CALLABLE),),
        ).fetchall()
        # hlf_mentor_changed, hlf_certification_changed, hlf_check_reminder_days
        assert len(rows) == len(db.APP_CALLABLE) + 3
        for name, definer, owner, config in rows:
            assert definer and owner == SERVICE_ROLE, name
            assert config == ["search_path=hlf, public, pg_temp"], name


@pytest.mark.anyio
async def test_supabase_app_acts_and_reads_through_the_hook(
    supabase: Supabase, portal: FakePortal, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    supabase.grant()
    code, output = _migrate(monkeypatch, supabase.service_url, capsys)
    assert code == 0, output
    with psycopg.connect(supabase.service_url, autocommit=True) as owner:
        owner.execute(_docs_sql("authorisation hook (Supabase)"))

    async with running_service(supabase.service_url, portal) as service:
        assert service.state.leader
        with psycopg.connect(supabase.admin_url, autocommit=True) as app:
            who = app.execute("SELECT session_user, current_setting('search_path')").fetchone()
            assert who == ("postgres", '"$user", public')  # the app's connections do not see hlf

            # A coordinator of A pauses A's mentor under the app's own RLS: the trigger fires, the portal hears.
            _as(app, "authenticated", supabase.user_a)
            assert app.execute("UPDATE mentors SET status = 'paused' WHERE id = %s", (supabase.a1,)).rowcount == 1
            assert app.execute("UPDATE mentors SET status = 'paused' WHERE id = %s", (supabase.b1,)).rowcount == 0
            await eventually(lambda: portal.listed(supabase.records[supabase.a1]) is False, what="A1 removed")
            assert portal.listed(supabase.records[supabase.b1]) is True

            # Force sync: A's mentor yes, B's mentor refused with a clear error.
            seq = app.execute("SELECT hlf_force_sync(%s)", (supabase.a2,)).fetchone()
            assert seq is not None and seq[0] > 0
            await eventually(lambda: portal.patches(supabase.records[supabase.a2]), what="A2's forced PATCH")
            with pytest.raises(errors.InsufficientPrivilege, match="authenticated may not force sync for mentor"):
                app.execute("SELECT hlf_force_sync(%s)", (supabase.b1,))
            assert not portal.patches(supabase.records[supabase.b1])

            # A forced sync of a mentor whose portal record is gone ends dead-lettered; A sees it and re-queues.
            app.execute("SELECT hlf_force_sync(%s)", (supabase.a_dead,))

            def a_rows() -> dict[UUID, tuple[Any, ...]]:
                rows = app.execute(
                    "SELECT mentor_id, state, dead_lettered, dead_letter_id, last_synced_at, last_error"
                    " FROM hlf_mentor_sync_state()"
                ).fetchall()
                return {r[0]: r[1:] for r in rows}

            seen = await eventually(lambda: (r := a_rows()) and r[supabase.a_dead][1] and r, what="A's dead letter")
            assert set(seen) == {supabase.a1, supabase.a2, supabase.a_dead}  # A's mentors only
            assert seen[supabase.a1][0] == "in_sync" and seen[supabase.a1][3] is not None
            state, dead, letter, _, error = seen[supabase.a_dead]
            assert (state, dead) == ("dead_lettered", True) and letter is not None and error

            _as(app, "authenticated", supabase.user_b)
            assert {r[0] for r in app.execute("SELECT mentor_id FROM hlf_mentor_sync_state()")} == {supabase.b1}
            with pytest.raises(errors.InsufficientPrivilege, match="may not requeue"):
                app.execute("SELECT hlf_requeue_dead_letter(%s)", (letter,))
            _as(app, "anon")
            assert app.execute("SELECT count(*) FROM hlf_mentor_sync_state()").fetchone() == (0,)
            with pytest.raises(errors.InsufficientPrivilege):
                app.execute("SELECT hlf_force_sync(%s)", (supabase.a1,))

            _as(app, "authenticated", supabase.user_a)
            requeued = app.execute("SELECT hlf_requeue_dead_letter(%s)", (letter,)).fetchone()
            assert requeued is not None and requeued[0] > seq[0]
            app.execute("RESET role")
            await eventually(
                lambda: (
                    app.execute(
                        "SELECT count(*) FROM hlf.event_log WHERE mentor_id = %s AND kind = 'requeued'",
                        (supabase.a_dead,),
                    ).fetchone()
                    == (1,)
                ),
                what="the requeued event",
            )

    # The service's other commands run as the same role too.
    monkeypatch.setenv("HLF_DATABASE_URL", supabase.service_url)
    monkeypatch.chdir(ROOT / "tests")
    assert cli.main(["replay", "--verify"]) == 0, capsys.readouterr()
    assert cli.main(["status"]) in (0, 1), capsys.readouterr()


@pytest.mark.anyio
async def test_the_service_works_through_a_session_pooler_as_its_own_role(
    supabase: Supabase,
    portal: FakePortal,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Supabase's session pooler, played by PgBouncer in session mode: each client keeps one server connection, so
    the service's own SET search_path holds (the database and the role have no default here) and LISTEN works."""
    supabase.grant()
    code, output = _migrate(monkeypatch, supabase.service_url, capsys)
    assert code == 0, output
    with PgBouncer(supabase.service_url, tmp_path / "pgbouncer", pool_mode="session") as bouncer:
        async with running_service(bouncer.url, portal) as service:
            await eventually(lambda: service.state.listening, what="the listener")
            assert not service.state.polling
            with psycopg.connect(supabase.admin_url, autocommit=True) as app:
                _as(app, "authenticated", supabase.user_b)
                assert app.execute("UPDATE mentors SET status = 'paused' WHERE id = %s", (supabase.b1,)).rowcount == 1
            await eventually(lambda: portal.listed(supabase.records[supabase.b1]) is False, what="B1 removed")


def test_brownfield_that_differs_is_refused_whole(
    empty_db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _url(empty_db)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            _APP_TABLES.replace("portal_record_id uuid NULL, ", "")
            .replace("expires_on date NOT NULL", "expires_on text NOT NULL")
            .replace("fcm_token text NOT NULL", "token text NOT NULL")
        )
        org = conn.execute("INSERT INTO organisations (name) VALUES ('A') RETURNING id").fetchone()
        assert org is not None
        conn.execute(
            "INSERT INTO mentors (organisation_id, full_name, status) VALUES (%s, 'X', 'retired'), (%s, 'Y', 'active')",
            (org[0], org[0]),
        )
        before = conn.execute(
            "SELECT string_agg(pg_get_triggerdef(oid), ';') FROM pg_trigger WHERE NOT tgisinternal"
        ).fetchone()
    code, output = _migrate(monkeypatch, url, capsys)
    assert code == 2, output
    for problem in (
        "public.mentors.portal_record_id is missing",
        "public.certifications.expires_on is text, expected date",
        "public.coordinator_devices.fcm_token is missing",
        "public.mentors.status holds 'retired' in 1 row(s)",
    ):
        assert problem in output, f"{problem!r} not in:\n{output}"
    assert len(output.strip().splitlines()) == 5  # one heading line, then one line per problem
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT to_regnamespace('hlf')").fetchone() == (None,)
        after = conn.execute(
            "SELECT string_agg(pg_get_triggerdef(oid), ';') FROM pg_trigger WHERE NOT tgisinternal"
        ).fetchone()
        assert after == before == (None,)
        assert conn.execute("SELECT count(*) FROM mentors").fetchone() == (2,)


# -- the old layout: migrations 001-006 applied as the last release applied them, everything in public --------


def _legacy_install(url: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(
            "CREATE TABLE hlf_schema_migrations (version int PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in db.migrations():
            if migration.version > 6:
                break
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO hlf_schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )


_SERVICE_TABLES = (
    "event_log",
    "hlf_inbox",
    "sync_status",
    "dead_letters",
    "cert_expiry_reminders",
    "duplicate_findings",
    "hlf_job_runs",
    "projection_snapshots",
    "event_log_archive",
    "hlf_schema_migrations",
)


# Columns later migrations added to a service table of the old layout: compared only where the old one had them.
_ADDED_SINCE_006 = ("resolved_at", "resolved_seq")


def _service_rows(conn: psycopg.Connection[Any], schema: str) -> dict[str, list[Any]]:
    drop = "".join(f" - '{c}'" for c in _ADDED_SINCE_006)
    return {
        t: [
            r[0]
            for r in conn.execute(f"SELECT (to_jsonb(t){drop})::text FROM {schema}.{t} t ORDER BY 1")  # noqa: S608
        ]
        for t in _SERVICE_TABLES
    }


def test_upgrade_from_the_public_layout_keeps_every_event(
    empty_db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _url(empty_db)
    _legacy_install(url)
    with psycopg.connect(url, autocommit=True) as conn:
        org = conn.execute("INSERT INTO organisations (name) VALUES ('A') RETURNING id").fetchone()
        assert org is not None
        mentors = [uuid4() for _ in range(4)]
        for i, mentor in enumerate(mentors):
            conn.execute(
                "INSERT INTO mentors (id, organisation_id, full_name, portal_record_id) VALUES (%s, %s, %s, %s)",
                (mentor, org[0], f"M{i}", uuid4()),
            )
            conn.execute("INSERT INTO certifications (mentor_id, expires_on) VALUES (%s, current_date + 10)", (mentor,))
        conn.execute("UPDATE mentors SET status = 'paused' WHERE id = %s", (mentors[1],))
        conn.execute("SELECT hlf_force_sync(%s)", (mentors[0],))
        # What the last release's actors wrote: a success for one mentor, a dead letter for another.
        last = conn.execute("SELECT max(seq) FROM event_log").fetchone()
        assert last is not None
        conn.execute(
            "SELECT hlf_append_event(%s, 'attempt_succeeded', %s::jsonb)",
            (mentors[0], f'{{"operation": "restore", "attempt": 1, "http_status": 204, "for_seq": {last[0]}}}'),
        )
        change = conn.execute(
            "SELECT max(seq) FROM event_log WHERE mentor_id = %s AND kind = 'status_changed'", (mentors[1],)
        ).fetchone()
        assert change is not None
        conn.execute(
            "SELECT hlf_append_event(%s, 'attempt_failed', %s::jsonb)",
            (
                mentors[1],
                '{"operation": "remove", "attempt": 1, "http_status": 404, "retryable": false, "delay_ms": null,'
                f' "error": "404 Not Found", "for_seq": {change[0]}}}',
            ),
        )
        conn.execute(
            "SELECT hlf_append_event(%s, 'dead_lettered', %s::jsonb)",
            (
                mentors[1],
                f'{{"operation": "remove", "attempts": 1, "last_error": "404 Not Found", "for_seq": {change[0]}}}',
            ),
        )
        conn.execute(
            "INSERT INTO cert_expiry_reminders (mentor_id, threshold_day, certification_expiry_date)"
            " VALUES (%s, 14, current_date + 10)",
            (mentors[2],),
        )
        # The last release's projector drained the inbox as it folded; the newest event still waits in it.
        conn.execute("DELETE FROM hlf_inbox")
        conn.execute("SELECT hlf_force_sync(%s)", (mentors[3],))
    # The projections that projector built: replay folds exactly as it did, into the columns it had (008 added
    # dead_letters.resolved_at/resolved_seq, which today's fold writes: lent for the replay, then taken away).
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER TABLE dead_letters ADD COLUMN resolved_at timestamptz, ADD COLUMN resolved_seq bigint")
    replay(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER TABLE dead_letters DROP COLUMN resolved_at, DROP COLUMN resolved_seq")
    with psycopg.connect(url) as conn:
        before = _service_rows(conn, "public")
        assert before["dead_letters"] and before["sync_status"] and len(before["event_log"]) >= 12
        next_seq = conn.execute("SELECT max(seq) FROM event_log").fetchone()

    code, output = _migrate(monkeypatch, url, capsys)
    assert code == 0, output
    assert "applied 010_own_schema" in output

    with psycopg.connect(url, autocommit=True) as conn:
        after = _service_rows(conn, "hlf")
        migrations_added = set(after.pop("hlf_schema_migrations")) - set(before.pop("hlf_schema_migrations"))
        assert after == before
        assert {m.split('"version": ')[1].split(",")[0] for m in migrations_added} == {
            str(m.version) for m in db.migrations() if m.version > 6
        }
        for table in _SERVICE_TABLES:
            assert conn.execute("SELECT to_regclass(%s)", (f"public.{table}",)).fetchone() == (None,)
        # The log goes on from where it was, through the app's own (unchanged) path.
        conn.execute("UPDATE mentors SET status = 'active' WHERE id = %s", (mentors[1],))
        new = conn.execute("SELECT min(seq) FROM hlf.event_log WHERE seq > %s", (next_seq[0] if next_seq else 0,))
        assert new.fetchone() == ((next_seq[0] if next_seq else 0) + 1,)
        assert conn.execute("SELECT hlf_force_sync(%s)", (mentors[3],)).fetchone() is not None

    monkeypatch.setenv("HLF_DATABASE_URL", url)
    assert cli.main(["replay", "--verify"]) == 0, capsys.readouterr()


# -- migrations versus the declared schema ------------------------------------------------------------------


def test_migrations_from_scratch_equal_the_declared_schema(empty_db: str) -> None:
    url = _url(empty_db)
    with psycopg.connect(url) as conn:
        db.migrate(conn)
    declared = (ROOT / "db" / "schema.sql").read_text()
    actual = dump_schema(url)
    assert actual == declared, (
        "the migrations no longer give db/schema.sql; if the change is meant, regenerate it with "
        "`.venv/bin/python -m hlf_actors.testing.schema_dump > db/schema.sql` and review the diff"
    )


def test_brownfield_plus_triggers_equals_greenfield(
    supabase: Supabase, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    supabase.grant()
    code, output = _migrate(monkeypatch, supabase.service_url, capsys)
    assert code == 0, output
    declared = (ROOT / "db" / "schema.sql").read_text()
    assert dump_schema(supabase.admin_url, service_only=True) == _service_part(declared)


def _service_part(schema: str) -> str:
    """The declared schema without the app's four tables (their columns, constraints and indexes)."""
    from hlf_actors.testing.schema_dump import service_objects

    return service_objects(schema)


def test_greenfield_in_another_app_schema(
    empty_db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _url(empty_db)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app")
    monkeypatch.setenv("HLF_APP_SCHEMA", "app")
    code, output = _migrate(monkeypatch, url, capsys)
    assert code == 0, output
    with psycopg.connect(url, autocommit=True) as conn:
        for table in db.APP_TABLES:
            assert conn.execute("SELECT to_regclass(%s)", (f"app.{table}",)).fetchone() == (f"app.{table}",)
            assert conn.execute("SELECT to_regclass(%s)", (f"public.{table}",)).fetchone() == (None,)
        conn.execute("SET search_path = app")  # the app's own view: its schema, no hlf
        org = conn.execute("INSERT INTO organisations (name) VALUES ('A') RETURNING id").fetchone()
        assert org is not None
        mentor = conn.execute(
            "INSERT INTO mentors (organisation_id, full_name) VALUES (%s, 'M') RETURNING id", (org[0],)
        ).fetchone()
        assert mentor is not None
        assert conn.execute("SELECT hlf_force_sync(%s)", (mentor[0],)).fetchone() is not None
        kinds = conn.execute("SELECT kind FROM hlf.event_log WHERE mentor_id = %s ORDER BY seq", (mentor[0],))
        assert [r[0] for r in kinds] == ["status_changed", "sync_requested"]
        path = conn.execute(
            "SELECT proconfig FROM pg_proc WHERE proname = 'hlf_mentor_changed' AND pronamespace = 'hlf'::regnamespace"
        ).fetchone()
        assert path == (["search_path=hlf, app, pg_temp"],)
    monkeypatch.setenv("HLF_DATABASE_URL", url)
    assert cli.main(["replay", "--verify"]) == 0, capsys.readouterr()


def test_attach_refuses_a_column_a_migration_added_only_to_its_copy(empty_db: str) -> None:
    """A later migration that adds a column to an app table adds it to migrate's copy in hlf on a first brownfield
    install; migrate must stop there rather than drop the copy and leave the app's table without it."""
    attach = (ROOT / "db" / "steps" / "attach.sql").read_text()
    with psycopg.connect(_url(empty_db)) as conn:
        conn.execute(_APP_TABLES)
        conn.execute("CREATE SCHEMA hlf")
        conn.execute("CREATE TABLE hlf.coordinator_devices (LIKE public.coordinator_devices)")
        conn.execute("ALTER TABLE hlf.coordinator_devices ADD COLUMN dead_at timestamptz")
        conn.execute("SELECT set_config('hlf.app_schema', 'public', true), set_config('hlf.app_callable', '', true)")
        with pytest.raises(errors.RaiseException, match=r"public\.coordinator_devices\.dead_at"):
            conn.execute(attach.encode())
