"""The PATCH through httpcore directly (``DynamicsClient._patch``) against the same PATCH through httpx: the same
bytes on the wire and, for every answer in dynamics.py's table, the same error with the same words.

Both clients talk to one real HTTP/1.1 server on 127.0.0.1 that replays scripted raw answers and keeps every
request head it read. The answers are those of dynamics.py's classification table, from Microsoft Learn:
"Update and delete table rows using the Web API" (PATCH answers 204),
learn.microsoft.com/power-apps/developer/data-platform/webapi/update-delete-entities-using-web-api;
"Troubleshoot Dataverse Web API client errors" (0x8006088a, "Could not find a property named"),
learn.microsoft.com/troubleshoot/power-platform/power-apps/dataverse/web-api-client-errors;
"Troubleshoot Dataverse client errors" (0x80040220 missing privilege, 0x80040217 record does not exist),
learn.microsoft.com/troubleshoot/power-platform/power-apps/dataverse/client-errors;
"Web service error codes" (0x80072560 user not a member of the organization),
learn.microsoft.com/power-apps/developer/data-platform/reference/web-service-error-codes;
"Service protection API limits" (429 with Retry-After in seconds),
learn.microsoft.com/power-apps/developer/data-platform/api-limits.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from uuid import UUID

import httpx
import pytest

from hlf_actors.config import load_config
from hlf_actors.dynamics import DynamicsClient
from hlf_actors.errors import PortalError, TenantError

pytestmark = pytest.mark.anyio

RECORD = UUID("3d0c7a52-0000-4000-8000-0000000000f1")
SECRET = "hlf-PATCH-PATH-SECRET-77c1"
HANG = b"hang"  # an answer that never comes (the read timeout)
HANG_UP = b"hang up"  # the server closes the connection instead of answering


def _answer(status: int, body: bytes | dict[str, object] = b"", *headers: str, reason: str = "X") -> bytes:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    head = [f"HTTP/1.1 {status} {reason}", "OData-Version: 4.0", *headers]
    if status != 204:
        if not any(h.lower().startswith("content-type") for h in headers):
            head.append("Content-Type: application/json; odata.metadata=minimal")
        head.append(f"Content-Length: {len(raw)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + raw


def _error(code: str, message: str) -> dict[str, object]:
    return {"error": {"code": code, "message": message}}


_GZIPPED = gzip.compress(json.dumps(_error("0x80040217", "hlf_mentorlisting With Id = x Does Not Exist")).encode())

# name → the answers to successive PATCHes (the last one repeats)
CASES: dict[str, list[bytes]] = {
    "204": [_answer(204)],
    "401 then 204": [_answer(401, _error("", "Bearer token expired")), _answer(204)],
    "401 twice": [_answer(401, _error("", "Bearer token expired"))],
    "403 app user missing": [_answer(403, _error("0x80072560", "The user is not a member of the organization."))],
    "403 privilege": [_answer(403, _error("0x80040220", "Principal user is missing prvWritehlf_mentorlisting"))],
    "403 other": [_answer(403, _error("0x80048306", "Something else was refused"))],
    "404 entity set": [_answer(404, _error("0x8006088a", "Resource not found for the segment 'hlf_x'."))],
    "404 record": [_answer(404, _error("0x80040217", "hlf_mentorlisting With Id = x Does Not Exist"))],
    "404 gzip": [_answer(404, _GZIPPED, "Content-Encoding: gzip")],
    "400 property": [_answer(400, _error("0x0", "Could not find a property named 'hlf_publiclisting'"))],
    "412": [_answer(412, _error("0x80060882", "The version of the existing record doesn't match"))],
    "429": [_answer(429, _error("0x80072322", "Number of requests exceeded the limit"), "Retry-After: 1")],
    "503": [_answer(503, b"<html>Service Unavailable</html>", "Content-Type: text/html")],
    "500 garbage": [_answer(500, b"\x00\xffnot json")],
    "200 html": [_answer(200, b"<html>sign in</html>", "Content-Type: text/html")],
    "302": [_answer(302, b"", "Location: https://login.example.org/sso")],
    "hang up": [HANG_UP],
    "timeout": [HANG],
    "204 with a cookie": [_answer(204, b"", "Set-Cookie: ARRAffinity=abc123; Path=/; HttpOnly"), _answer(204)],
}


@dataclass
class ScriptedServer:
    """One HTTP/1.1 keep-alive server: the token endpoint, and PATCHes answered from ``script``."""

    script: list[bytes] = field(default_factory=list)
    heads: list[bytes] = field(default_factory=list)  # every PATCH's request line and headers, as received
    bodies: list[bytes] = field(default_factory=list)
    port: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = next(
                    (int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")),
                    0,
                )
                body = await reader.readexactly(length)
                if head.startswith(b"POST /tenant/token"):
                    token = {"access_token": f"tok-{len(self.heads)}", "token_type": "Bearer", "expires_in": 3599}
                    writer.write(_answer(200, token))
                    await writer.drain()
                    continue
                self.heads.append(head)
                self.bodies.append(body)
                answer = self.script.pop(0) if len(self.script) > 1 else self.script[0]
                if answer == HANG:
                    await asyncio.sleep(1)  # past the client's 300 ms timeout
                    return
                if answer == HANG_UP:
                    return
                writer.write(answer)
                await writer.drain()
        finally:
            writer.close()


@asynccontextmanager
async def scripted_server() -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer()
    listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    server.port = listening.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listening.close()
        await listening.wait_closed()


@asynccontextmanager
async def _server(server: ScriptedServer | None) -> AsyncIterator[ScriptedServer]:
    if server is not None:
        yield server
        return
    async with scripted_server() as started:
        yield started


def _config(port: int) -> object:
    return load_config(
        {
            "HLF_DYNAMICS_URL": f"http://127.0.0.1:{port}",
            "HLF_DYNAMICS_TOKEN_URL": f"http://127.0.0.1:{port}/tenant/token",
            "HLF_DYNAMICS_CLIENT_ID": "client-1",
            "HLF_DYNAMICS_CLIENT_SECRET": SECRET,
            "HLF_PORTAL_TIMEOUT": "300ms",
        },
        dotenv=None,
    )


def _seen(outcome: int | PortalError) -> tuple[object, ...]:
    if isinstance(outcome, int):
        return ("status", outcome)
    cause = outcome.cause if isinstance(outcome, TenantError) else None
    retry_after = getattr(outcome, "retry_after", None)
    return (type(outcome).__name__, str(outcome), getattr(outcome, "http_status", None), retry_after, cause)


async def _run(
    case: str, *, direct: bool, server: ScriptedServer | None = None
) -> tuple[list[tuple[object, ...]], list[bytes], list[bytes]]:
    """Two PATCHes of the case through one new client; what each ended in, and what the server received."""
    async with _server(server) as server:
        server.script, server.heads, server.bodies = list(CASES[case]), [], []
        config = _config(server.port)
        client = (
            DynamicsClient(config)  # type: ignore[arg-type]
            if direct
            else DynamicsClient(config, transport=httpx.AsyncHTTPTransport())  # type: ignore[arg-type]
        )
        assert (client._pool is not None) == direct
        seen: list[tuple[object, ...]] = []
        try:
            for listed in (True, False):
                try:
                    seen.append(_seen(await client.set_listed(RECORD, listed)))
                except PortalError as err:
                    assert SECRET not in f"{err} {err!r}"
                    seen.append(_seen(err))
        finally:
            await client.aclose()
        return seen, server.heads, server.bodies


@pytest.mark.parametrize("case", list(CASES))
async def test_the_direct_patch_sends_the_same_bytes_and_ends_the_same_way_as_httpx(case: str) -> None:
    async with scripted_server() as server:  # one server, so even the Host header must match
        through_httpx = await _run(case, direct=False, server=server)
        direct = await _run(case, direct=True, server=server)
    assert direct == through_httpx
    _, heads, bodies = direct
    assert heads and bodies[0] == b'{"hlf_publiclisting":true}'
    assert heads[0].startswith(f"PATCH /api/data/v9.2/hlf_mentorlistings({RECORD}) HTTP/1.1\r\n".encode())
    assert b"\r\nIf-Match: *\r\n" in heads[0] and b"\r\nAuthorization: Bearer tok-" in heads[0]


async def test_the_outcomes_are_the_ones_the_table_names() -> None:
    # The comparison above would pass if both paths were wrong alike: pin a few of them to the table.
    assert (await _run("204", direct=True))[0] == [("status", 204)] * 2
    timed_out = (await _run("timeout", direct=True))[0][0]
    assert timed_out[:2] == ("TransientPortalError", "PATCH timed out")
    hung_up = (await _run("hang up", direct=True))[0][0]
    assert hung_up[0] == "TransientPortalError" and str(hung_up[1]).startswith("PATCH failed: RemoteProtocolError")
    throttled = (await _run("429", direct=True))[0][0]
    assert throttled[0] == "ThrottledError" and throttled[3] == 1.0
    assert (await _run("404 gzip", direct=True))[0][0][0] == "PermanentPortalError"
    assert (await _run("403 privilege", direct=True))[0][0][4] == "privilege"
    retried, heads, _ = await _run("401 then 204", direct=True)
    assert retried == [("status", 204)] * 2 and len(heads) == 3  # one refused, its retry, the second PATCH


async def test_a_cookie_the_portal_sets_is_sent_back_as_httpx_would() -> None:
    _, heads, _ = await _run("204 with a cookie", direct=True)
    assert b"Cookie:" not in heads[0]
    assert b"\r\nCookie: ARRAffinity=abc123\r\n" in heads[1]
