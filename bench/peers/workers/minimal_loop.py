"""Floor: the least a Python process can do per change — NOTIFY → read the row → httpx PATCH → write the outcome.

A trigger on ``mentors`` sends ``pg_notify('bench_sync', id)`` in the writer's transaction; this one asyncio process
LISTENs and runs each change as a task, at most ten at once. Nothing is durable (a notification sent while it is
down is lost), so it has no backlog and no crash figures: it shows what latency and CPU the stack allows.

    python -m bench.peers.workers.minimal_loop --dsn ... --portal http://127.0.0.1:PORT
"""

from __future__ import annotations

import asyncio

import psycopg

from .common import CONCURRENCY, Syncer, arguments, on_stop


async def _main() -> None:
    args = arguments("minimal NOTIFY loop (a floor) for the peer benchmark")
    stop = asyncio.Event()
    on_stop(stop.set)
    slots = asyncio.Semaphore(CONCURRENCY)
    tasks: set[asyncio.Task[None]] = set()

    async def run(mentor_id: str) -> None:
        try:
            await syncer.sync_mentor(mentor_id)
        finally:
            slots.release()

    async with Syncer(args) as syncer, await psycopg.AsyncConnection.connect(args.dsn, autocommit=True) as conn:
        await conn.execute("LISTEN bench_sync")

        async def consume() -> None:
            async for notify in conn.notifies():
                await slots.acquire()
                task = asyncio.create_task(run(notify.payload))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        consumer = asyncio.create_task(consume())
        print("ready", flush=True)
        await stop.wait()
        consumer.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)


if __name__ == "__main__":
    asyncio.run(_main())
