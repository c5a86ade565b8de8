"""What `run` checks before it starts any work: the database answers, whether a transaction pooler sits in between,
and every migration is applied.

A database that is down at start-up may come back, so it is waited for; one that can never work (a malformed URL,
refused authentication) or lacks migrations is a configuration error, reported in one line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import psycopg
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from . import db
from .errors import DatabaseUnusableError
from .listener import LISTEN, UNREACHABLE_REPORT_S, closing, listen_works

__all__ = ["behind_transaction_pooler", "check_schema", "wait_for_database"]

_MIGRATIONS_TABLE_EXISTS = "SELECT to_regclass('hlf_schema_migrations') IS NOT NULL"
_APPLIED_VERSIONS = "SELECT version FROM hlf_schema_migrations"


async def wait_for_database(url: str) -> None:
    """Return once the database answers. A URL that can never work (malformed, authentication refused) is a
    configuration error: raised at once, and `run` exits 3 with one line. A server that refuses connections or
    does not answer may come back: keep trying with backoff, one log line a minute."""
    delay, said_at = 0.5, -UNREACHABLE_REPORT_S
    started = anyio.current_time()
    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(url, autocommit=True, **db.CONNECT_KWARGS)
        except psycopg.Error as err:
            refused = db.refusal(err)
            if refused is not None:
                raise DatabaseUnusableError(f"cannot use the database: {refused}") from None
            now = anyio.current_time()
            if now - said_at >= UNREACHABLE_REPORT_S:
                said_at = now
                what = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
                logger.warning("database unreachable for {:.0f}s, still trying ({})", now - started, what)
            await anyio.sleep(delay)
            delay = min(delay * 2, 10.0)
            continue
        async with closing(conn):
            return


async def behind_transaction_pooler(
    url: str, connect: Callable[[str], Awaitable[psycopg.AsyncConnection[Any]]]
) -> bool:
    """Whether LISTEN fails here as it does behind PgBouncer in transaction pooling, where prepared statements
    fail too. Asked once at start; the listener asks again on every connection it makes."""
    try:
        conn = await connect(url)
        async with closing(conn):
            await conn.execute(LISTEN)
            return not await listen_works(conn, url)
    except psycopg.Error:
        return False  # no verdict; the pool's own start-up reports an unreachable database


async def check_schema(pool: AsyncConnectionPool[Any]) -> None:
    async with pool.connection() as conn:
        cur = await conn.execute(_MIGRATIONS_TABLE_EXISTS)
        row = await cur.fetchone()
        have: set[int] = set()
        if row and row[0]:
            cur = await conn.execute(_APPLIED_VERSIONS)
            have = {int(r[0]) for r in await cur.fetchall()}
    db.require_migrated(have)
