"""Database plumbing: migrations, connection settings, and the named queries in ``queries.sql``.

Migrations are ``db/migrations/NNN_name.sql`` files applied in order, each in its own transaction, and recorded
in ``hlf_schema_migrations`` with a checksum. Re-running ``migrate`` applies only what is missing; two migrators
started at once serialise on an advisory lock. An applied file whose text later changed is refused, because the
schema it describes is no longer the one the database has.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from .errors import MigrationError

__all__ = [
    "CONNECT_KWARGS",
    "Migration",
    "applied_migrations",
    "configure_session",
    "migrate",
    "migrations",
    "pool",
    "query",
    "refusal",
]

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


async def configure_session(conn: psycopg.AsyncConnection[Any]) -> None:
    """Give an autocommit connection's server side the keepalive limits of CONNECT_KWARGS (no-op on Unix sockets)."""
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
        configure=configure_session,
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


def migrations() -> list[Migration]:
    """The migration files shipped with the package, in version order."""
    found: list[Migration] = []
    folder = resources.files("hlf_actors") / "db" / "migrations"
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{3})_([a-z0-9_]+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version number: {versions}")
    return found


def applied_migrations(conn: psycopg.Connection[Any]) -> dict[int, str]:
    exists = conn.execute("SELECT to_regclass('hlf_schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return {}
    rows = conn.execute("SELECT version, checksum FROM hlf_schema_migrations").fetchall()
    return {int(v): str(c) for v, c in rows}


def migrate(conn: psycopg.Connection[Any]) -> list[Migration]:
    """Apply every migration the database lacks; return the ones applied. Safe to run again and concurrently."""
    applied_now: list[Migration] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            """CREATE TABLE IF NOT EXISTS hlf_schema_migrations (
                   version    int PRIMARY KEY,
                   name       text NOT NULL,
                   checksum   text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
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
                        "INSERT INTO hlf_schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                        (migration.version, migration.name, migration.checksum),
                    )
            except psycopg.Error as err:
                raise MigrationError(
                    f"migration {migration.version:03d}_{migration.name} failed: {err.diag.message_primary or err}"
                ) from err
            applied_now.append(migration)
    return applied_now


@cache
def _queries() -> dict[str, str]:
    text = (resources.files("hlf_actors") / "queries.sql").read_text()
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
