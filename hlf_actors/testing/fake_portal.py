"""A fake Microsoft Dataverse (Dynamics 365) Web API and Entra ID token endpoint, served on 127.0.0.1.

Why it exists: the service's whole job is to keep one boolean per mentor true in the portal, and nearly all
of its difficulty is in what the portal does when it is not healthy. A mocked transport would only test our
idea of HTTP; this is a real ``ThreadingHTTPServer`` (HTTP/1.1, keep-alive), so integration tests, acceptance
tests (the service in a subprocess, this fake in the test process), the demo and the benchmarks all drive
the real client over real sockets, and every request is recorded for the test to inspect.

Why one file of about a thousand lines, over the house's 450: it is one vendor service, and its parts share one
lock-guarded state (records, tokens, scripted queues, the service-protection window) that every answer reads and
changes. Split by endpoint, each part would reach into the others' state; the table below is the map instead, and the
threaded server plumbing lives in ``http_server.py``.

The wire surface follows INTERFACE.md ("Dynamics wire format") and real Dataverse::

    POST  /{tenant}/oauth2/v2.0/token       client-credentials grant -> opaque bearer token
    PATCH /api/data/v9.2/{set}({guid})      If-Match: *, {"<listed_field>": bool} -> 204, record updated
    GET   /api/data/v9.2/{set}?$select=...  paged by Prefer: odata.maxpagesize; @odata.nextLink to follow
    GET   /api/data/v9.2/{set}({guid})      one record
    GET   /api/data/v9.2/WhoAmI             the cheap authorised read behind tenant checks
    GET   /api/data/v9.2/systemusers({id})/Microsoft.Dynamics.CRM.RetrievePrincipalAccess(Target=@tid)
                                            the application user's rights on one record
    anything else                           404, code 0x8006088a "Resource not found for the segment"

How a PATCH is answered, first match wins::

    answer_with_sign_in_page()               -> 200 text/html sign-in page (not Dataverse at all)
    token missing, unknown, expired, revoked -> 401, empty body, WWW-Authenticate: Bearer authorization_uri=…
    remove_app_user()                        -> 403 0x80072560 "The user is not a member of the organization."
    service-protection limit passed          -> 429 + Retry-After   enforce_service_protection(), throttle_for()
    revoke_privilege("write"/"read")         -> 403 0x80040220 "Principal user … is missing prvWrite… privilege"
    a column the entity lacks (rename_column)-> 400 0x80048d19 "… The property '…' does not exist on type …"
    not JSON / bad body                      -> 400 (415 when Content-Type is not JSON)
    no If-Match header                       -> an upsert: the record is created if missing (as Dataverse does)
    scripted queue of this record            -> its next Reply      script(), fail_then_succeed(), throttle()
    scripted queue of all records            -> its next Reply      throttle() without a record
    standing reply of this record            -> that Reply          always(reply, record_id)
    a draw from the random mix               -> that Reply          random_replies(mix, seed=...)
    standing reply of all records            -> that Reply          always(reply)
    no such record                           -> 404, code 0x80040217
    otherwise                                -> 204, record updated

Scripted behaviours, all through ``Reply``: any status, headers and body (garbage is sent byte for byte with
a correct Content-Length); ``delay_s`` (the handler thread sleeps, other connections carry on); ``reset``
(the socket is closed with an RST instead of an answer); ``apply`` (whether the record changes - by default
only for a 2xx - so "applied, but the client timed out" and "answered 204 without applying" are both
scriptable). ``random_replies`` answers each PATCH with a seeded random draw from weighted Replies (chaos runs:
204 mixed with 429, 5xx, 403, slow answers, resets, garbage). Credentials: ``rotate_secret``, ``revoke_tokens``,
``fail_token_endpoint``, ``random_token_failures`` (the token endpoint fails sometimes) and token expiry after
``token_lifetime_s``.

Sources, Microsoft Learn: "Update and delete table rows using the Web API" (PATCH answers 204; without
``If-Match: *`` a PATCH is an upsert and creates a missing record); "Troubleshoot Dataverse Web API client errors"
(0x8006088a "Resource not found for the segment"; "Could not find a property named"; 0x80048d19 with "does not
exist on type"); "Troubleshoot Dataverse client errors" (-2147220960 = 0x80040220 "Principal user is missing
privilege"; -2147220969 = 0x80040217 "… Does Not Exist"); "Web service error codes" (0x80072560 "The user is not a
member of the organization."); "Service protection API limits" (429 with Retry-After in seconds; continuing to
send during it extends it); "RetrievePrincipalAccess Function" and "RetrievePrincipalAccessResponse ComplexType"
(AccessRights as a comma-separated flag list); "Use OAuth authentication with Microsoft Dataverse" (a 401 carries
``WWW-Authenticate: Bearer authorization_uri=…, resource_id=…`` and no body).

Timing: a request is recorded as soon as its answer is decided; a scripted Reply's record change happens
after its delay, just before the answer is written. ``stop()`` severs open connections and ``start()`` again
serves on the same port with the same records, so "the portal went away and came back" is one call each.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import random
import re
import secrets
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any, Literal, Self
from urllib.parse import parse_qsl, quote, unquote, urlsplit
from uuid import UUID, uuid4

from .http_server import FakeHandler, FakeHTTPServer, LocalServer

__all__ = ["FakePortal", "RecordedRequest", "Reply", "chaos_mix", "token_chaos_mix"]

_API = "/api/data/v9.2/"
_MAX_PAGE_SIZE = 5000  # Dataverse pages at most this many rows, whatever the client prefers
_MAX_BODY = 1 << 20
_NO_BODY = (204, 304)
_GUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_ENTITY = re.compile(r"(?P<set>[A-Za-z_][A-Za-z0-9_]*)\((?P<key>[^)]*)\)")
_SKIPTOKEN = re.compile(r'pagenumber="(?P<page>\d+)".*last="\{?(?P<last>' + _GUID + r')\}?"')
_PRINCIPAL_ACCESS = re.compile(
    r"systemusers\((?P<user>" + _GUID + r")\)/Microsoft\.Dynamics\.CRM\.RetrievePrincipalAccess\(Target=@tid\)"
)
_SIGN_IN_PAGE = (
    b"<!DOCTYPE html><html><head><title>Sign in to your account</title></head><body>"
    b"<form method='post' action='https://login.microsoftonline.com/common/login'><input name='loginfmt'>"
    b"</form></body></html>"
)
_ODATA = {"OData-Version": "4.0"}
_ODATA_JSON = {**_ODATA, "Content-Type": "application/json; odata.metadata=minimal"}
_AAD_JSON = {"Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-store, no-cache"}


@dataclass(frozen=True)
class Reply:
    """One scripted answer to a PATCH (or, through ``fail_token_endpoint``, to a token request).

    ``body=None`` sends an error JSON for a status >= 400 and nothing for a 2xx. ``apply=None`` changes the
    record only for a 2xx that is actually answered (not for ``reset``).
    """

    status: int = 204
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    delay_s: float = 0.0
    reset: bool = False
    apply: bool | None = None

    def __post_init__(self) -> None:
        if not 200 <= self.status <= 599:
            raise ValueError(f"Reply status must be 200..599, not {self.status}")
        if self.status in _NO_BODY and self.body:
            raise ValueError(f"a {self.status} cannot carry a body; HTTP framing would break")
        if self.delay_s < 0:
            raise ValueError("Reply delay_s must not be negative")

    @property
    def applies(self) -> bool:
        if self.apply is not None:
            return self.apply
        return not self.reset and 200 <= self.status < 300


def chaos_mix(slow_s: float) -> list[tuple[float, Reply | None]]:
    """A misbehaving portal for ``random_replies``: about half the PATCHes answered normally, the rest 429 with
    Retry-After, 500/502/503/504, a permanent 403 or 404, answers after ``slow_s`` (set it past the client's
    timeout; some of them applied all the same), connection resets (some after applying), garbage bodies and
    bodies cut short of their Content-Length."""
    garbage = b"<html><body>\x00\xff\xfe upstream exploded"
    return [
        (50.0, None),  # an ordinary 204
        (6.0, Reply(429, {"Retry-After": "1"})),
        (4.0, Reply(500)),
        (4.0, Reply(502)),
        (4.0, Reply(503, {"Retry-After": "1"})),
        (4.0, Reply(504)),
        (1.5, Reply(403)),
        (1.5, Reply(404)),
        (3.0, Reply(204, delay_s=slow_s, apply=False)),
        (2.0, Reply(204, delay_s=slow_s, apply=True)),  # the client gave up, the portal applied it anyway
        (4.0, Reply(204, reset=True)),
        (2.0, Reply(204, reset=True, apply=True)),  # applied, then the connection reset before the answer
        (4.0, Reply(502, {"Content-Type": "text/html"}, garbage)),
        (3.0, Reply(200, {"Content-Type": "application/json"}, b"\x89PNG not json")),  # garbage, but a 2xx
        (3.0, Reply(200, {"Content-Length": "200", "Connection": "close"}, b'{"hlf_publiclisting": tr')),
        (2.0, Reply(503, {"Content-Length": "300", "Connection": "close"}, b'{"error": {"message": "Serv')),
    ]


def token_chaos_mix() -> list[tuple[float, Reply | None]]:
    """A token endpoint that fails sometimes, for ``random_token_failures``: 5xx, 429, garbage, resets."""
    return [
        (70.0, None),
        (8.0, Reply(503)),
        (6.0, Reply(500)),
        (4.0, Reply(429, {"Retry-After": "1"})),
        (4.0, Reply(200, {"Content-Type": "application/json"}, b"garbage, not a token")),
        (4.0, Reply(500, reset=True)),
    ]


@dataclass(frozen=True)
class RecordedRequest:
    """One request as it arrived, and the status we answered (0 when the connection was reset)."""

    method: str
    path: str  # percent-decoded, without the query
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased; repeated headers joined with ", "
    body: bytes
    at: float  # time.time() when the request line was read
    record_id: str | None  # lower-case uuid text for requests to one entity record
    status: int

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        """The body as a form, for token requests."""
        return dict(parse_qsl(self.body.decode("utf-8", "replace"), keep_blank_values=True))


@dataclass(frozen=True)
class _Incoming:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    at: float
    error: str | None = None  # why the request could not be read: answered 400 and the connection closed


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay_s: float = 0.0
    reset: bool = False
    close: bool = False
    commit: Callable[[], None] | None = None  # the record change of a scripted Reply, run after its delay
    release: Callable[[], None] | None = None  # frees the concurrency slot once the answer is out


@dataclass(frozen=True)
class _Target:
    kind: Literal["whoami", "collection", "record", "bad_key", "principal_access", "unknown"]
    record_id: str = ""


@dataclass(frozen=True)
class _Limits:
    max_requests: int
    window_s: float
    max_concurrent: int


class _Mix:
    """Weighted random Replies; ``None`` stands for "answer as if there were no mix". Drawn under the portal's lock."""

    def __init__(self, mix: Sequence[tuple[float, Reply | None]], seed: int | None) -> None:
        if not mix or any(weight < 0 for weight, _ in mix) or sum(weight for weight, _ in mix) <= 0:
            raise ValueError("a random mix needs (weight, Reply) pairs with non-negative weights and a positive sum")
        self._weights = [weight for weight, _ in mix]
        self._replies = [reply for _, reply in mix]
        self._rng = random.Random(seed)

    def draw(self) -> Reply | None:
        return self._rng.choices(self._replies, self._weights)[0]


@dataclass
class _Row:
    listed: bool
    version: int


class FakePortal(LocalServer):
    """The fake portal. Every shared structure is guarded by ``_lock``; methods named ``_locked_*`` or called
    from ``_respond`` expect it held."""

    _name = "fake-portal"

    def __init__(
        self,
        *,
        client_id: str = "hlf-test-client",
        client_secret: str = "hlf-test-secret",
        entity_set: str = "hlf_mentorlistings",
        listed_field: str = "hlf_publiclisting",
        key_field: str = "hlf_mentorlistingid",
        tenant: str = "test-tenant",
        token_lifetime_s: int = 3600,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.client_id = client_id
        self.entity_set = entity_set
        self.listed_field = listed_field
        self.key_field = key_field
        self.tenant = tenant
        self.token_lifetime_s = token_lifetime_s
        self.page_size_default: int = 5000
        self._secret = client_secret
        self._records: dict[str, _Row] = {}
        self._version = 0
        self._log: list[RecordedRequest] = []
        self._scripts: dict[str, deque[Reply]] = {}
        self._script_all: deque[Reply] = deque()
        self._standing: dict[str, Reply] = {}
        self._standing_all: Reply | None = None
        self._tokens: dict[str, float] = {}  # token -> time.monotonic() when issued
        self._token_failure: Reply | None = None
        self._mix: _Mix | None = None
        self._token_mix: _Mix | None = None
        self._limits: _Limits | None = None
        self._window: deque[float] = deque()
        self._in_flight = 0
        self._throttled = 0
        self._app_user_removed = False
        self._readable: set[str] | None = None  # restrict_reads_to()
        self._missing_privileges: set[str] = set()  # "read", "write"
        self._sign_in_page = False
        self._throttle_until = 0.0  # throttle_for(): every data call gets 429 until then
        self._throttle_grow_s = 0.0
        self._whoami = {
            "UserId": str(uuid4()),
            "BusinessUnitId": str(uuid4()),
            "OrganizationId": str(uuid4()),
        }

    # -- lifecycle ---------------------------------------------------------------------------------

    def _bind(self) -> _Server:
        return _Server((self._host, self._port), _Handler, self)

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("the fake portal is already running")
        return super().start()

    def __enter__(self) -> Self:
        return self if self._server is not None else self.start()

    @property
    def host(self) -> str:
        return self._host

    @property
    def url(self) -> str:
        if self._port == 0:
            raise RuntimeError("start() the fake portal before asking for its url")
        return f"http://{self.host}:{self._port}"

    @property
    def token_url(self) -> str:
        return f"{self.url}{self._token_path}"

    @property
    def client_secret(self) -> str:
        with self._lock:
            return self._secret

    def env(self) -> dict[str, str]:
        return {
            "HLF_DYNAMICS_URL": self.url,
            "HLF_DYNAMICS_TOKEN_URL": self.token_url,
            "HLF_DYNAMICS_CLIENT_ID": self.client_id,
            "HLF_DYNAMICS_CLIENT_SECRET": self.client_secret,
            "HLF_DYNAMICS_ENTITY_SET": self.entity_set,
            "HLF_DYNAMICS_LISTED_FIELD": self.listed_field,
            "HLF_DYNAMICS_KEY_FIELD": self.key_field,
        }

    # -- records -----------------------------------------------------------------------------------

    def add_record(self, record_id: str | UUID, listed: bool = True) -> None:
        with self._lock:
            self._locked_set(_key(record_id), listed)

    def remove_record(self, record_id: str | UUID) -> None:
        with self._lock:
            self._records.pop(_key(record_id), None)

    def listed(self, record_id: str | UUID) -> bool | None:
        with self._lock:
            row = self._records.get(_key(record_id))
            return None if row is None else row.listed

    def records(self) -> dict[str, bool]:
        with self._lock:
            return {record_id: row.listed for record_id, row in self._records.items()}

    # -- what arrived ------------------------------------------------------------------------------

    def requests(self, method: str | None = None, record_id: str | UUID | None = None) -> list[RecordedRequest]:
        wanted = None if record_id is None else _key(record_id)
        with self._lock:
            log = list(self._log)
        return [
            r
            for r in log
            if (method is None or r.method == method.upper()) and (wanted is None or r.record_id == wanted)
        ]

    def patches(self, record_id: str | UUID | None = None) -> list[RecordedRequest]:
        return [r for r in self.requests("PATCH", record_id) if r.record_id is not None]

    def token_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests("POST") if r.path == self._token_path]

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()

    def wait_for(self, predicate: Callable[[FakePortal], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                raise AssertionError(self._timeout_message(predicate, timeout))
            time.sleep(0.005)

    def _timeout_message(self, predicate: Callable[[FakePortal], bool], timeout: float) -> str:
        try:
            condition = inspect.getsource(predicate).strip()
        except (OSError, TypeError):
            condition = repr(predicate)
        current = self.records()
        records: object = current if len(current) <= 20 else f"{len(current)} records"
        recent = [f"  {r.method} {r.path} -> {r.status}" for r in self.requests()[-10:]] or ["  (none)"]
        return (
            f"fake portal: condition not met within {timeout}s: {condition}\n"
            f"records: {records}\nlast requests:\n" + "\n".join(recent)
        )

    # -- scripted behaviours -----------------------------------------------------------------------

    def script(self, record_id: str | UUID, *replies: Reply) -> None:
        """The next len(replies) PATCHes to the record get these answers, after any already scripted."""
        with self._lock:
            self._scripts.setdefault(_key(record_id), deque()).extend(replies)

    def always(self, reply: Reply | None, record_id: str | UUID | None = None) -> None:
        with self._lock:
            if record_id is None:
                self._standing_all = reply
            elif reply is None:
                self._standing.pop(_key(record_id), None)
            else:
                self._standing[_key(record_id)] = reply

    def random_replies(self, mix: Sequence[tuple[float, Reply | None]] | None, *, seed: int | None = None) -> None:
        """Answer each PATCH that no script or standing reply of its record answers with a random draw from
        ``mix``, (weight, Reply) pairs where ``None`` means an ordinary answer; seeded for reproducible runs.
        ``None`` instead of a mix turns it off."""
        with self._lock:
            self._mix = None if mix is None else _Mix(mix, seed)

    def fail_then_succeed(self, record_id: str | UUID, failures: int = 2, status: int = 503) -> None:
        self.script(record_id, *[Reply(status=status)] * failures)

    def throttle(self, record_id: str | UUID | None = None, retry_after_s: int = 1, times: int = 1) -> None:
        """429 with Retry-After for the next ``times`` PATCHes (to the record, or to any record)."""
        message = (
            "Combined execution time of incoming requests exceeded limit of 1,200,000 milliseconds over "
            "time window of 300 seconds. Decrease number of concurrent requests or reduce the duration of "
            "requests and try again later."
        )
        body = _json_bytes({"error": {"code": "0x80072321", "message": message}})
        reply = Reply(429, {"Retry-After": str(retry_after_s), **_ODATA_JSON}, body)
        if record_id is not None:
            self.script(record_id, *[reply] * times)
            return
        with self._lock:
            self._script_all.extend([reply] * times)

    def enforce_service_protection(
        self, max_requests: int = 6000, window_s: float = 300.0, max_concurrent: int = 52
    ) -> None:
        """Dataverse's per-user limits on the Web API: requests per sliding window and requests in flight.

        Counting starts now; requests refused with 429 are not counted against the window.
        """
        with self._lock:
            self._limits = _Limits(max_requests, window_s, max_concurrent)
            self._window.clear()

    def throttle_for(self, seconds: float, *, grow_s: float = 1.0) -> None:
        """Every data call gets 429 for ``seconds``, with Retry-After the time left; each request that arrives during
        it pushes the end ``grow_s`` later ("Service protection API limits": continued demand lengthens the wait)."""
        with self._lock:
            self._throttle_until = time.monotonic() + seconds
            self._throttle_grow_s = grow_s

    # -- tenant-wide misconfigurations (each undone by its pair) -----------------------------------

    def remove_app_user(self, removed: bool = True) -> None:
        """The application user is removed from (or disabled in) the environment: 403 0x80072560 on every call."""
        with self._lock:
            self._app_user_removed = removed

    def revoke_privilege(self, which: Literal["read", "write"], revoked: bool = True) -> None:
        """The application user's security role loses Read or Write on the table."""
        with self._lock:
            (self._missing_privileges.add if revoked else self._missing_privileges.discard)(which)

    def rename_entity_set(self, new_name: str) -> None:
        """The table is renamed: the old entity set answers 404 0x8006088a, the records move to the new one."""
        with self._lock:
            self.entity_set = new_name

    def rename_column(self, new_name: str) -> None:
        """The listed column is renamed: PATCH and $select naming the old one get 400."""
        with self._lock:
            self.listed_field = new_name

    def restrict_reads_to(self, record_ids: set[str] | None) -> None:
        """A role with user-level Read: listing reads return only the records the application user owns. PATCHes
        still reach every record (Write may be granted at another level)."""
        with self._lock:
            self._readable = None if record_ids is None else {_key(r) for r in record_ids}

    def answer_with_sign_in_page(self, on: bool = True) -> None:
        """Something that is not Dataverse (a sign-in page, a proxy) answers every data call with a 200 HTML page."""
        with self._lock:
            self._sign_in_page = on

    @property
    def throttled_count(self) -> int:
        """How many requests the service-protection limits refused (scripted 429s are not counted)."""
        with self._lock:
            return self._throttled

    # -- credentials -------------------------------------------------------------------------------

    def rotate_secret(self, new_secret: str) -> None:
        """Tokens already issued stay valid, as they do in Entra ID."""
        with self._lock:
            self._secret = new_secret

    def revoke_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()

    def fail_token_endpoint(self, reply: Reply | None) -> None:
        with self._lock:
            self._token_failure = reply

    def random_token_failures(
        self, mix: Sequence[tuple[float, Reply | None]] | None, *, seed: int | None = None
    ) -> None:
        """Answer each token request with a random draw from ``mix`` ((weight, Reply) pairs; ``None`` issues a
        token as usual): a token endpoint that fails sometimes. ``fail_token_endpoint`` still wins."""
        with self._lock:
            self._token_mix = None if mix is None else _Mix(mix, seed)

    # -- answering (called by _Handler) ------------------------------------------------------------

    def _respond(self, request: _Incoming) -> _Answer:
        try:
            with self._lock:
                answer, record_id = self._route(request)
                status = 0 if answer.reset else answer.status
                self._log.append(
                    RecordedRequest(
                        request.method,
                        request.path,
                        request.query,
                        request.headers,
                        request.body,
                        request.at,
                        record_id or None,
                        status,
                    )
                )
        except Exception as exc:  # a bug here must answer, not silently kill the connection's thread
            answer = _odata_error(500, "0x0", f"fake portal bug: {exc!r}", close=True)
        return answer

    def _route(self, request: _Incoming) -> tuple[_Answer, str]:
        if request.error is not None:
            return _odata_error(400, "0x0", request.error, close=True), ""
        if request.path == self._token_path and request.method == "POST":
            return self._token(request), ""
        if request.path.startswith(_API):
            return self._data_api(request)
        return _not_found(request.path), ""

    def _data_api(self, request: _Incoming) -> tuple[_Answer, str]:
        target = self._target(request.path.removeprefix(_API))
        if self._sign_in_page:
            return _Answer(200, {"Content-Type": "text/html; charset=utf-8"}, _SIGN_IN_PAGE), target.record_id
        refused = self._unauthorised(request) or self._not_member() or self._protect() or self._throttle_window()
        if refused is not None:
            return refused, target.record_id
        answer = self._dispatch(request, target)
        self._in_flight += 1
        return replace(answer, release=self._release_slot), target.record_id

    def _target(self, segment: str) -> _Target:
        if segment in ("WhoAmI", "WhoAmI()"):
            return _Target("whoami")
        access = _PRINCIPAL_ACCESS.fullmatch(segment)
        if access is not None:
            return _Target("principal_access", access["user"].lower())
        if segment == self.entity_set:
            return _Target("collection")
        match = _ENTITY.fullmatch(segment)
        if match is None or match["set"] != self.entity_set:
            return _Target("unknown")
        if re.fullmatch(_GUID, match["key"]) is None:
            return _Target("bad_key")
        return _Target("record", match["key"].lower())

    def _dispatch(self, request: _Incoming, target: _Target) -> _Answer:
        match (request.method, target.kind):
            case ("PATCH", "record"):
                return self._patch(request, target.record_id)
            case ("GET", "record"):
                return self._get_record(target.record_id)
            case ("GET", "collection"):
                return self._get_page(request)
            case ("GET", "whoami"):
                context = f"{self.url}{_API}$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse"
                return _odata(200, {"@odata.context": context, **self._whoami})
            case ("GET", "principal_access"):
                return self._principal_access(request, target.record_id)
            case (_, "bad_key"):
                return _odata_error(400, "0x80060888", "Bad Request - Error in query syntax.")
        return _not_found(request.path)

    def _unauthorised(self, request: _Incoming) -> _Answer | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        issued = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if issued is None:
            problem = "The bearer token is missing, unknown or revoked"
        elif time.monotonic() - issued >= self.token_lifetime_s:
            problem = "The token is expired"
        else:
            return None
        # Dataverse answers a bad token with an empty 401 whose challenge says where to get one ("Use OAuth
        # authentication with Microsoft Dataverse"); ``problem`` is only for a human reading the recorded request.
        challenge = (
            f"Bearer authorization_uri=https://login.microsoftonline.com/{self.tenant}/oauth2/authorize, "
            f"resource_id={self.url}/"
        )
        return _Answer(401, {"WWW-Authenticate": challenge, "X-Fake-Problem": problem})

    def _not_member(self) -> _Answer | None:
        if not self._app_user_removed:
            return None
        return _odata_error(403, "0x80072560", "The user is not a member of the organization.")

    def _privilege_denied(self, which: Literal["read", "write"]) -> _Answer | None:
        if which not in self._missing_privileges:
            return None
        name = f"prv{which.capitalize()}{self._entity_name}"
        message = (
            f"Principal user (Id={self._whoami['UserId']}, type=8, roleCount=1, privilegeCount=340, accessMode=4), "
            f"is missing {name} privilege (Id={uuid4()}) on OTC=10234 for entity '{self._entity_name}'. "
            f"context: Method=PATCH;"
        )
        return _odata_error(403, "0x80040220", message)

    def _throttle_window(self) -> _Answer | None:
        now = time.monotonic()
        if now >= self._throttle_until:
            return None
        self._throttle_until += self._throttle_grow_s
        message = "Number of requests exceeded the limit of 6000 over time window of 300 seconds."
        return self._throttled_answer(self._throttle_until - now, "0x80072322", message)

    def _principal_access(self, request: _Incoming, user_id: str) -> _Answer:
        """RetrievePrincipalAccess for the record named by the @tid parameter alias."""
        if user_id != self._whoami["UserId"].lower():
            return _odata_error(404, "0x80040217", f"systemuser With Id = {user_id} Does Not Exist")
        try:
            target = json.loads(request.query.get("@tid", ""))
            match = _ENTITY.fullmatch(str(target["@odata.id"]))
        except (ValueError, KeyError, TypeError):
            match = None
        if match is None or match["set"] != self.entity_set or match["key"].lower() not in self._records:
            return _bad_request("The Target parameter does not name a record of this environment")
        rights = ["ReadAccess", "WriteAccess", "AppendAccess", "AppendToAccess", "CreateAccess", "DeleteAccess"]
        rights = [r for r in rights if r.removesuffix("Access").lower() not in self._missing_privileges]
        context = f"{self.url}{_API}$metadata#Microsoft.Dynamics.CRM.RetrievePrincipalAccessResponse"
        return _odata(200, {"@odata.context": context, "AccessRights": ", ".join(rights) or "None"})

    def _protect(self) -> _Answer | None:
        limits = self._limits
        if limits is None:
            return None
        now = time.monotonic()
        while self._window and now - self._window[0] >= limits.window_s:
            self._window.popleft()
        if len(self._window) >= limits.max_requests:
            message = (
                f"Number of requests exceeded the limit of {limits.max_requests} over time window of "
                f"{limits.window_s:g} seconds."
            )
            return self._throttled_answer(self._window[0] + limits.window_s - now, "0x80072322", message)
        if self._in_flight >= limits.max_concurrent:
            message = f"Number of concurrent requests exceeded the limit of {limits.max_concurrent}."
            return self._throttled_answer(1, "0x80072326", message)
        self._window.append(now)
        return None

    def _throttled_answer(self, wait_s: float, code: str, message: str) -> _Answer:
        self._throttled += 1
        return _odata_error(429, code, message, {"Retry-After": str(max(1, math.ceil(wait_s)))})

    def _release_slot(self) -> None:
        with self._lock:
            self._in_flight -= 1

    # -- PATCH -------------------------------------------------------------------------------------

    def _patch(self, request: _Incoming, record_id: str) -> _Answer:
        listed = self._listed_in(request)
        if isinstance(listed, _Answer):
            return listed
        denied = self._privilege_denied("write")
        if denied is not None:
            return denied
        reply = self._next_reply(record_id)
        if reply is not None:
            return self._scripted(reply, record_id, listed)
        upsert = request.headers.get("if-match", "").strip() != "*"
        if record_id not in self._records and not upsert:
            return self._missing(record_id)
        self._locked_set(record_id, listed)
        return _Answer(204, {**_ODATA, "OData-EntityId": f"{self.url}{_API}{self.entity_set}({record_id})"})

    def _listed_in(self, request: _Incoming) -> bool | _Answer:
        """The listed value the PATCH asks for, or the 400/415 it deserves."""
        if not request.headers.get("content-type", "").lower().startswith("application/json"):
            return _odata_error(415, "0x80048d19", "Content-Type must be application/json")
        try:
            payload = json.loads(request.body)
        except ValueError:
            return _bad_request("The request body is not valid JSON")
        if not isinstance(payload, dict):
            return _bad_request("The request body must be a JSON object")
        unknown = sorted(k for k in payload if k != self.listed_field and not k.startswith("@"))
        if unknown:
            entity = f"Microsoft.Dynamics.CRM.{self._entity_name}"
            return _bad_request(
                f"Error identified in Payload provided by the user for Entity :'{self.entity_set}', ----> "
                f"InnerException : Microsoft.OData.ODataException: The property '{unknown[0]}' does not exist on type "
                f"'{entity}'. Make sure to only use property names that are defined by the type or mark the type as "
                "open type."
            )
        value = payload.get(self.listed_field)
        if not isinstance(value, bool):
            return _bad_request(f"The body must be a JSON object with a boolean '{self.listed_field}'")
        return value

    def _next_reply(self, record_id: str) -> Reply | None:
        queue = self._scripts.get(record_id)
        if queue:
            reply = queue.popleft()
            if not queue:
                del self._scripts[record_id]
            return reply
        if self._script_all:
            return self._script_all.popleft()
        if record_id in self._standing:
            return self._standing[record_id]
        drawn = self._mix.draw() if self._mix is not None else None
        return drawn if drawn is not None else self._standing_all

    def _scripted(self, reply: Reply, record_id: str, listed: bool) -> _Answer:
        answer = _from_reply(reply, _ODATA, _odata_error_body)
        if reply.applies and record_id in self._records:
            answer = replace(answer, commit=lambda: self._commit(record_id, listed))
        return answer

    def _commit(self, record_id: str, listed: bool) -> None:
        with self._lock:
            if record_id in self._records:  # never create: the record may have gone during the delay
                self._locked_set(record_id, listed)

    def _locked_set(self, record_id: str, listed: bool) -> None:
        self._version += 1
        self._records[record_id] = _Row(listed, self._version)

    def _missing(self, record_id: str) -> _Answer:
        return _odata_error(404, "0x80040217", f"{self._entity_name} With Id = {record_id} Does Not Exist")

    # -- GET ---------------------------------------------------------------------------------------

    def _get_record(self, record_id: str) -> _Answer:
        denied = self._privilege_denied("read")
        if denied is not None:
            return denied
        if record_id not in self._records:
            return self._missing(record_id)
        context = f"{self.url}{_API}$metadata#{self.entity_set}/$entity"
        return _odata(200, {"@odata.context": context, **self._row(record_id)})

    def _get_page(self, request: _Incoming) -> _Answer:
        denied = self._privilege_denied("read")
        if denied is not None:
            return denied
        select = request.query.get("$select")
        columns = (self.key_field, self.listed_field)
        unknown = [name for name in (select or "").split(",") if select and name not in columns]
        if unknown:
            entity = f"Microsoft.Dynamics.CRM.{self._entity_name}"
            return _bad_request(f"Could not find a property named '{unknown[0]}' on type '{entity}'.")
        position = _skiptoken_position(request.query.get("$skiptoken"))
        if position is None:
            return _bad_request("The $skiptoken is not valid")
        page_number, after = position
        size, applied = self._page_size(request.headers.get("prefer", ""))
        top = request.query.get("$top", "")
        visible = self._records if self._readable is None else self._readable.intersection(self._records)
        remaining = sorted(i for i in visible if i > after)  # keyset paging: stable order by id
        if top.isdigit():  # $top: at most that many rows, and no next page
            remaining = remaining[: int(top)]
        page = remaining[:size]
        payload: dict[str, Any] = {
            "@odata.context": f"{self.url}{_API}$metadata#{self.entity_set}({select or ','.join(columns)})",
            "value": [self._row(i) for i in page],
        }
        if len(remaining) > size:
            payload["@odata.nextLink"] = self._next_link(select, page_number + 1, page[-1])
        return _odata(200, payload, {"Preference-Applied": f"odata.maxpagesize={size}"} if applied else {})

    def _page_size(self, prefer: str) -> tuple[int, bool]:
        for preference in prefer.split(","):
            name, _, value = preference.partition("=")
            if name.strip().lower() == "odata.maxpagesize" and value.strip().isdigit() and int(value) > 0:
                return min(int(value), _MAX_PAGE_SIZE), True
        return self.page_size_default, False

    def _next_link(self, select: str | None, page_number: int, last: str) -> str:
        # Opaque to the client like Dataverse's paging cookie: quotes, spaces, braces, all percent-encoded.
        cookie = f'<cookie pagenumber="{page_number}" last="{{{last}}}" istracking="False" />'
        query = f"$skiptoken={quote(cookie, safe='')}"
        if select:
            query = f"$select={quote(select, safe=',')}&{query}"
        return f"{self.url}{_API}{self.entity_set}?{query}"

    def _row(self, record_id: str) -> dict[str, Any]:
        row = self._records[record_id]
        return {"@odata.etag": f'W/"{row.version}"', self.key_field: record_id, self.listed_field: row.listed}

    # -- token endpoint ----------------------------------------------------------------------------

    def _token(self, request: _Incoming) -> _Answer:
        failure = self._token_failure
        if failure is None and self._token_mix is not None:
            failure = self._token_mix.draw()
        if failure is not None:
            return _from_reply(failure, {}, _aad_error_body)
        form = dict(parse_qsl(request.body.decode("utf-8", "replace"), keep_blank_values=True))
        refused = self._refuse_grant(form)
        if refused is not None:
            return refused
        token = secrets.token_urlsafe(32)
        self._tokens[token] = time.monotonic()
        lifetime = self.token_lifetime_s
        payload = {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": token,
        }
        return _Answer(200, _AAD_JSON, _json_bytes(payload))

    def _refuse_grant(self, form: dict[str, str]) -> _Answer | None:
        grant, client_id, scope = form.get("grant_type"), form.get("client_id"), form.get("scope", "")
        if grant is None:
            message = "The request body must contain the following parameter: 'grant_type'."
            return _aad_error(400, "invalid_request", 900144, message)
        if grant != "client_credentials":
            message = f"The app requested an unsupported grant type '{grant}'."
            return _aad_error(400, "unsupported_grant_type", 70003, message)
        if client_id != self.client_id:
            message = f"Application with identifier '{client_id}' was not found in the directory '{self.tenant}'."
            return _aad_error(401, "invalid_client", 700016, message)
        if form.get("client_secret") != self._secret:
            message = (
                "Invalid client secret provided. Ensure the secret being sent in the request is the client "
                f"secret value, not the client secret ID, for a secret added to app '{client_id}'."
            )
            return _aad_error(401, "invalid_client", 7000215, message)
        if not scope.endswith("/.default"):
            message = (
                f"The provided value for scope {scope} is not valid. Client credential flows must have a "
                "scope value with /.default suffixed to the resource identifier (application ID URI)."
            )
            return _aad_error(400, "invalid_scope", 1002012, message)
        return None

    # -- small helpers -----------------------------------------------------------------------------

    @property
    def _token_path(self) -> str:
        return f"/{self.tenant}/oauth2/v2.0/token"

    @property
    def _entity_name(self) -> str:
        return self.entity_set.removesuffix("s")


def _key(record_id: str | UUID) -> str:
    return str(record_id if isinstance(record_id, UUID) else UUID(str(record_id)))


def _json_bytes(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _odata(status: int, payload: object, headers: Mapping[str, str] | None = None) -> _Answer:
    return _Answer(status, {**_ODATA_JSON, **(headers or {})}, _json_bytes(payload))


def _odata_error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None, close: bool = False
) -> _Answer:
    return replace(_odata(status, {"error": {"code": code, "message": message}}, headers), close=close)


def _bad_request(message: str) -> _Answer:
    return _odata_error(400, "0x80048d19", message)


def _not_found(path: str) -> _Answer:
    return _odata_error(404, "0x8006088a", f"Resource not found for the segment '{path}'.")


def _aad_error(status: int, error: str, code: int, description: str) -> _Answer:
    payload = {"error": error, "error_description": f"AADSTS{code}: {description}", "error_codes": [code]}
    return _Answer(status, _AAD_JSON, _json_bytes(payload))


def _odata_error_body(status: int, message: str) -> object:
    return {"error": {"code": "0x0", "message": message}}


def _aad_error_body(status: int, message: str) -> object:
    error = "temporarily_unavailable" if status >= 500 else "invalid_request"
    return {"error": error, "error_description": message}


def _from_reply(reply: Reply, headers: Mapping[str, str], error_body: Callable[[int, str], object]) -> _Answer:
    merged = dict(headers)
    body = reply.body
    if body is None and reply.status >= 400:
        try:
            phrase = HTTPStatus(reply.status).phrase
        except ValueError:
            phrase = "Error"
        body = _json_bytes(error_body(reply.status, f"Scripted {reply.status} {phrase}"))
        merged["Content-Type"] = "application/json; charset=utf-8"
    # The script's own headers win, whatever their case.
    overridden = {name.lower() for name in reply.headers}
    merged = {name: value for name, value in merged.items() if name.lower() not in overridden}
    merged.update(reply.headers)
    return _Answer(reply.status, merged, body or b"", reply.delay_s, reply.reset)


def _skiptoken_position(skiptoken: str | None) -> tuple[int, str] | None:
    """(page number, last id of the previous page) - or None for a token we never issued."""
    if skiptoken is None:
        return 1, ""
    match = _SKIPTOKEN.search(skiptoken)
    if match is None:
        return None
    return int(match["page"]), match["last"].lower()


class _Server(FakeHTTPServer["FakePortal"]):
    request_queue_size = 128  # benchmarks open many connections at once

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients vanishing mid-answer (their timeout, a reset, stop()) are routine; anything else is a bug.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(FakeHandler["FakePortal"]):
    disable_nagle_algorithm = True  # headers and body are two writes; Nagle would hold the body back 40 ms
    track_connections = True
    _at = 0.0

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: benchmarks send thousands of requests, and the recorded log says more."""

    def parse_request(self) -> bool:
        self._at = time.time()
        return super().parse_request()

    def do_GET(self) -> None:
        answer = self.server.fake._respond(self._read())
        try:
            self._deliver(answer)
        finally:
            if answer.release is not None:
                answer.release()

    do_POST = do_PATCH = do_PUT = do_DELETE = do_OPTIONS = do_GET

    def _read(self) -> _Incoming:
        target = urlsplit(self.path)
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        body, error = self._read_body(headers)
        query = dict(parse_qsl(target.query, keep_blank_values=True))
        return _Incoming(self.command, unquote(target.path), query, headers, body, self._at, error)

    def _read_body(self, headers: Mapping[str, str]) -> tuple[bytes, str | None]:
        length = headers.get("content-length")
        if length is None:
            if "transfer-encoding" in headers:
                return b"", "Transfer-Encoding is not supported here; send Content-Length"
            if self.command in ("POST", "PATCH", "PUT"):
                return b"", "Content-Length is required"
            return b"", None
        if not length.strip().isdigit() or int(length) > _MAX_BODY:
            return b"", f"Bad Content-Length {length!r}"
        body = self.rfile.read(int(length))
        if len(body) < int(length):
            return body, "The body is shorter than its Content-Length"
        return body, None

    def _deliver(self, answer: _Answer) -> None:
        if answer.delay_s > 0:
            time.sleep(answer.delay_s)
        if answer.commit is not None:
            answer.commit()
        if answer.reset:
            self._reset()
            return
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        has_length = any(name.lower() == "content-length" for name in answer.headers)
        if answer.status not in _NO_BODY and not has_length:
            self.send_header("Content-Length", str(len(answer.body)))
        if answer.close:
            self.send_header("Connection", "close")
        self.end_headers()
        if answer.body and answer.status not in _NO_BODY:
            self.wfile.write(answer.body)

    def _reset(self) -> None:
        """Drop the connection with an RST, as a load balancer or a crashing portal does."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            # Linger 0 turns close() into an RST; the fd really closes when finish() drops its file objects.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
