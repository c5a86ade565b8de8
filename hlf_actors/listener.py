"""LISTEN/NOTIFY for the service: the channel, checking that a LISTEN really subscribed, and the stray payloads.

The triggers NOTIFY ``hlf_events`` with a constant payload (so a transaction's notifications fold into one). The
leader's listener connection LISTENs there; behind PgBouncer in transaction pooling LISTEN "succeeds" and does
nothing, so ``listen_works`` checks with a round trip and the service polls the inbox instead. Anything else that
arrives on the channel is somebody else's NOTIFY: counted and reported, never acted on.

``Listener`` runs that connection for the service: it takes the leadership lock on it (``election.py``), LISTENs,
and turns each NOTIFY into a wake-up of the projector. NOTIFY is lost while we are disconnected, so every (re)connect
asks the projector to catch up before notifications are trusted again. Losing this connection also loses the
leadership lock: actors hold their next attempt until leadership is back, and if another process took it meanwhile
they are cancelled (their state is in the database).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg
from loguru import logger
from psycopg import sql

from . import db
from .config import Config
from .dispatcher import Dispatcher
from .election import Election
from .incidents import Incidents
from .leadership import Leadership
from .metrics import Metrics, ServiceState

__all__ = [
    "CHANNEL",
    "LISTEN",
    "LISTEN_CHECK",
    "QUEUE_USAGE_WARNING",
    "UNREACHABLE_REPORT_S",
    "WAKE_PAYLOADS",
    "Listener",
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


_PING = "SELECT 1"
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
    """ "high" when pg_notification_queue_usage() crosses QUEUE_USAGE_WARNING upwards, "normal" when it falls back
    below it: one log line per crossing, not one per sweep."""
    if now > QUEUE_USAGE_WARNING >= before:
        return "high"
    if before > QUEUE_USAGE_WARNING >= now:
        return "normal"
    return None


class Listener:
    """The listener connection's loop: connect, lead, LISTEN (or poll), and wake the projector; reconnect on any
    failure. ``wake`` and ``catch_up`` are the projector's."""

    def __init__(
        self,
        config: Config,
        url: str,
        *,
        connect: Callable[[str], Awaitable[psycopg.AsyncConnection[Any]]],
        election: Election,
        leadership: Leadership,
        strays: StrayNotifies,
        state: ServiceState,
        metrics: Metrics,
        wake: Callable[[], None],
        catch_up: Callable[[], None],
    ) -> None:
        self._config = config
        self._url = url
        self._connect = connect
        self._election = election
        self._leadership = leadership
        self._strays = strays
        self._state = state
        self._metrics = metrics
        self._wake = wake
        self._catch_up = catch_up

    async def listen_forever(self, dispatcher: Dispatcher, incidents: Incidents) -> None:
        leadership = self._leadership
        backoff = 0.1
        down_since: float | None = None
        said_at = 0.0
        while True:
            try:
                conn = await self._connect(self._url)
                async with closing(conn):
                    # its search_path, and a vanished leader's lock must not outlive it on the server
                    await db.configure_session(conn, self._config.app_schema)
                    claimed_at = await self._election.become_leader(conn, dispatcher)
                    await incidents.load()  # an incident open before we led holds from the first send
                    await conn.execute(LISTEN)
                    self._state.polling = not await listen_works(conn, self._url)
                    self._metrics.polling.set(1 if self._state.polling else 0)
                    self._state.listening = True
                    self._state.leader = True
                    leadership.gain(lease_s=self._election.lease_s, sent_at=claimed_at)
                    self._catch_up()
                    backoff = 0.1
                    if down_since is not None:
                        logger.info("database reachable again after {:.1f}s", anyio.current_time() - down_since)
                        down_since = None
                    if self._state.polling:
                        logger.warning(
                            "LISTEN has no effect on this connection (PgBouncer in transaction pooling?): polling "
                            "the inbox every {}s instead. Point HLF_DATABASE_URL at a direct or session-pooled "
                            "connection: behind transaction pooling the leader lock is not exclusive either",
                            self._config.poll_interval_s,
                        )
                        await self._poll_forever(conn)
                    else:
                        logger.info("leader: listening on {}", CHANNEL)
                        async for note in conn.notifies():
                            self._on_notify(note.payload)
            except Exception as err:  # the listener must outlive anything: reconnect, re-subscribe, catch up
                self._election.lost()
                self._state.listening = False
                self._state.leader = False
                self._state.database_ok = False
                self._state.reconnects += 1
                self._metrics.reconnects.inc()
                leadership.suspend()
                what = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
                now = anyio.current_time()
                if down_since is None:
                    down_since = said_at = now
                    logger.warning("listener connection lost ({}); reconnecting", what)
                elif now - said_at >= UNREACHABLE_REPORT_S:
                    # Tries back off to one per 5 s; the log says so once a minute, so a long outage stays short.
                    said_at = now
                    logger.warning("listener: still reconnecting after {:.0f}s ({})", now - down_since, what)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _poll_forever(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Where NOTIFY never arrives: wake the projector every HLF_POLL_INTERVAL. The query keeps the connection
        honest: a dead one raises here and the listener reconnects."""
        while True:
            await anyio.sleep(self._config.poll_interval_s)
            await conn.execute(_PING)
            self._wake()

    def _on_notify(self, payload: str) -> None:
        self._state.notifications += 1
        if payload not in WAKE_PAYLOADS and not payload.startswith(LISTEN_CHECK):
            # Nobody but our triggers should speak on this channel; a stray payload is noise, but waking up
            # costs one cheap inbox read, and waking up is always safe. (Every worker's listen-check round trip
            # reaches every listener: ours, not stray.)
            self._state.malformed_notifications += 1
            self._strays.seen(payload)
        self._wake()
