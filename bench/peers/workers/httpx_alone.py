"""Floor: the httpx client alone — N PATCHes to the portal, ten in flight, no database. Requests/s and CPU.

Prints one JSON line: ``{"requests": n, "seconds": s, "cpu_s": c}``, where ``cpu_s`` is this process's CPU time
(user + system) spent on the N requests, after a warm-up that opens the ten keep-alive connections.

    python -m bench.peers.workers.httpx_alone --portal http://127.0.0.1:PORT --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from uuid import uuid4

import httpx

from .common import CONCURRENCY


async def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--portal", required=True)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--entity-set", default="hlf_mentorlistings")
    args = parser.parse_args()
    base = f"{args.portal}/api/data/v9.2/{args.entity_set}"
    records = [uuid4() for _ in range(args.requests)]
    async with httpx.AsyncClient(
        limits=httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY),
        timeout=30.0,
        headers={"Authorization": "Bearer bench", "OData-Version": "4.0", "If-Match": "*"},
    ) as http:

        async def worker(mine: list[object]) -> None:
            for record in mine:
                response = await http.patch(f"{base}({record})", json={"hlf_publiclisting": True})
                response.raise_for_status()

        await asyncio.gather(*(worker([uuid4()]) for _ in range(CONCURRENCY)))  # open the connections
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.gather(*(worker(list(records[i::CONCURRENCY])) for i in range(CONCURRENCY)))
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    print(json.dumps({"requests": args.requests, "seconds": wall, "cpu_s": cpu}), flush=True)


if __name__ == "__main__":
    asyncio.run(_main())
