"""``http_transport._Pool`` decides like httpcore's own pool: for any state of connections and queued requests, its
one-pass ``_assign_requests_to_connections`` closes, keeps, creates and assigns exactly what httpcore's does."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import anyio
import httpcore
from httpcore._async.connection_pool import AsyncPoolRequest
from hypothesis import given, settings
from hypothesis import strategies as st

from hlf_actors.http_transport import _Pool

ORIGINS = {"a": httpcore.URL("https://a.example/x").origin, "b": httpcore.URL("https://b.example/x").origin}


@dataclass(eq=False)
class FakeConnection:
    name: str
    origin: str
    closed: bool
    expired: bool
    idle: bool
    available: bool

    def is_closed(self) -> bool:
        return self.closed

    def has_expired(self) -> bool:
        return self.expired

    def is_idle(self) -> bool:
        return self.idle

    def is_available(self) -> bool:
        return self.available

    def can_handle_request(self, origin: Any) -> bool:
        return bool(origin == ORIGINS[self.origin])


def _pool(kind: type[httpcore.AsyncConnectionPool], state: dict[str, Any]) -> tuple[Any, list[AsyncPoolRequest]]:
    created = itertools.count()

    class Pool(kind):  # type: ignore[valid-type,misc]
        def create_connection(self, origin: Any) -> Any:
            key = next(k for k, v in ORIGINS.items() if v == origin)
            return FakeConnection(f"new{next(created)}", key, False, False, False, False)

    pool = Pool(max_connections=state["max_connections"], max_keepalive_connections=state["max_keepalive"])
    pool._connections = [FakeConnection(f"c{i}", *flags) for i, flags in enumerate(state["connections"])]
    requests = []
    for origin, assigned in state["requests"]:
        request = AsyncPoolRequest(httpcore.Request("PATCH", f"https://{origin}.example/x"))
        if assigned and pool._connections:
            request.assign_to_connection(pool._connections[0])
        requests.append(request)
    pool._requests = list(requests)
    return pool, requests


def _outcome(kind: type[httpcore.AsyncConnectionPool], state: dict[str, Any]) -> tuple[object, ...]:
    return anyio.run(_decide, kind, state)  # a pool request's event needs a running loop; nothing awaits


async def _decide(kind: type[httpcore.AsyncConnectionPool], state: dict[str, Any]) -> tuple[object, ...]:
    pool, requests = _pool(kind, state)
    closing = pool._assign_requests_to_connections()
    return (
        [c.name for c in closing],
        [c.name for c in pool._connections],
        [None if r.connection is None else r.connection.name for r in requests],
    )


connection = st.tuples(st.sampled_from("ab"), st.booleans(), st.booleans(), st.booleans(), st.booleans())
state = st.fixed_dictionaries(
    {
        "max_connections": st.integers(1, 14),
        "max_keepalive": st.integers(0, 14),
        "connections": st.lists(connection, max_size=14),
        "requests": st.lists(st.tuples(st.sampled_from("ab"), st.booleans()), max_size=12),
    }
)


@settings(max_examples=400, deadline=None)
@given(state)
def test_the_one_pass_pool_decides_exactly_like_httpcore(state: dict[str, Any]) -> None:
    assert _outcome(_Pool, state) == _outcome(httpcore.AsyncConnectionPool, state)


def test_the_states_above_reach_every_decision() -> None:
    # Each branch once, so the property above cannot pass by never leaving the first one.
    idle_surplus = {
        "max_connections": 2,
        "max_keepalive": 0,
        "connections": [("a", False, False, True, True)],
        "requests": [],
    }
    assert _outcome(_Pool, idle_surplus) == (["c0"], [], [])
    reuse = {
        "max_connections": 2,
        "max_keepalive": 2,
        "connections": [("a", False, False, True, True)],
        "requests": [("a", False)],
    }
    assert _outcome(_Pool, reuse) == ([], ["c0"], ["c0"])
    create = {
        "max_connections": 2,
        "max_keepalive": 2,
        "connections": [("b", False, False, False, False)],
        "requests": [("a", False)],
    }
    assert _outcome(_Pool, create) == ([], ["c0", "new0"], ["new0"])
    replace_idle = {
        "max_connections": 1,
        "max_keepalive": 1,
        "connections": [("b", False, False, True, True)],
        "requests": [("a", False)],
    }
    assert _outcome(_Pool, replace_idle) == (["c0"], ["new0"], ["new0"])
    closed_expired = {
        "max_connections": 3,
        "max_keepalive": 3,
        "connections": [("a", True, False, False, False), ("a", False, True, True, True)],
        "requests": [],
    }
    assert _outcome(_Pool, closed_expired) == (["c1"], [], [])
