"""Database plumbing: migrations, connection settings, and the named queries in ``queries.sql``.

Migrations are ``db/migrations/NNN_name.sql`` files applied in order, each in its own transaction, and recorded
in ``hlf.hlf_schema_migrations`` with a checksum. Re-running ``migrate`` applies only what is missing; two migrators
started at once serialise on an advisory lock. An applied file whose text later changed is refused, because the
schema it describes is no longer the one the database has.

Where things live: the mentor app's four tables and the functions it may call in the app's schema
(``HLF_APP_SCHEMA``, default ``public``), everything else the service owns in schema ``hlf``, out of the app API's
reach. Statements are written unqualified and every service connection runs with ``search_path = hlf, <app>``,
so a migration needs no schema names. ``migrate`` is one transaction:

    preflight (attach.py)    privileges and, where the app's tables exist, their columns: every problem, one message
    relocate                 the old layout (service objects in the app schema) moves to hlf
    pending migrations       whatever they create lands in hlf
    attach                   app tables: new ones move to the app schema, existing ones get the triggers
    harden                   SECURITY DEFINER + fixed search_path, no grants and RLS on hlf
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from .errors import MigrationError

__all__ = [
    "APP_CALLABLE",
    "APP_TABLES",
    "CONNECT_KWARGS",
    "SERVICE_SCHEMA",
    "Migration",
    "applied_migrations",
    "configure_session",
    "connect",
    "connect_async",
    "migrate",
    "migrations",
    "pool",
    "query",
    "refusal",
    "search_path",
]

SERVICE_SCHEMA = "hlf"
APP_TABLES = ("organisations", "mentors", "certifications", "coordinator_devices")
# The functions the app may call: they live in the app schema, run as the service's role, and ask the hook.
APP_CALLABLE = ("hlf_force_sync", "hlf_expire_certifications", "hlf_requeue_dead_letter", "hlf_mentor_sync_state")

# Dead peers must not hold a connection (and the leadership lock on it) for hours: libpq keepalives and a TCP
# user timeout make the kernel give up on a silent host within about half a minute. Ignored on Unix sockets.
CONNECT_KWARGS: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
    "connect_timeout": 10,
    "application_name": "hlf-actors",
}


# The same limits for the server's end of each connection. libpq's settings only make *our* side give up; the
# server keeps a vanished client's session — with the leadership lock and any transaction lock it held — until its
# own keepalive fails, two hours by default. These are per-session settings any role may set.
_SERVER_KEEPALIVES = (
    "SELECT set_config('tcp_keepalives_idle', '10', false), set_config('tcp_keepalives_interval', '5', false),"
    " set_config('tcp_keepalives_count', '3', false), set_config('tcp_user_timeout', '30000', false)"
)


def search_path(app_schema: str) -> str:
    """The service's search_path: its own schema first, then the app's (a name config.py has validated)."""
    return f"{SERVICE_SCHEMA}, {app_schema}"


# A session-level SET rather than libpq's `options=-c search_path=…`: Supabase's pooler and PgBouncer drop or refuse
# that startup parameter, while a SET holds for the whole session on a direct connection and a session pooler.
# Behind a transaction pooler a session setting is not ours either: there the role's own default
# (`ALTER ROLE … SET search_path`, docs/operations.md) gives every server connection the same path.
_SET_SEARCH_PATH = "SELECT set_config('search_path', %s, false)"


async def configure_session(conn: psycopg.AsyncConnection[Any], app_schema: str = "public") -> None:
    """Give an autocommit connection the service's search_path and its server side the keepalive limits of
    CONNECT_KWARGS (no-op on Unix sockets)."""
    await conn.execute(_SET_SEARCH_PATH, (search_path(app_schema),))
    await conn.execute(_SERVER_KEEPALIVES)


# What libpq says when the server answered and turned us away for good, or when the URL never made it to a
# connection attempt. libpq gives no SQLSTATE for a failed connection, so its message is all there is. Not here on
# purpose: "too many clients", "starting up", "shutting down", "Connection refused", timeouts: those pass.
_REFUSALS = re.compile(
    r"password authentication failed|authentication failed|no pg_hba\.conf entry|pg_hba\.conf rejects"
    r"|role \S+ does not exist|database \S+ does not exist|invalid \S+ value|invalid connection option"
    r"|missing \"=\" after|unterminated quoted string|invalid URI|invalid percent-encoded"
)


def refusal(err: psycopg.Error) -> str | None:
    """The first line of ``err`` when it says the database URL can never work (malformed, or authentication or
    the database refused by the server), else None: a connection that may work later."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, psycopg.ProgrammingError) or _REFUSALS.search(str(err)):
        return first
    return None


def connect(url: str, *, app_schema: str = "public", **overrides: Any) -> psycopg.Connection[Any]:
    """An autocommit connection with the service's settings and search_path."""
    conn = psycopg.connect(url, **{**CONNECT_KWARGS, "autocommit": True, **overrides})
    try:
        conn.execute(_SET_SEARCH_PATH, (search_path(app_schema),))
    except BaseException:
        conn.close()
        raise
    return conn


async def connect_async(url: str, *, app_schema: str = "public", **overrides: Any) -> psycopg.AsyncConnection[Any]:
    """The async twin of ``connect``."""
    conn = await psycopg.AsyncConnection.connect(url, **{**CONNECT_KWARGS, "autocommit": True, **overrides})
    try:
        await conn.execute(_SET_SEARCH_PATH, (search_path(app_schema),))
    except BaseException:
        await conn.close()
        raise
    return conn


@asynccontextmanager
async def pool(
    url: str,
    *,
    name: str,
    max_size: int,
    min_size: int = 1,
    open_timeout: float = 30.0,
    prepare: bool = True,
    application_name: str | None = None,
    app_schema: str = "public",
) -> AsyncIterator[AsyncConnectionPool[Any]]:
    """An open pool of autocommit connections with the service's connection settings, closed on the way out
    (even when cancelled). Opening waits for ``min_size`` connections and raises if the database cannot be
    reached within ``open_timeout``."""
    connections: AsyncConnectionPool[Any] = AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        # Without server-side prepared statements behind a transaction pooler: the next transaction may run on
        # another server connection, which never saw the PREPARE.
        kwargs={
            **CONNECT_KWARGS,
            "autocommit": True,
            **({} if prepare else {"prepare_threshold": None}),
            **({"application_name": application_name} if application_name else {}),
        },
        configure=functools.partial(configure_session, app_schema=app_schema),
        open=False,
        name=name,
    )
    try:
        await connections.open(wait=True, timeout=open_timeout)
        yield connections
    finally:
        with anyio.CancelScope(shield=True):
            await connections.close()


_MIGRATION_LOCK = 0x484C_465F_4D49_4752  # "HLF_MIGR"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@cache
def sql_files() -> Traversable:
    """Where the SQL files are: ``db/`` at the repository root in a checkout (and an editable install), or
    ``hlf_actors/sql`` inside an installed wheel, which ships that same folder there (pyproject's force-include)."""
    shipped = resources.files("hlf_actors") / "sql"
    if shipped.is_dir():
        return shipped
    return Path(__file__).resolve().parent.parent / "db"


def migrations() -> list[Migration]:
    """The migration files shipped with the package, in version order."""
    found: list[Migration] = []
    folder = sql_files() / "migrations"
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{3})_([a-z0-9_]+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version number: {versions}")
    return found


_MIGRATIONS_TABLE_EXISTS = "SELECT to_regclass('hlf.hlf_schema_migrations') IS NOT NULL"
_APPLIED_MIGRATIONS = "SELECT version, checksum FROM hlf.hlf_schema_migrations"


def applied_migrations(conn: psycopg.Connection[Any]) -> dict[int, str]:
    exists = conn.execute(_MIGRATIONS_TABLE_EXISTS).fetchone()
    if not exists or not exists[0]:
        return {}
    rows = conn.execute(_APPLIED_MIGRATIONS).fetchall()
    return {int(v): str(c) for v, c in rows}


def require_migrated(applied: Collection[int]) -> None:
    """Refuse a database older than this code: a MigrationError naming every migration it lacks."""
    missing = [m for m in migrations() if m.version not in applied]
    if missing:
        names = ", ".join(f"{m.version:03d}_{m.name}" for m in missing)
        raise MigrationError(f"the database lacks migrations {names}: run `hlf-actors migrate` first")


def _step(name: str) -> bytes:
    return (sql_files() / "steps" / f"{name}.sql").read_bytes()


_LOCK_MIGRATIONS = "SELECT pg_advisory_xact_lock(%s)"
_SET_LOCAL_SEARCH_PATH = "SELECT set_config('search_path', %s, true)"
_SET_APP_SCHEMA = "SELECT set_config('hlf.app_schema', %s, true)"
_SET_APP_CALLABLE = "SELECT set_config('hlf.app_callable', %s, true)"
_CREATE_HLF_SCHEMA = "CREATE SCHEMA IF NOT EXISTS hlf"
_CREATE_MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS hlf.hlf_schema_migrations (
                   version    int PRIMARY KEY,
                   name       text NOT NULL,
                   checksum   text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
_OLD_LAYOUT_MIGRATIONS_EXIST = "SELECT to_regclass(format('%%I.hlf_schema_migrations', %s::text)) IS NOT NULL"
_RECORD_MIGRATION = "INSERT INTO hlf.hlf_schema_migrations (version, name, checksum) VALUES (%s, %s, %s)"


def migrate(conn: psycopg.Connection[Any], *, app_schema: str = "public") -> list[Migration]:
    """Apply every migration the database lacks; return the ones applied. Safe to run again and concurrently.
    One transaction: a database that fails the preflight check, or any step, is left exactly as it was."""
    from .attach import preflight

    applied_now: list[Migration] = []
    with conn.transaction():
        conn.execute(_LOCK_MIGRATIONS, (_MIGRATION_LOCK,))
        problems = preflight(conn, app_schema)
        if problems:
            raise MigrationError(
                f"the database is not ready for the service ({len(problems)} problem(s), nothing was changed):\n  - "
                + "\n  - ".join(problems)
            )
        conn.execute(_SET_LOCAL_SEARCH_PATH, (search_path(app_schema),))
        conn.execute(_SET_APP_SCHEMA, (app_schema,))
        conn.execute(_SET_APP_CALLABLE, (",".join(APP_CALLABLE),))
        conn.execute(_CREATE_HLF_SCHEMA)
        legacy = conn.execute(_OLD_LAYOUT_MIGRATIONS_EXIST, (app_schema,)).fetchone()
        if legacy and legacy[0]:
            _run_step(conn, "relocate")
        conn.execute(_CREATE_MIGRATIONS_TABLE)
        done = applied_migrations(conn)
        for migration in migrations():
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:03d}_{migration.name} was changed after it was applied; "
                        "add a new migration instead of editing an applied one"
                    )
                continue
            try:
                with conn.transaction():
                    conn.execute(migration.sql.encode())
                    conn.execute(
                        _RECORD_MIGRATION,
                        (migration.version, migration.name, migration.checksum),
                    )
            except psycopg.Error as err:
                raise MigrationError(
                    f"migration {migration.version:03d}_{migration.name} failed: {err.diag.message_primary or err}"
                ) from err
            applied_now.append(migration)
        _run_step(conn, "attach")
        _run_step(conn, "harden")
    return applied_now


def _run_step(conn: psycopg.Connection[Any], name: str) -> None:
    try:
        with conn.transaction():
            conn.execute(_step(name))
    except psycopg.Error as err:
        raise MigrationError(f"migrate step {name} failed: {err.diag.message_primary or err}") from err


@cache
def _queries() -> dict[str, str]:
    text = (sql_files() / "queries.sql").read_text()
    found: dict[str, str] = {}
    name: str | None = None
    body: list[str] = []
    for line in text.splitlines():
        header = re.match(r"^--\s*name:\s*([a-z_]+)\s*$", line)
        if header:
            if name:
                found[name] = "\n".join(body).strip().rstrip(";")
            name, body = header.group(1), []
        elif name is not None:
            body.append(line)
    if name:
        found[name] = "\n".join(body).strip().rstrip(";")
    return found


def query(name: str) -> str:
    """The SQL text of a ``-- name: X`` block in queries.sql."""
    try:
        return _queries()[name]
    except KeyError:
        raise KeyError(f"queries.sql has no block named {name!r}") from None
