"""Running the real Service in-process against a test database, the fake portal and an alert sender.

The service is the production one: the same listener, projector and actors, talking to the fake portal over real
HTTP on 127.0.0.1. Only settings differ (10 ms backoff base, no jitter), as the integration tests want.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import anyio
import psycopg

from ..config import Config, load_config
from ..dynamics import DynamicsClient
from ..push import AlertSender
from ..service import Service
from .fake_portal import FakePortal
from .recording import RecordingAlertSender

__all__ = ["eventually", "running_service", "sync_state", "test_config", "until"]


def test_config(db_url: str, portal: FakePortal, **overrides: str) -> Config:
    env = {
        "HLF_DATABASE_URL": db_url,
        **portal.env(),
        "HLF_BACKOFF_BASE_MS": "10",
        "HLF_BACKOFF_MAX_MS": "2000",
        "HLF_BACKOFF_JITTER": "off",
        "HLF_HTTP_PORT": "0",
        "HLF_HTTP_HOST": "127.0.0.1",
        "HLF_PORTAL_TIMEOUT": "5s",
        # The real limit (6000/5m) would make a 10,000-mentor test take minutes; tests of the limit set their own.
        "HLF_PORTAL_RATE_LIMIT": "1000000/1s",
        **overrides,
    }
    return load_config(env, dotenv=None)


@asynccontextmanager
async def running_service(
    db_url: str,
    portal: FakePortal,
    *,
    sender: AlertSender | None = None,
    env: Mapping[str, str] | None = None,
    **service_kwargs: Any,
) -> AsyncIterator[Service]:
    config = test_config(db_url, portal, **dict(env or {}))
    client = DynamicsClient(config)
    service = Service(config, portal=client, alert_sender=sender or RecordingAlertSender(), **service_kwargs)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            await eventually(lambda: service.state.leader, what="the service to become leader")
            yield service
            service.request_stop()
    finally:
        await client.aclose()


_SYNC_STATE = "SELECT state FROM sync_status WHERE mentor_id = %s"


def sync_state(conn: psycopg.Connection[Any], mentor_id: UUID) -> str | None:
    """The mentor's sync_status.state as a user would read it (None before the first projection)."""
    row = conn.execute(_SYNC_STATE, (mentor_id,)).fetchone()
    return str(row[0]) if row else None


async def eventually(check: Callable[[], Any], *, timeout: float = 10.0, what: str = "the condition") -> Any:
    """Poll ``check`` every 5 ms until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        await anyio.sleep(0.005)


def until(check: Callable[[], Any], *, timeout: float = 10.0, what: str = "the condition") -> Any:
    """``eventually`` for synchronous tests (a browser driven by Selenium, threads): poll every 10 ms."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(0.01)
