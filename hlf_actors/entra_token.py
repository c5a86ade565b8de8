"""The bearer token Dataverse asks for: OAuth2 client credentials against Entra ID ([aad] in ``dynamics.py``'s
table), cached until shortly before it expires.

One request however many callers ask at once: a caller that was refused a token hands it back as ``stale``, and a
new one is fetched only if it is still the current one, so a burst of 401s costs one token request. After the token
endpoint refused the secret, the secret file (HLF_DYNAMICS_CLIENT_SECRET_FILE) is read again before every token
request, so rotating the secret is writing the new one to the file; ``logs.hide_secret`` learns it at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import msgspec
from loguru import logger

from .config import Secret
from .errors import CredentialError, TransientPortalError
from .limits import TRANSIENT_STATUSES, parse_retry_after
from .logs import hide_secret

__all__ = ["TokenSource"]

# Refresh a token this long before the portal would reject it, so no request races its expiry.
_TOKEN_MARGIN_S = 120.0


class _Token(msgspec.Struct):
    access_token: str
    # Entra ID's v2 endpoint sends a number; its v1 endpoint and some proxies send the number as a string.
    expires_in: float | str = 3600.0
    token_type: str = "Bearer"


class TokenSource:
    """The current token for one application user. ``describe`` turns a refusal into short, secret-free text."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        token_url: str,
        client_id: str,
        secret: Secret,
        secret_file: Path | None,
        scope: str,
        describe: Callable[[httpx.Response], str],
    ) -> None:
        self._http = http
        self._token_url = token_url
        self._client_id = client_id
        self._secret = secret
        self._secret_file = secret_file
        self._scope = scope
        self._describe = describe
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock = anyio.Lock()
        self._secret_refused = False

    @property
    def secret(self) -> Secret:
        """The client secret in use (a newer one once the file held it)."""
        return self._secret

    async def bearer(self, *, stale: str | None = None, fresh: bool = False) -> str:
        """The current token. ``stale`` is a token the portal just refused: a new one is fetched only if it is still
        the current one, so a burst of 401s costs one token request, not one each."""
        async with self._token_lock:
            if (
                fresh
                or self._token is None
                or time.monotonic() >= self._token_expires
                or (stale is not None and self._token == stale)
            ):
                await self._fetch()
            assert self._token is not None
            return self._token

    def _reread_secret(self) -> None:
        """After a refusal: the operator may have written a new secret to the file since we last read it."""
        if self._secret_file is None:
            return
        try:
            value = self._secret_file.read_text().strip()
        except OSError as err:
            logger.warning("cannot read HLF_DYNAMICS_CLIENT_SECRET_FILE ({}): keeping the secret we have", err.strerror)
            return
        if value and value != self._secret.reveal():
            hide_secret(value)
            self._secret = Secret(value)
            logger.info("HLF_DYNAMICS_CLIENT_SECRET_FILE holds a new secret: using it from now on")

    async def _fetch(self) -> None:
        if self._secret_refused:
            self._reread_secret()
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
        if response.status_code in TRANSIENT_STATUSES:
            raise TransientPortalError(
                f"token endpoint answered {response.status_code}: {self._describe(response)}",
                http_status=response.status_code,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        if response.status_code != 200:
            self._secret_refused = True
            self._token = None
            raise CredentialError(
                f"token endpoint refused the credentials ({response.status_code}): {self._describe(response)}",
                http_status=response.status_code,
            )
        try:
            token = msgspec.json.decode(response.content, type=_Token)
            lifetime = max(1.0, float(token.expires_in))
        except msgspec.ValidationError as err:  # names the field: "Object missing required field `access_token`"
            raise TransientPortalError(f"token endpoint answered 200 with an unusable token: {err}") from None
        except msgspec.DecodeError:
            raise TransientPortalError("token endpoint answered 200 with a body that is not JSON") from None
        except ValueError:
            raise TransientPortalError(
                f"token endpoint answered 200 with expires_in {str(token.expires_in)[:20]!r}: not a number of seconds"
            ) from None
        self._secret_refused = False
        self._token = token.access_token
        self._token_expires = time.monotonic() + max(lifetime / 2, lifetime - _TOKEN_MARGIN_S)
