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
                   ``HLF_PUBLIC_LISTING_PAGE_PARAM``, at most ``_MAX_PAGES``; a listing cut short proves no absence.
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
loses a watch nor gives one two verdicts. Syncing never waits for the probe.
"""

from __future__ import annotations

import html
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

import anyio
import httpx
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from . import writer
from .alerts import Alerting
from .config import Config
from .errors import ListingUnavailable
from .events import Event, NewEvent, Operation, PublicListingConfirmed, PublicListingStale
from .listing_page import (
    GUID,
    HREF,
    LINK_TAG,
    REL_NEXT,
    Listing,
    Page,
    error_json,
    get_page,
    is_json,
    page_title,
    visible_words,
    words_of,
)
from .metrics import Metrics

__all__ = ["ListingProbe"]

_MAX_PAGES = 50  # pages of one listing read; a longer listing is read as cut short (no absence is concluded)
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
        self._url = config.public_listing_url
        self._match = config.public_listing_match
        self._key_field = config.dynamics_key_field.lower()
        self._listed_field = config.dynamics_listed_field.lower()
        self._marker = config.public_listing_marker
        self._page_param = config.public_listing_page_param
        self._deadline_s = config.public_listing_deadline_s
        self._min_interval_s = config.public_listing_min_interval_s
        self._pool = pool
        self._alerting = alerting
        self._metrics = metrics
        self._watches: dict[UUID, _Watch] = {}
        self._new = anyio.Event()
        # Redirects are followed (http → https, a moved page): where they end is judged like any page, and a sign-in
        # page is then told apart by having no listed mentor on it.
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), follow_redirects=True)
        self._validators: dict[str, tuple[str | None, str | None, Page]] = {}
        self._last_read: float | None = None  # anyio clock
        self._trouble: str | None = None  # the current episode of unreadable or unrecognised reads
        self.fetches = 0  # listing reads (each one or more page GETs)

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

    async def _known_listed(self) -> list[str]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(_KNOWN_LISTED_SQL, (_KNOWN_LISTED,))
            rows = await cur.fetchall()
        column = 0 if self._match == "portal_record_id" else 1
        return [str(row[column]) for row in rows if row[column]]

    # -- one read of the listing, and what it proves ------------------------------------------------------------

    async def _read(self) -> Listing:
        """All pages of the listing, judged: structured, HTML, or unrecognised. Raises ListingUnavailable."""
        self.fetches += 1
        status, page = await get_page(self._http, self._url, self._validators)
        if status != 200:
            return self._refused(status, page)
        if is_json(page):
            return await self._read_structured(page)
        return await self._read_html(page)

    def _refused(self, status: int, page: Page) -> Listing:
        if status >= 500 or status == 429:
            raise ListingUnavailable(f"GET answered {status}")
        what = error_json(page.text) if is_json(page) else page_title(page.text)
        return Listing(structured=False, problem=f"GET answered {status}" + (f" ({what})" if what else ""))

    async def _read_structured(self, first: Page) -> Listing:
        listing = Listing(structured=True)
        page: Page | None = first
        url = self._url
        for _ in range(_MAX_PAGES):
            assert page is not None
            try:
                body = json.loads(page.text)
            except ValueError:
                return Listing(structured=True, problem="the JSON listing does not parse")
            rows = body.get("value") if isinstance(body, dict) else body
            if not isinstance(rows, list):
                return Listing(structured=True, problem="JSON without a `value` list of rows")
            for row in rows:
                fields = {str(k).lower(): v for k, v in row.items()} if isinstance(row, dict) else {}
                if self._key_field not in fields:
                    return Listing(
                        structured=True,
                        problem=f"a row without {self._key_field} (add it to $select and Webapi/<table>/fields)",
                    )
                # Rows of a query without the $filter still say whether they are listed.
                if fields.get(self._listed_field, True) is not False:
                    listing.ids.add(str(fields[self._key_field]).lower())
            next_link = body.get("@odata.nextLink") if isinstance(body, dict) else None
            if not isinstance(next_link, str) or not next_link:
                return listing
            url = str(httpx.URL(url).join(next_link))
            status, page = await get_page(self._http, url, self._validators)
            if status != 200:
                raise ListingUnavailable(f"GET of the listing's next page answered {status}")
            if not is_json(page):
                return Listing(structured=True, problem="the next page of the JSON listing is not JSON")
        listing.complete = False
        return listing

    async def _read_html(self, first: Page) -> Listing:
        listing = Listing(structured=False)
        known = await self._known_listed()
        page, url, number = first, self._url, 1
        seen_pages: set[str] = set()
        while True:
            if page.text in seen_pages:  # a site that clamps ?page= to its last page
                break
            seen_pages.add(page.text)
            found_ids = set(GUID.findall(page.text.lower()))
            words = visible_words(page.text)
            if number > 1 and self._page_param and not self._has_rows(found_ids, words, known):
                break
            listing.raw.append(page.text)
            listing.ids |= found_ids
            listing.words += words.lstrip()
            next_url = self._next_page(page.text, url, number)
            if next_url is None:
                break
            if number >= _MAX_PAGES:
                listing.complete = False
                break
            status, page = await get_page(self._http, next_url, self._validators)
            if status == 404 and self._page_param:
                break
            if status != 200:
                raise ListingUnavailable(f"GET of page {number + 1} of the listing answered {status}")
            url, number = next_url, number + 1
        control = self._marker is not None and any(self._marker in raw for raw in listing.raw)
        if not control:
            control = any(listing.shows(self._match, key) for key in known)
        if not control:
            control = any(
                w.operation == "restore" and w.key and listing.shows(self._match, w.key) for w in self._watches.values()
            )
        if not control:
            moved = f", redirected to {httpx.URL(first.redirected_to).path}" if first.redirected_to else ""
            title = page_title(first.text)
            listing.problem = (
                "the page is not recognisably the listing: no mentor known to be listed and no"
                f" HLF_PUBLIC_LISTING_MARKER on it (title {title!r}{moved}; rows loaded by the browser?)"
            )
        return listing

    def _has_rows(self, ids: set[str], words: str, known: list[str]) -> bool:
        """Page N of a ``?page=N`` list: does it hold any mentor we know of (past the end, it holds none)?"""
        if self._match == "portal_record_id":
            return bool(ids)
        names = known + [w.key for w in self._watches.values() if w.key]
        return any(words_of(name) in words for name in names)

    def _next_page(self, text: str, url: str, number: int) -> str | None:
        if self._page_param:
            return str(httpx.URL(self._url).copy_set_param(self._page_param, str(number + 1)))
        for tag in LINK_TAG.findall(text):
            if REL_NEXT.search(tag):
                href = HREF.search(tag)
                if href:
                    target = html.unescape(next(g for g in href.groups() if g is not None))
                    return str(httpx.URL(url).join(target))
        return None

    # -- verdicts ---------------------------------------------------------------------------------------------

    async def _poll(self) -> None:
        watches = [w for w in self._watches.values() if w.key is not None]
        if not watches:
            return
        self._last_read = anyio.current_time()
        listing: Listing | None
        try:
            listing = await self._read()
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
            w.problem = None if shown else f"the listing has more than {_MAX_PAGES} pages: an absence is unproven"
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


