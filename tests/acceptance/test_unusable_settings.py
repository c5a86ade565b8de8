"""Settings `run` can never work with: one line and a clear exit status, never a traceback or a loop (issue 19,
items 3 and 6)."""

from __future__ import annotations

import socket
import time
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from .support import World


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _run_until_exit(world: World, timeout: float, **env: str) -> tuple[int, list[str], float]:
    """Start `run` with ``env`` and wait for it to end: its exit status, the lines it wrote, how long it took."""
    started = time.monotonic()
    process = world.spawn(**env)
    deadline = started + timeout
    while process.returncode is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"`run` still running after {timeout:.0f}s\n{process.log_tail()}")
        time.sleep(0.02)
    assert process.returncode is not None
    return process.returncode, process.log_text().splitlines(), time.monotonic() - started


def test_a_second_run_on_a_taken_port_exits_2_with_one_line(world: World) -> None:
    port = str(_free_port())
    first = world.start(HLF_HTTP_PORT=port, HLF_HTTP_HOST="127.0.0.1")

    code, lines, _ = _run_until_exit(world, 20, HLF_HTTP_PORT=port, HLF_HTTP_HOST="127.0.0.1")

    assert code == 2, lines
    errors = [line for line in lines if not line.startswith("{")]
    assert len(errors) == 1, lines
    assert errors[0].startswith(f"hlf-actors run: configuration: HLF_HTTP_PORT: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in "\n".join(lines)
    assert first.running


def test_a_malformed_database_url_makes_run_exit_3_with_one_line(world: World) -> None:
    code, lines, took = _run_until_exit(world, 10, HLF_DATABASE_URL="postgresql://127.0.0.1:notaport/x")

    assert (code, len(lines)) == (3, 1), lines
    assert lines[0].startswith("hlf-actors run: cannot use the database: "), lines
    assert took < 10


def test_a_refused_password_makes_run_exit_3_with_one_line(world: World, conn: psycopg.Connection[Any]) -> None:
    # The test server trusts `postgres` from 127.0.0.1; a role that does not exist is refused all the same, with
    # the same SQLSTATE class (28) as a wrong password where pg_hba asks for one.
    url = make_conninfo(world.db_url, user="hlf_no_such_role", password="wrong-password")
    code, lines, took = _run_until_exit(world, 10, HLF_DATABASE_URL=url)

    assert (code, len(lines)) == (3, 1), lines
    assert lines[0].startswith("hlf-actors run: cannot use the database: "), lines
    assert "wrong-password" not in lines[0]  # the password never shows
    assert took < 10
