"""The public listing probe: after a successful sync, does the public website agree, as far as we actually saw?

A 204 from Dataverse is not what the public sees: Power Pages caches Dataverse data server-side and shows a change
made through the Web API when that cache refreshes ("within 15 minutes", not reducible from our side). With
``HLF_PUBLIC_LISTING_URL`` set, every successful PATCH opens a *watch*: the mentor must be absent from the listing
after a removal, present after a restore. A probe that can lie is worse than none, so a fetch only counts when it
shows what it is:

    structured     the URL answers JSON: the portals Web API (``/_api/<set>?$select=<key>&$filter=<listed> eq
                   true``) or a Liquid template rendering the same query; rows in ``value``, pages followed through
                   ``@odata.nextLink``; a mentor is listed iff its record id is one of the rows (exact match).
                   This reads through the same server-side cache as the public list.
    html+control   an HTML page, which proves nothing by itself: a sign-in page, a firewall page or a stock Power
                   Pages list (its rows arrive later, by a browser POST to /_services/entity-grid-data.json/...)
                   all lack the mentor too. It counts only if the same fetch shows it is the listing: a mentor we
                   know is listed is on it (whole-token match of the record id or the full name), or the configured
                   ``HLF_PUBLIC_LISTING_MARKER`` is. Pages are followed by ``rel="next"`` or
                   ``HLF_PUBLIC_LISTING_PAGE_PARAM``, at most ``MAX_PAGES``; a listing cut short proves no absence.
    unrecognised   neither: no verdict. Counted (``hlf_public_listing_unrecognised_total``), logged once per
                   episode, and a watch still unconfirmed at the deadline goes stale with that reason.

The probe's verdicts:

    public_listing_confirmed   the first fetch that agreed: confirmed_by (structured / html+control), delay_ms
                               (success → agreement: the website's cache) and exposure_ms (the change → agreement)
    public_listing_stale       still no agreement at HLF_PUBLIC_LISTING_DEADLINE, plus one ops alert
                               {"type": "hlf_public_listing_stale", "mentor_id", "operation", "waited_s"}

The site is asked politely: one listing read per ``HLF_PUBLIC_LISTING_MIN_INTERVAL`` for the whole probe, shared by
every open watch, each page a conditional GET. A newer success for the same mentor replaces its watch. Nothing lives
only here: a new leader re-opens, from the log, every recent success that has no verdict yet, so a restart neither
loses a watch nor gives one two verdicts. Syncing never waits for the probe. Reading the listing (the modes above)
is ``listing_reader.py``'s; this module keeps the watches and records the verdicts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

import anyio
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from . import writer
from .alerts import Alerting
from .config import Config
from .errors import ListingUnavailable
from .events import Event, NewEvent, Operation, PublicListingConfirmed, PublicListingStale
from .listing_page import Listing
from .listing_reader import MAX_PAGES, ListingReader
from .metrics import Metrics

__all__ = ["ListingProbe"]

_KNOWN_LISTED = 500  # mentors offered as the positive control; finding any one of them is enough

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
# What a watch needs that the success event does not carry: the record id and name, and when the change was made.
_WATCH_DETAILS = """
SELECT w.mentor_id, m.portal_record_id, m.full_name, c.recorded_at
FROM unnest(%s::uuid[], %s::bigint[]) AS w(mentor_id, change_seq)
LEFT JOIN mentors m ON m.id = w.mentor_id
LEFT JOIN event_log c ON c.seq = w.change_seq
"""
# The positive control of HTML mode: mentors the website shows now. The longest in sync first: the website's cache
# has certainly caught up with them.
_KNOWN_LISTED_SQL = """
SELECT m.portal_record_id, m.full_name
FROM sync_status s JOIN mentors m ON m.id = s.mentor_id
WHERE s.operation = 'restore' AND s.state = 'in_sync'
ORDER BY s.updated_at
LIMIT %s
"""


@dataclass
class _Watch:
    mentor_id: UUID
    operation: Operation
    success_seq: int
    synced_at: datetime
    change_seq: int
    changed_at: datetime | None = None
    key: str | None = None  # the record id or name to look for; None until read from the database
    fetches: int = 0
    problem: str | None = None  # why the newest read gave this watch no verdict


class ListingProbe:
    def __init__(
        self,
        config: Config,
        pool: AsyncConnectionPool[Any],
        alerting: Alerting,
        metrics: Metrics,
        *,
        timeout_s: float = 30.0,
    ) -> None:
        assert config.public_listing_url
        self._match = config.public_listing_match
        self._deadline_s = config.public_listing_deadline_s
        self._min_interval_s = config.public_listing_min_interval_s
        self._pool = pool
        self._alerting = alerting
        self._metrics = metrics
        self._watches: dict[UUID, _Watch] = {}
        self._new = anyio.Event()
        self._reader = ListingReader(config, timeout_s=timeout_s)
        self._last_read: float | None = None  # anyio clock
        self._trouble: str | None = None  # the current episode of unreadable or unrecognised reads

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
                if not self._watches:
                    await self._new.wait()
                    self._new = anyio.Event()
                    continue
                # The floor on how often the site is asked: a new watch waits for the next read, shared by all.
                if self._last_read is not None:
                    await anyio.sleep_until(self._last_read + self._min_interval_s)
                self._new = anyio.Event()
                await self._details()
                await self._poll()
        finally:
            with anyio.CancelScope(shield=True):
                await self._reader.aclose()

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
        """Read the record id or name and the change's time of every watch that lacks them, in one query."""
        new = [w for w in self._watches.values() if w.key is None]
        if not new:
            return
        async with self._pool.connection() as conn:
            cur = await conn.execute(_WATCH_DETAILS, ([w.mentor_id for w in new], [w.change_seq for w in new]))
            details = {row[0]: row[1:] for row in await cur.fetchall()}
        for w in new:
            record_id, name, changed_at = details.get(w.mentor_id, (None, None, None))
            key = str(record_id) if self._match == "portal_record_id" and record_id else name
            w.key = (key or "").strip()
            w.changed_at = changed_at

    def _watched(self) -> list[tuple[Operation, str]]:
        """What the open watches look for: a page showing a mentor being restored is the listing too."""
        return [(w.operation, w.key) for w in self._watches.values() if w.key]

    async def _known_listed(self) -> list[str]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(_KNOWN_LISTED_SQL, (_KNOWN_LISTED,))
            rows = await cur.fetchall()
        column = 0 if self._match == "portal_record_id" else 1
        return [str(row[column]) for row in rows if row[column]]

    # -- verdicts ---------------------------------------------------------------------------------------------

    async def _poll(self) -> None:
        watches = [w for w in self._watches.values() if w.key is not None]
        if not watches:
            return
        self._last_read = anyio.current_time()
        listing: Listing | None
        try:
            listing = await self._reader.read(self._known_listed, self._watched)
            problem = listing.problem
        except ListingUnavailable as err:
            listing, problem = None, f"public site unreachable: {err}"
        seen_at = datetime.now(UTC)
        self._episode(problem, unrecognised=listing is not None)
        events: list[NewEvent] = []
        stale: list[_Watch] = []
        for w in watches:
            w.fetches += 1
            waited_ms = int((seen_at - w.synced_at).total_seconds() * 1000)
            how = self._agrees(w, listing, problem)
            if how is not None:
                exposure_ms = max(0, int((seen_at - (w.changed_at or w.synced_at)).total_seconds() * 1000))
                events.append(
                    NewEvent(
                        w.mentor_id,
                        PublicListingConfirmed(
                            operation=w.operation,
                            for_seq=w.success_seq,
                            delay_ms=max(0, waited_ms),
                            exposure_ms=exposure_ms,
                            fetches=w.fetches,
                            confirmed_by=how,
                        ),
                    )
                )
                self._metrics.public_exposure.observe(exposure_ms / 1000)
            elif waited_ms >= self._deadline_s * 1000:
                events.append(
                    NewEvent(
                        w.mentor_id,
                        PublicListingStale(
                            operation=w.operation, for_seq=w.success_seq, waited_ms=waited_ms, reason=self._reason(w)
                        ),
                    )
                )
                stale.append(w)
            else:
                continue
            if self._watches.get(w.mentor_id) is w:
                del self._watches[w.mentor_id]
        if events:
            async with self._pool.connection() as conn, conn.transaction():
                await writer.append(conn, events)
        for w in stale:
            await self._stale_alert(w, seen_at)

    def _agrees(
        self, w: _Watch, listing: Listing | None, problem: str | None
    ) -> Literal["structured", "html+control"] | None:
        """How this read confirms the watch, or None. An absence needs the whole, recognised listing."""
        if listing is None or problem is not None or not w.key:
            w.problem = problem
            return None
        shown = listing.shows(self._match, w.key)
        if w.operation == "restore" and not shown:
            w.problem = None
            return None
        if w.operation == "remove" and (shown or not listing.complete):
            w.problem = None if shown else f"the listing has more than {MAX_PAGES} pages: an absence is unproven"
            return None
        return "structured" if listing.structured else "html+control"

    def _reason(self, w: _Watch) -> str:
        if not w.key:
            return f"no {self._match} to look for on the listing"
        if w.problem:
            return w.problem if w.problem.startswith("public site") else f"public listing unrecognised: {w.problem}"
        return "the listing still shows the mentor" if w.operation == "remove" else "the mentor is missing"

    async def _stale_alert(self, w: _Watch, seen_at: datetime) -> None:
        self._metrics.public_stale.inc()
        waited_s = (seen_at - w.synced_at).total_seconds()
        logger.bind(mentor_id=str(w.mentor_id)).warning(
            "the public website gave no agreement with the {} sent {:.0f}s ago ({}): see the runbook",
            w.operation,
            waited_s,
            self._reason(w),
        )
        data = {
            "type": "hlf_public_listing_stale",
            "mentor_id": str(w.mentor_id),
            "operation": w.operation,
            "waited_s": str(int(waited_s)),
        }
        try:
            await self._alerting.ops(data)
        except Exception as err:  # the verdict is recorded; a failed push must not stop the probe
            logger.opt(exception=err).error("could not send the stale-listing alert: {}", err)

    def _episode(self, problem: str | None, *, unrecognised: bool) -> None:
        """Count every unrecognised read; log once when trouble starts or changes, and once when it ends."""
        if problem is not None and unrecognised:
            self._metrics.public_unrecognised.inc()
        if problem == self._trouble:
            return
        if problem is None:
            logger.info("listing probe: the public listing can be read and recognised again")
        elif unrecognised:
            logger.warning("listing probe: the public listing proves nothing, no verdicts until it does: {}", problem)
        else:
            logger.warning("listing probe: the public listing cannot be read ({}); retrying, syncing goes on", problem)
        self._trouble = problem
