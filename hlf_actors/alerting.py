"""Who gets which push alert, and the record of every delivery in ``event_log``.

Sending is never on the sync path: the service starts each alert as its own task, so an FCM outage delays only the
alert. A delivery that FCM says may succeed later is tried again a few times; an unregistered device token is
recorded once and not retried. Each delivery becomes an ``alert_sent`` or ``alert_failed`` event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

import anyio
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from . import db, projections
from .alerts import AlertSender, Delivery
from .events import AlertFailed, AlertSent, NewEvent, Operation

__all__ = ["Alerting"]

# Waits between tries of a delivery that FCM said could succeed later.
_RETRY_DELAYS_S = (1.0, 5.0, 20.0)


class Alerting:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        sender: AlertSender,
        *,
        ops_topic: str,
        retry_delays_s: Sequence[float] = _RETRY_DELAYS_S,
    ) -> None:
        self._pool = pool
        self._sender = sender
        self._ops_topic = ops_topic
        self._retry_delays_s = tuple(retry_delays_s)

    async def sync_failure(self, mentor_id: UUID, operation: Operation, dead_letter_id: int) -> None:
        """Tell the mentor's organisation that a sync was dead-lettered."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(db.query("alert_targets"), (mentor_id,))
            row = await cur.fetchone()
        topic, tokens = (row[0], list(row[1])) if row else (None, [])
        data = {"type": "hlf_sync_failure", "mentor_id": str(mentor_id), "operation": operation}
        if not tokens and not topic:
            logger.bind(mentor_id=str(mentor_id)).warning(
                "dead letter not pushed: the organisation has no coordinator devices and no alert_topic"
            )
            await self._record(
                mentor_id,
                [Delivery(target="none", ok=False, error="organisation has no devices or topic")],
                data,
                dead_letter_id,
            )
            return
        await self.deliver(data, tokens=tokens, topic=topic, mentor_id=mentor_id, dead_letter_id=dead_letter_id)

    async def resend_unsent(self, *, within_hours: int = 24) -> int:
        """Send the alerts of recent dead letters that have no delivery on record (the process stopped before
        it could send them). Returns how many were sent."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(db.query("unalerted_dead_letters"), (within_hours,))
            rows = await cur.fetchall()
        for dead_letter_id, mentor_id, operation in rows:
            await self.sync_failure(mentor_id, operation, dead_letter_id)
        return len(rows)

    async def ops(self, data: Mapping[str, str]) -> None:
        """An operations alert to HLF_OPS_TOPIC."""
        await self.deliver(data, tokens=(), topic=self._ops_topic, mentor_id=None)

    async def deliver(
        self,
        data: Mapping[str, str],
        *,
        tokens: Sequence[str],
        topic: str | None,
        mentor_id: UUID | None,
        dead_letter_id: int | None = None,
        record: bool = True,
    ) -> list[Delivery]:
        """Send, retrying what FCM says may succeed later; record each delivery unless ``record`` is False (a
        caller sending thousands records ``events(...)`` in batches of its own)."""
        # The sender answers one Delivery per target, device tokens first and the topic last.
        pending_tokens, pending_topic = list(tokens), topic
        final: list[Delivery] = []
        for delay in (*self._retry_delays_s, None):
            targets: list[tuple[str, str]] = [("token", t) for t in pending_tokens]
            if pending_topic:
                targets.append(("topic", pending_topic))
            results = await self._sender.send(data, tokens=pending_tokens, topic=pending_topic)
            pending_tokens, pending_topic = [], None
            for (kind, target), result in zip(targets, results, strict=True):
                if result.ok or not result.retryable or delay is None:
                    final.append(result)
                elif kind == "token":
                    pending_tokens.append(target)
                else:
                    pending_topic = target
            if not pending_tokens and pending_topic is None:
                break
            assert delay is not None
            await anyio.sleep(delay)
        if record:
            await self._record(mentor_id, final, data, dead_letter_id)
        else:
            self._log(mentor_id, final, data)
        return final

    @staticmethod
    def events(
        mentor_id: UUID | None,
        results: Sequence[Delivery],
        data: Mapping[str, str],
        dead_letter_id: int | None = None,
    ) -> list[NewEvent]:
        """The alert_sent / alert_failed events that record these deliveries."""
        alert = data.get("type", "unknown")
        return [
            NewEvent(
                mentor_id,
                AlertSent(alert=alert, target=r.target, message_id=r.message_id, dead_letter_id=dead_letter_id)
                if r.ok
                else AlertFailed(
                    alert=alert,
                    target=r.target,
                    error=r.error or "unknown error",
                    unregistered=r.unregistered,
                    dead_letter_id=dead_letter_id,
                ),
            )
            for r in results
        ]

    @staticmethod
    def _log(mentor_id: UUID | None, results: Sequence[Delivery], data: Mapping[str, str]) -> None:
        alert = data.get("type", "unknown")
        log = logger.bind(mentor_id=str(mentor_id) if mentor_id else None)
        for r in results:
            if r.ok:
                log.info("alert {} delivered to {}", alert, r.target)
            else:
                log.warning("alert {} not delivered to {}: {}", alert, r.target, r.error)

    async def _record(
        self,
        mentor_id: UUID | None,
        results: Sequence[Delivery],
        data: Mapping[str, str],
        dead_letter_id: int | None = None,
    ) -> None:
        events = self.events(mentor_id, results, data, dead_letter_id)
        self._log(mentor_id, results, data)
        if events:
            async with self._pool.connection() as conn, conn.transaction():
                await projections.append(conn, events)
