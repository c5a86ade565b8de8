"""Procrastinate as its documentation sets it up: psycopg connector, ``defer_async``, a worker of concurrency 10.

The writer defers each job on its own connection inside the transaction that updates the mentor
(``task.configure(connection=conn).defer_async``), so a job exists exactly when its change committed.

Procrastinate leaves the jobs of a killed worker in ``doing``; its documentation's remedy is a periodic task that
retries stalled jobs (those of workers whose heartbeat is older than ``stalled_worker_timeout``, 30 s). The docs
run it every ten minutes; this worker runs it every second, which favours Procrastinate's recovery time.

    python -m bench.peers.workers.procrastinate_worker --dsn ... --portal http://127.0.0.1:PORT
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import procrastinate

from .common import CONCURRENCY, Syncer, arguments

__all__ = ["make_app"]

_STALLED_CHECK_S = 1.0
_syncer: Syncer | None = None


def make_app(dsn: str) -> tuple[procrastinate.App, Any]:
    """The app and its one task, for the worker and for the writer that defers jobs."""
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn, min_size=1, max_size=4))

    @app.task(name="sync_mentor")
    async def sync_mentor(mentor_id: str) -> None:
        assert _syncer is not None
        await _syncer.sync_mentor(mentor_id)

    return app, sync_mentor


async def _retry_stalled_jobs(app: procrastinate.App) -> None:
    while True:
        await asyncio.sleep(_STALLED_CHECK_S)
        with contextlib.suppress(Exception):  # the database may be busy; try again next second
            for job in await app.job_manager.get_stalled_jobs():
                await app.job_manager.retry_job(job)


async def _main() -> None:
    global _syncer
    args = arguments("Procrastinate worker for the peer benchmark")
    app, _ = make_app(args.dsn)
    async with Syncer(args) as syncer, app.open_async():
        _syncer = syncer
        stalled = asyncio.create_task(_retry_stalled_jobs(app))
        print("ready", flush=True)
        try:
            await app.run_worker_async(concurrency=CONCURRENCY, install_signal_handlers=True)
        finally:
            stalled.cancel()


if __name__ == "__main__":
    asyncio.run(_main())
