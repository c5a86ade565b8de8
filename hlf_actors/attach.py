"""Before ``migrate`` changes anything: can the service attach to this database, as this role?

The mentor app's database usually exists already (Supabase, with the app's own tables, roles and RLS). ``migrate``
creates the app's four tables only where none of them exist (greenfield); where they do (brownfield) it creates
nothing in them and only adds its triggers, so they must already have what the service reads and writes: the
columns and types of ``shared/INTERFACE.md`` and no mentor status the service does not know. Every problem is
collected, so the operator fixes them in one round instead of one per run; the privileges the role lacks are named
the same way. ``db.migrate`` raises them as one ``MigrationError`` (exit 2) before its first change.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

__all__ = ["REQUIRED_COLUMNS", "STATUSES", "preflight"]

# The contract (shared/INTERFACE.md): table → column → accepted types (format_type spelling).
_TEXT = ("text", "character varying")
REQUIRED_COLUMNS: dict[str, dict[str, tuple[str, ...]]] = {
    "organisations": {"id": ("uuid",), "name": _TEXT, "reminder_days": ("integer[]",), "alert_topic": _TEXT},
    "mentors": {
        "id": ("uuid",),
        "organisation_id": ("uuid",),
        "full_name": _TEXT,
        "status": _TEXT,
        "portal_record_id": ("uuid",),
    },
    "certifications": {"id": ("uuid",), "mentor_id": ("uuid",), "expires_on": ("date",)},
    "coordinator_devices": {"id": (), "organisation_id": ("uuid",), "fcm_token": _TEXT},
}
STATUSES = ("active", "paused", "expired_cert")

# What the service does to each app table, as table privileges (LOCK … IN SHARE MODE, taken by the nightly expiry
# on certifications, needs UPDATE, DELETE or TRUNCATE on the table; UPDATE is the least of them).
_TABLE_PRIVILEGES: dict[str, tuple[str, ...]] = {
    "organisations": ("SELECT", "TRIGGER"),
    "mentors": ("SELECT", "UPDATE", "TRIGGER"),
    "certifications": ("SELECT", "UPDATE", "TRIGGER"),
    "coordinator_devices": ("SELECT",),
}


def _one(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


_TABLES_IN_SCHEMA = (
    "SELECT c.relname FROM pg_class c WHERE c.relnamespace = %s::regnamespace AND c.relkind IN ('r', 'p')"
    " AND c.relname = ANY(%s)"
)


def preflight(conn: psycopg.Connection[Any], app_schema: str) -> list[str]:
    """Every reason ``migrate`` cannot attach to this database as the connected role; empty when it can."""
    role = str(_one(conn, "SELECT current_user"))
    if not _one(conn, "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s)", (app_schema,)):
        return [f"schema {app_schema!r} (HLF_APP_SCHEMA) does not exist"]
    problems: list[str] = []
    grant = f"as role {role}, "
    if _one(conn, "SELECT to_regnamespace('hlf') IS NULL"):
        if not _one(conn, "SELECT has_database_privilege(current_database(), 'CREATE')"):
            problems.append(grant + "CREATE on the database is needed to create schema hlf (GRANT CREATE ON DATABASE)")
    elif not _one(conn, "SELECT pg_has_role((SELECT nspowner FROM pg_namespace WHERE nspname = 'hlf'), 'MEMBER')"):
        owner = _one(conn, "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'hlf'")
        problems.append(grant + f"schema hlf belongs to {owner}: run migrate as that role")
    for privilege in ("USAGE", "CREATE"):
        if not _one(conn, "SELECT has_schema_privilege(%s, %s)", (app_schema, privilege)):
            problems.append(grant + f"{privilege} on schema {app_schema} is needed (GRANT {privilege} ON SCHEMA)")

    present = {
        str(r[0])
        for r in conn.execute(
            _TABLES_IN_SCHEMA,
            (app_schema, list(REQUIRED_COLUMNS)),
        )
    }
    if not present:
        return problems  # greenfield: migrate creates the four tables
    for table in REQUIRED_COLUMNS:
        if table not in present:
            problems.append(f"table {app_schema}.{table} is missing (the app has the others, so migrate creates none)")
            continue
        problems += _table_problems(conn, app_schema, table, role)
    return problems


_COLUMNS_OF_TABLE = (
    "SELECT a.attname, format_type(a.atttypid, NULL), a.atthasdef OR a.attidentity <> '', t.typtype"
    " FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
    " WHERE a.attrelid = format('%%I.%%I', %s::text, %s::text)::regclass AND a.attnum > 0"
    " AND NOT a.attisdropped"
)
_ENUM_LABELS = (
    "SELECT e.enumlabel FROM pg_enum e JOIN pg_attribute a ON a.atttypid = e.enumtypid"
    " WHERE a.attrelid = format('%%I.%%I', %s::text, %s::text)::regclass AND a.attname = 'status'"
)


# The schema is the operator's HLF_APP_SCHEMA: composed as a quoted identifier, never pasted into the text.
_STATUS_OUTLIERS = sql.SQL(
    "SELECT status::text, count(*) FROM {}.mentors WHERE status::text <> ALL(%s) GROUP BY 1 ORDER BY 1"
)


def _table_problems(conn: psycopg.Connection[Any], schema: str, table: str, role: str) -> list[str]:
    qualified = f"{schema}.{table}"
    problems: list[str] = []
    columns = {
        str(name): (str(kind), bool(has_default), str(type_kind))
        for name, kind, has_default, type_kind in conn.execute(
            _COLUMNS_OF_TABLE,
            (schema, table),
        )
    }
    for column, accepted in REQUIRED_COLUMNS[table].items():
        if column not in columns:
            problems.append(f"{qualified}.{column} is missing")
            continue
        kind, has_default, type_kind = columns[column]
        if column == "status" and type_kind == "e":
            labels = [
                str(r[0])
                for r in conn.execute(
                    _ENUM_LABELS,
                    (schema, table),
                )
            ]
            unknown = sorted(set(labels) - set(STATUSES))
            if unknown:
                problems.append(f"{qualified}.status allows values the service does not know: {', '.join(unknown)}")
        elif accepted and kind not in accepted:
            problems.append(f"{qualified}.{column} is {kind}, expected {' or '.join(accepted)}")
        if column == "id" and not has_default:
            problems.append(f"{qualified}.id has no default (gen_random_uuid() or an identity)")
    readable = _one(
        conn, "SELECT has_table_privilege(format('%%I.%%I', %s::text, %s::text), 'SELECT')", (schema, table)
    )
    if table == "mentors" and "status" in columns and readable:  # unreadable: named below as a missing privilege
        found = conn.execute(_STATUS_OUTLIERS.format(sql.Identifier(schema)), (list(STATUSES),)).fetchall()
        for value, count in found:
            problems.append(
                f"{qualified}.status holds {value!r} in {count} row(s); the service knows only {', '.join(STATUSES)}"
            )
    for privilege in _TABLE_PRIVILEGES[table]:
        allowed = "SELECT has_table_privilege(format('%%I.%%I', %s::text, %s::text), %s)"
        if not _one(conn, allowed, (schema, table, privilege)):
            problems.append(f"as role {role}, {privilege} on {qualified} is needed (GRANT {privilege} ON {qualified})")
    rls_blocks = _one(
        conn,
        "SELECT c.relrowsecurity AND NOT pg_has_role(c.relowner, 'MEMBER')"
        " AND NOT (SELECT rolbypassrls OR rolsuper FROM pg_roles WHERE rolname = current_user)"
        " AND NOT EXISTS (SELECT 1 FROM pg_policies p WHERE p.schemaname = %s AND p.tablename = %s"
        "                 AND (current_user = ANY(p.roles) OR 'public' = ANY(p.roles)) AND p.qual = 'true')"
        " FROM pg_class c WHERE c.oid = format('%%I.%%I', %s::text, %s::text)::regclass",
        (schema, table, schema, table),
    )
    if rls_blocks:
        problems.append(
            f"as role {role}, {qualified} has row-level security and the role would see only what its policies allow:"
            f" give it BYPASSRLS (ALTER ROLE {role} BYPASSRLS) or a policy USING (true) for it"
        )
    return problems
