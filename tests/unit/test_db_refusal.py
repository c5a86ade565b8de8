"""Which connection failures mean "this HLF_DATABASE_URL can never work" (exit 3) and which may pass (issue 19)."""

from __future__ import annotations

import psycopg
import pytest

from hlf_actors.db import refusal

NEVER = (
    'connection is bad: invalid integer value "notaport" for connection option "port"',
    'connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  password authentication '
    'failed for user "hlf"',
    'connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  role "x" does not exist',
    'connection failed: connection to server at "10.0.0.1", port 5432 failed: FATAL:  no pg_hba.conf entry for host',
    'connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  database "nope" does not exist',
)
LATER = (
    'connection failed: connection to server at "127.0.0.1", port 1 failed: Connection refused',
    "connection failed: timeout expired",
    'connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  sorry, too many clients already',
    'connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  the database system is '
    "starting up",
)


@pytest.mark.parametrize("message", NEVER)
def test_a_url_that_can_never_work_is_a_refusal(message: str) -> None:
    assert refusal(psycopg.OperationalError(message)) == message


@pytest.mark.parametrize("message", LATER)
def test_a_server_that_may_come_back_is_not(message: str) -> None:
    assert refusal(psycopg.OperationalError(message)) is None


def test_a_url_libpq_cannot_parse_is_a_refusal() -> None:
    assert refusal(psycopg.ProgrammingError('invalid percent-encoded token: "%zz"')) is not None
