"""A fake Microsoft Entra ID OpenID Connect provider on 127.0.0.1: discovery, authorize, token and JWKS.

Why it exists: the console's sign-in must be tested end to end (a real browser following real redirects, Authlib
checking a real RS256 signature against a real JWKS), and the real Entra ID cannot be reached from a test. The
wire surface follows the documents the real one follows:

- OpenID Connect Discovery 1.0, §3 "OpenID Provider Metadata" and §4 (https://openid.net/specs/openid-connect-discovery-1_0.html):
  ``GET /{tenant}/v2.0/.well-known/openid-configuration``; the ``issuer`` is the URL before ``/.well-known``.
- OpenID Connect Core 1.0, §3.1 "Authentication using the Authorization Code Flow"
  (https://openid.net/specs/openid-connect-core-1_0.html): ``/authorize`` answers 302 to ``redirect_uri`` with
  ``code`` and ``state``; the token endpoint answers ``id_token`` (signed JWT: iss, sub, aud, exp, iat, nonce).
- RFC 7636 (PKCE) §4.6: the token endpoint checks ``BASE64URL(SHA256(code_verifier)) == code_challenge``.
- RFC 6749 §5.2: token errors are 400 ``invalid_grant`` / ``invalid_request``, 401 ``invalid_client``.
- Microsoft identity platform, "Microsoft identity platform and OAuth 2.0 authorization code flow"
  (https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-auth-code-flow): endpoints
  ``/{tenant}/oauth2/v2.0/authorize`` and ``/token``, error bodies carry ``error``, ``error_description`` (an AADSTS
  code first), ``error_codes``, ``timestamp``, ``trace_id``, ``correlation_id``; codes are single use.
- "ID token claims reference" (https://learn.microsoft.com/en-us/entra/identity-platform/id-token-claims-reference)
  and "Configure group claims" (https://learn.microsoft.com/en-us/entra/identity-platform/optional-claims):
  ``preferred_username``, ``oid``, ``tid``, ``name``, ``groups`` (group object ids), ``roles`` (app roles).
- AADSTS codes from "Microsoft Entra authentication and authorization error codes"
  (https://learn.microsoft.com/en-us/entra/identity-platform/reference-error-codes): AADSTS70008 (code expired or
  used), AADSTS501481 (code_verifier does not match code_challenge), AADSTS7000215 (invalid client secret),
  AADSTS50011 (redirect URI mismatch).

There is no login form: ``/authorize`` signs in ``user`` (the claims the test chose) at once, as Entra ID does for
a browser that already holds a session. Every request is recorded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from joserfc import jwt
from joserfc.jwk import RSAKey

from .http_server import FakeHandler, FakeHTTPServer, LocalServer

__all__ = ["FakeOidc"]

_TENANT = "11111111-2222-4333-8444-555555555555"


@dataclass(frozen=True)
class _Grant:
    client_id: str
    redirect_uri: str
    challenge: str
    nonce: str | None
    claims: Mapping[str, Any]
    issued: float


class FakeOidc(LocalServer):
    """Entra ID's v2.0 endpoints for one tenant and one registered app (client id, secret, redirect URIs)."""

    _name = "fake-oidc"

    def __init__(self, *, client_id: str = "hlf-console", client_secret: str | None = None) -> None:
        super().__init__()
        self.client_id = client_id
        self.client_secret = client_secret or secrets.token_urlsafe(24)
        self.user: dict[str, Any] = {
            "preferred_username": "ops@hlf.example",
            "name": "Ops Person",
            "oid": str(uuid.uuid4()),
            "groups": [],
            "roles": [],
        }
        self.requests: list[tuple[str, str]] = []
        # What a test may spoil in the next ID token, to see the client refuse it: "signature" (signed with a key
        # the JWKS does not publish), "nonce", "audience", "issuer", "expired".
        self.tamper: str | None = None
        self._key = RSAKey.generate_key(2048, parameters={"kid": "fake-entra-key-1", "use": "sig"})
        self._grants: dict[str, _Grant] = {}

    def _bind(self) -> FakeHTTPServer[FakeOidc]:
        return FakeHTTPServer((self._host, self._port), _Handler, self)

    @property
    def base(self) -> str:
        assert self._server is not None, "start() the fake first"
        return f"http://127.0.0.1:{self._port}"

    @property
    def issuer(self) -> str:
        return f"{self.base}/{_TENANT}/v2.0"

    def env(self, secret_file: str, allowed_group: str) -> dict[str, str]:
        return {
            "HLF_CONSOLE_OIDC_ISSUER": self.issuer,
            "HLF_CONSOLE_OIDC_CLIENT_ID": self.client_id,
            "HLF_CONSOLE_OIDC_CLIENT_SECRET_FILE": secret_file,
            "HLF_CONSOLE_ALLOWED_GROUP": allowed_group,
        }

    # -- the endpoints --------------------------------------------------------------------------------------------

    def _metadata(self) -> dict[str, Any]:
        oauth = f"{self.base}/{_TENANT}/oauth2/v2.0"
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{oauth}/authorize",
            "token_endpoint": f"{oauth}/token",
            "jwks_uri": f"{self.base}/{_TENANT}/discovery/v2.0/keys",
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "code_challenge_methods_supported": ["plain", "S256"],
            "claims_supported": [
                "sub",
                "iss",
                "aud",
                "exp",
                "iat",
                "nonce",
                "name",
                "preferred_username",
                "oid",
                "tid",
            ],
        }

    def _authorize(self, query: Mapping[str, str]) -> tuple[int, dict[str, str], bytes]:
        if query.get("client_id") != self.client_id:
            return _error(400, "unauthorized_client", "AADSTS700016", "Application not found in the directory.")
        redirect_uri = query.get("redirect_uri", "")
        if not redirect_uri.startswith("http://127.0.0.1:") and not redirect_uri.startswith("https://"):
            return _error(400, "invalid_request", "AADSTS50011", "The redirect URI does not match.")
        state = query.get("state")
        problem: str | None = None
        if query.get("response_type") != "code" or "openid" not in query.get("scope", "").split():
            problem = "invalid_request"
        elif query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            problem = "invalid_request"  # this app registration insists on PKCE S256, as the console must
        params: dict[str, str]
        if problem:
            params = {"error": problem, "error_description": "AADSTS90014: a required field is missing or invalid."}
        else:
            code = secrets.token_urlsafe(32)
            with self._lock:
                self._grants[code] = _Grant(
                    client_id=self.client_id,
                    redirect_uri=redirect_uri,
                    challenge=query["code_challenge"],
                    nonce=query.get("nonce"),
                    claims=dict(self.user),
                    issued=time.time(),
                )
            params = {"code": code}
        if state is not None:
            params["state"] = state
        sep = "&" if urlsplit(redirect_uri).query else "?"
        return 302, {"Location": redirect_uri + sep + urlencode(params), "Cache-Control": "no-store"}, b""

    def _token(self, form: Mapping[str, str], authorization: str | None) -> tuple[int, dict[str, str], bytes]:
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        if authorization and authorization.lower().startswith("basic "):
            decoded = base64.b64decode(authorization[6:]).decode()
            client_id, _, client_secret = decoded.partition(":")
        if client_id != self.client_id or client_secret != self.client_secret:
            return _error(401, "invalid_client", "AADSTS7000215", "Invalid client secret provided.")
        if form.get("grant_type") != "authorization_code":
            return _error(400, "unsupported_grant_type", "AADSTS70003", "The grant type is not supported.")
        with self._lock:
            grant = self._grants.pop(form.get("code", ""), None)  # single use
        if grant is None or time.time() - grant.issued > 600:
            return _error(
                400, "invalid_grant", "AADSTS70008", "The provided authorization code has expired or was used."
            )
        if form.get("redirect_uri") != grant.redirect_uri:
            return _error(400, "invalid_grant", "AADSTS50011", "The redirect URI does not match the one authorized.")
        verifier = form.get("code_verifier", "")
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if not secrets.compare_digest(digest, grant.challenge):
            return _error(400, "invalid_grant", "AADSTS501481", "The Code_Verifier does not match the code_challenge.")
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": self.client_id,
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "sub": hashlib.sha256(str(grant.claims.get("oid")).encode()).hexdigest()[:43],
            "tid": _TENANT,
            "ver": "2.0",
            **({"nonce": grant.nonce} if grant.nonce else {}),
            **grant.claims,
        }
        key = self._key
        if self.tamper == "signature":
            key = RSAKey.generate_key(2048, parameters={"kid": "fake-entra-key-1"})
        elif self.tamper == "nonce":
            claims["nonce"] = "not-the-nonce-you-sent"
        elif self.tamper == "audience":
            claims["aud"] = "some-other-app"
        elif self.tamper == "issuer":
            claims["iss"] = f"{self.base}/00000000-0000-4000-8000-000000000000/v2.0"
        elif self.tamper == "expired":
            claims.update(iat=now - 7200, nbf=now - 7200, exp=now - 3600)
        id_token = jwt.encode({"alg": "RS256", "kid": "fake-entra-key-1", "typ": "JWT"}, claims, key)
        body = {
            "token_type": "Bearer",
            "scope": "openid profile email",
            "expires_in": 3599,
            "ext_expires_in": 3599,
            "access_token": secrets.token_urlsafe(48),
            "id_token": id_token,
        }
        return 200, _JSON, json.dumps(body).encode()

    def _jwks(self) -> tuple[int, dict[str, str], bytes]:
        key = self._key.as_dict(private=False)
        return 200, _JSON, json.dumps({"keys": [key]}).encode()

    def _route(
        self, method: str, path: str, query: Mapping[str, str], form: Mapping[str, str], auth: str | None
    ) -> tuple[int, dict[str, str], bytes]:
        self.requests.append((method, path))
        if method == "GET" and path == f"/{_TENANT}/v2.0/.well-known/openid-configuration":
            return 200, _JSON, json.dumps(self._metadata()).encode()
        if method == "GET" and path == f"/{_TENANT}/oauth2/v2.0/authorize":
            return self._authorize(query)
        if method == "POST" and path == f"/{_TENANT}/oauth2/v2.0/token":
            return self._token(form, auth)
        if method == "GET" and path == f"/{_TENANT}/discovery/v2.0/keys":
            return self._jwks()
        return 404, {"Content-Type": "text/plain"}, b"not found"


_JSON = {"Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-store, no-cache"}


def _error(status: int, error: str, code: str, text: str) -> tuple[int, dict[str, str], bytes]:
    body = {
        "error": error,
        "error_description": f"{code}: {text}",
        "error_codes": [int(code[6:])],
        "timestamp": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
        "trace_id": str(uuid.uuid4()),
        "correlation_id": str(uuid.uuid4()),
    }
    return status, _JSON, json.dumps(body).encode()


class _Handler(FakeHandler[FakeOidc]):
    def _answer(self, method: str) -> None:
        parts = urlsplit(self.path)
        form = dict(parse_qsl(self._body().decode())) if method == "POST" else {}
        status, headers, body = self.server.fake._route(
            method, parts.path, dict(parse_qsl(parts.query)), form, self.headers.get("Authorization")
        )
        self._reply(status, body, headers)

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")
