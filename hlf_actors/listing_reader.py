"""One read of the public listing, all its pages, judged: structured (JSON rows), HTML that proves it is the
listing (a mentor known to be listed, or the configured marker, is on it), or unrecognised. ``listing_probe.py``'s
docstring draws the modes and decides what a read proves about each watch; ``listing_page.py`` fetches one page.
"""

from __future__ import annotations

import html
import json
from collections.abc import Awaitable, Callable

import httpx

from .config import Config
from .errors import ListingUnavailable
from .events import Operation
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

__all__ = ["MAX_PAGES", "ListingReader"]

MAX_PAGES = 50  # pages of one listing read; a longer listing is read as cut short (no absence is concluded)


class ListingReader:
    """Reads ``HLF_PUBLIC_LISTING_URL`` for the probe, each page a conditional GET."""

    def __init__(self, config: Config, *, timeout_s: float) -> None:
        assert config.public_listing_url
        self._url = config.public_listing_url
        self._match = config.public_listing_match
        self._key_field = config.dynamics_key_field.lower()
        self._listed_field = config.dynamics_listed_field.lower()
        self._marker = config.public_listing_marker
        self._page_param = config.public_listing_page_param
        # Redirects are followed (http → https, a moved page): where they end is judged like any page, and a sign-in
        # page is then told apart by having no listed mentor on it.
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), follow_redirects=True)
        self._validators: dict[str, tuple[str | None, str | None, Page]] = {}

    async def aclose(self) -> None:
        await self._http.aclose()

    async def read(
        self, known_listed: Callable[[], Awaitable[list[str]]], watched: Callable[[], list[tuple[Operation, str]]]
    ) -> Listing:
        """All pages of the listing, judged: structured, HTML, or unrecognised. Raises ListingUnavailable.

        ``known_listed`` (asked only for an HTML page) names mentors the website shows now; ``watched`` what the
        probe's open watches look for, read as the pages arrive."""
        status, page = await get_page(self._http, self._url, self._validators)
        if status != 200:
            return self._refused(status, page)
        if is_json(page):
            return await self._read_structured(page)
        return await self._read_html(page, known_listed, watched)

    def _refused(self, status: int, page: Page) -> Listing:
        if status >= 500 or status == 429:
            raise ListingUnavailable(f"GET answered {status}")
        what = error_json(page.text) if is_json(page) else page_title(page.text)
        return Listing(structured=False, problem=f"GET answered {status}" + (f" ({what})" if what else ""))

    async def _read_structured(self, first: Page) -> Listing:
        listing = Listing(structured=True)
        page: Page | None = first
        url = self._url
        for _ in range(MAX_PAGES):
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

    async def _read_html(
        self,
        first: Page,
        known_listed: Callable[[], Awaitable[list[str]]],
        watched: Callable[[], list[tuple[Operation, str]]],
    ) -> Listing:
        listing = Listing(structured=False)
        known = await known_listed()
        page, url, number = first, self._url, 1
        seen_pages: set[str] = set()
        while True:
            if page.text in seen_pages:  # a site that clamps ?page= to its last page
                break
            seen_pages.add(page.text)
            found_ids = set(GUID.findall(page.text.lower()))
            words = visible_words(page.text)
            if (
                number > 1
                and self._page_param
                and not self._has_rows(found_ids, words, known + [key for _, key in watched()])
            ):
                break
            listing.raw.append(page.text)
            listing.ids |= found_ids
            listing.words += words.lstrip()
            next_url = self._next_page(page.text, url, number)
            if next_url is None:
                break
            if number >= MAX_PAGES:
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
            control = any(operation == "restore" and listing.shows(self._match, key) for operation, key in watched())
        if not control:
            moved = f", redirected to {httpx.URL(first.redirected_to).path}" if first.redirected_to else ""
            title = page_title(first.text)
            listing.problem = (
                "the page is not recognisably the listing: no mentor known to be listed and no"
                f" HLF_PUBLIC_LISTING_MARKER on it (title {title!r}{moved}; rows loaded by the browser?)"
            )
        return listing

    def _has_rows(self, ids: set[str], words: str, names: list[str]) -> bool:
        """Page N of a ``?page=N`` list: does it hold any mentor we know of (past the end, it holds none)?"""
        if self._match == "portal_record_id":
            return bool(ids)
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
