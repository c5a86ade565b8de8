"""/healthz fails while the event loop lags, so a supervisor restarts a hung process (issue 19, item 1)."""

from __future__ import annotations

import time
from typing import Any

import anyio
import psycopg
import pytest

from hlf_actors.testing.fake_portal import FakePortal
from hlf_actors.testing.harness import eventually, running_service

pytestmark = pytest.mark.anyio


async def test_healthz_fails_after_the_event_loop_stalled_and_recovers_once_it_keeps_time(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal
) -> None:
    async with running_service(db_url, portal) as service:
        await eventually(lambda: service.health().status == "ok", what="a healthy leader")
        await anyio.sleep(0.6)  # the lag monitor has ticked

        time.sleep(4)  # noqa: ASYNC251 - on purpose: the whole loop hangs, as in a blocking call gone wrong
        stalled = service.health()
        assert (stalled.status, stalled.role) == ("unavailable", "leader")
        assert service.loop_lag_s() > 3

        await eventually(lambda: service.health().status == "ok", timeout=5, what="health back once on time")
