"""A fake Power Pages site: the public mentor listing as a real Power Pages site serves it, from the fake portal, late.

Why it exists: the listing probe must never confirm what it did not see, and the pages that fooled the first probe
(a sign-in page, a firewall page, a list whose rows the browser loads later, page 2 of a list) are Power Pages'
ordinary behaviour. This site serves all of them from one ``ThreadingHTTPServer`` on 127.0.0.1:

    GET  /_api/<set>?$select=<key>&$filter=<listed> eq true    the portals Web API: {"value": [...]}, paged through
                                                              "@odata.nextLink" ($skiptoken), OData-Version 4.0
    GET  /mentors.json                                        a Liquid web template (MIME type application/json)
                                                              rendering the same fetchxml query, same shape
    GET  /mentors                                             a stock list page: the HTML holds no rows; the
                                                              browser POSTs /_services/entity-grid-data.json/...
    POST /_services/entity-grid-data.json/<list id>           the rows of that list, for a browser
    GET  /mentors-paged[?page=N]                              a server-rendered list (Liquid), ``page_size`` rows
                                                              a page, rel="next" to the following page
    GET  /members                                             302 to /SignIn?returnUrl=%2Fmembers (anonymous)
    GET  /SignIn                                              the sign-in page
    switches: ``waf`` (every request 403 with a firewall block page), ``down`` (503), ``garbage`` (200 of bytes),
              ``web_api_forbidden`` (/_api answers 403 with the portals Web API's error JSON)

The server-side cache: Power Pages shows Dataverse data as of its cache, refreshed within 15 minutes; here it
copies the fake portal's records every ``tick_s`` and serves, at any moment, the copy taken ``cache_delay_s`` ago
(``None``: the first copy, forever, a cache that never refreshes). Every listing view reads that same cache, so a
paged read may see one page before and the next after a refresh, as on the real site. 200s carry an ETag and
If-None-Match gets a 304. Sources (Microsoft Learn):

- "Portals Web API overview", https://learn.microsoft.com/power-pages/configure/web-api-overview: the /_api route,
  site settings ``Webapi/<table name>/enabled`` and ``Webapi/<table name>/fields``, and "benefits from server-side
  caching".
- "Query data using portals Web API", https://learn.microsoft.com/power-pages/configure/read-operations: rows in
  ``value`` with ``@odata.etag`` and the selected columns; entity set names in the URL.
- "Compose HTTP requests and handle errors for the portals Web API",
  https://learn.microsoft.com/power-pages/configure/web-api-http-requests-handle-errors: the error body
  ``{"error": {"code", "message"}}`` and code 90040101 "Attribute ... is not enabled for Web Api".
- "Page results by using OData", https://learn.microsoft.com/power-apps/developer/data-platform/webapi/query/page-results:
  ``@odata.nextLink`` carrying a ``$skiptoken``, to be followed as is.
- "Configure table permissions", https://learn.microsoft.com/power-pages/security/table-permissions: without a
  read permission for the anonymous role, lists, Liquid and the Web API show no rows.
- "Lists overview", https://learn.microsoft.com/power-pages/configure/lists: a list renders a grid "paginated if
  the number of records is larger than the page size"; its records reach the page after it loads.
- "Template tags" (fetchxml), https://learn.microsoft.com/power-pages/configure/liquid/template-tags, and "Web
  templates as API" (Microsoft Learn training, "Build web templates"): a web template with MIME type
  application/json, no header and footer, rendering a query's rows as JSON.
- "Power Pages security features" (Microsoft Learn training,
  https://learn.microsoft.com/training/modules/power-pages-studio-data-security/security): an anonymous visitor
  opening a protected page by a direct link is redirected to the sign-in page (/SignIn?returnUrl=...).
- "Configure a custom response for Azure Front Door WAF",
  https://learn.microsoft.com/azure/web-application-firewall/afds/waf-front-door-configure-custom-response-code:
  by default a blocked request gets 403 with "The request is blocked." and a tracking reference.

    with FakePortal() as portal, FakeWebsite(portal, cache_delay_s=2) as site:
        env = {**portal.env(), **site.env("api")}
"""

from __future__ import annotations

import hashlib
import html
import json
import threading
import time
from collections import deque
from typing import Any, Literal, Self
from urllib.parse import parse_qs, quote, urlsplit

from .fake_portal import FakePortal
from .http_server import FakeHandler, FakeHTTPServer, LocalServer

__all__ = ["FakeWebsite", "View"]

View = Literal["api", "liquid", "list", "paged", "signin"]
_LIST_ID = "5b1f0c0e-3c2a-4f4e-9d57-0a6f2b7c9e11"  # the list (adx_entitylist) record behind /mentors


class FakeWebsite(LocalServer):
    _name = "fake-website"

    def __init__(
        self,
        portal: FakePortal,
        *,
        cache_delay_s: float | None = 0.0,
        tick_s: float = 0.05,
        page_size: int = 5000,
        entity_set: str = "hlf_mentorlistings",
        key_field: str = "hlf_mentorlistingid",
        listed_field: str = "hlf_publiclisting",
    ) -> None:
        super().__init__()
        self._portal = portal
        self.cache_delay_s = cache_delay_s
        self._tick_s = tick_s
        self.page_size = page_size  # rows per page of the Web API, the Liquid template and the paged list
        self.entity_set, self.key_field, self.listed_field = entity_set, key_field, listed_field
        self.names: dict[str, str] = {}  # record id → the mentor's name, shown beside it
        self.down = False
        self.garbage = False
        self.waf = False
        self.web_api_forbidden = False
        self.requests = 0
        self.not_modified = 0
        self.paths: list[str] = []  # path and query of every request, in order
        self._copies: deque[tuple[float, dict[str, bool]]] = deque()
        self._stopping = threading.Event()
        self._copier = threading.Thread(target=self._copy_forever, daemon=True)

    def _bind(self) -> FakeHTTPServer[FakeWebsite]:
        return FakeHTTPServer((self._host, self._port), _Handler, self)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def url(self, view: View = "api") -> str:
        """The URL of one view of the listing (``api``: the recommended portals Web API query)."""
        return (
            self.base
            + {
                "api": f"/_api/{self.entity_set}?$select={self.key_field}&$filter={self.listed_field}%20eq%20true",
                "liquid": "/mentors.json",
                "list": "/mentors",
                "paged": "/mentors-paged",
                "signin": "/members",
            }[view]
        )

    def env(self, view: View = "api") -> dict[str, str]:
        return {"HLF_PUBLIC_LISTING_URL": self.url(view)}

    def start(self) -> Self:
        """Serve, with the cache holding a first copy already; once only (the copying thread does not restart)."""
        self._copy()
        super().start()
        self._copier.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        super().stop()

    # -- the server-side cache ----------------------------------------------------------------------------------

    def listed(self) -> list[str]:
        """The record ids the site shows now (as of its cache), in the list's order."""
        with self._lock:
            now = time.monotonic()
            records = self._copies[0][1]
            if self.cache_delay_s is not None:
                for taken_at, copy in self._copies:
                    if taken_at <= now - self.cache_delay_s:
                        records = copy
        return sorted(record_id for record_id, listed in records.items() if listed)

    def page(self) -> str:
        """The whole listing as one server-rendered page (what /mentors-paged shows with a huge page size)."""
        return self._paged_html(self.listed(), 1, None)

    def _copy(self) -> None:
        copy = self._portal.records()
        with self._lock:
            now = time.monotonic()
            if not self._copies or self._copies[-1][1] != copy:
                self._copies.append((now, copy))
            horizon = now - (self.cache_delay_s or 0.0) - 1.0
            while self.cache_delay_s is not None and len(self._copies) > 1 and self._copies[1][0] < horizon:
                self._copies.popleft()

    def _copy_forever(self) -> None:
        while not self._stopping.wait(self._tick_s):
            self._copy()

    # -- the views ------------------------------------------------------------------------------------------------

    def _rows_page(self, rows: list[str], skip: int, next_path: str) -> dict[str, Any]:
        chunk = rows[skip : skip + self.page_size]
        body: dict[str, Any] = {
            "@odata.context": f"{self.base}/_api/$metadata#{self.entity_set}({self.key_field})",
            "value": [
                {"@odata.etag": 'W/"' + hashlib.sha256(r.encode()).hexdigest()[:8] + '"', self.key_field: r}
                for r in chunk
            ],
        }
        if skip + self.page_size < len(rows):
            body["@odata.nextLink"] = f"{self.base}{next_path}$skiptoken={skip + self.page_size}"
        return body

    def _paged_html(self, rows: list[str], number: int, next_href: str | None) -> str:
        items = "".join(
            f'<tr data-entity="{self.entity_set}" data-id="{r}"><td>{html.escape(self.names.get(r, ""))}</td></tr>'
            for r in rows
        )
        nav = f'<ul class="pagination"><li><a rel="next" href="{next_href}">Next</a></li></ul>' if next_href else ""
        return (
            "<!doctype html><html><head><title>Our mentors</title></head><body><h1>Our mentors</h1>"
            f'<table class="table" data-page="{number}"><tbody>{items}</tbody></table>{nav}</body></html>'
        )

    def _list_page(self) -> str:
        # What a stock list sends: the grid's shell and its settings; the rows come from a later POST.
        return (
            "<!doctype html><html><head><title>Our mentors</title></head><body><h1>Our mentors</h1>"
            '<div class="entitylist entity-grid" data-view-layouts="[]"'
            f' data-get-url="/_services/entity-grid-data.json/{_LIST_ID}">'
            '<div class="view-grid"><table class="table"><thead><tr><th>Name</th></tr></thead>'
            '<tbody></tbody></table></div><div class="view-loading message">Loading...</div></div>'
            '<script src="/_portal/js/entity-grid.js"></script></body></html>'
        )


class _Handler(FakeHandler[FakeWebsite]):
    def do_POST(self) -> None:
        site = self.server.fake
        site.requests += 1
        self._body()
        if urlsplit(self.path).path.startswith("/_services/entity-grid-data.json/"):
            records = [{"Id": r, "Name": site.names.get(r, "")} for r in site.listed()]
            self._send(200, json.dumps({"Records": records, "ItemCount": len(records)}).encode(), "json")
        else:
            self._send(404, b"", "html")

    def do_GET(self) -> None:
        site = self.server.fake
        site.requests += 1
        site.paths.append(self.path)
        split = urlsplit(self.path)
        query = parse_qs(split.query)
        if site.waf:
            self._send(403, _WAF_PAGE.encode(), "html")
            return
        if site.down:
            self._send(503, b"the site is down", "html")
            return
        if site.garbage:
            self._send(200, b"\x00\xff not a listing \xfe", "html")
            return
        path = split.path
        if path == f"/_api/{site.entity_set}" or path == "/mentors.json":
            if path.startswith("/_api") and site.web_api_forbidden:
                error = {
                    "error": {
                        "code": "90040101",
                        "message": f"Attribute {site.key_field} in table {site.entity_set[:-1]}"
                        " is not enabled for Web Api.",
                    }
                }
                self._send(403, json.dumps(error).encode(), "json")
                return
            skip = int((query.get("$skiptoken") or ["0"])[0])
            base_query = "&".join(p for p in split.query.split("&") if not p.startswith("$skiptoken"))
            next_path = f"{path}?{base_query}&" if base_query else f"{path}?"
            body = site._rows_page(site.listed(), skip, next_path)
            if path == "/mentors.json":
                body.pop("@odata.context")
            self._conditional(json.dumps(body).encode(), "json")
        elif path == "/mentors":
            self._conditional(site._list_page().encode(), "html")
        elif path == "/mentors-paged":
            number = max(1, int((query.get("page") or ["1"])[0]))
            rows = site.listed()
            start = (number - 1) * site.page_size
            more = start + site.page_size < len(rows)
            next_href = f"/mentors-paged?page={number + 1}" if more else None
            page = site._paged_html(rows[start : start + site.page_size], number, next_href)
            self._conditional(page.encode(), "html")
        elif path == "/members":
            self._reply(302, b"", {"Location": "/SignIn?returnUrl=" + quote(path, safe="")})
        elif path == "/SignIn":
            self._conditional(_SIGN_IN_PAGE.encode(), "html")
        else:
            self._send(404, b"<!doctype html><title>Page not found</title>", "html")

    def _conditional(self, body: bytes, kind: str) -> None:
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        if self.headers.get("If-None-Match") == etag:
            self.server.fake.not_modified += 1
            self._reply(304, b"", {"ETag": etag})
            return
        self._send(200, body, kind, etag=etag)

    def _send(self, status: int, body: bytes, kind: str, *, etag: str | None = None) -> None:
        headers = _JSON if kind == "json" else _HTML
        self._reply(status, body, {**headers, "ETag": etag} if etag else headers)


_JSON = {"Content-Type": "application/json; odata.metadata=minimal", "OData-Version": "4.0"}
_HTML = {"Content-Type": "text/html; charset=utf-8"}

_SIGN_IN_PAGE = (
    "<!doctype html><html><head><title>Sign in</title></head><body><h1>Sign in</h1>"
    '<form method="post" action="/SignIn?returnUrl=%2Fmembers"><label>Email <input name="Username"></label>'
    '<label>Password <input name="PasswordValue" type="password"></label><button>Sign in</button></form>'
    "</body></html>"
)
_WAF_PAGE = (
    "<!doctype html><html><head><title>The request is blocked.</title></head><body>"
    "<h2>The request is blocked.</h2><p>Azure Front Door reference: 0a1b2c3d4e5f</p></body></html>"
)
