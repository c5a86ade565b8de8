"""Unit tests: pure and fast, no database, no sockets. Async tests run on asyncio only."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

# Hypothesis keeps its example database and a cache of source constants in ./.hypothesis unless told otherwise;
# a unit run leaves the working tree as it found it.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "hlf-actors-hypothesis")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
