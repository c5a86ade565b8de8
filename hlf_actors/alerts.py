"""Who gets which alert, and the record of every delivery in ``event_log``.

Sending is never on the sync path: the service starts each alert as its own task, so an FCM outage delays only the
alert. Each delivery becomes an ``alert_sent`` or ``alert_failed`` event.

Pushes to coordinators (sync failures, and expiry reminders through ``deliver``): a delivery FCM says may succeed
later is tried again a few times. A device whose token FCM calls dead (UNREGISTERED, SENDER_ID_MISMATCH,
INVALID_ARGUMENT about the token) is written to ``hlf_dead_devices`` with a ``device_dead`` event naming its
``coordinator_devices.id``; the target queries skip it from then on, until the app writes a new token for it.

Operations alerts (``ops``, the one entry point for every ops alert) fan out to every configured ops channel
(``ops_channels``: the FCM topic, the Teams/Slack webhook, e-mail) through a durable outbox:

    ops(data) ── one hlf_ops_outbox row per channel (leased to this process) ──▶ send on every channel at once
        delivered ─▶ delivered_at, alert_sent
        failed ────▶ next_at = now + backoff (5 s, 10 s, … 15 min), alert_failed(will_retry=true)
    drain (the leader, every few seconds) ── claims due rows FOR UPDATE SKIP LOCKED, leases them, sends, settles
        a row 24 h old is given up: gave_up_at, alert_failed(will_retry=false)

One row per (alert, channel), settled once: a channel that took the alert is never sent it again, also across a
restart (the next leader drains what is left). Only a process killed between a send and its settle would send
that one channel twice, after the lease.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final
from uuid import UUID, uuid4

import anyio
import psycopg
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from . import db, writer
from .events import AlertFailed, AlertSent, DeviceDead, NewEvent, Operation
from .ops_channels import ChannelResult, FcmTopicChannel, OpsChannel
from .push import AlertSender, Delivery, Notice

__all__ = ["Alerting", "sync_failure_notice"]

# Waits between tries of a delivery that FCM said could succeed later.
_RETRY_DELAYS_S = (1.0, 5.0, 20.0)
# The outbox: first retry after base, doubling up to max; a row is given up at max_age.
_OUTBOX_BACKOFF_S: Final = (5.0, 900.0)
_OUTBOX_MAX_AGE_S: Final = 24 * 3600.0
# A row being sent belongs to its sender this long; longer than any one send (timeouts, firebase-admin's retries).
_OUTBOX_LEASE_S: Final = 600.0
_OUTBOX_BATCH: Final = 100

_OUTBOX_INSERT = """
INSERT INTO hlf_ops_outbox (alert_id, channel, data, attempts, next_at)
SELECT %s, c, %s::jsonb, 1, clock_timestamp() + make_interval(secs => %s) FROM unnest(%s::text[]) AS c
RETURNING id, channel
"""

# Claim what is due: lease it (next_at) and count the attempt before sending, so a second drainer skips it.
_OUTBOX_CLAIM = """
UPDATE hlf_ops_outbox o SET attempts = o.attempts + 1, next_at = clock_timestamp() + make_interval(secs => %s)
WHERE o.id IN (SELECT id FROM hlf_ops_outbox
               WHERE delivered_at IS NULL AND gave_up_at IS NULL AND next_at <= clock_timestamp()
               ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)
RETURNING o.id, o.channel, o.data::text, o.attempts, o.created_at < clock_timestamp() - make_interval(secs => %s)
"""

_OUTBOX_DELIVERED = "UPDATE hlf_ops_outbox SET delivered_at = clock_timestamp(), last_error = NULL WHERE id = %s"
_OUTBOX_RETRY = """
UPDATE hlf_ops_outbox SET next_at = clock_timestamp() + make_interval(secs => %s), last_error = %s WHERE id = %s
RETURNING created_at < clock_timestamp() - make_interval(secs => %s)
"""
_OUTBOX_GIVE_UP = "UPDATE hlf_ops_outbox SET gave_up_at = clock_timestamp(), last_error = %s WHERE id = %s"
# Settled rows are only history (the events keep it): a week is enough to look at an incident.
_OUTBOX_PRUNE = """
DELETE FROM hlf_ops_outbox
WHERE coalesce(delivered_at, gave_up_at) < clock_timestamp() - interval '7 days'
"""

# A device is dead only with the token it had when FCM said so; a new token makes it live again.
_MARK_DEAD = """
INSERT INTO hlf_dead_devices (device_id, fcm_token, organisation_id, reason)
SELECT d.id::text, d.fcm_token, d.organisation_id, %s FROM coordinator_devices d
WHERE d.id::text = %s AND d.fcm_token = %s
ON CONFLICT DO NOTHING
RETURNING device_id, organisation_id
"""


def sync_failure_notice(full_name: str | None, operation: Operation) -> Notice:
    """What a coordinator's phone shows for a dead-lettered sync."""
    name = full_name or "a mentor"
    if operation == "remove":
        return Notice(
            title=f"Could not remove {name} from the public listing",
            body="They may still show on the public website. Retries have stopped; ask an operator to re-queue it.",
        )
    return Notice(
        title=f"Could not restore {name} to the public listing",
        body="They stay off the public website until this is fixed. Retries have stopped.",
    )


class Alerting:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        sender: AlertSender,
        *,
        ops_topic: str,
        retry_delays_s: Sequence[float] = _RETRY_DELAYS_S,
        ops_channels: Sequence[OpsChannel] | None = None,
        outbox_backoff_s: tuple[float, float] = _OUTBOX_BACKOFF_S,
        outbox_max_age_s: float = _OUTBOX_MAX_AGE_S,
    ) -> None:
        """``ops_channels`` defaults to the FCM topic alone; ``ops_channels.build_ops_channels`` gives all the
        configured ones."""
        self._pool = pool
        self._sender = sender
        self._ops_topic = ops_topic
        self._retry_delays_s = tuple(retry_delays_s)
        self._ops_channels: dict[str, OpsChannel] = {
            c.name: c for c in (ops_channels if ops_channels is not None else [FcmTopicChannel(sender, ops_topic)])
        }
        self._outbox_backoff_s = outbox_backoff_s
        self._outbox_max_age_s = outbox_max_age_s

    @property
    def ops_channel_names(self) -> list[str]:
        return list(self._ops_channels)

    async def sync_failure(self, mentor_id: UUID, operation: Operation, dead_letter_id: int) -> None:
        """Tell the mentor's organisation that a sync was dead-lettered."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(db.query("alert_targets"), (mentor_id,))
            row = await cur.fetchone()
        topic, tokens, devices, full_name = (
            (row[0], list(row[1]), list(row[2]), row[3]) if row else (None, [], [], None)
        )
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
        await self.deliver(
            data,
            tokens=tokens,
            devices=devices,
            topic=topic,
            mentor_id=mentor_id,
            dead_letter_id=dead_letter_id,
            notice=sync_failure_notice(full_name, operation),
        )

    async def resend_unsent(self, *, within_hours: int = 24) -> int:
        """Send the alerts of recent dead letters that have no delivery on record (the process stopped before
        it could send them). Returns how many were sent."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(db.query("unalerted_dead_letters"), (within_hours,))
            rows = await cur.fetchall()
        for dead_letter_id, mentor_id, operation in rows:
            await self.sync_failure(mentor_id, operation, dead_letter_id)
        return len(rows)

    # -- operations alerts ---------------------------------------------------------------------------------------

    async def ops(self, data: Mapping[str, str]) -> None:
        """An operations alert, to every configured ops channel; what fails waits in the outbox."""
        payload = dict(data)
        for key, value in payload.items():
            if not isinstance(value, str):
                raise TypeError(f"alert data values must all be strings; {key!r} is {type(value).__name__}")
        channels = list(self._ops_channels.values())
        if not channels:
            logger.warning("ops alert {} not sent: no ops channel is configured", payload.get("type"))
            await self._append([NewEvent(None, _failed(payload, "none", "no ops channel configured"))])
            return
        rows: dict[str, int] = {}
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    _OUTBOX_INSERT,
                    (uuid4(), json.dumps(payload), _OUTBOX_LEASE_S, [c.name for c in channels]),
                )
                rows = {channel: row_id for row_id, channel in await cur.fetchall()}
        except psycopg.Error as err:  # no outbox without the database: still try once, now
            logger.error("ops alert {} not kept for re-sending (database: {}); sending once", payload.get("type"), err)
        results = await _send_all(channels, payload)
        await self._settle([(rows.get(r.channel), r, 1, False) for r in results], payload)

    async def drain_outbox(self) -> int:
        """Send again every outbox row that is due; returns how many were tried."""
        async with self._pool.connection() as conn:
            await conn.execute(_OUTBOX_PRUNE)
            cur = await conn.execute(_OUTBOX_CLAIM, (_OUTBOX_LEASE_S, _OUTBOX_BATCH, self._outbox_max_age_s))
            claimed = await cur.fetchall()
        if not claimed:
            return 0
        by_payload: dict[str, list[tuple[int, str, int, bool]]] = {}
        for row_id, channel, data, attempts, expired in claimed:
            by_payload.setdefault(data, []).append((row_id, channel, attempts, expired))
        for data, rows in by_payload.items():
            payload: dict[str, str] = json.loads(data)
            due = [r for r in rows if not r[3] and r[1] in self._ops_channels]
            results = await _send_all([self._ops_channels[r[1]] for r in due], payload)
            settled = [(r[0], result, r[2], False) for r, result in zip(due, results, strict=True)]
            for row_id, channel, attempts, expired in rows:
                if expired or channel not in self._ops_channels:
                    why = "24 h old" if expired else "channel no longer configured"
                    settled.append((row_id, ChannelResult(channel, channel, ok=False, error=why), attempts, True))
            await self._settle(settled, payload)
        return len(claimed)

    async def drain_outbox_forever(self, leadership_wait: Callable[[], Awaitable[None]], every_s: float) -> None:
        """The leader's loop that re-sends failed ops alerts until they are delivered or given up."""
        while True:
            await leadership_wait()
            try:
                while await self.drain_outbox() == _OUTBOX_BATCH:
                    pass
            except Exception as err:  # the next round tries again; syncing must go on
                logger.opt(exception=err).error("ops alert outbox: {}", err)
            await anyio.sleep(every_s)

    async def _settle(
        self, results: Sequence[tuple[int | None, ChannelResult, int, bool]], payload: Mapping[str, str]
    ) -> None:
        """Record each channel's outcome in the outbox and the log: delivered, retried later, or given up."""
        events: list[NewEvent] = []
        async with self._pool.connection() as conn:
            for row_id, r, attempts, give_up in results:
                alert = payload.get("type", "unknown")
                if r.ok:
                    if row_id is not None:
                        await conn.execute(_OUTBOX_DELIVERED, (row_id,))
                    events.append(NewEvent(None, AlertSent(alert=alert, target=r.target, message_id=r.message_id)))
                    logger.info("ops alert {} delivered to {}", alert, r.target)
                    continue
                error = r.error or "unknown error"
                retry = row_id is not None and not give_up
                if retry:
                    base, cap = self._outbox_backoff_s
                    delay = min(base * 2 ** (attempts - 1), cap)
                    cur = await conn.execute(_OUTBOX_RETRY, (delay, error, row_id, self._outbox_max_age_s))
                    row = await cur.fetchone()
                    if row and row[0]:  # a last try past 24 h: no more
                        retry, give_up = False, True
                if give_up and row_id is not None:
                    await conn.execute(_OUTBOX_GIVE_UP, (error, row_id))
                    error = f"gave up after {attempts} attempt(s): {error}"
                events.append(NewEvent(None, _failed(payload, r.target, error, will_retry=retry)))
                logger.warning(
                    "ops alert {} not delivered to {}: {}{}", alert, r.target, error, "; will retry" if retry else ""
                )
        await self._append(events)

    # -- pushes to coordinators -----------------------------------------------------------------------------------

    async def deliver(
        self,
        data: Mapping[str, str],
        *,
        tokens: Sequence[str],
        topic: str | None,
        mentor_id: UUID | None,
        dead_letter_id: int | None = None,
        record: bool = True,
        devices: Sequence[UUID | None] = (),
        notice: Notice | None = None,
    ) -> list[Delivery]:
        """Send, retrying what FCM says may succeed later; record each delivery unless ``record`` is False (a
        caller sending thousands records ``events(...)`` in batches of its own). ``devices`` are the
        ``coordinator_devices.id`` of ``tokens``, in order: a dead token marks its device dead, record or not."""
        device_of = dict(zip(tokens, devices, strict=False))
        # The sender answers one Delivery per target, device tokens first and the topic last.
        pending_tokens, pending_topic = list(tokens), topic
        final: list[Delivery] = []
        dead: list[tuple[UUID, str, str]] = []
        for delay in (*self._retry_delays_s, None):
            targets: list[tuple[str, str]] = [("token", t) for t in pending_tokens]
            if pending_topic:
                targets.append(("topic", pending_topic))
            results = await self._sender.send(data, tokens=pending_tokens, topic=pending_topic, notice=notice)
            pending_tokens, pending_topic = [], None
            for (kind, target), result in zip(targets, results, strict=True):
                if result.ok or not result.retryable or delay is None:
                    final.append(result)
                    device = device_of.get(target) if kind == "token" else None
                    if result.dead and device is not None:
                        dead.append((device, target, result.code or "UNREGISTERED"))
                elif kind == "token":
                    pending_tokens.append(target)
                else:
                    pending_topic = target
            if not pending_tokens and pending_topic is None:
                break
            assert delay is not None
            await anyio.sleep(delay)
        if dead:
            await self._mark_dead(dead, data.get("type", "unknown"))
        if record:
            await self._record(mentor_id, final, data, dead_letter_id)
        else:
            self._log(mentor_id, final, data)
        return final

    async def _mark_dead(self, dead: Sequence[tuple[UUID, str, str]], alert: str) -> None:
        events: list[NewEvent] = []
        async with self._pool.connection() as conn, conn.transaction():
            for device_id, token, reason in dead:
                cur = await conn.execute(_MARK_DEAD, (reason, device_id, token))
                row = await cur.fetchone()
                if row is not None:  # not already dead, and the app did not change the token meanwhile
                    events.append(
                        NewEvent(None, DeviceDead(device_id=row[0], organisation_id=row[1], reason=reason, alert=alert))
                    )
                    logger.bind(device_id=str(device_id)).warning(
                        "coordinator device {} is dead ({}): not targeted again until the app writes a new token",
                        device_id,
                        reason,
                    )
            if events:
                await writer.append(conn, events)

    async def _append(self, events: Sequence[NewEvent]) -> None:
        if events:
            async with self._pool.connection() as conn, conn.transaction():
                await writer.append(conn, events)

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
                await writer.append(conn, events)


def _failed(payload: Mapping[str, str], target: str, error: str, *, will_retry: bool = False) -> AlertFailed:
    return AlertFailed(alert=payload.get("type", "unknown"), target=target, error=error, will_retry=will_retry)


async def _send_all(channels: Sequence[OpsChannel], payload: Mapping[str, str]) -> list[ChannelResult]:
    """Send on every channel at once: a slow or failing one delays no other. Answers in ``channels`` order."""
    results: list[ChannelResult | None] = [None] * len(channels)

    async def one(i: int, channel: OpsChannel) -> None:
        try:
            results[i] = await channel.send(payload)
        except Exception as err:  # a bug or an unforeseen failure in one channel must not lose the others
            logger.opt(exception=err).error("ops channel {} failed: {}", channel.name, err)
            results[i] = ChannelResult(channel.name, channel.name, ok=False, error=f"{type(err).__name__}")

    async with anyio.create_task_group() as tg:
        for i, channel in enumerate(channels):
            tg.start_soon(one, i, channel)
    return [r for r in results if r is not None]
