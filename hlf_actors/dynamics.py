"""The Dynamics 365 (Dataverse Web API) client: the one seam between the service and the portal.

It speaks the wire format of shared/INTERFACE.md: OAuth2 client credentials with the token cached until shortly
before it expires, ``PATCH …/{entity_set}({id})`` with ``If-Match: *`` (update, never create: without it Dataverse
would upsert), and the paged ``GET … $select`` listing. Every failure becomes one of the typed errors in
``errors.py``. The question each answer is asked is "is this one mentor's problem, or everyone's?", because a
failure that hits every mentor must be held as one incident (``incidents.py``), not spent as N attempts:

    answer / failure                                       raised as                 source (Microsoft Learn)
    PATCH 204; GET 200 with Dataverse's JSON               (success)                 [update]
    any other 2xx (HTML, empty 200, another type), a 3xx   TenantError not_dataverse [update]: PATCH answers 204
    401 on the data call                                   fetch a fresh token (one request however many
                                                           401s arrive together), try once more;
                                                           401 again → CredentialError
    token endpoint 400/401 (invalid_client…)               CredentialError           [aad]
    403 0x80072560 "user is not a member of the org…"      TenantError app_user_missing [codes]
    403 0x80040220 "…is missing prv… privilege"            TenantError privilege     [client]
    404 0x8006088a "Resource not found for the segment"    TenantError entity_set    [webapi]
    400 "Could not find a property named…" / "…does not    TenantError property      [webapi]
        exist on type…" / "Invalid property…"
    404 0x80040217 "… With Id = … Does Not Exist"          PermanentPortalError: this record alone [client]
    any other 400/403/404                                  UndecidedRefusal: the tenant check decides
    408, 429, 500, 502, 503, 504                           TransientPortalError (429 → ThrottledError); a
                                                           429's Retry-After holds every request of this
                                                           client, not just the one that got it [limits]
    timeouts, connection errors, garbage bodies            TransientPortalError
    any other 4xx (405, 412, 413, 415…)                    PermanentPortalError

    [update]  "Update and delete table rows using the Web API", learn.microsoft.com/power-apps/developer/
              data-platform/webapi/update-delete-entities-using-web-api
    [webapi]  "Troubleshoot Dataverse Web API client errors", learn.microsoft.com/troubleshoot/power-platform/
              power-apps/dataverse/web-api-client-errors
    [client]  "Troubleshoot Dataverse client errors", learn.microsoft.com/troubleshoot/power-platform/power-apps/
              dataverse/client-errors (-2147220960 = 0x80040220 missing privilege; -2147220969 = 0x80040217)
    [codes]   "Web service error codes", learn.microsoft.com/power-apps/developer/data-platform/reference/
              web-service-error-codes
    [limits]  "Service protection API limits", learn.microsoft.com/power-apps/developer/data-platform/
              api-limits: Retry-After is per user, and continued requests lengthen it
    [aad]     "Microsoft identity platform and the OAuth 2.0 client credentials flow"

The tenant check (``tenant_check``) asks what a PATCH cannot: a fresh token, WhoAmI, a one-row read of the entity
set selecting the key and listed columns (a renamed table or column, a missing Read privilege), and, for that row,
``RetrievePrincipalAccess`` (the application user's Write right, without changing any data).

The PATCH, the one request sent thousands of times, goes to httpcore (httpx's own transport) directly: the request
is the one httpx would build (made once per token, only the record id changes), and every answer but a plain 204
becomes an httpx.Response and goes through the same classification. Everything else goes through httpx.

Error messages carry the status and at most 200 characters of the portal's own message; never a header, token or
secret. The token itself, and reading a rotated secret from its file, are ``entra_token.py``'s.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit
from uuid import UUID

import httpcore
import httpx
import msgspec

from .config import Config
from .entra_token import TokenSource
from .errors import (
    CredentialError,
    PermanentPortalError,
    TenantError,
    ThrottledError,
    TransientPortalError,
    UndecidedRefusal,
)
from .http_transport import fast_transport, pool_of
from .limits import TRANSIENT_STATUSES, RequestBudget, parse_retry_after

__all__ = ["DynamicsClient", "ListingRow", "Portal"]

_ODATA_HEADERS = {
    "OData-MaxVersion": "4.0",
    "OData-Version": "4.0",
    "Accept": "application/json",
    "Content-Type": "application/json; charset=utf-8",
}
# What a read response's stream is replaced with (DynamicsClient._send): already empty, shared by every response.
_SPENT = httpx.ByteStream(b"")
# What httpx turns into httpx.TimeoutException / httpx.TransportError (httpx._transports.default), for the PATCH
# that goes to httpcore directly (DynamicsClient._patch); their class names are httpx's own.
_CORE_TIMEOUT = httpcore.TimeoutException
_CORE_TRANSPORT_ERRORS = (
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.ProxyError,
    httpcore.UnsupportedProtocol,
)

# Dataverse's own error codes that say who is affected (see the table above).
_RECORD_MISSING = "0x80040217"
_USER_NOT_IN_ORG = "0x80072560"
_PRIVILEGE_DENIED = "0x80040220"
_SEGMENT_NOT_FOUND = "0x8006088a"
_UNKNOWN_PROPERTY = re.compile(
    r"could not find a property named|does not exist on type|invalid property .* was found in entity", re.I
)
_MISSING_PRIVILEGE = re.compile(r"is missing prv\w+ privilege", re.I)


class ListingRow(msgspec.Struct, frozen=True):
    record_id: UUID
    listed: bool | None


class Portal(Protocol):
    """The Dynamics portal as every part of the service uses it: the actors and break-glass PATCH, reconciliation
    reads the listing, the credential checks and incidents run the tenant check. ``DynamicsClient`` is the one
    implementation; tests point it at ``testing.fake_portal.FakePortal``, a real HTTP server."""

    async def set_listed(self, record_id: UUID, listed: bool) -> int: ...

    async def tenant_check(self) -> None: ...

    def listing(self, page_size: int = 5000) -> AsyncIterator[list[ListingRow]]: ...


class _WhoAmI(msgspec.Struct):
    UserId: UUID


class _Error(msgspec.Struct):
    code: str = ""
    message: str = ""


class _ErrorBody(msgspec.Struct):
    error: _Error | str | None = None
    error_description: str | None = None


def _portal_error(response: httpx.Response) -> tuple[str, str]:
    """(Dataverse error code or "", the portal's own error text, short and safe to log)."""
    text = response.text
    try:
        body = msgspec.json.decode(response.content, type=_ErrorBody)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "", (f"non-JSON body: {text[:120]!r}" if text else "empty body")
    if isinstance(body.error, _Error) and body.error.message:
        return body.error.code.lower(), body.error.message[:200]
    if isinstance(body.error, str):
        description = body.error_description
        return "", (f"{body.error}: {description[:160]}" if description else body.error)
    return "", text[:200]


def _is_dataverse_json(response: httpx.Response) -> bool:
    return bool(response.headers.get("content-type", "").lower().startswith("application/json"))


class DynamicsClient:
    """Talks to one Dataverse org. Safe to share between tasks; the token is fetched by one task at a time."""

    def __init__(self, config: Config, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        config.require_portal()
        assert config.dynamics_url and config.dynamics_token_url and config.dynamics_client_id
        assert config.dynamics_client_secret is not None
        self._api = f"{config.dynamics_url}/api/data/v9.2"
        self._entity_set = config.dynamics_entity_set
        self._base = f"{self._api}/{config.dynamics_entity_set}"
        self._whoami = f"{self._api}/WhoAmI"
        self._listed_field = config.dynamics_listed_field
        self._key_field = config.dynamics_key_field
        limits = httpx.Limits(
            max_connections=config.portal_concurrency + 2,
            max_keepalive_connections=config.portal_concurrency + 2,
        )
        own = fast_transport(limits) if transport is None else None
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(config.portal_timeout_s, connect=min(10.0, config.portal_timeout_s)),
            limits=limits,
            transport=transport if transport is not None else own,
            follow_redirects=False,
        )
        # The PATCH, sent thousands of times, goes straight to the pool of our own transport (_patch); a transport
        # handed in (a test's MockTransport) gets every request through httpx.
        # Credentials in the URL would make httpx add Basic auth: leave such a set-up to httpx.
        self._pool = pool_of(own) if not (urlsplit(self._base).username or urlsplit(self._base).password) else None
        self._patch_templates: tuple[str, dict[bool, httpx.Request]] | None = None
        self._tokens = TokenSource(
            self._http,
            token_url=config.dynamics_token_url,
            client_id=config.dynamics_client_id,
            secret=config.dynamics_client_secret,
            secret_file=Path(config.dynamics_client_secret_file) if config.dynamics_client_secret_file else None,
            scope=config.scope,
            describe=self._message,
        )
        self._budget = RequestBudget(config.portal_rate_requests, config.portal_rate_window_s)

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def throttled_for_s(self) -> float:
        """How long every request still waits out the portal's last Retry-After."""
        return self._budget.held_for_s

    async def check_token(self) -> None:
        """Fetch a brand-new token: the first step of a tenant check."""
        await self._tokens.bearer(fresh=True)

    # -- data calls ---------------------------------------------------------------------------------------------

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One authorised request; on 401 a fresh token and one more try; then classify the answer."""
        bearer = await self._tokens.bearer()
        extra = kwargs.pop("headers", {})
        for retry in (False, True):
            headers = {**_ODATA_HEADERS, **extra, "Authorization": f"Bearer {bearer}"}
            try:
                async with self._budget.slot():
                    response = await self._http.request(method, url, headers=headers, **kwargs)
                # The body is read and the stream closed; dropping the stream breaks the cycle httpx makes between a
                # response and its stream (BoundAsyncStream → response → stream), so each request's objects are
                # freed at once instead of waiting for the cyclic garbage collector.
                response.stream = _SPENT
            except httpx.TimeoutException:
                raise TransientPortalError(f"{method} timed out") from None
            except httpx.TransportError as err:
                raise TransientPortalError(f"{method} failed: {type(err).__name__}: {err}"[:200]) from None
            if response.status_code == 401 and not retry:
                bearer = await self._tokens.bearer(stale=bearer)
                continue
            return self._classify(method, response)
        raise CredentialError(f"{method} refused with 401 even with a fresh token", http_status=401)

    def _error(self, response: httpx.Response) -> tuple[str, str]:
        """Dataverse's error code and text, with our own secret blanked should the portal ever echo it back."""
        code, text = _portal_error(response)
        secret = self._tokens.secret.reveal()
        return code, (text.replace(secret, "********") if secret else text)

    def _message(self, response: httpx.Response) -> str:
        return self._error(response)[1]

    def _classify(self, method: str, response: httpx.Response) -> httpx.Response:
        status = response.status_code
        if 200 <= status < 300:
            if (method == "PATCH" and status == 204) or (status != 204 and _is_dataverse_json(response)):
                return response
            kind = response.headers.get("content-type", "no content type").split(";")[0] or "no content type"
            raise TenantError(
                f"{method} answered {status} with {kind}, not Dataverse's answer: the Dynamics URL is answered by "
                "something that is not Dataverse",
                cause="not_dataverse",
                http_status=status,
            )
        if 300 <= status < 400:
            where = urlsplit(response.headers.get("location", "")).netloc or "nowhere"
            raise TenantError(
                f"{method} answered {status}, a redirect to {where[:80]}: the Dynamics URL is answered by something "
                "that is not Dataverse",
                cause="not_dataverse",
                http_status=status,
            )
        code, text = self._error(response)
        message = f"{method} answered {status}: {text}"
        if status in TRANSIENT_STATUSES:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if status == 429:
                self._budget.hold(retry_after if retry_after is not None else 1.0)
                raise ThrottledError(message, http_status=status, retry_after=retry_after)
            raise TransientPortalError(message, http_status=status, retry_after=retry_after)
        if status == 401:
            raise CredentialError(message, http_status=status)
        cause = self._tenant_cause(status, code, text)
        if cause is not None:
            raise TenantError(message, cause=cause, http_status=status)
        if status == 404 and code == _RECORD_MISSING:
            raise PermanentPortalError(message, http_status=status)
        if status in (400, 403, 404):
            raise UndecidedRefusal(message, http_status=status)
        if 400 <= status < 500:
            raise PermanentPortalError(message, http_status=status)
        # 1xx/other 5xx: nothing we asked for; the next attempt may fare better.
        raise TransientPortalError(message, http_status=status)

    @staticmethod
    def _tenant_cause(status: int, code: str, text: str) -> str | None:
        """Which tenant-wide incident this refusal names, if its own words say so (the module's table)."""
        if status == 403 and code == _USER_NOT_IN_ORG:
            return "app_user_missing"
        if status == 403 and (code == _PRIVILEGE_DENIED or _MISSING_PRIVILEGE.search(text)):
            return "privilege"
        if status == 404 and code == _SEGMENT_NOT_FOUND:
            return "entity_set"
        if status == 400 and _UNKNOWN_PROPERTY.search(text):
            return "property"
        return None

    async def set_listed(self, record_id: UUID, listed: bool) -> int:
        """PATCH the listed field of one record; returns the HTTP status (204)."""
        if self._pool is not None and not self._http.cookies.jar:
            return await self._patch(self._pool, record_id, listed)
        response = await self._send(
            "PATCH",
            f"{self._base}({record_id})",
            content=msgspec.json.encode({self._listed_field: listed}),
            headers={"If-Match": "*"},
        )
        return response.status_code

    def _patch_template(self, bearer: str, listed: bool) -> httpx.Request:
        """The PATCH exactly as ``_send`` would have httpx build it (every header, in httpx's order), made once per
        token: only the record id in the path differs from one mentor to the next."""
        if self._patch_templates is None or self._patch_templates[0] != bearer:
            self._patch_templates = (
                bearer,
                {
                    value: self._http.build_request(
                        "PATCH",
                        f"{self._base}(00000000-0000-0000-0000-000000000000)",
                        content=msgspec.json.encode({self._listed_field: value}),
                        headers={**_ODATA_HEADERS, "If-Match": "*", "Authorization": f"Bearer {bearer}"},
                    )
                    for value in (True, False)
                },
            )
        return self._patch_templates[1][listed]

    async def _patch(self, pool: httpcore.AsyncConnectionPool, record_id: UUID, listed: bool) -> int:
        """``set_listed`` through httpcore, the transport httpx itself uses, without httpx's per-request machinery
        (building and merging headers, cookies, the response object): the same bytes on the wire, the same timeouts,
        the same 401 retry, and any answer but a 204 classified by ``_classify`` from an httpx.Response, as before.
        """
        bearer = await self._tokens.bearer()
        for retry in (False, True):
            template = self._patch_template(bearer, listed)
            url = template.url
            head, _, tail = url.raw_path.rpartition(b"00000000-0000-0000-0000-000000000000")
            target = head + str(record_id).encode() + tail
            request = httpcore.Request(
                b"PATCH",
                httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=target),
                headers=template.headers.raw,
                content=template.content,
                extensions=template.extensions,
            )
            try:
                async with self._budget.slot():
                    answer = await pool.handle_async_request(request)
                    try:
                        body = await answer.aread()
                    finally:
                        await answer.aclose()
            except _CORE_TIMEOUT:
                raise TransientPortalError("PATCH timed out") from None
            except _CORE_TRANSPORT_ERRORS as err:
                raise TransientPortalError(f"PATCH failed: {type(err).__name__}: {err}"[:200]) from None
            if answer.status == 204 and not any(name.lower() == b"set-cookie" for name, _ in answer.headers):
                return 204
            if answer.status == 401 and not retry:
                bearer = await self._tokens.bearer(stale=bearer)
                continue
            response = httpx.Response(answer.status, headers=answer.headers, content=body, request=template)
            # A portal that sets cookies gets them back as httpx would send them: from now on through httpx.
            self._http.cookies.extract_cookies(response)
            return self._classify("PATCH", response).status_code
        raise CredentialError("PATCH refused with 401 even with a fresh token", http_status=401)

    async def whoami(self) -> UUID:
        """The cheapest authorised read: the application user's id."""
        response = await self._send("GET", self._whoami)
        try:
            return msgspec.json.decode(response.content, type=_WhoAmI).UserId
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise TenantError(
                "WhoAmI answered 200 without a UserId: the Dynamics URL is answered by something that is not Dataverse",
                cause="not_dataverse",
                http_status=response.status_code,
            ) from None

    async def tenant_check(self) -> None:
        """Raise what would make every PATCH fail, checked without changing data: a fresh token, WhoAmI, one row of
        the entity set with the key and listed columns, and the application user's Write right on that row."""
        await self.check_token()
        user_id = await self.whoami()
        response = await self._send(
            "GET",
            self._base,
            params={"$select": f"{self._key_field},{self._listed_field}", "$top": "1"},
        )
        rows, _ = self._page(response.content)
        if not rows:
            return  # an empty table: nothing to check Write on; the next PATCH is the probe
        target = f'{{"@odata.id":"{self._entity_set}({rows[0].record_id})"}}'
        response = await self._send(
            "GET",
            f"{self._api}/systemusers({user_id})/Microsoft.Dynamics.CRM.RetrievePrincipalAccess(Target=@tid)",
            params={"@tid": target},
        )
        try:
            rights = str(msgspec.json.decode(response.content).get("AccessRights", ""))
        except (msgspec.DecodeError, AttributeError):
            raise TransientPortalError("RetrievePrincipalAccess answered with an unreadable body") from None
        if "WriteAccess" not in rights:
            raise TenantError(
                f"the application user has no Write access to {self._entity_set} (RetrievePrincipalAccess: "
                f"{rights[:120] or 'no rights'})",
                cause="privilege",
                http_status=response.status_code,
            )

    def _page(self, content: bytes) -> tuple[list[ListingRow], str | None]:
        """A listing page's rows and its @odata.nextLink."""
        try:
            body = msgspec.json.decode(content)
            key, listed = self._key_field, self._listed_field
            rows = [ListingRow(UUID(str(item[key])), item.get(listed)) for item in body["value"]]
            next_link = body.get("@odata.nextLink")
        except (msgspec.DecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise TransientPortalError("listing page was not the expected OData JSON") from None
        return rows, str(next_link) if next_link else None

    async def listing(self, page_size: int = 5000) -> AsyncIterator[list[ListingRow]]:
        """Every record of the entity set, a page at a time, following @odata.nextLink."""
        url: str | None = self._base
        params: dict[str, str] | None = {"$select": f"{self._key_field},{self._listed_field}"}
        while url:
            response = await self._send("GET", url, params=params, headers={"Prefer": f"odata.maxpagesize={page_size}"})
            rows, url = self._page(response.content)
            params = None
            yield rows
