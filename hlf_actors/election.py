"""Who leads: the leadership lock, fencing a leader whose heartbeat stopped, and the heartbeat that keeps our lease.

    standby ── pg_try_advisory_lock(LEADER_LOCK) on the listener connection ── held ──▶ claim a term in hlf_leader
       │  not held: is the leader's heartbeat older than HLF_LEADER_TIMEOUT? ── yes ──▶ fence it, take the lock
       ▼
    leader ── every HLF_LEADER_TIMEOUT / 5: heartbeat ── accepted ──▶ lease renewed (half of HLF_LEADER_TIMEOUT)
                                                    └── term gone ──▶ fenced by a standby: demote, cancel the actors

The lock lives on the listener connection (``listener.py``), so losing that connection loses the leadership too.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import anyio
import psycopg
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from . import db
from .config import Config
from .dispatcher import Dispatcher
from .leadership import Leadership
from .metrics import ServiceState

__all__ = ["LEADER_LOCK", "Election"]

LEADER_LOCK = 0x484C_465F_4C45_4144  # "HLF_LEAD"
# The leader's heartbeat: five beats per HLF_LEADER_TIMEOUT, and a lease of half of it. The standby fences only after
# the whole timeout, so a leader always stops sending (its lease lapsed) before a standby can start.
_BEATS_PER_TIMEOUT = 5
_LEASE_SHARE = 0.5

_TRY_LEADER_LOCK = "SELECT pg_try_advisory_lock(%s)"


class Election:
    """This process's part in the election: waits for the lock as a standby, then holds a term and beats."""

    def __init__(
        self,
        config: Config,
        leadership: Leadership,
        state: ServiceState,
        *,
        session_tag: str,
        standby_poll_s: float,
    ) -> None:
        self._config = config
        self._leadership = leadership
        self._state = state
        self._session_tag = session_tag
        self._standby_poll_s = standby_poll_s
        self._term: int | None = None  # our term in hlf_leader while we lead
        self._was_leader = False

    @property
    def lease_s(self) -> float:
        return self._config.leader_timeout_s * _LEASE_SHARE

    def lost(self) -> None:
        """The listener connection, and with it the lock, is gone: our term is over."""
        self._term = None

    async def become_leader(self, conn: psycopg.AsyncConnection[Any], dispatcher: Dispatcher) -> float:
        """Wait until this connection holds the leadership lock, fencing a leader whose heartbeat stopped; record
        us in hlf_leader. Returns when (this process's monotonic clock) the claim was sent: the lease starts there."""
        said = False
        while True:
            cur = await conn.execute(_TRY_LEADER_LOCK, (LEADER_LOCK,))
            row = await cur.fetchone()
            if row and row[0]:
                self._was_leader = True
                claimed_at = time.monotonic()
                params = {"tag": self._session_tag, "host": socket.gethostname()[:200], "os_pid": os.getpid()}
                cur = await conn.execute(db.query("claim_leadership"), params)
                claimed = await cur.fetchone()
                assert claimed is not None
                self._term = int(claimed[0])
                return claimed_at
            if self._was_leader:
                # Someone took over while we were disconnected (or frozen): our actors must not send any more.
                logger.warning("leadership was taken over by another process; stopping this one's actors")
                dispatcher.cancel_all()
                self._was_leader = False
                said = False
            self._state.database_ok = True  # connected and answered: a standby, not a process still starting
            if not said:
                logger.info("standby: another hlf-actors process is the leader; waiting to take over")
                said = True
            if await self._fence_stale_leader(conn):
                continue  # its lock is free now: take it at once
            await anyio.sleep(self._standby_poll_s)

    async def _fence_stale_leader(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Terminate the sessions of a leader whose heartbeat is older than HLF_LEADER_TIMEOUT (a frozen process
        keeps its connection, and so the lock, healthy in PostgreSQL's eyes). True if one was fenced."""
        params = {
            "timeout_s": self._config.leader_timeout_s,
            "lock_hi": LEADER_LOCK >> 32,
            "lock_lo": LEADER_LOCK & 0xFFFF_FFFF,
        }
        cur = await conn.execute(db.query("fence_stale_leader"), params)
        rows = await cur.fetchall()
        if not rows:
            return False
        _, host, os_pid, _ = rows[0]
        logger.warning(
            "the leader (pid {} on {}) sent no heartbeat for over {:g}s: fenced it ({} session(s) terminated); "
            "taking over",
            os_pid,
            host,
            self._config.leader_timeout_s,
            sum(1 for r in rows if r[3]),
        )
        return True

    async def beat_forever(self, pool: AsyncConnectionPool[Any], dispatcher: Dispatcher) -> None:
        """While we lead, prove it every HLF_LEADER_TIMEOUT / 5 from this event loop; each beat the database accepts
        extends the lease. A beat that finds our term gone means a standby fenced us: demote before anything else
        is sent. A beat that fails (database trouble) just lets the lease run out; the listener sorts that out."""
        interval = self._config.leader_timeout_s / _BEATS_PER_TIMEOUT
        while True:
            await anyio.sleep(interval)
            term = self._term
            if term is None:
                continue
            sent_at = time.monotonic()
            try:
                with anyio.fail_after(self.lease_s):
                    async with pool.connection() as conn:
                        cur = await conn.execute(db.query("leader_heartbeat"), (term,))
                        accepted = await cur.fetchone() is not None
            except (psycopg.Error, TimeoutError):
                continue
            if term != self._term:
                continue  # leadership changed hands while the beat was out; the listener's turn
            if accepted:
                self._leadership.renew(lease_s=self.lease_s, sent_at=sent_at)
                continue
            logger.warning("another process took over the leadership (our heartbeat found a newer term): standby")
            self._term = None
            self._leadership.suspend()
            self._state.leader = False
            dispatcher.cancel_all()
