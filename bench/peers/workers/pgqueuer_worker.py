"""PGQueuer with its defaults and one entrypoint of ``concurrency_limit=10``, on its asyncpg driver.

asyncpg is PGQueuer's first driver and the one its documentation's examples use. Its psycopg driver shares one
connection between LISTEN and the queue's queries and holds it for up to a second while it waits for a
notification (``notifies(timeout=1.0)``): measured here at 5–10 changes/s, which would say nothing about PGQueuer.
The writer enqueues each job inside the transaction that updates the mentor (``Queries.enqueue`` on the writer's
own asyncpg connection, in ``conn.transaction()``). The job itself is the peers' shared one (``common.Syncer``).
A killed worker's picked jobs are taken again once their heartbeat is older than ``heartbeat_timeout`` (30 s).

    python -m bench.peers.workers.pgqueuer_worker --dsn ... --portal http://127.0.0.1:PORT
"""

from __future__ import annotations

import asyncio
from uuid import UUID

import asyncpg  # type: ignore[import-untyped]
from pgqueuer import AsyncpgDriver, QueueManager
from pgqueuer.models import Job
from pgqueuer.queries import Queries

from .common import CONCURRENCY, Syncer, arguments, asyncpg_params, on_stop

__all__ = ["ENTRYPOINT"]

ENTRYPOINT = "sync_mentor"


async def _main() -> None:
    args = arguments("PGQueuer worker for the peer benchmark")
    conn = await asyncpg.connect(**asyncpg_params(args.dsn))
    async with Syncer(args) as syncer:
        qm = QueueManager(Queries(AsyncpgDriver(conn)))

        @qm.entrypoint(ENTRYPOINT, concurrency_limit=CONCURRENCY)
        async def sync_mentor(job: Job) -> None:
            assert job.payload is not None
            await syncer.sync_mentor(UUID(bytes=job.payload))

        on_stop(qm.shutdown.set)
        print("ready", flush=True)
        await qm.run()
    await conn.close()


if __name__ == "__main__":
    asyncio.run(_main())
