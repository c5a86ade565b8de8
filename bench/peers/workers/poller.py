"""The naive outbox poller: a trigger fills ``outbox``, ten async workers take rows with FOR UPDATE SKIP LOCKED.

Each worker holds its row's lock for the whole job (read the mentor, PATCH, write the outcome, delete the row,
commit), so a killed worker's rows are unlocked the moment its connections die and the next poll takes them again.
No LISTEN: an idle worker sleeps ``--poll-ms`` (50 ms) between polls, and the ten are staggered, so a new row waits
about 5 ms for a worker on average.

    python -m bench.peers.workers.poller --dsn ... --portal http://127.0.0.1:PORT [--poll-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import psycopg

from .common import CONCURRENCY, OUTCOME, READ, Syncer, on_stop

_TAKE = "SELECT id, mentor_id FROM outbox ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
_DONE = "DELETE FROM outbox WHERE id = %s"


async def _work(args: argparse.Namespace, syncer: Syncer, stop: asyncio.Event, offset_s: float) -> None:
    poll_s = args.poll_ms / 1000
    await asyncio.sleep(offset_s)
    async with await psycopg.AsyncConnection.connect(args.dsn, autocommit=True) as conn:
        while not stop.is_set():
            async with conn.transaction():
                row = await (await conn.execute(_TAKE)).fetchone()
                if row is not None:
                    outbox_id, mentor_id = row
                    mentor = await (await conn.execute(READ, (mentor_id,))).fetchone()
                    if mentor is not None and mentor[1] is not None:
                        listed = mentor[0] == "active"
                        status = await syncer.patch(mentor[1], listed)
                        await conn.execute(OUTCOME, (mentor_id, listed, status))
                    await conn.execute(_DONE, (outbox_id,))
            if row is None:
                try:
                    await asyncio.wait_for(stop.wait(), poll_s)
                except TimeoutError:
                    pass


async def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--portal", required=True)
    parser.add_argument("--entity-set", default="hlf_mentorlistings")
    parser.add_argument("--listed-field", default="hlf_publiclisting")
    parser.add_argument("--poll-ms", type=float, default=50.0)
    args = parser.parse_args()
    stop = asyncio.Event()
    on_stop(stop.set)
    async with Syncer(args, pool=False) as syncer:
        workers = [
            asyncio.create_task(_work(args, syncer, stop, i * args.poll_ms / 1000 / CONCURRENCY))
            for i in range(CONCURRENCY)
        ]
        print("ready", flush=True)
        await asyncio.gather(*workers)
    sys.exit(0)


if __name__ == "__main__":
    asyncio.run(_main())
