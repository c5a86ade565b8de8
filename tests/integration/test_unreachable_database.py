"""A database that refuses connections may come back: `run` keeps trying, with backoff and one line a minute
(issue 19, item 6). The URLs that can never work exit 3 instead: tests/acceptance/test_unusable_settings.py."""

from __future__ import annotations

import socket

import anyio
import pytest
from loguru import logger
from psycopg.conninfo import make_conninfo

from hlf_actors.dynamics import DynamicsClient
from hlf_actors.service import Service
from hlf_actors.testing import harness
from hlf_actors.testing.fake_portal import FakePortal
from hlf_actors.testing.recording import RecordingAlertSender

pytestmark = pytest.mark.anyio


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens here once the socket is closed: connections are refused


async def test_a_refused_connection_is_retried_and_reported_once_a_minute(portal: FakePortal) -> None:
    url = make_conninfo(host="127.0.0.1", port=str(_closed_port()), user="postgres", dbname="postgres")
    config = harness.test_config(url, portal)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m.record["message"])), level="INFO")
    client = DynamicsClient(config)
    try:
        service = Service(config, portal=client, alert_sender=RecordingAlertSender())
        with anyio.move_on_after(4) as scope:  # 0.5 + 1 + 2 s of backoff: four tries, still trying
            await service.run()
        assert scope.cancelled_caught, "run() returned while the database refused every connection"
    finally:
        logger.remove(sink)
        await client.aclose()
    assert len(lines) == 1, lines
    assert lines[0].startswith("database unreachable for 0s, still trying (connection failed: "), lines
