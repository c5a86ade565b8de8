"""The public listing probe: after a successful sync, does the public website agree?

A 204 from Dataverse is not what the public sees: Power Pages caches Dataverse data server-side and shows a change
made through the Web API when that cache refreshes ("within 15 minutes", not reducible from our side). With
``HLF_PUBLIC_LISTING_URL`` set, every successful PATCH opens a *watch*: the mentor must be absent from the listing
after a removal, present after a restore, matched by ``HLF_PUBLIC_LISTING_MATCH`` (the portal record id, or the
mentor's name). The probe fetches the listing once per poll for every open watch (conditional GET), and appends

    public_listing_confirmed   the first fetch that agreed: delay_ms (success → agreement, the website's cache)
                               and exposure_ms (the change → agreement, what the public actually saw)
    public_listing_stale       still disagreeing at HLF_PUBLIC_LISTING_DEADLINE, plus one ops alert
                               {"type": "hlf_public_listing_stale", "mentor_id", "operation", "waited_s"}

Polls back off per watch (first at once, then 0.5 s growing ×1.5 up to 30 s); a newer success for the same mentor
replaces its watch. Nothing lives only here: a new leader re-opens, from the log, every recent success that has no
verdict yet, so a restart neither loses a watch nor gives one two verdicts. Syncing never waits for the probe; the
website being down is logged (once per outage), retried, and ends in ``public_listing_stale`` at the deadline.
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import anyio
import httpx
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from . import projections
from .alerting import Alerting
from .config import Config
from .events import Event, NewEvent, Operation, PublicListingConfirmed, PublicListingStale
from .metrics import Metrics

__all__ = ["ListingProbe", "ListingUnavailable"]

_MAX_BODY = 20 * 1024 * 1024  # a listing larger than this is not a listing

# The newest success of each mentor within the window that has no verdict yet: what a new leader re-opens.
_OPEN_WATCHES = """
SELECT DISTINCT ON (e.mentor_id) e.mentor_id, e.seq, e.recorded_at, e.data ->> 'operation',
       (e.data ->> 'for_seq')::bigint
FROM event_log e
WHERE e.kind = 'attempt_succeeded' AND e.recorded_at > now() - make_interval(secs => %s)
ORDER BY e.mentor_id, e.seq DESC
"""
_VERDICTS = """
SELECT (data ->> 'for_seq')::bigint FROM event_log
WHERE kind IN ('public_listing_confirmed', 'public_listing_stale') AND mentor_id = ANY(%s)
  AND (data ->> 'for_seq')::bigint = ANY(%s)
"""
# What a watch needs that the success event does not carry: the marker, and when the change it answered was made.
_WATCH_DETAILS = """
SELECT w.mentor_id, m.portal_record_id, m.full_name, c.recorded_at
FROM unnest(%s::uuid[], %s::bigint[]) AS w(mentor_id, change_seq)
LEFT JOIN mentors m ON m.id = w.mentor_id
LEFT JOIN event_log c ON c.seq = w.change_seq
"""


class ListingUnavailable(Exception):
    """The public listing could not be read (down, an error status, an oversized body)."""


@dataclass
class _Watch:
    mentor_id: UUID
    operation: Operation
    success_seq: int
    synced_at: datetime
    change_seq: int
    changed_at: datetime | None = None
    marker: str | None = None  # lower-cased text to look for; None until read from the database
    next_at: float = 0.0  # anyio clock
    interval_s: float = 0.0
    fetches: int = 0


class ListingProbe:
    def __init__(
        self,
        config: Config,
        pool: AsyncConnectionPool[Any],
        alerting: Alerting,
        metrics: Metrics,
        *,
        first_interval_s: float = 0.5,
        growth: float = 1.5,
        max_interval_s: float = 30.0,
        timeout_s: float = 30.0,
    ) -> None:
        assert config.public_listing_url
        self._url = config.public_listing_url
        self._match = config.public_listing_match
        self._deadline_s = config.public_listing_deadline_s
        self._pool = pool
        self._alerting = alerting
        self._metrics = metrics
        self._first_s, self._growth, self._max_s = first_interval_s, growth, max_interval_s
        self._watches: dict[UUID, _Watch] = {}
        self._new = anyio.Event()
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), follow_redirects=True)
        self._etag: str | None = None
        self._last_modified: str | None = None
        self._body = ""
        self._down_since: datetime | None = None
        self.fetches = 0

    # -- the actors' side -------------------------------------------------------------------------------------

    def watch(self, mentor_id: UUID, operation: Operation, succeeded: Event) -> None:
        """Open (or replace) the mentor's watch after a successful PATCH. Never blocks."""
        payload = succeeded.payload
        change_seq = getattr(payload, "for_seq", succeeded.seq)
        self._watches[mentor_id] = _Watch(mentor_id, operation, succeeded.seq, succeeded.recorded_at, change_seq)
        self._new.set()

    # -- the loop ---------------------------------------------------------------------------------------------

    async def run(self, leadership: Callable[[], Awaitable[None]]) -> None:
        try:
            await leadership()
            await self._resume()
            while True:
                await leadership()
                await self._details()
                if not self._watches:
                    await self._new.wait()
                    self._new = anyio.Event()
                    continue
                due = min(w.next_at for w in self._watches.values())
                with anyio.move_on_after(max(0.0, due - anyio.current_time())):
                    await self._new.wait()
                if self._new.is_set():
                    self._new = anyio.Event()
                    await self._details()
                await self._poll()
        finally:
            with anyio.CancelScope(shield=True):
                await self._http.aclose()

    async def _resume(self) -> None:
        """Re-open from the log the watches a previous leader left without a verdict."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(_OPEN_WATCHES, (self._deadline_s + 60,))
            rows = await cur.fetchall()
            if not rows:
                return
            cur = await conn.execute(_VERDICTS, ([r[0] for r in rows], [r[1] for r in rows]))
            decided = {r[0] for r in await cur.fetchall()}
        resumed = 0
        for mentor_id, seq, at, operation, change_seq in rows:
            if seq in decided or mentor_id in self._watches or operation not in ("remove", "restore"):
                continue
            self._watches[mentor_id] = _Watch(mentor_id, operation, seq, at, change_seq or seq)
            resumed += 1
        if resumed:
            logger.info("listing probe: {} sync(s) still waiting for the public website, watching again", resumed)

    async def _details(self) -> None:
        """Read the marker and the change's time of every watch that lacks them, in one query."""
        new = [w for w in self._watches.values() if w.marker is None]
        if not new:
            return
        async with self._pool.connection() as conn:
            cur = await conn.execute(_WATCH_DETAILS, ([w.mentor_id for w in new], [w.change_seq for w in new]))
            details = {row[0]: row[1:] for row in await cur.fetchall()}
        now = anyio.current_time()
        for w in new:
            record_id, name, changed_at = details.get(w.mentor_id, (None, None, None))
            marker = str(record_id) if self._match == "portal_record_id" else name
            w.marker = (marker or "").strip().lower()
            w.changed_at = changed_at
            w.next_at, w.interval_s = now, self._first_s

    async def _poll(self) -> None:
        now_clock = anyio.current_time()
        watches = [w for w in self._watches.values() if w.marker is not None]
        if not watches:
            return
        try:
            body = await self._fetch()
            error = None
        except ListingUnavailable as err:
            body, error = None, str(err)
        seen_at = datetime.now(UTC)
        for w in watches:
            w.fetches += 1
        events: list[NewEvent] = []
        stale: list[_Watch] = []
        for w in watches:
            waited_ms = int((seen_at - w.synced_at).total_seconds() * 1000)
            if body is not None and w.marker and (w.marker in body) == (w.operation == "restore"):
                exposure_ms = int((seen_at - (w.changed_at or w.synced_at)).total_seconds() * 1000)
                events.append(
                    NewEvent(
                        w.mentor_id,
                        PublicListingConfirmed(
                            operation=w.operation,
                            for_seq=w.success_seq,
                            delay_ms=max(0, waited_ms),
                            exposure_ms=max(0, exposure_ms),
                            fetches=w.fetches,
                        ),
                    )
                )
                self._metrics.public_exposure.observe(max(0, exposure_ms) / 1000)
            elif waited_ms >= self._deadline_s * 1000:
                reason = (
                    f"public site unreachable: {error}"
                    if error
                    else ("the listing still shows the mentor" if w.operation == "remove" else "the mentor is missing")
                )
                if not w.marker:
                    reason = f"no {self._match} to look for on the listing"
                events.append(
                    NewEvent(
                        w.mentor_id,
                        PublicListingStale(
                            operation=w.operation, for_seq=w.success_seq, waited_ms=waited_ms, reason=reason
                        ),
                    )
                )
                stale.append(w)
            else:
                w.next_at = now_clock + w.interval_s
                w.interval_s = min(self._max_s, w.interval_s * self._growth)
                continue
            if self._watches.get(w.mentor_id) is w:
                del self._watches[w.mentor_id]
        if events:
            async with self._pool.connection() as conn, conn.transaction():
                await projections.append(conn, events)
        for w in stale:
            self._metrics.public_stale.inc()
            logger.bind(mentor_id=str(w.mentor_id)).warning(
                "the public website still disagrees with the {} sent {:.0f}s ago: see the runbook's 'Clear cache' step",
                w.operation,
                (seen_at - w.synced_at).total_seconds(),
            )
            data = {
                "type": "hlf_public_listing_stale",
                "mentor_id": str(w.mentor_id),
                "operation": w.operation,
                "waited_s": str(int((seen_at - w.synced_at).total_seconds())),
            }
            try:
                await self._alerting.ops(data)
            except Exception as err:  # the verdict is recorded; a failed push must not stop the probe
                logger.opt(exception=err).error("could not send the stale-listing alert: {}", err)

    async def _fetch(self) -> str:
        """The listing's text, lower-cased and unescaped; a 304 reuses the last one."""
        headers = {}
        if self._etag:
            headers["If-None-Match"] = self._etag
        if self._last_modified:
            headers["If-Modified-Since"] = self._last_modified
        self.fetches += 1
        try:
            async with self._http.stream("GET", self._url, headers=headers) as response:
                if response.status_code == 304 and self._body:
                    self._recovered()
                    return self._body
                if response.status_code != 200:
                    raise ListingUnavailable(f"GET answered {response.status_code}")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > _MAX_BODY:
                        raise ListingUnavailable(f"the listing is larger than {_MAX_BODY // (1024 * 1024)} MB")
                    chunks.append(chunk)
                text = b"".join(chunks).decode(response.encoding or "utf-8", errors="replace")
                self._etag = response.headers.get("ETag")
                self._last_modified = response.headers.get("Last-Modified")
        except httpx.HTTPError as err:
            self._failed(f"{type(err).__name__}: {err}"[:200])
            raise ListingUnavailable(f"{type(err).__name__}: {err}"[:200]) from None
        except ListingUnavailable as err:
            self._failed(str(err))
            raise
        self._body = html.unescape(text).lower()
        self._recovered()
        return self._body

    def _failed(self, why: str) -> None:
        if self._down_since is None:
            self._down_since = datetime.now(UTC)
            logger.warning("listing probe: the public listing cannot be read ({}); retrying, syncing goes on", why)

    def _recovered(self) -> None:
        if self._down_since is not None:
            down_s = (datetime.now(UTC) - self._down_since).total_seconds()
            logger.info("listing probe: the public listing can be read again (after {:.0f}s)", down_s)
            self._down_since = None
