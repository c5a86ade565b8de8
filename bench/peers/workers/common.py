"""What one sync costs a peer, written once so every peer pays the same: read the row, PATCH, write the outcome.

hlf_actors does the same three things per sync (its actor reads the mentor's eligibility, PATCHes, and appends
``attempt_succeeded`` with its projection in one transaction), so the peers' figures compare queue machinery,
not the work around it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable
from typing import Any
from uuid import UUID

import httpx
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

__all__ = ["CONCURRENCY", "OUTCOME", "READ", "Syncer", "arguments", "asyncpg_params", "on_stop"]

CONCURRENCY = 10  # requests in flight at most, for every system

READ = "SELECT status, portal_record_id FROM mentors WHERE id = %s"
OUTCOME = """
INSERT INTO sync_outcome (mentor_id, listed, http_status) VALUES (%s, %s, %s)
ON CONFLICT (mentor_id) DO UPDATE
SET listed = excluded.listed, http_status = excluded.http_status, synced_at = now(), syncs = sync_outcome.syncs + 1
"""


def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--portal", required=True, help="the portal's base URL")
    parser.add_argument("--entity-set", default="hlf_mentorlistings")
    parser.add_argument("--listed-field", default="hlf_publiclisting")
    return parser.parse_args()


def asyncpg_params(dsn: str) -> dict[str, Any]:
    """asyncpg.connect() keywords for a libpq URL or conninfo string (asyncpg reads only URLs itself)."""
    params = conninfo_to_dict(dsn)
    names = {"host": "host", "port": "port", "user": "user", "password": "password", "dbname": "database"}
    out: dict[str, Any] = {names[k]: v for k, v in params.items() if k in names and v is not None}
    if "port" in out:
        out["port"] = int(out["port"])
    return out


def on_stop(callback: Callable[[], Any]) -> None:
    """SIGTERM/SIGINT call ``callback`` (a graceful stop), as a deployment's process manager would send them."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, callback)


class Syncer:
    """The HTTP client and the connection pool a worker's jobs share."""

    def __init__(self, args: argparse.Namespace, *, pool: bool = True) -> None:
        self._base = f"{args.portal}/api/data/v9.2/{args.entity_set}"
        self._field = args.listed_field
        self.pool: AsyncConnectionPool[Any] | None = (
            AsyncConnectionPool(
                args.dsn, min_size=CONCURRENCY, max_size=CONCURRENCY, open=False, kwargs={"autocommit": True}
            )
            if pool
            else None
        )
        self.http = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY),
            timeout=30.0,
            headers={"Authorization": "Bearer bench", "OData-Version": "4.0", "If-Match": "*"},
        )

    async def __aenter__(self) -> Syncer:
        if self.pool is not None:
            await self.pool.open(wait=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()
        if self.pool is not None:
            await self.pool.close()

    async def patch(self, record_id: UUID, listed: bool) -> int:
        response = await self.http.patch(f"{self._base}({record_id})", json={self._field: listed})
        response.raise_for_status()
        return response.status_code

    async def sync_mentor(self, mentor_id: UUID | str) -> None:
        """One sync on the pool's connections: read (one round trip), PATCH, write the outcome (one round trip)."""
        assert self.pool is not None
        async with self.pool.connection() as conn:
            cur = await conn.execute(READ, (mentor_id,))
            row = await cur.fetchone()
        if row is None or row[1] is None:
            return
        listed = row[0] == "active"
        status = await self.patch(row[1], listed)
        async with self.pool.connection() as conn:
            await conn.execute(OUTCOME, (mentor_id, listed, status))
