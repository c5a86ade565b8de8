"""Who may use the operations console: sign-in, sessions, CSRF tokens and the security headers of every page.

The pages show mentors' names and statuses (personal data) and their buttons change what the public sees, so:

    no sign-in configured                  the console is off (404), /healthz and /metrics still answer
    HLF_CONSOLE_OIDC_* + ALLOWED_GROUP     Microsoft Entra ID, OpenID Connect authorization code with PKCE (Authlib:
                                           state, nonce, code_verifier kept in the session; the ID token's signature
                                           checked against the issuer's JWKS, its iss, aud, exp and nonce too);
                                           the account must carry the group id in `groups` or the app role in `roles`
    HLF_CONSOLE_PASSWORD_FILE              one shared password: only its scrypt hash (random salt) is kept, attempts
                                           are compared in constant time, failures are rate-limited per client

A session is a signed cookie (Starlette's SessionMiddleware): HttpOnly, SameSite=Lax, Secure unless the console is
reached over loopback HTTP. Its key is random per process, so a restart signs everyone out: no key to keep secret.
Every POST carries the session's CSRF token; every answer carries a strict CSP with ``frame-ancestors 'none'``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections import deque
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from authlib.integrations.starlette_client import OAuth, OAuthError
from joserfc.errors import JoseError
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import Config, Secret
from .errors import SignInRefused

__all__ = [
    "CSP",
    "LoginLimiter",
    "OidcSignIn",
    "PasswordCheck",
    "SecurityHeaders",
    "csrf_token",
    "csrf_valid",
    "is_loopback_url",
]

# Nothing inline, nothing from elsewhere: the stylesheet is the one thing a page loads (from the wheel).
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class SecurityHeaders:
    """Adds the security headers to every answer of the console (pure ASGI: no buffering of bodies)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = CSP
                headers["X-Frame-Options"] = "DENY"
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "same-origin"
                headers["Cache-Control"] = "no-store"  # pages hold personal data: no copy in shared caches
            await send(message)

        await self.app(scope, receive, send_with_headers)


def is_loopback_url(url: str) -> bool:
    return (urlsplit(url).hostname or "") in {"127.0.0.1", "localhost", "::1"}


# -- the shared password --------------------------------------------------------------------------------------------


class PasswordCheck:
    """Keeps only a salted scrypt hash of HLF_CONSOLE_PASSWORD_FILE's content; compares in constant time."""

    _N, _R, _P = 2**14, 8, 1

    def __init__(self, password: Secret) -> None:
        self._salt = os.urandom(16)
        self._hash = self._derive(password.reveal())

    def _derive(self, attempt: str) -> bytes:
        return hashlib.scrypt(attempt.encode(), salt=self._salt, n=self._N, r=self._R, p=self._P, dklen=32)

    def matches(self, attempt: str) -> bool:
        return hmac.compare_digest(self._derive(attempt[:1024]), self._hash)


class LoginLimiter:
    """At most ``failures`` failed sign-ins per ``window_s`` from one client, and ``overall`` from everyone (a
    guesser with many addresses). Kept in memory: a restart forgets it, which costs a guesser nothing worth having."""

    def __init__(self, failures: int = 5, window_s: float = 60.0, overall: int = 30) -> None:
        self._failures, self._window_s, self._overall = failures, window_s, overall
        self._by_client: dict[str, deque[float]] = {}
        self._all: deque[float] = deque()

    def _trim(self, seen: deque[float], now: float) -> None:
        while seen and seen[0] <= now - self._window_s:
            seen.popleft()

    def retry_after(self, client: str) -> float | None:
        """Seconds to wait before the next try, or None when a try is allowed now."""
        now = time.monotonic()
        seen = self._by_client.get(client, deque())
        self._trim(seen, now)
        self._trim(self._all, now)
        waits = [
            s[0] + self._window_s - now
            for s, limit in ((seen, self._failures), (self._all, self._overall))
            if len(s) >= limit
        ]
        return max(waits) if waits else None

    def failed(self, client: str) -> None:
        now = time.monotonic()
        self._by_client.setdefault(client, deque()).append(now)
        self._all.append(now)
        if len(self._by_client) > 10_000:  # keep memory bounded under a spray of addresses
            self._by_client = {k: v for k, v in self._by_client.items() if v and v[-1] > now - self._window_s}


# -- Entra ID ---------------------------------------------------------------------------------------------------


class OidcSignIn:
    """OpenID Connect sign-in through Authlib's Starlette client (code flow, PKCE S256, nonce, state)."""

    NAME = "entra"

    def __init__(self, config: Config) -> None:
        assert config.console_oidc_issuer and config.console_oidc_client_id and config.console_oidc_client_secret
        assert config.console_allowed_group
        self.allowed = config.console_allowed_group
        self._oauth = OAuth()
        self._oauth.register(
            name=self.NAME,
            client_id=config.console_oidc_client_id,
            client_secret=config.console_oidc_client_secret.reveal(),
            server_metadata_url=f"{config.console_oidc_issuer}/.well-known/openid-configuration",
            client_kwargs={"scope": "openid profile email", "code_challenge_method": "S256"},
        )

    @property
    def _client(self) -> Any:
        return self._oauth.create_client(self.NAME)

    async def redirect(self, request: Request, redirect_uri: str) -> Any:
        return await self._client.authorize_redirect(request, redirect_uri)

    async def claims(self, request: Request) -> Mapping[str, Any]:
        """The verified ID token's claims; raises ``SignInRefused`` for anything but a clean answer."""
        try:
            token = await self._client.authorize_access_token(request)
        except (OAuthError, JoseError) as err:  # refused at the provider, or an ID token that does not check out
            raise SignInRefused(f"sign-in failed: {err.error}") from None
        claims = token.get("userinfo")
        if not claims:
            raise SignInRefused("sign-in failed: the identity provider sent no ID token")
        return dict(claims)

    def admits(self, claims: Mapping[str, Any]) -> bool:
        """Membership of the configured group (``groups`` claim) or app role (``roles`` claim)."""
        return any(self.allowed in (claims.get(name) or []) for name in ("groups", "roles"))


def who(claims: Mapping[str, Any]) -> str:
    """The name the audit log gives a person: their sign-in name, else their object id."""
    for name in ("preferred_username", "email", "upn", "oid", "sub"):
        value = claims.get(name)
        if isinstance(value, str) and value:
            return value[:200]
    return "unknown"


# -- CSRF -----------------------------------------------------------------------------------------------------------


def csrf_token(session: dict[str, Any]) -> str:
    token = session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def csrf_valid(session: Mapping[str, Any], sent: object) -> bool:
    token = session.get("csrf")
    return isinstance(token, str) and isinstance(sent, str) and hmac.compare_digest(token.encode(), sent.encode())
