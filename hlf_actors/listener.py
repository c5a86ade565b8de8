"""LISTEN/NOTIFY for the service: the channel, checking that a LISTEN really subscribed, and the stray payloads.

The triggers NOTIFY ``hlf_events`` with a constant payload (so a transaction's notifications fold into one). The
leader's listener connection LISTENs there; behind PgBouncer in transaction pooling LISTEN "succeeds" and does
nothing, so ``listen_works`` checks with a round trip and the service polls the inbox instead. Anything else that
arrives on the channel is somebody else's NOTIFY: counted and reported, never acted on.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg
from loguru import logger
from psycopg import sql

from . import db

__all__ = [
    "CHANNEL",
    "LISTEN",
    "LISTEN_CHECK",
    "QUEUE_USAGE_WARNING",
    "UNREACHABLE_REPORT_S",
    "WAKE_PAYLOADS",
    "StrayNotifies",
    "closing",
    "connect_listener",
    "listen_works",
    "queue_usage_change",
]

CHANNEL = "hlf_events"
LISTEN = sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL))
WAKE_PAYLOADS = frozenset({"", "wake"})
LISTEN_CHECK = "listen-check:"
# While the database stays unreachable, say so once a minute (the listener's reconnects, start-up's wait).
UNREACHABLE_REPORT_S = 60.0


@asynccontextmanager
async def closing(conn: psycopg.AsyncConnection[Any]) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """Close the connection even when cancelled: a leaked one would keep holding the leadership lock."""
    try:
        yield conn
    finally:
        with anyio.CancelScope(shield=True):
            await conn.close()


async def connect_listener(url: str) -> psycopg.AsyncConnection[Any]:
    kwargs = {**db.CONNECT_KWARGS, "application_name": "hlf-actors listener"}
    return await psycopg.AsyncConnection.connect(url, autocommit=True, **kwargs)


_IS_LISTENING = "SELECT %s = ANY(ARRAY(SELECT pg_listening_channels()))"
_NOTIFY = "SELECT pg_notify(%s, %s)"


async def listen_works(conn: psycopg.AsyncConnection[Any], url: str, timeout_s: float = 2.0) -> bool:
    """Whether LISTEN on ``conn`` really subscribed. Behind PgBouncer in transaction pooling it "succeeds" and does
    nothing: a new transaction may run on another server connection, which does not list the channel, and a
    notification sent to us is never forwarded. Both are checked: the channel, then a round trip."""
    cur = await conn.execute(_IS_LISTENING, (CHANNEL,))
    row = await cur.fetchone()
    if not (row and row[0]):
        return False
    token = f"{LISTEN_CHECK}{os.getpid()}:{time.monotonic_ns()}"
    sender = await psycopg.AsyncConnection.connect(url, autocommit=True, **db.CONNECT_KWARGS)
    async with closing(sender):
        await sender.execute(_NOTIFY, (CHANNEL, token))
    async for note in conn.notifies(timeout=timeout_s):
        if note.payload == token:
            return True
    return False


class StrayNotifies:
    """Counts NOTIFY payloads nobody should send and reports them at most once per ``every_s``, with a count.

    Any role that can connect may NOTIFY our channel; one log line each let a loop of them fill the disk. The first
    one is reported at once (an operator sees it start), the rest in one line per interval; ``flush`` is called
    periodically so a burst that stopped is still reported.
    """

    def __init__(self, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._every_s = every_s
        self._clock = clock
        self._count = 0
        self._latest = ""
        self._reported_at: float | None = None

    def seen(self, payload: str) -> None:
        self._count += 1
        self._latest = payload
        self.flush()

    def flush(self) -> None:
        now = self._clock()
        if not self._count or (self._reported_at is not None and now - self._reported_at < self._every_s):
            return
        since = "" if self._reported_at is None else f" in the last {now - self._reported_at:.0f}s"
        logger.warning(
            "ignoring {} unexpected NOTIFY payload(s) on {}{} (latest: {!r})",
            self._count,
            CHANNEL,
            since,
            self._latest[:80],
        )
        self._count = 0
        self._reported_at = now


QUEUE_USAGE_WARNING = 0.5


def queue_usage_change(before: float, now: float) -> str | None:
    """"high" when pg_notification_queue_usage() crosses QUEUE_USAGE_WARNING upwards, "normal" when it falls back
    below it: one log line per crossing, not one per sweep."""
    if now > QUEUE_USAGE_WARNING >= before:
        return "high"
    if before > QUEUE_USAGE_WARNING >= now:
        return "normal"
    return None
