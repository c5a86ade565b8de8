"""The fake Dataverse portal speaks the wire format of INTERFACE.md, over real sockets, and plays its scripts."""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit
from uuid import UUID, uuid4

import httpx
import pytest

from hlf_actors.testing.fake_portal import FakePortal, Reply

# Every client here speaks plain HTTP to 127.0.0.1; sharing one TLS context spares each a 50 ms CA load.
TLS = ssl.create_default_context()
ODATA_HEADERS = {"OData-MaxVersion": "4.0", "OData-Version": "4.0", "If-Match": "*"}


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0, verify=TLS) as http:
        yield http


def token_form(portal: FakePortal, **overrides: str) -> dict[str, str]:
    form = {
        "grant_type": "client_credentials",
        "client_id": portal.client_id,
        "client_secret": portal.client_secret,
        "scope": f"{portal.url}/.default",
    }
    return form | overrides


def bearer(portal: FakePortal, client: httpx.Client) -> dict[str, str]:
    response = client.post(portal.token_url, data=token_form(portal))
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def patch(
    portal: FakePortal,
    client: httpx.Client,
    record_id: str | UUID,
    listed: bool,
    auth: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """PATCH as the service does; a header given as "" is left out."""
    url = f"{portal.url}/api/data/v9.2/{portal.entity_set}({record_id})"
    merged = {**ODATA_HEADERS, **(auth or bearer(portal, client)), **(headers or {})}
    return client.patch(url, headers={k: v for k, v in merged.items() if v}, json={portal.listed_field: listed})


# -- token endpoint ---------------------------------------------------------------------------------------


def test_token_endpoint_issues_a_bearer_token_for_the_right_credentials(
    portal: FakePortal, client: httpx.Client
) -> None:
    response = client.post(portal.token_url, data=token_form(portal))

    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert len(body["access_token"]) >= 32
    [recorded] = portal.token_requests()
    assert recorded.form()["client_id"] == "hlf-test-client"
    assert recorded.status == 200


@pytest.mark.parametrize(
    ("overrides", "status", "error"),
    [
        ({"client_secret": "wrong"}, 401, "invalid_client"),
        ({"client_id": "someone-else"}, 401, "invalid_client"),
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"scope": "https://example.org/user_impersonation"}, 400, "invalid_scope"),
    ],
)
def test_token_endpoint_refuses_bad_requests(
    portal: FakePortal, client: httpx.Client, overrides: dict[str, str], status: int, error: str
) -> None:
    response = client.post(portal.token_url, data=token_form(portal, **overrides))

    assert response.status_code == status
    assert response.json()["error"] == error
    assert "access_token" not in response.json()


def test_rotated_secret_refuses_the_old_one_and_keeps_issued_tokens(portal: FakePortal, client: httpx.Client) -> None:
    record_id = uuid4()
    portal.add_record(record_id)
    old_auth = bearer(portal, client)
    old_secret = portal.client_secret

    portal.rotate_secret("the-new-secret")

    refused = client.post(portal.token_url, data=token_form(portal, client_secret=old_secret))
    assert refused.status_code == 401
    assert refused.json()["error"] == "invalid_client"
    assert refused.json()["error_description"].startswith("AADSTS7000215: Invalid client secret provided")
    assert portal.env()["HLF_DYNAMICS_CLIENT_SECRET"] == "the-new-secret"
    assert client.post(portal.token_url, data=token_form(portal)).status_code == 200
    whoami = client.get(f"{portal.url}/api/data/v9.2/WhoAmI", headers=old_auth)
    assert whoami.status_code == 200


def test_revoked_tokens_get_401_and_a_fresh_token_works(portal: FakePortal, client: httpx.Client) -> None:
    record_id = uuid4()
    portal.add_record(record_id)
    url = f"{portal.url}/api/data/v9.2/{portal.entity_set}({record_id})"
    auth = bearer(portal, client)

    portal.revoke_tokens()
    response = client.patch(url, headers={**ODATA_HEADERS, **auth}, json={portal.listed_field: False})

    assert response.status_code == 401
    # Dataverse's 401: no body, and a challenge saying where a token comes from.
    assert response.headers["WWW-Authenticate"].startswith("Bearer authorization_uri=https://login.microsoftonline")
    assert response.content == b""
    assert portal.listed(record_id) is True
    assert patch(portal, client, record_id, False).status_code == 204
    assert portal.listed(record_id) is False


def test_tokens_expire_after_their_lifetime(client: httpx.Client) -> None:
    # A lifetime of 0 s expires the token at once: the same check as an hour, without the wait.
    with FakePortal(token_lifetime_s=0) as portal:
        token = client.post(portal.token_url, data=token_form(portal))
        assert token.json()["expires_in"] == 0

        expired = client.get(
            f"{portal.url}/api/data/v9.2/WhoAmI",
            headers={"Authorization": f"Bearer {token.json()['access_token']}"},
        )

        assert expired.status_code == 401
        assert expired.content == b""
        assert "expired" in expired.headers["X-Fake-Problem"]  # for the test's eyes only; Dataverse says nothing


def test_failing_token_endpoint_answers_the_scripted_reply_until_cleared(
    portal: FakePortal, client: httpx.Client
) -> None:
    portal.fail_token_endpoint(Reply(503, headers={"Retry-After": "3"}))

    failed = client.post(portal.token_url, data=token_form(portal))
    assert failed.status_code == 503
    assert failed.headers["Retry-After"] == "3"
    assert failed.json()["error"] == "temporarily_unavailable"

    portal.fail_token_endpoint(None)
    assert client.post(portal.token_url, data=token_form(portal)).status_code == 200


# -- PATCH ------------------------------------------------------------------------------------------------


def test_patch_updates_the_record_and_is_recorded(portal: FakePortal, client: httpx.Client) -> None:
    record_id = uuid4()
    portal.add_record(record_id, listed=True)
    before = time.time()

    response = patch(portal, client, str(record_id).upper(), False)

    assert response.status_code == 204
    assert response.content == b""
    assert response.headers["OData-Version"] == "4.0"
    assert response.headers["OData-EntityId"].endswith(f"({record_id})")
    assert portal.listed(record_id) is False
    [recorded] = portal.patches(record_id)
    assert recorded.record_id == str(record_id)
    assert recorded.path == f"/api/data/v9.2/hlf_mentorlistings({str(record_id).upper()})"
    assert recorded.headers["if-match"] == "*"
    assert recorded.headers["authorization"].startswith("Bearer ")
    assert recorded.json() == {"hlf_publiclisting": False}
    assert recorded.status == 204
    assert before <= recorded.at <= time.time()


def test_patch_without_if_match_is_an_upsert_as_in_dataverse(portal: FakePortal, client: httpx.Client) -> None:
    """Without If-Match: * a PATCH creates a missing record ("Update and delete table rows using the Web API",
    upsert): why the client always sends it."""
    record_id = uuid4()

    response = patch(portal, client, record_id, False, headers={"If-Match": ""})

    assert response.status_code == 204
    assert portal.listed(record_id) is False  # created
    gone = uuid4()
    assert patch(portal, client, gone, False).status_code == 404  # with If-Match: *, never created
    assert portal.listed(gone) is None


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b'{"hlf_publiclisting": "no"}', "application/json", 400),
        (b'{"hlf_somethingelse": true}', "application/json", 400),
        (b'{"hlf_publiclisting": false, "name": "x"}', "application/json", 400),
        (b"{not json", "application/json", 400),
        (b"\xff\xfe", "application/json", 400),
        (b'{"hlf_publiclisting": false}', "text/plain", 415),
    ],
)
def test_patch_with_a_bad_body_is_refused(
    portal: FakePortal, client: httpx.Client, body: bytes, content_type: str, status: int
) -> None:
    record_id = uuid4()
    portal.add_record(record_id)
    headers = {**ODATA_HEADERS, **bearer(portal, client), "Content-Type": content_type}

    url = f"{portal.url}/api/data/v9.2/{portal.entity_set}({record_id})"
    response = client.patch(url, headers=headers, content=body)

    assert response.status_code == status
    assert response.json()["error"]["message"]
    assert portal.listed(record_id) is True


def test_patch_of_an_unknown_record_is_404(portal: FakePortal, client: httpx.Client) -> None:
    record_id = uuid4()

    response = patch(portal, client, record_id, True)

    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "0x80040217"
    assert error["message"] == f"hlf_mentorlisting With Id = {record_id} Does Not Exist"
    assert portal.listed(record_id) is None


def test_removed_record_is_404(portal: FakePortal, client: httpx.Client) -> None:
    record_id = uuid4()
    portal.add_record(record_id)
    portal.remove_record(record_id)

    assert patch(portal, client, record_id, True).status_code == 404
    assert portal.records() == {}


def test_patch_with_a_malformed_id_is_400(portal: FakePortal, client: httpx.Client) -> None:
    assert patch(portal, client, "not-a-guid", True).status_code == 400


# -- scripted behaviours ----------------------------------------------------------------------------------


def test_fail_then_succeed_answers_503_503_204(portal: FakePortal, client: httpx.Client) -> None:
    record_id = uuid4()
    portal.add_record(record_id, listed=True)
    portal.fail_then_succeed(record_id)

    statuses = [patch(portal, client, record_id, False).status_code for _ in range(3)]

    assert statuses == [503, 503, 204]
    assert [r.status for r in portal.patches(record_id)] == [503, 503, 204]
    assert portal.listed(record_id) is False


def test_scripted_failure_leaves_the_record_alone(portal: FakePortal, client: httpx.Client) -> None:
    record_id = uuid4()
    portal.add_record(record_id, listed=True)
    portal.script(record_id, Reply(503))

    response = patch(portal, client, record_id, False)

    assert response.status_code == 503
    assert response.json() == {"error": {"code": "0x0", "message": "Scripted 503 Service Unavailable"}}
    assert portal.listed(record_id) is True


def test_throttle_answers_429_with_retry_after_then_normal(portal: FakePortal, client: httpx.Client) -> None:
    record_id = uuid4()
    portal.add_record(record_id)
    portal.throttle(record_id, retry_after_s=7, times=2)

    first, second, third = (patch(portal, client, record_id, False) for _ in range(3))

    assert (first.status_code, second.status_code, third.status_code) == (429, 429, 204)
    assert first.headers["Retry-After"] == "7"
    assert first.json()["error"]["code"] == "0x80072321"


def test_global_throttle_hits_whichever_record_comes_next(portal: FakePortal, client: httpx.Client) -> None:
    a, b = uuid4(), uuid4()
    portal.add_record(a)
    portal.add_record(b)
    portal.throttle(times=1)

    assert patch(portal, client, b, False).status_code == 429
    assert patch(portal, client, a, False).status_code == 204
    assert portal.throttled_count == 0  # scripted, not service protection


def test_always_precedence_script_beats_record_beats_global(portal: FakePortal, client: httpx.Client) -> None:
    a, b = uuid4(), uuid4()
    portal.add_record(a)
    portal.add_record(b)
    portal.always(Reply(503))
    portal.always(Reply(403), record_id=a)
    portal.script(a, Reply(502))

    assert patch(portal, client, a, False).status_code == 502
    assert patch(portal, client, a, False).status_code == 403
    assert patch(portal, client, b, False).status_code == 503

    portal.always(None, record_id=a)
    assert patch(portal, client, a, False).status_code == 503
    portal.always(None)
    assert patch(portal, client, b, False).status_code == 204
    assert portal.listed(b) is False


def test_random_replies_draw_a_seeded_mix_after_the_records_own_script(
    portal: FakePortal, client: httpx.Client
) -> None:
    a, b = uuid4(), uuid4()
    portal.add_record(a)
    portal.add_record(b, listed=True)
    mix: list[tuple[float, Reply | None]] = [(1.0, Reply(503)), (1.0, None), (1.0, Reply(429, {"Retry-After": "2"}))]
    portal.random_replies(mix, seed=7)
    portal.always(Reply(403), record_id=b)  # a standing reply of the record beats the mix

    first = [patch(portal, client, a, False).status_code for _ in range(30)]
    portal.random_replies(mix, seed=7)
    again = [patch(portal, client, a, True).status_code for _ in range(30)]

    assert first == again  # the same seed, the same answers
    assert set(first) == {503, 204, 429}  # None answers as if there were no mix: an ordinary, applied 204
    assert patch(portal, client, b, False).status_code == 403
    assert portal.listed(a) is True and portal.listed(b) is True
    portal.random_replies(None)
    assert [patch(portal, client, a, False).status_code for _ in range(5)] == [204] * 5


def test_random_token_failures_fail_some_token_requests(portal: FakePortal, client: httpx.Client) -> None:
    portal.random_token_failures([(1.0, Reply(503)), (1.0, None), (1.0, Reply(500, reset=True))], seed=3)

    statuses: list[int | str] = []
    for _ in range(30):
        try:
            statuses.append(client.post(portal.token_url, data=token_form(portal)).status_code)
        except httpx.TransportError:
            statuses.append("reset")

    assert set(statuses) == {200, 503, "reset"}
    assert [r.status for r in portal.token_requests()] == [0 if s == "reset" else s for s in statuses]
    portal.random_token_failures(None)
    assert client.post(portal.token_url, data=token_form(portal)).status_code == 200


def test_scripted_reply_can_apply_without_success_or_succeed_without_applying(
    portal: FakePortal, client: httpx.Client
) -> None:
    a, b = uuid4(), uuid4()
    portal.add_record(a, listed=True)
    portal.add_record(b, listed=True)
    portal.script(a, Reply(500, apply=True))
    portal.script(b, Reply(204, apply=False))

    assert patch(portal, client, a, False).status_code == 500
    assert patch(portal, client, b, False).status_code == 204
    assert portal.records() == {str(a): False, str(b): True}


def test_reset_closes_the_connection_without_an_answer(portal: FakePortal, client: httpx.Client) -> None:
    record_id = uuid4()
    portal.add_record(record_id, listed=True)
    portal.script(record_id, Reply(reset=True))

    with pytest.raises(httpx.TransportError):
        patch(portal, client, record_id, False)

    assert [r.status for r in portal.patches(record_id)] == [0]
    assert portal.listed(record_id) is True
    assert patch(portal, client, record_id, False).status_code == 204


def test_delay_stalls_one_request_while_others_proceed(portal: FakePortal, client: httpx.Client) -> None:
    slow, fast = uuid4(), uuid4()
    portal.add_record(slow, listed=True)
    portal.add_record(fast, listed=True)
    portal.script(slow, Reply(204, delay_s=0.3))
    auth = bearer(portal, client)
    url = f"{portal.url}/api/data/v9.2/{portal.entity_set}"

    with httpx.Client(timeout=0.05, verify=TLS) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.patch(f"{url}({slow})", headers={**ODATA_HEADERS, **auth}, json={portal.listed_field: False})
    assert patch(portal, client, fast, False).status_code == 204
    assert portal.listed(slow) is True  # the fast PATCH finished while the slow one still sleeps...

    portal.wait_for(lambda p: p.listed(slow) is False, timeout=2)  # ...even though the client gave up


@pytest.mark.parametrize("body", [b"<html>oops</html>", b'{"value": [{"hlf_publi'])
def test_garbage_bodies_are_sent_as_is(portal: FakePortal, client: httpx.Client, body: bytes) -> None:
    record_id = uuid4()
    portal.add_record(record_id, listed=True)
    portal.script(record_id, Reply(200, headers={"Content-Type": "text/html"}, body=body))

    response = patch(portal, client, record_id, False)

    assert response.status_code == 200
    assert response.content == body
    assert response.headers["Content-Length"] == str(len(body))
    assert response.headers["Content-Type"] == "text/html"
    assert patch(portal, client, record_id, True).status_code == 204  # the connection survived


def test_reply_rejects_a_body_http_cannot_frame() -> None:
    with pytest.raises(ValueError, match="body"):
        Reply(204, body=b"x")


# -- reads ------------------------------------------------------------------------------------------------


def test_paging_over_three_pages_returns_every_record_once(portal: FakePortal, client: httpx.Client) -> None:
    expected = {str(uuid4()): i % 2 == 0 for i in range(25)}
    for record_id, listed in expected.items():
        portal.add_record(record_id, listed)
    auth = bearer(portal, client)
    headers = {**auth, "Prefer": "odata.maxpagesize=10", "OData-Version": "4.0"}
    url: str | None = f"{portal.url}/api/data/v9.2/{portal.entity_set}"
    params: dict[str, str] | None = {"$select": f"{portal.key_field},{portal.listed_field}"}

    seen: list[tuple[str, bool]] = []
    page_sizes = []
    while url is not None:
        response = client.get(url, headers=headers, params=params)
        assert response.status_code == 200, response.text
        assert response.headers["Preference-Applied"] == "odata.maxpagesize=10"
        page = response.json()
        assert all(row["@odata.etag"].startswith('W/"') for row in page["value"])
        seen += [(row[portal.key_field], row[portal.listed_field]) for row in page["value"]]
        page_sizes.append(len(page["value"]))
        url, params = page.get("@odata.nextLink"), None

    assert page_sizes == [10, 10, 5]
    assert len(seen) == len(set(seen)) == 25
    assert dict(seen) == expected
    assert [row_id for row_id, _ in seen] == sorted(expected)
    assert len(portal.requests("GET")) == 3


def test_page_size_default_applies_without_prefer(portal: FakePortal, client: httpx.Client) -> None:
    for _ in range(4):
        portal.add_record(uuid4())
    portal.page_size_default = 3

    response = client.get(f"{portal.url}/api/data/v9.2/{portal.entity_set}", headers=bearer(portal, client))

    assert response.status_code == 200
    assert len(response.json()["value"]) == 3
    assert "$skiptoken=" in response.json()["@odata.nextLink"]
    assert "Preference-Applied" not in response.headers


def test_select_of_an_unknown_column_is_400(portal: FakePortal, client: httpx.Client) -> None:
    response = client.get(
        f"{portal.url}/api/data/v9.2/{portal.entity_set}",
        params={"$select": "hlf_mentorlistingid,fullname"},
        headers=bearer(portal, client),
    )

    assert response.status_code == 400
    assert "fullname" in response.json()["error"]["message"]


def test_get_one_record(portal: FakePortal, client: httpx.Client) -> None:
    record_id = uuid4()
    portal.add_record(record_id, listed=False)

    response = client.get(
        f"{portal.url}/api/data/v9.2/{portal.entity_set}({record_id})", headers=bearer(portal, client)
    )

    assert response.status_code == 200
    assert response.json()[portal.listed_field] is False
    assert portal.requests("GET", record_id)[0].record_id == str(record_id)


def test_whoami_needs_a_valid_token(portal: FakePortal, client: httpx.Client) -> None:
    url = f"{portal.url}/api/data/v9.2/WhoAmI"

    anonymous = client.get(url)
    forged = client.get(url, headers={"Authorization": "Bearer forged"})
    authorised = client.get(url, headers=bearer(portal, client))

    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer authorization_uri=")
    assert forged.status_code == 401
    assert authorised.status_code == 200
    UUID(authorised.json()["UserId"])


def test_unknown_paths_are_404(portal: FakePortal, client: httpx.Client) -> None:
    auth = bearer(portal, client)

    assert client.get(f"{portal.url}/").status_code == 404
    assert client.get(f"{portal.url}/api/data/v9.2/accounts", headers=auth).status_code == 404
    assert client.delete(f"{portal.url}/api/data/v9.2/WhoAmI", headers=auth).status_code == 404
    assert client.get(portal.token_url).status_code == 404


# -- service protection -----------------------------------------------------------------------------------


def test_service_protection_refuses_requests_past_the_window_limit(portal: FakePortal, client: httpx.Client) -> None:
    record_id = uuid4()
    portal.add_record(record_id)
    portal.enforce_service_protection(max_requests=3, window_s=0.2)

    statuses = [patch(portal, client, record_id, False) for _ in range(4)]

    assert [r.status_code for r in statuses] == [204, 204, 204, 429]
    assert int(statuses[-1].headers["Retry-After"]) >= 1
    assert statuses[-1].json()["error"]["code"] == "0x80072322"
    assert portal.throttled_count == 1
    time.sleep(0.2)
    assert patch(portal, client, record_id, True).status_code == 204


def test_service_protection_limits_concurrent_requests(portal: FakePortal) -> None:
    ids = [uuid4() for _ in range(3)]
    for record_id in ids:
        portal.add_record(record_id)
    portal.always(Reply(204, delay_s=0.2))
    portal.enforce_service_protection(max_concurrent=2)
    barrier = threading.Barrier(3)

    def one(record_id: UUID) -> int:
        with httpx.Client(timeout=5.0, verify=TLS) as own:
            auth = bearer(portal, own)
            barrier.wait()
            return patch(portal, own, record_id, False, auth).status_code

    with ThreadPoolExecutor(3) as pool:
        statuses = sorted(pool.map(one, ids))

    assert statuses == [204, 204, 429]
    assert portal.throttled_count == 1


# -- robustness and lifecycle -----------------------------------------------------------------------------


def raw_exchange(portal: FakePortal, *requests: bytes) -> list[http.client.HTTPResponse]:
    """Send each request on one socket and read its answer before the next: proves keep-alive."""
    port = urlsplit(portal.url).port
    assert port is not None
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        for request in requests:
            sock.sendall(request)
            answer = http.client.HTTPResponse(sock)
            answer.begin()
            answer.read()
            answers.append(answer)
    return answers


def test_keep_alive_serves_several_requests_on_one_connection(portal: FakePortal) -> None:
    get = b"GET /nowhere HTTP/1.1\r\nHost: portal\r\n\r\n"

    answers = raw_exchange(portal, get, get, get)

    assert [a.status for a in answers] == [404, 404, 404]
    assert len(portal.requests("GET")) == 3


def test_bad_requests_get_400_and_the_server_keeps_serving(portal: FakePortal, client: httpx.Client) -> None:
    no_length = b"PATCH /api/data/v9.2/WhoAmI HTTP/1.1\r\nHost: portal\r\n\r\n"
    bad_length = b"POST /x HTTP/1.1\r\nHost: portal\r\nContent-Length: banana\r\n\r\n"

    [first] = raw_exchange(portal, no_length)
    [second] = raw_exchange(portal, bad_length)

    assert (first.status, second.status) == (400, 400)
    assert first.getheader("Connection") == "close"
    assert client.post(portal.token_url, data=token_form(portal)).status_code == 200


def test_stop_severs_connections_and_start_serves_the_same_port_again(client: httpx.Client) -> None:
    portal = FakePortal().start()
    record_id = uuid4()
    portal.add_record(record_id)
    url = portal.url
    assert patch(portal, client, record_id, False).status_code == 204  # leaves a keep-alive connection

    started = time.monotonic()
    portal.stop()
    assert time.monotonic() - started < 1
    with pytest.raises(httpx.TransportError):
        client.post(portal.token_url, data=token_form(portal))

    portal.start()
    try:
        assert portal.url == url
        assert portal.listed(record_id) is False
        assert patch(portal, client, record_id, True).status_code == 204
    finally:
        portal.stop()


def test_wait_for_times_out_with_what_it_was_waiting_for(portal: FakePortal) -> None:
    never_listed = uuid4()
    portal.add_record(uuid4())

    with pytest.raises(AssertionError, match=r"(?s)never_listed.*records:.*last requests"):
        portal.wait_for(lambda p: p.listed(never_listed) is True, timeout=0.05)


def test_env_names_the_fake(portal: FakePortal) -> None:
    env = portal.env()

    assert env["HLF_DYNAMICS_URL"] == portal.url
    assert env["HLF_DYNAMICS_TOKEN_URL"] == f"{portal.url}/test-tenant/oauth2/v2.0/token"
    assert env["HLF_DYNAMICS_ENTITY_SET"] == "hlf_mentorlistings"
    assert set(env) == {
        "HLF_DYNAMICS_URL",
        "HLF_DYNAMICS_TOKEN_URL",
        "HLF_DYNAMICS_CLIENT_ID",
        "HLF_DYNAMICS_CLIENT_SECRET",
        "HLF_DYNAMICS_ENTITY_SET",
        "HLF_DYNAMICS_LISTED_FIELD",
        "HLF_DYNAMICS_KEY_FIELD",
    }
