"""Fixtures of the acceptance suite: each test gets its own database, fake portal, fake FCM and service processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from hlf_actors.testing.fake_fcm import FakeFCM
from hlf_actors.testing.fake_portal import FakePortal

from .support import World


@pytest.fixture
def fcm() -> Iterator[FakeFCM]:
    with FakeFCM() as fake:
        yield fake


@pytest.fixture
def world(
    db_url: str, conn: psycopg.Connection[Any], portal: FakePortal, fcm: FakeFCM, tmp_path: Path
) -> Iterator[World]:
    """Torn down before the database, the portal and FCM: no process outlives them."""
    outside = World(db_url, conn, portal, fcm, tmp_path)
    try:
        yield outside
    finally:
        outside.close()
        print(outside.logs())  # shown by pytest only when the test failed
