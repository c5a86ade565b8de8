"""The Dynamics 365 (Dataverse Web API) client: the one seam between the service and the portal.

It speaks the wire format of shared/INTERFACE.md: OAuth2 client credentials with the token cached until shortly
before it expires, ``PATCH …/{entity_set}({id})`` with ``If-Match: *`` (update, never create), and the paged
``GET … $select`` listing. Every failure becomes one of the typed errors in ``errors.py``:

    answer / failure                               raised as
    2xx                                            (success)
    401 on the data call                           drop the token, fetch a fresh one, try once more;
                                                   401 again → CredentialError
    token endpoint 400/401 (invalid_client…)       CredentialError
    408, 429, 500, 502, 503, 504                   TransientPortalError (429 → ThrottledError), Retry-After kept
    timeouts, connection errors, garbage bodies    TransientPortalError
    any other 4xx                                  PermanentPortalError

Error messages carry the status and at most 200 characters of the portal's own message; never a header, token or
secret.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import anyio
import httpx
import msgspec

from .config import Config, Secret
from .errors import (
    CredentialError,
    PermanentPortalError,
    PortalError,
    ThrottledError,
    TransientPortalError,
)
from .http_transport import fast_transport

__all__ = ["DynamicsClient", "ListingRow", "parse_retry_after"]

_TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_ODATA_HEADERS = {
    "OData-MaxVersion": "4.0",
    "OData-Version": "4.0",
    "Accept": "application/json",
    "Content-Type": "application/json; charset=utf-8",
}
_RETRY_AFTER_CAP_S = 86_400.0
# What a read response's stream is replaced with (DynamicsClient._send): already empty, shared by every response.
_SPENT = httpx.ByteStream(b"")
# Refresh a token this long before the portal would reject it, so no request races its expiry.
_TOKEN_MARGIN_S = 120.0


class ListingRow(msgspec.Struct, frozen=True):
    record_id: UUID
    listed: bool | None


class _Token(msgspec.Struct):
    access_token: str
    expires_in: float = 3600.0
    token_type: str = "Bearer"


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date. None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        # A portal asking for more than a day is not asking for anything we should plan around literally.
        return min(float(value), _RETRY_AFTER_CAP_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(_RETRY_AFTER_CAP_S, max(0.0, (when - (now or datetime.now(UTC))).total_seconds()))


def _portal_message(response: httpx.Response) -> str:
    """The portal's own error text, short and safe to log."""
    text = response.text
    try:
        body = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        return f"non-JSON body: {text[:120]!r}" if text else "empty body"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:200]
        if isinstance(error, str):
            description = body.get("error_description")
            return f"{error}: {str(description)[:160]}" if description else error
    return text[:200]


class RequestBudget:
    """At most ``limit`` requests reaching the portal in any sliding ``window_s``: Dataverse's service-protection
    limit, kept on our side so that a backlog of thousands is paced instead of answered with 429s.

    The portal counts arrivals, which we cannot see; we count a request from the moment it starts until one window
    after its answer came back, which is always later than its arrival. That bounds arrivals exactly, however late
    a request leaves after it was scheduled (a scheduling margin on start times let a 429 through under load).
    """

    def __init__(self, limit: int, window_s: float) -> None:
        self._limit = limit
        self._window_s = window_s
        self._in_flight = 0
        self._answered: deque[float] = deque()  # when each answer came back, oldest first
        self._lock = anyio.Lock()
        self._freed = anyio.Event()

    def _used(self, now: float) -> int:
        while self._answered and now - self._answered[0] >= self._window_s:
            self._answered.popleft()
        return self._in_flight + len(self._answered)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait until one more request fits in the window, and count it until a window after it is answered."""
        async with self._lock:
            while self._used(time.monotonic()) >= self._limit:
                if self._answered:
                    await anyio.sleep(self._answered[0] + self._window_s - time.monotonic())
                else:  # every counted request is still in flight: wait for one to be answered
                    self._freed = anyio.Event()
                    await self._freed.wait()
            self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            self._answered.append(time.monotonic())
            self._freed.set()


class DynamicsClient:
    """Talks to one Dataverse org. Safe to share between tasks; the token is fetched by one task at a time."""

    def __init__(self, config: Config, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        config.require_portal()
        assert config.dynamics_url and config.dynamics_token_url and config.dynamics_client_id
        assert config.dynamics_client_secret is not None
        self._base = f"{config.dynamics_url}/api/data/v9.2/{config.dynamics_entity_set}"
        self._whoami = f"{config.dynamics_url}/api/data/v9.2/WhoAmI"
        self._token_url = config.dynamics_token_url
        self._client_id = config.dynamics_client_id
        self._secret: Secret = config.dynamics_client_secret
        self._scope = config.scope
        self._listed_field = config.dynamics_listed_field
        self._key_field = config.dynamics_key_field
        limits = httpx.Limits(
            max_connections=config.portal_concurrency + 2,
            max_keepalive_connections=config.portal_concurrency + 2,
        )
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(config.portal_timeout_s, connect=min(10.0, config.portal_timeout_s)),
            limits=limits,
            transport=transport if transport is not None else fast_transport(limits),
            follow_redirects=False,
        )
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock = anyio.Lock()
        self._budget = RequestBudget(config.portal_rate_requests, config.portal_rate_window_s)

    async def aclose(self) -> None:
        await self._http.aclose()

    def rotate_secret(self, secret: Secret) -> None:
        """Use a new client secret from now on (break-glass, rotation without restart)."""
        self._secret = secret
        self._token = None

    # -- token --------------------------------------------------------------------------------------------------

    async def _bearer(self, *, fresh: bool = False) -> str:
        async with self._token_lock:
            if fresh or self._token is None or time.monotonic() >= self._token_expires:
                await self._fetch_token()
            assert self._token is not None
            return self._token

    async def _fetch_token(self) -> None:
        form = {
            "grant_type": "client_credentials",
            "client_id": self._client_id,
            "client_secret": self._secret.reveal(),
            "scope": self._scope,
        }
        try:
            response = await self._http.post(self._token_url, data=form, headers={"Accept": "application/json"})
        except httpx.TimeoutException:
            raise TransientPortalError("token endpoint timed out") from None
        except httpx.TransportError as err:
            raise TransientPortalError(f"token endpoint unreachable: {type(err).__name__}") from None
        if response.status_code in _TRANSIENT_STATUSES:
            raise TransientPortalError(
                f"token endpoint answered {response.status_code}: {self._message(response)}",
                http_status=response.status_code,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        if response.status_code != 200:
            raise CredentialError(
                f"token endpoint refused the credentials ({response.status_code}): {self._message(response)}",
                http_status=response.status_code,
            )
        try:
            token = msgspec.json.decode(response.content, type=_Token)
        except msgspec.DecodeError:
            raise TransientPortalError("token endpoint answered 200 with an unreadable body") from None
        self._token = token.access_token
        lifetime = max(1.0, float(token.expires_in))
        self._token_expires = time.monotonic() + max(lifetime / 2, lifetime - _TOKEN_MARGIN_S)

    async def check_token(self) -> None:
        """Fetch a brand-new token: the first half of a credential health check."""
        await self._bearer(fresh=True)

    # -- data calls ---------------------------------------------------------------------------------------------

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One authorised request; on 401 a fresh token and one more try; then classify the answer."""
        fresh = False
        for _ in range(2):
            bearer = await self._bearer(fresh=fresh)
            headers = {**_ODATA_HEADERS, **kwargs.pop("headers", {}), "Authorization": f"Bearer {bearer}"}
            try:
                async with self._budget.slot():
                    response = await self._http.request(method, url, headers=headers, **kwargs)
                # The body is read and the stream closed; dropping the stream breaks the cycle httpx makes between a
                # response and its stream (BoundAsyncStream → response → stream), so the ~43 objects of each request
                # are freed at once instead of waiting for the cyclic garbage collector, whose pauses were the
                # service's latency tail (full collections of up to 124 ms under load).
                response.stream = _SPENT
            except httpx.TimeoutException:
                raise TransientPortalError(f"{method} timed out") from None
            except httpx.TransportError as err:
                raise TransientPortalError(f"{method} failed: {type(err).__name__}: {err}"[:200]) from None
            if response.status_code == 401 and not fresh:
                fresh = True
                kwargs["headers"] = {k: v for k, v in headers.items() if k != "Authorization"}
                continue
            return self._classify(method, response)
        raise CredentialError(f"{method} refused with 401 even with a fresh token", http_status=401)

    def _message(self, response: httpx.Response) -> str:
        """The portal's error text, with our own secret blanked should the portal ever echo it back."""
        text = _portal_message(response)
        secret = self._secret.reveal()
        return text.replace(secret, "********") if secret else text

    def _classify(self, method: str, response: httpx.Response) -> httpx.Response:
        status = response.status_code
        if 200 <= status < 300:
            return response
        message = f"{method} answered {status}: {self._message(response)}"
        if status in _TRANSIENT_STATUSES:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            kind = ThrottledError if status == 429 else TransientPortalError
            raise kind(message, http_status=status, retry_after=retry_after)
        if status == 401:
            raise CredentialError(message, http_status=status)
        if 400 <= status < 500:
            raise PermanentPortalError(message, http_status=status)
        # 1xx/3xx/other 5xx: nothing we asked for; the next attempt may fare better.
        raise TransientPortalError(message, http_status=status)

    async def set_listed(self, record_id: UUID, listed: bool) -> int:
        """PATCH the listed field of one record; returns the HTTP status (204 normally)."""
        response = await self._send(
            "PATCH",
            f"{self._base}({record_id})",
            content=msgspec.json.encode({self._listed_field: listed}),
            headers={"If-Match": "*"},
        )
        return response.status_code

    async def whoami(self) -> None:
        """The cheapest authorised read: the second half of a credential health check."""
        response = await self._send("GET", self._whoami)
        try:
            msgspec.json.decode(response.content)
        except msgspec.DecodeError:
            raise TransientPortalError("WhoAmI answered with an unreadable body") from None

    async def listing(self, page_size: int = 5000) -> AsyncIterator[list[ListingRow]]:
        """Every record of the entity set, a page at a time, following @odata.nextLink."""
        url: str | None = self._base
        params: dict[str, str] | None = {"$select": f"{self._key_field},{self._listed_field}"}
        while url:
            response = await self._send("GET", url, params=params, headers={"Prefer": f"odata.maxpagesize={page_size}"})
            try:
                body = msgspec.json.decode(response.content)
                rows = [
                    ListingRow(UUID(str(item[self._key_field])), item.get(self._listed_field)) for item in body["value"]
                ]
            except (msgspec.DecodeError, KeyError, TypeError, ValueError):
                raise TransientPortalError("listing page was not the expected OData JSON") from None
            yield rows
            next_link = body.get("@odata.nextLink")
            url, params = (str(next_link), None) if next_link else (None, None)


def is_transient(err: PortalError) -> bool:
    return isinstance(err, TransientPortalError)
