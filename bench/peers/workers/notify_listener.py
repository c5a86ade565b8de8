"""Floor: the raw LISTEN/NOTIFY round trip. LISTENs on ``bench_rtt`` and stamps each payload's arrival.

The bench commits ``SELECT pg_notify('bench_rtt', i)`` (one statement, one transaction) and stamps the commit;
this process stamps the notification with the same system-wide monotonic clock. The payload ``stop`` ends it, and
it prints ``{"payload": t, ...}`` as one JSON line.

    python -m bench.peers.workers.notify_listener --dsn ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import psycopg


async def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", required=True)
    args = parser.parse_args()
    seen: dict[str, float] = {}
    async with await psycopg.AsyncConnection.connect(args.dsn, autocommit=True) as conn:
        await conn.execute("LISTEN bench_rtt")
        print("ready", flush=True)
        async for notify in conn.notifies():
            if notify.payload == "stop":
                break
            seen[notify.payload] = time.monotonic()
    print(json.dumps(seen), flush=True)


if __name__ == "__main__":
    asyncio.run(_main())
