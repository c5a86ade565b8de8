"""``DynamicsClient`` against a scripted ``httpx.MockTransport``: every answer becomes the right error class.

The transport is the client's designed seam; nothing inside the client is patched. The token endpoint and the
Dataverse org are both answered by the same scripted handler, which records every request it saw.
"""

from __future__ import annotations

import email.utils
import json
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs
from uuid import UUID

import anyio
import httpx
import pytest

from hlf_actors.config import load_config
from hlf_actors.dynamics import DynamicsClient
from hlf_actors.errors import (
    CredentialError,
    PermanentPortalError,
    PortalError,
    TenantError,
    ThrottledError,
    TransientPortalError,
    UndecidedRefusal,
)
from hlf_actors.limits import parse_retry_after
from hlf_actors.retry import plan_delay_ms, throttle_delay_ms

pytestmark = pytest.mark.anyio

SECRET = "hlf-TEST-SECRET-5b2d91c4"
ORG = "https://org.crm4.dynamics.com"
TOKEN_URL = "https://login.microsoftonline.com/tenant-1/oauth2/v2.0/token"
RECORD = UUID("3d0c7a52-0000-4000-8000-0000000000f1")
PATCH_URL = f"{ORG}/api/data/v9.2/hlf_mentorlistings({RECORD})"

CONFIG = load_config(
    {
        "HLF_DYNAMICS_URL": ORG,
        "HLF_DYNAMICS_TOKEN_URL": TOKEN_URL,
        "HLF_DYNAMICS_CLIENT_ID": "client-id-1",
        "HLF_DYNAMICS_CLIENT_SECRET": SECRET,
    },
    dotenv=None,
)

Reply = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


def _odata_error(message: str) -> dict[str, object]:
    return {"error": {"code": "0x80040217", "message": message}}


class ScriptedPortal:
    """Answers the token endpoint and the org from two scripts; the last reply of a script repeats."""

    def __init__(self, data: list[Reply] | None = None, token: list[Reply] | None = None) -> None:
        self.data_script: list[Reply] = data or [httpx.Response(204)]
        self.token_script = token
        self.token_requests: list[httpx.Request] = []
        self.data_requests: list[httpx.Request] = []
        self.tokens_issued: list[str] = []

    def _next(self, script: list[Reply], request: httpx.Request) -> httpx.Response:
        reply = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(reply, Exception):
            raise reply
        if callable(reply) and not isinstance(reply, httpx.Response):
            return reply(request)
        return reply

    def _issue_token(self, request: httpx.Request) -> httpx.Response:
        token = f"eyJ-BEARER-TOKEN-{len(self.tokens_issued) + 1}-a81f"
        self.tokens_issued.append(token)
        return httpx.Response(200, json={"token_type": "Bearer", "expires_in": 3599, "access_token": token})

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if str(request.url) == TOKEN_URL:
            self.token_requests.append(request)
            return self._next(self.token_script or [self._issue_token], request)
        self.data_requests.append(request)
        return self._next(self.data_script, request)

    def assert_nothing_secret_in(self, err: BaseException) -> None:
        shown = " ".join([str(err), repr(err), *map(str, err.args)])
        assert SECRET not in shown
        for token in self.tokens_issued:
            assert token not in shown
            assert token[4:20] not in shown  # not even a piece of it


@asynccontextmanager
async def client_for(portal: ScriptedPortal) -> AsyncIterator[DynamicsClient]:
    client = DynamicsClient(CONFIG, transport=httpx.MockTransport(portal))
    try:
        yield client
    finally:
        await client.aclose()


async def failure_of(portal: ScriptedPortal, listed: bool = True) -> PortalError:
    """The error one PATCH ends in; checks on the way that it gives nothing secret away."""
    async with client_for(portal) as client:
        with pytest.raises(PortalError) as caught:
            await client.set_listed(RECORD, listed)
    portal.assert_nothing_secret_in(caught.value)
    return caught.value


# -- success and the wire format --------------------------------------------------------------------------------


async def test_204_is_success_and_the_patch_has_the_contract_shape() -> None:
    portal = ScriptedPortal()
    async with client_for(portal) as client:
        assert await client.set_listed(RECORD, True) == 204
        assert await client.set_listed(RECORD, False) == 204

    restore, remove = portal.data_requests
    for request in (restore, remove):
        assert request.method == "PATCH"
        assert str(request.url) == PATCH_URL
        assert request.headers["If-Match"] == "*"
        assert request.headers["OData-MaxVersion"] == "4.0"
        assert request.headers["OData-Version"] == "4.0"
        assert request.headers["Accept"] == "application/json"
        assert request.headers["Content-Type"].startswith("application/json")
        assert request.headers["Authorization"] == f"Bearer {portal.tokens_issued[0]}"
    assert json.loads(restore.content) == {"hlf_publiclisting": True}
    assert json.loads(remove.content) == {"hlf_publiclisting": False}


async def test_the_token_request_is_client_credentials() -> None:
    portal = ScriptedPortal()
    async with client_for(portal) as client:
        await client.set_listed(RECORD, True)
    (request,) = portal.token_requests
    assert request.method == "POST"
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert parse_qs(request.content.decode()) == {
        "grant_type": ["client_credentials"],
        "client_id": ["client-id-1"],
        "client_secret": [SECRET],
        "scope": [f"{ORG}/.default"],
    }


async def test_the_token_is_cached_across_calls() -> None:
    portal = ScriptedPortal()
    async with client_for(portal) as client:
        for listed in (True, False, True):
            assert await client.set_listed(RECORD, listed) == 204
    assert len(portal.token_requests) == 1
    assert len(portal.data_requests) == 3
    assert {r.headers["Authorization"] for r in portal.data_requests} == {f"Bearer {portal.tokens_issued[0]}"}


async def test_concurrent_calls_share_one_token_request() -> None:
    portal = ScriptedPortal()
    async with client_for(portal) as client, anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(client.set_listed, RECORD, True)
    assert len(portal.token_requests) == 1
    assert len(portal.data_requests) == 5


# -- classification ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
async def test_transient_statuses(status: int) -> None:
    portal = ScriptedPortal([httpx.Response(status, json=_odata_error("Service busy"))])
    err = await failure_of(portal)
    assert type(err) is TransientPortalError
    assert err.http_status == status
    assert err.retry_after is None
    assert str(status) in str(err) and "Service busy" in str(err)


async def test_a_transient_answer_keeps_retry_after() -> None:
    portal = ScriptedPortal([httpx.Response(503, headers={"Retry-After": "12"})])
    err = await failure_of(portal)
    assert type(err) is TransientPortalError
    assert err.retry_after == 12.0


async def test_429_is_throttled_with_retry_after_seconds() -> None:
    portal = ScriptedPortal([httpx.Response(429, headers={"Retry-After": "7"}, json=_odata_error("limit"))])
    err = await failure_of(portal)
    assert isinstance(err, ThrottledError)
    assert isinstance(err, TransientPortalError)  # retry code only asks this
    assert err.http_status == 429
    assert err.retry_after == 7.0


async def test_429_is_throttled_with_retry_after_as_an_http_date() -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    portal = ScriptedPortal([httpx.Response(429, headers={"Retry-After": email.utils.format_datetime(when, True)})])
    err = await failure_of(portal)
    assert isinstance(err, ThrottledError)
    assert err.retry_after is not None
    assert 25.0 <= err.retry_after <= 30.0


@pytest.mark.parametrize("status", [404, 405, 412, 413])
async def test_permanent_statuses(status: int) -> None:
    portal = ScriptedPortal([httpx.Response(status, json=_odata_error("Entity does not exist"))])
    err = await failure_of(portal)
    assert type(err) is PermanentPortalError  # 404 with 0x80040217: this record does not exist
    assert err.http_status == status
    assert "Entity does not exist" in str(err)
    assert len(portal.data_requests) == 1  # never retried inside the client
    assert len(portal.token_requests) == 1


@pytest.mark.parametrize("status", [400, 403, 404])
async def test_a_refusal_that_names_no_cause_is_undecided(status: int) -> None:
    body = {"error": {"code": "0x80040265", "message": "Something about this request is not right"}}
    err = await failure_of(ScriptedPortal([httpx.Response(status, json=body)]))
    assert type(err) is UndecidedRefusal
    assert isinstance(err, PermanentPortalError)  # break-glass and reconcile treat it as before
    assert err.http_status == status


# Each row: what Dataverse answers when something every mentor depends on is wrong (dynamics.py's table cites the
# Microsoft Learn page of each), and the incident cause it must become.
TENANT_ANSWERS = [
    (403, "0x80072560", "The user is not a member of the organization.", "app_user_missing"),
    (
        403,
        "0x80040220",
        "Principal user (Id=9b2c, type=8, roleCount=1, privilegeCount=340, accessMode=4), is missing "
        "prvWritehlf_mentorlisting privilege (Id=1a2b) on OTC=10234 for entity 'hlf_mentorlisting'.",
        "privilege",
    ),
    (404, "0x8006088a", "Resource not found for the segment 'hlf_mentorlistings'.", "entity_set"),
    (
        400,
        "0x0",
        "Could not find a property named 'hlf_publiclisting' on type 'Microsoft.Dynamics.CRM.hlf_mentorlisting'.",
        "property",
    ),
    (
        400,
        "0x80048d19",
        "Error identified in Payload provided by the user for Entity :'hlf_mentorlistings', ----> InnerException : "
        "Microsoft.OData.ODataException: The property 'hlf_publiclisting' does not exist on type "
        "'Microsoft.Dynamics.CRM.hlf_mentorlisting'.",
        "property",
    ),
    (
        400,
        "0x80060891",
        "Invalid property 'hlf_publiclisting' was found in entity 'Microsoft.Dynamics.CRM.x'.",
        "property",
    ),
]


@pytest.mark.parametrize(
    ("status", "code", "message", "cause"), TENANT_ANSWERS, ids=[r[3] + str(r[0]) for r in TENANT_ANSWERS]
)
async def test_answers_that_hit_every_mentor_are_tenant_errors(
    status: int, code: str, message: str, cause: str
) -> None:
    answer = httpx.Response(status, json={"error": {"code": code, "message": message}})
    err = await failure_of(ScriptedPortal([answer]))
    assert type(err) is TenantError
    assert err.cause == cause
    assert err.http_status == status
    assert err.fix  # the alert can say what to do


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, html="<html><title>Sign in to your account</title></html>"),
        httpx.Response(200),
        httpx.Response(200, json={"hlf_publiclisting": True}, headers={"Content-Type": "text/plain"}),
        httpx.Response(201, text="created"),
        httpx.Response(302, headers={"Location": "https://login.microsoftonline.com/common/oauth2/authorize?x=1"}),
    ],
    ids=["html-200", "empty-200", "text-200", "text-201", "redirect-302"],
)
async def test_a_2xx_or_3xx_that_is_not_dataverse_is_a_tenant_incident(answer: httpx.Response) -> None:
    err = await failure_of(ScriptedPortal([answer]))
    assert type(err) is TenantError
    assert err.cause == "not_dataverse"
    assert "not Dataverse" in str(err)


async def test_a_2xx_with_dataverse_json_is_success() -> None:
    """Dataverse answers 200 with the record when asked for a representation: that is its own success."""
    body = {"@odata.context": f"{ORG}/api/data/v9.2/$metadata#hlf_mentorlistings/$entity", "hlf_publiclisting": True}
    async with client_for(ScriptedPortal([httpx.Response(200, json=body)])) as client:
        assert await client.set_listed(RECORD, True) == 200


async def test_a_burst_of_401s_causes_one_token_request() -> None:
    """50 concurrent requests all refused with 401: one refresh, because each refreshes only if the token that got
    the 401 is still the current one."""

    def answer(request: httpx.Request) -> httpx.Response:
        fresh = request.headers["Authorization"] == f"Bearer {portal.tokens_issued[-1]}"
        return httpx.Response(204) if len(portal.tokens_issued) > 1 and fresh else httpx.Response(401)

    portal = ScriptedPortal([answer])
    async with client_for(portal) as client:
        await client.check_token()  # the token every request starts with
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(client.set_listed, RECORD, True)
    assert len(portal.token_requests) == 2  # the first token, and exactly one refresh for the 50 refusals
    assert len(portal.data_requests) == 100


async def test_expires_in_as_a_numeric_string_is_accepted() -> None:
    """Entra ID's v1 endpoint and some proxies send ``"expires_in": "3599"``."""
    token = httpx.Response(200, json={"token_type": "Bearer", "expires_in": "3599", "access_token": "eyJ-t-1"})
    portal = ScriptedPortal(token=[token])
    async with client_for(portal) as client:
        assert await client.set_listed(RECORD, True) == 204
        assert await client.set_listed(RECORD, False) == 204
    assert len(portal.token_requests) == 1  # and it is cached for its lifetime


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"token_type": "Bearer", "expires_in": "soon", "access_token": "eyJ-t-1"}, "expires_in"),
        ({"token_type": "Bearer", "expires_in": 3599}, "access_token"),
    ],
)
async def test_an_unusable_token_answer_names_the_field(body: dict[str, object], named: str) -> None:
    err = await failure_of(ScriptedPortal(token=[httpx.Response(200, json=body)]))
    assert type(err) is TransientPortalError
    assert named in str(err)
    assert "unreadable" not in str(err)


async def test_a_429_holds_every_request_of_the_client() -> None:
    portal = ScriptedPortal([httpx.Response(429, headers={"Retry-After": "30"}), httpx.Response(204)])
    async with client_for(portal) as client:
        with pytest.raises(ThrottledError):
            await client.set_listed(RECORD, True)
        assert 29 <= client.throttled_for_s <= 30
        with anyio.move_on_after(0.3):  # any other request now waits out the Retry-After
            await client.set_listed(RECORD, False)
    assert len(portal.data_requests) == 1


async def test_401_gets_one_fresh_token_and_one_more_try() -> None:
    portal = ScriptedPortal([httpx.Response(401), httpx.Response(204)])
    async with client_for(portal) as client:
        assert await client.set_listed(RECORD, True) == 204
    assert len(portal.token_requests) == 2
    assert len(portal.data_requests) == 2
    first, second = portal.data_requests
    assert first.headers["Authorization"] == f"Bearer {portal.tokens_issued[0]}"
    assert second.headers["Authorization"] == f"Bearer {portal.tokens_issued[1]}"
    assert second.headers["If-Match"] == "*"
    assert second.content == first.content


async def test_401_twice_is_a_credential_error() -> None:
    portal = ScriptedPortal([httpx.Response(401)])
    err = await failure_of(portal)
    assert type(err) is CredentialError
    assert err.http_status == 401
    assert len(portal.token_requests) == 2  # exactly one new token...
    assert len(portal.data_requests) == 2  # ...and exactly one retry


@pytest.mark.parametrize("status", [400, 401])
async def test_token_endpoint_refusal_is_a_credential_error(status: int) -> None:
    body = {"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."}
    portal = ScriptedPortal(token=[httpx.Response(status, json=body)])
    err = await failure_of(portal)
    assert type(err) is CredentialError
    assert err.http_status == status
    assert "invalid_client" in str(err)
    assert portal.data_requests == []  # no PATCH without a token


async def test_token_endpoint_503_is_transient() -> None:
    portal = ScriptedPortal(token=[httpx.Response(503, headers={"Retry-After": "3"}, text="<html>down</html>")])
    err = await failure_of(portal)
    assert type(err) is TransientPortalError
    assert err.http_status == 503
    assert err.retry_after == 3.0
    assert portal.data_requests == []


async def test_token_endpoint_garbage_200_is_transient() -> None:
    portal = ScriptedPortal(token=[httpx.Response(200, text="<html>login</html>")])
    err = await failure_of(portal)
    assert type(err) is TransientPortalError


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("[Errno 111] Connection refused"),
        httpx.ReadTimeout("timed out"),
        httpx.ConnectTimeout("timed out"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
    ],
    ids=lambda e: type(e).__name__,
)
@pytest.mark.parametrize("where", ["data", "token"])
async def test_no_answer_is_transient(failure: Exception, where: str) -> None:
    portal = ScriptedPortal(data=[failure]) if where == "data" else ScriptedPortal(token=[failure])
    err = await failure_of(portal)
    assert type(err) is TransientPortalError
    assert err.http_status is None
    assert err.__cause__ is None  # `from None`: the httpx request (with its headers) is not chained on


@pytest.mark.parametrize(
    ("status", "body", "expected", "shown"),
    [
        (500, "<html><body>\n<h1>Internal Server Error</h1>\n</body></html>", TransientPortalError, "<html>"),
        (502, '{"error": {"message": "Bad gate', TransientPortalError, "non-JSON"),
        (403, "<!DOCTYPE html><title>Forbidden</title>", UndecidedRefusal, "Forbidden"),
        (404, "", UndecidedRefusal, "empty body"),
        (400, "\x00\xff\xfe garbage", UndecidedRefusal, "garbage"),
        (503, "[1, 2, 3]", TransientPortalError, "[1, 2, 3]"),
        (500, '{"error": {"message": 42}}', TransientPortalError, "42"),
        (500, "x" * 5000, TransientPortalError, "xxx"),
    ],
)
async def test_garbage_bodies_give_a_clear_short_message(
    status: int, body: str, expected: type[PortalError], shown: str
) -> None:
    portal = ScriptedPortal([httpx.Response(status, content=body.encode("utf-8", "surrogateescape"))])
    err = await failure_of(portal)
    assert type(err) is expected
    message = str(err)
    assert message.startswith(f"PATCH answered {status}: ")
    assert shown in message
    assert "\n" not in message
    assert len(message) <= 300


async def test_an_error_body_is_cut_short() -> None:
    portal = ScriptedPortal([httpx.Response(400, json=_odata_error("y" * 5000))])
    err = await failure_of(portal)
    assert 200 <= len(str(err)) <= 300


# -- parse_retry_after ------------------------------------------------------------------------------------------

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("soon", None),
        ("7", 7.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("120", 120.0),
        ("-5", None),  # not delta-seconds (RFC 9110: 1*DIGIT): unreadable, so no floor
        ("Sat, 01 Mar 2025 12:00:30 GMT", 30.0),
        ("Sat, 01 Mar 2025 12:00:30 -0000", 30.0),  # a zone-less date is read as UTC
        ("Sat, 01 Mar 2025 13:00:30 +0100", 30.0),
        ("Sat, 01 Mar 2025 11:59:00 GMT", 0.0),  # already past
        ("Sat, 32 Mar 2025 12:00:30 GMT", None),
        ("Mon, 01 Foo 2025 12:00:30 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


@pytest.mark.parametrize(
    "value",
    ["inf", "Infinity", "nan", "1e400", "9" * 400, "9" * 13],
    ids=["inf", "Infinity", "nan", "1e400", "400-nines", "13-nines"],
)
def test_parse_retry_after_never_gives_a_wait_that_cannot_be_planned(value: str) -> None:
    seconds = parse_retry_after(value, now=NOW)
    assert seconds is None or math.isfinite(seconds)
    # What the actor does next with a 429 or a 503 carrying this header, and what the projection then does with
    # the planned delay (recorded_at + delay_ms → next_attempt_at), must not blow up.
    for delay_ms in (
        throttle_delay_ms(seconds, base_ms=2000, jitter=None),
        plan_delay_ms(1, base_ms=2000, cap_ms=300_000, retry_after_s=seconds),
    ):
        assert NOW + timedelta(milliseconds=delay_ms) >= NOW
