"""Reading the public listing: one page fetched politely, and what a page shows to a visitor.

The probe (``listing_probe.py``) decides what a read proves and ``listing_reader.py`` reads every page of the
listing; this module only fetches a page (a conditional GET, bounded in size) and turns it into what a visitor would
see: JSON rows, or an HTML page's visible words, links and title. Nothing here knows about watches, verdicts or the
database.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field

import httpx

from .errors import ListingUnavailable

__all__ = [
    "GUID",
    "HREF",
    "LINK_TAG",
    "REL_NEXT",
    "Listing",
    "Page",
    "error_json",
    "get_page",
    "is_json",
    "page_title",
    "visible_words",
    "words_of",
]

_MAX_BODY = 20 * 1024 * 1024  # a listing page larger than this is not a listing
GUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
_INVISIBLE = re.compile(r"<(script|style|template)\b.*?</\1\s*>|<!--.*?-->", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]*>")
_WORD = re.compile(r"\w+")
LINK_TAG = re.compile(r"<(?:a|link)\b[^>]*>", re.IGNORECASE)
REL_NEXT = re.compile(r"""\brel\s*=\s*["']?[^"'>]*\bnext\b""", re.IGNORECASE)
HREF = re.compile(r"""\bhref\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+))""", re.IGNORECASE)
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def words_of(text: str) -> str:
    """Text as its words, case-folded, one space apart and padded: " ann smith " never contains " anna "."""
    return " " + " ".join(_WORD.findall(text.casefold())) + " "


def visible_words(page: str) -> str:
    """The words a visitor reads on an HTML page: no scripts, comments or markup, entities decoded."""
    return words_of(html.unescape(_TAG.sub(" ", _INVISIBLE.sub(" ", page))))


def page_title(page: str) -> str:
    found = _TITLE.search(page)
    return " ".join(html.unescape(_TAG.sub(" ", found.group(1))).split())[:80] if found else ""


@dataclass
class Listing:
    """What one read of the listing showed, all pages together."""

    structured: bool
    ids: set[str] = field(default_factory=set)  # record ids, lower-case: the rows (structured), or seen on the page
    words: str = " "  # HTML: the visible words of every page
    raw: list[str] = field(default_factory=list)  # HTML: the pages as served (the marker is looked for here)
    complete: bool = True  # every page was read
    problem: str | None = None  # why this read proves nothing (unrecognised), None when it is usable

    def shows(self, match: str, key: str) -> bool:
        """Whether the listing shows the mentor whose record id or name (per ``match``) is ``key``."""
        if match == "portal_record_id":
            return key.lower() in self.ids
        return bool(key.strip()) and words_of(key) in self.words


@dataclass
class Page:
    text: str
    content_type: str
    redirected_to: str | None


async def get_page(
    http: httpx.AsyncClient, url: str, validators: dict[str, tuple[str | None, str | None, Page]]
) -> tuple[int, Page]:
    """GET one page (conditionally, reusing ``validators`` from earlier reads of the same URL)."""
    headers: dict[str, str] = {"Accept": "application/json, text/html;q=0.9"}
    known = validators.get(url)
    if known and known[0]:
        headers["If-None-Match"] = known[0]
    if known and known[1]:
        headers["If-Modified-Since"] = known[1]
    try:
        async with http.stream("GET", url, headers=headers) as response:
            if response.status_code == 304 and known:
                return 200, known[2]
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > _MAX_BODY:
                    raise ListingUnavailable(f"a listing page is larger than {_MAX_BODY // (1024 * 1024)} MB")
                chunks.append(chunk)
            text = b"".join(chunks).decode(response.encoding or "utf-8", errors="replace")
            moved = str(response.url) if response.history else None
            page = Page(text, response.headers.get("Content-Type", ""), moved)
            if response.status_code == 200:
                validators[url] = (response.headers.get("ETag"), response.headers.get("Last-Modified"), page)
            return response.status_code, page
    except httpx.HTTPError as err:
        raise ListingUnavailable(f"{type(err).__name__}: {err}"[:200]) from None


def is_json(page: Page) -> bool:
    if "json" in page.content_type.lower():
        return True
    return page.text.lstrip()[:1] in ("{", "[")


def error_json(text: str) -> str:
    """The portals Web API's error body, ``{"error": {"code", "message"}}``, shortened for a reason line."""
    try:
        error = json.loads(text).get("error", {})
        return f"{error.get('code', '')} {error.get('message', '')}".strip()[:160]
    except (ValueError, AttributeError):
        return ""
